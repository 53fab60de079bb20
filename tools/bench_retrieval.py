"""Does the method work on real photos? Robust vs plain contrastive, multi-task vs pairs only.

Protocol (defaults: ../shared/data/grocery): train on the ``train`` split,
measure on the ``val`` street photos as queries against every shop image.
Variants, all with the same backbone, input size, seed and budget (the same
number of training pairs):

1. ``histogram``: HSV colour histogram, no learning;
2. ``untrained``: the tower at initialisation;
3. ``plain``: plain contrastive loss on product pairs;
4. ``robust``: robust contrastive loss on product pairs;
5. ``robust_multitask``: robust contrastive + auxiliary pairs and softmax on a
   class-per-folder set (../shared/data/coil100/images);
6. ``robust_multitask_products``: the same, plus a softmax over the training
   products on the product images (``--w-product``): the best variant found.

Extra variants, run only when named in ``--variants``: ``robust_warmup`` and
``robust_multitask_warmup``, the same with ``--drop-warmup-epochs`` epochs of
the plain loss before the robust loss drops anything; ``robust_tau``, the
robust loss with a fixed threshold ``--robust-tau`` as well as the quantile
(a positive is dropped only when it is beyond both); ``plain_multitask``,
the plain loss with the auxiliary task; ``robust_products`` and
``plain_multitask_products``, robust and plain_multitask with the product
softmax as well.

Any other training knob goes to every trained variant with ``--set FIELD=VALUE``
(one ``--out`` per setting: a finished result run with other settings is
refused, not mixed in).

Each (variant, seed) result is a JSON file under ``--out``; a run started
again skips finished ones (and a killed training resumes via
BackupAndRestore), so it can run in the background and be resumed.
``--summary`` writes the Markdown table and the top-k plot from what is there.

    nohup .venv/bin/python tools/bench_retrieval.py --seeds 0 1 > bench-output/retrieval.log 2>&1 &
    .venv/bin/python tools/bench_retrieval.py --summary

Another dataset in the manifest format: ``--manifest M --eval-split S``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_VARIANTS = ("histogram", "untrained", "plain", "robust", "robust_multitask", "robust_multitask_products")
VARIANTS = DEFAULT_VARIANTS + ("robust_warmup", "robust_multitask_warmup", "robust_tau", "plain_multitask",
                               "robust_products", "plain_multitask_products")

NO_SEED = ("histogram",)  # variants without randomness: run once, for the first seed

# Config fields run_one sets itself: from a flag of this tool, or by the variant.
RESERVED = frozenset({
    "manifest", "train_split", "val_split", "backbone", "weights", "image_size", "embedding_dim", "bn_momentum",
    "epochs", "pairs_per_epoch", "batch_size", "learning_rate", "seed", "output_dir", "loss", "auxiliary_dir",
    "drop_warmup_epochs", "positive_threshold", "w_product", "street_street_fraction", "hard_negative_fraction",
})

logger = logging.getLogger("bench_retrieval")


def embed_with_tower(tower, records, batch_size=64):
    """The records embedded by the in-memory tower through the export's own graph (box crop included)."""
    from street2shop.embed import embed_records
    from street2shop.embedders import TowerEmbedder

    embedded = embed_records(records, TowerEmbedder(tower, batch_size=batch_size), batch_size=batch_size)
    if embedded.skipped:
        raise SystemExit(f"{len(embedded.skipped)} images could not be embedded: {dict(list(embedded.skipped.items())[:3])}")
    return embedded.vectors


def evaluate(query_vectors, queries, gallery_vectors, gallery):
    from street2shop.evaluate import evaluate_embeddings

    ev = evaluate_embeddings(query_vectors, [r.product_id for r in queries], gallery_vectors, [r.product_id for r in gallery])
    overall = ev.metrics["overall"]
    return {
        "queries": overall["queries"],
        "top_k": {str(k): v for k, v in overall["top_k"].items()},
        "map": overall["map"],
        "mrr": overall["mrr"],
        "intervals": {k: list(v) for k, v in ev.intervals.items()},
        "ranks": ev.ranks,
    }


