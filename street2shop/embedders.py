"""Embedders: photos in, one vector or one error per photo out, and the model that made them.

Three embedders share one interface, :class:`Embedder`:

- :class:`LocalEmbedder`: an exported SavedModel, in this process;
- :class:`GrpcEmbedder`: the same SavedModel served by TF Serving, over gRPC
  (:class:`street2shop.serving.client.EmbeddingClient`);
- :class:`TowerEmbedder`: a Keras tower in memory (during or right after
  training, before any export).

``embedder.embed(images, boxes)`` takes encoded image files and optional
pixel boxes and returns :class:`Embeddings`: a vector for each image that
could be embedded and a reason for each that could not, so one bad photo
among many is an error for that photo alone. Each image is checked first
(:func:`street2shop.data.image.inspect_image`: empty, not an image, too
large, a box that misses it), so a bad one is never sent at all, which also
spares the other requests that TF Serving's batching would merge with it; if
the model still rejects a batch, its images are tried one by one to find the
culprit. Boxes are cropped by the model (``embed_boxes``) with the same
geometry training uses.

Every result names its model (:class:`street2shop.contract.ModelIdentity`:
the weights fingerprint and the version), and ``embedder.identity()`` tells
it before any work, so a caller can refuse an index or a run of another
model. :func:`open_embedder` picks the embedder from ``model=`` or ``server=``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from street2shop import contract
from street2shop.contract import ModelIdentity, check_same_model
from street2shop.data.image import DEFAULT_MAX_PIXELS, Box, check_photo
from street2shop.errors import BadRequestError, ConfigError, ImageError, ModelError, ModelMismatchError, check_positive_int

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Embeddings:
    """What one :meth:`Embedder.embed` call gave: a vector or an error for each image, in order.

    Attributes:
        vectors: float32 ``[N, D]``, unit length; the rows of failed images are NaN.
        errors: one entry per image: None where it was embedded, else the reason.
        identity: the model that made the vectors (None when none was made).
    """

    vectors: np.ndarray
    errors: list[str | None]
    identity: ModelIdentity | None

    def __len__(self) -> int:
        return len(self.errors)

    @property
    def ok(self) -> np.ndarray:
        """Bool ``[N]``: which images were embedded."""
        return np.array([e is None for e in self.errors], dtype=bool)

    def failures(self) -> dict[int, str]:
        """Position → reason, for the images that could not be embedded."""
        return {i: e for i, e in enumerate(self.errors) if e is not None}

    def require(self) -> np.ndarray:
        """The vectors, or an ImageError naming the first failure when any image failed."""
        failures = self.failures()
        if failures:
            i, reason = next(iter(failures.items()))
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise ImageError(f"image {i}: {reason}{more}")
        return self.vectors


class Embedder:
    """Photos in, vectors out. Subclasses say how a batch of checked images becomes vectors.

    Args:
        batch_size: int. Images per call of the model.
        max_pixels: int. Larger images are refused before decoding.
        decode_check: bool. Also decode each image before sending it (catches
            truncated files on this side; costs a decode per image).

    A subclass implements :attr:`dimension`, :meth:`identity` and
    :meth:`_embed_batch`; the checks, the batching, the isolation of a bad
    image and the one-model rule are here, shared.
    """

    def __init__(self, *, batch_size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS, decode_check: bool = False) -> None:
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.max_pixels = max_pixels
        self.decode_check = decode_check

    @property
    def dimension(self) -> int:
        raise NotImplementedError

    def identity(self) -> ModelIdentity:
        """The model this embedder uses (for a server: asks it, once, if no answer named it yet)."""
        raise NotImplementedError

    def _embed_batch(self, images: list[bytes], boxes: np.ndarray | None) -> tuple[np.ndarray, ModelIdentity]:
        """Checked images (and normalised boxes) → ``([n, D], identity)``; BadRequestError if the model rejects them."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases what the embedder holds (a channel, a model)."""

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def embed(self, images: Sequence[bytes], boxes: Sequence[Box | None] | None = None) -> Embeddings:
        """Embeds encoded images, each cropped to its pixel box when one is given.

        Args:
            images: encoded JPEG/PNG/GIF/BMP files.
            boxes: None, or one :class:`~street2shop.data.image.Box` (pixels of
                the full image) or None per image.

        Returns:
            :class:`Embeddings`. A bad image (or box) is an error for that image only.

        Raises:
            ModelMismatchError: the model changed during the call.
            ServingError: the server is down or does not serve the model.
        """
        images = list(images)
        if boxes is not None and len(boxes) != len(images):
            raise ConfigError(f"give one box (or None) per image. Received: {len(images)} images and {len(boxes)} boxes")
        errors: list[str | None] = [None] * len(images)
        ready: list[tuple[int, bytes, tuple[float, float, float, float] | None]] = []
        for i, data in enumerate(images):
            box = boxes[i] if boxes is not None else None
            try:
                normalised = check_photo(data, box, max_pixels=self.max_pixels, decode=self.decode_check)
            except ImageError as e:
                errors[i] = str(e)
                continue
            ready.append((i, bytes(data), normalised))
        vectors = np.full((len(images), self.dimension), np.nan, np.float32)
        identities: list[ModelIdentity] = []
        for start in range(0, len(ready), self.batch_size):
            self._run(ready[start : start + self.batch_size], vectors, errors, identities)
        models = {identity.fingerprint: identity for identity in identities}
        if len(models) > 1:
            raise ModelMismatchError(
                f"the model changed while embedding one call's images ({', '.join(str(m) for m in models.values())}); "
                f"nothing of it was kept. Received: {len(models)} models"
            )
        return Embeddings(vectors, errors, identities[-1] if identities else None)

    def _run(self, items, vectors: np.ndarray, errors: list[str | None], identities: list[ModelIdentity]) -> None:
        """Embeds items ``(position, bytes, normalised box)``; a batch the model rejects is tried image by image."""
        answers = embed_isolating([(data, box) for _, data, box in items], self._embed_batch)
        for (i, _, _), answer in zip(items, answers):
            if isinstance(answer, str):
                errors[i] = answer
            else:
                vectors[i], identity = answer
                identities.append(identity)


