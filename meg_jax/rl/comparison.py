"""The MEG system against the conventional generation schemes, at matched quality.

Scored on a ``meg_jax.rl.evaluate.Rollout``'s requests (true SNR and task class of every
request, and the quality and costs of every grid action there): the conventional schemes of
the calibration artifact (centralised, MEG without compression, on-device) priced exactly as
the environment prices an action; the minimum-latency MEG frontier with perfect channel
knowledge; the lowest latency MEG reaches at a scheme's quality; and the learned policies'
reductions against each scheme. Units: latency in seconds, UE energy in joules, SNR in dB,
quality in reward units.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from meg_jax.meg import pricing
from meg_jax.rl.baselines import pick_action, fixed_policies, reference_policies
from meg_jax.rl.evaluate import Rollout, summarise

__all__ = [
    "conventional_schemes",
    "SCHEME_LABELS",
    "meg_frontier",
    "matched_quality_meg",
    "QUALITY_TOLERANCE",
    "scheme_comparison",
    "paper_conventional_schemes",
]


def conventional_schemes(artifact: Any, params: Any, snr_db: np.ndarray, task_class: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per-request quality, latency and UE energy of the artifact's conventional schemes.

    Priced by the environment's own pricing functions (``meg_jax.meg.pricing``): Shannon
    rate at max(SNR, floor); ``digital`` sends payload + side bits at that rate, ``analog``
    one symbol per Hz·s plus the side bits at that rate, ``none`` sends nothing. Quality is
    the scheme's calibrated accuracy/PSNR at the (clamped) SNR, mixed like the reward (the
    schemes carry the classifier's accuracy only: under ``reward_metric="pixel_accuracy"`` they
    are scored by it). Energy follows the env's ``energy_scope``.

    Args:
      artifact: the ``CalibrationArtifact`` of the environment.
      params: the environment's ``EnvParams`` (bandwidth, SNR floor, reward mix).
      snr_db, task_class: requests, any equal shapes.

    Returns:
      scheme name -> {"quality", "latency_s", "energy_j"} arrays of the requests' shape.
    """
    if params.system == "paper":
        return paper_conventional_schemes(artifact, params, snr_db, task_class)
    snr = np.asarray(snr_db, np.float64)
    cls = np.asarray(task_class, np.int64)
    bandwidth = float(params.bandwidth_hz)
    floor = float(params.snr_floor_db)
    grid = np.asarray(artifact.snr_db, np.float64)
    w = float(params.reward_psnr_weight)
    scale = float(params.psnr_scale_db)
    offset = float(params.reward_offset)
    out = {}
    for name, s in artifact.conventional_schemes.items():
        t_tx = np.asarray(pricing.artifact_air_time_s(s.payload, s.side_info_bits, bandwidth, snr, floor, s.link_mode),
                          np.float64)
        latency, energy = pricing.request_costs(s.es_compute_time_s, t_tx, s.ue_compute_time_s,
                                                s.ue_compute_energy_j, artifact.ue_receive_power_w)
        energy = np.asarray(energy, np.float64)
        if params.energy_scope == "system":  # as the env prices MEG: + ES compute + radiated energy
            energy = (energy + float(params.es_power_w) * s.es_compute_time_s
                      + 10.0 ** (float(params.tx_power_dbm) / 10.0 - 3.0) * t_tx)
        out[name] = {"quality": _scheme_quality(s, grid, snr, cls, w, scale) + offset,
                     "latency_s": np.asarray(latency, np.float64), "energy_j": energy}
    return out


def _scheme_quality(s: Any, grid: np.ndarray, snr: np.ndarray, cls: np.ndarray, w: float, scale: float) -> np.ndarray:
    """A scheme's reward at (clamped) ``snr`` and ``cls``, mixed like the environment's."""
    clamped = np.clip(snr, grid[0], grid[-1])
    acc = np.stack([np.interp(clamped, grid, s.accuracy[:, c]) for c in range(s.accuracy.shape[1])], -1)
    psnr = np.stack([np.interp(clamped, grid, s.psnr[:, c]) for c in range(s.psnr.shape[1])], -1)
    acc = np.take_along_axis(acc, cls[..., None], -1)[..., 0]
    psnr = np.take_along_axis(psnr, cls[..., None], -1)[..., 0]
    return (1.0 - w) * acc + w * psnr / scale


