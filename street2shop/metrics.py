"""Keras metrics on the siamese model's ``"distance"`` output.

Each reads ``y_true`` (1 = matching pair) and ``y_pred`` = the pair distance,
``[B]`` or ``[B, 1]``, and keeps a weighted sum and a weighted count over the
epoch (reset by Keras at each epoch); the result is their ratio, 0 while the
count is 0. ``sample_weight`` is honoured when given (a pair weighs its
weight), but Keras passes sample weights only to ``weighted_metrics``: in
``model.compile(metrics=...)``, as ``street2shop.compile`` uses them, every pair
counts once.

The drop rates call :func:`street2shop.losses.robust_contrastive_terms`, the
same function as the loss, so they report exactly the pairs the loss dropped
(with a batch quantile: per batch, as the loss sees it).

Label-noise benchmarks flag the positives known to be corrupted with the
label 2 (see :mod:`street2shop.data.pairs`); the drop's precision and recall,
the clean and corrupted positives' mean distances, their AUC and the
positive-distance quantiles measure what the drop removes. On ordinary data
they are not logged (``street2shop.compile`` adds them only when the training
records carry corruption flags).

Example::

    loss = RobustContrastiveLoss(positive_quantile=0.9)
    model.compile(loss={"distance": loss}, metrics={"distance": [
        MeanPositiveDistance(), MeanNegativeDistance(), PairAccuracy(threshold=0.5),
        PositiveDropRate.from_loss(loss), NegativeDropRate.from_loss(loss)]})
"""

from __future__ import annotations

import logging
from typing import Any

import keras
from keras import ops

from street2shop.errors import ConfigError
from street2shop.losses import _check_optional, check_robust_args, drop_active, pair_distances, pair_labels, robust_contrastive_terms

logger = logging.getLogger(__name__)


