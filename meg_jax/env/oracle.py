"""Reference policies with perfect channel knowledge: the Lagrangian oracle and fixed-action floors.

The channel does not depend on the action, so the best any policy can do is the solution of
the linear program "maximise E[Q(a)] s.t. E[c_i(a)] <= limit_i" over per-request randomised
choices. Its Lagrangian dual is two-dimensional: per request pick argmax_a Q - λ·c̃ with
c̃_i = c_i / limit_i and λ >= 0 the dual minimiser of g(λ) = E[max_a (Q - λ·c̃)] + Σ λ_i.

``fit_oracle`` minimises the entropy-smoothed dual g_τ(λ) = E[τ logsumexp_a((Q - λ·c̃)/τ)] +
Σ λ_i (smooth, convex) by projected Newton steps on λ >= 0, annealing τ down to 1e-4. At its
minimiser the Boltzmann policy π ∝ exp((Q - λ·c̃)/τ) meets every active limit exactly in
expectation (∇g_τ = 1 - E_π[c̃] = 0) and reduces to argmax except between near-tied actions:
this is the "randomise between the actions at the boundary" step, done smoothly (on a
continuous channel the mass of ties is small). Its quality is within τ log A of the LP optimum.

Also: ``best_fixed_action`` (the best single (K, r) whose average costs meet the limits) and the
"always maximum quality" policy (λ = 0, unconstrained). All evaluated on batches of episodes in
JAX: ``collect_requests`` runs the environment's own channel dynamics (the same draws as the env
with the same keys); ``rollout_policy`` runs any policy through a batched env from ``make``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from brax.envs.base import Env, State
from jax import Array

from meg_jax.env.meg_env import (
    EnvParams,
    MEGCore,
    discrete_to_choice,
    grid_action_table,
    reset_env,
    episode_step_noise,
    transition,
)

__all__ = [
    "OracleSolution",
    "FixedAction",
    "collect_requests",
    "collect_env_requests",
    "action_tables",
    "fit_oracle",
    "oracle_probabilities",
    "best_fixed_action",
    "max_quality_actions",
    "discrete_to_continuous",
    "oracle_policy",
    "fixed_policy",
    "max_quality_policy",
    "rollout_policy",
    "Policy",
]


class Policy(Protocol):
    """A batched policy: (batched env state, key) -> actions for every slot."""

    def __call__(self, state: State, key: Array) -> Array: ...


@dataclasses.dataclass(frozen=True)
class OracleSolution:
    """Multipliers of the Lagrangian oracle and what they achieve on the fitting requests."""

    lambdas: np.ndarray  # [2] multipliers of the *normalised* costs c_i / limit_i
    temperature: float  # Boltzmann temperature of the final policy (quality units)
    avg_quality: float  # E_π[Q] on the fitting requests
    avg_costs: np.ndarray  # [2] E_π[c] (s, J) on the fitting requests
    iterations: int  # Newton iterations in total


@dataclasses.dataclass(frozen=True)
class FixedAction:
    """The best fixed (K, r) meeting the limits on average."""

    index: int  # discrete action index k_idx * R + r_idx
    steps: int  # K
    merge_ratio: float  # r
    avg_quality: float
    avg_costs: np.ndarray  # [2] (s, J)


# ----------------------------------------------------------------- data collection
def collect_requests(params: EnvParams, key: Array, num_episodes: int, episode_length: int) -> tuple[Array, Array]:
    """True SNR (dB) and task class of every request of ``num_episodes`` episodes.

    Uses the environment's own reset and transition with the env's key discipline (episode
    key = reset key, step t from ``episode_step_noise(key, t)``), so ``env.reset(keys)`` on the same
    per-episode keys sees the same channels. The action does not matter (it does not
    influence the channel). Returns ``snr_db`` and ``task_class``, each [E, T].
    """

    def episode(k: Array) -> tuple[Array, Array]:
        core = reset_env(params, k).pipeline_state

        def body(c: MEGCore, _):
            nxt, _ = transition(params, c, jnp.int32(0), jnp.float32(0.0), episode_step_noise(c.key, c.t))
            return nxt, (c.channel.snr_db, c.task_class)

        return jax.lax.scan(body, core, None, length=episode_length)[1]

    return jax.vmap(episode)(jax.random.split(key, num_episodes))


def collect_env_requests(
    env: Env, key: Array, episode_length: int, *, estimate: bool = False
) -> tuple[Array, ...]:
    """True SNR (dB) and class of every request a batched env (from ``make``) serves.

    Uses the same reset key as :func:`rollout_policy` with the same ``key``, so a policy
    rolled out afterwards faces exactly these requests (the channel ignores actions).
    Returns ``snr_db`` and ``task_class``, each [N, T] for the N slots' first episodes; with
    ``estimate=True`` also the SNR estimate the agent observes for each request (dB, [N, T])
    as a third array: ``(snr_db, task_class, est_snr_db)``.
    """
    k_reset, _ = jax.random.split(key)
    state = env.reset(k_reset)
    num = state.done.shape[0]
    action = jnp.zeros((num,), jnp.int32) if getattr(env, "discrete", False) else jnp.zeros((num, 2), jnp.float32)

    def body(s: State, _):
        core: MEGCore = s.pipeline_state
        seen = (core.channel.snr_db, core.task_class)
        if estimate:  # newest entry of the observed estimate history
            seen = seen + (core.channel.est_snr_db[..., 0],)
        return env.step(s, action), seen

    _, seen = jax.lax.scan(body, state, None, length=episode_length)
    return tuple(x.T for x in seen)


def action_tables(params: EnvParams, snr_db: Array, task_class: Array) -> tuple[Array, Array]:
    """Quality [M, A] and costs [M, A, 2] of every grid action at flattened requests."""
    return grid_action_table(params, jnp.reshape(snr_db, (-1,)), jnp.reshape(task_class, (-1,)))


# ---------------------------------------------------------------------- the oracle
@jax.jit
def _smoothed_dual(lam: Array, tau: Array, quality: Array, c0: Array, c1: Array):
    """g_τ(λ), its gradient [2] and Hessian [2, 2], E_π[Q] and E_π[c̃] [2].

    Costs come planar (c0, c1: [M, A] normalised latency and energy): a trailing axis of
    size 2 vectorises poorly on CPU.
    """
    z = (quality - lam[0] * c0 - lam[1] * c1) / tau
    z_max = jnp.max(z, axis=1, keepdims=True)
    e = jnp.exp(z - z_max)
    total = jnp.sum(e, axis=1, keepdims=True)
    pi = e / total
    lse = z_max[:, 0] + jnp.log(total[:, 0])
    e0, e1 = jnp.sum(pi * c0, axis=1), jnp.sum(pi * c1, axis=1)
    v00 = jnp.mean(jnp.sum(pi * c0 * c0, axis=1) - e0 * e0)
    v01 = jnp.mean(jnp.sum(pi * c0 * c1, axis=1) - e0 * e1)
    v11 = jnp.mean(jnp.sum(pi * c1 * c1, axis=1) - e1 * e1)
    hess = jnp.stack([jnp.stack([v00, v01]), jnp.stack([v01, v11])]) / tau
    mean_ec = jnp.stack([jnp.mean(e0), jnp.mean(e1)])
    g = tau * jnp.mean(lse) + lam[0] + lam[1]
    return g, 1.0 - mean_ec, hess, jnp.mean(jnp.sum(pi * quality, axis=1)), mean_ec


def oracle_probabilities(quality: Array, costs: Array, limits: Array, lambdas: Array, temperature: float) -> Array:
    """The oracle's action distribution [..., A] from quality [..., A] and costs [..., A, 2]."""
    z = (quality - jnp.einsum("...ak,k->...a", costs / limits, lambdas)) / temperature
    return jax.nn.softmax(z, axis=-1)


