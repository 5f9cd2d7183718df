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

With ``quality_source="replay"`` the quality of a request is its calibration prompt's: the
oracle (and "always maximum quality") reads the prompt index from the state, i.e. knows each
request's own quality, which no agent observes (perfect information: an upper bound). The
collectors return the prompt with ``with_prompt=True`` for :func:`action_tables`.

Also: ``best_fixed_action`` (the best single (K, r) whose average costs meet the limits) and the
"always maximum quality" policy (λ = 0, unconstrained). All evaluated on batches of episodes in
JAX: ``collect_requests`` runs the environment's own channel dynamics (the same draws as the env
with the same keys); ``rollout_policy`` runs any policy through a batched env from ``make``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from brax.envs.base import Env, State
from jax import Array

from meg_jax.env.meg_env import (
    EnvParams,
    MEGCore,
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
    "OraclePolicy",
    "FixedPolicy",
    "MaxQualityPolicy",
    "oracle_policy_params",
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
def collect_requests(
    params: EnvParams, key: Array, num_episodes: int, episode_length: int, with_prompt: bool = False
) -> tuple[Array, ...]:
    """True SNR (dB) and task class of every request of ``num_episodes`` episodes.

    Uses the environment's own reset and transition with the env's key discipline (episode
    key = reset key, step t from ``episode_step_noise(key, t)``), so ``env.reset(keys)`` on the same
    per-episode keys sees the same channels. The action does not matter (it does not
    influence the channel). Returns ``snr_db`` and ``task_class``, each [E, T], and with
    ``with_prompt`` (static) each request's prompt index [E, T] (replay; 0 otherwise) third.
    """

    def episode(k: Array) -> tuple[Array, ...]:
        core = reset_env(params, k).pipeline_state

        def body(c: MEGCore, _):
            nxt, _ = transition(params, c, jnp.int32(0), jnp.float32(0.0), episode_step_noise(c.key, c.t))
            seen = (c.channel.snr_db, c.task_class) + ((c.prompt,) if with_prompt else ())
            return nxt, seen

        return jax.lax.scan(body, core, None, length=episode_length)[1]

    return jax.vmap(episode)(jax.random.split(key, num_episodes))


def collect_env_requests(
    env: Env, key: Array, episode_length: int, *, estimate: bool = False, with_prompt: bool = False
) -> tuple[Array, ...]:
    """True SNR (dB) and class of every request a batched env (from ``make``) serves.

    Uses the same reset key as :func:`rollout_policy` with the same ``key``, so a policy
    rolled out afterwards faces exactly these requests (the channel ignores actions).
    Returns ``snr_db`` and ``task_class``, each [N, T] for the N slots' first episodes; with
    ``with_prompt=True`` next each request's prompt index (replay: what :func:`action_tables`
    needs; 0 otherwise); with ``estimate=True`` last the SNR estimate the agent observes for
    each request (dB, [N, T]): ``(snr_db, task_class[, prompt][, est_snr_db])``.
    """
    k_reset, _ = jax.random.split(key)
    state = env.reset(k_reset)
    num = state.done.shape[0]
    action = jnp.zeros((num,), jnp.int32) if getattr(env, "discrete", False) else jnp.zeros((num, 2), jnp.float32)

    def body(s: State, _):
        core: MEGCore = s.pipeline_state
        seen = (core.channel.snr_db, core.task_class)
        if with_prompt:
            seen = seen + (core.prompt,)
        if estimate:  # newest entry of the observed estimate history
            seen = seen + (core.channel.est_snr_db[..., 0],)
        return env.step(s, action), seen

    _, seen = jax.lax.scan(body, state, None, length=episode_length)
    return tuple(x.T for x in seen)


def action_tables(
    params: EnvParams, snr_db: Array, task_class: Array, prompt: Array | None = None
) -> tuple[Array, Array]:
    """Quality [M, A] and costs [M, A, 2] of every grid action at flattened requests.

    With ``quality_source="replay"`` pass each request's ``prompt`` (``with_prompt=True`` of
    the collectors): the oracle then knows the prompt's own quality (perfect information).
    """
    flat = lambda x: None if x is None else jnp.reshape(x, (-1,))  # noqa: E731
    return grid_action_table(params, flat(snr_db), flat(task_class), flat(prompt))


# ---------------------------------------------------------------------- the oracle
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


def _newton_at_temperature(lam: Array, tau: Array, quality: Array, c0: Array, c1: Array, tol: float, max_iter: int):
    """Projected Newton on g_τ from ``lam`` (on device): returns (λ, Newton iterations taken).

    Each iteration solves the Newton system on the free coordinates (λ_i > 0 or the dual
    pulls λ_i up), falls back to the projected gradient when that is not a descent direction,
    and halves the step (at most 40 times) until the directional derivative at the projected
    candidate is <= 0; it stops when every projected gradient is below ``tol``.
    """
    eye = jnp.eye(2, dtype=jnp.float32)

    def derivatives(lam_):
        _, grad, hess, _, _ = _smoothed_dual(lam_, tau, quality, c0, c1)
        return grad, hess

    def projected(lam_, grad):
        blocked = (lam_ <= 0.0) & (grad > 0.0)  # at the bound and the dual wants λ < 0
        return blocked, jnp.where(blocked, 0.0, grad)

    def cond(carry):
        lam_, grad, _, it = carry
        _, proj = projected(lam_, grad)
        return (it < max_iter) & ~(jnp.max(jnp.abs(proj)) < tol)  # NaN keeps iterating, as a host loop would

    def body(carry):
        lam_, grad, hess, it = carry
        blocked, proj = projected(lam_, grad)
        free = (~blocked).astype(jnp.float32)
        both = free[:, None] * free[None, :]
        # Newton system on the free block; a blocked coordinate gets the row d_i = 0. The
        # damping is relative to the Hessian's scale: where the two costs move together across
        # actions (paper: latency and energy both fall with merging) the Hessian is singular to
        # float32 rounding (det / trace^2 ~ 1e-8 seen), and a fixed 1e-9 left a solve whose
        # direction was rounding noise or non-finite
        damping = 1e-6 * jnp.trace(hess) + 1e-9
        system = both * (hess + damping * eye) + (1.0 - free)[:, None] * eye
        direction = -jnp.linalg.solve(system, free * grad)
        descent = jnp.all(jnp.isfinite(direction)) & (grad @ direction < 0.0)
        direction = jnp.where(descent, direction, -proj)  # otherwise the projected gradient

        def search_cond(s):
            step, cand, grad_c, _, n = s
            return (n < 40) & ~(grad_c @ (cand - lam_) <= 0.0)

        def search_body(s):
            step, _, _, _, n = s
            step = 0.5 * step
            cand = jnp.maximum(lam_ + step * direction, 0.0)
            return (step, cand, *derivatives(cand), n + 1)

        cand = jnp.maximum(lam_ + direction, 0.0)
        _, cand, grad_c, hess_c, _ = jax.lax.while_loop(
            search_cond, search_body, (jnp.float32(1.0), cand, *derivatives(cand), jnp.int32(1))
        )
        return cand, grad_c, hess_c, it + 1

    grad, hess = derivatives(lam)
    lam, _, _, iters = jax.lax.while_loop(cond, body, (lam, grad, hess, jnp.int32(0)))
    return lam, iters


@functools.partial(jax.jit, static_argnames=("tol", "max_iter"))
def _fit_oracle_device(quality: Array, costs: Array, limits: Array, temperatures: Array, tol: float, max_iter: int):
    # The temperatures are a traced argument, not constants: with a constant τ, XLA turns
    # ``z / τ`` into ``z * (1/τ)`` in some fusions but not others, and at large λ (|z| ~ 1e10,
    # float32 spacing ~ 1e3) the softmax's ``exp(z - max z)`` then underflows to 0 everywhere.
    c0 = costs[..., 0] / limits[0]
    c1 = costs[..., 1] / limits[1]

    def anneal(i, carry):  # one Newton solve per temperature, warm-started from the last
        lam, total = carry
        lam, iters = _newton_at_temperature(lam, temperatures[i], quality, c0, c1, tol, max_iter)
        return lam, total + iters

    lam, total = jax.lax.fori_loop(0, temperatures.shape[0], anneal, (jnp.zeros((2,), jnp.float32), jnp.int32(0)))
    _, _, _, eq, ec = _smoothed_dual(lam, temperatures[-1], quality, c0, c1)
    return lam, eq, ec, total


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
    resolve the decrease. The whole annealed solve is one jitted program (``lax.while_loop``
    over Newton iterations and line-search halvings; compiled once per table shape): the
    host waits once, not once per iteration.

    Args:
      quality: [M, A] quality of each action at each request (perfect knowledge).
      costs: [M, A, 2] latency (s) and energy (J).
      limits: [2] per-request average limits.
      temperatures: annealing schedule of τ (quality units); the last is the policy's.
      tol: stop when every projected dual gradient 1 - E[c_i]/limit_i is below this.
      max_iter: Newton iterations per temperature.
    """
    limits_np = np.asarray(limits, np.float64)
    lam, eq, ec, total = jax.device_get(_fit_oracle_device(
        jnp.asarray(quality, jnp.float32), jnp.asarray(costs, jnp.float32), jnp.asarray(limits_np, jnp.float32),
        jnp.asarray(temperatures, jnp.float32), tol=float(tol), max_iter=int(max_iter),
    ))
    return OracleSolution(
        lambdas=np.asarray(lam, np.float64), temperature=float(temperatures[-1]), avg_quality=float(eq),
        avg_costs=np.asarray(ec, np.float64) * limits_np, iterations=int(total),
    )


def best_fixed_action(params: EnvParams, quality: Array, costs: Array, limits: Array,
                      tolerance: float = 1.0) -> FixedAction:
    """The fixed grid action with the highest average quality whose average costs meet the limits.

    An action meets a limit when its average cost is <= ``tolerance`` x the limit: 1.0 is the
    exact CMDP constraint; evaluation passes ``rl.config.FEASIBILITY_TOLERANCE`` so that the best
    fixed action is chosen by the same rule that marks every other policy feasible.

    Averages in float64 on the host (a few thousand to a million requests: float32 sums
    would lose the last digits that separate near-tied actions).

    Args:
      params: the env's ``EnvParams`` (only its grid ``steps`` [K] and ``merge_ratios`` [R] are read).
      quality: [M, A] quality of every grid action at each request.
      costs: [M, A, 2] their latency (s) and energy (J).
      limits: [2] average limits.
      tolerance: the factor on the limits (>= 1).

    Raises ``ValueError`` if no fixed action is feasible.
    """
    if not tolerance >= 1.0:
        raise ValueError(f"tolerance must be >= 1 (a factor on the limits), got {tolerance}")
    mean_q = np.asarray(quality, np.float64).mean(axis=0)
    mean_c = np.asarray(costs, np.float64).mean(axis=0)  # [A, 2]
    limits = np.asarray(limits, np.float64)
    feasible = np.all(mean_c <= tolerance * limits[None, :], axis=1)
    if not feasible.any():
        raise ValueError(f"no fixed action meets the limits {limits.tolist()} (x {tolerance:g})")
    idx = int(np.argmax(np.where(feasible, mean_q, -np.inf)))
    num_r = int(np.shape(params.merge_ratios)[-1])
    return FixedAction(
        index=idx, steps=int(np.asarray(params.steps)[idx // num_r]),
        merge_ratio=float(np.asarray(params.merge_ratios)[idx % num_r]), avg_quality=float(mean_q[idx]),
        avg_costs=mean_c[idx],
    )


def max_quality_actions(quality: Array) -> Array:
    """The "always maximum quality" policy's action per request [M] (ties: lowest index)."""
    return jnp.argmax(quality, axis=-1)


# -------------------------------------------------------------- policies in the env
def discrete_to_continuous(params: EnvParams, index: Array) -> Array:
    """A continuous action [..., 2] that the env maps back to the same grid action."""
    num_k, num_r = params.steps.shape[-1], params.merge_ratios.shape[-1]
    k_idx, r_idx = index // num_r, index % num_r
    if params.system == "paper":  # the middle of K option k's bin [k, k + 1) / (K - 1); the last is u0 = 1
        a0 = jnp.minimum(2.0 * (k_idx + 0.5) / max(num_k - 1, 1) - 1.0, 1.0)
    else:
        a0 = jnp.where(num_k > 1, 2.0 * k_idx / max(num_k - 1, 1) - 1.0, 0.0)
    a1 = 2.0 * params.merge_ratios[r_idx] / params.max_merge_ratio - 1.0
    return jnp.stack([a0, jnp.clip(a1, -1.0, 1.0)], axis=-1)


def _emit(params: EnvParams, index: Array, discrete: bool) -> Array:
    return index.astype(jnp.int32) if discrete else discrete_to_continuous(params, index)


@dataclasses.dataclass(frozen=True)
class OraclePolicy:
    """The oracle as a parametrised policy: ``policy((params, lambdas, temperature), state, key)``.

    Reads each slot's true SNR, class and (replay) prompt from the state and samples the
    oracle's Boltzmann choice. The multipliers are traced arguments (:func:`oracle_policy_params`), so one
    compiled rollout serves every fit.
    """

    discrete: bool = True

    def __call__(self, p: tuple[EnvParams, Array, Array], state: State, key: Array) -> Array:
        params, lambdas, temperature = p
        core: MEGCore = state.pipeline_state
        q, c = grid_action_table(params, core.channel.snr_db, core.task_class, core.prompt)
        probs = oracle_probabilities(q, c, params.limits, lambdas, temperature)
        index = jax.random.categorical(key, jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
        return _emit(params, index, self.discrete)


def oracle_policy_params(params: EnvParams, solution: OracleSolution) -> tuple[EnvParams, Array, Array]:
    """The traced parameters of :class:`OraclePolicy` for a fitted ``solution``."""
    return params, jnp.asarray(solution.lambdas, jnp.float32), jnp.asarray(solution.temperature, jnp.float32)


@dataclasses.dataclass(frozen=True)
class FixedPolicy:
    """Always one grid action: ``policy((params, index), state, key)`` (index: int32 [])."""

    discrete: bool = True

    def __call__(self, p: tuple[EnvParams, Array], state: State, key: Array) -> Array:
        del key
        params, index = p
        return _emit(params, jnp.full(state.done.shape, index, jnp.int32), self.discrete)


@dataclasses.dataclass(frozen=True)
class MaxQualityPolicy:
    """Always the action of highest quality for the current request (ignores costs):
    ``policy(params, state, key)``."""

    discrete: bool = True

    def __call__(self, params: EnvParams, state: State, key: Array) -> Array:
        del key
        core: MEGCore = state.pipeline_state
        q, _ = grid_action_table(params, core.channel.snr_db, core.task_class, core.prompt)
        return _emit(params, max_quality_actions(q), self.discrete)


def oracle_policy(params: EnvParams, solution: OracleSolution, discrete: bool = True) -> Policy:
    """The oracle as a batched ``policy(state, key)`` (constants closed over; see :class:`OraclePolicy`)."""
    p = oracle_policy_params(params, solution)
    return lambda state, key: OraclePolicy(discrete)(p, state, key)


def fixed_policy(params: EnvParams, index: int, discrete: bool = True) -> Policy:
    """Always the grid action ``index`` (see :class:`FixedPolicy`)."""
    return lambda state, key: FixedPolicy(discrete)((params, jnp.int32(index)), state, key)


def max_quality_policy(params: EnvParams, discrete: bool = True) -> Policy:
    """Always the action of highest quality for the current request (see :class:`MaxQualityPolicy`)."""
    return lambda state, key: MaxQualityPolicy(discrete)(params, state, key)


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
