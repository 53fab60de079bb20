"""The records a training run learns from, and its pair datasets.

:func:`load_training_data` reads the manifest's training and validation
splits (every shop photo of split ``catalog`` joins both: the catalogue is
shared), checks their images, reads the auxiliary labelled set and numbers
the product classes; :func:`build_datasets` turns them into ``model.fit``'s
pair datasets, each worker's input pipeline building only its share of every
global batch.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from street2shop.config import TrainConfig
from street2shop.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CATALOG_SPLIT = "catalog"


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
