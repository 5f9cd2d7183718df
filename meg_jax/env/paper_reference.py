"""The paper's environment written out in NumPy from the authors' formulas (a test oracle).

A transcription of how the authors' environment prices one request (their
``MEGEnv_multiconstraints``; restated in ``shared/reference/paper_system.md`` and
``docs/paper_preset.md``), in their units and with their hard-coded SDXL-1024 sizes, kept
apart from the JAX code it checks (``meg_jax.env.meg_env.price_action_paper``): it reads no
``EnvParams`` and imports nothing from the environment. Per request, with the action already
in their space ``u`` in [0, 1]² and the request's distance ``d`` (m)::

    K        = int(8 u0) + 4                        (K = 12 only at u0 = 1)
    merged   = min(int(u1 · 128·128/4), src)        (src = 4096 - 32·32 destination tokens)
    kept     = (4096 - merged) · 16                 (values of the merged latent)
    bits     = (kept + (4·128·128 - kept) / 16) · 16          (fp16; the map: 1/16 per removed value)
    g        = P · 10^(-(35.3 + 37.6 log10 d) / 10) / N0      (P = 1 W, N0 = -94 dBm, linear)
    rate     = B log2(1 + g)       (B in MHz: Mbit/s);   air = bits / 10^6 / rate   (s)
    ES TFLOP = unet/step · K + text;   UE TFLOP = vae
    latency  = air + ES TFLOP · c + UE TFLOP · c / 0.5 + base delay                   (s)
    energy   = (ES TFLOP · e + UE TFLOP · e / 0.8 + P · air + bias) / 10     (their "kJ")

with c the ES seconds per TFLOP, e its hJ per TFLOP and the bias in hJ. Their observation
is (g now, previous latency, previous energy), zeros before the first request.

The authors fitted c, e, the base delay and the bias on their GPU and did not publish the
fit; :func:`authors_constants` assembles the same dictionary from this project's numbers
(FLOP counts, ES device profile, the ``PaperSystem`` constants), each in the authors' unit.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["authors_constants", "gain_to_noise", "price", "observation", "action_to_k_r"]

LATENT_VALUES = 4 * 128 * 128  # their ori_latent_size: the SDXL-1024 latent
PATCH_TOKENS = 128 * 128 // 4  # their n_dim: 2 x 2 patches of 4 channels, 16 values each
DST_TOKENS = (64 // 2) * (64 // 2)  # one destination per 2 x 2 cell of the 64 x 64 token grid
TOKEN_VALUES = 16


def authors_constants(
    *, unet_flops: float, unet_evals_per_step: int, text_flops: float, vae_flops: float,
    es_effective_flops: float, es_energy_per_flop_j: float, base_delay_s: float, bias_energy_hj: float,
    pmax_dbm: float = 30.0, noise_dbm: float = -94.0, bandwidth_mhz: float = 1.0,
    radius_m: tuple[float, float] = (200.0, 300.0), ue_computing_ratio: float = 0.5, ue_energy_ratio: float = 0.8,
) -> dict[str, float]:
    """Their parameter dictionary (TFLOP, s/TFLOP, hJ/TFLOP, s, hJ, W, MHz, m).

    Args:
      unet_flops: one UNet forward (FLOP); ``unet_evals_per_step`` forwards per step.
      text_flops, vae_flops: text encoder and VAE decoder (FLOP).
      es_effective_flops: sustained ES throughput (FLOP/s).
      es_energy_per_flop_j: ES energy per FLOP (J).
      base_delay_s, bias_energy_hj: their fitted intercepts.
    """
    ce = 1e12 / es_effective_flops  # s / TFLOP
    ee = es_energy_per_flop_j * 1e12 / 100.0  # J -> hJ per TFLOP
    return {
        "flops_unets_single_step": unet_flops * unet_evals_per_step / 1e12,
        "flops_text_encoder": text_flops / 1e12,
        "flops_vae": vae_flops / 1e12,
        "computing_efficiency": ce,
        "basic_delay": base_delay_s,
        "energy_efficiency": ee,
        "bias_energy": bias_energy_hj,
        "UE_computing_efficiency": ce / ue_computing_ratio,
        "UE_energy_efficiency": ee / ue_energy_ratio,
        "Pmax": 10.0 ** (pmax_dbm / 10.0) / 1e3,
        "N0": 10.0 ** (noise_dbm / 10.0) / 1e3,
        "bandwidth": bandwidth_mhz,
        "radius_min": radius_m[0],
        "radius_max": radius_m[1],
    }


def gain_to_noise(c: Mapping[str, float], distance_m: np.ndarray) -> np.ndarray:
    """Linear channel-gain-to-noise ratio P · 10^(-PL/10) / N0 at ``distance_m`` [N]."""
    path_loss_db = -(35.3 + 37.6 * np.log10(np.asarray(distance_m, np.float64)))
    return c["Pmax"] * 10.0 ** (path_loss_db / 10.0) / c["N0"]


def action_to_k_r(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Their action u in [0, 1]² [N, 2] -> (K [N] int, merge ratio [N])."""
    u = np.clip(np.asarray(u, np.float64), 0.0, 1.0)
    return (8.0 * u[:, 0]).astype(np.int64) + 4, u[:, 1]


