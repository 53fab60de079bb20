"""Export the embedding tower as a versioned SavedModel for TF Serving.

``export_tower(tower, "exports/street2shop")`` writes
``exports/street2shop/<version>/`` (the next free number unless given; an
existing version is never overwritten; written to a hidden temporary folder
that TF Serving ignores, then renamed into place) with three signatures, every
input and output named:

==================  ==========================================================  =========================
signature           inputs                                                      outputs
==================  ==========================================================  =========================
``serving_default`` ``image_bytes``: string ``[None]`` (JPEG/PNG/GIF/BMP)       ``embedding``: float32 ``[None, D]``
``embed_boxes``     ``image_bytes``, ``boxes``: float32 ``[None, 4]``             ``embedding``
                    (normalised ``[ymin, xmin, ymax, xmax]``)
``embed_pixels``    ``pixels``: float32 ``[None, H, W, 3]`` in ``[0, 255]``        ``embedding``
==================  ==========================================================  =========================

Decoding, cropping and resizing inside the graph are
:func:`street2shop.data.pipeline.prepare_image`, the function training uses,
and the backbone's preprocessing is a layer of the tower, so a photo becomes
the same tensor in training, locally and in TF Serving.

``assets.extra/`` holds ``tf_serving_warmup_requests`` (real requests TF
Serving replays at load) and ``street2shop.json``, the model card: dimension,
input size, backbone, a fingerprint of the weights, package version, creation
time and the signatures.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from street2shop import __version__
from street2shop.errors import ModelError

logger = logging.getLogger(__name__)

CARD_NAME = "street2shop.json"
WARMUP_NAME = "tf_serving_warmup_requests"
SIGNATURES = {
    "serving_default": {"inputs": {"image_bytes": "string [None]"}, "outputs": {"embedding": "float32 [None, D]"}},
    "embed_boxes": {
        "inputs": {"image_bytes": "string [None]", "boxes": "float32 [None, 4] normalised ymin, xmin, ymax, xmax"},
        "outputs": {"embedding": "float32 [None, D]"},
    },
    "embed_pixels": {"inputs": {"pixels": "float32 [None, H, W, 3] in [0, 255]"}, "outputs": {"embedding": "float32 [None, D]"}},
}


def weights_fingerprint(model: Any) -> str:
    """A short hex digest of a model's weights (names, shapes and values)."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight))
        digest.update(f"{weight.path}:{value.shape}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Loads a ``.keras`` checkpoint (siamese or tower) with ``safe_mode=True``."""
    import keras

    import street2shop.losses  # noqa: F401 - registers the serialisable objects
    import street2shop.metrics  # noqa: F401
    import street2shop.model  # noqa: F401

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except (ValueError, OSError, TypeError) as e:
        raise ModelError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None


def next_version(export_base: str | os.PathLike[str]) -> int:
    base = Path(export_base)
    versions = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


def tower_image_size(tower: Any) -> tuple[int, int]:
    shape = tower.inputs[0].shape
    if shape[1] is None or shape[2] is None:
        raise ModelError(f"the tower needs a fixed input size to export. Received: input shape {tuple(shape)}")
    return int(shape[1]), int(shape[2])


def _backbone_name(tower: Any) -> str:
    try:
        from street2shop.model.tower import tower_spec

        return str(tower_spec(tower).get("backbone", "unknown"))
    except Exception:  # noqa: BLE001 - the card is informative; never fail an export on it
        return "unknown"


def _warmup_images(image_size: tuple[int, int], count: int = 3) -> list[bytes]:
    """Small real JPEGs (gradients with a shape) for TF Serving's warm-up."""
    from PIL import Image, ImageDraw

    images = []
    h, w = image_size
    for k in range(count):
        y, x = np.mgrid[0:h, 0:w]
        array = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), np.full_like(x, 80 * k)], -1).astype(np.uint8)
        image = Image.fromarray(array)
        ImageDraw.Draw(image).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(200, 40 * k, 90))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    return images


