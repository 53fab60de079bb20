"""Evaluation reports: JSON (every number), Markdown table, PNG plot, HTML page.

Each says what the queries searched (the whole catalogue, or each query's
category only). The HTML page names products by a label column
(``product_name`` when the catalogue has one), lists the products missed
most often, and shows a sample of queries: what the model saw, the products
found with their similarities, the right one framed in green (and shown
after them when it ranks lower). A product that matched at one of its
customer photos (indexed as a reference) is shown by its catalogue photo,
marked "matched a customer photo" with that photo small beside the mark.
Images are embedded, so the page is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from street2shop.data.image import Box
from street2shop.fileio import write_atomic
from street2shop.index import ranking
from street2shop.items import Item, catalogue_photos, label_column_of

logger = logging.getLogger(__name__)


def markdown_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per run: top-k accuracies (with intervals when present), mAP, MRR, what the queries searched."""
    first = next(iter(runs.values()))
    ks = sorted(int(k) for k in first["metrics"]["overall"]["top_k"])
    header = "| run | queries | " + " | ".join(f"top-{k}" for k in ks) + " | mAP | MRR | searched |"
    lines = [header, "|" + "---|" * (5 + len(ks))]
    for name, run in runs.items():
        overall = run["metrics"]["overall"]
        intervals = run.get("intervals", {})
        cells = []
        for k in ks:
            value = overall["top_k"][k] if k in overall["top_k"] else overall["top_k"][str(k)]
            ci = intervals.get(f"top_{k}")
            cells.append(f"{100 * value:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""))
        lines.append(f"| {name} | {overall['queries']} | " + " | ".join(cells)
                     + f" | {100 * overall['map']:.1f} | {100 * overall['mrr']:.1f} | {run.get('searched', '')} |")
    return "\n".join(lines) + "\n\nAccuracies in %; brackets: 95% bootstrap interval over queries.\n"


def plot_top_k(runs: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str], *, title: str = "Top-k retrieval accuracy") -> Path | None:
    """Top-k accuracy against k, one line per run. None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'street2shop[report]'): no plot written")
        return None
    if not runs:
        logger.warning("no runs to plot: no plot written to %s", path)
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, run in runs.items():
        top_k = run["metrics"]["overall"]["top_k"]
        ks = sorted(int(k) for k in top_k)
        values = [100 * (top_k[k] if k in top_k else top_k[str(k)]) for k in ks]
        ax.plot(ks, values, marker="o", label=name)
    ax.set_xlabel("k (distinct products)")
    ax.set_ylabel("top-k accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = Path(path)
    write_atomic(path, buf.getvalue())
    return path


def _thumbnail(path: str, size: int = 160, box: tuple[float, float, float, float] | None = None, *, crop: bool = False) -> str:
    """A JPEG as a data URI, at most ``size`` pixels a side; "" if the image cannot be read.

    ``box`` (pixels: left, top, width, height) is drawn in red, or with
    ``crop`` the image is cut to it (and enlarged up to ``size``: what the
    model saw, readable).
    """
    from PIL import Image, ImageDraw

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if box is not None and crop:
                region = Box(*box).pixel_bounds(im.width, im.height)  # the pixels the model's crop keeps
                if region is not None:
                    im = im.crop(region)
                scale = size / max(im.size)
                if scale > 1:
                    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
            elif box is not None:
                left, top, width, height = box
                line = max(2, round(max(im.size) / 60))
                ImageDraw.Draw(im).rectangle([left, top, left + width, top + height], outline=(230, 20, 20), width=line)
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except (OSError, Image.DecompressionBombError):
        return ""


def product_labels(evaluation: Any, label_column: str) -> dict[str, str]:
    """Product id → its label (from its first catalogue image that has one); empty without a label column."""
    labels: dict[str, str] = {}
    if label_column:
        for product, item_labels in zip(evaluation.gallery_products, evaluation.gallery_labels):
            if item_labels.get(label_column) and product not in labels:
                labels[product] = item_labels[label_column]
    return labels


def domains_of(evaluation: Any) -> list[str]:
    """Each gallery row's domain: ``shop``, or ``street`` for a customer photo (all ``shop`` for an evaluation that does not say)."""
    return list(getattr(evaluation, "gallery_domains", None) or ["shop"] * len(evaluation.gallery_products))


