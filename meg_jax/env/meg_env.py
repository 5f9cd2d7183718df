"""The MEG constrained MDP on brax's ``Env`` API: one episode = T generation requests of one UE.

Per request the agent picks the denoising steps K and the merge ratio r; the reward is the
calibrated image quality, the costs are the request's latency (s) and UE energy (J); the
constraint is that their episode averages stay below ``EnvParams.limits``. Between two
requests (``slot_s`` apart) the UE moves and the channel evolves (``wireless.py``):

* mobility: per-episode speed v ~ U[v_min, v_max]; heading random walk (std ``heading_std``
  per request); specular reflection at the edges of the square [-w, w]² around the BS.
* large scale: 3GPP TR 38.901 UMi/UMa path loss at the 2-D distance (clamped to
  ``min_distance``); the LOS state is a spatially consistent draw, LOS = Φ(z_los) < P_LOS(d)
  with z_los ~ N(0, 1) correlated over the distance moved (Gudmundson, 50 m in UMi);
  log-normal shadowing σ_LOS/NLOS · z_sh with z_sh Gudmundson-correlated (10 m).
* small scale: Rayleigh h ~ CN(0, 1), Gauss–Markov h' = ρ h + sqrt(1 - ρ²) e with
  ρ = J0(2π f_d Δt), f_d = v f_c / c (per-episode constant).
* SNR = P_tx - PL - shadowing + 10 log10|h|² - (N0 + 10 log10 B + NF) dB.
* CSI: the agent sees ĥ = ρ_τ h + sqrt(1 - ρ_τ² + σ_e²) e, i.e. the channel ``csi_delay_s``
  earlier (ρ_τ = J0(2π f_d τ)) plus estimation error of variance σ_e².
* task class of each request drawn from ``task_class_probs``.

Pricing of (K, r) at the request's true SNR and class: quality bilinear in (r, SNR) (SNR
clamped to the artifact's grid), K the nearest option; costs per ``meg_jax.meg.artifact``
with the Shannon rate computed at max(SNR, ``snr_floor_db``).

Observation (float32 vector, ``obs_dim = H + C + 5``; see :func:`observation_fields`):

=========  ======  ===================================================================
field      size    value
=========  ======  ===================================================================
est_snr    H       estimated SNR (dB) of the current and H-1 previous requests, newest
                   first, as (snr - mid) / half with mid/half the centre/half-width of
                   the artifact's SNR grid (the grid maps to [-1, 1])
mean_snr   1       large-scale SNR (path loss + shadowing, no fading), same scaling
speed      1       UE speed / speed_max
task       C       one-hot task class of the current request
progress   1       requests served so far / T, in [0, 1]
budget     2       latency and energy spent so far / (limit x T): 1 = the whole budget
=========  ======  ===================================================================

Randomness is injectable: ``init_core(params, key, ResetNoise)`` and
``transition(params, core, k_idx, r, StepNoise)`` are pure functions of their noise, shared
with the NumPy reference test; ``MEGEnv`` draws the noise from the episode key and the
request index (counter-mode threefry, :func:`episode_step_noise`). Actions: continuous ``[-1, 1]²`` → (K = nearest option to (a0 + 1)/2 (K-1)
as an index, r = (a1 + 1)/2 · r_max), or (``discrete=True``) one int index
``k_idx * R + r_idx`` over the artifact's K x R grid.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any

import jax
import jax.extend.random  # noqa: F401  (threefry_2x32)
import jax.numpy as jnp
import numpy as np
from brax.envs.base import Env, State
from flax import struct
from jax import Array

from meg_jax.env import wireless
from meg_jax.env.config import MEGEnvConfig
from meg_jax.meg import pricing
from meg_jax.meg.artifact import CalibrationArtifact

__all__ = [
    "EnvParams",
    "ChannelState",
    "MEGCore",
    "StepNoise",
    "ResetNoise",
    "MEGEnv",
    "build_params",
    "observation_fields",
    "sample_step_noise",
    "episode_step_noise",
    "sample_reset_noise",
    "init_core",
    "transition",
    "price_action",
    "observe",
    "continuous_to_choice",
    "discrete_to_choice",
    "grid_action_table",
    "stationary_channel_samples",
    "derive_limits",
    "METRIC_KEYS",
]

METRIC_KEYS = (
    "quality",
    "accuracy",
    "psnr_db",
    "latency_s",
    "energy_j",
    "steps",
    "merge_ratio",
    "snr_db",
    "avg_quality",
    "avg_latency_s",
    "avg_energy_j",
)
_SQRT_HALF = math.sqrt(0.5)
RESET_STREAM = 2**31 - 1  # fold_in index of the reset draws


@struct.dataclass
class EnvParams:
    """Every number the environment reads, as arrays: sweep or vmap it without retracing.

    Shapes: K steps options, R merge ratios, S SNR grid points, C task classes.
    """

    # constraints
    limits: Array  # [2] per-request average limits: latency (s), UE energy (J)
    cost_weights: Array  # [2] info["cost"] = costs · cost_weights
    episode_length: Array  # [] int32, T requests per episode (progress and budget features)
    # requests, mobility, geometry
    slot_s: Array  # [] time between requests (s)
    task_cdf: Array  # [C] cumulative task class probabilities (last = 1)
    carrier_hz: Array  # []
    bs_height_m: Array  # []
    ue_height_m: Array  # []
    area_half_width_m: Array  # []
    min_distance_m: Array  # []
    speed_min_mps: Array  # []
    speed_max_mps: Array  # []
    heading_std_rad: Array  # []
    # large scale
    shadowing_std_los_db: Array  # []
    shadowing_std_nlos_db: Array  # []
    shadowing_decorrelation_m: Array  # []
    los_decorrelation_m: Array  # []
    # link
    tx_power_dbm: Array  # []
    noise_psd_dbm_hz: Array  # []
    noise_figure_db: Array  # []
    snr_floor_db: Array  # []
    csi_delay_s: Array  # []
    csi_error_std: Array  # []
    # calibration (from the artifact)
    steps: Array  # [K] float32 step counts
    merge_ratios: Array  # [R]
    snr_grid_db: Array  # [S]
    quality_table: Array  # [K, R, S, C, 2]: (accuracy, psnr dB)
    es_time_s: Array  # [K]
    payload: Array  # [R] bits (digital) or complex symbols (analog)
    side_info_bits: Array  # [R]
    ue_time_s: Array  # [R]
    ue_energy_j: Array  # [R]
    ue_receive_power_w: Array  # []
    bandwidth_hz: Array  # []
    max_merge_ratio: Array  # [] r_max of the continuous action
    reward_psnr_weight: Array  # []
    psnr_scale_db: Array  # []
    # static: changing these changes shapes or code paths
    scenario: str = struct.field(pytree_node=False, default="umi")
    analog: bool = struct.field(pytree_node=False, default=True)
    history_length: int = struct.field(pytree_node=False, default=4)

    @property
    def num_classes(self) -> int:
        return self.task_cdf.shape[-1]

    @property
    def num_actions(self) -> int:
        """Size of the discrete action set K x R."""
        return self.steps.shape[-1] * self.merge_ratios.shape[-1]

    @property
    def obs_dim(self) -> int:
        return self.history_length + self.num_classes + 5


@struct.dataclass
class ChannelState:
    """Per-UE channel state; scalars unless noted."""

    pos: Array  # [2] UE position relative to the BS (m)
    heading: Array  # direction of motion (rad)
    speed: Array  # per-episode speed (m/s)
    rho: Array  # fading correlation between requests, J0(2π f_d slot)
    csi_rho: Array  # correlation between estimate and request instants, J0(2π f_d τ)
    a_shadow: Array  # Gudmundson coefficient of shadowing per request
    a_los: Array  # Gudmundson coefficient of the LOS latent per request
    z_los: Array  # LOS latent, N(0, 1)
    z_shadow: Array  # shadowing latent, N(0, 1)
    fading: Array  # [2] (re, im) of h ~ CN(0, 1)
    los: Array  # 1.0 in line of sight
    large_scale_snr_db: Array  # SNR without small-scale fading (dB)
    snr_db: Array  # true SNR of the current request (dB)
    est_snr_db: Array  # [H] estimated SNR, newest first (dB)


@struct.dataclass
class MEGCore:
    """Environment state held in ``brax State.pipeline_state``."""

    channel: ChannelState
    task_class: Array  # int32 class of the current request
    t: Array  # int32 requests served in this episode
    cum_costs: Array  # [2] latency (s), energy (J) spent in this episode
    cum_quality: Array  # summed reward in this episode
    key: Array  # episode PRNG key (legacy uint32 [2]); step noise = episode_step_noise(key, t)


@struct.dataclass
class StepNoise:
    """The random draws of one transition (all independent)."""

    turn: Array  # N(0, 1): heading change / heading_std
    z_shadow: Array  # N(0, 1): shadowing innovation
    z_los: Array  # N(0, 1): LOS-latent innovation
    fading: Array  # [2] N(0, 1): fading innovation (re, im), scaled by sqrt(1/2)
    csi: Array  # [2] N(0, 1): CSI error (re, im), scaled by sqrt(1/2)
    task_u: Array  # U[0, 1): next request's task class by inverse CDF


@struct.dataclass
class ResetNoise:
    """The random draws of one reset: initial channel plus H-1 warm-up transitions."""

    pos_u: Array  # [2] U[0, 1): position = (2u - 1) w
    heading_u: Array  # U[0, 1): heading = 2π u
    speed_u: Array  # U[0, 1): speed = v_min + u (v_max - v_min)
    z_los: Array  # N(0, 1)
    z_shadow: Array  # N(0, 1)
    fading: Array  # [2] N(0, 1), scaled by sqrt(1/2)
    csi: Array  # [2] N(0, 1)
    task_u: Array  # U[0, 1)
    warmup: StepNoise  # leaves with leading axis H-1: fills the estimate history


def observation_fields(params: EnvParams) -> dict[str, slice]:
    """Name -> slice of the observation vector (see the module docstring)."""
    h, c = params.history_length, params.num_classes
    sizes = (("est_snr", h), ("mean_snr", 1), ("speed", 1), ("task", c), ("progress", 1), ("budget", 2))
    out, start = {}, 0
    for name, size in sizes:
        out[name] = slice(start, start + size)
        start += size
    return out


# ----------------------------------------------------------------------------- noise
def _uniform_open(key: Array, shape: tuple[int, ...]) -> Array:
    """U(-1, 1) excluding -1, as jax.random.normal draws it before erfinv."""
    return jax.random.uniform(key, shape, minval=jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0)), maxval=1.0)


def _step_noise_from_uniform(u: Array) -> StepNoise:
    """StepNoise from 8 draws of U(-1, 1): 7 normals via sqrt(2) erfinv(u), one U[0, 1)."""
    z = jnp.sqrt(2.0) * jax.lax.erf_inv(u[:7])
    return StepNoise(turn=z[0], z_shadow=z[1], z_los=z[2], fading=z[3:5], csi=z[5:7], task_u=0.5 * (u[7] + 1.0))


def sample_step_noise(key: Array) -> StepNoise:
    """Draws one transition's noise from one key (one threefry call: compile time matters)."""
    return _step_noise_from_uniform(_uniform_open(key, (8,)))


