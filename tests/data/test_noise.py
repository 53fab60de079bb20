"""Label noise on purpose (street2shop.data.noise): which photos get a wrong product, and which wrong one."""

import pytest

from street2shop.data.noise import corrupt_labels
from street2shop.errors import ConfigError


def grocery_like():
    """3 coarse classes: A (products a1, a2), B (b1 alone) in super X, C (c1 alone) in super Y; 10 train photos each."""
    from street2shop.data.records import Record

    groups = {"a1": ("A", "X"), "a2": ("A", "X"), "b1": ("B", "X"), "c1": ("C", "Y")}
    records = []
    for product, (coarse, super_) in groups.items():
        meta = {"coarse_class": coarse, "supercategory": super_}
        records.append(Record(f"/d/shop-{product}.jpg", product, "shop", "catalog", metadata=meta))
        records += [Record(f"/d/train-{product}-{k}.jpg", product, "street", "train", metadata=meta) for k in range(10)]
        records += [Record(f"/d/val-{product}-{k}.jpg", product, "street", "val", metadata=meta) for k in range(3)]
    return records, groups


def untouched(records, noisy):
    return [(r.image_path, r.product_id, r.domain, r.split) for r in records if not (r.split == "train" and r.domain == "street")] == \
        [(r.image_path, r.product_id, r.domain, r.split) for r in noisy if not (r.split == "train" and r.domain == "street")]


@pytest.mark.parametrize("kind", ["uniform", "same-category"])
def test_corruption_rate_determinism_and_untouched_queries_and_catalogue(kind):
    records, _ = grocery_like()
    noisy, info = corrupt_labels(records, 0.25, kind, seed=3)
    changed = [(r, n) for r, n in zip(records, noisy) if r.product_id != n.product_id]
    assert info["corrupted"] == len(changed) == 10 and info["street_photos"] == 40  # round(0.25 · 40)
    assert all(r.split == "train" and r.domain == "street" for r, _ in changed)
    assert untouched(records, noisy)
    assert all(n.metadata["true_product_id"] == r.product_id for r, n in zip(records, noisy))  # every record says its truth
    again, info_again = corrupt_labels(records, 0.25, kind, seed=3)
    assert [r.product_id for r in again] == [r.product_id for r in noisy] and info_again == info
    other, info_other = corrupt_labels(records, 0.25, kind, seed=4)
    assert [r.product_id for r in other] != [r.product_id for r in noisy] and info_other["digest"] != info["digest"]
    # nested in the rate: the photos wrong at 0.25 are wrong alike at 0.5
    more, info_more = corrupt_labels(records, 0.5, kind, seed=3)
    assert info_more["corrupted"] == 20
    assert all(m.product_id == n.product_id for n, m in zip(noisy, more) if n.product_id != n.metadata["true_product_id"])
    none, info_none = corrupt_labels(records, 0.0, kind, seed=3)
    assert info_none["corrupted"] == 0 and [r.product_id for r in none] == [r.product_id for r in records]


def test_same_category_noise_stays_in_the_category_then_the_supercategory():
    records, groups = grocery_like()
    noisy, info = corrupt_labels(records, 1.0, "same-category", seed=0)
    for r, n in zip(records, noisy):
        if r.split != "train" or r.domain != "street":
            continue
        true, wrong = r.product_id, n.product_id
        assert wrong != true
        if true in ("a1", "a2"):  # the category has another product
            assert groups[wrong][0] == "A"
        elif true == "b1":  # alone in B: another product of supercategory X
            assert groups[wrong][1] == "X"
        else:  # c1 alone in C and in Y: any other product
            assert wrong in ("a1", "a2", "b1")
    assert info["by_group"] == {"coarse_class": 20, "supercategory": 10, "any": 10}
    uniform, _ = corrupt_labels(records, 1.0, "uniform", seed=0)
    a_wrong = [n.product_id for r, n in zip(records, uniform) if r.split == "train" and r.product_id == "a1"]
    assert set(a_wrong) - {"a2"}  # uniform noise leaves the category


def test_a_bad_rate_or_kind_is_refused():
    records, _ = grocery_like()
    with pytest.raises(ConfigError, match="noise rate must be in \\[0, 1\\]"):
        corrupt_labels(records, 1.5, "uniform", seed=0)
    with pytest.raises(ConfigError, match="noise kind must be one of"):
        corrupt_labels(records, 0.1, "sideways", seed=0)
