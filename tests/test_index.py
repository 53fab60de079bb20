import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

import street2shop
from street2shop.errors import ConfigError, DataError, IndexMismatchError
from street2shop.index import FORMAT_VERSION, CatalogIndex, ExactIndex, Item, SearchResult
from street2shop.index import folder as index_folder

pytest.importorskip("annoy")


def at(degrees: float) -> np.ndarray:
    """A 2-D unit vector at an angle (degrees) from the x axis."""
    radians = math.radians(degrees)
    return np.array([math.cos(radians), math.sin(radians)], np.float32)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def built(vectors, items, **kw) -> CatalogIndex:
    index = CatalogIndex(vectors.shape[1], **kw)
    index.add(vectors, items)
    index.build()
    return index


def answers(results):
    return [(r.rank, r.product_id, r.row, r.similarity) for r in results]


# Items at known angles from the x axis; the query lies on the x axis.
ANGLES = [100.0, 30.0, 180.0, 10.0, 60.0, 0.0]
ANGLE_ITEMS = [Item(f"p{i}", f"img{i}.jpg", "cat") for i in range(len(ANGLES))]
# Worked out by hand: order by angle to the x axis, 0 < 10 < 30 < 60 < 100 < 180 degrees.
EXPECTED_ROWS = [5, 3, 1, 4, 0, 2]
EXPECTED_COS = [1.0, 0.984808, 0.866025, 0.5, -0.173648, -1.0]


@pytest.fixture
def angle_vectors():
    return np.stack([at(a) for a in ANGLES])


@pytest.mark.parametrize("rerank", [True, False])
def test_neighbour_order_and_similarity_on_hand_placed_vectors(angle_vectors, rerank):
    index = built(angle_vectors, ANGLE_ITEMS)
    results = index.query(at(0), k=6, by_product=False, rerank=rerank)
    assert [r.row for r in results] == EXPECTED_ROWS
    assert [r.rank for r in results] == [1, 2, 3, 4, 5, 6]
    assert [r.product_id for r in results] == [f"p{row}" for row in EXPECTED_ROWS]
    np.testing.assert_allclose([r.similarity for r in results], EXPECTED_COS, atol=2e-5)
    assert results[0].image_path == "img5.jpg" and results[0].category == "cat"


def test_exact_index_gives_the_hand_worked_order(angle_vectors):
    exact = ExactIndex(2)
    exact.add(angle_vectors, ANGLE_ITEMS)
    results = exact.query(at(0), k=4, by_product=False)
    assert [r.row for r in results] == EXPECTED_ROWS[:4]
    np.testing.assert_allclose([r.similarity for r in results], EXPECTED_COS[:4], atol=1e-6)


def test_ties_are_broken_by_row_order():
    # Query at 45 degrees: items at 90 and 0 degrees both have cosine cos(45) = 0.70711.
    vectors = np.stack([at(90), at(0), at(200)])
    items = [Item("a"), Item("b"), Item("c")]
    for index in (built(vectors, items), ExactIndex(2)):
        if isinstance(index, ExactIndex):
            index.add(vectors, items)
        results = index.query(at(45), k=3, by_product=False)
        assert [r.row for r in results] == [0, 1, 2]
        np.testing.assert_allclose([r.similarity for r in results[:2]], [math.sqrt(0.5)] * 2, atol=1e-6)


def test_similarity_from_annoy_distance_matches_numpy_cosine():
    rng = np.random.default_rng(1)
    vectors = unit_rows(rng, 300, 16)
    query = unit_rows(rng, 1, 16)[0]
    index = built(vectors, [Item(str(i)) for i in range(300)])
    results = index.query(query, k=10, by_product=False, rerank=False)
    cos = vectors.astype(np.float64) @ query.astype(np.float64)
    np.testing.assert_allclose([r.similarity for r in results], cos[[r.row for r in results]], atol=1e-5)


