"""The embeddings folder and the sharded output (shards.json): what index build reads, without Beam."""

import json

import numpy as np
import pytest

from street2shop.contract import ModelIdentity
from street2shop.embeddings import (
    SHARDS_FILE, embedding_folders, encode_shards, load_embeddings, read_embedding_sets, write_embeddings,
)
from street2shop.errors import DataError, ModelMismatchError

MODEL = ModelIdentity("fp-a", 3, 2)


def sharded(folder, run, parts, identity=MODEL):
    """A sharded output by hand: one embeddings folder per part (rows of [i, 1] unit vectors), and shards.json naming them."""
    names = []
    for k, ids in enumerate(parts):
        vectors = np.array([[i, 1.0] for i in ids], np.float32).reshape(-1, 2)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        write_embeddings(folder / run / f"shard-{k}", vectors, [{"product_id": f"p{i}", "image_path": f"/{i}.jpg"} for i in ids],
                         identity, {})
        names.append(f"{run}/shard-{k}")
    (folder / SHARDS_FILE).write_bytes(encode_shards(run, names, identity, sum(map(len, parts)), 0))
    return folder


def test_a_sharded_output_reads_as_its_shards_in_order(tmp_path):
    out = sharded(tmp_path / "out", "run-1", [[1, 2], [], [3]])
    (tmp_path / "out" / "run-0" / "shard-0").mkdir(parents=True)  # an older or unfinished run: not named, not read
    assert [p.name for p in embedding_folders(out)] == ["shard-0", "shard-1", "shard-2"]
    vectors, items, identity = read_embedding_sets([out])
    assert [i["product_id"] for i in items] == ["p1", "p2", "p3"] and vectors.shape == (3, 2)
    np.testing.assert_allclose(vectors[2], np.array([3, 1]) / np.sqrt(10), rtol=1e-6)
    assert identity == MODEL
    record = json.loads((out / SHARDS_FILE).read_text())
    assert record["run"] == "run-1" and record["fingerprint"] == "fp-a" and record["embedded"] == 3
    assert embedding_folders(out / "run-1" / "shard-0") == [out / "run-1" / "shard-0"]  # a plain folder stands for itself


def test_a_sharded_output_and_a_folder_of_another_model_are_refused(tmp_path):
    out = sharded(tmp_path / "out", "run-1", [[1]])
    write_embeddings(tmp_path / "plain", np.eye(2, dtype=np.float32)[:1], [{"product_id": "q", "image_path": "/q.jpg"}],
                     ModelIdentity("fp-b", 1, 2), {})
    with pytest.raises(ModelMismatchError, match="fp-b"):
        read_embedding_sets([out, tmp_path / "plain"])
    assert load_embeddings(tmp_path / "plain")[2]["fingerprint"] == "fp-b"


def test_a_broken_shards_file_is_a_clear_error(tmp_path):
    (tmp_path / SHARDS_FILE).write_text('{"run": "x"}')
    with pytest.raises(DataError, match="does not name its shards"):
        read_embedding_sets([tmp_path])
    (tmp_path / SHARDS_FILE).write_text("{")
    with pytest.raises(DataError, match="cannot read"):
        embedding_folders(tmp_path)
    (tmp_path / SHARDS_FILE).write_bytes(encode_shards("run-9", ["run-9/shard-0"], MODEL, 1, 0))
    with pytest.raises(DataError, match="not a finished embedding run"):  # a shard it names is gone
        read_embedding_sets([tmp_path])
