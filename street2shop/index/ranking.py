"""The one ranking rule: cosine similarity, ties by row, each product once at its best image.

Every ranking in street2shop goes through here: the exact and the Annoy
index (single and batch queries, re-ranked candidates), evaluation, the
colour-histogram baseline and the report. So the same candidate gets the same
number everywhere, and two places never break a tie differently.

- Similarities are cosines computed in float64 from the stored float32 unit
  vectors (:func:`cosines`).
- Order: higher similarity first; equal similarities by row, lower first
  (:func:`order`): deterministic, and "row" is the order images were added.
- By product: a product appears once, at its best image (:func:`collect`,
  :func:`distinct_products`); a query's rank is the position of its product
  in that list (:func:`product_rank`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def cosines(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosines of ``vectors[rows]`` (unit rows) with a unit ``query``, in float64."""
    if len(rows) == 0:
        return np.zeros(0)
    return np.asarray(vectors[rows], dtype=np.float64) @ np.asarray(query, dtype=np.float64)


def cosine_matrix(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """``[Q, G]`` cosines of any (not necessarily unit) rows, in float64; a zero row has cosine 0 with everything."""
    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)

    return unit(queries) @ unit(gallery).T


def order(rows: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and similarities, best first: higher similarity, then lower row."""
    rows = np.asarray(rows, dtype=np.int64)
    sims = np.asarray(sims, dtype=np.float64)
    idx = np.lexsort((rows, -sims))
    return rows[idx], sims[idx]


def top(sims: np.ndarray, n: int) -> np.ndarray:
    """The rows of the ``n`` highest of ``sims`` (all rows tied at the boundary kept), unordered."""
    count = len(sims)
    if n >= count:
        return np.arange(count)
    threshold = np.partition(sims, count - n)[count - n]
    return np.flatnonzero(sims >= threshold)


def distinct_products(rows: Sequence[int], product_of: Callable[[int], str]) -> list[tuple[int, str]]:
    """``(row, product)`` of each product's first (best) row, in order."""
    seen: set[str] = set()
    out = []
    for row in rows:
        product = product_of(int(row))
        if product not in seen:
            seen.add(product)
            out.append((int(row), product))
    return out


def product_rank(rows: Sequence[int], product_of: Callable[[int], str], product: str) -> int | None:
    """The 1-based rank of ``product`` among the distinct products of a ranking; None if absent."""
    for rank, (_, p) in enumerate(distinct_products(rows, product_of), start=1):
        if p == product:
            return rank
    return None


@dataclasses.dataclass(frozen=True)
class Filter:
    """Which rows may be answers: not of an excluded product, and not removed from the catalogue (``dead``)."""

    exclude: frozenset[str] = frozenset()
    dead: np.ndarray | None = None  # bool per row: removed (tombstones)

    def keeps(self, row: int, item: Any) -> bool:
        if self.dead is not None and row < len(self.dead) and self.dead[row]:
            return False
        return item.product_id not in self.exclude

    @property
    def active(self) -> bool:
        return bool(self.exclude) or (self.dead is not None and bool(self.dead.any()))


def enough(rows: np.ndarray, items: Sequence[Any], k: int, by_product: bool, keep: Filter) -> bool:
    """Whether ``rows`` hold ``k`` answers (distinct products with ``by_product``) that ``keep`` keeps."""
    kept = [items[r] for r in rows.tolist() if keep.keeps(r, items[r])]
    if by_product:
        return len({item.product_id for item in kept}) >= k
    return len(kept) >= k


def collect(
    rows: np.ndarray,
    sims: np.ndarray,
    items: Sequence[Any],
    k: int,
    *,
    by_product: bool,
    keep: Filter = Filter(),
    make: Callable[..., Any],
) -> list[Any]:
    """The first ``k`` answers of ranked ``rows`` that ``keep`` keeps, as ``make(rank=, item=, row=, similarity=)``."""
    results: list[Any] = []
    seen: set[str] = set()
    for row, sim in zip(rows.tolist(), sims.tolist()):
        item = items[row]
        if not keep.keeps(row, item):
            continue
        if by_product:
            if item.product_id in seen:
                continue
            seen.add(item.product_id)
        results.append(make(rank=len(results) + 1, item=item, row=int(row), similarity=float(min(1.0, max(-1.0, sim)))))
        if len(results) == k:
            break
    return results


def exclude_set(exclude: Any) -> frozenset[str]:
    if exclude is None:
        return frozenset()
    if isinstance(exclude, str):
        return frozenset([exclude])
    return frozenset(str(p) for p in exclude)
