"""Tests for meg_jax.env.oracle: the Lagrangian oracle meets the limits and is a ceiling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

import meg_jax.env as menv
from meg_jax.env import meg_env as M
from meg_jax.env import oracle as O
from meg_jax.meg.artifact import synthetic_artifact

EPISODES, T = 10_000, 8
FIT_KEY, HELD_OUT_KEY = jax.random.PRNGKey(0), jax.random.PRNGKey(1)


@pytest.fixture(scope="module")
def setup():
    # Digital link; the energy limit is set low (8% of the way from the cheapest to the
    # dearest fixed action) so that both constraints bind.
    env = menv.make(
        "tiny", num_envs=EPISODES, episode_length=T, artifact=synthetic_artifact(link_mode="digital"),
        discrete=True, limit_fractions=(0.3, 0.08),
    )
    p = env.params
    collect = jax.jit(lambda k: O.collect_env_requests(env, k, T))
    tables = jax.jit(O.action_tables)
    fit_q, fit_c = tables(p, *collect(FIT_KEY))
    test_q, test_c = tables(p, *collect(HELD_OUT_KEY))
    solution = O.fit_oracle(fit_q, fit_c, p.limits)
    return env, p, solution, (fit_q, fit_c), (test_q, test_c), collect


def _policy_averages(q, c, probs):
    return float(jnp.mean(jnp.sum(probs * q, -1))), np.asarray(jnp.mean(jnp.einsum("ma,mak->mk", probs, c), 0))


def test_oracle_meets_each_limit_within_one_percent(setup):
    env, p, sol, fit, test, _ = setup
    limits = np.asarray(p.limits)
    assert np.all(sol.lambdas > 0), sol  # both constraints bind in this configuration
    # On the 10 000 episodes λ was fitted on, the smoothed dual is solved to 1e-5 ...
    np.testing.assert_allclose(sol.avg_costs / limits, 1.0, atol=1e-4)
    # ... and the oracle policy, run in the batched env on those same 10 000 episodes
    # (same reset key, so the same channels), meets each limit within 1%.
    run = jax.jit(lambda k: O.rollout_policy(env, O.oracle_policy(p, sol, discrete=True), k, T))
    out = run(FIT_KEY)
    np.testing.assert_allclose(np.asarray(out["avg_costs"].mean(0)) / limits, 1.0, atol=0.01)
    assert float(out["avg_quality"].mean()) == pytest.approx(sol.avg_quality, abs=0.01)


def test_oracle_generalises_to_fresh_episodes(setup):
    # The same λ on 10 000 fresh episodes: the averages differ from the limits only by
    # sampling error (per-episode averages are independent across episodes; 3 standard errors).
    env, p, sol, _, test, _ = setup
    limits = np.asarray(p.limits)
    probs = O.oracle_probabilities(test[0], test[1], p.limits, jnp.asarray(sol.lambdas, jnp.float32), sol.temperature)
    per_request = np.asarray(jnp.einsum("ma,mak->mk", probs, test[1])) / limits  # [E*T, 2], episode-major
    per_episode = per_request.reshape(EPISODES, T, 2).mean(1)
    stderr = per_episode.std(0, ddof=1) / np.sqrt(EPISODES)
    assert np.all(np.abs(per_episode.mean(0) - 1.0) <= 3 * stderr), (per_episode.mean(0), stderr)


def test_oracle_is_a_ceiling_over_fixed_and_below_max_quality(setup):
    env, p, sol, fit, test, _ = setup
    fixed = O.best_fixed_action(p, fit[0], fit[1], p.limits)
    assert np.all(fixed.avg_costs <= np.asarray(p.limits))
    probs = O.oracle_probabilities(test[0], test[1], p.limits, jnp.asarray(sol.lambdas, jnp.float32), sol.temperature)
    oracle_q, _ = _policy_averages(test[0], test[1], probs)
    fixed_q = float(jnp.mean(test[0][:, fixed.index]))
    assert oracle_q >= fixed_q
    best = O.max_quality_actions(test[0])
    max_q = float(jnp.mean(jnp.take_along_axis(test[0], best[:, None], 1)))
    max_q_costs = np.asarray(jnp.mean(jnp.take_along_axis(test[1], best[:, None, None], 1)[:, 0], 0))
    assert max_q >= oracle_q
    assert np.any(max_q_costs > np.asarray(p.limits))  # unconstrained quality breaks the limits
    # Every other fixed action is either infeasible or no better.
    mean_q, mean_c = np.asarray(fit[0].mean(0)), np.asarray(fit[1].mean(0))
    feasible = np.all(mean_c <= np.asarray(p.limits), axis=1)
    assert fixed.avg_quality == pytest.approx(mean_q[feasible].max())


def test_oracle_matches_the_linear_program():
    # A random small CMDP stage: the LP over per-request randomised choices is the optimum.
    rng = np.random.default_rng(0)
    m, a = 300, 6
    q = rng.uniform(0, 1, (m, a))
    c = rng.uniform(0, 1, (m, a, 2)) + 0.5 * q[..., None]  # better actions cost more
    limits = np.array([0.7, 0.75])
    # LP: max Σ π q / m  s.t.  Σ π c_i / m <= limit_i,  Σ_a π = 1 per request, π >= 0.
    res = linprog(
        -q.ravel() / m,
        A_ub=np.stack([c[..., 0].ravel(), c[..., 1].ravel()]) / m,
        b_ub=limits,
        A_eq=np.kron(np.eye(m), np.ones(a)),
        b_eq=np.ones(m),
        bounds=(0, None),
        method="highs",
    )
    assert res.status == 0
    sol = O.fit_oracle(jnp.asarray(q), jnp.asarray(c), jnp.asarray(limits))
    np.testing.assert_allclose(sol.avg_costs, limits, atol=1e-4 * limits.max())
    # Within τ log A = 1e-4 * ln 6 = 1.8e-4 of the LP optimum (plus float32 slack).
    assert sol.avg_quality == pytest.approx(-res.fun, abs=3e-4)


def test_oracle_randomises_between_two_actions_at_the_boundary():
    # Every request identical: action 0 has Q = 1 and latency 2, action 1 has Q = 0 and
    # cost 0; limit 1. No deterministic choice meets the limit with equality; the optimum
    # takes each action half the time (Q = 0.5, latency = 1) at λ = 0.5.
    m = 1000
    q = jnp.tile(jnp.asarray([[1.0, 0.0]]), (m, 1))
    c = jnp.tile(jnp.asarray([[[2.0, 0.0], [0.0, 0.0]]]), (m, 1, 1))
    sol = O.fit_oracle(q, c, jnp.asarray([1.0, 1.0]))
    assert sol.lambdas[0] == pytest.approx(0.5, abs=1e-3) and sol.lambdas[1] == 0.0
    probs = O.oracle_probabilities(q, c, jnp.asarray([1.0, 1.0]), jnp.asarray(sol.lambdas, jnp.float32), sol.temperature)
    np.testing.assert_allclose(np.asarray(probs[0]), [0.5, 0.5], atol=1e-3)
    assert sol.avg_quality == pytest.approx(0.5, abs=1e-3)


def test_collect_requests_sees_the_env_channels(setup):
    # collect_requests (pure, per-episode keys) sees what reset_env/step_env produce.
    p = setup[1]
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    snr, cls = jax.jit(O.collect_requests, static_argnums=(2, 3))(p, jax.random.PRNGKey(3), 4, 5)
    reset = jax.jit(jax.vmap(lambda k: M.reset_env(p, k)))
    step = jax.jit(jax.vmap(lambda s, a: M.step_env(p, s, a, discrete=True)))
    state = reset(keys)
    for t in range(5):
        np.testing.assert_allclose(np.asarray(state.pipeline_state.channel.snr_db), np.asarray(snr[:, t]), atol=1e-4)
        np.testing.assert_array_equal(np.asarray(state.pipeline_state.task_class), np.asarray(cls[:, t]))
        state = step(state, jnp.full((4,), 5 + 3 * t))  # any action: the channel does not depend on it


def test_discrete_to_continuous_round_trips(setup):
    p = setup[1]
    idx = jnp.arange(p.num_actions)
    cont = O.discrete_to_continuous(p, idx)
    k, r = jax.vmap(lambda a: M.continuous_to_choice(p, a))(cont)
    k2, r2 = jax.vmap(lambda i: M.discrete_to_choice(p, i))(idx)
    np.testing.assert_array_equal(np.asarray(k), np.asarray(k2))
    np.testing.assert_allclose(np.asarray(r), np.asarray(r2), atol=1e-6)


def _fit_oracle_host_loop(quality, costs, limits, temperatures=(1e-2, 1e-3, 1e-4), tol=1e-5, max_iter=50):
    """The previous implementation of ``fit_oracle`` (a Python loop of jitted dual evaluations,
    Newton solve in float64 on the host): the reference for the on-device loop."""
    quality = jnp.asarray(quality, jnp.float32)
    limits = np.asarray(limits, np.float64)
    costs = jnp.asarray(costs, jnp.float32)
    c0, c1 = costs[..., 0] / jnp.float32(limits[0]), costs[..., 1] / jnp.float32(limits[1])
    dual = jax.jit(O._smoothed_dual)
    lam = np.zeros(2)
    for tau in temperatures:
        def evaluate(lam_, tau=tau):
            _, g, h, eq, ec = dual(jnp.asarray(lam_, jnp.float32), jnp.float32(tau), quality, c0, c1)
            return np.asarray(g, np.float64), np.asarray(h, np.float64), float(eq), np.asarray(ec, np.float64)

        grad, hess, _, _ = evaluate(lam)
        for _ in range(max_iter):
            blocked = (lam <= 0.0) & (grad > 0.0)
            proj = np.where(blocked, 0.0, grad)
            if np.max(np.abs(proj)) < tol:
                break
            free = ~blocked
            direction = np.zeros(2)
            direction[free] = -np.linalg.solve(hess[np.ix_(free, free)] + 1e-9 * np.eye(int(free.sum())), grad[free])
            if grad @ direction >= 0.0:
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
    return lam, eq, ec * limits


def test_on_device_fit_matches_the_host_loop(setup):
    # Both loops stop once every projected dual gradient |1 - E_pi[c_i] / limit_i| < tol = 1e-5,
    # so each solution meets its active limits to 1e-5 (relative): their cost ratios agree to
    # 2e-5 and their qualities to sum(lam) x 2e-5 < 2e-5 (lam < 1 here). lam itself is pinned
    # less tightly where the dual is flat; 1e-4 is ~1e-3 of its size (measured: <= 2e-6).
    _, p, _, fit, _, _ = setup
    rng = np.random.default_rng(0)
    q = rng.uniform(0, 1, (300, 6))
    c = rng.uniform(0, 1, (300, 6, 2)) + 0.5 * q[..., None]
    same = np.tile(np.asarray([[1.0, 0.0]]), (50, 1)), np.tile(np.asarray([[[2.0, 0.0], [0.0, 0.0]]]), (50, 1, 1))
    for quality, costs, limits in ((fit[0], fit[1], np.asarray(p.limits)), (q, c, np.array([0.7, 0.75])),
                                   (same[0], same[1], np.array([1.0, 1.0]))):
        lam, eq, ec = _fit_oracle_host_loop(quality, costs, limits)
        sol = O.fit_oracle(quality, costs, limits)
        np.testing.assert_allclose(sol.lambdas, lam, atol=1e-4)
        np.testing.assert_allclose(sol.avg_costs / limits, ec / limits, atol=2e-5)
        assert sol.avg_quality == pytest.approx(eq, abs=2e-5)
    # one compiled program per table shape: a second fit of the same shape adds none
    before = O._fit_oracle_device._cache_size()
    O.fit_oracle(q + 0.01, c, np.array([0.7, 0.75]))
    assert O._fit_oracle_device._cache_size() == before


def test_best_fixed_action_applies_the_tolerance_to_the_limits():
    # Two fixed actions on a 1 x 2 grid: action 1 is better but costs 1.01 x the latency limit.
    # The exact rule (tolerance 1) must pick action 0; the report's rule (1.02) must pick action 1.
    grid = type("Grid", (), {"steps": np.array([1]), "merge_ratios": np.array([0.0, 0.5])})()
    quality = np.array([[0.5, 0.9]] * 4)
    costs = np.array([[[0.5, 0.1], [1.01, 0.1]]] * 4)
    limits = np.array([1.0, 1.0])
    assert O.best_fixed_action(grid, quality, costs, limits).index == 0
    picked = O.best_fixed_action(grid, quality, costs, limits, 1.02)
    assert picked.index == 1 and picked.merge_ratio == 0.5
    with pytest.raises(ValueError, match="no fixed action meets"):
        O.best_fixed_action(grid, quality, costs * 3.0, limits, 1.02)
    with pytest.raises(ValueError, match="tolerance"):
        O.best_fixed_action(grid, quality, costs, limits, 0.98)
