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

Label noise (where the robust loss should earn its keep): ``--noise-rate p``
gives a share p of the training street photos another product's label, within
the same coarse category (``--noise-kind same-category``; falling back to the
supercategory, then to any product, when the category has no other product)
or any other product (``uniform``). The corruption is a pure function of
(seed, kind), nested in p (the photos corrupted at 0.2 are corrupted alike at
0.4), the same for every variant of a seed, and written as a manifest under
``--out/noise/`` with a ``true_product_id`` column; queries and catalogue are
untouched. Training then logs, per epoch, the drop's precision (share of the
dropped positives that were corrupted; compare with p) and recall (share of the
corrupted positives dropped). Drop rules as variants: ``robust`` (the batch
quantile ``--positive-quantile``, 0.9), ``robust_matched`` (the batch quantile
matched to the noise: q = 1 − p times the share of product positives among all
positives) and ``robust_tau_warmup`` (a fixed τ after ``--drop-warmup-epochs``
plain epochs; τ is the same matched quantile of the training positives'
distances in the last warm-up epoch of the ``plain`` run of the same seed,
read from its log, so ``plain`` runs first; ``--tau-warmup`` fixes τ instead).
``*_multitask_products`` versions of both compare with
``plain_multitask_products``. ``--pretrain aux`` starts every variant of a seed
from one tower first trained on the auxiliary set alone (its pairs and
softmax, the same budget; kept under ``--pretrain-dir`` and shared by every
``--out``), like fine-tuning from ImageNet features. One ``--out`` per noise
setting and regime: results of another are refused. ``--noise-summary DIR...``
tabulates and plots top-1 and top-5 against p over such folders;
``tools/bench_noise.sh`` runs the whole label-noise benchmark.

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
import hashlib
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
from street2shop.data.noise import NOISE_KINDS, corrupt_labels  # noqa: E402 - after the path is set
from street2shop.experiments import VARIANTS, bootstrap, matched_quantile, paired_difference, per_query, sister  # noqa: E402

DEFAULT_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.default)

# Config fields run_one sets itself: from a flag of this tool, or by the variant.
RESERVED = frozenset({
    "manifest", "train_split", "val_split", "backbone", "weights", "image_size", "embedding_dim", "bn_momentum",
    "epochs", "pairs_per_epoch", "batch_size", "learning_rate", "seed", "output_dir", "loss", "auxiliary_dir",
    "drop_warmup_epochs", "positive_threshold", "positive_quantile", "w_product", "street_street_fraction",
    "hard_negative_fraction", "init_checkpoint",
})

logger = logging.getLogger("bench_retrieval")


def noisy_manifest(args, seed, out):
    """The manifest a seed trains on, and its corruption's description (None without noise).

    Written once per seed under ``out/noise/`` (and checked against the
    corruption drawn again, so a changed rule cannot mix in).
    """
    if not args.noise_rate:
        return args.manifest, None
    from street2shop.data.records import read_manifest_csv, write_manifest

    records, info = corrupt_labels(read_manifest_csv(args.manifest).records, args.noise_rate, args.noise_kind, seed,
                                   train_splits=tuple(x.strip() for x in args.train_split.split(",")))
    path = out / "noise" / f"manifest-seed{seed}.csv"
    described = path.with_suffix(".json")
    if described.is_file() and json.loads(described.read_text())["digest"] != info["digest"]:
        raise SystemExit(f"{path} was drawn differently (digest {json.loads(described.read_text())['digest']}, "
                         f"now {info['digest']}): use another --out")
    if not path.is_file():
        write_manifest(records, path)
        described.write_text(json.dumps(info, indent=2))
        logger.info("noise: %d of %d training street photos relabelled (%s, by group %s) -> %s", info["corrupted"],
                    info["street_photos"], args.noise_kind, info["by_group"], path)
    return str(path), info


