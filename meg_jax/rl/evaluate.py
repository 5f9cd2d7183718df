"""One evaluation harness for every policy: learned agents, fixed (K, r), the oracle.

A policy is ``policy(state, key) -> action`` on the batched environment's brax ``State``
(learned agents read ``state.obs``; the oracle reads the true channel in
``state.pipeline_state``) or, to be scored with many parameter sets under one compilation,
``policy(policy_params, state, key)`` with ``policy_params`` passed to
:func:`evaluate_policy` / :func:`record_rollout` (e.g. :class:`LearnedPolicy`). The harness
runs ``num_episodes`` fresh episodes at once (one per environment slot, all from a fresh
reset with the given key), ``T`` requests each, inside one jitted ``lax.scan``, and reports
per-episode averages: the quality, each cost and its ratio to the limit. A policy is
feasible when the mean over episodes of each episode-average cost is at most
``limit x FEASIBILITY_TOLERANCE`` (the CMDP constraint is on the expectation). The gap
closed is ``(Q - Q_fixed) / (Q_oracle - Q_fixed)``.

**One compilation per environment shape and policy.** The rollout program takes the
environment's ``EnvParams``, the policy's parameters and the key as arguments; it is cached
on the environment's *signature* (wrapper stack, batch size, episode length, the static
fields and leaf shapes of ``EnvParams``) and the policy object. So seeds, checkpoints,
channel shifts and limit sweeps reuse one executable; a new environment object of the same
shape (e.g. rebuilt for the next seed) does too.

Environments with the same preset, overrides and key draw the same channels whatever the
actions (the channel ignores them), so policies evaluated with the same key face the same
requests. :func:`record_rollout` additionally records every request and the quality and
costs of **every** grid action at it (``grid_action_table``), so reference policies and the
conventional schemes are scored on exactly the requests the policy saw.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.rl.config import FEASIBILITY_TOLERANCE, EnvSpec

__all__ = [
    "EvalResult",
    "summarise",
    "make_env",
    "evaluate_policy",
    "gap_closed",
    "LearnedPolicy",
    "Rollout",
    "record_rollout",
    "ChannelShift",
    "DEFAULT_SHIFTS",
    "shift_params",
    "cost_weights_for",
    "DEFAULT_EPISODE_LENGTH",
    "FEASIBILITY_TOLERANCE",
]

# requests per episode when the spec leaves it open
DEFAULT_EPISODE_LENGTH = 32

Policy = Callable[..., jax.Array]


# ----------------------------------------------------------------------------- scores
@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Scores of one policy on fresh episodes (host floats).

    Attributes:
      episodes: number of episodes.
      quality: mean over episodes of the episode-average quality (reward per request).
      quality_se: its standard error.
      costs: mean over episodes of the episode-average costs (s, J).
      costs_over_limit: ``costs / limits``.
      feasible: every ``costs_over_limit <= tolerance``.
    """

    episodes: int
    quality: float
    quality_se: float
    costs: tuple[float, ...]
    costs_over_limit: tuple[float, ...]
    feasible: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def named(self) -> dict[str, Any]:
        """The MEG costs by name: ``quality``, ``quality_se``, ``latency_s``, ``energy_j``,
        ``latency_over_limit``, ``energy_over_limit``, ``feasible`` (JSON-ready)."""
        return {
            "quality": self.quality, "quality_se": self.quality_se,
            "latency_s": self.costs[0], "energy_j": self.costs[1],
            "latency_over_limit": self.costs_over_limit[0], "energy_over_limit": self.costs_over_limit[1],
            "feasible": self.feasible,
        }


def summarise(quality: np.ndarray, costs: np.ndarray, limits: np.ndarray,
              tolerance: float = FEASIBILITY_TOLERANCE) -> EvalResult:
    """Scores from per-episode averages (the one place the metric is defined).

    Args:
      quality: [E] episode-average quality, or [E, T] per-request quality (averaged over T).
      costs: [E, m] episode-average costs, or [E, T, m] per request.
      limits: [m] episode-average limits.
      tolerance: a policy is feasible if every mean cost <= limit x this.
    """
    q = np.asarray(quality, np.float64)
    c = np.asarray(costs, np.float64)
    if q.ndim == 2:
        q, c = q.mean(axis=1), c.mean(axis=1)
    e = q.shape[0]
    mean_costs = c.mean(axis=0)
    ratio = mean_costs / np.asarray(limits, np.float64)
    return EvalResult(
        episodes=int(e),
        quality=float(q.mean()),
        quality_se=float(q.std(ddof=1) / math.sqrt(e)) if e > 1 else 0.0,
        costs=tuple(float(x) for x in mean_costs),
        costs_over_limit=tuple(float(r) for r in ratio),
        feasible=bool(np.all(ratio <= tolerance)),
    )


