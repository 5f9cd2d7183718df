"""Tests of the procedural shapes data and its tokenizer (meg_jax.data.shapes, .tokenizer)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax import config as config_lib
from meg_jax.data import shapes, tokenizer
from meg_jax.data.shapes import Attributes, ShapesConfig

BATCH = 256


@functools.partial(jax.jit, static_argnums=(1, 2))
def _sample(key: jax.Array, batch: int, config: ShapesConfig):
    return shapes.sample_batch(key, batch, config)


# Eager JAX compiles every primitive on first use; one jitted function per helper is faster.
_render = jax.jit(shapes.render, static_argnums=1)
_centers = jax.jit(shapes.shape_centers, static_argnums=1)


@pytest.fixture(scope="module")
def batch():
    images, tokens, attrs = _sample(jax.random.key(0), BATCH, ShapesConfig())
    return np.asarray(images), np.asarray(tokens), jax.device_get(attrs)


def _attrs(**fields) -> Attributes:
    """One-sample Attributes; unspecified fields take the values below."""
    values = dict(size=1, color=0, shape=0, position=4, background=2)
    values.update({k: v for k, v in fields.items() if k != "offset"})
    return Attributes(
        **{k: jnp.asarray([v], jnp.int32) for k, v in values.items()},
        offset=jnp.asarray([fields.get("offset", (0.0, 0.0))], jnp.float32),
    )


def test_shapes_dtypes_and_range(batch):
    images, tokens, attrs = batch
    assert images.shape == (BATCH, 32, 32, 3) and images.dtype == np.float32
    assert tokens.shape == (BATCH, 16) and tokens.dtype == np.int32
    assert images.min() >= -1.0 and images.max() <= 1.0
    for name in shapes.ATTRIBUTE_NAMES:
        values = getattr(attrs, name)
        assert values.dtype == np.int32 and values.shape == (BATCH,)
        assert values.min() >= 0 and values.max() < shapes.NUM_CLASSES[name]
    assert np.abs(attrs.offset).max() <= 1.0


def test_same_key_same_batch_different_key_differs(batch):
    images, tokens, attrs = batch
    images2, tokens2, attrs2 = _sample(jax.random.key(0), BATCH, ShapesConfig())
    np.testing.assert_array_equal(images, np.asarray(images2))
    np.testing.assert_array_equal(tokens, np.asarray(tokens2))
    assert shapes.prompt_of(attrs) == shapes.prompt_of(attrs2)
    images3, _, attrs3 = _sample(jax.random.key(1), BATCH, ShapesConfig())
    assert shapes.prompt_of(attrs) != shapes.prompt_of(attrs3)
    assert np.abs(images - np.asarray(images3)).max() > 0.5
    # Legacy uint32 keys (used with brax) work too and are deterministic.
    a = shapes.sample_attributes(jax.random.PRNGKey(3), 8)
    b = shapes.sample_attributes(jax.random.PRNGKey(3), 8)
    chex.assert_trees_all_equal(a, b)


def test_jittable_and_vmappable():
    config = ShapesConfig()
    keys = jax.random.split(jax.random.key(5), 3)
    images, tokens, attrs = jax.jit(jax.vmap(lambda k: shapes.sample_batch(k, 4, config)))(keys)
    assert images.shape == (3, 4, 32, 32, 3) and tokens.shape == (3, 4, 16)
    for i in range(3):
        single, single_tokens, _ = _sample(keys[i], 4, config)
        # Differently fused float32 arithmetic differs in rounding: distances of ~30 px carry
        # ~30 * 6e-8 ~ 2e-6 px of error, which the 1-px edge ramp passes on as is.
        np.testing.assert_allclose(np.asarray(images[i]), np.asarray(single), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(tokens[i]), np.asarray(single_tokens))


def test_prompts_parse_back_to_attributes(batch):
    _, _, attrs = batch
    prompts = shapes.prompt_of(attrs)
    parsed = shapes.attributes_of_prompts(prompts)
    for name in shapes.ATTRIBUTE_NAMES:
        np.testing.assert_array_equal(np.asarray(getattr(parsed, name)), getattr(attrs, name))
    assert np.all(attrs.background != attrs.color)
    one = shapes.attributes_of_prompt(prompts[0])
    assert one.batch_size == 1 and shapes.prompt_of(one) == [prompts[0]]


def test_prompt_text_is_exact():
    attrs = _attrs(size=1, color=0, shape=0, position=0, background=2)
    assert shapes.prompt_of(attrs) == ["a large red circle at the top left on a blue background"]
    attrs = _attrs(size=0, color=7, shape=3, position=4, background=6)
    assert shapes.prompt_of(attrs) == ["a small black cross at the center on a white background"]


def test_every_class_occurs_and_background_uniform_over_others():
    attrs = jax.device_get(shapes.sample_attributes(jax.random.key(11), 20000))
    for name in shapes.ATTRIBUTE_NAMES:
        counts = np.bincount(getattr(attrs, name), minlength=shapes.NUM_CLASSES[name])
        assert counts.min() > 0.8 * 20000 / shapes.NUM_CLASSES[name]
    # Conditional on the colour, the background takes each of the 7 other colours ~1/7 of
    # the time: 20000 / 8 / 7 ~ 357 per cell, a 3-sigma band is about +-55.
    joint = np.zeros((8, 8), int)
    np.add.at(joint, (attrs.color, attrs.background), 1)
    assert np.all(np.diag(joint) == 0)
    off = joint[~np.eye(8, dtype=bool)]
    assert off.min() > 250 and off.max() < 470


@pytest.mark.parametrize(
    "prompt, bad",
    [
        ("a huge red circle at the top on a blue background", "'huge'"),
        ("a small purple circle at the top on a blue background", "'purple'"),
        ("a small red star at the top on a blue background", "'star'"),
        ("a small red circle at the middle on a blue background", "'middle'"),
        ("a small red circle at the left top on a blue background", "'left top'"),
        ("a small red circle at the top on a red background", "'red'"),
        ("a small red circle in the top on a blue background", "'in'"),
        ("a small red circle at the top on a blue background now", "'now'"),
        ("a small red circle at the top on a blue", "'<end of prompt>'"),
        ("A small red circle at the top on a blue background", "'A'"),
    ],
)
def test_prompt_outside_grammar_names_the_bad_word(prompt, bad):
    with pytest.raises(ValueError, match=bad):
        shapes.attributes_of_prompt(prompt)


def test_background_differs_and_image_colours_match(batch):
    images, _, attrs = batch
    # The corner pixel farthest from the shape shows the background colour exactly.
    rgb = shapes.COLOR_RGB
    row = attrs.position // 3
    col = attrs.position % 3
    far_r = np.where(row < 1, 31, 0)
    far_c = np.where(col < 1, 31, 0)
    corner = images[np.arange(BATCH), far_r, far_c]
    np.testing.assert_array_equal(corner, rgb[attrs.background])
    # The pixel at the shape's centre shows the shape's colour (all shapes cover their centre).
    centers = np.asarray(_centers(attrs, ShapesConfig()))
    ci = np.floor(centers).astype(int)
    np.testing.assert_allclose(images[np.arange(BATCH), ci[:, 0], ci[:, 1]], rgb[attrs.color], atol=1e-6)


def _centroids(images: np.ndarray, attrs) -> np.ndarray:
    """Centroid (row, col) in pixels of each image's pixels weighted by how far they are
    from the background colour, in units of the fore/background difference."""
    bg = shapes.COLOR_RGB[attrs.background][:, None, None, :]
    fg = shapes.COLOR_RGB[attrs.color][:, None, None, :]
    weight = np.abs(images - bg).sum(-1) / np.abs(fg - bg).sum(-1)  # [B, H, W] in [0, 1]
    coords = np.arange(images.shape[1]) + 0.5
    total = weight.sum((1, 2))
    return np.stack(
        [(weight.sum(2) * coords).sum(1) / total, (weight.sum(1) * coords).sum(1) / total], -1
    )


@pytest.mark.parametrize("resolution", [32, 48])
def test_shape_centroid_lies_in_the_stated_third(resolution):
    config = ShapesConfig(resolution=resolution)
    images, _, attrs = _sample(jax.random.key(7), BATCH, config)
    images, attrs = np.asarray(images), jax.device_get(attrs)
    centroid = _centroids(images, attrs)
    third = resolution / 3
    grid = np.stack([attrs.position // 3, attrs.position % 3], -1)
    assert np.all(centroid >= grid * third) and np.all(centroid <= (grid + 1) * third)
    # The drawn centre (not only the centroid) lies in the third, at least 1/4 third from
    # its edges (jitter 0.25 leaves a quarter of a third on each side).
    centers = np.asarray(_centers(attrs, config))
    assert np.all(centers >= (grid + 0.25) * third - 1e-4) and np.all(centers <= (grid + 0.75) * third + 1e-4)


def test_centres_vary_within_a_prompt():
    attrs = shapes.sample_attributes(jax.random.key(3), 512)
    centers = np.asarray(_centers(attrs, ShapesConfig()))
    middle_third = np.asarray(attrs.position) == 4
    # Centre third, jitter 0.25 of 32/3 px: centres spread over +-2.67 px around 16.
    assert centers[middle_third].std(0).min() > 1.0
    assert np.abs(centers[middle_third] - 16.0).max() <= 32 / 3 * 0.25 + 1e-4


def test_sizes_are_distinct_and_shapes_mostly_inside():
    # Same everything but the size: large covers about (0.18 / 0.1)^2 = 3.24 times the area.
    config = ShapesConfig()
    for shape in range(shapes.NUM_SHAPES):
        areas = []
        for size in (0, 1):
            image = np.asarray(_render(_attrs(size=size, shape=shape), config))
            coverage = (image[0, :, :, 0] + 1) / 2  # red (+1) on blue (-1) in channel 0
            areas.append(coverage.sum())
        assert 2.5 < areas[1] / areas[0] < 4.0, (shape, areas)
    # A large shape pushed into the top-left corner keeps >= 90% of its area in the image:
    # compare with the same shape drawn in the middle of a much larger canvas.
    for shape in range(shapes.NUM_SHAPES):
        corner = _attrs(shape=shape, position=0, offset=(-1.0, -1.0))
        inside = (np.asarray(_render(corner, config))[0, :, :, 0] + 1).sum() / 2
        full = _attrs(shape=shape, position=4)
        whole = (np.asarray(_render(full, config))[0, :, :, 0] + 1).sum() / 2
        assert inside > 0.9 * whole, (shape, inside, whole)


def test_soft_edges():
    image = np.asarray(_render(_attrs(shape=0), ShapesConfig()))[0, :, :, 0]
    # Red on blue: channel 0 is +1 inside and -1 outside; the 1-pixel edge has values between.
    between = (image > -1) & (image < 1)
    assert between.sum() > 10
    # A circle of radius 5.76 px: its boundary is ~36 px long, a 1-px-wide ramp crosses
    # about that many pixels (tolerance for pixel-grid effects).
    assert 20 < between.sum() < 60


def test_shapes_are_different_pictures():
    config = ShapesConfig()
    images = [np.asarray(_render(_attrs(shape=s), config)) for s in range(shapes.NUM_SHAPES)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).sum() > 20.0, (i, j)


def test_shapes_config_validation_and_json_round_trip():
    with pytest.raises(ValueError, match="resolution"):
        ShapesConfig(resolution=4)
    with pytest.raises(ValueError, match="jitter"):
        ShapesConfig(jitter=0.6)
    with pytest.raises(ValueError, match="small_radius"):
        ShapesConfig(small_radius=0.2, large_radius=0.1)
    with pytest.raises(ValueError, match="max_length"):
        ShapesConfig(max_length=10)
    config = ShapesConfig(resolution=64, jitter=0.1)
    assert config_lib.from_dict(ShapesConfig, config_lib.to_dict(config)) == config
    with pytest.raises(ValueError, match="batch"):
        shapes.sample_attributes(jax.random.key(0), 0)


def test_task_class_is_the_shape(batch):
    _, _, attrs = batch
    np.testing.assert_array_equal(np.asarray(shapes.task_class(attrs)), attrs.shape)
    assert shapes.NUM_TASK_CLASSES == 4


# ---------------------------------------------------------------------------- tokenizer


def test_vocabulary_fits_the_text_encoder():
    assert tokenizer.VOCAB_SIZE == len(set(tokenizer.VOCAB)) == 27
    assert tokenizer.VOCAB_SIZE <= 64  # the text encoder's default vocab_size
    assert tokenizer.VOCAB[tokenizer.PAD_ID] == "<pad>"
    assert tokenizer.VOCAB[tokenizer.BOS_ID] == "<bos>"
    assert tokenizer.VOCAB[tokenizer.EOS_ID] == "<eos>"


def test_encode_hand_checked():
    tokens = tokenizer.encode(["a large red circle at the top left on a blue background"])
    expected = [
        tokenizer.BOS_ID,
        *(tokenizer.token_id(w) for w in "a large red circle at the top left on a blue background".split()),
        tokenizer.EOS_ID,
        tokenizer.PAD_ID,
        tokenizer.PAD_ID,
    ]
    # 12 words + bos + eos = 14 tokens, 2 pads to 16.
    assert tokens.tolist() == [expected]
    assert tokenizer.token_id("a") == 3 and tokenizer.token_id("at") == 4


def test_tokenizer_round_trip(batch):
    _, tokens, attrs = batch
    prompts = shapes.prompt_of(attrs)
    encoded = tokenizer.encode(prompts)
    np.testing.assert_array_equal(encoded, tokens)  # device tokens == host tokens
    assert tokenizer.decode(encoded) == prompts
    assert int((encoded != tokenizer.PAD_ID).sum(1).max()) == tokenizer.MAX_PROMPT_TOKENS


@pytest.mark.parametrize("max_length", [14, 20])
def test_tokens_from_attributes_equals_encode_for_every_position(max_length):
    # Every position (1- and 2-word) with every size/shape, under jit.
    n = shapes.NUM_POSITIONS * shapes.NUM_SHAPES * shapes.NUM_SIZES
    idx = np.arange(n)
    attrs = Attributes(
        size=jnp.asarray(idx % 2, jnp.int32),
        color=jnp.asarray(idx % 8, jnp.int32),
        shape=jnp.asarray((idx // 2) % 4, jnp.int32),
        position=jnp.asarray((idx // 8) % 9, jnp.int32),
        background=jnp.asarray((idx % 8 + 1 + idx % 7) % 8, jnp.int32),
        offset=jnp.zeros((n, 2), jnp.float32),
    )
    tokens = jax.jit(tokenizer.tokens_from_attributes, static_argnums=1)(attrs, max_length)
    np.testing.assert_array_equal(np.asarray(tokens), tokenizer.encode(shapes.prompt_of(attrs), max_length))
    assert set(np.asarray(attrs.position).tolist()) == set(range(9))


def test_tokenizer_errors():
    with pytest.raises(ValueError, match="'purple'"):
        tokenizer.encode(["a purple circle"])
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode(["a large red circle at the top left on a blue background"], max_length=13)
    with pytest.raises(ValueError, match="list"):
        tokenizer.encode("a red circle")
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.tokens_from_attributes(_attrs(), 13)
    with pytest.raises(ValueError, match=r"\[0, 27\)"):
        tokenizer.decode(np.array([[1, 99]]))
