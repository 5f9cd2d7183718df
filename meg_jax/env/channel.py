"""The MEG environment's channel: noise draws, UE mobility, path loss, shadowing, fading, CSI.

Pure functions of (params, state, noise) shared with the NumPy reference test: the dynamics
are described in ``meg_env``'s module docstring (models in ``wireless.py``, facts in
``reference/wireless.md``). ``episode_step_noise`` draws request ``t``'s noise from the
episode key (counter-mode threefry); ``init_core`` starts an episode from its reset noise.
"""

from __future__ import annotations

import jax
import jax.extend.random  # noqa: F401  (threefry_2x32)
import jax.numpy as jnp
from jax import Array

from meg_jax.env import wireless
from meg_jax.env.state import _SQRT_HALF, ChannelState, EnvParams, MEGCore, ResetNoise, StepNoise

__all__ = [
    "paper_channel",
    "sample_step_noise",
    "episode_step_noise",
    "sample_reset_noise",
    "init_core",
    "stationary_channel_samples",
]


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


def _sample_prompt(task_cdf: Array, u: Array, num_prompts: int) -> Array:
    """The prompt (of ``num_prompts``, uniform) of the class that ``u`` draws in :func:`_sample_class`.

    Where ``u`` falls inside its class's interval [cdf[c-1], cdf[c]) is itself uniform on
    [0, 1) and independent of the class, so it picks the prompt: one uniform draws both
    (the step noise and its key discipline stay as they were; class-mean envs draw the
    same channels and classes as replay envs under the same keys).
    """
    if num_prompts == 1:
        return jnp.zeros(jnp.shape(u), jnp.int32)
    bounds = task_cdf[:-1]
    passed = u >= bounds  # the class boundaries below u (the class is their count)
    lo = jnp.max(jnp.where(passed, bounds, 0.0), initial=0.0)  # start of the drawn class's interval
    hi = jnp.min(jnp.where(passed, 1.0, bounds), initial=1.0)  # its end (> lo: u lies inside)
    within = (u - lo) / (hi - lo)
    return jnp.clip(jnp.floor(within * num_prompts), 0, num_prompts - 1).astype(jnp.int32)


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


def paper_channel(params: EnvParams, u: Array) -> tuple[Array, Array]:
    """The paper's channel for a uniform draw ``u`` in [0, 1): (distance m, gain-to-noise dB).

    d = d_min + u (d_max - d_min); PL = a + b log10(d) dB; SNR = P_tx - PL - N0 (dBm, dB).
    No shadowing, no fading, no mobility: each request draws its own distance.
    """
    pp = params.paper
    d = pp.distance_min_m + u * (pp.distance_max_m - pp.distance_min_m)
    snr = pp.tx_power_dbm - (pp.path_loss_a_db + pp.path_loss_b_db * jnp.log10(d)) - pp.noise_dbm
    return d, snr


def _paper_channel_state(params: EnvParams, ch: ChannelState, u: Array) -> ChannelState:
    d, snr = paper_channel(params, u)
    return ch.replace(pos=jnp.stack([d, jnp.zeros_like(d)]), large_scale_snr_db=snr, snr_db=snr,
                      est_snr_db=jnp.full((params.history_length,), snr))


def _evolve_channel(params: EnvParams, ch: ChannelState, n: StepNoise) -> ChannelState:
    """One inter-request interval: move, update latents and fading, measure, push the estimate.

    ``system == "paper"``: a fresh distance per request from u = Φ(``n.z_shadow``) (the
    normal's CDF makes it uniform; that system has no shadowing to use it for).
    """
    if params.system == "paper":
        return _paper_channel_state(params, ch, jax.scipy.special.ndtr(n.z_shadow))
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
    if params.system == "paper":  # the first request's distance from pos_u[0]; nothing else is random
        zero = jnp.zeros((), jnp.float32)
        ch = ChannelState(
            pos=jnp.zeros((2,), jnp.float32), heading=zero, speed=zero, rho=zero, csi_rho=zero, a_shadow=zero,
            a_los=zero, z_los=zero, z_shadow=zero, fading=jnp.zeros((2,), jnp.float32), los=zero,
            large_scale_snr_db=zero, snr_db=zero, est_snr_db=jnp.zeros((params.history_length,), jnp.float32),
        )
        return _new_core(params, _paper_channel_state(params, ch, noise.pos_u[0]), noise.task_u, key)
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
    return _new_core(params, ch, noise.task_u, key)


def _new_core(params: EnvParams, ch: ChannelState, task_u: Array, key: Array) -> MEGCore:
    return MEGCore(
        channel=ch,
        task_class=_sample_class(params.task_cdf, task_u),
        prompt=_sample_prompt(params.task_cdf, task_u, params.prompts_per_class),
        t=jnp.zeros((), jnp.int32),
        cum_costs=jnp.zeros((2,), jnp.float32),
        cum_quality=jnp.zeros((), jnp.float32),
        last_costs=jnp.zeros((2,), jnp.float32),
        key=key,
    )


def stationary_channel_samples(params: EnvParams, key: Array, num: int, with_prompt: bool = False) -> tuple[Array, ...]:
    """True SNR (dB) and task class of ``num`` independent requests [num].

    Draws from the distribution of a fresh episode's first request (uniform position,
    stationary LOS/shadowing latents and fading), which is also the stationary distribution
    of the dynamics. Cheaper to compile than a full reset (no history warm-up).
    ``with_prompt`` (static) also returns each request's prompt index [num] (0 unless replay).
    """

    def one(k: Array) -> tuple[Array, ...]:
        u = _uniform_open(k, (8,))
        task_u = 0.5 * (u[7] + 1.0)
        request = (_sample_class(params.task_cdf, task_u),)
        if with_prompt:
            request += (_sample_prompt(params.task_cdf, task_u, params.prompts_per_class),)
        if params.system == "paper":
            return (paper_channel(params, 0.5 * (u[0] + 1.0))[1],) + request
        z = jnp.sqrt(2.0) * jax.lax.erf_inv(u[3:7])
        pos = u[0:2] * params.area_half_width_m
        _, _, snr, _ = _measure(params, pos, z[0], z[1], _SQRT_HALF * z[2:4], jnp.float32(1.0), jnp.zeros(2))
        return (snr,) + request

    return jax.vmap(one)(jax.random.split(key, num))
