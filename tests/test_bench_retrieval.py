"""The statistics and argument handling of tools/bench_retrieval.py (no training here)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_retrieval", ROOT / "tools" / "bench_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_are_parsed_and_checked(bench):
    assert bench._parse_settings(["shop_augment=1.0", "w-cls = 0.25"]) == {"shop_augment": "1.0", "w_cls": "0.25"}
    for items, message in (
        (["shop_augment"], "FIELD=VALUE"),
        (["=1"], "FIELD=VALUE"),
        (["no_such_field=1"], "unknown config field"),
        (["shop_augment=lots"], "shop_augment must be float"),
        (["seed=3"], "set by this tool"),
        (["w_product=1"], "set by this tool"),
    ):
        with pytest.raises(ValueError, match=message):
            bench._parse_settings(items)


def test_reserved_fields_exist(bench):
    from street2shop.config import field_owners

    assert bench.RESERVED <= set(field_owners())


def _result(variant, seed, ranks):
    return {"variant": variant, "seed": seed, "ranks": ranks}


def test_per_query_hits_leave_out_unanswerable_queries(bench):
    rows = [_result("a", 0, [1, 3, None, 30]), _result("a", 1, [2, 7, None, 1])]
    values = bench._per_query(rows)
    np.testing.assert_array_equal(values["top-1"], [[1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(values["top-5"], [[1, 1, 0], [1, 0, 1]])
    np.testing.assert_allclose(values["MRR"], [[1, 1 / 3, 1 / 30], [1 / 2, 1 / 7, 1]])


def test_bootstrap_mean_and_interval(bench):
    values = np.array([[1.0, 0.0, 1.0, 1.0]])  # one seed: the interval is over queries only
    mean, low, high = bench._bootstrap(values, samples=2000)
    assert mean == 0.75 and 0.0 <= low < 0.75 < high <= 1.0
    constant = np.full((3, 5), 0.4)
    assert bench._bootstrap(constant, samples=200) == pytest.approx((0.4, 0.4, 0.4))


def test_paired_difference_pairs_seeds_and_queries(bench):
    results = [
        _result("a", 0, [1, 1, 9, 9]), _result("b", 0, [1, 9, 9, 9]),  # seed 0: a − b = +1/4 at top-1
        _result("a", 1, [9, 9, 9, 9]), _result("b", 1, [1, 9, 9, 9]),  # seed 1: −1/4
        _result("a", 2, [1, 1, 1, 1]),  # no b for seed 2: not paired
    ]
    mean, low, high, per_seed = bench._paired_difference(results, "a", "b", k=1, samples=500)
    assert per_seed == {0: 0.25, 1: -0.25} and mean == 0.0 and low < 0 < high
    assert bench._paired_difference(results, "a", "c") is None


def test_the_histogram_pairs_with_every_seed(bench):
    results = [
        _result("histogram", 0, [1, 9, 9, 9]),
        _result("a", 0, [1, 1, 9, 9]),  # +1/4 at top-1
        _result("a", 5, [9, 9, 9, 9]),  # -1/4
    ]
    mean, _, _, per_seed = bench._paired_difference(results, "a", "histogram", k=1, samples=200)
    assert per_seed == {0: 0.25, 5: -0.25} and mean == 0.0
