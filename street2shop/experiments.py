"""Comparing training recipes on real photos: the variants, and the statistics of runs over seeds.

A :class:`Variant` is one arm of a comparison (``tools/bench_retrieval.py``):
which loss, which drop rule of the robust loss, which extra tasks, and which
variants it is compared with. :data:`VARIANTS` lists them; a new variant is one
record there.

The statistics treat a result as a training run (a seed) that answered the
same queries as the others, by the rank of each query's product. Both sources
of variation count: which queries were asked, and which training run produced
the model (runs of one setting differ by several points on a small set, so an
interval over queries alone would be too narrow). Two variants are compared
pairwise: the same seed, the same query.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

# What a robust variant drops: the batch quantile --positive-quantile ("quantile"), the same after a warm-up of
# plain epochs ("quantile_warmup"), a fixed τ as well as the quantile, a positive dropped when beyond both
# ("tau_quantile"), the batch quantile matched to the noise rate ("matched"), a fixed τ alone after the warm-up
# ("tau_warmup", τ read from the warm-up of the plain run with the same tasks).
DROP_RULES = ("quantile", "quantile_warmup", "tau_quantile", "matched", "tau_warmup")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of the retrieval benchmark.

    Args:
        name: str. As in ``--variants`` and the result files.
        loss: "contrastive", "robust", or None for a variant that trains nothing (a baseline).
        rule: one of :data:`DROP_RULES` for a robust loss, else None.
        multitask: bool. The auxiliary set's pairs and softmax too.
        products: bool. The softmax over the training products too (``--w-product``).
        default: bool. Run when ``--variants`` is not given.
        seeded: bool. False for a variant without randomness: run once, its one result pairs with every seed.
        compared_with: the variants the summary subtracts from this one (paired differences).
    """

    name: str
    loss: str | None = None
    rule: str | None = None
    multitask: bool = False
    products: bool = False
    default: bool = False
    seeded: bool = True
    compared_with: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.loss not in (None, "contrastive", "robust") or (self.rule is not None) != (self.loss == "robust") \
                or (self.rule is not None and self.rule not in DROP_RULES):
            raise ValueError(f"variant {self.name}: a robust loss takes one of {DROP_RULES}, no other loss takes a rule. "
                             f"Received: loss={self.loss!r}, rule={self.rule!r}")

    @property
    def trained(self) -> bool:
        return self.loss is not None

    def config(self, base: Any, *, aux_dir: str, w_product: float, drop_warmup_epochs: int, robust_tau: float,
               noise_rate: float = 0.0, tau: float | None = None) -> tuple[Any, dict[str, Any] | None]:
        """The TrainConfig of this variant on top of ``base``, and what its drop rule is (for the result; None if plain).

        Args:
            base: TrainConfig. Everything but the loss, the tasks and the drop rule.
            aux_dir: the auxiliary set (multitask variants).
            w_product: the product softmax's weight (products variants).
            drop_warmup_epochs: plain epochs before dropping (the warm-up rules).
            robust_tau: τ of "tau_quantile".
            noise_rate: the share of corrupted labels ("matched").
            tau: τ of "tau_warmup" (see ``tools/bench_retrieval.py``).
        """
        if not self.trained:
            raise ValueError(f"{self.name} trains nothing")
        config = base.replace(loss=self.loss, auxiliary_dir=aux_dir if self.multitask else "", w_product=w_product if self.products else 0.0)
        drop: dict[str, Any] = {}
        if self.rule == "quantile_warmup":
            drop = {"drop_warmup_epochs": drop_warmup_epochs}
        elif self.rule == "tau_quantile":
            drop = {"positive_threshold": robust_tau}
        elif self.rule == "matched":
            drop = {"positive_quantile": matched_quantile(noise_rate, config)}
        elif self.rule == "tau_warmup":
            if tau is None:
                raise ValueError(f"{self.name} needs its τ")
            drop = {"positive_threshold": tau, "positive_quantile": 0.0, "drop_warmup_epochs": drop_warmup_epochs}
        config = config.replace(**drop)
        lc = config.loss
        record = None if self.rule is None else {"rule": self.rule, "positive_quantile": lc.positive_quantile,
                                                 "positive_threshold": lc.positive_threshold, "drop_warmup_epochs": lc.drop_warmup_epochs}
        return config, record


def _variants(*variants: Variant) -> dict[str, Variant]:
    return {v.name: v for v in variants}


