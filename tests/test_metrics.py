import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from street2shop.errors import ConfigError
from street2shop.losses import ContrastiveLoss, MaskedSparseCategoricalCrossentropy, RobustContrastiveLoss
from street2shop.metrics import (
    CorruptedPositiveAUC,
    MaskedSparseCategoricalAccuracy,
    MeanCleanPositiveDistance,
    MeanCorruptedPositiveDistance,
    MeanNegativeDistance,
    MeanPositiveDistance,
    NegativeDropRate,
    PairAccuracy,
    PositiveDistanceQuantile,
    PositiveDropPrecision,
    PositiveDropRate,
    PositiveDropRecall,
)
from street2shop.model.layers import PairDistance
from tests.keras_helpers import assert_config_round_trip
from tests.test_losses import ref_log_softmax, ref_robust

Y = np.array([1, 1, 1, 0, 0, 0], "float32")
D = np.array([0.25, 0.5, 0.75, 0.25, 0.5, 1.5], "float32")


def value(metric):
    return float(metric.result())


# --- by hand ------------------------------------------------------------------------------------------


def test_mean_distances_by_hand_accumulate_and_reset():
    pos, neg = MeanPositiveDistance(), MeanNegativeDistance()
    for m in (pos, neg):
        assert value(m) == 0.0  # nothing seen: 0, not NaN
        m.update_state(Y, D)
    assert value(pos) == pytest.approx(0.5)
    assert value(neg) == pytest.approx(0.75)
    pos.update_state(np.array([1, 0]), np.array([1.5, 0.1], "float32"))  # over the epoch: (1.5 + 1.5) / 4
    assert value(pos) == pytest.approx(0.75)
    pos.reset_state()
    assert value(pos) == 0.0
    neg.update_state(np.ones(2), np.array([0.1, 0.2], "float32"))  # no negative in this batch: unchanged
    assert value(neg) == pytest.approx(0.75)


def test_pair_accuracy_by_hand_pair_at_threshold_is_not_a_match():
    m = PairAccuracy(threshold=0.5)
    m.update_state(Y, D)
    # positives: 0.25 right, 0.5 (at τ: "no match") wrong, 0.75 wrong; negatives: 0.25 wrong, 0.5 right, 1.5 right
    assert value(m) == pytest.approx(3 / 6)
    m2 = PairAccuracy(threshold=0.8)
    m2.update_state(Y[:, None], D[:, None])
    assert value(m2) == pytest.approx(4 / 6)


def test_drop_rates_by_hand():
    pdr = PositiveDropRate(positive_threshold=0.5, positive_quantile=None)
    pdr.update_state(Y, D)
    assert value(pdr) == pytest.approx(2 / 3)  # 0.5 (exactly τ) and 0.75
    ndr = NegativeDropRate(negative_floor=0.5)
    ndr.update_state(Y, D)
    assert value(ndr) == pytest.approx(1 / 3)  # 0.25 < 0.5; 0.5 itself kept
    # quantile: ten positives at 0.1..1.0, q = 0.8 keeps 8 → 2 of 10 dropped; then a batch of
    # 4 positives (ceil(3.2) = 4 kept, none dropped): 2 / 14 over the two batches
    q = PositiveDropRate(positive_quantile=0.8)
    q.update_state(np.ones(10), np.linspace(0.1, 1.0, 10).astype("float32"))
    assert value(q) == pytest.approx(0.2)
    q.update_state(np.ones(4), np.array([0.9, 1.0, 1.1, 1.2], "float32"))
    assert value(q) == pytest.approx(2 / 14)


def test_sample_weights_are_honoured():
    w = np.array([1, 2, 3, 4, 5, 6], "float32")
    m = MeanPositiveDistance()
    m.update_state(Y, D, sample_weight=w)
    assert value(m) == pytest.approx((0.25 * 1 + 0.5 * 2 + 0.75 * 3) / 6)
    acc = PairAccuracy(threshold=0.5)
    acc.update_state(Y, D, sample_weight=w[:, None])
    assert value(acc) == pytest.approx((1 + 5 + 6) / 21)
    pdr = PositiveDropRate(positive_threshold=0.5, positive_quantile=None)
    pdr.update_state(Y, D, sample_weight=w)
    assert value(pdr) == pytest.approx((2 + 3) / 6)


