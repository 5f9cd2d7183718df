"""Device-resident replay buffer: a ring buffer pytree, one row per parallel environment.

Storage is laid out ``[num_envs, capacity_per_env, ...]`` so that, when the environment batch
is sharded over the mesh's data axis, each device holds exactly the rows of its own
environments and an insertion (one transition per environment, at the same time index) is a
local ``dynamic_update_slice`` with no communication. Sampling draws (env, time) pairs
uniformly over the filled part; under jit with a sharded buffer the gather is global, so the
sampled batch is the same on 1 or many devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["Transition", "ReplayBuffer", "replay_init", "replay_add", "replay_sample", "nstep_transition",
           "replay_sample_nstep", "replay_mean_reward"]


@struct.dataclass
class Transition:
    """One environment step (leading axes: [num_envs] when collected, [B] when sampled).

    Attributes:
      obs: [..., obs_dim] observation the action was chosen on.
      action: [..., action_dim] float (continuous head) or [...] int32 (discrete head).
      reward: [...] reward (quality).
      costs: [..., m] cost vector, divided by the limits (1.0 = at the limit).
      next_obs: [..., obs_dim] next observation (after an auto-reset: the new episode's first).
      discount: [...] 1 to bootstrap, 0 at a true termination.
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    costs: jax.Array
    next_obs: jax.Array
    discount: jax.Array


@struct.dataclass
class ReplayBuffer:
    """Ring buffer of transitions.

    Attributes:
      data: Transition with leaves [num_envs, capacity_per_env, ...].
      pos: [] int32 next time index to write.
      size: [] int32 filled time indices (<= capacity_per_env).
    """

    data: Transition
    pos: jax.Array
    size: jax.Array

    @property
    def capacity_per_env(self) -> int:
        return self.data.reward.shape[1]

    @property
    def num_envs(self) -> int:
        return self.data.reward.shape[0]


def replay_init(example: Transition, capacity_per_env: int) -> ReplayBuffer:
    """An empty buffer shaped after ``example`` (leaves [num_envs, ...])."""
    if capacity_per_env < 1:
        raise ValueError(f"replay capacity per environment must be >= 1, got {capacity_per_env}")

    def alloc(x: jax.Array) -> jax.Array:
        # zeros_like keeps the sharding of the example's env axis
        z = jnp.zeros_like(x)[:, None]
        return jnp.repeat(z, capacity_per_env, axis=1)

    return ReplayBuffer(data=jax.tree.map(alloc, example), pos=jnp.int32(0), size=jnp.int32(0))


def replay_add(buffer: ReplayBuffer, batch: Transition) -> ReplayBuffer:
    """Writes one transition per environment (leaves [num_envs, ...]) at the ring position."""
    cap = buffer.capacity_per_env

    def write(store: jax.Array, x: jax.Array) -> jax.Array:
        start = (0, buffer.pos) + (0,) * (store.ndim - 2)
        return jax.lax.dynamic_update_slice(store, x[:, None].astype(store.dtype), start)

    data = jax.tree.map(write, buffer.data, batch)
    return ReplayBuffer(data=data, pos=(buffer.pos + 1) % cap, size=jnp.minimum(buffer.size + 1, cap))


def replay_sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> Transition:
    """Uniform sample of ``batch_size`` transitions (with replacement) from the filled part.

    The buffer must hold at least one step; leaves come back [batch_size, ...].
    """
    k_env, k_time = jax.random.split(key)
    env_idx = jax.random.randint(k_env, (batch_size,), 0, buffer.num_envs)
    time_idx = jax.random.randint(k_time, (batch_size,), 0, jnp.maximum(buffer.size, 1))
    return jax.tree.map(lambda x: x[env_idx, time_idx], buffer.data)


def nstep_transition(buffer: ReplayBuffer, env_idx: jax.Array, start: jax.Array, n: int, gamma: float) -> Transition:
    """The n-step transitions that begin at logical time ``start`` of environment ``env_idx``.

    Logical time 0 is the oldest stored step of each environment (the ring's order), so the
    n steps ``start .. start + n - 1`` are consecutive in the environment's stream. With
    d_k the stored discounts (1 to bootstrap, 0 at a termination):

        reward   = sum_{k<n} gamma^k (prod_{i<k} d_i) r_k          (costs likewise)
        discount = prod_{k<n} d_k,   next_obs = next_obs_{n-1},   obs, action = step 0's

    so the TD target is ``reward + gamma^n * discount * V(next_obs)`` (``critic_targets``
    with gamma^n). In the continuing view of the agents (an episode end bootstraps into the
    next episode's first observation) the window may span an episode boundary.

    Args:
      buffer: the ring buffer.
      env_idx: [B] int32 environments.
      start: [B] int32 logical start times, in [0, size - n].
      n: steps per transition (>= 1).
      gamma: discount factor.

    Returns:
      a Transition with leaves [B, ...].
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cap = buffer.capacity_per_env
    oldest = jnp.where(buffer.size < cap, 0, buffer.pos)  # physical index of logical time 0
    data = buffer.data

    newest = jnp.maximum(buffer.size - 1, 0)

    def at(k: int) -> Transition:
        t = (oldest + jnp.minimum(start + k, newest)) % cap
        return jax.tree.map(lambda x: x[env_idx, t], data)

    first = at(0)
    reward, costs, alive = first.reward, first.costs, first.discount
    last = first
    for k in range(1, n):
        step = at(k)
        scale = (gamma**k) * alive
        reward = reward + scale * step.reward
        costs = costs + scale[:, None] * step.costs
        alive = alive * step.discount
        last = step
    return Transition(obs=first.obs, action=first.action, reward=reward, costs=costs, next_obs=last.next_obs,
                      discount=alive)


def replay_sample_nstep(buffer: ReplayBuffer, key: jax.Array, batch_size: int, n: int, gamma: float) -> Transition:
    """Uniform sample of ``batch_size`` n-step transitions (``nstep_transition``), with replacement.

    Start times are uniform over the stored steps that have n - 1 successors stored (a buffer
    holding fewer than n steps yields windows that repeat its newest step; the agents sample
    only after ``min_replay`` steps). ``n = 1`` is ``replay_sample`` (same draws, same batch).
    """
    if n == 1:
        return replay_sample(buffer, key, batch_size)
    k_env, k_time = jax.random.split(key)
    env_idx = jax.random.randint(k_env, (batch_size,), 0, buffer.num_envs)
    start = jax.random.randint(k_time, (batch_size,), 0, jnp.maximum(buffer.size - n + 1, 1))
    return nstep_transition(buffer, env_idx, start, n, gamma)


def replay_mean_reward(buffer: ReplayBuffer) -> jax.Array:
    """[] mean reward over the filled part of the buffer (0 while it is empty)."""
    filled = jnp.arange(buffer.capacity_per_env) < buffer.size  # [cap]: time slots written so far
    reward = buffer.data.reward  # [num_envs, cap]
    total = jnp.sum(jnp.where(filled[None, :], reward, 0.0))
    return total / jnp.maximum(buffer.size * buffer.num_envs, 1).astype(reward.dtype)