def test_non_unit_embeddings_are_normalised_with_a_warning(caplog):
    vectors = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
    with caplog.at_level(logging.WARNING, logger="street2shop.index"):
        index = built(vectors, [Item("a"), Item("b")])
    assert "not unit length" in caplog.text
    results = index.query(np.array([10.0, 0.0]), k=2, by_product=False)
    # cos([3,4], [1,0]) = 3/5; cos([0,2], [1,0]) = 0.
    np.testing.assert_allclose([r.similarity for r in results], [0.6, 0.0], atol=1e-6)


def test_product_level_results_show_each_product_once_at_its_best_image():
    # Product A has three images (0, 5 and 12 degrees), B one at 20, C one at 40.
    # Query at 3 degrees: A's best image is the one at 5 (2 degrees away), not 0 (3 away).
    angles = [0, 40, 5, 20, 12]
    products = ["A", "C", "A", "B", "A"]
    vectors = np.stack([at(a) for a in angles])
    items = [Item(p, f"{p}{a}.jpg") for p, a in zip(products, angles)]
    for index in (built(vectors, items), ExactIndex(2)):
        if isinstance(index, ExactIndex):
            index.add(vectors, items)
        by_product = index.query(at(3), k=3)
        assert [(r.product_id, r.row) for r in by_product] == [("A", 2), ("B", 3), ("C", 1)]
        np.testing.assert_allclose([r.similarity for r in by_product], np.cos(np.radians([2, 17, 37])), atol=1e-5)
        assert [r.product_id for r in index.query(at(3), k=2)] == ["A", "B"]
        by_image = index.query(at(3), k=3, by_product=False)
        assert [r.row for r in by_image] == [2, 0, 4]
        assert [r.product_id for r in index.query(at(3), k=2, exclude=["A"])] == ["B", "C"]


def test_product_level_search_fetches_past_many_images_of_one_product():
    # 60 images of product "big" all lie within 3 degrees of the query; k=3 needs two more products.
    rng = np.random.default_rng(2)
    big = [at(a) for a in rng.uniform(-3, 3, size=60)]
    vectors = np.stack(big + [at(10), at(20), at(90)])
    items = [Item("big")] * 60 + [Item("ten"), Item("twenty"), Item("ninety")]
    index = built(vectors, items)
    assert [r.product_id for r in index.query(at(0), k=3)] == ["big", "ten", "twenty"]
    assert [r.product_id for r in index.query(at(0), k=10)] == ["big", "ten", "twenty", "ninety"]


def test_save_load_round_trip_gives_identical_answers(tmp_path):
    rng = np.random.default_rng(3)
    vectors = unit_rows(rng, 2000, 32)
    items = [Item(f"p{i // 2}", f"shop/{i},\"x\".jpg", None if i % 3 else f"c{i % 5}") for i in range(2000)]
    index = built(vectors, items, n_trees=20, search_k=3000, model_fingerprint="fp-1")
    queries = unit_rows(rng, 20, 32)
    before = [answers(index.query(q, k=10)) for q in queries]
    index.save(tmp_path / "idx")
    loaded = CatalogIndex.load(tmp_path / "idx", expected_fingerprint="fp-1", expected_dimension=32)
    assert [answers(loaded.query(q, k=10)) for q in queries] == before
    assert list(loaded.items) == items
    assert len(loaded) == 2000
    assert loaded.config() == index.config()
    assert isinstance(loaded.vectors, np.memmap)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert (manifest["dimension"], manifest["metric"], manifest["n_trees"], manifest["count"]) == (32, "angular", 20, 2000)
    assert manifest["model_fingerprint"] == "fp-1"
    assert manifest["package_version"] == street2shop.__version__
    assert manifest["created_at"].endswith("+00:00")
    # A loaded index saves again to the same answers.
    loaded.save(tmp_path / "copy")
    again = CatalogIndex.load(tmp_path / "copy")
    assert [answers(again.query(q, k=10)) for q in queries] == before


