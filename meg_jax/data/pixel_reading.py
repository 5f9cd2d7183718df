"""An analytic reading of the shape images' attributes from pixels, independent of any training.

The attribute classifier (:mod:`meg_jax.data.classifier`) is a CNN trained on augmented
renderings, so it forgives what its augmentations taught it to forgive (a small square with
round corners still reads "square"). This module reads the same five attributes with fixed
rules derived from the renderer (:mod:`meg_jax.data.shapes`) and nothing learnt, so a second
quality reading can stand beside the classifier's:

* **background**: the palette colour most border pixels are nearest to (the mode over the
  one-pixel ring; a shape's centre keeps one radius from the border, so it touches the ring
  at most a little).
* **foreground**: pixels whose nearest palette colour is not the background's. The palette is
  the 8 corners of the RGB cube, so "nearest" is the sign of each channel and the threshold
  between two colours is the midpoint of every channel (0 in the [-1, 1] range).
* **color**: the palette colour nearest to the per-channel median of the foreground pixels
  (for cube corners: the majority sign of each channel).
* **coverage** of each pixel: its distance from the background colour as a fraction of the
  shape colour's, ``a = |p - bg| / |fg - bg|`` (exactly the renderer's anti-aliasing coverage
  for a rendered image), then clipped robustly ``w = clip((a - t) / (1 - 2 t), 0, 1)`` with
  ``t = COVERAGE_FLOOR``: deviations under a quarter of the colour gap (noise) count as
  background, over three quarters as shape, and the symmetric ramp keeps the 0.5 contour, so
  the area of a rendered shape is kept to first order.
* **size** from the area ``A = sum w`` (pixels): see :func:`size_area_threshold`.
* **position** from the centroid ``sum w (i + 0.5) / A``: the third it lies in, per axis (the
  shape's centre, which is its centroid for all four shapes, always stays a quarter of a
  third inside its third).
* **shape** from scale-invariant moments about the centroid, with ``x`` right and ``y`` up,
  ``z = x + i y``:

  - ``tri = Im sum w z^3 / A^(5/2)``, the 3-fold harmonic: 0 for the three centrally
    symmetric shapes, -0.0675 for the renderer's apex-up triangle (an apex-down one gives
    +0.0675 and does not read as a triangle).
  - ``quad = Re sum w z^4 / A^3``, the 4-fold harmonic: 0 for a disc and for a triangle
    (3-fold symmetric), -1/60 for an axis-aligned square (mass on the diagonals), +0.0313
    for the cross (mass on the axes).
  - ``spread = sum w |z|^2 / A^2`` (Hu's first invariant) is measured and reported but not
    used: 1 / (2 pi) for a disc, 1/6 square, sqrt(3)/9 triangle, 0.193 cross, but it also
    grows with a soft edge (a blurred disc reaches a triangle's value), so it cannot tell
    a blob from a shape.

  The shape read is the nearest of the four noise-free prototypes in (tri, quad)
  (:func:`shape_prototypes`, computed from the renderer's own signed distance functions at
  high resolution), each feature in units of its largest prototype value. Circle, square and
  cross lie on the quad axis, so their boundaries are the midpoints (-1/120 and +0.0157)
  whatever the units; the units set only the triangle's boundary. A shape that lost its
  corners, arms or apex (blurred, drawn as a blob) has both harmonics near 0 and reads
  "circle", which is wrong unless a circle was asked for: the reading is strict.

Everything is jittable and vectorised over the batch; :func:`read_attributes` returns the
class indices by attribute name, like the classifier's argmax, and :func:`reading_accuracy`
scores them the way :func:`meg_jax.metrics.attribute_accuracy` scores logits. An image with
no shape (foreground area under :data:`MIN_AREA_FRACTION` of the smallest small shape) reads
``-1`` (never right) for every attribute but the background.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from meg_jax.data import shapes
from meg_jax.data.shapes import COLOR_RGB, ShapesConfig

__all__ = [
    "COVERAGE_FLOOR",
    "MIN_AREA_FRACTION",
    "PixelReading",
    "shape_areas",
    "size_area_threshold",
    "shape_prototypes",
    "read_pixels",
    "classify_reading",
    "read_attributes",
    "reading_accuracy",
]

# Coverage under this fraction of the colour gap is background, over 1 - it is shape.
COVERAGE_FLOOR = 0.25
# A foreground smaller than this fraction of the smallest small shape's area is no shape.
MIN_AREA_FRACTION = 0.25


@struct.dataclass
class PixelReading:
    """What the pixel reading measured, per image (all ``[B]``).

    Attributes:
      background: int32 index into COLORS, the border's colour.
      color: int32 index into COLORS, the foreground's median colour (-1: no shape).
      area: float32 foreground area, pixels (coverage-weighted).
      centroid: [B, 2] float32 (row, col) of the foreground, pixels.
      spread: float32 ``sum w |z|^2 / A^2``.
      tri: float32 ``Im sum w z^3 / A^(5/2)``.
      quad: float32 ``Re sum w z^4 / A^3``.
      readable: bool, the foreground area reaches the minimum of a shape.
    """

    background: jax.Array
    color: jax.Array
    area: jax.Array
    centroid: jax.Array
    spread: jax.Array
    tri: jax.Array
    quad: jax.Array
    readable: jax.Array


def shape_areas(radius: float) -> np.ndarray:
    """Exact area of each shape of the renderer at ``radius`` (pixels), in the order of SHAPES.

    circle ``pi r^2``; square of half side ``s = 0.886 r``: ``4 s^2``; equilateral triangle
    of half side ``h = 1.15 r``: ``sqrt(3) h^2``; cross of two ``2r x 2r/3`` bars sharing a
    ``2r/3`` square: ``2 (4/3) r^2 - (4/9) r^2 = (20/9) r^2``.

    Returns:
      [NUM_SHAPES] float64, pixels squared.
    """
    s = shapes._SQUARE_HALF_SIDE * radius
    h = shapes._TRIANGLE_HALF_SIDE * radius
    w = shapes._CROSS_HALF_WIDTH * radius
    cross = 2 * (2 * radius) * (2 * w) - (2 * w) ** 2
    return np.array([math.pi * radius**2, 4 * s**2, math.sqrt(3.0) * h**2, cross])


def size_area_threshold(config: ShapesConfig = ShapesConfig()) -> float:
    """Area (pixels) above which a shape reads "large".

    The geometric mean of the largest small shape's area and the smallest large shape's, so
    the two sizes have equal margins in ratio: at 32 x 32 the small radius is 3.2 px (largest
    small area: circle or square, ``pi r^2`` = 32.2 px), the large 5.76 px (smallest large
    area: the cross, ``(20/9) r^2`` = 73.7 px), threshold sqrt(32.2 x 73.7) = 48.7 px, 1.51x
    from either (a large shape cut by the border loses a pixel row or so, far less).
    """
    small = shape_areas(config.small_radius * config.resolution)
    large = shape_areas(config.large_radius * config.resolution)
    return float(math.sqrt(small.max() * large.min()))


# Index into COLORS of each corner of the cube, by its sign code (see _sign_code).
_SIGN_CODES = (COLOR_RGB[:, 0] > 0) * 4 + (COLOR_RGB[:, 1] > 0) * 2 + (COLOR_RGB[:, 2] > 0)
if sorted(_SIGN_CODES.tolist()) != list(range(8)) or not np.all(np.abs(COLOR_RGB) == 1.0):
    raise ImportError("pixel_reading assumes COLORS are the 8 corners of the RGB cube in [-1, 1]")
_COLOR_OF_SIGNS = np.argsort(_SIGN_CODES).astype(np.int32)


def _sign_code(positive: jax.Array) -> jax.Array:
    """Sign code ``4 r + 2 g + b`` of ``positive`` [..., 3] bool (channel > 0): [...] int32."""
    weights = jnp.asarray([4, 2, 1], jnp.int32)
    return jnp.sum(positive.astype(jnp.int32) * weights, axis=-1)


def _moment_features(weights: jax.Array, y: jax.Array, x: jax.Array) -> tuple[jax.Array, ...]:
    """(area, centroid y, centroid x, spread, tri, quad) of coverage ``weights`` [..., H, W].

    ``y`` and ``x`` are the pixel centres' coordinates, broadcastable to ``weights`` (y up).
    """
    area = jnp.sum(weights, axis=(-2, -1))
    safe = jnp.maximum(area, 1e-6)[..., None, None]
    cy = jnp.sum(weights * y, axis=(-2, -1), keepdims=True) / safe
    cx = jnp.sum(weights * x, axis=(-2, -1), keepdims=True) / safe
    dy, dx = y - cy, x - cx
    r2 = dx**2 + dy**2
    # z = dx + i dy: Im z^3 = 3 dx^2 dy - dy^3; Re z^4 = dx^4 - 6 dx^2 dy^2 + dy^4.
    im3 = 3.0 * dx**2 * dy - dy**3
    re4 = dx**4 - 6.0 * dx**2 * dy**2 + dy**4
    safe = safe[..., 0, 0]
    spread = jnp.sum(weights * r2, axis=(-2, -1)) / safe**2
    tri = jnp.sum(weights * im3, axis=(-2, -1)) / safe**2.5
    quad = jnp.sum(weights * re4, axis=(-2, -1)) / safe**3
    return area, cy[..., 0, 0], cx[..., 0, 0], spread, tri, quad


@functools.lru_cache(maxsize=None)
def shape_prototypes(resolution: int = 512) -> np.ndarray:
    """Noise-free (spread, tri, quad) of each shape, from the renderer's signed distances.

    Each shape is drawn with a radius of ``0.4 * resolution`` pixels and a one-pixel soft
    edge on a ``resolution``-square grid, where pixelation is negligible (the exact values:
    circle (1/(2 pi), 0, 0), square (1/6, 0, -1/60), triangle (sqrt(3)/9, -0.0675, 0),
    cross (0.193, 0, 0.0313)).

    Returns:
      [NUM_SHAPES, 3] float32, rows in the order of SHAPES.
    """
    coords = np.arange(resolution, dtype=np.float32) + 0.5 - resolution / 2.0
    dy, dx = np.meshgrid(coords, coords, indexing="ij")
    radius = np.float32(0.4 * resolution)
    # Concrete values even when first called while a reader is being traced under jit.
    with jax.ensure_compile_time_eval():
        distances = shapes._signed_distances(jnp.asarray(dy), jnp.asarray(dx), jnp.asarray(radius))
        coverage = jnp.clip(0.5 - distances, 0.0, 1.0)  # [NUM_SHAPES, H, W], the renderer's ramp
        _, _, _, spread, tri, quad = _moment_features(coverage, jnp.asarray(-dy), jnp.asarray(dx))
    return np.stack([np.asarray(spread), np.asarray(tri), np.asarray(quad)], axis=-1).astype(np.float32)


def read_pixels(images: jax.Array, config: ShapesConfig = ShapesConfig()) -> PixelReading:
    """Measures background, colour, area, centroid and shape moments of each image (jittable).

    Args:
      images: [B, H, W, 3] images in [-1, 1], H = W = ``config.resolution``.
      config: the renderer's settings (resolution, radii) the thresholds come from.

    Returns:
      The PixelReading of the B images.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"read_pixels: expected images [B, H, W, 3], got shape {images.shape}")
    _, h, w, _ = images.shape
    if h != config.resolution or w != config.resolution:
        raise ValueError(
            f"read_pixels: images are {h}x{w} but config.resolution is {config.resolution}; "
            "the size and shape thresholds are derived from the resolution"
        )
    images = images.astype(jnp.float32)
    palette = jnp.asarray(COLOR_RGB)  # [C, 3]
    num_colors = palette.shape[0]
    # The palette is the cube's corners, so a pixel's nearest palette colour is the sign of
    # each channel (the Voronoi boundaries are the planes channel = 0): [B, H, W].
    positive = images > 0.0
    labels = jnp.asarray(_COLOR_OF_SIGNS)[_sign_code(positive)]

    border = jnp.concatenate(
        [labels[:, 0, :], labels[:, -1, :], labels[:, 1:-1, 0], labels[:, 1:-1, -1]], axis=-1
    )  # [B, 2H + 2W - 4]
    votes = jnp.sum(jax.nn.one_hot(border, num_colors, dtype=jnp.int32), axis=1)
    background = jnp.argmax(votes, axis=-1).astype(jnp.int32)  # ties: the lower index

    foreground = labels != background[:, None, None]  # [B, H, W]
    count = jnp.sum(foreground, axis=(1, 2))  # [B]
    # Per channel, the median of the foreground is > 0 iff more than half of its pixels are,
    # so the palette colour nearest the median is the channel-wise majority sign (the same
    # thing as a sort-based median, without the sort).
    above = jnp.sum(foreground[..., None] & positive, axis=(1, 2))  # [B, 3]
    color = jnp.asarray(_COLOR_OF_SIGNS)[_sign_code(2 * above > count[:, None])].astype(jnp.int32)
    any_fg = count > 0

    bg_rgb = palette[background][:, None, None, :]
    fg_rgb = palette[color][:, None, None, :]
    gap = jnp.linalg.norm(fg_rgb - bg_rgb, axis=-1)  # [B, 1, 1], >= 2 when the colours differ
    fraction = jnp.linalg.norm(images - bg_rgb, axis=-1) / jnp.maximum(gap, 1e-6)
    t = COVERAGE_FLOOR
    weights = jnp.clip((fraction - t) / (1.0 - 2.0 * t), 0.0, 1.0)
    weights = jnp.where((any_fg & (color != background))[:, None, None], weights, 0.0)

    coords = jnp.arange(h, dtype=jnp.float32) + 0.5
    area, cy_up, cx, spread, tri, quad = _moment_features(weights, -coords[:, None], coords[None, :])
    min_area = MIN_AREA_FRACTION * float(shape_areas(config.small_radius * config.resolution).min())
    readable = area >= min_area
    return PixelReading(
        background=background,
        color=jnp.where(readable, color, -1).astype(jnp.int32),
        area=area,
        centroid=jnp.stack([-cy_up, cx], axis=-1),
        spread=spread,
        tri=tri,
        quad=quad,
        readable=readable,
    )