def test_drop_rates_from_loss_agree_with_the_loss():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 40)
    d = rng.uniform(0, 1.6, 40).astype("float32")
    loss = RobustContrastiveLoss(margin=1.2, positive_threshold=0.7, negative_floor=0.3, positive_quantile=0.6)
    pdr, ndr = PositiveDropRate.from_loss(loss), NegativeDropRate.from_loss(loss)
    assert (pdr.positive_threshold, pdr.positive_quantile, ndr.negative_floor) == (0.7, 0.6, 0.3)
    pdr.update_state(y, d)
    ndr.update_state(y, d)
    _, ref_pos, ref_neg = ref_robust(y, d, 1.2, tau=0.7, nu=0.3, q=0.6)
    assert ref_pos.sum() > 0 and ref_neg.sum() > 0
    assert value(pdr) == pytest.approx(ref_pos.sum() / (y == 1).sum())
    assert value(ndr) == pytest.approx(ref_neg.sum() / (y == 0).sum())
    # a plain contrastive loss drops nothing
    plain = PositiveDropRate.from_loss(ContrastiveLoss())
    plain.update_state(y, d)
    assert value(plain) == 0.0


def test_metric_configs_round_trip_and_validation():
    for metric in (
        MeanPositiveDistance(),
        MeanNegativeDistance(name="neg"),
        PairAccuracy(threshold=0.4),
        PositiveDropRate(positive_threshold=0.8, positive_quantile=0.9),
        PositiveDropRate(positive_quantile=None),
        NegativeDropRate(negative_floor=0.2),
        NegativeDropRate(),
        MaskedSparseCategoricalAccuracy(ignore_class=255, name="acc"),
    ):
        clone = assert_config_round_trip(metric)
        assert clone.get_config() == metric.get_config()
    with pytest.raises(ConfigError, match="Received: threshold=0$"):
        PairAccuracy(threshold=0)
    with pytest.raises(ConfigError, match="Received: threshold=None$"):
        PairAccuracy(threshold=None)
    with pytest.raises(ConfigError, match="Received: positive_quantile=1.1$"):
        PositiveDropRate(positive_quantile=1.1)
    with pytest.raises(ConfigError, match="Received: negative_floor=3$"):
        NegativeDropRate(negative_floor=3)


def test_masked_accuracy_counts_labelled_samples_only():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "float32")
    m = MaskedSparseCategoricalAccuracy()
    m.update_state(np.array([-1, -1, -1, -1]), logits)
    assert value(m) == 0.0  # no labelled sample yet: 0, not NaN
    m.update_state(np.array([0, -1, 1, 2]), logits)  # right, ignored, wrong, right
    assert value(m) == pytest.approx(2 / 3)
    m.update_state(np.array([[1.0]]), logits[1:2])  # [B, 1] float labels: right
    assert value(m) == pytest.approx(3 / 4)
    w = MaskedSparseCategoricalAccuracy()
    w.update_state(np.array([0, -1, 1, 2]), logits, sample_weight=np.array([1.0, 9.0, 3.0, 1.0]))
    assert value(w) == pytest.approx(2 / 5)


# --- inside model.fit ------------------------------------------------------------------------------


def _tiny_siamese(num_classes=3):
    a = keras.Input((4,), name="image_a")
    b = keras.Input((4,), name="image_b")
    dense = keras.layers.Dense(8, name="project")
    norm = keras.layers.UnitNormalization(name="l2")
    ea, eb = norm(dense(a)), norm(dense(b))
    classifier = keras.layers.Dense(num_classes, name="classifier")
    outputs = {
        "distance": PairDistance(name="distance")([ea, eb]),
        "logits_a": keras.layers.Identity(name="logits_a")(classifier(ea)),
        "logits_b": keras.layers.Identity(name="logits_b")(classifier(eb)),
    }
    return keras.Model({"image_a": a, "image_b": b}, outputs)


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = {"image_a": rng.normal(size=(n, 4)).astype("float32"), "image_b": rng.normal(size=(n, 4)).astype("float32")}
    y = {
        "distance": (np.arange(n) % 2).astype("float32"),
        "logits_a": np.where(np.arange(n) % 3 == 0, -1, rng.integers(0, 3, n)).astype("int32"),
        "logits_b": np.full(n, -1, "int32"),  # no class at all on this side: must give 0, not NaN
    }
    y["logits_b"][:4] = [0, 1, 2, 0]  # labelled only in the first batch
    sw = {"distance": np.where(np.arange(n) < n // 2, 1.0, 0.5).astype("float32"),
          "logits_a": np.ones(n, "float32"), "logits_b": np.ones(n, "float32")}
    return x, y, sw


def _compile(model, loss, lr):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr),
        loss={"distance": loss, "logits_a": MaskedSparseCategoricalCrossentropy(), "logits_b": MaskedSparseCategoricalCrossentropy()},
        loss_weights={"distance": 1.0, "logits_a": 0.5, "logits_b": 0.5},
        metrics={"distance": [
            MeanPositiveDistance(), MeanNegativeDistance(), PairAccuracy(threshold=0.5),
            PositiveDropRate.from_loss(loss), NegativeDropRate.from_loss(loss),
        ], "logits_a": [MaskedSparseCategoricalAccuracy()], "logits_b": [MaskedSparseCategoricalAccuracy()]},
    )