@pytest.mark.parametrize("failing_step", [(CatalogIndex, "_write_annoy"), (index_folder, "write_items"), (index_folder, "write_manifest")])
def test_interrupted_save_leaves_the_previous_index_loadable(tmp_path, monkeypatch, failing_step):
    rng = np.random.default_rng(4)
    old = built(unit_rows(rng, 300, 8), [Item(f"old{i}") for i in range(300)], model_fingerprint="old")
    new = built(unit_rows(rng, 300, 8), [Item(f"new{i}") for i in range(300)], model_fingerprint="new")
    queries = unit_rows(rng, 5, 8)
    expected = [answers(old.query(q, k=5)) for q in queries]
    old.save(tmp_path / "idx")

    def crash(*args):
        Path(args[-1] if failing_step[0] is CatalogIndex else args[0]).write_bytes(b"half written")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(*failing_step, crash)
    with pytest.raises(OSError, match="simulated"):
        new.save(tmp_path / "idx")
    monkeypatch.undo()
    reloaded = CatalogIndex.load(tmp_path / "idx")
    assert reloaded.model_fingerprint == "old"
    assert [answers(reloaded.query(q, k=5)) for q in queries] == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary folder left behind


def test_save_replaces_an_existing_index_and_cleans_up(tmp_path):
    rng = np.random.default_rng(5)
    old = built(unit_rows(rng, 100, 8), [Item(f"old{i}") for i in range(100)])
    new = built(unit_rows(rng, 50, 8), [Item(f"new{i}") for i in range(50)])
    old.save(tmp_path / "idx")
    new.save(tmp_path / "idx")
    loaded = CatalogIndex.load(tmp_path / "idx")
    assert len(loaded) == 50 and loaded.items[0].product_id == "new0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_save_refuses_to_replace_a_folder_that_is_not_an_index(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"x")
    index = built(np.stack([at(0), at(90)]), [Item("a"), Item("b")])
    with pytest.raises(ConfigError, match="not an index"):
        index.save(tmp_path / "photos")
    assert (tmp_path / "photos" / "keep.jpg").exists()


def test_add_after_build_or_load_is_refused(tmp_path):
    index = built(np.stack([at(0), at(90)]), [Item("a"), Item("b")])
    with pytest.raises(IndexMismatchError, match="built"):
        index.add(np.stack([at(45)]), [Item("c")])
    index.save(tmp_path / "idx")
    with pytest.raises(IndexMismatchError):
        CatalogIndex.load(tmp_path / "idx").add(np.stack([at(45)]), [Item("c")])


def test_batches_added_get_dense_rows_in_order():
    index = CatalogIndex(2)
    index.add(np.stack([at(0), at(90)]), [Item("a"), Item("b")])
    index.add(np.stack([at(180)]), [Item("c")])
    index.build()
    assert [r.row for r in index.query(at(180), k=3, by_product=False)] == [2, 1, 0]


def test_mismatched_fingerprint_or_dimension_is_refused_naming_both(tmp_path):
    index = built(np.stack([at(0), at(90)]), [Item("a"), Item("b")], model_fingerprint="model-A")
    index.save(tmp_path / "idx")
    with pytest.raises(IndexMismatchError) as info:
        CatalogIndex.load(tmp_path / "idx", expected_fingerprint="model-B")
    assert "model-A" in str(info.value) and "model-B" in str(info.value)
    with pytest.raises(IndexMismatchError) as info:
        CatalogIndex.load(tmp_path / "idx", expected_dimension=128)
    assert "2" in str(info.value) and "128" in str(info.value)


def test_annoy_recall_at_10_against_exact_search_at_default_settings():
    # Uniform random unit vectors are the hardest case for a tree index (no structure).
    rng = np.random.default_rng(6)
    vectors = unit_rows(rng, 10_000, 128)
    queries = unit_rows(rng, 100, 128)
    items = [Item(str(i)) for i in range(10_000)]
    index = built(vectors, items)
    exact = index.exact()
    # ExactIndex itself against a plain numpy argsort, on a few queries.
    for q in queries[:5]:
        reference = np.argsort(-(vectors @ q), kind="stable")[:10]
        assert [r.row for r in exact.query(q, k=10, by_product=False)] == reference.tolist()
    hits = 0
    for q in queries:
        truth = {r.row for r in exact.query(q, k=10, by_product=False)}
        hits += len(truth & {r.row for r in index.query(q, k=10, by_product=False)})
    assert hits / (10 * len(queries)) >= 0.95


