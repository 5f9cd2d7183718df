"""The in-jit E-step dual solver against scipy, its derivatives, and the Q-space thresholds."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import scipy.optimize

from meg_jax.rl import dual

EPS = 0.1
B, M = 48, 16


def _tilted(qc: np.ndarray, logp: np.ndarray, t: float) -> tuple[np.ndarray, float]:
    lw = -qc.sum(-1) * t + logp
    lw -= lw.max(-1, keepdims=True)
    w = np.exp(lw)
    w /= w.sum(-1, keepdims=True)
    kl = float(np.mean(np.sum(w * (np.log(w + 1e-300) - logp), -1)))
    return w, kl


def _problem(seed: int, m: int, scale: float, feasible: bool, uniform_prior: bool = True):
    """A random batch; thresholds reachable inside the KL ball when ``feasible``.

    Feasible thresholds are the costs of a q that tilts the prior towards cheap actions just
    enough to have KL = EPS / 2 < EPS (bisection on the tilt), so a feasible q exists.
    """
    rng = np.random.default_rng(seed)
    qr = rng.normal(size=(B, M)) * scale
    # costs correlated with reward, so the constraints bind
    qc = np.abs(rng.normal(size=(B, M, m))) + 0.5 + 0.3 * qr[..., None] / scale
    if uniform_prior:
        logp = np.full((B, M), -np.log(M))
    else:
        logits = rng.normal(size=(B, M))
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _tilted(qc, logp, mid)[1] < EPS / 2 else (lo, mid)
    w, _ = _tilted(qc, logp, lo)
    c = np.mean(np.einsum("bm,bmj->bj", w, qc), 0)
    if not feasible:
        c = qc.min(axis=(0, 1)) - 1.0  # below every cost: no q can meet it
    return qr, qc, logp, c


def _g_np(x, qr, qc, logp, c):
    eta, lam = x[0], x[1:]
    z = (qr - qc @ lam) / eta + logp
    mx = z.max(-1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(z - mx).sum(-1))
    return eta * EPS + lam @ c + eta * lse.mean()


def _scipy_min(qr, qc, logp, c):
    m = qc.shape[-1]
    bounds = [(1e-6, 1e5)] + [(0.0, 1e5)] * m
    best = None
    for x0 in (np.r_[1.0, np.zeros(m)], np.r_[np.std(qr), np.ones(m)]):
        res = scipy.optimize.minimize(
            _g_np, x0, args=(qr, qc, logp, c), method="L-BFGS-B", bounds=bounds,
            options=dict(ftol=1e-15, gtol=1e-12, maxiter=20000),
        )
        if best is None or res.fun < best.fun:
            best = res
    return best


@pytest.fixture(scope="module")
def solve():
    return jax.jit(dual.solve_estep_dual)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("seed,scale", [(0, 0.01), (1, 1.0), (2, 100.0), (3, 1.0)])
@pytest.mark.parametrize("uniform_prior", [True, False])
def test_dual_matches_scipy_when_feasible(solve, seed, scale, m, uniform_prior):
    qr, qc, logp, c = _problem(seed, m, scale, feasible=True, uniform_prior=uniform_prior)
    sol = solve(jnp.float32(qr), jnp.float32(qc), jnp.float32(logp), EPS, jnp.float32(c), 1.0, None)
    ref = _scipy_min(qr, qc, logp, c)
    ours = _g_np(np.r_[float(sol.eta), np.asarray(sol.lam, np.float64)], qr, qc, logp, c)
    assert abs(ours - ref.fun) <= 1e-4 * abs(ref.fun), (ours, ref.fun, sol, ref.x)
    # q meets every cost constraint (up to float32 rounding of the solution)
    spread = qc.std(axis=(0, 1))
    assert np.all(np.asarray(sol.expected_costs) <= c + 1e-3 * spread), (sol.expected_costs, c)
    # and stays inside the KL ball
    assert float(sol.kl) <= EPS * (1 + 1e-3)
    assert np.all(np.asarray(sol.lam) >= 0) and float(sol.eta) > 0


def test_infeasible_constraint_pushes_lambda_to_its_bound(solve):
    qr, qc, logp, c = _problem(5, 2, 1.0, feasible=False)
    sol = solve(jnp.float32(qr), jnp.float32(qc), jnp.float32(logp), EPS, jnp.float32(c), 1.0, None, lam_max=1e3)
    ref = scipy.optimize.minimize(
        _g_np, np.r_[1.0, 0.0, 0.0], args=(qr, qc, logp, c), method="L-BFGS-B",
        bounds=[(1e-6, 1e5), (0, 1e3), (0, 1e3)], options=dict(ftol=1e-15, gtol=1e-12, maxiter=20000),
    )
    assert float(sol.value) <= ref.fun + 1e-4 * abs(ref.fun)
    assert np.max(np.asarray(sol.lam)) == pytest.approx(1e3)
    assert np.all(np.isfinite(np.asarray(sol.expected_costs)))


def test_warm_start_from_solution_takes_one_iteration(solve):
    qr, qc, logp, c = _problem(1, 2, 1.0, feasible=True)
    args = (jnp.float32(qr), jnp.float32(qc), jnp.float32(logp), EPS, jnp.float32(c))
    cold = solve(*args, 1.0, None)
    warm = solve(*args, cold.eta, cold.lam)
    assert int(warm.iterations) <= 2 < int(cold.iterations)
    # the solver stops once an iteration gains less than tol (1 + |g|) = 2e-7 (1 + |g|)
    np.testing.assert_allclose(float(warm.value), float(cold.value), atol=1e-6)


def test_analytic_derivatives_match_autodiff():
    qr, qc, logp, c = (jnp.float32(a) for a in _problem(3, 2, 1.0, feasible=True, uniform_prior=False))

    def g(x):
        return dual.dual_value(x[0], x[1:], qr, qc, logp, EPS, c)

    x = jnp.asarray([0.7, 0.3, 0.2], jnp.float32)
    grad, hess, _ = dual.dual_grad_hess(x[0], x[1:], qr, qc, logp, EPS, c)
    np.testing.assert_allclose(grad, jax.grad(g)(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hess, jax.hessian(g)(x), rtol=1e-3, atol=1e-4)


def test_hand_computed_two_action_case():
    # one state, two equally likely actions, Q_r = (0, 1), one cost Q_c = (0, 1), lam = 0, eta = 1:
    # w = softmax(0, 1) = (1 / (1 + e), e / (1 + e)) = (0.26894, 0.73106)
    # g = eta eps + eta log((e^0 + e^1) / 2) = 0.1 + log(1.85914) = 0.1 + 0.62011 = 0.72011
    # dg/dlam = c_hat - E_w[Q_c] = 0.5 - 0.73106 = -0.23106
    # sum w log w = 0.26894 ln 0.26894 + 0.73106 ln 0.73106 = -0.35319 - 0.22901 = -0.58220
    # dg/deta = eps - KL(w || 1/2) = 0.1 - (log 2 + sum w log w) = 0.1 - (0.69315 - 0.58220) = -0.01095
    # Var_w(A) = Var_w(Q_c) = w0 w1 = 0.19661 -> d2g/deta2 = d2g/dlam2 = d2g/deta dlam = 0.19661
    qr = jnp.asarray([[0.0, 1.0]])
    qc = jnp.asarray([[[0.0], [1.0]]])
    logp = jnp.log(jnp.asarray([[0.5, 0.5]]))
    c = jnp.asarray([0.5])
    g = dual.dual_value(1.0, jnp.zeros(1), qr, qc, logp, 0.1, c)
    grad, hess, stats = dual.dual_grad_hess(1.0, jnp.zeros(1), qr, qc, logp, 0.1, c)
    np.testing.assert_allclose(g, 0.72011, atol=1e-5)
    np.testing.assert_allclose(grad, [-0.01095, -0.23106], atol=1e-5)
    np.testing.assert_allclose(hess, [[0.19661, 0.19661], [0.19661, 0.19661]], atol=1e-5)
    np.testing.assert_allclose(stats["expected_costs"], [0.73106], atol=1e-5)


def test_q_space_threshold():
    # d (1 - gamma^T) / ((1 - gamma) T) with d = limit * T: 2 * (1 - 0.5^3) / 0.5 = 2 * 1.75 = 3.5
    # float32 geometric sums vs exact decimals: a few rounded ops, <= ~4 x 0.5 ulp (2.4e-7)
    np.testing.assert_allclose(dual.q_space_threshold(jnp.asarray([2.0]), 0.5, 3), [3.5], rtol=1e-6)
    np.testing.assert_allclose(dual.q_space_threshold(jnp.asarray([2.0, 1.0]), 0.0, 10), [2.0, 1.0], rtol=1e-6)
    # continuing view (no horizon): limit / (1 - gamma) = 1 / 0.03; 3 rounded float32 ops
    np.testing.assert_allclose(dual.q_space_threshold(jnp.asarray([1.0]), 0.97, None), [100.0 / 3.0], rtol=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        dual.q_space_threshold(1.0, 1.0, 10)


def test_lam_at_cap_flags_any_multiplier_on_its_bound():
    lam = jnp.asarray([[100.0, 0.0], [99.9, 0.0], [0.0, 100.0], [3.0, 4.0]])
    np.testing.assert_array_equal(np.asarray(dual.lam_at_cap(lam, 100.0)), [1.0, 0.0, 1.0, 0.0])


def test_infeasible_batch_triggers_the_least_cost_fallback(solve):
    # an infeasible batch: the solver ends on the cap with the constraints unmet
    qr, qc, logp, c = _problem(5, 2, 1.0, feasible=False)
    args = (jnp.float32(qr), jnp.float32(qc), jnp.float32(logp), EPS, jnp.float32(c))
    sol = solve(*args, 1.0, None, lam_max=100.0)
    assert float(dual.lam_at_cap(sol.lam, 100.0)) == 1.0
    assert bool(dual.estep_infeasible(sol, jnp.float32(c), 100.0))
    # the fallback is the least-cost tilt p exp(-t sum_j Q_c,j) with KL = EPS (bisection on t)
    weights, fb = jax.jit(dual.min_cost_estep)(jnp.float32(qc), jnp.float32(logp), EPS, jnp.ones((2,)), sol.eta)
    lo, hi = 0.0, 1e3
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _tilted(qc, logp, mid)[1] < EPS else (lo, mid)
    ref, _ = _tilted(qc, logp, lo)
    # float32 solve of a smooth 1-D dual to a relative decrease of 2e-7: weights agree to ~1e-4
    np.testing.assert_allclose(np.asarray(weights), ref, atol=2e-4)
    assert float(fb.kl) == pytest.approx(EPS, rel=1e-2)
    # no q in the ball costs less (up to the same float32 slack), the capped q included
    cost = lambda w: float(np.mean(np.einsum("bm,bmj->b", w, qc)))  # noqa: E731
    w_cap = np.asarray(dual.estep_weights(*(jnp.float32(a) for a in (qr, qc, logp)), sol.eta, sol.lam))
    assert cost(np.asarray(weights)) <= cost(w_cap) + 1e-4


def test_feasible_batch_does_not_trigger_the_fallback(solve):
    qr, qc, logp, c = _problem(1, 2, 1.0, feasible=True)
    sol = solve(jnp.float32(qr), jnp.float32(qc), jnp.float32(logp), EPS, jnp.float32(c), 1.0, None, lam_max=100.0)
    assert not bool(dual.estep_infeasible(sol, jnp.float32(c), 100.0))
    assert float(dual.lam_at_cap(sol.lam, 100.0)) == 0.0


def test_ema_update_is_bias_corrected():
    # rate 0.5: acc = 0.5 * 2 = 1 -> estimate 1 / (1 - 0.5) = 2; then acc = 0.5 + 0.5 * 4 = 2.5,
    # estimate 2.5 / 0.75 = 10 / 3 (the weights 1/3, 2/3 of the two values)
    acc, est = dual.ema_update(jnp.zeros(()), jnp.float32(2.0), 0.5, 1)
    assert float(est) == pytest.approx(2.0, rel=1e-6)
    acc, est = dual.ema_update(acc, jnp.float32(4.0), 0.5, 2)
    assert float(est) == pytest.approx(10.0 / 3.0, rel=1e-6)
    # rate 1: the newest value exactly (the per-batch baseline of cost_baseline_rate = 1)
    assert float(dual.ema_update(acc, jnp.float32(7.25), 1.0, 5)[1]) == 7.25


def test_centring_costs_per_state_leaves_the_solution(solve):
    # subtracting V(s) = E_p[Q_c | s] from every Q_c of state s and mean_s V(s) from the
    # threshold shifts g by the constant lam . mean_s V(s) - lam . mean_s V(s) = 0 per lam:
    # the same minimiser (float32 solves to a relative decrease of 2e-7: ~1e-3 agreement)
    qr, qc, logp, c = _problem(2, 2, 1.0, feasible=True, uniform_prior=False)
    v = np.einsum("bk,bkj->bj", np.exp(logp), qc)
    a = solve(jnp.float32(qr), jnp.float32(qc), jnp.float32(logp), EPS, jnp.float32(c), 1.0, None)
    b = solve(jnp.float32(qr), jnp.float32(qc - v[:, None, :]), jnp.float32(logp), EPS, jnp.float32(c - v.mean(0)),
              1.0, None)
    np.testing.assert_allclose(np.asarray(b.lam), np.asarray(a.lam), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(float(b.eta), float(a.eta), rtol=2e-3)
    np.testing.assert_allclose(np.asarray(b.expected_costs) + v.mean(0), np.asarray(a.expected_costs), atol=1e-4)


@pytest.mark.parametrize("m", [1, 2])
def test_thresholds_beyond_the_kl_ball_are_raised_so_lambda_stays_finite(solve, m):
    # the same infeasible batch that drives lam onto its cap: the raised thresholds leave a q
    # strictly inside the ball, so the dual has a finite minimiser far below the cap
    qr, qc, logp, c = _problem(5, m, 1.0, feasible=False)
    margin, lam_max = 0.1, 1e4
    raised, least_w, least = jax.jit(dual.reachable_thresholds, static_argnums=4)(
        jnp.float32(qc), jnp.float32(logp), EPS, jnp.float32(c), margin)
    raised, least = np.asarray(raised, np.float64), np.asarray(least, np.float64)
    sol = solve(jnp.float32(qr), jnp.float32(qc), jnp.float32(logp), EPS, jnp.float32(raised), 1.0, None,
                lam_max=lam_max)
    lam = np.asarray(sol.lam)
    # (3.8; 2.2 and 2.2 here; with the thresholds at the least cost itself, margin 0, lam is 77 and 39,
    # bounded only by float32 rounding of the least cost)
    assert float(dual.lam_at_cap(sol.lam, lam_max)) == 0.0 and np.all(lam < 10.0), lam
    assert not bool(dual.estep_infeasible(sol, jnp.float32(raised), lam_max))
    # q meets the raised thresholds inside the ball (float32 solution: 1e-3 of the cost spread)
    spread = qc.std(axis=(0, 1))
    assert np.all(np.asarray(sol.expected_costs) <= raised + 1e-3 * spread), (sol.expected_costs, raised)
    assert float(sol.kl) <= EPS * (1 + 1e-3)
    # and it is the scipy optimum of the raised problem (a finite one: L-BFGS-B inside the box)
    ref = _scipy_min(qr, qc, logp, raised)
    ours = _g_np(np.r_[float(sol.eta), np.asarray(sol.lam, np.float64)], qr, qc, logp, raised)
    assert abs(ours - ref.fun) <= 1e-4 * abs(ref.fun), (ours, ref.fun, sol, ref.x)

    prior = np.mean(np.einsum("bk,bkj->bj", np.exp(logp), qc), 0)
    # every threshold lay below the least cost, so each is raised to exactly the mixture's cost
    # (float32 sums of O(1) costs: ~1e-6 relative)
    assert np.all(c < least)
    np.testing.assert_allclose(raised, (1 - margin) * least + margin * prior, rtol=1e-5)
    # least is the least-cost q of the sum of the costs (the tilt with KL = EPS, as the fallback)
    lo, hi = 0.0, 1e3
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _tilted(qc, logp, mid)[1] < EPS else (lo, mid)
    np.testing.assert_allclose(np.asarray(least_w), _tilted(qc, logp, lo)[0], atol=2e-4)


def test_reachable_thresholds_leave_thresholds_the_ball_meets_with_room():
    # the feasible batch's thresholds are met at KL = EPS / 2, i.e. ~71 % of the cost reduction
    # the ball allows (small tilts: reduction ~ sqrt(KL)), inside the 90 % a margin of 0.1 keeps;
    # a threshold above the prior's cost (nothing to reduce) is never raised
    qr, qc, logp, c = _problem(1, 2, 1.0, feasible=True)
    fn = jax.jit(dual.reachable_thresholds, static_argnums=4)
    raised = np.asarray(fn(jnp.float32(qc), jnp.float32(logp), EPS, jnp.float32(c), 0.1)[0])
    np.testing.assert_array_equal(raised, np.float32(c))
    high = np.mean(np.einsum("bk,bkj->bj", np.exp(logp), qc), 0) + 0.5
    raised = np.asarray(fn(jnp.float32(qc), jnp.float32(logp), EPS, jnp.float32(high), 0.1)[0])
    np.testing.assert_array_equal(raised, np.float32(high))


def test_fixed_lam_solves_eta_alone(solve):
    """``fixed_lam`` holds the multipliers and minimises g over eta only (scipy's 1-D minimum),
    so q meets the KL bound at those multipliers."""
    qr, qc, logp, c = _problem(1, 2, 1.0, feasible=True)
    args = (jnp.float32(qr), jnp.float32(qc), jnp.float32(logp), EPS, jnp.float32(c))
    full = solve(*args, 1.0, None)
    held = np.asarray(full.lam, np.float64) * 0.5 + 0.1  # float64, so g below is evaluated in float64
    sol = solve(*args, 1.0, None, fixed_lam=jnp.float32(held))
    np.testing.assert_array_equal(np.asarray(sol.lam), np.float32(held))
    ref = scipy.optimize.minimize_scalar(lambda e: _g_np(np.r_[e, held], qr, qc, logp, c), bounds=(1e-6, 1e3),
                                         method="bounded", options=dict(xatol=1e-10))
    ours = _g_np(np.r_[float(sol.eta), held], qr, qc, logp, c)
    assert abs(ours - ref.fun) <= 1e-5 * abs(ref.fun), (ours, ref.fun, float(sol.eta), ref.x)
    # dg/deta = EPS - KL: the solver stops when an iteration gains < tol (1 + |g|) in g, which leaves
    # |EPS - KL| up to sqrt(2 g'' tol (1 + |g|)) (g'' by central differences, in float64)
    e, h = float(sol.eta), 1e-4 * float(sol.eta)
    g2 = (_g_np(np.r_[e + h, held], qr, qc, logp, c) - 2 * ours + _g_np(np.r_[e - h, held], qr, qc, logp, c)) / h**2
    bound = np.sqrt(2 * g2 * 2e-7 * (1 + abs(ours)))
    assert abs(float(sol.kl) - EPS) <= 2 * bound, (float(sol.kl), bound)