def episode_step_noise(episode_key: Array, t: Array) -> StepNoise:
    """The noise of request ``t`` of the episode with legacy key ``episode_key`` (uint32 [2]).

    Counter-mode threefry: the 8 words are threefry_2x32(episode_key, 8 t + [0..7]), four
    threefry blocks and no per-step key derivation (random bits are the env's main CPU cost).
    Streams of different t never overlap (t < 2^29).
    """
    if jax.dtypes.issubdtype(episode_key.dtype, jax.dtypes.prng_key):
        episode_key = jax.random.key_data(episode_key)
    counts = (8 * t).astype(jnp.uint32) + jnp.arange(8, dtype=jnp.uint32)
    bits = jax.extend.random.threefry_2x32(episode_key, counts)
    unit = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0  # [0, 1)
    u = jnp.maximum(2.0 * unit - 1.0, jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0)))  # (-1, 1)
    return _step_noise_from_uniform(u)


def sample_reset_noise(key: Array, history_length: int) -> ResetNoise:
    """Draws one reset's noise (``history_length`` is static) with a single threefry call."""
    u = _uniform_open(key, (11 + 8 * (history_length - 1),))
    z = jnp.sqrt(2.0) * jax.lax.erf_inv(u[5:11])
    warmup = jax.vmap(_step_noise_from_uniform)(u[11:].reshape(history_length - 1, 8))
    half = 0.5 * (u[:5] + 1.0)  # U[0, 1)
    return ResetNoise(
        pos_u=half[0:2], heading_u=half[2], speed_u=half[3], task_u=half[4],
        z_los=z[0], z_shadow=z[1], fading=z[2:4], csi=z[4:6], warmup=warmup,
    )


