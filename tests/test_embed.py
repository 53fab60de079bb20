import io

import numpy as np
import pytest
from PIL import Image

from street2shop.data.image import Box
from street2shop.data.records import Record
from street2shop.contract import ModelIdentity
from street2shop.embed import embed_catalog
from street2shop.embeddings import load_embeddings
from street2shop.embedders import Embedder
from street2shop.errors import BadRequestError, ModelMismatchError


class FakeEmbedder(Embedder):
    """Embeds an image as its mean colour (unit-normalised) and rejects non-images, like a model would.

    The shared Embedder logic (checks, boxes, isolating a bad image) runs as for a real model.
    """

    def __init__(self, fail_after=None, fingerprint="fake-1"):
        super().__init__(batch_size=64)
        self.calls = 0
        self.images_seen = 0
        self.fail_after = fail_after
        self.fingerprint = fingerprint

    @property
    def dimension(self):
        return 3

    def identity(self):
        return ModelIdentity(self.fingerprint, 1, 3)

    def _embed_batch(self, images, boxes):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # a killed run
        out = []
        for k, data in enumerate(images):
            try:
                image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
            except Exception:
                raise BadRequestError("undecodable image") from None
            if boxes is not None:
                h, w = image.shape[:2]
                y0, x0, y1, x1 = boxes[k]
                image = image[int(round(y0 * h)) : int(round(y1 * h)), int(round(x0 * w)) : int(round(x1 * w))]
            v = image.reshape(-1, 3).mean(0) + 1.0
            out.append(v / np.linalg.norm(v))
        self.images_seen += len(images)
        return np.array(out, np.float32), self.identity()


def catalogue(tmp_path, n=10, bad=()):
    records = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        if i in bad:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(np.full((8, 10, 3), (i * 20, 100, 200), np.uint8)).save(path)
        records.append(Record(str(path), f"p{i // 2}", "shop", "catalog", category="c"))
    return records


def expected(i):
    v = np.array([i * 20, 100, 200], np.float32) + 1.0
    return v / np.linalg.norm(v)


def test_embeds_all_in_order_and_writes_item_table(tmp_path):
    records = catalogue(tmp_path)
    result = embed_catalog(records, FakeEmbedder(), tmp_path / "out", chunk_size=4, batch_size=3)
    np.testing.assert_allclose(result.embeddings, np.stack([expected(i) for i in range(10)]), atol=1e-6)
    emb, items, summary = load_embeddings(tmp_path / "out")
    assert [it["product_id"] for it in items] == [f"p{i // 2}" for i in range(10)]
    assert items[3]["image_path"] == records[3].image_path
    assert summary["fingerprint"] == "fake-1" and summary["embedded"] == 10 and summary["skipped"] == {}
    assert summary["version"] == 1 and summary["dimension"] == 3


def test_bad_image_is_skipped_counted_and_listed(tmp_path):
    records = catalogue(tmp_path, bad=(2,))
    (tmp_path / "img5.png").unlink()  # vanished after listing
    result = embed_catalog(records, FakeEmbedder(), tmp_path / "out", chunk_size=4, batch_size=4)
    assert len(result.embeddings) == 8
    assert set(result.skipped) == {records[2].image_path, records[5].image_path}
    assert [it["image_path"] for it in result.items] == [records[i].image_path for i in range(10) if i not in (2, 5)]
    np.testing.assert_allclose(result.embeddings[2], expected(3), atol=1e-6)


def test_resume_does_not_redo_finished_chunks(tmp_path):
    records = catalogue(tmp_path, n=12)
    killed = FakeEmbedder(fail_after=2)  # chunk_size == batch_size: one call per chunk
    with pytest.raises(KeyboardInterrupt):
        embed_catalog(records, killed, tmp_path / "out", chunk_size=4, batch_size=4, in_flight=1)
    assert len(list((tmp_path / "out" / "chunks").glob("chunk-*.npz"))) == 2
    again = FakeEmbedder()
    result = embed_catalog(records, again, tmp_path / "out", chunk_size=4, batch_size=4)
    assert again.images_seen == 4  # only the third chunk
    assert result.resumed_chunks == 2
    np.testing.assert_allclose(result.embeddings, np.stack([expected(i) for i in range(12)]), atol=1e-6)


def test_boxes_are_normalised_and_cropped(tmp_path):
    path = tmp_path / "two.png"
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, 10:] = (0, 255, 0)
    Image.fromarray(img).save(path)
    records = [Record(str(path), "p", "shop", "catalog", box=Box(10, 0, 10, 10))]
    result = embed_catalog(records, FakeEmbedder(), tmp_path / "out")
    v = np.array([1.0, 256.0, 1.0])
    np.testing.assert_allclose(result.embeddings[0], v / np.linalg.norm(v), atol=1e-6)


def test_refuses_to_mix_runs(tmp_path):
    records = catalogue(tmp_path, n=4)
    embed_catalog(records, FakeEmbedder(), tmp_path / "out")
    other = FakeEmbedder()
    other.fingerprint = "another-model"
    with pytest.raises(ModelMismatchError, match="another model"):
        embed_catalog(records, other, tmp_path / "out")
