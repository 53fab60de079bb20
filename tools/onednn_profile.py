"""Where a tower's inference time goes on a CPU: oneDNN's own timing of every primitive it runs.

Runs the tower (``predict_on_batch``, the graph TF Serving runs too) on
``--batches`` batches after a warm-up, in a child process with
``ONEDNN_VERBOSE=profile_exec``, and sums oneDNN's reported times by
primitive kind (convolution, reorder, pooling, ...) and by implementation
(``brg_conv_fwd:avx512_core_amx``...), with the layouts of the reorders
(a reorder converts a tensor between memory layouts, e.g. TensorFlow's
plain NHWC and the blocked layout a convolution kernel wants). What oneDNN
does not run (TensorFlow's own kernels, the framework between ops) is the
wall time minus oneDNN's sum.

    nice -n 5 .venv/bin/python tools/onednn_profile.py --image-size 96 299 --batch-size 32 --batches 3
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MARK = "WALL_SECONDS "


def child(args: argparse.Namespace) -> None:
    """Runs the batches; prints the wall time of the timed ones between markers oneDNN's lines can be told from."""
    import keras
    import numpy as np

    from street2shop.model.tower import build_tower

    keras.utils.set_random_seed(0)
    tower = build_tower(args.backbone, image_size=args.image_size[0], weights=None)
    x = np.random.default_rng(0).uniform(0, 255, (args.batch_size, args.image_size[0], args.image_size[0], 3)).astype("float32")
    tower.predict_on_batch(x)  # trace, and oneDNN's first-call work (kernel generation, weight reorders)
    print("TIMED_START", flush=True)
    start = time.perf_counter()
    for _ in range(args.batches):
        tower.predict_on_batch(x)
    print(MARK + str(time.perf_counter() - start), flush=True)


def parse(lines: list[str]) -> dict:
    """oneDNN's exec lines between the markers: milliseconds by kind, by implementation, and the reorders by layouts."""
    by_kind: dict[str, float] = collections.Counter()
    by_impl: dict[str, float] = collections.Counter()
    reorders: dict[str, float] = collections.Counter()
    counts: dict[str, int] = collections.Counter()
    timed, wall = False, None
    for line in lines:
        if line.startswith("TIMED_START"):
            timed = True
            continue
        if line.startswith(MARK):
            wall = float(line[len(MARK):])
            break
        if not (timed and line.startswith("onednn_verbose")):
            continue
        fields = line.strip().split(",")
        if "exec" not in fields:
            continue
        i = fields.index("exec")
        kind, impl = fields[i + 2], fields[i + 3]
        try:
            ms = float(fields[-1])
        except ValueError:
            continue
        by_kind[kind] += ms
        by_impl[f"{kind}:{impl}"] += ms
        counts[kind] += 1
        if kind == "reorder":
            # "src:f32::blocked:cdba::f0 dst:f32::blocked:Acdb16a::f0": the layouts' tags (cdba: TensorFlow's HWIO kernel)
            layouts = " -> ".join(part.split(":")[4] if len(part.split(":")) > 4 else part for part in fields[i + 5].split(" ")[:2])
            reorders[layouts] += ms
    return {"wall_ms": round(1000 * wall, 1) if wall is not None else None,
            "onednn_ms": round(sum(by_kind.values()), 1),
            "by_kind_ms": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "calls": dict(counts),
            "by_implementation_ms": {k: round(v, 1) for k, v in sorted(by_impl.items(), key=lambda kv: -kv[1])[:12]},
            "reorders_by_layout_ms": {k: round(v, 1) for k, v in sorted(reorders.items(), key=lambda kv: -kv[1])[:8]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--image-size", type=int, nargs="+", default=[96])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="timed batches")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    results = []
    for size in args.image_size:
        env = dict(os.environ, ONEDNN_VERBOSE="profile_exec", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
        command = [sys.executable, __file__, "--child", "--backbone", args.backbone, "--image-size", str(size),
                   "--batch-size", str(args.batch_size), "--batches", str(args.batches)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        result = {"image_size": size, "batch_size": args.batch_size, "batches": args.batches, **parse(done.stdout.splitlines()),
                  "load_1_5_15": [round(v, 2) for v in os.getloadavg()]}
        print(json.dumps(result, indent=2), flush=True)
        results.append(result)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
