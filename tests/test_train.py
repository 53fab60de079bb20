import csv
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from street2shop.config import TrainConfig
from street2shop.data.pairs import PairConfig, PairPlanner
from street2shop.data.pipeline import pair_dataset
from street2shop.data.records import read_manifest_csv
from street2shop.compile import build_model
from street2shop.train import train


def tiny_config(manifest, out, **kw):
    values = dict(
        manifest=str(manifest), output_dir=str(out), backbone="tiny_cnn", weights="none",
        image_size=32, embedding_dim=8, pairs_per_epoch=16, val_pairs=8, batch_size=8, epochs=2,
        learning_rate=1e-3, street_augment=0.0, shop_augment=0.0,
        w_product=0.0,  # pairs only unless a test asks for the product softmax (the default is 0.5)
    )
    values.update(kw)
    return TrainConfig().replace(**values)


def write_auxiliary_set(root, classes=3, per_class=3):
    """A class-per-folder set of random 20x20 PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{k}.png")
    return root


def test_fit_lowers_the_loss_on_fixed_pairs(synth_dataset):
    config = tiny_config(synth_dataset, "unused", learning_rate=3e-3)
    keras.utils.set_random_seed(0)
    records = [r for r in read_manifest_csv(synth_dataset) if r.split in ("train", "catalog")]
    plan = PairPlanner(records, PairConfig(pairs_per_epoch=16, seed=0)).plan(0)
    data = pair_dataset(lambda _e: plan, image_size=32, batch_size=8, epochs=1)
    model = build_model(config, None)
    # The same 16 pairs every epoch, so the epoch losses are comparable. (Training-mode
    # losses: BatchNorm's moving statistics of a from-scratch net lag far behind.)
    history = model.fit(data.repeat(), steps_per_epoch=2, epochs=8, verbose=0).history["loss"]
    assert np.mean(history[-2:]) < np.mean(history[:2])


def test_multitask_run_writes_outputs_and_reports_metrics(synth_dataset, tmp_path):
    aux = write_auxiliary_set(tmp_path / "aux")
    run = tmp_path / "run"
    result = train(tiny_config(synth_dataset, run, epochs=1, auxiliary_dir=str(aux), pairs_per_epoch=24), verbose=0)
    for name in ("config.toml", "best.keras", "last.keras", "log.csv"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    keys = set(result.history)
    assert {"loss", "val_loss", "distance_loss", "logits_a_loss", "logits_b_loss"} <= keys, keys
    for metric in ("positive_drop_rate", "negative_drop_rate", "mean_positive_distance", "mean_negative_distance", "pair_accuracy"):
        assert any(metric in k for k in keys), (metric, keys)
    assert result.num_classes == 3 and result.initial_epoch == 0
    model = keras.saving.load_model(run / "last.keras", compile=False, safe_mode=True)
    assert set(model.output.keys() if isinstance(model.output, dict) else model.output_names) == {"distance", "logits_a", "logits_b"}


def test_classifier_scale_picks_the_head(synth_dataset, tmp_path):
    from street2shop.model.layers import CosineClassifier

    head = build_model(tiny_config(synth_dataset, tmp_path), 5).get_layer("classifier")
    assert isinstance(head, CosineClassifier) and head.scale == 16.0 and head.units == 5  # the default
    head = build_model(tiny_config(synth_dataset, tmp_path, classifier_scale=0.0), 5).get_layer("classifier")
    assert type(head) is keras.layers.Dense and head.units == 5


@pytest.mark.parametrize("with_auxiliary", [False, True])
def test_product_softmax_adds_one_class_per_training_product(synth_dataset, tmp_path, with_auxiliary):
    # A catalogue-only product (a shop photo, no street photo in the training split) and a street-only
    # one (no shop photo: no pair is ever drawn for it) get no class.
    with open(synth_dataset) as f:
        rows = list(csv.DictReader(f))
    products = {row["product_id"] for row in rows if row["split"] == "train" and row["domain"] == "street"}
    extra_rows = [dict(next(row for row in rows if row["domain"] == "shop"), product_id="catalogue_only"),
                  dict(next(row for row in rows if row["split"] == "train"), product_id="street_only")]
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows + extra_rows:
            writer.writerow(dict(row, image_path=str(synth_dataset.parent / row["image_path"])))
    extra = {}
    if with_auxiliary:
        extra["auxiliary_dir"] = str(write_auxiliary_set(tmp_path / "aux"))
    config = tiny_config(manifest, tmp_path / "run", epochs=1, pairs_per_epoch=24, w_product=0.5, **extra)
    result = train(config, verbose=0)
    expected = len(products) + (3 if with_auxiliary else 0)
    assert len(products) == 6 and result.num_classes == expected
    assert result.model.get_layer("classifier").units == expected
    for key in ("logits_a_loss", "logits_b_loss", "logits_a_accuracy"):
        assert np.isfinite(result.history[key][0]), key
    # Product images carry labels: with no auxiliary set, only they can give the softmax a (positive) loss.
    assert result.history["logits_a_loss"][0] > 0.1 and result.history["logits_b_loss"][0] > 0.1


def test_mirrored_strategy_over_two_logical_cpus_trains_a_step(synth_dataset, tmp_path):
    script = textwrap.dedent(
        f"""
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from street2shop.config import TrainConfig
        from street2shop.train import train
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        config = TrainConfig().replace(
            manifest={str(synth_dataset)!r}, output_dir={str(tmp_path / "run")!r}, backbone="tiny_cnn",
            weights="none", image_size=32, embedding_dim=8, pairs_per_epoch=16, val_pairs=0, batch_size=8, epochs=1)
        result = train(config, strategy=strategy, verbose=0)
        assert strategy.num_replicas_in_sync == 2
        print("REPLICAS", strategy.num_replicas_in_sync, "LOSS", result.history["loss"][-1])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [line for line in proc.stdout.splitlines() if line.startswith("REPLICAS")][0]
    assert line.split()[1] == "2" and np.isfinite(float(line.split()[3]))


