"""AdamW and SGD with a lower learning rate for the backbone.

Fine-tuning a pretrained backbone usually wants a smaller step for the
backbone than for the freshly initialised projection and classifier. Keras 3
optimizers have one learning rate, so these subclasses scale it per variable
in ``update_step`` (scaling gradients instead would be a no-op for Adam,
which is invariant to gradient scale). Variables are matched with the
optimizer's own distribution-aware key, so this works under
``MirroredStrategy`` too. Decoupled weight decay is not scaled.

:class:`WarmupCosine` is the learning-rate schedule of ``lr_schedule`` and
``warmup_epochs``: a linear warm-up, then constant or a cosine down to 0. It
is a function of the optimizer's step count, which a resumed run restores
with the rest of its optimizer state, so a resumed run continues the schedule
where it stopped.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from street2shop.errors import ConfigError


class _BackboneMultiplier:
    def __init__(self, *args: Any, backbone_lr_multiplier: float = 1.0, **kwargs: Any) -> None:
        if not backbone_lr_multiplier >= 0:
            raise ConfigError(f"backbone_lr_multiplier must be >= 0. Received: backbone_lr_multiplier={backbone_lr_multiplier}")
        super().__init__(*args, **kwargs)
        self.backbone_lr_multiplier = float(backbone_lr_multiplier)
        self._backbone_keys: set[Any] = set()

    def set_backbone_variables(self, variables: list[Any]) -> None:
        """The variables that learn at ``learning_rate * backbone_lr_multiplier``."""
        self._backbone_keys = {self._var_key(v) for v in variables}

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        if self.backbone_lr_multiplier != 1.0 and self._var_key(variable) in self._backbone_keys:
            learning_rate = learning_rate * self.backbone_lr_multiplier
        super().update_step(gradient, variable, learning_rate)  # type: ignore[misc]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "backbone_lr_multiplier": self.backbone_lr_multiplier}  # type: ignore[misc]


@keras.saving.register_keras_serializable(package="street2shop")
class BackboneAdamW(_BackboneMultiplier, keras.optimizers.AdamW):
    """AdamW whose backbone variables learn at ``learning_rate * backbone_lr_multiplier``.

    Args:
        backbone_lr_multiplier: float >= 0. 1 is plain AdamW; 0 freezes the
            backbone's weights (BatchNorm statistics still move).
        **kwargs: keras.optimizers.AdamW's arguments.
    """


@keras.saving.register_keras_serializable(package="street2shop")
class BackboneSGD(_BackboneMultiplier, keras.optimizers.SGD):
    """SGD (with momentum) whose backbone variables learn at ``learning_rate * backbone_lr_multiplier``."""


@keras.saving.register_keras_serializable(package="street2shop")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """``peak`` reached linearly over ``warmup_steps`` from 0, then held (``kind="constant"``) or
    decayed along a half cosine to 0 at ``total_steps`` (``kind="cosine"``); 0 after ``total_steps``.

    Step s (0-based, the optimizer's iterations before the update) uses:
    warm-up ``peak * (s + 1) / warmup_steps`` for s < warmup_steps, so the
    first update already moves; then, with t = (s - warmup_steps) /
    (total_steps - warmup_steps), ``peak * (1 + cos(pi * t)) / 2``.
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine") -> None:
        if kind not in ("constant", "cosine"):
            raise ConfigError(f"kind must be 'constant' or 'cosine'. Received: kind={kind!r}")
        if not (peak > 0 and 0 <= warmup_steps < total_steps):
            raise ConfigError(f"need peak > 0 and 0 <= warmup_steps < total_steps. Received: peak={peak}, "
                              f"warmup_steps={warmup_steps}, total_steps={total_steps}")
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.kind = kind

    def __call__(self, step: Any) -> Any:
        from keras import ops

        step = ops.cast(step, "float32")
        warm = max(self.warmup_steps, 1)
        warmup = self.peak * ops.minimum((step + 1.0) / warm, 1.0)
        if self.kind == "constant":
            after = ops.full_like(step, self.peak)
        else:
            t = ops.clip((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0, 1.0)
            after = self.peak * 0.5 * (1.0 + ops.cos(np.pi * t))
        return ops.where(step < self.warmup_steps, warmup, after)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "kind": self.kind}
