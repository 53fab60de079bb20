import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from street2shop.errors import ConfigError, DataError
from street2shop.losses import (
    ContrastiveLoss,
    MaskedSparseCategoricalCrossentropy,
    RobustContrastiveLoss,
    contrastive_loss,
    masked_sparse_categorical_crossentropy,
    robust_contrastive_loss,
    robust_contrastive_terms,
)
from tests.keras_helpers import assert_config_round_trip

# --- plain NumPy references (written from the formulas, not from the code) -------------------


def ref_robust(y, d, margin=1.0, tau=None, nu=None, q=None):
    """Per-pair robust contrastive loss and drop masks, in float64 on float32-rounded distances."""
    y = np.asarray(y, "float64").reshape(-1)
    d = np.asarray(d, "float32").astype("float64").reshape(-1)
    pos = y > 0.5
    threshold = np.inf
    if q is not None:
        pd = np.sort(d[pos])
        k = math.ceil(round(q * len(pd), 9))  # keep the k closest positives
        batch = pd[k] if k < len(pd) else np.inf
        threshold = batch if tau is None else max(float(np.float32(tau)), batch)
    elif tau is not None:
        threshold = float(np.float32(tau))
    pos_drop = pos & (d >= threshold)
    neg_drop = ~pos & (d < nu) if nu is not None else np.zeros_like(pos)
    loss = np.where(pos & ~pos_drop, d**2, 0.0) + np.where(~pos & ~neg_drop, np.maximum(margin - d, 0.0) ** 2, 0.0)
    return loss, pos_drop, neg_drop


def ref_log_softmax(z):
    z = np.asarray(z, "float64")
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_(x):
    return np.asarray(x)


# --- contrastive ------------------------------------------------------------------------------

# distances exactly representable in float32: 0, 0.25, 0.5, 0.75, 1 (= margin), 1.25, 2
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], "float32")
D = np.array([0.0, 0.25, 0.5, 0.75, 0.0, 0.25, 0.5, 1.0, 1.25, 2.0], "float32")


