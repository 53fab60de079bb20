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
``batch_size`` is the global batch, split across replicas.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
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


def _split_names(text: str) -> set[str]:
    return {s.strip() for s in text.split(",") if s.strip()}


def load_training_records(config: TrainConfig):
    """Reads the manifest and returns ``(train_records, val_records)``.

    Train: records of the training split(s) plus every shop photo of split
    ``catalog`` (the catalogue is shared by all splits). Validation likewise
    with the validation split. Unreadable images and empty boxes are dropped
    (``check_images``).
    """
    from street2shop.data.pipeline import check_images
    from street2shop.data.records import read_manifest

    if not config.data.manifest:
        raise ConfigError("manifest is required: the manifest CSV of your street and shop photos. Received: manifest=''")
    records = read_manifest(config.data.manifest)
    train_splits = _split_names(config.data.train_split)
    val_splits = _split_names(config.data.val_split)
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


def _pair_config(config: TrainConfig, pairs: int, seed: int):
    from street2shop.data.pairs import PairConfig

    d = config.data

    def opt(v: float) -> float | None:
        return None if v < 0 else v

    return PairConfig(
        pairs_per_epoch=pairs,
        positive_fraction=opt(d.positive_fraction),
        negative_fraction=opt(d.negative_fraction),
        auxiliary_fraction=opt(d.auxiliary_fraction),
        street_street_fraction=d.street_street_fraction,
        hard_negative_fraction=d.hard_negative_fraction,
        seed=seed,
    )


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
        pair_loss = losses.RobustContrastiveLoss(
            margin=lc.margin,
            positive_threshold=lc.positive_threshold or None,
            positive_quantile=lc.positive_quantile or None,
            negative_floor=lc.negative_floor or None,
        )
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
    if fc.optimizer == "sgd":
        return BackboneSGD(learning_rate=fc.learning_rate, momentum=fc.momentum, nesterov=True,
                           weight_decay=fc.weight_decay or None, backbone_lr_multiplier=fc.backbone_lr_multiplier)
    return BackboneAdamW(learning_rate=fc.learning_rate, weight_decay=fc.weight_decay, backbone_lr_multiplier=fc.backbone_lr_multiplier)


def build_model(config: TrainConfig, num_classes: int | None, label_noise: bool = False):
    """The compiled siamese model (call under the strategy's scope); ``label_noise``: see :func:`build_losses_and_metrics`."""
    from street2shop.model.siamese import build_siamese
    from street2shop.model.tower import build_tower

    mc = config.model
    tower = build_tower(
        mc.backbone,
        image_size=(config.data.image_size, config.data.image_size),
        embedding_dim=mc.embedding_dim,
        weights=mc.weights_arg,
        trainable_layers=None if mc.trainable_layers < 0 else mc.trainable_layers,
        trainable_from=mc.trainable_from or None,
        bn_momentum=mc.bn_momentum or None,
        dropout=mc.dropout,
        pooling=mc.pooling,
    )
    model = build_siamese(tower, num_classes=num_classes, classifier_scale=mc.classifier_scale or None)
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
    import keras

    from street2shop.model.siamese import tower_of

    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"init_checkpoint not found. Received: init_checkpoint={str(checkpoint)!r}")
    source = tower_of(keras.saving.load_model(path, compile=False))
    target = tower_of(model)
    try:
        target.set_weights(source.get_weights())
    except ValueError as e:
        raise ConfigError(f"the tower of {path} does not fit this model's tower (backbone, image_size, embedding_dim must match): {e}") from None
    logger.info("tower weights from %s", path)


