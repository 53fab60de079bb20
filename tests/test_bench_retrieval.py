"""The argument handling, recipes and result files of tools/bench_retrieval.py, and bench_views.py's references (no training here).

Its science (the variants, label noise, the statistics) is in the package: tests/test_experiments.py,
tests/data/test_noise.py.
"""

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest

from tests.data.test_noise import grocery_like, untouched

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_retrieval")


def test_settings_are_parsed_and_checked(bench):
    assert bench._parse_settings(["shop_augment=1.0", "w-cls = 0.25"]) == {"shop_augment": "1.0", "w_cls": "0.25"}
    for items, message in (
        (["shop_augment"], "FIELD=VALUE"),
        (["=1"], "FIELD=VALUE"),
        (["no_such_field=1"], "unknown config field"),
        (["shop_augment=lots"], "shop_augment must be float"),
        (["seed=3"], "set by this tool"),
        (["w_product=1"], "set by this tool"),
    ):
        with pytest.raises(ValueError, match=message):
            bench._parse_settings(items)


def test_reserved_fields_exist(bench):
    from street2shop.config import field_owners

    assert bench.RESERVED <= set(field_owners())


def test_noisy_manifest_is_written_once_and_read_back(bench, tmp_path):
    import argparse

    from street2shop.data.records import read_manifest_csv, write_manifest

    records, _ = grocery_like()
    images = tmp_path / "images"
    images.mkdir()
    from street2shop.data.records import Record

    local = [Record(str(images / Path(r.image_path).name), r.product_id, r.domain, r.split, r.category, r.box, r.metadata) for r in records]
    for r in local:
        Path(r.image_path).write_bytes(b"x")
    manifest = write_manifest(local, tmp_path / "manifest.csv")
    args = argparse.Namespace(manifest=str(manifest), noise_rate=0.5, noise_kind="uniform", train_split="train")
    path, info = bench.noisy_manifest(args, 7, tmp_path / "out")
    noisy = read_manifest_csv(path).records
    assert info["corrupted"] == 20 and sum(r.product_id != r.metadata["true_product_id"] for r in noisy) == 20
    assert untouched(local, noisy)
    assert json.loads((tmp_path / "out" / "noise" / "manifest-seed7.json").read_text())["digest"] == info["digest"]
    args.noise_kind = "same-category"  # another draw into the same folder is refused
    with pytest.raises(SystemExit, match="drawn differently"):
        bench.noisy_manifest(args, 7, tmp_path / "out")
    args.noise_rate = 0.0
    assert bench.noisy_manifest(args, 7, tmp_path / "other") == (str(manifest), None)


def _args(bench, **kw):
    import argparse

    values = dict(train_split="train", backbone="inception_v3", weights="none", image_size=96, embedding_dim=128,
                  bn_momentum=0.9, epochs=8, pairs=8192, batch_size=32, learning_rate=1e-3, aux_dir="/aux",
                  w_product=0.5, street_street_fraction=0.0, hard_negative_fraction=0.5, positive_quantile=0.9,
                  robust_tau=0.8, drop_warmup_epochs=2, tau_warmup=0.0, set={}, recipe=None)
    values.update(kw)
    return argparse.Namespace(**values)