def test_contrastive_by_hand():
    # positives: d²; negatives: (1 - d)² below the margin, 0 at and beyond it
    expected = [0.0, 0.0625, 0.25, 0.5625, 1.0, 0.5625, 0.25, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(np_(contrastive_loss(Y, D)), expected, rtol=1e-6)
    np.testing.assert_allclose(np_(contrastive_loss(Y, D, margin=0.5)), [0.0, 0.0625, 0.25, 0.5625, 0.25, 0.0625, 0.0, 0.0, 0.0, 0.0], rtol=1e-6)


def test_contrastive_vs_reference_on_random_pairs():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64)
    d = rng.uniform(0, 2, 64).astype("float32")
    for m in (0.5, 1.0, 1.5):
        np.testing.assert_allclose(np_(contrastive_loss(y, d, margin=m)), ref_robust(y, d, margin=m)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("y_shape,d_shape", [((10,), (10,)), ((10, 1), (10,)), ((10,), (10, 1)), ((10, 1), (10, 1))])
@pytest.mark.parametrize("y_dtype", ["int32", "int64", "float32"])
def test_shapes_and_label_dtypes(y_shape, d_shape, y_dtype):
    y = Y.astype(y_dtype).reshape(y_shape)
    d = D.reshape(d_shape)
    out = robust_contrastive_loss(y, d, positive_threshold=0.5)
    assert tuple(out.shape) == (10,)
    np.testing.assert_allclose(np_(out), ref_robust(Y, D, tau=0.5)[0], rtol=1e-6)


def test_bad_shape_is_a_data_error():
    with pytest.raises(DataError, match=r"Received: distance.shape=\(2, 2\)"):
        contrastive_loss(np.ones(4), np.ones((2, 2), "float32"))


# --- robust: fixed threshold and floor --------------------------------------------------------


def test_robust_threshold_by_hand_pair_at_threshold_is_dropped():
    loss, pos_drop, neg_drop = robust_contrastive_terms(Y, D, positive_threshold=0.5)
    # positives 0, 0.25 kept; 0.5 (exactly at τ) and 0.75 dropped; negatives as in contrastive
    np.testing.assert_allclose(np_(loss), [0.0, 0.0625, 0.0, 0.0, 1.0, 0.5625, 0.25, 0.0, 0.0, 0.0], rtol=1e-6)
    assert np_(pos_drop).tolist() == [False, False, True, True] + [False] * 6
    assert not np_(neg_drop).any()


def test_robust_floor_by_hand_pair_at_floor_is_kept():
    loss, pos_drop, neg_drop = robust_contrastive_terms(Y, D, negative_floor=0.25)
    # negatives at 0 dropped (d < ν), at 0.25 (exactly ν) kept
    np.testing.assert_allclose(np_(loss), [0.0, 0.0625, 0.25, 0.5625, 0.0, 0.5625, 0.25, 0.0, 0.0, 0.0], rtol=1e-6)
    assert np_(neg_drop).tolist() == [False] * 4 + [True] + [False] * 5
    assert not np_(pos_drop).any()


def test_robust_without_threshold_is_contrastive():
    np.testing.assert_array_equal(np_(robust_contrastive_loss(Y, D)), np_(contrastive_loss(Y, D)))


def test_robust_vs_reference_on_random_pairs():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    d = rng.uniform(0, 2, 200).astype("float32")
    for kwargs in (dict(tau=0.8), dict(tau=0.3, nu=0.2), dict(q=0.9), dict(q=0.7, tau=0.9), dict(q=0.5, nu=0.4, margin=1.5)):
        margin = kwargs.pop("margin", 1.0)
        tau, nu, q = kwargs.get("tau"), kwargs.get("nu"), kwargs.get("q")
        loss, pos_drop, neg_drop = robust_contrastive_terms(y, d, margin, tau, nu, q)
        ref_loss, ref_pos, ref_neg = ref_robust(y, d, margin, tau, nu, q)
        np.testing.assert_allclose(np_(loss), ref_loss, rtol=1e-5, atol=1e-7, err_msg=str(kwargs))
        np.testing.assert_array_equal(np_(pos_drop), ref_pos, err_msg=str(kwargs))
        np.testing.assert_array_equal(np_(neg_drop), ref_neg, err_msg=str(kwargs))


# --- robust: batch quantile ---------------------------------------------------------------------

# ten positives at 0.1 ... 1.0 (shuffled) and three negatives, two of them very close
QY = np.array([1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1], "float32")
QD = np.array([0.7, 0.01, 0.2, 1.0, 0.4, 0.02, 0.1, 0.9, 0.5, 0.3, 1.9, 0.6, 0.8], "float32")


def _dropped_positive_distances(**kwargs):
    _, pos_drop, _ = robust_contrastive_terms(QY, QD, **kwargs)
    return sorted(np.round(QD[np_(pos_drop)].astype("float64"), 3).tolist())


def test_quantile_drops_exactly_the_far_tail():
    assert _dropped_positive_distances(positive_quantile=0.9) == [1.0]  # keep ceil(9.0) = 9
    assert _dropped_positive_distances(positive_quantile=0.8) == [0.9, 1.0]  # keep 8
    assert _dropped_positive_distances(positive_quantile=0.75) == [0.9, 1.0]  # keep ceil(7.5) = 8
    assert _dropped_positive_distances(positive_quantile=0.5) == [0.6, 0.7, 0.8, 0.9, 1.0]
    assert _dropped_positive_distances(positive_quantile=0.05) == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert _dropped_positive_distances(positive_quantile=1.0) == []


def test_quantile_and_threshold_use_the_larger():
    # q = 0.5 alone: τ_batch = 0.6; with τ = 0.75 → max = 0.75; with τ = 0.3 → still 0.6
    assert _dropped_positive_distances(positive_quantile=0.5, positive_threshold=0.75) == [0.8, 0.9, 1.0]
    assert _dropped_positive_distances(positive_quantile=0.5, positive_threshold=0.3) == [0.6, 0.7, 0.8, 0.9, 1.0]


def test_quantile_loss_values_and_small_or_empty_batches():
    loss = np_(robust_contrastive_loss(QY, QD, positive_quantile=0.8))
    np.testing.assert_allclose(loss, ref_robust(QY, QD, q=0.8)[0], rtol=1e-6)
    # the 1.0 and 0.9 positives contribute nothing; the close negatives still pay
    assert loss[3] == 0.0 and loss[7] == 0.0
    assert loss[1] == pytest.approx(0.99**2, rel=1e-5)
    # no positive: nothing dropped, same as contrastive
    y0 = np.zeros(4, "float32")
    d0 = np.array([0.1, 0.5, 0.9, 1.5], "float32")
    np.testing.assert_array_equal(np_(robust_contrastive_loss(y0, d0, positive_quantile=0.5)), np_(contrastive_loss(y0, d0)))
    # 5 positives with q = 0.9: ceil(4.5) = 5 kept, none dropped
    _, pos_drop, _ = robust_contrastive_terms(np.ones(5), [0.1, 0.2, 0.3, 0.4, 0.5], positive_quantile=0.9)
    assert not np_(pos_drop).any()


def test_quantile_in_graph_mode_matches_eager():
    fn = tf.function(lambda y, d: robust_contrastive_terms(y, d, positive_quantile=0.8, negative_floor=0.015))
    loss, pos_drop, neg_drop = fn(tf.constant(QY), tf.constant(QD))
    ref_loss, ref_pos, ref_neg = ref_robust(QY, QD, q=0.8, nu=0.015)
    np.testing.assert_allclose(loss.numpy(), ref_loss, rtol=1e-6)
    np.testing.assert_array_equal(pos_drop.numpy(), ref_pos)
    np.testing.assert_array_equal(neg_drop.numpy(), ref_neg)
    assert ref_neg.sum() == 1  # the negative at 0.01


# --- gradients ------------------------------------------------------------------------------------


def test_gradient_wrt_distances():
    d = tf.Variable(D)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(robust_contrastive_loss(Y, d, positive_threshold=0.5))
    grad = tape.gradient(loss, d).numpy()
    # kept positives: 2d; dropped positives (0.5 = τ, 0.75): exactly 0;
    # negatives: -2(1 - d) inside the margin, exactly 0 at (1.0) and beyond it (1.25, 2.0)
    np.testing.assert_allclose(grad[:2], [0.0, 0.5], rtol=1e-6)
    assert grad[2] == 0.0 and grad[3] == 0.0
    np.testing.assert_allclose(grad[4:7], [-2.0, -1.5, -1.0], rtol=1e-6)
    assert grad[7] == 0.0 and grad[8] == 0.0 and grad[9] == 0.0


def test_gradient_wrt_distances_in_quantile_mode():
    d = tf.Variable(QD)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(robust_contrastive_loss(QY, d, positive_quantile=0.8))
    grad = tape.gradient(loss, d).numpy()
    assert grad[3] == 0.0 and grad[7] == 0.0  # the dropped 1.0 and 0.9
    kept = (QY == 1) & ~np.isin(np.arange(13), [3, 7])
    np.testing.assert_allclose(grad[kept], 2 * QD[kept], rtol=1e-6)
    assert grad[10] == 0.0  # the negative beyond the margin


def test_gradient_wrt_embeddings_is_exactly_zero_for_excluded_pairs():
    rng = np.random.default_rng(2)
    raw = rng.normal(size=(4, 8)).astype("float32")
    a_np = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    noise = rng.normal(size=(4, 8)).astype("float32")
    b = np.stack([
        a_np[0] + 0.05 * noise[0],  # a close positive
        -a_np[1],  # a far positive (d = 2): excluded by τ = 1
        a_np[2] + 0.3 * noise[2],  # a negative inside the margin
        -a_np[3],  # a negative beyond the margin
    ])
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    y = np.array([1, 1, 0, 0], "float32")
    raw_a = tf.Variable(raw)
    with tf.GradientTape() as tape:
        a = tf.math.l2_normalize(raw_a, axis=1)
        d = tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(a - b), axis=1), 1e-12))
        loss = tf.reduce_sum(robust_contrastive_loss(y, d, positive_threshold=1.0))
    d_np = d.numpy()
    assert d_np[0] < 1.0 and d_np[1] > 1.0 and d_np[2] < 1.0 and d_np[3] > 1.0
    grad = tape.gradient(loss, raw_a).numpy()
    assert np.all(grad[1] == 0.0)  # excluded positive
    assert np.all(grad[3] == 0.0)  # negative beyond the margin
    assert np.abs(grad[0]).max() > 0 and np.abs(grad[2]).max() > 0


