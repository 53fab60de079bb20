"""Keras callbacks of a training run, beside Keras' own.

:class:`DropWarmup` switches the robust loss's drop on after its warm-up
epochs (the switch itself is a variable the loss owns,
:func:`street2shop.losses.drop_switch`). :class:`RestoreFromChief` resumes a
worker of a multi-worker run from the chief's backup. :class:`LearningRateLog` adds the
learning rate to each epoch's logs (so ``log.csv`` shows a schedule). :class:`TrainingProgress` is what a
person sees of ``fit``: one short line per epoch, and a bar during the epoch
on a terminal (``log.csv`` and TensorBoard keep every metric). :class:`EmaWeights`
puts the optimizer's moving average of the weights in the model wherever an
epoch is judged and recorded.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras

from street2shop.config import TrainConfig
from street2shop.console import Progress, progress_mode
from street2shop.runlog import LOG_FILE, best_logged_epoch, run_log_columns

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


class EmaWeights(keras.callbacks.Callback):
    """The optimizer's moving average of the weights (``FitConfig.ema_momentum``) in the model wherever a run is judged and recorded.

    Keras keeps the average in the optimizer (``use_ema``: after every applied
    step, ``average = m * average + (1 - m) * weights``, the first step's
    weights themselves) and copies it into the model when ``fit`` ends. In
    between, this callback swaps it in for validation (so ``val_loss`` and
    the best checkpoint judge the average) and at each epoch's end for the
    callbacks that record the epoch (the log, ``best.keras``, ``last.keras``);
    :attr:`back` swaps the trained weights back, so that the backup holds the
    weights and the average as training left them and a resumed run goes on
    with both. Place this callback first and :attr:`back` just before the
    backup. (Keras' ``SwapEMAWeights(swap_on_epoch=True)`` leaves the average
    in the model at an epoch's end, so a backup taken then would resume with
    the two exchanged.)

    Batch normalisation's moving statistics are not trainable weights: they
    are their own moving averages, kept as training left them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.in_model = False
        self.back = _TrainedWeightsBack(self)

    def _pairs(self) -> list[tuple[Any, Any]]:
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # mixed_float16's LossScaleOptimizer holds ours
        # Keras' own attributes, as keras.callbacks.SwapEMAWeights reads them: the variables it trains, their averages.
        return list(zip(optimizer._trainable_variables, optimizer._model_variables_moving_average))

    def swap(self, average_in_model: bool) -> None:
        """Exchanges the weights and their average, unless the model already holds the one asked for."""
        if self.in_model == average_in_model:
            return
        for variable, average in self._pairs():
            trained = keras.ops.convert_to_numpy(variable)
            variable.assign(keras.ops.convert_to_numpy(average))
            average.assign(trained)
        self.in_model = average_in_model

    def on_test_begin(self, logs: dict | None = None) -> None:
        self.swap(True)

    def on_test_end(self, logs: dict | None = None) -> None:
        self.swap(False)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.swap(True)


class _TrainedWeightsBack(keras.callbacks.Callback):
    """:attr:`EmaWeights.back`: the trained weights back in the model at an epoch's end (place it before the backup)."""

    def __init__(self, ema: EmaWeights) -> None:
        super().__init__()
        self.ema = ema

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.ema.swap(False)


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


# --------------------------------------------------------------------------- the run's callbacks


def resume_epoch(backup_dir: Path) -> int:
    """The epoch a ``BackupAndRestore`` backup will resume at (0 without one)."""
    for name in ("training_metadata.json", "training_metadata.json.bkp"):
        path = backup_dir / name
        if path.is_file():
            try:
                return int(json.loads(path.read_text())["epoch"])
            except (ValueError, KeyError, OSError):
                logger.warning("ignoring unreadable %s", path)
    return 0


def best_checkpoint_from_epoch(config: TrainConfig) -> int:
    """The first epoch (0-based) ``best.keras`` may come from: the end of a robust-loss warm-up that ends within
    the run (:class:`~street2shop.callbacks.DropWarmup` restarts the best-value tracking there), else 0."""
    lc = config.loss
    return lc.drop_warmup_epochs if lc.loss == "robust" and 0 < lc.drop_warmup_epochs < config.fit.epochs else 0


