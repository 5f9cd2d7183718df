"""How a request is priced on the link: the one Shannon-rate and air-time formula.

Every consumer prices with these functions: the environment (``meg_jax.env.meg_env``), the
cost model behind ``pipeline.generate`` and the conventional schemes (``meg_jax.meg.costs``
via ``meg_jax.meg.link``), the scheme tables (``meg_jax.meg.schemes.price``) and the
evaluation. The NumPy re-implementation in ``meg_jax.env.numpy_reference`` is the test
oracle, not a consumer.

This module imports ``jax.numpy`` only (no Flax, no model), so the environment may import it
as it imports ``meg_jax.meg.artifact``: it is the executable half of the artifact's pricing
contract (see that module's docstring).

Formulas (``/work/shared/reference/wireless.md``; Shannon 1948)::

    rate     = B log2(1 + 10^(max(SNR, SNR_floor) / 10))                       (bit/s)
    air time = bits / rate + symbols / B              (analog: one complex symbol per Hz·s)
    latency  = ES compute + air time + UE compute                                  (s)
    energy   = UE compute energy + UE receive power x air time                     (J)

The SNR floor stands for the lowest modulation and coding scheme a real link falls back to:
below it the link does not get slower (and a deep fade does not give an unbounded air time).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

__all__ = [
    "DEFAULT_SNR_FLOOR_DB",
    "LINK_MODES",
    "shannon_rate_bps",
    "air_time_s",
    "artifact_air_time_s",
    "request_costs",
]

DEFAULT_SNR_FLOOR_DB = -10.0  # dB; the environment's ``MEGEnvConfig.snr_floor_db`` default too
LINK_MODES = ("digital", "analog", "none")  # the artifact's ``link_mode`` values

ArrayLike = Array | float


def shannon_rate_bps(bandwidth_hz: ArrayLike, snr_db: ArrayLike, snr_floor_db: ArrayLike = DEFAULT_SNR_FLOOR_DB) -> Array:
    """Shannon rate ``B log2(1 + SNR)`` in bit/s at ``max(snr_db, snr_floor_db)``.

    Example: B = 1 MHz, SNR = 0 dB -> 1e6 · log2(2) = 1 Mbit/s; SNR = -30 dB with the
    default floor -10 dB -> 1e6 · log2(1.1) = 137.5 kbit/s.

    Args:
      bandwidth_hz: B (Hz), any shape broadcasting with the SNR.
      snr_db: receive SNR (dB), any shape; ``+inf`` gives an infinite rate.
      snr_floor_db: the rate floor (dB); ``-inf`` disables it.
    """
    snr = jnp.maximum(jnp.asarray(snr_db, jnp.float32), jnp.asarray(snr_floor_db, jnp.float32))
    return bandwidth_hz * jnp.log2(1.0 + jnp.power(10.0, snr / 10.0))


def air_time_s(
    bits: ArrayLike,
    symbols: ArrayLike,
    bandwidth_hz: ArrayLike,
    snr_db: ArrayLike,
    snr_floor_db: ArrayLike = DEFAULT_SNR_FLOOR_DB,
) -> Array:
    """Seconds on the air: digital ``bits`` at the Shannon rate plus analog ``symbols`` at B/s.

    Example: 8192 bits at 0 dB over 1 MHz -> 8192 / 1e6 = 8.192 ms; plus 1000 analog
    symbols -> + 1000 / 1e6 = 1 ms.

    Args:
      bits: digitally sent bits (features of a digital link, side information), any shape.
      symbols: analog complex channel uses (0 for a digital link).
      bandwidth_hz: B (Hz).
      snr_db: receive SNR (dB).
      snr_floor_db: the rate floor (dB), see :func:`shannon_rate_bps`.
    """
    return bits / shannon_rate_bps(bandwidth_hz, snr_db, snr_floor_db) + symbols / bandwidth_hz


def artifact_air_time_s(
    payload: ArrayLike,
    side_info_bits: ArrayLike,
    bandwidth_hz: ArrayLike,
    snr_db: ArrayLike,
    snr_floor_db: ArrayLike,
    link_mode: str,
) -> Array:
    """:func:`air_time_s` of a payload stored as a calibration artifact stores it.

    The artifact's ``payload`` is bits for a ``"digital"`` link and complex symbols for an
    ``"analog"`` one; ``side_info_bits`` always go digitally; ``"none"`` sends nothing.

    Args:
      payload, side_info_bits: as in ``meg_jax.meg.artifact`` (any shapes that broadcast).
      bandwidth_hz, snr_db, snr_floor_db: as in :func:`air_time_s`.
      link_mode: ``"digital"``, ``"analog"`` or ``"none"`` (static).
    """
    if link_mode == "digital":
        return air_time_s(payload + side_info_bits, 0.0, bandwidth_hz, snr_db, snr_floor_db)
    if link_mode == "analog":
        return air_time_s(side_info_bits, payload, bandwidth_hz, snr_db, snr_floor_db)
    if link_mode == "none":
        shape = jnp.broadcast_shapes(jnp.shape(payload), jnp.shape(side_info_bits), jnp.shape(snr_db))
        return jnp.zeros(shape, jnp.float32)
    raise ValueError(f"link_mode={link_mode!r}; choose one of {LINK_MODES}")


def request_costs(
    es_time_s: ArrayLike,
    air_time: ArrayLike,
    ue_time_s: ArrayLike,
    ue_compute_energy_j: ArrayLike,
    ue_receive_power_w: ArrayLike,
) -> tuple[Array, Array]:
    """Latency (s) and UE energy (J) of one request; the stages run one after another.

    ``latency = es_time_s + air_time + ue_time_s``;
    ``energy = ue_compute_energy_j + ue_receive_power_w · air_time``.
    """
    latency = es_time_s + air_time + ue_time_s
    energy = ue_compute_energy_j + ue_receive_power_w * air_time
    return jnp.asarray(latency), jnp.asarray(energy)
