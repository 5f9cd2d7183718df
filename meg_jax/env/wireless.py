"""Wireless channel and link models of the MEG environment, as pure JAX functions.

Every function is elementwise over arrays (vmap-free broadcasting), float32-safe and
jit-friendly; the environment (``meg_env.py``) composes them, the NumPy reference
(``numpy_reference.py``) re-implements them independently. What the SNR costs in air time
(Shannon rate with its floor, air time, latency and energy) is priced by
``meg_jax.meg.pricing``, the one formula the environment and the MEG system share. Sources: 3GPP TR 38.901
v17 Table 7.4.1-1 (path loss), Table 7.4.2-1 (LOS probability), Table 7.5-6 (shadowing);
Gudmundson, Electronics Letters 27(23), 1991 (shadowing correlation over distance);
Jakes / Clarke (fading autocorrelation J0(2π f_d Δt)); Abramowitz & Stegun 9.4.1 and
9.4.3 (polynomial approximations of J0). Facts collected in ``shared/reference/wireless.md``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

__all__ = [
    "SPEED_OF_LIGHT",
    "SCENARIOS",
    "bessel_j0",
    "doppler_hz",
    "fading_correlation",
    "gudmundson_correlation",
    "los_probability",
    "path_loss_db",
    "thermal_noise_dbm",
    "snr_db",
]

SPEED_OF_LIGHT = 299_792_458.0  # m/s
SCENARIOS = ("umi", "uma")  # 3GPP TR 38.901 urban micro (street canyon) / urban macro


def bessel_j0(x: Array) -> Array:
    """Bessel function of the first kind, order 0 (absolute error < 1e-7 in float64).

    ``jax.scipy.special`` has no ``j0``; this is Abramowitz & Stegun 9.4.1 for |x| <= 3
    and the asymptotic form 9.4.3, J0(x) = f0 cos(θ0) / sqrt(x), beyond.

    Args:
      x: any shape, real.
    Returns:
      J0(x), same shape.
    """
    x = jnp.abs(jnp.asarray(x, dtype=jnp.result_type(float)))
    y = (x / 3.0) ** 2
    small = 1.0 + y * (
        -2.2499997 + y * (1.2656208 + y * (-0.3163866 + y * (0.0444479 + y * (-0.0039444 + y * 0.0002100))))
    )
    xl = jnp.maximum(x, 3.0)  # keeps the unused branch finite at x < 3
    z = 3.0 / xl
    f0 = 0.79788456 + z * (
        -0.00000077 + z * (-0.00552740 + z * (-0.00009512 + z * (0.00137237 + z * (-0.00072805 + z * 0.00014476))))
    )
    theta0 = xl - 0.78539816 + z * (
        -0.04166397 + z * (-0.00003954 + z * (0.00262573 + z * (-0.00054125 + z * (-0.00029333 + z * 0.00013558))))
    )
    large = f0 * jnp.cos(theta0) / jnp.sqrt(xl)
    return jnp.where(x <= 3.0, small, large)


def doppler_hz(speed_mps: Array, carrier_hz: Array) -> Array:
    """Maximum Doppler shift f_d = v f_c / c (Hz)."""
    return speed_mps * carrier_hz / SPEED_OF_LIGHT


def fading_correlation(speed_mps: Array, carrier_hz: Array, interval_s: Array) -> Array:
    """Gauss–Markov coefficient ρ = J0(2π f_d Δt) of Rayleigh fading over ``interval_s``.

    Example: 3.5 GHz, 3 m/s, 1 ms -> f_d = 35.0 Hz, ρ = J0(0.220) = 0.988.
    """
    return bessel_j0(2.0 * jnp.pi * doppler_hz(speed_mps, carrier_hz) * interval_s)


def gudmundson_correlation(distance_moved_m: Array, decorrelation_m: Array) -> Array:
    """Correlation exp(-Δd / d_corr) of log-normal shadowing after moving Δd metres."""
    return jnp.exp(-distance_moved_m / decorrelation_m)


def los_probability(d2d_m: Array, ue_height_m: Array, scenario: str) -> Array:
    """3GPP TR 38.901 Table 7.4.2-1 line-of-sight probability at 2-D distance ``d2d_m``.

    UMi: 1 for d <= 18 m, else 18/d + exp(-d/36)(1 - 18/d).
    UMa: 1 for d <= 18 m, else [18/d + exp(-d/63)(1 - 18/d)](1 + C'(h_UT) 5/4 (d/100)^3
    exp(-d/150)), C' = 0 for h_UT <= 13 m and ((h_UT - 13)/10)^1.5 up to 23 m.
    """
    d = jnp.maximum(d2d_m, 18.0)
    if scenario == "umi":
        p = 18.0 / d + jnp.exp(-d / 36.0) * (1.0 - 18.0 / d)
    elif scenario == "uma":
        c_prime = jnp.where(ue_height_m <= 13.0, 0.0, ((jnp.clip(ue_height_m, 13.0, 23.0) - 13.0) / 10.0) ** 1.5)
        p = (18.0 / d + jnp.exp(-d / 63.0) * (1.0 - 18.0 / d)) * (
            1.0 + c_prime * 1.25 * (d / 100.0) ** 3 * jnp.exp(-d / 150.0)
        )
    else:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    return jnp.where(d2d_m <= 18.0, 1.0, jnp.minimum(p, 1.0))


def path_loss_db(
    d2d_m: Array, los: Array, carrier_hz: Array, bs_height_m: Array, ue_height_m: Array, scenario: str
) -> Array:
    """3GPP TR 38.901 Table 7.4.1-1 path loss (dB), LOS or NLOS, without shadowing.

    UMi street canyon, f_c in GHz, d3D = sqrt(d2D² + (h_BS - h_UT)²), breakpoint
    d'_BP = 4 (h_BS - 1)(h_UT - 1) f_c / c:
      LOS  = 32.4 + 21 log10 d3D + 20 log10 f_c                          (d2D <= d'_BP)
           = 32.4 + 40 log10 d3D + 20 log10 f_c - 9.5 log10(d'_BP² + (h_BS - h_UT)²)
      NLOS = max(LOS, 35.3 log10 d3D + 22.4 + 21.3 log10 f_c - 0.3 (h_UT - 1.5))
    UMa: 28 + 22 log10 d3D + 20 log10 f_c, beyond d'_BP 28 + 40 log10 d3D + 20 log10 f_c
    - 9 log10(d'_BP² + (h_BS - h_UT)²); NLOS max(LOS, 13.54 + 39.08 log10 d3D + 20 log10
    f_c - 0.6 (h_UT - 1.5)).
    Worked values (3.5 GHz, h_UT 1.5 m, UMi h_BS 10 m): 85.3 / 104.6 dB at 100 m LOS / NLOS,
    91.6 / 115.2 dB at 200 m.

    Args:
      d2d_m: horizontal BS-UE distance (m), any shape; callers clamp it to >= 10 m.
      los: 1.0 where line of sight, 0.0 otherwise (broadcasts with ``d2d_m``).
      carrier_hz, bs_height_m, ue_height_m: scalars or broadcastable arrays.
      scenario: "umi" or "uma" (static).
    """
    fc_ghz = carrier_hz / 1e9
    dh = bs_height_m - ue_height_m
    d3d = jnp.sqrt(d2d_m**2 + dh**2)
    log_d = jnp.log10(d3d)
    log_fc = jnp.log10(fc_ghz)
    breakpoint_m = 4.0 * (bs_height_m - 1.0) * (ue_height_m - 1.0) * carrier_hz / SPEED_OF_LIGHT
    log_bp = jnp.log10(breakpoint_m**2 + dh**2)
    if scenario == "umi":
        pl1 = 32.4 + 21.0 * log_d + 20.0 * log_fc
        pl2 = 32.4 + 40.0 * log_d + 20.0 * log_fc - 9.5 * log_bp
        nlos = 35.3 * log_d + 22.4 + 21.3 * log_fc - 0.3 * (ue_height_m - 1.5)
    elif scenario == "uma":
        pl1 = 28.0 + 22.0 * log_d + 20.0 * log_fc
        pl2 = 28.0 + 40.0 * log_d + 20.0 * log_fc - 9.0 * log_bp
        nlos = 13.54 + 39.08 * log_d + 20.0 * log_fc - 0.6 * (ue_height_m - 1.5)
    else:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    pl_los = jnp.where(d2d_m <= breakpoint_m, pl1, pl2)
    return jnp.where(los > 0.5, pl_los, jnp.maximum(pl_los, nlos))


def thermal_noise_dbm(bandwidth_hz: Array, noise_figure_db: Array, noise_psd_dbm_hz: Array = -174.0) -> Array:
    """Receiver noise power N0 B NF in dBm: -174 dBm/Hz + 10 log10 B + NF.

    Example: 20 MHz, NF 7 dB -> -174 + 73.01 + 7 = -93.99 dBm.
    """
    return noise_psd_dbm_hz + 10.0 * jnp.log10(bandwidth_hz) + noise_figure_db


def snr_db(tx_power_dbm: Array, path_loss_db_: Array, shadowing_db: Array, fading_power: Array, noise_dbm: Array) -> Array:
    """SNR = P |h|² 10^(-(PL + shadowing)/10) / (N0 B NF), in dB.

    Args:
      tx_power_dbm: transmit power (dBm).
      path_loss_db_: path loss (dB).
      shadowing_db: log-normal shadowing (dB, positive = extra loss).
      fading_power: |h|² of the small-scale fading (linear, mean 1).
      noise_dbm: receiver noise power (dBm), see :func:`thermal_noise_dbm`.
    """
    return tx_power_dbm - path_loss_db_ - shadowing_db + 10.0 * jnp.log10(fading_power) - noise_dbm
