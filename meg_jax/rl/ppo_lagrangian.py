"""PPO-Lagrangian (and plain PPO) in JAX, on the same environments and harness as MEG-CVPO.

On-policy baseline (Ray, Achiam, Amodei 2019, "Benchmarking Safe Exploration"): per block,
a rollout of ``rollout_length`` steps from N parallel environments; GAE (Schulman et al.
2016) for the reward and for every normalised cost with one value head each; one Lagrange
multiplier per constraint updated by projected ascent on the rollout's average normalised
cost (the episode-average constraint, per request), lam <- clip(lam + lr (c_avg - 1), 0, max), or with ``dual="pid"`` by the PID rule of
Stooke, Achiam & Abbeel (ICML 2020; ``dual.pid_lagrange_update``);
the clipped PPO objective on the penalised advantage (A_r - lam . A_c) / (1 + sum lam),
normalised over the minibatch. With ``lagrangian=False`` the multipliers stay 0: plain PPO,
the unconstrained baseline.

Like CVPO, the process is treated as continuing across episode ends (bootstrapping into the
next episode's first observation), and costs are divided by the limits.

GAE and the clipped surrogate are rlax's (``truncated_generalized_advantage_estimation``,
``clipped_surrogate_pg_loss``); this module only lays the rollout out for them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
import rlax
from flax import struct
from jax.sharding import Mesh

from meg_jax.rl import blocks
from meg_jax.rl import dual as dual_lib
from meg_jax.rl import networks
from meg_jax.rl.config import DUALS, PPOConfig
from meg_jax.rl.cvpo import EpisodeTracker, env_limits, env_num_envs

__all__ = ["PPOState", "Rollout", "PPOAgent", "make_ppo", "gae", "ppo_clip_loss", "update_multipliers"]


@struct.dataclass
class Rollout:
    """One rollout, leaves [L, N, ...] (the env axis is sharded)."""

    obs: jax.Array  # [L, N, obs_dim]
    action: jax.Array  # [L, N, d] float (unclipped sample) or [L, N] int32
    log_prob: jax.Array  # [L, N]
    reward: jax.Array  # [L, N]
    costs: jax.Array  # [L, N, m] normalised
    discount: jax.Array  # [L, N] 1 = bootstrap
    values: jax.Array  # [L, N, 1 + m] V(s_t); V(s_{t+1}) is values[t + 1] (or the bootstrap value)


@struct.dataclass
class PPOState:
    """Everything a PPO(-Lagrangian) run carries between blocks.

    Attributes:
      actor, critic: parameters (critic: ValueEnsemble with heads [V_r, V_c1..V_cm]).
      actor_opt, critic_opt: optax states.
      lam: [m] Lagrange multipliers.
      pid: memory of the PID multiplier rule (unused, zeros, with ``dual="gradient"``).
      env_state: brax State of the N environments (sharded).
      block: [] int32 blocks done; env_steps: [] int32 transitions collected.
    """

    actor: Any
    critic: Any
    actor_opt: Any
    critic_opt: Any
    lam: jax.Array
    pid: dual_lib.PIDState
    env_state: Any
    block: jax.Array
    env_steps: jax.Array


class PPOAgent(NamedTuple):
    init: Callable[[jax.Array], PPOState]
    train_step: Callable[[PPOState, jax.Array], tuple[PPOState, dict]]
    act: Callable[..., jax.Array]
    limits: jax.Array


def gae(rewards: jax.Array, values: jax.Array, discount: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over a rollout (rlax's, applied per column).

    A_t = delta_t + gamma lam d_t A_{t+1}, delta_t = r_t + gamma d_t V(s_{t+1}) - V(s_t).

    Args:
      rewards: [L, ...] rewards (or costs) per step.
      values: [L + 1, ...] V(s_0) .. V(s_L): the rollout's values and the bootstrap value of
        the observation after its last step.
      discount: [L, ...] (or broadcastable to ``rewards``) 1 to bootstrap from s_{t+1}, 0 at
        a termination; the GAE trace is cut where it is 0.
      gamma, lam: discount and GAE lambda.

    Returns:
      advantages [L, ...] and returns (advantages + V(s_t)) [L, ...].
    """
    length = rewards.shape[0]
    if values.shape != (length + 1,) + rewards.shape[1:]:
        raise ValueError(f"gae: values must be [L + 1, ...] = {(length + 1,) + rewards.shape[1:]}, got {values.shape}")
    columns = lambda x: jnp.reshape(x, (x.shape[0], -1))  # noqa: E731  [T, ...] -> [T, columns]
    discount_t = gamma * jnp.broadcast_to(discount, rewards.shape).astype(rewards.dtype)
    adv = jax.vmap(rlax.truncated_generalized_advantage_estimation, in_axes=(1, 1, None, 1), out_axes=1)(
        columns(rewards), columns(discount_t), lam, columns(values)
    )
    adv = jnp.reshape(adv, rewards.shape)
    return adv, adv + values[:-1]


