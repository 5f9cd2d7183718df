"""Policy and critic networks of the constrained agents (Flax linen), and their distributions.

* ``GaussianPolicy``: diagonal Gaussian over the continuous action in [-1, 1]^d. The action
  is not squashed (tanh-free, as in the CVPO reference); the environment clips it. The mean
  is linear, the standard deviation ``softplus(.) + min_std``, both state dependent.
* ``CategoricalPolicy``: logits over the discrete K x r grid.
* ``CriticEnsemble``: ``num_heads`` independent Q(s, a) MLPs evaluated in one call (a
  vmapped module). CVPO uses heads [reward_1, reward_2, cost_1, ..., cost_m].
* ``DiscreteCriticEnsemble``: the same with Q(s, .) for every discrete action at once.
* ``ValueEnsemble``: V(s) heads for PPO (reward + one per constraint).
* ``critic_ensemble_particles``: a ``CriticEnsemble``'s Q at M actions per state (same
  parameters, no gradient path needed), computed cache-sized chunk by chunk with the state's
  share of the first layer computed once per state instead of once per action.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "MLP",
    "GaussianPolicy",
    "CategoricalPolicy",
    "CriticEnsemble",
    "DiscreteCriticEnsemble",
    "ValueEnsemble",
    "critic_ensemble_particles",
    "gaussian_log_prob",
    "gaussian_sample",
    "gaussian_kl_mean",
    "gaussian_kl_std",
    "categorical_kl",
]


class MLP(nn.Module):
    """ReLU MLP with optional LayerNorm after each hidden layer.

    Attributes:
      hidden: widths of the hidden layers.
      out: output width.
      layer_norm: LayerNorm after each hidden Dense.
      out_scale: variance scaling of the last layer's init (small = near-zero outputs).
    """

    hidden: Sequence[int]
    out: int
    layer_norm: bool = False
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.Dense(width)(x)
            if self.layer_norm:
                x = nn.LayerNorm()(x)
            x = nn.relu(x)
        init = nn.initializers.variance_scaling(self.out_scale, "fan_in", "truncated_normal")
        return nn.Dense(self.out, kernel_init=init)(x)


class GaussianPolicy(nn.Module):
    """pi(a|s) = N(mean(s), diag(std(s)^2)); returns (mean [..., d], std [..., d])."""

    hidden: Sequence[int]
    action_dim: int
    init_std: float = 0.5
    min_std: float = 1e-3

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = MLP(self.hidden, 2 * self.action_dim, out_scale=0.01)(obs)
        mean, raw = jnp.split(out, 2, axis=-1)
        # softplus offset so that raw = 0 gives init_std
        offset = jnp.log(jnp.expm1(self.init_std - self.min_std))
        std = jax.nn.softplus(raw + offset) + self.min_std
        return mean, std


class CategoricalPolicy(nn.Module):
    """pi(a|s) = softmax(logits(s)); returns logits [..., num_actions]."""

    hidden: Sequence[int]
    num_actions: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return MLP(self.hidden, self.num_actions, out_scale=0.01)(obs)


def _mlp_ensemble(num_heads: int, *mlp_args: Any) -> nn.Module:
    """``num_heads`` independent ``MLP(*mlp_args)`` with stacked params; outputs on the last axis.

    Built inside the caller's compact ``__call__`` (the ensemble is its submodule).
    """
    return nn.vmap(
        MLP,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None,
        out_axes=-1,
        axis_size=num_heads,
    )(*mlp_args)


class CriticEnsemble(nn.Module):
    """``num_heads`` independent Q(s, a) MLPs; returns [..., num_heads]."""

    hidden: Sequence[int]
    num_heads: int
    layer_norm: bool = True

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs, action], axis=-1)
        heads = _mlp_ensemble(self.num_heads, self.hidden, 1, self.layer_norm)
        return heads(x)[..., 0, :]


class DiscreteCriticEnsemble(nn.Module):
    """``num_heads`` Q(s, .) MLPs over every discrete action; returns [..., num_actions, num_heads]."""

    hidden: Sequence[int]
    num_heads: int
    num_actions: int
    layer_norm: bool = True

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        heads = _mlp_ensemble(self.num_heads, self.hidden, self.num_actions, self.layer_norm)
        return heads(obs)


class ValueEnsemble(nn.Module):
    """``num_heads`` V(s) MLPs; returns [..., num_heads]."""

    hidden: Sequence[int]
    num_heads: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        heads = _mlp_ensemble(self.num_heads, self.hidden, 1)
        return heads(obs)[..., 0, :]


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-6) -> jax.Array:
    """flax ``nn.LayerNorm()`` over the last axis (its fast variance E[x^2] - E[x]^2)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean, 0.0)
    return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias


def critic_ensemble_particles(
    params: Any, obs: jax.Array, actions: jax.Array, layer_norm: bool = True, rows_per_chunk: int = 256
) -> jax.Array:
    """Every head of a ``CriticEnsemble`` at M actions per state: Q(obs[b], actions[b, k]).

    Equal to ``CriticEnsemble(...).apply(params, obs[:, None], actions)`` up to float rounding
    (different summation order), computed for speed: the first layer is split as
    ``obs @ W_obs + action @ W_act``, so the state's part is computed once per state rather
    than once per action, and the states are processed a chunk of about ``rows_per_chunk`` (state, action) pairs at
    a time (``lax.map``; the number of states per chunk is the largest divisor of B not above
    ``rows_per_chunk / M``) so that each chunk's activations ([heads, chunk x M, width]) stay in cache
    instead of streaming [heads, B x M, width] tensors through memory between the layers.

    Args:
      params: ``CriticEnsemble`` parameters ({"params": {"VmapMLP_0": {"Dense_i", "LayerNorm_i"}}},
        kernels [H, in, out]).
      obs: [B, obs_dim] states.
      actions: [B, M, action_dim] actions (already clipped as the critic expects).
      layer_norm: whether the ensemble was built with ``layer_norm=True``.
      rows_per_chunk: (state, action) pairs per chunk (256 x 128-wide x 4 heads of float32
        activations = 512 KiB, inside a core's L2; measured fastest on this CPU at M = 16).

    Returns:
      [B, M, H] Q values of every head.
    """
    p = params["params"]["VmapMLP_0"]
    num_dense = sum(1 for name in p if name.startswith("Dense_"))
    obs_dim = obs.shape[-1]
    w0 = p["Dense_0"]["kernel"]  # [H, obs_dim + action_dim, width]
    # the state's share of the first layer, once per state: [B, H, width]
    h_obs = jnp.einsum("bi,hiw->bhw", obs, w0[:, :obs_dim]) + p["Dense_0"]["bias"]
    w0_act = w0[:, obs_dim:]  # [H, action_dim, width]

    def chunk(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        h_o, a = args  # [c, H, w], [c, M, da]
        c, m = a.shape[0], a.shape[1]
        # the action's share as broadcast multiply-adds (action_dim is tiny): fuses with the add
        # and the LayerNorm statistics instead of running as a separate small-K matmul
        h = jnp.swapaxes(h_o, 0, 1)[:, :, None]  # [H, c, 1, w]
        for j in range(a.shape[-1]):
            h = h + a[None, :, :, j, None] * w0_act[:, None, None, j, :]  # [H, c, M, w]
        h = h.reshape(h.shape[0], c * m, h.shape[-1])
        for i in range(num_dense - 1):
            if i > 0:
                h = jnp.einsum("hrw,hwv->hrv", h, p[f"Dense_{i}"]["kernel"]) + p[f"Dense_{i}"]["bias"][:, None]
            if layer_norm:
                ln = p[f"LayerNorm_{i}"]
                h = _layer_norm(h, ln["scale"][:, None], ln["bias"][:, None])
            h = nn.relu(h)
        last = p[f"Dense_{num_dense - 1}"]
        q = jnp.einsum("hrw,hw->hr", h, last["kernel"][..., 0]) + last["bias"]  # [H, c M]
        return jnp.transpose(q.reshape(q.shape[0], c, m), (1, 2, 0))  # [c, M, H]

    b = obs.shape[0]
    if rows_per_chunk >= b * actions.shape[1]:  # one chunk: no loop
        return chunk((h_obs, actions))
    per_chunk = max(1, min(rows_per_chunk // actions.shape[1], b))
    c = max(d for d in range(1, per_chunk + 1) if b % d == 0)  # states per chunk, chunks of equal size
    q = jax.lax.map(chunk, (h_obs.reshape((b // c, c) + h_obs.shape[1:]), actions.reshape((b // c, c) + actions.shape[1:])))
    return q.reshape((b,) + q.shape[2:])


def gaussian_log_prob(action: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """log N(action; mean, diag(std^2)) summed over the last axis, [...]."""
    z = (action - mean) / std
    return jnp.sum(-0.5 * z * z - jnp.log(std) - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


def gaussian_sample(key: jax.Array, mean: jax.Array, std: jax.Array, num: int | None = None) -> jax.Array:
    """Samples [num, ..., d] (or [..., d] when num is None) actions."""
    shape = mean.shape if num is None else (num,) + mean.shape
    return mean + std * jax.random.normal(key, shape, mean.dtype)


def gaussian_kl_mean(mean_old: jax.Array, mean: jax.Array, std_old: jax.Array) -> jax.Array:
    """Mean part of KL(pi_old || pi): 1/2 (mu - mu_old)^T Sigma_old^-1 (mu - mu_old), [...]."""
    z = (mean - mean_old) / std_old
    return 0.5 * jnp.sum(z * z, axis=-1)


def gaussian_kl_std(std_old: jax.Array, std: jax.Array) -> jax.Array:
    """Covariance part: 1/2 [tr(Sigma^-1 Sigma_old) - d + log |Sigma| / |Sigma_old|], [...]."""
    ratio = (std_old / std) ** 2
    return 0.5 * jnp.sum(ratio - 1.0 - jnp.log(ratio), axis=-1)


def categorical_kl(logits_old: jax.Array, logits: jax.Array) -> jax.Array:
    """KL(pi_old || pi) of two categoricals, [...]."""
    logp_old = jax.nn.log_softmax(logits_old, axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.exp(logp_old) * (logp_old - logp), axis=-1)
