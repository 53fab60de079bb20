"""Catalogue updates between rebuilds: base + delta + tombstones, compared with an exact index over the live items."""

from __future__ import annotations

import json

import numpy as np
import pytest

from street2shop.cli import main
from street2shop.contract import ModelIdentity
from street2shop.embeddings import write_embeddings
from street2shop.errors import DataError, ModelMismatchError
from street2shop.index import CatalogIndex, ExactIndex, Item, LayeredIndex, index_versions, load_index
from street2shop.index import folder as index_folder
from street2shop.index.build import build_index
from street2shop.index.updates import compact_index, compaction_advice, update_index

DIM = 12
MODEL = ModelIdentity("model-a", 3, DIM)


def unit_rows(rng, n):
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embeddings(folder, vectors, items, identity=MODEL):
    write_embeddings(folder, vectors, [it.to_dict() for it in items], identity, {})
    return folder


def catalogue(rng, products, images_per_product=2, prefix="p", start=0):
    items = [Item(f"{prefix}{p}", f"/shop/{prefix}{p}_{i}.jpg", f"c{p % 3}", {"product_name": f"Name {prefix}{p}"})
             for p in range(start, start + products) for i in range(images_per_product)]
    return unit_rows(rng, len(items)), items


def rebuilt(vectors, items):
    """The reference: an exact index over exactly the live items, as a rebuild would hold them."""
    index = ExactIndex(DIM)
    index.add(vectors, items)
    return index


def same_answers(index, reference, queries, **kw):
    for q in queries:
        got = index.query(q, **kw)
        want = reference.query(q, **kw)
        assert [(r.product_id, r.image_path) for r in got] == [(r.product_id, r.image_path) for r in want]
        np.testing.assert_allclose([r.similarity for r in got], [r.similarity for r in want], atol=1e-6)


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    vectors, items = catalogue(rng, 150)  # 300 base images
    build_index([embeddings(tmp_path / "base-emb", vectors, items)], tmp_path / "index", n_trees=30, search_k=100_000)
    return rng, tmp_path, vectors, items


def test_an_update_answers_what_a_rebuild_over_the_live_items_answers(setup):
    rng, tmp, vectors, items = setup
    new_vectors, new_items = catalogue(rng, 25, prefix="n")  # 50 images of new products
    (tmp / "remove.txt").write_text("# gone\np3\np10\n" + items[41].image_path + "\n" + items[60].image_id + "\n\n")
    result = update_index(tmp / "index", add=[embeddings(tmp / "add", new_vectors, new_items)], remove=tmp / "remove.txt")
    assert result["version"] == 2 and result["added"] == 50 and result["removed"] == {"products": 2, "images": 2, "rows": 6}
    assert (result["base_count"], result["delta_count"], result["live_count"]) == (300, 50, 344)
    index = load_index(tmp / "index")
    assert isinstance(index, LayeredIndex) and index.version == 2 and index.identity == ModelIdentity("model-a", 3, DIM)
    gone = {2 * 3, 2 * 3 + 1, 20, 21, 41, 60}
    live = [i for i in range(300) if i not in gone]
    reference = rebuilt(np.concatenate([vectors[live], new_vectors]), [items[i] for i in live] + new_items)
    queries = np.concatenate([unit_rows(rng, 8), vectors[[6, 41, 60]], new_vectors[:3]])  # also right at removed and added ones
    for by_product in (True, False):
        same_answers(index, reference, queries, k=10, by_product=by_product)
        same_answers(index, reference, queries, k=5, by_product=by_product, category="c1")
    assert all(r.product_id not in ("p3", "p10") for q in queries for r in index.query(q, k=50))
    assert index.query(new_vectors[0], k=1)[0].product_id == "n0"  # an added product is found
    assert index.query(new_vectors[0], k=1)[0].labels == {"product_name": "Name n0"}


def test_the_base_is_linked_never_copied_and_updates_stack(setup):
    rng, tmp, vectors, items = setup
    first_vectors, first_items = catalogue(rng, 5, prefix="a")
    update_index(tmp / "index", add=[embeddings(tmp / "a", first_vectors, first_items)])
    (tmp / "remove.txt").write_text("a1\np0\n")
    second_vectors, second_items = catalogue(rng, 5, prefix="b")
    update_index(tmp / "index", add=[embeddings(tmp / "b", second_vectors, second_items)], remove=tmp / "remove.txt")
    for name in ("annoy.ann", "vectors.npy", "items.jsonl"):
        inodes = {(tmp / "index" / v / "base" / name).stat().st_ino for v in ("2", "3")}
        assert inodes == {(tmp / "index" / "1" / name).stat().st_ino}
    index = load_index(tmp / "index")
    assert (len(index.base), len(index.delta), int(index.base.dead.sum())) == (300, 18, 2)
    live = list(range(2, 300))
    kept_first = [i for i, it in enumerate(first_items) if it.product_id != "a1"]
    reference = rebuilt(np.concatenate([vectors[live], first_vectors[kept_first], second_vectors]),
                        [items[i] for i in live] + [first_items[i] for i in kept_first] + second_items)
    same_answers(index, reference, unit_rows(rng, 6), k=8)
    # Compaction: one clean Annoy version of the same live items, answering the same.
    compacted = compact_index(tmp / "index")
    assert compacted["version"] == 4 and compacted["count"] == 298 + 18
    clean = load_index(tmp / "index")
    assert isinstance(clean, CatalogIndex) and not (tmp / "index" / "4" / "base").exists()
    same_answers(clean, reference, unit_rows(rng, 6), k=8)