def build_callbacks(config: TrainConfig, model: Any, out: Path, initial_epoch: int, monitor: str, write_dir: Path | None = None) -> list[Any]:
    """Backup (resume), best and last checkpoints, CSV and TensorBoard logs, NaN stop, early stopping, the robust-loss warm-up.

    The run's state is read from ``out``; files are written to ``write_dir``
    (``out`` unless given: a multi-worker run's other workers write to a
    temporary folder, and resume from the chief's backup in ``out``).
    """
    fc = config.fit
    write = write_dir or out
    best, last = write / "best.keras", write / "last.keras"
    # A resumed run appends to its log and only replaces best.keras with a better epoch;
    # a fresh run in an old folder starts both anew.
    # The robust loss's warm-up switch (None without a warm-up). Warm-up epochs compare only
    # with each other, and the epochs after it only with each other (see callbacks.DropWarmup).
    drop_switch = getattr(model.loss.get("distance") if isinstance(model.loss, dict) else None, "active", None)
    first = best_checkpoint_from_epoch(config)
    from_epoch = first if initial_epoch > first else 0
    best_logged = best_logged_epoch(out / LOG_FILE, monitor, from_epoch=from_epoch) if initial_epoch else None
    best_so_far = best_logged[1] if best_logged else None
    best_checkpoint = keras.callbacks.ModelCheckpoint(str(best), monitor=monitor, save_best_only=True, initial_value_threshold=best_so_far)
    # At the end of an epoch, everything that records it (log row, checkpoints) runs before the backup,
    # which marks the epoch done: a Ctrl-C in between redoes the epoch, and the resumed run drops the
    # log rows of epochs it redoes (runlog.trim_run_log), so log.csv holds every finished epoch exactly once.
    callbacks: list[Any] = [
        keras.callbacks.CSVLogger(str(write / LOG_FILE), append=bool(initial_epoch)),
        keras.callbacks.TensorBoard(str(write / "tensorboard"), write_graph=False, profile_batch=0),
        keras.callbacks.TerminateOnNaN(),
        best_checkpoint,
        keras.callbacks.ModelCheckpoint(str(last)),
    ]
    columns = run_log_columns(out / LOG_FILE) if initial_epoch else None
    if columns is None or "learning_rate" in columns:
        # Before the CSV logger, which writes the logs it is given; not into the log of a run resumed from
        # before this column existed (CSVLogger keeps the old header, and the row would shift under it).
        callbacks.insert(0, LearningRateLog())
    ema = EmaWeights() if fc.ema_momentum else None
    if ema is not None:
        callbacks.insert(0, ema)  # first: the average in the model for every callback that records the epoch
    if fc.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, patience=fc.early_stopping_patience, restore_best_weights=False))
    if drop_switch is not None:
        restart = [best_checkpoint] + [c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)]
        callbacks.append(DropWarmup(drop_switch, config.loss.drop_warmup_epochs, restart=restart))
        if config.loss.drop_warmup_epochs >= fc.epochs:
            logger.warning("drop_warmup_epochs %d >= epochs %d: the robust loss never drops a pair (it is the plain one)",
                           config.loss.drop_warmup_epochs, fc.epochs)
    elif config.loss.drop_warmup_epochs:
        logger.warning("drop_warmup_epochs %d ignored: it applies to the robust loss, and this run uses the %s loss",
                       config.loss.drop_warmup_epochs, config.loss.loss)
    if ema is not None:
        callbacks.append(ema.back)  # the trained weights back for the backup, so a resumed run continues both
    # Last: see above. Another worker than the chief resumes from the chief's backup (cluster.py).
    callbacks.append(keras.callbacks.BackupAndRestore(str(out / "backup")) if write == out
                     else RestoreFromChief(str(write / "backup"), str(out / "backup")))
    return callbacks