# ------------------------------------------------------------------------- channel
def _sample_class(task_cdf: Array, u: Array) -> Array:
    """Inverse-CDF draw of a task class from U[0, 1)."""
    return jnp.sum(u >= task_cdf[:-1]).astype(jnp.int32)


def _measure(params: EnvParams, pos: Array, z_los: Array, z_shadow: Array, fading: Array, csi_rho: Array, csi: Array):
    """LOS state, large-scale SNR, true SNR and estimated SNR at ``pos`` (all dB)."""
    d2d = jnp.maximum(jnp.sqrt(pos[0] ** 2 + pos[1] ** 2), params.min_distance_m)
    p_los = wireless.los_probability(d2d, params.ue_height_m, params.scenario)
    los = (jax.scipy.special.ndtr(z_los) < p_los).astype(jnp.float32)
    pl = wireless.path_loss_db(d2d, los, params.carrier_hz, params.bs_height_m, params.ue_height_m, params.scenario)
    sigma = jnp.where(los > 0.5, params.shadowing_std_los_db, params.shadowing_std_nlos_db)
    noise_dbm = wireless.thermal_noise_dbm(params.bandwidth_hz, params.noise_figure_db, params.noise_psd_dbm_hz)
    large = params.tx_power_dbm - pl - sigma * z_shadow - noise_dbm
    gain = jnp.maximum(fading[0] ** 2 + fading[1] ** 2, 1e-12)
    snr = large + 10.0 * jnp.log10(gain)
    est_scale = jnp.sqrt(jnp.maximum(1.0 - csi_rho**2, 0.0) + params.csi_error_std**2) * _SQRT_HALF
    est = csi_rho * fading + est_scale * csi
    est_gain = jnp.maximum(est[0] ** 2 + est[1] ** 2, 1e-12)
    return los, large, snr, large + 10.0 * jnp.log10(est_gain)