def test_adding_the_same_image_again_replaces_it_and_a_photo_is_replaced_by_remove_and_add(setup):
    rng, tmp, vectors, items = setup
    moved = unit_rows(rng, 1)
    result = update_index(tmp / "index", add=[embeddings(tmp / "again", moved, [items[5]])])
    assert (result["added"], result["replaced"], result["live_count"]) == (1, 1, 300)
    index = load_index(tmp / "index")
    assert [r.image_path for r in index.query(moved[0], k=300, by_product=False)].count(items[5].image_path) == 1
    assert index.query(moved[0], k=1, by_product=False)[0].row == 300  # the new vector, in the delta
    # A new photo for product p7: remove its old images, add the new one.
    (tmp / "old.txt").write_text("p7\n")
    photo = Item("p7", "/shop/p7_new.jpg", "c1")
    update_index(tmp / "index", add=[embeddings(tmp / "new-photo", moved, [photo])], remove=tmp / "old.txt")
    answers = load_index(tmp / "index").query(vectors[14], k=300, by_product=False)  # p7's old image
    assert [r.image_path for r in answers if r.product_id == "p7"] == ["/shop/p7_new.jpg"]


def test_refusals_write_nothing(setup):
    rng, tmp, vectors, items = setup
    other = embeddings(tmp / "other", *catalogue(rng, 2, prefix="x"), identity=ModelIdentity("model-b", 1, DIM))
    with pytest.raises(ModelMismatchError, match="model-b.*model-a"):
        update_index(tmp / "index", add=[other])
    (tmp / "remove.txt").write_text("p1\nno-such-product\n")
    with pytest.raises(DataError, match="name no product, image id or image path in the index: no-such-product; nothing was written"):
        update_index(tmp / "index", remove=tmp / "remove.txt")
    with pytest.raises(DataError, match="nothing to update"):
        update_index(tmp / "index")
    assert sorted(index_versions(tmp / "index")) == [1]


def test_a_killed_update_or_compaction_leaves_the_previous_version_serving(setup, monkeypatch):
    rng, tmp, vectors, items = setup
    added = embeddings(tmp / "add", *catalogue(rng, 3, prefix="n"))
    before = load_index(tmp / "index")

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(index_folder, "write_manifest", crash)
    with pytest.raises(OSError, match="simulated"):
        update_index(tmp / "index", add=[added])
    monkeypatch.undo()
    update_index(tmp / "index", add=[added])  # version 2
    monkeypatch.setattr(CatalogIndex, "_write_annoy", crash)
    with pytest.raises(OSError, match="simulated"):
        compact_index(tmp / "index")
    monkeypatch.undo()
    assert sorted(index_versions(tmp / "index")) == [1, 2]
    assert not [p for p in (tmp / "index").iterdir() if p.name.startswith(".")]
    assert load_index(tmp / "index" / "1").query(vectors[0], k=3)[0].product_id == before.query(vectors[0], k=3)[0].product_id


def test_when_compaction_pays(setup):
    rng, tmp, vectors, items = setup
    small = load_index(tmp / "index")
    assert compaction_advice(small)["pays"] is False
    # A base with search_k 100 000 and a delta of 50: not yet.
    update_index(tmp / "index", add=[embeddings(tmp / "a", *catalogue(rng, 25, prefix="n"))])
    assert compaction_advice(load_index(tmp / "index"))["pays"] is False
    # Over a quarter of the base removed: it pays, and --auto-compact does it.
    (tmp / "remove.txt").write_text("".join(f"p{p}\n" for p in range(40)))  # 80 of 300 rows
    result = update_index(tmp / "index", remove=tmp / "remove.txt", auto_compact=True)
    assert result["compaction"]["pays"] is True and "27% of the base is removed" in result["compaction"]["reason"]
    assert result["compacted"]["version"] == 4 and result["compacted"]["count"] == 220 + 50
    # A delta as large as what the base query inspects: it pays.
    base = tmp / "small-k"
    build_index([tmp / "base-emb"], base, search_k=40)
    update_index(base, add=[embeddings(tmp / "b", *catalogue(rng, 20, prefix="m"))])
    advice = compaction_advice(load_index(base))
    assert advice["pays"] is True and "the delta's 40 vectors, all scanned, outnumber the 40 the base query inspects" in advice["reason"]


def test_update_and_compact_through_the_command_line(setup, capsys):
    rng, tmp, vectors, items = setup
    added = embeddings(tmp / "add", *catalogue(rng, 2, prefix="n"))
    (tmp / "remove.txt").write_text("p0\n")
    assert main(["index", "update", str(tmp / "index"), "--add", str(added), "--remove", str(tmp / "remove.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["version"], result["added"], result["live_count"]) == (2, 4, 302)
    assert main(["index", "compact", str(tmp / "index")]) == 0
    assert "into version 3 (302 images)" in capsys.readouterr().out
    assert main(["index", "update", str(tmp / "index"), "--remove", str(tmp / "missing.txt")]) == 2
    assert "cannot read the removal list" in capsys.readouterr().err
