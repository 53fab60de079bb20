"""Training: ``train(config)`` builds the datasets and the siamese model and calls ``model.fit``.

Outputs in ``config.fit.output_dir``:

- ``config.toml``: the resolved configuration (re-run with ``--config``);
- ``best.keras`` (lowest validation loss, or training loss without a
  validation split) and ``last.keras``: full models, reload with
  ``keras.saving.load_model(path)`` (``safe_mode=True`` works);
- ``backup/``: ``BackupAndRestore`` state; a killed run started again with the
  same command resumes at the epoch it was in, with the pair plans it would
  have seen;
- ``log.csv`` (one row per epoch) and ``tensorboard/``.

Distribution goes through ``tf.distribute``: one device by default,
``MirroredStrategy`` over the local GPUs, ``MultiWorkerMirroredStrategy`` from
``TF_CONFIG``. The model and optimizer are created under the strategy's scope;
``batch_size`` is the global batch, split across replicas, and each worker
reads only its share of every global batch (``build_datasets``). On several
workers the chief writes the outputs above; the others write theirs to a
temporary folder, remove it at the end, and resume from the chief's backup
(``street2shop.cluster``), so ``output_dir`` must be a folder every worker
sees at the same path.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from street2shop.config import TrainConfig, save_config
from street2shop.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CATALOG_SPLIT = "catalog"


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


def get_strategy(name: str = "auto"):
    """The ``tf.distribute`` strategy for ``name`` (see ``FitConfig.distribution``)."""
    import tensorflow as tf

    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    workers = len(tf_config.get("cluster", {}).get("worker", []))
    if name == "auto":
        if workers > 1:
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "multi_worker":
        if workers < 1:
            raise ConfigError("distribution='multi_worker' needs TF_CONFIG naming the cluster's workers. Received: TF_CONFIG unset or without workers")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def load_training_records(config: TrainConfig) -> tuple[list[Any], list[Any]]:
    """Reads the manifest and returns ``(train_records, val_records)``.

    Train: records of the training split(s) plus every shop photo of split
    ``catalog`` (the catalogue is shared by all splits). Validation likewise
    with the validation split. Unreadable images and empty boxes are dropped
    (``check_images``).
    """
    from street2shop.data.image import check_images
    from street2shop.data.records import read_manifest_csv

    if not config.data.manifest:
        raise ConfigError("manifest is required: the manifest CSV of your street and shop photos. Received: manifest=''")
    records = read_manifest_csv(config.data.manifest)
    train_splits, val_splits = config.data.train_splits, config.data.val_splits
    catalog = [r for r in records if r.domain == "shop" and r.split == CATALOG_SPLIT]
    train = [r for r in records if r.split in train_splits] + [r for r in catalog if CATALOG_SPLIT not in train_splits]
    val = [r for r in records if r.split in val_splits] + [r for r in catalog if CATALOG_SPLIT not in val_splits] if val_splits else []
    if not any(r.domain == "street" for r in train):
        splits = sorted({r.split for r in records})
        raise DataError(f"no street photo in split(s) {sorted(train_splits)} of {config.data.manifest}. Received splits: {splits}")
    if config.data.check_images:
        checked, _ = check_images(list(dict.fromkeys(train + val)))
        keep = set(checked)
        train = [r for r in train if r in keep]
        val = [r for r in val if r in keep]
    if val and not any(r.domain == "street" for r in val):
        logger.warning("validation split %s has no street photo: training without validation", sorted(val_splits))
        val = []
    return train, val


@dataclasses.dataclass
class TrainingData:
    """The records a run trains on, and the classes of its softmax head."""

    train: list[Any]
    val: list[Any]
    auxiliary: list[Any] | None = None
    auxiliary_labels: Any = None
    auxiliary_classes: int = 0
    product_labels: dict[str, int] | None = None

    @property
    def label_noise(self) -> bool:
        """Some training record names a ``true_product_id`` other than its ``product_id`` (a label-noise benchmark)."""
        from street2shop.data.pairs import has_label_noise

        return has_label_noise(self.train)

    @property
    def num_classes(self) -> int | None:
        """Classes of the shared softmax head (auxiliary, then products), None without one."""
        total = self.auxiliary_classes + len(self.product_labels or ())
        return total or None


def load_training_data(config: TrainConfig) -> TrainingData:
    """The training and validation records, the auxiliary labelled set and the product classes of ``config``."""
    from street2shop.data.folders import read_class_folders
    from street2shop.data.pairs import product_classes

    train, val = load_training_records(config)
    data = TrainingData(train, val)
    if config.data.auxiliary_dir:
        labelled = read_class_folders(config.data.auxiliary_dir, max_per_class=config.data.get("auxiliary_max_per_class"), seed=config.fit.seed)
        data.auxiliary, data.auxiliary_labels, data.auxiliary_classes = labelled.records, labelled.labels(), len(labelled.classes)
    if config.loss.w_product > 0:
        data.product_labels = product_classes(train, first_class=data.auxiliary_classes)
    return data


def steps_per_epoch(config: TrainConfig, replicas: int) -> int:
    """Whole batches per epoch (a Keras epoch is exactly one pair plan; resuming relies on it)."""
    fc = config.fit
    if fc.batch_size % replicas:
        raise ConfigError(f"batch_size must be a multiple of the {replicas} replicas. Received: batch_size={fc.batch_size}")
    steps = config.data.pairs_per_epoch // fc.batch_size
    if steps < 1:
        raise ConfigError(f"pairs_per_epoch must be at least batch_size. Received: pairs_per_epoch={config.data.pairs_per_epoch}, batch_size={fc.batch_size}")
    if steps * fc.batch_size != config.data.pairs_per_epoch:
        logger.warning("pairs_per_epoch %d is not a multiple of batch_size %d: using %d pairs per epoch",
                       config.data.pairs_per_epoch, fc.batch_size, steps * fc.batch_size)
    return steps


def build_datasets(config: TrainConfig, data: TrainingData, steps: int, initial_epoch: int, strategy: Any = None) -> tuple[Any, Any, int | None]:
    """``(train_ds, val_ds, val_steps)``: the pair datasets of ``data`` (validation None when there is none).

    With a ``strategy`` of several replicas, each input pipeline (one per
    worker) builds only its share of every plan (``PairPlan.shard``), batched
    per replica: a step's batches over all replicas are the plan's next
    global batch, exactly what one process would train on, and no pair goes
    to two workers. Pipeline ``i`` augments with seed ``seed + i``, so the
    workers do not draw the same transformations.
    """
    from street2shop.data.pairs import PairPlanner
    from street2shop.data.pipeline import AugmentConfig, pair_dataset

    fc = config.fit
    planner_args = dict(auxiliary=data.auxiliary, auxiliary_labels=data.auxiliary_labels, product_labels=data.product_labels)
    weights = (config.loss.w_pair, config.loss.w_aux)
    class_weights = (config.loss.w_product, config.loss.w_cls)
    with_classes = bool(data.num_classes)
    planner = PairPlanner(data.train, config.data.pair_config(steps * fc.batch_size, fc.seed), **planner_args)
    distributed = strategy is not None and strategy.num_replicas_in_sync > 1

    def distribute(make):  # make(batch_size, index, count) -> the dataset of input pipeline index of count
        if not distributed:
            return make(fc.batch_size, 0, 1)
        return strategy.distribute_datasets_from_function(
            lambda context: make(context.get_per_replica_batch_size(fc.batch_size), context.input_pipeline_id, context.num_input_pipelines))

    def train_pipeline(batch_size, index, count):
        return pair_dataset(
            lambda epoch: planner.plan(epoch).shard(batch_size, index, count), image_size=config.data.image_size,
            batch_size=batch_size, start_epoch=initial_epoch,
            augment=AugmentConfig(street=config.data.street_augment, shop=config.data.shop_augment, seed=fc.seed + index),
            with_classes=with_classes, pair_weights=weights, class_weights=class_weights,
        )

    train_ds = distribute(train_pipeline)
    if data.val and 0 < config.data.val_pairs < fc.batch_size:
        logger.warning("val_pairs %d < batch_size %d: training without validation", config.data.val_pairs, fc.batch_size)
    if not data.val or config.data.val_pairs < fc.batch_size:
        return train_ds, None, None
    try:
        val_planner = PairPlanner(data.val, config.data.pair_config(config.data.val_pairs, fc.seed + 10_000), **planner_args)
    except DataError as e:
        logger.warning("no validation pairs: %s", e)
        return train_ds, None, None
    val_plan = val_planner.plan(0)

    def val_pipeline(batch_size, index, count):
        share = val_plan.shard(batch_size, index, count)
        return pair_dataset(lambda _epoch: share, image_size=config.data.image_size, batch_size=batch_size, epochs=1,
                            with_classes=with_classes, pair_weights=weights, class_weights=class_weights)

    return train_ds, distribute(val_pipeline), len(val_plan) // fc.batch_size


NOISE_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9)  # positive-distance quantiles logged on data with corruption flags


def build_losses_and_metrics(config: TrainConfig, num_classes: int | None, label_noise: bool = False):
    """The ``loss``, ``loss_weights`` and ``metrics`` dicts for ``model.compile``.

    With ``label_noise`` (the training records carry corruption flags: a
    label-noise benchmark), the pair metrics also measure what the robust
    loss drops: its precision and recall on the corrupted positives, the mean
    distances of clean and corrupted positives, their AUC and the positive
    distances' quantiles ``NOISE_QUANTILES``.
    """
    from street2shop import losses, metrics

    lc = config.loss
    if lc.loss == "robust":
        pair_loss = losses.RobustContrastiveLoss(**lc.robust_kwargs())
        if lc.drop_warmup_epochs:
            # Switched on by DropWarmup; created here, under the caller's strategy scope.
            pair_loss.active = losses.drop_switch()
    else:
        pair_loss = losses.ContrastiveLoss(margin=lc.margin)
    pair_metrics: list[Any] = [
        metrics.MeanPositiveDistance(),
        metrics.MeanNegativeDistance(),
        metrics.PairAccuracy(threshold=lc.margin / 2),
    ]
    if lc.loss == "robust":
        pair_metrics += [metrics.PositiveDropRate.from_loss(pair_loss), metrics.NegativeDropRate.from_loss(pair_loss)]
    if label_noise:
        if lc.loss == "robust":
            pair_metrics += [metrics.PositiveDropPrecision.from_loss(pair_loss), metrics.PositiveDropRecall.from_loss(pair_loss)]
        pair_metrics += [metrics.MeanCleanPositiveDistance(), metrics.MeanCorruptedPositiveDistance(), metrics.CorruptedPositiveAUC()]
        pair_metrics += [metrics.PositiveDistanceQuantile(q) for q in NOISE_QUANTILES]
    loss: dict[str, Any] = {"distance": pair_loss}
    loss_weights = {"distance": 1.0}
    metric_map: dict[str, Any] = {"distance": pair_metrics}
    if num_classes:
        for key in ("logits_a", "logits_b"):
            loss[key] = losses.MaskedSparseCategoricalCrossentropy()
            loss_weights[key] = 1.0  # w_cls and w_product are per-image sample weights (pair_dataset)
            metric_map[key] = [metrics.MaskedSparseCategoricalAccuracy(name="accuracy")]
    return loss, loss_weights, metric_map


def build_optimizer(config: TrainConfig):
    from street2shop.optimizers import BackboneAdamW, BackboneSGD

    fc = config.fit
    learning_rate = learning_rate_of(config)
    if fc.optimizer == "sgd":
        return BackboneSGD(learning_rate=learning_rate, momentum=fc.momentum, nesterov=True,
                           weight_decay=fc.weight_decay or None, backbone_lr_multiplier=fc.backbone_lr_multiplier)
    return BackboneAdamW(learning_rate=learning_rate, weight_decay=fc.weight_decay, backbone_lr_multiplier=fc.backbone_lr_multiplier)


def learning_rate_of(config: TrainConfig) -> Any:
    """``learning_rate`` as the optimizer takes it: a float, or a :class:`~street2shop.optimizers.WarmupCosine` over the run's steps."""
    from street2shop.optimizers import WarmupCosine

    fc = config.fit
    if fc.lr_schedule == "constant" and not fc.warmup_epochs:
        return fc.learning_rate
    steps = max(1, config.data.pairs_per_epoch // fc.batch_size)  # as steps_per_epoch: one step per global batch, whatever the replicas
    total = steps * fc.epochs
    return WarmupCosine(fc.learning_rate, total_steps=total, warmup_steps=min(round(steps * fc.warmup_epochs), total - 1), kind=fc.lr_schedule)


def build_model(config: TrainConfig, num_classes: int | None, label_noise: bool = False):
    """The compiled siamese model (call under the strategy's scope); ``label_noise``: see :func:`build_losses_and_metrics`."""
    from street2shop.model.siamese import build_siamese
    from street2shop.model.tower import build_tower

    tower = build_tower(image_size=(config.data.image_size, config.data.image_size), **config.model.tower_kwargs())
    model = build_siamese(tower, num_classes=num_classes, classifier_scale=config.model.get("classifier_scale"))
    loss, loss_weights, metric_map = build_losses_and_metrics(config, num_classes, label_noise)
    optimizer = build_optimizer(config)
    optimizer.set_backbone_variables(tower.get_layer("backbone").trainable_variables)
    model.compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights, metrics=metric_map)
    return model


