"""Keras callbacks of a training run, beside Keras' own.

:class:`DropWarmup` switches the robust loss's drop on after its warm-up
epochs (the switch itself is a variable the loss owns,
:func:`street2shop.losses.drop_switch`).
"""

from __future__ import annotations

import logging
from typing import Any

import keras

logger = logging.getLogger(__name__)


class DropWarmup(keras.callbacks.Callback):
    """Lets the robust loss drop pairs only from epoch ``warmup_epochs`` (0-based) on.

    Sets the loss's ``active`` switch (a scalar variable read by the loss and
    its drop-rate metrics) at the start of every epoch, from the epoch
    number, so a resumed run gets it right too. Until then the robust loss is
    the plain contrastive loss and the drop rates read 0.

    The robust loss of given weights is lower than their plain loss (dropped
    pairs count 0), so the two cannot be compared: when the warm-up ends, the
    callbacks in ``restart`` (``ModelCheckpoint(save_best_only=True)``,
    ``EarlyStopping``, anything with a ``best``) forget their best value and
    start again, or a warm-up epoch could never be "best" and a robust one
    always would.
    """

    def __init__(self, active: Any, warmup_epochs: int, restart: Any = ()) -> None:
        super().__init__()
        self.active = active
        self.warmup_epochs = int(warmup_epochs)
        self.restart = list(restart)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        on = epoch >= self.warmup_epochs
        if on and epoch == self.warmup_epochs and self.warmup_epochs > 0:
            logger.info("robust loss: warm-up over, dropping pairs from epoch %d on; best-value tracking starts again", epoch + 1)
            for callback in self.restart:
                callback.best = None
                if hasattr(callback, "wait"):
                    callback.wait = 0
                if hasattr(callback, "best_weights"):
                    callback.best_weights = None
        self.active.assign(1.0 if on else 0.0)


class RestoreFromChief(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` for a worker other than the chief: backs up to its own folder, restores from the chief's.

    Every worker of a multi-worker run must resume from the same state, and
    only the chief's backup (in ``output_dir``, on a file system the workers
    share) is kept; this worker's own backup goes to ``backup_dir`` in its
    temporary folder and is never read. The chief's is read, never written
    or removed, here.
    """

    def __init__(self, backup_dir: str, chief_backup_dir: str) -> None:
        super().__init__(backup_dir)
        self.chief = keras.callbacks.BackupAndRestore(chief_backup_dir, delete_checkpoint=False)

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        self.chief.set_model(model)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.chief.on_train_begin(logs)
