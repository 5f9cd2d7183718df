"""One evaluation harness for every policy: learned agents, fixed (K, r), the oracle.

A policy is any ``policy(env_state, key) -> action`` on the batched environment's brax
``State`` (learned agents read ``state.obs``; the oracle reads the true channel in
``state.pipeline_state``). The harness runs ``num_episodes`` fresh episodes at once (one per
environment slot, all from a fresh reset with the given key), ``T`` requests each, inside
one jitted ``lax.scan``, and reports per-request episode averages: the quality, each cost
and its ratio to the limit. A policy is feasible when the mean over episodes of each
episode-average cost is at most ``limit x feasibility_tolerance`` (the CMDP constraint is on
the expectation). The gap closed is ``(Q - Q_fixed) / (Q_oracle - Q_fixed)``.

Environments with the same preset, overrides and key draw the same channels whatever the
actions (the channel ignores them), so policies evaluated with the same key face the same
requests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.rl.config import EnvSpec

__all__ = ["EvalResult", "make_env", "evaluate_policy", "gap_closed", "DEFAULT_EPISODE_LENGTH"]

# requests per episode when the spec leaves it open
DEFAULT_EPISODE_LENGTH = 32

Policy = Callable[[Any, jax.Array], jax.Array]


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


def make_env(spec: EnvSpec, num_envs: Optional[int] = None, discrete: bool = False, artifact: Any = None) -> Any:
    """The batched environment of ``spec`` (``meg_jax.env.make``).

    Args:
      spec: preset, episode length, artifact and limits.
      num_envs: overrides ``spec.num_envs`` (evaluation uses one slot per episode).
      discrete: the discrete K x r action head.
      artifact: a ``CalibrationArtifact`` object that takes precedence over ``spec.artifact``.

    Raises:
      ValueError: unknown preset, or limits that no policy can meet (the reason is named).
    """
    import meg_jax.env as menv

    overrides = {}
    if spec.limits is not None:
        overrides["limits"] = tuple(float(x) for x in spec.limits)
    for name in ("csi_delay_s", "csi_error_std"):
        if getattr(spec, name) is not None:
            overrides[name] = float(getattr(spec, name))
    return menv.make(
        spec.preset,
        num_envs=spec.num_envs if num_envs is None else num_envs,
        episode_length=spec.episode_length or DEFAULT_EPISODE_LENGTH,
        artifact=artifact if artifact is not None else spec.artifact,
        discrete=discrete,
        **overrides,
    )


def _rollout_fn(env: Any, policy: Policy, episode_length: int):
    def run(key: jax.Array):
        k_reset, k_run = jax.random.split(key)
        state = env.reset(k_reset)

        def body(s, k):
            return env.step(s, policy(s, k)), None

        state, _ = jax.lax.scan(body, state, jax.random.split(k_run, episode_length))
        m = state.metrics
        return m["avg_quality"], jnp.stack([m["avg_latency_s"], m["avg_energy_j"]], axis=-1), state.done

    return run


def evaluate_policy(
    env: Any, policy: Policy, key: jax.Array, *, tolerance: float = 1.02, jit: bool = True
) -> EvalResult:
    """Runs ``env.num_envs`` fresh episodes of ``env.episode_length`` requests with ``policy``.

    Args:
      env: a batched ``meg_jax.env.make`` environment, one slot per episode.
      policy: ``policy(state, key) -> action`` for the whole batch.
      key: evaluation key (same key = same channels for every policy).
      tolerance: feasibility factor on the limits.
      jit: compile the rollout (False only for debugging).

    Returns:
      the scores.
    """
    episode_length = int(env.episode_length)
    run = _rollout_fn(env, policy, episode_length)
    quality, costs, done = (jax.jit(run) if jit else run)(key)
    quality, costs, done = (np.asarray(x, np.float64) for x in (quality, costs, done))
    if not np.all(done > 0.5):
        raise RuntimeError("evaluation episodes did not all end after episode_length steps")
    limits = np.asarray(env.params.limits, np.float64)
    mean_costs = costs.mean(axis=0)
    ratio = mean_costs / limits
    return EvalResult(
        episodes=int(quality.shape[0]),
        quality=float(quality.mean()),
        quality_se=float(quality.std(ddof=1) / np.sqrt(max(quality.shape[0], 1))) if quality.shape[0] > 1 else 0.0,
        costs=tuple(float(c) for c in mean_costs),
        costs_over_limit=tuple(float(r) for r in ratio),
        feasible=bool(np.all(ratio <= tolerance)),
    )


def gap_closed(quality: float, fixed_quality: float, oracle_quality: float) -> float:
    """Fraction of the quality gap between the best fixed feasible (K, r) and the oracle closed."""
    gap = oracle_quality - fixed_quality
    if gap <= 0:
        return float("nan")
    return (quality - fixed_quality) / gap
