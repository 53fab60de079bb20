"""The catalogue index: Annoy over L2-normalised embeddings, saved atomically, loaded memory-mapped.

An index directory holds four files:

``annoy.ann``
    Annoy's forest (angular metric). Annoy stores the vectors in it too and
    ``AnnoyIndex.load`` memory-maps it, so several processes that load the same
    directory share one copy through the page cache.
``vectors.npy``
    The same vectors as a float32 ``[count, dimension]`` array, loaded with
    ``np.load(mmap_mode="r")`` (shared the same way). It makes the exact
    re-ranking of Annoy's candidates one vectorised gather and mat-vec instead of
    one ``get_item_vector`` call per candidate, and it lets :meth:`CatalogIndex.exact`
    give brute-force ground truth on a saved index without re-embedding the
    catalogue. It costs ``4 * dimension`` bytes per item on disk
    (0.5 GB at 1M x 128; see BENCHMARKS.md for the Annoy file beside it).
``items.jsonl``
    The item table, one JSON object per line in row order:
    ``{"row": 0, "product_id": "...", "image_path": "...", "category": null}``.
    JSON lines rather than CSV because it round-trips exactly: a missing
    category (``null``) stays distinct from an empty one, and ids or paths with
    commas, quotes or newlines need no quoting rules. It is a machine file; the
    human-facing dataset format stays the manifest CSV.
``manifest.json``
    ``format_version``, ``dimension``, ``metric``, ``n_trees``, ``search_k``,
    ``count``, ``model_fingerprint``, ``created_at`` (UTC, ISO 8601),
    ``package_version`` and the file names. Written last.

:meth:`CatalogIndex.save` writes all of it into a temporary folder next to the
destination and renames it into place (an existing index is renamed aside first
and deleted only after the new one is in), so a crash never leaves a half index
where a good one was.

Similarities are cosines. Annoy's angular distance between unit vectors is
``d = sqrt(2 * (1 - cos))``, so ``cos = 1 - d**2 / 2``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from street2shop.errors import ConfigError, DataError, IndexMismatchError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METRICS = ("angular",)
ANNOY_FILE = "annoy.ann"
VECTORS_FILE = "vectors.npy"
ITEMS_FILE = "items.jsonl"
MANIFEST_FILE = "manifest.json"

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

_NORM_TOLERANCE = 1e-3
_ZERO_NORM = 1e-12


def _annoy():
    try:
        import annoy
    except ImportError as exc:  # pragma: no cover - annoy is a core dependency
        raise ConfigError("the catalogue index needs the 'annoy' package: pip install annoy. Received: ImportError") from exc
    return annoy


@dataclasses.dataclass(frozen=True)
class Item:
    """One catalogue image in the index.

    Args:
        product_id: str, the product the image shows (several images may share it).
        image_path: str, where the image is (free text, kept for display).
        category: str | None, the product's category, if known.

    Example:
        >>> Item("p17", "shop/p17_front.jpg", "bags")
    """

    product_id: str
    image_path: str = ""
    category: str | None = None


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """One answer of a query.

    Args:
        rank: int, 1 for the best answer.
        product_id: str, the product of the matched image.
        similarity: float, cosine similarity between the query and the image, in [-1, 1].
        row: int, the image's row in the index (0-based, in the order added).
        image_path: str, the image's path as given to ``add``.
        category: str | None, the image's category.

    Example:
        >>> best = index.query(embedding, k=5)[0]
        >>> best.product_id, round(best.similarity, 3)
    """

    rank: int
    product_id: str
    similarity: float
    row: int
    image_path: str
    category: str | None


# ----------------------------------------------------------------------------- checks


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1. Received: {name}={value!r}")
    return int(value)


def _check_search_k(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (value < 1 and value != -1):
        raise ConfigError(
            "search_k must be an integer >= 1, or -1 for Annoy's own default (n_trees * candidates). "
            f"Received: search_k={value!r}"
        )
    return int(value)


def _check_embeddings(embeddings: Any, items: Sequence[Item], dimension: int) -> np.ndarray:
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise IndexMismatchError(f"embeddings must be a 2-D array [N, {dimension}]. Received: shape={array.shape}")
    if array.shape[1] != dimension:
        raise IndexMismatchError(
            f"embeddings must have the index dimension {dimension}. Received: shape={array.shape}"
        )
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"embeddings must be real numbers. Received: dtype={array.dtype}")
    if len(items) != array.shape[0]:
        raise DataError(
            f"there must be one item per embedding row. Received: {array.shape[0]} rows and {len(items)} items"
        )
    for position, item in enumerate(items):
        if not isinstance(item, Item):
            raise DataError(f"items must be Item instances. Received: {type(item).__name__} at position {position}")
        if not isinstance(item.product_id, str) or not item.product_id:
            raise DataError(f"Item.product_id must be a non-empty string. Received: {item.product_id!r} at position {position}")
    vectors = array.astype(np.float64, copy=False)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"embeddings must be finite. Received: NaN or inf in rows {bad[:10].tolist()}")
    norms = np.linalg.norm(vectors, axis=1)
    zero = norms < _ZERO_NORM
    if zero.any():
        raise DataError(
            f"embeddings must be non-zero (a zero vector has no direction). Received: zero rows {np.flatnonzero(zero)[:10].tolist()}"
        )
    off = np.abs(norms - 1.0) > _NORM_TOLERANCE
    if off.any():
        logger.warning(
            "%d of %d embeddings are not unit length (norms from %.4g to %.4g); L2-normalising them",
            int(off.sum()), len(norms), float(norms.min()), float(norms.max()),
        )
    return (vectors / norms[:, None]).astype(np.float32)


def _check_query(embedding: Any, dimension: int) -> np.ndarray:
    array = np.asarray(embedding)
    if array.ndim != 1 or array.shape[0] != dimension:
        raise IndexMismatchError(
            f"a query must be a 1-D vector of the index dimension {dimension}. Received: shape={array.shape}"
        )
    vector = array.astype(np.float64)
    if not np.isfinite(vector).all():
        raise DataError("a query embedding must be finite. Received: NaN or inf")
    norm = float(np.linalg.norm(vector))
    if norm < _ZERO_NORM:
        raise DataError("a query embedding must be non-zero. Received: a zero vector")
    if abs(norm - 1.0) > _NORM_TOLERANCE:
        logger.debug("query norm %.4g; L2-normalising it", norm)
    return (vector / norm).astype(np.float32)


def _check_batch(embeddings: Any, dimension: int) -> np.ndarray:
    array = np.asarray(embeddings)
    if array.ndim != 2 or array.shape[1] != dimension:
        raise IndexMismatchError(
            f"query_batch needs a 2-D array [Q, {dimension}]. Received: shape={array.shape}"
        )
    return array


# ----------------------------------------------------------------------------- shared ranking


def _exact_similarities(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosines of the given rows with the query, in float64 from the stored float32 vectors.

    The one place final similarities are computed, for both indexes and for
    single and batch queries, so the same candidate gets the same number.
    """
    if len(rows) == 0:
        return np.zeros(0)
    return np.asarray(vectors[rows], dtype=np.float64) @ query.astype(np.float64)


