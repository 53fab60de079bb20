"""``street2shop index build``: an index from the output folders of ``street2shop embed``, published as the next version of an index base."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from street2shop.embeddings import read_embedding_sets
from street2shop.errors import DataError
from street2shop.index.local import LocalIndex
from street2shop.index.versions import publish_index
from street2shop.items import Item

logger = logging.getLogger(__name__)

KINDS = ("annoy", "exact")


def build_index(
    embeddings: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    kind: str = "annoy",
    n_trees: int | None = None,
    search_k: int | None = None,
) -> dict[str, Any]:
    """Builds an index over embedding folders and publishes it as the next version under ``out`` (an index base).

    Returns what was built: its folder, version, count and settings.
    """
    from street2shop.index.annoy_index import CatalogIndex
    from street2shop.index.exact import ExactIndex
    from street2shop.errors import ConfigError

    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}. Received: kind={kind!r}")
    vectors, rows, identity = read_embedding_sets(embeddings)
    items = [Item.from_dict(row) for row in rows]
    if not items:
        raise DataError(f"no embedded image in {', '.join(map(str, embeddings))}: nothing to index. Received: 0 items")
    index: LocalIndex
    if kind == "exact":
        index = ExactIndex(vectors.shape[1], model_fingerprint=identity.fingerprint, model_version=identity.version)
    else:
        settings = {k: v for k, v in (("n_trees", n_trees), ("search_k", search_k)) if v is not None}
        index = CatalogIndex(vectors.shape[1], model_fingerprint=identity.fingerprint, model_version=identity.version, **settings)
    index.add(vectors, items)
    index.build()
    path = publish_index(index, out)
    return {"index": str(path), "version": index.version, "kind": kind, "count": len(index), **index.config()}
