"""A small synthetic street-to-shop dataset, for the demo, tests and benchmarks.

Every product is a procedurally drawn object: a silhouette from one of a few
families (the family is the product's category: bags, bottles, tops, ...), its
body filled with a pattern (stripes, dots, checks or text-like glyph marks) in
two colours of a palette, and an accent part (a handle, a cap, a sole...) in a
third. Palettes are shared by several products of different shapes and
patterns, so colour alone does not tell products apart.

- Shop photos: the product centred and upright on a clean near-white background.
- Street photos: the same product warped in perspective, rotated, rescaled,
  re-lit (brightness, colour cast, a shadow ramp), partly occluded by a random
  shape, pasted onto a cluttered background (a gradient, random shapes, some
  in the products' own colours, stripes), blurred and noisy. The product's
  bounding box (clipped to the image) is recorded.

Street photos of each product are split ``train`` / ``val`` (by photo: every
product appears in both); shop photos are split ``catalog``. The output is a
folder of JPEGs and a ``manifest.csv`` readable by
:func:`street2shop.data.records.read_manifest_csv`. The same seed gives the same
bytes: all randomness comes from :class:`numpy.random.Generator` objects seeded
from ``(seed, product, photo, purpose)``, never from global random state.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from street2shop.data.image import Box
from street2shop.data.records import Record, RecordSet, write_manifest
from street2shop.errors import ConfigError, check_positive_int

logger = logging.getLogger(__name__)

JPEG_QUALITY = 90
PATTERNS = ("stripes", "dots", "checks", "glyphs")
# Products per palette (about): how many products share one set of colours.
PRODUCTS_PER_PALETTE = 8
# Colours products are painted with. None is close to pure magenta, the key
# colour of the plain-background test mode: each has G >= 120, R <= 100 or B <= 100.
COLOURS = (
    (200, 30, 35),  # red
    (235, 120, 20),  # orange
    (240, 205, 40),  # yellow
    (120, 130, 40),  # olive
    (40, 150, 60),  # green
    (20, 140, 140),  # teal
    (90, 190, 230),  # sky blue
    (30, 70, 180),  # blue
    (25, 30, 80),  # navy
    (120, 70, 35),  # brown
    (35, 35, 35),  # charcoal
    (240, 235, 215),  # cream
    (150, 150, 150),  # grey
    (245, 170, 185),  # pink
    (190, 160, 110),  # tan
    (160, 40, 70),  # burgundy
)
OCCLUDER_COLOURS = ((224, 172, 140), (198, 134, 96), (141, 85, 54), (255, 219, 190), (80, 60, 50))
PLAIN_BACKGROUND = (255, 0, 255)  # key colour of the test mode (see _generate)

_Canvas = tuple[ImageDraw.ImageDraw, ImageDraw.ImageDraw, int]  # body draw, accent draw, size


def generate(
    out_dir: str | os.PathLike[str],
    *,
    products: int = 40,
    street_per_product: int = 8,
    shop_per_product: int = 1,
    image_size: int = 160,
    seed: int = 0,
    val_fraction: float = 0.25,
    categories: int = 4,
) -> RecordSet:
    """Writes a synthetic street/shop dataset and returns its records.

    Args:
        out_dir: str or path. Output folder; images go to ``out_dir/images/``
            and the manifest to ``out_dir/manifest.csv`` (files of an earlier
            run with the same names are overwritten).
        products: int. Number of products (>= 1).
        street_per_product: int. Street photos per product (>= 2 when
            ``0 < val_fraction < 1``, so that each product is in both splits).
        shop_per_product: int. Catalogue photos per product (>= 1).
        image_size: int. Side of the square images in pixels (>= 32).
        seed: int. Seed (>= 0); the same seed gives identical files.
        val_fraction: float in [0, 1]. Fraction of each product's street photos
            put in the ``val`` split (rounded, at least one and at most all
            but one when strictly between 0 and 1).
        categories: int. Number of categories, 1 to 6; a category is a
            silhouette family, products are spread over them in turn.

    Returns:
        RecordSet of the written images (``source`` is the manifest path).

    Raises:
        ConfigError: an argument is out of range.

    Example:
        >>> records = generate("/tmp/synth", products=10, street_per_product=4)
        >>> len(records.filter(domain="shop"))
        10
    """
    return _generate(
        out_dir,
        products=products,
        street_per_product=street_per_product,
        shop_per_product=shop_per_product,
        image_size=image_size,
        seed=seed,
        val_fraction=val_fraction,
        categories=categories,
        plain=False,
    )


def _generate(
    out_dir: str | os.PathLike[str],
    *,
    products: int,
    street_per_product: int,
    shop_per_product: int,
    image_size: int,
    seed: int,
    val_fraction: float,
    categories: int,
    plain: bool,
) -> RecordSet:
    """:func:`generate`, with a test mode.

    With ``plain=True`` the street photos show the product on a uniform
    ``PLAIN_BACKGROUND``, with no clutter, occluder or noise, and otherwise
    the same geometry (the same boxes) as with ``plain=False``, because every
    aspect of a photo draws from its own random stream.
    """
    _check_args(products, street_per_product, shop_per_product, image_size, seed, val_fraction, categories)
    out = Path(out_dir)
    (out / "images" / "shop").mkdir(parents=True, exist_ok=True)
    (out / "images" / "street").mkdir(parents=True, exist_ok=True)
    n_val = _n_val(street_per_product, val_fraction)
    specs = _product_specs(products, categories, seed)
    records: list[Record] = []
    for spec in specs:
        pid = spec["product_id"]
        meta = {"palette": str(spec["palette"]), "pattern": spec["pattern"]}
        product = _draw_product(spec, image_size, _rng(seed, 0, spec["index"]))
        for j in range(shop_per_product):
            image = _shop_photo(product, image_size, _rng(seed, 1, spec["index"], j))
            path = out / "images" / "shop" / f"{pid}_{j}.jpg"
            image.save(path, format="JPEG", quality=JPEG_QUALITY)
            records.append(Record(str(path.resolve()), pid, "shop", "catalog", spec["category"], None, meta))
        for k in range(street_per_product):
            streams = [_rng(seed, 2, spec["index"], k, purpose) for purpose in range(5)]
            image, box = _street_photo(product, image_size, streams, plain=plain)
            path = out / "images" / "street" / f"{pid}_{k:02d}.jpg"
            image.save(path, format="JPEG", quality=JPEG_QUALITY)
            split = "val" if k >= street_per_product - n_val else "train"
            records.append(Record(str(path.resolve()), pid, "street", split, spec["category"], box, meta))
    manifest = write_manifest(records, out / "manifest.csv")
    result = RecordSet(records, [], str(manifest))
    logger.info("synthetic dataset written: %s", result.summary())
    return result


def _check_args(
    products: int,
    street_per_product: int,
    shop_per_product: int,
    image_size: int,
    seed: int,
    val_fraction: float,
    categories: int,
) -> None:
    ints = {
        "products": (products, 1),
        "street_per_product": (street_per_product, 1),
        "shop_per_product": (shop_per_product, 1),
        "image_size": (image_size, 32),
        "seed": (seed, 0),
        "categories": (categories, 1),
    }
    for name, (value, low) in ints.items():
        check_positive_int(name, value, minimum=low)
    if categories > len(_FAMILIES):
        raise ConfigError(
            f"categories must be at most {len(_FAMILIES)} (the silhouette families "
            f"{', '.join(_FAMILIES)}). Received: categories={categories}"
        )
    if categories > products:
        raise ConfigError(
            f"categories must be at most products. Received: categories={categories}, products={products}"
        )
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction <= 1.0:
        raise ConfigError(f"val_fraction must be a number in [0, 1]. Received: val_fraction={val_fraction!r}")
    if 0.0 < val_fraction < 1.0 and street_per_product < 2:
        raise ConfigError(
            "street_per_product must be >= 2 so that every product has street photos in both "
            f"train and val. Received: street_per_product={street_per_product}, val_fraction={val_fraction}"
        )


def _n_val(street_per_product: int, val_fraction: float) -> int:
    n = int(math.floor(street_per_product * val_fraction + 0.5))
    if 0.0 < val_fraction < 1.0:
        n = min(max(n, 1), street_per_product - 1)
    return n


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


# ---------------------------------------------------------------- products


def _product_specs(products: int, categories: int, seed: int) -> list[dict]:
    """Category, pattern and palette of each product.

    Product ``i`` is in round ``r = i // categories`` and category
    ``c = i % categories``; its pattern is ``r % 4`` and its palette
    ``(r + c) % n_palettes``, so each palette is shared by products of
    several categories and patterns: a product's palette mates differ from it
    in shape and pattern, not in colour.
    """
    rng = _rng(seed, 3)
    n_palettes = max(1, math.ceil(products / PRODUCTS_PER_PALETTE))
    order = rng.permutation(len(COLOURS))
    palettes = []
    for p in range(n_palettes):
        if 3 * (p + 1) <= len(COLOURS):
            idx = order[3 * p : 3 * p + 3]
        else:
            idx = rng.choice(len(COLOURS), size=3, replace=False)
        palettes.append(tuple(COLOURS[i] for i in idx))
    families = list(_FAMILIES)[:categories]
    width = len(str(products - 1))
    specs = []
    for i in range(products):
        palette = (i // categories + i % categories) % n_palettes
        specs.append(
            {
                "index": i,
                "product_id": f"p{i:0{max(3, width)}d}",
                "category": families[i % categories],
                "pattern": PATTERNS[(i // categories) % len(PATTERNS)],
                "palette": palette,
                "colours": palettes[palette],
            }
        )
    return specs


def _draw_product(spec: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """The product, upright, as an RGBA image of ``size`` x ``size``, cropped to its extent."""
    big = 2 * size  # masks are drawn at twice the size and shrunk: smooth edges
    body = Image.new("L", (big, big), 0)
    accent = Image.new("L", (big, big), 0)
    _FAMILIES[spec["category"]]((ImageDraw.Draw(body), ImageDraw.Draw(accent), big), rng)
    body_a = np.asarray(body.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    acc_a = np.asarray(accent.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    base, pat_colour, acc_colour = (np.array(c, dtype=np.float32) for c in spec["colours"])
    pattern = _pattern_mask(spec["pattern"], size, rng)[..., None]
    rgb = base * (1.0 - pattern) + pat_colour * pattern
    acc = acc_a[..., None]
    rgb = rgb * (1.0 - acc) + acc_colour * acc
    # Soft shading across the object, so it looks a little round.
    x = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    shade = 1.0 - float(rng.uniform(0.08, 0.18)) * (x[None, :] - float(rng.uniform(-0.4, 0.4))) ** 2
    rgb = rgb * shade[..., None]
    alpha = 1.0 - (1.0 - body_a) * (1.0 - acc_a)
    rgba = np.dstack([np.clip(rgb, 0, 255), alpha * 255.0]).round().astype(np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    return image.crop(image.getchannel("A").point(lambda v: 255 if v >= 8 else 0).getbbox())


def _pattern_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A float mask in [0, 1] (1 = pattern colour) covering roughly 30-50% of the area."""
    if kind == "glyphs":
        return _glyph_mask(size, rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = float(rng.uniform(0, np.pi))
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    period = float(rng.uniform(0.07, 0.16))
    if kind == "stripes":
        duty = float(rng.uniform(0.3, 0.5))
        return ((u / period) % 1.0 < duty).astype(np.float32)
    if kind == "dots":
        fu = (u / period) % 1.0 - 0.5
        fv = (v / period) % 1.0 - 0.5
        radius = float(rng.uniform(0.3, 0.4))
        return (fu**2 + fv**2 < radius**2).astype(np.float32)
    if kind == "checks":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    raise ConfigError(f"pattern must be one of {PATTERNS}. Received: {kind!r}")


def _glyph_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of short blocks and strokes, like lines of printed text."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    line = size * float(rng.uniform(0.09, 0.14))
    height = line * float(rng.uniform(0.55, 0.7))
    y = float(rng.uniform(0, line))
    while y < size:
        x = float(rng.uniform(-line, 0))
        while x < size:
            w = height * float(rng.uniform(0.35, 0.9))
            kind = rng.integers(0, 3)
            if kind == 0:  # solid block
                draw.rectangle([x, y, x + w, y + height], fill=255)
            elif kind == 1:  # ring
                draw.ellipse([x, y, x + w, y + height], outline=255, width=max(1, int(height / 4)))
            else:  # vertical stroke with a foot
                draw.rectangle([x + w / 3, y, x + 2 * w / 3, y + height], fill=255)
                draw.rectangle([x, y + 0.75 * height, x + w, y + height], fill=255)
            x += w + height * float(rng.uniform(0.15, 0.3))
            if rng.random() < 0.18:  # a space between words
                x += height * 0.8
        y += line
    return np.asarray(mask, dtype=np.float32) / 255.0


# Silhouette families. Each draws the body (filled with the pattern) and the
# accent part on canvases of side n, coordinates in units of n.


def _bag(canvas: _Canvas, rng: np.random.Generator) -> None:
    body, accent, n = canvas
    w, h = rng.uniform(0.55, 0.8), rng.uniform(0.35, 0.5)
    taper = rng.uniform(0.0, 0.12)
    top, bottom = 0.88 - h, 0.88
    left, right = 0.5 - w / 2, 0.5 + w / 2
    body.polygon(_px([(left + taper, top), (right - taper, top), (right, bottom), (left, bottom)], n), fill=255)
    hw, hh = w * rng.uniform(0.35, 0.65), rng.uniform(0.15, 0.3)
    thick = int(n * rng.uniform(0.03, 0.06))
    accent.ellipse(_px([(0.5 - hw / 2, top - hh), (0.5 + hw / 2, top + hh)], n), outline=255, width=thick)
    accent.rectangle(_px([(0, top), (1, 1)], n), fill=0)  # the handle is only above the body
    cw = rng.uniform(0.06, 0.14)
    if rng.random() < 0.5:
        accent.rectangle(_px([(0.5 - cw / 2, top), (0.5 + cw / 2, top + cw)], n), fill=255)
    else:
        accent.ellipse(_px([(0.5 - cw / 2, top + 0.02), (0.5 + cw / 2, top + 0.02 + cw)], n), fill=255)


def _bottle(canvas: _Canvas, rng: np.random.Generator) -> None:
    body, accent, n = canvas
    w = rng.uniform(0.26, 0.42)
    shoulder = rng.uniform(0.34, 0.46)
    body.rounded_rectangle(
        _px([(0.5 - w / 2, shoulder), (0.5 + w / 2, 0.92)], n), radius=int(n * w * rng.uniform(0.1, 0.4)), fill=255
    )
    neck_w = w * rng.uniform(0.3, 0.45)
    neck_top = rng.uniform(0.12, 0.2)
    body.rectangle(_px([(0.5 - neck_w / 2, neck_top), (0.5 + neck_w / 2, shoulder + 0.05)], n), fill=255)
    body.polygon(_px([(0.5 - neck_w / 2, shoulder - 0.08), (0.5 + neck_w / 2, shoulder - 0.08),
                      (0.5 + w / 2, shoulder + 0.04), (0.5 - w / 2, shoulder + 0.04)], n), fill=255)  # fmt: skip
    cap_h = rng.uniform(0.04, 0.09)
    cap = [(0.5 - neck_w / 2 - 0.01, neck_top - cap_h), (0.5 + neck_w / 2 + 0.01, neck_top)]
    accent.rectangle(_px(cap, n), fill=255)
    if rng.random() < 0.6:  # a label band
        y = rng.uniform(0.55, 0.75)
        accent.rectangle(_px([(0.5 - w / 2, y), (0.5 + w / 2, y + rng.uniform(0.03, 0.08))], n), fill=255)


def _top(canvas: _Canvas, rng: np.random.Generator) -> None:
    body, accent, n = canvas
    w = rng.uniform(0.38, 0.52)
    top, bottom = rng.uniform(0.15, 0.22), rng.uniform(0.8, 0.9)
    body.rectangle(_px([(0.5 - w / 2, top), (0.5 + w / 2, bottom)], n), fill=255)
    reach = rng.uniform(0.12, 0.22)
    drop = rng.uniform(0.15, 0.35)
    for s in (-1, 1):
        x0 = 0.5 + s * w / 2
        body.polygon(_px([(x0, top), (x0 + s * reach, top + drop), (x0 + s * (reach - 0.1), top + drop + 0.08),
                          (x0, top + 0.22)], n), fill=255)  # fmt: skip
    cw = rng.uniform(0.12, 0.2)
    accent.ellipse(_px([(0.5 - cw / 2, top - 0.03), (0.5 + cw / 2, top + cw * 0.7)], n), fill=255)
    if rng.random() < 0.5:  # a hem band
        accent.rectangle(_px([(0.5 - w / 2, bottom - 0.05), (0.5 + w / 2, bottom)], n), fill=255)


def _shoe(canvas: _Canvas, rng: np.random.Generator) -> None:
    body, accent, n = canvas
    height = rng.uniform(0.25, 0.5)  # sneaker ... boot
    sole_top = rng.uniform(0.66, 0.72)
    top = sole_top - height
    heel = rng.uniform(0.1, 0.18)
    body.polygon(_px([(heel, sole_top), (heel + 0.02, top), (heel + rng.uniform(0.2, 0.3), top),
                      (rng.uniform(0.5, 0.6), sole_top - rng.uniform(0.1, 0.18)), (0.86, sole_top - 0.08),
                      (0.9, sole_top)], n), fill=255)  # fmt: skip
    accent.rounded_rectangle(_px([(heel - 0.03, sole_top), (0.93, sole_top + rng.uniform(0.05, 0.1))], n),
                             radius=int(n * 0.03), fill=255)  # fmt: skip
    for i in range(int(rng.integers(2, 5))):  # laces
        x = heel + 0.22 + 0.06 * i
        y = top + 0.08 + 0.05 * i
        accent.line(_px([(x - 0.04, y), (x + 0.04, y + 0.02)], n), fill=255, width=max(1, int(n * 0.015)))


def _hat(canvas: _Canvas, rng: np.random.Generator) -> None:
    body, accent, n = canvas
    rx, ry = rng.uniform(0.2, 0.3), rng.uniform(0.22, 0.38)
    base = rng.uniform(0.62, 0.72)
    body.pieslice(_px([(0.5 - rx, base - ry), (0.5 + rx, base + ry)], n), 180, 360, fill=255)
    brim_rx, brim_ry = rng.uniform(0.34, 0.46), rng.uniform(0.04, 0.1)
    accent.ellipse(_px([(0.5 - brim_rx, base - brim_ry), (0.5 + brim_rx, base + brim_ry)], n), fill=255)
    if rng.random() < 0.6:  # a band
        bh = rng.uniform(0.03, 0.07)
        accent.rectangle(_px([(0.5 - rx, base - bh - 0.02), (0.5 + rx, base - 0.02)], n), fill=255)


def _mug(canvas: _Canvas, rng: np.random.Generator) -> None:
    body, accent, n = canvas
    w, h = rng.uniform(0.34, 0.5), rng.uniform(0.4, 0.58)
    left = 0.45 - w / 2
    top = 0.85 - h
    er = rng.uniform(0.03, 0.06)
    hr = h * rng.uniform(0.25, 0.4)
    hy = top + h * rng.uniform(0.35, 0.55)
    accent.ellipse(_px([(left + w - hr, hy - hr), (left + w + hr, hy + hr)], n), outline=255,
                   width=int(n * rng.uniform(0.03, 0.05)))  # fmt: skip
    body.rectangle(_px([(left, top), (left + w, 0.85)], n), fill=255)
    body.ellipse(_px([(left, 0.85 - er), (left + w, 0.85 + er)], n), fill=255)
    accent.rectangle(_px([(left, top - er), (left + w, 0.85 + er)], n), fill=0)  # handle outside only
    accent.ellipse(_px([(left, top - er), (left + w, top + er)], n), fill=255)  # rim


_FAMILIES: dict[str, Callable[[_Canvas, np.random.Generator], None]] = {
    "bags": _bag,
    "bottles": _bottle,
    "tops": _top,
    "shoes": _shoe,
    "hats": _hat,
    "mugs": _mug,
}


def _px(points: list[tuple[float, float]], n: int) -> list[tuple[float, float]]:
    return [(float(x) * n, float(y) * n) for x, y in points]


# ------------------------------------------------------------------ photos


def _shop_photo(product: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """The product centred, upright, on a clean near-white background."""
    grey = rng.uniform(238, 252)
    tint = rng.uniform(-3, 3, size=3)
    ramp = np.linspace(0.0, rng.uniform(0, 8), size, dtype=np.float32)[:, None, None]
    background = np.clip(grey + tint - ramp + np.zeros((size, size, 3), np.float32), 0, 255)
    image = Image.fromarray(background.round().astype(np.uint8), "RGB")
    scale = rng.uniform(0.72, 0.86) * size / max(product.size)
    w, h = max(1, round(product.width * scale)), max(1, round(product.height * scale))
    item = product.resize((w, h), Image.Resampling.LANCZOS)
    shift = rng.uniform(-0.02, 0.02, size=2) * size
    x, y = round((size - w) / 2 + shift[0]), round((size - h) / 2 + shift[1])
    shadow = Image.new("L", (size, size), 0)
    ImageDraw.Draw(shadow).ellipse([x + 0.1 * w, y + h - 0.04 * h, x + 0.9 * w, y + h + 0.04 * h], fill=60)
    image.paste((120, 120, 120), (0, 0), shadow.filter(ImageFilter.GaussianBlur(size / 60)))
    image.paste(item, (x, y), item)
    return image


def _street_photo(
    product: Image.Image, size: int, streams: list[np.random.Generator], *, plain: bool
) -> tuple[Image.Image, Box]:
    """A customer's photo of the product and the product's box in it.

    ``streams`` are five independent generators: geometry, lighting, occluder,
    background, camera. With ``plain`` the background is ``PLAIN_BACKGROUND``
    and there is no occluder or noise; the geometry (and the box) is unchanged.
    """
    geo, light, occ, bg, cam = streams
    layer = _warp(product, size, geo)
    layer = _relight(layer, light)
    # Where the product lands: at most 20% of it outside the frame on any side.
    bx0, by0, bx1, by1 = layer.getchannel("A").point(lambda v: 255 if v >= 128 else 0).getbbox()
    bw, bh = bx1 - bx0, by1 - by0
    x = int(round(geo.uniform(-bx0 - 0.2 * bw, size - bx1 + 0.2 * bw)))
    y = int(round(geo.uniform(-by0 - 0.2 * bh, size - by1 + 0.2 * bh)))
    left, top = max(0, x + bx0), max(0, y + by0)
    right, bottom = min(size, x + bx1), min(size, y + by1)
    box = Box(left, top, right - left, bottom - top)

    image = Image.new("RGB", (size, size), PLAIN_BACKGROUND) if plain else _clutter(size, bg)
    image.paste(layer, (x, y), layer)
    if not plain:
        _occlude(image, (left, top, right, bottom), occ)
    radius = cam.uniform(0.0, 1.2)
    if radius > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    if not plain:
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels + cam.normal(0.0, cam.uniform(2.0, 8.0), size=pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    return image, box


def _warp(product: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Perspective, rotation and scale: the product as seen by a hand-held camera."""
    w, h = product.size
    j = 0.18
    dst = np.array(
        [
            (rng.uniform(0, j) * w, rng.uniform(0, j) * h),
            (w - rng.uniform(0, j) * w, rng.uniform(0, j) * h),
            (w - rng.uniform(0, j) * w, h - rng.uniform(0, j) * h),
            (rng.uniform(0, j) * w, h - rng.uniform(0, j) * h),
        ]
    )
    dst -= dst.min(axis=0)
    out_w, out_h = (int(math.ceil(v)) for v in dst.max(axis=0))
    src = [(0, 0), (w, 0), (w, h), (0, h)]
    warped = product.transform(
        (max(1, out_w), max(1, out_h)),
        Image.Transform.PERSPECTIVE,
        _perspective_coefficients(dst, src),
        Image.Resampling.BILINEAR,
    )
    rotated = warped.rotate(rng.uniform(-35, 35), Image.Resampling.BILINEAR, expand=True)
    target = rng.uniform(0.35, 0.8) * size  # the product's longer side in the photo
    bbox = rotated.getchannel("A").getbbox() or (0, 0, rotated.width, rotated.height)
    scale = target / max(bbox[2] - bbox[0], bbox[3] - bbox[1])
    new = (max(1, round(rotated.width * scale)), max(1, round(rotated.height * scale)))
    return rotated.resize(new, Image.Resampling.BILINEAR)


def _perspective_coefficients(dst: np.ndarray, src: list[tuple[float, float]]) -> tuple[float, ...]:
    """PIL's 8 coefficients mapping output points ``dst`` back to input points ``src``."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return tuple(float(c) for c in np.linalg.solve(np.array(rows, float), np.array(rhs, float)))


def _relight(layer: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, a colour cast and a shadow ramp across the product."""
    rgba = np.asarray(layer, dtype=np.float32)
    gain = rng.uniform(0.6, 1.3) * rng.uniform(0.85, 1.15, size=3)
    h, w = rgba.shape[:2]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx / max(w, 1)) * np.cos(angle) + (yy / max(h, 1)) * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    ramp = 1.0 - rng.uniform(0.0, 0.35) * t
    rgb = np.clip(rgba[..., :3] * gain * ramp[..., None], 0, 255)
    return Image.fromarray(np.dstack([rgb, rgba[..., 3]]).round().astype(np.uint8), "RGBA")


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.4:  # the products' own colours make the clutter confusing
        c = np.array(COLOURS[int(rng.integers(len(COLOURS)))], dtype=np.float32) * rng.uniform(0.7, 1.2)
    else:
        c = rng.uniform(0, 255, size=3)
    return tuple(int(v) for v in np.clip(c, 0, 255).round())


def _clutter(size: int, rng: np.random.Generator) -> Image.Image:
    """A gradient with random shapes and a few striped patches on it."""
    c0, c1 = (np.array(_random_colour(rng), np.float32) for _ in range(2))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    image = Image.fromarray((c0 * (1 - t) + c1 * t).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 15))):
        colour = _random_colour(rng)
        cx, cy = rng.uniform(-0.1, 1.1, size=2) * size
        rx, ry = rng.uniform(0.04, 0.3, size=2) * size
        kind = int(rng.integers(0, 4))
        if kind == 0:
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
        elif kind == 1:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
        elif kind == 2:
            k = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=k))
            radii = rng.uniform(0.4, 1.0, size=k)
            points = [(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)) for a, r in zip(angles, radii)]
            draw.polygon([(float(px), float(py)) for px, py in points], fill=colour)
        else:
            x2, y2 = rng.uniform(0, 1, size=2) * size
            draw.line([cx, cy, x2, y2], fill=colour, width=int(rng.integers(2, max(3, size // 20))))
    for _ in range(int(rng.integers(0, 3))):  # striped patches (fabric, shelves, tiles)
        x0, y0 = rng.uniform(0, 0.8, size=2) * size
        w, h = rng.uniform(0.15, 0.4, size=2) * size
        colour = _random_colour(rng)
        step = rng.uniform(0.02, 0.06) * size
        vertical = rng.random() < 0.5
        pos = 0.0
        while pos < (w if vertical else h):
            if vertical:
                draw.rectangle([x0 + pos, y0, x0 + pos + step / 2, y0 + h], fill=colour)
            else:
                draw.rectangle([x0, y0 + pos, x0 + w, y0 + pos + step / 2], fill=colour)
            pos += step
    return image


def _occlude(image: Image.Image, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    """Draws a hand, a strap or an object over part of the product, in place."""
    left, top, right, bottom = box
    bw, bh = right - left, bottom - top
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        colour = OCCLUDER_COLOURS[int(rng.integers(len(OCCLUDER_COLOURS)))]
    else:
        colour = _random_colour(rng)
    # The occluder's centre is near one side of the box, so it hides 10-35% of it.
    side = int(rng.integers(0, 4))
    along = rng.uniform(0.2, 0.8)
    cx, cy = {
        0: (left, top + along * bh),
        1: (right, top + along * bh),
        2: (left + along * bw, top),
        3: (left + along * bw, bottom),
    }[side]
    rx, ry = rng.uniform(0.2, 0.4) * bw, rng.uniform(0.2, 0.4) * bh
    kind = int(rng.integers(0, 3))
    if kind == 0:  # a hand: a palm and fingers
        draw.rounded_rectangle([cx - rx, cy - ry, cx + rx, cy + ry], radius=min(rx, ry) / 2, fill=colour)
        for i in range(4):
            fx = cx - rx + (i + 0.5) * (2 * rx / 4)
            draw.ellipse([fx - rx / 5, cy - ry * 1.6, fx + rx / 5, cy], fill=colour)
    elif kind == 1:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
    else:  # a strap across the product
        angle = rng.uniform(0, np.pi)
        dx, dy = math.cos(angle) * (bw + bh), math.sin(angle) * (bw + bh)
        mx, my = left + rng.uniform(0.2, 0.8) * bw, top + rng.uniform(0.2, 0.8) * bh
        draw.line([mx - dx, my - dy, mx + dx, my + dy], fill=colour, width=max(2, int(0.15 * min(bw, bh))))
