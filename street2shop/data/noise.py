"""Label noise on purpose: a share of the training street photos given another product's label.

What the label-noise benchmarks train on (``tools/bench_retrieval.py
--noise-rate``): every record keeps its truth in the ``true_product_id``
metadata column (:data:`street2shop.data.pairs.TRUE_PRODUCT_COLUMN`), so
training can count how many of the positives its robust loss drops were
really wrong. Queries and the catalogue are never touched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable
from typing import Any

import numpy as np

from street2shop.data.pairs import TRUE_PRODUCT_COLUMN
from street2shop.data.records import Record
from street2shop.errors import ConfigError

NOISE_KINDS = ("same-category", "uniform")
# Product groups for same-category noise, most specific first ("category" is the manifest's own column);
# a photo whose product is alone in its group falls back to the next, then to any other product.
NOISE_GROUPS = ("category", "coarse_class", "supercategory")


def _group_of(record: Record, column: str) -> str | None:
    value = record.category if column == "category" else record.metadata.get(column)
    return (value or "").strip() or None


def corrupt_labels(records: Iterable[Record], rate: float, kind: str, seed: int,
                   train_splits: Collection[str] = ("train",)) -> tuple[list[Record], dict[str, Any]]:
    """A share ``rate`` of the training street photos relabelled with another product: ``(records, info)``.

    Every record comes back (in order) with a ``true_product_id`` metadata
    field: its own product, or for a corrupted photo the product it really
    shows while ``product_id`` names the wrong one. Only street photos of
    ``train_splits`` are touched; the new product is one with a shop photo (so
    the wrong pair is drawn). ``kind`` "uniform": any other such product;
    "same-category": another product of the same group (:data:`NOISE_GROUPS`,
    most specific first), else any other one.

    The draw depends on (seed, kind) only: a random order of the photos and a
    wrong product for each, the first ``round(rate·N)`` of that order
    corrupted. So a higher rate corrupts a superset, with the same wrong
    labels. ``info`` has the rate, kind, seed, counts (``by_group``: how many
    wrong labels came from which group) and a digest of the training labels.
    """
    if kind not in NOISE_KINDS:
        raise ConfigError(f"noise kind must be one of {', '.join(NOISE_KINDS)}. Received: {kind!r}")
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"noise rate must be in [0, 1]. Received: {rate!r}")
    records = list(records)
    street = [i for i, r in enumerate(records) if r.domain == "street" and r.split in train_splits]
    targets = sorted({r.product_id for r in records if r.domain == "shop"})
    groups = {}  # column -> product -> group
    for column in NOISE_GROUPS:
        for r in records:
            g = _group_of(r, column)
            if g is not None:
                groups.setdefault(column, {}).setdefault(r.product_id, g)
    rng = np.random.default_rng([int(seed), NOISE_KINDS.index(kind), 16])
    order = rng.permutation(len(street))
    wrong, level = {}, {}
    for i in order:  # a wrong product for every photo, whatever the rate: the draw does not depend on it
        product = records[street[i]].product_id
        candidates, source = [t for t in targets if t != product], "any"
        if kind == "same-category":
            for column, of in groups.items():
                if product not in of:
                    continue
                same = [t for t in candidates if of.get(t) == of[product]]
                if same:
                    candidates, source = same, column
                    break
        wrong[i], level[i] = candidates[rng.integers(len(candidates))], source
    n = int(round(rate * len(street)))
    corrupted = {street[i]: i for i in order[:n]}
    out = []
    for j, r in enumerate(records):
        product = wrong[corrupted[j]] if j in corrupted else r.product_id
        out.append(Record(r.image_path, product, r.domain, r.split, r.category, r.box,
                          {**r.metadata, TRUE_PRODUCT_COLUMN: r.product_id}))
    by_group = {}
    for i in order[:n]:
        by_group[level[i]] = by_group.get(level[i], 0) + 1
    labels = "\n".join(f"{r.image_path}\t{r.product_id}\t{r.metadata[TRUE_PRODUCT_COLUMN]}"
                        for r in sorted((out[j] for j in street), key=lambda r: r.image_path))
    info = {"rate": rate, "kind": kind, "seed": int(seed), "corrupted": n, "street_photos": len(street),
            "by_group": by_group, "digest": hashlib.sha256(labels.encode()).hexdigest()[:16]}
    return out, info
