import numpy as np
import pytest

from street2shop.data.pairs import AUXILIARY, CORRUPTED_POSITIVE, PRODUCT, TRUE_PRODUCT_COLUMN, PairConfig, PairPlanner
from street2shop.data.records import Record
from street2shop.errors import ConfigError, DataError


def make_records(n_products=6, street_per=3, categories=2):
    records = []
    for p in range(n_products):
        cat = f"cat{p % categories}"
        records.append(Record(f"/x/shop{p}.jpg", f"p{p}", "shop", "train", category=cat))
        for k in range(street_per):
            records.append(Record(f"/x/street{p}_{k}.jpg", f"p{p}", "street", "train", category=cat))
    return records


def product_of(path: str) -> str:
    name = path.rsplit("/", 1)[1]
    return "p" + name.replace("shop", "").replace("street", "").split("_")[0].split(".")[0]


def aux_records(n_classes=4, per_class=3):
    recs, labels = [], []
    for c in range(n_classes):
        for k in range(per_class):
            recs.append(Record(f"/aux/c{c}/{k}.png", f"c{c}", "shop", "aux"))
            labels.append(c)
    return recs, labels


def test_proportions_without_auxiliary_are_half_and_half():
    plan = PairPlanner(make_records(), PairConfig(pairs_per_epoch=100)).plan(0)
    assert len(plan) == 100
    assert plan.counts() == {"positive": 50, "negative": 50, "auxiliary_positive": 0, "auxiliary_negative": 0}


def test_proportions_with_auxiliary_are_one_third_each():
    aux, labels = aux_records()
    plan = PairPlanner(make_records(), PairConfig(pairs_per_epoch=99), auxiliary=aux, auxiliary_labels=labels).plan(0)
    c = plan.counts()
    assert c["positive"] == 33 and c["negative"] == 33
    assert c["auxiliary_positive"] + c["auxiliary_negative"] == 33
    assert abs(c["auxiliary_positive"] - c["auxiliary_negative"]) <= 1


def test_custom_fractions_are_normalised():
    cfg = PairConfig(pairs_per_epoch=100, positive_fraction=0.6, negative_fraction=0.2)
    c = PairPlanner(make_records(), cfg).plan(0).counts()
    assert c["positive"] == 75 and c["negative"] == 25  # 0.6 / 0.8 and 0.2 / 0.8


def test_labels_match_products():
    plan = PairPlanner(make_records(), PairConfig(pairs_per_epoch=200, street_street_fraction=0.5)).plan(1)
    for a, b, label, kind in zip(plan.path_a, plan.path_b, plan.label, plan.kind):
        assert kind == PRODUCT
        assert (product_of(a) == product_of(b)) == (label == 1)
    pos = plan.label == 1
    # slot a is always a street photo; with street_street_fraction some positives are street-street
    assert plan.street_a.all()
    assert 0 < np.sum(plan.street_b[pos]) < np.sum(pos)
    assert not plan.street_b[~pos].any()  # negatives are street vs shop


def test_hard_negatives_come_from_the_same_category():
    records = make_records(n_products=10, categories=2)
    cat = {r.image_path: r.category for r in records}
    hard = PairPlanner(records, PairConfig(pairs_per_epoch=200, hard_negative_fraction=1.0)).plan(0)
    neg = hard.label == 0
    assert all(cat[a] == cat[b] for a, b in zip(hard.path_a[neg], hard.path_b[neg]))
    easy = PairPlanner(records, PairConfig(pairs_per_epoch=400, hard_negative_fraction=0.0)).plan(0)
    neg = easy.label == 0
    same = np.mean([cat[a] == cat[b] for a, b in zip(easy.path_a[neg], easy.path_b[neg])])
    assert 0.3 < same < 0.6  # random other product: 4 of 9 others share the category


def test_auxiliary_pairs_carry_class_labels():
    aux, labels = aux_records()
    plan = PairPlanner(make_records(), PairConfig(pairs_per_epoch=60), auxiliary=aux, auxiliary_labels=labels).plan(0)
    a = plan.kind == AUXILIARY
    assert np.all(plan.class_a[~a] == -1) and np.all(plan.class_b[~a] == -1)
    assert np.all((plan.class_a[a] == plan.class_b[a]) == (plan.label[a] == 1))
    for path, c in zip(plan.path_a[a], plan.class_a[a]):
        assert path.startswith(f"/aux/c{c}/")


def test_product_labels_label_product_images_and_leave_auxiliary_classes_alone():
    aux, labels = aux_records(n_classes=4)
    # p5 is left out of the mapping: its images carry no class.
    product_labels = {f"p{p}": 4 + p for p in range(5)}
    planner = PairPlanner(make_records(), PairConfig(pairs_per_epoch=300, street_street_fraction=0.3), auxiliary=aux,
                          auxiliary_labels=labels, product_labels=product_labels)
    plan = planner.plan(0)
    a = plan.kind == AUXILIARY
    for paths, classes in ((plan.path_a, plan.class_a), (plan.path_b, plan.class_b)):
        for path, c in zip(paths[~a], classes[~a]):
            assert c == product_labels.get(product_of(path), -1), (path, c)
        for path, c in zip(paths[a], classes[a]):
            assert path.startswith(f"/aux/c{c}/")
    assert set(plan.class_a[~a].tolist()) == {-1, 4, 5, 6, 7, 8}  # every street anchor is used, p5's too
    # The labels do not change which pairs are drawn.
    plain = PairPlanner(make_records(), PairConfig(pairs_per_epoch=300, street_street_fraction=0.3), auxiliary=aux,
                        auxiliary_labels=labels).plan(0)
    assert np.array_equal(plain.path_a, plan.path_a) and np.array_equal(plain.path_b, plan.path_b)


