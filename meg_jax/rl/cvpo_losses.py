"""MEG-CVPO's pure pieces: critic targets, M-step losses, KL multipliers, backtracking, polyak.

Stateless functions over arrays (rlax style), used by the jitted ``train_step`` of
``meg_jax.rl.cvpo`` and tested on hand-computed cases. Conventions are in ``cvpo``'s module
docstring (normalised costs, sums over the M sampled actions, means over the B states).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from meg_jax.rl import networks

__all__ = [
    "REWARD_HEADS",
    "polyak",
    "critic_targets",
    "gaussian_mstep_loss",
    "categorical_mstep_loss",
    "update_alpha",
    "backtrack_to_kl_bounds",
]

REWARD_HEADS = 2  # twin reward critics


def polyak(target: Any, online: Any, tau: float) -> Any:
    """target <- (1 - tau) target + tau online, leafwise."""
    return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target, online)


def critic_targets(
    reward: jax.Array, costs: jax.Array, discount: jax.Array, next_values: jax.Array, gamma: float
) -> tuple[jax.Array, jax.Array]:
    """TD targets of the reward and cost critics.

    Args:
      reward: [B] rewards.
      costs: [B, m] normalised costs.
      discount: [B] 1 to bootstrap, 0 at a termination.
      next_values: [B, 2 + m] target-critic values of the next state, averaged over next
        actions from the target actor: [Q_r1, Q_r2, Q_c1, ..., Q_cm].
      gamma: discount factor.

    Returns:
      y_r [B] = r + gamma d min(Q_r1, Q_r2) and y_c [B, m] = c + gamma d Q_c.
    """
    v_r = jnp.minimum(next_values[..., 0], next_values[..., 1])
    v_c = next_values[..., REWARD_HEADS:]
    y_r = reward + gamma * discount * v_r
    y_c = costs + gamma * discount[..., None] * v_c
    return y_r, y_c


def gaussian_mstep_loss(
    mean: jax.Array,
    std: jax.Array,
    mean_old: jax.Array,
    std_old: jax.Array,
    actions: jax.Array,
    weights: jax.Array,
    alpha_mu: jax.Array,
    alpha_sigma: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Decoupled weighted-ML loss of the Gaussian M-step (Abdolmaleki et al. 2018; CVPO eq. 10).

    Args:
      mean, std: [B, d] the policy being fitted.
      mean_old, std_old: [B, d] pi_old.
      actions: [B, M, d] actions sampled from pi_old (unclipped).
      weights: [B, M] E-step weights q (rows sum to 1).
      alpha_mu, alpha_sigma: [] KL multipliers (treated as constants).

    Returns:
      loss and {"nll", "kl_mean", "kl_std"}; kl_* are mean_s C_mu, C_Sigma.

    The weighted log-likelihoods are computed from per-state moments of the actions about
    mean_old (constants of the fit, which differentiates through mean and std only), expanding
    sum_k w_k (a_k - mu)^2 = D2 - 2 (mu - mu_old) D1 + W (mu - mu_old)^2 with
    W = sum_k w_k, D1 = sum_k w_k (a_k - mu_old), D2 = sum_k w_k (a_k - mu_old)^2: the same
    loss as summing log N(a_k; mu, sigma_old) over the M actions (up to float32 rounding),
    but the fitted policy's value and gradient only touch [B, d] arrays, not [B, M, d] ones.
    """
    total = jnp.sum(weights, axis=-1)[:, None]  # [B, 1] W (1 for a softmax row)
    dev = actions - mean_old[:, None]  # [B, M, d]
    d1 = jnp.einsum("bk,bkd->bd", weights, dev)  # [B, d]
    d2 = jnp.einsum("bk,bkd->bd", weights, dev * dev)  # [B, d]
    shift = mean - mean_old  # [B, d]
    log_norm = 0.5 * jnp.log(2.0 * jnp.pi)
    # sum_k w_k log N(a_k; mu, sigma_old) and sum_k w_k log N(a_k; mu_old, sigma), per state
    logp_mu = jnp.sum(-0.5 * (d2 - 2.0 * shift * d1 + total * shift * shift) / (std_old * std_old)
                      - total * (jnp.log(std_old) + log_norm), axis=-1)
    logp_sigma = jnp.sum(-0.5 * d2 / (std * std) - total * (jnp.log(std) + log_norm), axis=-1)
    nll = -jnp.mean(logp_mu + logp_sigma)
    kl_mean = jnp.mean(networks.gaussian_kl_mean(mean_old, mean, std_old))
    kl_std = jnp.mean(networks.gaussian_kl_std(std_old, std))
    loss = nll + jax.lax.stop_gradient(alpha_mu) * kl_mean + jax.lax.stop_gradient(alpha_sigma) * kl_std
    return loss, {"nll": nll, "kl_mean": kl_mean, "kl_std": kl_std}


