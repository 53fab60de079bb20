"""Retrieval metrics, street photos against the shop catalogue.

Protocol (as in the street-to-shop literature): every street photo of a split
is a query, cropped to its box when it has one; the gallery is the shop
images: the whole catalogue by default (what a shop's search does), or only
the query's category when asked (``by_category``, the Exact Street2Shop
protocol; easier, so its figures are higher). Every report says which.
A gallery ranking is made of images, ranked by the one rule of
:mod:`street2shop.index.ranking` through an index (the Annoy index, or an
exact one); it is de-duplicated by product (a product appears once, at its
best image) and a query is correct at k when its product is among the first k
distinct products.

Metrics, per category and overall:

- ``top_k``: top-k accuracy on the product ranking (k = 1, 5, 10, 20);
- ``recall_at_k``: share of the query's product's gallery images among the
  first k gallery images (equals top-k when every product has one image);
- ``map``: mean average precision over the image ranking;
- ``mrr``: mean reciprocal rank of the correct product in the product ranking.

Queries whose product has no image in their gallery cannot be answered: they
are left out of every metric and counted in ``unanswerable``.

The gallery is whatever the index holds as references: with labelled customer
photos indexed beside the catalogue (``embed --domains shop,street``), a
product ranks at its best image of either kind, and its customer photos count
as relevant images (recall@k, mAP). A query that is itself one of the
index's customer photos would find itself, so it is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from street2shop.errors import ConfigError
from street2shop.index import ranking

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10, 20)


@dataclasses.dataclass
class QueryResult:
    """One query's image ranking over its gallery (gallery row indices, best first), and their similarities."""

    product_id: str
    category: str | None
    ranking: np.ndarray  # gallery rows, best first (may be truncated by an index)
    similarities: np.ndarray | None = None  # cosine of each row of ``ranking``, when known


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
        rows = np.asarray(result.ranking, dtype=np.int64)
        relevant = codes[rows] == code_of.get(result.product_id, -1)
        rank = ranking.product_rank(rows, gallery_products.__getitem__, result.product_id)
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
    gallery_products = list(gallery_products)
    return [ranking.product_rank(result.ranking, gallery_products.__getitem__, result.product_id) for result in results]


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
    by_category: bool = False  # each query searched only its category (else the whole catalogue)
    gallery_labels: list[dict[str, str]] = dataclasses.field(default_factory=list)  # the manifest's other columns per row
    gallery_domains: list[str] = dataclasses.field(default_factory=list)  # per row: shop, or street (a customer photo); empty: all shop

    @property
    def searched(self) -> str:
        """What each query was searched against, in words."""
        return "the query's category only" if self.by_category else "the whole catalogue"


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
    gallery_labels: Sequence[dict[str, str]] = (),
    gallery_domains: Sequence[str] = (),
    index: Any = None,
    ks: Sequence[int] = DEFAULT_KS,
    bootstrap_samples: int = 2000,
) -> Evaluation:
    """Street queries against a gallery: exact search, or through ``index`` when given.

    Categories restrict each query's gallery to its category (the Exact
    Street2Shop protocol); pass None for both to search the whole gallery.
    Returns metrics with 95% bootstrap intervals (over queries) of top-k
    and MRR, each query's ranking with its similarities, and which of the two
    it was (``Evaluation.by_category``).
    """
    use_categories = query_categories is not None and gallery_categories is not None and any(c is not None for c in gallery_categories)
    qc = list(query_categories) if use_categories else None
    gc = list(gallery_categories) if use_categories else None
    if index is None:
        index = _gallery_index(query_embeddings, gallery_embeddings, gallery_products, gallery_categories)
    depth = len(index) if index.kind == "exact" else max(200, 10 * max(ks))
    rankings = index.rank_images(query_embeddings, depth, categories=qc, with_similarities=True)
    results = [QueryResult(p, qc[i] if qc else None, rows, sims) for i, (p, (rows, sims)) in enumerate(zip(query_products, rankings))]
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
    return Evaluation(metrics, intervals, ranks, results, list(query_paths), list(gallery_products), list(gallery_paths),
                      by_category=use_categories, gallery_labels=[dict(labels) for labels in gallery_labels],
                      gallery_domains=list(gallery_domains))


def _gallery_index(query_embeddings: np.ndarray, gallery_embeddings: np.ndarray | None, gallery_products: Sequence[str],
                   gallery_categories: Sequence[str | None] | None) -> Any:
    """An exact index over gallery embeddings, to rank with the one rule."""
    from street2shop.index import ExactIndex, Item

    q = np.asarray(query_embeddings)
    g = np.asarray(gallery_embeddings)
    if q.ndim != 2 or g.ndim != 2 or (len(g) and q.shape[1] != g.shape[1]):
        raise ConfigError(f"embeddings must be [N, D] with the same D. Received: queries {q.shape}, gallery {g.shape}")
    categories = list(gallery_categories) if gallery_categories is not None else [None] * len(g)
    index = ExactIndex(g.shape[1])
    if len(g):
        index.add(g, [Item(str(p), category=c) for p, c in zip(gallery_products, categories)])
    return index