def load_tower_weights(model: Any, checkpoint: str | os.PathLike[str]) -> None:
    """Copies the tower weights of a ``.keras`` checkpoint (a siamese model or a tower) into ``model``'s tower.

    Only the tower: a classifier head, its classes and the optimizer state
    are not taken. The two towers must have the same architecture (backbone,
    image size, embedding dimension).

    Raises:
        ConfigError: the file is missing, or its tower does not fit.
    """
    set_tower_weights(model, read_tower_weights(checkpoint), checkpoint)


def read_tower_weights(checkpoint: str | os.PathLike[str]) -> list[Any]:
    """The tower weights of a ``.keras`` checkpoint (a siamese model or a tower), as arrays.

    Raises:
        ConfigError: the file is missing.
    """
    import keras

    from street2shop.model.siamese import tower_of

    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"init_checkpoint not found. Received: init_checkpoint={str(checkpoint)!r}")
    return tower_of(keras.saving.load_model(path, compile=False)).get_weights()


def set_tower_weights(model: Any, weights: list[Any], source: str | os.PathLike[str]) -> None:
    """Sets ``model``'s tower to ``weights`` (read from ``source``, named in errors and the log).

    Raises:
        ConfigError: the weights do not fit the tower.
    """
    from street2shop.model.siamese import tower_of

    try:
        tower_of(model).set_weights(weights)
    except ValueError as e:
        raise ConfigError(f"the tower of {source} does not fit this model's tower (backbone, image_size, embedding_dim must match): {e}") from None
    logger.info("tower weights from %s", source)