def _evolve_channel(params: EnvParams, ch: ChannelState, n: StepNoise) -> ChannelState:
    """One inter-request interval: move, update latents and fading, measure, push the estimate."""
    heading = ch.heading + params.heading_std_rad * n.turn
    step = ch.speed * params.slot_s
    w = params.area_half_width_m
    x = ch.pos[0] + step * jnp.cos(heading)
    y = ch.pos[1] + step * jnp.sin(heading)
    # Specular reflection at the area edges (one reflection per axis suffices: step < w).
    out_x = jnp.abs(x) > w
    x = jnp.where(x > w, 2.0 * w - x, jnp.where(x < -w, -2.0 * w - x, x))
    heading = jnp.where(out_x, jnp.pi - heading, heading)
    out_y = jnp.abs(y) > w
    y = jnp.where(y > w, 2.0 * w - y, jnp.where(y < -w, -2.0 * w - y, y))
    heading = jnp.where(out_y, -heading, heading)
    pos = jnp.stack([x, y])
    z_los = ch.a_los * ch.z_los + jnp.sqrt(1.0 - ch.a_los**2) * n.z_los
    z_shadow = ch.a_shadow * ch.z_shadow + jnp.sqrt(1.0 - ch.a_shadow**2) * n.z_shadow
    fading = ch.rho * ch.fading + jnp.sqrt(1.0 - ch.rho**2) * _SQRT_HALF * n.fading
    los, large, snr, est = _measure(params, pos, z_los, z_shadow, fading, ch.csi_rho, n.csi)
    history = jnp.concatenate([est[None], ch.est_snr_db[:-1]])
    return ch.replace(
        pos=pos, heading=heading, z_los=z_los, z_shadow=z_shadow, fading=fading, los=los,
        large_scale_snr_db=large, snr_db=snr, est_snr_db=history,
    )


