"""The catalogue index: one search interface, the one ranking rule, exact and Annoy search.

- :mod:`~street2shop.index.ranking`: cosine similarity, ties by row, each
  product once at its best image, for every ranking in street2shop;
- :mod:`~street2shop.index.base`: :class:`Item`, :class:`SearchResult`, the
  :class:`SearchIndex` interface and the folder format;
- :class:`ExactIndex` (NumPy) and :class:`CatalogIndex` (Annoy);
- :func:`load_index` opens a saved index of either kind;
  :func:`~street2shop.index.build.build_index` builds one from embeddings.
"""

from __future__ import annotations

import os

from street2shop.index.annoy_index import DEFAULT_N_TREES, DEFAULT_SEARCH_K, CatalogIndex
from street2shop.index.base import FORMAT_VERSION, Item, SearchIndex, SearchResult, read_manifest
from street2shop.index.exact import ExactIndex


def load_index(
    directory: str | os.PathLike[str],
    *,
    expected_fingerprint: str | None = None,
    expected_dimension: int | None = None,
) -> SearchIndex:
    """Opens a saved index of either kind (memory-mapped), refusing one of another model or dimension."""
    kind = read_manifest(directory).get("kind", "annoy")
    opener = ExactIndex if kind == "exact" else CatalogIndex
    return opener.load(directory, expected_fingerprint=expected_fingerprint, expected_dimension=expected_dimension)


__all__ = [
    "CatalogIndex",
    "DEFAULT_N_TREES",
    "DEFAULT_SEARCH_K",
    "ExactIndex",
    "FORMAT_VERSION",
    "Item",
    "SearchIndex",
    "SearchResult",
    "load_index",
    "read_manifest",
]
