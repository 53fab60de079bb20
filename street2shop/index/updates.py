"""``street2shop index update`` and ``index compact``: catalogue changes between rebuilds, as new index versions.

``update_index(base, add=[embeddings...], remove=ids_file)`` writes the next
version: the current Annoy base linked (never copied), a delta holding every
item added since it was built, and tombstones for the base rows removed since
(a :class:`~street2shop.index.layered.LayeredIndex`). Adding an image that the
index holds already for the same product replaces it; replacing a product's
photo is a remove and an add. ``compact_index(base)`` builds one clean Annoy
version from base + delta − tombstones. Both write a new version atomically
(a staging folder, then a rename), so a killed run leaves the previous
version serving and nothing half written visible.

**When compaction pays.** A query scans the whole delta exactly, while the
Annoy base inspects about ``search_k`` vectors; once the delta holds as many
vectors as that, it costs more than the base query, and a base with a large
share of removed rows makes Annoy fetch ever more candidates.
:func:`compaction_advice` says so by these two rules (measured in
BENCHMARKS.md, "Catalogue updates").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from street2shop.contract import check_same_model
from street2shop.embeddings import read_embedding_sets
from street2shop.errors import DataError
from street2shop.index.annoy_index import DEFAULT_SEARCH_K, CatalogIndex
from street2shop.index.base import SearchIndex
from street2shop.index.exact import ExactIndex
from street2shop.index.layered import LayeredIndex
from street2shop.index.local import LocalIndex
from street2shop.index.versions import publish_index
from street2shop.items import Item

logger = logging.getLogger(__name__)

# A base with more than this share of its rows removed is worth compacting.
MAX_REMOVED_SHARE = 0.25


def _layers(index: LocalIndex) -> tuple[LocalIndex, ExactIndex, np.ndarray]:
    """The base, delta and removed base rows of the current version (a plain index is a base with nothing on top)."""
    if isinstance(index, LayeredIndex):
        return index.base, index.delta, index.base.dead.copy()
    delta = ExactIndex(index.dimension, model_fingerprint=index.model_fingerprint, model_version=index.model_version)
    return index, delta, np.zeros(len(index), dtype=bool)


def read_removals(path: str | os.PathLike[str]) -> list[str]:
    """The ids of a ``--remove`` file: one product id, image id or image path per line (blank lines and ``#`` comments skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read the removal list {path}: {e.strerror or e}") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def update_index(
    base: str | os.PathLike[str],
    *,
    add: Sequence[str | os.PathLike[str]] = (),
    remove: str | os.PathLike[str] | None = None,
    auto_compact: bool = False,
) -> dict[str, Any]:
    """Writes the next version of the index base ``base``: the current one with ``add`` added and ``remove`` removed.

    Args:
        base: the index base.
        add: embeddings folders (``street2shop embed`` output) of the same model as the index.
        remove: a file of ids to remove: product ids (every image of the product), image ids
            (as the service names them) or image paths, one per line.
        auto_compact: also compact when :func:`compaction_advice` says it pays.

    Returns:
        What was written: the version, the counts, and the advice.

    Raises:
        ModelMismatchError: an added folder is of another model than the index.
        DataError: a removal names nothing in the index (nothing is written), or nothing to do.
    """
    from street2shop.index import load_index

    if not add and remove is None:
        raise DataError("give --add EMBEDDINGS and/or --remove IDS_FILE: nothing to update. Received: neither")
    current = load_index(base)
    base_index, delta, dead = _layers(current)
    delta_vectors, delta_items = np.asarray(delta.vectors), list(delta.items)
    delta_keep = np.ones(len(delta_items), dtype=bool)

    removed = {"products": 0, "images": 0, "rows": 0}
    if remove is not None:
        ids = read_removals(remove)
        base_items = base_index.items
        by_product: dict[str, list[tuple[int, int]]] = {}
        by_image: dict[str, list[tuple[int, int]]] = {}
        for layer, items in ((0, base_items), (1, delta_items)):
            for row, item in enumerate(items):
                by_product.setdefault(item.product_id, []).append((layer, row))
                by_image.setdefault(item.image_id, []).append((layer, row))
                if item.image_path:
                    by_image.setdefault(item.image_path, []).append((layer, row))
        unknown = [i for i in ids if i not in by_product and i not in by_image]
        if unknown:
            raise DataError(
                f"{len(unknown)} id(s) of {remove} name no product, image id or image path in the index: "
                f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; nothing was written"
            )
        for i in ids:
            kind = "products" if i in by_product else "images"
            removed[kind] += 1
            for layer, row in by_product.get(i) or by_image[i]:
                if layer == 0 and not dead[row]:
                    dead[row] = True
                    removed["rows"] += 1
                elif layer == 1 and delta_keep[row]:
                    delta_keep[row] = False
                    removed["rows"] += 1

    added, replaced = 0, 0
    new_vectors, new_items = [], []
    if add:
        vectors, rows, identity = read_embedding_sets(add)
        check_same_model(current.identity, identity, f"the embeddings {', '.join(map(str, add))}")
        live = {(item.product_id, item.image_id): (0, row) for row, item in enumerate(base_index.items) if not dead[row]}
        live.update({(item.product_id, item.image_id): (1, row) for row, item in enumerate(delta_items) if delta_keep[row]})
        for vector, row in zip(vectors, rows):
            item = Item.from_dict(row)
            previous = live.pop((item.product_id, item.image_id), None)
            if previous is not None:  # the same product's same image, embedded again: replaced
                replaced += 1
                if previous[0] == 0:
                    dead[previous[1]] = True
                else:
                    delta_keep[previous[1]] = False
            new_vectors.append(vector)
            new_items.append(item)
            added += 1
    delta = ExactIndex(base_index.dimension, model_fingerprint=base_index.model_fingerprint, model_version=base_index.model_version)
    kept = [item for item, keep in zip(delta_items, delta_keep) if keep]
    if kept or new_items:
        delta.add(np.concatenate([delta_vectors[delta_keep]] + ([np.asarray(new_vectors)] if new_vectors else [])), kept + new_items)
    layered = LayeredIndex(base_index, delta, dead)
    if layered.live_count == 0:
        raise DataError("the update would leave the catalogue empty; nothing was written. Received: every item removed")
    folder = publish_index(layered, base)
    advice = compaction_advice(layered)
    result: dict[str, Any] = {
        "index": str(folder), "version": layered.version, "added": added, "replaced": replaced, "removed": removed,
        "base_count": len(base_index), "delta_count": len(delta), "removed_from_base": int(dead.sum()), "live_count": layered.live_count,
        "compaction": advice,
    }
    logger.info("index version %s: +%d (%d replacing), -%d rows; delta %d, removed from the base %d. %s",
                layered.version, added, replaced, removed["rows"], len(delta), int(dead.sum()), advice["reason"])
    if auto_compact and advice["pays"]:
        result["compacted"] = compact_index(base)
    return result