def classify_reading(reading: PixelReading, config: ShapesConfig = ShapesConfig()) -> dict[str, jax.Array]:
    """Class indices from a PixelReading (jittable): name -> [B] int32, -1 where unreadable."""
    s = float(config.resolution)
    readable = reading.readable
    size = (reading.area > size_area_threshold(config)).astype(jnp.int32)
    third = jnp.clip(jnp.floor(reading.centroid * 3.0 / s), 0, 2).astype(jnp.int32)  # [B, 2]
    position = third[:, 0] * 3 + third[:, 1]
    # Nearest prototype in (tri, quad), each in units of its largest prototype value (the
    # triangle's |tri|, the cross's quad): see the module docstring.
    features = jnp.stack([reading.tri, reading.quad], axis=-1)  # [B, 2]
    prototypes = shape_prototypes()[:, 1:]  # [NUM_SHAPES, 2]
    scale = jnp.asarray(np.abs(prototypes).max(axis=0))
    distance = jnp.sum(((features[:, None, :] - jnp.asarray(prototypes)) / scale) ** 2, axis=-1)
    shape = jnp.argmin(distance, axis=-1).astype(jnp.int32)
    unread = jnp.int32(-1)
    return {
        "size": jnp.where(readable, size, unread),
        "color": reading.color,
        "shape": jnp.where(readable, shape, unread),
        "position": jnp.where(readable, position, unread),
        "background": reading.background,
    }