# --- Loss classes --------------------------------------------------------------------------------


def test_loss_classes_reduce_over_the_batch_with_sample_weights():
    ref = ref_robust(Y, D, tau=0.5)[0]
    loss = RobustContrastiveLoss(positive_threshold=0.5, positive_quantile=None)
    assert float(loss(Y, D)) == pytest.approx(ref.mean(), rel=1e-6)
    w = np.arange(1, 11, dtype="float32") / 4
    # sum_over_batch_size: Σ w·loss / B, dropped pairs still in B
    assert float(loss(Y, D, sample_weight=w)) == pytest.approx((w * ref).sum() / 10, rel=1e-6)
    assert float(loss(Y[:, None], D[:, None], sample_weight=w[:, None])) == pytest.approx((w * ref).sum() / 10, rel=1e-6)
    plain = ContrastiveLoss(margin=0.5)
    assert float(plain(Y, D, sample_weight=w)) == pytest.approx((w * ref_robust(Y, D, margin=0.5)[0]).sum() / 10, rel=1e-6)
    assert float(RobustContrastiveLoss(reduction="sum", positive_quantile=0.8)(QY, QD)) == pytest.approx(ref_robust(QY, QD, q=0.8)[0].sum(), rel=1e-6)


def test_loss_class_defaults_and_config():
    assert RobustContrastiveLoss().get_config() == {
        "name": "robust_contrastive_loss",
        "reduction": "sum_over_batch_size",
        "margin": 1.0,
        "positive_threshold": None,
        "negative_floor": None,
        "positive_quantile": 0.9,
    }
    assert ContrastiveLoss().get_config() == {"name": "contrastive_loss", "reduction": "sum_over_batch_size", "margin": 1.0}
    for loss in (
        ContrastiveLoss(margin=0.7, name="pair"),
        RobustContrastiveLoss(margin=1.2, positive_threshold=0.9, negative_floor=0.1, positive_quantile=0.8, reduction="sum"),
        RobustContrastiveLoss(),
        MaskedSparseCategoricalCrossentropy(),
        MaskedSparseCategoricalCrossentropy(ignore_class=255, name="ce"),
    ):
        clone = assert_config_round_trip(loss)
        assert clone.get_config() == loss.get_config()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(margin=-1), "Received: margin=-1"),
        (dict(margin=0), "Received: margin=0"),
        (dict(margin=True), "Received: margin=True"),
        (dict(margin=float("nan")), "Received: margin=nan"),
        (dict(positive_threshold=0.0), "Received: positive_threshold=0.0"),
        (dict(positive_threshold=2.5), "Received: positive_threshold=2.5"),
        (dict(negative_floor=-0.1), "Received: negative_floor=-0.1"),
        (dict(negative_floor=1.0), "Received: negative_floor=1.0, margin=1.0"),
        (dict(positive_quantile=0.0), "Received: positive_quantile=0.0"),
        (dict(positive_quantile=1.5), "Received: positive_quantile=1.5"),
        (dict(positive_quantile="0.9"), "Received: positive_quantile='0.9'"),
    ],
)
def test_argument_validation(kwargs, message):
    with pytest.raises(ConfigError) as info:
        RobustContrastiveLoss(**kwargs)
    assert str(info.value).endswith(message)
    with pytest.raises(ConfigError):
        robust_contrastive_loss(Y, D, **kwargs)


