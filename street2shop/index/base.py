"""What every catalogue index shares: items, results, input checks, the folder format, one search interface.

An index folder holds:

``vectors.npy``
    The unit vectors, float32 ``[count, dimension]``, loaded with
    ``np.load(mmap_mode="r")`` so processes that load the same folder share
    one copy through the page cache. Exact re-ranking and exact search read it.
``items.jsonl``
    The item table, one JSON object per line in row order:
    ``{"row": 0, "product_id": "...", "image_path": "...", "category": null, "labels": {...}}``
    (``labels``: the manifest's other columns, such as ``product_name``; optional).
    JSON lines rather than CSV because it round-trips exactly: a missing
    category (``null``) stays distinct from an empty one, and ids or paths with
    commas, quotes or newlines need no quoting rules.
``annoy.ann``
    Annoy's forest, for :class:`~street2shop.index.annoy_index.CatalogIndex` only.
``manifest.json``
    ``format_version``, ``kind`` (``annoy`` or ``exact``), ``dimension``,
    ``metric``, ``count``, ``model_fingerprint``, ``model_version``,
    ``created_at`` (UTC, ISO 8601), ``package_version``, the file names and the
    kind's own settings. Written last.

``save`` writes it all into a temporary folder next to the destination and
renames it into place (an existing index is renamed aside first and deleted
only after the new one is in), so a crash never leaves a half index where a
good one was.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from street2shop.contract import ModelIdentity, check_same_model
from street2shop.errors import ConfigError, DataError, IndexMismatchError, check_positive_int
from street2shop.fileio import fsync_dir
from street2shop.index import ranking

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
VECTORS_FILE = "vectors.npy"
ITEMS_FILE = "items.jsonl"
MANIFEST_FILE = "manifest.json"

_NORM_TOLERANCE = 1e-3
_ZERO_NORM = 1e-12


@dataclasses.dataclass(frozen=True)
class Item:
    """One catalogue image in the index.

    Args:
        product_id: str, the product the image shows (several images may share it).
        image_path: str, where the image is (free text, kept for display).
        category: str | None, the product's category, if known.
        labels: mapping of str to str, the manifest's other columns (``product_name``...).

    Example:
        >>> Item("p17", "shop/p17_front.jpg", "bags", {"product_name": "Tote"})
    """

    product_id: str
    image_path: str = ""
    category: str | None = None
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Item:
        """An item from a line of an item table (``embed``'s or an index's)."""
        labels = values.get("labels") or {}
        return cls(str(values["product_id"]), str(values.get("image_path") or ""), values.get("category"), {str(k): str(v) for k, v in labels.items()})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"product_id": self.product_id, "image_path": self.image_path, "category": self.category}
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


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """One answer of a query.

    Args:
        rank: int, 1 for the best answer.
        product_id: str, the product of the matched image.
        similarity: float, cosine similarity between the query and the image, in [-1, 1].
        row: int, the image's row in the index (0-based, in the order added).
        image_path: str, the image's path as given to ``add``.
        category: str | None, the image's category.
        labels: mapping, the image's labels (the manifest's other columns).

    Example:
        >>> best = index.query(embedding, k=5)[0]
        >>> best.product_id, round(best.similarity, 3)
    """

    rank: int
    product_id: str
    similarity: float
    row: int
    image_path: str
    category: str | None
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _result(*, rank: int, item: Item, row: int, similarity: float) -> SearchResult:
    return SearchResult(rank, item.product_id, similarity, row, item.image_path, item.category, item.labels)


# ----------------------------------------------------------------------------- checks



def check_embeddings(embeddings: Any, items: Sequence[Item], dimension: int) -> np.ndarray:
    """Embeddings to add, as float32 unit rows (normalised here with a warning if they are not)."""
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise IndexMismatchError(f"embeddings must be a 2-D array [N, {dimension}]. Received: shape={array.shape}")
    if array.shape[1] != dimension:
        raise IndexMismatchError(f"embeddings must have the index dimension {dimension}. Received: shape={array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"embeddings must be real numbers. Received: dtype={array.dtype}")
    if len(items) != array.shape[0]:
        raise DataError(f"there must be one item per embedding row. Received: {array.shape[0]} rows and {len(items)} items")
    for position, item in enumerate(items):
        if not isinstance(item, Item):
            raise DataError(f"items must be Item instances. Received: {type(item).__name__} at position {position}")
        if not isinstance(item.product_id, str) or not item.product_id:
            raise DataError(f"Item.product_id must be a non-empty string. Received: {item.product_id!r} at position {position}")
    vectors = array.astype(np.float64, copy=False)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"embeddings must be finite. Received: NaN or inf in rows {bad[:10].tolist()}")
    norms = np.linalg.norm(vectors, axis=1)
    zero = norms < _ZERO_NORM
    if zero.any():
        raise DataError(f"embeddings must be non-zero (a zero vector has no direction). Received: zero rows {np.flatnonzero(zero)[:10].tolist()}")
    off = np.abs(norms - 1.0) > _NORM_TOLERANCE
    if off.any():
        logger.warning(
            "%d of %d embeddings are not unit length (norms from %.4g to %.4g); L2-normalising them",
            int(off.sum()), len(norms), float(norms.min()), float(norms.max()),
        )
    return (vectors / norms[:, None]).astype(np.float32)


def check_query(embedding: Any, dimension: int) -> np.ndarray:
    array = np.asarray(embedding)
    if array.ndim != 1 or array.shape[0] != dimension:
        raise IndexMismatchError(f"a query must be a 1-D vector of the index dimension {dimension}. Received: shape={array.shape}")
    vector = array.astype(np.float64)
    if not np.isfinite(vector).all():
        raise DataError("a query embedding must be finite. Received: NaN or inf")
    norm = float(np.linalg.norm(vector))
    if norm < _ZERO_NORM:
        raise DataError("a query embedding must be non-zero. Received: a zero vector")
    if abs(norm - 1.0) > _NORM_TOLERANCE:
        logger.debug("query norm %.4g; L2-normalising it", norm)
    return (vector / norm).astype(np.float32)


def check_batch(embeddings: Any, dimension: int) -> np.ndarray:
    array = np.asarray(embeddings)
    if array.ndim != 2 or array.shape[1] != dimension:
        raise IndexMismatchError(f"query_batch needs a 2-D array [Q, {dimension}]. Received: shape={array.shape}")
    return array


def _categories(categories: Sequence[str | None] | None, count: int) -> list[str | None]:
    if categories is None:
        return [None] * count
    categories = list(categories)
    if len(categories) != count:
        raise ConfigError(f"give one category (or None) per query. Received: {len(categories)} for {count} queries")
    return categories


# ----------------------------------------------------------------------------- the search interface


class SearchIndex:
    """The search interface every index implements, and what they share.

    ``query(embedding, k, by_product=True, category=None, exclude=None)``
    returns the k best :class:`SearchResult` (products, each at its best
    image, with ``by_product``), ranked by :mod:`street2shop.index.ranking`;
    ``query_batch`` does it for each row of a matrix; ``category`` keeps only
    items of that category (an exact search over them); ``exclude`` drops
    product ids. ``identity`` is the model that made the vectors.
    """

    kind = "base"
    dimension: int
    model_fingerprint: str | None
    model_version: int | None

    def __init__(self, dimension: int, *, model_fingerprint: str | None = None, model_version: int | None = None) -> None:
        self.dimension = check_positive_int("dimension", dimension)
        if model_fingerprint is not None and not isinstance(model_fingerprint, str):
            raise ConfigError(f"model_fingerprint must be a string or None. Received: model_fingerprint={model_fingerprint!r}")
        self.model_fingerprint = model_fingerprint
        self.model_version = None if model_version is None else int(model_version)
        self.version: int | None = None  # the index version it was loaded from or published as, if numbered
        self.dead: np.ndarray | None = None  # bool per row: removed (tombstoned) rows, never answered
        self.folder: Path | None = None  # the folder it was loaded from or saved to
        self._items: list[Item] = []
        self._category_rows: dict[str | None, np.ndarray] | None = None
        self._image_paths: dict[str, str] | None = None
        self._items_view: tuple[tuple[int, int], tuple[Item, ...]] | None = None

    # -- what the subclasses provide

    @property
    def vectors(self) -> np.ndarray:
        raise NotImplementedError

    def _search(self, query: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], search_k: int | None, rerank: bool) -> list[SearchResult]:
        raise NotImplementedError

    # -- identity

    @property
    def identity(self) -> ModelIdentity | None:
        """The model that made the vectors (None for an index built without one)."""
        if not self.model_fingerprint:
            return None
        return ModelIdentity(self.model_fingerprint, self.model_version, self.dimension)

    def check_model(self, identity: ModelIdentity | None, what: str = "the embedder") -> None:
        """Refuses query vectors of another model than this index's (ModelMismatchError)."""
        if self.identity is None:
            raise IndexMismatchError(
                "this index does not record which model made its vectors (built by an older street2shop, or without a "
                "fingerprint), so vectors of any model would be compared with it: build it again from `street2shop embed` "
                "output. Received: model_fingerprint=None"
            )
        check_same_model(self.identity, identity, what)

    # -- inspection

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> Sequence[Item]:
        """The item of every row (a read-only view; cheap to ask for again)."""
        key = (id(self._items), len(self._items))  # the list is only ever extended or replaced
        if self._items_view is None or self._items_view[0] != key:
            self._items_view = (key, tuple(self._items))
        return self._items_view[1]

    def image_path(self, image_id: str) -> str | None:
        """The path of the catalogue image with this :attr:`Item.image_id`, or None if the index has none."""
        if self._image_paths is None:
            self._image_paths = {item.image_id: item.image_path for item in self._items if item.image_path}
        return self._image_paths.get(image_id)

    def category_rows(self, category: str | None) -> np.ndarray:
        """The rows of the items of ``category``."""
        if self._category_rows is None:
            by: dict[str | None, list[int]] = {}
            for row, item in enumerate(self._items):
                by.setdefault(item.category, []).append(row)
            self._category_rows = {c: np.asarray(rows, np.int64) for c, rows in by.items()}
        return self._category_rows.get(category, np.zeros(0, np.int64))

    # -- querying

    def _exact_answer(
        self,
        query: np.ndarray,
        k: int,
        by_product: bool,
        excluded: frozenset[str],
        rows: np.ndarray | None = None,
        sims32: np.ndarray | None = None,
    ) -> list[SearchResult]:
        """Exact search over ``rows`` (all rows when None), the one ranking rule.

        Candidates are chosen on float32 similarities (``sims32``, computed
        here unless given), all ties at the boundary kept, then ranked on the
        exact float64 cosines; more are taken until ``k`` answers survive the
        filters.
        """
        keep = self._filter(excluded)
        if rows is None:
            count = len(self)
            if sims32 is None:
                sims32 = np.asarray(self.vectors @ query.astype(np.float32))
        else:
            count = len(rows)
            if count and sims32 is None:
                sims32 = np.asarray(self.vectors[rows], dtype=np.float32) @ query.astype(np.float32)
        if count == 0:
            return []
        n = min(count, k * 4 if (by_product or keep.active) else k)
        while True:
            chosen = ranking.top(sims32, n)
            if rows is not None:
                chosen = rows[chosen]
            ranked_rows, ranked = ranking.order(chosen, ranking.cosines(self.vectors, chosen, query))
            if n >= count or ranking.enough(ranked_rows[:n], self._items, k, by_product, keep):
                return ranking.collect(ranked_rows[:n], ranked[:n], self._items, k, by_product=by_product, keep=keep, make=_result)
            n = min(count, n * 4)

    def query(
        self,
        embedding: np.ndarray,
        k: int = 20,
        *,
        search_k: int | None = None,
        by_product: bool = True,
        rerank: bool = True,
        exclude: Iterable[str] | None = None,
        category: str | None = None,
    ) -> list[SearchResult]:
        """The k best images (or products, with ``by_product``) for one embedding.

        ``category`` keeps only items of that category; ``exclude`` is a
        product id or ids to leave out. ``search_k`` and ``rerank`` tune the
        Annoy index and are ignored by the exact one.
        """
        self._require_ready("query")
        k = check_positive_int("k", k)
        query = check_query(embedding, self.dimension)
        excluded = ranking.exclude_set(exclude)
        if len(self) == 0:
            return []
        if category is not None:
            return self._search_category(query, k, by_product, excluded, category)
        return self._search(query, k, by_product, excluded, search_k, rerank)

    def _search_category(self, query: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], category: str) -> list[SearchResult]:
        """An exact search over the category's rows."""
        return self._exact_answer(query, k, by_product, excluded, rows=self.category_rows(category))

    def query_batch(
        self,
        embeddings: np.ndarray,
        k: int = 20,
        *,
        search_k: int | None = None,
        by_product: bool = True,
        rerank: bool = True,
        exclude: Iterable[str] | None = None,
        categories: Sequence[str | None] | None = None,
    ) -> list[list[SearchResult]]:
        """``query`` for each row of a ``[Q, D]`` array (with one category or None per row); the same answers."""
        self._require_ready("query_batch")
        array = check_batch(embeddings, self.dimension)
        excluded = ranking.exclude_set(exclude)
        categories = _categories(categories, len(array))
        if any(c is not None for c in categories):
            return [
                self.query(q, k, search_k=search_k, by_product=by_product, rerank=rerank, exclude=excluded, category=c)
                for q, c in zip(array, categories)
            ]
        k = check_positive_int("k", k)
        if len(self) == 0 or len(array) == 0:
            return [[] for _ in range(len(array))]
        queries = np.stack([check_query(q, self.dimension) for q in array])
        return self._search_many(queries, k, by_product, excluded, search_k, rerank)

    def _search_many(self, queries: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], search_k: int | None, rerank: bool) -> list[list[SearchResult]]:
        """``_search`` for each of several checked queries (a subclass may do them together)."""
        return [self._search(q, k, by_product, excluded, search_k, rerank) for q in queries]

    def rank_images(self, embeddings: np.ndarray, depth: int, *, categories: Sequence[str | None] | None = None,
                    with_similarities: bool = False) -> list[Any]:
        """Each query's image ranking (rows, best first), ``depth`` images deep: what evaluation scores.

        With ``with_similarities``, each is a pair ``(rows, similarities)``.
        """
        depth = max(1, min(int(depth), len(self))) if len(self) else 1
        answers = self.query_batch(np.asarray(embeddings, np.float32), k=depth, by_product=False, categories=categories)
        rows = [np.asarray([a.row for a in results], np.int64) for results in answers]
        if not with_similarities:
            return rows
        return [(r, np.asarray([a.similarity for a in results], np.float64)) for r, results in zip(rows, answers)]

    def _filter(self, excluded: frozenset[str]) -> ranking.Filter:
        return ranking.Filter(excluded, self.dead)

    def _require_ready(self, action: str) -> None:
        """Subclasses refuse queries before they can answer (an unbuilt Annoy forest)."""

    # -- saving

    def config(self) -> dict[str, Any]:
        return {"dimension": self.dimension, "model_fingerprint": self.model_fingerprint, "model_version": self.model_version}

    def _kind_files(self) -> dict[str, str]:
        """The kind's own files beside vectors and items: ``{role: file name}``."""
        return {}

    def _files(self) -> dict[str, str]:
        """Every file of the folder, by role, as the manifest names them."""
        return {**self._kind_files(), "vectors": VECTORS_FILE, "items": ITEMS_FILE}

    def _write_kind_files(self, staging: Path) -> None:
        """Writes the kind's own files into ``staging``."""

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Writes the index folder atomically (temporary folder, then rename). Returns its path."""
        self._require_ready("save")
        destination = Path(directory)
        parent = destination.parent
        parent.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            if not destination.is_dir():
                raise ConfigError(f"the index destination must be a directory. Received: {destination} is a file")
            if any(destination.iterdir()) and not (destination / MANIFEST_FILE).is_file():
                raise ConfigError(f"refusing to replace a non-empty directory that is not an index (no manifest.json). Received: {destination}")
        tag = uuid.uuid4().hex[:8]
        staging = parent / f".{destination.name}.tmp-{tag}"
        self.write_folder(staging)
        old = parent / f".{destination.name}.old-{tag}"
        replaced = destination.exists()
        if replaced:
            os.rename(destination, old)
        try:
            os.rename(staging, destination)
        except BaseException:
            if replaced:
                os.rename(old, destination)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(parent)
        if replaced:
            shutil.rmtree(old, ignore_errors=True)
        self.folder = destination
        logger.info("saved an index of %d items to %s", len(self), destination)
        return destination

    def write_folder(self, staging: Path) -> None:
        """Writes every file of the index into a new folder ``staging`` (removed again on failure)."""
        staging.mkdir()
        try:
            self._write_kind_files(staging)
            self._write_vectors(staging / VECTORS_FILE)
            self._write_items(staging / ITEMS_FILE)
            self._write_manifest(staging / MANIFEST_FILE)
            fsync_dir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _write_vectors(self, path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, np.ascontiguousarray(self.vectors, dtype=np.float32))
            handle.flush()
            os.fsync(handle.fileno())

    def _write_items(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            for row, item in enumerate(self._items):
                handle.write(json.dumps({"row": row, **item.to_dict()}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _write_manifest(self, path: Path) -> None:
        from street2shop import __version__

        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            **self.config(),
            "count": len(self),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "package_version": __version__,
            "files": self._files(),
        }
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())


# ----------------------------------------------------------------------------- reading a folder


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an index directory, checked for format version and required keys."""
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