Answer = TypeVar("Answer")


def embed_isolating(
    items: Sequence[tuple[bytes, tuple[float, float, float, float] | None]],
    call: Callable[[list[bytes], np.ndarray | None], tuple[np.ndarray, Answer]],
) -> list[tuple[np.ndarray, Answer] | str]:
    """Embeds checked images in one call; if the model rejects the call, tries them one by one to find the bad ones.

    Args:
        items: ``(encoded image, normalised box or None)`` pairs, checked
            already (:func:`street2shop.data.image.check_photo`).
        call: ``(images, boxes or None) → (vectors [n, D], what the model said
            of itself)``, raising BadRequestError when the model rejects the
            images. Boxes go in only when some item has one (the others get
            the whole image, ``[0, 0, 1, 1]``).

    Returns:
        One entry per item, in order: ``(vector, what call returned beside
        the vectors)``, or the reason the model rejected that image alone.
    """
    use_boxes = any(box is not None for _, box in items)
    boxes = np.array([box if box is not None else (0.0, 0.0, 1.0, 1.0) for _, box in items], np.float32) if use_boxes else None
    try:
        vectors, said = call([data for data, _ in items], boxes)
    except BadRequestError as e:
        if len(items) == 1:
            return [str(e)]
        return [answer for item in items for answer in embed_isolating([item], call)]
    return [(vector, said) for vector in vectors]


# --------------------------------------------------------------------------- in process: a SavedModel