def test_other_argument_validation():
    with pytest.raises(ConfigError, match="Received: margin=-1$"):
        ContrastiveLoss(margin=-1)
    with pytest.raises(ConfigError, match="Received: ignore_class=None$"):
        MaskedSparseCategoricalCrossentropy(ignore_class=None)
    with pytest.raises(ConfigError, match="Received: from_logits=1$"):
        MaskedSparseCategoricalCrossentropy(from_logits=1)
    with pytest.raises(ValueError, match="reduction"):
        ContrastiveLoss(reduction="average")


# --- masked cross-entropy ---------------------------------------------------------------------------

LOGITS = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 9.0], [1.0, 3.0, 0.0], [0.3, 0.2, 0.1], [-2.0, 1.0, 4.0]], "float32")
LABELS = np.array([0, -1, 1, -1, 2])


def test_masked_ce_per_sample_and_mean_over_labelled_only():
    ls = ref_log_softmax(LOGITS)
    per_sample = np.array([-ls[0, 0], 0.0, -ls[2, 1], 0.0, -ls[4, 2]])
    np.testing.assert_allclose(np_(masked_sparse_categorical_crossentropy(LABELS, LOGITS)), per_sample, rtol=1e-5)
    loss = MaskedSparseCategoricalCrossentropy()
    assert float(loss(LABELS, LOGITS)) == pytest.approx(per_sample.sum() / 3, rel=1e-5)
    assert float(loss(LABELS.astype("float32")[:, None], LOGITS)) == pytest.approx(per_sample.sum() / 3, rel=1e-5)
    w = np.array([2.0, 5.0, 1.0, 7.0, 0.5], "float32")
    assert float(loss(LABELS, LOGITS, sample_weight=w)) == pytest.approx((w * per_sample).sum() / 3, rel=1e-5)
    graph = tf.function(lambda y, z: loss(y, z))
    assert float(graph(tf.constant(LABELS), tf.constant(LOGITS))) == pytest.approx(per_sample.sum() / 3, rel=1e-5)