def init_core(params: EnvParams, key: Array, noise: ResetNoise) -> MEGCore:
    """Initial state of an episode from its reset noise (pure; shared with the NumPy reference).

    The channel starts H-1 requests before the episode and is evolved through
    ``noise.warmup`` so the estimate history holds genuine past estimates.

    Args:
      params: environment parameters.
      key: the episode key stored in the state (step noise is ``episode_step_noise(key, t)``).
      noise: one reset's draws.
    """
    speed = params.speed_min_mps + noise.speed_u * (params.speed_max_mps - params.speed_min_mps)
    pos = (2.0 * noise.pos_u - 1.0) * params.area_half_width_m
    moved = speed * params.slot_s
    rho = wireless.fading_correlation(speed, params.carrier_hz, params.slot_s)
    csi_rho = wireless.fading_correlation(speed, params.carrier_hz, params.csi_delay_s)
    fading = _SQRT_HALF * noise.fading
    los, large, snr, est = _measure(params, pos, noise.z_los, noise.z_shadow, fading, csi_rho, noise.csi)
    ch = ChannelState(
        pos=pos,
        heading=2.0 * jnp.pi * noise.heading_u,
        speed=speed,
        rho=rho,
        csi_rho=csi_rho,
        a_shadow=wireless.gudmundson_correlation(moved, params.shadowing_decorrelation_m),
        a_los=wireless.gudmundson_correlation(moved, params.los_decorrelation_m),
        z_los=noise.z_los,
        z_shadow=noise.z_shadow,
        fading=fading,
        los=los,
        large_scale_snr_db=large,
        snr_db=snr,
        est_snr_db=jnp.full((params.history_length,), est),
    )
    if params.history_length > 1:
        ch, _ = jax.lax.scan(lambda c, n: (_evolve_channel(params, c, n), None), ch, noise.warmup)
    return MEGCore(
        channel=ch,
        task_class=_sample_class(params.task_cdf, noise.task_u),
        t=jnp.zeros((), jnp.int32),
        cum_costs=jnp.zeros((2,), jnp.float32),
        cum_quality=jnp.zeros((), jnp.float32),
        key=key,
    )


# ------------------------------------------------------------------------- pricing
def _bracket_index(grid: Array, x: Array) -> Array:
    """Lower index i in [0, n-2] of ``x`` on an increasing ``grid`` (clamped at the ends)."""
    return jnp.sum(x >= grid[1:-1]).astype(jnp.int32)


def _pairs(v: Array) -> Array:
    """[n, ...] -> [n-1, 2, ...]: (v[i], v[i+1]) side by side."""
    return jnp.stack([v[:-1], v[1:]], axis=1)


