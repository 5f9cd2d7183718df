"""Building ``EnvParams`` from a config and a calibration artifact, and choosing the limits.

``build_params`` turns a ``MEGEnvConfig`` and a ``CalibrationArtifact`` into the arrays the
environment reads; ``derive_limits`` places (or checks) the episode-average constraint limits
against the environment's own stationary channel (``LimitReport`` says what it saw).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from meg_jax import shipped
from meg_jax.env.channel import stationary_channel_samples
from meg_jax.env.config import MEGEnvConfig
from meg_jax.env.meg_env import grid_action_table
from meg_jax.env.state import EnvParams, PaperParams
from meg_jax.meg.artifact import CalibrationArtifact

__all__ = [
    "LimitReport",
    "derive_limits",
    "build_params",
    "resolve_artifact_path",
    "resample_steps",
    "extend_ratios",
    "quality_channels",
    "reward_coefficients",
    "es_power_w",
]

_stationary_channel_samples_jit = jax.jit(stationary_channel_samples, static_argnums=(2, 3))
_grid_action_table_jit = jax.jit(grid_action_table)


@dataclasses.dataclass(frozen=True)
class LimitReport:
    """What :func:`derive_limits` saw (per-request averages under the stationary channel)."""

    limits: tuple[float, float]  # chosen limits (s, J)
    cheapest: tuple[float, float]  # min over fixed actions of average latency / energy
    dearest: tuple[float, float]  # max over fixed actions
    lower_bound: tuple[float, float]  # E[min over actions per request]: no policy can do better
    max_quality_costs: tuple[float, float]  # average costs of "always max quality"
    feasible_fixed_actions: int  # fixed actions that meet both limits


def derive_limits(params: EnvParams, config: MEGEnvConfig, key: Array | None = None) -> LimitReport:
    """Chooses (or checks) the constraint limits against the environment's own channel.

    Each default limit is ``cheapest + f (dearest - cheapest)`` with ``f`` from
    ``config.limit_fractions``, where cheapest/dearest are the min/max over the K x R fixed
    actions of the per-request average cost under the stationary channel (fresh-episode
    draws, ``config.limit_samples`` of them, fixed key). Explicit ``config.limits`` are
    kept. Raises ``ValueError`` if a limit is below what any policy can reach (the
    per-request cheapest action's average) or if no fixed action meets both limits;
    warns if "always max quality" already meets them (the limits would not bind).
    """
    key = jax.random.PRNGKey(0) if key is None else key
    snr, cls, prompt = _stationary_channel_samples_jit(params, key, config.limit_samples, True)
    quality, costs = _grid_action_table_jit(params, snr, cls, prompt)
    quality, costs = np.asarray(quality, np.float64), np.asarray(costs, np.float64)
    mean_costs = costs.mean(axis=0)  # [A, 2]
    cheapest, dearest = mean_costs.min(axis=0), mean_costs.max(axis=0)
    lower = costs.min(axis=1).mean(axis=0)
    best = quality.argmax(axis=1)
    max_q_costs = costs[np.arange(len(best)), best].mean(axis=0)
    if config.limits is None:
        f = np.asarray(config.limit_fractions)
        limits = cheapest + f * (dearest - cheapest)
    else:
        limits = np.asarray(config.limits, np.float64)
    names = ("latency (s)", "energy (J)")
    for i in range(2):
        if limits[i] < lower[i]:
            raise ValueError(
                f"infeasible {names[i]} limit {limits[i]:.6g}: below {lower[i]:.6g}, the average cost of "
                f"the cheapest action per request; raise limits[{i}] (the cheapest fixed action averages "
                f"{cheapest[i]:.6g})"
            )
    feasible = int(np.sum(np.all(mean_costs <= limits, axis=1)))
    if feasible == 0:
        raise ValueError(
            f"no fixed (K, r) meets both limits {limits.tolist()} (per-action average costs range over "
            f"latency [{cheapest[0]:.4g}, {dearest[0]:.4g}] s, energy [{cheapest[1]:.4g}, {dearest[1]:.4g}] J); "
            "raise the limits or limit_fractions"
        )
    if np.all(max_q_costs <= limits):
        warnings.warn(
            f"limits {limits.tolist()} do not bind: 'always max quality' averages {max_q_costs.tolist()}",
            stacklevel=2,
        )
    as_pair = lambda v: (float(v[0]), float(v[1]))  # noqa: E731
    return LimitReport(
        limits=as_pair(limits), cheapest=as_pair(cheapest), dearest=as_pair(dearest), lower_bound=as_pair(lower),
        max_quality_costs=as_pair(max_q_costs), feasible_fixed_actions=feasible,
    )


def _f32(x: Any) -> Array:
    return jnp.asarray(x, jnp.float32)


def quality_channels(config: MEGEnvConfig, artifact: CalibrationArtifact) -> np.ndarray:
    """The quality table [K, R, S, C x P, 2] (accuracy reading, PSNR dB) the env reads.

    Row ``c x P + p`` is class c's prompt p (``quality_source="replay"``, P = the artifact's
    prompts per class) or class c itself (``"class_mean"``, P = 1). The accuracy reading is
    the pixel reading's with ``reward_metric="pixel_accuracy"``, else the classifier's.

    Raises:
      ValueError: replay asked of an artifact without per-prompt tables, or the pixel reading
        of one without it; the message names the config field and ``meg-jax calibrate``.
    """
    reading = "pixel_accuracy" if config.reward_metric == "pixel_accuracy" else "accuracy"
    if config.quality_source == "replay":
        try:
            acc, psnr = artifact.prompt_quality(reading), artifact.prompt_quality("psnr")
        except ValueError as e:
            raise ValueError(f"quality_source='replay' needs per-prompt quality tables: {e}") from e
        k_, r_, s_, c_, p_ = acc.shape
        acc, psnr = acc.reshape(k_, r_, s_, c_ * p_), psnr.reshape(k_, r_, s_, c_ * p_)  # class-major rows
    else:
        acc, psnr = getattr(artifact, reading), artifact.psnr
        if acc is None:
            raise ValueError(
                f"reward_metric={config.reward_metric!r} needs the artifact's {reading!r} table, which this "
                "artifact lacks (schema 1, or measured without it): regenerate it with `meg-jax calibrate`")
    return np.stack([np.asarray(acc, np.float64), np.asarray(psnr, np.float64)], axis=-1)


def reward_coefficients(config: MEGEnvConfig) -> tuple[float, float, float]:
    """(w, psnr scale dB, offset) of reward = (1 - w) acc + w psnr / scale + offset.

    The accuracy metrics mix PSNR in by ``config.reward_psnr_weight`` / ``psnr_scale_db``;
    ``"psnr"`` is the PSNR in dB; ``"neg_log_mse"`` is -ln MSE of [-1, 1] pixels, from the
    PSNR of data range 2: MSE = 4 x 10^(-PSNR/10), so -ln MSE = PSNR ln(10)/10 - ln 4.
    """
    if config.reward_metric == "psnr":
        return 1.0, 1.0, 0.0
    if config.reward_metric == "neg_log_mse":
        return 1.0, 10.0 / np.log(10.0), -float(np.log(4.0))
    return config.reward_psnr_weight, config.psnr_scale_db, 0.0


def es_power_w(config: MEGEnvConfig, artifact: CalibrationArtifact) -> float:
    """ES power while computing (W) for ``energy_scope="system"``; NaN if not needed and unknown.

    The ES device profile (``config.es_device``, else the artifact provenance's ``es_device``)
    gives it as energy per FLOP x sustained FLOP/s (its datasheet power under load): ES
    compute energy = this x the artifact's ES compute time, the FLOPs at that profile's J/FLOP.

    Raises:
      ValueError: ``energy_scope="system"`` and no ES device is known.
    """
    from meg_jax.meg import devices

    name = config.es_device if config.es_device is not None else artifact.provenance.get("es_device")
    if name is None:
        if config.energy_scope == "system":
            raise ValueError(
                "energy_scope='system' prices ES compute energy from an ES device profile: the artifact's "
                "provenance names no es_device, so set es_device (one of meg_jax.meg.devices.DEVICES, "
                f"{sorted(devices.DEVICES)})")
        return float("nan")
    profile = devices.device(name)
    return profile.energy_per_flop_j * profile.effective_flops


def build_params(
    config: MEGEnvConfig, artifact: CalibrationArtifact, episode_length: int, key: Array | None = None
) -> tuple[EnvParams, LimitReport]:
    """Turns a config and an artifact into ``EnvParams`` (limits derived or checked).

    Args:
      config: environment config (validated here).
      artifact: a validated calibration artifact.
      episode_length: requests per episode T (>= 1).
      key: key for the stationary channel draws of :func:`derive_limits` (default PRNGKey(0)).
    """
    config.validate()
    artifact.validate()
    if episode_length < 1:
        raise ValueError(f"episode_length must be >= 1, got {episode_length}")
    num_c = len(artifact.task_classes)
    probs = np.full(num_c, 1.0 / num_c) if config.task_class_probs is None else np.asarray(config.task_class_probs)
    if probs.shape != (num_c,):
        raise ValueError(
            f"task_class_probs has {probs.shape[0]} entries, the artifact has {num_c} classes {artifact.task_classes}"
        )
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0
    if config.system == "paper":
        return _with_limits(_paper_params(config, artifact, episode_length, cdf), config, key)
    r_max = float(artifact.merge_ratios[-1]) if config.max_merge_ratio is None else config.max_merge_ratio
    if r_max > artifact.merge_ratios[-1] + 1e-9:
        raise ValueError(f"max_merge_ratio {r_max} exceeds the artifact's largest merge ratio {artifact.merge_ratios[-1]}")
    tx_power = config.tx_power_dbm if config.tx_power_dbm is not None else artifact.tx_power_dbm
    noise_figure = config.noise_figure_db if config.noise_figure_db is not None else artifact.noise_figure_db
    params = EnvParams(
        limits=_f32([1.0, 1.0]),
        cost_weights=_f32([1.0, 1.0]),
        episode_length=jnp.asarray(episode_length, jnp.int32),
        slot_s=_f32(config.slot_s),
        task_cdf=_f32(cdf),
        carrier_hz=_f32(config.carrier_hz),
        bs_height_m=_f32(config.bs_height_m),
        ue_height_m=_f32(config.ue_height_m),
        area_half_width_m=_f32(config.area_half_width_m),
        min_distance_m=_f32(config.min_distance_m),
        speed_min_mps=_f32(config.speed_min_mps),
        speed_max_mps=_f32(config.speed_max_mps),
        heading_std_rad=_f32(config.heading_std_rad),
        shadowing_std_los_db=_f32(config.shadowing_std_los_db),
        shadowing_std_nlos_db=_f32(config.shadowing_std_nlos_db),
        shadowing_decorrelation_m=_f32(config.shadowing_decorrelation_m),
        los_decorrelation_m=_f32(config.los_decorrelation_m),
        tx_power_dbm=_f32(30.0 if tx_power is None else tx_power),
        noise_psd_dbm_hz=_f32(config.noise_psd_dbm_hz),
        noise_figure_db=_f32(7.0 if noise_figure is None else noise_figure),
        snr_floor_db=_f32(config.snr_floor_db),
        csi_delay_s=_f32(config.csi_delay_s),
        csi_error_std=_f32(config.csi_error_std),
        steps=_f32(artifact.steps),
        merge_ratios=_f32(artifact.merge_ratios),
        snr_grid_db=_f32(artifact.snr_db),
        quality_table=_f32(quality_channels(config, artifact)),
        es_time_s=_f32(artifact.es_compute_time_s),
        payload=_f32(artifact.payload),
        side_info_bits=_f32(artifact.side_info_bits),
        ue_time_s=_f32(artifact.ue_compute_time_s),
        ue_energy_j=_f32(artifact.ue_compute_energy_j),
        ue_receive_power_w=_f32(artifact.ue_receive_power_w),
        bandwidth_hz=_f32(artifact.bandwidth_hz),
        max_merge_ratio=_f32(r_max),
        **_reward_fields(config),
        es_power_w=_f32(es_power_w(config, artifact)),
        scenario=config.scenario,
        analog=artifact.link_mode == "analog",
        history_length=config.history_length,
        energy_scope=config.energy_scope,
    )
    return _with_limits(params, config, key)


def _reward_fields(config: MEGEnvConfig) -> dict[str, Array]:
    w, scale, offset = reward_coefficients(config)
    return {"reward_psnr_weight": _f32(w), "psnr_scale_db": _f32(scale), "reward_offset": _f32(offset)}


def _with_limits(params: EnvParams, config: MEGEnvConfig, key: Array | None) -> tuple[EnvParams, LimitReport]:
    """Sets the limits (derived or checked) and the single-cost weights."""
    report = derive_limits(params, config, key)
    limits = np.asarray(report.limits)
    weights = {"normalised_sum": 1.0 / limits, "latency": np.array([1.0, 0.0]), "energy": np.array([0.0, 1.0])}
    params = params.replace(limits=_f32(limits), cost_weights=_f32(weights[config.single_cost]))
    return params, report


def resample_steps(steps: np.ndarray, table: np.ndarray, new_steps: np.ndarray) -> np.ndarray:
    """A table [K, ...] measured at ``steps`` read at ``new_steps``: linear in log K, clipped.

    Inside the measured range each cell is interpolated linearly in log K (quality grows
    roughly by a constant per doubling of the steps); outside it the nearest measured K
    holds (no extrapolation: more steps than measured buy no quality here).
    """
    x = np.log(np.asarray(steps, np.float64))
    xq = np.log(np.clip(np.asarray(new_steps, np.float64), steps[0], steps[-1]))
    flat = np.asarray(table, np.float64).reshape(len(steps), -1)
    if len(x) == 1:
        out = np.repeat(flat, len(xq), axis=0)
    else:  # np.interp's rule for every column at once (replay tables have ~1e5 columns)
        lo = np.clip(np.searchsorted(x, xq, side="right") - 1, 0, len(x) - 2)
        w = ((xq - x[lo]) / (x[lo + 1] - x[lo]))[:, None]
        out = (1.0 - w) * flat[lo] + w * flat[lo + 1]
    return out.reshape((len(new_steps),) + table.shape[1:])


def extend_ratios(ratios: np.ndarray, table: np.ndarray, r_cap: float) -> tuple[np.ndarray, np.ndarray]:
    """Ratio grid ending at ``r_cap`` and a table [K, R, ...] on it (axis 1 is r).

    Points at or above ``r_cap`` are dropped and ``r_cap`` appended, its value interpolated,
    or extrapolated linearly from the last measured segment when ``r_cap`` lies beyond the
    measured grid (merging cannot remove more than the src tokens, so r_cap is the last
    distinct merge).
    """
    ratios = np.asarray(ratios, np.float64)
    keep = ratios < r_cap - 1e-12
    lo, hi = (len(ratios) - 2, len(ratios) - 1) if r_cap > ratios[-1] else (None, None)
    if lo is None:
        i = int(np.searchsorted(ratios, r_cap, side="right")) - 1
        lo, hi = i, min(i + 1, len(ratios) - 1)
    w = 0.0 if hi == lo else (r_cap - ratios[lo]) / (ratios[hi] - ratios[lo])
    at_cap = (1.0 - w) * table[:, lo] + w * table[:, hi]
    return np.append(ratios[keep], r_cap), np.concatenate([table[:, keep], at_cap[:, None]], axis=1)


def _paper_params(config: MEGEnvConfig, artifact: CalibrationArtifact, episode_length: int, cdf: np.ndarray) -> EnvParams:
    """``EnvParams`` of the paper's environment (``config.system == "paper"``; see ``PaperSystem``)."""
    from meg_jax.meg import costs as costs_lib
    from meg_jax.meg import devices

    ps = config.paper
    preset = costs_lib.cost_preset(ps.cost_preset)
    channels, side = preset.latent_channels, preset.latent_size
    patch = int(round(np.sqrt(ps.token_values / channels)))
    if patch * patch * channels != ps.token_values or side % (patch * ps.dst_stride):
        raise ValueError(
            f"paper.token_values={ps.token_values} must be p x p x {channels} channels with {side} divisible by "
            f"p x paper.dst_stride ({ps.dst_stride})"
        )
    num_tokens = (side // patch) ** 2
    max_merged = num_tokens - num_tokens // ps.dst_stride**2
    es = devices.device(ps.es_device)
    es_s_per_tflop = 1e12 / es.effective_flops
    es_hj_per_tflop = es.energy_per_flop_j * 1e12 / 100.0
    steps = np.asarray(ps.steps, np.float64)
    quality = quality_channels(config, artifact)  # [K, R, S, C x P, 2]
    quality = resample_steps(np.asarray(artifact.steps, np.float64), quality, steps)
    ratios, quality = extend_ratios(np.asarray(artifact.merge_ratios), quality, max_merged / num_tokens)
    quality[..., 0] = np.clip(quality[..., 0], 0.0, 1.0)  # an extrapolated accuracy stays a fraction
    r_max = 1.0 if config.max_merge_ratio is None else config.max_merge_ratio
    zeros_r, zeros_k = _f32(np.zeros(len(ratios))), _f32(np.zeros(len(steps)))
    paper = PaperParams(
        distance_min_m=_f32(ps.distance_m[0]),
        distance_max_m=_f32(ps.distance_m[1]),
        path_loss_a_db=_f32(ps.path_loss_db[0]),
        path_loss_b_db=_f32(ps.path_loss_db[1]),
        tx_power_dbm=_f32(ps.tx_power_dbm),
        tx_power_w=_f32(10.0 ** (ps.tx_power_dbm / 10.0) / 1e3),
        noise_dbm=_f32(ps.noise_dbm),
        bandwidth_hz=_f32(ps.bandwidth_hz),
        unet_tflop_per_step=_f32(preset.unet_flops * ps.unet_evals_per_step / 1e12),
        text_tflop=_f32(preset.text_encoder_flops / 1e12),
        vae_tflop=_f32(preset.vae_decoder_flops / 1e12),
        es_s_per_tflop=_f32(es_s_per_tflop),
        ue_s_per_tflop=_f32(es_s_per_tflop / ps.ue_time_ratio),
        es_hj_per_tflop=_f32(es_hj_per_tflop),
        ue_hj_per_tflop=_f32(es_hj_per_tflop / ps.ue_energy_ratio),
        base_delay_s=_f32(ps.base_delay_s),
        bias_energy_hj=_f32(ps.bias_energy_hj),
        num_tokens=_f32(num_tokens),
        max_merged=_f32(max_merged),
        token_values=_f32(ps.token_values),
        latent_values=_f32(side * side * channels),
        value_bits=_f32(ps.value_bits),
        map_fraction=_f32(ps.map_fraction),
        quality_snr_db=_f32(-20.0 * np.log10(ps.feature_noise_std)),
        teacher_steps=_f32(preset.teacher_steps),
    )
    nan = _f32(np.nan)  # fields the paper's system never reads
    return EnvParams(
        limits=_f32([1.0, 1.0]),
        cost_weights=_f32([1.0, 1.0]),
        episode_length=jnp.asarray(episode_length, jnp.int32),
        slot_s=_f32(config.slot_s),
        task_cdf=_f32(cdf),
        carrier_hz=nan, bs_height_m=nan, ue_height_m=nan, area_half_width_m=nan, min_distance_m=nan,
        speed_min_mps=nan, speed_max_mps=nan, heading_std_rad=nan, shadowing_std_los_db=nan,
        shadowing_std_nlos_db=nan, shadowing_decorrelation_m=nan, los_decorrelation_m=nan,
        tx_power_dbm=_f32(ps.tx_power_dbm),
        noise_psd_dbm_hz=nan, noise_figure_db=nan,
        snr_floor_db=_f32(config.snr_floor_db),
        csi_delay_s=nan, csi_error_std=nan,
        steps=_f32(steps),
        merge_ratios=_f32(ratios),
        snr_grid_db=_f32(artifact.snr_db),
        quality_table=_f32(quality),
        es_time_s=zeros_k, payload=zeros_r, side_info_bits=zeros_r, ue_time_s=zeros_r, ue_energy_j=zeros_r,
        ue_receive_power_w=_f32(0.0),
        bandwidth_hz=_f32(ps.bandwidth_hz),
        max_merge_ratio=_f32(r_max),
        **_reward_fields(config),
        es_power_w=nan,
        paper=paper,
        scenario=config.scenario,
        analog=artifact.link_mode == "analog",
        history_length=config.history_length,
        system="paper",
    )


def resolve_artifact_path(path: str) -> str:
    """Absolute path of an artifact: as given, relative to the cwd, or under the shipped
    checkpoints folder (``meg_jax.shipped.resolve``: ``$MEG_JAX_CHECKPOINTS`` or the installed copy)."""
    return os.path.abspath(shipped.resolve(path))
