"""Export the embedding tower as a versioned SavedModel for TF Serving.

``export_tower(tower, "exports/street2shop")`` writes
``exports/street2shop/<version>/`` (the next free number unless given; an
existing version is never overwritten; written to a hidden temporary folder
that TF Serving ignores, then renamed into place) with the signatures of the
serving contract (:mod:`street2shop.contract`): ``serving_default`` (encoded
image bytes), ``embed_boxes`` (bytes and normalised boxes) and
``embed_pixels`` (decoded pixels), each answering ``embedding`` and
``model_fingerprint``, the weights' fingerprint, so every response names the
model that made its vectors.

Decoding, cropping and resizing inside the graph are
:func:`street2shop.data.image.prepare_image`, the function training uses,
and the backbone's preprocessing is a layer of the tower, so a photo becomes
the same tensor in training, locally and in TF Serving.

``assets.extra/`` holds ``tf_serving_warmup_requests`` (real requests TF
Serving replays at load) and ``street2shop.json``, the model card: dimension,
input size, backbone, the weights fingerprint, the precision it computes in,
package version, creation time and the signatures.

Whatever dtype policy trained the tower, the export computes in float32 by
default (``precision``): the signatures take and return what they always do
(bytes in; a float32 embedding and the fingerprint out), and the same
weights give the same vectors as a float32 run's. ``precision="mixed_bfloat16"``
or ``"mixed_float16"`` exports the tower computing in that policy instead
(for hardware that runs it faster: a GPU, a CPU with AMX), still float32 at
both ends; its vectors differ from the float32 export's within the tolerance
BENCHMARKS.md measures, so its fingerprint is another
(:func:`street2shop.model.precision.precision_fingerprint`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from street2shop import __version__, contract
from street2shop.errors import ModelError, check_positive_int

logger = logging.getLogger(__name__)


def weights_fingerprint(model: Any) -> str:
    """A short hex digest of a model's weights (names, shapes and values)."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight))
        digest.update(f"{weight.path}:{value.shape}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(tower: Any, tta: str = "none", precision: str = "float32") -> str:
    """The fingerprint of the vectors a tower gives: its weights', with the test-time augmentation and the precision it
    computes in (each changes the vectors, so each makes another model)."""
    from street2shop.model.precision import precision_fingerprint
    from street2shop.model.views import tta_fingerprint

    return precision_fingerprint(tta_fingerprint(weights_fingerprint(tower), tta), precision)


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Loads a ``.keras`` checkpoint (siamese or tower) with ``safe_mode=True``."""
    import keras

    import street2shop.losses  # noqa: F401 - registers the serialisable objects
    import street2shop.metrics  # noqa: F401
    import street2shop.model.layers  # noqa: F401

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except (ValueError, OSError, TypeError) as e:
        raise ModelError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None


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
    """Small real JPEGs for TF Serving's warm-up requests."""
    from street2shop.data.image import pattern_jpeg

    return [pattern_jpeg(image_size[1], image_size[0], k) for k in range(count)]


def write_warmup(path: Path, images: Sequence[bytes], model_name: str) -> None:
    """``tf_serving_warmup_requests``: one PredictionLog per image, then one with all of them."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in [[im] for im in images] + [list(images)]:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=contract.SERVING_DEFAULT)
            )
            request.inputs[contract.IMAGE_BYTES].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string, shape=[len(batch)]))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def export_tower(
    model: Any,
    export_base: str | os.PathLike[str],
    *,
    version: int | None = None,
    model_name: str = contract.DEFAULT_MODEL_NAME,
    warmup_images: Sequence[bytes] | None = None,
    tta: str = "none",
    precision: str = "float32",
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
        tta: test-time augmentation inside every signature: "none", "flip"
            or "flip-crops" (:mod:`street2shop.model.views`; 2 or 4 tower
            passes per image). It changes the vectors, so the fingerprint is
            another one: embed the catalogue and the queries with the same export.
        precision: the dtype policy the exported tower computes in, whatever
            trained it: "float32" (the default), "mixed_bfloat16" or
            "mixed_float16" (:mod:`street2shop.model.precision`). The inputs
            and outputs are the same in every one; a mixed one has another
            fingerprint.

    Returns:
        Path of the new version folder (its name is the version number).

    Raises:
        ModelError: the version exists, or the tower cannot be exported.
    """
    import keras
    import tensorflow as tf

    from street2shop.data.image import prepare_image
    from street2shop.model.precision import check_precision, with_precision
    from street2shop.model.siamese import tower_of
    from street2shop.model.views import check_tta, embed_views

    check_tta(tta)
    check_precision(precision)
    trained = tower_of(model)
    size = tower_image_size(trained)
    base = Path(export_base)
    base.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = contract.next_version(base)
    check_positive_int("version", version, error=ModelError)
    final = base / str(version)
    if final.exists():
        raise ModelError(f"version {version} already exists at {final}; versions are never overwritten. Pick another --version or omit it.")
    dimension = int(trained.outputs[0].shape[-1])
    fingerprint = model_fingerprint(trained, tta, precision)
    tower = with_precision(trained, precision)  # the trained tower itself when it already computes so
    pixel_spec = tf.TensorSpec([size[0], size[1], 3], tf.float32)

    def embed(pixels):
        embedding = embed_views(tower, pixels, tta)
        # One fingerprint per row: the identity survives TF Serving's batching, which splits outputs by row.
        rows = tf.fill(tf.shape(embedding)[:1], tf.constant(fingerprint))
        return {contract.EMBEDDING: embedding, contract.FINGERPRINT: rows}

    def decode_batch(image_bytes, boxes=None):
        if boxes is None:
            fn = lambda b: prepare_image(b, image_size=size)[0]  # noqa: E731
            return tf.map_fn(fn, image_bytes, fn_output_signature=pixel_spec)

        def one(args):
            pixels, valid = prepare_image(args[0], args[1], image_size=size)
            with tf.control_dependencies([tf.debugging.Assert(valid, ["box is empty after clamping it to the image"])]):
                return tf.identity(pixels)

        return tf.map_fn(one, (image_bytes, boxes), fn_output_signature=pixel_spec)

    bytes_spec = tf.TensorSpec([None], tf.string, name=contract.IMAGE_BYTES)

    @tf.function(input_signature=[bytes_spec])
    def serving_default(image_bytes):
        return embed(decode_batch(image_bytes))

    @tf.function(input_signature=[bytes_spec, tf.TensorSpec([None, 4], tf.float32, name=contract.BOXES)])
    def embed_boxes(image_bytes, boxes):
        tf.debugging.assert_equal(tf.shape(image_bytes)[0], tf.shape(boxes)[0], message="image_bytes and boxes must have the same length")
        return embed(decode_batch(image_bytes, boxes))

    @tf.function(input_signature=[tf.TensorSpec([None, size[0], size[1], 3], tf.float32, name=contract.PIXELS)])
    def embed_pixels(pixels):
        return embed(pixels)

    endpoints = {contract.SERVING_DEFAULT: serving_default, contract.EMBED_BOXES: embed_boxes, contract.EMBED_PIXELS: embed_pixels}
    assert set(endpoints) == set(contract.SIGNATURES)
    try:
        with contract.new_version(base, version) as tmp:
            archive = keras.export.ExportArchive()
            archive.track(tower)
            for name, endpoint in endpoints.items():
                archive.add_endpoint(name, endpoint)
            archive.write_out(str(tmp), verbose=False)
            extra = tmp / contract.ASSETS_EXTRA
            extra.mkdir(exist_ok=True)
            write_warmup(extra / contract.WARMUP_FILE, list(warmup_images or _warmup_images(size)), model_name)
            card = {
                "dimension": dimension,
                "image_size": list(size),
                "backbone": _backbone_name(tower),
                "fingerprint": fingerprint,
                "tta": tta,
                "precision": precision,
                "package_version": __version__,
                "tensorflow_version": tf.__version__,
                "keras_version": keras.__version__,
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "version": version,
                "signatures": {name: sig.describe() for name, sig in contract.SIGNATURES.items()},
            }
            (extra / contract.CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    except FileExistsError:
        raise ModelError(f"version {version} appeared at {final} while exporting; versions are never overwritten. Export again.") from None
    except OSError as e:
        raise ModelError(f"cannot write the export to {final}: {e}") from None
    logger.info("exported tower (D=%d, %dx%d, fingerprint %s%s%s) to %s", dimension, size[0], size[1], fingerprint,
                "" if tta == "none" else f", test-time augmentation {tta}", "" if precision == "float32" else f", computing in {precision}", final)
    return final


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    export_base: str | os.PathLike[str],
    *,
    version: int | None = None,
    model_name: str = contract.DEFAULT_MODEL_NAME,
    tta: str = "none",
    precision: str = "float32",
) -> dict[str, Any]:
    """``street2shop export``: loads a ``.keras`` checkpoint and exports its tower; returns the card and path."""
    path = export_tower(load_checkpoint(checkpoint), export_base, version=version, model_name=model_name, tta=tta, precision=precision)
    return {"path": str(path), **contract.read_card(path)}
