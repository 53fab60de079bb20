"""The index folder: how an index held in this process is stored on disk, written and read back.

An index folder holds:

``vectors.npy``
    The unit vectors, float32 ``[count, dimension]``, loaded with
    ``np.load(mmap_mode="r")`` so processes that load the same folder share
    one copy through the page cache. Exact re-ranking and exact search read it.
``items.jsonl``
    The item table (:mod:`street2shop.items`), its rows numbered.
``annoy.ann``
    Annoy's forest, for :class:`~street2shop.index.annoy_index.CatalogIndex` only.
``manifest.json``
    ``format_version``, ``kind`` (``annoy``, ``exact`` or ``layered``),
    ``dimension``, ``metric``, ``count``, ``model_fingerprint``,
    ``model_version``, ``created_at`` (UTC, ISO 8601), ``package_version``,
    the file names (``files``, by role) and the kind's own settings. Written
    last: a folder with a manifest is complete.

A folder is written whole into a staging folder and renamed into place
(:func:`street2shop.fileio.staged_folder`): by ``save`` (an index there is
replaced) and as the next numbered version (:mod:`street2shop.index.versions`),
so a crash never leaves a half index where a good one was.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from street2shop.errors import ConfigError, DataError, IndexMismatchError
from street2shop.items import ITEMS_FILE, Item, item_lines, read_items

FORMAT_VERSION = 1
VECTORS_FILE = "vectors.npy"
MANIFEST_FILE = "manifest.json"

__all__ = [
    "FORMAT_VERSION", "ITEMS_FILE", "MANIFEST_FILE", "VECTORS_FILE", "check_replaceable", "load_vectors", "open_index_folder",
    "read_index_items", "read_index_manifest", "write_items", "write_manifest", "write_vectors",
]


# ----------------------------------------------------------------------------- writing


def check_replaceable(destination: Path) -> Path:
    """``destination``, if an index may be saved there: nothing, an empty folder, or an index folder (which is replaced)."""
    if destination.exists():
        if not destination.is_dir():
            raise ConfigError(f"the index destination must be a directory. Received: {destination} is a file")
        if any(destination.iterdir()) and not (destination / MANIFEST_FILE).is_file():
            raise ConfigError(f"refusing to replace a non-empty directory that is not an index (no manifest.json). Received: {destination}")
    return destination


def write_vectors(path: Path, vectors: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(vectors, dtype=np.float32))


def write_items(path: Path, items: Iterable[Item]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(item_lines(items, numbered=True))


def write_manifest(path: Path, kind: str, config: Mapping[str, Any], count: int, files: Mapping[str, str]) -> None:
    """The manifest of an index of ``kind`` (its ``config`` and ``count``) whose files are ``files`` (role → name)."""
    from street2shop import __version__

    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        **config,
        "count": count,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
        "files": dict(files),
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
        handle.write("\n")


# ----------------------------------------------------------------------------- reading


def read_index_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``manifest.json`` of an index folder, checked for format version and required keys."""
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
        raise DataError(f"unknown index format version (this street2shop reads version {FORMAT_VERSION}). Received: format_version={version!r} in {path}")
    required = ("dimension", "count", "model_fingerprint")
    missing = [key for key in required if key not in manifest]
    if missing:
        raise DataError(f"the index manifest lacks required keys. Received: missing {missing} in {path}")
    return manifest


def open_index_folder(
    directory: str | os.PathLike[str], kind: str, files: Mapping[str, str], expected_fingerprint: str | None, expected_dimension: int | None
) -> tuple[Path, dict[str, Any], dict[str, Path]]:
    """An index folder of ``kind``, checked: its root, its manifest, and the paths of its ``files`` (role → default name).

    Raises:
        DataError: not an index folder, another kind, a file missing.
        IndexMismatchError, ModelMismatchError: another dimension or model than expected.
    """
    root = Path(directory)
    manifest = read_index_manifest(root)
    found = manifest.get("kind", "annoy")
    if found != kind:
        raise DataError(f"{root} holds an index of kind {found!r}, not {kind!r}; open it with load_index. Received: kind={found!r}")
    _check_expected(manifest, root, expected_fingerprint, expected_dimension)
    return root, manifest, _file_paths(manifest, root, files)


def _check_expected(manifest: Mapping[str, Any], root: Path, expected_fingerprint: str | None, expected_dimension: int | None) -> None:
    dimension, fingerprint = manifest["dimension"], manifest["model_fingerprint"]
    if expected_dimension is not None and dimension != expected_dimension:
        raise IndexMismatchError(
            f"the index holds embeddings of dimension {dimension} but the model gives {expected_dimension}. "
            f"Received: index dimension={dimension}, expected_dimension={expected_dimension} ({root})"
        )
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        from street2shop.errors import ModelMismatchError

        raise ModelMismatchError(
            f"the index was built with model {fingerprint!r} but the embeddings come from model {expected_fingerprint!r}; "
            f"re-embed the catalogue. Received: index fingerprint={fingerprint!r}, expected_fingerprint={expected_fingerprint!r} ({root})"
        )


def _file_paths(manifest: Mapping[str, Any], root: Path, defaults: Mapping[str, str]) -> dict[str, Path]:
    files = manifest.get("files", {})
    paths = {name: root / files.get(name, default) for name, default in defaults.items()}
    for name, path in paths.items():
        if not path.is_file():
            raise DataError(f"the index directory is missing its {name} file. Received: {path} does not exist")
    return paths


def load_vectors(path: Path, count: int, dimension: int) -> np.ndarray:
    """``vectors.npy``, memory-mapped, checked to be float32 ``[count, dimension]``."""
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"the vectors file must be a .npy array. Received: {path}: {exc}") from exc
    if vectors.shape != (count, dimension) or vectors.dtype != np.float32:
        raise DataError(f"the vectors file must be float32 [{count}, {dimension}]. Received: {vectors.dtype} {vectors.shape} in {path}")
    return vectors


def read_index_items(path: Path, count: int) -> list[Item]:
    """An index's ``items.jsonl``: ``count`` numbered rows."""
    return read_items(path, count, numbered=True)