def _ranked(rows: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and similarities ordered by similarity, ties by row (deterministic)."""
    order = np.lexsort((rows, -sims))
    return rows[order], sims[order]


def _collect(
    rows: np.ndarray,
    sims: np.ndarray,
    items: Sequence[Item],
    k: int,
    by_product: bool,
    exclude: frozenset[str],
) -> list[SearchResult]:
    results: list[SearchResult] = []
    seen: set[str] = set()
    for row, sim in zip(rows.tolist(), sims.tolist()):
        item = items[row]
        if item.product_id in exclude:
            continue
        if by_product:
            if item.product_id in seen:
                continue
            seen.add(item.product_id)
        results.append(
            SearchResult(
                rank=len(results) + 1,
                product_id=item.product_id,
                similarity=float(min(1.0, max(-1.0, sim))),
                row=int(row),
                image_path=item.image_path,
                category=item.category,
            )
        )
        if len(results) == k:
            break
    return results


def _enough(rows: np.ndarray, items: Sequence[Item], k: int, by_product: bool, exclude: frozenset[str]) -> bool:
    usable = (items[r].product_id for r in rows.tolist() if items[r].product_id not in exclude)
    if by_product:
        return len(set(usable)) >= k
    return sum(1 for _ in usable) >= k


def _exclude_set(exclude: Iterable[str] | None) -> frozenset[str]:
    if exclude is None:
        return frozenset()
    if isinstance(exclude, str):
        return frozenset([exclude])
    return frozenset(str(p) for p in exclude)


# ----------------------------------------------------------------------------- exact search


class ExactIndex:
    """Brute-force cosine search with NumPy: ground truth for the Annoy index, and fine for small catalogues.

    Same ``add`` / ``query`` / ``query_batch`` / ``SearchResult`` interface as
    :class:`CatalogIndex`; ``build`` does nothing and ``search_k`` / ``rerank``
    are accepted and ignored (the search is exact). Ties in similarity are
    broken by row order, so answers are deterministic.

    Args:
        dimension: int, the embedding dimension.
        model_fingerprint: str | None, the fingerprint of the model that made the embeddings.

    Example:
        >>> exact = ExactIndex(128)
        >>> exact.add(embeddings, [Item("p1"), Item("p2")])
        >>> exact.query(embeddings[0], k=1)[0].product_id
        'p1'
    """

    def __init__(self, dimension: int, *, model_fingerprint: str | None = None) -> None:
        self.dimension = _check_positive_int("dimension", dimension)
        self.model_fingerprint = model_fingerprint
        self._chunks: list[np.ndarray] = []
        self._vectors: np.ndarray | None = None
        self._items: list[Item] = []

    @classmethod
    def from_arrays(cls, vectors: np.ndarray, items: Sequence[Item], *, model_fingerprint: str | None = None) -> ExactIndex:
        """An exact index over vectors already checked and normalised (e.g. a loaded index's, memory-mapped)."""
        index = cls(int(vectors.shape[1]), model_fingerprint=model_fingerprint)
        index._vectors = vectors
        index._items = list(items)
        return index

    def add(self, embeddings: np.ndarray, items: Sequence[Item]) -> None:
        vectors = _check_embeddings(embeddings, items, self.dimension)
        if self._vectors is not None:
            self._chunks = [np.asarray(self._vectors)]
            self._vectors = None
        self._chunks.append(vectors)
        self._items.extend(items)

    def build(self) -> None:
        """Nothing to build; present so code can treat both indexes alike."""

    @property
    def vectors(self) -> np.ndarray:
        if self._vectors is None:
            if self._chunks:
                self._vectors = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
            else:
                self._vectors = np.zeros((0, self.dimension), np.float32)
            self._chunks = []
        return self._vectors

    def __len__(self) -> int:
        return len(self._items)

    def config(self) -> dict[str, Any]:
        return {"dimension": self.dimension, "model_fingerprint": self.model_fingerprint}

    def _top(self, sims: np.ndarray, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n best rows for one query: chosen on the float32 similarities (ties at the
        boundary all kept), then ranked on exact float64 cosines, ties by row."""
        count = sims.shape[0]
        if n >= count:
            rows = np.arange(count)
        else:
            threshold = np.partition(sims, count - n)[count - n]
            rows = np.flatnonzero(sims >= threshold)
        rows, ranked = _ranked(rows, _exact_similarities(self.vectors, rows, query))
        return rows[:n], ranked[:n]

    def _answer(self, sims: np.ndarray, query: np.ndarray, k: int, by_product: bool, exclude: frozenset[str]) -> list[SearchResult]:
        count = sims.shape[0]
        n = min(count, k * 4 if (by_product or exclude) else k)
        while True:
            rows, ranked = self._top(sims, query, n)
            if n >= count or _enough(rows, self._items, k, by_product, exclude):
                return _collect(rows, ranked, self._items, k, by_product, exclude)
            n = min(count, n * 4)

    def query(
        self,
        embedding: np.ndarray,
        k: int = 20,
        *,
        search_k: int | None = None,
        by_product: bool = True,
        rerank: bool = True,
        exclude: Iterable[str] | None = None,
    ) -> list[SearchResult]:
        """The k best images (or products, with ``by_product``) for one embedding; ``exclude`` drops product ids."""
        k = _check_positive_int("k", k)
        query = _check_query(embedding, self.dimension)
        if len(self) == 0:
            return []
        sims = self.vectors @ query
        return self._answer(sims, query, k, by_product, _exclude_set(exclude))

    def query_batch(
        self,
        embeddings: np.ndarray,
        k: int = 20,
        *,
        search_k: int | None = None,
        by_product: bool = True,
        rerank: bool = True,
        exclude: Iterable[str] | None = None,
        chunk_size: int = 256,
    ) -> list[list[SearchResult]]:
        """``query`` for each row of a [Q, D] array, as one matrix product per chunk of queries."""
        k = _check_positive_int("k", k)
        array = _check_batch(embeddings, self.dimension)
        queries = np.stack([_check_query(q, self.dimension) for q in array]) if len(array) else array
        excluded = _exclude_set(exclude)
        if len(self) == 0:
            return [[] for _ in range(len(array))]
        out: list[list[SearchResult]] = []
        for start in range(0, len(queries), chunk_size):
            chunk = queries[start : start + chunk_size]
            block = chunk @ self.vectors.T
            out.extend(self._answer(sims, q, k, by_product, excluded) for sims, q in zip(block, chunk))
        return out


# ----------------------------------------------------------------------------- Annoy index


class CatalogIndex:
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
        seed: int, Annoy's random seed, so a build is reproducible.

    Example:
        >>> index = CatalogIndex(128, model_fingerprint="abc123")
        >>> index.add(embeddings, [Item("p1", "shop/1.jpg"), Item("p1", "shop/2.jpg")])
        >>> index.build()
        >>> index.save("catalog_index")
        >>> index = CatalogIndex.load("catalog_index", expected_fingerprint="abc123")
        >>> [r.product_id for r in index.query(street_embedding, k=5)]
    """

    def __init__(
        self,
        dimension: int,
        *,
        metric: str = "angular",
        n_trees: int = DEFAULT_N_TREES,
        search_k: int = DEFAULT_SEARCH_K,
        model_fingerprint: str | None = None,
        seed: int = 0,
    ) -> None:
        self.dimension = _check_positive_int("dimension", dimension)
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}. Received: metric={metric!r}")
        self.metric = metric
        self.n_trees = _check_positive_int("n_trees", n_trees)
        self.search_k = _check_search_k(search_k)
        if model_fingerprint is not None and not isinstance(model_fingerprint, str):
            raise ConfigError(f"model_fingerprint must be a string or None. Received: model_fingerprint={model_fingerprint!r}")
        self.model_fingerprint = model_fingerprint
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0. Received: seed={seed!r}")
        self.seed = int(seed)
        self._annoy = _annoy().AnnoyIndex(self.dimension, self.metric)
        self._annoy.set_seed(self.seed)
        self._chunks: list[np.ndarray] = []
        self._vectors: np.ndarray | None = None
        self._items: list[Item] = []
        self._built = False

    # -- building

    def add(self, embeddings: np.ndarray, items: Sequence[Item]) -> None:
        """Append a batch: embeddings [N, D] (L2-normalised here if they are not) and one Item per row."""
        if self._built:
            raise IndexMismatchError(
                "cannot add to an index that is built or loaded (Annoy would accept it and then fail on query); "
                f"build a new CatalogIndex. Received: add of {len(items)} items to a built index of {len(self)}"
            )
        vectors = _check_embeddings(embeddings, items, self.dimension)
        start = len(self._items)
        for offset, vector in enumerate(vectors):
            self._annoy.add_item(start + offset, vector)
        self._chunks.append(vectors)
        self._items.extend(items)
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

    def __len__(self) -> int:
        return len(self._items)

    @property
    def built(self) -> bool:
        return self._built

    @property
    def items(self) -> Sequence[Item]:
        return tuple(self._items)

    @property
    def vectors(self) -> np.ndarray:
        """The stored unit vectors, float32 [count, dimension] (memory-mapped after ``load``)."""
        self._require_built("vectors")
        assert self._vectors is not None
        return self._vectors

    def config(self) -> dict[str, Any]:
        return {
            "dimension": self.dimension,
            "metric": self.metric,
            "n_trees": self.n_trees,
            "search_k": self.search_k,
            "model_fingerprint": self.model_fingerprint,
            "seed": self.seed,
        }

    def exact(self) -> ExactIndex:
        """An :class:`ExactIndex` over the same vectors and items (no copy of a memory-mapped matrix)."""
        return ExactIndex.from_arrays(self.vectors, self._items, model_fingerprint=self.model_fingerprint)

    def _require_built(self, action: str) -> None:
        if not self._built:
            raise IndexMismatchError(f"call build() (or load an index) before {action}. Received: an unbuilt index of {len(self)} items")

    # -- querying

    def _candidates(self, query: np.ndarray, n: int, search_k: int) -> tuple[np.ndarray, np.ndarray]:
        effective = -1 if search_k == -1 else max(search_k, n)
        rows, distances = self._annoy.get_nns_by_vector(query, n, search_k=effective, include_distances=True)
        return np.asarray(rows, dtype=np.int64), np.asarray(distances, dtype=np.float64)

    def query(
        self,
        embedding: np.ndarray,
        k: int = 20,
        *,
        search_k: int | None = None,
        by_product: bool = True,
        rerank: bool = True,
        exclude: Iterable[str] | None = None,
    ) -> list[SearchResult]:
        """The k best images (or products, with ``by_product``) for one embedding.

        ``exclude`` is a product id or ids to leave out. With ``by_product`` or
        ``exclude``, more candidates than k are fetched (growing x4 until there
        are k usable products or the index is exhausted).
        """
        self._require_built("query")
        k = _check_positive_int("k", k)
        search_k = self.search_k if search_k is None else _check_search_k(search_k)
        query = _check_query(embedding, self.dimension)
        excluded = _exclude_set(exclude)
        count = len(self)
        n = min(count, k * 4 if (by_product or excluded) else k)
        while True:
            rows, distances = self._candidates(query, n, search_k)
            if len(rows) >= n and n < count and not _enough(rows, self._items, k, by_product, excluded):
                n = min(count, n * 4)
                continue
            break
        if rerank:
            sims = _exact_similarities(self.vectors, rows, query)
        else:
            sims = 1.0 - distances**2 / 2.0
        rows, sims = _ranked(rows, sims)
        return _collect(rows, sims, self._items, k, by_product, excluded)

    def query_batch(
        self,
        embeddings: np.ndarray,
        k: int = 20,
        *,
        search_k: int | None = None,
        by_product: bool = True,
        rerank: bool = True,
        exclude: Iterable[str] | None = None,
    ) -> list[list[SearchResult]]:
        """``query`` for each row of a [Q, D] array (Annoy has no batch lookup; answers equal single queries)."""
        self._require_built("query_batch")
        array = _check_batch(embeddings, self.dimension)
        excluded = _exclude_set(exclude)
        return [
            self.query(q, k, search_k=search_k, by_product=by_product, rerank=rerank, exclude=excluded)
            for q in array
        ]

    # -- saving and loading

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the index directory atomically (temporary folder, then rename). Returns its path."""
        self._require_built("save")
        destination = Path(directory)
        parent = destination.parent
        parent.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            if not destination.is_dir():
                raise ConfigError(f"the index destination must be a directory. Received: {destination} is a file")
            if any(destination.iterdir()) and not (destination / MANIFEST_FILE).is_file():
                raise ConfigError(
                    "refusing to replace a non-empty directory that is not an index (no manifest.json). "
                    f"Received: {destination}"
                )
        tag = uuid.uuid4().hex[:8]
        staging = parent / f".{destination.name}.tmp-{tag}"
        staging.mkdir()
        try:
            self._write_annoy(staging / ANNOY_FILE)
            self._write_vectors(staging / VECTORS_FILE)
            self._write_items(staging / ITEMS_FILE)
            self._write_manifest(staging / MANIFEST_FILE)
            _fsync_dir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = parent / f".{destination.name}.old-{tag}"
        replaced = destination.exists()
        if replaced:
            os.rename(destination, old)
        try:
            os.rename(staging, destination)
        except BaseException:
            if replaced:
                os.rename(old, destination)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(parent)
        if replaced:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved an index of %d items to %s", len(self), destination)
        return destination

    def _write_annoy(self, path: Path) -> None:
        # Annoy's save() re-maps the index from the file it wrote; unlinking or
        # renaming that file later is safe on POSIX (the mapping keeps the inode).
        if not self._annoy.save(str(path)):
            raise DataError(f"Annoy could not save the index. Received: path={path}")
        _fsync_file(path)

    def _write_vectors(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, np.ascontiguousarray(self.vectors, dtype=np.float32))
            handle.flush()
            os.fsync(handle.fileno())

    def _write_items(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            for row, item in enumerate(self._items):
                record = {"row": row, "product_id": item.product_id, "image_path": item.image_path, "category": item.category}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _write_manifest(self, path: Path) -> None:
        from street2shop import __version__

        manifest = {
            "format_version": FORMAT_VERSION,
            "dimension": self.dimension,
            "metric": self.metric,
            "n_trees": self.n_trees,
            "search_k": self.search_k,
            "seed": self.seed,
            "count": len(self),
            "model_fingerprint": self.model_fingerprint,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "package_version": __version__,
            "files": {"annoy": ANNOY_FILE, "vectors": VECTORS_FILE, "items": ITEMS_FILE},
        }
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())

    @staticmethod
    def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
        """The manifest of an index directory, checked for format version and required keys."""
        root = Path(directory)
        if not root.is_dir():
            raise DataError(f"index directory not found. Received: {root}")
        path = root / MANIFEST_FILE
        if not path.is_file():
            raise DataError(f"not an index directory: it has no {MANIFEST_FILE}. Received: {root}")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"the index manifest must be valid JSON. Received: {path}: {exc}") from exc
        if not isinstance(manifest, dict):
            raise DataError(f"the index manifest must be a JSON object. Received: {type(manifest).__name__} in {path}")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"unknown index format version (this street2shop reads version {FORMAT_VERSION}). "
                f"Received: format_version={version!r} in {path}"
            )
        required = ("dimension", "metric", "n_trees", "count", "model_fingerprint")
        missing = [key for key in required if key not in manifest]
        if missing:
            raise DataError(f"the index manifest lacks required keys. Received: missing {missing} in {path}")
        return manifest

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        expected_fingerprint: str | None = None,
        expected_dimension: int | None = None,
    ) -> CatalogIndex:
        """Open a saved index, memory-mapped. Refuses one from another model or of another dimension."""
        root = Path(directory)
        manifest = cls.read_manifest(root)
        dimension = manifest["dimension"]
        fingerprint = manifest["model_fingerprint"]
        if expected_dimension is not None and dimension != expected_dimension:
            raise IndexMismatchError(
                f"the index holds embeddings of dimension {dimension} but the model gives {expected_dimension}. "
                f"Received: index dimension={dimension}, expected_dimension={expected_dimension} ({root})"
            )
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            raise IndexMismatchError(
                f"the index was built with model {fingerprint!r} but the embeddings come from model {expected_fingerprint!r}; "
                f"re-embed the catalogue. Received: index fingerprint={fingerprint!r}, expected_fingerprint={expected_fingerprint!r} ({root})"
            )
        files = manifest.get("files", {})
        paths = {name: root / files.get(name, default) for name, default in (("annoy", ANNOY_FILE), ("vectors", VECTORS_FILE), ("items", ITEMS_FILE))}
        for name, path in paths.items():
            if not path.is_file():
                raise DataError(f"the index directory is missing its {name} file. Received: {path} does not exist")
        try:
            index = cls(
                dimension,
                metric=manifest["metric"],
                n_trees=manifest["n_trees"],
                search_k=manifest.get("search_k", DEFAULT_SEARCH_K),
                model_fingerprint=fingerprint,
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
        try:
            vectors = np.load(paths["vectors"], mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"the vectors file must be a .npy array. Received: {paths['vectors']}: {exc}") from exc
        if vectors.shape != (count, dimension) or vectors.dtype != np.float32:
            raise DataError(
                f"the vectors file must be float32 [{count}, {dimension}]. Received: {vectors.dtype} {vectors.shape} in {paths['vectors']}"
            )
        index._items = _read_items(paths["items"], count)
        index._vectors = vectors
        index._built = True
        logger.info("loaded an index of %d items from %s", count, root)
        return index


def _read_items(path: Path, count: int) -> list[Item]:
    items: list[Item] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                row, product_id = record["row"], record["product_id"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"each item line must be a JSON object with row and product_id. Received: line {line_number} of {path}") from exc
            if row != len(items):
                raise DataError(f"item rows must be 0, 1, 2, ... in order. Received: row={row!r} on line {line_number} of {path}")
            items.append(Item(str(product_id), str(record.get("image_path") or ""), record.get("category")))
    if len(items) != count:
        raise DataError(f"the item table must have {count} rows. Received: {len(items)} in {path}")
    return items


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


__all__ = [
    "CatalogIndex",
    "ExactIndex",
    "Item",
    "SearchResult",
    "FORMAT_VERSION",
    "DEFAULT_N_TREES",
    "DEFAULT_SEARCH_K",
]