def read_attributes(images: jax.Array, config: ShapesConfig = ShapesConfig()) -> dict[str, jax.Array]:
    """The five attributes read from pixels: name (ATTRIBUTE_NAMES) -> [B] int32 class index.

    The same indices as the classifier's argmax (``-1``: no shape found, never right).

    Args:
      images: [B, H, W, 3] images in [-1, 1], H = W = ``config.resolution``.
      config: the renderer's settings.
    """
    return classify_reading(read_pixels(images, config), config)


def reading_accuracy(reading: Mapping[str, jax.Array], attrs: Any) -> dict[str, jax.Array]:
    """Fraction of samples read right per attribute, plus ``"all"`` (every attribute right).

    Like :func:`meg_jax.metrics.attribute_accuracy`, with class indices instead of logits.

    Args:
      reading: name -> [B] int class indices (:func:`read_attributes`).
      attrs: the truth: ``Attributes`` or a mapping with a [B] int array per name of ``reading``.

    Returns:
      name -> scalar float32 accuracy in [0, 1], and ``"all"``.
    """
    if not reading:
        raise ValueError("reading_accuracy needs at least one attribute")
    correct = {}
    for name, value in reading.items():
        truth = attrs[name] if isinstance(attrs, Mapping) else getattr(attrs, name)
        if value.shape != truth.shape:
            raise ValueError(f"reading_accuracy: reading of {name!r} {value.shape} does not match labels {truth.shape}")
        correct[name] = value == truth
    result = {name: jnp.mean(c.astype(jnp.float32)) for name, c in correct.items()}
    result["all"] = jnp.mean(jnp.all(jnp.stack(list(correct.values())), axis=0).astype(jnp.float32))
    return result

