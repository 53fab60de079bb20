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

How close to the machine's limit: the same rounds also time a large float32
``tf.linalg.matmul`` (``--matmul-size``, both cores, TensorFlow's own
threads), this machine's sustained float32 rate in that moment, and the
tower's multiply-adds per image are counted from its layers (each
convolution's and dense layer's output positions times its kernel's size;
checked against a hand count of the first convolution, and with
``--check-macs`` against TensorFlow's profiler). Each variant's "share" is
its images/s x 2 x multiply-adds / the matmul's FLOP/s: the fraction of what
the machine's matmul rate would allow (round by round, then the median).

Reported: images/s per variant (best and median round), the ratios (b)/(a)
(target >= 0.9) and (c)/(b) (target >= 0.85), p50/p99 latency of single-image
requests for (b) and (c) (interleaved), and the largest difference of (b)'s
and (c)'s embeddings from (a)'s on the same images (must be <= 1e-5, else the
comparison is not of the same computation). ``uptime`` is recorded before and
after: the machine is shared.

    cd /work/main && .venv/bin/python tools/bench_serving.py --image-size 96 128 --batch-size 32 \
        --images 256 --rounds 9 --latency-requests 100 --out bench-output/serving.json

``--variants`` times a subset (e.g. ``a,pixels_signature`` without the
server), and ``--precision`` exports the tower computing in a mixed policy
(``export --precision``), to see what it moves. With ``--checkpoint`` the
tower is a trained run's (its size) instead of a random one: with
``--precision`` this measures how far a mixed-precision export's vectors
are from the same weights at float32 (``max_abs_diff_b_vs_a``, and the
largest L2 distance between the two vectors of a photo).
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

from street2shop.model.precision import PRECISIONS  # noqa: E402 - imports no Keras

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


def multiply_adds(model: Any) -> dict[str, int]:
    """Multiply-adds per image of each layer with a kernel (convolutions, depthwise and separable ones, dense layers):
    its output positions (the output's shape without batch and channels) times its kernel's size."""
    import math

    from street2shop.model.precision import leaf_layers

    counts = {}
    for layer in leaf_layers(model):
        kernels = [v for v in layer.weights if v.path.rsplit("/", 1)[-1] in ("kernel", "depthwise_kernel", "pointwise_kernel")]
        if kernels:
            positions = math.prod(int(d) for d in layer.output.shape[1:-1])
            counts[layer.name] = sum(positions * math.prod(int(d) for d in k.shape) for k in kernels)
    return counts


def hand_count_first_conv(counts: dict[str, int], image_size: int) -> dict[str, Any]:
    """InceptionV3's first convolution by hand (3x3, stride 2, no padding, 3 → 32 channels), beside its count."""
    out = (image_size - 3) // 2 + 1
    first = next(iter(counts))  # the layers in order
    return {"layer": first, "hand": out * out * 3 * 3 * 3 * 32, "counted": counts[first], "formula": f"{out}x{out} outputs x 32 filters x 3x3x3"}


def profiler_multiply_adds(model: Any, image_size: int) -> int:
    """The same count from TensorFlow's profiler: the FLOPs of the Conv2D, depthwise and MatMul ops of the frozen graph, halved."""
    import tensorflow as tf
    from tensorflow.python.framework import convert_to_constants
    from tensorflow.python.profiler import model_analyzer, option_builder

    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec([1, image_size, image_size, 3], tf.float32))
    graph = convert_to_constants.convert_variables_to_constants_v2(concrete).graph
    options = option_builder.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    kinds = {op.name: op.type for op in graph.get_operations()}
    total = 0

    def walk(node: Any) -> None:
        nonlocal total
        if kinds.get(node.name) in ("Conv2D", "DepthwiseConv2dNative", "MatMul"):
            total += node.float_ops
        for child in node.children:
            walk(child)

    walk(model_analyzer.profile(graph, cmd="graph", options=options))
    return total // 2


