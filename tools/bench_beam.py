r"""Catalogue embedding throughput: `street2shop beam-embed` on Beam's local runner (1 and 2 worker processes) vs in-process `embed`.

The images: the grocery catalogue (81 shop photos) and the street photos of
its train split (2,640), 2,721 in all, listed as catalogue rows of one
benchmark manifest written into the work folder (absolute paths to the
shared data; nothing is copied). The model: an InceptionV3 tower with random
weights (``weights=None``), exported with ``export_tower``; speed does not
depend on the weights.

Each variant is the command a user runs, in a fresh process, timed from
launch to the finished output (Python and TensorFlow start-up, model load,
Beam's worker start-up included):

- ``embed``: ``street2shop embed MANIFEST --model EXPORT`` (in process, 2 requests in flight);
- ``beam-1``: ``street2shop beam-embed MANIFEST --model EXPORT --runner DirectRunner
  --direct_running_mode multi_processing --direct_num_workers 1``;
- ``beam-2``: the same with ``--direct_num_workers 2``.

With ``--rounds N`` the variants run in turn N times (embed, beam-1, beam-2,
embed, ...), so the load of a shared machine falls on each alike, and the
ratio is also taken round by round (paired) and its median reported.

Target: beam-1 >= 0.8 x embed. Fairness check: every Beam vector equals
``embed``'s (same ids) within 1e-5, else the comparison is not of the same
computation. Diagnostics in this process, per image over a sample (batch of
--batch-size): reading the file, the checks (``check_photo``), the export's
decode + resize alone, and the model on decoded pixels (``embed_pixels``):
where the time goes, for the estimate at scale in BENCHMARKS.md. ``uptime``
is recorded before and after: the machine is shared.

    .venv/bin/python tools/bench_beam.py --image-size 299 --out bench-output/beam.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_serving import DEFAULT_MANIFEST, ROOT, TOLERANCE, uptime, write_report  # tools/ is on the path: this file's folder

TARGET = 0.8


def benchmark_manifest(source: Path, street_splits: set[str], out: Path) -> int:
    """The shop photos and the street photos of ``street_splits``, all as catalogue rows (the command embeds shop rows)."""
    import dataclasses

    from street2shop.data.records import read_manifest_csv, write_manifest

    rows = [r for r in read_manifest_csv(source) if r.domain == "shop" or r.split in street_splits]
    write_manifest([dataclasses.replace(r, domain="shop", split="catalog", box=None) for r in rows], out)
    return len(rows)


def run_command(argv: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "wb") as fh:
        done = subprocess.run(argv, cwd=str(ROOT), stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    return seconds


def diagnostics(manifest: Path, export: Path, image_size: int, batch_size: int, sample: int) -> dict[str, float]:
    """Milliseconds per image of each stage, over the first ``sample`` images, in this process."""
    import numpy as np
    import tensorflow as tf

    from street2shop.data.image import check_photo, prepare_image, read_image_file
    from street2shop.data.records import read_manifest_csv
    from street2shop.embedders import call_savedmodel, load_savedmodel

    paths = [r.image_path for r in read_manifest_csv(manifest)][:sample]
    size = (image_size, image_size)
    model = load_savedmodel(str(export))
    spec = tf.TensorSpec([image_size, image_size, 3], tf.float32)

    def one(data):
        return prepare_image(data, image_size=size)[0]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
    def decode_only(images):
        return tf.map_fn(one, images, fn_output_signature=spec)

    def per_image(fn) -> float:
        fn()  # warm-up: tracing, the page cache
        start = time.perf_counter()
        fn()
        return round((time.perf_counter() - start) * 1000.0 / len(paths), 3)

    images = [read_image_file(p) for p in paths]
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    pixels = [decode_only(tf.constant(b)) for b in batches]
    result = {
        "read_ms": per_image(lambda: [read_image_file(p) for p in paths]),
        "check_ms": per_image(lambda: [check_photo(b) for b in images]),
        "decode_resize_ms": per_image(lambda: [decode_only(tf.constant(b)) for b in batches]),
        "model_on_pixels_ms": per_image(lambda: [model.signatures["embed_pixels"](pixels=p) for p in pixels]),
        "serving_default_ms": per_image(lambda: [call_savedmodel(model, b, None) for b in batches]),
    }
    result["images"] = len(paths)
    assert np.isfinite(list(result.values())).all()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="grocery manifest CSV")
    parser.add_argument("--street-splits", default="train", help="street photos of these splits join the shop photos")
    parser.add_argument("--image-size", type=int, default=299, help="the tower's input size")
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", default="embed,beam-1,beam-2", help="which variants, in this order (empty: only the diagnostics)")
    parser.add_argument("--rounds", type=int, default=1, help="times each variant runs, in turn")
    parser.add_argument("--diagnostic-images", type=int, default=256, help="images for the per-stage diagnostics (0: none)")
    parser.add_argument("--workdir", default="", help="work folder (default: a temporary one, deleted)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()

    import numpy as np

    before = uptime()
    print(f"uptime before: {before}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir or None) as tmp:
        work = Path(tmp)
        manifest = work / "catalogue.csv"
        count = benchmark_manifest(Path(args.manifest), {s for s in args.street_splits.split(",") if s}, manifest)
        import keras

        from street2shop.embeddings import load_embeddings, read_embedding_sets
        from street2shop.export import export_tower
        from street2shop.model.tower import build_tower

        keras.utils.set_random_seed(0)
        tower = build_tower("inception_v3", image_size=(args.image_size, args.image_size), embedding_dim=args.embedding_dim, weights=None)
        export = export_tower(tower, work / "export")
        del tower
        print(f"{count} images; InceptionV3 at {args.image_size} px exported to {export}", flush=True)

        cli = [sys.executable, "-m", "street2shop"]

        def command(name: str, out: Path) -> list[str]:
            if name == "embed":  # a fresh folder each time: embed resumes a folder it finds
                return [*cli, "embed", str(manifest), "--model", str(export), "--out", str(out),
                        "--batch-size", str(args.batch_size), "--json"]
            return [*cli, "beam-embed", str(manifest), "--model", str(export), "--out", str(out),
                    "--batch-size", str(args.batch_size), "--json", "--runner", "DirectRunner",
                    "--direct_running_mode", "multi_processing", "--direct_num_workers", name.split("-")[1]]

        names = [name for name in args.variants.split(",") if name]
        all_seconds: dict[str, list[float]] = {name: [] for name in names}
        loads: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names:
                seconds_taken = run_command(command(name, work / f"{name}-{r}"), work / f"{name}-{r}.log")
                all_seconds[name].append(seconds_taken)
                loads[name].append(round(os.getloadavg()[0], 2))
                print(f"round {r + 1} {name}: {count} images in {seconds_taken:.1f} s = {count / seconds_taken:.1f} images/s "
                      f"(load {loads[name][-1]})", flush=True)
        seconds = {name: statistics.median(v) for name, v in all_seconds.items()}
        rates = {name: round(count / s, 2) for name, s in seconds.items()}
        checks: dict[str, Any] = {}
        if "embed" in seconds:
            reference_vectors, reference_items, _ = load_embeddings(work / "embed-0")
            reference = {(i["image_path"], i["product_id"]): v for i, v in zip(reference_items, reference_vectors)}
            for name in seconds:
                if name.startswith("beam"):
                    vectors, items, _ = read_embedding_sets([work / f"{name}-0"])
                    got = {(i["image_path"], i["product_id"]): v for i, v in zip(items, vectors)}
                    same_ids = set(got) == set(reference)
                    diff = max(float(np.abs(got[k] - reference[k]).max()) for k in reference) if same_ids else float("inf")
                    checks[name] = {"same_ids": same_ids, "max_abs_diff": diff, "equal_within_tolerance": diff <= TOLERANCE}
                    print(f"check {name}: same ids {same_ids}, max |difference| {diff:.2e} (tolerance {TOLERANCE})", flush=True)
        ratios: dict[str, Any] = {f"{name}_over_embed": round(rates[name] / rates["embed"], 3)
                                  for name in rates if name != "embed" and "embed" in rates}
        for name in rates:
            if name != "embed" and "embed" in rates:  # round by round: neighbours in time share the machine's load
                ratios[f"{name}_over_embed_per_round"] = [round(e / b, 3) for e, b in zip(all_seconds["embed"], all_seconds[name])]
                ratios[f"{name}_over_embed_paired_median"] = round(statistics.median(ratios[f"{name}_over_embed_per_round"]), 3)
        if "beam-1_over_embed" in ratios:
            ratios["target_met"] = ratios["beam-1_over_embed"] >= TARGET
            print(f"beam-1 / embed = {ratios['beam-1_over_embed']:.3f} of medians, "
                  f"{ratios['beam-1_over_embed_paired_median']:.3f} median of per-round ratios (target >= {TARGET})", flush=True)
        if "beam-2_over_embed" in ratios:
            print(f"beam-2 / embed = {ratios['beam-2_over_embed']:.3f}", flush=True)
        parts = {}
        if args.diagnostic_images:
            parts = diagnostics(manifest, export, args.image_size, args.batch_size, args.diagnostic_images)
            print("per image, in this process: " + ", ".join(f"{k} {v}" for k, v in parts.items()), flush=True)
    after = uptime()
    print(f"uptime after: {after}")
    result = {
        "command": " ".join(sys.argv), "images": count, "image_size": args.image_size, "batch_size": args.batch_size,
        "rounds": args.rounds, "seconds": {k: [round(x, 1) for x in v] for k, v in all_seconds.items()},
        "images_per_s_of_median": rates, "ratios": ratios, "checks": checks,
        "diagnostics_ms_per_image": parts, "load_after_each_variant": loads, "uptime_before": before, "uptime_after": after,
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
    }
    write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
