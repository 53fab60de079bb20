"""Keras callbacks of a training run, beside Keras' own.

:class:`DropWarmup` switches the robust loss's drop on after its warm-up
epochs (the switch itself is a variable the loss owns,
:func:`street2shop.losses.drop_switch`). :class:`RestoreFromChief` resumes a
worker of a multi-worker run from the chief's backup. :class:`LearningRateLog` adds the
learning rate to each epoch's logs (so ``log.csv`` shows a schedule). :class:`TrainingProgress` is what a
person sees of ``fit``: one short line per epoch, and a bar during the epoch
on a terminal (``log.csv`` and TensorBoard keep every metric).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import keras

from street2shop.console import Progress, progress_mode

logger = logging.getLogger(__name__)


class LearningRateLog(keras.callbacks.Callback):
    """Adds ``learning_rate`` to each epoch's logs: the rate of the optimizer's next step (a schedule's value at
    the epoch's end). Place it before the callbacks that record the logs."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


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


# The handful of metrics an epoch's line shows, by the end of their Keras name: (suffix, label, as a percentage).
EPOCH_METRICS = (
    ("loss", "loss", False),
    ("pair_accuracy", "pair accuracy", True),
    ("logits_a_accuracy", "class accuracy", True),
    ("positive_drop_rate", "positives dropped", True),
)


def _metric(logs: Mapping[str, Any], suffix: str, prefix: str = "") -> float | None:
    """The value of the metric named ``suffix`` (``loss`` exactly; others by their name's end), of training or ``val_``."""
    for key, value in logs.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name is None or (not prefix and key.startswith("val_")):
            continue
        if name == suffix or (suffix != "loss" and name.endswith(suffix)):
            return float(value)
    return None


def epoch_summary(logs: Mapping[str, Any]) -> str:
    """``loss 0.512 (val 0.498), pair accuracy 71% (val 69%), ...``: the metrics of :data:`EPOCH_METRICS` present in ``logs``."""
    parts = []
    for suffix, label, percent in EPOCH_METRICS:
        value = _metric(logs, suffix)
        if value is None:
            continue
        shown = (lambda v: f"{100 * v:.0f}%") if percent else (lambda v: f"{v:.3f}")
        val = _metric(logs, suffix, "val_")
        parts.append(f"{label} {shown(value)}" + (f" (val {shown(val)})" if val is not None else ""))
    return ", ".join(parts)


class TrainingProgress(keras.callbacks.Callback):
    """What a person sees of ``fit``: a line per epoch (logged), and a bar during the epoch on a terminal.

    Modes as :class:`~street2shop.console.Progress`: ``"bar"`` (a terminal),
    ``"lines"`` (a log file: a line at most every 30 s during an epoch, and the
    epoch's line), ``"none"``. The first step of a run builds the graph and
    takes longest: a line says so before, and another when it is done.
    """

    def __init__(self, epochs: int, steps: int, mode: str | bool = "auto", every: float = 30.0) -> None:
        super().__init__()
        self.epochs = int(epochs)
        self.steps = int(steps)
        self.mode = progress_mode(mode)
        self.every = every
        self.bar: Progress | None = None
        self.first_step = True
        self.epoch_start = self.run_start = 0.0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.run_start = time.monotonic()
        self.first_step = True
        if self.mode != "none":
            logger.info("the first step builds the model's graph and takes longest (a minute or more on a CPU)")

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_start = time.monotonic()
        self.bar = Progress(self.steps, f"epoch {epoch + 1}/{self.epochs}", unit="steps", mode=self.mode, every=self.every)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.mode == "none" or self.bar is None:
            return
        if self.first_step:
            self.first_step = False
            self.bar.close(erase=True)
            logger.info("graph built and the first step done in %.0f s", time.monotonic() - self.run_start)
            epoch = self.bar.what
            self.bar = Progress(self.steps, epoch, unit="steps", mode=self.mode, every=self.every)
        loss = _metric(logs or {}, "loss")
        self.bar.update(batch + 1, f"loss {loss:.3f}" if loss is not None else "")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.close(erase=True)
        if self.mode != "none":
            logger.info("epoch %d/%d (%.0f s): %s", epoch + 1, self.epochs, time.monotonic() - self.epoch_start, epoch_summary(logs or {}))