def test_masked_ce_all_masked_gives_zero_not_nan():
    loss = MaskedSparseCategoricalCrossentropy()
    labels = -np.ones(5, "int32")
    assert float(loss(labels, LOGITS)) == 0.0
    graph = tf.function(lambda y, z: loss(y, z))
    assert float(graph(tf.constant(labels), tf.constant(LOGITS))) == 0.0
    logits = tf.Variable(LOGITS)
    with tf.GradientTape() as tape:
        value = loss(labels, logits)
    grad = tape.gradient(value, logits)
    assert grad is None or np.all(grad.numpy() == 0.0)


def test_masked_ce_gradient_is_zero_for_unlabelled_samples():
    logits = tf.Variable(LOGITS)
    with tf.GradientTape() as tape:
        value = MaskedSparseCategoricalCrossentropy()(LABELS, logits)
    grad = tape.gradient(value, logits).numpy()
    assert np.all(grad[[1, 3]] == 0.0)
    # labelled rows: (softmax - onehot) / n_labelled
    p = np.exp(ref_log_softmax(LOGITS))
    expected0 = (p[0] - np.eye(3)[0]) / 3
    np.testing.assert_allclose(grad[0], expected0, rtol=1e-5, atol=1e-7)


def test_masked_ce_is_keras_builtin_with_ignore_class():
    assert isinstance(MaskedSparseCategoricalCrossentropy(), keras.losses.SparseCategoricalCrossentropy)


@pytest.mark.parametrize("active", [False, True])
def test_inactive_robust_terms_are_the_plain_loss(active):
    y = np.array([1, 1, 1, 1, 0, 0], "float32")
    d = np.array([0.1, 0.4, 0.9, 1.3, 0.2, 0.7], "float32")
    loss, pos_drop, neg_drop = robust_contrastive_terms(y, d, positive_threshold=0.8, negative_floor=0.3, active=active)
    expected = ref_robust(y, d, tau=0.8, nu=0.3) if active else ref_robust(y, d)
    np.testing.assert_allclose(np.asarray(loss), expected[0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(pos_drop), expected[1])
    np.testing.assert_array_equal(np.asarray(neg_drop), expected[2])
    assert np.asarray(pos_drop).any() == active


def test_loss_reads_its_switch_at_run_time_inside_a_compiled_function():
    from street2shop.losses import drop_switch

    loss = RobustContrastiveLoss(positive_threshold=0.8, positive_quantile=None)
    loss.active = drop_switch()
    fn = tf.function(lambda y, d: loss(y, d))
    y, d = np.array([1.0, 1.0, 0.0], "float32"), np.array([0.5, 0.9, 0.3], "float32")
    assert float(fn(y, d)) == pytest.approx((0.25 + 0.81 + 0.49) / 3, rel=1e-6)  # plain: nothing dropped
    loss.active.assign(1.0)
    assert float(fn(y, d)) == pytest.approx((0.25 + 0.0 + 0.49) / 3, rel=1e-6)  # the same trace, now robust
    assert "active" not in loss.get_config()
