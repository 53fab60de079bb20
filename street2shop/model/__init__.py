"""The siamese model: backbones, the embedding tower, the two-input training model.

Names are loaded on first use, so ``street2shop.model.backbones`` (the
registry, which imports no Keras) stays cheap to import. Loading a ``.keras``
file with ``safe_mode=True`` needs the custom layers registered: import
:mod:`street2shop.model.layers` first (``export.load_checkpoint`` does).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "BACKBONES": "backbones", "build_backbone": "backbones", "set_trainable": "backbones",
    "BackbonePreprocess": "layers", "CosineClassifier": "layers", "L2Normalize": "layers", "PairDistance": "layers",
    "OUTPUT_KEYS": "siamese", "build_siamese": "siamese", "tower_of": "siamese",
    "load_tower_weights": "siamese", "read_tower_weights": "siamese", "set_tower_weights": "siamese",
    "build_tower": "tower", "tower_spec": "tower",
    "PRECISIONS": "precision", "model_precision": "precision", "precision_scope": "precision", "with_precision": "precision",
    "TTA_MODES": "views", "embed_views": "views", "tta_fingerprint": "views",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
