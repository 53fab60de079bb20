"""The package's default path end to end with its default backbone, InceptionV3 (the paper's).

The other training tests use ``tiny_cnn`` (their subject is the plumbing); this one trains InceptionV3 at its
smallest size. In a file of its own, so that ``--dist loadfile`` can give its minute and a half to either worker.
"""

from pathlib import Path

import numpy as np
import pytest

from street2shop.data.records import read_manifest_csv
from street2shop.train import train
from tests.test_train import tiny_config


@pytest.mark.slow(minutes=1.5)
def test_the_default_backbone_trains_and_its_best_checkpoint_exports_what_the_tower_computes(synth_dataset, tmp_path):
    # train() -> best.keras -> export -> vectors from photo bytes, against the checkpoint's tower by hand.
    import tensorflow as tf

    from street2shop.data.image import prepare_image
    from street2shop.embedders import LocalEmbedder
    from street2shop.export import export_checkpoint, load_checkpoint
    from street2shop.model.siamese import tower_of

    config = tiny_config(synth_dataset, tmp_path / "run", backbone="inception_v3", image_size=75, epochs=1, val_pairs=0)
    result = train(config, verbose=0)
    card = export_checkpoint(result.best_checkpoint, tmp_path / "exports")
    assert card["backbone"] == "inception_v3" and card["image_size"] == [75, 75] and card["dimension"] == 8
    images = [Path(r.image_path).read_bytes() for r in list(read_manifest_csv(synth_dataset))[:3]]
    tower = tower_of(load_checkpoint(result.best_checkpoint))
    pixels = tf.stack([prepare_image(tf.constant(b), image_size=75)[0] for b in images])
    expected = tower(pixels, training=False).numpy()
    with LocalEmbedder(card["path"]) as embedder:
        got = embedder.embed(images).require()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
