"""Retrieval metrics, street photos against the shop catalogue.

Protocol (as in the street-to-shop literature): every street photo of a split
is a query, cropped to its box when it has one; the gallery is the shop
images, restricted to the query's category when the dataset has categories.
A gallery ranking is made of images; it is de-duplicated by product (a
product appears once, at its best image) and a query is correct at k when
its product is among the first k distinct products.

Metrics, per category and overall:

- ``top_k``: top-k accuracy on the product ranking (k = 1, 5, 10, 20);
- ``recall_at_k``: share of the query's product's gallery images among the
  first k gallery images (equals top-k when every product has one image);
- ``map``: mean average precision over the image ranking;
- ``mrr``: mean reciprocal rank of the correct product in the product ranking.

Queries whose product has no image in their gallery cannot be answered: they
are left out of every metric and counted in ``unanswerable``.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from street2shop.errors import ConfigError

DEFAULT_KS = (1, 5, 10, 20)


@dataclasses.dataclass
class QueryResult:
    """One query's image ranking over its gallery (gallery row indices, best first)."""

    product_id: str
    category: str | None
    ranking: np.ndarray  # gallery rows, best first (may be truncated by an index)


def rank_exact(
    query_embeddings: np.ndarray,
    gallery_embeddings: np.ndarray,
    *,
    query_categories: Sequence[str | None] | None = None,
    gallery_categories: Sequence[str | None] | None = None,
) -> list[np.ndarray]:
    """Full image rankings by cosine similarity; ties keep gallery order.

    With categories, a query's ranking holds only gallery images of its
    category (all of them when the query has no category).
    """
    q = np.asarray(query_embeddings, np.float32)
    g = np.asarray(gallery_embeddings, np.float32)
    if q.ndim != 2 or g.ndim != 2 or (len(g) and q.shape[1] != g.shape[1]):
        raise ConfigError(f"embeddings must be [N, D] with the same D. Received: queries {q.shape}, gallery {g.shape}")
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    rankings = []
    g_cats = np.asarray(gallery_categories, dtype=object) if gallery_categories is not None else None
    block = 256  # queries per matrix product: memory stays O(block x gallery)
    for start in range(0, len(q), block):
        similarity = qn[start : start + block] @ gn.T
        for j in range(len(similarity)):
            i = start + j
            order = np.argsort(-similarity[j], kind="stable")
            if g_cats is not None and query_categories is not None and query_categories[i] is not None:
                order = order[g_cats[order] == query_categories[i]]
            rankings.append(order)
    return rankings


def _dedup_products(ranking: np.ndarray, gallery_products: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(gallery_products[r] for r in ranking))


def average_precision(relevant: np.ndarray, n_relevant: int | None = None) -> float:
    """AP of one ranking from its boolean relevance in rank order.

    ``n_relevant`` is how many relevant items exist in all (defaults to those
    in the ranking); a truncated ranking that misses some is penalised.
    """
    hits = np.flatnonzero(relevant)
    total = len(hits) if n_relevant is None else n_relevant
    if total == 0:
        return 0.0
    return float(np.sum(np.arange(1, len(hits) + 1) / (hits + 1)) / total)