def test_variant_configs_set_each_drop_rule(bench, tmp_path):
    args = _args(bench)

    def loss_of(variant, **kw):
        config, rule = bench.variant_config(variant, 1, args, "m.csv", tmp_path, **kw)
        lc = config.loss
        return (lc.loss, lc.positive_quantile, lc.positive_threshold, lc.drop_warmup_epochs, bool(config.data.auxiliary_dir),
                lc.w_product), rule

    assert loss_of("plain")[0] == ("contrastive", 0.9, 0.0, 0, False, 0.0) and loss_of("plain")[1] is None
    assert loss_of("robust")[0] == ("robust", 0.9, 0.0, 0, False, 0.0)
    assert loss_of("robust_tau")[0] == ("robust", 0.9, 0.8, 0, False, 0.0)
    assert loss_of("robust_warmup")[0] == ("robust", 0.9, 0.0, 2, False, 0.0)
    assert loss_of("robust_matched", noise_rate=0.4)[0] == ("robust", pytest.approx(0.6), 0.0, 0, False, 0.0)
    assert loss_of("robust_tau_warmup", noise_rate=0.4, tau=0.7)[0] == ("robust", 0.0, 0.7, 2, False, 0.0)
    # with the auxiliary set a third of the pairs, half of them positive: 2/3 of the positives are product pairs
    assert loss_of("robust_matched_multitask_products", noise_rate=0.3)[0] == ("robust", pytest.approx(0.8), 0.0, 0, True, 0.5)
    config, rule = bench.variant_config("robust_matched", 1, args, "m.csv", tmp_path / "run", noise_rate=0.2, init_checkpoint="/t.keras")
    assert rule == {"rule": "matched", "positive_quantile": pytest.approx(0.8), "positive_threshold": 0.0, "drop_warmup_epochs": 0}
    assert config.model.init_checkpoint == "/t.keras" and config.fit.output_dir == str(tmp_path / "run")
    with pytest.raises(ValueError, match="needs its τ"):
        bench.variant_config("robust_tau_warmup", 1, args, "m.csv", tmp_path)
    assert bench.sister("robust_tau_warmup") == "plain"
    assert bench.sister("robust_tau_warmup_multitask_products") == "plain_multitask_products"


def test_a_recipe_file_is_the_base_of_every_variant_and_the_default_of_the_flags(bench, tmp_path):
    from street2shop.errors import ConfigError

    recipe = tmp_path / "r-v1.toml"
    recipe.write_text('[data]\nimage_size = 128\npairs_per_epoch = 1024\nshop_augment = 0.7\n[model]\nweights = "none"\n'
                      '[loss]\nw_product = 0.25\n[fit]\nepochs = 12\nlr_schedule = "cosine"\nwarmup_epochs = 0.5\n')
    config, recipe_id, defaults = bench.recipe_defaults(recipe)
    assert recipe_id["name"] == "r-v1" and len(recipe_id["sha256"]) == 16
    assert (defaults["image_size"], defaults["epochs"], defaults["pairs"], defaults["w_product"], defaults["weights"]) == (128, 12, 12 * 1024, 0.25, "none")
    args = _args(bench, recipe=config, **{k: defaults[k] for k in ("image_size", "epochs", "pairs", "w_product")})
    made, _ = bench.variant_config("robust_multitask_products", 3, args, "m.csv", tmp_path / "run")
    # the recipe's own fields (not flags of the tool) reach the run; the variant still decides its tasks
    assert (made.fit.lr_schedule, made.fit.warmup_epochs, made.data.shop_augment) == ("cosine", 0.5, 0.7)
    assert (made.data.image_size, made.data.pairs_per_epoch, made.fit.epochs, made.loss.w_product, made.fit.seed) == (128, 1024, 12, 0.25, 3)
    plain, _ = bench.variant_config("plain", 3, args, "m.csv", tmp_path / "run")
    assert (plain.loss.loss, plain.loss.w_product, plain.data.auxiliary_dir, plain.fit.lr_schedule) == ("contrastive", 0.0, "", "cosine")
    # the id is of the values: a comment does not change it, a value does
    recipe.write_text("# a comment\n" + recipe.read_text())
    assert bench.recipe_defaults(recipe)[1] == recipe_id
    recipe.write_text(recipe.read_text().replace("image_size = 128", "image_size = 112"))
    assert bench.recipe_defaults(recipe)[1]["sha256"] != recipe_id["sha256"]
    # a field the tool overrides for every variant is refused, not silently replaced
    recipe.write_text(recipe.read_text().replace("w_product = 0.25", "w_product = 0.25\ndrop_warmup_epochs = 2"))
    with pytest.raises(ConfigError, match="drop_warmup_epochs"):
        bench.recipe_defaults(recipe)


def test_the_shipped_recipes_load(bench):
    from street2shop.config import load_config

    recipes = sorted((ROOT / "configs").glob("*.toml"))
    assert recipes, "configs/ holds the named recipes"
    for path in recipes:
        load_config(path)  # every field known and valid
        assert re.fullmatch(r"[a-z0-9-]+-v\d+", path.stem), f"{path.name}: a recipe's name ends in its version (-v1)"