class _RatioMetric(keras.metrics.Metric):
    """Σ w·numerator / Σ w·denominator over an epoch; subclasses give the per-pair terms."""

    def __init__(self, name: str, dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="count")

    def terms(self, y_true: Any, distance: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        distance = ops.cast(pair_distances(y_pred), "float32")
        numerator, denominator = self.terms(y_true, distance)
        numerator = ops.cast(numerator, "float32")
        denominator = ops.cast(denominator, "float32")
        if sample_weight is not None:
            weight = ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
            weight = ops.broadcast_to(weight, ops.shape(numerator))
            numerator = numerator * weight
            denominator = denominator * weight
        self.total.assign_add(ops.sum(numerator))
        self.count.assign_add(ops.sum(denominator))

    def result(self) -> Any:
        return ops.divide_no_nan(self.total, self.count)


def _untracked(metric: Any, name: str, value: Any) -> None:
    """Set an attribute that Keras must not track as the metric's own state.

    The robust loss's warm-up switch is a variable owned by the loss; tracked
    by a metric it would be zeroed by ``reset_state`` every epoch and saved
    as the metric's weight.
    """
    object.__setattr__(metric, name, value)


@keras.saving.register_keras_serializable(package="street2shop")
class MeanPositiveDistance(_RatioMetric):
    """Mean distance of the matching pairs (``y = 1``) seen this epoch.

    Args:
        name: str. Defaults to ``"mean_positive_distance"``.
        dtype: the metric's dtype. Defaults to None (floatx).

    Example:
    >>> m = MeanPositiveDistance()
    >>> m.update_state(np.array([1, 1, 0]), np.array([0.2, 0.4, 1.0]))
    >>> float(m.result())  # -> 0.3
    """

    def __init__(self, name: str = "mean_positive_distance", dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)

    def terms(self, y_true: Any, distance: Any) -> tuple[Any, Any]:
        positive = ops.cast(pair_labels(y_true), "float32")
        return positive * distance, positive


@keras.saving.register_keras_serializable(package="street2shop")
class MeanNegativeDistance(_RatioMetric):
    """Mean distance of the non-matching pairs (``y = 0``) seen this epoch.

    Args:
        name: str. Defaults to ``"mean_negative_distance"``.
        dtype: the metric's dtype. Defaults to None (floatx).

    Example:
    >>> m = MeanNegativeDistance()
    >>> m.update_state(np.array([1, 0, 0]), np.array([0.2, 0.8, 1.2]))
    >>> float(m.result())  # -> 1.0
    """

    def __init__(self, name: str = "mean_negative_distance", dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)

    def terms(self, y_true: Any, distance: Any) -> tuple[Any, Any]:
        negative = ops.cast(ops.logical_not(pair_labels(y_true)), "float32")
        return negative * distance, negative


@keras.saving.register_keras_serializable(package="street2shop")
class PairAccuracy(_RatioMetric):
    """Fraction of pairs classified right when ``d < threshold`` is read as "same product".

    Why ``threshold = margin / 2`` (0.5 for the default margin 1.0): it is
    where the contrastive loss's two branches are equal (``d² = (m − d)²``),
    the distance below which the loss prefers calling a pair a match. On unit
    embeddings ``d < 0.5`` means an angle below about 29°. A pair exactly at
    the threshold is predicted "not a match".

    Args:
        threshold: float. In (0, 2]. Defaults to 0.5.
        name: str. Defaults to ``"pair_accuracy"``.
        dtype: the metric's dtype. Defaults to None (floatx).

    Example:
    >>> m = PairAccuracy(threshold=0.5)
    >>> m.update_state(np.array([1, 1, 0, 0]), np.array([0.2, 0.7, 0.9, 0.4]))
    >>> float(m.result())  # -> 0.5
    """

    def __init__(self, threshold: float = 0.5, name: str = "pair_accuracy", dtype: Any = None) -> None:
        checked = _check_optional("threshold", threshold, 0.0, 2.0)
        if checked is None:
            raise ConfigError(f"threshold must be a number in (0, 2]. Received: threshold={threshold!r}")
        super().__init__(name=name, dtype=dtype)
        self.threshold = checked

    def terms(self, y_true: Any, distance: Any) -> tuple[Any, Any]:
        predicted = ops.less(distance, self.threshold)
        correct = ops.cast(ops.equal(predicted, pair_labels(y_true)), "float32")
        return correct, ops.ones_like(correct)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "threshold": self.threshold}


@keras.saving.register_keras_serializable(package="street2shop")
class PositiveDropRate(_RatioMetric):
    """Fraction of the positive pairs that the robust contrastive loss dropped this epoch.

    Takes the loss's positive threshold and quantile (build it with
    :meth:`from_loss` so the two cannot drift apart); the decision is
    :func:`street2shop.losses.robust_contrastive_terms`'s, batch by batch.

    Args:
        positive_threshold: float or None. Fixed τ in (0, 2]. Defaults to None.
        positive_quantile: float or None. q in (0, 1]. Defaults to 0.9.
        name: str. Defaults to ``"positive_drop_rate"``.
        dtype: the metric's dtype. Defaults to None (floatx).

    Example:
    >>> m = PositiveDropRate(positive_threshold=0.8, positive_quantile=None)
    >>> m.update_state(np.array([1, 1, 1, 0]), np.array([0.2, 0.8, 0.9, 0.1]))
    >>> float(m.result())  # -> 2 / 3
    """

    def __init__(
        self,
        positive_threshold: float | None = None,
        positive_quantile: float | None = 0.9,
        name: str = "positive_drop_rate",
        dtype: Any = None,
    ) -> None:
        _, threshold, _, quantile = check_robust_args(1.0, positive_threshold, None, positive_quantile)
        super().__init__(name=name, dtype=dtype)
        self.positive_threshold = threshold
        self.positive_quantile = quantile
        _untracked(self, "active", None)

    @classmethod
    def from_loss(cls, loss: Any, name: str | None = None) -> PositiveDropRate:
        """The metric for ``loss`` (a RobustContrastiveLoss; any loss without these attributes drops nothing).

        Shares the loss's warm-up switch (``loss.active``) as it is now: set
        the loss's ``active`` before calling this. ``name`` defaults to the
        class's own default.
        """
        metric = cls(
            positive_threshold=getattr(loss, "positive_threshold", None),
            positive_quantile=getattr(loss, "positive_quantile", None),
            **({} if name is None else {"name": name}),
        )
        _untracked(metric, "active", getattr(loss, "active", None))
        return metric

    def terms(self, y_true: Any, distance: Any) -> tuple[Any, Any]:
        _, dropped, _ = robust_contrastive_terms(
            y_true, distance, positive_threshold=self.positive_threshold, positive_quantile=self.positive_quantile,
            active=drop_active(self.active),
        )
        return dropped, pair_labels(y_true)

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "positive_threshold": self.positive_threshold,
            "positive_quantile": self.positive_quantile,
        }