def price(c: Mapping[str, float], distance_m: np.ndarray, steps: np.ndarray, ratio: np.ndarray) -> dict[str, np.ndarray]:
    """Every cost term of requests at ``distance_m`` served with ``steps`` K and merge ``ratio`` [N].

    Returns a dict of [N] float64 arrays: ``bits``, ``gain_to_noise``, ``rate_mbps``, ``air_s``,
    ``es_s``, ``ue_s``, ``latency_s``, ``es_hj``, ``ue_hj``, ``tx_energy`` (P · air, W·s),
    ``energy`` (their unit).
    """
    ratio = np.asarray(ratio, np.float64)
    num_pruned = np.where(ratio > 0.0, np.floor(ratio * PATCH_TOKENS), 0.0)
    merged = np.minimum(num_pruned, PATCH_TOKENS - DST_TOKENS)  # cannot merge more than the src tokens
    kept = (PATCH_TOKENS - merged) * TOKEN_VALUES
    bits = (kept + (LATENT_VALUES - kept) / 16.0) * 16.0
    g = gain_to_noise(c, distance_m)
    rate = c["bandwidth"] * np.log2(1.0 + g)
    air = bits / 1e6 / rate
    es_tflop = c["flops_unets_single_step"] * np.asarray(steps, np.float64) + c["flops_text_encoder"]
    ue_tflop = c["flops_vae"]
    es_s, ue_s = es_tflop * c["computing_efficiency"], ue_tflop * c["UE_computing_efficiency"]
    es_hj, ue_hj = es_tflop * c["energy_efficiency"], ue_tflop * c["UE_energy_efficiency"]
    tx = c["Pmax"] * air
    return {
        "bits": bits, "gain_to_noise": g, "rate_mbps": rate, "air_s": air, "es_s": es_s, "ue_s": np.full_like(air, ue_s),
        "latency_s": air + es_s + ue_s + c["basic_delay"], "es_hj": es_hj, "ue_hj": np.full_like(air, ue_hj),
        "tx_energy": tx, "energy": (es_hj + ue_hj + tx + c["bias_energy"]) / 10.0,
    }


def observation(c: Mapping[str, float], distance_m: np.ndarray, previous: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """Their observation [N, 3]: (g at ``distance_m``, previous latency, previous energy)."""
    g = gain_to_noise(c, distance_m)
    if previous is None:
        return np.stack([g, np.zeros_like(g), np.zeros_like(g)], axis=-1)
    return np.stack([g, previous["latency_s"], previous["energy"]], axis=-1)

