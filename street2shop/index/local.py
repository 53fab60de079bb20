"""An index held in this process: its vectors (memory-mapped from its folder) and its item table, saved as an index folder.

:class:`LocalIndex` is what the exact, the Annoy and the layered index share
beneath the search interface: rows of unit vectors with one
:class:`~street2shop.items.Item` each, the exact answer over any rows (the one
ranking rule), exact category filters, removed rows that are never answered,
and ``save`` / ``write_folder`` in the index folder format
(:mod:`street2shop.index.folder`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from street2shop.fileio import staged_folder
from street2shop.index import folder as index_folder
from street2shop.index import ranking
from street2shop.index.base import SearchIndex, SearchResult, _result
from street2shop.items import Item, catalogue_photos

logger = logging.getLogger(__name__)


class LocalIndex(SearchIndex):
    """The vectors and item table of an index, in this process; subclasses choose how the whole catalogue is searched.

    A subclass provides ``vectors`` (float32 unit rows), ``_search`` and
    ``exact()``, and its own files in ``_kind_files`` / ``_write_kind_files``.
    """

    def __init__(self, dimension: int, *, model_fingerprint: str | None = None, model_version: int | None = None) -> None:
        super().__init__(dimension, model_fingerprint=model_fingerprint, model_version=model_version)
        self.dead: np.ndarray | None = None  # bool per row: removed (tombstoned) rows, never answered
        self.folder: Path | None = None  # the folder it was loaded from or saved to
        self._items: list[Item] = []
        self._category_rows: dict[str | None, np.ndarray] | None = None
        self._categories: list[str] | None = None
        self._image_items: dict[str, Item] | None = None
        self._photos: dict[str, Item] | None = None
        self._items_view: tuple[tuple[int, int], tuple[Item, ...]] | None = None

    @property
    def vectors(self) -> np.ndarray:
        raise NotImplementedError

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

    def _forget(self) -> None:
        """Drops what was worked out from the items (after rows are added or removed)."""
        self._category_rows = self._image_items = self._photos = self._categories = None

    def image_item(self, image_id: str) -> Item | None:
        """The item of the image with this :attr:`Item.image_id`, not removed (its catalogue photo's if it is both; worked out once)."""
        if self._image_items is None:
            found: dict[str, Item] = {}
            dead = self.dead
            for row, item in enumerate(self._items):
                if dead is not None and row < len(dead) and dead[row]:
                    continue
                if item.image_path and (item.image_id not in found or (item.domain == "shop" and found[item.image_id].domain != "shop")):
                    found[item.image_id] = item
            self._image_items = found
        return self._image_items.get(image_id)

    def catalogue_photos(self, product_ids: Iterable[str]) -> dict[str, Item]:
        """The catalogue photo of each of these products that has one (worked out once for every product)."""
        if self._photos is None:
            self._photos = catalogue_photos(self._items, self.dead)
        return {p: self._photos[p] for p in product_ids if p in self._photos}

    def categories(self) -> list[str]:
        """The categories of the items not removed, sorted (worked out once)."""
        if self._categories is None:
            dead = self.dead
            self._categories = sorted({item.category for row, item in enumerate(self._items) if item.category and (dead is None or not dead[row])})
        return list(self._categories)

    def category_rows(self, category: str | None) -> np.ndarray:
        """The rows of the items of ``category``."""
        if self._category_rows is None:
            by: dict[str | None, list[int]] = {}
            for row, item in enumerate(self._items):
                by.setdefault(item.category, []).append(row)
            self._category_rows = {c: np.asarray(rows, np.int64) for c, rows in by.items()}
        return self._category_rows.get(category, np.zeros(0, np.int64))

    # -- searching

    def _filter(self, excluded: frozenset[str]) -> ranking.Filter:
        return ranking.Filter(excluded, self.dead)

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

    def _search_category(self, query: np.ndarray, k: int, by_product: bool, excluded: frozenset[str], category: str) -> list[SearchResult]:
        """An exact search over the category's rows."""
        return self._exact_answer(query, k, by_product, excluded, rows=self.category_rows(category))

    # -- saving

    def _kind_files(self) -> dict[str, str]:
        """The kind's own files beside vectors and items: ``{role: file name}``."""
        return {}

    def _files(self) -> dict[str, str]:
        """Every file of the folder, by role, as the manifest names them."""
        return {**self._kind_files(), "vectors": index_folder.VECTORS_FILE, "items": index_folder.ITEMS_FILE}

    def _write_kind_files(self, folder: Path) -> None:
        """Writes the kind's own files into ``folder``."""

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Writes the index folder atomically (a staging folder, then a rename; an index already there is replaced). Returns its path."""
        self._require_ready("save")
        destination = index_folder.check_replaceable(Path(directory))
        with staged_folder(destination, replace=True) as staging:
            self.write_folder(staging)
        self.folder = destination
        logger.info("saved an index of %d items to %s", len(self), destination)
        return destination

    def write_folder(self, folder: Path) -> None:
        """Writes every file of the index into the new, empty ``folder``, the manifest last."""
        self._write_kind_files(folder)
        index_folder.write_vectors(folder / index_folder.VECTORS_FILE, self.vectors)
        index_folder.write_items(folder / index_folder.ITEMS_FILE, self._items)
        index_folder.write_manifest(folder / index_folder.MANIFEST_FILE, self.kind, self.config(), len(self), self._files())