def write_warmup(path: Path, images: Sequence[bytes], model_name: str) -> None:
    """``tf_serving_warmup_requests``: one PredictionLog per image, then one with all of them."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in [[im] for im in images] + [list(images)]:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default")
            )
            request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string, shape=[len(batch)]))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def export_tower(
    model: Any,
    export_base: str | os.PathLike[str],
    *,
    version: int | None = None,
    model_name: str = "street2shop",
    warmup_images: Sequence[bytes] | None = None,
) -> Path:
    """Exports the tower of ``model`` to ``export_base/<version>/``.

    Args:
        model: keras.Model. The tower, or a siamese model containing a layer
            named ``tower``.
        export_base: str or path. TF Serving's model base path.
        version: int or None. Version number; the next free one by default.
            An existing version is never overwritten.
        model_name: str. Model name written into the warm-up requests.
        warmup_images: encoded images for the warm-up requests; small
            generated JPEGs by default.

    Returns:
        Path of the new version folder.

    Raises:
        ModelError: the version exists, or the tower cannot be exported.
    """
    import keras
    import tensorflow as tf

    from street2shop.data.pipeline import prepare_image

    from street2shop.model.siamese import tower_of

    tower = tower_of(model)
    size = tower_image_size(tower)
    base = Path(export_base)
    base.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = next_version(base)
    if version < 1:
        raise ModelError(f"version must be a positive integer. Received: version={version}")
    final = base / str(version)
    if final.exists():
        raise ModelError(f"version {version} already exists at {final}; versions are never overwritten. Pick another --version or omit it.")
    dimension = int(tower.outputs[0].shape[-1])
    pixel_spec = tf.TensorSpec([size[0], size[1], 3], tf.float32)

    def embed(pixels):
        return {"embedding": tower(pixels, training=False)}

    def decode_batch(image_bytes, boxes=None):
        if boxes is None:
            fn = lambda b: prepare_image(b, image_size=size)[0]  # noqa: E731
            return tf.map_fn(fn, image_bytes, fn_output_signature=pixel_spec)

        def one(args):
            pixels, valid = prepare_image(args[0], args[1], image_size=size)
            with tf.control_dependencies([tf.debugging.Assert(valid, ["box is empty after clamping it to the image"])]):
                return tf.identity(pixels)

        return tf.map_fn(one, (image_bytes, boxes), fn_output_signature=pixel_spec)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serving_default(image_bytes):
        return embed(decode_batch(image_bytes))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"), tf.TensorSpec([None, 4], tf.float32, name="boxes")])
    def embed_boxes(image_bytes, boxes):
        tf.debugging.assert_equal(tf.shape(image_bytes)[0], tf.shape(boxes)[0], message="image_bytes and boxes must have the same length")
        return embed(decode_batch(image_bytes, boxes))

    @tf.function(input_signature=[tf.TensorSpec([None, size[0], size[1], 3], tf.float32, name="pixels")])
    def embed_pixels(pixels):
        return embed(pixels)

    tmp = base / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        archive = keras.export.ExportArchive()
        archive.track(tower)
        archive.add_endpoint("serving_default", serving_default)
        archive.add_endpoint("embed_boxes", embed_boxes)
        archive.add_endpoint("embed_pixels", embed_pixels)
        archive.write_out(str(tmp), verbose=False)
        extra = tmp / "assets.extra"
        extra.mkdir(exist_ok=True)
        write_warmup(extra / WARMUP_NAME, list(warmup_images or _warmup_images(size)), model_name)
        card = {
            "dimension": dimension,
            "image_size": list(size),
            "backbone": _backbone_name(tower),
            "fingerprint": weights_fingerprint(tower),
            "package_version": __version__,
            "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "version": version,
            "signatures": SIGNATURES,
        }
        (extra / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"cannot write the export to {final}: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported tower (D=%d, %dx%d) to %s", dimension, size[0], size[1], final)
    return final


def read_card(version_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The model card of an exported version."""
    path = Path(version_dir) / "assets.extra" / CARD_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"no model card at {path}: is {version_dir} a street2shop export?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read model card {path}: {e}") from None


def latest_version_dir(export_base: str | os.PathLike[str]) -> Path:
    """The newest numbered version under an export base (or the folder itself if it is a version)."""
    base = Path(export_base)
    if (base / "saved_model.pb").is_file():
        return base
    versions = sorted((int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file()), reverse=True) if base.is_dir() else []
    if not versions:
        raise ModelError(f"no SavedModel version under {base}: expected {base}/<number>/saved_model.pb")
    return base / str(versions[0])


class LocalEmbedder:
    """Embeds images with an exported SavedModel in this process.

    Args:
        export: str or path. An export base (newest version is used) or a
            version folder.
        batch_size: int. Images per call.

    Example:

    >>> embedder = LocalEmbedder("exports/street2shop")
    >>> vectors = embedder.embed([open("photo.jpg", "rb").read()])
    """

    def __init__(self, export: str | os.PathLike[str], *, batch_size: int = 32) -> None:
        import tensorflow as tf

        self.path = latest_version_dir(export)
        self.card = read_card(self.path)
        self.batch_size = batch_size
        try:
            self._model = tf.saved_model.load(str(self.path))
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load SavedModel {self.path}: {e}") from None
        missing = {"serving_default", "embed_boxes"} - set(self._model.signatures)
        if missing:
            raise ModelError(f"{self.path} is not a street2shop export: it lacks the signature(s) {sorted(missing)}")
        self._default = self._model.signatures["serving_default"]
        self._boxes = self._model.signatures["embed_boxes"]

    @property
    def dimension(self) -> int:
        return int(self.card["dimension"])

    @property
    def fingerprint(self) -> str:
        return str(self.card["fingerprint"])

    def embed(self, images: Sequence[bytes], boxes: np.ndarray | None = None) -> np.ndarray:
        """Encoded images (and optional normalised boxes) → float32 ``[N, D]``."""
        import tensorflow as tf

        from street2shop.errors import BadRequestError, tf_error_text

        out = [np.zeros((0, self.dimension), np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = tf.constant(list(images[start : start + self.batch_size]), dtype=tf.string)
            try:
                if boxes is None:
                    result = self._default(image_bytes=chunk)
                else:
                    box_chunk = tf.constant(np.asarray(boxes[start : start + self.batch_size], np.float32))
                    result = self._boxes(image_bytes=chunk, boxes=box_chunk)
            except tf.errors.InvalidArgumentError as e:
                raise BadRequestError(f"the model rejected images {start}..{start + len(chunk) - 1}: {tf_error_text(e.message)}") from None
            out.append(result["embedding"].numpy())
        return np.concatenate(out)
