r"""The search service under load: HTTP on loopback vs the same embed + search in process, shedding, a swap under load.

One model (InceptionV3, random weights, exported), the grocery catalogue
embedded and indexed (an index base), the grocery street photos as queries.
Measured in one run, the variants alternating round by round so machine noise
hits both:

(a) in process: ``--clients`` threads each calling :class:`street2shop.search.Searcher`
    (LocalEmbedder + the index), one photo per call;
(b) the service (``street2shop service --model EXPORT``, a subprocess) with
    ``--clients`` HTTP clients on keep-alive connections, one photo per request
    (:class:`street2shop.service.client.SearchClient`: multipart, what an app
    using the client sends).

Reported: requests/s per variant (best and median round), the ratio (b)/(a)
(target >= 0.8 at 8 clients) and p50/p99 latency. Then an overload phase:
4x the service's ``--max-concurrency`` clients, no retries: the share shed
with 503 + Retry-After, the accepted requests' p50/p99 against (b)'s, and the
service's RSS before and after (flat: it sheds rather than queueing). Then a
swap phase: a new index version is published while ``--clients`` clients
search; every request must answer 200 and the version must move to the new one.
``uptime`` before and after: the machine is shared.

    .venv/bin/python tools/bench_service.py --clients 8 --rounds 5 --seconds 20 --out bench-output/service.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_serving import DEFAULT_MANIFEST, free_port, percentile, stop_process, uptime, write_report  # noqa: E402

TARGET_RATIO = 0.8


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_clients(clients: int, seconds: float, one_request) -> list[tuple[float, int, Any]]:
    """``clients`` threads calling ``one_request(thread, i)`` back to back for ``seconds``: (latency s, status, answer)."""
    stop = time.monotonic() + seconds
    out: list[list[tuple[float, int, Any]]] = [[] for _ in range(clients)]

    def worker(t: int) -> None:
        i = t
        while time.monotonic() < stop:
            start = time.perf_counter()
            status, answer = one_request(t, i)
            out[t].append((time.perf_counter() - start, status, answer))
            i += clients

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for rows in out for r in rows]


def latency(rows: list[tuple[float, int, Any]]) -> dict[str, float]:
    values = [1000 * s for s, status, _ in rows if status == 200]
    if not values:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "n": 0}
    return {"p50_ms": round(percentile(values, 50), 1), "p99_ms": round(percentile(values, 99), 1), "n": len(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-concurrency", type=int, default=8, help="the service's limit; the overload phase runs 4x this many clients")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each timed round")
    parser.add_argument("--queries", type=int, default=200, help="street photos cycled through")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import keras

    from street2shop.data.records import read_manifest_csv
    from street2shop.embed import embed_catalog
    from street2shop.embedders import LocalEmbedder
    from street2shop.export import export_tower
    from street2shop.index import load_index
    from street2shop.index.build import build_index
    from street2shop.model.tower import build_tower
    from street2shop.search import Searcher
    from street2shop.service.client import SearchClient
    from street2shop.errors import ServerUnavailableError
    from street2shop.service.models import ServiceError

    before = uptime()
    print(f"uptime before: {before}", flush=True)
    records = read_manifest_csv(args.manifest)
    catalogue = [r for r in records if r.domain == "shop"]
    queries = [Path(r.image_path).read_bytes() for r in records if r.domain == "street"][: args.queries]

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        work = Path(tmp)
        keras.utils.set_random_seed(0)
        tower = build_tower("inception_v3", image_size=(args.image_size, args.image_size), embedding_dim=128, weights=None)
        export = export_tower(tower, work / "exports")
        with LocalEmbedder(export) as embedder:
            embed_catalog(catalogue, embedder, work / "embeddings")
        build_index([work / "embeddings"], work / "index")
        port = free_port()
        log = open(work / "service.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "street2shop", "service", "--index", str(work / "index"), "--model", str(export), "--port", str(port),
             "--max-concurrency", str(args.max_concurrency), "--poll-seconds", "0.5"],
            cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), stdout=log, stderr=subprocess.STDOUT,
        )
        # One client per thread, each with its own keep-alive connection; no retries: a 503 is counted, not waited out.
        http_clients = [SearchClient(f"http://127.0.0.1:{port}", timeout=120, retries=0) for _ in range(4 * args.max_concurrency)]
        try:
            deadline = time.monotonic() + 300
            while not http_clients[0].ready():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the service did not become ready:\n" + (work / "service.log").read_text()[-3000:])
                time.sleep(0.5)

            searcher = Searcher(load_index(work / "index"), LocalEmbedder(export))

            def in_process(t: int, i: int):
                answer = searcher.search([queries[i % len(queries)]], k=20)[0]
                return (200 if answer.error is None else 400), answer

            def over_http(t: int, i: int):
                try:
                    return 200, http_clients[t].search(queries[i % len(queries)], k=20)
                except ServiceError as e:
                    return e.status, None
                except ServerUnavailableError:
                    return 0, None

            # Warm up both paths (graph tracing, connections).
            run_clients(args.clients, 3, in_process)
            run_clients(args.clients, 3, over_http)
            rates: dict[str, list[float]] = {"a": [], "b": []}
            rows: dict[str, list] = {"a": [], "b": []}
            for r in range(args.rounds):
                line = []
                for name, fn in (("a", in_process), ("b", over_http)):
                    start = time.perf_counter()
                    result = run_clients(args.clients, args.seconds, fn)
                    elapsed = time.perf_counter() - start
                    ok = [x for x in result if x[1] == 200]
                    if len(ok) != len(result):
                        raise SystemExit(f"{name}: {len(result) - len(ok)} requests failed in round {r + 1}")
                    rates[name].append(len(ok) / elapsed)
                    rows[name] += result
                    line.append(f"{name}={len(ok) / elapsed:.2f}/s")
                print(f"round {r + 1}: " + " ".join(line) + f"  load {os.getloadavg()[0]:.2f}", flush=True)
            ratio_best = max(rates["b"]) / max(rates["a"])
            ratio_median = statistics.median(rates["b"]) / statistics.median(rates["a"])

            # Overload: 4x the limit, no retries.
            rss_before = rss_mib(proc.pid)
            overload = run_clients(4 * args.max_concurrency, args.seconds * 2, over_http)
            rss_after = rss_mib(proc.pid)
            shed = sum(1 for _, status, _ in overload if status == 503)
            other = sum(1 for _, status, _ in overload if status not in (200, 503))
            print(f"overload: {len(overload)} requests, {shed} shed with 503, {other} other failures, accepted {latency(overload)}, "
                  f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB", flush=True)

            # A swap under load.
            swap_rows: list = []
            swapper = threading.Thread(target=lambda: (time.sleep(args.seconds / 3), build_index([work / "embeddings"], work / "index", kind="exact")))
            swapper.start()
            swap_rows = run_clients(args.clients, args.seconds, over_http)
            swapper.join()
            versions = [a.index_version for _, status, a in swap_rows if status == 200]
            failed = sum(1 for _, status, _ in swap_rows if status != 200)
            print(f"swap under load: {len(swap_rows)} requests, {failed} failed, versions {sorted(set(versions))}", flush=True)
        finally:
            for client in http_clients:
                client.close()
            stop_process(proc, grace=30)
    after = uptime()
    report = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "image_size": args.image_size, "clients": args.clients, "max_concurrency": args.max_concurrency,
        "rounds": args.rounds, "seconds": args.seconds, "queries": len(queries), "catalogue": len(catalogue),
        "requests_per_second": {"in_process": rates["a"], "service": rates["b"]},
        "ratio_best": round(ratio_best, 3), "ratio_median": round(ratio_median, 3), "target": TARGET_RATIO,
        "latency": {"in_process": latency(rows["a"]), "service": latency(rows["b"])},
        "overload": {"clients": 4 * args.max_concurrency, "requests": len(overload), "shed_503": shed, "other_failures": other,
                     "accepted": latency(overload), "rss_mib_before": round(rss_before, 1), "rss_mib_after": round(rss_after, 1)},
        "swap": {"requests": len(swap_rows), "failed": failed, "versions": sorted(set(versions)),
                 "last_version": versions[-1] if versions else None},
        "uptime_before": before, "uptime_after": after,
    }
    print(json.dumps(report, indent=2))
    print(f"service / in process: best {ratio_best:.2f}, median {ratio_median:.2f} (target >= {TARGET_RATIO})")
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