def compaction_advice(index: SearchIndex) -> dict[str, Any]:
    """Whether rebuilding one Annoy index pays: the delta outgrew what the base query inspects, or much of the base is removed."""
    if not isinstance(index, LayeredIndex):
        return {"pays": False, "reason": "one index, nothing on top of it"}
    search_k = getattr(index.base, "search_k", DEFAULT_SEARCH_K)
    search_k = search_k if search_k and search_k > 0 else DEFAULT_SEARCH_K
    removed_share = float(index.base.dead.mean()) if len(index.base) else 0.0
    reasons = []
    if len(index.delta) >= search_k:
        reasons.append(f"the delta's {len(index.delta):,} vectors, all scanned, outnumber the {search_k:,} the base query inspects")
    if removed_share > MAX_REMOVED_SHARE:
        reasons.append(f"{100 * removed_share:.0f}% of the base is removed (over {100 * MAX_REMOVED_SHARE:.0f}%)")
    if reasons:
        return {"pays": True, "reason": "compaction pays: " + "; ".join(reasons) + " (street2shop index compact)"}
    return {"pays": False, "reason": f"compaction does not pay yet (delta {len(index.delta):,} of {search_k:,}; {100 * removed_share:.0f}% of the base removed)"}


def compact_index(base: str | os.PathLike[str], *, n_trees: int | None = None, search_k: int | None = None) -> dict[str, Any]:
    """Builds one clean Annoy version from the current version's base + delta − tombstones, as the next version."""
    from street2shop.index import load_index

    current = load_index(base)
    if isinstance(current, LayeredIndex):
        exact = current.exact()
        vectors, items = np.asarray(exact.vectors), list(exact.items)
        settings = {"n_trees": getattr(current.base, "n_trees", None), "search_k": getattr(current.base, "search_k", None)}
    else:
        vectors, items = np.asarray(current.vectors), list(current.items)
        settings = {"n_trees": getattr(current, "n_trees", None), "search_k": getattr(current, "search_k", None)}
    settings.update({k: v for k, v in (("n_trees", n_trees), ("search_k", search_k)) if v is not None})
    index = CatalogIndex(current.dimension, model_fingerprint=current.model_fingerprint, model_version=current.model_version,
                         **{k: v for k, v in settings.items() if v is not None})
    index.add(vectors, items)
    index.build()
    folder = publish_index(index, base)
    logger.info("compacted version %s into version %s: %d items", current.version, index.version, len(index))
    return {"index": str(folder), "version": index.version, "from_version": current.version, "count": len(index), **index.config()}


__all__ = ["compact_index", "compaction_advice", "read_removals", "update_index"]