def categorical_mstep_loss(
    logits: jax.Array, logits_old: jax.Array, weights: jax.Array, alpha: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted ML of the categorical head under one KL(pi_old || pi) bound.

    Args:
      logits, logits_old: [B, A].
      weights: [B, A] exact E-step weights over every action.
      alpha: [] KL multiplier.
    """
    nll = -jnp.mean(jnp.sum(weights * jax.nn.log_softmax(logits, axis=-1), axis=-1))
    kl = jnp.mean(networks.categorical_kl(logits_old, logits))
    return nll + jax.lax.stop_gradient(alpha) * kl, {"nll": nll, "kl_mean": kl, "kl_std": jnp.zeros_like(kl)}


def update_alpha(alpha: jax.Array, kl: jax.Array, epsilon: float, lr: float, alpha_max: float) -> jax.Array:
    """Projected dual ascent: alpha <- clip(alpha + lr (KL / eps - 1), 0, alpha_max).

    The step is measured in units of the bound so one learning rate serves every epsilon.
    """
    return jnp.clip(alpha + lr * (kl / epsilon - 1.0), 0.0, alpha_max)


# step fractions tried by the M-step's backtracking (largest first; 0 keeps the parameters)
_BACKTRACK = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0)


def backtrack_to_kl_bounds(
    params: Any, updates: Any, kl_of: Callable[[Any], jax.Array], bounds: jax.Array
) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
    """The largest fraction t of an optimiser update that keeps every KL within its bound.

    The M-step's multipliers steer the fit towards the trust region, but they react with a
    lag; this backtracking (as in TRPO's line search) makes every update respect the
    bounds on its batch. If even t = 0 violates them (pi_old moved), the t with the smallest
    violation max_i KL_i / bound_i is taken.

    Args:
      params: current parameters.
      updates: the optimiser's proposed step (``optax.apply_updates(params, updates)``).
      kl_of: parameters -> [n] KL terms (e.g. (C_mu, C_Sigma)) on the batch.
      bounds: [n] their bounds.

    Returns:
      (new parameters, chosen t, [n] KL terms at the new parameters, [n] KL terms of the
      full step t = 1).
    """
    fractions = jnp.asarray(_BACKTRACK, jnp.float32)

    def at(t):
        return jax.tree.map(lambda p, u: p + t * u, params, updates)

    def ratio_of(kls: jax.Array) -> jax.Array:
        return jnp.max(kls / bounds)

    # fractions are tried one at a time, largest first, stopping at the first inside the
    # bounds (usually t = 1 or 1/2), instead of evaluating all of them: same choice
    full_kls = kl_of(at(fractions[0]))
    full_ratio = ratio_of(full_kls)

    def cond(carry):
        i, inside, *_ = carry
        return (~inside) & (i + 1 < fractions.shape[0])

    def body(carry):
        i, _, best_i, best_ratio, best_kls = carry
        i = i + 1
        kls = kl_of(at(fractions[i]))
        ratio = ratio_of(kls)
        inside = ratio <= 1.0
        better = inside | (ratio < best_ratio)  # inside ends the loop; else keep the least violation
        return (i, inside, jnp.where(better, i, best_i), jnp.where(better, ratio, best_ratio),
                jnp.where(better, kls, best_kls))

    init = (jnp.int32(0), full_ratio <= 1.0, jnp.int32(0), full_ratio, full_kls)
    _, _, choice, _, kls = jax.lax.while_loop(cond, body, init)
    t = fractions[choice]
    return at(t), t, kls, full_kls