MTP = "plain_multitask_products"
VARIANTS: dict[str, Variant] = _variants(
    Variant("histogram", default=True, seeded=False),  # HSV colour histograms, no learning
    Variant("untrained", default=True),  # the tower at initialisation
    Variant("plain", "contrastive", default=True),
    Variant("robust", "robust", "quantile", default=True, compared_with=("plain",)),
    Variant("robust_multitask", "robust", "quantile", multitask=True, default=True,
            compared_with=("plain", "robust", "plain_multitask")),
    Variant("robust_multitask_products", "robust", "quantile", multitask=True, products=True, default=True,
            compared_with=("plain", "robust_products", "robust_multitask", MTP, "histogram")),
    Variant("robust_warmup", "robust", "quantile_warmup", compared_with=("plain",)),
    Variant("robust_multitask_warmup", "robust", "quantile_warmup", multitask=True, compared_with=("plain",)),
    Variant("robust_tau", "robust", "tau_quantile", compared_with=("plain",)),
    Variant("plain_multitask", "contrastive", multitask=True, compared_with=("plain",)),
    Variant("robust_products", "robust", "quantile", products=True, compared_with=("plain", "robust")),
    Variant(MTP, "contrastive", multitask=True, products=True, compared_with=("plain", "plain_multitask")),
    Variant("robust_matched", "robust", "matched", compared_with=("plain",)),
    Variant("robust_tau_warmup", "robust", "tau_warmup", compared_with=("plain",)),
    Variant("robust_matched_multitask_products", "robust", "matched", multitask=True, products=True, compared_with=("plain", MTP)),
    Variant("robust_tau_warmup_multitask_products", "robust", "tau_warmup", multitask=True, products=True, compared_with=("plain", MTP)),
)


def sister(name: str) -> str:
    """The plain-loss variant with the same tasks as variant ``name`` (its reference under label noise)."""
    v = VARIANTS[name]
    return next(o.name for o in VARIANTS.values() if o.loss == "contrastive" and (o.multitask, o.products) == (v.multitask, v.products))


def matched_quantile(rate: float, config: Any) -> float:
    """The batch quantile matched to noise rate ``rate``: 1 − rate × the share of product pairs among the positives.

    Auxiliary positives are never corrupted; half the auxiliary pairs are
    positive (see ``PairPlanner``).
    """
    f_pos, _, f_aux = config.data.pair_config(1, 0).fractions(bool(config.data.auxiliary_dir))
    return 1.0 - rate * f_pos / (f_pos + f_aux / 2)


# --------------------------------------------------------------------------- statistics over runs


def per_query(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-query hits at 1/5/20 and reciprocal rank, ``[runs, queries]`` each, from each run's ``ranks``.

    A query no run could answer (rank None everywhere: its product is not in
    the catalogue) is left out.
    """
    ranks = np.array([[np.nan if x is None else x for x in r["ranks"]] for r in rows], dtype=float)
    answerable = ~np.isnan(ranks).all(axis=0)
    ranks = np.where(np.isnan(ranks), np.inf, ranks)[:, answerable]
    values = {f"top-{k}": (ranks <= k).astype(float) for k in (1, 5, 20)}
    values["MRR"] = 1.0 / ranks
    return values


def bootstrap(values: Any, samples: int = 4000) -> tuple[float, float, float]:
    """Mean of a ``[seeds, queries]`` array and its 95% interval, resampling seeds and queries (seeded, so repeatable).

    With one seed it is the interval over queries.
    """
    values = np.asarray(values, dtype=float)
    n_seeds, n_queries = values.shape
    rng = np.random.default_rng(0)
    means = np.empty(samples)
    for i in range(samples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        queries = rng.integers(0, n_queries, n_queries)
        means[i] = values[seeds][:, queries].mean()
    return float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def paired_difference(results: Sequence[dict[str, Any]], a: str, b: str, k: int = 1,
                      samples: int = 4000) -> tuple[float, float, float, dict[int, float]] | None:
    """Top-k difference a − b over the seeds both have: mean, 95% interval (seeds and queries resampled in pairs), per seed.

    A variant without seed (``seeded=False``, computed once) pairs its one
    result with every seed of ``a``. None when they share no seed.
    """
    by = {(r["variant"], r["seed"]): r for r in results}
    unseeded = [r for r in results if r["variant"] == b and b in VARIANTS and not VARIANTS[b].seeded]
    if unseeded:
        by.update({(b, seed): unseeded[0] for (variant, seed) in list(by) if variant == a})
    seeds = sorted(seed for (variant, seed) in by if variant == a and (b, seed) in by)
    if not seeds:
        return None
    hit_a = per_query([by[(a, s)] for s in seeds])[f"top-{k}"]
    hit_b = per_query([by[(b, s)] for s in seeds])[f"top-{k}"]
    difference = hit_a - hit_b  # paired: the same seed and the same query
    mean, low, high = bootstrap(difference, samples)
    return mean, low, high, dict(zip(seeds, difference.mean(axis=1)))
