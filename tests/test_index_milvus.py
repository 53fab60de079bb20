"""The Milvus index on Milvus Lite, through pymilvus as a cluster is used: the exact index's answers, versions as aliases,
updates in place, the errors. One Milvus Lite file serves the module; each test has its own index names.

Expected answers come from :class:`ExactIndex` over the same embeddings (the reference) or are worked out by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from street2shop.cli import main  # noqa: E402
from street2shop.contract import ModelIdentity  # noqa: E402
from street2shop.embeddings import write_embeddings  # noqa: E402
from street2shop.errors import ConfigError, DataError, IndexMismatchError, ModelMismatchError, ServerUnavailableError  # noqa: E402
from street2shop.index import ExactIndex, Item, load_index  # noqa: E402
from street2shop.index import milvus as mv  # noqa: E402
from street2shop.index import milvus_write as mw  # noqa: E402

MODEL = ModelIdentity("model-a", 3, 16)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    """One Milvus Lite file for the module (embedded in this process: nothing to start)."""
    path = tmp_path_factory.mktemp("milvus") / "catalogue.db"
    yield str(path)
    mv.release(mv.parse_target(str(path)))


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int = 20) -> np.ndarray:
    centres = unit(rng.standard_normal((clusters, dim)))
    return unit(centres[rng.integers(0, clusters, n)] + 0.5 / math.sqrt(dim) * rng.standard_normal((n, dim)))


def embeddings(folder: Path, vectors: np.ndarray, items: list[Item], identity: ModelIdentity = MODEL) -> Path:
    write_embeddings(folder, vectors, items, ModelIdentity(identity.fingerprint, identity.version, vectors.shape[1]), {})
    return folder


def catalogue(n: int = 300, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, list[Item]]:
    """n images of n // 3 products in three categories (one without), labels; rows 10-12 share a vector (ties)."""
    rng = np.random.default_rng(seed)
    vectors = clustered(rng, n, dim)
    items = [Item(f"p{i % (n // 3)}", f"shop/{i}.jpg", [None, "bags", "shoes"][i % 3], {"product_name": f"Product {i % (n // 3)}"})
             for i in range(n)]
    if n > 12:
        vectors[11] = vectors[12] = vectors[10]  # 10 and 12 one product, 11 another: a tie inside a product and across
        items[12] = Item(items[10].product_id, "shop/12.jpg", items[10].category, dict(items[10].labels))
    return vectors, items


def build(db: str, name: str, folder: Path, vectors: np.ndarray, items: list[Item], **kwargs) -> dict:
    return mw.build_milvus([embeddings(folder, vectors, items)], db, name=name, **kwargs)


def same(a, b):
    """Two answer lists agree on everything a person sees (product, row, image, category, labels), and similarity to 1e-5."""
    assert [(r.rank, r.product_id, r.row, r.image_path, r.category, dict(r.labels)) for r in a] == \
           [(r.rank, r.product_id, r.row, r.image_path, r.category, dict(r.labels)) for r in b]
    assert all(abs(x.similarity - y.similarity) <= 1e-5 for x, y in zip(a, b))


# ----------------------------------------------------------------------------- answers


def test_a_flat_index_answers_what_the_exact_index_answers_ties_filters_and_labels_included(db, tmp_path):
    vectors, items = catalogue()
    built = build(db, "parity", tmp_path / "emb", vectors, items, index_type="FLAT")
    assert (built["version"], built["count"], built["collection"]) == (1, 300, "parity_v1")
    index = load_index(f"milvus:{db}#parity")
    exact = ExactIndex(16, model_fingerprint="model-a")
    exact.add(vectors, items)
    rng = np.random.default_rng(1)
    queries = np.concatenate([vectors[[10, 40]], clustered(rng, 6, 16)])
    for q in queries:
        for k in (1, 5, 20):
            same(index.query(q, k), exact.query(q, k))
            same(index.query(q, k, by_product=False), exact.query(q, k, by_product=False))
        same(index.query(q, 8, category="bags"), exact.query(q, 8, category="bags"))
        same(index.query(q, 8, exclude=["p1", 'p"2\\']), exact.query(q, 8, exclude=["p1", 'p"2\\']))
        same(index.query(q, 8, rerank=False), exact.query(q, 8))  # Milvus's own float32 scores: the same lists here
    for a, b in zip(index.query_batch(queries, 6), exact.query_batch(queries, 6)):
        same(a, b)
    # The tie by hand: rows 10, 11, 12 hold one vector; 10 and 12 are one product, 11 another.
    tied = index.query(vectors[10], 3, by_product=False)
    assert [r.row for r in tied] == [10, 11, 12] and tied[0].similarity == pytest.approx(1.0, abs=1e-6)
    assert [r.row for r in index.query(vectors[10], 2)] == [10, 11]  # each product once, at its lowest row
    assert index.query(queries[0], 3, category="nope") == []
    assert index.categories() == ["bags", "shoes"] and len(index) == 300
    assert index.image_path(items[7].image_id) == "shop/7.jpg" and index.image_path("0" * 16) is None
    assert [it.product_id for it in index.items] == [it.product_id for it in items]