def fit_oracle(
    quality: Array,
    costs: Array,
    limits: Array,
    *,
    temperatures: tuple[float, ...] = (1e-2, 1e-3, 1e-4),
    tol: float = 1e-5,
    max_iter: int = 50,
) -> OracleSolution:
    """Finds the multipliers λ >= 0 so that the oracle's average costs meet the limits.

    Projected Newton on the smoothed dual (module docstring); the line search halves the
    step until the directional derivative at the candidate is <= 0 (then, by convexity,
    the candidate is no worse), which stays reliable where float32 values of g_τ no longer
    resolve the decrease. A host loop of a few dozen jitted evaluations.

    Args:
      quality: [M, A] quality of each action at each request (perfect knowledge).
      costs: [M, A, 2] latency (s) and energy (J).
      limits: [2] per-request average limits.
      temperatures: annealing schedule of τ (quality units); the last is the policy's.
      tol: stop when every projected dual gradient 1 - E[c_i]/limit_i is below this.
      max_iter: Newton iterations per temperature.
    """
    quality = jnp.asarray(quality, jnp.float32)
    limits_np = np.asarray(limits, np.float64)
    costs = jnp.asarray(costs, jnp.float32)
    c0 = costs[..., 0] / jnp.float32(limits_np[0])
    c1 = costs[..., 1] / jnp.float32(limits_np[1])
    lam = np.zeros(2)
    total = 0
    for tau in temperatures:
        tau_a = jnp.float32(tau)

        def evaluate(lam_):
            _, grad, hess, eq, ec = _smoothed_dual(jnp.asarray(lam_, jnp.float32), tau_a, quality, c0, c1)
            return np.asarray(grad, np.float64), np.asarray(hess, np.float64), float(eq), np.asarray(ec, np.float64)

        grad, hess, _, _ = evaluate(lam)
        for _ in range(max_iter):
            blocked = (lam <= 0.0) & (grad > 0.0)  # at the bound and the dual wants λ < 0
            proj = np.where(blocked, 0.0, grad)
            if np.max(np.abs(proj)) < tol:
                break
            total += 1
            free = ~blocked
            direction = np.zeros(2)
            h = hess[np.ix_(free, free)] + 1e-9 * np.eye(int(free.sum()))
            direction[free] = -np.linalg.solve(h, grad[free])
            if grad @ direction >= 0.0:  # not a descent direction: fall back to the gradient
                direction = -proj
            step = 1.0
            for _ in range(40):
                cand = np.maximum(lam + step * direction, 0.0)
                grad_c, hess_c, _, _ = evaluate(cand)
                if grad_c @ (cand - lam) <= 0.0:
                    break
                step *= 0.5
            lam, grad, hess = cand, grad_c, hess_c
    _, _, eq, ec = evaluate(lam)
    return OracleSolution(
        lambdas=lam, temperature=float(temperatures[-1]), avg_quality=eq, avg_costs=ec * limits_np, iterations=total
    )