def retrieval_metrics(
    results: Sequence[QueryResult],
    gallery_products: Sequence[str],
    *,
    gallery_categories: Sequence[str | None] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, Any]:
    """Top-k accuracy, recall@k, mAP and MRR, overall and per category.

    Args:
        results: one QueryResult per query.
        gallery_products: product id of each gallery row.
        gallery_categories: category of each gallery row (to know how many
            relevant images a query's gallery holds); None when uncategorised.
        ks: the k values.

    Returns:
        ``{"overall": {...}, "per_category": {cat: {...}}}``, each with
        ``queries``, ``unanswerable``, ``top_k`` {k: acc}, ``recall_at_k``
        {k: r}, ``map`` and ``mrr``.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"ks must be positive integers. Received: ks={ks}")
    gallery_products = list(gallery_products)
    code_of = {p: i for i, p in enumerate(dict.fromkeys(gallery_products))}
    codes = np.array([code_of[p] for p in gallery_products], dtype=np.int64)
    count_by: dict[tuple[str | None, str], int] = defaultdict(int)
    count_all: dict[str, int] = defaultdict(int)
    for row, product in enumerate(gallery_products):
        count_all[product] += 1
        if gallery_categories is not None:
            count_by[(gallery_categories[row], product)] += 1

    per_query: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    unanswerable: dict[str | None, int] = defaultdict(int)
    for result in results:
        if gallery_categories is not None and result.category is not None:
            n_relevant = count_by[(result.category, result.product_id)]
        else:
            n_relevant = count_all[result.product_id]
        if n_relevant == 0:
            unanswerable[result.category] += 1
            continue
        ranking = np.asarray(result.ranking, dtype=np.int64)
        relevant = codes[ranking] == code_of.get(result.product_id, -1)
        products = _dedup_products(ranking, gallery_products)
        rank = products.index(result.product_id) + 1 if result.product_id in products else None
        per_query[result.category].append({
            "rank": rank,
            "ap": average_precision(relevant, n_relevant),
            "recall": {k: float(relevant[:k].sum()) / n_relevant for k in ks},
        })

    def summarise(rows: list[dict[str, Any]], missing: int) -> dict[str, Any]:
        n = len(rows)
        if n == 0:
            return {"queries": 0, "unanswerable": missing, "top_k": {k: 0.0 for k in ks}, "recall_at_k": {k: 0.0 for k in ks}, "map": 0.0, "mrr": 0.0}
        return {
            "queries": n,
            "unanswerable": missing,
            "top_k": {k: sum(1 for r in rows if r["rank"] is not None and r["rank"] <= k) / n for k in ks},
            "recall_at_k": {k: float(np.mean([r["recall"][k] for r in rows])) for k in ks},
            "map": float(np.mean([r["ap"] for r in rows])),
            "mrr": float(np.mean([1.0 / r["rank"] if r["rank"] else 0.0 for r in rows])),
        }

    all_rows = [row for rows in per_query.values() for row in rows]
    report = {"overall": summarise(all_rows, sum(unanswerable.values()))}
    categories = sorted({c for c in list(per_query) + list(unanswerable) if c is not None})
    if categories:
        report["per_category"] = {c: summarise(per_query.get(c, []), unanswerable.get(c, 0)) for c in categories}
    return report


def per_query_ranks(results: Sequence[QueryResult], gallery_products: Sequence[str]) -> list[int | None]:
    """Rank (1-based) of each query's product in its de-duplicated ranking, None if absent."""
    ranks = []
    gallery_products = list(gallery_products)
    for result in results:
        products = _dedup_products(np.asarray(result.ranking, np.int64), gallery_products)
        ranks.append(products.index(result.product_id) + 1 if result.product_id in products else None)
    return ranks


