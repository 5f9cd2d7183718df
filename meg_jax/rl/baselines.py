"""Reference policies in the evaluation harness: best fixed feasible (K, r), max quality, oracle.

The policies are the environment's own (``meg_jax.env.oracle``): the Lagrangian oracle with
perfect channel knowledge (per request a Boltzmann choice over the grid with multipliers that
make its average costs meet the limits; within tau log A of the linear-program optimum,
tau = 1e-4), the best fixed feasible (K, r) and "always maximum quality". This module fits
them on exactly the episodes every other policy is evaluated on: because the channel does not
depend on the action, one pass over E fresh episodes records the quality and costs of every
grid action at every request (tables ``Q [E, T, A]``, ``C [E, T, A, m]``, from
``meg_jax.rl.evaluate.record_rollout``); the oracle's multipliers and the best fixed action
are chosen on those tables.

Two ways to score them, on the same tables: :func:`evaluate_all` runs each policy through
``evaluate_policy`` with the same key (the oracle *samples* its action, as a deployed policy
would); :func:`reference_policies` scores them in expectation on a ``Rollout``'s tables (no
sampling noise; what the evaluation report shows). ``oracle_dual`` is the exact (unsmoothed)
LP dual; at the oracle's multipliers it bounds every feasible policy's quality from above
(weak duality) and is reported beside the oracle as ``ceiling_quality``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from meg_jax.env import oracle as env_oracle
from meg_jax.rl.config import REFERENCE_TOLERANCE
from meg_jax.rl.evaluate import (
    FEASIBILITY_TOLERANCE,
    LearnedPolicy,
    Rollout,
    gap_closed,
    evaluate_policy,
    make_env,
    record_rollout,
    summarise,
)

__all__ = [
    "BASELINES",
    "request_tables",
    "oracle_dual",
    "fit_oracle_on",
    "best_fixed_on",
    "reference_policies",
    "fixed_policies",
    "oracle_rollout",
    "pick_action",
    "evaluate_all",
]

# --algo values that only evaluate a reference policy
BASELINES = ("fixed", "oracle", "max_quality")


def request_tables(env: Any, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Quality [E, T, A] and costs [E, T, A, m] of every grid action on E fresh episodes.

    Args:
      env: a batched environment (E = ``num_envs`` slots, one episode each).
      key: the evaluation key (the same key the policies are evaluated with).
    """
    ro = record_rollout(env, key)
    return ro.table_quality, ro.table_costs


def oracle_dual(lam: np.ndarray, quality: np.ndarray, costs_norm: np.ndarray) -> float:
    """D(lam) = mean_requests max_a (Q - lam . C / limits) + sum(lam); Q [..., A], C/limits [..., A, m]."""
    lam = np.maximum(np.asarray(lam, np.float64), 0.0)
    return float(np.mean(np.max(quality - costs_norm @ lam, axis=-1)) + lam.sum())


def _flat(ro: Rollout) -> tuple[np.ndarray, np.ndarray]:
    a = ro.table_quality.shape[-1]
    return ro.table_quality.reshape(-1, a), ro.table_costs.reshape(-1, a, ro.table_costs.shape[-1])


def _limits(ro: Rollout, limits: Optional[np.ndarray]) -> np.ndarray:
    return ro.limits if limits is None else np.asarray(limits, np.float64)


def fit_oracle_on(ro: Rollout, limits: Optional[np.ndarray] = None) -> tuple[env_oracle.OracleSolution, np.ndarray, float]:
    """The environment's Lagrangian oracle fitted on ``ro``'s tables.

    Returns ``(solution, probs [E, T, A], ceiling)``: ``meg_jax.env.oracle.fit_oracle``'s
    multipliers, the oracle's per-request action distribution (Boltzmann at its final
    temperature, so its average costs meet the active limits) and :func:`oracle_dual` at
    those multipliers (an upper bound on any feasible policy's quality, by weak duality).
    """
    limits = _limits(ro, limits)
    q, c = _flat(ro)
    sol = env_oracle.fit_oracle(q, c, limits)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    probs = np.asarray(env_oracle.oracle_probabilities(
        f32(ro.table_quality), f32(ro.table_costs), f32(limits), f32(sol.lambdas), sol.temperature), np.float64)
    return sol, probs, oracle_dual(sol.lambdas, q, c / limits)


