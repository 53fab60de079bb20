"""The catalogue index: one search interface, the one ranking rule, exact and Annoy search.

- :mod:`~street2shop.index.ranking`: cosine similarity, ties by row, each
  product once at its best image, for every ranking in street2shop;
- :mod:`~street2shop.index.base`: the :class:`SearchIndex` interface and its
  :class:`SearchResult` (items: :class:`~street2shop.items.Item`);
- :mod:`~street2shop.index.local`: what the indexes held in this process
  share, saved in the folder format of :mod:`~street2shop.index.folder`;
- :class:`ExactIndex` (NumPy), :class:`CatalogIndex` (Annoy) and
  :class:`LayeredIndex` (a base, a delta and tombstones);
- :func:`load_index` opens a saved index of either kind (a folder, or the
  newest version under an index base), or a Milvus index (``milvus:URI#NAME``:
  :mod:`~street2shop.index.milvus`, written by
  :mod:`~street2shop.index.milvus_write`); :func:`publish_index` writes the
  next version (:mod:`~street2shop.index.versions`);
  :func:`~street2shop.index.build.build_index` builds one from embeddings;
  :func:`index_source` is what the search service follows (new versions, or
  where the alias moves).
"""

from __future__ import annotations

import os
from typing import Any

from street2shop.index.annoy_index import DEFAULT_N_TREES, DEFAULT_SEARCH_K, CatalogIndex
from street2shop.index.base import SearchIndex, SearchResult
from street2shop.index.exact import ExactIndex
from street2shop.index.folder import FORMAT_VERSION, read_index_manifest
from street2shop.index.layered import LayeredIndex
from street2shop.index.local import LocalIndex
from street2shop.index.versions import FolderVersions, index_versions, publish_index, resolve_index
from street2shop.items import Item

KINDS = {"annoy": CatalogIndex, "exact": ExactIndex, "layered": LayeredIndex}


def load_index(
    path: str | os.PathLike[str],
    *,
    expected_fingerprint: str | None = None,
    expected_dimension: int | None = None,
) -> SearchIndex:
    """Opens a saved index of either kind (memory-mapped): an index folder, or the newest version under an index base;
    or the live version of a Milvus index (``milvus:URI#NAME``).

    Refuses one of another model or dimension.
    """
    from street2shop.index.milvus import is_milvus

    if is_milvus(path):
        from street2shop.index.milvus import MilvusIndex

        return MilvusIndex.open(str(path), expected_fingerprint=expected_fingerprint, expected_dimension=expected_dimension)
    folder = resolve_index(path)
    kind = read_index_manifest(folder).get("kind", "annoy")
    if kind not in KINDS:
        from street2shop.errors import DataError

        raise DataError(f"{folder} holds an index of an unknown kind (this street2shop reads {', '.join(KINDS)}). Received: kind={kind!r}")
    index = KINDS[kind].load(folder, expected_fingerprint=expected_fingerprint, expected_dimension=expected_dimension)
    index.version = int(folder.name) if folder.name.isdigit() else None
    return index


def index_source(spec: str | os.PathLike[str]) -> Any:
    """What the search service follows for ``spec``: the numbered versions under an index base, or a Milvus index's alias.

    Both answer ``candidates(current_version)`` (the versions to swap to, best
    first), ``load(ref)``, ``refresh(index)`` and ``describe()``.
    """
    from street2shop.index.milvus import is_milvus

    if is_milvus(spec):
        from street2shop.index.milvus import AliasVersions

        return AliasVersions(str(spec))
    return FolderVersions(spec)


__all__ = [
    "CatalogIndex",
    "DEFAULT_N_TREES",
    "DEFAULT_SEARCH_K",
    "ExactIndex",
    "LayeredIndex",
    "LocalIndex",
    "FORMAT_VERSION",
    "Item",
    "SearchIndex",
    "SearchResult",
    "index_source",
    "index_versions",
    "load_index",
    "publish_index",
    "read_index_manifest",
    "resolve_index",
]
