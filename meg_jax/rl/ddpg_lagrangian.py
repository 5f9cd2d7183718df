"""DDPG-Lagrangian in JAX, on the same environments, blocks and harness as MEG-CVPO.

DDPG (Lillicrap et al., ICLR 2016) with one cost critic per constraint and a Lagrange
multiplier each, the off-policy Lagrangian baseline of the CVPO paper (Liu et al., ICML 2022)
and of FSRL / OmniSafe:

* actor: a deterministic policy mu(s) = tanh(MLP(s)) in [-1, 1]^d; behaviour: mu(s) plus
  Gaussian noise of ``exploration_std``, clipped to [-1, 1];
* critics: ``CriticEnsemble`` heads [Q_r, Q_c1 .. Q_cm] on normalised costs, TD targets
  y = (r, c) + gamma d Q'(s', mu'(s')) with the target critic and the target actor;
* actor loss: -mean_s (Q_r(s, mu(s)) - lam . Q_c(s, mu(s))) / (1 + sum lam) (FSRL's
  rescaling keeps the step size independent of lam);
* multipliers: once per block on the block's average normalised cost
  (``meg_jax.rl.offpolicy``), by projected ascent or PID (``dual.update_lagrange``);
* target networks: polyak averaging (``optax.incremental_update``) with rate ``tau``.

The process is continuing across episode ends (as for CVPO), costs are divided by the limits.
The behaviour policy (with its noise) is the one the multipliers constrain, so ``act(...,
deterministic=False)`` is it; ``deterministic=True`` gives mu(s).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from meg_jax.rl import blocks
from meg_jax.rl import dual as dual_lib
from meg_jax.rl import networks
from meg_jax.rl.config import DDPGConfig
from meg_jax.rl.cvpo import env_limits
from meg_jax.rl.offpolicy import OffPolicyAgent, example_transition, make_block, regress_critics, validate_offpolicy
from meg_jax.rl.replay import ReplayBuffer, Transition, replay_init, replay_sample

__all__ = ["DDPGState", "make_ddpg", "make_train", "ddpg_targets", "ddpg_actor_objective"]


@struct.dataclass
class DDPGState:
    """Everything a DDPG-Lagrangian run carries between blocks (checkpointed whole).

    Attributes:
      actor, target_actor: parameters of the deterministic policy MLP (before the tanh).
      critic, target_critic: ``CriticEnsemble`` parameters, heads [r, c_1..c_m].
      actor_opt, critic_opt: optax states.
      lam: [m] Lagrange multipliers (normalised cost units).
      pid: memory of the PID multiplier rule (zeros with ``dual="gradient"``).
      env_state: brax State of the N environments (sharded).
      replay: ring buffer (leaves [N, capacity_per_env, ...], sharded).
      block, env_steps, updates: [] int32 counters.
    """

    actor: Any
    target_actor: Any
    critic: Any
    target_critic: Any
    actor_opt: Any
    critic_opt: Any
    lam: jax.Array
    pid: dual_lib.PIDState
    env_state: Any
    replay: ReplayBuffer
    block: jax.Array
    env_steps: jax.Array
    updates: jax.Array


def ddpg_targets(reward: jax.Array, costs: jax.Array, discount: jax.Array, next_q: jax.Array,
                 gamma: float) -> jax.Array:
    """TD targets of every head: [r, c_1..c_m] + gamma d Q'(s', mu'(s')).

    Args:
      reward: [B]; costs: [B, m] normalised; discount: [B] (0 at a termination).
      next_q: [B, 1 + m] target-critic values at (s', mu'(s')).

    Returns:
      [B, 1 + m] targets.
    """
    immediate = jnp.concatenate([reward[:, None], costs], axis=-1)
    return immediate + gamma * discount[:, None] * next_q


def ddpg_actor_objective(q: jax.Array, lam: jax.Array) -> jax.Array:
    """mean_s (Q_r - lam . Q_c) / (1 + sum lam) for q [B, 1 + m] (to be maximised)."""
    return jnp.mean(q[:, 0] - q[:, 1:] @ lam) / (1.0 + jnp.sum(lam))


def make_ddpg(config: DDPGConfig, env: Any, mesh: Optional[Mesh] = None) -> OffPolicyAgent:
    """Binds DDPG-Lagrangian to a batched continuous-action environment (``mesh``: see ``cvpo.make_cvpo``)."""
    validate_offpolicy(config, env, "ddpg")
    num_envs = int(env.num_envs)
    limits = env_limits(env)
    m = int(limits.shape[0])
    obs_dim = int(env.observation_size)
    action_dim = int(env.action_size)
    capacity_per_env = max(1, config.replay_capacity // num_envs)
    actor_net = networks.MLP(config.hidden, action_dim, out_scale=0.01)
    critic_net = networks.CriticEnsemble(config.hidden, 1 + m, config.critic_layer_norm)
    actor_tx = blocks.clipped_adam(config.actor_lr, config.max_grad_norm)
    critic_tx = blocks.clipped_adam(config.critic_lr, config.max_grad_norm)

    constrain = blocks.batch_constrainer(mesh)

    def policy(params: Any, obs: jax.Array) -> jax.Array:
        return jnp.tanh(actor_net.apply(params, obs))

    def act(actor_params: Any, obs: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """mu(s) (deterministic) or the behaviour action mu(s) + noise, clipped to [-1, 1]: [N, d]."""
        a = policy(actor_params, obs)
        if deterministic:
            return a
        return jnp.clip(a + config.exploration_std * jax.random.normal(key, a.shape, a.dtype), -1.0, 1.0)

    def init(key: jax.Array) -> DDPGState:
        k_actor, k_critic, k_env = jax.random.split(key, 3)
        obs = jnp.zeros((1, obs_dim), jnp.float32)
        actor = actor_net.init(k_actor, obs)
        critic = critic_net.init(k_critic, obs, jnp.zeros((1, action_dim), jnp.float32))
        env_state = env.reset(k_env)
        return DDPGState(
            actor=actor, target_actor=actor, critic=critic, target_critic=critic,
            actor_opt=actor_tx.init(actor), critic_opt=critic_tx.init(critic),
            lam=jnp.full((m,), config.lagrange_init, jnp.float32),
            pid=dual_lib.pid_init(m, config.lagrange_init, config.pid_ki),
            env_state=env_state, replay=replay_init(example_transition(env_state, action_dim), capacity_per_env),
            block=jnp.zeros((), jnp.int32), env_steps=jnp.zeros((), jnp.int32), updates=jnp.zeros((), jnp.int32),
        )

    def update(state: DDPGState, key: jax.Array) -> tuple[DDPGState, dict[str, Any]]:
        batch: Transition = constrain(replay_sample(state.replay, key, config.batch_size))
        next_q = critic_net.apply(state.target_critic, batch.next_obs, policy(state.target_actor, batch.next_obs))
        targets = jax.lax.stop_gradient(ddpg_targets(batch.reward, batch.costs, batch.discount, next_q, config.gamma))

        critic, critic_opt, c_loss, per_head = regress_critics(
            critic_net, critic_tx, state.critic, state.critic_opt, batch, targets)

        def actor_loss(params):
            q = critic_net.apply(critic, batch.obs, policy(params, batch.obs))
            return -ddpg_actor_objective(q, state.lam)

        a_loss, g_a = jax.value_and_grad(actor_loss)(state.actor)
        up_a, actor_opt = actor_tx.update(g_a, state.actor_opt, state.actor)
        actor = optax.apply_updates(state.actor, up_a)
        state = state.replace(
            actor=actor, critic=critic, actor_opt=actor_opt, critic_opt=critic_opt,
            target_actor=optax.incremental_update(actor, state.target_actor, config.tau),
            target_critic=optax.incremental_update(critic, state.target_critic, config.tau),
            updates=state.updates + 1,
        )
        return state, {"critic_loss": c_loss, "reward_critic_loss": per_head[0], "actor_loss": a_loss}

    train_step = make_block(config, env, limits, lambda s, obs, k: act(s.actor, obs, k), update)
    return OffPolicyAgent(init=init, train_step=train_step, act=act, limits=limits)


def make_train(config: DDPGConfig, env: Any, num_blocks: int) -> Callable[[jax.Array], tuple[DDPGState, dict]]:
    """``train(key) -> (final state, stacked metrics)``, the key schedule of ``cvpo.make_train`` (vmappable)."""
    agent = make_ddpg(config, env)
    return blocks.scan_train(agent.init, agent.train_step, num_blocks)