def best_logged_epoch(log_csv: str | os.PathLike[str], monitor: str, from_epoch: int = 0) -> tuple[int, float] | None:
    """``(epoch, value)``: the epoch (0-based) of the lowest ``monitor`` value in a run's CSV log, from ``from_epoch`` on.

    None without such a value (no log, no such column). The first of equal values wins, as in ``ModelCheckpoint``.
    """
    try:
        with open(log_csv, newline="") as f:
            values = [(int(row.get("epoch") or 0), float(row[monitor])) for row in csv.DictReader(f) if row.get(monitor) not in (None, "")]
    except (OSError, ValueError):
        return None
    values = [(epoch, value) for epoch, value in values if epoch >= from_epoch]
    return min(values, key=lambda ev: ev[1]) if values else None


def best_checkpoint_from_epoch(config: TrainConfig) -> int:
    """The first epoch (0-based) ``best.keras`` may come from: the end of a robust-loss warm-up that ends within
    the run (:class:`~street2shop.callbacks.DropWarmup` restarts the best-value tracking there), else 0."""
    lc = config.loss
    return lc.drop_warmup_epochs if lc.loss == "robust" and 0 < lc.drop_warmup_epochs < config.fit.epochs else 0


def _best_logged(log_csv: Path, monitor: str, from_epoch: int = 0) -> float | None:
    """The lowest ``monitor`` value in a run's CSV log from epoch ``from_epoch`` (0-based) on (None if absent)."""
    best = best_logged_epoch(log_csv, monitor, from_epoch)
    return None if best is None else best[1]


