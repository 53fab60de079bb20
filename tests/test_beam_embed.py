"""street2shop beam-embed: the catalogue embedded on Apache Beam (local FnApiRunner; worker processes in one test).

Most tests use the tiny contract SavedModel (tests/serving/conftest.py); the
equality with ``street2shop embed`` and the index comparison use a real
export of a small tiny_cnn tower.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("apache_beam")

from street2shop import beam_embed as be  # noqa: E402
from street2shop.cli import main  # noqa: E402
from street2shop.embeddings import SHARDS_FILE, embedding_folders, load_embeddings, read_embedding_sets  # noqa: E402
from street2shop.errors import ConfigError, DataError, ModelMismatchError  # noqa: E402
from tests.serving.conftest import build_tiny_savedmodel, make_image  # noqa: E402

COLUMNS = "image_path,product_id,domain,split,category,bbox_left,bbox_top,bbox_width,bbox_height,colour\n"


def write_manifest_text(path: Path, rows: list[tuple]) -> Path:
    """A manifest CSV; rows are (image_path, product_id, domain, split, category, box or None, colour)."""
    lines = [COLUMNS]
    for image, product, domain, split, category, box, colour in rows:
        box_text = ",".join(str(v) for v in box) if box else ",,,"
        lines.append(f"{image},{product},{domain},{split},{category},{box_text},{colour}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))
    return path


def write_catalogue(folder: Path, n: int = 10) -> Path:
    """n shop photos of split catalog (PNG and JPEG, two with boxes, one image for two products), and rows beam-embed must leave out."""
    rows = []
    for i in range(n):
        fmt = "JPEG" if i % 2 else "PNG"
        name = f"img/{i:02d}.{fmt.lower()}"
        (folder / "img").mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(make_image(40 + 3 * i, 30 + 2 * i, seed=100 + i, fmt=fmt))
        box = (4, 3, 20, 18) if i in (3, 6) else None
        rows.append((name, f"p{i}", "shop", "catalog", "c" if i % 3 else "d", box, f"colour{i}"))
    rows.append(("img/00.png", "p-twin", "shop", "catalog", "c", None, "same photo - another product"))
    rows.append(("img/01.jpeg", "p1", "street", "catalog", "c", None, "a street photo - not catalogue"))
    rows.append(("img/02.png", "p2", "shop", "other", "c", None, "another split"))
    return write_manifest_text(folder / "manifest.csv", rows)


def by_id(vectors: np.ndarray, items: list[dict]) -> dict[tuple[str, str], np.ndarray]:
    ids = [(item["image_path"], item["product_id"]) for item in items]
    assert len(set(ids)) == len(ids)
    return dict(zip(ids, vectors))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("beam-exports") / "tiny"
    build_tiny_savedmodel(base / "1", seed=0)
    return base


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("beam-exports") / "other"
    build_tiny_savedmodel(base / "1", seed=1)
    return base


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    return write_catalogue(tmp_path_factory.mktemp("catalogue"))


def run(manifest, out, model, **kwargs):
    kwargs.setdefault("shard_rows", 4)
    return be.beam_embed(str(manifest), str(out), model=str(model), split=kwargs.pop("split", "catalog"), **kwargs)


# --------------------------------------------------------------------------- the same vectors as `street2shop embed`


@pytest.fixture(scope="module")
def model_export(tmp_path_factory) -> Path:
    import keras

    from street2shop.export import export_tower
    from street2shop.model.tower import build_tower

    keras.utils.set_random_seed(0)
    tower = build_tower("tiny_cnn", image_size=(75, 75), embedding_dim=16, weights=None)  # the plumbing is tested, not the backbone
    base = tmp_path_factory.mktemp("model") / "street2shop"
    export_tower(tower, base)
    return base


@pytest.fixture(scope="module")
def both_outputs(catalogue, model_export, tmp_path_factory):
    """`street2shop embed --model` and `street2shop beam-embed` over the same catalogue, through the command line."""
    folder = tmp_path_factory.mktemp("outputs")
    assert main(["embed", str(catalogue), "--split", "catalog", "--model", str(model_export),
                 "--out", str(folder / "embed"), "--batch-size", "4", "--json"]) == 0
    assert main(["beam-embed", str(catalogue), "--split", "catalog", "--model", str(model_export),
                 "--out", str(folder / "beam"), "--shard-rows", "4", "--batch-size", "4",
                 "--runner", "DirectRunner", "--direct_running_mode", "in_memory", "--json"]) == 0
    return folder / "embed", folder / "beam"


def test_every_vector_equals_embeds_with_the_same_ids(both_outputs, catalogue):
    embed_out, beam_out = both_outputs
    expected = by_id(*load_embeddings(embed_out)[:2])
    vectors, items, identity = read_embedding_sets([beam_out])
    got = by_id(vectors, items)
    # 10 shop photos of split catalog + the same photo for a second product; not the street photo, not split "other"
    root = catalogue.parent.resolve()
    wanted = {(str(root / f"img/{i:02d}.{'jpeg' if i % 2 else 'png'}"), f"p{i}") for i in range(10)} | {(str(root / "img/00.png"), "p-twin")}
    assert set(expected) == wanted and set(got) == wanted
    assert [(i["image_path"], i["product_id"]) for i in items] == [(i["image_path"], i["product_id"]) for i in load_embeddings(embed_out)[1]]
    assert len(embedding_folders(beam_out)) == 4  # catalogue rows on lines 2-3, 4-7, 8-11, 12 (line // 4)
    for key in wanted:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5, rtol=0)
    assert np.abs(expected[(str(root / "img/03.jpeg"), "p3")] - expected[(str(root / "img/00.png"), "p0")]).max() > 1e-3  # distinct vectors
    summary = load_embeddings(embed_out)[2]
    assert identity.fingerprint == summary["fingerprint"] and identity.version == summary["version"] == 1
    assert identity.dimension == 16
    # the items carry the manifest's other columns, as embed's do
    labels = {(i["image_path"], i["product_id"]): i.get("labels") for i in items}
    assert labels[(str(root / "img/04.png"), "p4")] == {"colour": "colour4"}


def test_boxes_are_cropped_by_the_model(both_outputs, catalogue, model_export):
    """A boxed row's vector is the embed_boxes answer for its normalised box, not the whole photo's."""
    from street2shop.embedders import LocalEmbedder

    _, beam_out = both_outputs
    got = by_id(*read_embedding_sets([beam_out])[:2])
    path = catalogue.parent.resolve() / "img/03.jpeg"
    with LocalEmbedder(model_export) as embedder:
        whole = embedder.embed([path.read_bytes()]).require()[0]
    assert np.abs(got[(str(path), "p3")] - whole).max() > 1e-4


def test_index_build_over_beam_output_gives_embeds_top_k(both_outputs, tmp_path):
    from street2shop.index import load_index

    embed_out, beam_out = both_outputs
    assert main(["index", "build", str(embed_out), "--out", str(tmp_path / "i1"), "--kind", "exact", "--json"]) == 0
    assert main(["index", "build", str(beam_out), "--out", str(tmp_path / "i2"), "--kind", "annoy", "--json"]) == 0
    a, b = load_index(tmp_path / "i1"), load_index(tmp_path / "i2")
    assert len(a) == len(b) == 11 and a.identity.same_model(b.identity)
    queries = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for q in queries:
        ranked_a = [(h.product_id, round(h.similarity, 4)) for h in a.query(q, k=5)]
        ranked_b = [(h.product_id, round(h.similarity, 4)) for h in b.query(q, k=5)]
        assert ranked_a == ranked_b


def test_beam_embed_into_milvus_gives_the_shards_answers_and_a_failed_run_keeps_the_old_version(tiny, catalogue, tmp_path, capsys, monkeypatch):
    """--to-milvus: the workers upsert each shard into a new collection, published with the run; searched like the shards' index."""
    pytest.importorskip("milvus_lite")
    from street2shop.index import load_index, milvus

    spec = f"milvus:{tmp_path / 'catalogue.db'}#beam"
    try:
        result = run(catalogue, tmp_path / "out", tiny, to_milvus=spec, index_type="FLAT")
        assert result.milvus == {"index": spec, "version": 1, "collection": "beam_v1", "count": 11}
        index = load_index(spec)
        assert main(["index", "build", str(tmp_path / "out"), "--out", str(tmp_path / "exact"), "--kind", "exact", "--json"]) == 0
        exact = load_index(tmp_path / "exact")
        assert index.identity == exact.identity and index.categories() == ["c", "d"]
        # Rows are manifest << 32 | line, in the shards' order: the same answers and ties, rows renumbered.
        assert [it.image_path for it in index.items] == [it.image_path for it in exact.items]
        queries = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
        for q in queries:
            for by_product in (True, False):
                a, b = index.query(q, k=6, by_product=by_product), exact.query(q, k=6, by_product=by_product)
                assert [(h.product_id, h.image_path, h.labels) for h in a] == [(h.product_id, h.image_path, h.labels) for h in b]
                np.testing.assert_allclose([h.similarity for h in a], [h.similarity for h in b], atol=1e-5)
        # `search` opens it with the same --index form as an index base.
        photo = str(catalogue.parent / "img/04.png")
        searched = []
        for where in (spec, str(tmp_path / "exact")):
            capsys.readouterr()
            assert main(["search", photo, "--index", where, "--model", str(tiny), "-k", "3", "--json"]) == 0
            searched.append([(h["product_id"], round(h["similarity"], 5)) for h in json.loads(capsys.readouterr().out)[photo]])
        assert searched[0] == searched[1] and len(searched[0]) == 3
        # A run that embeds nothing drops its collection; the alias still names version 1.
        empty = write_manifest_text(tmp_path / "bad" / "manifest.csv", [("nothing.png", "p", "shop", "catalog", "c", None, "x")])
        (tmp_path / "bad" / "nothing.png").write_bytes(b"")
        with pytest.raises(DataError, match="nothing embedded"):
            run(empty, tmp_path / "out", tiny, to_milvus=spec, index_type="FLAT")
        client = milvus.connect(milvus.parse_target(spec))
        assert client.describe_alias("beam")["collection_name"] == "beam_v1" and "beam_v2" not in client.list_collections()
        # A run interrupted while Milvus publishes (the wait for its index takes hours at 10^8) keeps its published embeddings:
        # the index can be built from them; the alias still names version 1.
        from street2shop.embeddings import read_embedding_sets
        from street2shop.index import milvus_write

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        with monkeypatch.context() as patched:
            patched.setattr(milvus_write, "publish_version", interrupted)
            with pytest.raises(KeyboardInterrupt):
                run(catalogue, tmp_path / "out", tiny, to_milvus=spec, index_type="FLAT")
        assert len(read_embedding_sets([tmp_path / "out"])[1]) == 11
        assert client.describe_alias("beam")["collection_name"] == "beam_v1"
        assert sorted(c for c in client.list_collections() if c.startswith("beam_")) == ["beam_v1"]
        # A Milvus Lite file is one process's: worker processes are refused before anything runs.
        with pytest.raises(ConfigError, match="held by one process"):
            run(catalogue, tmp_path / "out", tiny, to_milvus=spec,
                pipeline_args=["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
    finally:
        milvus.release(milvus.parse_target(spec))


# --------------------------------------------------------------------------- bad images


def bad_corpus(folder: Path) -> tuple[Path, dict[str, tuple[str, str]], list[str]]:
    """Good photos among bad ones; returns the manifest, bad file → (reason pattern, stage), good files."""
    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    bomb = io.BytesIO()
    Image.new("1", (40000, 40000)).save(bomb, format="PNG")
    bad = {
        "empty.jpg": (b"", "empty file", "check"),
        "truncated.jpg": (buffer.getvalue()[: len(buffer.getvalue()) // 2], "the model rejected the image", "model"),
        "text.jpg": (b"hello, this is a text file", "not a JPEG, PNG, GIF or BMP", "check"),
        "page.png": (b"<!doctype html><html><body>404</body></html>", "not a JPEG, PNG, GIF or BMP", "check"),
        "zeros.bmp": (bytes(2048), "not a JPEG, PNG, GIF or BMP", "check"),
        "bomb.png": (bomb.getvalue(), "too large to decode safely", "check"),
    }
    for name, (data, _, _) in bad.items():
        (folder / name).write_bytes(data)
    good = [f"good{i}.{'jpg' if i % 2 else 'png'}" for i in range(7)]
    for i, name in enumerate(good):
        (folder / name).write_bytes(make_image(12 + i, 9 + i, seed=i, fmt="JPEG" if i % 2 else "PNG"))
    # the truncated JPEG sits between good ones, so it shares their batch
    order = [good[0], good[1], "empty.jpg", good[2], "truncated.jpg", good[3], "text.jpg", "page.png", good[4],
             "zeros.bmp", "bomb.png", good[5], "missing.jpg", good[6]]
    rows = [(name, f"p-{name}", "shop", "catalog", "c", None, "x") for name in order]
    rows.append((good[6], "p-boxed-outside", "shop", "catalog", "c", (500, 500, 10, 10), "x"))
    expected = {name: (reason, stage) for name, (_, reason, stage) in bad.items()}
    expected["missing.jpg"] = ("cannot read", "read")
    return write_manifest_text(folder / "manifest.csv", rows), expected, good


def test_bad_images_land_in_the_dead_letter_with_reasons_and_every_good_one_is_embedded(tiny, tmp_path):
    from street2shop.embedders import LocalEmbedder

    manifest, expected, good = bad_corpus(tmp_path / "corpus")
    result = run(manifest, tmp_path / "out", tiny, batch_size=4)
    root = manifest.parent.resolve()
    assert result.embedded == len(good) and result.dead_letter == len(expected) + 1
    vectors, items, _ = read_embedding_sets([tmp_path / "out"])
    got = by_id(vectors, items)
    assert set(got) == {(str(root / name), f"p-{name}") for name in good}
    with LocalEmbedder(tiny) as embedder:
        reference = embedder.embed([(root / name).read_bytes() for name in good]).require()
    for name, vector in zip(good, reference):
        np.testing.assert_allclose(got[(str(root / name), f"p-{name}")], vector, atol=1e-6)
    letters = [json.loads(line) for folder in embedding_folders(tmp_path / "out")
               for line in (folder / be.DEAD_LETTER_FILE).read_text().splitlines()]
    found = {Path(letter["image_path"]).name: letter for letter in letters if letter["product_id"] != "p-boxed-outside"}
    assert set(found) == set(expected)
    for name, (reason, stage) in expected.items():
        assert reason in found[name]["reason"] and found[name]["stage"] == stage, (name, found[name])
        assert found[name]["product_id"] == f"p-{name}" and found[name]["labels"] == {"colour": "x"}
    outside = [letter for letter in letters if letter["product_id"] == "p-boxed-outside"]
    assert len(outside) == 1 and "lies outside" in outside[0]["reason"]
    # embed.json of each shard lists its skipped images with the reasons, as embed's does
    skipped = {Path(p).name: why for folder in embedding_folders(tmp_path / "out")
               for p, why in json.loads((folder / "embed.json").read_text())["skipped"].items()}
    assert set(skipped) >= set(expected) and "empty file" in skipped["empty.jpg"]


def test_a_batch_the_model_rejects_is_retried_image_by_image(tiny):
    """The handler alone: [good, truncated, good] gives two vectors (as the good ones alone give) and one rejection."""
    from street2shop.embedders import load_savedmodel

    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    good = [make_image(10, 8, seed=1), make_image(9, 12, seed=2, fmt="JPEG")]
    handler = be.SavedModelHandler(str(tiny / "1"), batch_size=8)
    model = load_savedmodel(str(tiny / "1"))
    results = list(handler.run_inference([(good[0], None), (buffer.getvalue()[:300], None), (good[1], (0.0, 0.0, 0.5, 0.5))], model))
    assert isinstance(results[1].inference, be.Rejected) and "rejected" in results[1].inference.reason
    alone = list(handler.run_inference([(good[0], None)], model)) + list(handler.run_inference([(good[1], (0.0, 0.0, 0.5, 0.5))], model))
    for got, want in zip((results[0], results[2]), alone):
        np.testing.assert_allclose(got.inference, want.inference, atol=1e-6)
        assert got.model_id == "tiny-seed-0"
    assert results[0].example == (good[0], None)


def test_customer_photos_are_references_as_embed_selects_them_and_counted(tiny, catalogue, tmp_path, caplog):
    """--domains shop,street: the rows data.records.catalogue_records selects for `embed`, in its order, each with its domain."""
    from street2shop.data.records import catalogue_records

    result = run(catalogue, tmp_path / "out", tiny, domains="shop,street", reference_splits="catalog")
    _, items, _ = read_embedding_sets([tmp_path / "out"])
    chosen = catalogue_records(catalogue, "catalog", domains="shop,street", reference_splits="catalog")
    assert [(i["image_path"], i["product_id"], i["domain"]) for i in items] == [(r.image_path, r.product_id, r.domain) for r in chosen]
    assert [i["domain"] for i in items].count("street") == 1  # the manifest's one street photo (of split catalog)
    assert result.references == {"shop": 11, "street": 1}
    assert json.loads((tmp_path / "out" / SHARDS_FILE).read_text())["references"] == {"shop": 11, "street": 1}
    # Street photos of a split there is none of: the shop photos are published, and the log says none were embedded.
    with caplog.at_level("WARNING", logger="street2shop.beam_embed"):
        result = run(catalogue, tmp_path / "typo", tiny, domains="shop,street", reference_splits="trian")
    assert result.references == {"shop": 11, "street": 0}
    assert "no street photo of split(s) ['trian']" in caplog.text and "--reference-splits 'trian'" in caplog.text


# --------------------------------------------------------------------------- one run's output, whole


def test_a_rerun_replaces_the_whole_output_and_a_failed_one_keeps_it(tiny, other_tiny, catalogue, tmp_path):
    out = tmp_path / "out"
    first = run(catalogue, out, tiny)
    assert read_embedding_sets([out])[2].fingerprint == "tiny-seed-0"
    second = run(catalogue, out, other_tiny)
    assert second.replaced == first.run and not (out / first.run).exists()
    vectors, items, identity = read_embedding_sets([out])
    assert identity.fingerprint == "tiny-seed-1" and len(items) == 11
    assert sorted(p.name for p in out.iterdir()) == sorted([SHARDS_FILE, second.run])
    # a run that embeds nothing publishes nothing: the previous output stays, and no staging folder is left
    empty = write_manifest_text(tmp_path / "bad" / "manifest.csv", [("nothing.png", "p", "shop", "catalog", "c", None, "x")])
    (tmp_path / "bad" / "nothing.png").write_bytes(b"")
    with pytest.raises(DataError, match="nothing embedded .* empty file .* previous output is kept"):
        run(empty, out, tiny)
    assert sorted(p.name for p in out.iterdir()) == sorted([SHARDS_FILE, second.run])
    assert read_embedding_sets([out])[2].fingerprint == "tiny-seed-1"


class TwoModelsHandler(be.SavedModelHandler):
    """Answers as if batches came from two models (by the first image's size), as a server switching versions would."""

    def run_inference(self, batch, model, inference_args=None):
        results = super().run_inference(batch, model, inference_args)
        return [r._replace(model_id=f"model-{len(r.example[0]) % 2}") for r in results]


def test_a_run_whose_batches_name_two_models_publishes_nothing(tiny, catalogue, tmp_path):
    sizes = {len((catalogue.parent / f"img/{i:02d}.{'jpeg' if i % 2 else 'png'}").read_bytes()) % 2 for i in range(10)}
    assert sizes == {0, 1}  # the catalogue does have photos of both parities
    handler = TwoModelsHandler(str(tiny / "1"), batch_size=1)
    with pytest.raises(ModelMismatchError, match="2 models .*model-0, model-1"):
        run(catalogue, tmp_path / "out", tiny, model_handler=handler)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_outputs_it_does_not_own_are_refused(tiny, catalogue, tmp_path):
    (tmp_path / "embedded").mkdir()
    (tmp_path / "embedded" / "embed.json").write_text("{}")
    with pytest.raises(DataError, match="output of `street2shop embed`"):
        run(catalogue, tmp_path / "embedded", tiny)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a beam-embed output and not empty .*notes.txt"):
        run(catalogue, tmp_path / "busy", tiny)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "busy").iterdir())) == 1


def test_read_embedding_sets_refuses_a_sharded_output_of_another_model(tiny, other_tiny, catalogue, tmp_path):
    run(catalogue, tmp_path / "a", tiny)
    run(catalogue, tmp_path / "b", other_tiny)
    assert len(read_embedding_sets([tmp_path / "a"])[1]) == 11
    with pytest.raises(ModelMismatchError, match="tiny-seed-1"):
        read_embedding_sets([tmp_path / "a", tmp_path / "b"])


# --------------------------------------------------------------------------- manifests


def test_a_glob_of_manifest_shards_each_relative_to_its_own_folder(tiny, tmp_path):
    """Two shards in two folders (one gzipped), each naming images relative to itself."""
    for part in ("north", "south"):
        (tmp_path / part).mkdir()
    (tmp_path / "north" / "a.png").write_bytes(make_image(10, 10, seed=1))
    (tmp_path / "south" / "a.png").write_bytes(make_image(12, 9, seed=2))
    write_manifest_text(tmp_path / "north" / "part-0.csv", [("a.png", "north-a", "shop", "catalog", "c", None, "1")])
    south = write_manifest_text(tmp_path / "south" / "part-1.csv", [("a.png", "south-a", "shop", "catalog", "c", None, "2")])
    with gzip.open(str(south) + ".gz", "wb") as handle:
        handle.write(south.read_bytes())
    south.unlink()
    result = run(str(tmp_path / "*" / "part-*"), tmp_path / "out", tiny)
    vectors, items, _ = read_embedding_sets([tmp_path / "out"])
    assert result.embedded == 2
    assert {(i["image_path"], i["product_id"]) for i in items} == {
        (str((tmp_path / "north" / "a.png").resolve()), "north-a"), (str((tmp_path / "south" / "a.png").resolve()), "south-a")}


def test_bad_manifests_are_clear_errors(tiny, tmp_path):
    with pytest.raises(DataError, match="no manifest matches"):
        run(tmp_path / "none-*.csv", tmp_path / "out", tiny)
    with pytest.raises(DataError, match="is a folder"):
        run(tmp_path, tmp_path / "out", tiny)
    bad = tmp_path / "bad.csv"
    bad.write_text("image_path,product_id,domain,split\na.png,p,kitchen,catalog\n")
    with pytest.raises(DataError, match="bad.csv line 2: domain must be 'street' or 'shop'"):
        run(bad, tmp_path / "out", tiny)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_shards_are_blocks_of_manifest_lines():
    from street2shop.data.records import Record

    record = Record("/x.png", "p", "shop", "catalog")
    assert [be.shard_of(be.Row(0, line, record), 4) for line in (2, 3, 4, 7, 8)] == [(0, 0), (0, 0), (0, 1), (0, 1), (0, 2)]
    assert be.shard_of(be.Row(3, 10, record), 100_000) == (3, 0)
    assert be.shard_name((3, 12)) == "shard-000003-000000012"


# --------------------------------------------------------------------------- options and runners


def test_pipeline_options_refuse_typos_and_bad_values():
    with pytest.raises(ConfigError, match="unknown option.*--direct_num_wrkers"):
        be.pipeline_options("DirectRunner", ["--direct_num_wrkers", "2"])
    with pytest.raises(ConfigError, match="bad value: .*invalid int value: 'manifest.csv'"):
        be.pipeline_options("DirectRunner", ["--direct_num_workers", "manifest.csv"])
    with pytest.raises(ConfigError, match="runs in one process unless --direct_running_mode"):
        be.pipeline_options("DirectRunner", ["--direct_num_workers", "2"])
    options = be.pipeline_options("DataflowRunner", ["--project", "p", "--region", "europe-west1", "--temp_location", "gs://b/t"])
    assert options.get_all_options()["project"] == "p"


def test_the_local_runner_is_fnapi_so_prism_is_never_tried():
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    assert isinstance(be.make_runner(be.pipeline_options("DirectRunner")), FnApiRunner)
    assert be.make_runner(be.pipeline_options("DataflowRunner", ["--project", "p"])) == "DataflowRunner"


def test_cli_passes_beam_options_on_and_refuses_unknown_ones(tiny, catalogue, tmp_path, capsys):
    assert main(["beam-embed", str(catalogue), "--out", str(tmp_path / "o"), "--model", str(tiny),
                 "--direct_num_workers", "2"]) == 2
    assert "--direct_running_mode" in capsys.readouterr().err
    assert main(["beam-embed", str(catalogue), "--out", str(tmp_path / "o"), "--model", str(tiny), "--bogus-flag"]) == 2
    assert "unknown option(s) --bogus_flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # other commands take none
        main(["embed", str(catalogue), "--out", str(tmp_path / "o"), "--bogus-flag"])
    assert "unrecognized arguments: --bogus-flag" in capsys.readouterr().err


class PidRecordingHandler(be.SavedModelHandler):
    """Notes each process that loads the model (a file per load)."""

    def __init__(self, *args, folder: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.folder = folder

    def load_model(self):
        Path(self.folder, f"{os.getpid()}-{os.urandom(4).hex()}").write_text("")
        return super().load_model()


def test_worker_processes_give_the_same_output(tiny, catalogue, tmp_path, capfd):
    """DirectRunner with two worker processes: the model is loaded in the workers (once each), and the output equals one process's.

    And the workers keep TensorFlow's C++ start-up lines (absl's notice, oneDNN, the CUDA probe) off the terminal they share.

    Boxes are left out (crop_to_box=False): the tiny model's two signatures resize differently, so a photo's vector
    would depend on whether a boxed photo shares its batch (a real export runs one function for both).
    """
    single = run(catalogue, tmp_path / "one", tiny, crop_to_box=False)
    loads = tmp_path / "loads"
    loads.mkdir()
    handler = PidRecordingHandler(str(tiny / "1"), batch_size=2, folder=str(loads))
    capfd.readouterr()
    several = run(catalogue, tmp_path / "two", tiny, model_handler=handler, crop_to_box=False,
                  pipeline_args=["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
    err = capfd.readouterr().err
    for line in ("All log messages before absl::InitializeLog()", "oneDNN custom operations", "cuda"):
        assert line not in err, err[-3000:]
    pids = [name.split("-")[0] for name in os.listdir(loads)]
    # two processes, not this one, each loaded the model once (the runner deals the rows out to both)
    assert len(pids) == len(set(pids)) == 2 and str(os.getpid()) not in pids
    a, b = by_id(*read_embedding_sets([tmp_path / "one"])[:2]), by_id(*read_embedding_sets([tmp_path / "two"])[:2])
    assert set(a) == set(b) and single.embedded == several.embedded == 11
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)


def test_the_readme_cluster_commands_parse():
    """The Dataflow and Flink commands in README.md parse: beam-embed's flags, and the rest as Beam's options (not run here)."""
    import re
    import shlex

    from street2shop.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = [" ".join(c.split("\\\n")) for c in re.findall(r"^street2shop beam-embed (?:.*\\\n)*.*$", readme, re.M)]
    runners = set()
    for command in commands:
        argv = shlex.split(command.split("&&")[0])[1:]
        args, extra = build_parser().parse_known_args(argv)
        be.pipeline_options(args.runner, extra)  # raises on an option Beam does not know
        runners.add(args.runner)
    assert {"DirectRunner", "DataflowRunner", "FlinkRunner"} <= runners
