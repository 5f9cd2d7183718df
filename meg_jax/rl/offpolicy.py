"""The block shared by the off-policy Lagrangian baselines (DDPG-Lagrangian, SAC-Lagrangian).

One ``train_step(state, key)`` is a block, as in MEG-CVPO (``meg_jax.rl.cvpo``):

1. collection: ``env_steps_per_block`` vectorised steps of the N environments with the
   behaviour policy (uniform random actions until ``min_replay`` transitions are stored),
   each transition written to the device-resident ring buffer (``replay.py``) with its costs
   divided by the limits;
2. the multipliers: once the policy collected the whole block, one step of the configured
   rule (``dual.update_lagrange``: projected gradient ascent or PID) on the block's average
   normalised cost, i.e. the episode-average constraint estimated from the behaviour policy's
   own transitions, as PPO-Lagrangian does per rollout;
3. ``updates_per_block`` gradient updates (``lax.scan``; skipped, with zero metrics, until the
   replay holds ``min_replay`` transitions), each the agent's own ``update(state, key)``.

The agent states are ``flax.struct`` dataclasses with at least the fields ``env_state``,
``replay``, ``lam``, ``pid``, ``block``, ``env_steps`` and ``updates``; everything else
(parameters, optimiser states, temperatures) is the agent's.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from meg_jax.rl import blocks
from meg_jax.rl import dual as dual_lib
from meg_jax.rl.cvpo import EpisodeTracker
from meg_jax.rl.replay import Transition, replay_add

__all__ = ["OffPolicyAgent", "BlockSettings", "make_block", "validate_offpolicy", "example_transition",
           "regress_critics"]


class OffPolicyAgent(NamedTuple):
    """The pure functions of one off-policy Lagrangian agent bound to one environment.

    Attributes:
      init: ``init(key) -> state``.
      train_step: ``train_step(state, key) -> (state, metrics)``, one block.
      act: ``act(actor_params, obs [N, obs_dim], key, deterministic) -> env action [N, d]``.
      limits: [m] episode-average limits (env units).
    """

    init: Callable[[jax.Array], Any]
    train_step: Callable[[Any, jax.Array], tuple[Any, dict]]
    act: Callable[..., jax.Array]
    limits: jax.Array


class BlockSettings(dual_lib.LagrangeSettings, Protocol):
    """The fields of ``DDPGConfig`` / ``SACConfig`` the block reads."""

    env_steps_per_block: int
    updates_per_block: int
    min_replay: int
    cost_margin: float


def validate_offpolicy(config: Any, env: Any, name: str) -> None:
    """Refuses settings the agent cannot run with, naming each field (``name`` = the config's flag prefix)."""
    from meg_jax.rl.config import DUALS

    problems = []
    if bool(getattr(env.unwrapped, "discrete", False)):
        problems.append(f"{name} acts on the continuous action; make the environment with discrete=False")
    if not 0.0 <= config.gamma < 1.0:
        problems.append(f"{name}.gamma must be in [0, 1), got {config.gamma}")
    for field in ("batch_size", "env_steps_per_block", "updates_per_block"):
        if getattr(config, field) < 1:
            problems.append(f"{name}.{field} must be >= 1, got {getattr(config, field)}")
    for field in ("tau", "actor_lr", "critic_lr"):
        if getattr(config, field) <= 0:
            problems.append(f"{name}.{field} must be > 0, got {getattr(config, field)}")
    if not 0.0 <= config.cost_margin < 1.0:
        problems.append(f"{name}.cost_margin must be in [0, 1), got {config.cost_margin}")
    if config.dual not in DUALS:
        problems.append(f"{name}.dual must be one of {DUALS}, got {config.dual!r}")
    if config.replay_capacity < int(env.num_envs):
        problems.append(f"{name}.replay_capacity={config.replay_capacity} is below the {int(env.num_envs)} "
                        "parallel environments; it must hold at least one step of each")
    if problems:
        raise ValueError(f"invalid {name} config:\n  - " + "\n  - ".join(problems))


def regress_critics(critic_net: Any, critic_tx: Any, params: Any, opt_state: Any, batch: Transition,
                    targets: jax.Array) -> tuple[Any, Any, jax.Array, jax.Array]:
    """One Adam step of every critic head onto its TD target (mean squared error per head, summed).

    Args:
      critic_net: the ``CriticEnsemble`` (heads: reward critic(s), then one per cost).
      critic_tx, params, opt_state: its optimiser, parameters and optimiser state.
      batch: transitions ([B] leaves); ``targets``: [B, heads], held fixed.

    Returns:
      ``(params, opt_state, loss, per_head_loss [heads])`` after the step.
    """
    def loss_fn(p):
        per_head = jnp.mean((critic_net.apply(p, batch.obs, batch.action) - targets) ** 2, axis=0)
        return jnp.sum(per_head), per_head

    (loss, per_head), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = critic_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, per_head


def example_transition(env_state: Any, action_dim: int) -> Transition:
    """A zero transition shaped like one vectorised step (leaves [N, ...]), to size the replay."""
    zeros_n = jnp.zeros_like(env_state.reward)
    return Transition(
        obs=env_state.obs, action=jnp.zeros(zeros_n.shape + (action_dim,), jnp.float32), reward=zeros_n,
        costs=jnp.zeros_like(env_state.info["costs"]), next_obs=env_state.obs, discount=zeros_n,
    )


def make_block(
    config: BlockSettings,
    env: Any,
    limits: jax.Array,
    behaviour: Callable[[Any, jax.Array, jax.Array], jax.Array],
    update: Callable[[Any, jax.Array], tuple[Any, dict]],
) -> Callable[[Any, jax.Array], tuple[Any, dict]]:
    """``train_step(state, key)`` of one block (see the module docstring).

    Args:
      config: the agent config (block sizes, warm-up, multiplier rule).
      env: the batched environment (N = ``env.num_envs``, continuous action of size d).
      limits: [m] episode-average limits; transitions store costs / limits.
      behaviour: ``behaviour(state, obs [N, obs_dim], key) -> action [N, d]`` in [-1, 1].
      update: ``update(state, key) -> (state, metrics)``, one gradient update.

    Returns:
      the block function. Its metrics: the update metrics stacked [updates_per_block] with
      ``updated`` (1 where an update ran), ``lam`` [m] after the block,
      ``block_costs_over_limit`` [m], the episode sums of ``EpisodeTracker`` and ``env_steps``.
    """
    num_envs = int(env.num_envs)
    action_dim = int(env.action_size)
    m = int(limits.shape[0])
    min_replay_steps = max(1, math.ceil(config.min_replay / num_envs))
    target = 1.0 - config.cost_margin

    def collect_one(carry, key):
        state, tracker, cost_sum = carry
        k_pol, k_rand = jax.random.split(key)
        es = state.env_state
        warm = state.replay.size < min_replay_steps
        random_action = jax.random.uniform(k_rand, (num_envs, action_dim), jnp.float32, -1.0, 1.0)
        action = jnp.where(warm, random_action, behaviour(state, es.obs, k_pol))
        nxt = env.step(es, action)
        done, truncation = nxt.done, nxt.info["truncation"]
        costs = nxt.info["costs"] / limits
        transition = Transition(
            obs=es.obs, action=action, reward=nxt.reward, costs=costs,
            next_obs=nxt.obs,  # continuing view: after an episode end, the next episode's start
            discount=1.0 - done * (1.0 - truncation),
        )
        ep_costs = jnp.stack([nxt.metrics["avg_latency_s"], nxt.metrics["avg_energy_j"]], axis=-1)
        tracker = EpisodeTracker(
            episodes=tracker.episodes + jnp.sum(done),
            quality=tracker.quality + jnp.sum(done * nxt.metrics["avg_quality"]),
            costs=tracker.costs + jnp.sum(done[:, None] * ep_costs, axis=0),
        )
        state = state.replace(env_state=nxt, replay=replay_add(state.replay, transition),
                              env_steps=state.env_steps + num_envs)
        return (state, tracker, cost_sum + jnp.sum(costs, axis=0)), None

    maybe_update = blocks.update_when_ready(update, min_replay_steps)

    def train_step(state, key):
        k_collect, k_update = jax.random.split(key)
        policy_acted = state.replay.size >= min_replay_steps  # the whole block is the policy's
        (state, tracker, cost_sum), _ = jax.lax.scan(
            collect_one, (state, EpisodeTracker.zeros(m), jnp.zeros((m,), jnp.float32)),
            jax.random.split(k_collect, config.env_steps_per_block),
        )
        block_costs = cost_sum / (config.env_steps_per_block * num_envs)
        lam, pid = dual_lib.update_lagrange(config, state.lam, state.pid, block_costs, target)
        state = state.replace(
            lam=jnp.where(policy_acted, lam, state.lam),
            pid=jax.tree.map(lambda new, old: jnp.where(policy_acted, new, old), pid, state.pid),
        )
        state, update_metrics = jax.lax.scan(maybe_update, state, jax.random.split(k_update, config.updates_per_block))
        state = state.replace(block=state.block + 1)
        return state, {
            **update_metrics,
            "lam": state.lam,
            "block_costs_over_limit": block_costs,
            "episodes": tracker.episodes,
            "episode_quality_sum": tracker.quality,
            "episode_costs_sum": tracker.costs,
            "env_steps": state.env_steps,
        }

    return train_step
