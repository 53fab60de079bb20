"""Images: the one preprocessing function, image checks, box geometry, formats.

- :func:`prepare_image` turns encoded bytes (and an optional box) into model
  pixels: decode → crop → resize, as TensorFlow ops. Training maps it over
  files (:mod:`street2shop.data.pipeline`) and :mod:`street2shop.export` puts
  the very same function inside the SavedModel, so training, local embedding,
  Beam and TF Serving cannot disagree about how a photo becomes a tensor.
- :class:`Box` is a box in pixels with its geometry (normalised coordinates,
  the whole pixels a crop keeps), the rule :func:`crop_and_resize` applies in
  the graph.
- :func:`inspect_image` checks encoded bytes without TensorFlow (format by
  magic bytes, as TF's decoder decides; size from the header; a pixel
  limit), so an embedder can refuse a bad image on its own instead of failing
  a whole batch; :func:`check_images` decodes a dataset's images with the
  training decoder.

Pixels are float32 RGB in ``[0, 255]``. The backbone's own preprocessing
(InceptionV3 scales to ``[-1, 1]``, ResNet50 subtracts means...) is a layer
inside the tower, so it happens exactly once whoever feeds the tower.
TensorFlow is imported inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from street2shop.errors import ConfigError, ImageError

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

logger = logging.getLogger(__name__)

# What TensorFlow's decoder reads (tf.io.decode_image), by file name.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
# ... and by content, as tf.io.decode_image decides.
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"))
# Larger images are refused before decoding (an RGB decode of this many pixels is 300 MB).
DEFAULT_MAX_PIXELS = 100_000_000
# A box given as all -1 means "no box": use the whole image.
NO_BOX = (-1.0, -1.0, -1.0, -1.0)
# Forgives float error when a box edge is rounded to whole pixels (0.6 * 100 = 60.0000024 must give 60).
_EDGE_SLACK = 1e-3


def _tf():
    import tensorflow as tf

    return tf


def is_image_file(name: str | os.PathLike[str]) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (any case) and is not hidden."""
    base = os.path.basename(os.fspath(name))
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def image_size_2d(image_size: int | Sequence[int], min_size: int = 1) -> tuple[int, int]:
    """``96`` or ``(96, 128)`` → ``(height, width)``, each at least ``min_size``."""
    try:
        if isinstance(image_size, bool):
            raise TypeError
        if isinstance(image_size, (int, np.integer)):
            size = (int(image_size), int(image_size))
        else:
            size = tuple(int(s) for s in image_size)  # type: ignore[union-attr]
            if len(size) != 2 or any(isinstance(s, bool) for s in image_size):  # type: ignore[union-attr]
                raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"image_size must be an int or (height, width). Received: image_size={image_size!r}") from None
    if min(size) < min_size:
        raise ConfigError(f"image_size must be at least {min_size}x{min_size}. Received: image_size={size!r}")
    return size  # type: ignore[return-value]


# --------------------------------------------------------------------------- boxes


