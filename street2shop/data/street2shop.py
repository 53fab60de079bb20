"""Importer for the Exact Street2Shop data set (Kiapour et al., ICCV 2015).

The layout as distributed::

    root/photos/photos.txt                    "id,url" per line, ids zero-padded to 9 digits
    root/photos/000011849.jpg                 images named by id (any image extension)
    root/meta/json/train_pairs_<cat>.json     street photos: [{"photo", "product", "bbox"}]
    root/meta/json/test_pairs_<cat>.json      street photos, test split
    root/meta/json/retrieval_<cat>.json       shop photos: [{"photo", "product"}]

The pitfalls of the real files and what this reader does about them:

- product ids are unique only within a category: ``product_id`` becomes
  ``"<category>/<product>"``;
- one shop photo can belong to several products, and one (photo, product)
  can have several boxes: one record per (photo, product, box); exact
  duplicates are removed;
- ``bbox`` is a JSON object whose key order varies; a missing, malformed or
  empty box gives a record without a box (counted as a dropped box), and a box
  sticking out past the left or top edge is clipped to the image;
- many photos are missing on disk (dead links; an empty file counts as
  missing): their records are left out and the paths listed in
  ``RecordSet.missing``, unless ``strict=True``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from street2shop.data.image import IMAGE_EXTENSIONS, Box
from street2shop.data.records import Record, RecordSet, write_manifest
from street2shop.errors import DataError

logger = logging.getLogger(__name__)

CATEGORIES = (
    "bags", "belts", "dresses", "eyewear", "footwear", "hats",
    "leggings", "outerwear", "pants", "skirts", "tops",
)
# JSON file prefix -> (domain, split)
SOURCES = (("train_pairs", "street", "train"), ("test_pairs", "street", "test"), ("retrieval", "shop", "catalog"))
ID_WIDTH = 9


def photo_name(photo_id: int) -> str:
    """The file stem of a photo: its id zero-padded to 9 digits (``11849 -> "000011849"``)."""
    return f"{photo_id:0{ID_WIDTH}d}"


def read_street2shop(
    root: str | os.PathLike[str],
    *,
    categories: Iterable[str] | None = None,
    strict: bool = False,
) -> RecordSet:
    """Reads the Exact Street2Shop layout into records.

    Street photos of ``train_pairs_<category>.json`` get split ``"train"``,
    those of ``test_pairs_<category>.json`` split ``"test"``; shop photos of
    ``retrieval_<category>.json`` get split ``"catalog"``. Each record's
    ``metadata`` holds the original ``photo_id``.

    Args:
        root: str or path. The folder holding ``photos/`` and ``meta/json/``.
        categories: iterable of str or None. Categories to read (of
            ``CATEGORIES``); by default every category with a file present.
        strict: bool. If True a photo missing on disk is an error; by default
            its records are left out, counted and listed in ``missing``.

    Returns:
        RecordSet.

    Raises:
        DataError: the layout is not there, a category is unknown or has no
            files, a JSON file is malformed (the message names the file, line
            and column), an entry lacks ``photo`` or ``product``, or (with
            ``strict``) a photo is missing.

    Example:

    >>> records = read_street2shop("data/street2shop", categories=["bags", "hats"])  # doctest: +SKIP
    >>> records.filter(domain="shop", split="catalog").products()[:2]  # doctest: +SKIP
    ['bags/1', 'bags/2']
    """
    root = Path(root)
    json_dir = root / "meta" / "json"
    photos_dir = Path(os.path.abspath(root / "photos"))
    for folder in (json_dir, photos_dir):
        if not folder.is_dir():
            raise DataError(
                f"expected the Exact Street2Shop layout (photos/ and meta/json/) under {root}. "
                f"Received: no folder {folder}"
            )
    wanted = _categories(json_dir, categories)
    listed = _read_photos_txt(photos_dir / "photos.txt")
    on_disk = _index_photos(photos_dir)

    records: list[Record] = []
    seen: set[tuple] = set()
    missing: dict[str, None] = {}
    stats = {"skipped": 0, "boxes_dropped": 0, "duplicates": 0, "unlisted": set()}
    for category in wanted:
        for prefix, domain, split in SOURCES:
            path = json_dir / f"{prefix}_{category}.json"
            if not path.is_file():
                continue
            for n, (photo, product, box, box_dropped) in enumerate(_read_entries(path, street=domain == "street")):
                if listed is not None and photo not in listed:
                    stats["unlisted"].add(photo)
                image = on_disk.get(photo)
                if image is None:
                    expected = str(photos_dir / f"{photo_name(photo)}.jpg")
                    if strict:
                        raise DataError(
                            f"{path} entry {n}: photo {photo} not found in {photos_dir} "
                            f"(expected a file named {photo_name(photo)}.<jpg|jpeg|png|...>). Received: strict=True"
                        )
                    missing[expected] = None
                    stats["skipped"] += 1
                    continue
                stats["boxes_dropped"] += box_dropped
                product_id = f"{category}/{product}"
                key = (domain, split, image, product_id, box)
                if key in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(key)
                records.append(Record(image, product_id, domain, split, category, box, {"photo_id": str(photo)}))

    result = RecordSet(records, list(missing), str(root))
    if stats["unlisted"]:
        logger.warning("%d photo ids of the JSON files are not listed in %s", len(stats["unlisted"]),
                       photos_dir / "photos.txt")
    logger.log(
        logging.WARNING if missing or stats["boxes_dropped"] else logging.INFO,
        "%s: %d records (%d street, %d shop) of %d products in %d categories; "
        "%d photos missing on disk (%d records skipped); %d boxes dropped; %d duplicates removed",
        root, len(records), sum(r.domain == "street" for r in records), sum(r.domain == "shop" for r in records),
        len(result.products()), len(wanted), len(missing), stats["skipped"], stats["boxes_dropped"],
        stats["duplicates"],
    )
    return result


def import_street2shop(
    root: str | os.PathLike[str], output_csv: str | os.PathLike[str], **kwargs
) -> RecordSet:
    """Reads the Exact Street2Shop layout and writes it as a manifest CSV.

    Args:
        root: str or path. The folder holding ``photos/`` and ``meta/json/``.
        output_csv: str or path. The manifest to write (atomically).
        **kwargs: passed to :func:`read_street2shop` (``categories``, ``strict``).

    Returns:
        The RecordSet written.
    """
    records = read_street2shop(root, **kwargs)
    path = write_manifest(records.records, output_csv)
    logger.info("wrote %d records to %s", len(records), path)
    return records


def _categories(json_dir: Path, categories: Iterable[str] | None) -> list[str]:
    def present(c: str) -> bool:
        return any((json_dir / f"{prefix}_{c}.json").is_file() for prefix, _, _ in SOURCES)

    if categories is None:
        found = [c for c in CATEGORIES if present(c)]
        if not found:
            raise DataError(
                f"expected train_pairs_, test_pairs_ or retrieval_<category>.json files in {json_dir} "
                f"for categories {', '.join(CATEGORIES)}. Received: none"
            )
        return found
    if isinstance(categories, str):
        categories = [categories]
    wanted = list(dict.fromkeys(c.strip() for c in categories))
    unknown = [c for c in wanted if c not in CATEGORIES]
    if unknown:
        raise DataError(f"categories must be among {', '.join(CATEGORIES)}. Received: {', '.join(unknown)}")
    absent = [c for c in wanted if not present(c)]
    if absent:
        raise DataError(f"no JSON files in {json_dir} for the categories asked for. Received: {', '.join(absent)}")
    return wanted


def _read_photos_txt(path: Path) -> set[int] | None:
    """The photo ids listed in photos.txt, or None if the file is absent.

    The list only serves to report photo ids that it does not name, so a
    malformed line is counted and logged, not fatal.
    """
    if not path.is_file():
        logger.info("%s not found: looking photos up by id in %s alone", path, path.parent)
        return None
    ids: set[int] = set()
    bad: list[int] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                head = line.split(",", 1)[0].strip()
                if head.isdigit():
                    ids.add(int(head))
                elif line.strip() and not (line_no == 1 and head.lower() in ("id", "photo", "photo_id")):
                    bad.append(line_no)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if bad:
        logger.warning("%s: %d lines without a numeric id skipped (lines %s)", path, len(bad),
                       ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else ""))
    return ids


def _index_photos(photos_dir: Path) -> dict[int, str]:
    """Photo id -> path of the image file named by that id (padded or not), any image extension."""
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    found: dict[int, tuple[int, str]] = {}
    empty = 0
    with os.scandir(photos_dir) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            ext = ext.lower()
            if ext not in rank or not stem.isdigit() or entry.name.startswith("."):
                continue
            try:
                if not entry.is_file() or entry.stat().st_size == 0:
                    empty += entry.is_file()
                    continue
            except OSError:
                continue
            photo = int(stem)
            candidate = (rank[ext], os.path.abspath(entry.path))
            if photo not in found or candidate < found[photo]:
                found[photo] = candidate
    if empty:
        logger.warning("%d empty image files in %s are treated as missing", empty, photos_dir)
    return {photo: path for photo, (_, path) in found.items()}


def _read_entries(path: Path, *, street: bool):
    """Yields (photo, product, box or None, 1 if a street box was dropped else 0) per entry."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno} column {e.colno}: malformed JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries. Received: {type(data).__name__}")
    for n, entry in enumerate(data):
        if not isinstance(entry, Mapping):
            raise DataError(f"{path} entry {n}: expected an object with photo and product. Received: {entry!r:.80}")
        photo = _as_id(entry.get("photo"))
        product = _as_id(entry.get("product"))
        if photo is None or product is None:
            raise DataError(
                f"{path} entry {n}: expected integer 'photo' and 'product'. "
                f"Received: photo={entry.get('photo')!r}, product={entry.get('product')!r}"
            )
        box = _parse_box(entry.get("bbox"))
        dropped = int(box is None and (street or entry.get("bbox") is not None))
        if dropped:
            logger.debug("%s entry %d: no usable bbox, kept without a box. Received: bbox=%r", path, n, entry.get("bbox"))
        yield photo, product, box, dropped


def _as_id(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _parse_box(bbox: object) -> Box | None:
    """A Box from a {"left", "top", "width", "height"} object, or None if absent, malformed or empty."""
    if not isinstance(bbox, Mapping):
        return None
    try:
        values = [float(bbox[k]) for k in ("left", "top", "width", "height")]
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in values):
        return None
    left, top, width, height = values
    if left < 0:  # sticks out past the left edge: keep the part on the image
        left, width = 0.0, width + left
    if top < 0:
        top, height = 0.0, height + top
    if width <= 0 or height <= 0:
        return None
    return Box(left, top, width, height)