def price_action(params: EnvParams, snr_db: Array, task_class: Array, k_idx: Array, r: Array) -> dict[str, Array]:
    """Quality and costs of (K option ``k_idx``, merge ratio ``r``) at true ``snr_db``.

    Quality is bilinear in (r, SNR clamped to the grid); per-r costs linear in r; the rate
    uses max(SNR, ``snr_floor_db``). Tables are packed so that each request needs four
    gathers (gathers dominate on CPU); the packing acts on the unbatched params, so under
    ``vmap`` it runs once per call, not per env.

    Returns a dict of scalars: ``accuracy``, ``psnr_db``, ``quality`` (the reward),
    ``latency_s``, ``energy_j``, ``tx_time_s``.
    """
    # Per merge-ratio interval: (r, payload, side bits, UE time, UE energy) at both ends.
    per_r = jnp.stack(
        [params.merge_ratios, params.payload, params.side_info_bits, params.ue_time_s, params.ue_energy_j], axis=-1
    )
    ri = _bracket_index(params.merge_ratios, r)
    lo, hi = _pairs(per_r)[ri]  # [5] each
    wr = jnp.clip((r - lo[0]) / (hi[0] - lo[0]), 0.0, 1.0)
    payload, side, ue_time, ue_energy = ((1.0 - wr) * lo + wr * hi)[1:]
    snr_q = jnp.clip(snr_db, params.snr_grid_db[0], params.snr_grid_db[-1])
    si = _bracket_index(params.snr_grid_db, snr_q)
    s_lo, s_hi = _pairs(params.snr_grid_db)[si]
    ws = jnp.clip((snr_q - s_lo) / (s_hi - s_lo), 0.0, 1.0)
    # Quality corners [K, R-1, S-1, C, 2 (snr lo/hi), 2 (r lo/hi), 2 (acc, psnr)].
    t = params.quality_table
    corners = jnp.stack(
        [
            jnp.stack([t[:, :-1, :-1], t[:, 1:, :-1]], axis=-2),  # SNR low end: r low, r high
            jnp.stack([t[:, :-1, 1:], t[:, 1:, 1:]], axis=-2),  # SNR high end
        ],
        axis=-3,
    )
    c = corners[k_idx, ri, si, task_class]  # [2 (snr), 2 (r), 2]
    q_lo_s = (1.0 - wr) * c[0, 0] + wr * c[0, 1]
    q_hi_s = (1.0 - wr) * c[1, 0] + wr * c[1, 1]
    acc, psnr = (1.0 - ws) * q_lo_s + ws * q_hi_s
    quality = (1.0 - params.reward_psnr_weight) * acc + params.reward_psnr_weight * psnr / params.psnr_scale_db
    tx = pricing.artifact_air_time_s(
        payload, side, params.bandwidth_hz, snr_db, params.snr_floor_db, "analog" if params.analog else "digital"
    )
    latency, energy = pricing.request_costs(params.es_time_s[k_idx], tx, ue_time, ue_energy, params.ue_receive_power_w)
    return {"accuracy": acc, "psnr_db": psnr, "quality": quality, "latency_s": latency, "energy_j": energy, "tx_time_s": tx}


def continuous_to_choice(params: EnvParams, action: Array) -> tuple[Array, Array]:
    """[-1, 1]² → (index of the nearest K option, r in [0, r_max])."""
    a = jnp.clip(action, -1.0, 1.0)
    num_k = params.steps.shape[-1]
    k_idx = jnp.round(0.5 * (a[0] + 1.0) * (num_k - 1)).astype(jnp.int32)
    return k_idx, 0.5 * (a[1] + 1.0) * params.max_merge_ratio


def discrete_to_choice(params: EnvParams, action: Array) -> tuple[Array, Array]:
    """Index ``k_idx * R + r_idx`` (shape [] or [1]) → (k_idx, merge_ratios[r_idx])."""
    num_r = params.merge_ratios.shape[-1]
    idx = jnp.clip(jnp.reshape(action, ()).astype(jnp.int32), 0, params.num_actions - 1)
    return idx // num_r, params.merge_ratios[idx % num_r]


