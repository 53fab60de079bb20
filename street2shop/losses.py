"""Contrastive losses on pair distances, and the masked softmax loss of the auxiliary task.

The pair losses read ``y_true`` (1 = the two images show the same product,
0 = they do not; read as a match iff ``y > 0.5``) and ``y_pred`` = the
distance ``d = ||f(a) - f(b)||₂`` between the two L2-normalised embeddings
(so ``d ∈ [0, 2]``; two unrelated embeddings in many dimensions sit near
``√2``, i.e. 90° apart). Both may be ``[B]`` or ``[B, 1]``, float or int. The
functions return one loss per pair, shape ``[B]``; the ``Loss`` classes are what
``model.compile`` sees on the ``"distance"`` output.

- contrastive: ``y·d² + (1−y)·max(0, m − d)²``
- robust contrastive: ``y·[d < τ]·d² + (1−y)·[d ≥ ν]·max(0, m − d)²``

:func:`robust_contrastive_terms` is the one place the robust loss decides which
pairs to drop; the loss and the drop-rate metrics in :mod:`street2shop.metrics`
both call it, so they can never disagree.

References: Wang, Sun, Zhang, Zhou, Jiang, "Matching User Photos to Online
Products with Robust Deep Features", ICMR 2016 (robust contrastive loss,
multi-task fine-tuning); Hadsell, Chopra, LeCun, CVPR 2006 (contrastive loss).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import keras
from keras import ops

from street2shop.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Subtracted from q·n before rounding up, so that float32 round-off (0.9 * 10 =
# 9.0000002) cannot turn "keep 9 of 10" into "keep 10 of 10".
_QUANTILE_SLACK = 1e-3


# ----------------------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_margin(margin: Any) -> float:
    if not _is_number(margin) or not margin > 0:
        raise ConfigError(f"margin must be a finite number > 0 (at most 2 is meaningful for unit embeddings). Received: margin={margin!r}")
    return float(margin)


def _check_optional(name: str, value: Any, low: float, high: float, low_open: bool = True) -> float | None:
    if value is None:
        return None
    ok = _is_number(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must be None or a number in {bracket}{low:g}, {high:g}]. Received: {name}={value!r}")
    return float(value)


def check_robust_args(
    margin: Any = 1.0,
    positive_threshold: Any = None,
    negative_floor: Any = None,
    positive_quantile: Any = None,
) -> tuple[float, float | None, float | None, float | None]:
    """Validates the robust contrastive loss's arguments; returns them as floats (or None).

    Raises:
        ConfigError: ``margin <= 0``; a threshold or floor outside ``(0, 2]``;
            ``negative_floor >= margin`` (it would drop every negative that has
            a loss); ``positive_quantile`` outside ``(0, 1]``.
    """
    margin = _check_margin(margin)
    positive_threshold = _check_optional("positive_threshold", positive_threshold, 0.0, 2.0)
    negative_floor = _check_optional("negative_floor", negative_floor, 0.0, 2.0)
    positive_quantile = _check_optional("positive_quantile", positive_quantile, 0.0, 1.0)
    if negative_floor is not None and negative_floor >= margin:
        raise ConfigError(
            "negative_floor must be below margin (negatives at d >= margin have no loss anyway, so a floor "
            f"there would drop every negative). Received: negative_floor={negative_floor!r}, margin={margin!r}"
        )
    return margin, positive_threshold, negative_floor, positive_quantile


# ----------------------------------------------------------------------------- tensors


def _as_pairs(x: Any, name: str, dtype: str | None = None) -> Any:
    """``x`` as a rank-1 ``[B]`` tensor (accepts ``[B]`` or ``[B, 1]``)."""
    x = ops.convert_to_tensor(x)
    if dtype is not None:
        x = ops.cast(x, dtype)
    rank = len(x.shape)
    if rank == 2 and x.shape[-1] == 1:
        x = ops.squeeze(x, axis=-1)
    elif rank != 1:
        raise DataError(f"{name} must have shape [B] or [B, 1] (one value per pair). Received: {name}.shape={tuple(x.shape)}")
    return x


def pair_distances(distance: Any) -> Any:
    """``distance`` as a float ``[B]`` tensor (accepts ``[B]`` or ``[B, 1]``)."""
    d = ops.convert_to_tensor(distance)
    if "float" not in str(d.dtype):
        d = ops.cast(d, keras.backend.floatx())
    return _as_pairs(d, "distance")


def pair_labels(y_true: Any) -> Any:
    """``y_true`` as a boolean ``[B]`` tensor: True for a matching pair (``y > 0.5``)."""
    y = _as_pairs(y_true, "y_true", dtype="float32")
    return ops.greater(y, 0.5)


def batch_positive_threshold(is_positive: Any, distance: Any, positive_quantile: float) -> Any:
    """The batch's positive threshold ``τ_batch`` for ``positive_quantile`` q (a scalar, no gradient).

    With ``n`` positives in the batch, ``τ_batch`` is the ``(k+1)``-th smallest
    positive distance, ``k = ceil(q·n)``, so the rule "drop ``d ≥ τ``" keeps the
    ``k`` closest positives and drops the other ``n − k`` (``floor((1−q)·n)``,
    barring float round-off and ties). ``+inf`` (nothing dropped) when
    ``k = n``: no positive in the batch, ``q = 1``, or too few positives to
    drop a whole one (with q = 0.9: fewer than 10 positives). Ties with the
    ``(k+1)``-th distance are dropped with it.
    """
    d = ops.stop_gradient(distance)
    inf = ops.full((1,), float("inf"), dtype=d.dtype)
    # Non-positives sort last as +inf; one more +inf at the end for k == B.
    ranked = ops.concatenate([ops.sort(ops.where(is_positive, d, inf[0])), inf], axis=0)
    n = ops.cast(ops.sum(ops.cast(is_positive, "int32")), "float32")
    k = ops.cast(ops.ceil(ops.maximum(positive_quantile * n - _QUANTILE_SLACK, 0.0)), "int32")
    return ops.stop_gradient(ops.take(ranked, k))


def robust_contrastive_terms(
    y_true: Any,
    distance: Any,
    margin: float = 1.0,
    positive_threshold: float | None = None,
    negative_floor: float | None = None,
    positive_quantile: float | None = None,
    active: Any = None,
) -> tuple[Any, Any, Any]:
    """The robust contrastive loss per pair, and which pairs it dropped.

    A positive pair is dropped when ``d ≥ τ_eff`` (a pair exactly at the
    threshold is dropped: only ``d < τ`` is kept), where ``τ_eff`` is:

    - ``positive_threshold`` τ alone: τ;
    - ``positive_quantile`` q alone: ``τ_batch`` (see :func:`batch_positive_threshold`);
    - both: ``max(τ, τ_batch)``, i.e. a positive is dropped only if it is
      beyond the fixed threshold *and* in the batch's far tail. The quantile
      then caps the fraction dropped (the fixed τ alone drops every positive
      at initialisation, when all distances are ≈1.2), and τ protects
      positives that are close in absolute terms (the quantile alone always
      drops its fraction, even when every positive is already close).
    - neither: nothing (the plain contrastive loss).

    A negative pair is dropped when ``d < negative_floor`` (``d == ν`` is kept).
    While ``active`` is false (a warm-up), nothing is dropped: the loss is the
    plain contrastive loss. Dropped pairs have a loss of exactly 0 and a
    gradient of exactly 0: the masks come from comparisons on stop-gradient
    distances and multiply ``d²`` (resp. the hinge), so no gradient flows
    through them. Negatives at ``d ≥ margin`` have a zero loss and a zero
    gradient through the hinge.

    Args:
        y_true: ``[B]`` or ``[B, 1]``, 1 for a matching pair, 0 otherwise.
        distance: ``[B]`` or ``[B, 1]`` float distances.
        margin: float. m > 0.
        positive_threshold: float or None. τ in (0, 2].
        negative_floor: float or None. ν in (0, margin).
        positive_quantile: float or None. q in (0, 1].
        active: None (always active) or a scalar boolean tensor: whether
            pairs may be dropped at all (false during a warm-up).

    Returns:
        ``(loss, positive_dropped, negative_dropped)``: float ``[B]`` and two
        boolean ``[B]`` masks.
    """
    margin, positive_threshold, negative_floor, positive_quantile = check_robust_args(
        margin, positive_threshold, negative_floor, positive_quantile
    )
    d = pair_distances(distance)
    is_positive = pair_labels(y_true)
    is_negative = ops.logical_not(is_positive)
    d_const = ops.stop_gradient(d)

    threshold = None
    if positive_quantile is not None:
        threshold = batch_positive_threshold(is_positive, d_const, positive_quantile)
        if positive_threshold is not None:
            threshold = ops.maximum(threshold, ops.cast(positive_threshold, d.dtype))
    elif positive_threshold is not None:
        threshold = ops.cast(positive_threshold, d.dtype)
    if threshold is None:
        positive_dropped = ops.zeros_like(is_positive)
    else:
        positive_dropped = ops.logical_and(is_positive, ops.greater_equal(d_const, threshold))
    if negative_floor is None:
        negative_dropped = ops.zeros_like(is_negative)
    else:
        negative_dropped = ops.logical_and(is_negative, ops.less(d_const, ops.cast(negative_floor, d.dtype)))
    if active is not None:
        active = ops.cast(active, "bool")
        positive_dropped = ops.logical_and(positive_dropped, active)
        negative_dropped = ops.logical_and(negative_dropped, active)

    positive_kept = ops.cast(ops.logical_and(is_positive, ops.logical_not(positive_dropped)), d.dtype)
    negative_kept = ops.cast(ops.logical_and(is_negative, ops.logical_not(negative_dropped)), d.dtype)
    hinge = ops.maximum(ops.cast(margin, d.dtype) - d, 0.0)
    loss = positive_kept * ops.square(d) + negative_kept * ops.square(hinge)
    return loss, positive_dropped, negative_dropped


def drop_active(active: Any) -> Any:
    """``active`` (None, a bool, or a 0/1 scalar variable) as what :func:`robust_contrastive_terms` takes."""
    if active is None:
        return None
    return ops.greater(ops.convert_to_tensor(active, dtype="float32"), 0.5)


def robust_contrastive_loss(
    y_true: Any,
    distance: Any,
    margin: float = 1.0,
    positive_threshold: float | None = None,
    negative_floor: float | None = None,
    positive_quantile: float | None = None,
) -> Any:
    """Per-pair robust contrastive loss ``y·[d < τ]·d² + (1−y)·[d ≥ ν]·max(0, m − d)²``, shape ``[B]``.

    See :func:`robust_contrastive_terms` for which pairs are dropped (a
    positive exactly at τ is dropped; ``max(τ, τ_batch)`` when both a threshold
    and a quantile are given). Why a quantile: measured on real data, trained
    embeddings settle in a small cap of the sphere (positives' median
    ``d ≈ 0.22``, 99th percentile ``≈ 0.8``), so a fixed ``τ ≥ 1`` drops
    nothing, while at initialisation every distance is ``≈ 1.2``, so
    ``τ = 0.8`` drops every positive and training stalls; a batch quantile
    drops a known fraction at every stage of training.

    Example:
    >>> robust_contrastive_loss([1, 1, 0], [0.5, 0.9, 0.3], positive_threshold=0.8)
    >>> # -> [0.25, 0.0, 0.49]
    """
    return robust_contrastive_terms(y_true, distance, margin, positive_threshold, negative_floor, positive_quantile)[0]


def contrastive_loss(y_true: Any, distance: Any, margin: float = 1.0) -> Any:
    """Per-pair contrastive loss ``y·d² + (1−y)·max(0, m − d)²``, shape ``[B]``.

    Example:
    >>> contrastive_loss([1, 0, 0], [0.5, 0.3, 1.2])  # -> [0.25, 0.49, 0.0]
    """
    return robust_contrastive_terms(y_true, distance, margin)[0]


def masked_sparse_categorical_crossentropy(y_true: Any, logits: Any, ignore_class: int = -1) -> Any:
    """Per-sample softmax cross-entropy from logits, 0 for samples labelled ``ignore_class``.

    A thin call of ``keras.losses.sparse_categorical_crossentropy(...,
    from_logits=True, ignore_class=...)``, which already zeroes the ignored
    samples and attaches a Keras mask to the result (used by the ``Loss``
    class to average over labelled samples only).

    Args:
        y_true: int or float ``[B]`` or ``[B, 1]`` class indices, ``ignore_class`` for none.
        logits: float ``[B, C]``.
        ignore_class: int. The label that means "no class".

    Returns:
        float ``[B]``.
    """
    if isinstance(ignore_class, bool) or not isinstance(ignore_class, int):
        raise ConfigError(f"ignore_class must be an int. Received: ignore_class={ignore_class!r}")
    logits = ops.convert_to_tensor(logits)
    return keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True, ignore_class=ignore_class)


# ----------------------------------------------------------------------------- Loss classes


@keras.saving.register_keras_serializable(package="street2shop")
class ContrastiveLoss(keras.losses.Loss):
    """Contrastive loss on the distance between two L2-normalised embeddings.

    Per pair ``y·d² + (1−y)·max(0, m − d)²``, averaged over the batch by
    Keras' reduction (``sum_over_batch_size``: ``Σ w·loss / B``, sample
    weights honoured).

    Why margin 1.0: on unit vectors ``d = √(2 − 2·cos θ)``, so ``d < 1`` means
    ``θ < 60°``. Unrelated embeddings sit near ``√2`` (90°), beyond the
    margin, and cost nothing; only negatives closer than 60° are pushed out.
    That leaves a wide gap to the positives (their median is ``d ≈ 0.22`` on
    real data) without asking every pair of products to be orthogonal
    (margin ``√2``) or opposite (margin 2).

    Args:
        margin: float. m > 0. Defaults to 1.0.
        reduction: str. Keras reduction. Defaults to ``"sum_over_batch_size"``.
        name: str. Defaults to ``"contrastive_loss"``.

    Example:
    >>> loss = ContrastiveLoss(margin=1.0)
    >>> float(loss(np.array([1.0, 0.0]), np.array([0.5, 0.3])))  # -> (0.25 + 0.49) / 2 = 0.37

    Reference: Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning
    an Invariant Mapping", CVPR 2006.
    """

    def __init__(self, margin: float = 1.0, reduction: str | None = "sum_over_batch_size", name: str = "contrastive_loss") -> None:
        super().__init__(name=name, reduction=reduction)
        self.margin = _check_margin(margin)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return contrastive_loss(y_true, y_pred, margin=self.margin)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "reduction": self.reduction, "margin": self.margin}


@keras.saving.register_keras_serializable(package="street2shop")
class RobustContrastiveLoss(keras.losses.Loss):
    """Robust contrastive loss: the contrastive loss without the positives that are already too far apart.

    Per pair ``y·[d < τ]·d² + (1−y)·[d ≥ ν]·max(0, m − d)²``; dropped pairs
    have exactly zero loss and gradient and still count in the batch-size
    denominator (so the kept pairs' gradients do not grow when more are
    dropped). A positive exactly at the threshold is dropped. See
    :func:`robust_contrastive_terms` for the rules, including
    ``max(τ, τ_batch)`` when both ``positive_threshold`` and
    ``positive_quantile`` are given. The quantile is taken over every positive
    of the batch, whatever its sample weight; under a distribution strategy,
    over each replica's share of the batch.

    Why these defaults: margin 1.0 as in :class:`ContrastiveLoss` (negatives
    closer than 60° are pushed out). ``positive_quantile=0.9`` and no fixed
    threshold: measured on real data, trained embeddings settle in a small cap
    of the sphere (positives' median ``d ≈ 0.22``, 99th percentile ``≈ 0.8``),
    so a fixed ``τ ≥ 1`` drops nothing, while at initialisation every
    distance is ``≈ 1.2``, so ``τ = 0.8`` drops every positive and training
    stalls. The 0.9 quantile drops the farthest tenth of each batch's
    positives at every stage (the label noise and the views too different to
    match), and nothing from a batch with fewer than 10 positives.

    Warm-up: set :attr:`active` to a scalar variable (1 = may drop, 0 =
    plain contrastive loss) and switch it on after a few epochs; that is what
    ``street2shop train --drop-warmup-epochs N`` does (see
    :class:`DropWarmup`). The quantile at initialisation
    ranks distances that are all ≈1.2 and mostly noise, so the pairs it
    drops there are not yet the hard or mislabelled ones. ``active`` is
    runtime state, not configuration: it is not in :meth:`get_config`, and a
    reloaded loss drops from the first step.

    Args:
        margin: float. m > 0. Defaults to 1.0.
        positive_threshold: float or None. Fixed τ in (0, 2]. Defaults to None.
        negative_floor: float or None. ν in (0, margin): negatives closer than
            this are taken as label noise and dropped. Defaults to None.
        positive_quantile: float or None. q in (0, 1]: τ_batch is the batch
            quantile described in :func:`batch_positive_threshold`. Defaults to 0.9.
        reduction: str. Keras reduction. Defaults to ``"sum_over_batch_size"``.
        name: str. Defaults to ``"robust_contrastive_loss"``.

    Example:
    >>> loss = RobustContrastiveLoss(positive_threshold=0.8, positive_quantile=None)
    >>> float(loss(np.array([1.0, 1.0, 0.0]), np.array([0.5, 0.9, 0.3])))  # -> (0.25 + 0 + 0.49) / 3

    Reference: Wang, Sun, Zhang, Zhou, Jiang, "Matching User Photos to Online
    Products with Robust Deep Features", ICMR 2016.
    """

    def __init__(
        self,
        margin: float = 1.0,
        positive_threshold: float | None = None,
        negative_floor: float | None = None,
        positive_quantile: float | None = 0.9,
        reduction: str | None = "sum_over_batch_size",
        name: str = "robust_contrastive_loss",
    ) -> None:
        super().__init__(name=name, reduction=reduction)
        self.margin, self.positive_threshold, self.negative_floor, self.positive_quantile = check_robust_args(
            margin, positive_threshold, negative_floor, positive_quantile
        )
        self.active: Any = None

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return robust_contrastive_terms(
            y_true, y_pred, self.margin, self.positive_threshold, self.negative_floor, self.positive_quantile,
            active=drop_active(self.active),
        )[0]

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reduction": self.reduction,
            "margin": self.margin,
            "positive_threshold": self.positive_threshold,
            "negative_floor": self.negative_floor,
            "positive_quantile": self.positive_quantile,
        }


def drop_switch(on: bool = False) -> Any:
    """A scalar variable for :attr:`RobustContrastiveLoss.active` (create it under the strategy's scope)."""
    return keras.Variable(1.0 if on else 0.0, dtype="float32", trainable=False, name="robust_drop_active")


@keras.saving.register_keras_serializable(package="street2shop")
class MaskedSparseCategoricalCrossentropy(keras.losses.SparseCategoricalCrossentropy):
    """Softmax cross-entropy that ignores unlabelled samples and averages over the labelled ones.

    Keras 3's own ``SparseCategoricalCrossentropy(ignore_class=-1)`` is
    enough, so this is it with the defaults the siamese model needs (logits,
    -1 = no class): its per-sample loss is 0 for ignored samples and carries a
    Keras mask, and Keras' ``"sum_over_batch_size"`` reduction then divides
    by the number of *labelled* samples (``Σ w·loss / n_labelled``, sample
    weights honoured), not by the batch size; a batch without any labelled
    sample gives 0, not NaN. So the multi-task weight ``w_cls`` does not
    depend on how many images of a batch carry a class.

    Args:
        from_logits: bool. Defaults to True (the model outputs logits).
        ignore_class: int. Label of the unlabelled samples. Defaults to -1.
        reduction: str. Keras reduction. Defaults to ``"sum_over_batch_size"``.
        name: str. Defaults to ``"masked_sparse_categorical_crossentropy"``.

    Example:
    >>> loss = MaskedSparseCategoricalCrossentropy()
    >>> float(loss(np.array([0, -1]), np.array([[2.0, 0.0], [0.0, 5.0]])))  # -> log(1 + e^-2) ≈ 0.127
    """

    def __init__(
        self,
        from_logits: bool = True,
        ignore_class: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str = "masked_sparse_categorical_crossentropy",
    ) -> None:
        if not isinstance(from_logits, bool):
            raise ConfigError(f"from_logits must be a bool. Received: from_logits={from_logits!r}")
        if isinstance(ignore_class, bool) or not isinstance(ignore_class, int):
            raise ConfigError(f"ignore_class must be an int. Received: ignore_class={ignore_class!r}")
        super().__init__(from_logits=from_logits, ignore_class=ignore_class, reduction=reduction, name=name)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "reduction": self.reduction, "from_logits": self.from_logits, "ignore_class": self.ignore_class}
