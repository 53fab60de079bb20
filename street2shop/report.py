"""Evaluation reports: JSON (every number), Markdown table, PNG plot, HTML page.

The HTML page shows, for a sample of queries, the street photo beside its top
results with the correct product marked; images are embedded as small
thumbnails, so the page is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from street2shop.fileio import write_atomic
from street2shop.index import ranking

logger = logging.getLogger(__name__)


def markdown_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per run: top-k accuracies (with intervals when present), mAP, MRR."""
    first = next(iter(runs.values()))
    ks = sorted(int(k) for k in first["metrics"]["overall"]["top_k"])
    header = "| run | queries | " + " | ".join(f"top-{k}" for k in ks) + " | mAP | MRR |"
    lines = [header, "|" + "---|" * (4 + len(ks))]
    for name, run in runs.items():
        overall = run["metrics"]["overall"]
        intervals = run.get("intervals", {})
        cells = []
        for k in ks:
            value = overall["top_k"][k] if k in overall["top_k"] else overall["top_k"][str(k)]
            ci = intervals.get(f"top_{k}")
            cells.append(f"{100 * value:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""))
        lines.append(f"| {name} | {overall['queries']} | " + " | ".join(cells) + f" | {100 * overall['map']:.1f} | {100 * overall['mrr']:.1f} |")
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


def _thumbnail(path: str, size: int = 112, box: tuple[float, float, float, float] | None = None) -> str:
    """A small JPEG as a data URI; ``box`` (pixels, left/top/width/height) is drawn in red."""
    from PIL import Image, ImageDraw

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if box is not None:
                left, top, width, height = box
                line = max(2, round(max(im.size) / 60))
                ImageDraw.Draw(im).rectangle([left, top, left + width, top + height], outline=(230, 20, 20), width=line)
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except (OSError, Image.DecompressionBombError):
        return ""


def html_page(evaluation: Any, path: str | os.PathLike[str], *, title: str, sample: int = 24, top: int = 5, seed: int = 0) -> Path:
    """Query photos beside their top results; the correct product is framed in green."""
    results = evaluation.results
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(results), size=min(sample, len(results)), replace=False)) if results else []
    rows = []
    for i in chosen:
        result = results[i]
        rank = evaluation.ranks[i]
        shown = ranking.distinct_products(result.ranking, evaluation.gallery_products.__getitem__)[:top]
        cells = []
        for position, (r, _) in enumerate(shown, 1):
            product = evaluation.gallery_products[r]
            hit = product == result.product_id
            src = _thumbnail(evaluation.gallery_paths[r]) if evaluation.gallery_paths else ""
            cells.append(
                f'<td class="{"hit" if hit else "miss"}"><img src="{src}" alt=""><br>{position}. {html.escape(product)}</td>'
            )
        boxes = getattr(evaluation, "query_boxes", None) or []
        query_src = _thumbnail(evaluation.query_paths[i], box=boxes[i] if i < len(boxes) else None) if evaluation.query_paths else ""
        verdict = f"rank {rank}" if rank else "not found"
        rows.append(
            f'<tr><td class="query"><img src="{query_src}" alt=""><br><b>{html.escape(result.product_id)}</b><br>{verdict}</td>'
            + "".join(cells) + "</tr>"
        )
    overall = evaluation.metrics["overall"]
    summary = ", ".join(f"top-{k} {100 * v:.1f}%" for k, v in overall["top_k"].items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td {{ padding: 4px; text-align: center; font-size: 12px; vertical-align: top; }}
td img {{ width: 112px; height: 112px; object-fit: contain; background: #eee; }}
td.query {{ border-right: 3px solid #333; }}
td.hit img {{ outline: 4px solid #1a9e3a; }}
td.miss img {{ outline: 1px solid #ccc; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{overall['queries']} queries: {summary}; mAP {100 * overall['map']:.1f}%, MRR {100 * overall['mrr']:.1f}%.
A sample of {len(chosen)} queries: the street photo (its box, which the model saw, in red), then the top {top} products; the correct product is framed in green.</p>
<table>{''.join(rows)}</table>
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
) -> dict[str, Path]:
    """Writes ``report.json``, ``report.md``, ``topk.png`` and ``examples.html``.

    Args:
        evaluations: run name → :class:`street2shop.evaluate.Evaluation`.
        out_dir: folder for the files.
        config: what produced the numbers (stored in the JSON).
        html_run: which run the HTML page shows (the first by default).
    """
    out = Path(out_dir)
    runs = {
        name: {"metrics": ev.metrics, "intervals": {k: list(v) for k, v in ev.intervals.items()}}
        for name, ev in evaluations.items()
    }
    document = {"title": title, "runs": runs, "config": dict(config or {})}
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "topk.png", "html": out / "examples.html"}
    write_atomic(paths["json"], json.dumps(document, indent=2, default=str) + "\n")
    write_atomic(paths["markdown"], f"# {title}\n\n" + markdown_table(runs))
    if plot_top_k(runs, paths["plot"], title=title) is None:
        paths.pop("plot")
    name = html_run or next(iter(evaluations))
    html_page(evaluations[name], paths["html"], title=f"{title}: {name}")
    return paths


def headline(evaluation: Any, ks: Sequence[int] = (1, 5, 20)) -> str:
    overall = evaluation.metrics["overall"]
    parts = []
    for k in ks:
        if k in overall["top_k"]:
            low, high = evaluation.intervals.get(f"top_{k}", (None, None))
            ci = f" [{100 * low:.0f}-{100 * high:.0f}]" if low is not None else ""
            parts.append(f"top-{k} {100 * overall['top_k'][k]:.1f}%{ci}")
    return ", ".join(parts) + f", mAP {100 * overall['map']:.1f}%, MRR {100 * overall['mrr']:.1f}% ({overall['queries']} queries)"
