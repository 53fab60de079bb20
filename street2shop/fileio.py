"""Writing files and folders so that a reader never sees half of one.

Two primitives, one for each grain:

- a file: :func:`atomic_file` (or :func:`write_atomic` for data in memory)
  writes a hidden temporary file beside the destination and renames it into
  place;
- a folder: :func:`staged_folder` hands out a hidden temporary folder beside
  the destination, flushes everything written into it to the disk, and
  renames it into place, so a folder appears whole or not at all. Index
  folders, index versions and export versions are all published this way.

A failure (an exception, Ctrl-C) removes the temporary file or folder and
leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w", **open_args: Any) -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path`` for writing; renamed to ``path`` when the block ends (the folder is made if needed).

    ``mode`` is ``"w"`` or ``"wb"``; ``open_args`` go to :func:`open` (a text file is UTF-8 unless told).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if "b" not in mode:
        open_args.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **open_args) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Writes ``data`` beside ``path`` and renames it into place (the folder is made if needed)."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)
    return Path(path)


@contextlib.contextmanager
def staged_folder(destination: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """A new, empty hidden folder beside ``destination`` to write into; it becomes ``destination`` when the block ends.

    At the end of the block every file and folder written into it is flushed
    to the disk, then it is renamed to ``destination`` in one step. If the
    block raises, the folder is removed and ``destination`` is untouched.

    Args:
        destination: the folder to publish (its parent is made if needed).
        replace: without it an existing ``destination`` is never touched
            (published versions are never overwritten); with it, the old
            folder is renamed aside first and deleted once the new one is in,
            so a crash leaves one or the other.

    Raises:
        FileExistsError: ``destination`` exists and ``replace`` is false
            (checked again at the rename: another writer may take it meanwhile).
    """
    destination = Path(destination)
    parent = destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = f"{destination.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = parent / f".tmp-{tag}"
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        if replace:
            _replace_folder(staging, destination, parent / f".old-{tag}")
        else:
            _rename_new(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(parent)


def _rename_new(staging: Path, destination: Path) -> None:
    if destination.exists():
        raise FileExistsError(f"{destination} already exists")
    try:
        os.rename(staging, destination)  # fails on a non-empty folder that appeared meanwhile
    except OSError as e:
        if destination.exists():
            raise FileExistsError(f"{destination} already exists") from e
        raise


def _replace_folder(staging: Path, destination: Path, old: Path) -> None:
    replaced = destination.exists()
    if replaced:
        os.rename(destination, old)
    try:
        os.rename(staging, destination)
    except BaseException:
        if replaced:
            os.rename(old, destination)
        raise
    if replaced:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flushes every file under ``root``, then every folder's entries, to the disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(folder)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flushes a written file to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flushes a folder's entries (a rename into it) to the disk, where the platform allows."""
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