class LocalEmbedder(Embedder):
    """Embeds with an exported SavedModel in this process.

    Args:
        export: str or path. An export base (its newest version is used) or a version folder.
        batch_size, max_pixels, decode_check: see :class:`Embedder`.

    Example:
        >>> embedder = LocalEmbedder("exports/street2shop")
        >>> result = embedder.embed([open("photo.jpg", "rb").read()])
        >>> result.vectors.shape, result.identity.fingerprint
    """

    def __init__(self, export: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = contract.resolve_export(export)
        self.card = contract.read_card(self.path)
        self._identity = contract.card_identity(self.path, self.card)
        self._model = load_savedmodel(str(self.path))

    @property
    def dimension(self) -> int:
        return int(self.card["dimension"])

    @property
    def fingerprint(self) -> str:
        return self._identity.fingerprint

    def identity(self) -> ModelIdentity:
        return self._identity

    def _embed_batch(self, images: list[bytes], boxes: np.ndarray | None) -> tuple[np.ndarray, ModelIdentity]:
        return call_savedmodel(self._model, images, boxes)[0], self._identity


def load_savedmodel(path: str) -> Any:
    """Loads an exported SavedModel (``tf.saved_model.load``; local or any path TensorFlow reads) and checks its contract.

    Raises:
        ModelError: it cannot be loaded, lacks the ``serving_default`` or
            ``embed_boxes`` signature, or does not answer ``model_fingerprint``.
    """
    import tensorflow as tf

    try:
        model = tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise ModelError(f"cannot load SavedModel {path}: {e}") from None
    missing = {contract.SERVING_DEFAULT, contract.EMBED_BOXES} - set(model.signatures)
    if missing:
        raise ModelError(f"{path} is not a street2shop export: it lacks the signature(s) {sorted(missing)}")
    outputs = set(model.signatures[contract.SERVING_DEFAULT].structured_outputs)
    if contract.FINGERPRINT not in outputs:
        raise ModelError(
            f"{path} was exported by a street2shop before 0.2: it does not name its model in its answers "
            f"(no {contract.FINGERPRINT!r} output). Export it again from its checkpoint. Received: outputs {sorted(outputs)}"
        )
    return model


def call_savedmodel(model: Any, images: list[bytes], boxes: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """Runs a loaded export on encoded images: ``serving_default``, or ``embed_boxes`` with normalised boxes.

    Returns:
        ``(vectors, fingerprints)``: float32 ``[n, D]`` and the
        ``model_fingerprint`` output, one string per image.

    Raises:
        BadRequestError: the model rejected the images (one that cannot be decoded).
    """
    import tensorflow as tf

    from street2shop.errors import tf_error_text

    chunk = tf.constant(images, dtype=tf.string)
    try:
        if boxes is None:
            result = model.signatures[contract.SERVING_DEFAULT](**{contract.IMAGE_BYTES: chunk})
        else:
            result = model.signatures[contract.EMBED_BOXES](**{contract.IMAGE_BYTES: chunk, contract.BOXES: tf.constant(boxes, tf.float32)})
    except tf.errors.InvalidArgumentError as e:
        raise BadRequestError(f"the model rejected the image: {tf_error_text(e.message)}") from None
    return result[contract.EMBEDDING].numpy(), [f.decode() for f in result[contract.FINGERPRINT].numpy().tolist()]


# --------------------------------------------------------------------------- TF Serving over gRPC


class GrpcEmbedder(Embedder):
    """Embeds with the model TF Serving serves, through :class:`~street2shop.serving.client.EmbeddingClient`.

    Every answer names the model that made it; :meth:`identity` asks the
    server once (a probe image) when no answer has named it yet.

    Args:
        client: an EmbeddingClient, or a ``HOST:PORT`` to make one with ``client_kwargs``.
        max_pixels, decode_check: see :class:`Embedder`.
        **client_kwargs: for a new EmbeddingClient (``model_name``, ``batch_size``,
            ``timeout``, ``expected_fingerprint``...).
    """

    def __init__(self, client: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, decode_check: bool = False, **client_kwargs: Any) -> None:
        from street2shop.serving.client import EmbeddingClient

        if isinstance(client, str):
            client = EmbeddingClient(client, **client_kwargs)
        elif client_kwargs:
            raise ConfigError(f"client settings go to a new client; this one exists already. Received: {sorted(client_kwargs)}")
        super().__init__(batch_size=client.batch_size, max_pixels=max_pixels, decode_check=decode_check)
        self.client = client

    @property
    def dimension(self) -> int:
        """D; like :meth:`identity`, asks the server once (its signature) when no answer has told it yet."""
        return self.client.fetch_dimension()

    def identity(self) -> ModelIdentity:
        return self.client.identity or self.client.probe()

    def _embed_batch(self, images: list[bytes], boxes: np.ndarray | None) -> tuple[np.ndarray, ModelIdentity]:
        vectors, identity = self.client.predict(images, boxes)
        assert identity is not None
        return vectors, identity

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------- a Keras tower in memory


class TowerEmbedder(Embedder):
    """Embeds with a Keras tower held in memory, through the export's own graph (decode, crop, resize, tower).

    Its identity is the fingerprint of the weights when it was made (version
    None): make a new one after more training. It computes in float32
    whatever policy the tower was trained in, as an export does by default
    (a copy of a mixed-precision tower, so the same weights give the export's vectors).

    Args:
        model: the tower, or a siamese model holding it.
        tta: test-time augmentation, as an export's (:mod:`street2shop.model.views`).
        batch_size, max_pixels, decode_check: see :class:`Embedder`.
    """

    def __init__(self, model: Any, *, tta: str = "none", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import tensorflow as tf

        from street2shop.data.image import prepare_image
        from street2shop.export import model_fingerprint, tower_image_size
        from street2shop.model.precision import with_precision
        from street2shop.model.siamese import tower_of
        from street2shop.model.views import embed_views

        trained = tower_of(model)
        self.tower = with_precision(trained, "float32")
        size = tower_image_size(self.tower)
        self._dimension = int(self.tower.outputs[0].shape[-1])
        self._identity = ModelIdentity(model_fingerprint(trained, tta), None, self._dimension)
        pixel_spec = tf.TensorSpec([size[0], size[1], 3], tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([None, 4], tf.float32)])
        def run(images, boxes):
            def one(args):
                pixels, valid = prepare_image(args[0], args[1], image_size=size)
                with tf.control_dependencies([tf.debugging.Assert(valid, ["box is empty after clamping it to the image"])]):
                    return tf.identity(pixels)

            pixels = tf.map_fn(one, (images, boxes), fn_output_signature=pixel_spec)
            return embed_views(self.tower, pixels, tta)

        self._run_graph = run

    @property
    def dimension(self) -> int:
        return self._dimension

    def identity(self) -> ModelIdentity:
        return self._identity

    def _embed_batch(self, images: list[bytes], boxes: np.ndarray | None) -> tuple[np.ndarray, ModelIdentity]:
        import tensorflow as tf

        from street2shop.errors import tf_error_text

        if boxes is None:
            boxes = np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], np.float32), (len(images), 1))
        try:
            vectors = self._run_graph(tf.constant(images, dtype=tf.string), tf.constant(boxes, dtype=tf.float32))
        except tf.errors.InvalidArgumentError as e:
            raise BadRequestError(f"the model rejected the image: {tf_error_text(e.message)}") from None
        return vectors.numpy(), self._identity