def customer_photo_matches(evaluation: Any) -> dict[str, Any]:
    """What the gallery's customer photos did: how many references of each kind, and how often a query's first product
    matched at a customer photo (``first``), and was then the right product (``right_first``)."""
    domains = domains_of(evaluation)
    products = evaluation.gallery_products
    first = right_first = 0
    for result in evaluation.results:
        if len(result.ranking) and domains[int(result.ranking[0])] == "street":
            first += 1
            right_first += products[int(result.ranking[0])] == result.product_id
    return {
        "references": {"shop": domains.count("shop"), "street": domains.count("street"),
                       "products_with_customer_photos": len({p for p, d in zip(products, domains) if d == "street"})},
        "first_matched_customer_photo": first, "right_first_at_customer_photo": right_first, "queries": len(evaluation.results),
    }


def hardest_products(evaluation: Any, labels: Mapping[str, str] | None = None, most: int = 10) -> list[dict[str, Any]]:
    """The products whose queries miss the first place most often, over all queries.

    Each: ``product_id``, ``label``, ``queries``, ``found_first`` (queries with
    the product ranked first), ``median_rank`` (the lower median; None when
    that query did not find it), ``not_found`` (queries whose ranking lacks
    it), ``mistaken_for`` (the product most often ranked first instead, its
    label and how often). Queries whose product is not in the catalogue are
    left out. Worst first: most misses, then highest median rank.
    """
    labels = labels or {}
    in_gallery = set(evaluation.gallery_products)
    by_product: dict[str, list[tuple[int | None, str | None]]] = {}
    for result, rank in zip(evaluation.results, evaluation.ranks):
        if result.product_id not in in_gallery:
            continue
        first = evaluation.gallery_products[int(result.ranking[0])] if len(result.ranking) else None
        by_product.setdefault(result.product_id, []).append((rank, first))
    rows = []
    for product, answers in by_product.items():
        found_first = sum(1 for rank, _ in answers if rank == 1)
        if found_first == len(answers):
            continue
        ranks = sorted(rank if rank is not None else math.inf for rank, _ in answers)
        median = ranks[(len(ranks) - 1) // 2]  # the lower median: a rank that occurred
        common = Counter(first for rank, first in answers if rank != 1 and first is not None).most_common(1)
        rows.append({
            "product_id": product, "label": labels.get(product, ""), "queries": len(answers), "found_first": found_first,
            "median_rank": None if median == math.inf else int(median),
            "not_found": sum(1 for rank, _ in answers if rank is None),
            "mistaken_for": {"product_id": common[0][0], "label": labels.get(common[0][0], ""), "times": common[0][1]} if common else None,
        })
    rows.sort(key=lambda r: (r["found_first"] - r["queries"], -(r["median_rank"] or math.inf), r["product_id"]))
    return rows[:most]


def _name(product: str, labels: Mapping[str, str]) -> str:
    """The product's label over a small line with its id, or the id alone (HTML)."""
    label = labels.get(product)
    if label:
        return f'<span class="name">{html.escape(label)}</span><span class="id">{html.escape(product)}</span>'
    return f'<span class="name">{html.escape(product)}</span>'


def _times(n: int) -> str:
    return "once" if n == 1 else "twice" if n == 2 else f"{n} times"


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
td, th { padding: 6px; font-size: 13px; vertical-align: top; }
table.examples td { text-align: center; width: 172px; }
table.examples tr { border-bottom: 1px solid #ddd; }
table.hardest th, table.hardest td { text-align: left; border-bottom: 1px solid #ddd; }
td img { display: block; margin: 0 auto 4px; background: #eee; object-fit: contain; box-sizing: content-box; }
td.query { border-right: 3px solid #333; width: 240px; }
td.query img.crop { width: 224px; height: 224px; }
td.query img.context { width: 112px; height: 112px; }
td.result img { width: 160px; height: 160px; border: 5px solid #e4e4e4; }
td.hit img, td.truth img, td.hit div.nophoto, td.truth div.nophoto { border-color: #1a9e3a; }
td.truth { border-left: 3px dashed #1a9e3a; }
td.result img.matched { width: 40px; height: 40px; border: 1px solid #c9a25e; display: inline-block; vertical-align: middle; margin: 0 4px 0 0; }
span.matched { display: block; color: #8a5300; font-size: 11px; margin-bottom: 2px; }
div.nophoto { width: 160px; height: 160px; margin: 0 auto 4px; border: 5px solid #e4e4e4; background: #eee; color: #777; display: flex;
              align-items: center; justify-content: center; }
span.name { display: block; font-weight: bold; overflow-wrap: anywhere; }
span.id { display: block; color: #777; font-size: 11px; overflow-wrap: anywhere; }
span.score { display: block; color: #444; }
.verdict { font-weight: bold; margin-top: 4px; }
.verdict.found { color: #1a7e30; }
.verdict.missed { color: #b02020; }
"""


def html_page(evaluation: Any, path: str | os.PathLike[str], *, title: str, sample: int = 24, top: int = 5, seed: int = 0,
              label_column: str | None = None) -> Path:
    """The products missed most often, then query photos beside their top results, for a sample of queries.

    A row: the query's crop (what the model saw, enlarged) and its whole
    photo with the box in red; the ``top`` products found, each with its
    label, id and similarity, the right one framed in green; when the right
    product ranks below them, one more picture: it, framed, with its rank and
    similarity. Products are named by ``label_column`` (see :func:`label_column_of`).
    """
    column = label_column_of(evaluation.gallery_labels, label_column)
    labels = product_labels(evaluation, column)
    gallery_products = evaluation.gallery_products
    results = evaluation.results
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(results), size=min(sample, len(results)), replace=False)) if results else []
    boxes = getattr(evaluation, "query_boxes", None) or []
    domains = domains_of(evaluation)
    paths = evaluation.gallery_paths or [""] * len(gallery_products)
    photos = catalogue_photos([Item(p, path, domain=d) for p, path, d in zip(gallery_products, paths, domains)])
    first_row: dict[str, int] = {}  # a product's picture when its queries' rankings lack it: a catalogue photo if it has one
    for row, product in sorted(enumerate(gallery_products), key=lambda pair: domains[pair[0]] != "shop"):
        first_row.setdefault(product, row)

    def picture(row: int | None, product: str) -> str:
        """The product's picture: the image at ``row`` if a catalogue photo, else its catalogue photo, marked (and the
        customer photo it matched, small)."""
        alt = html.escape(product)
        if row is None or domains[row] == "shop" or not evaluation.gallery_paths:
            return f'<img src="{_thumbnail(paths[row]) if row is not None and paths[row] else ""}" alt="{alt}">'
        photo = photos.get(product)
        shown = f'<img src="{_thumbnail(photo.image_path)}" alt="{alt}">' if photo is not None else '<div class="nophoto">no catalogue photo</div>'
        return shown + f'<span class="matched"><img class="matched" src="{_thumbnail(paths[row], 80)}" alt="the customer photo">matched a customer photo</span>'

    def score(similarities: dict[int, float], row: int | None) -> str:
        return f'<span class="score">similarity {similarities[row]:.3f}</span>' if row in similarities else ""

    rows = []
    for i in chosen:
        result = results[i]
        rank = evaluation.ranks[i]
        sims = dict(zip(map(int, result.ranking), map(float, result.similarities))) if result.similarities is not None else {}
        shown = ranking.distinct_products(result.ranking, gallery_products.__getitem__)[:top]
        cells = []
        for position, (r, product) in enumerate(shown, 1):
            kind = "hit" if product == result.product_id else "miss"
            cells.append(f'<td class="result {kind}">{picture(r, product)}'
                         f"{position}. {_name(product, labels)}{score(sims, r)}</td>")
        if rank is None or rank > top:
            truth = next((int(r) for r in result.ranking if gallery_products[int(r)] == result.product_id), first_row.get(result.product_id))
            where = f"rank {rank}" if rank else f"not in the first {len(result.ranking)} images" if truth is not None else "not in the catalogue"
            image = picture(truth, result.product_id) if truth is not None else ""
            cells.append(f'<td class="result truth">{image}the right product, {where}{_name(result.product_id, labels)}{score(sims, truth)}</td>')
        box = boxes[i] if i < len(boxes) else None
        query_path = evaluation.query_paths[i] if evaluation.query_paths else ""
        crop = f'<img class="crop" src="{_thumbnail(query_path, 224, box, crop=True)}" alt="query">' if query_path else ""
        context = f'<img class="context" src="{_thumbnail(query_path, 112, box)}" alt="whole photo">' if query_path and box is not None else ""
        verdict = (f'<div class="verdict found">rank {rank}</div>' if rank and rank <= top
                   else f'<div class="verdict missed">{"rank " + str(rank) if rank else "not found"}</div>')
        category = f'<span class="id">{html.escape(str(result.category))}</span>' if result.category else ""
        rows.append(f'<tr><td class="query">{crop}{context}{_name(result.product_id, labels)}{category}{verdict}</td>{"".join(cells)}</tr>')

    hardest = hardest_products(evaluation, labels)
    hard_rows = "".join(
        f"<tr><td>{_name(h['product_id'], labels)}</td><td>{h['found_first']} of {h['queries']}</td>"
        f"<td>{h['median_rank'] if h['median_rank'] is not None else 'not found'}</td>"
        f"<td>{_name(h['mistaken_for']['product_id'], labels) + _times(h['mistaken_for']['times']) if h['mistaken_for'] else ''}</td></tr>"
        for h in hardest
    )
    hard_table = (f'<h2>Products missed most often</h2><table class="hardest"><tr><th>product</th><th>found first</th>'
                  f"<th>median rank</th><th>most often found first instead</th></tr>{hard_rows}</table>" if hardest else "")
    overall = evaluation.metrics["overall"]
    summary = ", ".join(f"top-{k} {100 * v:.1f}%" for k, v in overall["top_k"].items())
    named = f"by their <code>{html.escape(column)}</code> (id below)" if column else "by id (no <code>product_name</code> column; --label-column names one)"
    customer = customer_photo_matches(evaluation)
    references = customer["references"]
    customer_note = (f"<p>The index holds {references['shop']} catalogue photos and {references['street']} customer photos (of "
                     f"{references['products_with_customer_photos']} products) as references; for {customer['first_matched_customer_photo']} "
                     f"of the {customer['queries']} queries the first product matched at a customer photo ({customer['right_first_at_customer_photo']} "
                     f"of them the right product). Such a product is shown by its catalogue photo, marked <i>matched a customer photo</i>.</p>"
                     if references["street"] else "")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{overall['queries']} quer{'y' if overall['queries'] == 1 else 'ies'}, each searched against <b>{html.escape(evaluation.searched)}</b>
({len(set(gallery_products))} products): {summary}; mAP {100 * overall['map']:.1f}%, MRR {100 * overall['mrr']:.1f}%.
Products are named {named}.</p>
{customer_note}
{hard_table}
<h2>Examples</h2>
<p>A sample of {len(chosen)} of them: what the model saw (the street photo cut to its box; below it, the whole photo with the box
in red), then the top {top} products with their similarity to the query; the right product is framed in green, and shown
after a dashed line when it ranks lower.</p>
<table class="examples">{''.join(rows)}</table>
</body></html>
"""
    path = Path(path)
    write_atomic(path, page)
    return path


def write_report(
    evaluations: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    html_run: str | None = None,
    title: str = "street2shop evaluation",
    label_column: str | None = None,
) -> dict[str, Path]:
    """Writes ``report.json``, ``report.md``, ``topk.png`` and ``examples.html``.

    Every run says what its queries searched (``searched``: the whole
    catalogue, or each query's category only) in the JSON, the table and the
    page; the JSON also lists each run's products missed most often.

    Args:
        evaluations: run name → :class:`street2shop.evaluate.Evaluation`.
        out_dir: folder for the files.
        config: what produced the numbers (stored in the JSON).
        html_run: which run the HTML page shows (the first by default).
        label_column: the manifest column that names products
            (default: ``product_name`` when the catalogue has it; "" for ids).
    """
    out = Path(out_dir)
    name = html_run or next(iter(evaluations))
    column = label_column_of(evaluations[name].gallery_labels, label_column)  # a wrong column fails before anything is written
    runs = {
        run: {"metrics": ev.metrics, "intervals": {k: list(v) for k, v in ev.intervals.items()},
              "by_category": bool(ev.by_category), "searched": ev.searched,
              "hardest_products": hardest_products(ev, product_labels(ev, column)), **customer_photo_matches(ev)}
        for run, ev in evaluations.items()
    }
    document = {"title": title, "runs": runs, "config": dict(config or {})}
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "topk.png", "html": out / "examples.html"}
    write_atomic(paths["json"], json.dumps(document, indent=2, default=str) + "\n")
    write_atomic(paths["markdown"], f"# {title}\n\n" + markdown_table(runs))
    if plot_top_k(runs, paths["plot"], title=title) is None:
        paths.pop("plot")
    html_page(evaluations[name], paths["html"], title=f"{title}: {name}", label_column=column)
    return paths


def headline(evaluation: Any, ks: Sequence[int] = (1, 5, 20)) -> str:
    """``top-1 36.7% [25-48], ..., mAP 53.5%, MRR 53.5% (60 queries, whole catalogue)``."""
    overall = evaluation.metrics["overall"]
    parts = []
    for k in ks:
        if k in overall["top_k"]:
            low, high = evaluation.intervals.get(f"top_{k}", (None, None))
            ci = f" [{100 * low:.0f}-{100 * high:.0f}]" if low is not None else ""
            parts.append(f"top-{k} {100 * overall['top_k'][k]:.1f}%{ci}")
    scope = "each within its category" if evaluation.by_category else "whole catalogue"  # short for Evaluation.searched
    return ", ".join(parts) + f", mAP {100 * overall['map']:.1f}%, MRR {100 * overall['mrr']:.1f}% ({overall['queries']} queries, {scope})"
