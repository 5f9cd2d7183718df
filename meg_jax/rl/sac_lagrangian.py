"""SAC-Lagrangian in JAX, on the same environments, blocks and harness as MEG-CVPO.

Soft actor-critic (Haarnoja et al. 2018, with the automatic entropy temperature of the
follow-up "SAC: algorithms and applications") with one cost critic per constraint and a
Lagrange multiplier each (Ha et al. 2020; FSRL's / OmniSafe's SAC-Lag):

* actor: a tanh-squashed Gaussian a = tanh(u), u ~ N(mean(s), std(s)^2)
  (``networks.GaussianPolicy`` before the squash), log pi(a|s) = log N(u) - sum log(1 - tanh(u)^2);
* critics: ``CriticEnsemble`` heads [Q_r1, Q_r2, Q_c1 .. Q_cm] on normalised costs; targets
  y_r = r + gamma d (min(Q_r1', Q_r2')(s', a') - alpha log pi(a'|s')), y_c = c + gamma d Q_c'(s', a'),
  a' ~ pi(.|s') with the current actor, Q' the target critics;
* actor loss: mean_s [alpha log pi(a|s) - min Q_r(s, a) + lam . Q_c(s, a)] / (1 + sum lam),
  a reparametrised (the rescaling keeps the step size independent of lam);
* temperature: Adam on log alpha, loss -log alpha (log pi + target_entropy);
* multipliers: once per block on the block's average normalised cost
  (``meg_jax.rl.offpolicy``), by projected ascent or PID (``dual.update_lagrange``);
* target critics: polyak averaging (``optax.incremental_update``).

``act(..., deterministic=False)`` samples the policy (what the multipliers constrain);
``deterministic=True`` gives tanh(mean).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from meg_jax.rl import blocks
from meg_jax.rl import dual as dual_lib
from meg_jax.rl import networks
from meg_jax.rl.config import SACConfig
from meg_jax.rl.cvpo import env_limits
from meg_jax.rl.offpolicy import OffPolicyAgent, example_transition, make_block, regress_critics, validate_offpolicy
from meg_jax.rl.replay import ReplayBuffer, Transition, replay_init, replay_sample

__all__ = ["SACState", "make_sac", "make_train", "squashed_log_prob", "sac_targets"]

REWARD_HEADS = 2  # twin reward critics (min in the target and the actor loss)


@struct.dataclass
class SACState:
    """Everything a SAC-Lagrangian run carries between blocks (checkpointed whole).

    Attributes:
      actor: ``GaussianPolicy`` parameters (pre-tanh mean and std).
      critic, target_critic: ``CriticEnsemble`` parameters, heads [r1, r2, c_1..c_m].
      actor_opt, critic_opt, alpha_opt: optax states.
      log_alpha: [] log of the entropy temperature.
      lam: [m] Lagrange multipliers; pid: the PID rule's memory.
      env_state, replay: the N environments and the ring buffer (sharded).
      block, env_steps, updates: [] int32 counters.
    """

    actor: Any
    critic: Any
    target_critic: Any
    actor_opt: Any
    critic_opt: Any
    alpha_opt: Any
    log_alpha: jax.Array
    lam: jax.Array
    pid: dual_lib.PIDState
    env_state: Any
    replay: ReplayBuffer
    block: jax.Array
    env_steps: jax.Array
    updates: jax.Array


def squashed_log_prob(u: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """log pi(tanh(u)) for u ~ N(mean, std^2), [...]: log N(u) - sum_i log(1 - tanh(u_i)^2).

    log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), exact and finite for any u.
    """
    log_det = 2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return networks.gaussian_log_prob(u, mean, std) - jnp.sum(log_det, axis=-1)


def sac_targets(reward: jax.Array, costs: jax.Array, discount: jax.Array, next_q: jax.Array,
                next_log_prob: jax.Array, alpha: jax.Array, gamma: float) -> jax.Array:
    """TD targets [B, 2 + m] of the heads [r1, r2, c_1..c_m].

    Args:
      reward: [B]; costs: [B, m] normalised; discount: [B].
      next_q: [B, 2 + m] target critics at (s', a'), a' ~ pi(.|s').
      next_log_prob: [B] log pi(a'|s').
      alpha: [] entropy temperature.
    """
    v_r = jnp.minimum(next_q[:, 0], next_q[:, 1]) - alpha * next_log_prob
    y_r = reward + gamma * discount * v_r
    y_c = costs + gamma * discount[:, None] * next_q[:, REWARD_HEADS:]
    return jnp.concatenate([y_r[:, None], y_r[:, None], y_c], axis=-1)


def make_sac(config: SACConfig, env: Any, mesh: Optional[Mesh] = None) -> OffPolicyAgent:
    """Binds SAC-Lagrangian to a batched continuous-action environment (``mesh``: see ``cvpo.make_cvpo``)."""
    validate_offpolicy(config, env, "sac")
    if config.alpha_init <= 0 or config.alpha_lr < 0:
        raise ValueError(f"sac.alpha_init must be > 0 and sac.alpha_lr >= 0, got {config.alpha_init}, {config.alpha_lr}")
    num_envs = int(env.num_envs)
    limits = env_limits(env)
    m = int(limits.shape[0])
    obs_dim = int(env.observation_size)
    action_dim = int(env.action_size)
    capacity_per_env = max(1, config.replay_capacity // num_envs)
    target_entropy = -float(action_dim) if config.target_entropy is None else float(config.target_entropy)
    actor_net = networks.GaussianPolicy(config.hidden, action_dim, config.init_std)
    critic_net = networks.CriticEnsemble(config.hidden, REWARD_HEADS + m, config.critic_layer_norm)
    actor_tx = blocks.clipped_adam(config.actor_lr, config.max_grad_norm)
    critic_tx = blocks.clipped_adam(config.critic_lr, config.max_grad_norm)
    alpha_tx = optax.adam(config.alpha_lr)

    constrain = blocks.batch_constrainer(mesh)

    def sample(params: Any, obs: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(a = tanh(u) [..., d], log pi(a|s) [...]), reparametrised."""
        mean, std = actor_net.apply(params, obs)
        u = networks.gaussian_sample(key, mean, std)
        return jnp.tanh(u), squashed_log_prob(u, mean, std)

    def act(actor_params: Any, obs: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        """tanh(mean) (deterministic) or a sample of pi: [N, d] in [-1, 1]."""
        if deterministic:
            return jnp.tanh(actor_net.apply(actor_params, obs)[0])
        return sample(actor_params, obs, key)[0]

    def init(key: jax.Array) -> SACState:
        k_actor, k_critic, k_env = jax.random.split(key, 3)
        obs = jnp.zeros((1, obs_dim), jnp.float32)
        actor = actor_net.init(k_actor, obs)
        critic = critic_net.init(k_critic, obs, jnp.zeros((1, action_dim), jnp.float32))
        log_alpha = jnp.asarray(math.log(config.alpha_init), jnp.float32)
        env_state = env.reset(k_env)
        return SACState(
            actor=actor, critic=critic, target_critic=critic, actor_opt=actor_tx.init(actor),
            critic_opt=critic_tx.init(critic), alpha_opt=alpha_tx.init(log_alpha), log_alpha=log_alpha,
            lam=jnp.full((m,), config.lagrange_init, jnp.float32),
            pid=dual_lib.pid_init(m, config.lagrange_init, config.pid_ki),
            env_state=env_state, replay=replay_init(example_transition(env_state, action_dim), capacity_per_env),
            block=jnp.zeros((), jnp.int32), env_steps=jnp.zeros((), jnp.int32), updates=jnp.zeros((), jnp.int32),
        )

    def update(state: SACState, key: jax.Array) -> tuple[SACState, dict[str, Any]]:
        k_sample, k_next, k_actor = jax.random.split(key, 3)
        batch: Transition = constrain(replay_sample(state.replay, k_sample, config.batch_size))
        alpha = jnp.exp(state.log_alpha)
        next_a, next_logp = sample(state.actor, batch.next_obs, k_next)
        next_q = critic_net.apply(state.target_critic, batch.next_obs, next_a)
        targets = jax.lax.stop_gradient(
            sac_targets(batch.reward, batch.costs, batch.discount, next_q, next_logp, alpha, config.gamma))

        critic, critic_opt, c_loss, per_head = regress_critics(
            critic_net, critic_tx, state.critic, state.critic_opt, batch, targets)

        def actor_loss(params):
            a, logp = sample(params, batch.obs, k_actor)
            q = critic_net.apply(critic, batch.obs, a)
            q_r = jnp.minimum(q[:, 0], q[:, 1])
            penalised = q_r - q[:, REWARD_HEADS:] @ state.lam
            loss = jnp.mean(alpha * logp - penalised) / (1.0 + jnp.sum(state.lam))
            return loss, logp

        (a_loss, logp), g_a = jax.value_and_grad(actor_loss, has_aux=True)(state.actor)
        up_a, actor_opt = actor_tx.update(g_a, state.actor_opt, state.actor)
        actor = optax.apply_updates(state.actor, up_a)

        entropy = -jnp.mean(logp)

        def alpha_loss(log_alpha):
            return -log_alpha * jax.lax.stop_gradient(target_entropy - entropy)

        g_alpha = jax.grad(alpha_loss)(state.log_alpha)
        up_alpha, alpha_opt = alpha_tx.update(g_alpha, state.alpha_opt, state.log_alpha)
        state = state.replace(
            actor=actor, critic=critic, actor_opt=actor_opt, critic_opt=critic_opt,
            log_alpha=optax.apply_updates(state.log_alpha, up_alpha), alpha_opt=alpha_opt,
            target_critic=optax.incremental_update(critic, state.target_critic, config.tau),
            updates=state.updates + 1,
        )
        return state, {"critic_loss": c_loss, "reward_critic_loss": per_head[0], "actor_loss": a_loss,
                       "alpha": alpha, "entropy": entropy}

    train_step = make_block(config, env, limits, lambda s, obs, k: act(s.actor, obs, k), update)
    return OffPolicyAgent(init=init, train_step=train_step, act=act, limits=limits)


def make_train(config: SACConfig, env: Any, num_blocks: int) -> Callable[[jax.Array], tuple[SACState, dict]]:
    """``train(key) -> (final state, stacked metrics)``, the key schedule of ``cvpo.make_train`` (vmappable)."""
    agent = make_sac(config, env)
    return blocks.scan_train(agent.init, agent.train_step, num_blocks)