def logged_quantile(log_csv, epoch, quantile):
    """The ``quantile`` of the positive distances logged for ``epoch`` (0-based) in a run's log.csv.

    Linear between the logged quantiles (``street2shop.compile.NOISE_QUANTILES``);
    above the highest logged one, linear up to 2 (the largest distance).
    """
    import numpy as np

    from street2shop.runlog import read_run_log

    rows = [row for row in read_run_log(log_csv) if row["epoch"] == epoch]
    if not rows:
        raise SystemExit(f"{log_csv} has no epoch {epoch + 1}: the plain run it needs is not finished")
    points = sorted((int(k.rsplit("_q", 1)[1]) / 100, v) for k, v in rows[-1].items()
                    if k.rsplit("_", 1)[-1].startswith("q") and "positive_distance_q" in k and not k.startswith("val_") and v is not None)
    if not points:
        raise SystemExit(f"{log_csv} logs no positive-distance quantiles: its run had no corruption flags")
    qs, values = zip(*points)
    return float(np.interp(quantile, list(qs) + [1.0], list(values) + [2.0]))


def variant_config(variant, seed, args, manifest, run_dir, noise_rate=0.0, init_checkpoint="", tau=None):
    """The TrainConfig of a trained variant (its flags and --set on the recipe), and what its drop rule is (for the result)."""
    from street2shop.config import TrainConfig

    base = (args.recipe or TrainConfig()).replace(
        manifest=manifest, train_split=args.train_split, val_split="", backbone=args.backbone, weights=args.weights,
        image_size=args.image_size, embedding_dim=args.embedding_dim, bn_momentum=args.bn_momentum, epochs=args.epochs,
        pairs_per_epoch=args.pairs // args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=seed,
        output_dir=str(run_dir), street_street_fraction=args.street_street_fraction,
        hard_negative_fraction=args.hard_negative_fraction, init_checkpoint=init_checkpoint,
        positive_quantile=args.positive_quantile, positive_threshold=0.0, drop_warmup_epochs=0,
    ).replace(**args.set)
    return VARIANTS[variant].config(base, aux_dir=args.aux_dir, w_product=args.w_product, drop_warmup_epochs=args.drop_warmup_epochs,
                                    robust_tau=args.robust_tau, noise_rate=noise_rate, tau=tau)


def tau_for(variant, seed, args, out, manifest, noise_rate):
    """τ of a tau_warmup variant: ``--tau-warmup`` if given, else the matched quantile of the sister run's warm-up distances.

    The quantile is the one the matched batch rule uses (1 − p for pairs
    alone), of the training positives' distances logged in the last warm-up
    epoch of the plain run of the same seed (whose first epochs are this
    run's warm-up). Without noise that quantile is 1: τ = 2, nothing dropped.
    """
    if args.tau_warmup:
        return args.tau_warmup, {"tau": args.tau_warmup, "from": "--tau-warmup"}
    if args.drop_warmup_epochs < 1:
        raise SystemExit(f"{variant} takes τ from the warm-up's distances: --drop-warmup-epochs must be >= 1 (or give --tau-warmup)")
    config, _ = variant_config(variant, seed, args, manifest, out, noise_rate, tau=1.0)
    quantile = matched_quantile(noise_rate, config)
    if quantile >= 1.0:
        return 2.0, {"tau": 2.0, "from": "no noise: the largest distance", "quantile": quantile}
    log_csv = out / "runs" / f"{sister(variant)}-seed{seed}" / "log.csv"
    if not log_csv.is_file():
        raise SystemExit(f"{variant} seed {seed} reads τ from {log_csv}: run {sister(variant)} for this seed first")
    tau = round(logged_quantile(log_csv, args.drop_warmup_epochs - 1, quantile), 4)
    return tau, {"tau": tau, "from": str(log_csv), "epoch": args.drop_warmup_epochs, "quantile": round(quantile, 4)}


