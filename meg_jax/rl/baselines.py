"""Reference policies in the evaluation harness: best fixed feasible (K, r), max quality, oracle.

Because the channel does not depend on the action, one pass over E fresh episodes records,
for every request, the quality and costs of **every** grid action at the true SNR and task
class (``meg_jax.env.meg_env.grid_action_table``): tables ``Q [E, T, A]``, ``C [E, T, A, m]``.
On these tables, for exactly the episodes every other policy is evaluated on:

* best fixed feasible (K, r): the grid action with the highest average quality whose average
  costs meet every limit;
* always max quality: per request the argmax of Q (ignores the limits);
* Lagrangian oracle (perfect channel knowledge): the value of the linear program "choose a
  distribution over actions per request to maximise average quality with average costs
  <= limits", found through its dual
  ``D(lam) = mean_requests max_a (Q - lam . C / limits) + sum(lam)``, lam >= 0, minimised
  (convex, piecewise linear) by Nelder-Mead; by LP duality min D is the oracle's quality
  (randomising between two actions at the boundary where needed). The deterministic policy
  argmax_a (Q - lam* . C / limits) is also run through the harness.

``evaluate_all`` scores a learned policy and all of these on the same fresh episodes and
reports the fraction of the fixed -> oracle quality gap the policy closes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from meg_jax.rl.evaluate import EvalResult, evaluate_policy, gap_closed, make_env

__all__ = [
    "BASELINES",
    "request_tables",
    "best_fixed_action",
    "oracle_dual",
    "oracle_multipliers",
    "fixed_policy",
    "max_quality_policy",
    "oracle_policy",
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


def best_fixed_action(quality: np.ndarray, costs: np.ndarray, limits: np.ndarray) -> tuple[int, float, np.ndarray]:
    """(index, average quality, average costs [m]) of the best fixed action meeting every limit.

    Raises:
      ValueError: no fixed action meets the limits.
    """
    q = quality.mean(axis=(0, 1))  # [A]
    c = costs.mean(axis=(0, 1))  # [A, m]
    feasible = np.all(c <= limits, axis=-1)
    if not feasible.any():
        raise ValueError(f"no fixed action meets the limits {limits.tolist()} on these episodes")
    idx = int(np.argmax(np.where(feasible, q, -np.inf)))
    return idx, float(q[idx]), c[idx]


def oracle_dual(lam: np.ndarray, quality: np.ndarray, costs_norm: np.ndarray) -> float:
    """D(lam) = mean_requests max_a (Q - lam . C / limits) + sum(lam); Q [R, A], C/limits [R, A, m]."""
    lam = np.maximum(np.asarray(lam, np.float64), 0.0)
    return float(np.mean(np.max(quality - costs_norm @ lam, axis=-1)) + lam.sum())


def oracle_multipliers(quality: np.ndarray, costs: np.ndarray, limits: np.ndarray) -> tuple[np.ndarray, float]:
    """The oracle's multipliers lam* >= 0 [m] and its quality min D (see the module docstring)."""
    m = limits.shape[0]
    q = quality.reshape(-1, quality.shape[-1])
    c = costs.reshape(-1, costs.shape[-2], m) / limits
    best = None
    for start in (np.zeros(m), np.full(m, 0.1), np.full(m, 1.0)):
        res = scipy.optimize.minimize(
            oracle_dual, start, args=(q, c), method="Nelder-Mead",
            options=dict(xatol=1e-7, fatol=1e-9, maxiter=4000),
        )
        if best is None or res.fun < best.fun:
            best = res
    lam = np.maximum(best.x, 0.0)
    return lam, oracle_dual(lam, q, c)


def fixed_policy(index: int, discrete: bool = True) -> Policy:
    """Always the grid action ``index`` (discrete environment)."""
    if not discrete:
        raise ValueError("fixed_policy takes grid indices: evaluate it on the discrete environment")

    def policy(state, key):
        return jnp.full(state.reward.shape, index, jnp.int32)

    return policy


def _argmax_policy(env: Any, lam: Optional[np.ndarray]) -> Policy:
    limits = jnp.asarray(env.params.limits, jnp.float32)
    lam_arr = None if lam is None else jnp.asarray(lam, jnp.float32)

    def policy(state, key):
        q, c = _grid_table(env, state)  # [N, A], [N, A, m]
        score = q if lam_arr is None else q - jnp.einsum("nam,m->na", c / limits, lam_arr)
        return jnp.argmax(score, axis=-1).astype(jnp.int32)

    return policy


def max_quality_policy(env: Any) -> Policy:
    """Per request the highest-quality grid action (perfect channel knowledge, no limits)."""
    return _argmax_policy(env, None)


def oracle_policy(env: Any, lam: np.ndarray) -> Policy:
    """Per request argmax_a Q - lam . C / limits (perfect channel knowledge)."""
    return _argmax_policy(env, lam)


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
      JSON-ready dict: one entry per policy (``EvalResult`` fields, plus the action of the
      fixed policy and the multipliers and LP ceiling of the oracle) and ``summary`` with the
      policy's quality, cost ratios, feasibility and gap closed.
    """
    spec = config.env
    episodes = config.eval.num_episodes
    tol = config.eval.feasibility_tolerance
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 10**6)
    denv = make_env(spec, num_envs=episodes, discrete=True, artifact=artifact)
    limits = np.asarray(denv.params.limits, np.float64)
    quality, costs = request_tables(denv, key)
    idx, fixed_q, fixed_c = best_fixed_action(quality, costs, limits)
    lam, ceiling = oracle_multipliers(quality, costs, limits)
    num_r = int(denv.params.merge_ratios.shape[-1])
    out: dict[str, Any] = {"limits": limits.tolist(), "episodes": episodes, "episode_length": int(denv.episode_length)}
    fixed = evaluate_policy(denv, fixed_policy(idx), key, tolerance=tol).as_dict()
    fixed.update(action=idx, steps=float(denv.params.steps[idx // num_r]),
                 merge_ratio=float(denv.params.merge_ratios[idx % num_r]))
    out["fixed"] = fixed
    out["max_quality"] = evaluate_policy(denv, max_quality_policy(denv), key, tolerance=tol).as_dict()
    oracle = evaluate_policy(denv, oracle_policy(denv, lam), key, tolerance=tol).as_dict()
    oracle.update(lam=lam.tolist(), ceiling_quality=ceiling)
    out["oracle"] = oracle
    summary: dict[str, Any] = {"fixed_quality": fixed["quality"], "oracle_quality": ceiling}
    if agent is not None:
        discrete = config.cvpo.discrete if config.algo == "cvpo" else config.ppo.discrete
        penv = denv if discrete else make_env(spec, num_envs=episodes, discrete=False, artifact=artifact)
        res: EvalResult = evaluate_policy(
            penv, learned_policy(agent.act, actor_params, config.eval.deterministic), key, tolerance=tol
        )
        out["policy"] = res.as_dict()
        summary.update(
            algo=config.algo, quality=res.quality, costs_over_limit=list(res.costs_over_limit),
            feasible=res.feasible, gap_closed=gap_closed(res.quality, fixed["quality"], ceiling),
        )
    else:
        ref = {"fixed": fixed, "oracle": oracle, "max_quality": out["max_quality"]}[config.algo]
        summary.update(
            algo=config.algo, quality=ref["quality"], costs_over_limit=list(ref["costs_over_limit"]),
            feasible=ref["feasible"], gap_closed=gap_closed(ref["quality"], fixed["quality"], ceiling),
        )
    out["summary"] = summary
    return out