# ------------------------------------------------------------------ transition, obs
def observe(params: EnvParams, core: MEGCore) -> Array:
    """Observation vector [obs_dim] (layout in the module docstring)."""
    grid = params.snr_grid_db
    mid, half = 0.5 * (grid[0] + grid[-1]), 0.5 * (grid[-1] - grid[0])
    ch = core.channel
    horizon = params.episode_length.astype(jnp.float32)
    return jnp.concatenate([
        (ch.est_snr_db - mid) / half,
        ((ch.large_scale_snr_db - mid) / half)[None],
        (ch.speed / params.speed_max_mps)[None],
        (jnp.arange(params.num_classes) == core.task_class).astype(jnp.float32),
        (core.t.astype(jnp.float32) / horizon)[None],
        core.cum_costs / (params.limits * horizon),
    ]).astype(jnp.float32)


def transition(
    params: EnvParams, core: MEGCore, k_idx: Array, r: Array, noise: StepNoise
) -> tuple[MEGCore, dict[str, Array]]:
    """Serves the current request with (K option ``k_idx``, ratio ``r``) and moves on (pure).

    Returns:
      The next core state and the request's outcome: :func:`price_action`'s dict plus
      ``steps`` (K), ``merge_ratio`` (r) and ``snr_db`` (the SNR it was priced at).
    """
    out = price_action(params, core.channel.snr_db, core.task_class, k_idx, r)
    out = {**out, "steps": params.steps[k_idx], "merge_ratio": r, "snr_db": core.channel.snr_db}
    costs = jnp.stack([out["latency_s"], out["energy_j"]])
    nxt = MEGCore(
        channel=_evolve_channel(params, core.channel, noise),
        task_class=_sample_class(params.task_cdf, noise.task_u),
        t=core.t + 1,
        cum_costs=core.cum_costs + costs,
        cum_quality=core.cum_quality + out["quality"],
        key=core.key,
    )
    return nxt, out


# ---------------------------------------------------------------------- brax Env
def reset_env(params: EnvParams, rng: Array) -> State:
    """``Env.reset`` as a pure function of (params, key)."""
    # The episode key is rng itself: step t draws counters 8t..8t+7 under it, the reset
    # draws under fold_in(rng, RESET_STREAM) (fewer random calls keep compile times low).
    core = init_core(params, rng, sample_reset_noise(jax.random.fold_in(rng, RESET_STREAM), params.history_length))
    zero = jnp.zeros((), jnp.float32)
    return State(
        pipeline_state=core,
        obs=observe(params, core),
        reward=zero,
        done=zero,
        metrics={k: zero for k in METRIC_KEYS},
        info={"cost": zero, "costs": jnp.zeros((2,), jnp.float32)},
    )


def step_env(params: EnvParams, state: State, action: Array, discrete: bool = False) -> State:
    """``Env.step`` as a pure function; keeps every ``info`` key that wrappers added."""
    core: MEGCore = state.pipeline_state
    k_idx, r = discrete_to_choice(params, action) if discrete else continuous_to_choice(params, action)
    nxt, out = transition(params, core, k_idx, r, episode_step_noise(core.key, core.t))
    costs = jnp.stack([out["latency_s"], out["energy_j"]])
    n = nxt.t.astype(jnp.float32)
    metrics = {
        "quality": out["quality"],
        "accuracy": out["accuracy"],
        "psnr_db": out["psnr_db"],
        "latency_s": out["latency_s"],
        "energy_j": out["energy_j"],
        "steps": out["steps"],
        "merge_ratio": out["merge_ratio"],
        "snr_db": out["snr_db"],
        "avg_quality": nxt.cum_quality / n,
        "avg_latency_s": nxt.cum_costs[0] / n,
        "avg_energy_j": nxt.cum_costs[1] / n,
    }
    info = {**state.info, "cost": jnp.dot(costs, params.cost_weights), "costs": costs}
    return state.replace(
        pipeline_state=nxt,
        obs=observe(params, nxt),
        reward=out["quality"],
        done=jnp.zeros_like(state.done),
        metrics={k: metrics[k].astype(jnp.float32) for k in METRIC_KEYS},
        info=info,
    )


