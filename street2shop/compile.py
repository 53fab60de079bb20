"""What ``model.compile`` gets from a :class:`~street2shop.config.TrainConfig`, and the compiled siamese model.

- the pair loss (contrastive or robust, with its warm-up switch) and the
  softmax losses of a class head, with their weights;
- the metrics: pair metrics, drop rates of the robust loss, and on data with
  corruption flags the drop's precision and recall (:data:`NOISE_QUANTILES`);
- the optimizer (AdamW or SGD, the backbone's own learning rate) and its
  learning-rate schedule;
- :func:`build_model`: the tower and the siamese model around it, built under
  the run's dtype policy (``precision``), compiled with its XLA setting
  (``jit_compile``) by :func:`compile_model` (call it under the strategy's scope).

A new setting of any of these is one config field read here.
"""

from __future__ import annotations

from typing import Any

from street2shop.config import TrainConfig

NOISE_QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9)  # positive-distance quantiles logged on data with corruption flags


def build_model(config: TrainConfig, num_classes: int | None, label_noise: bool = False) -> Any:
    """The compiled siamese model (call under the strategy's scope); ``label_noise``: see :func:`build_losses_and_metrics`.

    Built under the run's dtype policy (``config.fit.precision``, see
    :mod:`street2shop.model.precision`; the caller's own policy is left as it
    was), then compiled by :func:`compile_model`.
    """
    from street2shop.model.precision import precision_scope
    from street2shop.model.siamese import build_siamese
    from street2shop.model.tower import build_tower

    with precision_scope(config.fit.precision):
        tower = build_tower(image_size=(config.data.image_size, config.data.image_size), **config.model.tower_kwargs())
        model = build_siamese(tower, num_classes=num_classes, classifier_scale=config.model.get("classifier_scale"))
    return compile_model(model, config, num_classes, label_noise)


def compile_model(model: Any, config: TrainConfig, num_classes: int | None, label_noise: bool = False) -> Any:
    """Compiles a siamese model (whose tower has a layer ``"backbone"``) with the losses, metrics, optimizer and
    XLA setting (``config.fit.jit_compile``) of ``config``; returns it.

    Under ``mixed_float16`` (the model built in that policy), Keras' ``compile``
    wraps the optimizer in a ``LossScaleOptimizer``: the loss is scaled up
    before the gradients and the gradients down after, a step whose gradients
    overflow is skipped and the scale halved (it starts at 2^15, so the first
    steps of a run may be skipped). The wrapped optimizer keeps its two
    learning rates and its schedule, which counts the steps it applied.
    """
    from street2shop.model.siamese import tower_of

    loss, loss_weights, metric_map = build_losses_and_metrics(config, num_classes, label_noise)
    optimizer = build_optimizer(config)
    optimizer.set_backbone_variables(tower_of(model).get_layer("backbone").trainable_variables)
    model.compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights, metrics=metric_map, jit_compile=config.fit.jit_compile_arg)
    return model


def build_losses_and_metrics(config: TrainConfig, num_classes: int | None, label_noise: bool = False):
    """The ``loss``, ``loss_weights`` and ``metrics`` dicts for ``model.compile``.

    With ``label_noise`` (the training records carry corruption flags: a
    label-noise benchmark), the pair metrics also measure what the robust
    loss drops: its precision and recall on the corrupted positives, the mean
    distances of clean and corrupted positives, their AUC and the positive
    distances' quantiles ``NOISE_QUANTILES``.
    """
    from street2shop import losses, metrics

    lc = config.loss
    if lc.loss == "robust":
        pair_loss = losses.RobustContrastiveLoss(**lc.robust_kwargs())
        if lc.drop_warmup_epochs:
            # Switched on by DropWarmup; created here, under the caller's strategy scope.
            pair_loss.active = losses.drop_switch()
    else:
        pair_loss = losses.ContrastiveLoss(margin=lc.margin)
    pair_metrics: list[Any] = [
        metrics.MeanPositiveDistance(),
        metrics.MeanNegativeDistance(),
        metrics.PairAccuracy(threshold=lc.margin / 2),
    ]
    if lc.loss == "robust":
        pair_metrics += [metrics.PositiveDropRate.from_loss(pair_loss), metrics.NegativeDropRate.from_loss(pair_loss)]
    if label_noise:
        if lc.loss == "robust":
            pair_metrics += [metrics.PositiveDropPrecision.from_loss(pair_loss), metrics.PositiveDropRecall.from_loss(pair_loss)]
        pair_metrics += [metrics.MeanCleanPositiveDistance(), metrics.MeanCorruptedPositiveDistance(), metrics.CorruptedPositiveAUC()]
        pair_metrics += [metrics.PositiveDistanceQuantile(q) for q in NOISE_QUANTILES]
    loss: dict[str, Any] = {"distance": pair_loss}
    loss_weights = {"distance": 1.0}
    metric_map: dict[str, Any] = {"distance": pair_metrics}
    if num_classes:
        for key in ("logits_a", "logits_b"):
            loss[key] = losses.MaskedSparseCategoricalCrossentropy()
            loss_weights[key] = 1.0  # w_cls and w_product are per-image sample weights (pair_dataset)
            metric_map[key] = [metrics.MaskedSparseCategoricalAccuracy(name="accuracy")]
    return loss, loss_weights, metric_map


def build_optimizer(config: TrainConfig):
    from street2shop.optimizers import BackboneAdamW, BackboneSGD

    fc = config.fit
    learning_rate = learning_rate_of(config)
    # Keras' own moving average (Polyak averaging): updated after every applied step; callbacks.EmaWeights
    # puts it in the model where a run is evaluated and recorded, and fit makes it the model at the end.
    ema = {"use_ema": True, "ema_momentum": fc.ema_momentum} if fc.ema_momentum else {}
    if fc.optimizer == "sgd":
        return BackboneSGD(learning_rate=learning_rate, momentum=fc.momentum, nesterov=True,
                           weight_decay=fc.weight_decay or None, backbone_lr_multiplier=fc.backbone_lr_multiplier, **ema)
    return BackboneAdamW(learning_rate=learning_rate, weight_decay=fc.weight_decay, backbone_lr_multiplier=fc.backbone_lr_multiplier, **ema)


def learning_rate_of(config: TrainConfig) -> Any:
    """``learning_rate`` as the optimizer takes it: a float, or a :class:`~street2shop.optimizers.WarmupCosine` over the run's steps."""
    from street2shop.optimizers import WarmupCosine

    fc = config.fit
    if fc.lr_schedule == "constant" and not fc.warmup_epochs:
        return fc.learning_rate
    steps = max(1, config.data.pairs_per_epoch // fc.batch_size)  # as steps_per_epoch: one step per global batch, whatever the replicas
    total = steps * fc.epochs
    return WarmupCosine(fc.learning_rate, total_steps=total, warmup_steps=min(round(steps * fc.warmup_epochs), total - 1), kind=fc.lr_schedule)
