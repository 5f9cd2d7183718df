"""Tests for meg_jax.env.wireless: hand-worked link budget, 3GPP values, J0 against SciPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from meg_jax.env import wireless as W


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
    rate = W.shannon_rate_bps(20e6, snr)
    assert float(rate) == pytest.approx(256.958e6, rel=1e-5)
    # Digital: 1e6 payload bits + 2e4 side bits -> 1.02e6 / 256.958e6 = 3.96951 ms.
    tx = W.transmission_time_s(1e6, 2e4, 20e6, snr, analog=False)
    assert float(tx) == pytest.approx(3.96951e-3, rel=1e-5)
    # ES 0.1 s + tx + UE 0.05 s = 0.153970 s; energy 0.2 J + 0.8 W * tx = 0.203176 J.
    latency, energy = W.request_costs(0.1, tx, 0.05, 0.2, 0.8)
    assert float(latency) == pytest.approx(0.1539695, rel=1e-6)
    assert float(energy) == pytest.approx(0.2031756, rel=1e-6)
    # Analog: 1e5 symbols / 2e7 Hz = 5 ms, plus 2e4 side bits at the Shannon rate
    # (0.0778 ms) = 5.07783 ms.
    tx_analog = W.transmission_time_s(1e5, 2e4, 20e6, snr, analog=True)
    assert float(tx_analog) == pytest.approx(5.07783e-3, rel=1e-5)


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
