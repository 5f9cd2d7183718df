"""Tests for meg_jax.env.wireless and the pricing it shares with the MEG system
(``meg_jax.meg.pricing``): hand-worked link budget and air time, the SNR floor, 3GPP values,
J0 against SciPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from meg_jax.env import numpy_reference
from meg_jax.env import wireless as W
from meg_jax.env.config import MEGEnvConfig
from meg_jax.meg import pricing


@pytest.mark.parametrize(
    "d2d, los, expected",
    [(100.0, 1.0, 85.3), (100.0, 0.0, 104.6), (200.0, 1.0, 91.6), (200.0, 0.0, 115.2)],
)
def test_umi_path_loss_matches_worked_values(d2d, los, expected):
    # reference/wireless.md: UMi at 3.5 GHz, h_BS 10 m, h_UT 1.5 m.
    pl = W.path_loss_db(jnp.float32(d2d), jnp.float32(los), 3.5e9, 10.0, 1.5, "umi")
    assert float(pl) == pytest.approx(expected, abs=0.05)


def test_umi_beyond_breakpoint_and_uma():
    # Breakpoint d'_BP = 4 * 9 * 0.5 * 3.5e9 / c = 210.14 m; at 300 m (d3D = 300.120):
    # 32.4 + 40*2.477296 + 10.881361 - 9.5*log10(210.145^2 + 8.5^2) (= 9.5*4.645750)
    # = 32.4 + 99.09182 + 10.88136 - 44.13462 = 98.2386 dB.
    pl = W.path_loss_db(jnp.float32(300.0), jnp.float32(1.0), 3.5e9, 10.0, 1.5, "umi")
    assert float(pl) == pytest.approx(98.2386, abs=0.01)
    # UMa LOS at 100 m, h_BS 25 m: d3D = sqrt(100^2 + 23.5^2) = 102.724;
    # 28 + 22*2.011673 + 10.881361 = 83.1382 dB (below its 560 m breakpoint).
    pl = W.path_loss_db(jnp.float32(100.0), jnp.float32(1.0), 3.5e9, 25.0, 1.5, "uma")
    assert float(pl) == pytest.approx(83.1382, abs=0.01)
    with pytest.raises(ValueError, match="scenario"):
        W.path_loss_db(jnp.float32(100.0), jnp.float32(1.0), 3.5e9, 25.0, 1.5, "rural")


def test_los_probability():
    # UMi at 100 m: 18/100 + exp(-100/36) (1 - 18/100) = 0.18 + 0.062176*0.82 = 0.230985.
    p = W.los_probability(jnp.asarray([10.0, 18.0, 100.0]), 1.5, "umi")
    np.testing.assert_allclose(np.asarray(p), [1.0, 1.0, 0.230985], atol=1e-5)


def test_hand_worked_link_budget():
    # UE at 100 m LOS, no shadowing, |h|^2 = 1; P_tx 30 dBm; B 20 MHz; NF 7 dB.
    #   PL    = 85.3142 dB (above)
    #   noise = -174 + 10 log10(2e7) + 7 = -174 + 73.0103 + 7 = -93.9897 dBm
    #   SNR   = 30 - 85.3142 + 93.9897 = 38.6755 dB -> 7371.42 linear
    #   rate  = 2e7 * log2(7372.42) = 2e7 * 12.84792 = 256.958 Mbit/s
    pl = W.path_loss_db(jnp.float32(100.0), jnp.float32(1.0), 3.5e9, 10.0, 1.5, "umi")
    noise = W.thermal_noise_dbm(20e6, 7.0)
    assert float(noise) == pytest.approx(-93.9897, abs=1e-3)
    snr = W.snr_db(30.0, pl, 0.0, 1.0, noise)
    assert float(snr) == pytest.approx(38.6755, abs=1e-3)
    rate = pricing.shannon_rate_bps(20e6, snr)
    assert float(rate) == pytest.approx(256.958e6, rel=1e-5)
    # Digital: 1e6 payload bits + 2e4 side bits -> 1.02e6 / 256.958e6 = 3.96951 ms.
    tx = pricing.artifact_air_time_s(1e6, 2e4, 20e6, snr, -10.0, "digital")
    assert float(tx) == pytest.approx(3.96951e-3, rel=1e-5)
    # ES 0.1 s + tx + UE 0.05 s = 0.153970 s; energy 0.2 J + 0.8 W * tx = 0.203176 J.
    latency, energy = pricing.request_costs(0.1, tx, 0.05, 0.2, 0.8)
    assert float(latency) == pytest.approx(0.1539695, rel=1e-6)
    assert float(energy) == pytest.approx(0.2031756, rel=1e-6)
    # Analog: 1e5 symbols / 2e7 Hz = 5 ms, plus 2e4 side bits at the Shannon rate
    # (0.0778 ms) = 5.07783 ms.
    tx_analog = pricing.artifact_air_time_s(1e5, 2e4, 20e6, snr, -10.0, "analog")
    assert float(tx_analog) == pytest.approx(5.07783e-3, rel=1e-5)
    assert float(pricing.artifact_air_time_s(1e5, 2e4, 20e6, snr, -10.0, "none")) == 0.0
    with pytest.raises(ValueError, match="link_mode"):
        pricing.artifact_air_time_s(1e5, 2e4, 20e6, snr, -10.0, "optical")


def test_rate_floor_hand_worked():
    # Floor -10 dB = 0.1 linear: below it the rate stays B log2(1.1) = 1e6 * 0.1375035
    # = 137.5035 kbit/s; above it the floor does nothing (0 dB -> log2(2) = 1 Mbit/s).
    snr = jnp.asarray([-30.0, -10.0, 0.0])
    np.testing.assert_allclose(np.asarray(pricing.shannon_rate_bps(1e6, snr, -10.0)),
                               [137503.5, 137503.5, 1e6], rtol=1e-5)
    # Without the floor -30 dB gives log2(1.001) = 1.44197e-3 -> 1441.97 bit/s: 95x slower.
    # float32 holds 1 + 1e-3 only to its spacing 1.19e-7 near 1, i.e. 1.2e-4 of the 1e-3
    # that log2 sees (it reads 1.00100005, +4.9e-5 relative): rtol 1e-4.
    np.testing.assert_allclose(float(pricing.shannon_rate_bps(1e6, -30.0, -jnp.inf)), 1441.97, rtol=1e-4)
    # 8192 bits at -30 dB: 8192 / 137503.5 = 59.577 ms with the floor; plus 1000 symbols at
    # 1e6 symbols/s (1 ms, no SNR dependence) = 60.577 ms.
    assert float(pricing.air_time_s(8192.0, 1000.0, 1e6, -30.0, -10.0)) == pytest.approx(60.577e-3, rel=1e-4)
    # The default floor is the environment's.
    assert pricing.DEFAULT_SNR_FLOOR_DB == MEGEnvConfig().snr_floor_db


@pytest.mark.parametrize("mode", ["digital", "analog"])
def test_pricing_matches_numpy_twin(mode):
    # The NumPy reference environment's costs (its own float64 formula) on SNRs around and
    # below the floor. float32 vs float64: log2 and 10^x in float32 are within a few ulp
    # (rel ~1e-6); the sums add no more than that.
    snr = np.linspace(-40.0, 40.0, 33)
    n = snr.size
    params = dict(bandwidth_hz=5e6, snr_floor_db=-10.0, analog=mode == "analog",
                  merge_ratios=np.array([0.0, 0.5]), snr_grid_db=np.array([-5.0, 30.0]),
                  quality_table=np.zeros((1, 2, 2, 1, 2)), reward_psnr_weight=0.0, psnr_scale_db=40.0,
                  payload=np.array([512.0, 256.0]), side_info_bits=np.array([64.0, 230.0]),
                  es_time_s=np.array([0.01]), ue_time_s=np.array([0.02, 0.02]),
                  ue_energy_j=np.array([0.03, 0.03]), ue_receive_power_w=0.8)
    # r = 0.5 is the grid's second ratio: payload 256, side 230 bits.
    ref = numpy_reference.price(params, snr, np.zeros(n, int), np.zeros(n, int), np.full(n, 0.5))
    expected_lat, expected_energy = ref["latency_s"], ref["energy_j"]
    tx = pricing.artifact_air_time_s(256.0, 230.0, 5e6, jnp.asarray(snr, jnp.float32), -10.0, mode)
    lat, energy = pricing.request_costs(0.01, tx, 0.02, 0.03, 0.8)
    np.testing.assert_allclose(np.asarray(lat), expected_lat, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(energy), expected_energy, rtol=2e-6)


def test_bessel_j0_against_scipy():
    x = np.linspace(0.0, 60.0, 60001, dtype=np.float32)
    ours = np.asarray(W.bessel_j0(jnp.asarray(x)))
    np.testing.assert_allclose(ours, special.j0(x.astype(np.float64)), atol=2e-6)
    # Symmetric: J0(-x) = J0(x).
    np.testing.assert_array_equal(np.asarray(W.bessel_j0(-jnp.asarray(x))), ours)


@pytest.mark.parametrize(
    "speed, interval, expected",
    [
        (3.0, 1e-3, 0.988),  # 3.5 GHz, 3 m/s, 1 ms
        (30 / 3.6, 1e-3, 0.909),  # 30 km/h, 1 ms
        (30 / 3.6, 1e-2, 0.180),  # 30 km/h, 10 ms
    ],
)
def test_fading_correlation_reference_values(speed, interval, expected):
    rho = W.fading_correlation(jnp.float32(speed), 3.5e9, interval)
    assert float(rho) == pytest.approx(expected, abs=1.5e-3)


def test_fading_correlation_nasir_guo():
    # f_d = 10 Hz, Δt = 20 ms: J0(2π 10 0.02) = J0(1.2566) = 0.643.
    assert float(W.bessel_j0(jnp.float32(2 * np.pi * 10 * 0.02))) == pytest.approx(0.643, abs=1e-3)


def test_gudmundson():
    # exp(-5 / 10) = 0.606531
    assert float(W.gudmundson_correlation(5.0, 10.0)) == pytest.approx(0.606531, abs=1e-6)