def run_one(variant, seed, args, queries, gallery):
    import keras

    from street2shop.config import TrainConfig
    from street2shop.train import build_model, train

    started = time.perf_counter()
    size = args.image_size
    record = {"variant": variant, "seed": seed, "image_size": size, "backbone": args.backbone, "pairs": args.pairs, "settings": args.set}
    if variant.endswith("_products"):
        record["w_product"] = args.w_product
    if variant == "histogram":
        from street2shop.baselines import colour_histogram_embeddings

        q = colour_histogram_embeddings(queries)
        g = colour_histogram_embeddings(gallery)
        record.update(evaluate(q, queries, g, gallery))
        record["seconds"] = round(time.perf_counter() - started, 1)
        return record
    pairs_per_epoch = args.pairs // args.epochs
    config = TrainConfig().replace(
        manifest=args.manifest, train_split=args.train_split, val_split="", backbone=args.backbone, weights=args.weights,
        image_size=size, embedding_dim=args.embedding_dim, bn_momentum=args.bn_momentum, epochs=args.epochs,
        pairs_per_epoch=pairs_per_epoch, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=seed,
        output_dir=str(Path(args.out) / "runs" / f"{variant}-seed{seed}"),
        loss="contrastive" if variant.startswith("plain") else "robust",
        auxiliary_dir=args.aux_dir if "multitask" in variant else "",
        drop_warmup_epochs=args.drop_warmup_epochs if variant.endswith("_warmup") else 0,
        positive_threshold=args.robust_tau if variant == "robust_tau" else 0.0,
        w_product=args.w_product if variant.endswith("_products") else 0.0,
        street_street_fraction=args.street_street_fraction, hard_negative_fraction=args.hard_negative_fraction,
    ).replace(**args.set)
    if variant == "untrained":
        keras.utils.set_random_seed(seed)
        tower = build_model(config, None).get_layer("tower")
        record["train_seconds"] = 0.0
    else:
        result = train(config, verbose=2)
        tower = result.model.get_layer("tower")
        record["train_seconds"] = round(result.seconds, 1)
        record["pairs_per_second"] = round(result.pairs_per_second, 2)
        record["final_train"] = {k: v[-1] for k, v in result.history.items() if v}
    g = embed_with_tower(tower, gallery)
    q = embed_with_tower(tower, queries)
    record.update(evaluate(q, queries, g, gallery))
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _per_query(rows):
    """Per-query hits at 1/5/20 and reciprocal rank, ``[seeds, queries]`` each (unanswerable queries left out)."""
    import numpy as np

    ranks = np.array([[np.nan if x is None else x for x in r["ranks"]] for r in rows], dtype=float)
    answerable = ~np.isnan(ranks).all(axis=0)
    ranks = np.where(np.isnan(ranks), np.inf, ranks)[:, answerable]
    values = {f"top-{k}": (ranks <= k).astype(float) for k in (1, 5, 20)}
    values["MRR"] = 1.0 / ranks
    return values