def corrupted_positives(y_true: Any) -> Any:
    """``y_true`` as a boolean ``[B]`` tensor: True for a positive known to be corrupted (``y > 1.5``).

    Label-noise benchmarks label such pairs 2 (``street2shop.data.pairs.CORRUPTED_POSITIVE``);
    ordinary data has none, and then the metrics below read 0.
    """
    return ops.greater(ops.cast(ops.convert_to_tensor(y_true), "float32"), 1.5)


@keras.saving.register_keras_serializable(package="street2shop")
class PositiveDropPrecision(PositiveDropRate):
    """Of the positives the robust loss dropped this epoch, the share known to be corrupted (label-noise benchmarks).

    ``Σ(dropped ∧ corrupted) / Σ(dropped)``, where a corrupted positive is a
    pair labelled 2 (see :func:`corrupted_positives`); compare it with the
    noise rate p, what a drop at random would give. 0 while nothing was
    dropped (see the drop rate) and on data without corruption flags.
    Dropped auxiliary positives count too (they are never corrupted). Same
    arguments as :class:`PositiveDropRate`; build it with ``from_loss``.

    Example:
    >>> m = PositiveDropPrecision(positive_threshold=0.8, positive_quantile=None)
    >>> m.update_state(np.array([1, 2, 2, 1, 0]), np.array([0.9, 1.0, 0.2, 0.1, 1.5]))
    >>> float(m.result())  # dropped: 0.9 (clean) and 1.0 (corrupted) -> 1 / 2
    """

    def __init__(self, positive_threshold: float | None = None, positive_quantile: float | None = 0.9,
                 name: str = "positive_drop_precision", dtype: Any = None) -> None:
        super().__init__(positive_threshold=positive_threshold, positive_quantile=positive_quantile, name=name, dtype=dtype)

    def terms(self, y_true: Any, distance: Any) -> tuple[Any, Any]:
        dropped, _ = super().terms(y_true, distance)
        return ops.logical_and(dropped, corrupted_positives(y_true)), dropped


@keras.saving.register_keras_serializable(package="street2shop")
class PositiveDropRecall(PositiveDropRate):
    """Of the corrupted positives seen this epoch, the share the robust loss dropped (label-noise benchmarks).

    ``Σ(dropped ∧ corrupted) / Σ(corrupted)`` (see :class:`PositiveDropPrecision`);
    0 on data without corruption flags.

    Example:
    >>> m = PositiveDropRecall(positive_threshold=0.8, positive_quantile=None)
    >>> m.update_state(np.array([1, 2, 2, 1, 0]), np.array([0.9, 1.0, 0.2, 0.1, 1.5]))
    >>> float(m.result())  # corrupted: 1.0 (dropped) and 0.2 (kept) -> 1 / 2
    """

    def __init__(self, positive_threshold: float | None = None, positive_quantile: float | None = 0.9,
                 name: str = "positive_drop_recall", dtype: Any = None) -> None:
        super().__init__(positive_threshold=positive_threshold, positive_quantile=positive_quantile, name=name, dtype=dtype)

    def terms(self, y_true: Any, distance: Any) -> tuple[Any, Any]:
        dropped, _ = super().terms(y_true, distance)
        corrupted = corrupted_positives(y_true)
        return ops.logical_and(dropped, corrupted), corrupted


