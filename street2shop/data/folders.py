"""Class-per-folder labelled image sets: the auxiliary task of multi-task fine-tuning.

The layout is ImageNet's training set: ``root/<label>/<image>``, one folder per
class. The method fine-tunes on product pairs and, besides, on pairs and class
labels of such a generic set, which regularises the fine-tuning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from street2shop.data.image import IMAGE_EXTENSIONS
from street2shop.data.records import Record
from street2shop.errors import DataError, check_positive_int

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LabelledSet:
    """Images with a class label each, read from one folder per class.

    Each record's ``product_id`` is its class name; the class index of a
    record is the position of that name in ``classes``.

    Args:
        records: list of Record. The images, class by class, in sorted order.
        classes: list of str. The class names, sorted; index = class id.
        source: str. Where the set came from, for messages.

    Example:

    >>> labelled = read_class_folders("data/coil100/images", max_per_class=8)  # doctest: +SKIP
    >>> labelled.labels()[:3], labelled.classes[:2]  # doctest: +SKIP
    (array([0, 0, 0], dtype=int32), ['obj1', 'obj10'])
    """

    records: list[Record]
    classes: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def labels(self) -> np.ndarray:
        """Class index of each record, aligned with ``records``: int32 [len(records)]."""
        index = {name: i for i, name in enumerate(self.classes)}
        try:
            return np.fromiter((index[r.product_id] for r in self.records), dtype=np.int32, count=len(self.records))
        except KeyError as e:
            raise DataError(f"every record's product_id must be one of the classes. Received: {e.args[0]!r}") from None


def read_class_folders(
    root: str | os.PathLike[str],
    *,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    split: str = "aux",
    max_per_class: int | None = None,
    seed: int = 0,
) -> LabelledSet:
    """Reads ``root/<label>/<image>`` into a LabelledSet.

    Hidden files and folders and files of other extensions (compared without
    case) are skipped; a class folder without images is skipped and logged.
    Only the files directly in a class folder are read. The order is sorted
    and so deterministic.

    Args:
        root: str or path. The folder holding one folder per class.
        extensions: sequence of str. Image file extensions to read.
        split: str. The split of every record.
        max_per_class: int or None. Keep at most this many images per class,
            drawn at random (the same draw for the same seed and class name),
            kept in sorted order.
        seed: int. Seed of that draw.

    Returns:
        LabelledSet whose records have ``product_id=<label>``, ``domain="shop"``,
        ``split=split`` and no category.

    Raises:
        DataError: ``root`` is not a folder, has no class folders, or no class
            folder holds an image.
        ConfigError: ``max_per_class`` is below 1.
    """
    check_positive_int("max_per_class", max_per_class, allow_none=True)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"expected a folder of class folders (root/<label>/<image>). Received: {root} is not a folder")
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    folders = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
    )
    if not folders:
        raise DataError(f"expected one folder per class in {root}. Received: no class folders")

    records: list[Record] = []
    classes: list[str] = []
    empty: list[str] = []
    skipped_files = dropped = 0
    for label in folders:
        folder = root / label
        files = []
        for entry in os.scandir(folder):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            if os.path.splitext(entry.name)[1].lower() in wanted:
                files.append(entry.name)
            else:
                skipped_files += 1
        if not files:
            empty.append(label)
            continue
        files.sort()
        if max_per_class is not None and len(files) > max_per_class:
            rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
            keep = np.sort(rng.choice(len(files), size=int(max_per_class), replace=False))
            dropped += len(files) - len(keep)
            files = [files[i] for i in keep]
        classes.append(label)
        base = os.path.abspath(folder)
        records.extend(Record(os.path.join(base, f), label, "shop", split) for f in files)

    if empty:
        logger.warning("%s: %d class folders without images skipped: %s", root, len(empty),
                       ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
    if not records:
        raise DataError(
            f"expected images ({', '.join(sorted(wanted))}) in the class folders of {root}. "
            f"Received: {len(folders)} folders, none with an image"
        )
    logger.info(
        "%s: %d images in %d classes (%d empty class folders and %d other files skipped%s)",
        root, len(records), len(classes), len(empty), skipped_files,
        f", {dropped} images left out by max_per_class={max_per_class}" if dropped else "",
    )
    return LabelledSet(records, classes, str(root))
