"""Tests of meg_jax.meg.pipeline on a randomly initialised tiny backbone (no trained weights)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax import metrics
from meg_jax.meg import costs, pipeline
from meg_jax.meg.link import LinkConfig

PROMPTS = [
    "a large red circle at the top left on a blue background",
    "a small green square at the center on a black background",
    "a large white triangle at the bottom on a red background",
    "a small yellow cross at the right on a cyan background",
]
ANALOG = LinkConfig(mode="analog")
K = 2


@pytest.fixture(scope="module")
def backbone():
    bb = pipeline.init_random_backbone(jax.random.PRNGKey(0))
    # 4 teacher steps keep the reference's compile short; the code path is the 50-step one.
    return bb.replace(sampling=dataclasses.replace(bb.sampling, teacher_steps=4))


@pytest.fixture(scope="module")
def tokens(backbone):
    return pipeline.tokenize(backbone, PROMPTS)


@pytest.fixture(scope="module")
def noise(backbone):
    return jax.random.normal(jax.random.PRNGKey(1), (len(PROMPTS), 8, 8, 4))


@pytest.fixture(scope="module")
def unlinked(backbone, tokens, noise):
    """K student steps decoded directly: the pipeline without merge or link."""

    @jax.jit
    def fn(bb, tok, nz):
        latents = pipeline.es_latents(bb, pipeline.encode_text(bb, tok), nz, K)
        return latents, pipeline.decode_latents(bb, latents)

    return fn(backbone, tokens, noise)


# Hand pricing of the tiny preset, independent of meg_jax.meg.costs/devices/pricing: the
# device numbers are the datasheet figures quoted in meg_jax/meg/devices.py, the FLOP counts
# the constants tests/test_flops.py recounts with XLA.
ES_FLOP_PER_S = 121e12 * 0.35  # NVIDIA L4, 121 TFLOP/s dense fp16 x utilisation 0.35 = 42.35e12
UE_FLOP_PER_S = 17.5e12 * 0.1  # phone NPU, 17.5 TFLOP/s x 0.1 = 1.75e12
UE_J_PER_FLOP = 5.0 / UE_FLOP_PER_S  # 5 W under load -> 2.857e-12 J/FLOP
UE_RX_W = 1.288  # LTE receive power (Huang et al. 2012)
TINY_TEXT, TINY_UNET, TINY_VAE = 1160304.0, 31864328.0, 120070512.0  # FLOP, batch 1


def test_generate_shapes_and_costs(backbone, tokens, noise):
    snr = jnp.asarray([10.0, 10.0, -30.0, 30.0])
    images, c = pipeline.generate(backbone, tokens, K, 0.5, ANALOG, jax.random.PRNGKey(2), snr_db=snr, noise=noise)
    assert images.shape == (4, 32, 32, 3)
    assert bool(jnp.all(jnp.isfinite(images)))
    for field in dataclasses.fields(c):
        assert getattr(c, field.name).shape == (4,), field.name
    # By hand (K = 2 student steps, one UNet forward each; r = 0.5; analog, B = 20 MHz):
    #   ES   (1160304 + 2 * 31864328) FLOP / 42.35e12 FLOP/s = 64888960 / 42.35e12 = 1.53220 us
    #   UE   120070512 / 1.75e12 = 68.6117 us; energy 120070512 * 2.857e-12 = 343.059 uJ
    #   load 64 - 32 merged = 32 tokens x 4 = 128 values -> 64 complex symbols;
    #        side bits 32 (power scale) + 170 (merge map) = 202
    #   air  64 / 20e6 + 202 / (20e6 log2(1 + 10^(snr/10)))
    #        10 dB:  3.2 us + 202 / 69.1886e6 = 3.2 + 2.91956 = 6.11956 us
    #        -30 dB: below the -10 dB floor -> 202 / (20e6 log2 1.1) = 202 / 2.75007e6
    #                = 73.4527 us, + 3.2 = 76.6527 us (no floor: 202 / 28839 b/s = 7.0 ms)
    #   latency = ES + air + UE; energy = UE compute + 1.288 W x air
    snr_used = np.maximum(np.asarray(snr, np.float64), -10.0)
    air = 64 / 20e6 + 202 / (20e6 * np.log2(1 + 10 ** (snr_used / 10)))
    np.testing.assert_allclose(air[[0, 2]], [6.11956e-6, 76.6527e-6], rtol=1e-5)
    es = (TINY_TEXT + K * TINY_UNET) / ES_FLOP_PER_S
    ue = TINY_VAE / UE_FLOP_PER_S
    # float32 arithmetic in the cost model: a dozen roundings of 6e-8 each -> rtol 1e-5.
    np.testing.assert_allclose(c.payload_symbols, 64, rtol=0)
    np.testing.assert_allclose(c.payload_bits, 202, rtol=0)
    np.testing.assert_allclose(c.es_time_s, es, rtol=1e-5)
    np.testing.assert_allclose(c.ue_time_s, ue, rtol=1e-5)
    np.testing.assert_allclose(c.tx_time_s, air, rtol=1e-5)
    np.testing.assert_allclose(c.latency_s, es + air + ue, rtol=1e-5)
    np.testing.assert_allclose(c.ue_energy_j, TINY_VAE * UE_J_PER_FLOP + UE_RX_W * air, rtol=1e-5)
    # Prompts as strings give the same images as their token ids.
    images2, _ = pipeline.generate(backbone, PROMPTS, K, 0.5, ANALOG, jax.random.PRNGKey(2), snr_db=snr, noise=noise)
    np.testing.assert_array_equal(images, images2)


def test_generate_is_cached_per_static_setting(backbone, tokens, noise):
    pipeline.generate(backbone, tokens, K, 0.5, ANALOG, jax.random.PRNGKey(3), snr_db=0.0, noise=noise)
    size = pipeline._generate_jit._cache_size()
    # New SNR, key and noise values: same compiled function.
    pipeline.generate(backbone, tokens, K, 0.5, ANALOG, jax.random.PRNGKey(4), snr_db=25.0, noise=noise + 1.0)
    pipeline.generate(backbone, tokens, K, 0.5, ANALOG, jax.random.PRNGKey(5), snr_db=jnp.array([0.0, 1, 2, 3]),
                      noise=noise)
    assert pipeline._generate_jit._cache_size() == size


def test_r0_infinite_snr_reproduces_unlinked_pipeline_exactly(backbone, tokens, noise, unlinked):
    latents, images = unlinked
    # The link part alone: bit-exact.
    received = pipeline.transmit_latents(latents, 0.0, ANALOG, jnp.inf, jax.random.PRNGKey(6))
    np.testing.assert_array_equal(received, latents)
    # End to end through generate (its own compiled program): the same images. Two XLA programs
    # may fuse and order the float32 sums differently, so "the same" is up to rounding carried
    # through K UNet passes and the decoder: atol 1e-4 on [-1, 1] pixels (~1e3 float32 ulps of 1),
    # far below the 8-bit step 2/255 = 7.8e-3 that any real difference of the link would exceed.
    out, c = pipeline.generate(backbone, tokens, K, 0.0, ANALOG, jax.random.PRNGKey(7), snr_db=jnp.inf, noise=noise)
    np.testing.assert_allclose(out, images, rtol=0, atol=1e-4)
    assert bool(jnp.all(c.tx_time_s > 0)) and bool(jnp.all(jnp.isfinite(c.latency_s)))


def test_merging_changes_images_but_keeps_grid(backbone, unlinked):
    latents, _ = unlinked
    merged, plan = pipeline.merge_for_transmission(latents, 0.5)
    assert merged.shape == (4, 64 - 32, 4)
    received = pipeline.transmit_latents(latents, 0.5, ANALOG, jnp.inf, jax.random.PRNGKey(0))
    assert received.shape == latents.shape
    # Merged tokens become their dst's mean: some positions change, the kept ones do not.
    changed = jnp.any(received != latents, axis=-1).reshape(4, -1)
    assert int(changed.sum(axis=1).min()) > 0
    assert int(changed.sum(axis=1).max()) <= 32 + 16  # merged src + their dst


def test_analog_quality_does_not_fall_as_snr_rises(backbone, tokens, noise, unlinked):
    # PSNR of the linked images against the unlinked ones (only the link degrades them),
    # r = 0.3, one channel key for every SNR (common random numbers). Allowance 0.5 dB per
    # step: the MMSE error power sigma^2/(1 + sigma^2) falls with SNR, but its noise part
    # g·n has magnitude sigma/(1 + sigma^2), which *rises* as the SNR climbs towards 0 dB,
    # and the random decoder is nonlinear, so the 4-image mean may jitter a little. Over
    # the whole range it must rise by far more (> 5 dB; it saturates near 20 dB, where the
    # merge error of r = 0.3 dominates the link's).
    _, reference = unlinked
    snrs = [-5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 30.0]
    psnr = []
    for s in snrs:
        images, _ = pipeline.generate(backbone, tokens, K, 0.3, ANALOG, jax.random.PRNGKey(8), snr_db=s, noise=noise)
        psnr.append(float(jnp.mean(metrics.psnr(images, reference))))
    assert all(b >= a - 0.5 for a, b in zip(psnr, psnr[1:])), psnr
    assert psnr[-1] > psnr[0] + 5.0, psnr


def test_digital_link_quality_rises_with_bits(backbone, unlinked):
    latents, reference = unlinked
    decode = jax.jit(pipeline.decode_latents)
    psnr = []
    for bits in (4, 6, 8):
        link = LinkConfig(mode="digital", bits=bits)
        received = pipeline.transmit_latents(latents, 0.0, link, 0.0, jax.random.PRNGKey(9))
        psnr.append(float(jnp.mean(metrics.psnr(decode(backbone, received), reference))))
        c = costs.meg_costs(costs.cost_preset("tiny"), link, K, 0.0, 0.0)
        assert float(c.payload_bits) == 64 * 4 * bits + 64
    assert psnr[0] < psnr[1] < psnr[2]


def test_one_decode_convention_clips_to_the_image_range(backbone, unlinked):
    from meg_jax import distill
    from meg_jax.backbone.vae import AutoencoderKL

    latents, _ = unlinked
    assert pipeline.decode_latents is distill.decode_latents
    # Latents 20x too large push a random decoder far outside [-1, 1]; the decode used by
    # generate, calibration and backbone evaluation returns the raw decode clipped.
    big = 20.0 * latents
    raw = AutoencoderKL(backbone.config.vae).apply(
        backbone.vae, big / backbone.config.latent_scaling_factor, method="decode")
    assert float(jnp.max(jnp.abs(raw))) > 1.0
    out = pipeline.decode_latents(backbone, big)
    # Two compiled programs (jit vs eager apply): float32 differences of the decode only.
    np.testing.assert_allclose(out, np.clip(np.asarray(raw), -1.0, 1.0), atol=1e-5)
    assert float(jnp.max(jnp.abs(out))) <= 1.0


def test_steps_change_the_student(backbone, tokens, noise):
    a, ca = pipeline.generate(backbone, tokens, 1, 0.0, ANALOG, jax.random.PRNGKey(0), snr_db=jnp.inf, noise=noise)
    b, cb = pipeline.generate(backbone, tokens, K, 0.0, ANALOG, jax.random.PRNGKey(0), snr_db=jnp.inf, noise=noise)
    assert float(jnp.abs(a - b).max()) > 0
    assert float(cb.es_time_s[0]) > float(ca.es_time_s[0])


def test_reference_images(backbone, tokens, noise):
    ref = pipeline.reference_images(backbone, tokens, noise)
    assert ref.shape == (4, 32, 32, 3) and bool(jnp.all(jnp.isfinite(ref)))


def test_bad_inputs_fail_early(backbone, tokens):
    with pytest.raises(ValueError, match="merge_ratio"):
        pipeline.generate(backbone, tokens, 1, 0.8, ANALOG, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="steps"):
        pipeline.generate(backbone, tokens, 0, 0.1, ANALOG, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="noise"):
        pipeline.generate(backbone, tokens, 1, 0.1, ANALOG, jax.random.PRNGKey(0), noise=jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="list of prompts"):
        pipeline.tokenize(backbone, "a large red circle")