def test_cli_bad_value_is_one_line_exit_2(capsys):
    from street2shop.cli import main

    assert main(["train", "--margin", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "street2shop: error: margin must be in (0, 2]. Received: margin=-1.0"
    assert main(["train", "--weights", "none"]) == 2
    assert "manifest is required" in capsys.readouterr().err


def test_total_loss_weights_each_task_as_documented(synth_dataset, tmp_path):
    """Total = mean(w_pair or w_aux · contrastive) + per logits output Σ w·CE / n_labelled (reference in NumPy)."""
    rng = np.random.default_rng(1)
    records = [r for r in read_manifest_csv(synth_dataset) if r.split in ("train", "catalog")]
    products = sorted({r.product_id for r in records if r.domain == "street"})
    aux = [r for r in records if r.domain == "shop"][:4]
    aux_labels = [0, 0, 1, 1]
    config = tiny_config(synth_dataset, tmp_path, loss="contrastive", w_pair=1.0, w_aux=0.5, w_cls=0.25, w_product=2.0)
    planner = PairPlanner(records, PairConfig(pairs_per_epoch=16, seed=3), auxiliary=aux, auxiliary_labels=aux_labels,
                          product_labels={p: 2 + i for i, p in enumerate(products)})
    ds = pair_dataset(planner.plan, image_size=32, batch_size=16, epochs=1, with_classes=True, pair_weights=(1.0, 0.5),
                      class_weights=(2.0, 0.25))
    x, y, w = next(iter(ds))
    model = build_model(config, 2 + len(products))
    model.get_layer("classifier").kernel.assign(rng.normal(size=model.get_layer("classifier").kernel.shape).astype("float32"))
    out = model(x, training=False)
    d = out["distance"].numpy()
    label = y["distance"].numpy()
    contrastive = label * d**2 + (1 - label) * np.maximum(0.0, 1.0 - d) ** 2
    expected = np.mean(w["distance"].numpy() * contrastive)
    for key in ("logits_a", "logits_b"):
        logits = out[key].numpy().astype(np.float64)
        classes = y[key].numpy()
        log_p = logits - logits.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        labelled = classes >= 0
        ce = -log_p[np.arange(len(classes)), np.where(labelled, classes, 0)]
        expected += np.sum((w[key].numpy() * ce)[labelled]) / labelled.sum()
    assert set(np.unique(w["logits_a"].numpy())) == {0.25, 2.0}  # both kinds in the batch
    total = model.evaluate(x, y, sample_weight=w, batch_size=16, verbose=0, return_dict=True)["loss"]
    assert total == pytest.approx(expected, rel=1e-4)


def _corrupted_manifest(synth_dataset, path, relabelled=4):
    """The synthetic manifest with ``relabelled`` training street photos given the next product's label."""
    with open(synth_dataset) as f:
        rows = list(csv.DictReader(f))
    products = sorted({row["product_id"] for row in rows})
    street = [i for i, row in enumerate(rows) if row["split"] == "train" and row["domain"] == "street"]
    for row in rows:
        row["image_path"] = str(synth_dataset.parent / row["image_path"])
        row["true_product_id"] = row["product_id"]
    for i in street[:relabelled]:
        rows[i]["product_id"] = products[(products.index(rows[i]["product_id"]) + 1) % len(products)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_label_noise_metrics_are_logged_only_for_data_with_corruption_flags(synth_dataset, tmp_path):
    from street2shop.compile import build_losses_and_metrics

    noisy = _corrupted_manifest(synth_dataset, tmp_path / "noisy.csv")
    # Pairs only (tiny_config's w_product 0), as in the label-noise benchmark: the metrics' names carry no output prefix.
    result = train(tiny_config(noisy, tmp_path / "noisy", epochs=1, pairs_per_epoch=48, val_pairs=0, positive_quantile=0.5),
                   verbose=0)
    noise_keys = {"mean_clean_positive_distance", "mean_corrupted_positive_distance", "corrupted_positive_auc",
                  "positive_distance_q50", "positive_distance_q60", "positive_distance_q70", "positive_distance_q80",
                  "positive_distance_q90"}
    drop_keys = {"positive_drop_precision", "positive_drop_recall"}
    assert noise_keys | drop_keys <= set(result.history), sorted(result.history)
    with open(tmp_path / "noisy" / "log.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["mean_corrupted_positive_distance"]) > 0  # corrupted positives were drawn and flagged
    assert 0.0 <= float(row["corrupted_positive_auc"]) <= 1.0
    assert float(row["positive_distance_q50"]) <= float(row["positive_distance_q90"])
    # the plain loss drops nothing, so it has no drop precision; clean data gets none of them
    for loss, label_noise, expected in (("contrastive", True, noise_keys), ("robust", False, set()), ("contrastive", False, set())):
        _, _, metric_map = build_losses_and_metrics(tiny_config(synth_dataset, tmp_path, loss=loss), None, label_noise=label_noise)
        assert {m.name for m in metric_map["distance"]} & (noise_keys | drop_keys) == expected, (loss, label_noise)


def test_init_checkpoint_starts_from_another_runs_tower(synth_dataset, tmp_path):
    from street2shop.errors import ConfigError
    from street2shop.model.siamese import load_tower_weights

    keras.utils.set_random_seed(0)
    first = build_model(tiny_config(synth_dataset, tmp_path), 3)  # with a classifier head, which is not taken
    first.save(tmp_path / "first.keras")
    source = [w.copy() for w in first.get_layer("tower").get_weights()]

    class StartingWeights(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.weights = [w.copy() for w in self.model.get_layer("tower").get_weights()]

    seen = StartingWeights()
    config = tiny_config(synth_dataset, tmp_path / "second", epochs=1, val_pairs=0, seed=5,
                         init_checkpoint=str(tmp_path / "first.keras"))
    train(config, verbose=0, extra_callbacks=[seen])
    assert len(seen.weights) == len(source) and all(np.array_equal(a, b) for a, b in zip(seen.weights, source))
    fresh = build_model(tiny_config(synth_dataset, tmp_path, seed=5), None)
    assert not all(np.array_equal(a, b) for a, b in zip(fresh.get_layer("tower").get_weights(), source))
    # a tower of another shape, or no file, is a ConfigError naming the problem
    other = build_model(tiny_config(synth_dataset, tmp_path, embedding_dim=4), None)
    with pytest.raises(ConfigError, match="does not fit"):
        load_tower_weights(other, tmp_path / "first.keras")
    with pytest.raises(ConfigError, match="init_checkpoint not found"):
        load_tower_weights(other, tmp_path / "missing.keras")