def ppo_clip_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, clip_eps: float) -> jax.Array:
    """-mean min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) over [B] samples (rlax's)."""
    return rlax.clipped_surrogate_pg_loss(jnp.exp(log_prob - old_log_prob), advantages, clip_eps)


def update_multipliers(lam: jax.Array, avg_costs: jax.Array, target: float | jax.Array, lr: float, lam_max: float) -> jax.Array:
    """lam <- clip(lam + lr (avg_cost - target), 0, lam_max), per constraint (``dual.gradient_lagrange_update``)."""
    return dual_lib.gradient_lagrange_update(lam, avg_costs, target, lr, lam_max)


def make_ppo(config: PPOConfig, env: Any, mesh: Optional[Mesh] = None) -> PPOAgent:
    """Binds PPO(-Lagrangian) to a batched environment (see ``cvpo.make_cvpo`` for ``mesh``)."""
    if config.discrete != bool(getattr(env.unwrapped, "discrete", False)):
        raise ValueError(f"ppo.discrete={config.discrete} does not match the environment; make both agree")
    if config.dual not in DUALS:
        raise ValueError(f"ppo.dual must be one of {DUALS}, got {config.dual!r}")
    num_envs = env_num_envs(env)
    batch = config.rollout_length * num_envs
    if batch % config.num_minibatches:
        raise ValueError(
            f"rollout_length x num_envs = {batch} must split into ppo.num_minibatches={config.num_minibatches}"
        )
    mb_size = batch // config.num_minibatches
    limits = env_limits(env)
    m = int(limits.shape[0])
    obs_dim = int(env.observation_size)
    discrete = config.discrete
    if discrete:
        actor_net = networks.CategoricalPolicy(config.hidden, int(env.num_actions))
    else:
        action_dim = int(env.action_size)
        actor_net = networks.GaussianPolicy(config.hidden, action_dim, config.init_std)
    critic_net = networks.ValueEnsemble(config.hidden, 1 + m)
    tx = blocks.clipped_adam(config.lr, config.max_grad_norm)
    cost_target = 1.0 - config.cost_margin

    constrain = blocks.batch_constrainer(mesh)

    def dist(actor_params: Any, obs: jax.Array):
        return actor_net.apply(actor_params, obs)

    def log_prob(out: Any, action: jax.Array) -> jax.Array:
        if discrete:
            return jnp.take_along_axis(jax.nn.log_softmax(out, -1), action[..., None], axis=-1)[..., 0]
        mean, std = out
        return networks.gaussian_log_prob(action, mean, std)

    def entropy(out: Any) -> jax.Array:
        if discrete:
            logp = jax.nn.log_softmax(out, -1)
            return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        _, std = out
        return jnp.sum(jnp.log(std) + 0.5 * jnp.log(2.0 * jnp.pi * jnp.e), axis=-1)

    def sample(out: Any, key: jax.Array) -> jax.Array:
        if discrete:
            return jax.random.categorical(key, out).astype(jnp.int32)
        mean, std = out
        return networks.gaussian_sample(key, mean, std)

    def act(actor_params: Any, obs: jax.Array, key: jax.Array, deterministic: bool = False) -> jax.Array:
        out = dist(actor_params, obs)
        if deterministic:
            a = jnp.argmax(out, -1).astype(jnp.int32) if discrete else out[0]
        else:
            a = sample(out, key)
        return a if discrete else jnp.clip(a, -1.0, 1.0)

    def init(key: jax.Array) -> PPOState:
        k_a, k_c, k_env = jax.random.split(key, 3)
        obs = jnp.zeros((1, obs_dim), jnp.float32)
        actor = actor_net.init(k_a, obs)
        critic = critic_net.init(k_c, obs)
        return PPOState(
            actor=actor, critic=critic, actor_opt=tx.init(actor), critic_opt=tx.init(critic),
            lam=jnp.full((m,), config.lagrange_init if config.lagrangian else 0.0, jnp.float32),
            pid=dual_lib.pid_init(m, config.lagrange_init if config.lagrangian else 0.0, config.pid_ki),
            env_state=env.reset(k_env), block=jnp.zeros((), jnp.int32), env_steps=jnp.zeros((), jnp.int32),
        )

    def rollout_step(carry, key):
        state, tracker = carry
        es = state.env_state
        out = dist(state.actor, es.obs)
        action = sample(out, key)
        env_action = action if discrete else jnp.clip(action, -1.0, 1.0)
        nxt = env.step(es, env_action)
        values = critic_net.apply(state.critic, es.obs)
        done, trunc = nxt.done, nxt.info["truncation"]
        step = Rollout(
            obs=es.obs, action=action, log_prob=log_prob(out, action), reward=nxt.reward,
            costs=nxt.info["costs"] / limits, discount=1.0 - done * (1.0 - trunc),
            values=values,
        )
        ep_costs = jnp.stack([nxt.metrics["avg_latency_s"], nxt.metrics["avg_energy_j"]], axis=-1)
        tracker = EpisodeTracker(
            episodes=tracker.episodes + jnp.sum(done),
            quality=tracker.quality + jnp.sum(done * nxt.metrics["avg_quality"]),
            costs=tracker.costs + jnp.sum(done[:, None] * ep_costs, axis=0),
        )
        return (state.replace(env_state=nxt, env_steps=state.env_steps + num_envs), tracker), step

    def losses(actor, critic, mb, lam):
        out = dist(actor, mb["obs"])
        lp = log_prob(out, mb["action"])
        adv = (mb["adv_r"] - jnp.sum(lam * mb["adv_c"], -1)) / (1.0 + jnp.sum(lam))
        adv = (adv - jnp.mean(adv)) / (jnp.std(adv) + 1e-8)
        pi_loss = ppo_clip_loss(lp, mb["log_prob"], adv, config.clip_eps) - config.entropy_coef * jnp.mean(entropy(out))
        v = critic_net.apply(critic, mb["obs"])
        v_loss = jnp.sum(jnp.mean((v - mb["returns"]) ** 2, axis=0))
        return pi_loss, v_loss

    def minibatch_update(state: PPOState, mb):
        def total(params):
            pi_loss, v_loss = losses(params[0], params[1], mb, state.lam)
            return pi_loss + config.value_coef * v_loss, (pi_loss, v_loss)

        (_, (pi_loss, v_loss)), (g_a, g_c) = jax.value_and_grad(total, has_aux=True)((state.actor, state.critic))
        up_a, opt_a = tx.update(g_a, state.actor_opt, state.actor)
        up_c, opt_c = tx.update(g_c, state.critic_opt, state.critic)
        state = state.replace(actor=optax.apply_updates(state.actor, up_a), critic=optax.apply_updates(state.critic, up_c),
                              actor_opt=opt_a, critic_opt=opt_c)
        return state, {"policy_loss": pi_loss, "value_loss": v_loss}

    def train_step(state: PPOState, key: jax.Array) -> tuple[PPOState, dict[str, Any]]:
        k_roll, k_perm = jax.random.split(key)
        (state, tracker), ro = jax.lax.scan(
            rollout_step, (state, EpisodeTracker.zeros(m)), jax.random.split(k_roll, config.rollout_length)
        )
        heads_r = jnp.concatenate([ro.reward[..., None], ro.costs], axis=-1)  # [L, N, 1 + m]
        # V(s_{t+1}) of step t is the next step's V(s_t) (the next episode's first observation
        # after an episode end: the process continues); after the last step, the state now held
        last_values = critic_net.apply(state.critic, state.env_state.obs)[None]
        values = jnp.concatenate([ro.values, last_values], axis=0)  # [L + 1, N, 1 + m]
        adv, returns = gae(heads_r, values, ro.discount[..., None], config.gamma, config.gae_lambda)
        avg_costs = jnp.mean(ro.costs, axis=(0, 1))
        if config.lagrangian:
            lam, pid = dual_lib.update_lagrange(config, state.lam, state.pid, avg_costs, cost_target)
            state = state.replace(lam=lam, pid=pid)
        flat = {
            "obs": ro.obs, "action": ro.action, "log_prob": ro.log_prob,
            "adv_r": adv[..., 0], "adv_c": adv[..., 1:], "returns": returns,
        }
        flat = jax.tree.map(lambda x: jnp.reshape(x, (batch,) + x.shape[2:]), flat)

        def epoch(s, k):
            perm = jax.random.permutation(k, batch)
            mbs = jax.tree.map(lambda x: jnp.reshape(x[perm], (config.num_minibatches, mb_size) + x.shape[1:]), flat)
            mbs = jax.tree.map(lambda x: constrain(jnp.swapaxes(x, 0, 1)), mbs)  # shard within each minibatch
            mbs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), mbs)
            return jax.lax.scan(minibatch_update, s, mbs)

        state, loss_metrics = jax.lax.scan(epoch, state, jax.random.split(k_perm, config.epochs))
        state = state.replace(block=state.block + 1)
        metrics = {
            "policy_loss": jnp.mean(loss_metrics["policy_loss"]),
            "value_loss": jnp.mean(loss_metrics["value_loss"]),
            "lam": state.lam,
            "rollout_costs_over_limit": avg_costs,
            "episodes": tracker.episodes,
            "episode_quality_sum": tracker.quality,
            "episode_costs_sum": tracker.costs,
            "env_steps": state.env_steps,
        }
        return state, metrics

    return PPOAgent(init=init, train_step=train_step, act=act, limits=limits)