def test_tau_is_read_from_the_plain_runs_last_warmup_epoch(bench, tmp_path):
    run = tmp_path / "runs" / "plain-seed1"
    run.mkdir(parents=True)
    header = "epoch,loss,positive_distance_q50,positive_distance_q60,positive_distance_q70,positive_distance_q80,positive_distance_q90"
    (run / "log.csv").write_text(header + "\n0,1.0,0.9,1.0,1.1,1.2,1.3\n1,0.5,0.4,0.5,0.6,0.7,0.8\n2,0.4,0.3,0.4,0.5,0.6,0.7\n")
    args = _args(bench)
    tau, info = bench.tau_for("robust_tau_warmup", 1, args, tmp_path, "m.csv", 0.4)  # epoch 2 (index 1), q60
    assert tau == pytest.approx(0.5) and info["epoch"] == 2 and info["quantile"] == pytest.approx(0.6)
    assert bench.tau_for("robust_tau_warmup", 1, args, tmp_path, "m.csv", 0.25)[0] == pytest.approx(0.65)  # q75: between q70 and q80
    assert bench.logged_quantile(run / "log.csv", 1, 0.95) == pytest.approx(1.4)  # above q90: towards 2
    assert bench.tau_for("robust_tau_warmup", 1, args, tmp_path, "m.csv", 0.0)[0] == 2.0  # no noise: nothing dropped
    assert bench.tau_for("robust_tau_warmup", 1, _args(bench, tau_warmup=0.9), tmp_path, "m.csv", 0.4)[0] == 0.9
    with pytest.raises(SystemExit, match="run plain for this seed first"):
        bench.tau_for("robust_tau_warmup", 2, args, tmp_path, "m.csv", 0.4)
    with pytest.raises(SystemExit, match="has no epoch 5"):
        bench.logged_quantile(run / "log.csv", 4, 0.6)


def test_one_folder_holds_one_noise_setting(bench, tmp_path):
    def write(name, **record):
        (tmp_path / f"result-{name}.json").write_text(json.dumps(record))

    assert bench._folder_setting(tmp_path) is None
    write("histogram-seed0", variant="histogram")
    write("plain-seed0", variant="plain")  # before noise existed: no noise, no pretraining
    assert bench._folder_setting(tmp_path) == {"noise_rate": 0.0, "noise_kind": None, "pretrain": "none"}
    write("robust-seed0", variant="robust", noise={"rate": 0.0, "kind": None}, pretrain="none")
    assert bench._folder_setting(tmp_path)["noise_rate"] == 0.0
    write("robust-seed1", variant="robust", noise={"rate": 0.4, "kind": "uniform", "digest": "x"}, pretrain="none")
    with pytest.raises(SystemExit, match="mixes results"):
        bench._folder_setting(tmp_path)