def best_fixed_on(ro: Rollout, limits: Optional[np.ndarray], params: Any,
                  tolerance: float = REFERENCE_TOLERANCE) -> Optional[env_oracle.FixedAction]:
    """``env_oracle.best_fixed_action`` on ``ro``'s tables; None when no fixed action is feasible.

    A reference chosen on the very requests it is scored on meets the limits exactly
    (``REFERENCE_TOLERANCE``), like the oracle it is compared with.
    """
    q, c = _flat(ro)
    try:
        return env_oracle.best_fixed_action(params, q, c, _limits(ro, limits), tolerance)
    except ValueError:
        return None


def pick_action(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """table [E, T, A, ...] at per-request action index [E, T] -> [E, T, ...]."""
    return np.take_along_axis(table, index.reshape(index.shape + (1,) * (table.ndim - index.ndim)), axis=2)[:, :, 0]


def _action_label(ro: Rollout, index: int) -> tuple[int, float]:
    num_r = len(ro.grid_ratios)
    return int(ro.grid_steps[index // num_r]), float(ro.grid_ratios[index % num_r])


class _GridOnly:
    """The two fields of ``EnvParams`` ``best_fixed_action`` reads to label an action."""

    def __init__(self, ro: Rollout):
        self.steps = ro.grid_steps
        self.merge_ratios = ro.grid_ratios


def _score(quality: np.ndarray, costs: np.ndarray, limits: np.ndarray,
           tolerance: float = FEASIBILITY_TOLERANCE) -> dict[str, Any]:
    return summarise(quality, costs, limits, tolerance).named()


def reference_policies(ro: Rollout, limits: Optional[np.ndarray] = None) -> dict[str, dict[str, Any]]:
    """Best fixed feasible (K, r), always-max-quality and the Lagrangian oracle on ``ro``'s requests.

    Each scored in expectation on the tables (``EvalResult.named()`` fields). The oracle
    (perfect channel knowledge) is the environment's, scored by its expected quality and costs
    per request; ``ceiling_quality`` is the LP dual bound at its multipliers. The best fixed
    action is chosen on the same requests.
    """
    limits = _limits(ro, limits)
    q, c = ro.table_quality, ro.table_costs
    out: dict[str, dict[str, Any]] = {}
    fixed = best_fixed_on(ro, limits, _GridOnly(ro))
    if fixed is not None:
        row = _score(q[:, :, fixed.index], c[:, :, fixed.index], limits)
        k, r = _action_label(ro, fixed.index)
        row.update(action=fixed.index, steps=k, merge_ratio=r)
        out["best_fixed"] = row
    best = np.argmax(q, axis=-1)
    out["max_quality"] = _score(pick_action(q, best), pick_action(c, best), limits)
    sol, probs, ceiling = fit_oracle_on(ro, limits)
    oracle = _score(np.sum(probs * q, axis=-1), np.einsum("eta,etam->etm", probs, c), limits)
    oracle.update(lam=[float(x) for x in sol.lambdas], ceiling_quality=ceiling, temperature=float(sol.temperature))
    out["oracle"] = oracle
    return out


def fixed_policies(ro: Rollout, limits: Optional[np.ndarray] = None) -> list[dict[str, Any]]:
    """Every fixed grid action (K, r): its averages on ``ro``'s requests.

    ``feasible`` is judged at ``REFERENCE_TOLERANCE`` (exact limits), the rule that picks the
    best fixed action among them.
    """
    limits = _limits(ro, limits)
    out = []
    for a in range(ro.table_quality.shape[-1]):
        row = _score(ro.table_quality[:, :, a], ro.table_costs[:, :, a], limits, REFERENCE_TOLERANCE)
        k, r = _action_label(ro, a)
        row.update(action=a, steps=k, merge_ratio=r)
        out.append(row)
    return out


def oracle_rollout(ro: Rollout) -> Rollout:
    """``ro`` with the choices replaced by the oracle's most likely action per request (perfect CSI)."""
    _, probs, _ = fit_oracle_on(ro)
    choice = np.argmax(probs, axis=-1)
    num_r = len(ro.grid_ratios)
    c = pick_action(ro.table_costs, choice)
    return dataclasses.replace(
        ro, steps=ro.grid_steps[choice // num_r], merge_ratio=ro.grid_ratios[choice % num_r],
        quality=pick_action(ro.table_quality, choice), latency_s=c[..., 0], energy_j=c[..., 1],
    )


def evaluate_all(config: Any, agent: Any, actor_params: Any, artifact: Any = None) -> dict:
    """Scores the trained policy (if ``agent`` is given) and every reference policy.

    All run on ``config.eval.num_episodes`` fresh episodes drawn with the key
    ``fold_in(PRNGKey(seed), 10**6)``, so they face identical requests. Every policy is a
    parametrised one (``meg_jax.rl.evaluate``), so a second call (another seed) reuses the
    compiled rollouts.

    Returns:
      JSON-ready dict: one entry per policy (``EvalResult`` fields, plus the fixed policy's
      action and the oracle's multipliers and LP ceiling) and ``summary`` with the policy's
      quality, cost ratios, feasibility and the gap closed.
    """
    spec = config.env
    episodes = config.eval.num_episodes
    tol = config.eval.feasibility_tolerance
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 10**6)
    denv = make_env(spec, num_envs=episodes, discrete=True, artifact=artifact)
    params = denv.params
    limits = np.asarray(params.limits, np.float64)
    ro = record_rollout(denv, key)
    q_flat, c_flat = _flat(ro)
    fixed_action = env_oracle.best_fixed_action(params, q_flat, c_flat, limits, REFERENCE_TOLERANCE)
    solution = env_oracle.fit_oracle(q_flat, c_flat, limits)
    ceiling = oracle_dual(solution.lambdas, q_flat, c_flat / limits)
    out: dict[str, Any] = {"limits": limits.tolist(), "episodes": episodes, "episode_length": int(denv.episode_length)}

    def score(policy: Any, policy_params: Any, env: Any = denv) -> dict[str, Any]:
        return evaluate_policy(env, policy, key, policy_params=policy_params, tolerance=tol).as_dict()

    fixed = score(env_oracle.FixedPolicy(), (params, np.int32(fixed_action.index)))
    fixed.update(action=fixed_action.index, steps=fixed_action.steps, merge_ratio=fixed_action.merge_ratio)
    out["fixed"] = fixed
    out["max_quality"] = score(env_oracle.MaxQualityPolicy(), params)
    oracle = score(env_oracle.OraclePolicy(), env_oracle.oracle_policy_params(params, solution))
    oracle.update(lam=np.asarray(solution.lambdas).tolist(), ceiling_quality=ceiling)
    out["oracle"] = oracle
    summary: dict[str, Any] = {"fixed_quality": fixed["quality"], "oracle_quality": oracle["quality"]}
    if agent is not None:
        from meg_jax.rl.agents import is_discrete

        discrete = is_discrete(config)
        penv = denv if discrete else make_env(spec, num_envs=episodes, discrete=False, artifact=artifact)
        out["policy"] = score(LearnedPolicy(agent.act, config.eval.deterministic), actor_params, penv)
        ref = out["policy"]
    else:
        ref = {"fixed": fixed, "oracle": oracle, "max_quality": out["max_quality"]}[config.algo]
    summary.update(
        algo=config.algo, quality=ref["quality"], costs_over_limit=list(ref["costs_over_limit"]),
        feasible=ref["feasible"], gap_closed=gap_closed(ref["quality"], fixed["quality"], oracle["quality"]),
    )
    out["summary"] = summary
    return out
