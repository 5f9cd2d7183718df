"""Tests of meg_jax.meg.link: payload arithmetic, air time, quantiser, analog channel."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax.meg import costs, link, pricing
from meg_jax.meg.link import LinkConfig


def test_link_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mode"):
        LinkConfig(mode="optical")
    with pytest.raises(ValueError, match="bits"):
        LinkConfig(bits=5)
    with pytest.raises(ValueError, match="fading"):
        LinkConfig(fading="rician")
    with pytest.raises(ValueError, match="bandwidth"):
        LinkConfig(bandwidth_hz=0.0)


def test_payload_bits_hand_worked_digital():
    # tiny latent: h = w = 8, C = 4, r = 0.5, b = 8.
    # N = 64 tokens; 2x2 cells -> N_dst = 16, N_src = 48; merged r = floor(0.5 * 64) = 32.
    # Features: (64 - 32) tokens * 4 channels = 128 values * 8 bits = 1024 data bits.
    # Merge map (top-left dst, known to the UE): which 32 of 48 src merged, C(48, 32) =
    # C(48, 16) = 2254848913647 options (41.036 bits), and a dst for each, 16**32 (128 bits):
    # ceil(169.036) = 170 bits. Range side info: two float32 = 64 bits.
    # Total 1024 + 64 + 170 = 1258 bits.
    preset = costs.cost_preset("tiny")
    cfg = LinkConfig(mode="digital", bits=8)
    assert costs.num_merged_tokens(preset, 0.5) == 32
    assert costs.merge_map_bits(preset, 0.5) == 170
    load = costs.latent_payload(preset, cfg, 0.5)
    assert float(load.data_bits) == 1024
    assert float(load.side_bits) == 64 + 170
    assert float(load.total_bits) == 1258
    assert float(load.data_symbols) == 0


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_payload_bits_without_merging(bits):
    # r = 0: 64 tokens * 4 channels = 256 values * b bits; no map, 64 bits of range.
    load = costs.latent_payload(costs.cost_preset("tiny"), LinkConfig(mode="digital", bits=bits), 0.0)
    assert float(load.total_bits) == 256 * bits + 64


def test_payload_symbols_hand_worked_analog():
    # Same merge as above; 128 real values pair into 64 complex symbols; side info is the
    # float32 power scale (32 bits) plus the 170-bit map = 202 bits.
    load = costs.latent_payload(costs.cost_preset("tiny"), LinkConfig(mode="analog"), 0.5)
    assert float(load.data_symbols) == 64
    assert float(load.side_bits) == 202
    assert float(load.data_bits) == 0
    # An odd number of values rounds the symbols up: 7 values -> 4 symbols.
    assert float(link.payload(LinkConfig(mode="analog"), 7).data_symbols) == 4


def test_transmission_time_hand_worked():
    # SNR = 10 log10(3) dB -> log2(1 + 3) = 2 bit/s/Hz; B = 1 MHz -> 2 Mbit/s.
    snr_db = 10 * math.log10(3.0)
    digital = LinkConfig(mode="digital", bits=8, bandwidth_hz=1e6)
    # 1258 bits / 2e6 bit/s = 629 us.
    t = link.transmission_time(digital, costs.latent_payload(costs.cost_preset("tiny"), digital, 0.5), snr_db)
    np.testing.assert_allclose(float(t), 629e-6, rtol=1e-5)
    # Analog: 64 symbols / 1e6 symbol/s = 64 us, plus 202 side bits / 2e6 = 101 us -> 165 us.
    analog = LinkConfig(mode="analog", bandwidth_hz=1e6)
    t = link.transmission_time(analog, costs.latent_payload(costs.cost_preset("tiny"), analog, 0.5), snr_db)
    np.testing.assert_allclose(float(t), 165e-6, rtol=1e-5)


def test_shannon_rate_and_link_budget():
    # 0 dB over 1 MHz: 1e6 * log2(2) = 1 Mbit/s.
    np.testing.assert_allclose(float(pricing.shannon_rate_bps(1e6, 0.0)), 1e6, rtol=1e-6)
    # 30 dBm, path loss 100 dB, 20 MHz, NF 7 dB: noise = -174 + 10 log10(2e7) + 7
    # = -174 + 73.0103 + 7 = -93.9897 dBm; SNR = 30 - 100 + 93.9897 = 23.9897 dB.
    cfg = LinkConfig(bandwidth_hz=20e6, tx_power_dbm=30.0, noise_figure_db=7.0)
    np.testing.assert_allclose(float(link.snr_db_from_path_loss(cfg, 100.0)), 23.9897, atol=1e-3)


def test_quantizer_error_within_half_step():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 10, 4))
    for bits in (4, 6, 8):
        codes, lo, hi = link.quantize(x, bits)
        assert codes.dtype == jnp.int32
        assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
        step = (hi - lo) / (2**bits - 1)
        err = jnp.abs(link.dequantize(codes, lo, hi, bits) - x).reshape(3, -1).max(axis=1)
        assert bool(jnp.all(err <= step / 2 * (1 + 1e-5)))
        # The extremes are exact: lo and hi are sent.
        xq = link.transmit_digital(x, bits)
        np.testing.assert_allclose(xq.reshape(3, -1).min(1), x.reshape(3, -1).min(1), rtol=1e-6)
        np.testing.assert_allclose(xq.reshape(3, -1).max(1), x.reshape(3, -1).max(1), rtol=1e-6)


def test_quantizer_constant_sample_is_exact():
    x = jnp.full((2, 5, 4), 0.37)
    np.testing.assert_array_equal(link.transmit_digital(x, 4), x)


def test_more_bits_less_error():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 4))
    errs = [float(jnp.mean((link.transmit_digital(x, b) - x) ** 2)) for b in (4, 6, 8)]
    assert errs[0] > errs[1] > errs[2] > 0


def test_digital_ignores_snr_and_key():
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 4))
    cfg = LinkConfig(mode="digital", bits=6)
    a = link.transmit_features(x, cfg, -5.0, jax.random.PRNGKey(0))
    b = link.transmit_features(x, cfg, 30.0, jax.random.PRNGKey(9))
    np.testing.assert_array_equal(a, b)


def test_analog_noiseless_awgn_is_bit_exact():
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 7, 4)) * 3.0
    y = link.transmit_analog(x, jnp.inf, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(y, x)
    # Odd number of values per sample (padding path): 5 values.
    x5 = jax.random.normal(jax.random.PRNGKey(4), (2, 5))
    np.testing.assert_array_equal(link.transmit_analog(x5, jnp.inf, jax.random.PRNGKey(0)), x5)


def test_analog_noiseless_rayleigh_inverts_channel():
    # Zero noise: MMSE = zero forcing, y = h z / h up to float rounding.
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 32, 4))
    y = link.transmit_analog(x, jnp.inf, jax.random.PRNGKey(0), fading="rayleigh")
    np.testing.assert_allclose(y, x, atol=1e-5)


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 10.0, 20.0])
def test_analog_awgn_mmse_error_matches_theory(snr_db):
    # Unit-power symbols through AWGN with MMSE: normalised MSE = 1 / (1 + SNR), and the
    # per-real-value error power is scale^2 times that. 64 samples x 2048 symbols = 131072
    # complex error samples: the relative std of the estimated MSE is about
    # sqrt(2 / 131072) = 0.4%; 3% leaves room for the bias term of the MMSE shrinkage.
    x = jax.random.normal(jax.random.PRNGKey(6), (64, 4096))
    y = link.transmit_analog(x, snr_db, jax.random.PRNGKey(7))
    snr = 10 ** (snr_db / 10)
    nmse = float(jnp.sum((y - x) ** 2) / jnp.sum(x**2))
    np.testing.assert_allclose(nmse, 1.0 / (1.0 + snr), rtol=0.03)


def test_analog_error_falls_with_snr_rayleigh():
    # Flat Rayleigh, one h per sample; 256 samples average over the fading. Same key at every
    # SNR (common random numbers), so the comparison is not blurred by independent draws.
    x = jax.random.normal(jax.random.PRNGKey(8), (256, 256))
    errs = [
        float(jnp.mean((link.transmit_analog(x, s, jax.random.PRNGKey(9), fading="rayleigh") - x) ** 2))
        for s in (-5.0, 5.0, 15.0, 25.0)
    ]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_transmit_is_jittable_without_retrace_over_snr():
    cfg = LinkConfig(mode="analog")
    fn = jax.jit(chex.assert_max_traces(lambda x, s, k: link.transmit_features(x, cfg, s, k), n=1))
    x = jnp.ones((2, 8, 4))
    for s in (0.0, 10.0, 20.0):
        fn(x, jnp.full((2,), s, jnp.float32), jax.random.PRNGKey(0))
    # Per-sample SNR: a noiseless sample is exact while its neighbour is noisy.
    y = fn(x, jnp.array([jnp.inf, -5.0], jnp.float32), jax.random.PRNGKey(1))
    np.testing.assert_array_equal(y[0], x[0])
    assert float(jnp.abs(y[1] - x[1]).max()) > 0
