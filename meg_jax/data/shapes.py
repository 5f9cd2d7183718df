"""Procedural text-to-image data: one coloured shape on a coloured background.

The default training data of meg-jax (DESIGN.md section 4). Every image and prompt is
generated on the fly, on device, from an explicit ``jax.random`` key: no files, no download,
same key -> same batch. Everything that runs per sample is jittable and vmappable.

Grammar (lower case, single spaces)::

    a {size} {color} {shape} at the {position} on a {background} background

    size        small | large
    color       red | green | blue | yellow | cyan | magenta | white | black
    shape       circle | square | triangle | cross
    position    top left | top | top right | left | center | right
                | bottom left | bottom | bottom right
    background  same words as color, and never equal to color

e.g. ``a large red circle at the top left on a blue background``.

Attribute encoding (:class:`Attributes`, int32 arrays of shape ``[B]``): each attribute is the
index of its word in the tuples :data:`SIZES`, :data:`COLORS`, :data:`SHAPES`,
:data:`POSITIONS`; ``background`` indexes :data:`COLORS` too. ``position`` is row-major over a
3 x 3 grid of image thirds: ``row = position // 3`` (0 top, 1 middle, 2 bottom) and
``col = position % 3`` (0 left, 1 middle, 2 right), so ``4`` is ``center``. The one continuous
attribute, ``offset`` (``[B, 2]`` float32 in [-1, 1], (row, col)), places the shape's centre
within ``ShapesConfig.jitter`` third-widths of the middle of its third (see
:func:`shape_centers`), so images vary within one prompt while the centre always stays inside
the stated third.

Rendering: colours are the corners of the RGB cube (each channel -1 or +1 in the [-1, 1]
image range). Shapes are drawn from signed distance functions with a soft edge of
``edge_width`` pixels (anti-aliasing, so a VAE can reconstruct the edges). Sizes are fractions
of the image side, so every resolution shows the same picture: at 32 x 32 a small shape is
about 6 pixels across and a large one about 12, and a large shape near a corner is cut by the
image border at most by a pixel or so (the centre keeps about one radius from the border).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "SIZES",
    "COLORS",
    "SHAPES",
    "POSITIONS",
    "ATTRIBUTE_NAMES",
    "NUM_SIZES",
    "NUM_COLORS",
    "NUM_SHAPES",
    "NUM_POSITIONS",
    "NUM_CLASSES",
    "NUM_TASK_CLASSES",
    "COLOR_RGB",
    "ShapesConfig",
    "Attributes",
    "sample_attributes",
    "render",
    "sample_batch",
    "prompt_of",
    "attributes_of_prompt",
    "attributes_of_prompts",
    "task_class",
]

SIZES: tuple[str, ...] = ("small", "large")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)

# Classified attributes, in the order of the classifier's heads and of the prompt.
ATTRIBUTE_NAMES: tuple[str, ...] = ("size", "color", "shape", "position", "background")
NUM_SIZES = len(SIZES)
NUM_COLORS = len(COLORS)
NUM_SHAPES = len(SHAPES)
NUM_POSITIONS = len(POSITIONS)
NUM_CLASSES: dict[str, int] = {
    "size": NUM_SIZES,
    "color": NUM_COLORS,
    "shape": NUM_SHAPES,
    "position": NUM_POSITIONS,
    "background": NUM_COLORS,
}
# Task classes for the calibration's per-class quality table: the shape (see task_class).
NUM_TASK_CLASSES = NUM_SHAPES

# RGB of COLORS in the [-1, 1] image range: the corners of the colour cube.
COLOR_RGB = np.array(
    [
        [1, -1, -1],  # red
        [-1, 1, -1],  # green
        [-1, -1, 1],  # blue
        [1, 1, -1],  # yellow
        [-1, 1, 1],  # cyan
        [1, -1, 1],  # magenta
        [1, 1, 1],  # white
        [-1, -1, -1],  # black
    ],
    dtype=np.float32,
)

# Per-shape geometry in units of the size's radius r, chosen so that the four shapes look
# about equally big: a square of equal area to the circle has half side sqrt(pi)/2 ~ 0.886 r;
# the equilateral triangle (centred on its centroid, pointing up) has half side 1.15 r, so
# its apex is 1.33 r above the centre; the cross has arms of half length r, half width r/3.
_SQUARE_HALF_SIDE = 0.886
_TRIANGLE_HALF_SIDE = 1.15
_CROSS_HALF_WIDTH = 1.0 / 3.0


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """How the procedural images are drawn and tokenized."""

    resolution: int = 32  # image height = width, pixels
    small_radius: float = 0.1  # radius of a small shape, fraction of the image side
    large_radius: float = 0.18  # radius of a large shape, fraction of the image side
    jitter: float = 0.25  # largest move of the centre from its third's middle, in third-widths (< 0.5)
    edge_width: float = 1.0  # width of the soft (anti-aliased) edge, pixels
    max_length: int = 16  # token sequence length of sample_batch (prompts use at most 14)

    def __post_init__(self) -> None:
        if self.resolution < 12:
            raise ValueError(f"ShapesConfig.resolution must be >= 12 pixels, got {self.resolution}")
        if not 0.0 < self.small_radius < self.large_radius < 0.3:
            raise ValueError(
                "ShapesConfig needs 0 < small_radius < large_radius < 0.3 (fractions of the image "
                f"side), got small_radius={self.small_radius}, large_radius={self.large_radius}"
            )
        if not 0.0 <= self.jitter < 0.5:
            raise ValueError(
                f"ShapesConfig.jitter must be in [0, 0.5) so the centre stays in its third, got {self.jitter}"
            )
        if self.edge_width <= 0.0:
            raise ValueError(f"ShapesConfig.edge_width must be > 0 pixels, got {self.edge_width}")
        from meg_jax.data.tokenizer import MAX_PROMPT_TOKENS  # local: tokenizer imports this module

        if self.max_length < MAX_PROMPT_TOKENS:
            raise ValueError(
                f"ShapesConfig.max_length must be >= {MAX_PROMPT_TOKENS} (longest prompt with "
                f"bos/eos), got {self.max_length}"
            )


@struct.dataclass
class Attributes:
    """The attributes of a batch of images; a pytree, so it lives on device and jits.

    Attributes:
      size: [B] int32 index into SIZES.
      color: [B] int32 index into COLORS (the shape's colour).
      shape: [B] int32 index into SHAPES.
      position: [B] int32 index into POSITIONS (row-major 3 x 3 grid of thirds).
      background: [B] int32 index into COLORS, never equal to ``color``.
      offset: [B, 2] float32 in [-1, 1], (row, col) place of the centre within the interval
        allowed in its third (-1 first, +1 last; see shape_centers). Not part of the prompt.
    """

    size: jax.Array
    color: jax.Array
    shape: jax.Array
    position: jax.Array
    background: jax.Array
    offset: jax.Array

    @property
    def batch_size(self) -> int:
        return self.size.shape[0]

    def classes(self) -> dict[str, jax.Array]:
        """The classified attributes by name (ATTRIBUTE_NAMES), each [B] int32."""
        return {name: getattr(self, name) for name in ATTRIBUTE_NAMES}


def _check_batch(batch: int) -> None:
    if not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive Python int (static under jit), got {batch!r}")


def sample_attributes(key: jax.Array, batch: int) -> Attributes:
    """Draws ``batch`` independent attribute sets, each class uniform.

    The background is uniform among the 7 colours other than the shape's colour.

    Args:
      key: a ``jax.random`` key (typed or legacy ``PRNGKey``).
      batch: number of samples B (a static Python int).

    Returns:
      Attributes with [B] int32 class indices and a [B, 2] float32 offset.
    """
    _check_batch(batch)
    k_size, k_color, k_shape, k_pos, k_bg, k_off = jax.random.split(key, 6)
    color = jax.random.randint(k_color, (batch,), 0, NUM_COLORS, dtype=jnp.int32)
    # Adding 1..7 modulo 8 skips exactly the shape's colour, uniformly over the other 7.
    background = (color + jax.random.randint(k_bg, (batch,), 1, NUM_COLORS, dtype=jnp.int32)) % NUM_COLORS
    return Attributes(
        size=jax.random.randint(k_size, (batch,), 0, NUM_SIZES, dtype=jnp.int32),
        color=color,
        shape=jax.random.randint(k_shape, (batch,), 0, NUM_SHAPES, dtype=jnp.int32),
        position=jax.random.randint(k_pos, (batch,), 0, NUM_POSITIONS, dtype=jnp.int32),
        background=background.astype(jnp.int32),
        offset=jax.random.uniform(k_off, (batch, 2), jnp.float32, -1.0, 1.0),
    )


def shape_centers(attrs: Attributes, config: ShapesConfig) -> jax.Array:
    """Centre of each shape in pixel coordinates.

    Along each axis the centre may lie within ``jitter`` third-widths of the middle of its
    third, narrowed so that the size's radius stays inside the image (but never narrower than
    the middle of the third itself); ``offset`` in [-1, 1] maps linearly onto that interval.
    Pixel ``(i, j)`` covers ``[i, i + 1] x [j, j + 1]``, so its centre is ``(i + 0.5, j + 0.5)``.

    Returns:
      [B, 2] float32 (row, col), pixels.
    """
    s = float(config.resolution)
    third = s / 3.0
    grid = jnp.stack([attrs.position // 3, attrs.position % 3], axis=-1).astype(jnp.float32)
    middle = (grid + 0.5) * third  # [B, 2]
    radius = jnp.where(attrs.size == 1, config.large_radius, config.small_radius)[:, None] * s
    low = jnp.minimum(jnp.maximum(middle - config.jitter * third, radius), middle)
    high = jnp.maximum(jnp.minimum(middle + config.jitter * third, s - radius), middle)
    return low + 0.5 * (attrs.offset + 1.0) * (high - low)


def _signed_distances(dy: jax.Array, dx: jax.Array, r: jax.Array) -> jax.Array:
    """Signed distance (pixels, negative inside) to each shape of radius r at the origin.

    Args:
      dy: [..., H, W] pixel offset from the centre, rows (down is positive).
      dx: [..., H, W] pixel offset from the centre, columns.
      r: [..., 1, 1] radius of the size, pixels.

    Returns:
      [NUM_SHAPES, ..., H, W] in the order of SHAPES.
    """
    circle = jnp.sqrt(dx**2 + dy**2) - r

    def box(half_y: jax.Array, half_x: jax.Array) -> jax.Array:
        qy = jnp.abs(dy) - half_y
        qx = jnp.abs(dx) - half_x
        outside = jnp.sqrt(jnp.maximum(qy, 0.0) ** 2 + jnp.maximum(qx, 0.0) ** 2)
        return outside + jnp.minimum(jnp.maximum(qy, qx), 0.0)

    square = box(_SQUARE_HALF_SIDE * r, _SQUARE_HALF_SIDE * r)
    cross = jnp.minimum(box(r, _CROSS_HALF_WIDTH * r), box(_CROSS_HALF_WIDTH * r, r))

    # Exact distance to an equilateral triangle of half side h, centroid at the origin, apex
    # up (Inigo Quilez, "2D distance functions"); y points up there, so flip the rows.
    h = _TRIANGLE_HALF_SIDE * r
    k = math.sqrt(3.0)
    px = jnp.abs(dx) - h
    py = -dy + h / k
    fold = px + k * py > 0.0
    px, py = jnp.where(fold, (px - k * py) / 2.0, px), jnp.where(fold, (-k * px - py) / 2.0, py)
    px = px - jnp.clip(px, -2.0 * h, 0.0)
    triangle = -jnp.sqrt(px**2 + py**2) * jnp.sign(py)

    return jnp.stack([circle, square, triangle, cross])


def render(attrs: Attributes, config: ShapesConfig = ShapesConfig()) -> jax.Array:
    """Draws the images described by ``attrs`` (deterministic; jittable, vmappable).

    Args:
      attrs: Attributes of B images.
      config: resolution, sizes and edge softness.

    Returns:
      [B, H, W, 3] float32 images in [-1, 1], H = W = config.resolution.
    """
    s = config.resolution
    centers = shape_centers(attrs, config)  # [B, 2]
    coords = jnp.arange(s, dtype=jnp.float32) + 0.5
    dy = coords[None, :, None] - centers[:, 0, None, None]  # [B, H, 1]
    dx = coords[None, None, :] - centers[:, 1, None, None]  # [B, 1, W]
    dy, dx = jnp.broadcast_arrays(dy, dx)  # [B, H, W]
    radius = jnp.where(attrs.size == 1, config.large_radius, config.small_radius) * s
    distances = _signed_distances(dy, dx, radius[:, None, None].astype(jnp.float32))
    distance = jnp.take_along_axis(distances, attrs.shape[None, :, None, None], axis=0)[0]
    # Linear ramp of coverage across the edge: 1 inside, 0 outside, 0.5 on the boundary.
    coverage = jnp.clip(0.5 - distance / config.edge_width, 0.0, 1.0)[..., None]  # [B, H, W, 1]
    palette = jnp.asarray(COLOR_RGB)
    foreground = palette[attrs.color][:, None, None, :]
    background = palette[attrs.background][:, None, None, :]
    return background + coverage * (foreground - background)


def sample_batch(
    key: jax.Array, batch: int, config: ShapesConfig = ShapesConfig()
) -> tuple[jax.Array, jax.Array, Attributes]:
    """Draws a training batch on device: images, their prompts' tokens and the attributes.

    Args:
      key: a ``jax.random`` key.
      batch: B, a static Python int.
      config: drawing and token-length settings.

    Returns:
      images [B, H, W, 3] float32 in [-1, 1], tokens [B, config.max_length] int32 (see
      ``meg_jax.data.tokenizer``), and the Attributes.
    """
    from meg_jax.data.tokenizer import tokens_from_attributes  # local: tokenizer imports this module

    attrs = sample_attributes(key, batch)
    return render(attrs, config), tokens_from_attributes(attrs, config.max_length), attrs


def task_class(attrs: Attributes) -> jax.Array:
    """Task class of each request for the per-class calibration: the shape index.

    Returns:
      [B] int32 in [0, NUM_TASK_CLASSES).
    """
    return attrs.shape


def prompt_of(attrs: Attributes) -> list[str]:
    """The prompt of each sample (host side; pulls the attributes to the host).

    Returns:
      B strings following the module's grammar.
    """
    size, color, shape, position, background = (np.asarray(getattr(attrs, n)) for n in ATTRIBUTE_NAMES)
    return [
        f"a {SIZES[a]} {COLORS[c]} {SHAPES[s]} at the {POSITIONS[p]} on a {COLORS[b]} background"
        for a, c, s, p, b in zip(size, color, shape, position, background, strict=True)
    ]


def _index_of(word: str, choices: Sequence[str], what: str, prompt: str) -> int:
    if word not in choices:
        raise ValueError(
            f"bad word {word!r} for the {what} in prompt {prompt!r}; expected one of {list(choices)}"
        )
    return choices.index(word)


def _expect(words: list[str], i: int, expected: str, prompt: str) -> None:
    got = words[i] if i < len(words) else "<end of prompt>"
    if got != expected:
        raise ValueError(
            f"bad word {got!r} at word {i} of prompt {prompt!r}; expected {expected!r} "
            "(grammar: 'a {size} {color} {shape} at the {position} on a {background} background')"
        )


def _parse(prompt: str) -> tuple[int, int, int, int, int]:
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be a str, got {type(prompt).__name__}")
    words = prompt.split(" ")

    def word(i: int) -> str:
        return words[i] if i < len(words) else "<end of prompt>"

    _expect(words, 0, "a", prompt)
    size = _index_of(word(1), SIZES, "size", prompt)
    color = _index_of(word(2), COLORS, "color", prompt)
    shape = _index_of(word(3), SHAPES, "shape", prompt)
    _expect(words, 4, "at", prompt)
    _expect(words, 5, "the", prompt)
    # Positions are one or two words; "on" ends them.
    end = words.index("on", 6) if "on" in words[6:] else len(words)
    position = _index_of(" ".join(words[6:end]), POSITIONS, "position", prompt)
    _expect(words, end, "on", prompt)
    _expect(words, end + 1, "a", prompt)
    background = _index_of(word(end + 2), COLORS, "background", prompt)
    _expect(words, end + 3, "background", prompt)
    if len(words) > end + 4:
        raise ValueError(f"bad word {words[end + 4]!r} after the end of prompt {prompt!r}")
    if background == color:
        raise ValueError(
            f"bad word {COLORS[background]!r} for the background in prompt {prompt!r}: the "
            "background must differ from the shape's colour"
        )
    return size, color, shape, position, background


def attributes_of_prompts(prompts: Sequence[str]) -> Attributes:
    """Parses prompts back into attributes (host side), the inverse of :func:`prompt_of`.

    The offset is 0: the centre in the middle of the interval allowed in the stated third.

    Raises:
      ValueError: a prompt outside the grammar; the message names the bad word.
    """
    if isinstance(prompts, str):
        raise ValueError("attributes_of_prompts takes a list of prompts; use attributes_of_prompt for one")
    if len(prompts) == 0:
        raise ValueError("attributes_of_prompts needs at least one prompt")
    parsed = np.array([_parse(p) for p in prompts], dtype=np.int32)  # [B, 5]
    fields = {name: jnp.asarray(parsed[:, i]) for i, name in enumerate(ATTRIBUTE_NAMES)}
    return Attributes(**fields, offset=jnp.zeros((len(prompts), 2), jnp.float32))


def attributes_of_prompt(prompt: str) -> Attributes:
    """Parses one prompt into Attributes of batch size 1 (see :func:`attributes_of_prompts`).

    Raises:
      ValueError: the prompt is outside the grammar; the message names the bad word.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"attributes_of_prompt takes one str, got {type(prompt).__name__}")
    return attributes_of_prompts([prompt])