def matmul_rate(size: int, repeats: int = 3, dtype: str = "float32") -> float:
    """FLOP/s of a ``tf.linalg.matmul`` of two ``size`` x ``size`` matrices of ``dtype``, best of ``repeats`` (after one warm-up)."""
    import tensorflow as tf

    a = tf.cast(tf.random.stateless_uniform([size, size], seed=[0, 1]), dtype)
    b = tf.cast(tf.random.stateless_uniform([size, size], seed=[0, 2]), dtype)
    matmul = tf.function(lambda: tf.reduce_sum(tf.linalg.matmul(a, b)))  # the sum makes it wait for the product
    matmul().numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul().numpy()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def bench_size(args: argparse.Namespace, image_size: int, images: list[bytes], workdir: Path) -> dict[str, Any]:
    import keras
    import numpy as np
    import tensorflow as tf

    from street2shop.data.image import prepare_image
    from street2shop.embedders import GrpcEmbedder, LocalEmbedder
    from street2shop.export import export_tower, load_checkpoint
    from street2shop.model.precision import with_precision
    from street2shop.model.siamese import tower_of
    from street2shop.model.tower import build_tower
    from street2shop.serving.server import StandInServer

    size = (image_size, image_size)
    bs = args.batch_size
    n = len(images)
    print(f"\n== {image_size}x{image_size}, batch {bs}, {n} images, {args.rounds} rounds ==", flush=True)

    export_base = workdir / f"export-{image_size}"
    if args.checkpoint:  # a trained tower (of a mixed-precision run, say); (a) computes with its weights in float32
        trained = tower_of(load_checkpoint(args.checkpoint))
        if tuple(trained.inputs[0].shape[1:3]) != size:
            raise SystemExit(f"{args.checkpoint} takes {tuple(trained.inputs[0].shape[1:3])} pixels; run with --image-size {trained.inputs[0].shape[1]}")
        tower = with_precision(trained, "float32")
        version_dir = export_tower(trained, export_base, precision=args.precision)
    else:
        keras.utils.set_random_seed(0)
        tower = build_tower(args.backbone, image_size=size, embedding_dim=args.embedding_dim, weights=None)
        version_dir = export_tower(tower, export_base, precision=args.precision)
    macs_by_layer = multiply_adds(tower)
    macs = sum(macs_by_layer.values())
    counting = {"multiply_adds_per_image": macs, "layers_counted": len(macs_by_layer)}
    if args.backbone == "inception_v3":
        counting["hand_check"] = hand_count_first_conv(macs_by_layer, image_size)
        assert counting["hand_check"]["hand"] == counting["hand_check"]["counted"], counting["hand_check"]
    if args.check_macs:
        counting["profiler_multiply_adds"] = profiler_multiply_adds(tower, image_size)
    print(f"multiply-adds per image: {macs / 1e9:.3f} G over {len(macs_by_layer)} layers"
          + (f" (TensorFlow's profiler: {counting['profiler_multiply_adds'] / 1e9:.3f} G)" if args.check_macs else ""), flush=True)

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
    client = None
    startup = 0.0
    log = workdir / f"server-{image_size}.log"
    with_server = not args.variants or "c" in args.variants.split(",")
    if with_server and args.in_process_server:
        server = StandInServer(export_base, port=0)
        server.start()
        port = server.port
    elif with_server:
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
        if with_server:
            client = GrpcEmbedder(f"127.0.0.1:{port}", model_name="street2shop", batch_size=bs)
            client.client.connect()

        def run_a() -> np.ndarray:
            return np.concatenate([np.asarray(tower.predict_on_batch(p)) for p in pixel_batches])

        def run_b() -> np.ndarray:
            return embedder.embed(images).require()

        def run_c() -> np.ndarray:
            assert client is not None
            return client.embed(images).require()

        xla_tower = tf.function(lambda p: tower(p, training=False), jit_compile=True)

        def run_a_xla() -> np.ndarray:  # (a) compiled by XLA (a diagnostic: --variants a,a_xla)
            return np.concatenate([xla_tower(tf.constant(p)).numpy() for p in pixel_batches])

        def run_pixels_sig() -> np.ndarray:
            return np.concatenate([embed_pixels_sig(pixels=tf.constant(p))["embedding"].numpy() for p in pixel_batches])

        def run_decode() -> np.ndarray:
            return np.concatenate([decode_only(tf.constant(b)).numpy() for b in byte_batches])

        variants: dict[str, Callable[[], np.ndarray]] = {"a": run_a, "b": run_b, "c": run_c}
        if not args.no_diagnostics:
            variants.update(pixels_signature=run_pixels_sig, decode_only=run_decode)
        if args.variants:
            variants = {name: fn for name, fn in {**variants, "a_xla": run_a_xla}.items() if name in args.variants.split(",")}

        # Warm-up pass (tracing, kernel selection, server threads) also yields the outputs compared.
        outputs = {name: fn() for name, fn in variants.items()}
        reference = run_a() if "a" not in outputs else outputs["a"]
        diffs = {f"max_abs_diff_{name}_vs_a": float(np.max(np.abs(outputs[name] - reference))) for name in ("b", "c") if name in outputs}
        diffs.update({f"max_l2_{name}_vs_a": float(np.max(np.linalg.norm(outputs[name] - reference, axis=1))) for name in ("b", "c") if name in outputs})
        # A mixed-precision export is compared with the float32 tower: its tolerance is the one BENCHMARKS.md measures.
        tolerance = TOLERANCE if args.precision == "float32" else float("inf")
        checks = {**diffs, "tolerance": tolerance, "equal_within_tolerance": bool(all(d <= tolerance for k, d in diffs.items() if k.startswith("max_abs")))}
        if "decode_only" in outputs:
            checks["max_abs_diff_decoded_pixels"] = float(np.max(np.abs(outputs["decode_only"] - pixels)))
        if "pixels_signature" in outputs:
            checks["max_abs_diff_pixels_signature_vs_a"] = float(np.max(np.abs(outputs["pixels_signature"] - reference)))
        print("check: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in checks.items()), flush=True)

        rates: dict[str, list[float]] = {name: [] for name in variants}
        limits: list[float] = []  # the matmul's FLOP/s in each round
        bf16_limits: list[float] = []  # the same in bfloat16, for a bfloat16 export
        loads: list[float] = []  # 1-minute load average after each round
        for r in range(args.rounds):
            line = []
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                rate = n / (time.perf_counter() - start)
                rates[name].append(rate)
                line.append(f"{name}={rate:.1f}")
            limits.append(matmul_rate(args.matmul_size))
            if args.precision == "mixed_bfloat16":
                bf16_limits.append(matmul_rate(args.matmul_size, dtype="bfloat16"))
            loads.append(round(os.getloadavg()[0], 2))
            print(f"round {r + 1}: " + " ".join(line) + f" images/s; matmul {limits[-1] / 1e9:.0f} GFLOP/s"
                  + (f", bfloat16 {bf16_limits[-1] / 1e9:.0f}" if bf16_limits else ""), flush=True)

        # Single-image latency, (b) and (c) interleaved.
        lat: dict[str, list[float]] = {name: [] for name in ("b", "c") if name in variants}
        for i in range(args.latency_requests if lat else 0):
            one = [images[i % n]]
            for name in lat:
                fn = embedder.embed if name == "b" else client.embed  # type: ignore[union-attr]
                start = time.perf_counter()
                fn(one)
                lat[name].append((time.perf_counter() - start) * 1000.0)
        latency = {name: {"p50_ms": round(percentile(v, 50), 2), "p99_ms": round(percentile(v, 99), 2),
                          "mean_ms": round(statistics.fmean(v), 2), "requests": len(v)} for name, v in lat.items() if v}
        if client is not None:
            client.close()
    finally:
        if server is not None:
            server.stop()
        if proc is not None:
            stop_process(proc)

    s = {name: summary(v) for name, v in rates.items()}
    ratios: dict[str, Any] = {}
    if {"a", "b", "c"} <= set(s):
        ratios.update({
            "b_over_a_median": round(s["b"]["median"] / s["a"]["median"], 3),
            "b_over_a_best": round(s["b"]["best"] / s["a"]["best"], 3),
            "c_over_b_median": round(s["c"]["median"] / s["b"]["median"], 3),
            "c_over_b_best": round(s["c"]["best"] / s["b"]["best"], 3),
        })
        # Paired: the ratio within each round (neighbours in time share the machine's noise), then the median.
        ratios["b_over_a_paired_median"] = round(statistics.median(b / a for a, b in zip(rates["a"], rates["b"])), 3)
        ratios["c_over_b_paired_median"] = round(statistics.median(c / b for b, c in zip(rates["b"], rates["c"])), 3)
        ratios["b_over_a_target_met"] = ratios["b_over_a_median"] >= TARGET_B_OVER_A
        ratios["c_over_b_target_met"] = ratios["c_over_b_median"] >= TARGET_C_OVER_B
    # The share of the machine's limit, round by round: images/s x 2 x multiply-adds over the matmul's FLOP/s.
    share = {name: round(statistics.median(2.0 * macs * r / f for r, f in zip(v, limits)), 3)
             for name, v in rates.items() if name != "decode_only"}
    limit = {"matmul_size": args.matmul_size, "gflops_median": round(statistics.median(limits) / 1e9, 1),
             "gflops_rounds": [round(f / 1e9, 1) for f in limits], "images_per_s_at_the_limit": round(statistics.median(limits) / (2.0 * macs), 1)}
    if bf16_limits:
        limit["bfloat16_gflops_median"] = round(statistics.median(bf16_limits) / 1e9, 1)
        limit["share_of_the_bfloat16_matmul"] = {name: round(statistics.median(2.0 * macs * r / f for r, f in zip(v, bf16_limits)), 3)
                                                 for name, v in rates.items() if name != "decode_only"}
    if "decode_only" in s and "pixels_signature" in s:
        # If decode and model simply add up, (b) would be 1 / (1/model + 1/decode).
        m, d = s["pixels_signature"]["median"], s["decode_only"]["median"]
        ratios["b_predicted_from_parts"] = round(1.0 / (1.0 / m + 1.0 / d), 2)
        ratios["b_over_a_predicted_from_parts"] = round(ratios["b_predicted_from_parts"] / m, 3)
    for name, v in s.items():
        print(f"{name:>17}: best {v['best']:7.1f}  median {v['median']:7.1f} images/s"
              + (f"  share of the matmul limit {share[name]:.3f}" if name in share else ""), flush=True)
    print(f"the limit: float32 matmul {limit['gflops_median']} GFLOP/s (median round) = {limit['images_per_s_at_the_limit']} images/s "
          f"at {macs / 1e9:.3f} G multiply-adds each")
    if "b_over_a_median" in ratios:
        print(f"(b)/(a) = {ratios['b_over_a_median']:.3f} of medians, {ratios['b_over_a_best']:.3f} of bests, "
              f"{ratios['b_over_a_paired_median']:.3f} median of per-round ratios (target >= {TARGET_B_OVER_A})")
        print(f"(c)/(b) = {ratios['c_over_b_median']:.3f} of medians, {ratios['c_over_b_best']:.3f} of bests, "
              f"{ratios['c_over_b_paired_median']:.3f} median of per-round ratios (target >= {TARGET_C_OVER_B})")
    if "b_over_a_predicted_from_parts" in ratios:
        print(f"(b)/(a) predicted from the parts (embed_pixels + decode_only medians): {ratios['b_over_a_predicted_from_parts']:.3f}")
    for name, v in latency.items():
        print(f"latency ({name}) single image: p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms, mean {v['mean_ms']:.1f} ms")
    return {"image_size": image_size, "images_per_s": s, "ratios": ratios, "share_of_matmul_limit": share, "limit": limit,
            "counting": counting, "latency": latency, "checks": checks,
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
    parser.add_argument("--variants", default="", help="time only these, comma-separated (a, b, c, pixels_signature, decode_only, "
                        "and a_xla: (a) compiled by XLA); '' = all but a_xla")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="the export computes in this policy (export --precision); (a) stays the float32 tower")
    parser.add_argument("--checkpoint", default="", help="a trained checkpoint's tower instead of a random one (its backbone and size)")
    parser.add_argument("--matmul-size", type=int, default=4096, help="the limit: an N x N float32 matmul, timed in every round")
    parser.add_argument("--check-macs", action="store_true", help="also count the multiply-adds with TensorFlow's profiler")
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
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "precision": args.precision,
        "threads": {k: os.environ.get(k, "default") for k in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS")},
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "targets": {"b_over_a": TARGET_B_OVER_A, "c_over_b": TARGET_C_OVER_B, "tolerance": TOLERANCE},
        "uptime_before": before, "uptime_after": after, "results": results,
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
