"""Tests of meg_jax.meg.schemes: PNG sizes, quality scoring, conventional scheme costs."""

from __future__ import annotations

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from meg_jax.data import shapes
from meg_jax.data.classifier import ClassifierConfig, init_classifier
from meg_jax.meg import costs, pipeline, schemes
from meg_jax.meg.link import LinkConfig

LINK = LinkConfig(mode="analog", bandwidth_hz=1e6)


@pytest.fixture(scope="module")
def setup():
    bb = pipeline.init_random_backbone(jax.random.PRNGKey(0))
    cls_cfg = ClassifierConfig()
    bb = bb.replace(
        classifier=init_classifier(cls_cfg, jax.random.PRNGKey(1)),
        classifier_config=cls_cfg,
        sampling=dataclasses.replace(bb.sampling, teacher_steps=4),
    )
    images, tokens, attrs = shapes.sample_batch(jax.random.PRNGKey(2), 4)
    noise = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 4))
    return bb, tokens, attrs, noise


def test_png_bits_match_pillow_file_size():
    images, _, _ = shapes.sample_batch(jax.random.PRNGKey(0), 2)
    bits = schemes.png_bits(images)
    u8 = np.round((np.clip(np.asarray(images[0]), -1, 1) + 1) * 127.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8, mode="RGB").save(buf, format="PNG")
    assert bits[0] == 8 * len(buf.getvalue())
    # A procedural shape compresses far below raw 24 bit/pixel; noise does not.
    assert bits[0] < 24 * 32 * 32
    noisy = jax.random.uniform(jax.random.PRNGKey(1), (1, 32, 32, 3), minval=-1, maxval=1)
    assert schemes.png_bits(noisy)[0] > 20 * 32 * 32


def test_to_display_rounds_to_8_bit():
    x = jnp.array([-1.5, -1.0, 0.0, 0.3, 1.0, 2.0])
    y = schemes.to_display(x)
    levels = (y + 1) * 127.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert float(y.min()) == -1.0 and float(y.max()) == 1.0
    # 8-bit rounding of the reference caps its PSNR: 10 log10(4 / ((2/255)^2 / 12)) = 58.9 dB
    # for uniformly spread values.
    ref = jax.random.uniform(jax.random.PRNGKey(0), (8, 32, 32, 3), minval=-1, maxval=1)
    from meg_jax import metrics

    np.testing.assert_allclose(float(metrics.psnr(schemes.to_display(ref), ref).mean()), 58.9, atol=0.2)


def test_schemes_share_the_quality_measurement(setup):
    bb, tokens, attrs, noise = setup
    central = schemes.centralised(bb, tokens, attrs, noise, LINK, 10.0)
    local = schemes.on_device(bb, tokens, attrs, noise)
    # Both show the 8-bit reference: identical quality, finite PSNR.
    np.testing.assert_array_equal(central.quality.accuracy, local.quality.accuracy)
    np.testing.assert_array_equal(central.quality.psnr, local.quality.psnr)
    assert bool(jnp.all(jnp.isfinite(central.quality.psnr)))
    assert bool(jnp.all((central.quality.accuracy >= 0) & (central.quality.accuracy <= 1)))
    # Uncompressed MEG over a noiseless link shows the same image too.
    exact = schemes.meg_uncompressed(bb, tokens, attrs, noise, LINK, jnp.inf, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(exact.images, central.images)
    np.testing.assert_array_equal(exact.quality.psnr, central.quality.psnr)
    noisy = schemes.meg_uncompressed(bb, tokens, attrs, noise, LINK, -5.0, jax.random.PRNGKey(0))
    assert float(noisy.quality.psnr.mean()) < float(exact.quality.psnr.mean())


def test_scheme_costs(setup):
    bb, tokens, attrs, noise = setup
    preset = costs.cost_preset("tiny")
    central = schemes.centralised(bb, tokens, attrs, noise, LINK, 10.0)
    bits = schemes.png_bits(central.images)
    # The file goes at the Shannon rate: bits / (1e6 log2(11)).
    np.testing.assert_allclose(central.costs.tx_time_s, bits / (1e6 * np.log2(11.0)), rtol=1e-5)
    assert float(central.costs.ue_compute_energy_j.max()) == 0.0
    local = schemes.on_device(bb, tokens, attrs, noise)
    assert float(local.costs.tx_time_s.max()) == 0.0
    flops = preset.text_encoder_flops + 50 * 2 * preset.unet_flops + preset.vae_decoder_flops
    np.testing.assert_allclose(local.costs.ue_time_s, flops / preset.ue.effective_flops, rtol=1e-6)
    unc = schemes.meg_uncompressed(bb, tokens, attrs, noise, LINK, 10.0, jax.random.PRNGKey(0))
    np.testing.assert_allclose(unc.costs.latency_s, costs.uncompressed_costs(preset, LINK, 10.0).latency_s, rtol=1e-6)
    # Priced at another preset with a file size given from bits per pixel.
    sdxl = schemes.centralised(bb, tokens, attrs, noise, LINK, 10.0, cost="sdxl-1024", image_bits=np.full(4, 8e6))
    assert float(sdxl.costs.es_time_s[0]) > float(central.costs.es_time_s[0])


def test_meg_scheme_is_scored_like_the_others(setup):
    bb, tokens, attrs, noise = setup
    res = schemes.meg(bb, tokens, attrs, noise, 1, 0.5, LINK, 20.0, jax.random.PRNGKey(0))
    assert res.images.shape == (4, 32, 32, 3)
    assert res.quality.psnr.shape == (4,) and res.costs.latency_s.shape == (4,)
    unc = costs.uncompressed_costs(costs.cost_preset("tiny"), LINK, 20.0)
    assert float(res.costs.es_time_s[0]) < float(unc.es_time_s)
