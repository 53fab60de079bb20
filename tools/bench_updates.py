r"""Catalogue updates without a rebuild: query latency and recall with a delta, update time vs a full rebuild.

The base: ``--base`` clustered 128-d unit vectors (the generator of
tools/bench_index.py: 1000 Gaussian clusters on the sphere), an Annoy index
with the defaults (50 trees, search_k 20000), published as version 1. Then
``street2shop.index.updates.update_index`` adds points of the same clusters,
growing the delta to each of ``--deltas`` in turn (each update a new version;
the base hard-linked), and removes ``--remove`` base images in the last one.
Then ``compact_index`` rebuilds one Annoy version from the last one, timed
against the updates. Then every version is loaded and measured on 500
held-out queries (after 100 for warm-up), each query asked of every version
in turn so the machine's load hits them alike: image-level top-10
(``by_product=False``), p50/p99 latency through ``query``, recall@10 against
exact search over exactly that version's live items (base − removed + delta).

Target (issue 14): p50 with a 10k delta <= 1.5x the base's p50; recall@10
with a delta at least the base index's.

    OPENBLAS_NUM_THREADS=1 nohup .venv/bin/python tools/bench_updates.py --base 1000000 \
        --deltas 1000 10000 100000 --out bench-output/updates.json > bench-output/updates.log 2>&1 &
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_index import clustered_unit_vectors, percentiles  # noqa: E402
from bench_serving import uptime, write_report  # noqa: E402

from street2shop.contract import ModelIdentity  # noqa: E402
from street2shop.embeddings import write_embeddings  # noqa: E402
from street2shop.index import ExactIndex, load_index  # noqa: E402
from street2shop.index.build import build_index  # noqa: E402
from street2shop.index.updates import compact_index, update_index  # noqa: E402

K = 10
MODEL = ModelIdentity("bench-model", 1, 128)


def items_for(prefix: str, n: int, start: int = 0) -> list[dict]:
    return [{"product_id": f"{prefix}{start + i}", "image_path": f"/{prefix}/{start + i}.jpg", "category": None} for i in range(n)]


def measure(indexes: dict[int, object], truths: dict[int, ExactIndex], queries: np.ndarray, warmup: np.ndarray) -> dict[int, dict]:
    """Latency and recall@10 of each version, its queries interleaved with the others' (a, b, c, a, b, c, ...)
    so the machine's changing load hits every version alike."""
    for q in warmup:
        for index in indexes.values():
            index.query(q, K, by_product=False)
    times: dict[int, list[float]] = {v: [] for v in indexes}
    hits: dict[int, int] = {v: 0 for v in indexes}
    for q in queries:
        for version, index in indexes.items():
            start = time.perf_counter()
            answers = index.query(q, K, by_product=False)
            times[version].append(time.perf_counter() - start)
            truth = {a.image_path for a in truths[version].query(q, K, by_product=False)}
            hits[version] += len(truth & {a.image_path for a in answers})
    return {v: {**{k: round(x, 3) for k, x in percentiles(times[v]).items()}, "recall_at_10": round(hits[v] / (K * len(queries)), 4)}
            for v in indexes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=1_000_000)
    parser.add_argument("--deltas", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--remove", type=int, default=10_000, help="base images removed in the last update")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--workdir", default="", help="keep the index base here (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    report: dict = {"command": " ".join([".venv/bin/python", *sys.argv]), "base": args.base, "uptime_before": uptime()}
    total_new = max(args.deltas)
    base_vectors, held, _ = clustered_unit_vectors(args.base + total_new, args.queries + 100, 0, 128, 1000, 1.0, args.seed)
    base_vectors, new_vectors = base_vectors[: args.base], base_vectors[args.base :]
    queries, warmup = held[: args.queries], held[args.queries :]
    base_items = items_for("b", args.base)

    with tempfile.TemporaryDirectory(prefix="bench-updates-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_embeddings(work / "emb-base", base_vectors, base_items, MODEL, {})
        start = time.perf_counter()
        build_index([work / "emb-base"], work / "index")
        build_seconds = time.perf_counter() - start
        print(f"base: {args.base} items built and published in {build_seconds:.1f} s", flush=True)
        rows = {1: {"version": 1, "delta": 0, "removed": 0, "update_seconds": round(build_seconds, 1)}}

        have = 0
        for i, target in enumerate(sorted(args.deltas)):
            add = new_vectors[have:target]
            write_embeddings(work / f"emb-{target}", add, items_for("n", len(add), have), MODEL, {})
            remove = None
            if i == len(args.deltas) - 1 and args.remove:
                remove = work / "remove.txt"
                remove.write_text("".join(f"/b/{j}.jpg\n" for j in range(0, args.remove * 10, 10)))  # every 10th image
            start = time.perf_counter()
            result = update_index(work / "index", add=[work / f"emb-{target}"], remove=remove)
            seconds = time.perf_counter() - start
            have = target
            rows[result["version"]] = {"version": result["version"], "delta": result["delta_count"], "removed": result["removed_from_base"],
                                       "update_seconds": round(seconds, 2), "advice": result["compaction"]["reason"]}
            print(rows[result["version"]], flush=True)

        start = time.perf_counter()
        compacted = compact_index(work / "index")
        rows[compacted["version"]] = {"version": compacted["version"], "delta": 0, "removed": 0, "compacted": True,
                                      "update_seconds": round(time.perf_counter() - start, 1)}
        print(rows[compacted["version"]], flush=True)

        indexes = {v: load_index(work / "index" / str(v)) for v in rows}
        truths = {}
        for v, index in indexes.items():  # exact search over exactly the live items of each version
            exact = index.exact()
            truths[v] = ExactIndex.from_arrays(np.asarray(exact.vectors), list(exact.items))
        for v, measured in measure(indexes, truths, queries, warmup).items():
            rows[v].update(measured)
        report["versions"] = [rows[v] for v in sorted(rows)]
        for row in report["versions"]:
            print(row, flush=True)
        disk = {v.name: sum(f.stat().st_size for f in v.rglob("*") if f.is_file()) / 2**20 for v in sorted((work / "index").iterdir()) if v.name.isdigit()}
        report["version_folder_mb_apparent"] = {k: round(v, 1) for k, v in disk.items()}
    report["uptime_after"] = uptime()
    base_p50 = report["versions"][0]["p50_ms"]
    for row in report["versions"]:
        row["p50_vs_base"] = round(row["p50_ms"] / base_p50, 2)
    print(json.dumps(report, indent=2))
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
