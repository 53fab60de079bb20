import numpy as np
import pytest

from street2shop.evaluate import (
    QueryResult,
    average_precision,
    bootstrap_interval,
    evaluate_embeddings,
    per_query_ranks,
    retrieval_metrics,
)
from street2shop.index import ExactIndex, Item
from street2shop.errors import ConfigError


def test_average_precision_by_hand():
    # relevant at ranks 1 and 3: (1/1 + 2/3) / 2
    assert average_precision(np.array([1, 0, 1, 0], bool)) == pytest.approx((1 + 2 / 3) / 2)
    # a third relevant item never retrieved: divide by 3
    assert average_precision(np.array([1, 0, 1], bool), n_relevant=3) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision(np.zeros(3, bool)) == 0.0


def test_metrics_on_hand_made_rankings_with_duplicate_products():
    gallery = ["A", "A", "B", "C", "D"]
    results = [
        QueryResult("A", None, np.array([0, 2, 1, 3, 4])),  # A first; images of A at ranks 1, 3
        QueryResult("B", None, np.array([0, 1, 3, 2, 4])),  # products: A, C, B -> rank 3 (A's 2 images count once)
        QueryResult("D", None, np.array([4, 0, 1, 2, 3])),  # D first
        QueryResult("Z", None, np.array([0, 1, 2, 3, 4])),  # not in the gallery: unanswerable
    ]
    m = retrieval_metrics(results, gallery, ks=(1, 2, 3))["overall"]
    assert m["queries"] == 3 and m["unanswerable"] == 1
    assert m["top_k"] == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(1.0)}
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    # recall@k (image level): A has 2 images: @1 -> 1/2, @2 -> 1/2, @3 -> 1; B: 0, 0, 0 (B is 4th image); D: 1
    assert m["recall_at_k"][1] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["recall_at_k"][3] == pytest.approx((1 + 0 + 1) / 3)
    # AP: A (1/1 + 2/3)/2; B 1/4; D 1
    assert m["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 4 + 1) / 3)
    assert per_query_ranks(results, gallery) == [1, 3, 1, None]


def test_exact_rankings_break_ties_by_gallery_order_and_categories_restrict():
    g = np.array([[1, 0], [1, 0], [0, 1], [0.6, 0.8]], np.float32)
    q = np.array([[1, 0]], np.float32)
    index = ExactIndex(2)
    index.add(g, [Item(f"p{i}", category=c) for i, c in enumerate(["y", "x", "x", "y"])])
    np.testing.assert_array_equal(index.rank_images(q, 4)[0], [0, 1, 3, 2])
    np.testing.assert_array_equal(index.rank_images(q, 4, categories=["x"])[0], [1, 2])
    # evaluate_embeddings ranks the same way: p1 is the query's product, second at the tie with p0
    ev = evaluate_embeddings(q, ["p1"], g, ["p0", "p1", "p2", "p3"], ks=(1, 2))
    assert ev.ranks == [2]
    ev = evaluate_embeddings(q, ["p1"], g, ["p0", "p1", "p2", "p3"], query_categories=["x"],
                             gallery_categories=["y", "x", "x", "y"], ks=(1, 2))
    assert ev.ranks == [1]


def test_per_category_and_category_unanswerable():
    gallery = ["A", "B", "C"]
    cats = ["bags", "bags", "hats"]
    results = [
        QueryResult("A", "bags", np.array([1, 0])),
        QueryResult("C", "hats", np.array([2])),
        QueryResult("A", "hats", np.array([2])),  # A exists, but not among hats
    ]
    report = retrieval_metrics(results, gallery, gallery_categories=cats, ks=(1,))
    assert report["per_category"]["bags"]["top_k"][1] == 0.0
    assert report["per_category"]["hats"]["top_k"][1] == 1.0
    assert report["per_category"]["hats"]["unanswerable"] == 1
    assert report["overall"]["top_k"][1] == 0.5


def test_bootstrap_interval_brackets_the_mean():
    values = [1.0] * 30 + [0.0] * 70
    low, high = bootstrap_interval(values, samples=4000)
    assert low < 0.3 < high and 0.18 < low and high < 0.42  # binomial sd ~0.046
    assert bootstrap_interval([1.0] * 5) == (1.0, 1.0)


def test_bad_input():
    with pytest.raises(ConfigError):
        retrieval_metrics([], ["A"], ks=(0,))
    with pytest.raises(ConfigError):
        evaluate_embeddings(np.ones((1, 3)), ["A"], np.ones((2, 4)), ["A", "B"])