def paper_conventional_schemes(artifact: Any, params: Any, snr_db: np.ndarray, task_class: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """The conventional schemes priced by the paper's formulas (``system == "paper"``).

    With the full-step teacher (``paper.teacher_steps`` guided steps) and the paper's
    constants: **centralised** — the ES runs text encoder, teacher and VAE decoder and sends
    the artifact's image file (its bits) at B log2(1 + g); **MEG uncompressed** — the ES runs
    the teacher, the whole fp16 latent goes (r = 0), the UE decodes; **on-device** — the UE
    runs everything at its seconds/hJ per TFLOP, nothing is sent. Latency adds the base
    delay, energy is (ES hJ + UE hJ + P_tx air + bias) / 10 as for an MEG action. Quality is
    the artifact's, at the feature-noise SNR (``paper.quality_snr_db``) like MEG's.
    """
    pp = _host_floats(params.paper)
    snr = np.asarray(snr_db, np.float64)
    cls = np.asarray(task_class, np.int64)
    rate = pp["bandwidth_hz"] * np.log2(1.0 + 10.0 ** (snr / 10.0))
    teacher = pp["teacher_steps"] * pp["unet_tflop_per_step"] + pp["text_tflop"]
    latent_bits = pp["latent_values"] * pp["value_bits"]
    image_bits = float(artifact.conventional_schemes["centralised"].payload
                       + artifact.conventional_schemes["centralised"].side_info_bits)
    # name -> (ES TFLOP, UE TFLOP, bits on the air)
    work = {
        "centralised": (teacher + pp["vae_tflop"], 0.0, image_bits),
        "meg_uncompressed": (teacher, pp["vae_tflop"], latent_bits),
        "on_device": (0.0, teacher + pp["vae_tflop"], 0.0),
    }
    grid = np.asarray(artifact.snr_db, np.float64)
    q_snr = np.full_like(snr, pp["quality_snr_db"])
    w, scale = float(params.reward_psnr_weight), float(params.psnr_scale_db)
    out = {}
    for name, (es_tf, ue_tf, bits) in work.items():
        air = bits / rate
        latency = air + es_tf * pp["es_s_per_tflop"] + ue_tf * pp["ue_s_per_tflop"] + pp["base_delay_s"]
        energy = (es_tf * pp["es_hj_per_tflop"] + ue_tf * pp["ue_hj_per_tflop"] + pp["tx_power_w"] * air
                  + pp["bias_energy_hj"]) / 10.0
        out[name] = {"quality": _scheme_quality(artifact.conventional_schemes[name], grid, q_snr, cls, w, scale)
                     + float(params.reward_offset),
                     "latency_s": latency, "energy_j": energy}
    return out


def _host_floats(paper: Any) -> dict[str, float]:
    """``PaperParams`` as host floats (float64)."""
    return {name: float(np.asarray(getattr(paper, name))) for name in paper.__dataclass_fields__}


SCHEME_LABELS = {
    "centralised": "centralised (ES teacher, image sent)",
    "meg_uncompressed": "MEG uncompressed (teacher, r = 0)",
    "on_device": "on-device (UE runs all)",
}


def _frontier_choice(q: np.ndarray, lat: np.ndarray, mu: float) -> np.ndarray:
    """Per request argmin_a latency − μ Q (ties to higher quality): [E, T] indices."""
    return np.argmin(lat - mu * q - 1e-12 * q, axis=-1)


def meg_frontier(ro: Rollout, num_points: int = 41) -> dict[str, list[float]]:
    """The minimum-latency MEG frontier with perfect channel knowledge (no energy limit).

    For μ on a log grid, per request argmin_a latency_a − μ·Q_a; every μ gives a point
    (average quality, average latency, average energy) on the lower convex hull of what any
    per-request (K, r) choice achieves. Sorted by quality.
    """
    q, lat, en = ro.table_quality, ro.table_costs[..., 0], ro.table_costs[..., 1]
    pts = []
    for mu in np.concatenate([[0.0], np.logspace(-5, 5, num_points)]):
        a = _frontier_choice(q, lat, mu)
        pts.append((float(np.mean(pick_action(q, a))), float(np.mean(pick_action(lat, a))), float(np.mean(pick_action(en, a)))))
    pts.sort()
    return {"quality": [p[0] for p in pts], "latency_s": [p[1] for p in pts], "energy_j": [p[2] for p in pts]}


def matched_quality_meg(ro: Rollout, target_quality: float, iterations: int = 40) -> Optional[dict[str, float]]:
    """Lowest average latency MEG reaches with average quality >= ``target_quality``.

    Bisection on μ of :func:`meg_frontier`'s per-request rule (perfect channel knowledge);
    None when even the per-request maximum quality falls short of the target.
    """
    q, lat, en = ro.table_quality, ro.table_costs[..., 0], ro.table_costs[..., 1]

    def at(mu: float) -> tuple[float, float, float]:
        a = _frontier_choice(q, lat, mu)
        return float(np.mean(pick_action(q, a))), float(np.mean(pick_action(lat, a))), float(np.mean(pick_action(en, a)))

    if at(0.0)[0] >= target_quality:
        mu = 0.0
    else:
        lo, hi = -9.0, 6.0  # log10 of mu
        if at(10.0**hi)[0] < target_quality - 1e-12:
            return None
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if at(10.0**mid)[0] >= target_quality:
                hi = mid
            else:
                lo = mid
        mu = 10.0**hi
    qual, l, e = at(mu)
    return {"quality": qual, "latency_s": l, "energy_j": e, "mu": mu}


QUALITY_TOLERANCE = 0.02  # "matched quality": MEG's average quality >= the scheme's minus this (accuracy units)


def scheme_comparison(ro: Rollout, artifact: Any, params: Any,
                      learned: Mapping[str, dict[str, Any]] = (), preset: str = "tiny",
                      quality_tolerance: float = QUALITY_TOLERANCE) -> dict[str, Any]:
    """Item 1: learned policies vs the three conventional schemes and the fixed policies.

    Args:
      ro: a rollout on the preset's nominal channel (its tables score everything).
      artifact: the preset's calibration artifact (holds the conventional schemes).
      params: the env params of ``ro``.
      learned: policy name -> :func:`summarise` dict of the learned policies on the same
        requests.
      preset: label.
      quality_tolerance: MEG matches a scheme's quality when its average quality is at least
        the scheme's minus this (the calibration's sampling error is of this order: a mean
        accuracy over 128 prompts x 5 attributes has a standard error near 0.02). When even
        MEG's highest quality is below that, ``meg_matched`` holds MEG's highest-quality
        point with ``reached = False``.

    Returns:
      JSON-ready dict with ``schemes`` (each conventional scheme's quality, latency, energy,
      plus ``meg_matched``: the lowest-latency MEG at >= its quality, and the latency and
      energy reductions), ``learned`` (each learned policy, plus its latency reduction
      against each scheme), ``references`` (best fixed, max quality, oracle), ``fixed``
      (every grid action) and ``frontier``.
    """
    conv = conventional_schemes(artifact, params, ro.snr_db, ro.task_class)
    schemes = {}
    for name, rec in conv.items():
        s = summarise(rec["quality"], np.stack([rec["latency_s"], rec["energy_j"]], -1), ro.limits).named()
        s["label"] = SCHEME_LABELS.get(name, name)
        m = matched_quality_meg(ro, s["quality"] - quality_tolerance)
        if m is None:
            m = matched_quality_meg(ro, float(np.mean(np.max(ro.table_quality, axis=-1))) - 1e-9)
            if m is not None:
                m["reached"] = False
        else:
            m["reached"] = True
        if m is not None:
            m["latency_reduction"] = 1.0 - m["latency_s"] / s["latency_s"]
            m["energy_reduction"] = 1.0 - m["energy_j"] / s["energy_j"] if s["energy_j"] > 0 else float("nan")
        s["meg_matched"] = m
        schemes[name] = s
    learned_out = {}
    for name, s in dict(learned).items():
        s = dict(s)
        s["latency_reduction_vs"] = {n: 1.0 - s["latency_s"] / v["latency_s"] for n, v in schemes.items()}
        s["energy_reduction_vs"] = {
            n: (1.0 - s["energy_j"] / v["energy_j"]) if v["energy_j"] > 0 else float("nan") for n, v in schemes.items()
        }
        s["quality_minus"] = {n: s["quality"] - v["quality"] for n, v in schemes.items()}
        learned_out[name] = s
    return {
        "preset": preset,
        # what the energy cost counts: "ue", "system", or "paper" (the authors' formula)
        "energy_scope": "paper" if params.system == "paper" else str(params.energy_scope),
        "quality_tolerance": quality_tolerance,
        "episodes": ro.episodes,
        "episode_length": int(ro.snr_db.shape[1]),
        "limits": ro.limits.tolist(),
        "schemes": schemes,
        "learned": learned_out,
        "references": reference_policies(ro),
        "fixed": fixed_policies(ro),
        "frontier": meg_frontier(ro),
    }
