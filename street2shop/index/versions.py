"""Numbered index versions under an index base (``INDEX_BASE/<n>/``), laid out like TF Serving's model versions.

``index build --out INDEX_BASE`` writes the next version into a hidden
temporary folder and renames it into place (:func:`publish_index`), so a half
written version is never visible; readers take the newest complete one
(:func:`resolve_index`), and the search service watches the base and swaps to a
new version between requests. A version is complete when its ``manifest.json``
(written last) is there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from street2shop import contract
from street2shop.errors import DataError
from street2shop.index.folder import MANIFEST_FILE
from street2shop.index.local import LocalIndex

logger = logging.getLogger(__name__)


def is_complete(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


def index_versions(base: str | os.PathLike[str]) -> dict[int, Path]:
    """``{version: folder}`` of the complete versions under an index base (``{}`` if none)."""
    return contract.numbered_folders(base, is_complete)


def resolve_index(path: str | os.PathLike[str]) -> Path:
    """An index folder: ``path`` itself if it is one, else the newest complete version under the base ``path``.

    Raises:
        DataError: neither (the message says what the folder holds).
    """
    path = Path(path)
    if is_complete(path):
        return path
    if not path.is_dir():
        raise DataError(f"index directory not found. Received: {path}")
    versions = index_versions(path)
    if not versions:
        entries = sorted(p.name for p in path.iterdir())[:10]
        raise DataError(
            f"not an index: {path} has no manifest.json and no complete numbered version (1/, 2/, ...) "
            f"(build one with `street2shop index build ... --out {path}`). Received: entries {entries}"
        )
    return versions[max(versions)]


class FolderVersions:
    """The numbered versions under an index base, as the search service follows them: a newer complete one replaces the current one.

    (The service follows a Milvus index's alias the same way: :class:`street2shop.index.milvus.AliasVersions`.)
    """

    def __init__(self, base: str | os.PathLike[str]) -> None:
        self.base = Path(base)

    def describe(self) -> str:
        return str(self.base)

    def candidates(self, current: int | None) -> list[tuple[int, Path]]:
        """``[(version, folder)]`` of the complete versions newer than ``current``, newest first (OSError if the base cannot be listed)."""
        versions = index_versions(self.base)
        return [(v, versions[v]) for v in sorted(versions, reverse=True) if v > (current or 0)]

    def waiting(self) -> str:
        return f"no complete index version under {self.base} yet"

    def load(self, folder: Path) -> Any:
        from street2shop.index import load_index

        return load_index(folder)

    def refresh(self, index: Any) -> None:
        """A published version never changes: nothing to read again."""


def publish_index(index: LocalIndex, base: str | os.PathLike[str]) -> Path:
    """Writes ``index`` as the next version under ``base`` (atomically: staging folder, then rename); returns its folder."""
    base = Path(base)
    if is_complete(base):
        raise DataError(f"{base} is an index folder itself, not an index base; give its parent or another folder. Received: {base}")
    base.mkdir(parents=True, exist_ok=True)
    for _ in range(10):  # another writer may take the number first
        version = contract.next_version(base)
        try:
            with contract.new_version(base, version) as staging:
                index.write_folder(staging)
        except FileExistsError:
            continue
        index.version, index.folder = version, base / str(version)
        logger.info("published index version %d (%d items) under %s", version, len(index), base)
        return index.folder
    raise DataError(f"could not take a version number under {base}: other writers keep taking them. Received: 10 tries")
