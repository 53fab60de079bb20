"""Trivial retrieval baselines, to know what a learned embedding has to beat.

A colour histogram embedding (HSV, L2-normalised) and a top-k accuracy by
cosine similarity, de-duplicated by product. If a model does not beat the
colour histogram by a wide margin, it has learned colour, not products.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from street2shop.data.records import Record
from street2shop.errors import ConfigError, DataError
from street2shop.index import ranking

logger = logging.getLogger(__name__)

DEFAULT_BINS = (8, 4, 4)


def colour_histogram(image: np.ndarray, bins: tuple[int, int, int] = DEFAULT_BINS) -> np.ndarray:
    """The joint HSV histogram of an RGB image, L1- then L2-normalised.

    Hue, saturation and value are PIL's HSV channels (0-255 each), cut into
    ``bins`` equal bins. Bin ``(h, s, v)`` is at index ``(h * S + s) * V + v``.
    Pure red (hue 0) falls in hue bin 0.

    Args:
        image: np.ndarray, uint8, shape (H, W, 3). RGB pixels.
        bins: tuple of 3 ints. Bins for hue, saturation and value.

    Returns:
        np.ndarray of float32, shape (H_bins * S_bins * V_bins,), unit L2 norm.

    Raises:
        DataError: the image is not a non-empty uint8 (H, W, 3) array.
        ConfigError: ``bins`` is not three integers in [1, 256].
    """
    _check_bins(bins)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise DataError(
            f"colour_histogram expects a non-empty uint8 RGB array of shape (H, W, 3). "
            f"Received: dtype={image.dtype}, shape={image.shape}"
        )
    hsv = np.asarray(Image.fromarray(image, "RGB").convert("HSV"), dtype=np.int64).reshape(-1, 3)
    nh, ns, nv = bins
    h = hsv[:, 0] * nh // 256
    s = hsv[:, 1] * ns // 256
    v = hsv[:, 2] * nv // 256
    counts = np.bincount((h * ns + s) * nv + v, minlength=nh * ns * nv).astype(np.float64)
    counts /= counts.sum()
    counts /= np.linalg.norm(counts)
    return counts.astype(np.float32)


def colour_histogram_embeddings(
    records: Iterable[Record], *, crop_to_box: bool = True, bins: tuple[int, int, int] = DEFAULT_BINS
) -> np.ndarray:
    """Colour histograms of the records' images, one row per record.

    Args:
        records: iterable of Record.
        crop_to_box: bool. Crop to ``record.box`` (clamped to the image) when
            the record has one; the whole image otherwise.
        bins: tuple of 3 ints. See :func:`colour_histogram`.

    Returns:
        np.ndarray of float32, shape (N, H_bins * S_bins * V_bins).

    Raises:
        DataError: an image cannot be read (the message names it), or a box
            lies entirely outside its image.
    """
    _check_bins(bins)
    rows = []
    for record in records:
        try:
            with Image.open(record.image_path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {record.image_path}: {e}") from None
        if crop_to_box and record.box is not None:
            bounds = record.box.pixel_bounds(*image.size)
            if bounds is None:
                raise DataError(f"box lies outside the image {record.image_path} of size {image.size[0]}x{image.size[1]}. Received: box={record.box.as_ltwh()}")
            image = image.crop(bounds)
        rows.append(colour_histogram(np.asarray(image), bins))
    if not rows:
        return np.zeros((0, int(np.prod(bins))), np.float32)
    return np.stack(rows)


def _check_bins(bins: Sequence[int]) -> None:
    if (
        len(tuple(bins)) != 3
        or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in bins)
        or not all(1 <= b <= 256 for b in bins)
    ):
        raise ConfigError(f"bins must be three integers in [1, 256]. Received: bins={bins!r}")


def top_k_accuracy(
    query_emb: np.ndarray,
    query_products: Sequence[str],
    gallery_emb: np.ndarray,
    gallery_products: Sequence[str],
    ks: Sequence[int] = (1, 5, 20),
) -> dict[int, float]:
    """Fraction of queries whose product is among the k nearest distinct products.

    Gallery items are ranked by cosine similarity to the query (highest
    first; equal similarities keep gallery order), then reduced to distinct
    products in order of first appearance. A query is correct at k if its
    product is among the first k. A query whose product is not in the
    gallery is never correct. Zero vectors have similarity 0 to everything.

    Args:
        query_emb: np.ndarray, shape (Q, D).
        query_products: sequence of Q product ids.
        gallery_emb: np.ndarray, shape (G, D).
        gallery_products: sequence of G product ids.
        ks: sequence of positive ints.

    Returns:
        dict mapping each k to the accuracy in [0, 1].

    Raises:
        DataError: shapes or lengths disagree, or there are no queries.
        ConfigError: a k is not a positive integer.

    Example:
        >>> q = np.array([[1.0, 0.0]]); g = np.array([[0.0, 1.0], [1.0, 0.1]])
        >>> top_k_accuracy(q, ["b"], g, ["a", "b"], ks=(1,))
        {1: 1.0}
    """
    ks = tuple(ks)
    if not ks or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ConfigError(f"ks must be positive integers. Received: ks={ks!r}")
    q = np.asarray(query_emb, dtype=np.float64)
    g = np.asarray(gallery_emb, dtype=np.float64)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise DataError(
            "query and gallery embeddings must be 2-D with the same dimension. "
            f"Received: query shape={q.shape}, gallery shape={g.shape}"
        )
    if len(query_products) != q.shape[0] or len(gallery_products) != g.shape[0]:
        raise DataError(
            "there must be one product id per embedding row. Received: "
            f"{q.shape[0]} queries and {len(query_products)} query ids, "
            f"{g.shape[0]} gallery items and {len(gallery_products)} gallery ids"
        )
    if q.shape[0] == 0:
        raise DataError("top_k_accuracy needs at least one query. Received: 0 queries")
    sims = ranking.cosine_matrix(q, g)  # (Q, G)
    gallery_products = [str(p) for p in gallery_products]
    all_rows = np.arange(len(gallery_products))
    ranks = []
    for i, product in enumerate(query_products):
        rows, _ = ranking.order(all_rows, sims[i])
        ranks.append(ranking.product_rank(rows, gallery_products.__getitem__, str(product)))
    return {int(k): float(np.mean([r is not None and r <= k for r in ranks])) for k in ks}
