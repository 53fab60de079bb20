"""The one record type every reader produces, and the manifest CSV format.

A manifest has one row per image. Required columns: ``image_path`` (relative
to the manifest's folder, or absolute), ``product_id``, ``domain`` (``street``
or ``shop``) and ``split``. Optional: ``category`` and the four
``bbox_left, bbox_top, bbox_width, bbox_height`` columns (pixels on the
original image; all four or none). Any other column is kept in
``Record.metadata``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import posixpath
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import IO

from street2shop.data.image import IMAGE_EXTENSIONS, Box, is_image_file
from street2shop.errors import ConfigError, DataError
from street2shop.fileio import atomic_file

logger = logging.getLogger(__name__)

DOMAINS = ("street", "shop")
REQUIRED_COLUMNS = ("image_path", "product_id", "domain", "split")
BOX_COLUMNS = ("bbox_left", "bbox_top", "bbox_width", "bbox_height")
OPTIONAL_COLUMNS = ("category", *BOX_COLUMNS)
# The street photos indexed as references when asked (embed --domains shop,street): the training split, so that
# the photos a shop evaluates with stay out of its index.
DEFAULT_REFERENCE_SPLITS = "train"


@dataclasses.dataclass(frozen=True)
class Record:
    """One image of a dataset.

    Attributes:
        image_path: str. Absolute path of the image file.
        product_id: str. The product (or class) the image shows. Unique across
            the whole dataset: importers namespace ids that are only unique
            within a category (``"bags/76"``).
        domain: str. ``"street"`` (a customer's photo) or ``"shop"`` (catalogue).
        split: str. Free text: ``train``, ``val``, ``test``, ``catalog``...
        category: str or None. Coarse category, used for hard negatives and
            per-category evaluation.
        box: Box or None. Where the product is, in pixels of the original image.
        metadata: mapping of str to str. Every other manifest column.
    """

    image_path: str
    product_id: str
    domain: str
    split: str
    category: str | None = None
    box: Box | None = None
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}. Received: domain={self.domain!r}")
        if not self.product_id:
            raise ValueError("product_id must not be empty.")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    def __hash__(self) -> int:
        return hash((self.image_path, self.product_id, self.domain, self.split, self.category, self.box))

    def __reduce__(self):  # a mappingproxy cannot be pickled or deep-copied; rebuild from a plain dict
        fields = (self.image_path, self.product_id, self.domain, self.split, self.category, self.box)
        return (self.__class__, (*fields, dict(self.metadata)))


@dataclasses.dataclass
class RecordSet:
    """Records read from one source, with the images found missing on disk.

    Attributes:
        records: list of Record.
        missing: list of str. Image paths named by the source but not on disk
            (their records are not in ``records``).
        source: str. Where the records came from, for messages.
    """

    records: list[Record]
    missing: list[str] = dataclasses.field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def filter(
        self, *, split: str | Iterable[str] | None = None, domain: str | None = None
    ) -> RecordSet:
        """Returns the records of the given split(s) and/or domain."""
        splits = {split} if isinstance(split, str) else (set(split) if split is not None else None)
        kept = [
            r
            for r in self.records
            if (splits is None or r.split in splits) and (domain is None or r.domain == domain)
        ]
        return RecordSet(kept, list(self.missing), self.source)

    def products(self) -> list[str]:
        """Distinct product ids, in order of first appearance."""
        return list(dict.fromkeys(r.product_id for r in self.records))

    def summary(self) -> str:
        by_domain = {d: sum(r.domain == d for r in self.records) for d in DOMAINS}
        text = (
            f"{self.source or 'records'}: {len(self.records)} images "
            f"({by_domain['street']} street, {by_domain['shop']} shop) of "
            f"{len(self.products())} products"
        )
        if self.missing:
            shown = ", ".join(self.missing[:3]) + (" ..." if len(self.missing) > 3 else "")
            text += f"; {len(self.missing)} missing on disk and skipped ({shown})"
        return text


def _parse_box(row: Mapping[str, str], where: str) -> Box | None:
    raw = [(row.get(c) or "").strip() for c in BOX_COLUMNS]
    if not any(raw):
        return None
    if not all(raw):
        given = dict(zip(BOX_COLUMNS, raw))
        raise DataError(f"{where}: a box needs all of {', '.join(BOX_COLUMNS)} or none. Received: {given}")
    try:
        return Box(*(float(v) for v in raw))
    except ValueError as e:  # float() or Box validation
        raise DataError(f"{where}: malformed box: {e}. Received: {dict(zip(BOX_COLUMNS, raw))}") from None


def manifest_root(path: str | os.PathLike[str]) -> str:
    """The folder a manifest's relative image paths start from: its own (symlinks resolved; for a URL, its prefix)."""
    text = os.fspath(path)
    if "://" in text:
        return posixpath.dirname(text)
    return str(Path(text).resolve().parent)


def image_location(image: str, root: str) -> str:
    """A manifest's ``image_path`` as a full path: absolute paths and URLs (``gs://...``) as they are, others under ``root``."""
    if "://" in image or os.path.isabs(image):
        return image
    return posixpath.join(root, image) if "://" in root else str(Path(root) / image)


def manifest_rows(handle: IO[str], source: str, root: str) -> Iterator[tuple[int, Record]]:
    """Parses an open manifest CSV into ``(line, Record)`` pairs, one per non-blank row; the one row parser.

    ``source`` names the file in messages; relative image paths are resolved
    under ``root`` (:func:`manifest_root`). Whether the images exist is left
    to the caller.

    Raises:
        DataError: a required column is absent, or a row has more fields than
            the header, an empty image path or product id, an unknown domain or
            a malformed box. The message names the file and line.
    """
    reader = csv.DictReader(handle)
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    absent = [c for c in REQUIRED_COLUMNS if c not in header]
    if absent:
        raise DataError(
            f"{source} line 1: missing required column(s) {', '.join(absent)}. "
            f"Expected at least {', '.join(REQUIRED_COLUMNS)}. Received: {', '.join(header) or '(empty header)'}"
        )
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    for row in reader:
        line = reader.line_num
        where = f"{source} line {line}"
        if None in row:  # more fields than the header
            raise DataError(f"{where}: {len(header) + len(row[None])} fields, header has {len(header)}.")
        if not any((v or "").strip() for v in row.values()):
            continue  # blank line
        image = (row["image_path"] or "").strip()
        product = (row["product_id"] or "").strip()
        domain = (row["domain"] or "").strip().lower()
        split = (row["split"] or "").strip()
        if not image:
            raise DataError(f"{where}: empty image_path.")
        if not product:
            raise DataError(f"{where}: empty product_id for {image}.")
        if domain not in DOMAINS:
            raise DataError(
                f"{where}: domain must be 'street' or 'shop'. Received: domain={row['domain']!r}"
            )
        box = _parse_box(row, where)
        category = (row.get("category") or "").strip() or None
        meta = {k: v for k, v in row.items() if k not in known and v is not None}
        yield line, Record(image_location(image, root), product, domain, split, category, box, meta)


def read_manifest_csv(
    path: str | os.PathLike[str], *, strict: bool = False, check_files: bool = True
) -> RecordSet:
    """Reads a manifest CSV into records.

    Args:
        path: str or path. The manifest CSV.
        strict: bool. If True, a missing image file is an error; by default
            missing files are left out, counted and listed in the summary.
        check_files: bool. If False, do not look for the images on disk.

    Returns:
        RecordSet.

    Raises:
        DataError: the file is missing or unreadable, a required column is
            absent, or a row has an unknown domain, an empty product id or a
            malformed box. The message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    records: list[Record] = []
    missing: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for line, record in manifest_rows(f, str(path), manifest_root(path)):
                if check_files and not os.path.isfile(record.image_path):
                    if strict:
                        raise DataError(f"{path} line {line}: image not found: {record.image_path}")
                    missing.append(record.image_path)
                    continue
                records.append(record)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read manifest {path}: {e}") from None
    result = RecordSet(records, missing, str(path))
    if missing:
        logger.warning("%s", result.summary())
    else:
        logger.info("%s", result.summary())
    return result


def read_manifest(path: str | os.PathLike[str], **options: bool) -> RecordSet:
    """The former name of :func:`read_manifest_csv` (deprecated: it was also the name of the index's manifest reader)."""
    warnings.warn("street2shop.data.records.read_manifest is now read_manifest_csv", DeprecationWarning, stacklevel=2)
    return read_manifest_csv(path, **options)


def write_manifest(records: Iterable[Record], path: str | os.PathLike[str]) -> Path:
    """Writes records as a manifest CSV, atomically (a temporary file, then rename).

    Image paths under the manifest's folder are written relative to it.
    Metadata keys become extra columns.
    """
    path = Path(path)
    records = list(records)
    root = path.resolve().parent
    known = {*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS}
    extra = [k for k in dict.fromkeys(k for r in records for k in r.metadata) if k not in known]
    columns = [*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, *extra]
    bases = list(dict.fromkeys([Path(os.path.abspath(path.parent)), root]))
    try:
        with atomic_file(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            for r in records:
                row = {k: v for k, v in r.metadata.items() if k not in known}
                row.update({
                    "image_path": _relative_if_under(r.image_path, bases),
                    "product_id": r.product_id,
                    "domain": r.domain,
                    "split": r.split,
                    "category": r.category or "",
                })
                if r.box is not None:
                    row.update({c: _fmt(v) for c, v in zip(BOX_COLUMNS, r.box.as_ltwh())})
                writer.writerow(row)
    except OSError as e:
        raise DataError(f"cannot write manifest {path}: {e}") from None
    return path


def _relative_if_under(image_path: str, bases: list[Path]) -> str:
    """The path relative to the first base it lies under, else absolute.

    Tried without resolving symlinks first, so a symlinked image keeps its own
    name rather than its target's; then resolved.
    """
    image = Path(os.path.abspath(image_path))
    for candidate in (image, image.resolve()):
        for base in bases:
            try:
                return candidate.relative_to(base).as_posix()
            except ValueError:
                pass
    return str(image)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def catalogue_records(
    source: str | os.PathLike[str], split: str = "", *, domains: str | Iterable[str] = "shop",
    reference_splits: str = DEFAULT_REFERENCE_SPLITS,
) -> list[Record]:
    """The reference images to embed, in manifest order: the rows :func:`is_catalogue` keeps (by default the shop photos
    of the comma-separated ``split`` s, or all), or every image file under a folder (product id = the file name without
    its extension; shop photos only).

    With ``"street"`` in ``domains``, a manifest's labelled street photos of ``reference_splits`` are references of
    their products too (customer photos indexed beside the catalogue).

    Raises:
        ConfigError: an unknown domain, or street photos asked of a folder (it has no labels).
        DataError: no such file or folder, or a domain asked for selects nothing (the message lists what there is).
    """
    kinds = reference_domains(domains)
    folder = Path(source)
    if folder.is_dir():
        if "street" in kinds:
            raise ConfigError(f"a folder of images holds catalogue photos only (a file's product is its name); customer photos "
                              f"as references need a manifest that labels them. Received: {folder} with domains {','.join(kinds)}")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
        if not files:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
        return [Record(str(p.resolve()), p.stem, "shop", "catalog") for p in files]
    records = read_manifest_csv(source)
    chosen = [r for r in records if is_catalogue(r, split, domains=kinds, reference_splits=reference_splits)]
    for domain, splits, flag in (("shop", split, "--split"), ("street", reference_splits, "--reference-splits")):
        if domain in kinds and not any(r.domain == domain for r in chosen):
            there = sorted({r.split for r in records if r.domain == domain})
            raise DataError(
                f"no {domain} photo of split(s) {sorted(catalogue_splits(splits)) or 'any'} in {source}; its {domain} photos are "
                f"in split(s) {there}. Received: {flag} {splits!r}"
            )
    if "shop" in kinds and "street" in kinds:
        with_shop = {r.product_id for r in chosen if r.domain == "shop"}
        only_street = sorted({r.product_id for r in chosen if r.domain == "street"} - with_shop)
        if only_street:
            logger.warning("%d product(s) have customer photos but no catalogue photo among the references (%s%s): answers "
                           "show them without a catalogue photo", len(only_street), ", ".join(only_street[:3]),
                           " ..." if len(only_street) > 3 else "")
    return chosen


def catalogue_splits(split: str) -> set[str]:
    """``"catalog,val"`` → ``{"catalog", "val"}``; empty for all splits."""
    return {s.strip() for s in split.split(",") if s.strip()}


def reference_domains(domains: str | Iterable[str] = "shop") -> tuple[str, ...]:
    """Which photos become references: ``"shop,street"`` (or ``["shop", "street"]``) → ``("shop", "street")``, in that order.

    Raises:
        ConfigError: empty, or a domain other than ``shop`` and ``street``.
    """
    given = [d.strip().lower() for d in (domains.split(",") if isinstance(domains, str) else domains) if d.strip()]
    unknown = [d for d in given if d not in DOMAINS]
    if not given or unknown:
        raise ConfigError(f"domains must be shop, street or shop,street (the photos to index as references). "
                          f"Received: domains={domains if isinstance(domains, str) else ','.join(domains)!r}")
    return tuple(d for d in ("shop", "street") if d in given)


def is_catalogue(
    record: Record, split: str = "", *, domains: str | Iterable[str] = "shop", reference_splits: str = DEFAULT_REFERENCE_SPLITS
) -> bool:
    """Whether a manifest row is a reference image to embed: the one rule, for ``embed`` and ``beam-embed`` alike.

    A shop photo of one of the comma-separated ``split`` s (any if empty), when ``domains`` has ``shop`` (the
    default); a street photo of one of the comma-separated ``reference_splits`` (any if empty; ``train`` by
    default, so that evaluation photos stay out of the index), when ``domains`` has ``street``: a shop's labelled
    customer photos, indexed as references of their products.
    """
    if record.domain not in reference_domains(domains):
        return False
    splits = catalogue_splits(split if record.domain == "shop" else reference_splits)
    return not splits or record.split in splits


@dataclasses.dataclass
class DatasetCheck:
    """What ``street2shop data check`` found: the records read, the images that decode, the usable records."""

    records: RecordSet
    images: object  # street2shop.data.image.ImageCheck
    usable: list[Record]

    def to_dict(self) -> dict[str, object]:
        images = self.images
        return {
            "manifest": self.records.source, "records": len(self.records), "missing": self.records.missing,
            "unreadable": images.bad_images, "empty_boxes": [p for p, _ in images.empty_boxes], "usable": len(self.usable),  # type: ignore[attr-defined]
        }


def check_dataset(manifest: str | os.PathLike[str], *, strict: bool = False) -> DatasetCheck:
    """Reads a manifest and decodes every image once with the training decoder (missing, unreadable, empty boxes)."""
    from street2shop.data.image import check_images

    records = read_manifest_csv(manifest, strict=strict)
    usable, images = check_images(records.records)
    return DatasetCheck(records, images, usable)
