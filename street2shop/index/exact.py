"""Exact search: brute-force cosine with NumPy. Ground truth for the Annoy index, and fine for small catalogues."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from street2shop.index.base import SearchResult, check_embeddings
from street2shop.index.folder import ITEMS_FILE, VECTORS_FILE, load_vectors, open_index_folder, read_index_items
from street2shop.index.local import LocalIndex
from street2shop.items import Item

logger = logging.getLogger(__name__)


class ExactIndex(LocalIndex):
    """Brute-force cosine search with NumPy: ground truth for the Annoy index, and fine for small catalogues.

    The same interface as :class:`~street2shop.index.annoy_index.CatalogIndex`
    (``add`` / ``query`` / ``query_batch`` / ``save`` / ``load``); ``build``
    does nothing and ``search_k`` / ``rerank`` are accepted and ignored (the
    search is exact). Ranked by :mod:`street2shop.index.ranking`.

    Args:
        dimension: int, the embedding dimension.
        model_fingerprint: str | None, the fingerprint of the model that made the embeddings.
        model_version: int | None, that model's version.

    Example:
        >>> exact = ExactIndex(128)
        >>> exact.add(embeddings, [Item("p1"), Item("p2")])
        >>> exact.query(embeddings[0], k=1)[0].product_id
        'p1'
    """

    kind = "exact"

    def __init__(self, dimension: int, *, model_fingerprint: str | None = None, model_version: int | None = None) -> None:
        super().__init__(dimension, model_fingerprint=model_fingerprint, model_version=model_version)
        self._chunks: list[np.ndarray] = []
        self._vectors: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, vectors: np.ndarray, items: Sequence[Item], *, model_fingerprint: str | None = None, model_version: int | None = None) -> ExactIndex:
        """An exact index over vectors already checked and normalised (e.g. a loaded index's, memory-mapped)."""
        index = cls(int(vectors.shape[1]), model_fingerprint=model_fingerprint, model_version=model_version)
        index._vectors = vectors
        index._items = list(items)
        return index

    def add(self, embeddings: np.ndarray, items: Sequence[Item]) -> None:
        vectors = check_embeddings(embeddings, items, self.dimension)
        if self._vectors is not None:
            self._chunks = [np.asarray(self._vectors)]
            self._vectors = None
        self._chunks.append(vectors)
        self._items.extend(items)
        self._forget()

    def build(self) -> None:
        """Nothing to build; present so code can treat both indexes alike."""

    def exact(self) -> ExactIndex:
        """Itself: the search is exact already."""
        return self

    @property
    def vectors(self) -> np.ndarray:
        if self._vectors is None:
            if self._chunks:
                self._vectors = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
            else:
                self._vectors = np.zeros((0, self.dimension), np.float32)
            self._chunks = []
        return self._vectors

    def _search(self, query: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], search_k: int | None, rerank: bool) -> list[SearchResult]:
        return self._exact_answer(query, k, by_product, excluded)

    def _search_many(self, queries: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], search_k: int | None, rerank: bool) -> list[list[SearchResult]]:
        """One matrix product per chunk of 256 queries."""
        out: list[list[SearchResult]] = []
        for start in range(0, len(queries), 256):
            chunk = queries[start : start + 256]
            block = chunk @ self.vectors.T
            out.extend(self._exact_answer(q, k, by_product, excluded, sims32=sims) for sims, q in zip(block, chunk))
        return out

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        expected_fingerprint: str | None = None,
        expected_dimension: int | None = None,
    ) -> ExactIndex:
        """Opens a saved exact index, memory-mapped. Refuses one from another model or of another dimension."""
        root, manifest, paths = open_index_folder(directory, cls.kind, {"vectors": VECTORS_FILE, "items": ITEMS_FILE},
                                                  expected_fingerprint, expected_dimension)
        count, dimension = manifest["count"], manifest["dimension"]
        index = cls.from_arrays(
            load_vectors(paths["vectors"], count, dimension), read_index_items(paths["items"], count),
            model_fingerprint=manifest["model_fingerprint"], model_version=manifest.get("model_version"),
        )
        index.folder = root
        logger.info("loaded an exact index of %d items from %s", count, root)
        return index

    def config(self) -> dict[str, Any]:
        return {**super().config(), "metric": "angular"}
