r"""Serving throughput: Keras tower vs. SavedModel on bytes vs. gRPC, side by side in one run.

Same model (InceptionV3 tower, random weights, 128-d), same real street photos
(the first ``--images`` street images of the val+train splits of the grocery
manifest), same batch size, timed in alternating rounds (a, b, c, a, b, c, ...)
so machine noise hits every variant alike:

(a) ``tower.predict_on_batch`` on float32 pixels decoded beforehand (decode not timed);
(b) the exported SavedModel's ``serving_default`` signature on the encoded bytes,
    in this process (:class:`street2shop.embedders.LocalEmbedder`, ``tf.saved_model.load``);
(c) :class:`street2shop.embedders.GrpcEmbedder` (the EmbeddingClient) → the stand-in server over
    loopback gRPC; the server runs in a subprocess (``python -m street2shop serve``)
    so client and server do not share a GIL (``--in-process-server`` to compare).

Two diagnostics run in the same rounds to explain the ratios: the SavedModel's
``embed_pixels`` signature (the graph of (b) without decoding) and the decode
alone (``prepare_image`` over the batch, as inside ``serving_default``).

Reported: images/s per variant (best and median round), the ratios (b)/(a)
(target >= 0.9) and (c)/(b) (target >= 0.85), p50/p99 latency of single-image
requests for (b) and (c) (interleaved), and the largest difference of (b)'s
and (c)'s embeddings from (a)'s on the same images (must be <= 1e-5, else the
comparison is not of the same computation). ``uptime`` is recorded before and
after: the machine is shared.

    cd /work/main && .venv/bin/python tools/bench_serving.py --image-size 96 128 --batch-size 32 \
        --images 256 --rounds 9 --latency-requests 100 --out bench-output/serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MANIFEST = ROOT.parent / "shared" / "data" / "grocery" / "manifest.csv"
TARGET_B_OVER_A = 0.9
TARGET_C_OVER_B = 0.85
TOLERANCE = 1e-5


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def stop_process(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Terminates ``proc``, and kills it if it is still there after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def write_report(report: dict, out: str) -> None:
    """A benchmark's report as JSON at ``out`` (its folder made), when ``out`` is given."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen | None, log: Path | None, timeout: float = 300.0) -> float:
    """Blocks until 127.0.0.1:port accepts a connection (the stand-in binds only after loading and warm-up)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc is not None and proc.poll() is not None:
            text = log.read_text()[-3000:] if log and log.exists() else ""
            raise SystemExit(f"the server exited with code {proc.returncode} before answering:\n{text}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return time.perf_counter() - start
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not answer on port {port} within {timeout:.0f}s")


def summary(rates: list[float]) -> dict[str, Any]:
    return {"rounds": [round(r, 2) for r in rates], "best": round(max(rates), 2), "median": round(statistics.median(rates), 2)}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n*q/100), at least 1
    return ordered[int(rank) - 1]


def bench_size(args: argparse.Namespace, image_size: int, images: list[bytes], workdir: Path) -> dict[str, Any]:
    import keras
    import numpy as np
    import tensorflow as tf

    from street2shop.data.image import prepare_image
    from street2shop.embedders import GrpcEmbedder, LocalEmbedder
    from street2shop.export import export_tower
    from street2shop.model.tower import build_tower
    from street2shop.serving.server import StandInServer

    size = (image_size, image_size)
    bs = args.batch_size
    n = len(images)
    print(f"\n== {image_size}x{image_size}, batch {bs}, {n} images, {args.rounds} rounds ==", flush=True)

    keras.utils.set_random_seed(0)
    tower = build_tower(args.backbone, image_size=size, embedding_dim=args.embedding_dim, weights=None)
    export_base = workdir / f"export-{image_size}"
    version_dir = export_tower(tower, export_base)

    # (a)'s input: decoded beforehand with the one preprocessing function, not timed.
    pixels = np.stack([prepare_image(tf.constant(b), image_size=size)[0].numpy() for b in images]).astype(np.float32)
    pixel_batches = [pixels[i : i + bs] for i in range(0, n, bs)]

    embedder = LocalEmbedder(export_base, batch_size=bs)  # (b)
    loaded = tf.saved_model.load(str(version_dir))  # diagnostics
    embed_pixels_sig = loaded.signatures["embed_pixels"]
    pixel_spec = tf.TensorSpec([size[0], size[1], 3], tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def decode_only(image_bytes):  # the decode_batch of export.serving_default
        return tf.map_fn(lambda b: prepare_image(b, image_size=size)[0], image_bytes, fn_output_signature=pixel_spec)

    byte_batches = [images[i : i + bs] for i in range(0, n, bs)]

    proc = None
    server = None
    log = workdir / f"server-{image_size}.log"
    if args.in_process_server:
        server = StandInServer(export_base, port=0)
        server.start()
        port = server.port
        startup = 0.0
    else:
        port = free_port()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "street2shop", "serve", str(export_base), "--port", str(port)],
                cwd=str(ROOT), env=env, stdout=fh, stderr=subprocess.STDOUT,
            )
        startup = wait_for_port(port, proc, log)
        print(f"server subprocess pid {proc.pid} answered on port {port} after {startup:.1f}s", flush=True)
    try:
        client = GrpcEmbedder(f"127.0.0.1:{port}", model_name="street2shop", batch_size=bs)
        client.client.connect()

        def run_a() -> np.ndarray:
            return np.concatenate([np.asarray(tower.predict_on_batch(p)) for p in pixel_batches])

        def run_b() -> np.ndarray:
            return embedder.embed(images).require()

        def run_c() -> np.ndarray:
            return client.embed(images).require()

        def run_pixels_sig() -> np.ndarray:
            return np.concatenate([embed_pixels_sig(pixels=tf.constant(p))["embedding"].numpy() for p in pixel_batches])

        def run_decode() -> np.ndarray:
            return np.concatenate([decode_only(tf.constant(b)).numpy() for b in byte_batches])

        variants: dict[str, Callable[[], np.ndarray]] = {"a": run_a, "b": run_b, "c": run_c}
        if not args.no_diagnostics:
            variants.update(pixels_signature=run_pixels_sig, decode_only=run_decode)

        # Warm-up pass (tracing, kernel selection, server threads) also yields the outputs compared.
        outputs = {name: fn() for name, fn in variants.items()}
        diff_b = float(np.max(np.abs(outputs["b"] - outputs["a"])))
        diff_c = float(np.max(np.abs(outputs["c"] - outputs["a"])))
        checks = {"max_abs_diff_b_vs_a": diff_b, "max_abs_diff_c_vs_a": diff_c, "tolerance": TOLERANCE,
                  "equal_within_tolerance": bool(diff_b <= TOLERANCE and diff_c <= TOLERANCE)}
        if "decode_only" in outputs:
            checks["max_abs_diff_decoded_pixels"] = float(np.max(np.abs(outputs["decode_only"] - pixels)))
        if "pixels_signature" in outputs:
            checks["max_abs_diff_pixels_signature_vs_a"] = float(np.max(np.abs(outputs["pixels_signature"] - outputs["a"])))
        print("check: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in checks.items()), flush=True)

        rates: dict[str, list[float]] = {name: [] for name in variants}
        loads: list[float] = []  # 1-minute load average after each round
        for r in range(args.rounds):
            line = []
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                rate = n / (time.perf_counter() - start)
                rates[name].append(rate)
                line.append(f"{name}={rate:.1f}")
            loads.append(round(os.getloadavg()[0], 2))
            print(f"round {r + 1}: " + " ".join(line) + " images/s", flush=True)

        # Single-image latency, (b) and (c) interleaved.
        lat: dict[str, list[float]] = {"b": [], "c": []}
        for i in range(args.latency_requests):
            one = [images[i % n]]
            for name, fn in (("b", embedder.embed), ("c", client.embed)):
                start = time.perf_counter()
                fn(one)
                lat[name].append((time.perf_counter() - start) * 1000.0)
        latency = {name: {"p50_ms": round(percentile(v, 50), 2), "p99_ms": round(percentile(v, 99), 2),
                          "mean_ms": round(statistics.fmean(v), 2), "requests": len(v)} for name, v in lat.items()}
        client.close()
    finally:
        if server is not None:
            server.stop()
        if proc is not None:
            stop_process(proc)

    s = {name: summary(v) for name, v in rates.items()}
    ratios = {
        "b_over_a_median": round(s["b"]["median"] / s["a"]["median"], 3),
        "b_over_a_best": round(s["b"]["best"] / s["a"]["best"], 3),
        "c_over_b_median": round(s["c"]["median"] / s["b"]["median"], 3),
        "c_over_b_best": round(s["c"]["best"] / s["b"]["best"], 3),
    }
    # Paired: the ratio within each round (neighbours in time share the machine's noise), then the median.
    ratios["b_over_a_paired_median"] = round(statistics.median(b / a for a, b in zip(rates["a"], rates["b"])), 3)
    ratios["c_over_b_paired_median"] = round(statistics.median(c / b for b, c in zip(rates["b"], rates["c"])), 3)
    ratios["b_over_a_target_met"] = ratios["b_over_a_median"] >= TARGET_B_OVER_A
    ratios["c_over_b_target_met"] = ratios["c_over_b_median"] >= TARGET_C_OVER_B
    if "decode_only" in s and "pixels_signature" in s:
        # If decode and model simply add up, (b) would be 1 / (1/model + 1/decode).
        m, d = s["pixels_signature"]["median"], s["decode_only"]["median"]
        ratios["b_predicted_from_parts"] = round(1.0 / (1.0 / m + 1.0 / d), 2)
        ratios["b_over_a_predicted_from_parts"] = round(ratios["b_predicted_from_parts"] / m, 3)
    for name, v in s.items():
        print(f"{name:>17}: best {v['best']:7.1f}  median {v['median']:7.1f} images/s", flush=True)
    print(f"(b)/(a) = {ratios['b_over_a_median']:.3f} of medians, {ratios['b_over_a_best']:.3f} of bests, "
          f"{ratios['b_over_a_paired_median']:.3f} median of per-round ratios (target >= {TARGET_B_OVER_A})")
    print(f"(c)/(b) = {ratios['c_over_b_median']:.3f} of medians, {ratios['c_over_b_best']:.3f} of bests, "
          f"{ratios['c_over_b_paired_median']:.3f} median of per-round ratios (target >= {TARGET_C_OVER_B})")
    if "b_over_a_predicted_from_parts" in ratios:
        print(f"(b)/(a) predicted from the parts (embed_pixels + decode_only medians): {ratios['b_over_a_predicted_from_parts']:.3f}")
    for name, v in latency.items():
        print(f"latency ({name}) single image: p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms, mean {v['mean_ms']:.1f} ms")
    return {"image_size": image_size, "images_per_s": s, "ratios": ratios, "latency": latency, "checks": checks,
            "server": "in-process thread" if args.in_process_server else "subprocess", "server_startup_s": round(startup, 1),
            "load_average_after_each_round": loads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="manifest CSV of the photos")
    parser.add_argument("--splits", default="val,train", help="street images of these splits, in manifest order")
    parser.add_argument("--image-size", type=int, nargs="+", default=[96], help="tower input size(s); one export and server per size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="images per timed pass")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; each round runs every variant once")
    parser.add_argument("--latency-requests", type=int, default=100, help="single-image requests each for (b) and (c)")
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--in-process-server", action="store_true", help="run the stand-in server in this process (shares the GIL)")
    parser.add_argument("--no-diagnostics", action="store_true", help="time only (a), (b), (c)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from street2shop.data.records import read_manifest_csv

    before = uptime()
    print(f"uptime before: {before}", flush=True)
    splits = {s for s in args.splits.split(",") if s}
    records = [r for r in read_manifest_csv(args.manifest) if r.domain == "street" and r.split in splits][: args.images]
    if len(records) < args.images:
        raise SystemExit(f"only {len(records)} street images in splits {sorted(splits)} of {args.manifest}; asked for {args.images}")
    images = [Path(r.image_path).read_bytes() for r in records]
    print(f"{len(images)} street photos from {args.manifest}, mean {sum(map(len, images)) / len(images) / 1024:.1f} KiB", flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        for image_size in args.image_size:
            results.append(bench_size(args, image_size, images, Path(tmp)))
    after = uptime()
    print(f"uptime after: {after}")

    report = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "backbone": args.backbone, "embedding_dim": args.embedding_dim, "weights": None,
        "batch_size": args.batch_size, "images": len(images), "rounds": args.rounds,
        "latency_requests": args.latency_requests, "manifest": args.manifest, "splits": sorted(splits),
        "mean_image_bytes": round(sum(map(len, images)) / len(images)),
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "targets": {"b_over_a": TARGET_B_OVER_A, "c_over_b": TARGET_C_OVER_B, "tolerance": TOLERANCE},
        "uptime_before": before, "uptime_after": after, "results": results,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
