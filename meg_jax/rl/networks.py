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
    """``num_heads`` Q(s, .) MLPs over every discrete action.

    ``__call__(obs)`` -> [..., num_actions, num_heads]; ``__call__(obs, action)`` with int
    ``action`` [...] -> [..., num_heads], the taken actions' values (the interface of
    :class:`CoordinateCriticEnsemble` and, with a continuous action, of :class:`CriticEnsemble`).
    """

    hidden: Sequence[int]
    num_heads: int
    num_actions: int
    layer_norm: bool = True

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array | None = None) -> jax.Array:
        heads = _mlp_ensemble(self.num_heads, self.hidden, self.num_actions, self.layer_norm)
        q = heads(obs)
        if action is None:
            return q
        return jnp.take_along_axis(q, action[..., None, None], axis=-2)[..., 0, :]


class CoordinateCriticEnsemble(nn.Module):
    """``num_heads`` Q(s, a) MLPs of a discrete action read through its coordinates.

    Each head is one MLP of ``[obs, coordinates[a]]`` (``coordinates`` [A, F], e.g. an action's
    (K, r) on the grid), so what a head learns of one action carries to its neighbours on the
    grid, where :class:`DiscreteCriticEnsemble`'s A independent outputs learn each action only
    from the transitions that took it.

    ``__call__(obs)`` -> [..., A, num_heads] (every action, as ``DiscreteCriticEnsemble``);
    ``__call__(obs, action)`` with int ``action`` [...] -> [..., num_heads] (the taken actions
    only: the TD step's rows, without the work of the other A - 1).
    """

    hidden: Sequence[int]
    num_heads: int
    coordinates: tuple[tuple[float, ...], ...]  # [A][F], hashable (a module attribute)
    layer_norm: bool = True

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array | None = None) -> jax.Array:
        coords = jnp.asarray(self.coordinates, jnp.float32)  # [A, F]
        heads = _mlp_ensemble(self.num_heads, self.hidden, 1, self.layer_norm)
        if action is not None:
            return heads(jnp.concatenate([obs, coords[action]], axis=-1))[..., 0, :]
        lead = obs.shape[:-1] + (coords.shape[0],)
        x = jnp.concatenate([jnp.broadcast_to(obs[..., None, :], lead + obs.shape[-1:]),
                             jnp.broadcast_to(coords, lead + coords.shape[-1:])], axis=-1)
        return heads(x)[..., 0, :]


class ValueEnsemble(nn.Module):
    """``num_heads`` V(s) MLPs; returns [..., num_heads]."""

    hidden: Sequence[int]
    num_heads: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        heads = _mlp_ensemble(self.num_heads, self.hidden, 1)
        return heads(obs)[..., 0, :]


_LN_EPS = 1e-6  # flax nn.LayerNorm's default epsilon