def test_fit_reports_metrics_equal_to_a_numpy_reference(tmp_path):
    keras.utils.set_random_seed(0)
    model = _tiny_siamese()
    loss = RobustContrastiveLoss(margin=1.0, positive_quantile=0.5, negative_floor=0.4)
    _compile(model, loss, lr=0.0)  # no update: the outputs seen in fit are model(x)
    x, y, sw = _data()
    out = {k: np.asarray(v) for k, v in model(x).items()}
    ds = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(8)
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False).history
    for name in ("distance_mean_positive_distance", "distance_mean_negative_distance", "distance_pair_accuracy",
                 "distance_positive_drop_rate", "distance_negative_drop_rate", "distance_loss", "logits_a_loss", "logits_b_loss", "loss"):
        assert name in history, sorted(history)
        assert np.isfinite(history[name][0]), name
    d, yd, w = out["distance"], y["distance"], sw["distance"]
    pos = yd == 1
    # per-batch robust terms (the quantile is per batch of 8), metrics without sample weights
    batches = [ref_robust(yd[i:i + 8], d[i:i + 8], 1.0, nu=0.4, q=0.5) for i in (0, 8)]
    pos_drop = np.concatenate([b[1] for b in batches])
    neg_drop = np.concatenate([b[2] for b in batches])
    assert pos_drop.sum() > 0
    assert history["distance_positive_drop_rate"][0] == pytest.approx(pos_drop.sum() / pos.sum(), rel=1e-5)
    assert history["distance_negative_drop_rate"][0] == pytest.approx(neg_drop.sum() / (~pos).sum(), rel=1e-5)
    assert history["distance_mean_positive_distance"][0] == pytest.approx(d[pos].mean(), rel=1e-5)
    assert history["distance_mean_negative_distance"][0] == pytest.approx(d[~pos].mean(), rel=1e-5)
    assert history["distance_pair_accuracy"][0] == pytest.approx(np.mean((d < 0.5) == pos), rel=1e-5)
    # the pair loss: Σ w·loss / 8 per batch, averaged over the two batches
    batch_losses = [(w[i:i + 8] * b[0]).sum() / 8 for i, b in zip((0, 8), batches)]
    assert history["distance_loss"][0] == pytest.approx(np.mean(batch_losses), rel=1e-4)
    # masked CE: mean over the labelled images of each batch; a batch without any gives 0
    ce_b = [-(ref_log_softmax(out["logits_b"][:4])[np.arange(4), y["logits_b"][:4]]).mean(), 0.0]
    assert history["logits_b_loss"][0] == pytest.approx(np.mean(ce_b), rel=1e-4)
    labelled = y["logits_a"] >= 0
    expected_acc = np.mean(out["logits_a"][labelled].argmax(-1) == y["logits_a"][labelled])
    assert history["logits_a_accuracy"][0] == pytest.approx(expected_acc, rel=1e-5)


def test_fit_trains_and_compiled_model_round_trips(tmp_path):
    keras.utils.set_random_seed(1)
    model = _tiny_siamese()
    loss = RobustContrastiveLoss()
    _compile(model, loss, lr=0.1)
    x, y, sw = _data(seed=1)
    ds = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(8)
    before = model.get_layer("project").get_weights()[0].copy()
    history = model.fit(ds, epochs=2, verbose=0, shuffle=False).history
    assert all(np.isfinite(v).all() for v in history.values())
    assert not np.allclose(before, model.get_layer("project").get_weights()[0])
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.loss["distance"].get_config() == loss.get_config()
    assert isinstance(loaded.loss["logits_a"], MaskedSparseCategoricalCrossentropy)
    np.testing.assert_allclose(np.asarray(loaded(x)["distance"]), np.asarray(model(x)["distance"]), rtol=1e-6)


