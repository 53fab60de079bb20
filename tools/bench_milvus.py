"""Annoy and Milvus Lite side by side on the same clustered vectors: build time, query latency, recall@10 against exact search.

For each catalogue size, in one process and in turn (so the two share the machine's load as neighbours in time):
the vectors and held-out queries of ``tools/bench_index.py`` (clustered 128-d unit vectors), the exact top 10 of each
query (``ExactIndex``, image level), then

- **Annoy**: ``CatalogIndex`` with street2shop's defaults (50 trees, search_k 20000): ``add`` + ``build`` timed;
- **Milvus Lite**: a new version of a Milvus index in a fresh Milvus Lite file (HNSW, M 16, efConstruction 200, ef 128:
  street2shop's defaults), written as ``index build --backend milvus`` writes it (``create_version``, batches of
  ``write_entities``, ``publish_version``: flush, index, load, alias) and timed;

(and faiss's HNSW alone, the library Milvus Lite searches with: what the engine costs in C++ with nothing around it),
and single queries through the search interface (``index.query(q, 10, by_product=False)``), after warm-up: p50 and
p99 latency and recall@10. For Milvus also the bare ``MilvusClient.search`` (limit 10, no vectors returned) and, as
evaluation sends them, queries 50 to a call (``query_batch``): what the engine costs apart from what street2shop adds.
Milvus Lite takes ``--milvus-queries`` of the queries (it is slow per query; see BENCHMARKS.md).

Run it alone, niced, as BENCHMARKS.md says::

    nice -n 5 .venv/bin/python tools/bench_milvus.py --sizes 100000 1000000 --out bench_milvus.json --markdown bench_milvus.md
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_index import clustered_unit_vectors, percentiles, rss, timed_queries  # noqa: E402

from street2shop.contract import ModelIdentity  # noqa: E402
from street2shop.index import CatalogIndex, ExactIndex, Item  # noqa: E402

K = 10
log = logging.getLogger("bench_milvus")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth)]))


def bench_annoy(data, items, queries, warmup, truth, args) -> dict:
    start_load = load()
    index = CatalogIndex(args.dim, seed=args.seed)
    t = time.perf_counter()
    index.add(data, items)
    index.build(n_jobs=1)
    build_s = time.perf_counter() - t
    stats, rows = timed_queries(index, queries, warmup)
    out = {"build_s": build_s, "n_trees": index.n_trees, "search_k": index.search_k, **stats,
           "recall_at_10": recall(rows, truth), "queries": len(queries), "rss": rss(), "load": [start_load, load()]}
    log.info("annoy: %s", {k: v for k, v in out.items() if k != "rss"})
    return out


def bench_milvus(data, items, queries, warmup, truth, args, work: Path) -> dict:
    from street2shop.index.milvus import MilvusIndex, parse_target, release
    from street2shop.index.milvus_write import create_version, publish_version, write_entities

    start_load = load()
    target = parse_target(f"milvus:{work / 'bench.db'}#bench")
    from street2shop.index.milvus import connect

    client = connect(target)
    identity = ModelIdentity("bench", 1, args.dim)
    t = time.perf_counter()
    version, collection = create_version(client, target, identity, index_type="HNSW")
    write_entities(client, target, collection, data, items, range(len(items)), upsert=False, batch=args.batch)
    inserted = time.perf_counter()
    publish_version(client, target, version, collection, next_row=len(items), categories=(), keep=2)
    build_s = time.perf_counter() - t
    publish_s = time.perf_counter() - inserted
    index = MilvusIndex.open(target)
    n = min(len(queries), args.milvus_queries)
    stats, rows = timed_queries(index, queries[:n], warmup[: max(1, min(len(warmup), n // 5))])
    bare = []
    for q in queries[:n]:
        t = time.perf_counter()
        client.search(collection, data=[q.tolist()], limit=K, output_fields=["row"], search_params={"params": {"ef": 128}})
        bare.append(time.perf_counter() - t)
    t = time.perf_counter()
    batched = index.query_batch(queries[:n], K, by_product=False)
    batch_ms = 1000 * (time.perf_counter() - t) / n
    assert [[r.row for r in a] for a in batched] == rows  # the same answers, however sent
    disk = sum(p.stat().st_size for p in (work / "bench.db").rglob("*") if p.is_file()) / 2**20
    out = {"build_s": build_s, "insert_s": build_s - publish_s, "publish_s": publish_s, **stats, "recall_at_10": recall(rows, truth[:n]),
           "queries": n, "bare_search": percentiles(bare), "batched_per_query_ms": batch_ms, "disk_mb": disk, "rss": rss(),
           "load": [start_load, load()], "index_type": "HNSW", "params": {"M": 16, "efConstruction": 200, "ef": 128}}
    log.info("milvus lite: %s", {k: v for k, v in out.items() if k != "rss"})
    del index
    release(target)
    return out


def bench_faiss(data, queries, truth, args) -> dict:
    """faiss's HNSW alone (what Milvus Lite searches with, in C++ with nothing around it): the engine's own cost per query.

    The graph is built on every core (its build time is not compared); queries run one at a time on one thread.
    """
    import faiss

    start_load = load()
    index = faiss.IndexHNSWFlat(args.dim, 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    index.add(np.ascontiguousarray(data))
    build_s = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    index.hnsw.efSearch = 128
    for q in queries[:20]:
        index.search(q[None], K)
    times, rows = [], []
    for q in queries:
        t = time.perf_counter()
        _, found = index.search(q[None], K)
        times.append(time.perf_counter() - t)
        rows.append(found[0].tolist())
    out = {"build_s_all_cores": build_s, **percentiles(times), "recall_at_10": recall(rows, truth), "queries": len(queries),
           "load": [start_load, load()], "params": {"M": 16, "efConstruction": 200, "efSearch": 128}}
    log.info("faiss hnsw: %s", out)
    return out


def bench_size(n: int, args: argparse.Namespace, base: Path) -> dict:
    data, queries, warmup = clustered_unit_vectors(n, args.queries, args.warmup, args.dim, args.clusters, args.spread, args.seed)
    items = [Item(str(i)) for i in range(n)]
    exact = ExactIndex.from_arrays(data, items)
    truth = np.asarray([[r.row for r in answer] for answer in exact.query_batch(queries, K, by_product=False)], np.int64)
    t = time.perf_counter()
    for q in queries[:100]:
        exact.query(q, K, by_product=False)
    exact_ms = 1000 * (time.perf_counter() - t) / 100
    del exact
    result = {"n": n, "dim": args.dim, "clusters": args.clusters, "spread": args.spread, "exact_p_mean_ms": exact_ms}
    if "annoy" in args.engines:
        result["annoy"] = bench_annoy(data, items, queries, warmup, truth, args)
        gc.collect()
    if "milvus" in args.engines:
        work = base / f"n{n}"
        work.mkdir(parents=True, exist_ok=True)
        result["milvus_lite"] = bench_milvus(data, items, queries, warmup, truth, args, work)
        shutil.rmtree(work, ignore_errors=True)
        gc.collect()
    if "faiss" in args.engines:
        result["faiss_hnsw"] = bench_faiss(data, queries, truth, args)
    return result


def markdown(results: dict) -> str:
    lines = ["| items | engine | build s | p50 ms | p99 ms | recall@10 | queries | load (1-min) before → after |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for size in results["sizes"]:
        if "faiss_hnsw" in size:
            f = size["faiss_hnsw"]
            lines.append(f"| {size['n']:,} | faiss HNSW alone (16/200, efSearch 128; one thread) | ({f['build_s_all_cores']:.1f} on all cores) | "
                         f"{f['p50_ms']:.3f} | {f['p99_ms']:.3f} | {f['recall_at_10']:.3f} | {f['queries']} | {f['load'][0][0]} → {f['load'][1][0]} |")
        if "annoy" not in size or "milvus_lite" not in size:
            continue
        a, m = size["annoy"], size["milvus_lite"]
        lines.append(f"| {size['n']:,} | Annoy (50 trees, search_k 20000) | {a['build_s']:.1f} | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} | "
                     f"{a['recall_at_10']:.3f} | {a['queries']} | {a['load'][0][0]} → {a['load'][1][0]} |")
        lines.append(f"| {size['n']:,} | Milvus Lite (HNSW 16/200, ef 128) | {m['build_s']:.1f} (insert {m['insert_s']:.1f}) | "
                     f"{m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['recall_at_10']:.3f} | {m['queries']} | {m['load'][0][0]} → {m['load'][1][0]} |")
        lines.append(f"| | ratio Milvus Lite / Annoy | {m['build_s'] / a['build_s']:.2f} | {m['p50_ms'] / a['p50_ms']:.1f} | "
                     f"{m['p99_ms'] / a['p99_ms']:.1f} | | | |")
    lines.append("")
    for size in [size for size in results["sizes"] if "milvus_lite" in size]:
        m = size["milvus_lite"]
        lines.append(f"- {size['n']:,}: Milvus Lite bare `search` (limit 10) p50 {m['bare_search']['p50_ms']:.1f} ms; "
                     f"50 queries per call {m['batched_per_query_ms']:.1f} ms per query; files {m['disk_mb']:.0f} MB; "
                     f"RSS {m['rss'].get('VmRSS_mb', 0):.0f} MB (peak {m['rss'].get('VmHWM_mb', 0):.0f}); exact search "
                     f"{size['exact_p_mean_ms']:.1f} ms per query")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--queries", type=int, default=500, help="held-out queries (Annoy takes all)")
    parser.add_argument("--milvus-queries", type=int, default=100, help="how many of them Milvus Lite takes")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2000, help="entities per insert")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engines", nargs="+", default=["annoy", "milvus", "faiss"], choices=["annoy", "milvus", "faiss"])
    parser.add_argument("--out", default="bench_milvus.json")
    parser.add_argument("--markdown", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base = Path(tempfile.mkdtemp(prefix="bench_milvus_"))
    from importlib.metadata import version

    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "niceness": os.nice(0),
               "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                           **{name: version(name) for name in ("numpy", "annoy", "pymilvus", "milvus-lite", "faiss-cpu")}},
               "sizes": []}
    try:
        for n in args.sizes:
            results["sizes"].append(bench_size(n, args, base))
            Path(args.out).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    table = markdown(results)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    sys.stdout.write(table + "\n")


if __name__ == "__main__":
    main()