def critic_ensemble_particles(
    params: Any, obs: jax.Array, actions: jax.Array, layer_norm: bool = True, rows_per_chunk: int = 256,
    matmul_dtype: Any = jnp.float32,
) -> jax.Array:
    """Every head of a ``CriticEnsemble`` at M actions per state: Q(obs[b], actions[b, k]).

    Equal to ``CriticEnsemble(...).apply(params, obs[:, None], actions)`` up to float rounding
    (different summation order), computed for speed: the first layer is split as
    ``obs @ W_obs + action @ W_act``, so the state's part is computed once per state rather
    than once per action, and the states are processed a chunk of about ``rows_per_chunk`` (state, action) pairs at
    a time (``lax.map``; the number of states per chunk is the largest divisor of B not above
    ``rows_per_chunk / M``) so that each chunk's activations ([heads, chunk x M, width]) stay in cache
    instead of streaming [heads, B x M, width] tensors through memory between the layers.

    With LayerNorm, every Dense that feeds one has its kernel and bias centred over the
    output features (``W - mean_out W``, ``b - mean(b)``, once per call): its outputs are then
    ``x - mean(x)`` exactly (LayerNorm's centring is linear), so each LayerNorm needs only the
    mean square of its (centred) input, and that statistic is computed without a pass over an
    activation of its own: for the first layer from per-state pieces,
    ``|h_o + a W|^2 = |h_o|^2 + 2 a . (W h_o) + a^T (W W^T) a`` (h_o the state's share, a the
    action); for a hidden layer ``|y + b|^2 = |y|^2 + 2 y . b + |b|^2`` on the GEMM's output y,
    so ``y + b`` is never written out (the LayerNorm-and-ReLU pass adds b itself). Per chunk
    that leaves the GEMMs, one LayerNorm-and-ReLU pass per layer and two reductions, where the
    module's order of operations took nine elementwise passes. Same maths as the module; the
    variance is a sum of squares expanded as above instead of flax's E[x^2] - E[x]^2 (equal in
    exact arithmetic, both lose relative precision only when the variance is small against
    the squared terms).

    Args:
      params: ``CriticEnsemble`` parameters ({"params": {"VmapMLP_0": {"Dense_i", "LayerNorm_i"}}},
        kernels [H, in, out]).
      obs: [B, obs_dim] states.
      actions: [B, M, action_dim] actions (already clipped as the critic expects).
      layer_norm: whether the ensemble was built with ``layer_norm=True``.
      rows_per_chunk: (state, action) pairs per chunk (256 x 128-wide x 4 heads of float32
        activations = 512 KiB, inside a core's L2; measured fastest on this CPU at M = 16).
      matmul_dtype: operand type of the hidden layers' GEMMs (the evaluation's dominant work):
        float32, or bfloat16 (operands rounded to 8 bits of mantissa, products accumulated in
        float32; AMX / tensor-core speed). Everything else stays float32.

    Returns:
      [B, M, H] Q values of every head.
    """
    p = params["params"]["VmapMLP_0"]
    num_dense = sum(1 for name in p if name.startswith("Dense_"))
    obs_dim = obs.shape[-1]
    kernels = [p[f"Dense_{i}"]["kernel"] for i in range(num_dense)]  # [H, in, out]
    biases = [p[f"Dense_{i}"]["bias"] for i in range(num_dense)]  # [H, out]
    if layer_norm:  # centred hidden Dense layers: their outputs are x - mean(x) (see above)
        for i in range(num_dense - 1):
            kernels[i] = kernels[i] - jnp.mean(kernels[i], axis=-1, keepdims=True)
            biases[i] = biases[i] - jnp.mean(biases[i], axis=-1, keepdims=True)
    w0 = kernels[0]  # [H, obs_dim + action_dim, width]
    width = w0.shape[-1]
    # the state's share of the first layer, once per state: [B, H, width]
    h_obs = jnp.einsum("bi,hiw->bhw", obs, w0[:, :obs_dim]) + biases[0]
    w0_act = w0[:, obs_dim:]  # [H, action_dim, width]
    gram = jnp.einsum("hjw,hkw->hjk", w0_act, w0_act)  # [H, da, da] W W^T of the action's share

    def layer_norm_relu(x: jax.Array, i: int, sum_sq: jax.Array) -> jax.Array:
        # LayerNorm_i of a centred x (mean 0 over the features) with sum_w x^2 given, then the ReLU
        ln = p[f"LayerNorm_{i}"]
        # (clipped at 0 as flax clips its variance: the expanded sums may round below it)
        inv_std = jax.lax.rsqrt(jnp.maximum(sum_sq[..., None], 0.0) / width + _LN_EPS)
        return nn.relu(x * (inv_std * ln["scale"][:, None]) + ln["bias"][:, None])

    def chunk(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        h_o, a = args  # [c, H, w], [c, M, da]
        c, m = a.shape[0], a.shape[1]
        # the action's share as broadcast multiply-adds (action_dim is tiny): fuses with the
        # LayerNorm instead of running as a separate small-K matmul
        h = jnp.swapaxes(h_o, 0, 1)[:, :, None]  # [H, c, 1, w]
        for j in range(a.shape[-1]):
            h = h + a[None, :, :, j, None] * w0_act[:, None, None, j, :]  # [H, c, M, w]
        h = h.reshape(h.shape[0], c * m, h.shape[-1])
        if layer_norm:  # |h_o + a W|^2 from per-state pieces: [c, M, H] -> [H, c M]
            sum_sq = (jnp.sum(h_o * h_o, axis=-1)[:, None]
                      + 2.0 * jnp.einsum("cmj,chj->cmh", a, jnp.einsum("chw,hjw->chj", h_o, w0_act))
                      + jnp.einsum("cmj,hjk,cmk->cmh", a, gram, a))
            h = layer_norm_relu(h, 0, jnp.transpose(sum_sq, (2, 0, 1)).reshape(h.shape[:2]))
        else:
            h = nn.relu(h)
        for i in range(1, num_dense - 1):
            y = jnp.einsum("hrw,hwv->hrv", h.astype(matmul_dtype), kernels[i].astype(matmul_dtype),
                           preferred_element_type=jnp.float32)
            if layer_norm:  # |y + b|^2 = |y|^2 + 2 y . b + |b|^2: y + b is not written out
                sum_sq = (jnp.sum(y * y, axis=-1) + 2.0 * jnp.einsum("hrw,hw->hr", y, biases[i])
                          + jnp.sum(biases[i] * biases[i], axis=-1)[:, None])
                h = layer_norm_relu(y + biases[i][:, None], i, sum_sq)
            else:
                h = nn.relu(y + biases[i][:, None])
        q = jnp.einsum("hrw,hw->hr", h, kernels[-1][..., 0]) + biases[-1]  # [H, c M]
        return jnp.transpose(q.reshape(q.shape[0], c, m), (1, 2, 0))  # [c, M, H]

    b = obs.shape[0]
    if rows_per_chunk >= b * actions.shape[1]:  # one chunk: no loop
        return chunk((h_obs, actions))
    per_chunk = max(1, min(rows_per_chunk // actions.shape[1], b))
    c = max(d for d in range(1, per_chunk + 1) if b % d == 0)  # states per chunk, chunks of equal size
    q = jax.lax.map(chunk, jax.tree.map(lambda x: x.reshape((b // c, c) + x.shape[1:]), (h_obs, actions)))
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
