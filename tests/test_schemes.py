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


def _scored_by_hand(bb, images, attrs, reference):
    """Accuracy and PSNR of ``images`` the way the schemes' docstring defines them, in NumPy:
    8-bit display image, classifier on it, PSNR (data range 2) against ``reference``."""
    from meg_jax.data.classifier import classify

    u8 = np.round((np.clip(np.asarray(images, np.float64), -1, 1) + 1) * 127.5)
    shown = u8 / 127.5 - 1.0
    logits = classify(bb.classifier, jnp.asarray(shown, jnp.float32), bb.classifier_config)
    right = [np.argmax(np.asarray(logits[n]), -1) == np.asarray(getattr(attrs, n)) for n in shapes.ATTRIBUTE_NAMES]
    mse = np.mean((shown - np.asarray(reference, np.float64)) ** 2, axis=(1, 2, 3))
    return np.mean(right, axis=0), 10 * np.log10(4.0 / mse)


def test_schemes_share_the_quality_measurement(setup):
    from meg_jax import distill

    bb, tokens, attrs, noise = setup
    central = schemes.centralised(bb, tokens, attrs, noise, LINK, 10.0)
    local = schemes.on_device(bb, tokens, attrs, noise)
    # The reference made by another path (distill.generate: the teacher's DDIM with the
    # shipped guidance, then the one decode), scored by hand. Two compiled programs for the
    # same 4 teacher steps differ by float32 rounding (~1e-6), which can move a pixel across
    # an 8-bit rounding edge: one level (2/255) on one value of 3072 shifts the MSE by
    # ~2e-8, i.e. ~1e-3 dB at the ~15-25 dB a random decoder reaches here; allow 0.01 dB.
    reference = distill.generate(bb, tokens, noise, num_steps=bb.sampling.teacher_steps, model="teacher")
    accuracy, psnr = _scored_by_hand(bb, reference, attrs, reference)
    for result in (central, local):
        np.testing.assert_allclose(result.quality.accuracy, accuracy, atol=1e-6)
        np.testing.assert_allclose(result.quality.psnr, psnr, atol=0.01)
        np.testing.assert_allclose(result.images, np.round((np.asarray(reference) + 1) * 127.5) / 127.5 - 1, atol=1e-2)
    # The reference is clipped to [-1, 1] (the one decode convention), so the 8-bit image
    # differs from it by rounding alone: |error| <= 1/255 -> PSNR >= 10 log10(4 / (1/255)^2)
    # = 54.2 dB per image (the mean-square of a uniform rounding error sits near 58.9 dB).
    assert bool(jnp.all(central.quality.psnr > 54.0))
    # Uncompressed MEG over a noiseless link decodes the same latents: the same quality.
    exact = schemes.meg_uncompressed(bb, tokens, attrs, noise, LINK, jnp.inf, jax.random.PRNGKey(0))
    np.testing.assert_allclose(exact.quality.psnr, psnr, atol=0.01)
    noisy = schemes.meg_uncompressed(bb, tokens, attrs, noise, LINK, -5.0, jax.random.PRNGKey(0))
    assert float(noisy.quality.psnr.mean()) < float(exact.quality.psnr.mean()) - 10.0


