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
from meg_jax.env.state import EnvParams
from meg_jax.meg.artifact import CalibrationArtifact

__all__ = ["LimitReport", "derive_limits", "build_params", "resolve_artifact_path"]

_stationary_channel_samples_jit = jax.jit(stationary_channel_samples, static_argnums=2)
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
    snr, cls = _stationary_channel_samples_jit(params, key, config.limit_samples)
    quality, costs = _grid_action_table_jit(params, snr, cls)
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
        quality_table=_f32(np.stack([artifact.accuracy, artifact.psnr], axis=-1)),
        es_time_s=_f32(artifact.es_compute_time_s),
        payload=_f32(artifact.payload),
        side_info_bits=_f32(artifact.side_info_bits),
        ue_time_s=_f32(artifact.ue_compute_time_s),
        ue_energy_j=_f32(artifact.ue_compute_energy_j),
        ue_receive_power_w=_f32(artifact.ue_receive_power_w),
        bandwidth_hz=_f32(artifact.bandwidth_hz),
        max_merge_ratio=_f32(r_max),
        reward_psnr_weight=_f32(config.reward_psnr_weight),
        psnr_scale_db=_f32(config.psnr_scale_db),
        scenario=config.scenario,
        analog=artifact.link_mode == "analog",
        history_length=config.history_length,
    )
    report = derive_limits(params, config, key)
    limits = np.asarray(report.limits)
    weights = {"normalised_sum": 1.0 / limits, "latency": np.array([1.0, 0.0]), "energy": np.array([0.0, 1.0])}
    params = params.replace(limits=_f32(limits), cost_weights=_f32(weights[config.single_cost]))
    return params, report


def resolve_artifact_path(path: str) -> str:
    """Absolute path of an artifact: as given, relative to the cwd, or under the shipped
    checkpoints folder (``meg_jax.shipped.resolve``: ``$MEG_JAX_CHECKPOINTS`` or the installed copy)."""
    return os.path.abspath(shipped.resolve(path))