def best_fixed_action(params: EnvParams, quality: Array, costs: Array, limits: Array) -> FixedAction:
    """The fixed grid action with the highest average quality whose average costs meet the limits.

    Raises ``ValueError`` if no fixed action is feasible.
    """
    mean_q = np.asarray(jnp.mean(quality, axis=0), np.float64)
    mean_c = np.asarray(jnp.mean(costs, axis=0), np.float64)  # [A, 2]
    feasible = np.all(mean_c <= np.asarray(limits)[None, :], axis=1)
    if not feasible.any():
        raise ValueError(f"no fixed action meets the limits {np.asarray(limits).tolist()}")
    idx = int(np.argmax(np.where(feasible, mean_q, -np.inf)))
    k, r = discrete_to_choice(params, jnp.asarray(idx))
    return FixedAction(
        index=idx, steps=int(params.steps[int(k)]), merge_ratio=float(r), avg_quality=float(mean_q[idx]), avg_costs=mean_c[idx]
    )


def max_quality_actions(quality: Array) -> Array:
    """The "always maximum quality" policy's action per request [M] (ties: lowest index)."""
    return jnp.argmax(quality, axis=-1)


# -------------------------------------------------------------- policies in the env
def discrete_to_continuous(params: EnvParams, index: Array) -> Array:
    """A continuous action [..., 2] that the env maps back to the same grid action."""
    num_k, num_r = params.steps.shape[-1], params.merge_ratios.shape[-1]
    k_idx, r_idx = index // num_r, index % num_r
    a0 = jnp.where(num_k > 1, 2.0 * k_idx / max(num_k - 1, 1) - 1.0, 0.0)
    a1 = 2.0 * params.merge_ratios[r_idx] / params.max_merge_ratio - 1.0
    return jnp.stack([a0, jnp.clip(a1, -1.0, 1.0)], axis=-1)


def _emit(params: EnvParams, index: Array, discrete: bool) -> Array:
    return index.astype(jnp.int32) if discrete else discrete_to_continuous(params, index)


def oracle_policy(params: EnvParams, solution: OracleSolution, discrete: bool = True) -> Policy:
    """The oracle as a batched policy: reads each slot's true SNR and class from the state."""
    lambdas = jnp.asarray(solution.lambdas, jnp.float32)

    def policy(state: State, key: Array) -> Array:
        core: MEGCore = state.pipeline_state
        q, c = grid_action_table(params, core.channel.snr_db, core.task_class)
        probs = oracle_probabilities(q, c, params.limits, lambdas, solution.temperature)
        index = jax.random.categorical(key, jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
        return _emit(params, index, discrete)

    return policy


def fixed_policy(params: EnvParams, index: int, discrete: bool = True) -> Policy:
    """Always the grid action ``index``."""

    def policy(state: State, key: Array) -> Array:
        del key
        return _emit(params, jnp.full(state.done.shape, index, jnp.int32), discrete)

    return policy


def max_quality_policy(params: EnvParams, discrete: bool = True) -> Policy:
    """Always the action of highest quality for the current request (ignores costs)."""

    def policy(state: State, key: Array) -> Array:
        del key
        core: MEGCore = state.pipeline_state
        q, _ = grid_action_table(params, core.channel.snr_db, core.task_class)
        return _emit(params, max_quality_actions(q), discrete)

    return policy


def rollout_policy(env: Env, policy: Callable[[State, Array], Array], key: Array, episode_length: int) -> dict[str, Array]:
    """Runs one episode in every slot of a batched env (from ``make``); per-episode averages.

    Returns ``avg_quality`` [N] and ``avg_costs`` [N, 2] (s, J) of each slot's first episode.
    """
    k_reset, k_act = jax.random.split(key)
    state = env.reset(k_reset)

    def body(s: State, k: Array):
        s = env.step(s, policy(s, k))
        return s, (s.reward, s.info["costs"])

    _, (rewards, costs) = jax.lax.scan(body, state, jax.random.split(k_act, episode_length))
    return {"avg_quality": jnp.mean(rewards, axis=0), "avg_costs": jnp.mean(costs, axis=0)}
