"""The embeddings folder: vectors, their item table and the model that made them.

What ``street2shop embed`` writes (and its Beam twin), and ``street2shop index
build`` reads:

- ``embeddings.npy``: float32 ``[N, D]``, unit rows;
- ``items.jsonl``: the item table (:mod:`street2shop.items`), one line per row:
  ``product_id``, ``image_path``, ``category`` and ``labels`` (the manifest's
  other columns);
- ``embed.json``: the model (``fingerprint``, ``version``, ``dimension``), the
  count embedded, and the images skipped with their reasons.

Files are replaced atomically (written beside, then renamed).

A **sharded output** (``street2shop beam-embed``) is a folder holding
``shards.json`` and the shards it names, each an embeddings folder as above:
``shards.json`` is written last and names one run's shards only, so a reader
that goes through it (:func:`embedding_folders`, and so ``index build``) sees
one whole run, never a mix of two.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from street2shop.contract import ModelIdentity
from street2shop.errors import DataError, ModelMismatchError
from street2shop.fileio import write_atomic
from street2shop.items import ITEMS_FILE, Item, item_lines, read_items


EMBEDDINGS_FILE = "embeddings.npy"
SUMMARY_FILE = "embed.json"
SHARDS_FILE = "shards.json"
SHARDS_FORMAT_VERSION = 1


def encode_embeddings(vectors: np.ndarray, items: Sequence[Item | Mapping[str, Any]], identity: ModelIdentity | None,
                      skipped: Mapping[str, str], **extra: Any) -> dict[str, bytes]:
    """The three files of an embeddings folder as ``{name: bytes}``, for any file system.

    ``items``: an :class:`~street2shop.items.Item` (or a line of an item
    table) per row. ``identity`` None (no image embedded, so no model
    answered) records no model; ``extra`` goes into ``embed.json`` too.
    """
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(vectors, np.float32))
    model = identity.to_dict() if identity is not None else {"fingerprint": None, "version": None, "dimension": None}
    summary = {**model, "embedded": len(items), "skipped": dict(skipped), **extra}
    return {
        EMBEDDINGS_FILE: buffer.getvalue(),
        ITEMS_FILE: "".join(item_lines(items)).encode("utf-8"),
        SUMMARY_FILE: json.dumps(summary, indent=2).encode("utf-8"),
    }


def write_embeddings(out: str | os.PathLike[str], vectors: np.ndarray, items: Sequence[Item | Mapping[str, Any]],
                     identity: ModelIdentity, skipped: Mapping[str, str]) -> None:
    """Writes (or replaces) the three files of an embeddings folder, each atomically, ``embed.json`` last."""
    for name, data in encode_embeddings(vectors, items, identity, skipped).items():
        write_atomic(Path(out) / name, data)


def encode_shards(run: str, shards: Sequence[str], identity: ModelIdentity, embedded: int, skipped: int, **extra: Any) -> bytes:
    """``shards.json`` of a sharded output: the run, its shard folders (relative), the model and the counts."""
    record = {"format_version": SHARDS_FORMAT_VERSION, "run": run, "shards": list(shards), **identity.to_dict(),
              "embedded": int(embedded), "skipped": int(skipped), **extra}
    return json.dumps(record, indent=2).encode("utf-8")


def decode_shards(data: bytes | str, where: str) -> dict[str, Any]:
    """A ``shards.json`` read from ``where`` (named in errors), checked to name its shards."""
    try:
        record = json.loads(data)
    except ValueError as e:
        raise DataError(f"cannot read {where}: {e}") from None
    if not isinstance(record, dict) or not isinstance(record.get("shards"), list):
        raise DataError(f"{where} does not name its shards: expected a JSON object with a list 'shards'. Received: {str(record)[:200]}")
    return record


def read_shards(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``shards.json`` of a sharded output, or None when ``folder`` is not one."""
    path = Path(folder) / SHARDS_FILE
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return decode_shards(data, str(path))


def embedding_folders(folder: str | os.PathLike[str]) -> list[Path]:
    """The embeddings folders ``folder`` stands for: itself, or the shards its ``shards.json`` names."""
    shards = read_shards(folder)
    if shards is None:
        return [Path(folder)]
    return [Path(folder) / name for name in shards["shards"]]


def load_embeddings(out_dir: str | os.PathLike[str]) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """Reads ``embeddings.npy``, ``items.jsonl`` and ``embed.json`` of a finished run."""
    out = Path(out_dir)
    try:
        embeddings = np.load(out / EMBEDDINGS_FILE)
        items = [item.to_dict() for item in read_items(out / ITEMS_FILE)]
        summary = json.loads((out / SUMMARY_FILE).read_text())
    except FileNotFoundError as e:
        raise DataError(f"{out} is not a finished embedding run: missing {Path(e.filename).name}") from None
    if len(items) != len(embeddings):
        raise DataError(f"{out}: {len(items)} items but {len(embeddings)} embeddings")
    return embeddings, items, summary


def read_embedding_sets(folders: Sequence[str | os.PathLike[str]]) -> tuple[np.ndarray, list[dict[str, Any]], ModelIdentity]:
    """The vectors and item rows of one or more embeddings folders, which must all come from one model.

    A sharded output (``shards.json``) stands for the shards it names.

    Raises:
        DataError: a folder is not a finished embedding run, or records no model.
        ModelMismatchError: two folders come from different models.
    """
    if not folders:
        raise DataError("give at least one folder of embeddings (the --out of `street2shop embed`). Received: none")
    vectors, items = [], []
    identity: ModelIdentity | None = None
    first = None
    for folder in [shard for given in folders for shard in embedding_folders(given)]:
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