def test_noise_summary_and_the_choice_of_rule(bench, tmp_path):
    def result(folder, variant, seed, ranks, rate=0.4, pretrain="none", history=None):
        folder.mkdir(exist_ok=True)
        record = {"variant": variant, "seed": seed, "ranks": ranks, "noise": {"rate": rate, "kind": "uniform"},
                  "pretrain": pretrain, "top_k": {"1": 0.0, "5": 0.0, "20": 0.0}, "mrr": 0.0}
        if history:
            record.update(history=history, drop={"rule": "matched", "positive_quantile": 0.6, "positive_threshold": 0.0,
                                                 "drop_warmup_epochs": 0})
        (folder / f"result-{variant}-seed{seed}.json").write_text(json.dumps(record))

    scratch, aux = tmp_path / "scratch", tmp_path / "aux"
    for seed in (0, 1):
        result(scratch, "plain", seed, [1, 9, 9, 9])
        result(scratch, "robust", seed, [1, 1, 9, 9])  # +25 top-1, +25 top-5
        result(aux, "plain", seed, [9, 9, 9, 9], pretrain="aux")
        result(aux, "robust_matched", seed, [1, 1, 3, 9], pretrain="aux",  # +50 top-1, +75 top-5: the choice
               history={"positive_drop_rate": [0.4, 0.4], "positive_drop_precision": [0.5, 0.7], "positive_drop_recall": [0.5, 0.5],
                        "corrupted_positive_auc": [0.6, 0.8], "mean_clean_positive_distance": [0.9, 0.5],
                        "mean_corrupted_positive_distance": [1.0, 0.9]})
    text, choice = bench.noise_summary([scratch, aux], tmp_path / "summary")
    assert choice["dir"] == str(aux) and choice["variant"] == "robust_matched" and choice["score"] == pytest.approx(125.0)
    assert "| aux | uniform | 0.4 | robust_matched − plain | 0, 1 | +50.0" in text
    # Every candidate is scored on the seeds they all have (the screen's, 0 and 1): robust's seeds 2-4 since
    # (+100 / +100 each) would make it +140 over its five seeds, above matched's +125, if they counted.
    result(scratch, "robust_tau_warmup", 0, [1, 1, 1, 1])  # +75 / +75
    result(scratch, "robust_tau_warmup", 1, [9, 9, 9, 9])  # -25 / -25
    for seed in (2, 3, 4):
        result(scratch, "plain", seed, [9, 9, 9, 9])
        result(scratch, "robust", seed, [1, 1, 1, 1])
    choice = bench.noise_summary([scratch, aux], tmp_path / "summary")[1]
    assert choice["variant"] == "robust_matched" and choice["seeds"] == [0, 1] and choice["score"] == pytest.approx(125.0)
    # Seed 2 for every candidate: robust (+50, +50, +200 → 100) now beats matched (+125, +125, -150 → 33.33)
    # and tau_warmup (+150, -50, 0 → 33.33).
    result(aux, "plain", 2, [1, 1, 1, 9], pretrain="aux")
    result(aux, "robust_matched", 2, [9, 9, 9, 9], pretrain="aux")
    result(scratch, "robust_tau_warmup", 2, [9, 9, 9, 9])
    choice = bench.noise_summary([scratch, aux], tmp_path / "summary")[1]
    assert choice["variant"] == "robust" and choice["seeds"] == [0, 1, 2] and choice["score"] == pytest.approx(100.0)
    # Candidates that share no seed: nothing to choose between.
    one, other = tmp_path / "one", tmp_path / "other"
    result(one, "plain", 0, [9, 9, 9, 9])
    result(one, "robust", 0, [1, 9, 9, 9])
    result(other, "plain", 1, [9, 9, 9, 9], pretrain="aux")
    result(other, "robust", 1, [1, 9, 9, 9], pretrain="aux")
    assert bench.noise_summary([one, other], tmp_path / "summary")[1] is None
    assert (tmp_path / "summary" / "noise.png").is_file()
    mechanism = bench.mechanism_table([json.loads(p.read_text()) for p in aux.glob("result-*.json")])
    assert "| robust_matched | 40 | q 0.60 | 2 | 40.0 | 60.0 | 50.0 | 0.60 → 0.80 | 0.50 / 0.90 |" in mechanism


def test_street_refs_are_the_records_embed_indexes_and_the_ones_the_tool_used_before(synth_dataset):
    from street2shop.data.records import read_manifest_csv

    views = load_tool("bench_views")
    records = read_manifest_csv(synth_dataset).records
    gallery = [r for r in records if r.domain == "shop"]  # bench_retrieval's gallery
    command = {"manifest": str(synth_dataset), "train_split": "train"}
    # The records the tool indexed by hand before (the training street photos), in the same order.
    assert views.customer_references(command, gallery) == [r for r in records if r.domain == "street" and r.split == "train"]
    assert views.parse("street-refs+tta-flip") == (0, "flip", "photos", None)
    assert views.parse("street-means+tta-flip-crops") == (0, "flip-crops", "means", None)
    assert views.parse("size-112+tta-flip") == (0, "flip", False, 112)
    # A prototype per product: the normalised mean of its photos' vectors, in the order products first appear.
    street = [r for r in records if r.domain == "street" and r.split == "train"][:3]
    street = [street[0], dataclasses.replace(street[1], product_id="other"), dataclasses.replace(street[2], product_id=street[0].product_id)]
    means, holders = views.street_means([[3.0, 0.0], [0.0, 2.0], [0.0, 3.0]], street)
    assert holders == [street[0], street[1]]
    assert means.ravel().tolist() == pytest.approx([0.5 ** 0.5, 0.5 ** 0.5, 0.0, 1.0])  # mean (1.5, 1.5) normalised; (0, 2) / 2
    with pytest.raises(SystemExit, match="not this run's gallery"):
        views.customer_references(command, gallery[1:])