@dataclasses.dataclass(frozen=True)
class Box:
    """A box in pixels on the original image: left, top, width, height.

    Its geometry is the one :func:`crop_and_resize` applies in the graph:
    :meth:`normalized` gives the ``[ymin, xmin, ymax, xmax]`` the SavedModel's
    ``embed_boxes`` signature takes, and :meth:`pixel_bounds` the whole pixels
    a crop keeps (clamped to the image, rounded outwards).

    Example:
        >>> Box(10, 20, 30, 40).normalized(width=100, height=200)
        (0.1, 0.1, 0.3, 0.4)
    """

    left: float
    top: float
    width: float
    height: float

    def __post_init__(self) -> None:
        values = (self.left, self.top, self.width, self.height)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"box values must be finite numbers. Received: {values}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"box width and height must be > 0. Received: width={self.width}, height={self.height}")
        if self.left < 0 or self.top < 0:
            raise ValueError(f"box left and top must be >= 0. Received: left={self.left}, top={self.top}")

    @classmethod
    def parse(cls, text: str) -> Box:
        """``"LEFT,TOP,WIDTH,HEIGHT"`` in pixels → Box (ValueError naming the text otherwise)."""
        try:
            values = tuple(float(v) for v in str(text).split(","))
        except ValueError:
            values = ()
        if len(values) != 4:
            raise ValueError(f"a box is LEFT,TOP,WIDTH,HEIGHT in pixels. Received: {text!r}")
        return cls(*values)

    def as_ltwh(self) -> tuple[float, float, float, float]:
        return (float(self.left), float(self.top), float(self.width), float(self.height))

    def normalized(self, width: int, height: int) -> tuple[float, float, float, float]:
        """``(ymin, xmin, ymax, xmax)`` as fractions of an image of ``width`` x ``height`` (not clamped)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive. Received: width={width}, height={height}")
        return (self.top / height, self.left / width, (self.top + self.height) / height, (self.left + self.width) / width)

    def pixel_bounds(self, width: int, height: int) -> tuple[int, int, int, int] | None:
        """``(x0, y0, x1, y1)``: the whole pixels a crop keeps on a ``width`` x ``height`` image; None if none.

        Clamped to the image and rounded outwards (floor of the start, ceiling
        of the end, forgiving float error), exactly as :func:`crop_and_resize`.
        """
        ymin, xmin, ymax, xmax = (min(1.0, max(0.0, v)) for v in self.normalized(width, height))
        x0, y0 = math.floor(xmin * width + _EDGE_SLACK), math.floor(ymin * height + _EDGE_SLACK)
        x1, y1 = math.ceil(xmax * width - _EDGE_SLACK), math.ceil(ymax * height - _EDGE_SLACK)
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None

    def clipped(self, width: int, height: int) -> Box | None:
        """The part of the box on a ``width`` x ``height`` image: the box itself if it lies inside (up to float error), None if none of it does.

        Example:
            >>> Box(50, 10, 80, 20).clipped(width=100, height=100)
            Box(left=50, top=10, width=50, height=20)
        """
        if self.pixel_bounds(width, height) is None:
            return None
        if self.left + self.width <= width + _EDGE_SLACK and self.top + self.height <= height + _EDGE_SLACK:
            return self
        return Box(self.left, self.top, min(self.width, width - self.left), min(self.height, height - self.top))


# --------------------------------------------------------------------------- encoded bytes


class ImageInfo(NamedTuple):
    """What the header of an encoded image says."""

    format: str  # JPEG, PNG, GIF or BMP
    width: int
    height: int


def image_format(data: bytes) -> str | None:
    """``"JPEG"``, ``"PNG"``, ``"GIF"`` or ``"BMP"`` by the magic bytes TensorFlow's decoder looks at; None otherwise."""
    head = bytes(data[:8])
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def inspect_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = False) -> ImageInfo:
    """Checks encoded image bytes without TensorFlow; returns the format and size.

    Catches, each with its reason: an empty file, bytes that are no JPEG, PNG,
    GIF or BMP (by the magic bytes TensorFlow's decoder looks at: an HTML page
    saved as ``.png`` is not a PNG), an unreadable header, and an image of more
    than ``max_pixels`` pixels (a decompression bomb: a small file that would
    decode to gigabytes). With ``decode``, the pixels are decoded too (JPEGs
    at a reduced scale), which also catches truncated files; without it, a
    truncated file passes and is found by the model's decoder.

    Raises:
        ImageError: the reason, in one line.
    """
    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"an image must be the bytes of an encoded file. Received: {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    fmt = image_format(data)
    if fmt is None:
        raise ImageError(f"not a JPEG, PNG, GIF or BMP image (it starts with {bytes(data[:12])!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height <= max_pixels and decode:
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                    image.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large to decode safely: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"cannot read the {fmt} image: {e}") from None
    if width < 1 or height < 1:
        raise ImageError(f"the {fmt} header gives an empty image of {width}x{height} pixels")
    if width * height > max_pixels:
        raise ImageError(f"image of {width}x{height} pixels is larger than the limit of {max_pixels:,} pixels")
    return ImageInfo(fmt, int(width), int(height))


