"""Does the robust contrastive loss cost anything? Training pairs/s, side by side.

Builds the same siamese model twice (same backbone, size, batch, data) and
times training steps with (a) ``RobustContrastiveLoss`` plus its metrics and
(b) a plain built-in Keras loss (mean squared error on ``distance``), in
alternating rounds so that machine noise hits both alike. Target: (a)/(b) >= 0.95.

    .venv/bin/python tools/bench_train.py --image-size 96 --batch-size 32 --rounds 3 --steps 5

``--workers N`` measures something else: what training on N workers costs.
Each round trains the same run (a generated dataset, the full pipeline,
``train()``) once in one process and once as N ``MultiWorkerMirroredStrategy``
worker processes on loopback, on this machine's cores, with the same global
batch; pairs/s are timed over the epochs after the first (tracing and start-up
left out). On one machine the workers share its cores, so this shows the
overhead of the collectives and of N processes, not a speed-up.

    .venv/bin/python tools/bench_train.py --workers 2 --image-size 96 --batch-size 32 --rounds 3

``--settings PRECISION/JIT ...`` measures what mixed precision and XLA give
on this machine: the same siamese model (same seed, backbone, size, batch
and batch of data as the loss comparison) built and compiled once per
setting (``FitConfig.precision``: float32, mixed_bfloat16, mixed_float16;
``jit_compile``: off or on), all kept alive, and timed in interleaved rounds
after ``--warmup-rounds`` untimed ones.
Reported: pairs/s per setting (best and median round), each setting's ratio
to the first one within each round (median of the per-round ratios), the
first step's time (tracing, and XLA's compilation), the first step's loss
(the same weights and pairs: it shows what the precision changes), the
steps a float16 loss scale skipped, peak memory, and the load.

    nice -n 5 .venv/bin/python tools/bench_train.py --settings all --image-size 96 --batch-size 32 --rounds 5 --steps 4

``--candidates BACKBONE@SIZE ...`` measures what a recipe's budget buys with
each backbone and input size: the whole recipe (``--config``: its losses,
heads, data pipeline and augmentation) trains on the real photos
(``--manifest``, ``--auxiliary-dir``) for ``--epochs`` epochs of
``--pairs-per-epoch`` in one fresh process per candidate, candidates
interleaved over ``--rounds``; pairs/s over the epochs after the first (graph
tracing and start-up left out), best round. These set each candidate's
pairs budget for an equal-time comparison (BENCHMARKS "Round 5").

    .venv/bin/python tools/bench_train.py --config configs/grocery-30min-v1.toml \
        --candidates inception_v3@96 resnet50@128 mobilenet_v3_large@160 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import write_report  # noqa: E402 - imports no Keras


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and variant")
    parser.add_argument("--warmup-rounds", type=int, default=1,
                        help="--settings: untimed rounds after the first step (a graph without XLA once ran its first round "
                             "5 times slower than the next ones here; BENCHMARKS.md)")
    parser.add_argument("--out", default="")
    parser.add_argument("--workers", type=int, default=1, help="N > 1: N loopback workers vs one process (not the loss cost)")
    parser.add_argument("--epochs", type=int, default=3, help="--workers: epochs per run; the first is not timed")
    parser.add_argument("--pairs-per-epoch", type=int, default=256, help="--workers: training pairs per epoch")
    parser.add_argument("--worker-threads", type=int, default=0, help="--workers: TF intra- and inter-op threads per worker process (0 = TF's default)")
    parser.add_argument("--settings", nargs="+", default=[], metavar="PRECISION/JIT",
                        help="precision and XLA settings side by side, e.g. float32/off mixed_bfloat16/on; 'all': the six")
    parser.add_argument("--candidates", nargs="+", default=[], metavar="BACKBONE@SIZE",
                        help="the recipe's training pairs/s per backbone and input size (see above)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "grocery-30min-v1.toml"), help="--candidates: the recipe")
    parser.add_argument("--manifest", default=str(SHARED / "grocery" / "manifest.csv"), help="--candidates: the photos")
    parser.add_argument("--auxiliary-dir", default=str(SHARED / "coil100" / "images"), help="--candidates: the auxiliary set")
    args = parser.parse_args()
    if args.out:  # its folder now, not after minutes of measuring
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"--out {args.out}: cannot make its folder: {e}")
    if args.settings:
        return bench_settings(args)
    if args.candidates:
        return bench_candidates(args)
    if args.workers > 1:
        return bench_workers(args)

    import keras

    from street2shop.config import TrainConfig
    from street2shop.compile import build_model, build_optimizer

    config = TrainConfig().replace(backbone=args.backbone, image_size=args.image_size, weights="none", batch_size=args.batch_size,
                                   w_product=0.0)  # pairs only, as BENCHMARKS.md measured it (the default is now 0.5)
    b, s = args.batch_size, args.image_size
    x, y, w = _pair_batch(b, s)

    keras.utils.set_random_seed(0)
    robust = build_model(config, None)
    keras.utils.set_random_seed(0)
    plain = build_model(config, None)
    plain.compile(optimizer=build_optimizer(config), loss={"distance": keras.losses.MeanSquaredError()})
    models = {"robust": robust, "plain": plain}
    for model in models.values():
        model.train_on_batch(x, y, sample_weight=w)  # trace and compile
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                model.train_on_batch(x, y, sample_weight=w)
            times[name].append(time.perf_counter() - start)
    pairs = {name: args.steps * b / min(t) for name, t in times.items()}  # best round: least disturbed
    result = {
        "backbone": args.backbone, "image_size": s, "batch_size": b, "rounds": args.rounds, "steps": args.steps,
        "robust_pairs_per_s": round(pairs["robust"], 2), "plain_pairs_per_s": round(pairs["plain"], 2),
        "ratio": round(pairs["robust"] / pairs["plain"], 3),
        "robust_round_s": [round(t, 2) for t in times["robust"]], "plain_round_s": [round(t, 2) for t in times["plain"]],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_report(result, args.out)
    return 0


def _pair_batch(batch_size: int, image_size: int) -> tuple[dict, dict, dict]:
    """One batch of random pixel pairs, half positive, and its sample weights."""
    import numpy as np

    rng = np.random.default_rng(0)
    b, s = batch_size, image_size
    x = {"image_a": rng.uniform(0, 255, (b, s, s, 3)).astype("float32"), "image_b": rng.uniform(0, 255, (b, s, s, 3)).astype("float32")}
    return x, {"distance": (np.arange(b) % 2).astype("float32")}, {"distance": np.ones(b, "float32")}


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_settings(args: argparse.Namespace) -> int:
    """``--settings``: training pairs/s under each precision and XLA setting, one model each, interleaved rounds."""
    import statistics

    import keras

    from street2shop.compile import build_model
    from street2shop.config import JIT_COMPILE, TrainConfig
    from street2shop.model.precision import PRECISIONS

    texts = [f"{p}/{j}" for p in PRECISIONS for j in ("off", "on")] if args.settings == ["all"] else args.settings
    settings = {}
    for text in texts:
        precision, _, jit = text.partition("/")
        if precision not in PRECISIONS or jit not in JIT_COMPILE:
            raise SystemExit(f"a setting is PRECISION/JIT with PRECISION in {PRECISIONS} and JIT in {JIT_COMPILE}. Received: {text!r}")
        settings[text] = (precision, jit)
    base = TrainConfig().replace(backbone=args.backbone, image_size=args.image_size, weights="none", batch_size=args.batch_size,
                                 w_product=0.0)  # pairs only, as the loss comparison
    x, y, w = _pair_batch(args.batch_size, args.image_size)
    load = [os.getloadavg()]
    models, first = {}, {}
    for text, (precision, jit) in settings.items():
        keras.utils.set_random_seed(0)  # the same initial weights in every setting (variables are float32 in all)
        model = build_model(base.replace(precision=precision, jit_compile=jit), None)
        start = time.perf_counter()
        loss = model.train_on_batch(x, y, sample_weight=w, return_dict=True)["loss"]  # traces (and compiles, with XLA)
        first[text] = {"first_step_s": round(time.perf_counter() - start, 1), "first_step_loss": round(float(loss), 6),
                       "xla": bool(model.jit_compile), "loss_scaling": type(model.optimizer).__name__ == "LossScaleOptimizer",
                       "peak_rss_gb_after": round(_peak_rss_gb(), 2)}
        models[text] = model
        print(f"{text}: first step {first[text]['first_step_s']} s, loss {first[text]['first_step_loss']}", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {text: [] for text in settings}
    warmup: dict[str, list[float]] = {text: [] for text in settings}
    for r in range(args.warmup_rounds + args.rounds):
        timed = r >= args.warmup_rounds
        for text, model in models.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                model.train_on_batch(x, y, sample_weight=w)
            (times if timed else warmup)[text].append(time.perf_counter() - start)
        load.append(os.getloadavg())
        print(f"{'round' if timed else 'warm-up round'} {r + 1 - (args.warmup_rounds if timed else 0)}: "
              + ", ".join(f"{t} {args.steps * args.batch_size / (times if timed else warmup)[t][-1]:.2f}" for t in settings)
              + f" pairs/s, load {load[-1][0]:.1f}", file=sys.stderr, flush=True)
    reference = texts[0]
    for text, model in models.items():
        optimizer = model.optimizer
        applied = int((optimizer.inner_optimizer if first[text]["loss_scaling"] else optimizer).iterations.numpy())
        first[text]["steps_skipped"] = 1 + (args.warmup_rounds + args.rounds) * args.steps - applied
    result = {
        "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size, "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds, "steps": args.steps,
        "pairs_per_s_best": {t: round(args.steps * args.batch_size / min(v), 2) for t, v in times.items()},
        "pairs_per_s_median": {t: round(args.steps * args.batch_size / statistics.median(v), 2) for t, v in times.items()},
        f"ratio_to_{reference}_paired_median": {t: round(statistics.median(a / b for a, b in zip(times[reference], v)), 3) for t, v in times.items()},
        "round_s": {t: [round(v, 2) for v in vs] for t, vs in times.items()},
        "warmup_round_s": {t: [round(v, 2) for v in vs] for t, vs in warmup.items()},
        "settings": first, "load_1_5_15": [[round(v, 2) for v in avg] for avg in load],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_report(result, args.out)
    return 0


# One training run; prints the chief's epoch times. Every worker process runs it with its own TF_CONFIG.
TIMED_RUN = """
import json, sys, time
import keras
from street2shop.config import TrainConfig
from street2shop.train import train

class EpochTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds, self.cpu_seconds = [], []
    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)
        self.cpu_seconds.append(time.process_time() - self.cpu_start)  # every thread of the process

timer = EpochTimes()
values = json.loads(sys.argv[1])
recipe = values.pop("recipe", None)
if recipe:
    from street2shop.config import load_config
    config = load_config(recipe).replace(**values)
else:
    config = TrainConfig().replace(**{"w_product": 0.0, **values})  # pairs only
result = train(config, extra_callbacks=[timer], verbose=0)
print("EPOCH_SECONDS " + json.dumps({"seconds": timer.seconds, "cpu_seconds": timer.cpu_seconds, "loss": result.history["loss"]}))
"""


def _timed_run(values: dict, workers: int, threads: int, logs: Path) -> dict:
    """Runs ``TIMED_RUN`` as ``workers`` processes (a loopback cluster when > 1); the chief's epoch times and losses."""
    import subprocess

    from street2shop.cluster import loopback_tf_configs

    configs = loopback_tf_configs(workers) if workers > 1 else [""]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if threads:
        env.update(TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS=str(threads))
    procs = []
    for i, tf_config in enumerate(configs):
        with open(logs / f"w{workers}-{i}.out", "w") as out, open(logs / f"w{workers}-{i}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", TIMED_RUN, json.dumps(values)], stdout=out, stderr=err,
                                          env=dict(env, TF_CONFIG=tf_config)))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a run of {workers} worker(s) failed ({codes}); see {logs}/w{workers}-*.err")
    line = next(line for line in (logs / f"w{workers}-0.out").read_text().splitlines() if line.startswith("EPOCH_SECONDS "))
    return json.loads(line.split(" ", 1)[1])


