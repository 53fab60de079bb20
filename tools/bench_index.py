"""Benchmark the Annoy catalogue index against exact NumPy search on clustered unit vectors.

For each catalogue size: generate clustered 128-d unit vectors (Gaussian
clusters on the sphere, like real embeddings: many products, each a tight
cloud of views), hold out query points from the same clusters, compute the
exact top-10 with :class:`street2shop.index.ExactIndex` (timed, single
queries), then for each ``n_trees``: build a :class:`CatalogIndex` (timed,
``n_jobs=1``), save it, and in a fresh subprocess load it memory-mapped,
record RSS, and time single queries with each ``search_k`` and measure
recall@10 against the exact answers.

Run it alone and single-threaded (it sets OPENBLAS/OMP threads to 1 unless
they are already set, so exact search and Annoy both use one core)::

    nohup .venv/bin/python tools/bench_index.py --sizes 100000 1000000 --out bench_index.json &

Results go to ``--out`` as JSON and a Markdown table to stdout (and ``--markdown``).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from street2shop.index import CatalogIndex, ExactIndex, Item  # noqa: E402

K = 10


def clustered_unit_vectors(n: int, n_queries: int, n_warmup: int, dim: int, clusters: int, spread: float, seed: int):
    """Catalogue, query and warm-up points drawn from the same Gaussian clusters on the unit sphere.

    A point is ``normalise(centre + spread * g / sqrt(dim))`` with ``g`` standard
    normal: its cosine to its centre is about ``1 / sqrt(1 + spread**2)``.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    total = n + n_queries + n_warmup
    out = np.empty((total, dim), np.float32)
    labels = rng.integers(0, clusters, size=total)
    step = 200_000
    for start in range(0, total, step):
        stop = min(total, start + step)
        block = centres[labels[start:stop]] + (spread / np.sqrt(dim)) * rng.standard_normal((stop - start, dim)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out[:n], out[n : n + n_queries], out[n + n_queries :]


def blas_info() -> dict:
    info = {
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    try:
        libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower() and ".so" in line})
        for path in libs:
            lib = ctypes.CDLL(path)
            for name in ("scipy_openblas_get_config64_", "openblas_get_config64_", "openblas_get_config"):
                if hasattr(lib, name):
                    fn = getattr(lib, name)
                    fn.restype = ctypes.c_char_p
                    info["openblas_config"] = fn().decode()
                    break
    except OSError:
        pass
    return info


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def timed_queries(index, queries: np.ndarray, warmup: np.ndarray) -> tuple[dict, list[list[int]]]:
    """Each query's top K images, one at a time after the warm-up ones: the latency percentiles and the rows found."""
    for q in warmup:
        index.query(q, K, by_product=False)
    times, rows = [], []
    for q in queries:
        t = time.perf_counter()
        answer = index.query(q, K, by_product=False)
        times.append(time.perf_counter() - t)
        rows.append([r.row for r in answer])
    return percentiles(times), rows


def rss() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key + "_mb"] = int(value.split()[0]) / 1024
    return out


def dir_size(path: Path) -> dict:
    sizes = {p.name: p.stat().st_size for p in path.iterdir()}
    return {"files_mb": {k: v / 2**20 for k, v in sizes.items()}, "total_mb": sum(sizes.values()) / 2**20}


def worker(args: argparse.Namespace) -> None:
    """Fresh process: load memory-mapped, report RSS, time queries per search_k, recall vs ground truth."""
    work = Path(args.worker)
    queries = np.load(work / "queries.npy")
    warmup = np.load(work / "warmup.npy")
    truth = np.load(work / "truth.npy")
    before = rss()
    t0 = time.perf_counter()
    index = CatalogIndex.load(work / "index")
    load_s = time.perf_counter() - t0
    after_load = rss()
    results = []
    for search_k in args.search_k:
        for q in warmup:
            index.query(q, K, search_k=search_k, by_product=False)
        times, hits = [], 0
        for q, expected in zip(queries, truth):
            t = time.perf_counter()
            answer = index.query(q, K, search_k=search_k, by_product=False)
            times.append(time.perf_counter() - t)
            hits += len({r.row for r in answer} & set(expected.tolist()))
        # The default call (products, k=20) for reference: each item is its own product here.
        dtimes = []
        for q in queries[:200]:
            t = time.perf_counter()
            index.query(q, 20, search_k=search_k)
            dtimes.append(time.perf_counter() - t)
        results.append({
            "search_k": search_k,
            "recall_at_10": hits / (K * len(queries)),
            **percentiles(times),
            "default_call_p50_ms": percentiles(dtimes)["p50_ms"],
        })
    json.dump({"load_s": load_s, "rss_before_load": before, "rss_after_load": after_load,
               "rss_after_queries": rss(), "settings": results}, sys.stdout)