@keras.saving.register_keras_serializable(package="street2shop")
class MeanCorruptedPositiveDistance(_RatioMetric):
    """Mean distance of the positives known to be corrupted (label 2) this epoch; 0 without any.

    Example:
    >>> m = MeanCorruptedPositiveDistance()
    >>> m.update_state(np.array([1, 2, 2, 0]), np.array([0.2, 1.0, 0.6, 1.2]))
    >>> float(m.result())  # -> 0.8
    """

    def __init__(self, name: str = "mean_corrupted_positive_distance", dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)

    def terms(self, y_true: Any, distance: Any) -> tuple[Any, Any]:
        corrupted = ops.cast(corrupted_positives(y_true), "float32")
        return corrupted * distance, corrupted


@keras.saving.register_keras_serializable(package="street2shop")
class MeanCleanPositiveDistance(_RatioMetric):
    """Mean distance of the positives not known to be corrupted (label 1) this epoch.

    Example:
    >>> m = MeanCleanPositiveDistance()
    >>> m.update_state(np.array([1, 1, 2, 0]), np.array([0.2, 0.4, 1.0, 1.2]))
    >>> float(m.result())  # -> 0.3
    """

    def __init__(self, name: str = "mean_clean_positive_distance", dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)

    def terms(self, y_true: Any, distance: Any) -> tuple[Any, Any]:
        clean = ops.cast(ops.logical_and(pair_labels(y_true), ops.logical_not(corrupted_positives(y_true))), "float32")
        return clean * distance, clean


class _DistanceHistogram(keras.metrics.Metric):
    """Counts of pair distances in ``bins`` equal bins over ``[0, 2]`` (the range of unit embeddings), one row per group.

    Distances beyond 2 (round-off) count in the last bin. Subclasses say which
    pairs fall in which group and what the result is.
    """

    groups = 1

    def __init__(self, bins: int = 400, name: str | None = None, dtype: Any = None) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ConfigError(f"bins must be an int >= 2. Received: bins={bins!r}")
        super().__init__(name=name, dtype=dtype)
        self.bins = bins
        self.histogram = self.add_variable(shape=(self.groups, bins), initializer="zeros", dtype="float32", name="histogram")

    def group_masks(self, y_true: Any) -> list[Any]:
        raise NotImplementedError

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        distance = ops.cast(pair_distances(y_pred), "float32")
        index = ops.clip(ops.cast(ops.floor(distance * (self.bins / 2.0)), "int32"), 0, self.bins - 1)
        one_hot = ops.one_hot(index, self.bins, dtype="float32")  # [B, bins]
        weight = None
        if sample_weight is not None:
            weight = ops.broadcast_to(ops.reshape(ops.cast(sample_weight, "float32"), (-1,)), ops.shape(distance))
        rows = []
        for mask in self.group_masks(y_true):
            mask = ops.cast(mask, "float32") if weight is None else ops.cast(mask, "float32") * weight
            rows.append(ops.sum(one_hot * mask[:, None], axis=0))
        self.histogram.assign_add(ops.stack(rows))