def evaluate_queries(
    queries: Sequence[Any],
    embedder: Any,
    index: Any,
    *,
    by_category: bool = False,
    exact: bool = False,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 32,
    progress: bool | str = False,
) -> Evaluation:
    """Street photo records against an indexed catalogue, embedded with ``embedder``.

    Queries are cropped to their box; a query whose image cannot be read or
    decoded is skipped, counted and logged (``Evaluation.skipped``), the rest
    go on. ``exact`` ranks by exact cosine over the index's stored vectors
    instead of Annoy. The embedder's model must be the index's
    (ModelMismatchError otherwise, checked before any query is embedded and
    again on the answers).

    Raises:
        DataError: a query photo is one of the index's customer photos (it would find itself).
    """
    from street2shop.embed import embed_records
    from street2shop.errors import DataError

    dead = getattr(index, "dead", None)  # removed rows (a layered index's tombstones) are never answered
    indexed = {item.image_path for row, item in enumerate(index.items) if item.domain == "street" and not (dead is not None and dead[row])}
    inside = [r.image_path for r in queries if r.image_path in indexed]
    if inside:
        raise DataError(
            f"{len(inside)} of the {len(queries)} query photos are customer photos the index holds as references "
            f"({', '.join(inside[:3])}{' ...' if len(inside) > 3 else ''}): each would find itself. Evaluate with photos kept out of "
            f"the index (embed --reference-splits names the splits it indexes). Received: {len(inside)} query photos in the index"
        )
    index.check_model(embedder.identity())
    embedded = embed_records(list(queries), embedder, batch_size=batch_size, progress=progress)
    index.check_model(embedded.identity, "the answers of the embedder")
    kept = [queries[r] for r in embedded.rows]
    items = index.items
    evaluation = evaluate_embeddings(
        embedded.vectors, [r.product_id for r in kept], None, [it.product_id for it in items],
        query_categories=[r.category for r in kept] if by_category else None,
        gallery_categories=[it.category for it in items] if by_category else None,
        query_paths=[r.image_path for r in kept], gallery_paths=[it.image_path for it in items],
        index=index.exact() if exact else index, ks=ks,
    )
    evaluation.skipped = embedded.skipped
    evaluation.query_boxes = [r.box.as_ltwh() if r.box is not None else None for r in kept]
    evaluation.gallery_labels = [dict(it.labels) for it in items]
    evaluation.gallery_domains = [it.domain for it in items]
    return evaluation


def evaluate_manifest(
    manifest: str,
    *,
    index: str,
    split: str = "val",
    model: str | None = None,
    server: str | None = None,
    model_name: str = "street2shop",
    batch_size: int = 32,
    by_category: bool = False,
    exact: bool = False,
    out: str = "report",
    name: str = "model",
    label_column: str | None = None,
    progress: bool | str = False,
    config: dict[str, Any] | None = None,
) -> tuple[Evaluation, dict[str, Any]]:
    """``street2shop evaluate``: the street photos of a manifest's ``split`` against an index folder; writes the report.

    The embedder (``model`` in process, or ``server``) must use the index's
    model. Each query searches the whole catalogue unless ``by_category``.
    ``label_column`` names products in the HTML page (see
    :func:`street2shop.report.html_page`).

    Returns:
        The :class:`Evaluation` and the report's paths.
    """
    from street2shop.data.records import read_manifest_csv
    from street2shop.embedders import open_embedder
    from street2shop.errors import DataError
    from street2shop.index import load_index
    from street2shop.items import label_column_of
    from street2shop.report import write_report

    records = read_manifest_csv(manifest)
    queries = [r for r in records if r.domain == "street" and r.split == split]
    if not queries:
        splits = sorted({r.split for r in records if r.domain == "street"})
        raise DataError(f"no street photo of split {split!r} in {manifest}; its street photos are in split(s) {splits}. Received: --split {split!r}")
    catalogue = load_index(index)
    if catalogue.identity is None:
        catalogue.check_model(None)  # refuses, saying why
    label_column_of([item.labels for item in catalogue.items], label_column)  # a wrong column fails before any photo is embedded
    if by_category and not any(item.category for item in catalogue.items):
        logger.warning("--by-category: the index's catalogue has no categories, so each query searches the whole catalogue")
    with open_embedder(model, server, model_name=model_name, batch_size=batch_size, expected=catalogue.identity) as embedder:
        evaluation = evaluate_queries(queries, embedder, catalogue, by_category=by_category, exact=exact, batch_size=batch_size, progress=progress)
    paths = write_report({name: evaluation}, out, config=config, label_column=label_column)
    return evaluation, paths
