"""AdamW and SGD with a lower learning rate for the backbone.

Fine-tuning a pretrained backbone usually wants a smaller step for the
backbone than for the freshly initialised projection and classifier. Keras 3
optimizers have one learning rate, so these subclasses scale it per variable
in ``update_step`` (scaling gradients instead would be a no-op for Adam,
which is invariant to gradient scale). Variables are matched with the
optimizer's own distribution-aware key, so this works under
``MirroredStrategy`` too. Decoupled weight decay is not scaled.
"""

from __future__ import annotations

from typing import Any

import keras

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