def test_customer_photos_as_references_answer_as_in_the_exact_index_and_each_product_shows_its_catalogue_photo(db, tmp_path):
    # Products p0..p3: p0 and p1 have a catalogue photo and a customer photo; p2 only a customer photo; p3 only a catalogue photo.
    rng = np.random.default_rng(5)
    vectors = unit(rng.standard_normal((6, 16)))
    items = [Item("p0", "street/0.jpg", "bags", domain="street"), Item("p0", "shop/0.jpg", "bags"),
             Item("p1", "shop/1.jpg", "shoes"), Item("p1", "street/1.jpg", "shoes", domain="street"),
             Item("p2", "street/2.jpg", "bags", domain="street"), Item("p3", "shop/3.jpg", "shoes")]
    build(db, "refs", tmp_path / "emb", vectors, items, index_type="FLAT")
    index = load_index(f"milvus:{db}#refs")
    exact = ExactIndex(16, model_fingerprint="model-a")
    exact.add(vectors, items)
    for q in vectors:
        got, want = index.query(q, 4, by_product=False), exact.query(q, 4, by_product=False)
        same(got, want)
        assert [r.domain for r in got] == [r.domain for r in want]
    # By hand: the first shop photo of each product, none for p2; an image of each domain is found, an unknown one is not.
    expected = {"p0": "shop/0.jpg", "p1": "shop/1.jpg", "p3": "shop/3.jpg"}
    for backend in (index, exact):
        assert {p: i.image_path for p, i in backend.catalogue_photos(["p0", "p1", "p2", "p3", "p9"]).items()} == expected
        assert backend.catalogue_photos(["p1"])["p1"].domain == "shop" and backend.catalogue_photos([]) == {}
        assert backend.image_item(items[4].image_id).domain == "street" and backend.image_item(items[5].image_id).domain == "shop"
        assert backend.image_item("0" * 16) is None


def test_a_product_with_more_photos_near_the_query_than_milvus_answers_at_once_leaves_the_answer_complete(db, tmp_path, monkeypatch):
    # Milvus answers at most MAX_LIMIT candidates a call (16384; 64 here): one product's 100 photos fill them all.
    monkeypatch.setattr(mv, "MAX_LIMIT", 64)
    rng = np.random.default_rng(11)
    centre = unit(rng.standard_normal((1, 16)))
    crowd = unit(centre + 0.05 * rng.standard_normal((100, 16)))
    others = unit(rng.standard_normal((20, 16)))
    vectors = np.concatenate([crowd, others])
    items = [Item("crowd", f"shop/c{i}.jpg") for i in range(100)] + [Item(f"p{i}", f"shop/p{i}.jpg") for i in range(20)]
    build(db, "crowd", tmp_path / "emb", vectors, items, index_type="FLAT")
    index = load_index(f"milvus:{db}#crowd")
    exact = ExactIndex(16, model_fingerprint="model-a")
    exact.add(vectors, items)
    got = index.query(centre[0], 10)
    assert len(got) == 10 and [r.rank for r in got] == list(range(1, 11))
    same(got, exact.query(centre[0], 10))