def _resume_epoch(backup_dir: Path) -> int:
    """The epoch a ``BackupAndRestore`` backup will resume at (0 without one)."""
    for name in ("training_metadata.json", "training_metadata.json.bkp"):
        path = backup_dir / name
        if path.is_file():
            try:
                return int(json.loads(path.read_text())["epoch"])
            except (ValueError, KeyError, OSError):
                logger.warning("ignoring unreadable %s", path)
    return 0


def _log_lacks(log_csv: Path, column: str) -> bool:
    """Whether an existing ``log.csv`` has a header without ``column``."""
    try:
        with open(log_csv, newline="") as f:
            header = next(csv.reader(f), None)
    except OSError:
        return False
    return header is not None and column not in header


def build_callbacks(config: TrainConfig, model: Any, out: Path, initial_epoch: int, monitor: str, write_dir: Path | None = None) -> list[Any]:
    """Backup (resume), best and last checkpoints, CSV and TensorBoard logs, NaN stop, early stopping, the robust-loss warm-up.

    The run's state is read from ``out``; files are written to ``write_dir``
    (``out`` unless given: a multi-worker run's other workers write to a
    temporary folder, and resume from the chief's backup in ``out``).
    """
    import keras

    from street2shop.callbacks import DropWarmup, LearningRateLog, RestoreFromChief

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
    best_so_far = _best_logged(out / "log.csv", monitor, from_epoch=from_epoch) if initial_epoch else None
    best_checkpoint = keras.callbacks.ModelCheckpoint(str(best), monitor=monitor, save_best_only=True, initial_value_threshold=best_so_far)
    # At the end of an epoch, everything that records it (log row, checkpoints) runs before the backup,
    # which marks the epoch done: a Ctrl-C in between redoes the epoch, and the resumed run drops the
    # log rows of epochs it redoes (_trim_log), so log.csv holds every finished epoch exactly once.
    callbacks: list[Any] = [
        keras.callbacks.CSVLogger(str(write / "log.csv"), append=bool(initial_epoch)),
        keras.callbacks.TensorBoard(str(write / "tensorboard"), write_graph=False, profile_batch=0),
        keras.callbacks.TerminateOnNaN(),
        best_checkpoint,
        keras.callbacks.ModelCheckpoint(str(last)),
    ]
    if not (initial_epoch and _log_lacks(out / "log.csv", "learning_rate")):
        # Before the CSV logger, which writes the logs it is given; not into the log of a run resumed from
        # before this column existed (CSVLogger keeps the old header, and the row would shift under it).
        callbacks.insert(0, LearningRateLog())
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
    # Last: see above. Another worker than the chief resumes from the chief's backup (cluster.py).
    callbacks.append(keras.callbacks.BackupAndRestore(str(out / "backup")) if write == out
                     else RestoreFromChief(str(write / "backup"), str(out / "backup")))
    return callbacks


