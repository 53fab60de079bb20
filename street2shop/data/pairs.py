"""Pair plans: which two images the siamese model sees, and whether they match.

Three kinds of pairs, in configurable proportions:

- **positive**: a street photo and a shop photo of the same product
  (optionally, a fraction of them street↔street of the same product);
- **negative**: a street photo and a shop photo of another product, either
  random or *hard* (another product of the same category);
- **auxiliary**: two images of a generic labelled set (same class or not),
  each carrying its class label for the softmax task of multi-task
  fine-tuning.

Product images can carry class labels too (their product's index), for a
softmax over the training products alongside the contrastive loss.

Label-noise benchmarks: a record whose metadata names a ``true_product_id``
other than its ``product_id`` carries a label known to be wrong. A positive
pair whose two images' true products differ gets the label
:data:`CORRUPTED_POSITIVE` (2.0) instead of 1: still a positive for every
loss and metric (they read a match as ``y > 0.5``), and the flag the
drop-precision metrics of :mod:`street2shop.metrics` count. It travels in the
targets, never in the model's inputs. Without that column nothing changes.

A plan is a few NumPy arrays; :class:`PairPlanner` draws a fresh one for every
epoch from ``(seed, epoch)``, so plans are reshuffled each epoch and a
resumed run sees exactly the plans the interrupted one would have.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from street2shop.data.image import NO_BOX
from street2shop.data.records import Record
from street2shop.errors import ConfigError, DataError, check_positive_int

logger = logging.getLogger(__name__)

PRODUCT, AUXILIARY = 0, 1

# Label-noise benchmarks: the metadata column naming the product a photo really shows, and
# the pair label of a positive whose two images really show different products.
TRUE_PRODUCT_COLUMN = "true_product_id"
CORRUPTED_POSITIVE = 2.0


def true_product(record: Record) -> str:
    """The product ``record`` really shows: its ``true_product_id`` metadata if set, else its ``product_id``."""
    return record.metadata.get(TRUE_PRODUCT_COLUMN) or record.product_id


def has_label_noise(records: Sequence[Record]) -> bool:
    """Some record names a ``true_product_id`` other than its ``product_id`` (a label-noise benchmark)."""
    return any(true_product(r) != r.product_id for r in records)


@dataclasses.dataclass
class PairPlan:
    """One epoch's pairs as parallel arrays (length P).

    Attributes:
        path_a, path_b: str arrays. Image paths.
        box_a, box_b: float32 [P, 4]. Pixel boxes ``left, top, width, height``;
            all -1 for no box.
        label: float32. 1 for a matching pair, 0 otherwise; 2
            (:data:`CORRUPTED_POSITIVE`) for a pair labelled matching whose
            images' true products differ (label-noise benchmarks only).
        class_a, class_b: int32. Class index of each image: its auxiliary
            class, or its product's class when the planner has
            ``product_labels``; -1 for no class (ignored by the softmax loss).
        kind: int32. 0 for a product pair, 1 for an auxiliary pair.
        street_a, street_b: bool. Whether each image is a street photo (it
            gets the street augmentation strength).
    """

    path_a: np.ndarray
    box_a: np.ndarray
    path_b: np.ndarray
    box_b: np.ndarray
    label: np.ndarray
    class_a: np.ndarray
    class_b: np.ndarray
    kind: np.ndarray
    street_a: np.ndarray
    street_b: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def as_arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def shard(self, batch_size: int, index: int, count: int) -> PairPlan:
        """Input pipeline ``index`` of ``count``'s share of this plan.

        The plan's consecutive runs of ``batch_size`` rows are dealt to the
        pipelines in turn: run ``r`` goes to pipeline ``r % count``. With
        ``batch_size`` the per-replica batch, a training step (one run per
        replica) takes exactly the plan's next global batch, whatever the
        number of replicas per pipeline, and no row goes to two pipelines.
        ``count == 1`` returns the plan itself.
        """
        if batch_size < 1 or count < 1 or not 0 <= index < count:
            raise ConfigError(f"shard needs batch_size >= 1 and 0 <= index < count. Received: batch_size={batch_size}, index={index}, count={count}")
        if count == 1:
            return self
        keep = (np.arange(len(self)) // batch_size) % count == index
        return PairPlan(*(array[keep] for array in self.as_arrays()))

    @staticmethod
    def array_dtypes():
        import tensorflow as tf

        return (tf.string, tf.float32, tf.string, tf.float32, tf.float32, tf.int32, tf.int32, tf.int32, tf.bool, tf.bool)

    @staticmethod
    def array_ranks() -> tuple[int, ...]:
        return (1, 2, 1, 2, 1, 1, 1, 1, 1, 1)

    def counts(self) -> dict[str, int]:
        product = self.kind == PRODUCT
        positive = self.label > 0.5
        counts = {
            "positive": int(np.sum(product & positive)),
            "negative": int(np.sum(product & ~positive)),
            "auxiliary_positive": int(np.sum(~product & positive)),
            "auxiliary_negative": int(np.sum(~product & ~positive)),
        }
        corrupted = int(np.sum(self.label == CORRUPTED_POSITIVE))
        if corrupted:
            counts["corrupted_positive"] = corrupted
        return counts


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """How to draw pairs.

    Args:
        pairs_per_epoch: int. Pairs in one epoch's plan.
        positive_fraction, negative_fraction, auxiliary_fraction: float or
            None. Proportions of the three kinds; None means one third each
            when an auxiliary set is given, half positive and half negative
            otherwise. Given ones are normalised to sum to 1.
        street_street_fraction: float. Share of positives that pair two
            street photos of the same product instead of street↔shop.
        hard_negative_fraction: float. Share of negatives drawn from the same
            category as the street photo (when it has other products).
        seed: int. Plans are a function of (seed, epoch).
    """

    pairs_per_epoch: int = 2048
    positive_fraction: float | None = None
    negative_fraction: float | None = None
    auxiliary_fraction: float | None = None
    street_street_fraction: float = 0.0
    hard_negative_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("pairs_per_epoch", self.pairs_per_epoch)
        for name in ("positive_fraction", "negative_fraction", "auxiliary_fraction", "street_street_fraction", "hard_negative_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1]. Received: {name}={value}")

    def fractions(self, has_auxiliary: bool) -> tuple[float, float, float]:
        """(positive, negative, auxiliary) shares summing to 1.

        Unset fractions share what the set ones leave; when all are set they
        are normalised to sum to 1. Without an auxiliary set its share is 0.
        """
        given = [self.positive_fraction, self.negative_fraction, self.auxiliary_fraction if has_auxiliary else 0.0]
        if all(v is None for v in given):
            return (1 / 3, 1 / 3, 1 / 3) if has_auxiliary else (0.5, 0.5, 0.0)
        free = [i for i, v in enumerate(given) if v is None]
        rest = 1.0 - sum(float(v) for v in given if v is not None)
        if free:
            if rest < 0:
                raise ConfigError(
                    f"pair fractions given sum to more than 1 while others are left to fill the rest. "
                    f"Received: positive={self.positive_fraction}, negative={self.negative_fraction}, auxiliary={self.auxiliary_fraction}"
                )
            for i in free:
                given[i] = rest / len(free)
        total = sum(float(v) for v in given)
        if total <= 0:
            raise ConfigError(
                f"pair fractions must not all be 0. Received: positive={self.positive_fraction}, "
                f"negative={self.negative_fraction}, auxiliary={self.auxiliary_fraction}"
            )
        pos, neg, aux = (float(v) / total for v in given)
        return pos, neg, aux


def product_classes(records: Sequence[Record], first_class: int = 0) -> dict[str, int]:
    """Class indices for a softmax over the products that positive pairs are drawn for.

    Those are the products with a street photo and a shop photo among
    ``records`` (the training split plus the catalogue); they get the classes
    ``first_class, first_class + 1, ...`` in sorted order (after the auxiliary
    set's classes in a shared head). Catalogue-only products (the gallery of
    validation and test products) and street-only ones get none.
    """
    shop = {r.product_id for r in records if r.domain == "shop"}
    products = sorted({r.product_id for r in records if r.domain == "street"} & shop)
    return {p: first_class + i for i, p in enumerate(products)}


def _box(record: Record) -> tuple[float, float, float, float]:
    return record.box.as_ltwh() if record.box is not None else NO_BOX


class PairPlanner:
    """Draws an epoch's pair plan from product records and an optional labelled set.

    Args:
        records: sequence of Record. Product images (street and shop) of the
            training split.
        config: PairConfig.
        auxiliary: sequence of Record or None. Images of a labelled set.
        auxiliary_labels: int array aligned with ``auxiliary``: class indices.
        product_labels: mapping product id → class index, or None. With it,
            each image of a product pair carries its product's class (-1 for
            a product not in the mapping), for a softmax over the products;
            without it, product images carry -1 (no class).

    Attributes:
        has_label_noise: bool. Some record names a ``true_product_id`` other
            than its ``product_id`` (a label-noise benchmark); then positive
            pairs of differing true products are labelled
            :data:`CORRUPTED_POSITIVE`.

    Example:

    >>> planner = PairPlanner(records, PairConfig(pairs_per_epoch=512, seed=1))
    >>> plan = planner.plan(epoch=0)
    >>> plan.counts()["positive"]
    256
    """

    def __init__(
        self,
        records: Sequence[Record],
        config: PairConfig = PairConfig(),
        *,
        auxiliary: Sequence[Record] | None = None,
        auxiliary_labels: Sequence[int] | np.ndarray | None = None,
        product_labels: Mapping[str, int] | None = None,
    ) -> None:
        self.config = config
        self.product_labels = dict(product_labels or {})
        self.records = list(records)
        street = [i for i, r in enumerate(self.records) if r.domain == "street"]
        shop = [i for i, r in enumerate(self.records) if r.domain == "shop"]
        self._shop_by_product: dict[str, list[int]] = defaultdict(list)
        self._street_by_product: dict[str, list[int]] = defaultdict(list)
        for i in shop:
            self._shop_by_product[self.records[i].product_id].append(i)
        for i in street:
            self._street_by_product[self.records[i].product_id].append(i)
        self._shop_products = sorted(self._shop_by_product)
        self._products_by_category: dict[str | None, list[str]] = defaultdict(list)
        for product in self._shop_products:
            self._products_by_category[self.records[self._shop_by_product[product][0]].category].append(product)
        self._category_members = {c: set(ps) for c, ps in self._products_by_category.items()}
        self.has_label_noise = has_label_noise(self.records)
        # Anchors: street photos whose product has a shop photo.
        self._anchors = np.array([i for i in street if self.records[i].product_id in self._shop_by_product], dtype=np.int64)
        orphans = len(street) - len(self._anchors)
        if orphans:
            logger.info("%d street photos have no shop photo of their product; used only for street-street pairs", orphans)
        if len(self._anchors) == 0:
            raise DataError(
                "no street photo has a shop photo of the same product: cannot draw positive pairs. "
                f"Received: {len(street)} street and {len(shop)} shop images of {len(self._shop_by_product)} products with shop photos"
            )
        if len(self._shop_products) < 2:
            raise DataError(f"negative pairs need shop photos of at least 2 products. Received: {len(self._shop_products)}")

        self.auxiliary = list(auxiliary or [])
        if self.auxiliary:
            if auxiliary_labels is None or len(auxiliary_labels) != len(self.auxiliary):
                raise DataError("auxiliary_labels must give one class index per auxiliary record.")
            self.auxiliary_labels = np.asarray(auxiliary_labels, dtype=np.int32)
            self._aux_by_class: dict[int, np.ndarray] = {
                int(c): np.flatnonzero(self.auxiliary_labels == c) for c in np.unique(self.auxiliary_labels)
            }
            if len(self._aux_by_class) < 2:
                raise DataError(f"the auxiliary set needs at least 2 classes. Received: {len(self._aux_by_class)}")
        else:
            self.auxiliary_labels = np.zeros(0, dtype=np.int32)
            self._aux_by_class = {}

    @property
    def num_classes(self) -> int | None:
        """Number of auxiliary classes, or None without an auxiliary set (product classes, if any, are not counted)."""
        return int(self.auxiliary_labels.max()) + 1 if self.auxiliary else None

    def plan(self, epoch: int) -> PairPlan:
        """The plan of ``epoch``: a pure function of (config.seed, epoch)."""
        rng = np.random.default_rng([self.config.seed, epoch])
        n = self.config.pairs_per_epoch
        f_pos, _, f_aux = self.config.fractions(bool(self.auxiliary))
        n_pos = int(round(n * f_pos))
        n_aux = min(n - n_pos, int(round(n * f_aux)))
        n_neg = n - n_pos - n_aux  # last, so the three always add up to n
        rows: list[tuple] = []
        rows += self._positives(rng, n_pos)
        rows += self._negatives(rng, n_neg)
        rows += self._auxiliary(rng, n_aux)
        order = rng.permutation(len(rows))
        rows = [rows[i] for i in order]
        columns = list(zip(*rows)) if rows else [[]] * 10
        return PairPlan(
            path_a=np.array(columns[0], dtype=object),
            box_a=np.array(columns[1], dtype=np.float32).reshape(-1, 4),
            path_b=np.array(columns[2], dtype=object),
            box_b=np.array(columns[3], dtype=np.float32).reshape(-1, 4),
            label=np.array(columns[4], dtype=np.float32),
            class_a=np.array(columns[5], dtype=np.int32),
            class_b=np.array(columns[6], dtype=np.int32),
            kind=np.array(columns[7], dtype=np.int32),
            street_a=np.array(columns[8], dtype=bool),
            street_b=np.array(columns[9], dtype=bool),
        )

    def _anchor_stream(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` street anchors covering every anchor about equally often."""
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        reps = -(-n // len(self._anchors))
        return np.concatenate([rng.permutation(self._anchors) for _ in range(reps)])[:n]

    def _row(self, a: Record, b: Record, label: float, kind: int = PRODUCT, class_a: int = -1, class_b: int = -1) -> tuple:
        if kind == PRODUCT:
            class_a, class_b = self.product_labels.get(a.product_id, -1), self.product_labels.get(b.product_id, -1)
            if label == 1 and self.has_label_noise and true_product(a) != true_product(b):
                label = CORRUPTED_POSITIVE
        return (a.image_path, _box(a), b.image_path, _box(b), label, class_a, class_b, kind, a.domain == "street", b.domain == "street")

    def _positives(self, rng: np.random.Generator, n: int) -> list[tuple]:
        rows = []
        for i in self._anchor_stream(rng, n):
            anchor = self.records[i]
            product = anchor.product_id
            others = [j for j in self._street_by_product[product] if j != i]
            if others and rng.random() < self.config.street_street_fraction:
                j = others[rng.integers(len(others))]
            else:
                shops = self._shop_by_product[product]
                j = shops[rng.integers(len(shops))]
            rows.append(self._row(anchor, self.records[j], 1))
        return rows

    def _negatives(self, rng: np.random.Generator, n: int) -> list[tuple]:
        rows = []
        products = self._shop_products
        for i in self._anchor_stream(rng, n):
            anchor = self.records[i]
            same_category = self._products_by_category.get(anchor.category, [])
            own = anchor.product_id in self._category_members.get(anchor.category, ())
            if len(same_category) > own and rng.random() < self.config.hard_negative_fraction:
                other = anchor.product_id
                while other == anchor.product_id:
                    other = same_category[rng.integers(len(same_category))]
            else:
                other = anchor.product_id
                while other == anchor.product_id:
                    other = products[rng.integers(len(products))]
            shops = self._shop_by_product[other]
            rows.append(self._row(anchor, self.records[shops[rng.integers(len(shops))]], 0))
        return rows

    def _auxiliary(self, rng: np.random.Generator, n: int) -> list[tuple]:
        if n == 0:
            return []
        rows = []
        classes = np.array(sorted(self._aux_by_class))
        multi = [c for c in classes if len(self._aux_by_class[int(c)]) >= 2]
        labels = self.auxiliary_labels
        for k in range(n):
            if k % 2 == 0 and multi:  # same class
                c = multi[rng.integers(len(multi))]
                i, j = rng.choice(self._aux_by_class[int(c)], size=2, replace=False)
                label = 1
            else:
                c1, c2 = rng.choice(classes, size=2, replace=False)
                members1, members2 = self._aux_by_class[int(c1)], self._aux_by_class[int(c2)]
                i, j = members1[rng.integers(len(members1))], members2[rng.integers(len(members2))]
                label = 0
            a, b = self.auxiliary[i], self.auxiliary[j]
            rows.append(self._row(a, b, label, AUXILIARY, int(labels[i]), int(labels[j])))
        return rows
