"""The embeddings folder: vectors, their item table and the model that made them.

What ``street2shop embed`` writes (and its Beam twin), and ``street2shop index
build`` reads:

- ``embeddings.npy``: float32 ``[N, D]``, unit rows;
- ``items.jsonl``: one JSON object per row: ``product_id``, ``image_path``,
  ``category`` and ``labels`` (the manifest's other columns);
- ``embed.json``: the model (``fingerprint``, ``version``, ``dimension``), the
  count embedded, and the images skipped with their reasons.

Files are replaced atomically (written beside, then renamed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from street2shop.contract import ModelIdentity
from street2shop.errors import DataError, ModelMismatchError
from street2shop.fileio import write_atomic


def item_of(record: Any) -> dict[str, Any]:
    """A record as a line of the item table: product, image, category, and its other manifest columns."""
    item: dict[str, Any] = {"product_id": record.product_id, "image_path": record.image_path, "category": record.category}
    if record.metadata:
        item["labels"] = dict(record.metadata)
    return item


def write_embeddings(out: str | os.PathLike[str], vectors: np.ndarray, items: Sequence[Mapping[str, Any]],
                     identity: ModelIdentity, skipped: Mapping[str, str]) -> None:
    """Writes (or replaces) the three files of an embeddings folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".embeddings.tmp.npy"
    np.save(tmp, np.asarray(vectors, np.float32))
    os.replace(tmp, out / "embeddings.npy")
    write_atomic(out / "items.jsonl", "".join(json.dumps(dict(item), ensure_ascii=False) + "\n" for item in items))
    summary = {**identity.to_dict(), "embedded": len(items), "skipped": dict(skipped)}
    write_atomic(out / "embed.json", json.dumps(summary, indent=2))


def load_embeddings(out_dir: str | os.PathLike[str]) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """Reads ``embeddings.npy``, ``items.jsonl`` and ``embed.json`` of a finished run."""
    out = Path(out_dir)
    try:
        embeddings = np.load(out / "embeddings.npy")
        items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines() if line.strip()]
        summary = json.loads((out / "embed.json").read_text())
    except FileNotFoundError as e:
        raise DataError(f"{out} is not a finished embedding run: missing {Path(e.filename).name}") from None
    if len(items) != len(embeddings):
        raise DataError(f"{out}: {len(items)} items but {len(embeddings)} embeddings")
    return embeddings, items, summary


def read_embedding_sets(folders: Sequence[str | os.PathLike[str]]) -> tuple[np.ndarray, list[dict[str, Any]], ModelIdentity]:
    """The vectors and item rows of one or more embeddings folders, which must all come from one model.

    Raises:
        DataError: a folder is not a finished embedding run, or records no model.
        ModelMismatchError: two folders come from different models.
    """
    if not folders:
        raise DataError("give at least one folder of embeddings (the --out of `street2shop embed`). Received: none")
    vectors, items = [], []
    identity: ModelIdentity | None = None
    first = None
    for folder in folders:
        embeddings, rows, summary = load_embeddings(folder)
        found = ModelIdentity.from_dict(summary)
        if found is None:
            raise DataError(
                f"{folder} does not record which model made its vectors (embedded by an older street2shop): "
                f"embed the catalogue again. Received: fingerprint={summary.get('fingerprint')!r}"
            )
        if identity is not None and not identity.same_model(found):
            raise ModelMismatchError(
                f"{folder} holds vectors of {found} but {first} holds vectors of {identity}; an index holds one model's "
                f"vectors only. Received: two models"
            )
        identity, first = identity or found, first or folder
        vectors.append(embeddings)
        items += rows
    assert identity is not None
    return np.concatenate(vectors) if len(vectors) > 1 else vectors[0], items, identity