def bench_workers(args: argparse.Namespace) -> int:
    """``--workers N``: the same training run in one process and on N loopback workers, in alternating rounds."""
    import tempfile

    from street2shop.data.synthetic import generate

    if args.epochs < 2:
        raise SystemExit("--epochs must be >= 2 (the first epoch is not timed)")
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        tmp = Path(tmp)
        generate(tmp / "data", products=40, street_per_product=6, image_size=max(128, args.image_size), seed=0)
        values = dict(manifest=str(tmp / "data" / "manifest.csv"), backbone=args.backbone, weights="none", image_size=args.image_size,
                      batch_size=args.batch_size, pairs_per_epoch=args.pairs_per_epoch, epochs=args.epochs, val_pairs=0)
        variants = {"one_process": 1, f"{args.workers}_workers": args.workers}
        timed: dict[str, list[float]] = {name: [] for name in variants}
        losses: dict[str, list[list[float]]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, workers in variants.items():
                run = dict(values, output_dir=str(tmp / f"run-{name}-{r}"))
                (tmp / f"logs-{r}").mkdir(exist_ok=True)
                epochs = _timed_run(run, workers, args.worker_threads if workers > 1 else 0, tmp / f"logs-{r}")
                timed[name].append(sum(epochs["seconds"][1:]))
                losses[name].append([round(v, 4) for v in epochs["loss"]])
                print(f"round {r + 1}: {name}: {(args.epochs - 1) * args.pairs_per_epoch / timed[name][-1]:.2f} pairs/s", file=sys.stderr)
            load.append(os.getloadavg())
    pairs = {name: (args.epochs - 1) * args.pairs_per_epoch / min(t) for name, t in timed.items()}  # best round: least disturbed
    one, many = pairs["one_process"], pairs[f"{args.workers}_workers"]
    result = {
        "backbone": args.backbone, "image_size": args.image_size, "global_batch_size": args.batch_size, "workers": args.workers,
        "worker_threads": args.worker_threads or "default", "pairs_per_epoch": args.pairs_per_epoch, "timed_epochs": args.epochs - 1,
        "rounds": args.rounds, "pairs_per_s": {name: round(v, 2) for name, v in pairs.items()}, "ratio_workers_to_one": round(many / one, 3),
        "timed_s": {name: [round(t, 1) for t in ts] for name, ts in timed.items()}, "losses": losses,
        "load_1_5_15": [[round(v, 2) for v in avg] for avg in load],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_report(result, args.out)
    return 0


def bench_candidates(args: argparse.Namespace) -> int:
    """``--candidates``: the recipe's training pairs/s per backbone and input size, one process each, interleaved."""
    import tempfile

    if args.epochs < 2:
        raise SystemExit("--epochs must be >= 2 (the first epoch is not timed)")
    candidates = []
    for text in args.candidates:
        name, _, size = text.partition("@")
        if not size.isdigit():
            raise SystemExit(f"a candidate is BACKBONE@SIZE, e.g. resnet50@128. Received: {text!r}")
        candidates.append((text, name, int(size)))
    load = [os.getloadavg()]
    timed: dict[str, list[float]] = {text: [] for text, _, _ in candidates}
    cpu: dict[str, list[float]] = {text: [] for text, _, _ in candidates}
    with tempfile.TemporaryDirectory(prefix="bench-candidates-") as tmp:
        tmp = Path(tmp)
        for r in range(args.rounds):
            for text, name, size in candidates:
                values = dict(recipe=args.config, manifest=args.manifest, auxiliary_dir=args.auxiliary_dir, backbone=name, image_size=size,
                              pairs_per_epoch=args.pairs_per_epoch, epochs=args.epochs, output_dir=str(tmp / f"run-{text}-{r}"))
                (tmp / f"logs-{text}-{r}").mkdir()
                epochs = _timed_run(values, 1, 0, tmp / f"logs-{text}-{r}")
                timed[text].append(sum(epochs["seconds"][1:]))
                cpu[text].append(sum(epochs["cpu_seconds"][1:]))
                print(f"round {r + 1}: {text}: {(args.epochs - 1) * args.pairs_per_epoch / timed[text][-1]:.2f} pairs/s, "
                      f"{1000 * cpu[text][-1] / ((args.epochs - 1) * args.pairs_per_epoch):.0f} CPU ms/pair, load {os.getloadavg()[0]:.1f}",
                      file=sys.stderr)
            load.append(os.getloadavg())
    timed_pairs = (args.epochs - 1) * args.pairs_per_epoch
    pairs = {text: timed_pairs / min(t) for text, t in timed.items()}  # best round: least disturbed
    result = {
        "config": args.config, "pairs_per_epoch": args.pairs_per_epoch, "timed_epochs": args.epochs - 1, "rounds": args.rounds,
        "pairs_per_s": {text: round(v, 2) for text, v in pairs.items()},
        # CPU time of the process (all its threads) per pair, median round: far less sensitive to other jobs than wall time
        "cpu_ms_per_pair": {text: round(1000 * sorted(t)[len(t) // 2] / timed_pairs, 1) for text, t in cpu.items()},
        "timed_s": {text: [round(t, 1) for t in ts] for text, ts in timed.items()},
        "cpu_s": {text: [round(t, 1) for t in ts] for text, ts in cpu.items()},
        "load_1_5_15": [[round(v, 2) for v in avg] for avg in load],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