def test_reproducible_by_seed_and_reshuffled_per_epoch():
    records = make_records()
    p1 = PairPlanner(records, PairConfig(pairs_per_epoch=50, seed=7))
    p2 = PairPlanner(records, PairConfig(pairs_per_epoch=50, seed=7))
    for x, y in zip(p1.plan(3).as_arrays(), p2.plan(3).as_arrays()):
        np.testing.assert_array_equal(x, y)
    assert list(p1.plan(0).path_a) != list(p1.plan(1).path_a)
    assert list(p1.plan(0).path_a) != list(PairPlanner(records, PairConfig(pairs_per_epoch=50, seed=8)).plan(0).path_a)


def test_every_street_photo_is_used_evenly():
    records = make_records(n_products=4, street_per=5)  # 20 anchors
    plan = PairPlanner(records, PairConfig(pairs_per_epoch=80)).plan(0)  # 40 positives: each anchor twice
    pos = plan.label == 1
    _, counts = np.unique(plan.path_a[pos], return_counts=True)
    assert len(counts) == 20 and set(counts) == {2}


def test_errors():
    with pytest.raises(ConfigError, match="Received: pairs_per_epoch=0"):
        PairConfig(pairs_per_epoch=0)
    with pytest.raises(ConfigError, match="hard_negative_fraction"):
        PairConfig(hard_negative_fraction=1.5)
    only_street = [r for r in make_records() if r.domain == "street"]
    with pytest.raises(DataError, match="no street photo has a shop photo"):
        PairPlanner(only_street)
    one_product = [r for r in make_records() if r.product_id == "p0"]
    with pytest.raises(DataError, match="at least 2 products"):
        PairPlanner(one_product)


def test_unset_fractions_share_the_rest():
    assert PairConfig(positive_fraction=0.3).fractions(False) == pytest.approx((0.3, 0.7, 0.0))
    assert PairConfig(auxiliary_fraction=0.2).fractions(True) == pytest.approx((0.4, 0.4, 0.2))
    assert PairConfig(positive_fraction=0.4, negative_fraction=0.4).fractions(True) == pytest.approx((0.4, 0.4, 0.2))
    with pytest.raises(ConfigError, match="more than 1"):
        PairConfig(positive_fraction=0.8, negative_fraction=0.5).fractions(True)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_plan_has_exactly_pairs_per_epoch(n):
    aux, labels = aux_records()
    assert len(PairPlanner(make_records(), PairConfig(pairs_per_epoch=n)).plan(0)) == n
    assert len(PairPlanner(make_records(), PairConfig(pairs_per_epoch=n), auxiliary=aux, auxiliary_labels=labels).plan(0)) == n


def _with_true_product(record, true_product_id, product_id):
    """``record`` relabelled ``product_id``, remembering it really shows ``true_product_id``."""
    return Record(record.image_path, product_id, record.domain, record.split, record.category, record.box,
                  {**record.metadata, TRUE_PRODUCT_COLUMN: true_product_id})


def test_positives_of_corrupted_street_photos_are_flagged_and_stay_positives():
    records = make_records(n_products=4, street_per=3)
    # street0_0 really shows p0 but is labelled p1; street1_0 carries its true product: not corrupted.
    records = [_with_true_product(r, "p0", "p1") if r.image_path.endswith("street0_0.jpg")
               else _with_true_product(r, "p1", "p1") if r.image_path.endswith("street1_0.jpg") else r for r in records]
    planner = PairPlanner(records, PairConfig(pairs_per_epoch=120, street_street_fraction=0.3, seed=2))
    assert planner.has_label_noise
    plan = planner.plan(0)
    flagged = plan.label == CORRUPTED_POSITIVE
    true = {r.image_path: r.metadata.get(TRUE_PRODUCT_COLUMN) or r.product_id for r in records}
    for a, b, label in zip(plan.path_a, plan.path_b, plan.label):
        if label > 0.5:  # flagged exactly when the two images really show different products
            assert (label == CORRUPTED_POSITIVE) == (true[a] != true[b]), (a, b, label)
    assert flagged.any() and set(np.unique(plan.label)) == {0.0, 1.0, CORRUPTED_POSITIVE}
    # negatives are never flagged; the counts read every label above 0.5 as a positive
    counts = plan.counts()
    assert counts["positive"] == 60 and counts["negative"] == 60 and counts["corrupted_positive"] == int(flagged.sum())


def test_without_corruption_labels_are_zero_and_one():
    records = [Record(r.image_path, r.product_id, r.domain, r.split, r.category, r.box, {TRUE_PRODUCT_COLUMN: r.product_id})
               for r in make_records()]
    planner = PairPlanner(records, PairConfig(pairs_per_epoch=60))
    plan = planner.plan(0)
    assert not planner.has_label_noise and set(np.unique(plan.label)) == {0.0, 1.0}
    assert "corrupted_positive" not in plan.counts()
    # the same pairs as records without the column
    plain = PairPlanner(make_records(), PairConfig(pairs_per_epoch=60)).plan(0)
    assert np.array_equal(plain.path_b, plan.path_b) and np.array_equal(plain.label, plan.label)
