"""Does the robust contrastive loss cost anything? Training pairs/s, side by side.

Builds the same siamese model twice (same backbone, size, batch, data) and
times training steps with (a) ``RobustContrastiveLoss`` plus its metrics and
(b) a plain built-in Keras loss (mean squared error on ``distance``), in
alternating rounds so that machine noise hits both alike. Target: (a)/(b) >= 0.95.

    .venv/bin/python tools/bench_train.py --image-size 96 --batch-size 32 --rounds 3 --steps 5
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and variant")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import keras
    import numpy as np

    from street2shop.config import TrainConfig
    from street2shop.train import build_model, build_optimizer

    config = TrainConfig().replace(backbone=args.backbone, image_size=args.image_size, weights="none", batch_size=args.batch_size)
    rng = np.random.default_rng(0)
    b, s = args.batch_size, args.image_size
    x = {"image_a": rng.uniform(0, 255, (b, s, s, 3)).astype("float32"), "image_b": rng.uniform(0, 255, (b, s, s, 3)).astype("float32")}
    y = {"distance": (np.arange(b) % 2).astype("float32")}
    w = {"distance": np.ones(b, "float32")}

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
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