def test_hnsw_recall_at_10_against_exact_search(db, tmp_path):
    rng = np.random.default_rng(2)
    vectors = clustered(rng, 3000, 32, clusters=60)
    items = [Item(f"p{i}", f"shop/{i}.jpg") for i in range(3000)]
    build(db, "recall", tmp_path / "emb", vectors, items, index_type="HNSW")
    index = load_index(f"milvus:{db}#recall")
    exact = ExactIndex(32)
    exact.add(vectors, items)
    queries = clustered(np.random.default_rng(3), 100, 32, clusters=60)
    found = index.query_batch(queries, 10, by_product=False)
    truth = exact.query_batch(queries, 10, by_product=False)
    recall = np.mean([len({r.row for r in a} & {r.row for r in b}) / 10 for a, b in zip(found, truth)])
    assert recall >= 0.95, recall
    assert index.config()["index_type"] == "HNSW" and index.config()["search_params"] == {"ef": 128}


def test_evaluation_through_a_milvus_index_scores_as_through_the_exact_one(db, tmp_path):
    from street2shop.evaluate import evaluate_embeddings

    vectors, items = catalogue(90, seed=4)
    build(db, "evaluated", tmp_path / "emb", vectors, items, index_type="FLAT")
    index = load_index(f"milvus:{db}#evaluated")
    rng = np.random.default_rng(5)
    queries = unit(vectors[:30] + 0.3 * rng.standard_normal((30, 16)).astype(np.float32))
    products = [it.product_id for it in items[:30]]
    gallery = [it.product_id for it in index.items]
    through = evaluate_embeddings(queries, products, None, gallery, index=index)
    reference = evaluate_embeddings(queries, products, vectors, [it.product_id for it in items])
    assert through.metrics == reference.metrics
    assert index.exact().query(queries[0], 5) == reference_index(vectors, items).query(queries[0], 5)


def reference_index(vectors, items):
    exact = ExactIndex(vectors.shape[1], model_fingerprint="model-a", model_version=3)
    exact.add(vectors, items)
    return exact


def test_the_model_identity_is_in_the_collection_and_another_model_is_refused(db, tmp_path):
    from street2shop.search import Searcher

    vectors, items = catalogue(30, seed=6)
    build(db, "identity", tmp_path / "emb", vectors, items, index_type="FLAT")
    index = load_index(f"milvus:{db}#identity")
    assert index.identity == ModelIdentity("model-a", 3, 16)
    index.check_model(ModelIdentity("model-a", 4, 16))  # another version of the same weights is the same model

    class Embedder:
        def __init__(self, identity):
            self._identity = identity

        def identity(self):
            return self._identity

    with pytest.raises(ModelMismatchError, match="model-b"):
        Searcher(index, Embedder(ModelIdentity("model-b", 1, 16)))
    with pytest.raises(ModelMismatchError, match="dimension 8"):
        Searcher(index, Embedder(ModelIdentity("model-a", 3, 8)))
    with pytest.raises(ModelMismatchError):
        load_index(f"milvus:{db}#identity", expected_fingerprint="model-b")
    with pytest.raises(IndexMismatchError, match="dimension 16"):
        index.query(np.ones(8, np.float32))


# ----------------------------------------------------------------------------- versions as aliases


def test_each_build_is_a_new_collection_the_alias_moves_and_old_ones_beyond_keep_go(db, tmp_path):
    vectors, items = catalogue(30, seed=7)
    folder = embeddings(tmp_path / "emb", vectors, items)
    first = mw.build_milvus([folder], f"milvus:{db}#versions", index_type="FLAT")
    v1 = load_index(f"milvus:{db}#versions")
    client = mv.connect(mv.parse_target(db))
    for _ in range(2):
        mw.build_milvus([folder], f"milvus:{db}#versions", index_type="FLAT")
    assert first["version"] == 1 and client.describe_alias("versions")["collection_name"] == "versions_v3"
    assert sorted(c for c in client.list_collections() if c.startswith("versions_")) == ["versions_v2", "versions_v3"]  # keep 2
    assert load_index(f"milvus:{db}#versions").version == 3
    assert load_index(f"milvus:{db}#versions_v2").version == 2  # one version's collection by its own name
    with pytest.raises(DataError, match="versions_v1"):
        v1.query(vectors[0], 3)  # dropped: an index object stays on the version it opened
    with pytest.raises(ConfigError, match="keep must be >= 2"):
        mw.build_milvus([folder], f"milvus:{db}#versions", keep=1)