def test_compare_runs_pairs_two_folders_by_seed_and_query(tmp_path, capsys):
    compare = load_tool("compare_runs")

    def result(folder, seed, ranks):
        folder.mkdir(exist_ok=True)
        (folder / f"result-robust_multitask_products-seed{seed}.json").write_text(
            json.dumps({"variant": "robust_multitask_products", "seed": seed, "ranks": ranks}))

    base, lever = tmp_path / "base", tmp_path / "ema_momentum=0.99"
    result(base, 0, [1, 9, 9, 9])
    result(base, 1, [1, 1, 9, 9])
    result(lever, 0, [1, 1, 3, 9])  # top-1 +25, top-5 +50
    result(lever, 1, [1, 1, 9, 9])  # top-1 and top-5 +0
    result(lever, 2, [1, 1, 1, 1])  # base has no seed 2: not counted
    assert compare.main([str(base), str(lever)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| ema_momentum=0.99"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0, 1" and cells[4] == "0: +25.0, 1: +0.0"
    assert cells[2].startswith("+12.5 [") and cells[3].startswith("+25.0 [")
    with pytest.raises(SystemExit, match="no finished run"):
        compare.main([str(base), str(tmp_path / "empty")])


def test_compare_runs_reads_a_runs_trained_weights_beside_its_average(tmp_path, capsys):
    compare = load_tool("compare_runs")
    ema = tmp_path / "ema_momentum=0.99"
    ema.mkdir()
    for seed, average, trained in ((0, [1, 1, 1, 9], [1, 9, 9, 9]), (1, [1, 1, 9, 9], [1, 1, 9, 9])):
        (ema / f"result-robust_multitask_products-seed{seed}.json").write_text(json.dumps(
            {"variant": "robust_multitask_products", "seed": seed, "ranks": average, "trained_weights": {"ranks": trained}}))
    assert compare.main([f"{ema}#trained_weights", str(ema)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| ema_momentum=0.99 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "0: +50.0, 1: +0.0"  # the average against the same run's trained weights: 3/4 − 1/4, 2/4 − 2/4
    assert compare.main([str(ema), f"{ema}#trained_weights"]) == 0
    assert "| ema_momentum=0.99#trained_weights | 0, 1 | -25.0 [" in capsys.readouterr().out
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "result-robust_multitask_products-seed0.json").write_text(json.dumps({"variant": "robust_multitask_products", "seed": 0, "ranks": [1]}))
    with pytest.raises(SystemExit, match="record no 'trained_weights'"):
        compare.main([f"{plain}#trained_weights", str(plain)])


def test_round5_curves_put_each_recipe_run_at_its_quiet_minutes(tmp_path, capsys):
    table = load_tool("round5_table")
    out = tmp_path / "round5"

    def result(folder, seed, pairs, ranks, **extra):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"result-robust_multitask_products-seed{seed}.json").write_text(json.dumps(
            {"variant": "robust_multitask_products", "seed": seed, "pairs": pairs, "ranks": ranks, "train_seconds": 600,
             "top_k": {"1": 0.5, "5": 1.0}, **extra}))

    result(out / "10min" / "densenet121@96", 0, 6000, [1, 1, 2, 2])                     # top-1 50 %
    result(out / "28min-levers" / "densenet121@96" / "w_product=1.0", 0, 12000, [1, 1, 1, 1])  # a lever: not on the curve
    result(out / "30min" / "densenet121@96" / "ema_momentum=0.99", 0, 12000, [1, 1, 1, 1],
           trained_weights={"ranks": [1, 1, 1, 2]})                                    # the trained weights: 75 %
    (out / "budgets-28min.json").write_text(json.dumps({"pairs_per_s": {"inception_v3@96": 30.0, "densenet121@96": 20.0}}))
    (out / "pairs-per-s-full-epochs.json").write_text(json.dumps({"pairs_per_s": {"inception_v3@96": 20.0, "densenet121@96": 10.0}}))
    rates = table.quiet_rates(out)
    assert rates == {"inception_v3@96": 30.0, "densenet121@96": 15.0}  # full epochs' ratio 0.5 at the 28-minute scale
    points = table.curves(out, rates)
    assert [(m, top1) for m, top1, *_ in points["densenet121@96"]] == [(pytest.approx(6000 / 15 / 60), 50.0),
                                                                       (pytest.approx(12000 / 15 / 60), 75.0)]
    png = tmp_path / "plot.png"
    assert table.main([str(out), "--plot", str(png), "--point", "inception_v3@96:54000:24.1:19.4:29.4:3"]) == 0
    assert png.stat().st_size > 0
    rows = capsys.readouterr().out
    assert "| 28min-levers | densenet121@96 w_product=1.0 |" in rows and "| 30min | densenet121@96 ema_momentum=0.99 |" in rows
    assert "| 30min | densenet121@96 ema_momentum=0.99#trained_weights | ? | 12,000 | 0 | 75.0 [" in rows  # no 30min budgets file
    with pytest.raises(SystemExit):
        table.main([str(out), "--plot", str(png), "--point", "vgg16@96:1000:1:0:2:1"])  # no rate for it


def test_v3_is_v2_with_the_two_changes_round_5_measured():
    """Round 5 measured v3 as v2 with --epochs 14 --set ema_momentum=0.99: the file must be exactly that."""
    from street2shop.config import load_config

    v2, v3 = (load_config(ROOT / "configs" / f"grocery-30min-{v}.toml") for v in ("v2", "v3"))
    assert v3.fit.epochs == 14 and v3.fit.ema_momentum == 0.99
    assert v3.data.pairs_per_epoch * v3.fit.epochs == 28_672
    assert v3 == v2.replace(epochs=14, ema_momentum=0.99)


def test_compare_runs_reads_a_condition_of_a_views_file(tmp_path, capsys):
    compare = load_tool("compare_runs")
    old, new = tmp_path / "old" / "views.json", tmp_path / "new" / "views.json"
    for path, ranks in ((old, {"0": [1, 9], "1": [9, 9]}), (new, {"0": [1, 1], "1": [1, 9]})):
        path.parent.mkdir()
        path.write_text(json.dumps({"runs": {seed: {"none": {"ranks": [9, 9]}, "tta-flip-crops": {"ranks": r}} for seed, r in ranks.items()}}))
    assert compare.main([f"{old}#tta-flip-crops", f"{new}#tta-flip-crops"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| new/views.json#tta-flip-crops"))
    assert row.split("|")[5].strip() == "0: +50.0, 1: +50.0"  # each seed: one query more of two right first
    with pytest.raises(SystemExit, match="it has: none, tta-flip-crops"):
        compare.main([f"{old}#tta-flip", f"{new}#tta-flip-crops"])


def test_proxies_are_the_product_heads_class_vectors_of_each_product(synth_dataset, tmp_path):
    import numpy as np

    from street2shop.compile import build_model
    from street2shop.config import save_config
    from street2shop.data.records import read_manifest_csv
    from tests.test_train import tiny_config

    views = load_tool("bench_views")
    assert views.parse("proxies+tta-flip") == (0, "flip", "proxies", None)
    config = tiny_config(synth_dataset, tmp_path, w_product=0.5)
    save_config(config, tmp_path / "config.toml")
    # Training's classes, by hand: the products with a street photo in the train split (and a shop photo), sorted.
    records = read_manifest_csv(synth_dataset).records
    products = sorted({r.product_id for r in records if r.domain == "street" and r.split == "train"})
    model = build_model(config, len(products))
    kernel = np.random.default_rng(0).normal(size=(8, len(products))).astype("float32")
    model.get_layer("classifier").set_weights([kernel])
    vectors, ids = views.product_proxies(model, tmp_path)
    assert ids == products
    np.testing.assert_allclose(vectors, (kernel / np.linalg.norm(kernel, axis=0)).T, rtol=1e-6)
    save_config(config.replace(w_product=0.0), tmp_path / "config.toml")
    with pytest.raises(SystemExit, match="without the product softmax"):
        views.product_proxies(model, tmp_path)


def test_pooled_is_the_backbones_mean_feature_normalised():
    import keras
    import numpy as np

    from street2shop.model.tower import build_tower

    views = load_tool("bench_views")
    assert views.parse("pooled+tta-flip-crops") == (0, "flip-crops", False, "pooled")
    with pytest.raises(SystemExit, match="embedding's space"):
        views.parse("pooled+proxies")
    tower = build_tower("tiny_cnn", image_size=32, embedding_dim=4)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    features = tower.get_layer("backbone")(tower.get_layer("preprocess")(pixels), training=False).numpy()  # [2, 2, 2, 128]
    mean = features.mean(axis=(1, 2))
    pooled = views.pooled_tower(tower)
    assert isinstance(pooled, keras.Model) and pooled.outputs[0].shape[-1] == 128
    np.testing.assert_allclose(pooled(pixels, training=False), mean / np.linalg.norm(mean, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", sorted((ROOT / "bench-results").rglob("result-*.json")), ids=lambda p: str(p.relative_to(ROOT)))
def test_kept_results_hold_the_ranks_their_figures_came_from(path):
    """A kept result is what paired comparisons read later: its ranks (1 = right first) must give its own top-k."""
    result = json.loads(path.read_text())
    ranks = result["ranks"]
    assert len(ranks) == result["queries"] and all(isinstance(r, int) and r >= 1 for r in ranks)
    for k, value in result["top_k"].items():
        assert sum(r <= int(k) for r in ranks) / len(ranks) == pytest.approx(value)
    assert (path.parent / "command.json").is_file()


def test_size_n_serves_the_same_weights_at_another_size():
    import keras
    import numpy as np

    from street2shop.model.precision import model_precision, precision_scope
    from street2shop.model.tower import build_tower, tower_spec

    views = load_tool("bench_views")
    keras.utils.set_random_seed(3)
    tower = build_tower("tiny_cnn", image_size=32, embedding_dim=8, pooling="max")
    assert views.tower_at_size(tower, 32) is tower
    larger = views.tower_at_size(tower, (48, 40))
    assert tower_spec(larger) == {**tower_spec(tower), "image_size": [48, 40]}
    # The reference: a tower built at 48x40 by hand, given the 32-pixel tower's weights (its own are other random ones).
    reference = build_tower("tiny_cnn", image_size=(48, 40), embedding_dim=8, pooling="max")
    assert not np.allclose(reference.get_layer("projection").get_weights()[0], tower.get_layer("projection").get_weights()[0])
    reference.set_weights(tower.get_weights())
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 48, 40, 3)).astype("float32")
    np.testing.assert_allclose(larger(pixels, training=False), reference(pixels, training=False), atol=1e-6)
    for a, b in zip(larger.get_weights(), tower.get_weights()):
        np.testing.assert_array_equal(a, b)
    # A tower computing in bfloat16 stays so.
    with precision_scope("mixed_bfloat16"):
        low = build_tower("tiny_cnn", image_size=32, embedding_dim=8)
    assert model_precision(views.tower_at_size(low, 64)) == "mixed_bfloat16"


def test_size_n_errors():
    import keras

    from street2shop.errors import ConfigError, ModelError
    from street2shop.model.tower import build_tower

    views = load_tool("bench_views")
    tower = build_tower("tiny_cnn", image_size=32, embedding_dim=4)
    with pytest.raises(ConfigError, match="image_size must be at least"):
        views.tower_at_size(tower, 8)
    inputs = keras.Input((4,))
    with pytest.raises(ModelError, match="not a street2shop tower"):
        views.tower_at_size(keras.Model(inputs, keras.layers.Dense(2)(inputs)), 32)
