"""The item table: what each reference image is (its product, path, category, domain and labels), and its file ``items.jsonl``.

An embeddings folder (:mod:`street2shop.embeddings`) and an index folder
(:mod:`street2shop.index.folder`) both hold one, row for row beside their
vectors, in one schema: one JSON object per line,
``{"product_id": "...", "image_path": "...", "category": null, "domain": "shop", "labels": {...}}``
(``domain``: ``shop`` for a catalogue photo, ``street`` for a labelled
customer photo indexed as a reference of its product; a line without it, as
older versions wrote, is a catalogue photo. ``labels``: the manifest's other
columns, such as ``product_name``; left out when there are none). An index's
table also numbers its rows (``"row": 0`` first on each line). JSON lines
rather than CSV because it round-trips exactly: a missing category
(``null``) stays distinct from an empty one, and ids or paths with commas,
quotes or newlines need no quoting rules.

Which label column names a product (:func:`label_column_of`) and which image
shows a product (:func:`catalogue_photos`: its catalogue photo, even when a
search matched one of its customer photos) are questions about this table,
asked by search, the service, evaluation and the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from street2shop.data.records import DOMAINS
from street2shop.errors import ConfigError, DataError

ITEMS_FILE = "items.jsonl"
DEFAULT_LABEL_COLUMN = "product_name"


@dataclasses.dataclass(frozen=True)
class Item:
    """One reference image: a row of the item table.

    Args:
        product_id: str, the product the image shows (several images may share it).
        image_path: str, where the image is (free text, kept for display).
        category: str | None, the product's category, if known.
        labels: mapping of str to str, the manifest's other columns (``product_name``...).
        domain: str, ``"shop"`` (a catalogue photo, the default) or ``"street"`` (a labelled
            customer photo of the product, indexed as a reference beside the catalogue).

    Example:
        >>> Item("p17", "shop/p17_front.jpg", "bags", {"product_name": "Tote"})
        >>> Item("p17", "reviews/4411.jpg", "bags", domain="street")
    """

    product_id: str
    image_path: str = ""
    category: str | None = None
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    domain: str = "shop"

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"an item's domain must be one of {DOMAINS}. Received: domain={self.domain!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Item:
        """An item from a line of an item table (``embed``'s or an index's; one without ``domain`` is a catalogue photo)."""
        labels = values.get("labels") or {}
        return cls(str(values["product_id"]), str(values.get("image_path") or ""), values.get("category"),
                   {str(k): str(v) for k, v in labels.items()}, values.get("domain") or "shop")

    @classmethod
    def from_record(cls, record: Any) -> Item:
        """The item of a manifest row (a :class:`~street2shop.data.records.Record`): its other columns are its labels."""
        return cls(record.product_id, record.image_path, record.category, dict(record.metadata), record.domain)

    def to_dict(self) -> dict[str, Any]:
        """The item as a line of an item table (``labels`` only when there are some)."""
        out: dict[str, Any] = {"product_id": self.product_id, "image_path": self.image_path, "category": self.category, "domain": self.domain}
        if self.labels:
            out["labels"] = dict(self.labels)
        return out

    @property
    def image_id(self) -> str:
        """A stable id of the catalogue image (the same in every index version that holds it)."""
        return image_id(self.image_path or self.product_id)


def image_id(image_path: str) -> str:
    """The stable id of a catalogue image: 16 hex digits of the SHA-256 of its path."""
    return hashlib.sha256(image_path.encode("utf-8")).hexdigest()[:16]


def item_lines(items: Iterable[Item | Mapping[str, Any]], *, numbered: bool = False) -> Iterator[str]:
    """The lines of an item table, one per item (a mapping is read as a line of one); ``numbered`` puts each ``row`` first."""
    for row, item in enumerate(items):
        values = (item if isinstance(item, Item) else Item.from_dict(item)).to_dict()
        yield json.dumps({"row": row, **values} if numbered else values, ensure_ascii=False) + "\n"


def read_items(path: str | os.PathLike[str], count: int | None = None, *, numbered: bool = False) -> list[Item]:
    """The items of an ``items.jsonl``, checked: each line a JSON object with a ``product_id``.

    Args:
        path: the file.
        count: the rows it must hold (None: any).
        numbered: each line carries its ``row``, which must be 0, 1, 2, ... in order (an index's table).

    Raises:
        DataError: a malformed line (named by its number), rows out of order, or not ``count`` of them.
    """
    items: list[Item] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                row = record["row"] if numbered else len(items)
                item = Item.from_dict(record)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                wanted = "row and product_id" if numbered else "product_id"
                raise DataError(f"each item line must be a JSON object with {wanted}. Received: line {line_number} of {path}") from exc
            except ValueError as exc:  # a domain other than shop or street
                raise DataError(f"{exc} (line {line_number} of {path})") from None
            if row != len(items):
                raise DataError(f"item rows must be 0, 1, 2, ... in order. Received: row={row!r} on line {line_number} of {path}")
            items.append(item)
    if count is not None and len(items) != count:
        raise DataError(f"the item table must have {count} rows. Received: {len(items)} in {path}")
    return items


def catalogue_photos(items: Sequence[Item], dead: Sequence[bool] | None = None) -> dict[str, Item]:
    """Each product's catalogue photo, the image that shows it: its first shop photo in row order (not removed: ``dead``).

    A search may match a product at one of its customer photos (``domain`` street); what a person is shown is still
    the product's catalogue photo. A product with customer photos only has none here.
    """
    photos: dict[str, Item] = {}
    for row, item in enumerate(items):
        if item.domain == "shop" and item.product_id not in photos and not (dead is not None and row < len(dead) and dead[row]):
            photos[item.product_id] = item
    return photos


def domain_counts(items: Iterable[Item | Mapping[str, Any]]) -> dict[str, int]:
    """How many items are catalogue photos and how many customer photos: ``{"shop": n, "street": m}``."""
    counts = dict.fromkeys(("shop", "street"), 0)
    for item in items:
        counts[item.domain if isinstance(item, Item) else (item.get("domain") or "shop")] += 1
    return counts


def label_column_of(gallery_labels: Iterable[Mapping[str, Any]], label_column: str | None = None) -> str:
    """The manifest column that names products: ``label_column``, else ``product_name`` when the catalogue has it, else none ("").

    ``gallery_labels``: each catalogue image's other manifest columns
    (``Evaluation.gallery_labels``, or the index's ``Item.labels``).

    Raises:
        ConfigError: ``label_column`` is given and no catalogue image has it (the message lists the columns there are).
    """
    columns = sorted({k for labels in gallery_labels for k in labels})
    if label_column is None:
        return DEFAULT_LABEL_COLUMN if DEFAULT_LABEL_COLUMN in columns else ""
    if label_column and label_column not in columns:
        raise ConfigError(f"no catalogue image has a {label_column!r} column; the catalogue's other columns are {columns}. "
                          f"Received: label_column={label_column!r}")
    return label_column
