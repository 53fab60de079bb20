"""street2shop: find the exact product in a shop catalogue from a customer's photo.

Heavy modules (TensorFlow, Keras, Annoy, gRPC) are imported by the submodules
that need them, so ``import street2shop`` and ``street2shop --help`` are fast.
"""

__version__ = "0.1.0"

from street2shop.errors import Street2ShopError  # noqa: E402

__all__ = ["Street2ShopError", "__version__"]