def check_photo(
    data: bytes, box: Box | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = False
) -> tuple[float, float, float, float] | None:
    """Checks a photo before any model sees it: :func:`inspect_image`, and that its pixel box keeps some of it.

    Returns:
        The box normalised for the ``embed_boxes`` signature
        (:meth:`Box.normalized`), or None when there is no box.

    Raises:
        ImageError: the image is bad (see :func:`inspect_image`), or the box lies outside it.
    """
    info = inspect_image(data, max_pixels=max_pixels, decode=decode)
    if box is None:
        return None
    if box.pixel_bounds(info.width, info.height) is None:
        raise ImageError(f"box {box.as_ltwh()} lies outside the {info.width}x{info.height} image")
    return box.normalized(info.width, info.height)


def read_image_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file (ImageError naming the file and the reason when it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}") from None


def pattern_jpeg(width: int = 32, height: int = 32, variant: int = 0) -> bytes:
    """A small, valid JPEG (a gradient with an ellipse): for warm-up requests and health probes."""
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, (80 * variant) % 256)], -1)
    image = Image.fromarray(array.astype(np.uint8))
    ImageDraw.Draw(image).ellipse([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=(200, (40 * variant) % 256, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the one preprocessing function (TF)


def decode_image(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF (first frame)/BMP bytes → uint8 RGB ``[H, W, 3]``.

    Raises ``tf.errors.InvalidArgumentError`` for bytes that are not an image.
    """
    tf = _tf()
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def ltwh_to_normalized(box_ltwh: tf.Tensor, image_shape: tf.Tensor) -> tf.Tensor:
    """A pixel box ``[left, top, width, height]`` → normalised ``[ymin, xmin, ymax, xmax]``.

    ``NO_BOX`` (all ``-1``) becomes the whole image ``[0, 0, 1, 1]``.
    """
    tf = _tf()
    box_ltwh = tf.cast(box_ltwh, tf.float32)
    h = tf.cast(image_shape[0], tf.float32)
    w = tf.cast(image_shape[1], tf.float32)
    left, top, width, height = tf.unstack(box_ltwh)
    normalized = tf.stack([top / h, left / w, (top + height) / h, (left + width) / w])
    has_box = tf.reduce_any(tf.not_equal(box_ltwh, -1.0))
    return tf.where(has_box, normalized, tf.constant([0.0, 0.0, 1.0, 1.0]))


def crop_and_resize(
    image: tf.Tensor, box: tf.Tensor, image_size: tuple[int, int]
) -> tuple[tf.Tensor, tf.Tensor]:
    """Crops ``image`` to a normalised box and resizes it to ``image_size``.

    The box ``[ymin, xmin, ymax, xmax]`` is clamped to the image and rounded
    outwards to whole pixels. A box that is empty after clamping cannot be
    cropped: the whole image is used and ``valid`` is False, so callers can
    drop it (training) or refuse it (serving).

    Returns:
        ``(pixels, valid)``: float32 ``[height, width, 3]`` in ``[0, 255]`` and a
        bool scalar.
    """
    tf = _tf()
    shape = tf.shape(image)
    h = tf.cast(shape[0], tf.float32)
    w = tf.cast(shape[1], tf.float32)
    box = tf.clip_by_value(tf.cast(box, tf.float32), 0.0, 1.0)
    # Round outwards to whole pixels, forgiving float error (0.6 * 100 = 60.0000024
    # must give 60, not 61): a box from whole pixel coordinates crops exactly them.
    eps = 1e-3
    y0 = tf.cast(tf.floor(box[0] * h + eps), tf.int32)
    x0 = tf.cast(tf.floor(box[1] * w + eps), tf.int32)
    y1 = tf.cast(tf.math.ceil(box[2] * h - eps), tf.int32)
    x1 = tf.cast(tf.math.ceil(box[3] * w - eps), tf.int32)
    valid = tf.logical_and(y1 > y0, x1 > x0)
    y0, x0 = tf.where(valid, y0, 0), tf.where(valid, x0, 0)
    y1, x1 = tf.where(valid, y1, shape[0]), tf.where(valid, x1, shape[1])
    crop = image[y0:y1, x0:x1, :]
    pixels = tf.image.resize(tf.cast(crop, tf.float32), image_size, method="bilinear", antialias=True)
    pixels = tf.clip_by_value(pixels, 0.0, 255.0)
    pixels.set_shape([image_size[0], image_size[1], 3])
    return pixels, valid


def prepare_image(
    image_bytes: tf.Tensor, box: tf.Tensor | None = None, *, image_size: int | Sequence[int], pixel_box: bool = False
) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded bytes (+ optional box) → model pixels. The one preprocessing function.

    Training maps it over files, and the exported SavedModel runs it on
    request bytes, so a photo becomes the same tensor everywhere.

    Args:
        image_bytes: scalar tf.string. JPEG, PNG, GIF or BMP.
        box: optional float32 ``[4]``: normalised ``[ymin, xmin, ymax, xmax]``,
            or with ``pixel_box`` pixels ``[left, top, width, height]`` of the
            full image (:data:`NO_BOX` = the whole image).
        image_size: int or (height, width). The tower's input size.
        pixel_box: bool. Whether ``box`` is in pixels.

    A JPEG whose crop is at least 2, 4 or 8 times ``image_size`` is decoded
    at that fraction of its size (libjpeg's DCT-domain scaling, see
    :func:`jpeg_ratio`) before the crop and the antialiased resize: about the
    same pixels (mean difference ~1 level of 255 on smooth images) for a
    fraction of the work.

    Returns:
        ``(pixels, valid)`` as :func:`crop_and_resize`.
    """
    tf = _tf()
    size = image_size_2d(image_size)
    if box is None:
        box = tf.constant(NO_BOX if pixel_box else [0.0, 0.0, 1.0, 1.0])
    image, box = _decode_for_crop(image_bytes, box, size, pixel_box=pixel_box)
    return crop_and_resize(image, box, size)


# libjpeg can decode straight to 1/2, 1/4 or 1/8 of the size by scaling in the
# DCT domain, which is much cheaper than a full decode followed by an
# antialiased resize of all those pixels.
JPEG_RATIOS = (1, 2, 4, 8)


def jpeg_ratio(image_shape: tf.Tensor, box: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """The largest libjpeg scale-down ratio in :data:`JPEG_RATIOS` that still leaves enough pixels.

    A ratio ``r`` is allowed when the box's crop, measured in pixels of the
    full image, is at least ``r`` times the target size in both dimensions, so
    the crop of the scaled-down image still has at least ``image_size``
    pixels and the antialiased resize only ever shrinks it.

    Args:
        image_shape: int ``[2+]``, height and width of the full image.
        box: float32 ``[4]``, normalised ``[ymin, xmin, ymax, xmax]``.
        image_size: (height, width).

    Returns:
        int32 scalar: the index into :data:`JPEG_RATIOS` (0 = full decode).
    """
    tf = _tf()
    box = tf.clip_by_value(tf.cast(box, tf.float32), 0.0, 1.0)
    crop_h = (box[2] - box[0]) * tf.cast(image_shape[0], tf.float32)
    crop_w = (box[3] - box[1]) * tf.cast(image_shape[1], tf.float32)
    # How many times larger than the target the crop is, in its tighter dimension.
    scale = tf.minimum(crop_h / float(image_size[0]), crop_w / float(image_size[1]))
    index = tf.constant(0, tf.int32)
    for i, r in enumerate(JPEG_RATIOS[1:], start=1):
        # The small slack forgives float error: 0.5 * 512 must count as 256 px.
        index = tf.where(scale >= float(r) - 1e-3, tf.constant(i, tf.int32), index)
    return index


def _decode_for_crop(
    image_bytes: tf.Tensor, box: tf.Tensor, image_size: tuple[int, int], *, pixel_box: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """Decodes only as many pixels as cropping ``box`` to ``image_size`` needs.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale when its crop stays at least
    ``image_size`` (:func:`jpeg_ratio`); its size comes from the header, so
    this costs no extra decode. Other formats go through :func:`decode_image`.
    A normalised box means the same region of the scaled image, so it is
    returned unchanged; a pixel box ``[left, top, width, height]``
    (``pixel_box=True``) is normalised against the full-size image.

    Returns:
        ``(image, normalised_box)``: uint8 ``[H, W, 3]`` and float32 ``[4]``.
    """
    tf = _tf()

    def normalise(shape):
        return ltwh_to_normalized(box, shape) if pixel_box else tf.cast(box, tf.float32)

    def jpeg():
        full_shape = tf.image.extract_jpeg_shape(image_bytes)
        norm_box = normalise(full_shape)
        index = jpeg_ratio(full_shape, norm_box, image_size)
        branches = [
            (lambda r=r: tf.io.decode_jpeg(image_bytes, channels=3, ratio=r)) for r in JPEG_RATIOS
        ]
        image = tf.switch_case(index, branches)
        image.set_shape([None, None, 3])
        return image, norm_box

    def other():
        image = decode_image(image_bytes)
        return image, normalise(tf.shape(image))

    image, norm_box = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    image.set_shape([None, None, 3])
    norm_box.set_shape([4])
    return image, norm_box


# --------------------------------------------------------------------------- checking


@dataclasses.dataclass
class ImageCheck:
    """What :func:`check_images` found: unreadable images and boxes that crop to nothing."""

    bad_images: dict[str, str] = dataclasses.field(default_factory=dict)
    empty_boxes: list[tuple[str, tuple[float, float, float, float]]] = dataclasses.field(default_factory=list)
    checked: int = 0

    def summary(self) -> str:
        return (
            f"checked {self.checked} images: {len(self.bad_images)} unreadable, "
            f"{len(self.empty_boxes)} boxes empty after clamping to the image"
        )


def check_images(records: Sequence[Any], *, workers: int | None = None) -> tuple[list[Any], ImageCheck]:
    """Decodes every distinct image once, with the same decoder training uses.

    A corrupt, truncated or non-image file, and a box that lies outside its
    image, are dropped here, counted, and each named once in the log, so
    training never stops on them.

    Returns:
        ``(good_records, report)``.
    """
    tf = _tf()
    paths = sorted({r.image_path for r in records})
    shapes: dict[str, tuple[int, int] | None] = {}
    report = ImageCheck()

    def shape_of(path: str) -> tuple[str, tuple[int, int] | None, str]:
        try:
            data = tf.io.read_file(path)
            shape = decode_image(data).shape
            return path, (int(shape[0]), int(shape[1])), ""
        except (tf.errors.OpError, OSError) as e:
            message = getattr(e, "message", None) or str(e)
            return path, None, message.strip().splitlines()[0] if message.strip() else type(e).__name__

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2)) as pool:
        for path, shape, error in pool.map(shape_of, paths):
            shapes[path] = shape
            if shape is None:
                report.bad_images[path] = error
                logger.warning("skipping unreadable image %s: %s", path, error)
    report.checked = len(paths)
    good = []
    for r in records:
        shape = shapes[r.image_path]
        if shape is None:
            continue
        if r.box is not None and r.box.pixel_bounds(shape[1], shape[0]) is None:
            report.empty_boxes.append((r.image_path, r.box.as_ltwh()))
            logger.warning("skipping %s: box %s is empty after clamping to %dx%d", r.image_path, r.box.as_ltwh(), shape[1], shape[0])
            continue
        good.append(r)
    log = logger.warning if (report.bad_images or report.empty_boxes) else logger.info
    log("%s", report.summary())
    return good, report