class MEGEnv(Env):
    """The MEG CMDP for one UE (batch it with ``VmapWrapper``; see :func:`meg_jax.env.make`).

    ``reset``/``step`` close over ``self.params``; to sweep parameters under one trace, call
    :func:`reset_env` / :func:`step_env` with ``params`` as a jit argument, or rebuild the env
    inside the jitted function with :meth:`with_params` (``wrappers.replace_params`` does this
    for a wrapped stack).
    """

    def __init__(self, params: EnvParams, discrete: bool = False, config: MEGEnvConfig | None = None):
        self.params = params
        self.discrete = discrete
        self.config = config
        self.limit_report: LimitReport | None = None  # set by meg_jax.env.make: how the limits were chosen

    def with_params(self, params: EnvParams) -> "MEGEnv":
        return MEGEnv(params, self.discrete, self.config)

    def reset(self, rng: Array) -> State:
        return reset_env(self.params, rng)

    def step(self, state: State, action: Array) -> State:
        return step_env(self.params, state, action, self.discrete)

    @property
    def observation_size(self) -> int:
        return self.params.obs_dim

    @property
    def action_size(self) -> int:
        """2 for the continuous action; 1 (one integer index) for the discrete one."""
        return 1 if self.discrete else 2

    @property
    def num_actions(self) -> int:
        """Number of discrete actions K x R (the discrete policy's logits)."""
        return self.params.num_actions

    @property
    def backend(self) -> str:
        return "jax"


# ------------------------------------------------------------- tables and limits
def grid_action_table(params: EnvParams, snr_db: Array, task_class: Array) -> tuple[Array, Array]:
    """Quality and costs of every discrete action at given requests (perfect knowledge).

    Args:
      snr_db: [M] true SNRs (dB); task_class: [M] int classes.
    Returns:
      quality [M, A] and costs [M, A, 2] (latency s, energy J), A = K x R in the discrete
      action order ``k_idx * R + r_idx``.
    """
    idx = jnp.arange(params.num_actions)

    def one(s, c):
        def act(i):
            k, r = discrete_to_choice(params, i)
            out = price_action(params, s, c, k, r)
            return out["quality"], jnp.stack([out["latency_s"], out["energy_j"]])

        return jax.vmap(act)(idx)

    return jax.vmap(one)(snr_db, task_class)


def stationary_channel_samples(params: EnvParams, key: Array, num: int) -> tuple[Array, Array]:
    """True SNR (dB) and task class of ``num`` independent requests [num].

    Draws from the distribution of a fresh episode's first request (uniform position,
    stationary LOS/shadowing latents and fading), which is also the stationary distribution
    of the dynamics. Cheaper to compile than a full reset (no history warm-up).
    """

    def one(k: Array) -> tuple[Array, Array]:
        u = _uniform_open(k, (8,))
        z = jnp.sqrt(2.0) * jax.lax.erf_inv(u[3:7])
        pos = u[0:2] * params.area_half_width_m
        _, _, snr, _ = _measure(params, pos, z[0], z[1], _SQRT_HALF * z[2:4], jnp.float32(1.0), jnp.zeros(2))
        return snr, _sample_class(params.task_cdf, 0.5 * (u[7] + 1.0))

    return jax.vmap(one)(jax.random.split(key, num))


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
    """Absolute path of an artifact: as given, else relative to the cwd, else to the repo root."""
    if os.path.isabs(path):
        return path
    if os.path.exists(path):
        return os.path.abspath(path)
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo_root, path)