def test_query_batch_equals_single_queries():
    rng = np.random.default_rng(7)
    vectors = unit_rows(rng, 500, 16)
    items = [Item(f"p{i % 150}") for i in range(500)]
    index = built(vectors, items)
    exact = ExactIndex(16)
    exact.add(vectors, items)
    queries = unit_rows(rng, 8, 16)
    for idx in (index, exact):
        for by_product in (True, False):
            batch = idx.query_batch(queries, k=7, by_product=by_product, exclude=["p3"])
            singles = [idx.query(q, k=7, by_product=by_product, exclude=["p3"]) for q in queries]
            assert [answers(b) for b in batch] == [answers(s) for s in singles]
    assert index.query_batch(np.zeros((0, 16)), k=3) == []


def test_results_are_search_result_dataclasses():
    index = built(np.stack([at(0), at(90)]), [Item("a", "a.jpg"), Item("b")])
    result = index.query(at(0), k=1)[0]
    assert isinstance(result, SearchResult)
    assert result == SearchResult(rank=1, product_id="a", similarity=pytest.approx(1.0, abs=1e-6), row=0, image_path="a.jpg", category=None)


# ----------------------------------------------------------------------------- errors


def test_clear_errors_on_add():
    index = CatalogIndex(2)
    with pytest.raises(IndexMismatchError, match="dimension 2"):
        index.add(np.ones((2, 3), np.float32), [Item("a"), Item("b")])
    with pytest.raises(DataError, match="finite"):
        index.add(np.array([[np.nan, 1.0]]), [Item("a")])
    with pytest.raises(DataError, match="one item per embedding"):
        index.add(np.stack([at(0), at(90)]), [Item("a")])
    with pytest.raises(DataError, match="non-zero"):
        index.add(np.zeros((1, 2)), [Item("a")])
    with pytest.raises(DataError, match="Item"):
        index.add(np.stack([at(0)]), ["a"])
    assert len(index) == 0


def test_clear_errors_on_query_and_build():
    index = CatalogIndex(2)
    with pytest.raises(DataError, match="empty"):
        index.build()
    index.add(np.stack([at(0), at(90)]), [Item("a"), Item("b")])
    with pytest.raises(IndexMismatchError, match="build"):
        index.query(at(0))
    index.build()
    with pytest.raises(IndexMismatchError, match="dimension 2"):
        index.query(np.ones(3))
    with pytest.raises(DataError, match="finite"):
        index.query(np.array([np.nan, 0.0]))
    with pytest.raises(IndexMismatchError):
        index.query_batch(np.ones((2, 3)))
    with pytest.raises(ConfigError, match="k must"):
        index.query(at(0), k=0)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="metric"):
        CatalogIndex(2, metric="euclidean")
    with pytest.raises(ConfigError, match="n_trees"):
        CatalogIndex(2, n_trees=0)
    with pytest.raises(ConfigError, match="search_k"):
        CatalogIndex(2, search_k=0)


def test_loading_something_that_is_not_an_index(tmp_path):
    with pytest.raises(DataError, match="not found"):
        CatalogIndex.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not an index"):
        CatalogIndex.load(tmp_path / "empty")
    index = built(np.stack([at(0), at(90)]), [Item("a"), Item("b")])
    index.save(tmp_path / "idx")
    manifest_path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(DataError, match="format version"):
        CatalogIndex.load(tmp_path / "idx")
    manifest_path.write_text("{not json")
    with pytest.raises(DataError, match="JSON"):
        CatalogIndex.load(tmp_path / "idx")
    manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "idx" / "items.jsonl").unlink()
    with pytest.raises(DataError, match="missing"):
        CatalogIndex.load(tmp_path / "idx")