def _best_logged(log_csv: Path, monitor: str, from_epoch: int = 0) -> float | None:
    """The lowest ``monitor`` value in a run's CSV log from epoch ``from_epoch`` (0-based) on (None if absent)."""
    import csv

    try:
        with open(log_csv, newline="") as f:
            values = [float(row[monitor]) for row in csv.DictReader(f)
                      if row.get(monitor) not in (None, "") and int(row.get("epoch") or 0) >= from_epoch]
    except (OSError, ValueError):
        return None
    return min(values) if values else None


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
        extra_callbacks: more Keras callbacks to pass to fit.
        verbose: Keras' fit verbosity (progress bar by default).

    Returns:
        TrainResult.
    """
    import keras

    from street2shop.data.folders import read_class_folders
    from street2shop.data.pairs import PairPlanner
    from street2shop.data.pipeline import AugmentConfig, pair_dataset

    fc = config.fit
    # The strategy first: MultiWorkerMirroredStrategy must exist before any TF op runs.
    strategy = strategy or get_strategy(fc.distribution)
    replicas = strategy.num_replicas_in_sync
    if fc.batch_size % replicas:
        raise ConfigError(f"batch_size must be a multiple of the {replicas} replicas. Received: batch_size={fc.batch_size}")
    steps = config.data.pairs_per_epoch // fc.batch_size
    if steps < 1:
        raise ConfigError(f"pairs_per_epoch must be at least batch_size. Received: pairs_per_epoch={config.data.pairs_per_epoch}, batch_size={fc.batch_size}")
    if steps * fc.batch_size != config.data.pairs_per_epoch:
        logger.warning("pairs_per_epoch %d is not a multiple of batch_size %d: using %d pairs per epoch",
                       config.data.pairs_per_epoch, fc.batch_size, steps * fc.batch_size)
    train_records, val_records = load_training_records(config)  # bad data fails before anything is written
    out = Path(fc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.toml")
    keras.utils.set_random_seed(fc.seed)

    auxiliary = labels = None
    num_classes = None
    if config.data.auxiliary_dir:
        labelled = read_class_folders(config.data.auxiliary_dir, max_per_class=config.data.auxiliary_max_per_class or None, seed=fc.seed)
        auxiliary, labels = labelled.records, labelled.labels()
        num_classes = len(labelled.classes)
    auxiliary_classes = num_classes or 0
    product_labels = None
    if config.loss.w_product > 0:
        # The products of the training split's street photos that have a shop photo (those positive
        # pairs are drawn for) get the classes after the auxiliary ones, in one shared head.
        # Catalogue-only products (the gallery of val/test products) stay -1.
        shop_products = {r.product_id for r in train_records if r.domain == "shop"}
        products = sorted({r.product_id for r in train_records if r.domain == "street"} & shop_products)
        product_labels = {p: auxiliary_classes + i for i, p in enumerate(products)}
        num_classes = auxiliary_classes + len(products)
    # Whole batches per epoch, so a Keras epoch is exactly one plan (resuming relies on it).
    planner = PairPlanner(train_records, _pair_config(config, steps * fc.batch_size, fc.seed), auxiliary=auxiliary,
                          auxiliary_labels=labels, product_labels=product_labels)

    backup_dir = out / "backup"
    initial_epoch = _resume_epoch(backup_dir)
    if initial_epoch:
        logger.info("resuming %s at epoch %d", out, initial_epoch + 1)
    weights = (config.loss.w_pair, config.loss.w_aux)
    class_weights = (config.loss.w_product, config.loss.w_cls)
    train_ds = pair_dataset(
        planner.plan,
        image_size=config.data.image_size,
        batch_size=fc.batch_size,
        start_epoch=initial_epoch,
        augment=AugmentConfig(street=config.data.street_augment, shop=config.data.shop_augment, seed=fc.seed),
        with_classes=bool(num_classes),
        pair_weights=weights,
        class_weights=class_weights,
    )
    val_ds = val_steps = None
    if val_records and 0 < config.data.val_pairs < fc.batch_size:
        logger.warning("val_pairs %d < batch_size %d: training without validation", config.data.val_pairs, fc.batch_size)
    if val_records and config.data.val_pairs >= fc.batch_size:
        try:
            val_planner = PairPlanner(val_records, _pair_config(config, config.data.val_pairs, fc.seed + 10_000), auxiliary=auxiliary,
                                      auxiliary_labels=labels, product_labels=product_labels)
        except DataError as e:
            logger.warning("no validation pairs: %s", e)
        else:
            val_plan = val_planner.plan(0)
            val_steps = len(val_plan) // fc.batch_size
            val_ds = pair_dataset(lambda _epoch: val_plan, image_size=config.data.image_size, batch_size=fc.batch_size,
                                  epochs=1, with_classes=bool(num_classes), pair_weights=weights,
                                  class_weights=class_weights)

    with strategy.scope():
        model = build_model(config, num_classes, label_noise=planner.has_label_noise)
        if config.model.init_checkpoint:
            load_tower_weights(model, config.model.init_checkpoint)  # a resumed run then restores its own backup
    if planner.has_label_noise:
        logger.info("training records carry corruption flags (true_product_id): logging the drop's precision and recall")

    monitor = "val_loss" if val_ds is not None else "loss"
    best, last = out / "best.keras", out / "last.keras"
    # A resumed run appends to its log and only replaces best.keras with a better epoch;
    # a fresh run in an old folder starts both anew.
    # The robust loss's warm-up switch (None without a warm-up). Warm-up epochs compare only
    # with each other, and the epochs after it only with each other (see losses.DropWarmup).
    drop_switch = getattr(model.loss.get("distance") if isinstance(model.loss, dict) else None, "active", None)
    warmup = config.loss.drop_warmup_epochs if drop_switch is not None else 0
    from_epoch = warmup if initial_epoch > warmup else 0
    best_so_far = _best_logged(out / "log.csv", monitor, from_epoch=from_epoch) if initial_epoch else None
    best_checkpoint = keras.callbacks.ModelCheckpoint(str(best), monitor=monitor, save_best_only=True, initial_value_threshold=best_so_far)
    callbacks: list[Any] = [
        keras.callbacks.BackupAndRestore(str(backup_dir)),
        best_checkpoint,
        keras.callbacks.ModelCheckpoint(str(last)),
        keras.callbacks.CSVLogger(str(out / "log.csv"), append=bool(initial_epoch)),
        keras.callbacks.TensorBoard(str(out / "tensorboard"), write_graph=False, profile_batch=0),
        keras.callbacks.TerminateOnNaN(),
    ]
    if fc.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, patience=fc.early_stopping_patience, restore_best_weights=False))
    if drop_switch is not None:
        from street2shop.losses import DropWarmup

        restart = [best_checkpoint] + [c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)]
        callbacks.append(DropWarmup(drop_switch, config.loss.drop_warmup_epochs, restart=restart))
        if config.loss.drop_warmup_epochs >= fc.epochs:
            logger.warning("drop_warmup_epochs %d >= epochs %d: the robust loss never drops a pair (it is the plain one)",
                           config.loss.drop_warmup_epochs, fc.epochs)
    elif config.loss.drop_warmup_epochs:
        logger.warning("drop_warmup_epochs %d ignored: it applies to the robust loss, and this run uses the %s loss",
                       config.loss.drop_warmup_epochs, config.loss.loss)
    callbacks += list(extra_callbacks or [])

    tasks = " and ".join(f"{n} {kind} classes" for n, kind in ((auxiliary_classes, "auxiliary"), (len(product_labels or ()), "product")) if n)
    logger.info(
        "training %s: %d pairs/epoch, %d epochs, batch %d over %d replica(s), %s loss%s%s",
        config.model.backbone, config.data.pairs_per_epoch, fc.epochs, fc.batch_size, replicas, config.loss.loss,
        ", multi-task with " if tasks else "", tasks,
    )
    start = time.perf_counter()
    history = model.fit(
        train_ds, epochs=fc.epochs, steps_per_epoch=steps, validation_data=val_ds, validation_steps=val_steps,
        shuffle=False,  # the pair plans are shuffled; tf.data input is not reshuffled by Keras anyway
        callbacks=callbacks, verbose=verbose,
    )
    seconds = time.perf_counter() - start
    epochs_run = max(0, len(history.epoch))
    pairs_per_second = epochs_run * steps * fc.batch_size / seconds if seconds > 0 else 0.0
    logger.info("trained %d epoch(s) in %.0f s (%.1f pairs/s); best checkpoint %s", epochs_run, seconds, pairs_per_second, best)
    return TrainResult(model, dict(history.history), out, best, last, initial_epoch, num_classes, seconds, pairs_per_second)
