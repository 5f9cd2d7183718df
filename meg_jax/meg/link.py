"""The ES -> UE wireless link that carries the (merged) latent features.

Two ways to send real-valued features, both pure and jittable with explicit keys:

* **digital** — uniform ``b``-bit quantisation of every feature over the sample's
  [min, max] range (the two float32 range ends travel as side information), sent
  error-free at the Shannon rate ``B log2(1 + SNR)`` (``meg_jax.meg.pricing``, with its SNR
  floor); the only distortion is quantisation.
* **analog** — the real features of a sample are paired into complex symbols
  (``x[2k] + j x[2k+1]``), normalised to unit average power (the float32 scale travels as
  side information), sent through AWGN or flat (block) Rayleigh fading at the given SNR and
  MMSE-equalised at the UE with perfect channel knowledge; one complex symbol per Hz·s, so
  ``S`` symbols take ``S / B`` seconds.

Side information (the range or scale, and the merge map of feature merging) is always sent
digitally at the Shannon rate; its bits are part of the payload and of the transmission time.

Facts used: ``R = B log2(1 + SNR)``; thermal noise −174 dBm/Hz; SNR = P_tx − PL − (N0 + 10
log10 B + NF) in dB (see ``/work/shared/reference/wireless.md``, 3GPP TR 38.901 for path loss).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from meg_jax.meg import pricing

__all__ = [
    "LinkConfig",
    "Payload",
    "FLOAT_BITS",
    "THERMAL_NOISE_DBM_PER_HZ",
    "snr_linear",
    "snr_db_from_path_loss",
    "payload",
    "transmission_time",
    "quantize",
    "dequantize",
    "transmit_digital",
    "transmit_analog",
    "transmit_features",
]

FLOAT_BITS = 32  # a float32 side-information value (range end or power scale)
THERMAL_NOISE_DBM_PER_HZ = -174.0  # kT at 290 K

_MODES = ("digital", "analog")
_FADING = ("awgn", "rayleigh")
_BITS = (4, 6, 8)


@dataclasses.dataclass(frozen=True)
class LinkConfig:
    """The downlink from the edge server to the user's device.

    Hashable, so it is a static argument of jitted functions; the SNR itself is dynamic.
    """

    mode: str = "analog"  # "digital" (quantise + Shannon rate) or "analog" (complex symbols)
    bandwidth_hz: float = 20e6  # B: symbols per second (analog) and the Shannon-rate bandwidth
    tx_power_dbm: float = 30.0  # ES transmit power, only used to turn path loss into SNR
    noise_figure_db: float = 7.0  # UE receiver noise figure (5–9 dB typical)
    bits: int = 8  # digital quantisation bits per feature, one of 4, 6, 8
    fading: str = "awgn"  # analog channel: "awgn" or "rayleigh" (flat, one draw per sample)
    # The Shannon rate is computed at max(SNR, this) (dB): the lowest MCS a real link falls
    # back to; the environment's ``snr_floor_db`` plays the same part.
    snr_floor_db: float = pricing.DEFAULT_SNR_FLOOR_DB

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"LinkConfig.mode={self.mode!r}; choose one of {_MODES}")
        if self.fading not in _FADING:
            raise ValueError(f"LinkConfig.fading={self.fading!r}; choose one of {_FADING}")
        if self.bits not in _BITS:
            raise ValueError(f"LinkConfig.bits={self.bits}; choose one of {_BITS}")
        if not self.bandwidth_hz > 0:
            raise ValueError(f"LinkConfig.bandwidth_hz={self.bandwidth_hz}; must be > 0 (Hz)")
        if math.isnan(self.snr_floor_db) or self.snr_floor_db == math.inf:
            raise ValueError(f"LinkConfig.snr_floor_db={self.snr_floor_db}; must be a number < inf (dB; -inf: no floor)")


@struct.dataclass
class Payload:
    """What one sample puts on the air.

    Attributes:
      data_bits: bits of the features themselves (digital mode; 0 in analog mode).
      data_symbols: complex channel uses of the features (analog mode; 0 in digital mode).
      side_bits: digitally sent side information (range/scale and the merge map), bits.
    """

    data_bits: jax.Array
    data_symbols: jax.Array
    side_bits: jax.Array

    @property
    def total_bits(self) -> jax.Array:
        """All digitally sent bits (features in digital mode plus side information)."""
        return self.data_bits + self.side_bits


def snr_linear(snr_db: jax.Array | float) -> jax.Array:
    """dB -> linear power ratio (``+inf`` dB gives ``inf``)."""
    return jnp.power(10.0, jnp.asarray(snr_db, jnp.float32) / 10.0)


def snr_db_from_path_loss(link: LinkConfig, path_loss_db: jax.Array | float) -> jax.Array:
    """Receive SNR in dB for a path loss (dB, including shadowing/fading gains as losses).

    ``SNR = P_tx − PL − (−174 dBm/Hz + 10 log10 B + NF)``; e.g. 30 dBm, 100 dB, 20 MHz,
    NF 7 dB: noise = −174 + 73.0 + 7 = −94.0 dBm, SNR = 30 − 100 + 94.0 = 24.0 dB.
    """
    noise_dbm = THERMAL_NOISE_DBM_PER_HZ + 10.0 * math.log10(link.bandwidth_hz) + link.noise_figure_db
    return link.tx_power_dbm - jnp.asarray(path_loss_db, jnp.float32) - noise_dbm


def payload(link: LinkConfig, num_values: int | jax.Array, map_bits: int | jax.Array = 0) -> Payload:
    """Payload of one sample that carries ``num_values`` real features.

    Digital: ``num_values · b`` data bits plus two float32 range ends (64 bits).
    Analog: ``ceil(num_values / 2)`` complex symbols plus one float32 power scale (32 bits).
    Both add ``map_bits`` (the feature-merging map) to the side information.

    Args:
      link: the link config (mode and bits are used).
      num_values: real features sent per sample, e.g. ``(h·w − r) · C``.
      map_bits: bits of the merge map (``tome.side_info_bits``), 0 without merging.
    """
    n = jnp.asarray(num_values, jnp.float32)
    map_bits = jnp.asarray(map_bits, jnp.float32)
    if link.mode == "digital":
        return Payload(
            data_bits=n * link.bits,
            data_symbols=jnp.zeros_like(n),
            side_bits=2.0 * FLOAT_BITS + map_bits,
        )
    return Payload(
        data_bits=jnp.zeros_like(n),
        data_symbols=jnp.ceil(n / 2.0),
        side_bits=FLOAT_BITS + map_bits,
    )


def transmission_time(link: LinkConfig, load: Payload, snr_db: jax.Array | float) -> jax.Array:
    """Seconds on the air (``meg_jax.meg.pricing.air_time_s`` at the link's SNR floor).

    Digital bits at the Shannon rate ``B log2(1 + max(SNR, floor))`` plus analog symbols at
    B symbols/s. Example: 8192 bits at 0 dB over 1 MHz: rate = 1e6 · log2(2) = 1e6 bit/s ->
    8.192 ms.
    """
    return pricing.air_time_s(load.total_bits, load.data_symbols, link.bandwidth_hz, snr_db, link.snr_floor_db)


# ----------------------------------------------------------------------------- digital


def quantize(x: jax.Array, bits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Uniform ``bits``-bit quantisation of each sample over its own [min, max] range.

    Args:
      x: ``[B, ...]`` real features.
      bits: bits per value.

    Returns:
      ``(codes [B, ...] int32 in [0, 2^bits − 1], lo [B], hi [B])``; ``lo``/``hi`` are the
      side information.
    """
    levels = 2**bits - 1
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(axis=1)
    hi = flat.max(axis=1)
    step = _step(lo, hi, levels)
    codes = jnp.round((flat - lo[:, None]) / step[:, None])
    codes = jnp.clip(codes, 0, levels).astype(jnp.int32)
    return codes.reshape(x.shape), lo, hi


def dequantize(codes: jax.Array, lo: jax.Array, hi: jax.Array, bits: int) -> jax.Array:
    """Inverse of :func:`quantize` up to the rounding: ``lo + code · (hi − lo)/(2^b − 1)``."""
    levels = 2**bits - 1
    step = _step(lo, hi, levels)
    shape = (-1,) + (1,) * (codes.ndim - 1)
    return lo.reshape(shape) + codes.astype(jnp.float32) * step.reshape(shape)


def _step(lo: jax.Array, hi: jax.Array, levels: int) -> jax.Array:
    # A constant sample has zero range; any positive step reproduces it exactly.
    return jnp.where(hi > lo, (hi - lo) / levels, 1.0)


def transmit_digital(x: jax.Array, bits: int) -> jax.Array:
    """Digital link output: quantise and dequantise (the bits arrive error-free)."""
    codes, lo, hi = quantize(x, bits)
    return dequantize(codes, lo, hi, bits).astype(x.dtype)


# ----------------------------------------------------------------------------- analog


def transmit_analog(
    x: jax.Array, snr_db: jax.Array | float, key: jax.Array, *, fading: str = "awgn"
) -> jax.Array:
    """Analog link output for real features ``x [B, ...]`` at ``snr_db`` (scalar or ``[B]``).

    Pairs the features of each sample into complex symbols, scales them to unit average
    power, passes ``y = h z + n`` with ``n ~ CN(0, 1/SNR)`` (``h = 1`` for AWGN, ``h ~
    CN(0, 1)`` once per sample for flat Rayleigh), equalises with the MMSE gain
    ``g = h* / (|h|² + 1/SNR)`` and undoes the scaling. The output is computed as
    ``x + error`` with ``error = (g h − 1) z + g n``, so a noiseless AWGN link returns ``x``
    bit for bit.
    """
    if fading not in _FADING:
        raise ValueError(f"fading={fading!r}; choose one of {_FADING}")
    batch = x.shape[0]
    flat = x.reshape(batch, -1).astype(jnp.float32)
    m = flat.shape[1]
    pad = m % 2
    if pad:
        flat_p = jnp.pad(flat, ((0, 0), (0, 1)))
    else:
        flat_p = flat
    pairs = flat_p.reshape(batch, -1, 2)
    num_symbols = pairs.shape[1]
    z = jax.lax.complex(pairs[..., 0], pairs[..., 1])  # [B, S] complex64
    power = jnp.sum(flat * flat, axis=1) / num_symbols  # mean |z|^2 per sample
    scale = jnp.sqrt(jnp.where(power > 0, power, 1.0))  # side information
    z = z / scale[:, None]

    noise_var = 1.0 / jnp.broadcast_to(snr_linear(snr_db), (batch,))  # [B], 0 at +inf dB
    k_h, k_n = jax.random.split(key)
    if fading == "rayleigh":
        hr = jax.random.normal(k_h, (batch, 2)) / jnp.sqrt(2.0)
        h = jax.lax.complex(hr[:, 0], hr[:, 1])
    else:
        h = jnp.ones((batch,), jnp.complex64)
    nr = jax.random.normal(k_n, (batch, num_symbols, 2)) * jnp.sqrt(noise_var / 2.0)[:, None, None]
    n = jax.lax.complex(nr[..., 0], nr[..., 1])
    g = jnp.conj(h) / (jnp.abs(h) ** 2 + noise_var)  # MMSE equaliser, [B]
    err = (g * h - 1.0)[:, None] * z + g[:, None] * n  # equalised minus sent, [B, S]
    err = err * scale[:, None]
    err_real = jnp.stack([err.real, err.imag], axis=-1).reshape(batch, -1)[:, :m]
    return (flat + err_real).reshape(x.shape).astype(x.dtype)


def transmit_features(
    x: jax.Array, link: LinkConfig, snr_db: jax.Array | float, key: jax.Array
) -> jax.Array:
    """What the UE receives for features ``x [B, ...]`` over ``link`` at ``snr_db``.

    Digital mode ignores the SNR and the key (error-free at the Shannon rate; the SNR only
    sets the transmission time). ``link`` is static under ``jit``.
    """
    if link.mode == "digital":
        return transmit_digital(x, link.bits)
    return transmit_analog(x, snr_db, key, fading=link.fading)