def open_folder(
    directory: str | os.PathLike[str], kind: str, files: Mapping[str, str], expected_fingerprint: str | None, expected_dimension: int | None
) -> tuple[Path, dict[str, Any], dict[str, Path]]:
    """An index folder of ``kind``, checked: its root, its manifest, and the paths of its ``files`` (role → default name)."""
    root = Path(directory)
    manifest = read_manifest(root)
    found = manifest.get("kind", "annoy")
    if found != kind:
        raise DataError(f"{root} holds an index of kind {found!r}, not {kind!r}; open it with load_index. Received: kind={found!r}")
    check_expected(manifest, root, expected_fingerprint, expected_dimension)
    return root, manifest, file_paths(manifest, root, files)


def check_expected(manifest: Mapping[str, Any], root: Path, expected_fingerprint: str | None, expected_dimension: int | None) -> None:
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


def file_paths(manifest: Mapping[str, Any], root: Path, defaults: Mapping[str, str]) -> dict[str, Path]:
    files = manifest.get("files", {})
    paths = {name: root / files.get(name, default) for name, default in defaults.items()}
    for name, path in paths.items():
        if not path.is_file():
            raise DataError(f"the index directory is missing its {name} file. Received: {path} does not exist")
    return paths


def load_vectors(path: Path, count: int, dimension: int) -> np.ndarray:
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"the vectors file must be a .npy array. Received: {path}: {exc}") from exc
    if vectors.shape != (count, dimension) or vectors.dtype != np.float32:
        raise DataError(f"the vectors file must be float32 [{count}, {dimension}]. Received: {vectors.dtype} {vectors.shape} in {path}")
    return vectors


def read_items(path: Path, count: int) -> list[Item]:
    items: list[Item] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                row = record["row"]
                item = Item.from_dict(record)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise DataError(f"each item line must be a JSON object with row and product_id. Received: line {line_number} of {path}") from exc
            if row != len(items):
                raise DataError(f"item rows must be 0, 1, 2, ... in order. Received: row={row!r} on line {line_number} of {path}")
            items.append(item)
    if len(items) != count:
        raise DataError(f"the item table must have {count} rows. Received: {len(items)} in {path}")
    return items
