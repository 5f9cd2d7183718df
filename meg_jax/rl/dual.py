"""The E-step dual of multi-constraint CVPO, solved inside jit by projected Newton.

For a batch of B states with M candidate actions each (sampled from pi_old, or every action
of a discrete head weighted by its prior probability), reward values Q_r [B, M] and cost
values Q_c [B, M, m], the non-parametric E-step of CVPO (Liu et al., ICML 2022, eq. 6-8) is

    max_q  mean_s E_q[Q_r]   s.t.  mean_s KL(q || p) <= eps,  mean_s E_q[Q_c,j] <= c_j,

whose solution is q(a|s) = p(a|s) exp((Q_r - lam . Q_c) / eta) / Z(s) with (eta, lam) the
minimiser of the convex dual

    g(eta, lam) = eta eps + lam . c + mean_s eta log sum_k p_k exp(A_k / eta),
    A = Q_r - lam . Q_c,   eta > 0,   lam in R^m_{>=0}.

Derivatives (w = q(.|s), all moments under w, averaged over states):

    dg/dlam_j = c_j - E[Q_c,j]              d2g/dlam_i dlam_j = Cov(Q_c,i, Q_c,j) / eta
    dg/deta   = eps - KL(w || p)             d2g/deta2          = Var(A) / eta^3
                                             d2g/deta dlam_j    = Cov(A, Q_c,j) / eta^2

The solver takes warm-started projected Newton steps on (log eta, lam) with the active bounds
removed from the Newton system (Bertsekas' projected Newton), a Levenberg floor on the
Hessian, and a vectorised backtracking search that evaluates the dual at several projected
candidates along the Newton and the diagonally scaled gradient direction and keeps the best,
so every iteration is monotone. It stops when an iteration decreases g by less than
``tol * (1 + |g|)`` or after ``max_iters`` iterations. Everything is a fixed-shape
``lax.while_loop``: no host round trip, unlike the original code's per-batch scipy SLSQP.
"""

from __future__ import annotations

from typing import Optional, Protocol

import jax
import jax.numpy as jnp
from flax import struct

__all__ = [
    "DualSolution",
    "dual_value",
    "dual_grad_hess",
    "estep_weights",
    "solve_estep_dual",
    "q_space_threshold",
    "lam_at_cap",
    "estep_infeasible",
    "min_cost_estep",
    "reachable_thresholds",
    "ema_update",
    "PIDState",
    "pid_init",
    "pid_lagrange_update",
    "gradient_lagrange_update",
    "LagrangeSettings",
    "update_lagrange",
]

# step sizes tried along each search direction (largest first); 0 (stay) is always a candidate
_STEPS = tuple(0.5**i for i in range(24))


@struct.dataclass
class DualSolution:
    """The solved E-step dual and what it implies for q.

    Attributes:
      eta: [] temperature.
      lam: [m] Lagrange multipliers of the cost constraints (normalised cost units).
      value: [] dual value g(eta, lam).
      kl: [] mean_s KL(q || p) achieved by the solution (nats).
      expected_costs: [m] mean_s E_q[Q_c].
      expected_reward: [] mean_s E_q[Q_r].
      iterations: [] int32 Newton iterations used.
    """

    eta: jax.Array
    lam: jax.Array
    value: jax.Array
    kl: jax.Array
    expected_costs: jax.Array
    expected_reward: jax.Array
    iterations: jax.Array


