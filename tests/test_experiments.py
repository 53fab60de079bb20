"""The statistics of runs over seeds and the variant records (street2shop.experiments); numbers worked out by hand."""

import numpy as np
import pytest

from street2shop.config import TrainConfig
from street2shop.experiments import VARIANTS, Variant, bootstrap, paired_difference, per_query, sister


def _result(variant, seed, ranks):
    return {"variant": variant, "seed": seed, "ranks": ranks}


def test_per_query_hits_leave_out_unanswerable_queries():
    rows = [_result("a", 0, [1, 3, None, 30]), _result("a", 1, [2, 7, None, 1])]
    values = per_query(rows)
    np.testing.assert_array_equal(values["top-1"], [[1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(values["top-5"], [[1, 1, 0], [1, 0, 1]])
    np.testing.assert_allclose(values["MRR"], [[1, 1 / 3, 1 / 30], [1 / 2, 1 / 7, 1]])


def test_bootstrap_mean_and_interval():
    values = np.array([[1.0, 0.0, 1.0, 1.0]])  # one seed: the interval is over queries only
    mean, low, high = bootstrap(values, samples=2000)
    assert mean == 0.75 and 0.0 <= low < 0.75 < high <= 1.0
    constant = np.full((3, 5), 0.4)
    assert bootstrap(constant, samples=200) == pytest.approx((0.4, 0.4, 0.4))


def test_paired_difference_pairs_seeds_and_queries():
    results = [
        _result("a", 0, [1, 1, 9, 9]), _result("b", 0, [1, 9, 9, 9]),  # seed 0: a − b = +1/4 at top-1
        _result("a", 1, [9, 9, 9, 9]), _result("b", 1, [1, 9, 9, 9]),  # seed 1: −1/4
        _result("a", 2, [1, 1, 1, 1]),  # no b for seed 2: not paired
    ]
    mean, low, high, per_seed = paired_difference(results, "a", "b", k=1, samples=500)
    assert per_seed == {0: 0.25, 1: -0.25} and mean == 0.0 and low < 0 < high
    assert paired_difference(results, "a", "c") is None


def test_the_histogram_pairs_with_every_seed():
    results = [
        _result("histogram", 0, [1, 9, 9, 9]),
        _result("a", 0, [1, 1, 9, 9]),  # +1/4 at top-1
        _result("a", 5, [9, 9, 9, 9]),  # -1/4
    ]
    mean, _, _, per_seed = paired_difference(results, "a", "histogram", k=1, samples=200)
    assert per_seed == {0: 0.25, 5: -0.25} and mean == 0.0


def test_every_reference_is_a_variant_and_each_noise_rule_has_a_plain_sister():
    for v in VARIANTS.values():
        assert set(v.compared_with) <= set(VARIANTS), v.name
    assert sister("robust_tau_warmup") == "plain" and sister("robust_tau_warmup_multitask_products") == "plain_multitask_products"
    assert [n for n, v in VARIANTS.items() if v.default] == ["histogram", "untrained", "plain", "robust", "robust_multitask",
                                                               "robust_multitask_products"]
    with pytest.raises(ValueError, match="a robust loss takes one of"):
        Variant("robust_nothing", "robust")


def test_a_new_variant_is_one_record():
    """A variant no list names: its record alone says what it trains and how it drops."""
    base = TrainConfig().replace(positive_quantile=0.9, positive_threshold=0.0, drop_warmup_epochs=0)
    v = Variant("robust_tau_products", "robust", "tau_quantile", products=True)
    config, rule = v.config(base, aux_dir="/aux", w_product=0.5, drop_warmup_epochs=2, robust_tau=0.8)
    assert (config.loss.loss, config.loss.positive_threshold, config.loss.positive_quantile, config.loss.w_product,
            config.data.auxiliary_dir) == ("robust", 0.8, 0.9, 0.5, "")
    assert rule == {"rule": "tau_quantile", "positive_quantile": 0.9, "positive_threshold": 0.8, "drop_warmup_epochs": 0}
    with pytest.raises(ValueError, match="trains nothing"):
        VARIANTS["histogram"].config(base, aux_dir="", w_product=0.0, drop_warmup_epochs=0, robust_tau=0.8)