def _digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def pretrained_tower(seed, args):
    """The checkpoint every variant of ``seed`` starts from with ``--pretrain aux``, trained once and kept.

    The tower trained on the auxiliary set alone (its pairs with the plain
    contrastive loss, and its softmax), with the same budget and settings as
    a variant; no product pair is drawn (product fractions 0).
    """
    from street2shop.train import train

    run_dir = Path(args.pretrain_dir) / f"seed{seed}"
    done = run_dir / "done.json"
    config, _ = variant_config("plain_multitask", seed, args, args.manifest, run_dir)
    config = config.replace(positive_fraction=0.0, negative_fraction=0.0, auxiliary_fraction=1.0)
    if done.is_file():
        info = json.loads(done.read_text())
        if info["config"] != config.to_dict():
            raise SystemExit(f"{done} was trained with other settings: use another --pretrain-dir")
        return info
    logger.info("pretraining the tower of seed %d on %s alone -> %s", seed, args.aux_dir, run_dir)
    result = train(config, verbose=2)
    info = {"checkpoint": str(result.last_checkpoint), "digest": _digest(result.last_checkpoint), "aux_dir": args.aux_dir,
            "pairs": args.pairs, "seconds": round(result.seconds, 1), "final_train": {k: v[-1] for k, v in result.history.items() if v},
            "config": config.to_dict()}
    done.write_text(json.dumps(info, indent=2))
    return info


def embed_with_tower(tower, records, batch_size=64, tta="none"):
    """The records embedded by the in-memory tower through the export's own graph (box crop and ``tta`` included)."""
    from street2shop.embed import embed_records
    from street2shop.embedders import TowerEmbedder

    embedded = embed_records(records, TowerEmbedder(tower, batch_size=batch_size, tta=tta), batch_size=batch_size)
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


def run_one(variant, seed, args, queries, gallery, out):
    import keras

    from street2shop.compile import build_model
    from street2shop.train import train

    started = time.perf_counter()
    size = args.image_size
    record = {"variant": variant, "seed": seed, "image_size": size, "backbone": args.backbone, "pairs": args.pairs, "settings": args.set,
              "config": args.recipe_id}
    if VARIANTS[variant].products:
        record["w_product"] = args.w_product
    if variant == "histogram":
        from street2shop.baselines import colour_histogram_embeddings

        q = colour_histogram_embeddings(queries)
        g = colour_histogram_embeddings(gallery)
        record.update(evaluate(q, queries, g, gallery))
        record["seconds"] = round(time.perf_counter() - started, 1)
        return record
    record["noise"] = {"rate": args.noise_rate, "kind": args.noise_kind if args.noise_rate else None}
    record["pretrain"] = args.pretrain
    manifest, noise = noisy_manifest(args, seed, out)
    if noise:
        record["noise"] = noise
    init = ""
    if args.pretrain == "aux":
        record["init"] = pretrained_tower(seed, args)
        init = record["init"]["checkpoint"]
    run_dir = out / "runs" / f"{variant}-seed{seed}"
    tau = None
    if VARIANTS[variant].rule == "tau_warmup":
        tau, record["tau"] = tau_for(variant, seed, args, out, manifest, args.noise_rate)
    config, record["drop"] = variant_config(variant if VARIANTS[variant].trained else "plain", seed, args, manifest, run_dir,
                                            args.noise_rate, init, tau)
    if variant == "untrained":
        keras.utils.set_random_seed(seed)
        model = build_model(config, None)
        if init:
            from street2shop.model.siamese import load_tower_weights

            load_tower_weights(model, init)
        tower = model.get_layer("tower")
        record["train_seconds"] = 0.0
        record.pop("drop")
    else:
        trained = TrainedWeightsAtEnd() if config.fit.ema_momentum else None
        result = train(config, verbose=2, extra_callbacks=[trained] if trained else None)
        tower = result.model.get_layer("tower")
        record["train_seconds"] = round(result.seconds, 1)
        record["pairs_per_second"] = round(result.pairs_per_second, 2)
        record["final_train"] = {k: v[-1] for k, v in result.history.items() if v}
        record["history"] = log_history(run_dir / "log.csv")  # every epoch, also of a resumed run
    g = embed_with_tower(tower, gallery)
    q = embed_with_tower(tower, queries)
    record.update(evaluate(q, queries, g, gallery))
    if VARIANTS[variant].trained and config.fit.ema_momentum:
        # The same run without its average: what training without ema_momentum would have exported (the
        # average never steers a step), so `compare_runs.py F#trained_weights F` is the average's paired gain.
        if trained.weights is None:
            raise SystemExit(f"{run_dir}: the trained weights were not captured at the last epoch (did training end early?)")
        average = tower.get_weights()
        tower.set_weights(trained.weights)
        record["trained_weights"] = evaluate(embed_with_tower(tower, queries), queries, embed_with_tower(tower, gallery), gallery)
        tower.set_weights(average)
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def TrainedWeightsAtEnd():
    """A callback that keeps the tower's trained weights (not their moving average) as the last epoch leaves them.

    It runs after the package's callbacks, which hand the trained weights back to the model at an
    epoch's end for the backup (``callbacks.EmaWeights.back``); ``fit`` then copies the average in.
    """
    import keras

    class _Keep(keras.callbacks.Callback):
        weights = None

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == self.params["epochs"]:
                self.weights = self.model.get_layer("tower").get_weights()

    return _Keep()