def test_an_interrupted_build_leaves_the_old_version_serving(db, tmp_path, monkeypatch):
    vectors, items = catalogue(30, seed=8)
    folder = embeddings(tmp_path / "emb", vectors, items)
    mw.build_milvus([folder], f"milvus:{db}#interrupted", index_type="FLAT")
    expected = [r.product_id for r in load_index(f"milvus:{db}#interrupted").query(vectors[0], 5)]
    client = mv.connect(mv.parse_target(db))
    real = mw.write_entities

    def interrupted(*args, **kwargs):
        real(*args, **{**kwargs, "batch": 10})
        raise KeyboardInterrupt

    monkeypatch.setattr(mw, "write_entities", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mw.build_milvus([folder], f"milvus:{db}#interrupted", index_type="FLAT")
    monkeypatch.undo()
    assert client.describe_alias("interrupted")["collection_name"] == "interrupted_v1"
    assert "interrupted_v2" not in client.list_collections()  # its collection is dropped
    assert [r.product_id for r in load_index(f"milvus:{db}#interrupted").query(vectors[0], 5)] == expected
    # A build killed outright leaves an unfinished collection: never aliased, refused by name. The next publish leaves it while
    # it may be another build under way (younger than the grace period), and drops it after.
    version, collection = mw.create_version(client, mv.parse_target(f"milvus:{db}#interrupted"), MODEL, index_type="FLAT")
    with pytest.raises(DataError, match="unfinished build"):
        load_index(f"milvus:{db}#{collection}")
    assert load_index(f"milvus:{db}#interrupted").version == 1
    mw.build_milvus([folder], f"milvus:{db}#interrupted", index_type="FLAT")
    assert collection in client.list_collections() and load_index(f"milvus:{db}#interrupted").version == version + 1
    monkeypatch.setattr(mw, "UNFINISHED_GRACE_HOURS", 0.0)
    mw.build_milvus([folder], f"milvus:{db}#interrupted", index_type="FLAT")
    assert collection not in client.list_collections() and load_index(f"milvus:{db}#interrupted").version == version + 2


def test_a_build_after_a_rollback_keeps_the_version_that_was_live(db, tmp_path):
    vectors, items = catalogue(30, seed=9)
    folder = embeddings(tmp_path / "emb", vectors, items)
    for _ in range(2):
        mw.build_milvus([folder], f"milvus:{db}#rollback", index_type="FLAT")
    client = mv.connect(mv.parse_target(db))
    client.alter_alias("rollback_v1", "rollback")  # the README's rollback: the alias back to version 1
    serving = load_index(f"milvus:{db}#rollback")
    assert serving.version == 1
    mw.build_milvus([folder], f"milvus:{db}#rollback", index_type="FLAT")  # keep 2: v3 and v2, and v1, live until now
    assert sorted(c for c in client.list_collections() if c.startswith("rollback_")) == ["rollback_v1", "rollback_v2", "rollback_v3"]
    assert [r.product_id for r in serving.query(vectors[0], 3)] == [r.product_id for r in load_index(f"milvus:{db}#rollback").query(vectors[0], 3)]


# ----------------------------------------------------------------------------- updates in place


def test_a_refused_update_changes_nothing(db, tmp_path):
    vectors, items = catalogue(30, seed=12)
    build(db, "refused", tmp_path / "emb", vectors, items, index_type="FLAT")
    spec = f"milvus:{db}#refused"
    (tmp_path / "remove.txt").write_text(f"{items[0].product_id}\n")
    too_long = [Item("x" * 5000, "shop/long.jpg")]
    with pytest.raises(DataError, match="longer than 4096 bytes"):
        mw.update_milvus(spec, add=[embeddings(tmp_path / "added", vectors[:1], too_long)], remove=tmp_path / "remove.txt")
    index = load_index(spec)
    assert len(index) == 30 and index.query(vectors[0], 1)[0].product_id == items[0].product_id


def test_updates_upsert_and_delete_in_the_live_collection(db, tmp_path):
    vectors, items = catalogue(30, seed=9)
    build(db, "updates", tmp_path / "emb", vectors, items, index_type="FLAT")
    spec = f"milvus:{db}#updates"
    rng = np.random.default_rng(10)
    new = unit(rng.standard_normal((2, 16)))
    added = [Item("brand-new", "shop/new.jpg", "hats", {"product_name": "Brand new"}),
             Item(items[4].product_id, items[4].image_path, items[4].category, dict(items[4].labels))]  # a new photo of image 4
    (tmp_path / "remove.txt").write_text(f"# gone\n{items[0].product_id}\n{items[5].image_path}\n{items[7].image_id}\n")
    result = mw.update_milvus(spec, add=[embeddings(tmp_path / "added", new, added)], remove=tmp_path / "remove.txt")
    # p0 has images 0, 10, 12, 20 (catalogue() gives 12 to 10's product); plus image 5 by path and image 7 by id:
    # 6 entities gone; 1 new, 1 replaced.
    assert (result["added"], result["replaced"], result["removed"]) == (2, 1, {"products": 1, "images": 2, "rows": 6})
    assert result["live_count"] == 30 - 6 + 1 and result["version"] == 1 and result["collection"] == "updates_v1"
    index = load_index(spec)
    assert index.version == 1 and len(index) == 25 and index.categories() == ["bags", "hats", "shoes"]
    top = index.query(new[0], 1)[0]
    assert (top.product_id, top.row, top.labels, round(top.similarity, 5)) == ("brand-new", 30, {"product_name": "Brand new"}, 1.0)
    assert index.query(new[1], 1, by_product=False)[0].row == 31  # the replaced image: its new vector, a new row
    everything = index.query(vectors[0], 25, by_product=False)
    assert items[0].product_id not in {r.product_id for r in everything}  # removed: never comes back
    assert {r.row for r in everything}.isdisjoint({0, 4, 5, 7, 10, 12, 20})
    # What is left answers as an exact index over the same items would.
    live = [i for i in range(30) if i not in (0, 4, 5, 7, 10, 12, 20)]
    reference = ExactIndex(16)
    reference.add(np.concatenate([vectors[live], new]), [items[i] for i in live] + added)
    assert [r.product_id for r in index.query(vectors[3], 10)] == [r.product_id for r in reference.query(vectors[3], 10)]

    (tmp_path / "unknown.txt").write_text("no-such-product\n")
    with pytest.raises(DataError, match="name no product.*no-such-product; nothing was written"):
        mw.update_milvus(spec, remove=tmp_path / "unknown.txt")
    (tmp_path / "all.txt").write_text("".join(f"{p}\n" for p in {it.product_id for it in load_index(spec).items}))
    with pytest.raises(DataError, match="empty; nothing was written"):
        mw.update_milvus(spec, remove=tmp_path / "all.txt")
    assert len(load_index(spec)) == 25
    other = embeddings(tmp_path / "other", unit(rng.standard_normal((1, 8))), [Item("x")], ModelIdentity("model-a", 3, 8))
    with pytest.raises(ModelMismatchError, match="dimension 8"):
        mw.update_milvus(spec, add=[other])
    # Removing the last hat takes its category away.
    (tmp_path / "hats.txt").write_text("brand-new\n")
    mw.update_milvus(spec, remove=tmp_path / "hats.txt")
    assert load_index(spec).categories() == ["bags", "shoes"]


# ----------------------------------------------------------------------------- errors


def test_errors_are_one_line_and_say_what_to_do(db, tmp_path, capsys):
    with pytest.raises(ServerUnavailableError, match="cannot reach Milvus at http://127.0.0.1:1 .*is it running"):
        load_index("milvus:http://127.0.0.1:1#x")
    with pytest.raises(DataError, match=r"no Milvus index 'nothing' .*`street2shop index build EMBEDDINGS --backend milvus"):
        load_index(f"milvus:{db}#nothing")
    client = mv.connect(mv.parse_target(db))
    client.create_collection("foreign", dimension=4)  # a collection another tool made
    with pytest.raises(DataError, match="not a street2shop index"):
        load_index(f"milvus:{db}#foreign")
    vectors, items = catalogue(9, seed=11)
    with pytest.raises(DataError, match="foreign is a collection .* give another --collection"):
        build(db, "foreign", tmp_path / "emb", vectors, items)
    with pytest.raises(ConfigError, match="must end in .db"):
        load_index("milvus:catalogue.sqlite#x")
    with pytest.raises(ConfigError, match="credentials do not go in the URI.*MILVUS_TOKEN"):
        load_index("milvus:http://root:secret@host:19530#x")
    with pytest.raises(ConfigError, match="no query string.*MILVUS_TOKEN"):
        load_index("milvus:http://host:19530?token=root:secret#x")
    with pytest.raises(ConfigError, match="letters, digits and _"):
        load_index(f"milvus:{db}#bad-name")
    with pytest.raises(ConfigError, match="Milvus Lite builds"):
        build(db, "pq", tmp_path / "emb2", vectors, items, index_type="IVF_PQ")
    # The command line: one line, exit code 2, no traceback.
    assert main(["index", "build", str(tmp_path / "emb"), "--backend", "milvus", "--uri", "http://127.0.0.1:1"]) == 2
    assert main(["index", "compact", f"milvus:{db}#x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("street2shop: error: cannot reach Milvus") and "needs no compaction" in err[1]


def test_a_milvus_lite_file_another_process_holds_is_named(tmp_path):
    import fcntl

    path = tmp_path / "held.db"
    path.mkdir()
    with open(path / "LOCK", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the process that has it open holds it
        with pytest.raises(DataError, match=r"open in another process \(Milvus Lite allows one process at a time\): stop that process"):
            load_index(f"milvus:{path}#x")


def test_the_command_line_builds_updates_and_names_the_index_to_search(db, tmp_path, capsys):
    vectors, items = catalogue(15, seed=12)
    folder = embeddings(tmp_path / "emb", vectors, items)
    assert main(["index", "build", str(folder), "--backend", "milvus", "--uri", db, "--collection", "cli",
                 "--index-type", "HNSW", "--index-params", '{"M": 8}', "--search-params", '{"ef": 64}']) == 0
    out = capsys.readouterr().out
    assert out.startswith("built Milvus index version 1 (cli_v1, HNSW) of 15 images of model model-a;")
    assert out.strip().endswith(f"search it with --index milvus:{db}#cli")
    (tmp_path / "remove.txt").write_text(items[0].product_id + "\n")
    assert main(["index", "update", f"milvus:{db}#cli", "--remove", str(tmp_path / "remove.txt")]) == 0
    # p0 has images 0, 5, 10 and 12 (catalogue() gives 12 to 10's product)
    assert "updated in place: 0 images added (0 replacing), 4 removed; 11 in the catalogue" in capsys.readouterr().out
    assert load_index(f"milvus:{db}#cli").config()["search_params"] == {"ef": 64}
    assert main(["index", "build", str(folder), "--backend", "milvus", "--uri", db, "--index-params", "[1]"]) == 2
    assert "--index-params must be a JSON object" in capsys.readouterr().err
    # A flag of the other backend is refused, not ignored.
    assert main(["index", "build", str(folder), "--backend", "milvus", "--uri", db, "--kind", "exact"]) == 2
    assert main(["index", "build", str(folder), "--out", str(tmp_path / "base"), "--collection", "cli"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "--kind belong(s) to the local backend" in err[0] and "--collection belong(s) to the milvus backend" in err[1]
    # beam-embed's Milvus flags without --to-milvus are refused too (before Beam or any model is touched).
    assert main(["beam-embed", str(folder / "manifest.csv"), "--out", str(tmp_path / "b"), "--model", str(tmp_path / "m"),
                 "--keep", "3"]) == 2
    assert "--keep belong(s) to --to-milvus, which was not given" in capsys.readouterr().err


def test_importing_pymilvus_closes_no_handler_of_the_process(tmp_path):
    # pymilvus configures logging when imported, which would close every handler there is (a host application's log
    # file; TensorFlow's absl handler and the stderr it writes to): street2shop imports it leaving them alone.
    import subprocess
    import sys

    code = ("import logging, sys\n"
            f"handler = logging.FileHandler({str(tmp_path / 'app.log')!r}); logging.getLogger().addHandler(handler)\n"
            "from street2shop.index.milvus import pymilvus\n"
            "pymilvus()\n"
            "logging.getLogger().warning('still here')\n"
            "print(handler.stream is not None and not handler.stream.closed, 'pymilvus' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split() == ["True", "True"] and "still here" in (tmp_path / "app.log").read_text()