def gap_closed(quality: float, fixed_quality: float, oracle_quality: float) -> float:
    """Fraction of the quality gap between the best fixed feasible (K, r) and the oracle closed."""
    gap = oracle_quality - fixed_quality
    if gap <= 0:
        return float("nan")
    return (quality - fixed_quality) / gap


# ----------------------------------------------------------------------- environments
def make_env(spec: EnvSpec, num_envs: Optional[int] = None, discrete: bool = False, artifact: Any = None) -> Any:
    """The batched environment of ``spec`` (``meg_jax.env.make``).

    Args:
      spec: preset, episode length, artifact and limits.
      num_envs: overrides ``spec.num_envs`` (evaluation uses one slot per episode).
      discrete: the discrete K x r action head.
      artifact: a ``CalibrationArtifact`` object that takes precedence over ``spec.artifact``;
        without one, ``spec.artifact == "synthetic"`` is ``meg_jax.meg.artifact.synthetic_artifact()``
        (deterministic: every caller gets the same tables).

    Raises:
      ValueError: unknown preset, or limits that no policy can meet (the reason is named).
    """
    import meg_jax.env as menv

    if artifact is None and spec.artifact == "synthetic":
        from meg_jax.meg.artifact import synthetic_artifact

        artifact = synthetic_artifact()
    overrides = {}
    if spec.limits is not None:
        overrides["limits"] = tuple(float(x) for x in spec.limits)
    for name in ("csi_delay_s", "csi_error_std"):
        if getattr(spec, name) is not None:
            overrides[name] = float(getattr(spec, name))
    for name in ("quality_source", "reward_metric", "energy_scope"):
        if getattr(spec, name) is not None:
            overrides[name] = getattr(spec, name)
    if spec.observe is not None:
        overrides["observe"] = spec.observe
    return menv.make(
        spec.preset,
        num_envs=spec.num_envs if num_envs is None else num_envs,
        episode_length=spec.episode_length or DEFAULT_EPISODE_LENGTH,
        artifact=artifact if artifact is not None else spec.artifact,
        discrete=discrete,
        **overrides,
    )


def _bottom(env: Any) -> Any:
    while hasattr(env, "env"):
        env = env.env
    return env


def _env_signature(env: Any) -> tuple:
    """What the compiled rollout depends on, besides the traced ``EnvParams`` leaves.

    The wrapper types with their plain settings (batch size, episode length, discrete) and
    the tree structure (static fields included) and leaf shapes of the params. An env whose
    bottom has no ``params`` is keyed by identity.
    """
    parts = []
    e = env
    while True:
        plain = tuple(sorted((k, v) for k, v in vars(e).items()
                             if isinstance(v, (bool, int, float, str, type(None)))))
        parts.append((type(e), plain))
        if not hasattr(e, "env"):
            break
        e = e.env
    params = getattr(e, "params", None)
    if params is None or not hasattr(e, "with_params"):
        return ("identity", id(env))
    leaves, treedef = jax.tree.flatten(params)
    return tuple(parts), treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves)


_PROGRAMS: "collections.OrderedDict[tuple, Callable]" = collections.OrderedDict()
_MAX_PROGRAMS = 32  # compiled rollouts kept (least recently used dropped)