def test_scheme_costs(setup):
    bb, tokens, attrs, noise = setup
    # Hand pricing of the tiny preset (device figures from meg_jax/meg/devices.py's
    # datasheets: ES 121e12 x 0.35 = 42.35e12 FLOP/s; UE 17.5e12 x 0.1 = 1.75e12 FLOP/s,
    # 5 W / 1.75e12 = 2.857e-12 J/FLOP, receive 1.288 W; FLOPs text 1160304, UNet
    # 31864328, VAE decoder 120070512). float32 cost model: rtol 1e-5.
    es_rate, ue_rate, ue_j, rx_w = 42.35e12, 1.75e12, 5.0 / 1.75e12, 1.288
    text, unet, vae = 1160304.0, 31864328.0, 120070512.0
    teacher = 50 * 2 * unet  # 50 guided steps, two UNet forwards each
    central = schemes.centralised(bb, tokens, attrs, noise, LINK, 10.0)
    bits = schemes.png_bits(central.images)
    # The file goes at the Shannon rate: bits / (1e6 log2(11)).
    np.testing.assert_allclose(central.costs.tx_time_s, bits / (1e6 * np.log2(11.0)), rtol=1e-5)
    np.testing.assert_allclose(central.costs.es_time_s, (text + teacher + vae) / es_rate, rtol=1e-5)
    assert float(central.costs.ue_compute_energy_j.max()) == 0.0
    local = schemes.on_device(bb, tokens, attrs, noise)
    assert float(local.costs.tx_time_s.max()) == 0.0
    np.testing.assert_allclose(local.costs.ue_time_s, (text + teacher + vae) / ue_rate, rtol=1e-5)
    np.testing.assert_allclose(local.costs.ue_energy_j, (text + teacher + vae) * ue_j, rtol=1e-5)
    # MEG uncompressed at 10 dB and at -30 dB (below the -10 dB rate floor):
    #   ES (1160304 + 3186432800) / 42.35e12 = 75.2678 us; UE 120070512 / 1.75e12 = 68.6117 us
    #   r = 0: 64 tokens x 4 = 256 values -> 128 symbols, side 32 bits (scale; no merge map)
    #   air 10 dB: 128 / 1e6 + 32 / (1e6 log2 11) = 128 + 9.25007 = 137.250 us
    #   air -30 dB -> floor: 128 + 32 / (1e6 log2 1.1) = 128 + 232.721 = 360.721 us
    unc = schemes.meg_uncompressed(bb, tokens, attrs, noise, LINK, jnp.asarray([10.0, 10.0, -30.0, -30.0]),
                                   jax.random.PRNGKey(0))
    air = np.asarray([137.250e-6, 137.250e-6, 360.721e-6, 360.721e-6])
    np.testing.assert_allclose(unc.costs.tx_time_s, air, rtol=1e-5)
    np.testing.assert_allclose(unc.costs.payload_symbols, 128, rtol=0)
    np.testing.assert_allclose(unc.costs.payload_bits, 32, rtol=0)
    np.testing.assert_allclose(unc.costs.latency_s, (text + teacher) / es_rate + air + vae / ue_rate, rtol=1e-5)
    np.testing.assert_allclose(unc.costs.ue_energy_j, vae * ue_j + rx_w * air, rtol=1e-5)
    # Priced at another preset with a file size given from bits per pixel.
    sdxl = schemes.centralised(bb, tokens, attrs, noise, LINK, 10.0, cost="sdxl-1024", image_bits=np.full(4, 8e6))
    assert float(sdxl.costs.es_time_s[0]) > float(central.costs.es_time_s[0])


def test_price_uses_the_rate_floor():
    # schemes.price on a synthetic analog artifact (B = 1 MHz): the MEG action (K index 0,
    # r index 0) at -30 dB costs what it costs at the -10 dB floor, by hand:
    #   air = payload / B + side / (B log2(1 + 10^(max(snr, -10)/10)))
    from meg_jax.meg import artifact as artifact_lib

    art = artifact_lib.synthetic_artifact()
    b = art.bandwidth_hz
    payload, side = art.payload[0], art.side_info_bits[0]
    for snr, used in ((-30.0, -10.0), (-10.0, -10.0), (5.0, 5.0)):
        air = (payload / b if art.link_mode == "analog" else payload / (b * np.log2(1 + 10 ** (used / 10)))) \
            + side / (b * np.log2(1 + 10 ** (used / 10)))
        lat, energy = schemes.price(art, snr, steps_index=0, ratio_index=0)
        np.testing.assert_allclose(lat, art.es_compute_time_s[0] + air + art.ue_compute_time_s[0], rtol=1e-5)
        np.testing.assert_allclose(energy, art.ue_compute_energy_j[0] + art.ue_receive_power_w * air, rtol=1e-5)
    # No floor: -30 dB is dearer.
    assert schemes.price(art, -30.0, steps_index=0, ratio_index=0, snr_floor_db=-np.inf)[0] > \
        schemes.price(art, -30.0, steps_index=0, ratio_index=0)[0]


def test_meg_scheme_is_scored_like_the_others(setup):
    bb, tokens, attrs, noise = setup
    res = schemes.meg(bb, tokens, attrs, noise, 1, 0.5, LINK, 20.0, jax.random.PRNGKey(0))
    assert res.images.shape == (4, 32, 32, 3)
    assert res.quality.psnr.shape == (4,) and res.costs.latency_s.shape == (4,)
    unc = costs.uncompressed_costs(costs.cost_preset("tiny"), LINK, 20.0)
    assert float(res.costs.es_time_s[0]) < float(unc.es_time_s)
