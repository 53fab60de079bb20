"""Mixed precision and XLA (``FitConfig.precision``, ``jit_compile``; ``street2shop.model.precision``), checked on a CPU.

The numerics are checked on a tiny tower (two convolutions, a projection,
the package's own ``L2Normalize``) built and compiled by the package's own
code (``precision_scope``, ``build_siamese``, ``compile_model``): these tests
are about the precision plumbing, which is the same for every backbone, and
a tower this small traces in seconds. The whole run (``train``: config to
model, resume, refusal) is in ``tests/test_train_runs.py``.

Tolerances come from the dtypes, not from observed outputs. ``u`` is the
unit roundoff: 2^-8 (bfloat16), 2^-11 (float16), 2^-24 (float32). A mixed
policy rounds each layer's output and each kernel to the low type, and the
kernels accumulate in float32 (oneDNN on CPUs, tensor cores on GPUs); with
layers that keep the scale of their input (Glorot/He initialisation,
BatchNorm), the errors add up, not multiply: the embedding (unit length) is
within ``STAGES·u`` of float32's, where ``STAGES`` counts the roundings of the
tiny tower by hand (see :data:`STAGES`).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from street2shop.compile import compile_model
from street2shop.config import TrainConfig
from street2shop.errors import ConfigError
from street2shop.losses import robust_contrastive_terms
from street2shop.model.layers import L2Normalize
from street2shop.model.precision import UNIT_ROUNDOFF, model_precision, precision_scope, with_precision
from street2shop.model.siamese import build_siamese

SIZE = 16  # pixels; two stride-2 convolutions leave 3x3
MIXED = ("mixed_bfloat16", "mixed_float16")
U = {"mixed_bfloat16": UNIT_ROUNDOFF["bfloat16"], "mixed_float16": UNIT_ROUNDOFF["float16"], "float32": UNIT_ROUNDOFF["float32"]}
# Roundings of the tiny tower's embedding under a mixed policy, one u each: the rescaled input (1); each
# convolution's kernel and output (2 + 2); each BatchNorm's output (1 + 1; it computes in float32 inside);
# the pooled mean (1); the projection's kernel and output (2). L2Normalize computes in float32.
STAGES = 10
# Per pair, |d(loss)/d(distance)| <= 2·max(d, m) <= 4 for d in [0, 2], m = 1, and a distance moves by at most
# the two embeddings' errors: the mean loss moves by at most 4·2·STAGES·u.
LOSS_FACTOR = 4 * 2


def tiny_tower():
    pixels = keras.Input((SIZE, SIZE, 3), name="pixels")
    backbone = keras.Sequential([
        keras.layers.Rescaling(1 / 127.5, offset=-1.0),
        keras.layers.Conv2D(8, 3, strides=2), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Conv2D(16, 3, strides=2), keras.layers.BatchNormalization(), keras.layers.ReLU(),
    ], name="backbone")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(pixels))
    x = keras.layers.Dense(8, name="projection")(x)
    return keras.Model(pixels, L2Normalize(name="embedding")(x), name="tower")


def tiny_siamese(precision, weights):
    with precision_scope(precision):
        model = build_siamese(tiny_tower())
    model.set_weights(weights)
    return model


def config(**kw):
    # 4 steps per epoch (32 pairs, batch 8): a warm-up of 4 steps, then a cosine over 4; the backbone frozen
    # by its learning rate alone (multiplier 0, no weight decay), so the two rates can be told apart.
    values = dict(batch_size=8, pairs_per_epoch=32, epochs=2, learning_rate=1e-2, lr_schedule="cosine", warmup_epochs=1.0,
                  backbone_lr_multiplier=0.0, weight_decay=0.0, w_product=0.0)
    return TrainConfig().replace(**{**values, **kw})


@pytest.fixture(scope="module")
def weights():
    keras.utils.set_random_seed(0)
    with precision_scope("float32"):
        return build_siamese(tiny_tower()).get_weights()


def pairs(labels, seed=0):
    rng = np.random.default_rng(seed)
    n = len(labels)
    x = {"image_a": rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32"),
         "image_b": rng.uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")}
    return x, {"distance": np.asarray(labels, "float32")}


def test_the_scope_builds_under_a_policy_and_gives_the_callers_back(weights):
    keras.config.set_dtype_policy("mixed_float16")  # a user's own setting
    try:
        model = tiny_siamese("mixed_bfloat16", weights)
        assert keras.config.dtype_policy().name == "mixed_float16"
        with pytest.raises(RuntimeError), precision_scope("float32"):
            raise RuntimeError("an error inside")
        assert keras.config.dtype_policy().name == "mixed_float16"
    finally:
        keras.config.set_dtype_policy("float32")
    assert model_precision(model) == "mixed_bfloat16"
    tower = model.get_layer("tower")
    assert tower.get_layer("backbone").layers[1].compute_dtype == "bfloat16"
    assert tower.get_layer("embedding").compute_dtype == "float32"  # pinned
    with pytest.raises(ConfigError, match="precision must be one of"):
        with_precision(tower, "float16")


@pytest.mark.parametrize("precision", MIXED)
def test_a_few_steps_under_a_mixed_policy(weights, precision):
    model = compile_model(tiny_siamese(precision, weights), config(), None)
    scaled = type(model.optimizer).__name__ == "LossScaleOptimizer"
    assert scaled == (precision == "mixed_float16")  # Keras wraps the optimizer for float16 only
    tower = model.get_layer("tower")
    backbone = [v.numpy().copy() for v in tower.get_layer("backbone").trainable_variables]
    projection = tower.get_layer("projection").kernel.numpy().copy()
    x, y = pairs([1, 0] * 4)
    out = model(x)
    assert out["distance"].dtype == "float32" and tower(x["image_a"]).dtype == "float32"
    losses = [model.train_on_batch(x, y, return_dict=True)["loss"] for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    inner = model.optimizer.inner_optimizer if scaled else model.optimizer
    applied = int(inner.iterations.numpy())  # a float16 step whose gradients overflow is skipped and not counted
    assert 1 <= applied <= 3
    assert not np.array_equal(tower.get_layer("projection").kernel.numpy(), projection)  # the head learns
    for before, after in zip(backbone, tower.get_layer("backbone").trainable_variables):
        np.testing.assert_array_equal(after.numpy(), before)  # the backbone's rate is 0 × learning_rate
    # The warm-up by hand: step s (the applied ones) uses peak·(s + 1)/4, so the next one peak·(applied + 1)/4.
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-2 * (applied + 1) / 4, rel=1e-6)


@pytest.mark.parametrize("precision", MIXED)
def test_the_loss_under_a_mixed_policy_is_the_float32_loss_within_the_types_precision(weights, precision):
    # 4 positives: too few for the 0.9 quantile to drop one, so the loss is continuous in the distances.
    x, y = pairs([1, 0] * 4, seed=1)
    reference = compile_model(tiny_siamese("float32", weights), config(), None)
    mixed = compile_model(tiny_siamese(precision, weights), config(), None)
    epsilon = STAGES * U[precision]
    a32, a = (m.get_layer("tower")(x["image_a"], training=False).numpy() for m in (reference, mixed))
    assert np.linalg.norm(a - a32, axis=1).max() <= epsilon
    loss32, loss = (float(m.compute_loss(x, y, m(x, training=False), training=False)) for m in (reference, mixed))
    assert abs(loss - loss32) <= LOSS_FACTOR * epsilon


@pytest.mark.parametrize("precision", MIXED)
def test_an_all_positive_batch_drops_what_float32_drops(weights, precision):
    # 18 positives whose two photos differ by a little noise and 2 whose second photo is the negative of the
    # first: at q = 0.9 the rule keeps the ceil(0.9·20) = 18 closest and drops the 2 far ones.
    rng = np.random.default_rng(2)
    a = rng.uniform(20, 235, (20, SIZE, SIZE, 3)).astype("float32")
    b = np.clip(a + rng.uniform(-8, 8, a.shape), 0, 255).astype("float32")
    b[[5, 13]] = 255.0 - a[[5, 13]]
    x, labels = {"image_a": a, "image_b": b}, np.ones(20, "float32")
    dropped = {}
    for name in ("float32", precision):
        distance = tiny_siamese(name, weights)(x, training=False)["distance"]
        assert distance.dtype == "float32"
        _, positive_dropped, _ = robust_contrastive_terms(labels, distance, positive_quantile=0.9)
        dropped[name] = np.flatnonzero(np.asarray(positive_dropped)).tolist()
        if name == "float32":  # the construction holds: the two far pairs are beyond every near one by more than
            d = np.asarray(distance)  # the mixed distances can move (each by at most 2·STAGES·u)
            assert d[[5, 13]].min() - np.delete(d, [5, 13]).max() > 4 * STAGES * U[precision]
    assert dropped["float32"] == dropped[precision] == [5, 13]


def test_jit_compile_on_trains_to_the_float32_result(weights):
    # SGD, whose update is linear in the gradient (Adam's first step is lr·sign(g), which rounding can flip).
    # XLA fuses and reorders; a length-n sum reordered moves by at most n·u relative, so the forward pass moves
    # by at most the sum of (n + 2)·u over the layers, the two extra for kernel and output: conv 27 + 2,
    # conv 72 + 2, pool 9, projection 16 + 2, BatchNorms and rescaling 3: 133·u. The backward pass as much again.
    tolerance = 2 * 133 * U["float32"]
    x, y = pairs([1, 0] * 4, seed=3)
    runs = {}
    for jit in ("off", "on"):
        model = compile_model(tiny_siamese("float32", weights), config(jit_compile=jit, optimizer="sgd", backbone_lr_multiplier=1.0), None)
        losses = [model.train_on_batch(x, y, return_dict=True)["loss"] for _ in range(3)]
        assert model.jit_compile is (jit == "on")
        runs[jit] = losses, np.concatenate([(w - w0).ravel() for w, w0 in zip(model.get_weights(), weights)])
    np.testing.assert_allclose(runs["on"][0], runs["off"][0], rtol=tolerance)
    # Normwise over all the weights (a convolution's bias before a BatchNorm has a gradient of exactly 0, so its
    # update is rounding noise in both runs: only the whole update has a scale to be relative to).
    on, off = runs["on"][1], runs["off"][1]
    assert np.abs(on - off).max() <= tolerance * np.abs(off).max()


def test_a_float16_run_resumes_its_loss_scale_from_a_backup_and_from_a_checkpoint_loaded_in_its_scope(weights, tmp_path):
    x, y = pairs([1, 0] * 4, seed=4)
    seen = {}

    class Scale(keras.callbacks.Callback):
        """Sets an unusual loss scale at the start (a fresh optimizer starts at 2^15), reads it at each end."""

        def __init__(self, start=None):
            super().__init__()
            self.start = start

        def on_train_begin(self, logs=None):
            if self.start:
                self.model.optimizer.build(self.model.trainable_variables)  # Keras builds it at the first step otherwise
                self.model.optimizer.dynamic_scale.assign(self.start)
            seen["begin"] = (float(self.model.optimizer.dynamic_scale.numpy()), int(self.model.optimizer.iterations.numpy()))

        def on_epoch_end(self, epoch, logs=None):
            seen["end"] = (float(self.model.optimizer.dynamic_scale.numpy()), int(self.model.optimizer.iterations.numpy()))
            raise KeyboardInterrupt  # after the backup, which comes first

    backup = str(tmp_path / "backup")
    model = compile_model(tiny_siamese("mixed_float16", weights), config(), None)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=8, epochs=2, callbacks=[keras.callbacks.BackupAndRestore(backup), Scale(start=2.0**10)], verbose=0)
    assert seen["end"] == (2.0**10, 1)  # one step applied at the scale set
    model.save(tmp_path / "last.keras")

    again = compile_model(tiny_siamese("mixed_float16", weights), config(), None)
    with pytest.raises(KeyboardInterrupt):
        again.fit(x, y, batch_size=8, epochs=2, callbacks=[keras.callbacks.BackupAndRestore(backup), Scale()], verbose=0)
    assert seen["begin"] == (2.0**10, 1)  # restored, not a fresh 2^15 and step 0

    with precision_scope("mixed_float16"):
        loaded = keras.saving.load_model(tmp_path / "last.keras")
    assert type(loaded.optimizer).__name__ == "LossScaleOptimizer"
    assert (float(loaded.optimizer.dynamic_scale.numpy()), int(loaded.optimizer.iterations.numpy())) == (2.0**10, 1)
    assert model_precision(loaded) == "mixed_float16"


def test_the_export_of_a_mixed_run_keeps_the_contract_and_the_float32_vectors(weights, tmp_path):
    import tensorflow as tf

    from street2shop import contract
    from street2shop.data.image import prepare_image
    from street2shop.embedders import TowerEmbedder
    from street2shop.export import export_tower, weights_fingerprint
    from street2shop.model.precision import precision_fingerprint
    from tests.test_export import jpeg

    trained = tiny_siamese("mixed_float16", weights).get_layer("tower")
    twin = tiny_siamese("float32", weights).get_layer("tower")  # the same weights at float32
    # Noise at the tower's own size, so its contrast is of the order of its range: a mixed tower's first rounding
    # is of the pixels' magnitude (bfloat16 at 1.0 after rescaling: 2^-8, half a grey level), so a flat, low-contrast
    # image loses relatively more than STAGES·u (real photos: BENCHMARKS.md measures them).
    images = [jpeg(seed, size=(SIZE, SIZE)) for seed in range(3)]
    expected = twin(tf.stack([prepare_image(tf.constant(b), image_size=SIZE)[0] for b in images]), training=False).numpy()
    base = tmp_path / "exports"
    vectors, cards = {}, {}
    for precision in ("float32", "mixed_bfloat16"):
        folder = export_tower(trained, base, precision=precision)
        cards[precision] = contract.read_card(folder)
        signature = tf.saved_model.load(str(folder)).signatures[contract.SERVING_DEFAULT]
        (_, inputs), outputs = signature.structured_input_signature, signature.structured_outputs
        assert {k: v.dtype for k, v in inputs.items()} == {contract.IMAGE_BYTES: tf.string}
        assert {k: v.dtype for k, v in outputs.items()} == {contract.EMBEDDING: tf.float32, contract.FINGERPRINT: tf.string}
        answer = signature(**{contract.IMAGE_BYTES: tf.constant(images)})
        assert set(answer[contract.FINGERPRINT].numpy().astype(str)) == {cards[precision]["fingerprint"]}
        vectors[precision] = answer[contract.EMBEDDING].numpy()
    # By default the export computes in float32: the float32 vectors, to float32's precision (one rounding per stage).
    assert np.linalg.norm(vectors["float32"] - expected, axis=1).max() <= STAGES * U["float32"]
    assert cards["float32"]["precision"] == "float32"
    assert cards["float32"]["fingerprint"] == weights_fingerprint(trained)  # what a float32 run's export of them says
    # A bfloat16 export: within bfloat16's precision of them, and another model.
    assert np.linalg.norm(vectors["mixed_bfloat16"] - expected, axis=1).max() <= STAGES * U["mixed_bfloat16"]
    assert cards["mixed_bfloat16"]["precision"] == "mixed_bfloat16"
    assert cards["mixed_bfloat16"]["fingerprint"] == precision_fingerprint(weights_fingerprint(trained), "mixed_bfloat16") != cards["float32"]["fingerprint"]
    # The tower in memory embeds as the default export does, and says it is that model.
    embedder = TowerEmbedder(trained)
    assert embedder.identity().fingerprint == cards["float32"]["fingerprint"]
    assert np.linalg.norm(embedder.embed(images).require() - vectors["float32"], axis=1).max() <= STAGES * U["float32"]