def test_drop_warmup_is_the_plain_loss_until_switched_on_and_metrics_follow():
    from street2shop.callbacks import DropWarmup
    from street2shop.losses import drop_switch

    keras.utils.set_random_seed(0)
    model = _tiny_siamese()
    loss = RobustContrastiveLoss(margin=1.0, positive_quantile=0.5, negative_floor=0.4)
    loss.active = drop_switch()
    _compile(model, loss, lr=0.0)  # no update: both epochs see the same distances
    x, y, sw = _data()
    d = np.asarray(model(x)["distance"]).reshape(-1)
    yd, w = y["distance"], sw["distance"]
    ds = tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(8)
    history = model.fit(ds, epochs=3, verbose=0, shuffle=False, validation_data=ds,
                        callbacks=[DropWarmup(loss.active, 2)]).history
    plain = [ref_robust(yd[i:i + 8], d[i:i + 8], 1.0) for i in (0, 8)]
    robust = [ref_robust(yd[i:i + 8], d[i:i + 8], 1.0, nu=0.4, q=0.5) for i in (0, 8)]

    def epoch_loss(batches):
        return np.mean([(w[i:i + 8] * b[0]).sum() / 8 for i, b in zip((0, 8), batches)])

    assert epoch_loss(plain) != pytest.approx(epoch_loss(robust), rel=1e-3)  # the test can tell them apart
    for epoch in (0, 1):
        assert history["distance_loss"][epoch] == pytest.approx(epoch_loss(plain), rel=1e-4)
        assert history["distance_positive_drop_rate"][epoch] == 0.0
        assert history["distance_negative_drop_rate"][epoch] == 0.0
    assert history["distance_loss"][2] == pytest.approx(epoch_loss(robust), rel=1e-4)
    pos_drop = np.concatenate([b[1] for b in robust])
    assert history["distance_positive_drop_rate"][2] == pytest.approx(pos_drop.sum() / (yd == 1).sum(), rel=1e-5)
    # validation runs after the epoch's metrics were reset: a switch tracked by a metric would read 0 here
    assert history["val_distance_positive_drop_rate"][2] == pytest.approx(pos_drop.sum() / (yd == 1).sum(), rel=1e-5)
    assert history["val_distance_positive_drop_rate"][1] == 0.0
    assert float(loss.active.numpy()) == 1.0  # not reset with the metrics at the epoch's start
    assert not any(v is loss.active for m in model.metrics for v in m.variables)  # not a metric's state


def test_drop_rate_metrics_do_not_own_the_loss_switch():
    from street2shop.losses import drop_switch

    loss = RobustContrastiveLoss(positive_quantile=0.5, negative_floor=0.4)
    loss.active = drop_switch(on=True)
    for metric in (PositiveDropRate.from_loss(loss), NegativeDropRate.from_loss(loss)):
        assert metric.active is loss.active
        assert len(metric.variables) == 2  # its own counts only
        metric.reset_state()
        assert float(loss.active.numpy()) == 1.0
        assert "active" not in metric.get_config()


# --- label noise: corrupted positives (label 2) -----------------------------------------------------


def test_a_corrupted_positive_is_a_positive_for_every_loss_and_pair_metric():
    from street2shop.data.pairs import CORRUPTED_POSITIVE

    y1 = np.array([1, 1, 1, 0, 1, 0], "float32")
    y2 = np.where(np.arange(6) % 2 == 0, y1 * CORRUPTED_POSITIVE, y1)  # pairs 0, 2 and 4 flagged
    assert set(y2.tolist()) == {0.0, 1.0, 2.0}
    d = np.array([0.2, 0.9, 0.5, 0.3, 1.1, 1.4], "float32")
    for make in (ContrastiveLoss, lambda: RobustContrastiveLoss(positive_quantile=0.7), lambda: RobustContrastiveLoss(positive_threshold=0.6)):
        assert float(make()(y2, d)) == pytest.approx(float(make()(y1, d)))
    for make in (MeanPositiveDistance, MeanNegativeDistance, PairAccuracy, PositiveDropRate, NegativeDropRate,
                 lambda: NegativeDropRate(negative_floor=0.4)):
        one, two = make(), make()
        one.update_state(y1, d)
        two.update_state(y2, d)
        assert value(two) == pytest.approx(value(one))


