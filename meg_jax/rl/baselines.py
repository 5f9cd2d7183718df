"""Reference policies in the evaluation harness: best fixed feasible (K, r), max quality, oracle.

The policies are the environment's own (``meg_jax.env.oracle``): the Lagrangian oracle with
perfect channel knowledge (per request a Boltzmann choice over the grid with multipliers that
make its average costs meet the limits; within tau log A of the linear-program optimum,
tau = 1e-4), the best fixed feasible (K, r) and "always maximum quality". This module fits
them on exactly the episodes every other policy is evaluated on: because the channel does not
depend on the action, one pass over E fresh episodes records the quality and costs of every
grid action at every request (tables ``Q [E, T, A]``, ``C [E, T, A, m]``); the oracle's
multipliers and the best fixed action are chosen on those tables, and every policy is then run
through ``meg_jax.rl.evaluate.evaluate_policy`` with the same key.

``evaluate_all`` scores a learned policy and all of these and reports the fraction of the
fixed -> oracle quality gap the policy closes. ``oracle_dual`` is the exact (unsmoothed) LP
dual; at the oracle's multipliers it bounds every feasible policy's quality from above (weak
duality) and is reported beside the oracle as ``ceiling_quality``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.env import oracle as env_oracle
from meg_jax.rl.evaluate import EvalResult, evaluate_policy, gap_closed, make_env

__all__ = [
    "BASELINES",
    "request_tables",
    "oracle_dual",
    "learned_policy",
    "evaluate_all",
]

# --algo values that only evaluate a reference policy
BASELINES = ("fixed", "oracle", "max_quality")

Policy = Callable[[Any, jax.Array], jax.Array]


def _grid_table(env: Any, state: Any) -> tuple[jax.Array, jax.Array]:
    from meg_jax.env.meg_env import grid_action_table

    core = state.pipeline_state
    return grid_action_table(env.params, core.channel.snr_db, core.task_class)


def request_tables(env: Any, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Quality [E, T, A] and costs [E, T, A, m] of every grid action on E fresh episodes.

    Args:
      env: a batched environment (E = ``num_envs`` slots, one episode each).
      key: the evaluation key (the same key the policies are evaluated with).
    """
    episode_length = int(env.episode_length)
    discrete = bool(getattr(env.unwrapped, "discrete", False))

    def run(key):
        k_reset, _ = jax.random.split(key)
        state = env.reset(k_reset)
        dummy = (jnp.zeros((env.num_envs,), jnp.int32) if discrete
                 else jnp.zeros((env.num_envs, 2), jnp.float32))

        def body(s, _):
            q, c = _grid_table(env, s)
            return env.step(s, dummy), (q, c)

        _, (q, c) = jax.lax.scan(body, state, None, length=episode_length)
        return jnp.swapaxes(q, 0, 1), jnp.swapaxes(c, 0, 1)

    q, c = jax.jit(run)(key)
    return np.asarray(q, np.float64), np.asarray(c, np.float64)


def oracle_dual(lam: np.ndarray, quality: np.ndarray, costs_norm: np.ndarray) -> float:
    """D(lam) = mean_requests max_a (Q - lam . C / limits) + sum(lam); Q [R, A], C/limits [R, A, m]."""
    lam = np.maximum(np.asarray(lam, np.float64), 0.0)
    return float(np.mean(np.max(quality - costs_norm @ lam, axis=-1)) + lam.sum())


def learned_policy(act: Callable[..., jax.Array], actor_params: Any, deterministic: bool = False) -> Policy:
    """Wraps an agent's ``act(params, obs, key, deterministic)`` as a harness policy."""
    params = jax.tree.map(jnp.asarray, actor_params)

    def policy(state, key):
        return act(params, state.obs, key, deterministic)

    return policy


def evaluate_all(config: Any, agent: Any, actor_params: Any, artifact: Any = None) -> dict:
    """Scores the trained policy (if ``agent`` is given) and every reference policy.

    All run on ``config.eval.num_episodes`` fresh episodes drawn with the key
    ``fold_in(PRNGKey(seed), 10**6)``, so they face identical requests.

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
    quality, costs = request_tables(denv, key)
    a = quality.shape[-1]
    q_flat, c_flat = quality.reshape(-1, a), costs.reshape(-1, a, costs.shape[-1])
    fixed_action = env_oracle.best_fixed_action(params, jnp.asarray(q_flat), jnp.asarray(c_flat), jnp.asarray(limits))
    solution = env_oracle.fit_oracle(q_flat, c_flat, limits)
    ceiling = oracle_dual(solution.lambdas, q_flat, c_flat / limits)
    out: dict[str, Any] = {"limits": limits.tolist(), "episodes": episodes, "episode_length": int(denv.episode_length)}
    fixed = evaluate_policy(denv, env_oracle.fixed_policy(params, fixed_action.index), key, tolerance=tol).as_dict()
    fixed.update(action=fixed_action.index, steps=fixed_action.steps, merge_ratio=fixed_action.merge_ratio)
    out["fixed"] = fixed
    out["max_quality"] = evaluate_policy(denv, env_oracle.max_quality_policy(params), key, tolerance=tol).as_dict()
    oracle = evaluate_policy(denv, env_oracle.oracle_policy(params, solution), key, tolerance=tol).as_dict()
    oracle.update(lam=np.asarray(solution.lambdas).tolist(), ceiling_quality=ceiling)
    out["oracle"] = oracle
    summary: dict[str, Any] = {"fixed_quality": fixed["quality"], "oracle_quality": oracle["quality"]}
    if agent is not None:
        discrete = config.cvpo.discrete if config.algo == "cvpo" else config.ppo.discrete
        penv = denv if discrete else make_env(spec, num_envs=episodes, discrete=False, artifact=artifact)
        res: EvalResult = evaluate_policy(
            penv, learned_policy(agent.act, actor_params, config.eval.deterministic), key, tolerance=tol
        )
        out["policy"] = res.as_dict()
        ref = out["policy"]
    else:
        ref = {"fixed": fixed, "oracle": oracle, "max_quality": out["max_quality"]}[config.algo]
    summary.update(
        algo=config.algo, quality=ref["quality"], costs_over_limit=list(ref["costs_over_limit"]),
        feasible=ref["feasible"], gap_closed=gap_closed(ref["quality"], fixed["quality"], oracle["quality"]),
    )
    out["summary"] = summary
    return out