def bench_size(n: int, args: argparse.Namespace, base: Path) -> dict:
    log = logging.getLogger("bench")
    clusters = args.clusters
    data, queries, warmup = clustered_unit_vectors(n, args.queries, args.warmup, args.dim, clusters, args.spread, args.seed)
    items = [Item(str(i)) for i in range(n)]
    work = base / f"n{n}"
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "queries.npy", queries)
    np.save(work / "warmup.npy", warmup)

    exact = ExactIndex(args.dim)
    exact.add(data, items)
    exact_stats, truth = timed_queries(exact, queries, warmup[:20])
    np.save(work / "truth.npy", np.asarray(truth, np.int64))
    raw = []
    for q in queries:  # the bare matrix-vector product, for reference
        t = time.perf_counter()
        data @ q
        raw.append(time.perf_counter() - t)
    exact_stats["matvec_p50_ms"] = percentiles(raw)["p50_ms"]
    exact_stats["matrix_mb"] = data.nbytes / 2**20
    log.info("n=%d exact: %s", n, exact_stats)
    del exact

    runs = []
    for n_trees in args.n_trees:
        index = CatalogIndex(args.dim, n_trees=n_trees, seed=args.seed)
        t = time.perf_counter()
        index.add(data, items)
        add_s = time.perf_counter() - t
        t = time.perf_counter()
        index.build(n_jobs=1)
        build_s = time.perf_counter() - t
        path = index.save(work / "index")
        size = dir_size(path)
        del index
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(work), "--search-k", *map(str, args.search_k)],
            check=True, capture_output=True, text=True,
        )
        measured = json.loads(proc.stdout)
        run = {"n_trees": n_trees, "add_s": add_s, "build_s": build_s, "disk": size, **measured}
        log.info("n=%d n_trees=%d build %.1fs, disk %.0f MB: %s", n, n_trees, build_s, size["total_mb"],
                 [(s["search_k"], round(s["recall_at_10"], 3), round(s["p50_ms"], 2)) for s in measured["settings"]])
        runs.append(run)
        shutil.rmtree(work / "index")
    shutil.rmtree(work)
    return {"n": n, "dim": args.dim, "clusters": clusters, "spread": args.spread, "queries": args.queries,
            "exact": exact_stats, "annoy": runs}


def markdown(results: dict) -> str:
    lines = []
    for size in results["sizes"]:
        ex = size["exact"]
        lines.append(f"**{size['n']:,} items** ({size['dim']}-d, {size['clusters']} clusters, spread {size['spread']}, "
                     f"{size['queries']} held-out queries). Exact search (`ExactIndex.query`, float32 matrix "
                     f"{ex['matrix_mb']:.0f} MB in RAM): p50 {ex['p50_ms']:.2f} ms, p99 {ex['p99_ms']:.2f} ms "
                     f"(bare mat-vec p50 {ex['matvec_p50_ms']:.2f} ms).")
        lines.append("")
        lines.append("| n_trees | build s | disk MB (annoy + vectors) | RSS after load MB | RSS after queries MB | search_k | recall@10 | p50 ms | p99 ms | p50 vs exact | default call p50 ms |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for run in size["annoy"]:
            files = run["disk"]["files_mb"]
            disk = f"{run['disk']['total_mb']:.0f} ({files.get('annoy.ann', 0):.0f} + {files.get('vectors.npy', 0):.0f})"
            for s in run["settings"]:
                sk = "Annoy default" if s["search_k"] == -1 else f"{s['search_k']:,}"
                lines.append(
                    f"| {run['n_trees']} | {run['build_s']:.1f} | {disk} | {run['rss_after_load']['VmRSS_mb']:.0f} | "
                    f"{run['rss_after_queries']['VmRSS_mb']:.0f} | {sk} | {s['recall_at_10']:.3f} | {s['p50_ms']:.2f} | "
                    f"{s['p99_ms']:.2f} | {s['p50_ms'] / ex['p50_ms']:.3f} | {s['default_call_p50_ms']:.2f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--n-trees", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--search-k", type=int, nargs="+", default=[-1, 2000, 5000, 10000, 20000, 50000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="noise scale; cosine to the cluster centre ~ 1/sqrt(1+spread^2)")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="", help="where indexes are written (default: a temporary folder)")
    parser.add_argument("--out", default="bench_index.json")
    parser.add_argument("--markdown", default="", help="also write the Markdown table here")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_index_"))
    base.mkdir(parents=True, exist_ok=True)
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "numpy": np.__version__, **blas_info()},
        "sizes": [],
    }
    try:
        import annoy  # noqa: F401
        from importlib.metadata import version

        results["machine"]["annoy"] = version("annoy")
    except Exception:  # pragma: no cover
        pass
    for n in args.sizes:
        results["sizes"].append(bench_size(n, args, base))
        Path(args.out).write_text(json.dumps(results, indent=2))
    if not args.workdir:
        shutil.rmtree(base, ignore_errors=True)
    table = markdown(results)
    if args.markdown:
        Path(args.markdown).write_text(table)
    sys.stdout.write(table + "\n")


if __name__ == "__main__":
    main()
