"""Input pipeline throughput vs. training throughput, side by side in one run.

Measures images/s of the tf.data pair pipeline alone (read → decode → crop →
resize → augment → batch) on the grocery train split, then images/s of
siamese training steps at the same size, and prints their ratio. The pipeline
must never be the bottleneck: target ratio >= 10 on CPU. ``--no-augment``
measures the decoding part alone (augmentation is most of the pipeline's cost).
The numbers move with the machine's load: run it twice and report the load
average it prints.

    .venv/bin/python tools/bench_pipeline.py --manifest ../shared/data/grocery/manifest.csv --image-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery" / "manifest.csv"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pipeline-batches", type=int, default=60)
    parser.add_argument("--train-steps", type=int, default=8, help="0 to skip the model")
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-augment measures read -> decode -> crop -> resize -> batch alone")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from street2shop.config import TrainConfig
    from street2shop.data.pairs import PairConfig, PairPlanner
    from street2shop.data.pipeline import AugmentConfig, pair_dataset
    from street2shop.data.records import read_manifest_csv

    records = read_manifest_csv(args.manifest)
    train = [r for r in records if r.split in ("train", "catalog")]
    planner = PairPlanner(train, PairConfig(pairs_per_epoch=args.batch_size * (args.pipeline_batches + 5), seed=0))
    ds = pair_dataset(planner.plan, image_size=args.image_size, batch_size=args.batch_size,
                      augment=AugmentConfig() if args.augment else None, pair_weights=(1.0, 1.0))
    it = iter(ds)
    for _ in range(5):  # warm up: tracing, file cache, autotune
        next(it)
    start = time.perf_counter()
    for _ in range(args.pipeline_batches):
        next(it)
    pipeline_s = time.perf_counter() - start
    pipeline_ips = 2 * args.batch_size * args.pipeline_batches / pipeline_s
    result = {"image_size": args.image_size, "batch_size": args.batch_size, "cpus": os.cpu_count(),
              "augment": args.augment, "pipeline_images_per_s": round(pipeline_ips, 1)}
    print(f"pipeline alone: {pipeline_ips:.0f} images/s ({args.pipeline_batches} batches of {args.batch_size} pairs)")

    if args.train_steps:
        from street2shop.compile import build_model

        config = TrainConfig().replace(image_size=args.image_size, backbone=args.backbone, weights="none", batch_size=args.batch_size,
                                       w_product=0.0)  # pairs only, as BENCHMARKS.md measured it (the default is now 0.5)
        keras.utils.set_random_seed(0)
        model = build_model(config, None)
        batch = next(it)
        x, y, w = batch
        model.train_on_batch(x, y, sample_weight=w)  # compile the step
        start = time.perf_counter()
        for _ in range(args.train_steps):
            model.train_on_batch(x, y, sample_weight=w)
        train_s = time.perf_counter() - start
        train_ips = 2 * args.batch_size * args.train_steps / train_s
        result.update(train_images_per_s=round(train_ips, 1), train_pairs_per_s=round(train_ips / 2, 1),
                      ratio=round(pipeline_ips / train_ips, 1), backbone=args.backbone)
        print(f"training steps: {train_ips:.1f} images/s ({train_ips / 2:.1f} pairs/s), {args.backbone} at {args.image_size}px")
        print(f"ratio pipeline / training: {pipeline_ips / train_ips:.1f}  (target >= 10)")
    # Other people's jobs share the CPUs: the 1-minute load average says how much.
    result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    del tf
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