# --------------------------------------------------------------------------- choosing one


def open_embedder(
    model: str | os.PathLike[str] | None = None,
    server: str | None = None,
    *,
    model_name: str = contract.DEFAULT_MODEL_NAME,
    batch_size: int = 32,
    expected: ModelIdentity | None = None,
    **kwargs: Any,
) -> Embedder:
    """The embedder for an export (``model``: in this process) or a TF Serving address (``server``).

    Args:
        model: an export base or version folder.
        server: TF Serving's gRPC address, ``HOST:PORT``.
        model_name: the name TF Serving serves the model under.
        batch_size: images per call.
        expected: the model the vectors must come from (an index's, a run's):
            another one is refused before any work (ModelMismatchError), and a
            server switching to another one later too.
        **kwargs: further EmbeddingClient settings (``timeout``, ``tls``...) or
            :class:`Embedder` ones (``max_pixels``, ``decode_check``).

    Raises:
        ConfigError: neither or both of ``model`` and ``server``.
        ModelMismatchError: the model is not ``expected``.
    """
    if bool(model) == bool(server):
        raise ConfigError(
            "give exactly one of --model EXPORT_DIR (embed in this process) or --server HOST:PORT (TF Serving). "
            f"Received: model={model!r}, server={server!r}"
        )
    checks = {k: kwargs.pop(k) for k in ("max_pixels", "decode_check") if k in kwargs}
    embedder: Embedder
    if model:
        if kwargs:
            raise ConfigError(f"these settings are for a server, not an export: {sorted(kwargs)}")
        embedder = LocalEmbedder(model, batch_size=batch_size, **checks)
    else:
        embedder = GrpcEmbedder(
            str(server), model_name=model_name, batch_size=batch_size,
            expected_dimension=expected.dimension if expected else None,
            expected_fingerprint=expected.fingerprint if expected else None, **checks, **kwargs,
        )
    if expected is not None:
        try:
            check_same_model(expected, embedder.identity(), "the embedder")
        except BaseException:
            embedder.close()
            raise
    return embedder