def test_drop_precision_and_recall_by_hand():
    y = np.array([1, 1, 1, 1, 2, 2, 0, 0], "float32")
    d = np.array([0.1, 0.2, 0.3, 0.9, 1.0, 0.4, 0.5, 0.5], "float32")
    # fixed τ = 0.35: drops 0.9 (clean), 1.0 and 0.4 (corrupted)
    precision = PositiveDropPrecision(positive_threshold=0.35, positive_quantile=None)
    recall = PositiveDropRecall(positive_threshold=0.35, positive_quantile=None)
    for m in (precision, recall):
        m.update_state(y, d)
    assert value(precision) == pytest.approx(2 / 3) and value(recall) == pytest.approx(2 / 2)
    # quantile 0.75 of 6 positives keeps ceil(4.5) = 5: drops only 1.0 (corrupted)
    precision = PositiveDropPrecision(positive_quantile=0.75)
    recall = PositiveDropRecall(positive_quantile=0.75)
    for m in (precision, recall):
        m.update_state(y, d)
    assert value(precision) == 1.0 and value(recall) == pytest.approx(1 / 2)
    # a second batch, 5 positives: keeps ceil(3.75) = 4, drops 0.8 (clean); the corrupted 0.3 is kept
    y_b = np.array([1, 1, 1, 2, 1], "float32")
    d_b = np.array([0.1, 0.2, 0.8, 0.3, 0.4], "float32")
    for m in (precision, recall):
        m.update_state(y_b, d_b)
    assert value(precision) == pytest.approx(1 / 2) and value(recall) == pytest.approx(1 / 3)
    # without corruption flags both read 0, however much is dropped
    clean = PositiveDropPrecision(positive_quantile=0.5)
    clean.update_state(np.ones(8, "float32"), np.linspace(0.1, 0.8, 8).astype("float32"))
    assert value(clean) == 0.0


def test_drop_precision_and_recall_from_loss_agree_with_the_loss_and_its_switch():
    from street2shop.losses import drop_switch

    rng = np.random.default_rng(7)
    y = rng.choice([0.0, 1.0, 2.0], size=64).astype("float32")
    d = rng.uniform(0, 1.6, 64).astype("float32")
    loss = RobustContrastiveLoss(positive_threshold=0.5, positive_quantile=0.6)
    loss.active = drop_switch(on=False)
    precision, recall = PositiveDropPrecision.from_loss(loss), PositiveDropRecall.from_loss(loss)
    assert (precision.name, recall.name) == ("positive_drop_precision", "positive_drop_recall")
    assert (precision.positive_threshold, precision.positive_quantile) == (0.5, 0.6)
    for m in (precision, recall):
        m.update_state(y, d)
    assert value(precision) == 0.0 and value(recall) == 0.0  # warm-up: nothing dropped
    loss.active.assign(1.0)
    for m in (precision, recall):
        m.reset_state()
        m.update_state(y, d)
    _, dropped, _ = ref_robust((y > 0.5).astype(int), d, 1.0, tau=0.5, q=0.6)
    corrupted = y == 2
    assert dropped.sum() > (dropped & corrupted).sum() > 0
    assert value(precision) == pytest.approx((dropped & corrupted).sum() / dropped.sum())
    assert value(recall) == pytest.approx((dropped & corrupted).sum() / corrupted.sum())


def test_clean_and_corrupted_mean_distances_by_hand():
    y = np.array([1, 2, 1, 2, 0], "float32")
    d = np.array([0.2, 1.0, 0.4, 0.6, 1.5], "float32")
    clean, corrupted = MeanCleanPositiveDistance(), MeanCorruptedPositiveDistance()
    for m in (clean, corrupted):
        m.update_state(y, d)
    assert value(clean) == pytest.approx(0.3) and value(corrupted) == pytest.approx(0.8)
    none = MeanCorruptedPositiveDistance()
    none.update_state(np.ones(3, "float32"), d[:3])
    assert value(none) == 0.0