def _rollout_program(env: Any, policy: Policy, parametrised: bool, record: bool) -> Callable:
    """The jitted ``run(env_params, policy_params, key)`` of ``(env's signature, policy)``, cached."""
    sig = _env_signature(env)
    cache_key = (sig, policy, parametrised, record)
    program = _PROGRAMS.get(cache_key)
    if program is not None:
        _PROGRAMS.move_to_end(cache_key)
        return program
    from meg_jax.env import replace_params
    from meg_jax.env.meg_env import grid_action_table

    template = env
    by_identity = sig[0] == "identity"
    episode_length = int(env.episode_length)

    def run(env_params: Any, policy_params: Any, key: jax.Array):
        e = template if by_identity else replace_params(template, env_params)
        k_reset, k_run = jax.random.split(key)
        state = e.reset(k_reset)

        def body(s, k):
            a = policy(policy_params, s, k) if parametrised else policy(s, k)
            ns = e.step(s, a)
            if not record:
                return ns, None
            core = s.pipeline_state
            q, c = grid_action_table(env_params, core.channel.snr_db, core.task_class, core.prompt)
            rec = {
                "snr_db": core.channel.snr_db,
                "est_snr_db": core.channel.est_snr_db[:, 0],
                "task_class": core.task_class,
                "steps": ns.metrics["steps"],
                "merge_ratio": ns.metrics["merge_ratio"],
                "quality": ns.reward,
                "latency_s": ns.metrics["latency_s"],
                "energy_j": ns.metrics["energy_j"],
                "table_quality": q,
                "table_costs": c,
            }
            return ns, rec

        state, recs = jax.lax.scan(body, state, jax.random.split(k_run, episode_length))
        if record:
            return recs
        m = state.metrics
        return m["avg_quality"], jnp.stack([m["avg_latency_s"], m["avg_energy_j"]], axis=-1), state.done

    program = jax.jit(run)
    _PROGRAMS[cache_key] = program
    if len(_PROGRAMS) > _MAX_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return program


def evaluate_policy(
    env: Any, policy: Policy, key: jax.Array, *, policy_params: Any = None,
    tolerance: float = FEASIBILITY_TOLERANCE, jit: bool = True,
) -> EvalResult:
    """Runs ``env.num_envs`` fresh episodes of ``env.episode_length`` requests with ``policy``.

    Args:
      env: a batched ``meg_jax.env.make`` environment, one slot per episode.
      policy: ``policy(state, key) -> action`` for the whole batch, or, when
        ``policy_params`` is given, ``policy(policy_params, state, key)``. Pass the *same*
        policy object for every parameter set to reuse the compiled rollout.
      key: evaluation key (same key = same channels for every policy).
      policy_params: a pytree passed to the policy as a traced argument (actor weights).
      tolerance: feasibility factor on the limits.
      jit: compile the rollout (False only for debugging).

    Returns:
      the scores.
    """
    parametrised = policy_params is not None
    program = _rollout_program(env, policy, parametrised, record=False)
    env_params = getattr(_bottom(env), "params", None)
    fn = program if jit else program.__wrapped__
    quality, costs, done = jax.device_get(fn(env_params, policy_params, key))
    if not np.all(np.asarray(done) > 0.5):
        raise RuntimeError("evaluation episodes did not all end after episode_length steps")
    return summarise(quality, costs, np.asarray(env_params.limits, np.float64), tolerance)


# --------------------------------------------------------------------------- policies
@dataclasses.dataclass(frozen=True)
class LearnedPolicy:
    """An agent's ``act(actor_params, obs, key, deterministic)`` as a parametrised harness policy.

    Equal for equal ``(act, deterministic)``, so every checkpoint and seed of one agent
    shares one compiled rollout: call ``policy(actor_params, state, key)``.
    """

    act: Callable[..., jax.Array]
    deterministic: bool = False

    def __call__(self, actor_params: Any, state: Any, key: jax.Array) -> jax.Array:
        return self.act(actor_params, state.obs, key, self.deterministic)



# --------------------------------------------------------------------------- rollouts
@dataclasses.dataclass(frozen=True)
class Rollout:
    """Per-request records of E fresh episodes of T requests (host NumPy).

    ``A = K x R`` grid actions in the order ``k_idx * R + r_idx``.
    """

    snr_db: np.ndarray  # [E, T] true SNR of each request (dB)
    est_snr_db: np.ndarray  # [E, T] the agent's estimate of it (dB)
    task_class: np.ndarray  # [E, T] int task class
    steps: np.ndarray  # [E, T] K chosen by the policy
    merge_ratio: np.ndarray  # [E, T] r chosen by the policy
    quality: np.ndarray  # [E, T] reward (quality) of the chosen action
    latency_s: np.ndarray  # [E, T] (s)
    energy_j: np.ndarray  # [E, T] (J)
    table_quality: np.ndarray  # [E, T, A] quality of every grid action
    table_costs: np.ndarray  # [E, T, A, 2] latency (s), energy (J) of every grid action
    limits: np.ndarray  # [2] episode-average limits (s, J)
    grid_steps: np.ndarray  # [K]
    grid_ratios: np.ndarray  # [R]

    @property
    def episodes(self) -> int:
        return int(self.snr_db.shape[0])

    def result(self, tolerance: float = FEASIBILITY_TOLERANCE) -> EvalResult:
        """:func:`summarise` of the policy that made the rollout."""
        costs = np.stack([self.latency_s, self.energy_j], axis=-1)
        return summarise(self.quality, costs, self.limits, tolerance)