def q_space_threshold(limit: jax.Array | float, gamma: float, horizon: Optional[int]) -> jax.Array:
    """Converts an episode-average cost limit into a threshold on discounted cost values.

    The references write c_hat = d (1 - gamma^T) / ((1 - gamma) T) for an episode-sum limit
    d over T steps (cost spread evenly over a fixed horizon, values counted from an episode's
    start). meg-jax limits are per-request averages, i.e. d = limit * T, so
    c_hat = limit (1 - gamma^T) / (1 - gamma); gamma = 0 gives c_hat = limit.

    ``horizon=None`` is the continuing view of MEG-CVPO (an episode end bootstraps into the
    next episode, so Q_c sums the cost stream past the episode): a policy whose average cost
    is the limit has mean discounted cost value limit / (1 - gamma) over replay states, the
    threshold then. The two differ by the factor 1 - gamma^T: nothing at gamma = 0.5, T = 32
    (1 - 2e-10), 14 % at the authors' gamma = 0.97, T = 64, where the finite-horizon formula
    would hold the continuing agent to 0.86 x its limit.

    Args:
      limit: [m] episode-average limit(s), in the critic's cost units.
      gamma: discount in [0, 1).
      horizon: T, steps per episode (>= 1); None for the continuing view.

    Returns:
      [m] thresholds for mean_s E_q[Q_c].
    """
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    if horizon is not None and horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    factor = (1.0 - (0.0 if horizon is None else gamma**horizon)) / (1.0 - gamma)
    return jnp.asarray(limit, jnp.float32) * factor


def lam_at_cap(lam: jax.Array, lam_max: float | jax.Array) -> jax.Array:
    """1.0 where any multiplier sits on its upper bound, else 0.0.

    The projected Newton solver clips lam to [0, lam_max] exactly, so "at the cap" is
    ``lam >= lam_max`` up to float32 rounding of the bound (relative 1e-6).

    Args:
      lam: [..., m] multipliers.
      lam_max: their common upper bound.

    Returns:
      [...] float32 indicator.
    """
    return jnp.any(lam >= jnp.float32(lam_max) * (1.0 - 1e-6), axis=-1).astype(jnp.float32)


def estep_infeasible(sol: "DualSolution", thresholds: jax.Array, lam_max: float, rtol: float = 1e-3) -> jax.Array:
    """Whether the solved E-step could not meet a cost threshold within the KL ball.

    When no q in the KL ball meets a threshold, the dual is unbounded below in that lam and
    the solver stops on lam_max with the constraint still violated; a lam on its cap whose
    constraint q meets (up to ``rtol`` x |threshold|) is a finite optimum the cap clipped.

    Returns:
      [] bool.
    """
    at_cap = sol.lam >= jnp.float32(lam_max) * (1.0 - 1e-6)
    violated = sol.expected_costs > thresholds + rtol * jnp.abs(thresholds)
    return jnp.any(at_cap & violated)


def min_cost_estep(
    q_costs: jax.Array,
    log_prior: jax.Array,
    epsilon: float | jax.Array,
    which: jax.Array,
    init_eta: jax.Array | float = 1.0,
    *,
    max_iters: int = 30,
    tol: float = 2e-7,
) -> tuple[jax.Array, DualSolution]:
    """The feasible-region fallback of an infeasible E-step: the q in the KL ball of least cost.

    Minimises mean_s E_q[which . Q_c] s.t. mean_s KL(q || p) <= eps, reward ignored (the
    recovery step of constrained policy search when the constraint cannot be met within the
    trust region, as in CPO's infeasible case). Solved as the E-step dual with "reward"
    -which . Q_c and no cost constraint (``solve_estep_dual`` with m = 1 zero costs, lam = 0).

    Args:
      q_costs: [B, M, m] cost values (normalised: 1 = the limit, so a sum over constraints is meaningful).
      log_prior: [B, M] log prior weights.
      epsilon: KL bound.
      which: [m] weights of the constraints to reduce (1 for the violated ones, 0 else).
      init_eta: warm start of the temperature.

    Returns:
      (weights q [B, M], the solution of that dual: eta, kl, expected_reward = -cost).
    """
    cost = jnp.einsum("bkj,j->bk", q_costs, which.astype(q_costs.dtype))
    zero = jnp.zeros(cost.shape + (1,), cost.dtype)
    sol = solve_estep_dual(-cost, zero, log_prior, epsilon, jnp.zeros((1,), cost.dtype), init_eta,
                           jnp.zeros((1,), cost.dtype), max_iters=max_iters, tol=tol)
    weights = jax.nn.softmax(-cost / sol.eta + log_prior, axis=-1)
    return weights, sol