def log_history(log_csv):
    """A run's log.csv as ``{column: [value per epoch]}``, training columns only, rounded for the result file."""
    from street2shop.runlog import run_history

    return {k: [None if v is None else round(v, 5) for v in values] for k, values in run_history(log_csv, validation=False).items()}


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
        hits = per_query(rows)
        cells = []
        for name in metrics:
            mean, low, high = bootstrap(hits[name])
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
    comparisons = [(name, reference) for plain_first in (True, False) for name, v in VARIANTS.items()
                   for reference in v.compared_with if (reference == "plain") == plain_first]
    for variant, reference in comparisons:
        for k in (1, 5):
            diff = paired_difference(results, variant, reference, k) if results else None
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
    mechanism = mechanism_table(results)
    if mechanism:
        text += "\n" + mechanism
    (out / "summary.md").write_text(text)
    return text


def _logged(history, name):
    """The per-epoch values of training metric ``name`` in a result's history (Keras may prefix the output's name)."""
    for key, values in history.items():
        if not key.startswith("val_") and (key == name or key.endswith("_" + name)):
            return values
    return None


def mechanism_table(results):
    """What the drop removed, per trained variant (mean over its seeds): a Markdown table, '' without noise results.

    Drop rate, precision and recall are over the epochs in which the rule
    dropped anything (after a warm-up); the AUC and the mean distances of
    clean and corrupted positives are those of the first and the last epoch.
    """
    import numpy as np

    lines = []
    for variant in VARIANTS:
        rows = [r for r in results if r["variant"] == variant and (r.get("noise") or {}).get("rate") and r.get("history")]
        if not rows:
            continue
        cells = {name: [] for name in ("rate", "precision", "recall", "auc0", "auc1", "clean", "corrupted", "tau")}
        for r in rows:
            h = r["history"]
            drop = _logged(h, "positive_drop_rate")
            if drop is not None:
                active = [i for i, x in enumerate(drop) if x > 0] or list(range(len(drop)))
                cells["rate"].append(np.mean([drop[i] for i in active]))
                cells["precision"].append(np.mean([_logged(h, "positive_drop_precision")[i] for i in active]))
                cells["recall"].append(np.mean([_logged(h, "positive_drop_recall")[i] for i in active]))
            auc = _logged(h, "corrupted_positive_auc")
            cells["auc0"].append(auc[0])
            cells["auc1"].append(auc[-1])
            cells["clean"].append(_logged(h, "mean_clean_positive_distance")[-1])
            cells["corrupted"].append(_logged(h, "mean_corrupted_positive_distance")[-1])
            rule = r.get("drop") or {}
            if rule.get("positive_threshold"):
                cells["tau"].append(rule["positive_threshold"])

        def cell(name, percent=True):
            values = cells[name]
            return "-" if not values else f"{100 * np.mean(values):.1f}" if percent else f"{np.mean(values):.2f}"

        rule = rows[0].get("drop") or {}
        what = "-" if not rule else (f"q {rule['positive_quantile']:.2f}" if rule["positive_quantile"] else "") + (
            f"{' ' if rule['positive_quantile'] else ''}τ {cell('tau', False)}" if cells["tau"] else "") + (
            f", warm-up {rule['drop_warmup_epochs']}" if rule["drop_warmup_epochs"] else "")
        lines.append(f"| {variant} | {100 * rows[0]['noise']['rate']:.0f} | {what} | {len(rows)} | {cell('rate')} | "
                     f"{cell('precision')} | {cell('recall')} | {cell('auc0', False)} → {cell('auc1', False)} | "
                     f"{cell('clean', False)} / {cell('corrupted', False)} |")
    if not lines:
        return ""
    return ("| variant | noise % | rule | seeds | dropped % of positives | precision % | recall % | AUC first → last epoch "
            "| clean / corrupted positives' mean d, last epoch |\n|---|---|---|---|---|---|---|---|---|\n"
            + "\n".join(lines) + "\n\nPrecision: the share of the dropped positives that were corrupted (a drop at "
            "random gives the noise rate); recall: the share of the corrupted positives dropped; both over the epochs "
            "with drops. AUC: the chance that a corrupted positive lies farther apart than a clean one (0.5: no "
            "separation), in training.\n")


