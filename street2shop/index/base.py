"""The one search interface every catalogue index implements, wherever its vectors live, and its input checks.

:class:`SearchIndex` is the query API: ``query`` and ``query_batch`` return
:class:`SearchResult` lists ranked by :mod:`street2shop.index.ranking`,
``rank_images`` gives evaluation its rankings, ``identity`` names the model
that made the vectors. It assumes nothing about where the vectors are kept:
the indexes held in this process and saved as index folders
(:class:`~street2shop.index.local.LocalIndex`: exact, Annoy, layered; the
folder format is :mod:`street2shop.index.folder`) implement it, and so can
one kept in a vector database.

The checks here run before any backend sees a query: its shape and
dimension, finite and non-zero, ``k`` at least 1, one category per query.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from street2shop.contract import ModelIdentity, check_same_model
from street2shop.errors import ConfigError, DataError, IndexMismatchError, check_positive_int
from street2shop.index import ranking
from street2shop.items import Item, image_id

logger = logging.getLogger(__name__)

__all__ = ["Item", "SearchIndex", "SearchResult", "check_batch", "check_embeddings", "check_positive_int", "check_query", "image_id"]

_NORM_TOLERANCE = 1e-3
_ZERO_NORM = 1e-12


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """One answer of a query.

    Args:
        rank: int, 1 for the best answer.
        product_id: str, the product of the matched image.
        similarity: float, cosine similarity between the query and the image, in [-1, 1].
        row: int, the image's row in the index (0-based, in the order added).
        image_path: str, the matched image's path as given to ``add``.
        category: str | None, the image's category.
        labels: mapping, the image's labels (the manifest's other columns).
        domain: str, what the matched image is: ``"shop"`` (a catalogue photo) or ``"street"`` (a customer
            photo indexed as a reference of the product; :func:`street2shop.items.catalogue_photos` gives the
            product's catalogue photo to show instead).

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
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    domain: str = "shop"


def _result(*, rank: int, item: Item, row: int, similarity: float) -> SearchResult:
    return SearchResult(rank, item.product_id, similarity, row, item.image_path, item.category, item.labels, item.domain)


# ----------------------------------------------------------------------------- checks



def check_embeddings(embeddings: Any, items: Sequence[Item], dimension: int) -> np.ndarray:
    """Embeddings to add, as float32 unit rows (normalised here with a warning if they are not)."""
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise IndexMismatchError(f"embeddings must be a 2-D array [N, {dimension}]. Received: shape={array.shape}")
    if array.shape[1] != dimension:
        raise IndexMismatchError(f"embeddings must have the index dimension {dimension}. Received: shape={array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"embeddings must be real numbers. Received: dtype={array.dtype}")
    if len(items) != array.shape[0]:
        raise DataError(f"there must be one item per embedding row. Received: {array.shape[0]} rows and {len(items)} items")
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
        raise DataError(f"embeddings must be non-zero (a zero vector has no direction). Received: zero rows {np.flatnonzero(zero)[:10].tolist()}")
    off = np.abs(norms - 1.0) > _NORM_TOLERANCE
    if off.any():
        logger.warning(
            "%d of %d embeddings are not unit length (norms from %.4g to %.4g); L2-normalising them",
            int(off.sum()), len(norms), float(norms.min()), float(norms.max()),
        )
    return (vectors / norms[:, None]).astype(np.float32)


def check_query(embedding: Any, dimension: int) -> np.ndarray:
    array = np.asarray(embedding)
    if array.ndim != 1 or array.shape[0] != dimension:
        raise IndexMismatchError(f"a query must be a 1-D vector of the index dimension {dimension}. Received: shape={array.shape}")
    vector = array.astype(np.float64)
    if not np.isfinite(vector).all():
        raise DataError("a query embedding must be finite. Received: NaN or inf")
    norm = float(np.linalg.norm(vector))
    if norm < _ZERO_NORM:
        raise DataError("a query embedding must be non-zero. Received: a zero vector")
    if abs(norm - 1.0) > _NORM_TOLERANCE:
        logger.debug("query norm %.4g; L2-normalising it", norm)
    return (vector / norm).astype(np.float32)


def check_batch(embeddings: Any, dimension: int) -> np.ndarray:
    array = np.asarray(embeddings)
    if array.ndim != 2 or array.shape[1] != dimension:
        raise IndexMismatchError(f"query_batch needs a 2-D array [Q, {dimension}]. Received: shape={array.shape}")
    return array


def _categories(categories: Sequence[str | None] | None, count: int) -> list[str | None]:
    if categories is None:
        return [None] * count
    categories = list(categories)
    if len(categories) != count:
        raise ConfigError(f"give one category (or None) per query. Received: {len(categories)} for {count} queries")
    return categories


# ----------------------------------------------------------------------------- the search interface


class SearchIndex:
    """The one search interface: what every catalogue index answers, wherever its vectors are kept.

    ``query(embedding, k, by_product=True, category=None, exclude=None)``
    returns the k best :class:`SearchResult` (products, each at its best
    image, with ``by_product``), ranked by :mod:`street2shop.index.ranking`;
    ``query_batch`` does it for each row of a matrix; ``category`` keeps only
    items of that category (an exact search over them); ``exclude`` drops
    product ids; ``rank_images`` is the image ranking evaluation scores.
    ``identity`` is the model that made the vectors, ``version`` the index
    version it was published as (None if not numbered).

    A backend checks nothing itself: the arguments arrive checked (a unit
    float32 query of the index's dimension, ``k`` >= 1, excluded product ids
    as a set). It provides ``__len__``, ``items``, ``image_item``, ``catalogue_photos``, and the
    searches ``_search`` (the whole catalogue) and ``_search_category``; it
    may answer several queries at once in ``_search_many``, and list its
    ``categories`` without reading every item.
    """

    kind = "base"
    dimension: int
    model_fingerprint: str | None
    model_version: int | None

    def __init__(self, dimension: int, *, model_fingerprint: str | None = None, model_version: int | None = None) -> None:
        self.dimension = check_positive_int("dimension", dimension)
        if model_fingerprint is not None and not isinstance(model_fingerprint, str):
            raise ConfigError(f"model_fingerprint must be a string or None. Received: model_fingerprint={model_fingerprint!r}")
        self.model_fingerprint = model_fingerprint
        self.model_version = None if model_version is None else int(model_version)
        self.version: int | None = None  # the index version it was loaded from or published as, if numbered

    # -- what a backend provides

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def items(self) -> Sequence[Item]:
        """The item of every row, in row order."""
        raise NotImplementedError

    def image_item(self, image_id: str) -> Item | None:
        """The item of the image with this :attr:`Item.image_id` (its catalogue photo's if it is both), or None if the index has none."""
        raise NotImplementedError

    def image_path(self, image_id: str) -> str | None:
        """The path of the image with this :attr:`Item.image_id`, or None if the index has none."""
        item = self.image_item(image_id)
        return (item.image_path or None) if item is not None else None

    def catalogue_photos(self, product_ids: Iterable[str]) -> dict[str, Item]:
        """The catalogue photo of each of these products that has one (:func:`street2shop.items.catalogue_photos`: the image a
        person is shown, even when a search matched a customer photo); a backend looks up only these products."""
        raise NotImplementedError

    def categories(self) -> list[str]:
        """The categories of the catalogue's items, sorted (what a category filter can ask for; a backend may know them without reading every item)."""
        return sorted({item.category for item in self.items if item.category})

    def _search(self, query: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], search_k: int | None, rerank: bool) -> list[SearchResult]:
        """The k best answers over the whole catalogue."""
        raise NotImplementedError

    def _search_category(self, query: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], category: str) -> list[SearchResult]:
        """The k best answers among the items of ``category`` (exactly: every item of it is compared)."""
        raise NotImplementedError

    def _search_many(self, queries: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], search_k: int | None, rerank: bool) -> list[list[SearchResult]]:
        """``_search`` for each of several checked queries (a backend may do them together)."""
        return [self._search(q, k, by_product, excluded, search_k, rerank) for q in queries]

    def _require_ready(self, action: str) -> None:
        """A backend refuses queries before it can answer (an unbuilt Annoy forest)."""

    def config(self) -> dict[str, Any]:
        """What the index is: its dimension, its model, and the backend's own settings."""
        return {"dimension": self.dimension, "model_fingerprint": self.model_fingerprint, "model_version": self.model_version}

    # -- identity

    @property
    def identity(self) -> ModelIdentity | None:
        """The model that made the vectors (None for an index built without one)."""
        if not self.model_fingerprint:
            return None
        return ModelIdentity(self.model_fingerprint, self.model_version, self.dimension)

    def check_model(self, identity: ModelIdentity | None, what: str = "the embedder") -> None:
        """Refuses query vectors of another model than this index's (ModelMismatchError)."""
        if self.identity is None:
            raise IndexMismatchError(
                "this index does not record which model made its vectors (built by an older street2shop, or without a "
                "fingerprint), so vectors of any model would be compared with it: build it again from `street2shop embed` "
                "output. Received: model_fingerprint=None"
            )
        check_same_model(self.identity, identity, what)

    # -- querying

    def query(
        self,
        embedding: np.ndarray,
        k: int = 20,
        *,
        search_k: int | None = None,
        by_product: bool = True,
        rerank: bool = True,
        exclude: Iterable[str] | None = None,
        category: str | None = None,
    ) -> list[SearchResult]:
        """The k best images (or products, with ``by_product``) for one embedding.

        ``category`` keeps only items of that category; ``exclude`` is a
        product id or ids to leave out. ``search_k`` and ``rerank`` tune the
        Annoy index and are ignored by the exact one.
        """
        self._require_ready("query")
        k = check_positive_int("k", k)
        query = check_query(embedding, self.dimension)
        excluded = ranking.exclude_set(exclude)
        if len(self) == 0:
            return []
        if category is not None:
            return self._search_category(query, k, by_product, excluded, category)
        return self._search(query, k, by_product, excluded, search_k, rerank)

    def query_batch(
        self,
        embeddings: np.ndarray,
        k: int = 20,
        *,
        search_k: int | None = None,
        by_product: bool = True,
        rerank: bool = True,
        exclude: Iterable[str] | None = None,
        categories: Sequence[str | None] | None = None,
    ) -> list[list[SearchResult]]:
        """``query`` for each row of a ``[Q, D]`` array (with one category or None per row); the same answers."""
        self._require_ready("query_batch")
        array = check_batch(embeddings, self.dimension)
        excluded = ranking.exclude_set(exclude)
        categories = _categories(categories, len(array))
        if any(c is not None for c in categories):
            return [
                self.query(q, k, search_k=search_k, by_product=by_product, rerank=rerank, exclude=excluded, category=c)
                for q, c in zip(array, categories)
            ]
        k = check_positive_int("k", k)
        if len(self) == 0 or len(array) == 0:
            return [[] for _ in range(len(array))]
        queries = np.stack([check_query(q, self.dimension) for q in array])
        return self._search_many(queries, k, by_product, excluded, search_k, rerank)

    def rank_images(self, embeddings: np.ndarray, depth: int, *, categories: Sequence[str | None] | None = None,
                    with_similarities: bool = False) -> list[Any]:
        """Each query's image ranking (rows, best first), ``depth`` images deep: what evaluation scores.

        With ``with_similarities``, each is a pair ``(rows, similarities)``.
        """
        depth = max(1, min(int(depth), len(self))) if len(self) else 1
        answers = self.query_batch(np.asarray(embeddings, np.float32), k=depth, by_product=False, categories=categories)
        rows = [np.asarray([a.row for a in results], np.int64) for results in answers]
        if not with_similarities:
            return rows
        return [(r, np.asarray([a.similarity for a in results], np.float64)) for r, results in zip(rows, answers)]