def _trim_log(log_csv: Path, initial_epoch: int) -> None:
    """Keeps the rows of epochs before ``initial_epoch`` (0-based): a resumed run writes the others again."""
    import io

    from street2shop.fileio import write_atomic

    try:
        text = log_csv.read_text()
    except FileNotFoundError:
        return
    lines = text.splitlines(keepends=True)
    if not lines:
        return
    kept = [lines[0]]
    for line in lines[1:]:
        row = next(csv.reader(io.StringIO(line)), [])
        if line.endswith("\n") and row and row[0].isdigit() and int(row[0]) < initial_epoch:
            kept.append(line)
    if len(kept) < len(lines):
        logger.info("%s: dropping %d row(s) of epochs the resumed run does again", log_csv, len(lines) - len(kept))
        write_atomic(log_csv, "".join(kept))


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
    from street2shop.cluster import check_workers_agree, worker_role, worker_write_dir
    from street2shop.console import progress_mode

    # A bad value fails here, before anything is written or built.
    progress = progress_mode({0: "none", 1: "bar", 2: "lines"}.get(verbose, verbose))  # type: ignore[call-overload]
    fc = config.fit
    # The strategy first: MultiWorkerMirroredStrategy must exist before any TF op runs.
    strategy = strategy or get_strategy(fc.distribution)
    replicas = strategy.num_replicas_in_sync
    role = worker_role(strategy)
    steps = steps_per_epoch(config, replicas)
    data = load_training_data(config)  # bad data fails before anything is written
    out = Path(fc.output_dir)
    initial_epoch = _resume_epoch(out / "backup")
    if initial_epoch and role.is_chief:
        _trim_log(out / "log.csv", initial_epoch)  # before the workers compare notes: they read it after
    if role.count > 1:
        # Every worker must draw the same plans and resume at the same epoch (from the chief's backup).
        auxiliary_labels = None if data.auxiliary_labels is None else data.auxiliary_labels.tolist()
        check_workers_agree(strategy, {"config": config.to_dict(), "records": (data.train, data.val, data.auxiliary, auxiliary_labels),
                                       "resume_epoch": initial_epoch})
    write = worker_write_dir(out, role)
    if not role.is_chief:
        logger.info("worker %d of %d: %s is the chief's; this worker writes to %s and removes it at the end", role.index, role.count, out, write)
    try:
        return _fit(config, strategy, data, steps, out, write, initial_epoch, role.count > 1, extra_callbacks, progress)
    finally:
        if write != out:
            shutil.rmtree(write, ignore_errors=True)


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