def _bootstrap(values, samples=4000):
    """Mean of a ``[seeds, queries]`` array and its 95% interval, resampling seeds and queries.

    Both sources of variation count: which queries were asked, and which
    training run (seed) produced the model. Runs of the same setting differ
    by several points here, so an interval over queries alone would be too
    narrow. With one seed it is the interval over queries.
    """
    import numpy as np

    values = np.asarray(values, dtype=float)
    n_seeds, n_queries = values.shape
    rng = np.random.default_rng(0)
    means = np.empty(samples)
    for i in range(samples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        queries = rng.integers(0, n_queries, n_queries)
        means[i] = values[seeds][:, queries].mean()
    return float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summary(out: Path) -> str:
    import numpy as np

    from street2shop.report import plot_top_k

    results = [json.loads(p.read_text()) for p in sorted(out.glob("result-*.json"))]
    metrics = ("top-1", "top-5", "top-20", "MRR")
    lines = [
        "| variant | seeds | " + " | ".join(metrics) + " | pairs/s | train s |",
        "|---|---|" + "---|" * len(metrics) + "---|---|",
    ]
    seed_lines = ["| variant | seed | top-1 | top-5 | top-20 | MRR | pairs/s | train s | load (1/5/15 min) |", "|---|---|---|---|---|---|---|---|---|"]
    runs = {}
    for variant in VARIANTS:
        rows = [r for r in results if r["variant"] == variant]
        if not rows:
            continue
        per_query = _per_query(rows)
        cells = []
        for name in metrics:
            mean, low, high = _bootstrap(per_query[name])
            cells.append(f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]")
        pps = [r["pairs_per_second"] for r in rows if r.get("pairs_per_second")]
        train_s = [r["train_seconds"] for r in rows if r.get("pairs_per_second")]
        timing = f"{np.mean(pps):.1f} | {np.mean(train_s):.0f}" if pps else "- | -"
        lines.append(f"| {variant} | {', '.join(str(r['seed']) for r in rows)} | " + " | ".join(cells) + f" | {timing} |")
        mean_top_k = {int(k): float(np.mean([r["top_k"][k] for r in rows])) for k in rows[0]["top_k"]}
        label = variant if variant == "histogram" else f"{variant} ({len(rows)} seed{'s' if len(rows) > 1 else ''})"
        runs[label] = {"metrics": {"overall": {"top_k": mean_top_k}}}
        for r in rows:
            top = r["top_k"]
            load = "/".join(f"{x:.1f}" for x in r.get("uptime", []))
            seed_timing = f"{r['pairs_per_second']:.1f} | {r['train_seconds']:.0f}" if r.get("pairs_per_second") else "- | -"
            seed_lines.append(
                f"| {variant} | {r['seed']} | {100 * top['1']:.1f} | {100 * top['5']:.1f} | {100 * top['20']:.1f} | "
                f"{100 * r['mrr']:.1f} | {seed_timing} | {load} |"
            )
    plot_top_k(runs, out / "topk.png", title="grocery val: street photos vs 81 catalogue photos")
    paired = ""
    # Each variant against plain, and multi-task against pairs only (the same robust loss).
    comparisons = [(variant, "plain") for variant in VARIANTS[3:]] + [
        ("robust_multitask", "robust"), ("robust_multitask", "plain_multitask"),
        ("robust_products", "robust"), ("robust_multitask_products", "robust_products"),
        ("robust_multitask_products", "robust_multitask"), ("robust_multitask_products", "plain_multitask_products"),
        ("plain_multitask_products", "plain_multitask"), ("robust_multitask_products", "histogram")]
    for variant, reference in comparisons:
        for k in (1, 5):
            diff = _paired_difference(results, variant, reference, k) if results else None
            if diff:
                per_seed = ", ".join(f"{100 * v:+.1f}" for v in diff[3].values())
                paired += (
                    f"| {variant} − {reference} | top-{k} | {', '.join(map(str, diff[3]))} | {100 * diff[0]:+.1f} | "
                    f"[{100 * diff[1]:+.1f}, {100 * diff[2]:+.1f}] | {per_seed} |\n"
                )
    if paired:
        paired = ("| comparison | metric | seeds paired | mean difference (points) | 95% interval | per seed |\n"
                  "|---|---|---|---|---|---|\n" + paired)
    text = (
        "\n".join(lines)
        + "\n\nMean over the seeds; brackets: 95% bootstrap interval resampling both the seeds (training runs) and the "
        "queries (over queries alone for a single run). mAP equals MRR here (one relevant product per query), so it "
        "is not repeated.\n\n"
        + "\n".join(seed_lines) + "\n\n" + paired
    )
    (out / "summary.md").write_text(text)
    return text


def _paired_difference(results, a, b, k=1, samples=4000):
    """Top-k difference a − b over the seeds both have: mean, 95% interval (seeds and queries resampled in pairs), per seed.

    The histogram baseline has no seed (it is computed once): its one result
    pairs with every seed of ``a``.
    """
    by = {(r["variant"], r["seed"]): r for r in results}
    deterministic = [r for r in results if r["variant"] == b and b in NO_SEED]
    if deterministic:
        by.update({(b, seed): deterministic[0] for (variant, seed) in list(by) if variant == a})
    seeds = sorted(seed for (variant, seed) in by if variant == a and (b, seed) in by)
    if not seeds:
        return None
    hit_a = _per_query([by[(a, s)] for s in seeds])[f"top-{k}"]
    hit_b = _per_query([by[(b, s)] for s in seeds])[f"top-{k}"]
    difference = hit_a - hit_b  # paired: the same seed and the same query
    mean, low, high = _bootstrap(difference, samples)
    return mean, low, high, dict(zip(seeds, difference.mean(axis=1)))


def _parse_settings(items):
    """``["a=1", "b=x"]`` → ``{"a": "1", "b": "x"}``, checked against the config's fields (values are checked by it)."""
    from street2shop.config import TrainConfig

    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes FIELD=VALUE. Received: {item!r}")
        settings[key.strip().replace("-", "_")] = value.strip()
    reserved = sorted(set(settings) & RESERVED)
    if reserved:
        raise ValueError(f"--set: {', '.join(reserved)} are set by this tool (a flag of its own, or what a variant means)")
    try:
        TrainConfig().replace(**settings)
    except Exception as e:  # a ConfigError naming the field (also an unknown one) and value
        raise ValueError(f"--set: {e}") from None
    return settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(SHARED / "grocery" / "manifest.csv"))
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="val")
    parser.add_argument("--aux-dir", default=str(SHARED / "coil100" / "images"))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--weights", default="none", help="'none' here (no internet); 'imagenet' where it can download")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--embedding-dim", type=int, default=128)
    parser.add_argument("--bn-momentum", type=float, default=0.9)
    parser.add_argument("--pairs", type=int, default=8192, help="training pairs per trained run (the equal budget)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--street-street-fraction", type=float, default=0.0)
    parser.add_argument("--hard-negative-fraction", type=float, default=0.5)
    parser.add_argument("--drop-warmup-epochs", type=int, default=2, help="plain-loss epochs before dropping, *_warmup variants only")
    parser.add_argument("--w-product", type=float, default=0.5, help="weight of the product softmax, *_products variants only")
    parser.add_argument("--robust-tau", type=float, default=0.8, help="fixed positive threshold of the robust_tau variant")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                        help="another training config field, for every trained variant, e.g. --set shop_augment=1.0 "
                             "(see `street2shop train --help`; not the fields this tool sets itself); use a separate "
                             "--out per setting")
    parser.add_argument("--out", default=str(ROOT / "bench-output" / "retrieval"))
    parser.add_argument("--summary", action="store_true", help="only write summary.md and topk.png from finished results")
    args = parser.parse_args()
    try:
        args.set = _parse_settings(args.set)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summary:
        print(summary(out))
        return 0

    from street2shop.data.records import read_manifest

    records = read_manifest(args.manifest)
    queries = [r for r in records if r.domain == "street" and r.split == args.eval_split]
    gallery = [r for r in records if r.domain == "shop"]
    logger.info("%d queries (%s street photos) against %d shop photos", len(queries), args.eval_split, len(gallery))
    (out / "command.json").write_text(json.dumps({"argv": sys.argv, "args": vars(args)}, indent=2))
    order = [(v, s) for s in args.seeds for v in args.variants if not (v in NO_SEED and s != args.seeds[0])]
    for variant, seed in order:
        path = out / f"result-{variant}-seed{seed}.json"
        if path.is_file():
            earlier = json.loads(path.read_text())
            if variant not in NO_SEED and earlier.get("settings", {}) != args.set:
                logger.error("%s ran with --set %s, this command has --set %s: use another --out", path, earlier.get("settings", {}), args.set)
                return 2
            if variant.endswith("_products") and earlier.get("w_product", args.w_product) != args.w_product:
                logger.error("%s ran with --w-product %s, this command has %s: use another --out", path, earlier["w_product"], args.w_product)
                return 2
            logger.info("done already: %s", path.name)
            continue
        logger.info("running %s, seed %d", variant, seed)
        record = run_one(variant, seed, args, queries, gallery)
        record["uptime"] = os.getloadavg()
        path.write_text(json.dumps(record, indent=2))
        top = record["top_k"]
        logger.info("%s seed %d: top-1 %.1f%%, top-5 %.1f%%, top-20 %.1f%% (%.0f s)", variant, seed,
                    100 * top["1"], 100 * top["5"], 100 * top["20"], record["seconds"])
    print(summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
