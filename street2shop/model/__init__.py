"""The siamese model: backbones, the embedding tower, the two-input training model.

Importing this package registers the custom Keras layers, which loading a
``.keras`` file with ``safe_mode=True`` needs.
"""

from street2shop.model.backbones import BACKBONES, build_backbone, set_trainable
from street2shop.model.layers import BackbonePreprocess, CosineClassifier, L2Normalize, PairDistance
from street2shop.model.siamese import OUTPUT_KEYS, build_siamese, tower_of
from street2shop.model.tower import build_tower, tower_spec

__all__ = [
    "BACKBONES",
    "OUTPUT_KEYS",
    "BackbonePreprocess",
    "CosineClassifier",
    "L2Normalize",
    "PairDistance",
    "build_backbone",
    "build_siamese",
    "build_tower",
    "set_trainable",
    "tower_of",
    "tower_spec",
]