def _fit(config: TrainConfig, strategy: Any, data: TrainingData, steps: int, out: Path, write: Path, initial_epoch: int,
         multi_worker: bool, extra_callbacks: list[Any] | None, progress: str) -> TrainResult:
    """The rest of :func:`train`, once this worker knows where it reads the run's state (``out``) and writes (``write``)."""
    import keras

    from street2shop.callbacks import TrainingProgress
    from street2shop.cluster import multi_worker_fit

    fc = config.fit
    replicas = strategy.num_replicas_in_sync
    write.mkdir(parents=True, exist_ok=True)
    save_config(config, write / "config.toml")
    keras.utils.set_random_seed(fc.seed)
    if initial_epoch:
        logger.info("resuming %s at epoch %d", out, initial_epoch + 1)
    train_ds, val_ds, val_steps = build_datasets(config, data, steps, initial_epoch, strategy)
    # The starting weights of a new run only: a resumed one restores its backup. Read outside the
    # strategy's scope, so the checkpoint's model is not a distributed one.
    init = config.model.init_checkpoint
    init_weights = read_tower_weights(init) if init and not initial_epoch else None
    with strategy.scope():
        model = build_model(config, data.num_classes, label_noise=data.label_noise)
        if init_weights is not None:
            set_tower_weights(model, init_weights, init)
    if data.label_noise:
        logger.info("training records carry corruption flags (true_product_id): logging the drop's precision and recall")
    monitor = "val_loss" if val_ds is not None else "loss"
    callbacks = ([TrainingProgress(fc.epochs, steps, progress)] + build_callbacks(config, model, out, initial_epoch, monitor, write)
                 + list(extra_callbacks or []))
    _warn_if_the_quantile_cannot_drop(config, data, replicas)

    tasks = " and ".join(f"{n} {kind} classes" for n, kind in ((data.auxiliary_classes, "auxiliary"), (len(data.product_labels or ()), "product")) if n)
    logger.info(
        "training %s: %d pairs/epoch, %d epochs, batch %d over %d replica(s), %s loss%s%s",
        config.model.backbone, config.data.pairs_per_epoch, fc.epochs, fc.batch_size, replicas, config.loss.loss,
        ", multi-task with " if tasks else "", tasks,
    )
    start = time.perf_counter()
    with multi_worker_fit(model) if multi_worker else contextlib.nullcontext():
        history = model.fit(
            train_ds, epochs=fc.epochs, steps_per_epoch=steps, validation_data=val_ds, validation_steps=val_steps,
            shuffle=False,  # the pair plans are shuffled; tf.data input is not reshuffled by Keras anyway
            callbacks=callbacks, verbose=0,  # TrainingProgress shows it
        )
    seconds = time.perf_counter() - start
    epochs_run = max(0, len(history.epoch))
    pairs_per_second = epochs_run * steps * fc.batch_size / seconds if seconds > 0 else 0.0
    best = out / "best.keras"
    logger.info("trained %d epoch(s) in %.0f s (%.1f pairs/s); best checkpoint %s", epochs_run, seconds, pairs_per_second, best)
    return TrainResult(model, dict(history.history), out, best, out / "last.keras", initial_epoch, data.num_classes, seconds, pairs_per_second)