def test_truncated_item_table_is_refused(tmp_path):
    index = built(np.stack([at(0), at(90), at(180)]), [Item("a"), Item("b"), Item("c")])
    index.save(tmp_path / "idx")
    table = tmp_path / "idx" / "items.jsonl"
    table.write_text("".join(table.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(DataError, match="3 rows"):
        CatalogIndex.load(tmp_path / "idx")


# ----------------------------------------------------------------------------- numbered versions


def test_versions_are_published_whole_and_the_newest_complete_one_is_read(tmp_path, monkeypatch):
    from street2shop.index import index_versions, load_index, publish_index

    base = tmp_path / "base"
    first = built(np.stack([at(0), at(90)]), [Item("a"), Item("b")], model_fingerprint="m")
    assert publish_index(first, base) == base / "1" and first.version == 1
    second = built(np.stack([at(0), at(90), at(180)]), [Item("a"), Item("b"), Item("c")], model_fingerprint="m")
    assert publish_index(second, base) == base / "2"
    (base / "3").mkdir()  # a folder without a manifest is not a version (yet)
    (base / ".tmp-4-1-x").mkdir()  # nor is a hidden one
    assert sorted(index_versions(base)) == [1, 2]
    loaded = load_index(base)
    assert loaded.version == 2 and len(loaded) == 3
    assert load_index(base / "1").version == 1
    # A writer that dies half way leaves no version behind, and the next one takes the next number.
    def crash(*args):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(index_folder, "write_items", crash)
    with pytest.raises(OSError, match="simulated"):
        publish_index(second, base)
    monkeypatch.undo()
    assert sorted(index_versions(base)) == [1, 2] and not [p for p in base.iterdir() if p.name.startswith(".tmp-") and p.name != ".tmp-4-1-x"]
    assert publish_index(second, base) == base / "4"  # 3 exists (incomplete): numbers are never reused
    with pytest.raises(DataError, match="no manifest.json and no complete numbered version"):
        load_index(tmp_path)
    with pytest.raises(DataError, match="an index folder itself"):
        publish_index(first, base / "1")


def test_category_filter_is_an_exact_search_over_the_category_on_both_kinds():
    rng = np.random.default_rng(8)
    vectors = unit_rows(rng, 400, 16)
    items = [Item(f"p{i % 90}", category=f"c{i % 3}") for i in range(400)]
    annoy_index = built(vectors, items)
    exact = ExactIndex(16)
    exact.add(vectors, items)
    for q in unit_rows(rng, 5, 16):
        # reference: numpy over the category's rows only, ties by row
        rows = np.array([i for i in range(400) if items[i].category == "c1"])
        sims = vectors[rows].astype(np.float64) @ q.astype(np.float64)
        reference = rows[np.lexsort((rows, -sims))][:7].tolist()
        for index in (annoy_index, exact):
            assert [r.row for r in index.query(q, k=7, by_product=False, category="c1")] == reference
            assert all(r.category == "c1" for r in index.query(q, k=7, category="c1"))
        assert annoy_index.query(q, k=3, category="nope") == []


def test_the_search_interface_needs_no_folder_and_checks_before_a_backend_answers(angle_vectors):
    # A backend that keeps its vectors elsewhere (here: a list, searched by hand) implements the hooks only;
    # the query API's checks, query_batch and rank_images come from SearchIndex.
    from street2shop.errors import ModelMismatchError
    from street2shop.index import SearchIndex

    class Elsewhere(SearchIndex):
        kind = "elsewhere"

        def __init__(self, vectors, items):
            super().__init__(2, model_fingerprint="m")
            self.stored, self.table, self.asked = [v.tolist() for v in vectors], list(items), []

        def __len__(self):
            return len(self.table)

        @property
        def items(self):
            return tuple(self.table)

        def image_path(self, image_id):
            return next((it.image_path for it in self.table if it.image_id == image_id), None)

        def _search(self, query, k, by_product, excluded, search_k, rerank):
            self.asked.append((round(float(np.linalg.norm(query)), 6), k))
            sims = [sum(a * b for a, b in zip(v, query.tolist())) for v in self.stored]
            rows = sorted(range(len(sims)), key=lambda r: (-sims[r], r))[:k]
            return [SearchResult(rank, self.table[r].product_id, sims[r], r, self.table[r].image_path, None) for rank, r in enumerate(rows, 1)]

    index = Elsewhere(angle_vectors, ANGLE_ITEMS)
    assert [r.row for r in index.query(3 * at(0), k=3)] == EXPECTED_ROWS[:3]
    assert index.asked == [(1.0, 3)]  # the backend got a unit query and a checked k
    assert [[r.row for r in rs] for rs in index.query_batch(np.stack([at(0), at(180)]), k=2)] == [[5, 3], [2, 0]]
    assert [rows.tolist() for rows in index.rank_images(np.stack([at(90)]), depth=2)] == [[0, 4]]  # 10 and 30 degrees away
    assert index.image_path(ANGLE_ITEMS[4].image_id) == "img4.jpg"
    with pytest.raises(ConfigError, match="k must be a positive int"):
        index.query(at(0), k=0)
    with pytest.raises(IndexMismatchError, match="dimension 2"):
        index.query(np.ones(3, np.float32))
    with pytest.raises(DataError, match="non-zero"):
        index.query(np.zeros(2, np.float32))
    with pytest.raises(ModelMismatchError):
        index.check_model(street2shop.contract.ModelIdentity("other"))
    assert len(index.asked) == 4  # the query, the two of the batch, the ranking: nothing after a refusal


def test_a_product_ranks_at_its_best_image_of_either_kind_a_customer_photo_included(tmp_path):
    """Hand-placed: A's catalogue photo at 40 degrees, its customer photo at 2; B's catalogue photo at 10; C (customer photos
    only) at 25. A query at 0: A first at its customer photo (cos 2), then B (cos 10), then C (cos 25)."""
    from street2shop.contract import ModelIdentity
    from street2shop.embeddings import write_embeddings
    from street2shop.index import load_index, publish_index
    from street2shop.index.updates import compact_index, update_index

    angles = [40, 10, 2, 25]
    items = [Item("A", "shop/a.jpg"), Item("B", "shop/b.jpg"), Item("A", "reviews/a-1.jpg", domain="street"),
             Item("C", "reviews/c-1.jpg", domain="street")]
    vectors = np.stack([at(a) for a in angles])
    expected = [("A", 2, "reviews/a-1.jpg", "street"), ("B", 1, "shop/b.jpg", "shop"), ("C", 3, "reviews/c-1.jpg", "street")]

    def check(index):
        results = index.query(at(0), k=3)
        assert [(r.product_id, r.row, r.image_path, r.domain) for r in results] == expected
        np.testing.assert_allclose([r.similarity for r in results], np.cos(np.radians([2, 10, 25])), atol=1e-5)
        assert list(index.items) == items

    exact = ExactIndex(2, model_fingerprint="fp")
    exact.add(vectors, items)
    for index in (built(vectors, items, model_fingerprint="fp"), exact):
        check(index)
        assert [r.domain for r in index.query(at(0), k=4, by_product=False)] == ["street", "shop", "street", "shop"]
        check(type(index).load(index.save(tmp_path / index.kind)))
    # Customer photos added to an Annoy base as a delta (a layered version), then compacted: the same answers, each domain kept.
    base = CatalogIndex(2, model_fingerprint="fp", model_version=1)
    base.add(vectors[:2], items[:2])
    base.build()
    publish_index(base, tmp_path / "versions")
    write_embeddings(tmp_path / "added", vectors[2:], [it.to_dict() for it in items[2:]], ModelIdentity("fp", 1, 2), {})
    update_index(tmp_path / "versions", add=[tmp_path / "added"])
    layered = load_index(tmp_path / "versions")
    assert layered.kind == "layered"
    check(layered)
    compact_index(tmp_path / "versions")
    compacted = load_index(tmp_path / "versions")
    assert compacted.kind == "annoy"
    check(compacted)