def test_distance_quantile_by_hand_and_against_numpy():
    m = PositiveDistanceQuantile(0.6, bins=4)  # bins of width 0.5
    assert m.name == "positive_distance_q60" and value(m) == 0.0
    m.update_state(np.array([1, 1, 2, 1, 0], "float32"), np.array([0.1, 0.2, 0.6, 1.2, 0.3], "float32"))
    assert value(m) == pytest.approx(0.7)  # 2.4 of 4 positives: 0.4 of the way through [0.5, 1)
    m.update_state(np.array([1.0], "float32"), np.array([2.0000002], "float32"))  # round-off beyond 2: the last bin
    assert float(m.histogram[0, -1]) == 1.0
    m.reset_state()
    assert value(m) == 0.0
    rng = np.random.default_rng(3)
    d = rng.uniform(0.1, 1.5, 2000).astype("float32")
    for q in (0.5, 0.9):
        m = PositiveDistanceQuantile(q)  # 400 bins: width 0.005
        m.update_state(np.ones(1000, "float32"), d[:1000])
        m.update_state(np.ones(1000, "float32"), d[1000:])
        assert value(m) == pytest.approx(np.quantile(d, q), abs=0.006)


def test_corrupted_positive_auc_by_hand_and_against_pairwise_counts():
    m = CorruptedPositiveAUC(bins=4)
    m.update_state(np.array([1, 1, 2, 2, 0], "float32"), np.array([0.1, 0.6, 0.6, 1.2, 0.0], "float32"))
    assert value(m) == pytest.approx(3.5 / 4)  # (0.6, 0.1) and both of 1.2 farther; (0.6, 0.6) a tie
    rng = np.random.default_rng(5)
    clean, corrupted = rng.uniform(0.0, 1.2, 300), rng.uniform(0.4, 1.6, 200)
    exact = np.mean(corrupted[:, None] > clean[None, :]) + 0.5 * np.mean(corrupted[:, None] == clean[None, :])
    m = CorruptedPositiveAUC()
    m.update_state(np.r_[np.ones(300), np.full(200, 2.0)].astype("float32"), np.r_[clean, corrupted].astype("float32"))
    assert 0.7 < exact < 0.95 and value(m) == pytest.approx(exact, abs=0.005)
    only_clean = CorruptedPositiveAUC()
    only_clean.update_state(np.ones(3, "float32"), np.array([0.1, 0.2, 0.3], "float32"))
    assert value(only_clean) == 0.0


def test_label_noise_metric_configs_round_trip_and_validation():
    for metric in (PositiveDropPrecision(positive_threshold=0.8, positive_quantile=None), PositiveDropRecall(),
                   MeanCleanPositiveDistance(), MeanCorruptedPositiveDistance(name="corr"),
                   PositiveDistanceQuantile(0.8, bins=100), CorruptedPositiveAUC(bins=50)):
        clone = assert_config_round_trip(metric)
        assert clone.get_config() == metric.get_config()
    with pytest.raises(ConfigError, match="Received: quantile=0$"):
        PositiveDistanceQuantile(0)
    with pytest.raises(ConfigError, match="Received: bins=1$"):
        CorruptedPositiveAUC(bins=1)


def test_fit_logs_drop_precision_and_recall_per_epoch_from_the_targets_only():
    keras.utils.set_random_seed(0)
    model = _tiny_siamese()
    loss = RobustContrastiveLoss(margin=1.0, positive_quantile=0.5)
    ce = MaskedSparseCategoricalCrossentropy()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss={"distance": loss, "logits_a": ce, "logits_b": ce},
                  metrics={"distance": [PositiveDropPrecision.from_loss(loss), PositiveDropRecall.from_loss(loss)]})
    x, y, _ = _data()
    yd = y["distance"].copy()
    yd[[1, 5, 7, 13]] = 2.0  # four of the eight positives are known to be corrupted
    d = np.asarray(model(x)["distance"]).reshape(-1)
    history = model.fit(tf.data.Dataset.from_tensor_slices((x, dict(y, distance=yd))).batch(8), epochs=1, verbose=0,
                        shuffle=False).history
    dropped = np.concatenate([ref_robust((yd[i:i + 8] > 0.5).astype(int), d[i:i + 8], 1.0, q=0.5)[1] for i in (0, 8)])
    corrupted = yd == 2
    assert dropped.sum() > (dropped & corrupted).sum() > 0  # neither 0 nor 1: the test can tell
    assert history["distance_positive_drop_precision"][0] == pytest.approx((dropped & corrupted).sum() / dropped.sum())
    assert history["distance_positive_drop_recall"][0] == pytest.approx((dropped & corrupted).sum() / corrupted.sum())
    # the flag is a target, not an input: the same distances whatever the labels
    np.testing.assert_array_equal(np.asarray(model(x)["distance"]).reshape(-1), d)