@keras.saving.register_keras_serializable(package="street2shop")
class PositiveDistanceQuantile(_DistanceHistogram):
    """The ``quantile`` of the positive pairs' distances seen this epoch, from a histogram (bin width ``2 / bins``).

    Linear inside the bin where the quantile falls; 0 before any positive. A
    fixed robust threshold τ can be read off it: e.g. τ = the ``1 − p``
    quantile at the end of a warm-up drops about a share p of the positives
    seen then.

    Args:
        quantile: float. In (0, 1].
        bins: int. Histogram bins over [0, 2]. Defaults to 400 (width 0.005).
        name: str. Defaults to ``"positive_distance_q{100·quantile}"``.
        dtype: the metric's dtype. Defaults to None (floatx).

    Example:
    >>> m = PositiveDistanceQuantile(0.6, bins=4)  # bins of width 0.5
    >>> m.update_state(np.array([1, 1, 1, 1, 0]), np.array([0.1, 0.2, 0.6, 1.2, 0.3]))
    >>> float(m.result())  # 2.4 of 4 positives: 0.4 of the way through bin [0.5, 1) -> 0.7
    """

    def __init__(self, quantile: float = 0.5, bins: int = 400, name: str | None = None, dtype: Any = None) -> None:
        checked = _check_optional("quantile", quantile, 0.0, 1.0)
        if checked is None:
            raise ConfigError(f"quantile must be a number in (0, 1]. Received: quantile={quantile!r}")
        super().__init__(bins=bins, name=name or f"positive_distance_q{round(100 * checked):d}", dtype=dtype)
        self.quantile = checked

    def group_masks(self, y_true: Any) -> list[Any]:
        return [pair_labels(y_true)]

    def result(self) -> Any:
        counts = self.histogram[0]
        target = self.quantile * ops.sum(counts)
        cumulative = ops.cumsum(counts)
        index = ops.argmax(ops.cast(ops.greater_equal(cumulative, target), "int32"))
        in_bin = ops.take(counts, index)
        before = ops.take(cumulative, index) - in_bin
        fraction = ops.divide_no_nan(target - before, in_bin)
        value = (ops.cast(index, "float32") + fraction) * (2.0 / self.bins)
        return ops.where(ops.sum(counts) > 0, value, 0.0)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "quantile": self.quantile, "bins": self.bins}


@keras.saving.register_keras_serializable(package="street2shop")
class CorruptedPositiveAUC(_DistanceHistogram):
    """How well distance alone tells corrupted positives from clean ones this epoch (label-noise benchmarks).

    The probability that a corrupted positive (label 2) lies farther apart
    than a clean one (label 1), ties counting one half, from histograms (two
    distances in one bin tie): 0.5 = no separation, 1 = every corrupted pair
    beyond every clean one. It bounds what any drop rule on distance can do.
    0 until both kinds have been seen.

    Args:
        bins: int. Histogram bins over [0, 2]. Defaults to 400 (width 0.005).
        name: str. Defaults to ``"corrupted_positive_auc"``.
        dtype: the metric's dtype. Defaults to None (floatx).

    Example:
    >>> m = CorruptedPositiveAUC(bins=4)
    >>> m.update_state(np.array([1, 1, 2, 2]), np.array([0.1, 0.6, 0.6, 1.2]))
    >>> float(m.result())  # of the 4 (corrupted, clean) pairs: 3 farther, 1 tie -> 3.5 / 4
    """

    groups = 2

    def __init__(self, bins: int = 400, name: str = "corrupted_positive_auc", dtype: Any = None) -> None:
        super().__init__(bins=bins, name=name, dtype=dtype)

    def group_masks(self, y_true: Any) -> list[Any]:
        corrupted = corrupted_positives(y_true)
        return [ops.logical_and(pair_labels(y_true), ops.logical_not(corrupted)), corrupted]

    def result(self) -> Any:
        clean, corrupted = self.histogram[0], self.histogram[1]
        clean_below = ops.cumsum(clean) - clean
        wins = ops.sum(corrupted * (clean_below + 0.5 * clean))
        return ops.divide_no_nan(wins, ops.sum(clean) * ops.sum(corrupted))

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "bins": self.bins}