def bootstrap_interval(values: Sequence[float], *, samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query values."""
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    block = max(1, 2_000_000 // len(v))  # resamples per draw: bounded memory
    means = np.concatenate([
        v[rng.integers(0, len(v), size=(min(block, samples - k), len(v)))].mean(axis=1) for k in range(0, samples, block)
    ])
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def rank_with_index(
    index: Any,
    query_embeddings: np.ndarray,
    *,
    query_categories: Sequence[str | None] | None = None,
    depth: int = 200,
) -> list[np.ndarray]:
    """Image rankings (index rows, best first) from a CatalogIndex, ``depth`` images deep.

    With categories, rows of other categories are dropped from a query's
    ranking (the index is searched ``depth`` deep first).
    """
    depth = max(1, min(int(depth), len(index)))
    rankings = []
    for i, answers in enumerate(index.query_batch(np.asarray(query_embeddings, np.float32), k=depth, by_product=False)):
        rows = [a.row for a in answers]
        if query_categories is not None and query_categories[i] is not None:
            rows = [a.row for a in answers if a.category == query_categories[i]]
        rankings.append(np.asarray(rows, np.int64))
    return rankings


@dataclasses.dataclass
class Evaluation:
    """Metrics plus what is needed to explain them (per-query ranks and rankings)."""

    metrics: dict[str, Any]
    intervals: dict[str, tuple[float, float]]
    ranks: list[int | None]
    results: list[QueryResult]
    query_paths: list[str]
    gallery_products: list[str]
    gallery_paths: list[str]
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    query_boxes: list[tuple[float, float, float, float] | None] = dataclasses.field(default_factory=list)


def evaluate_embeddings(
    query_embeddings: np.ndarray,
    query_products: Sequence[str],
    gallery_embeddings: np.ndarray | None,
    gallery_products: Sequence[str],
    *,
    query_categories: Sequence[str | None] | None = None,
    gallery_categories: Sequence[str | None] | None = None,
    query_paths: Sequence[str] = (),
    gallery_paths: Sequence[str] = (),
    index: Any = None,
    ks: Sequence[int] = DEFAULT_KS,
    bootstrap_samples: int = 2000,
) -> Evaluation:
    """Street queries against a gallery: exact search, or through ``index`` when given.

    Categories restrict each query's gallery to its category (the Exact
    Street2Shop protocol); pass None for both to search the whole gallery.
    Returns metrics with 95% bootstrap intervals (over queries) of top-k
    and MRR.
    """
    use_categories = query_categories is not None and gallery_categories is not None and any(c is not None for c in gallery_categories)
    qc = list(query_categories) if use_categories else None
    gc = list(gallery_categories) if use_categories else None
    if index is not None:
        rankings = rank_with_index(index, query_embeddings, query_categories=qc, depth=max(200, 10 * max(ks)))
    else:
        rankings = rank_exact(query_embeddings, gallery_embeddings, query_categories=qc, gallery_categories=gc)
    results = [QueryResult(p, qc[i] if qc else None, r) for i, (p, r) in enumerate(zip(query_products, rankings))]
    metrics = retrieval_metrics(results, gallery_products, gallery_categories=gc, ks=ks)
    ranks = per_query_ranks(results, gallery_products)
    in_gallery = set(gallery_products)
    in_category = set(zip(gc, gallery_products)) if gc is not None else set()

    def answerable_(res: QueryResult) -> bool:
        if gc is None or res.category is None:
            return res.product_id in in_gallery
        return (res.category, res.product_id) in in_category

    answerable = [r for r, res in zip(ranks, results) if answerable_(res)]
    intervals: dict[str, tuple[float, float]] = {}
    for k in sorted(set(ks)):
        intervals[f"top_{k}"] = bootstrap_interval([1.0 if r is not None and r <= k else 0.0 for r in answerable], samples=bootstrap_samples)
    intervals["mrr"] = bootstrap_interval([1.0 / r if r else 0.0 for r in answerable], samples=bootstrap_samples)
    return Evaluation(metrics, intervals, ranks, results, list(query_paths), list(gallery_products), list(gallery_paths))


def evaluate_queries(
    queries: Sequence[Any],
    embedder: Any,
    index: Any,
    *,
    by_category: bool = True,
    exact: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 32,
    progress: bool = False,
) -> Evaluation:
    """Street photo records against an indexed catalogue, embedded with ``embedder``.

    Queries are cropped to their box; a query whose image cannot be read or
    decoded is skipped, counted and logged (``Evaluation.skipped``), the rest
    go on. ``exact`` ranks by exact cosine over the index's stored vectors
    instead of Annoy.
    """
    from street2shop.embed import embed_records

    rows, vectors, skipped = embed_records(list(queries), embedder, batch_size=batch_size, progress=progress)
    kept = [queries[r] for r in rows]
    items = index.items
    evaluation = evaluate_embeddings(
        vectors, [r.product_id for r in kept], index.vectors if exact else None, [it.product_id for it in items],
        query_categories=[r.category for r in kept] if by_category else None,
        gallery_categories=[it.category for it in items] if by_category else None,
        query_paths=[r.image_path for r in kept], gallery_paths=[it.image_path for it in items],
        index=None if exact else index, ks=ks,
    )
    evaluation.skipped = skipped
    evaluation.query_boxes = [r.box.as_ltwh() if r.box is not None else None for r in kept]
    return evaluation
