"""A small synthetic calibration artifact, **for tests only** (re-exported by ``meg_jax.meg.artifact``).

Imports numpy only (besides the artifact module), like :mod:`meg_jax.meg.artifact`.
"""

from __future__ import annotations

import datetime

import numpy as np

from meg_jax.meg.artifact import LINK_MODES, CalibrationArtifact, ConventionalScheme

__all__ = ["synthetic_artifact"]


def synthetic_artifact(
    *,
    link_mode: str = "analog",
    steps: tuple[int, ...] = (1, 2, 4, 8),
    merge_ratios: tuple[float, ...] = tuple(np.round(np.arange(8) * 0.1, 1)),
    snr_db: tuple[float, ...] = tuple(np.linspace(-5.0, 30.0, 11)),
    task_classes: tuple[str, ...] = ("circle", "square", "triangle", "star"),
    bandwidth_hz: float = 1e6,
    bits_per_value: int = 8,
    prompts_per_class: int = 0,
) -> CalibrationArtifact:
    """A small, plausible artifact **for tests only** (never a default of anything).

    Quality rises with K and SNR (analog) and falls with r. The latent has 64x64 tokens x 4
    channels; the link has 1 MHz, 10 dBm transmit power and a 7 dB noise figure; ES compute
    is 10 ms + 25 ms per step; UE decode 30 ms and 10 mJ; receive power 1 W. Deterministic.

    Args:
      link_mode: "analog" (quality depends on SNR; payload in complex symbols) or
        "digital" (quality flat in SNR; payload in bits at ``bits_per_value``).
      steps, merge_ratios, snr_db, task_classes: the grids.
      bandwidth_hz: link bandwidth (Hz).
      bits_per_value: quantiser bits for the digital link.
      prompts_per_class: P > 0 adds per-prompt tables (and a pixel-reading table): prompt p of
        a class sits a fixed offset above or below the class mean (offsets zero-mean over p,
        their order shuffled per class and K), so the class tables are exactly their means.
    """
    if link_mode not in LINK_MODES:
        raise ValueError(f"link_mode must be one of {LINK_MODES}, got {link_mode!r}")
    k = np.asarray(steps, dtype=np.int64)
    r = np.asarray(merge_ratios, dtype=np.float64)
    s = np.asarray(snr_db, dtype=np.float64)
    n_classes = len(task_classes)
    kk, rr, ss, cc = np.meshgrid(k, r, s, np.arange(n_classes), indexing="ij")
    difficulty = 1.0 - 0.08 * cc  # later classes are harder
    chance = 1.0 / n_classes
    step_quality = 1.0 - np.exp(-kk / 2.5)  # saturates around K = 8
    merge_keep = 1.0 - 0.45 * rr**2
    if link_mode == "analog":
        link_quality = 1.0 / (1.0 + np.exp(-(ss - 4.0) / 3.0))  # logistic in SNR (dB)
    else:
        link_quality = np.ones_like(ss)  # error-free at the Shannon rate
    accuracy = chance + (0.97 - chance) * difficulty * step_quality * merge_keep * (0.35 + 0.65 * link_quality)
    psnr = 9.0 + 14.0 * step_quality * difficulty + 7.0 * link_quality - 8.0 * rr**2
    per_prompt: dict[str, np.ndarray] = {}
    if prompts_per_class > 0:
        u = (np.arange(prompts_per_class) + 0.5) / prompts_per_class - 0.5  # zero mean, |u| < 1/2
        rng = np.random.default_rng(0)
        # [K, 1, 1, C, P]: each (K, class) orders its prompts differently
        order = np.stack([np.stack([rng.permutation(u) for _ in range(n_classes)]) for _ in k])[:, None, None]
        spread = np.minimum(accuracy, 1.0 - accuracy)[..., None]  # keeps every prompt in [0, 1]
        per_prompt["prompt_accuracy"] = (accuracy[..., None] + order * spread).astype(np.float32)
        per_prompt["prompt_psnr"] = (psnr[..., None] + 6.0 * order).astype(np.float32)
        per_prompt["prompt_pixel_accuracy"] = (0.9 * per_prompt["prompt_accuracy"]).astype(np.float32)
        accuracy = per_prompt["prompt_accuracy"].astype(np.float64).mean(-1)
        psnr = per_prompt["prompt_psnr"].astype(np.float64).mean(-1)
        per_prompt["pixel_accuracy"] = per_prompt["prompt_pixel_accuracy"].astype(np.float64).mean(-1)
    tokens, channels = 64 * 64, 4
    kept_values = (1.0 - r) * tokens * channels
    payload = kept_values / 2.0 if link_mode == "analog" else kept_values * bits_per_value
    side_info_bits = 2.0 * r * tokens + 32.0  # local-window merge map (2 bit/merged token) + scale
    flat = np.ones((len(s), n_classes))
    conventional = {
        "mec_uncompressed": ConventionalScheme(
            link_mode=link_mode,
            es_compute_time_s=0.01 + 0.025 * 50,
            payload=float(payload[0]),
            side_info_bits=32.0,
            ue_compute_time_s=0.03,
            ue_compute_energy_j=0.01,
            accuracy=0.97 * flat,
            psnr=30.0 * flat,
        ),
        "on_device": ConventionalScheme(
            link_mode="none",
            es_compute_time_s=0.0,
            payload=0.0,
            side_info_bits=0.0,
            ue_compute_time_s=2.5,
            ue_compute_energy_j=1.5,
            accuracy=0.97 * flat,
            psnr=30.0 * flat,
        ),
    }
    return CalibrationArtifact(
        steps=k,
        merge_ratios=r,
        snr_db=s,
        task_classes=tuple(task_classes),
        accuracy=accuracy,
        psnr=psnr,
        num_samples=np.full(accuracy.shape, prompts_per_class or 128, dtype=np.int64),
        es_compute_time_s=0.01 + 0.025 * k,
        payload=payload,
        side_info_bits=side_info_bits,
        ue_compute_time_s=0.03 + 0.005 * r,
        ue_compute_energy_j=0.01 + 0.002 * r,
        ue_receive_power_w=1.0,
        bandwidth_hz=float(bandwidth_hz),
        link_mode=link_mode,
        bits_per_value=int(bits_per_value) if link_mode == "digital" else None,
        tx_power_dbm=10.0,
        noise_figure_db=7.0,
        provenance={
            "backbone_checkpoint_hash": "synthetic",
            "backbone_preset": "synthetic",
            "cost_preset": "synthetic",
            "created": datetime.date(2025, 1, 1).isoformat(),
            "command": "meg_jax.meg.artifact.synthetic_artifact()",
            "note": "for tests only",
        },
        conventional_schemes=conventional,
        **per_prompt,
    ).validate()
