"""The MEG constrained MDP on brax's ``Env`` API: one episode = T generation requests of one UE.

Per request the agent picks the denoising steps K and the merge ratio r; the reward is the
calibrated image quality, the costs are the request's latency (s) and energy (J, the UE's or
the whole system's); the constraint is that their episode averages stay below
``EnvParams.limits``. Between two
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
* task class of each request drawn from ``task_class_probs``; with ``quality_source="replay"``
  also one of the class's P calibration prompts, uniformly (``MEGCore.prompt``; not observed).

Pricing of (K, r) at the request's true SNR and class: quality bilinear in (r, SNR) (SNR
clamped to the artifact's grid), K the nearest option, read from the class's mean row or
(replay) the prompt's own row; the reward is the ``reward_metric`` reading; costs per
``meg_jax.meg.artifact`` with the Shannon rate computed at max(SNR, ``snr_floor_db``), energy
the UE's (``energy_scope="ue"``) or the whole system's (``"system"``: + ES compute and
radiated transmit energy). See ``docs/replay.md``.

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

``system == "paper"`` (the paper's environment, ``config.PaperSystem``) replaces the channel
by an i.i.d. distance per request, the pricing by the authors' formulas
(:func:`price_action_paper`), the continuous action map by theirs and the observation by
theirs: (gain-to-noise ratio, previous latency, previous energy), ``obs_dim = 3``.

Randomness is injectable: ``init_core(params, key, ResetNoise)`` and
``transition(params, core, k_idx, r, StepNoise)`` are pure functions of their noise, shared
with the NumPy reference test; ``MEGEnv`` draws the noise from the episode key and the
request index (counter-mode threefry, :func:`episode_step_noise`). Actions: continuous ``[-1, 1]²`` → (K = nearest option to (a0 + 1)/2 (K-1)
as an index, r = (a1 + 1)/2 · r_max), or (``discrete=True``) one int index
``k_idx * R + r_idx`` over the artifact's K x R grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from brax.envs.base import Env, State
from jax import Array

from meg_jax.env.channel import (  # re-exported below: the public import paths stay
    _evolve_channel,
    _measure,
    _sample_class,
    _sample_prompt,
    episode_step_noise,
    init_core,
    sample_reset_noise,
    sample_step_noise,
    stationary_channel_samples,
)
from meg_jax.env import state as _state
from meg_jax.env.config import MEGEnvConfig
from meg_jax.env.state import (
    METRIC_KEYS,
    RESET_STREAM,
    ChannelState,
    EnvParams,
    MEGCore,
    ResetNoise,
    StepNoise,
    observation_fields,
)
from meg_jax.meg import pricing

# the state types keep their old import path (``meg_env.EnvParams`` ...): re-exported
__all__ = [n for n in _state.__all__ if n != "RESET_STREAM"] + [
    "MEGEnv",
    "build_params",
    "sample_step_noise",
    "episode_step_noise",
    "sample_reset_noise",
    "init_core",
    "transition",
    "price_action",
    "price_action_paper",
    "price_on_grid",
    "observe",
    "continuous_to_choice",
    "discrete_to_choice",
    "grid_action_table",
    "stationary_channel_samples",
    "derive_limits",
]



# ------------------------------------------------------------------------- pricing
def _bracket_index(grid: Array, x: Array) -> Array:
    """Lower index i in [0, n-2] of ``x`` on an increasing ``grid`` (clamped at the ends)."""
    return jnp.sum(x >= grid[1:-1]).astype(jnp.int32)


def _pairs(v: Array) -> Array:
    """[n, ...] -> [n-1, 2, ...]: (v[i], v[i+1]) side by side."""
    return jnp.stack([v[:-1], v[1:]], axis=1)


def price_action(
    params: EnvParams, snr_db: Array, task_class: Array, k_idx: Array, r: Array, prompt: Array | None = None
) -> dict[str, Array]:
    """Quality and costs of (K option ``k_idx``, merge ratio ``r``) at true ``snr_db``.

    Dispatches on the system: :func:`price_action_paper` for ``system == "paper"``, else the
    artifact's pricing (:func:`price_on_grid`). ``prompt``: the request's prompt index
    within its class, needed with ``quality_source="replay"`` (see :func:`price_on_grid`).
    """
    if params.system == "paper":
        return price_action_paper(params, snr_db, task_class, k_idx, r, prompt)
    return price_on_grid(params, snr_db, task_class, k_idx, r, prompt)


def price_action_paper(
    params: EnvParams, snr_db: Array, task_class: Array, k_idx: Array, r: Array, prompt: Array | None = None
) -> dict[str, Array]:
    """The paper's environment: quality from the tables, costs by the authors' formulas.

    Quality is read at the SNR the feature noise maps to (``paper.quality_snr_db``), not at
    the channel's (the authors' feature noise is not tied to the channel); the tables were
    resampled to the paper's K options and r grid by ``build_params``. Costs
    (``meg_jax.env.config.PaperSystem``)::

        merged = min(floor(r N_tok), N_src);  kept = (N_tok - merged) V_tok
        bits = (kept + (L - kept) map_fraction) value_bits;  rate = B log2(1 + 10^(snr/10))
        latency = bits / rate + ES TFLOP s_ES + UE TFLOP s_UE + base
        energy = (ES TFLOP e_ES + UE TFLOP e_UE + P_tx bits / rate + bias) / 10

    Returns :func:`price_on_grid`'s keys (``tx_time_s`` = air time) plus every cost term:
    ``payload_bits``, ``rate_bps``, ``es_time_s``, ``ue_time_s``, ``es_energy``,
    ``ue_energy``, ``tx_energy`` (energies in hJ, before the division by 10).
    """
    pp = params.paper
    out = price_on_grid(params, pp.quality_snr_db, task_class, k_idx, r, prompt)
    merged = jnp.minimum(jnp.floor(r * pp.num_tokens), pp.max_merged)
    kept = (pp.num_tokens - merged) * pp.token_values
    bits = (kept + (pp.latent_values - kept) * pp.map_fraction) * pp.value_bits
    rate = pp.bandwidth_hz * jnp.log2(1.0 + jnp.power(10.0, snr_db / 10.0))
    air = bits / rate
    es_tflop = pp.unet_tflop_per_step * params.steps[k_idx] + pp.text_tflop
    es_time, ue_time = es_tflop * pp.es_s_per_tflop, pp.vae_tflop * pp.ue_s_per_tflop
    es_energy, ue_energy, tx_energy = es_tflop * pp.es_hj_per_tflop, pp.vae_tflop * pp.ue_hj_per_tflop, pp.tx_power_w * air
    return {
        **out,
        "latency_s": air + es_time + ue_time + pp.base_delay_s,
        "energy_j": (es_energy + ue_energy + tx_energy + pp.bias_energy_hj) / 10.0,
        "tx_time_s": air,
        "payload_bits": bits,
        "rate_bps": rate,
        "es_time_s": es_time,
        "ue_time_s": ue_time,
        "es_energy": es_energy,
        "ue_energy": ue_energy,
        "tx_energy": tx_energy,
    }


def _quality_cell(params: EnvParams, task_class: Array, prompt: Array | None) -> Array:
    """Index c x P + p of the request's row of the quality table (class-major)."""
    num_prompts = params.prompts_per_class
    if num_prompts == 1:
        return task_class
    if prompt is None:
        raise ValueError(
            f"this environment replays {num_prompts} prompts per class (quality_source='replay'): pricing a "
            "request needs its prompt index (MEGCore.prompt); pass prompt=")
    return task_class * num_prompts + prompt