@keras.saving.register_keras_serializable(package="street2shop")
class NegativeDropRate(_RatioMetric):
    """Fraction of the negative pairs that the robust contrastive loss dropped (``d < negative_floor``) this epoch.

    Args:
        negative_floor: float or None. ν in (0, 2]; None reports 0. Defaults to None.
        name: str. Defaults to ``"negative_drop_rate"``.
        dtype: the metric's dtype. Defaults to None (floatx).

    Example:
    >>> m = NegativeDropRate(negative_floor=0.3)
    >>> m.update_state(np.array([0, 0, 0, 1]), np.array([0.1, 0.3, 0.9, 0.1]))
    >>> float(m.result())  # -> 1 / 3
    """

    def __init__(self, negative_floor: float | None = None, name: str = "negative_drop_rate", dtype: Any = None) -> None:
        floor = _check_optional("negative_floor", negative_floor, 0.0, 2.0)
        super().__init__(name=name, dtype=dtype)
        self.negative_floor = floor
        _untracked(self, "active", None)

    @classmethod
    def from_loss(cls, loss: Any, name: str = "negative_drop_rate") -> NegativeDropRate:
        """The drop rate of ``loss`` (a RobustContrastiveLoss; any loss without a floor gives 0); shares ``loss.active``."""
        metric = cls(negative_floor=getattr(loss, "negative_floor", None), name=name)
        _untracked(metric, "active", getattr(loss, "active", None))
        return metric

    def terms(self, y_true: Any, distance: Any) -> tuple[Any, Any]:
        # The floor's rule does not depend on the margin; pass one above any floor.
        _, _, dropped = robust_contrastive_terms(
            y_true, distance, margin=3.0, negative_floor=self.negative_floor, active=drop_active(self.active)
        )
        return dropped, ops.logical_not(pair_labels(y_true))

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "negative_floor": self.negative_floor}


@keras.saving.register_keras_serializable(package="street2shop")
class MaskedSparseCategoricalAccuracy(_RatioMetric):
    """Top-1 accuracy of class logits over the labelled samples only (label ``ignore_class`` = no class).

    The companion of :class:`street2shop.losses.MaskedSparseCategoricalCrossentropy`
    on the ``logits_a``/``logits_b`` outputs: Keras'
    ``SparseCategoricalAccuracy`` has no ``ignore_class`` and counts every
    unlabelled image as a miss. 0 until a labelled sample has been seen.

    Args:
        ignore_class: int. Label of the unlabelled samples. Defaults to -1.
        name: str. Defaults to ``"accuracy"``.
        dtype: the metric's dtype. Defaults to None (floatx).

    Example:
    >>> m = MaskedSparseCategoricalAccuracy()
    >>> m.update_state(np.array([0, -1, 1]), np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]]))
    >>> float(m.result())  # -> 0.5
    """

    def __init__(self, ignore_class: int = -1, name: str = "accuracy", dtype: Any = None) -> None:
        if isinstance(ignore_class, bool) or not isinstance(ignore_class, int):
            raise ConfigError(f"ignore_class must be an int. Received: ignore_class={ignore_class!r}")
        super().__init__(name=name, dtype=dtype)
        self.ignore_class = ignore_class

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        labels = ops.reshape(ops.cast(ops.convert_to_tensor(y_true), "int32"), (-1,))
        predicted = ops.cast(ops.argmax(ops.convert_to_tensor(y_pred), axis=-1), "int32")
        labelled = ops.cast(ops.not_equal(labels, self.ignore_class), "float32")
        correct = ops.cast(ops.equal(labels, predicted), "float32") * labelled
        if sample_weight is not None:
            weight = ops.broadcast_to(ops.reshape(ops.cast(sample_weight, "float32"), (-1,)), ops.shape(labelled))
            correct = correct * weight
            labelled = labelled * weight
        self.total.assign_add(ops.sum(correct))
        self.count.assign_add(ops.sum(labelled))

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "ignore_class": self.ignore_class}