def _first_action(state: Any, key: jax.Array) -> jax.Array:
    """Grid action 0 in every slot (for a rollout that only records the tables)."""
    del key
    n = state.done.shape[0]
    return jnp.zeros((n,), jnp.int32)


def _first_action_continuous(state: Any, key: jax.Array) -> jax.Array:
    del key
    return jnp.zeros((state.done.shape[0], 2), jnp.float32)


def record_rollout(env: Any, key: jax.Array, policy: Optional[Policy] = None, *, policy_params: Any = None,
                   env_params: Any = None) -> Rollout:
    """Fresh episodes of ``env`` with every request recorded (host NumPy, [E, T, ...]).

    Args:
      env: a batched MEG environment (one slot per episode).
      key: evaluation key (``k_reset, k_run = split(key)``, as :func:`evaluate_policy`).
      policy: as in :func:`evaluate_policy`; None plays a fixed action (only the grid tables,
        which do not depend on the policy, matter then).
      policy_params: the policy's traced parameters (then ``policy(policy_params, state, key)``).
      env_params: ``EnvParams`` to run with instead of ``env``'s (a channel shift, other
        limits): the same compiled program serves every value.
    """
    if policy is None:
        discrete = bool(getattr(_bottom(env), "discrete", False))
        policy, policy_params = (_first_action if discrete else _first_action_continuous), None
    parametrised = policy_params is not None
    program = _rollout_program(env, policy, parametrised, record=True)
    params = getattr(_bottom(env), "params") if env_params is None else env_params
    recs = jax.device_get(program(params, policy_params, key))
    recs = {k: np.swapaxes(np.asarray(v), 0, 1) for k, v in recs.items()}
    f64 = lambda name: recs[name].astype(np.float64)  # noqa: E731
    return Rollout(
        snr_db=f64("snr_db"), est_snr_db=f64("est_snr_db"), task_class=recs["task_class"].astype(np.int64),
        steps=f64("steps"), merge_ratio=f64("merge_ratio"), quality=f64("quality"), latency_s=f64("latency_s"),
        energy_j=f64("energy_j"), table_quality=f64("table_quality"), table_costs=f64("table_costs"),
        limits=np.asarray(params.limits, np.float64), grid_steps=np.asarray(params.steps, np.float64),
        grid_ratios=np.asarray(params.merge_ratios, np.float64),
    )


# --------------------------------------------------------------------- channel shifts
@dataclasses.dataclass(frozen=True)
class ChannelShift:
    """A change of the channel statistics that the policy never saw in training."""

    name: str  # label in tables and plots
    speed_factor: float = 1.0  # UE speed range multiplied by this (faster fading, staler CSI)
    path_loss_offset_db: float = 0.0  # extra path loss (dB): every SNR falls by this much
    csi_error_factor: float = 1.0  # CSI estimation-error std multiplied by this


DEFAULT_SHIFTS = (
    ChannelShift("nominal"),
    ChannelShift("UE speed x2", speed_factor=2.0),
    ChannelShift("path loss +10 dB", path_loss_offset_db=10.0),
    ChannelShift("CSI error x2", csi_error_factor=2.0),
    ChannelShift("all three", speed_factor=2.0, path_loss_offset_db=10.0, csi_error_factor=2.0),
)


def shift_params(params: Any, shift: ChannelShift) -> Any:
    """``EnvParams`` of the shifted channel; limits, costs and calibration unchanged.

    Extra path loss enters as lower transmit power (the SNR is ``P_tx - PL - ...`` dB, so
    the two are the same thing for the link); the speed scales both ends of the per-episode
    speed range (the Doppler, hence the fading and CSI-ageing correlations, follow from it
    at every reset).
    """
    return params.replace(
        speed_min_mps=params.speed_min_mps * shift.speed_factor,
        speed_max_mps=params.speed_max_mps * shift.speed_factor,
        tx_power_dbm=params.tx_power_dbm - shift.path_loss_offset_db,
        csi_error_std=params.csi_error_std * shift.csi_error_factor,
    )


def cost_weights_for(params: Any, limits: jax.Array) -> jax.Array:
    """``info["cost"]`` weights for new limits: 1/limits when the env normalises by them
    (the default ``single_cost``), else unchanged."""
    normalised = np.allclose(np.asarray(params.cost_weights) * np.asarray(params.limits), 1.0, rtol=1e-4)
    return 1.0 / limits if normalised else params.cost_weights