def price_on_grid(
    params: EnvParams, snr_db: Array, task_class: Array, k_idx: Array, r: Array, prompt: Array | None = None
) -> dict[str, Array]:
    """Quality and costs of (K option ``k_idx``, merge ratio ``r``) at true ``snr_db`` (artifact pricing).

    Quality is bilinear in (r, SNR clamped to the grid) at the request's quality cell (its
    class, or with replay its class's ``prompt``-th calibration prompt); per-r costs linear
    in r; the rate uses max(SNR, ``snr_floor_db``). Tables are packed so that each request
    needs four gathers (gathers dominate on CPU); the packing acts on the unbatched params,
    so under ``vmap`` it runs once per call, not per env.

    Reward: ``(1 - w) acc + w psnr / psnr_scale_db + reward_offset`` (``build_params`` sets
    w, the scale and the offset from ``reward_metric``). Energy (``energy_scope``)::

        ue:      UE compute energy(r) + UE receive power x air time
        system:  ue + ES power x ES compute time(K) + P_tx (W) x air time

    Returns a dict of scalars: ``accuracy`` (the accuracy reading: the pixel reading's with
    ``reward_metric="pixel_accuracy"``), ``psnr_db``, ``quality`` (the reward),
    ``latency_s``, ``energy_j``, ``tx_time_s`` and the energy terms ``ue_compute_energy_j``,
    ``ue_rx_energy_j`` (and with ``energy_scope="system"`` ``es_compute_energy_j``,
    ``es_tx_energy_j``), J.
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
    # The four quality corners in one gather: the [2 (r lo/hi), 2 (snr lo/hi), 2 (acc, psnr)]
    # window at (k, ri, si, cell); no packed copy of the table (a replay table has ~1e6 entries).
    start = (k_idx, ri, si, _quality_cell(params, task_class, prompt), jnp.zeros_like(ri))
    c = jax.lax.dynamic_slice(params.quality_table, start, (1, 2, 2, 1, 2))[0, :, :, 0]
    q_lo_s = (1.0 - wr) * c[0, 0] + wr * c[1, 0]
    q_hi_s = (1.0 - wr) * c[0, 1] + wr * c[1, 1]
    acc, psnr = (1.0 - ws) * q_lo_s + ws * q_hi_s
    quality = (1.0 - params.reward_psnr_weight) * acc + params.reward_psnr_weight * psnr / params.psnr_scale_db
    quality = quality + params.reward_offset
    tx = pricing.artifact_air_time_s(
        payload, side, params.bandwidth_hz, snr_db, params.snr_floor_db, "analog" if params.analog else "digital"
    )
    es_time = params.es_time_s[k_idx]
    latency, energy = pricing.request_costs(es_time, tx, ue_time, ue_energy, params.ue_receive_power_w)
    out = {"accuracy": acc, "psnr_db": psnr, "quality": quality, "latency_s": latency, "energy_j": energy,
           "tx_time_s": tx, "ue_compute_energy_j": ue_energy, "ue_rx_energy_j": params.ue_receive_power_w * tx}
    if params.energy_scope == "system":
        es_compute = params.es_power_w * es_time
        es_tx = jnp.power(10.0, params.tx_power_dbm / 10.0 - 3.0) * tx  # P_tx: dBm -> W
        out.update(energy_j=energy + es_compute + es_tx, es_compute_energy_j=es_compute, es_tx_energy_j=es_tx)
    return out


def continuous_to_choice(params: EnvParams, action: Array) -> tuple[Array, Array]:
    """[-1, 1]² → (index of the nearest K option, r in [0, r_max]).

    ``system == "paper"``: the authors' map of u = (a + 1)/2 in [0, 1]²: K option
    ``floor((K - 1) u0)`` (K = int(8 u0) + 4 for K in 4..12, so K = 12 only at u0 = 1) and
    r = u1 r_max.
    """
    a = jnp.clip(action, -1.0, 1.0)
    num_k = params.steps.shape[-1]
    if params.system == "paper":
        u = 0.5 * (a + 1.0)
        return jnp.floor((num_k - 1) * u[0]).astype(jnp.int32), u[1] * params.max_merge_ratio
    k_idx = jnp.round(0.5 * (a[0] + 1.0) * (num_k - 1)).astype(jnp.int32)
    return k_idx, 0.5 * (a[1] + 1.0) * params.max_merge_ratio


def discrete_to_choice(params: EnvParams, action: Array) -> tuple[Array, Array]:
    """Index ``k_idx * R + r_idx`` (shape [] or [1]) → (k_idx, merge_ratios[r_idx])."""
    num_r = params.merge_ratios.shape[-1]
    idx = jnp.clip(jnp.reshape(action, ()).astype(jnp.int32), 0, params.num_actions - 1)
    return idx // num_r, params.merge_ratios[idx % num_r]


# ------------------------------------------------------------------ transition, obs
def observe(params: EnvParams, core: MEGCore) -> Array:
    """Observation vector [obs_dim] (layout in the module docstring).

    ``system == "paper"``: the authors' (gain-to-noise ratio now (linear), previous request's
    latency (s), previous request's energy), zeros before the first request.
    """
    if params.system == "paper":
        return jnp.concatenate([jnp.power(10.0, core.channel.snr_db / 10.0)[None], core.last_costs]).astype(jnp.float32)
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
    out = price_action(params, core.channel.snr_db, core.task_class, k_idx, r, core.prompt)
    out = {**out, "steps": params.steps[k_idx], "merge_ratio": r, "snr_db": core.channel.snr_db}
    costs = jnp.stack([out["latency_s"], out["energy_j"]])
    nxt = MEGCore(
        channel=_evolve_channel(params, core.channel, noise),
        task_class=_sample_class(params.task_cdf, noise.task_u),
        prompt=_sample_prompt(params.task_cdf, noise.task_u, params.prompts_per_class),
        t=core.t + 1,
        cum_costs=core.cum_costs + costs,
        cum_quality=core.cum_quality + out["quality"],
        last_costs=costs,
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
    def action_coordinates(self) -> np.ndarray:
        """[K x R, 2] float32 (steps K, merge ratio r) of every discrete action, each mapped
        linearly onto [-1, 1] over its grid (a one-point grid maps to 0), in the action order
        ``k_idx * R + r_idx``: the inputs of critics that read an action by where it lies on
        the grid (``cvpo.discrete_critic="coordinates"``) instead of by its index."""
        steps = np.asarray(self.params.steps, np.float64)
        ratios = np.asarray(self.params.merge_ratios, np.float64)

        def unit(v: np.ndarray) -> np.ndarray:
            span = v.max() - v.min()
            return np.zeros_like(v) if span == 0 else 2.0 * (v - v.min()) / span - 1.0

        k, r = np.meshgrid(unit(steps), unit(ratios), indexing="ij")  # [K, R]: k_idx major
        return np.stack([k.ravel(), r.ravel()], axis=-1).astype(np.float32)

    @property
    def backend(self) -> str:
        return "jax"


# ------------------------------------------------------------- tables and limits
def grid_action_table(
    params: EnvParams, snr_db: Array, task_class: Array, prompt: Array | None = None
) -> tuple[Array, Array]:
    """Quality and costs of every discrete action at given requests (perfect knowledge).

    Args:
      snr_db: [M] true SNRs (dB); task_class: [M] int classes; prompt: [M] int prompt
        indices within the class (``MEGCore.prompt``), required with ``quality_source="replay"``:
        the quality is then that prompt's (the oracle knows it; the agent does not).
    Returns:
      quality [M, A] and costs [M, A, 2] (latency s, energy J), A = K x R in the discrete
      action order ``k_idx * R + r_idx``.
    """
    idx = jnp.arange(params.num_actions)
    _quality_cell(params, jnp.int32(0), None if prompt is None else jnp.int32(0))  # replay without prompt: raise
    prompt = jnp.zeros_like(task_class) if prompt is None else prompt

    def one(s, c, p):
        def act(i):
            k, r = discrete_to_choice(params, i)
            out = price_action(params, s, c, k, r, p)
            return out["quality"], jnp.stack([out["latency_s"], out["energy_j"]])

        return jax.vmap(act)(idx)

    return jax.vmap(one)(snr_db, task_class, prompt)


# Limits and params building import grid_action_table from here: imported last (re-exported).
from meg_jax.env.params import LimitReport, build_params, derive_limits, resolve_artifact_path  # noqa: E402