def noise_summary(dirs, out):
    """Top-1 and top-5 against the noise rate, over ``--out`` folders of one setting each: (Markdown, choice).

    The choice (for ``--choose``) is the folder and robust variant with the
    largest mean paired gain over plain in the same folder, top-1 plus top-5
    points, every candidate scored on the same seeds: those they all have (the
    screen's; the seeds of a rule run on more since do not count). None if
    they share no seed.
    """
    groups = {}  # (regime, kind, rate, variant) -> results
    candidates = []  # (dir, variant, reference, setting, results, seeds paired with the reference)
    paired = []
    for d in dirs:
        results = [json.loads(p.read_text()) for p in sorted(Path(d).glob("result-*.json"))]
        results = [r for r in results if r["variant"] != "histogram"]
        for r in results:
            setting = _setting_of(r)
            key = (setting["pretrain"], setting["noise_kind"] or "-", setting["noise_rate"], r["variant"])
            groups.setdefault(key, []).append(r)
        for variant in sorted({r["variant"] for r in results} - {"plain", "untrained"}):
            reference = sister(variant) if VARIANTS[variant].trained else "plain"
            diffs = [paired_difference(results, variant, reference, k) for k in (1, 5)]
            if not all(diffs):
                continue
            setting = _setting_of(next(r for r in results if r["variant"] == variant))
            paired.append(f"| {setting['pretrain']} | {setting['noise_kind'] or '-'} | {setting['noise_rate']:.1f} | "
                          f"{variant} − {reference} | {', '.join(map(str, diffs[0][3]))} | "
                          + " | ".join(f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" for m, lo, hi, _ in diffs) + " |")
            if VARIANTS[variant].loss == "robust":
                candidates.append((d, variant, reference, setting, results, set(diffs[0][3])))
    choice = _choose(candidates)
    lines = ["| regime | noise | p | variant | seeds | top-1 | top-5 |", "|---|---|---|---|---|---|---|"]
    curves = {}
    for (regime, kind, rate, variant), rows in sorted(groups.items()):
        hits = per_query(rows)
        cells = [bootstrap(hits[m]) for m in ("top-1", "top-5")]
        lines.append(f"| {regime} | {kind} | {rate:.1f} | {variant} | {', '.join(str(r['seed']) for r in rows)} | "
                     + " | ".join(f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" for m, lo, hi in cells) + " |")
        curves.setdefault((regime, variant), []).append((rate, cells, len(rows)))
    text = "\n".join(lines) + "\n\n"
    if paired:
        text += ("| regime | noise | p | comparison | seeds paired | top-1 difference [95%] | top-5 difference [95%] |\n"
                 "|---|---|---|---|---|---|---|\n" + "\n".join(paired) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    _plot_against_noise(curves, out / "noise.png")
    (out / "noise-summary.md").write_text(text)
    return text, choice


def _choose(candidates):
    """The candidate with the largest top-1 + top-5 gain over its reference on the seeds all candidates share."""
    if not candidates:
        return None
    common = sorted(set.intersection(*(seeds for *_, seeds in candidates)))
    if not common:
        logger.warning("--choose: the candidates share no seed, nothing to choose between: %s",
                       "; ".join(f"{variant} in {d} (seeds {sorted(seeds)})" for d, variant, *_, seeds in candidates))
        return None
    scored = []
    for d, variant, reference, setting, results, _ in candidates:
        screen = [r for r in results if r.get("seed") in common or not VARIANTS[r["variant"]].seeded]
        score = 100 * sum(paired_difference(screen, variant, reference, k)[0] for k in (1, 5))
        scored.append({"dir": str(d), "pretrain": setting["pretrain"], "variant": variant, "score": round(score, 2),
                       "seeds": common})
    return max(scored, key=lambda c: c["score"])


def _plot_against_noise(curves, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    most = max((n for points in curves.values() for *_, n in points), default=0)
    regimes = {"none": "from scratch", "aux": "fine-tuned"}
    for i_curve, ((regime, variant), points) in enumerate(sorted(curves.items())):
        points.sort(key=lambda point: point[0])
        # Side by side, not on top of one another; a curve with fewer seeds than the most (a screen's) is faded.
        rates = [100 * rate + 0.6 * (i_curve - (len(curves) - 1) / 2) for rate, *_ in points]
        seeds = sorted({n for *_, n in points})
        faded = max(seeds) < most
        label = f"{variant} ({regimes.get(regime, regime)}; {'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''})"
        for ax, i in zip(axes, (0, 1)):
            means = [100 * cells[i][0] for _, cells, _ in points]
            errors = [[100 * (cells[i][0] - cells[i][1]) for _, cells, _ in points],
                      [100 * (cells[i][2] - cells[i][0]) for _, cells, _ in points]]
            ax.errorbar(rates, means, yerr=errors, marker="o", capsize=3, label=label, alpha=0.35 if faded else 1.0)
    for ax, k in zip(axes, (1, 5)):
        ax.set_xlabel("noise rate p (% of training street photos mislabelled)")
        ax.set_ylabel(f"top-{k} accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"top-{k}, grocery val (mean over seeds, 95% interval)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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


def _setting_of(record):
    """The noise setting and regime a result was run with (results of before this existed: no noise, no pretraining)."""
    noise = record.get("noise") or {}
    return {"noise_rate": noise.get("rate", 0.0), "noise_kind": noise.get("kind") if noise.get("rate") else None,
            "pretrain": record.get("pretrain", "none")}


def _folder_setting(out):
    """The one setting of the trained results in ``out`` (None without any); an error if they disagree."""
    settings = {json.dumps(_setting_of(json.loads(p.read_text())), sort_keys=True)
                for p in sorted(out.glob("result-*.json")) if not p.name.startswith("result-histogram-")}
    if len(settings) > 1:
        raise SystemExit(f"{out} mixes results of different noise settings or regimes: {sorted(settings)}")
    return json.loads(settings.pop()) if settings else None


# The tool's flags a --config file gives the defaults of: flag → (section, field); "pairs" is pairs_per_epoch × epochs.
FROM_CONFIG = {
    "backbone": ("model", "backbone"), "weights": ("model", "weights"), "image_size": ("data", "image_size"),
    "embedding_dim": ("model", "embedding_dim"), "bn_momentum": ("model", "bn_momentum"), "epochs": ("fit", "epochs"),
    "batch_size": ("fit", "batch_size"), "learning_rate": ("fit", "learning_rate"),
    "street_street_fraction": ("data", "street_street_fraction"), "hard_negative_fraction": ("data", "hard_negative_fraction"),
    "w_product": ("loss", "w_product"), "positive_quantile": ("loss", "positive_quantile"),
}


# Fields every variant sets itself whatever a recipe says (variant_config): a recipe may leave them out or give these values.
FORCED = {"val_split": "", "drop_warmup_epochs": 0, "positive_threshold": 0.0, "init_checkpoint": ""}


def recipe_defaults(path):
    """The TrainConfig of a ``--config`` file, its id for the results (name, and a digest of its values: comments
    and layout do not count) and the flag defaults it gives.

    Raises:
        ConfigError: the file cannot be read, or sets a field this tool overrides (``FORCED``).
    """
    from street2shop.config import TrainConfig, read_config_values
    from street2shop.errors import ConfigError

    raw = read_config_values(path)
    config = TrainConfig.from_dict(raw, source=str(path))
    flat = {k: v for section in config.to_dict().values() for k, v in section.items()}
    written = {k for section in raw.values() for k in section}  # what the file sets itself
    overridden = {k: flat[k] for k, v in FORCED.items() if k in written and flat[k] != v}
    if overridden:
        raise ConfigError(f"{path} sets {overridden}, which this tool sets itself for every variant ({FORCED}): "
                          "the benchmark would not run the recipe as written")
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    defaults = {flag: getattr(getattr(config, section), field) for flag, (section, field) in FROM_CONFIG.items()}
    defaults["pairs"] = config.data.pairs_per_epoch * config.fit.epochs
    defaults["weights"] = defaults["weights"] or "none"
    return config, {"name": Path(path).stem, "sha256": digest}, defaults


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", metavar="TOML",
                        help="a named training recipe (e.g. configs/grocery-30min-v1.toml): the base of every trained "
                             "variant and the default of the flags below it sets; the flags and --set still override")
    parser.add_argument("--manifest", default=str(SHARED / "grocery" / "manifest.csv"))
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="val")
    parser.add_argument("--aux-dir", default=str(SHARED / "coil100" / "images"))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
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
    parser.add_argument("--positive-quantile", type=float, default=0.9, help="batch quantile of the robust variants' default rule")
    parser.add_argument("--noise-rate", type=float, default=0.0, help="share of the training street photos given a wrong product")
    parser.add_argument("--noise-kind", default="same-category", choices=NOISE_KINDS)
    parser.add_argument("--tau-warmup", type=float, default=0.0,
                        help="τ of the *tau_warmup variants (default: read from the plain run's warm-up, see above)")
    parser.add_argument("--pretrain", default="none", choices=("none", "aux"),
                        help="aux: every variant of a seed starts from one tower trained on --aux-dir alone")
    parser.add_argument("--pretrain-dir", default=str(ROOT / "bench-output" / "pretrain-aux"))
    parser.add_argument("--noise-summary", nargs="+", metavar="DIR", default=None,
                        help="only tabulate and plot top-1/top-5 against the noise rate over these --out folders, into --out")
    parser.add_argument("--choose", action="store_true",
                        help="with --noise-summary: print the folder and rule with the largest gain over plain (JSON)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                        help="another training config field, for every trained variant, e.g. --set shop_augment=1.0 "
                             "(see `street2shop train --help`; not the fields this tool sets itself); use a separate "
                             "--out per setting")
    parser.add_argument("--out", default=str(ROOT / "bench-output" / "retrieval"))
    parser.add_argument("--summary", action="store_true", help="only write summary.md and topk.png from finished results")
    first = argparse.ArgumentParser(add_help=False)  # --config first: its values are the defaults --help shows
    first.add_argument("--config", default="")
    known, _ = first.parse_known_args()
    if known.config:
        from street2shop.errors import ConfigError

        try:
            recipe, recipe_id, defaults = recipe_defaults(known.config)
        except ConfigError as e:
            parser.error(f"--config: {e}")
        parser.set_defaults(**defaults)
    args = parser.parse_args()
    args.recipe, args.recipe_id = (recipe, recipe_id) if args.config else (None, None)
    try:
        args.set = _parse_settings(args.set)
    except ValueError as e:
        parser.error(str(e))
    if not (args.summary or args.noise_summary):
        from street2shop.errors import ConfigError

        try:  # every trained variant's config, before anything runs: a bad combination of flags fails here
            for variant in {v for v in args.variants if VARIANTS[v].trained and VARIANTS[v].rule != "tau_warmup"}:
                variant_config(variant, 0, args, "m.csv", Path("unused"), args.noise_rate)
        except ConfigError as e:
            parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.noise_summary:
        text, choice = noise_summary([Path(d) for d in args.noise_summary], out)
        print(json.dumps(choice) if args.choose else text)
        return 0
    if args.summary:
        print(summary(out))
        return 0
    setting = {"noise_rate": args.noise_rate, "noise_kind": args.noise_kind if args.noise_rate else None,
               "pretrain": args.pretrain}
    earlier = _folder_setting(out)
    if earlier is not None and earlier != setting:
        parser.error(f"{out} holds results of {earlier}, this command is {setting}: use another --out")

    from street2shop.data.records import read_manifest_csv

    records = read_manifest_csv(args.manifest)
    queries = [r for r in records if r.domain == "street" and r.split == args.eval_split]
    gallery = [r for r in records if r.domain == "shop"]
    logger.info("%d queries (%s street photos) against %d shop photos", len(queries), args.eval_split, len(gallery))
    (out / "command.json").write_text(json.dumps({"argv": sys.argv, "args": {k: v for k, v in vars(args).items() if k != "recipe"}}, indent=2))
    variants = sorted(args.variants, key=lambda v: VARIANTS[v].rule == "tau_warmup")  # after their plain run
    order = [(v, s) for s in args.seeds for v in variants if VARIANTS[v].seeded or s == args.seeds[0]]
    for variant, seed in order:
        path = out / f"result-{variant}-seed{seed}.json"
        if path.is_file():
            earlier = json.loads(path.read_text())
            if VARIANTS[variant].seeded and earlier.get("config") != args.recipe_id:
                logger.error("%s ran with --config %s, this command has %s: use another --out", path, earlier.get("config"), args.recipe_id)
                return 2
            if VARIANTS[variant].seeded and earlier.get("settings", {}) != args.set:
                logger.error("%s ran with --set %s, this command has --set %s: use another --out", path, earlier.get("settings", {}), args.set)
                return 2
            if VARIANTS[variant].products and earlier.get("w_product", args.w_product) != args.w_product:
                logger.error("%s ran with --w-product %s, this command has %s: use another --out", path, earlier["w_product"], args.w_product)
                return 2
            logger.info("done already: %s", path.name)
            continue
        logger.info("running %s, seed %d", variant, seed)
        record = run_one(variant, seed, args, queries, gallery, out)
        record["uptime"] = os.getloadavg()
        path.write_text(json.dumps(record, indent=2))
        top = record["top_k"]
        logger.info("%s seed %d: top-1 %.1f%%, top-5 %.1f%%, top-20 %.1f%% (%.0f s)", variant, seed,
                    100 * top["1"], 100 * top["5"], 100 * top["20"], record["seconds"])
    print(summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
