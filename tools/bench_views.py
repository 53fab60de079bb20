"""Does embedding more views help? Test-time augmentation, augmented catalogue references, more references per product.

Takes the trained runs of ``tools/bench_retrieval.py`` (their ``last.keras``,
the weights that run evaluated) and evaluates each again, same queries and
protocol (the ``val`` street photos against every shop photo), with:

- ``tta-flip`` / ``tta-flip-crops``: test-time augmentation
  (:func:`street2shop.model.views.embed_views`) on queries and catalogue alike,
  as an export made with ``--tta`` does;
- ``refs-N``: each shop photo plus N augmented views of it (the training
  street augmentation, :func:`augmented_views`) as references of its
  product, for catalogues with one shop photo per product; ``refs-N+tta-…``
  both;
- ``street-refs``: the shop photos plus the *training* street photos, labelled
  with their product, as references: a shop's own labelled customer photos
  (reviews, earlier searches) indexed beside its catalogue, as
  ``street2shop embed --domains shop,street --reference-splits <train split>``
  selects them (:func:`street2shop.data.records.catalogue_records`, the same
  records; kept in the order shop photos, then street photos, as before, so
  earlier results reproduce). Another protocol (the gallery holds street
  photos), reported apart: the queries are still other photos than those
  indexed.
- ``street-means``: the shop photos plus, per product, one reference: the
  normalised mean of the embeddings of its training street photos (a
  prototype of its customer photos; 81 references more, not 2,640).
- ``proxies``: the shop photos plus, per training product, the vector its
  softmax class holds in the trained product head (a cosine classifier on the
  embedding: each class's weight is a learned prototype of the product's
  photos, street and shop; :func:`product_proxies`). Only products trained
  on have one, as in a shop: new products are found by their photos alone.
  ``proxies-only``: the proxies without the shop photos (the head as a classifier).
- ``pooled``: the backbone's pooled features (the input of the projection,
  1,024 numbers for DenseNet-121), normalised, instead of the embedding.
- ``size-N``: queries and catalogue embedded at N pixels a side by the same
  weights (:func:`tower_at_size`): a tower trained on zoomed-in crops may
  match better when served larger.
  ``size-112+tta-flip-crops`` both.

The baseline (``none``) must reproduce the run's own result exactly; the tool
stops otherwise. Paired differences against ``none`` over the runs (seeds) and
queries, with 95% intervals resampling both (as bench_retrieval). Each set of
photos is embedded once per TTA mode and reused by the conditions that share it
(a condition's seconds count only what it embedded first). ``--latency``
also times the embedding of one batch per TTA mode, side by side, in rounds.

    .venv/bin/python tools/bench_views.py bench-output/grocery-30min-v1 --out bench-output/views.json
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_retrieval import embed_with_tower, evaluate  # noqa: E402

from street2shop.experiments import bootstrap, per_query  # noqa: E402
from bench_serving import uptime, write_report  # noqa: E402

CONDITIONS = ("none", "tta-flip", "tta-flip-crops", "refs-8", "refs-8+tta-flip", "street-refs", "street-refs+tta-flip",
              "street-means", "street-means+tta-flip-crops")


def parse(condition):
    """``"refs-8+tta-flip"`` → (refs 8, tta "flip", street False, size None); street names the extra references:
    "photos", "means", "proxies" or "proxies-only"; size the side the tower is served at (None: its own; "pooled": the tower
    without its projection)."""
    from street2shop.model.views import check_tta

    refs, tta, street, size = 0, "none", False, None
    for part in condition.split("+"):
        if part.startswith("tta-"):
            tta = check_tta(part[4:])
        elif part.startswith("refs-"):
            refs = int(part[5:])
        elif part.startswith("size-"):
            size = int(part[5:])
        elif part == "pooled":
            size = "pooled"
        elif part == "street-refs":
            street = "photos"
        elif part == "street-means":
            street = "means"
        elif part in ("proxies", "proxies-only"):
            street = part
        elif part != "none":
            raise SystemExit(f"unknown condition {condition!r}")
    if size == "pooled" and street in ("proxies", "proxies-only"):
        raise SystemExit(f"{condition}: the proxies live in the embedding's space, not the pooled features'")
    return refs, tta, street, size


def shop_pixels(records, size):
    import tensorflow as tf

    from street2shop.data.image import prepare_image

    if any(r.box is not None for r in records):
        raise SystemExit("refs-N: shop photos with boxes are not cropped by this tool yet")
    return tf.stack([prepare_image(tf.io.read_file(r.image_path), image_size=size)[0] for r in records])


def augmented_views(pixels, count, *, strength=1.0, seed=0):
    """``count`` random augmentations of ``[B, H, W, 3]`` pixels (the training augmentation at ``strength``;
    view k drawn with seed ``seed + k``: the same references every time, for the same batch)."""
    from street2shop.data.pipeline import make_augmenter

    return [make_augmenter(strength, seed=seed + k)(pixels, training=True) for k in range(count)]


def embed_pixels(tower, pixels, tta, batch=64):
    import numpy as np

    from street2shop.model.views import embed_views

    return np.concatenate([embed_views(tower, pixels[i:i + batch], tta).numpy() for i in range(0, len(pixels), batch)])


def customer_references(command, gallery):
    """The training street photos ``embed --domains shop,street --reference-splits <train split>`` indexes beside ``gallery``."""
    from street2shop.data.records import catalogue_records

    references = catalogue_records(command["manifest"], domains="shop,street", reference_splits=command["train_split"])
    if [r for r in references if r.domain == "shop"] != list(gallery):
        raise SystemExit("street-refs: the package's catalogue photos are not this run's gallery: this tool measures something else")
    return [r for r in references if r.domain == "street"]


def street_means(vectors, records):
    """One reference per product: the normalised mean of its photos' vectors, labelled by its first photo's record."""
    import numpy as np

    means, holders = [], []
    for product in dict.fromkeys(r.product_id for r in records):
        rows = [i for i, r in enumerate(records) if r.product_id == product]
        mean = np.asarray(vectors)[rows].mean(axis=0)
        means.append(mean / np.linalg.norm(mean))
        holders.append(records[rows[0]])
    return np.stack(means), holders


def product_proxies(model, run):
    """``(vectors, product ids)``: each training product's unit class vector in the trained head, in class order.

    The classes are those training gave (:func:`street2shop.training_data.load_training_data` on the run's own
    ``config.toml``: the auxiliary set's, then the products' in sorted order), read back from the classifier's
    kernel ``[D, classes]``.
    """
    import numpy as np

    from street2shop.config import load_config
    from street2shop.training_data import load_training_data

    data = load_training_data(load_config(run / "config.toml"))
    if not data.product_labels:
        raise SystemExit(f"proxies: {run} was trained without the product softmax (w_product 0)")
    kernel = np.asarray(model.get_layer("classifier").get_weights()[0])
    if kernel.shape[1] != data.num_classes:
        raise SystemExit(f"proxies: {run}'s head has {kernel.shape[1]} classes, its data {data.num_classes}: this tool measures something else")
    products = sorted(data.product_labels, key=data.product_labels.get)
    vectors = kernel[:, [data.product_labels[p] for p in products]].T
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), products


def tower_at_size(tower, image_size):
    """``tower`` taking another input size: the tower itself at its own size, else a copy with its weights.

    Convolutions and global pooling do not depend on the input size, so the same weights embed photos resized to
    another side (other vectors: another model). A tower trained on zoomed-in crops may see objects at their
    training scale only when served larger ("FixRes", Touvron et al. 2019): condition ``size-N``. Measured and not
    kept, so not in the package (BENCHMARKS.md, "Round 5"). The copy computes in the tower's own precision.
    """
    from street2shop.data.image import image_size_2d
    from street2shop.model.backbones import backbone_spec
    from street2shop.model.precision import model_precision, precision_scope
    from street2shop.model.tower import build_tower, tower_spec

    spec = tower_spec(tower)
    size = image_size_2d(image_size, backbone_spec(spec["backbone"]).min_size)
    if list(size) == spec["image_size"]:
        return tower
    with precision_scope(model_precision(tower)):
        copy = build_tower(spec["backbone"], image_size=size, embedding_dim=spec["embedding_dim"], pooling=spec["pooling"],
                           dropout=spec["dropout"], name=tower.name)
    copy.set_weights(tower.get_weights())
    return copy


def pooled_tower(tower):
    """The tower up to its pooling layer, normalised: the backbone's features instead of the projection's embedding."""
    import keras

    from street2shop.model.layers import L2Normalize

    return keras.Model(tower.inputs, L2Normalize(name="pooled")(tower.get_layer("pool").output), name="tower")


def evaluate_run(result_path, conditions, strength, seed):
    import numpy as np

    from street2shop.data.records import read_manifest_csv
    from street2shop.export import load_checkpoint
    from street2shop.model.siamese import tower_of

    result = json.loads(Path(result_path).read_text())
    run = Path(result_path).parent / "runs" / f"{result['variant']}-seed{result['seed']}"
    command = json.loads((Path(result_path).parent / "command.json").read_text())["args"]
    records = read_manifest_csv(command["manifest"])
    queries = [r for r in records if r.domain == "street" and r.split == command["eval_split"]]
    gallery = [r for r in records if r.domain == "shop"]
    street = customer_references(command, gallery) if any(parse(c)[2] in ("photos", "means") for c in conditions) else []
    model = load_checkpoint(run / "last.keras")
    trained = tower_of(model)
    proxies = product_proxies(model, run) if any(parse(c)[2] in ("proxies", "proxies-only") for c in conditions) else None
    towers = {None: trained}
    cache = {}

    def embedded(name, photos, tta, side):  # each set of photos embedded once per TTA mode and size, whatever the conditions reuse it
        if (name, tta, side) not in cache:
            cache[name, tta, side] = embed_with_tower(towers[side], photos, tta=tta)
        return cache[name, tta, side]

    out = {}
    for condition in conditions:
        refs, tta, extra, side = parse(condition)
        if side not in towers:
            towers[side] = pooled_tower(trained) if side == "pooled" else tower_at_size(trained, side)
        tower = towers[side]
        size = int(tower.inputs[0].shape[1])
        started = time.perf_counter()
        q = embedded("queries", queries, tta, side)
        g, g_records = embedded("gallery", gallery, tta, side), list(gallery)
        if refs:
            views = augmented_views(shop_pixels(gallery, size), refs, strength=strength, seed=seed)
            g = np.concatenate([g] + [embed_pixels(tower, v, tta) for v in views])
            g_records += gallery * refs
        if extra == "photos":
            g = np.concatenate([g, embedded("street", street, tta, side)])
            g_records += street
        elif extra == "means":
            means, holders = street_means(embedded("street", street, tta, side), street)
            g = np.concatenate([g, means])
            g_records += holders
        elif extra in ("proxies", "proxies-only"):
            by_product = {r.product_id: r for r in gallery}
            holders = [by_product[p] for p in proxies[1]]  # a product's proxy, labelled as its shop photo
            g, g_records = (proxies[0], holders) if extra == "proxies-only" else (np.concatenate([g, proxies[0]]), g_records + holders)
        record = evaluate(q, queries, g, g_records)
        record["seconds"] = round(time.perf_counter() - started, 1)
        record["gallery"] = len(g_records)
        out[condition] = record
        top = record["top_k"]
        print(f"{run.name} {condition}: top-1 {100 * top['1']:.1f}, top-5 {100 * top['5']:.1f}, top-20 {100 * top['20']:.1f} "
              f"({len(g_records)} references, {record['seconds']} s)", flush=True)
        if condition == "none" and record["ranks"] != result["ranks"]:
            raise SystemExit(f"{run}: the baseline does not reproduce the run's own result: this tool measures something else")
    return result["seed"], out


def latency(tower, rounds=5, batch=32):
    """Seconds per image of embedding one batch of JPEG bytes, per TTA mode, interleaved in rounds; medians."""
    import statistics

    from street2shop.data.image import pattern_jpeg
    from street2shop.embedders import TowerEmbedder

    size = int(tower.inputs[0].shape[1])
    images = [pattern_jpeg(640, 480, k) for k in range(batch)]
    embedders = {mode: TowerEmbedder(tower, tta=mode, batch_size=batch) for mode in ("none", "flip", "flip-crops")}
    for e in embedders.values():
        e.embed(images[:2])  # trace
    times = {mode: [] for mode in embedders}
    for _ in range(rounds):
        for mode, e in embedders.items():
            t = time.perf_counter()
            e.embed(images)
            times[mode].append((time.perf_counter() - t) / batch)
    medians = {mode: statistics.median(v) for mode, v in times.items()}
    return {"image_size": size, "batch": batch, "rounds": rounds, "seconds_per_image": medians,
            "ratio_to_none": {mode: medians[mode] / medians["none"] for mode in medians}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="an --out folder of tools/bench_retrieval.py")
    parser.add_argument("--variant", default="robust_multitask_products")
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS))
    parser.add_argument("--strength", type=float, default=1.0, help="augmentation strength of the refs-N views")
    parser.add_argument("--seed", type=int, default=0, help="seed of the refs-N views")
    parser.add_argument("--latency", action="store_true", help="also time TTA per image (first run's tower)")
    parser.add_argument("--out", default=str(ROOT / "bench-output" / "views.json"))
    args = parser.parse_args()
    if args.strength <= 0:
        parser.error(f"--strength must be > 0. Received: {args.strength}")
    for c in args.conditions:
        try:
            parse(c)
        except Exception as e:  # a ConfigError naming the mode
            parser.error(str(e))
    paths = sorted(Path(args.results).glob(f"result-{args.variant}-seed*.json"))
    if not paths:
        parser.error(f"no result-{args.variant}-seed*.json under {args.results}")
    runs = dict(evaluate_run(p, ["none"] + [c for c in args.conditions if c != "none"], args.strength, args.seed) for p in paths)
    seeds = sorted(runs)
    table = ["| condition | seeds | references | top-1 | top-5 | top-20 | top-1 − none | top-5 − none |", "|---|---|---|---|---|---|---|---|"]
    report = {"results": args.results, "variant": args.variant, "strength": args.strength, "seed": args.seed, "uptime": uptime(),
              "runs": {str(s): runs[s] for s in seeds}, "summary": {}}
    base = per_query([runs[s]["none"] for s in seeds])
    for condition in runs[seeds[0]]:
        values = per_query([runs[s][condition] for s in seeds])
        row = {m: bootstrap(values[m]) for m in ("top-1", "top-5", "top-20")}
        row.update({f"{m} − none": bootstrap(values[m] - base[m]) for m in ("top-1", "top-5")})
        report["summary"][condition] = row

        def cell(v):
            return f"{100 * v[0]:.1f} [{100 * v[1]:.1f}, {100 * v[2]:.1f}]"

        def diff(v):
            return f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]"

        table.append(f"| {condition} | {', '.join(map(str, seeds))} | {runs[seeds[0]][condition]['gallery']} | {cell(row['top-1'])} | "
                     f"{cell(row['top-5'])} | {cell(row['top-20'])} | {diff(row['top-1 − none'])} | {diff(row['top-5 − none'])} |")
    if args.latency:
        from street2shop.export import load_checkpoint
        from street2shop.model.siamese import tower_of

        first = json.loads(paths[0].read_text())
        tower = tower_of(load_checkpoint(Path(args.results) / "runs" / f"{first['variant']}-seed{first['seed']}" / "last.keras"))
        report["latency"] = latency(tower)
        lat = report["latency"]
        table.append("")
        table.append(f"TTA cost, {lat['batch']} JPEGs (640x480) per call at {lat['image_size']} px, median of {lat['rounds']} rounds: " + ", ".join(
            f"{mode} {1000 * s:.1f} ms/image ({lat['ratio_to_none'][mode]:.2f}x)" for mode, s in lat["seconds_per_image"].items()))
    text = "\n".join(table)
    report["table"] = text
    write_report(report, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
