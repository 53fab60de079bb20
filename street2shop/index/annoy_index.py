"""The Annoy index: approximate nearest neighbours over the catalogue's unit vectors, saved atomically, loaded memory-mapped.

Its folder holds, besides the files every index folder has (:mod:`street2shop.index.folder`),
``annoy.ann``: Annoy's forest (angular metric). Annoy stores the vectors in it
too and ``AnnoyIndex.load`` memory-maps it, so several processes that load the
same directory share one copy through the page cache. ``vectors.npy`` beside it
makes the exact re-ranking of Annoy's candidates one vectorised gather and
mat-vec instead of one ``get_item_vector`` call per candidate, and gives exact
search (:meth:`CatalogIndex.exact`, category filters) on a saved index without
re-embedding the catalogue. It costs ``4 * dimension`` bytes per item on disk
(0.5 GB at 1M x 128; see BENCHMARKS.md for the Annoy file beside it).

Similarities are cosines. Annoy's angular distance between unit vectors is
``d = sqrt(2 * (1 - cos))``, so ``cos = 1 - d**2 / 2``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from street2shop.errors import ConfigError, DataError, IndexMismatchError, check_positive_int
from street2shop.index import ranking
from street2shop.index.base import SearchResult, _result, check_embeddings
from street2shop.index.folder import ITEMS_FILE, VECTORS_FILE, load_vectors, open_index_folder, read_index_items
from street2shop.index.exact import ExactIndex
from street2shop.index.local import LocalIndex
from street2shop.items import Item

logger = logging.getLogger(__name__)

METRICS = ("angular",)
ANNOY_FILE = "annoy.ann"

# Defaults chosen with tools/bench_index.py (BENCHMARKS.md, "Catalogue index"):
# on 1M clustered 128-d unit vectors (one core), 50 trees with search_k=20000
# give recall@10 0.996 at a p50 of 2.7 ms, 0.08 of exact search's 33 ms. 50 is
# the smallest forest tried where search_k=10000 still clears 0.95 (0.975 at
# 1.5 ms), so latency can be traded down per query; 25 trees fall to 0.949
# there, and 100 trees double build time and disk for +0.004 recall.
# search_k is a fixed count of items inspected, so on small catalogues the
# search is close to exhaustive (and still cheap).
DEFAULT_N_TREES = 50
DEFAULT_SEARCH_K = 20000


def _annoy():
    try:
        import annoy
    except ImportError as exc:  # pragma: no cover - annoy is a core dependency
        raise ConfigError("the catalogue index needs the 'annoy' package: pip install annoy. Received: ImportError") from exc
    return annoy


def _check_search_k(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (value < 1 and value != -1):
        raise ConfigError(
            "search_k must be an integer >= 1, or -1 for Annoy's own default (n_trees * candidates). "
            f"Received: search_k={value!r}"
        )
    return int(value)


class CatalogIndex(LocalIndex):
    """An approximate nearest-neighbour index of catalogue embeddings (Annoy, cosine similarity).

    Add embeddings in batches (rows are numbered 0..N-1 in the order added),
    ``build`` once, then ``query``. ``save`` writes an index directory
    atomically; ``load`` memory-maps it and refuses one made by another model
    or of another dimension. Results are per product by default: a product
    with several catalogue images appears once, at its best image, and ``k``
    counts products. Annoy returns its candidates ordered by their true
    distance; ``rerank`` recomputes their cosine exactly from the stored
    vectors (the same arithmetic as :class:`ExactIndex`) with ties broken by row.

    Args:
        dimension: int, the embedding dimension.
        metric: str, only "angular" (cosine) is supported.
        n_trees: int, trees in the Annoy forest; more is more accurate, bigger and slower to build.
        search_k: int, default number of items Annoy inspects per query (at least
            the number of candidates asked for); -1 for Annoy's default of
            ``n_trees * candidates``.
        model_fingerprint: str | None, the fingerprint of the model that made the embeddings.
        model_version: int | None, that model's version.
        seed: int, Annoy's random seed, so a build is reproducible.

    Example:
        >>> index = CatalogIndex(128, model_fingerprint="abc123")
        >>> index.add(embeddings, [Item("p1", "shop/1.jpg"), Item("p1", "shop/2.jpg")])
        >>> index.build()
        >>> index.save("catalog_index")
        >>> index = CatalogIndex.load("catalog_index", expected_fingerprint="abc123")
        >>> [r.product_id for r in index.query(street_embedding, k=5)]
    """

    kind = "annoy"

    def __init__(
        self,
        dimension: int,
        *,
        metric: str = "angular",
        n_trees: int = DEFAULT_N_TREES,
        search_k: int = DEFAULT_SEARCH_K,
        model_fingerprint: str | None = None,
        model_version: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(dimension, model_fingerprint=model_fingerprint, model_version=model_version)
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}. Received: metric={metric!r}")
        self.metric = metric
        self.n_trees = check_positive_int("n_trees", n_trees)
        self.search_k = _check_search_k(search_k)
        self.seed = check_positive_int("seed", seed, minimum=0)
        self._annoy = _annoy().AnnoyIndex(self.dimension, self.metric)
        self._annoy.set_seed(self.seed)
        self._chunks: list[np.ndarray] = []
        self._vectors: np.ndarray | None = None
        self._built = False

    # -- building

    def add(self, embeddings: np.ndarray, items: Sequence[Item]) -> None:
        """Append a batch: embeddings [N, D] (L2-normalised here if they are not) and one Item per row."""
        if self._built:
            raise IndexMismatchError(
                "cannot add to an index that is built or loaded (Annoy would accept it and then fail on query); "
                f"build a new CatalogIndex. Received: add of {len(items)} items to a built index of {len(self)}"
            )
        vectors = check_embeddings(embeddings, items, self.dimension)
        start = len(self._items)
        for offset, vector in enumerate(vectors):
            self._annoy.add_item(start + offset, vector)
        self._chunks.append(vectors)
        self._items.extend(items)
        self._forget()
        logger.debug("added %d items (rows %d..%d)", len(items), start, start + len(items) - 1)

    def build(self, n_jobs: int = 1) -> None:
        """Build the forest. ``n_jobs=1`` by default: the build is single-threaded unless asked."""
        if self._built:
            raise IndexMismatchError(f"the index is already built. Received: build() on a built index of {len(self)} items")
        if not self._items:
            raise DataError("cannot build an empty index. Received: 0 items")
        logger.info("building an Annoy index of %d items, %d trees", len(self._items), self.n_trees)
        self._annoy.build(self.n_trees, n_jobs=n_jobs)
        self._vectors = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = []
        self._built = True

    # -- inspection

    @property
    def built(self) -> bool:
        return self._built

    @property
    def vectors(self) -> np.ndarray:
        """The stored unit vectors, float32 [count, dimension] (memory-mapped after ``load``)."""
        self._require_ready("vectors")
        assert self._vectors is not None
        return self._vectors

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "metric": self.metric,
            "n_trees": self.n_trees,
            "search_k": self.search_k,
            "seed": self.seed,
        }

    def exact(self) -> ExactIndex:
        """An :class:`ExactIndex` over the same vectors and items (no copy of a memory-mapped matrix)."""
        return ExactIndex.from_arrays(self.vectors, self._items, model_fingerprint=self.model_fingerprint, model_version=self.model_version)

    def _require_ready(self, action: str) -> None:
        if not self._built:
            raise IndexMismatchError(f"call build() (or load an index) before {action}. Received: an unbuilt index of {len(self)} items")

    # -- querying

    def _candidates(self, query: np.ndarray, n: int, search_k: int) -> tuple[np.ndarray, np.ndarray]:
        effective = -1 if search_k == -1 else max(search_k, n)
        rows, distances = self._annoy.get_nns_by_vector(query, n, search_k=effective, include_distances=True)
        return np.asarray(rows, dtype=np.int64), np.asarray(distances, dtype=np.float64)

    def _search(self, query: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], search_k: int | None, rerank: bool) -> list[SearchResult]:
        """Annoy's candidates, re-ranked exactly (or by Annoy's distance without ``rerank``).

        With ``by_product`` or ``exclude``, more candidates than k are fetched
        (growing x4 until there are k usable answers or the index is exhausted).
        """
        search_k = self.search_k if search_k is None else _check_search_k(search_k)
        count = len(self)
        keep = self._filter(excluded)
        n = min(count, k * 4 if (by_product or keep.active) else k)
        while True:
            rows, distances = self._candidates(query, n, search_k)
            if len(rows) >= n and n < count and not ranking.enough(rows, self._items, k, by_product, keep):
                n = min(count, n * 4)
                continue
            break
        sims = ranking.cosines(self.vectors, rows, query) if rerank else 1.0 - distances**2 / 2.0
        rows, sims = ranking.order(rows, sims)
        return ranking.collect(rows, sims, self._items, k, by_product=by_product, keep=keep, make=_result)

    # -- saving and loading

    def _kind_files(self) -> dict[str, str]:
        return {"annoy": ANNOY_FILE}

    def _write_kind_files(self, folder: Path) -> None:
        self._write_annoy(folder / ANNOY_FILE)

    def _write_annoy(self, path: Path) -> None:
        # Annoy's save() re-maps the index from the file it wrote; unlinking or
        # renaming that file later is safe on POSIX (the mapping keeps the inode).
        if not self._annoy.save(str(path)):
            raise DataError(f"Annoy could not save the index. Received: path={path}")

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        expected_fingerprint: str | None = None,
        expected_dimension: int | None = None,
    ) -> CatalogIndex:
        """Open a saved index, memory-mapped. Refuses one from another model or of another dimension."""
        files = {"annoy": ANNOY_FILE, "vectors": VECTORS_FILE, "items": ITEMS_FILE}
        root, manifest, paths = open_index_folder(directory, cls.kind, files, expected_fingerprint, expected_dimension)
        try:
            index = cls(
                manifest["dimension"],
                metric=manifest.get("metric", "angular"),
                n_trees=manifest.get("n_trees", DEFAULT_N_TREES),
                search_k=manifest.get("search_k", DEFAULT_SEARCH_K),
                model_fingerprint=manifest["model_fingerprint"],
                model_version=manifest.get("model_version"),
                seed=manifest.get("seed", 0),
            )
        except ConfigError as exc:
            raise DataError(f"the index manifest has invalid settings. Received: {exc} ({root})") from exc
        count = manifest["count"]
        try:
            index._annoy.load(str(paths["annoy"]))
        except OSError as exc:
            raise DataError(f"Annoy could not load the index file. Received: {paths['annoy']}: {exc}") from exc
        if index._annoy.get_n_items() != count:
            raise DataError(f"the Annoy file must hold {count} items. Received: {index._annoy.get_n_items()} in {paths['annoy']}")
        index._vectors = load_vectors(paths["vectors"], count, index.dimension)
        index._items = read_index_items(paths["items"], count)
        index._built = True
        index.folder = root
        logger.info("loaded an index of %d items from %s", count, root)
        return index
