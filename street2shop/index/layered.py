"""A catalogue update without a rebuild: an Annoy base, a small delta searched exactly, and tombstones.

Annoy cannot add an item after its forest is built (and its maintainers will
not add that: spotify/annoy #344, #677); large users rebuild periodically
(#287, #541). Between rebuilds, an index version can carry the changes:

- ``base/``: the Annoy base of an earlier version, hard-linked (never copied;
  a reference to the earlier folder where hard links are impossible);
- ``delta/``: the vectors and items added since, searched exactly;
- ``tombstones.json``: the base rows removed since (by product or by image).

A query asks the base (skipping dead rows, fetching more candidates until
enough live ones remain) and the delta, and merges both by the one ranking
rule (:mod:`street2shop.index.ranking`) over global rows (the base's first,
then the delta's), so it answers what an index rebuilt over the live items
would, up to Annoy's own approximation. :func:`street2shop.index.updates.compact_index`
rebuilds one clean Annoy version from base + delta − tombstones.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from street2shop.errors import DataError
from street2shop.index import folder as index_folder
from street2shop.index import ranking
from street2shop.index.annoy_index import CatalogIndex
from street2shop.index.base import SearchResult, _result
from street2shop.index.exact import ExactIndex
from street2shop.index.folder import (
    ITEMS_FILE,
    MANIFEST_FILE,
    VECTORS_FILE,
    load_vectors,
    open_index_folder,
    read_index_items,
    read_index_manifest,
)
from street2shop.index.local import LocalIndex

logger = logging.getLogger(__name__)

BASE_FOLDER = "base"
DELTA_FOLDER = "delta"
TOMBSTONES_FILE = "tombstones.json"


class LayeredIndex(LocalIndex):
    """A base index, a delta searched exactly, and tombstones over the base; searched as one index.

    Rows are global: the base's rows ``0..B-1``, then the delta's ``B..B+D-1``.

    Args:
        base: the base index (an Annoy :class:`~street2shop.index.annoy_index.CatalogIndex`, or an exact one).
        delta: an :class:`ExactIndex` of the items added since the base was built.
        dead: bool ``[B]``: base rows removed since.
    """

    kind = "layered"

    def __init__(self, base: LocalIndex, delta: ExactIndex, dead: np.ndarray) -> None:
        super().__init__(base.dimension, model_fingerprint=base.model_fingerprint, model_version=base.model_version)
        if len(dead) != len(base):
            raise DataError(f"the tombstones must cover the base's {len(base)} rows. Received: {len(dead)}")
        if delta.dimension != base.dimension:
            raise DataError(f"the delta's dimension {delta.dimension} is not the base's {base.dimension}")
        self.base = base
        self.delta = delta
        self.base.dead = np.asarray(dead, dtype=bool)
        self._items = list(base.items) + list(delta.items)
        self.dead = np.concatenate([self.base.dead, np.zeros(len(delta), dtype=bool)])

    @property
    def live_count(self) -> int:
        return int(len(self) - self.dead.sum())

    @property
    def vectors(self) -> np.ndarray:
        """Every row's vector (a copy of the base's: for evaluation and compaction, not for queries)."""
        return np.concatenate([np.asarray(self.base.vectors), np.asarray(self.delta.vectors)])

    def _merge(self, from_base: list[SearchResult], from_delta: list[SearchResult], k: int, by_product: bool, excluded: frozenset[str]) -> list[SearchResult]:
        """The base's and the delta's answers as one ranking, by the one rule over global rows."""
        offset = len(self.base)
        rows = np.array([r.row for r in from_base] + [offset + r.row for r in from_delta], dtype=np.int64)
        sims = np.array([r.similarity for r in from_base] + [r.similarity for r in from_delta], dtype=np.float64)
        rows, sims = ranking.order(rows, sims)
        return ranking.collect(rows, sims, self._items, k, by_product=by_product, keep=ranking.Filter(excluded, self.dead), make=_result)

    def _search(self, query: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], search_k: int | None, rerank: bool) -> list[SearchResult]:
        # Each part's k best (products, with by_product) hold the union's k best.
        from_base = self.base._search(query, k, by_product, excluded, search_k, rerank)
        from_delta = self.delta._search(query, k, by_product, excluded, None, True) if len(self.delta) else []
        return self._merge(from_base, from_delta, k, by_product, excluded)

    def _search_category(self, query: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], category: str) -> list[SearchResult]:
        from_base = self.base._search_category(query, k, by_product, excluded, category)
        from_delta = self.delta._search_category(query, k, by_product, excluded, category) if len(self.delta) else []
        return self._merge(from_base, from_delta, k, by_product, excluded)

    def exact(self) -> ExactIndex:
        """An exact index over the live items (base rows not removed, then the delta), as a rebuild would hold."""
        live = np.flatnonzero(~self.base.dead)
        vectors = np.concatenate([np.asarray(self.base.vectors[live]), np.asarray(self.delta.vectors)])
        base_items = self.base.items
        items = [base_items[i] for i in live] + list(self.delta.items)
        return ExactIndex.from_arrays(vectors, items, model_fingerprint=self.model_fingerprint, model_version=self.model_version)

    def config(self) -> dict[str, Any]:
        return {**self.base.config(), "base_count": len(self.base), "delta_count": len(self.delta),
                "removed": int(self.base.dead.sum()), "live_count": self.live_count}

    # -- saving (as a version folder: see street2shop.index.updates) and loading

    def write_folder(self, folder: Path) -> None:
        """Writes the layered version into the new, empty ``folder``: the base linked, the delta, the tombstones, the manifest last."""
        if self.base.folder is None:
            raise DataError("the base of a layered index must be a saved index (it is linked, never copied)")
        self._base_ref = link_folder(Path(self.base.folder), folder / BASE_FOLDER)
        if len(self.delta):
            (folder / DELTA_FOLDER).mkdir()
            index_folder.write_vectors(folder / DELTA_FOLDER / VECTORS_FILE, self.delta.vectors)
            index_folder.write_items(folder / DELTA_FOLDER / ITEMS_FILE, self.delta.items)
        (folder / TOMBSTONES_FILE).write_text(json.dumps({"base_rows": np.flatnonzero(self.base.dead).tolist()}) + "\n")
        index_folder.write_manifest(folder / MANIFEST_FILE, self.kind, self.config(), len(self), self._files())

    def _files(self) -> dict[str, str]:
        files = {"base": getattr(self, "_base_ref", BASE_FOLDER), "tombstones": TOMBSTONES_FILE}
        if len(self.delta):
            files.update(delta_vectors=f"{DELTA_FOLDER}/{VECTORS_FILE}", delta_items=f"{DELTA_FOLDER}/{ITEMS_FILE}")
        return files

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, expected_fingerprint: str | None = None, expected_dimension: int | None = None) -> LayeredIndex:
        """Opens a layered version: its base (memory-mapped), its delta and its tombstones."""
        root, manifest, _ = open_index_folder(directory, cls.kind, {}, expected_fingerprint, expected_dimension)
        files = manifest.get("files", {})
        base_folder = root / files.get("base", BASE_FOLDER)
        base_kind = read_index_manifest(base_folder).get("kind", "annoy")
        if base_kind not in ("annoy", "exact"):
            raise DataError(f"the base of {root} must be an Annoy or exact index. Received: kind={base_kind!r} at {base_folder}")
        opener = CatalogIndex if base_kind == "annoy" else ExactIndex
        base = opener.load(base_folder, expected_fingerprint=manifest["model_fingerprint"], expected_dimension=manifest["dimension"])
        if "delta_items" in files:
            delta_items = read_index_items(root / files["delta_items"], manifest["delta_count"])
            delta_vectors = load_vectors(root / files["delta_vectors"], len(delta_items), base.dimension)
            delta = ExactIndex.from_arrays(delta_vectors, delta_items, model_fingerprint=base.model_fingerprint, model_version=base.model_version)
        else:
            delta = ExactIndex(base.dimension, model_fingerprint=base.model_fingerprint, model_version=base.model_version)
        try:
            rows = json.loads((root / files.get("tombstones", TOMBSTONES_FILE)).read_text())["base_rows"]
            dead = np.zeros(len(base), dtype=bool)
            dead[np.asarray(rows, dtype=np.int64)] = True
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise DataError(f"cannot read the tombstones of {root}: {e}") from None
        index = cls(base, delta, dead)
        index.folder = root
        logger.info("loaded a layered index from %s: base %d, delta %d, removed %d", root, len(base), len(delta), int(dead.sum()))
        return index


def link_folder(source: Path, destination: Path) -> str:
    """Hard-links every file of ``source`` into a new folder ``destination``; returns what the manifest records.

    Never copies: where a hard link is impossible (another file system), the
    folder is not made and a reference relative to the version folder is
    returned instead (the earlier version it points into must then be kept).
    """
    destination.mkdir()
    try:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name != TOMBSTONES_FILE:
                os.link(path, destination / path.name)
    except OSError as e:
        import shutil

        shutil.rmtree(destination, ignore_errors=True)
        logger.warning("cannot hard-link %s (%s): the new version refers to it instead; keep that version", source, e)
        return os.path.relpath(source, destination.parent)  # staging and the published version share a parent
    return destination.name
