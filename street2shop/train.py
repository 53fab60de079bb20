"""Training: ``train(config)`` builds the datasets and the siamese model and calls ``model.fit``.

Outputs in ``config.fit.output_dir``:

- ``config.toml``: the resolved configuration (re-run with ``--config``);
- ``best.keras`` (lowest validation loss, or training loss without a
  validation split) and ``last.keras``: full models (with ``ema_momentum``,
  holding the moving average of the weights, which validation judged), reload with
  ``keras.saving.load_model(path)`` (``safe_mode=True`` works; a
  ``mixed_float16`` run's inside ``precision_scope("mixed_float16")`` to keep
  its loss scaling, see :mod:`street2shop.model.precision`);
- ``backup/``: ``BackupAndRestore`` state; a killed run started again with the
  same command resumes at the epoch it was in, with the pair plans it would
  have seen, under the dtype policy and moving average it was trained with
  (``precision``, ``ema_momentum``: another is refused; ``init_checkpoint``
  starts a new run from its weights under any);
- ``log.csv`` (one row per epoch) and ``tensorboard/``.

Distribution goes through ``tf.distribute``: one device by default,
``MirroredStrategy`` over the local GPUs, ``MultiWorkerMirroredStrategy`` from
``TF_CONFIG`` (:func:`street2shop.cluster.get_strategy`). The model and
optimizer are created under the strategy's scope; ``batch_size`` is the global
batch, split across replicas, and each worker reads only its share of every
global batch (:func:`street2shop.training_data.build_datasets`). On several
workers the chief writes the outputs above; the others write theirs to a
temporary folder, remove it at the end, and resume from the chief's backup
(:mod:`street2shop.cluster`), so ``output_dir`` must be a folder every worker
sees at the same path.

This module runs a training: :func:`start_run` settles one worker's part
(:class:`TrainingRun`), :func:`fit` builds and fits. The pieces have their own
homes: the records and datasets (:mod:`street2shop.training_data`), the
compiled model (:mod:`street2shop.compile`), the callbacks
(:mod:`street2shop.callbacks`), the run log (:mod:`street2shop.runlog`), the
cluster (:mod:`street2shop.cluster`) and the starting weights
(:func:`street2shop.model.siamese.read_tower_weights`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from street2shop.cluster import WorkerRole, check_workers_agree, get_strategy, worker_role, worker_write_dir
from street2shop.compile import build_model
from street2shop.config import TrainConfig, read_config_values, save_config
from street2shop.errors import ConfigError
from street2shop.runlog import LOG_FILE, trim_run_log
from street2shop.training_data import TrainingData, build_datasets, load_training_data, steps_per_epoch

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """What a training run produced."""

    model: Any
    history: dict[str, list[float]]
    output_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    initial_epoch: int
    num_classes: int | None  # classes of the softmax head (auxiliary, then products); None without one
    seconds: float
    pairs_per_second: float


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """One worker's part in a training run, settled before anything is built.

    Every setting of the run is a field of ``config``; the rest is what this
    worker found when it started.

    Attributes:
        config: TrainConfig.
        strategy: the ``tf.distribute`` strategy the model is built under.
        role: this process's place in the cluster.
        data: the records and classes it trains on.
        steps: int, steps per epoch.
        initial_epoch: int, the epoch it starts at: 0, or the one its backup resumes.
        output_dir: Path, the run's folder, where its state (backup, log) is read.
        write_dir: Path, where this worker writes: ``output_dir`` on the chief,
            a temporary folder of its own on the others.
    """

    config: TrainConfig
    strategy: Any
    role: WorkerRole
    data: TrainingData
    steps: int
    initial_epoch: int
    output_dir: Path
    write_dir: Path

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)


def train(
    config: TrainConfig,
    *,
    strategy: Any = None,
    extra_callbacks: list[Any] | None = None,
    verbose: int | str = "auto",
) -> TrainResult:
    """Trains the siamese model described by ``config`` with ``model.fit``.

    Args:
        config: TrainConfig.
        strategy: a tf.distribute.Strategy to use instead of the one
            ``config.fit.distribution`` names.
        extra_callbacks: more Keras callbacks to pass to fit (they run after
            the run's own, the backup included).
        verbose: what is shown of ``fit`` (:class:`~street2shop.callbacks.TrainingProgress`):
            0 nothing, 1 a progress bar and a line per epoch, 2 a line per
            epoch (and one every 30 s within it), ``"auto"`` 1 when stderr is
            a terminal, else 2.

    Returns:
        TrainResult.
    """
    from street2shop.console import progress_mode

    # A bad value fails here, before anything is written or built.
    progress = progress_mode({0: "none", 1: "bar", 2: "lines"}.get(verbose, verbose))  # type: ignore[call-overload]
    run = start_run(config, strategy)
    try:
        return fit(run, extra_callbacks=extra_callbacks, progress=progress)
    finally:
        if run.write_dir != run.output_dir:
            shutil.rmtree(run.write_dir, ignore_errors=True)


def start_run(config: TrainConfig, strategy: Any = None) -> TrainingRun:
    """This worker's :class:`TrainingRun`: the strategy, the data, the epoch to resume at, where it writes.

    A resumed run's chief first drops the log rows of the epochs it does
    again; on several workers, all of them must then hold the same
    configuration, records and resume epoch (else every one stops).
    """
    from street2shop.callbacks import resume_epoch

    # The strategy first: MultiWorkerMirroredStrategy must exist before any TF op runs.
    strategy = strategy or get_strategy(config.fit.distribution)
    role = worker_role(strategy)
    steps = steps_per_epoch(config, strategy.num_replicas_in_sync)
    data = load_training_data(config)  # bad data fails before anything is written
    out = Path(config.fit.output_dir)
    initial_epoch = resume_epoch(out / "backup")
    if initial_epoch:
        check_resumes_as_trained(out, config)  # before anything in the run's folder changes
    if initial_epoch and role.is_chief:
        trim_run_log(out / LOG_FILE, initial_epoch)  # before the workers compare notes: they read it after
    if role.count > 1:
        # Every worker must draw the same plans and resume at the same epoch (from the chief's backup).
        auxiliary_labels = None if data.auxiliary_labels is None else data.auxiliary_labels.tolist()
        check_workers_agree(strategy, {"config": config.to_dict(), "records": (data.train, data.val, data.auxiliary, auxiliary_labels),
                                       "resume_epoch": initial_epoch})
    write = worker_write_dir(out, role)
    if not role.is_chief:
        logger.info("worker %d of %d: %s is the chief's; this worker writes to %s and removes it at the end", role.index, role.count, out, write)
    return TrainingRun(config, strategy, role, data, steps, initial_epoch, out, write)


def check_resumes_as_trained(out: Path, config: TrainConfig) -> None:
    """Refuses to resume the run in ``out`` under another dtype policy or moving average than its ``config.toml`` records.

    A backup holds the optimizer of its policy (under ``mixed_float16`` a
    ``LossScaleOptimizer``, with its loss scale) and, with ``ema_momentum``,
    the moving average of the weights; half a run one way and half another is
    no run of either. The weights themselves are float32 in every policy, so
    a new run can start from them (``init_checkpoint``). A run from before
    these settings existed was float32 without an average.
    """
    path = out / "config.toml"
    if not path.is_file():
        logger.warning("%s has a backup but no config.toml: cannot check that it resumes under the precision and moving average it was trained with", out)
        return
    fit_values = read_config_values(path).get("fit", {})
    fit_values = fit_values if isinstance(fit_values, dict) else {}
    saved_ema = float(fit_values.get("ema_momentum", 0.0))  # a run from before ema_momentum existed had none
    if saved_ema != config.fit.ema_momentum:
        raise ConfigError(
            f"{out} was trained with ema_momentum {saved_ema} (its config.toml) and resumes only with it: its backup holds "
            f"{'a moving average of its weights' if saved_ema else 'no moving average'}. Run again with --ema-momentum {saved_ema}, "
            f"or start a new run in another output_dir with --init-checkpoint {out / 'last.keras'}. "
            f"Received: ema_momentum={config.fit.ema_momentum}")
    saved = fit_values.get("precision", "float32")
    if saved != config.fit.precision:
        raise ConfigError(
            f"{out} was trained under precision {saved!r} (its config.toml) and resumes only under it: run again with "
            f"--precision {saved}, or start a new run in another output_dir with --init-checkpoint {out / 'last.keras'} "
            f"(its weights load under any precision). Received: precision={config.fit.precision!r}")


def fit(run: TrainingRun, *, extra_callbacks: list[Any] | None = None, progress: str = "none") -> TrainResult:
    """Builds the datasets, the model and the callbacks of ``run``, and calls ``model.fit``."""
    import keras

    from street2shop.callbacks import TrainingProgress, build_callbacks
    from street2shop.cluster import multi_worker_fit
    from street2shop.model.siamese import read_tower_weights, set_tower_weights

    config, data, out, write = run.config, run.data, run.output_dir, run.write_dir
    fc = config.fit
    write.mkdir(parents=True, exist_ok=True)
    save_config(config, write / "config.toml")
    keras.utils.set_random_seed(fc.seed)
    if run.initial_epoch:
        logger.info("resuming %s at epoch %d", out, run.initial_epoch + 1)
    train_ds, val_ds, val_steps = build_datasets(config, data, run.steps, run.initial_epoch, run.strategy)
    # The starting weights of a new run only: a resumed one restores its backup. Read outside the
    # strategy's scope, so the checkpoint's model is not a distributed one.
    init = config.model.init_checkpoint
    init_weights = read_tower_weights(init) if init and not run.initial_epoch else None
    with run.strategy.scope():
        model = build_model(config, data.num_classes, label_noise=data.label_noise)
        if init_weights is not None:
            set_tower_weights(model, init_weights, init)
    if data.label_noise:
        logger.info("training records carry corruption flags (true_product_id): logging the drop's precision and recall")
    monitor = "val_loss" if val_ds is not None else "loss"
    callbacks = ([TrainingProgress(fc.epochs, run.steps, progress)] + build_callbacks(config, model, out, run.initial_epoch, monitor, write)
                 + list(extra_callbacks or []))
    _warn_if_the_quantile_cannot_drop(config, data, run.replicas)

    _log_precision(model, fc.precision)
    tasks = " and ".join(f"{n} {kind} classes" for n, kind in ((data.auxiliary_classes, "auxiliary"), (len(data.product_labels or ()), "product")) if n)
    logger.info(
        "training %s: %d pairs/epoch, %d epochs, batch %d over %d replica(s), %s loss%s%s",
        config.model.backbone, config.data.pairs_per_epoch, fc.epochs, fc.batch_size, run.replicas, config.loss.loss,
        ", multi-task with " if tasks else "", tasks,
    )
    start = time.perf_counter()
    with multi_worker_fit(model) if run.role.count > 1 else contextlib.nullcontext():
        history = model.fit(
            train_ds, epochs=fc.epochs, steps_per_epoch=run.steps, validation_data=val_ds, validation_steps=val_steps,
            shuffle=False,  # the pair plans are shuffled; tf.data input is not reshuffled by Keras anyway
            callbacks=callbacks, verbose=0,  # TrainingProgress shows it
        )
    seconds = time.perf_counter() - start
    epochs_run = max(0, len(history.epoch))
    pairs_per_second = epochs_run * run.steps * fc.batch_size / seconds if seconds > 0 else 0.0
    best = out / "best.keras"
    logger.info("trained %d epoch(s) in %.0f s (%.1f pairs/s); best checkpoint %s", epochs_run, seconds, pairs_per_second, best)
    return TrainResult(model, dict(history.history), out, best, out / "last.keras", run.initial_epoch, data.num_classes, seconds, pairs_per_second)


def _log_precision(model: Any, precision: str) -> None:
    """One line on what the step computes in and whether XLA compiles it; a warning for float16 without a GPU."""
    import tensorflow as tf

    scaling = ", with loss scaling" if type(model.optimizer).__name__ == "LossScaleOptimizer" else ""
    logger.info("precision %s%s, XLA %s", precision, scaling, "on" if model.jit_compile else "off")
    if precision == "mixed_float16" and not tf.config.list_logical_devices("GPU"):
        logger.warning("mixed_float16 without a GPU: CPUs compute float16 slowly (BENCHMARKS.md, on the development machine's CPU: "
                       "1/150 of float32's speed without XLA, 0.6x with it); it is meant for NVIDIA GPUs. On a CPU, use float32, "
                       "or mixed_bfloat16 if it has AMX")


def _warn_if_the_quantile_cannot_drop(config: TrainConfig, data: TrainingData, replicas: int) -> None:
    """Warns when each replica's share of a batch has too few positives for the robust loss's quantile to drop one.

    The quantile is taken per replica (``RobustContrastiveLoss``), so with
    ``n`` positives in a replica's share it drops ``floor((1 − q)·n)`` of them:
    none below ``1/(1 − q)`` positives (10 at q = 0.9).
    """
    q = config.loss.get("positive_quantile")
    if config.loss.loss != "robust" or q is None or q >= 1.0:
        return
    pos, _, aux = config.data.pair_config(config.data.pairs_per_epoch, config.fit.seed).fractions(data.auxiliary is not None)
    share = pos + aux / 2  # about half the auxiliary pairs are positives
    positives = config.fit.batch_size / replicas * share
    if share > 0 and math.floor((1.0 - q) * positives + 1e-6) < 1:
        needed = replicas * math.ceil(1.0 / ((1.0 - q) * share) - 1e-6)
        logger.warning(
            "robust loss: the %g quantile is taken over each replica's share of the batch, about %.0f positive pairs "
            "(batch_size %d over %d replica(s)): too few to drop one, so it drops (almost) nothing. "
            "batch_size %d or more lets it drop the farthest positives", q, positives, config.fit.batch_size, replicas, needed)