def reachable_thresholds(
    q_costs: jax.Array,
    log_prior: jax.Array,
    epsilon: float | jax.Array,
    thresholds: jax.Array,
    margin: float,
    *,
    max_iters: int = 30,
    tol: float = 2e-7,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Raises the cost thresholds that the KL ball cannot meet with room to spare.

    Let p be the prior, q* the least-cost q in the KL ball for the constraints whose threshold
    lies below the prior's cost (``min_cost_estep`` with those in ``which``), c_p and c* their
    costs mean_s E[Q_c]. The mixture (1 - margin) q* + margin p has costs
    (1 - margin) c* + margin c_p and, KL being convex in q, KL <= (1 - margin) eps < eps. So
    the thresholds

        c_j' = max(c_j, (1 - margin) c*_j + margin c_p,j)

    leave a q strictly inside the KL ball that meets every one of them (strictly, for the
    mixtures with a slightly larger margin, wherever c*_j < c_p,j): Slater's condition holds,
    and the E-step dual has a finite minimiser whatever the batch. A threshold the ball can
    meet with that room is unchanged; one beyond it (or too close to its edge, where lam
    grows without bound) is replaced by the cost of a q that gives up a fraction ``margin``
    of the cost reduction the ball allows. The multiplier stays finite and q still trades
    reward against cost, where the capped solution (lam = lam_max) was the least-cost q
    distorted by the cap.

    Args:
      q_costs: [B, M, m] cost values (normalised: 1 = the limit, so a sum over constraints is
        meaningful).
      log_prior: [B, M] log prior weights.
      epsilon: KL bound.
      thresholds: [m] the thresholds c for mean_s E_q[Q_c].
      margin: fraction in (0, 1) of the least-cost reduction held back.

    Returns:
      (thresholds c' [m], least-cost weights q* [B, M], their costs c* [m]).
    """
    prior = jnp.exp(log_prior)
    prior_costs = jnp.mean(jnp.einsum("bk,bkj->bj", prior, q_costs), axis=0)
    which = (thresholds < prior_costs).astype(q_costs.dtype)
    # warm start: a small tilt p exp(-c / eta) has KL ~ Var_p(c) / (2 eta^2), so KL = eps at
    # eta ~ sqrt(mean_s Var_p(c | s) / (2 eps)) (c = which . Q_c)
    cost = jnp.einsum("bkj,j->bk", q_costs, which)
    mean = jnp.sum(prior * cost, axis=-1, keepdims=True)
    var = jnp.mean(jnp.sum(prior * (cost - mean) ** 2, axis=-1))
    init_eta = jnp.sqrt(var / (2.0 * epsilon)) + 1e-6
    weights, _ = min_cost_estep(q_costs, log_prior, epsilon, which, init_eta, max_iters=max_iters, tol=tol)
    least = jnp.mean(jnp.einsum("bk,bkj->bj", weights, q_costs), axis=0)
    reachable = (1.0 - margin) * least + margin * prior_costs
    return jnp.maximum(thresholds, reachable), weights, least


def ema_update(accumulator: jax.Array, x: jax.Array, rate: float, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Bias-corrected exponential moving average (as Adam's moments).

    acc <- (1 - rate) acc + rate x from acc = 0; the estimate after ``count`` values is
    acc / (1 - (1 - rate)^count). With rate = 1 it is the newest x exactly.

    Args:
      accumulator: [...] the raw accumulator (zeros before the first value).
      x: [...] the newest value.
      rate: weight of the newest value, in (0, 1].
      count: [] values seen including x (>= 1).

    Returns:
      (new accumulator, bias-corrected estimate), both [...].
    """
    accumulator = (1.0 - rate) * accumulator + rate * x
    correction = 1.0 - (1.0 - rate) ** jnp.asarray(count, jnp.float32)
    return accumulator, accumulator / correction


def _advantage(q_reward: jax.Array, q_costs: jax.Array, lam: jax.Array) -> jax.Array:
    # A = Q_r - lam . Q_c, [..., B, M], as m broadcast multiply-adds (m is small): under the
    # line search's vmap over candidates they fuse with the logsumexp, where a batched small-K
    # dot materialised [candidates, B, M] with transposes (the largest E-step op at B = 4096)
    lam_q = lam[..., 0, None, None] * q_costs[..., 0]
    for j in range(1, q_costs.shape[-1]):
        lam_q = lam_q + lam[..., j, None, None] * q_costs[..., j]
    return q_reward - lam_q


def dual_value(
    eta: jax.Array,
    lam: jax.Array,
    q_reward: jax.Array,
    q_costs: jax.Array,
    log_prior: jax.Array,
    epsilon: float | jax.Array,
    thresholds: jax.Array,
) -> jax.Array:
    """The dual g(eta, lam) (see the module docstring).

    Args:
      eta: [] temperature (> 0).
      lam: [m] multipliers (>= 0).
      q_reward: [B, M] reward values of the candidate actions.
      q_costs: [B, M, m] cost values of the candidate actions.
      log_prior: [B, M] log p(a_k|s); -log M for M samples from pi_old.
      epsilon: KL bound (nats).
      thresholds: [m] cost thresholds c_hat.

    Returns:
      [] the dual value.
    """
    a = _advantage(q_reward, q_costs, lam)
    lse = jax.nn.logsumexp(a / eta + log_prior, axis=-1)
    return eta * epsilon + jnp.dot(lam, thresholds) + eta * jnp.mean(lse)


def estep_weights(
    q_reward: jax.Array, q_costs: jax.Array, log_prior: jax.Array, eta: jax.Array, lam: jax.Array
) -> jax.Array:
    """q(a_k|s) = softmax_k(log p_k + (Q_r - lam . Q_c) / eta), [B, M]."""
    return jax.nn.softmax(_advantage(q_reward, q_costs, lam) / eta + log_prior, axis=-1)


def dual_grad_hess(
    eta: jax.Array,
    lam: jax.Array,
    q_reward: jax.Array,
    q_costs: jax.Array,
    log_prior: jax.Array,
    epsilon: float | jax.Array,
    thresholds: jax.Array,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Analytic gradient [1 + m] and Hessian [1 + m, 1 + m] of g over x = (eta, lam).

    Also returns the statistics of q that the caller logs (kl, expected costs and reward).
    """
    a = _advantage(q_reward, q_costs, lam)  # [B, M]
    logits = a / eta + log_prior
    log_w = jax.nn.log_softmax(logits, axis=-1)
    w = jnp.exp(log_w)
    kl = jnp.sum(w * (log_w - log_prior), axis=-1)  # [B]
    mean_a = jnp.sum(w * a, axis=-1)  # [B]
    mean_c = jnp.einsum("bm,bmj->bj", w, q_costs)  # [B, m]
    da = a - mean_a[:, None]  # [B, M]
    dc = q_costs - mean_c[:, None, :]  # [B, M, m]
    var_a = jnp.mean(jnp.sum(w * da * da, axis=-1))
    cov_ac = jnp.mean(jnp.einsum("bm,bm,bmj->bj", w, da, dc), axis=0)  # [m]
    cov_cc = jnp.mean(jnp.einsum("bm,bmi,bmj->bij", w, dc, dc), axis=0)  # [m, m]

    grad = jnp.concatenate([jnp.reshape(epsilon - jnp.mean(kl), (1,)), thresholds - jnp.mean(mean_c, 0)])
    h_ee = var_a / eta**3
    h_el = cov_ac / eta**2
    h_ll = cov_cc / eta
    top = jnp.concatenate([jnp.reshape(h_ee, (1,)), h_el])[None, :]
    bottom = jnp.concatenate([h_el[:, None], h_ll], axis=1)
    hess = jnp.concatenate([top, bottom], axis=0)
    stats = {
        "kl": jnp.mean(kl),
        "expected_costs": jnp.mean(mean_c, axis=0),
        "expected_reward": jnp.mean(jnp.sum(w * q_reward, axis=-1)),
    }
    return grad, hess, stats


def solve_estep_dual(
    q_reward: jax.Array,
    q_costs: jax.Array,
    log_prior: jax.Array,
    epsilon: float | jax.Array,
    thresholds: jax.Array,
    init_eta: jax.Array | float = 1.0,
    init_lam: Optional[jax.Array] = None,
    *,
    max_iters: int = 30,
    tol: float = 2e-7,
    eta_min: float = 1e-6,
    eta_max: float = 1e5,
    lam_max: float = 1e5,
    fixed_lam: Optional[jax.Array] = None,
) -> DualSolution:
    """Minimises the E-step dual over eta in [eta_min, eta_max], lam in [0, lam_max]^m.

    With ``fixed_lam`` the multipliers are held there and only eta is solved for (q then meets
    the KL bound but not necessarily the thresholds).

    Jittable and vmappable; with a sharded batch the means are global (jit inserts the
    reductions), so every device gets the same (eta, lam).

    Args:
      q_reward: [B, M] reward values.
      q_costs: [B, M, m] cost values.
      log_prior: [B, M] log prior weights of the candidates (rows sum to 1 in prob space).
      epsilon: KL bound (nats, > 0).
      thresholds: [m] cost thresholds c_hat.
      init_eta: [] warm start (previous update's eta).
      init_lam: [m] warm start; zeros if None.
      max_iters: Newton iteration cap.
      tol: stop when an iteration decreases g by less than tol * (1 + |g|).
      eta_min, eta_max, lam_max: box bounds (the dual is unbounded below in lam when the
        cost constraint cannot be met within the KL ball; lam_max then binds).
      fixed_lam: [m] multipliers to hold (in [0, lam_max]); None = solve for them.

    Returns:
      The solution, with the statistics of q at it.
    """
    m = q_costs.shape[-1]
    dtype = q_reward.dtype
    # the search runs over y = (log eta, lam): the scale of eta is unknown a priori (it
    # follows the spread of the Q values), and steps in log eta are scale-free
    lower = jnp.concatenate([jnp.asarray([jnp.log(eta_min)], dtype), jnp.zeros((m,), dtype)])
    upper = jnp.concatenate([jnp.asarray([jnp.log(eta_max)], dtype), jnp.full((m,), lam_max, dtype)])
    if fixed_lam is not None:
        # a box of zero width: the lam coordinates are always active and stay where they are
        fixed_lam = jnp.clip(jnp.asarray(fixed_lam, dtype), 0.0, lam_max)
        lower = lower.at[1:].set(fixed_lam)
        upper = upper.at[1:].set(fixed_lam)
        init_lam = fixed_lam
    if init_lam is None:
        init_lam = jnp.zeros((m,), dtype)
    init_eta = jnp.clip(jnp.asarray(init_eta, dtype), eta_min, eta_max)
    y0 = jnp.concatenate([jnp.reshape(jnp.log(init_eta), (1,)), jnp.asarray(init_lam, dtype)])
    y0 = jnp.clip(y0, lower, upper)
    steps = jnp.asarray(_STEPS, dtype)

    def value(y: jax.Array) -> jax.Array:
        return dual_value(jnp.exp(y[0]), y[1:], q_reward, q_costs, log_prior, epsilon, thresholds)

    def newton_step(y: jax.Array, gy: jax.Array) -> tuple[jax.Array, jax.Array]:
        eta = jnp.exp(y[0])
        grad, hess, _ = dual_grad_hess(eta, y[1:], q_reward, q_costs, log_prior, epsilon, thresholds)
        # chain rule to y; the Hessian drops the eta * dg/deta term so it stays PSD (g is
        # convex in eta, not in log eta); it vanishes at an interior optimum, so the local
        # convergence is still Newton's
        jac = jnp.concatenate([jnp.reshape(eta, (1,)), jnp.ones((m,), dtype)])
        grad = grad * jac
        hess = hess * jac[:, None] * jac[None, :]
        # a bound is active when the variable sits on it and the gradient pushes outwards
        active = ((y <= lower) & (grad > 0)) | ((y >= upper) & (grad < 0)) | (lower >= upper)
        free = (~active).astype(dtype)
        # Jacobi scaling, then a Levenberg floor relative to the unit diagonal, so coordinates
        # of very different scales are regularised alike
        diag = jnp.abs(jnp.diagonal(hess))
        scale = jnp.sqrt(diag + 1e-30)
        h_scaled = hess / scale[:, None] / scale[None, :]
        h_free = h_scaled * free[:, None] * free[None, :] + jnp.diag(1.0 - free)
        h_free = h_free + 1e-6 * jnp.eye(m + 1, dtype=dtype)
        newton_dir = -jnp.linalg.solve(h_free, grad * free / scale) / scale
        grad_dir = -grad * free / (diag + 1e-30)
        newton_dir = jnp.where(jnp.all(jnp.isfinite(newton_dir)), newton_dir, grad_dir)
        grad_dir = jnp.where(jnp.isfinite(grad_dir), grad_dir, 0.0)
        # trust region: at most a factor e^8 in eta and 8 (1 + lam) in lam per iteration, so a
        # flat direction (one-hot q, zero curvature) cannot throw the iterate onto a far bound
        cap = jnp.concatenate([jnp.full((1,), 8.0, dtype), 8.0 * (1.0 + y[1:])])
        dirs = jnp.stack([newton_dir, grad_dir])  # [2, 1 + m]
        shrink = jnp.max(jnp.abs(dirs) / cap[None, :], axis=1, keepdims=True)
        dirs = dirs / jnp.maximum(shrink, 1.0)
        cands = jnp.clip(y[None, None, :] + steps[None, :, None] * dirs[:, None, :], lower, upper)
        cands = jnp.reshape(cands, (-1, m + 1))
        vals = jax.vmap(value)(cands)
        vals = jnp.where(jnp.isfinite(vals), vals, jnp.inf)
        best = jnp.argmin(vals)
        improved = vals[best] < gy
        y_new = jnp.where(improved, cands[best], y)
        g_new = jnp.where(improved, vals[best], gy)
        return y_new, g_new

    def cond(carry):
        i, _, gy, g_prev = carry
        not_converged = (g_prev - gy) > tol * (1.0 + jnp.abs(gy))
        return (i < max_iters) & ((i == 0) | not_converged)

    def body(carry):
        i, y, gy, _ = carry
        y_new, g_new = newton_step(y, gy)
        return i + 1, y_new, g_new, gy

    g0 = value(y0)
    iters, y, gy, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), y0, g0, g0))
    eta = jnp.exp(y[0])
    _, _, stats = dual_grad_hess(eta, y[1:], q_reward, q_costs, log_prior, epsilon, thresholds)
    return DualSolution(
        eta=eta,
        lam=y[1:],
        value=gy,
        kl=stats["kl"],
        expected_costs=stats["expected_costs"],
        expected_reward=stats["expected_reward"],
        iterations=iters,
    )


# ----------------------------------------------------------------------------- Lagrange multipliers
# The multipliers of the Lagrangian baselines (PPO-, DDPG-, SAC-Lagrangian) are not solved for
# like CVPO's E-step dual: they follow the measured average normalised cost of the policy, once
# per rollout or block, by one of two rules.


def gradient_lagrange_update(lam: jax.Array, avg_costs: jax.Array, target: float | jax.Array, lr: float,
                             lam_max: float) -> jax.Array:
    """Projected dual ascent, per constraint: lam <- clip(lam + lr (avg_cost - target), 0, lam_max)."""
    return jnp.clip(lam + lr * (avg_costs - target), 0.0, lam_max)


@struct.dataclass
class PIDState:
    """Memory of the PID Lagrangian multiplier (Stooke, Achiam & Abbeel, ICML 2020, Algorithm 2).

    Attributes:
      integral: [m] I_k, the accumulated error, kept >= 0 (anti-windup by projection).
      error_ema: [m] the (exponentially smoothed) error e_k = J_k - target of the P term.
      cost_ema: [m] the (exponentially smoothed) cost J_k of the D term; holds J_{k-1} between updates.
    """

    integral: jax.Array
    error_ema: jax.Array
    cost_ema: jax.Array


def pid_init(num_constraints: int, lam_init: float = 0.0, ki: float = 0.0) -> PIDState:
    """Zero memory, except that the integral starts at lam_init / Ki so the first I term is lam_init.

    J_{-1} = 0 as in Stooke et al.'s Algorithm 2, so the first D term is Kd max(J_0, 0).
    """
    integral = lam_init / ki if (ki > 0 and lam_init > 0) else 0.0
    z = jnp.zeros((num_constraints,), jnp.float32)
    return PIDState(integral=z + integral, error_ema=z, cost_ema=z)


def pid_lagrange_update(pid: PIDState, avg_costs: jax.Array, target: float | jax.Array, kp: float, ki: float,
                        kd: float, ema_p: float = 0.0, ema_d: float = 0.0,
                        lam_max: float = float("inf")) -> tuple[jax.Array, PIDState, dict[str, jax.Array]]:
    """One PID step of the multipliers from the newest average cost J_k (Stooke et al. 2020, Alg. 2).

        e_k = J_k - target                      I_k = max(0, I_{k-1} + e_k)
        P_k = a_p P_{k-1} + (1 - a_p) e_k       D_k = a_d D_{k-1} + (1 - a_d) J_k
        lam_k = clip(Kp P_k + Ki I_k + Kd max(0, D_k - D_{k-1}), 0, lam_max)

    With a_p = a_d = 0 this is Algorithm 2 exactly; the smoothing is OmniSafe's
    (``pid_delta_p_ema_alpha``, ``pid_delta_d_ema_alpha``). With Kp = Kd = 0 it is the
    gradient update with step Ki (lam_k = Ki I_k, I_k = max(0, I_{k-1} + e_k)). The integral
    is kept in units of the error, so a change of Ki rescales the whole history.

    Args:
      pid: the memory of the previous step.
      avg_costs: [m] J_k, the average normalised cost of the newest rollout / block.
      target: [m] (or scalar) the cost target (1 = the limit).
      kp, ki, kd: the gains (>= 0).
      ema_p, ema_d: smoothing weights of the previous P input and D input, in [0, 1).
      lam_max: upper clip of each multiplier.

    Returns:
      ``(lam [m], new memory, terms)`` with ``terms`` the P, I and D contributions (each [m],
      before the projection onto [0, lam_max]).
    """
    error = avg_costs - target
    integral = jnp.maximum(pid.integral + error, 0.0)
    error_ema = ema_p * pid.error_ema + (1.0 - ema_p) * error
    cost_ema = ema_d * pid.cost_ema + (1.0 - ema_d) * avg_costs
    rise = jnp.maximum(cost_ema - pid.cost_ema, 0.0)
    terms = {"p": kp * error_ema, "i": ki * integral, "d": kd * rise}
    lam = jnp.clip(terms["p"] + terms["i"] + terms["d"], 0.0, lam_max)
    return lam, PIDState(integral=integral, error_ema=error_ema, cost_ema=cost_ema), terms


class LagrangeSettings(Protocol):
    """The multiplier fields every Lagrangian agent config has (``meg_jax.rl.config``)."""

    dual: str
    lagrange_lr: float
    lagrange_max: float
    pid_kp: float
    pid_ki: float
    pid_kd: float
    pid_ema_p: float
    pid_ema_d: float


def update_lagrange(settings: LagrangeSettings, lam: jax.Array, pid: PIDState, avg_costs: jax.Array,
                    target: float | jax.Array) -> tuple[jax.Array, PIDState]:
    """The configured rule (``settings.dual``: "gradient" or "pid") applied to one measured average cost.

    Args:
      settings: an agent config (``PPOConfig``, ``DDPGConfig``, ``SACConfig``).
      lam: [m] current multipliers (read by the gradient rule only).
      pid: PID memory (advanced by the PID rule only, returned unchanged otherwise).
      avg_costs: [m] average normalised cost of the newest rollout / block.
      target: the cost target (1 - cost_margin).
    """
    if settings.dual == "pid":
        lam, pid, _ = pid_lagrange_update(pid, avg_costs, target, settings.pid_kp, settings.pid_ki, settings.pid_kd,
                                          settings.pid_ema_p, settings.pid_ema_d, settings.lagrange_max)
        return lam, pid
    if settings.dual == "gradient":
        return gradient_lagrange_update(lam, avg_costs, target, settings.lagrange_lr, settings.lagrange_max), pid
    raise ValueError(f"dual must be 'gradient' or 'pid', got {settings.dual!r}")
