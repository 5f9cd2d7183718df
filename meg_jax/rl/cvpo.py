"""MEG-CVPO: constrained variational policy optimisation with a vector of constraints, fully jitted.

Liu et al., "Constrained Variational Policy Optimization for Safe Reinforcement Learning"
(ICML 2022), as used by Xu et al. (IEEE TCCN 2025) to choose (K, r) per MEG request, here
with one constraint per cost (latency, UE energy). One ``train_step(state, key)`` is a block:

1. collection: ``env_steps_per_block`` vectorised steps of N parallel environments with the
   current policy (uniform random actions until ``min_replay`` transitions are stored), each
   transition written to a device-resident ring buffer (``replay.py``);
2. ``updates_per_block`` gradient updates (``lax.scan``), each on a fresh batch of B:
   * next-state particles, computed once per update: K = max(M, ``target_samples``)
     actions per next state s' from pi_old (the target actor), scored by every target critic
     head in one batched, cache-chunked evaluation (``networks.critic_ensemble_particles``);
   * critics: reward Q critics (twins by default; their min in every backup) and one cost Q per constraint, TD targets
     averaging the first ``target_samples`` particles of each s';
   * E-step on the same next states and their first M particles (the TD target and the
     E-step both score pi_old's actions with the target critics, so one evaluation serves
     both; the E- and M-steps thus fit the policy on the batch's next states, which are
     replay states like the current ones); the dual over (eta, lam) solved to tolerance by warm-started projected Newton
     (``dual.py``); q = softmax(log pi_old + (Q_r - lam . Q_c) / eta);
   * M-step: weighted maximum likelihood with decoupled KL bounds on the mean and the
     covariance of the diagonal Gaussian (a single KL bound for the categorical head), whose
     multipliers alpha_mu, alpha_sigma follow projected dual ascent; each Adam step is then
     backtracked (largest fraction in {1, 1/2, ..., 1/32, 0}) so the KL to pi_old stays
     within the bounds on the batch;
   * polyak averaging of the target critics and the target actor.

Conventions (documented choices where the paper is silent):

* costs are divided by the episode-average limits, so a normalised cost of 1 is the limit;
* the M-step sums over the M actions (weights sum to 1) and averages over the B states
  (acme/rlax convention); the KL terms are averaged over states;
* the agent sees the process as continuing: at an episode end it bootstraps into the next
  episode's first observation (a truncation is not a termination; the observation carries
  the episode progress). The Q-space thresholds are then ``limit / (1 - gamma)``, the mean
  discounted cost value of a policy at the limit over the cost stream
  (``dual.q_space_threshold`` with no horizon; the references' finite-horizon
  ``limit (1 - gamma^T) / (1 - gamma)`` would hold the agent to (1 - gamma^T) x its limit,
  0.86 at gamma = 0.97, T = 64);
* each batch's cost constraint is read against the policy's smoothed cost level (an EMA of
  the batches' mean_s E_pi_old[Q_c], ``cost_baseline_rate``), not against the batch mean
  alone, whose state-to-state noise exceeds what q can change within the KL ball;
* a batch threshold the KL ball cannot meet with room to spare is raised to the cost of the
  mixture (1 - ``feasibility_margin``) q* + ``feasibility_margin`` pi_old, q* the least-cost q
  in the ball (``dual.reachable_thresholds``): that mixture lies strictly inside the ball, so
  the dual has a finite minimiser and lam no longer runs to ``lam_max`` (where the batch
  threshold was beyond the ball, 5-7 % of the E-steps of a full ``tiny`` run). It costs a second
  dual solve (the least-cost one) every update;
* should lam still end on ``lam_max`` with its threshold unmet, the E-step takes the least-cost
  q in the ball instead (``estep_fallback``, ``dual.min_cost_estep``; with
  ``feasibility_margin`` = 0 under a vmap over seeds ``lax.cond`` runs both branches, so
  multi-seed runs pay that second solve every update);
* ``n_step`` > 1: TD targets over n consecutive steps of one environment's stream
  (``replay.replay_sample_nstep``), bootstrapped gamma^n away (the authors use 2);
* ``center_reward``: the reward critics' TD targets take rewards relative to the replay's mean
  reward, so they learn Q less a constant (per state the same for every action);
* ``reward_critics`` reward critics (2, the twins, by default) combine by their min (default)
  or their mean (``reward_combine``), in the TD target and the E-step alike;
* the discrete head's E-step is exact: every action of the K x r grid, weighted by pi_old;
  its critics read an action as one output of A (``discrete_critic="table"``) or through the
  action's (K, r) coordinates as an MLP input (``"coordinates"``, shared across neighbours);
* ``critic_lr_halflife`` > 0: the critics' step decays as 1 / (1 + t / halflife);
* ``particle_matmul_dtype="bfloat16"``: the particle evaluation's hidden GEMMs on bfloat16
  operands (float32 accumulation), the rest of the update in float32.

``make_cvpo(config, env, mesh)`` returns the pure functions; ``make_train(config, env,
num_blocks)`` returns ``train(key)`` for a whole run (vmappable over seeds).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from meg_jax.rl import blocks
from meg_jax.rl import dual as dual_lib
from meg_jax.rl import networks
from meg_jax.rl.config import CVPOConfig
from meg_jax.rl.cvpo_losses import (  # re-exported: the public import paths stay
    backtrack_to_kl_bounds,
    categorical_mstep_loss,
    critic_targets,
    gaussian_mstep_loss,
    polyak,
    update_alpha,
)
from meg_jax.rl.replay import ReplayBuffer, Transition, replay_add, replay_init, replay_mean_reward, replay_sample_nstep

__all__ = [
    "CVPOState",
    "EpisodeTracker",
    "CVPOAgent",
    "make_cvpo",
    "make_train",
    "critic_targets",
    "gaussian_mstep_loss",
    "categorical_mstep_loss",
    "update_alpha",
    "backtrack_to_kl_bounds",
    "polyak",
    "env_limits",
    "env_horizon",
    "env_num_envs",
]



@struct.dataclass
class EpisodeTracker:
    """Per-block statistics of the episodes that ended (sums; divide by ``episodes``).

    Attributes:
      episodes: [] episodes finished in the block.
      quality: [] sum over them of the episode-average quality.
      costs: [m] sum over them of the episode-average costs (env units: s, J).
    """

    episodes: jax.Array
    quality: jax.Array
    costs: jax.Array

    @classmethod
    def zeros(cls, num_costs: int) -> "EpisodeTracker":
        return cls(episodes=jnp.zeros((), jnp.float32), quality=jnp.zeros((), jnp.float32),
                   costs=jnp.zeros((num_costs,), jnp.float32))


@struct.dataclass
class CVPOState:
    """Everything a CVPO run carries from one block to the next (checkpointed whole).

    Attributes:
      actor, target_actor: policy parameters; the target actor is pi_old.
      critic, target_critic: CriticEnsemble parameters, heads [r_1..r_R, c_1..c_m] (R = ``reward_critics``).
      actor_opt, critic_opt: optax states.
      eta: [] E-step temperature (warm start of the next solve).
      lam: [m] E-step cost multipliers (normalised cost units).
      cost_baseline: [m] EMA accumulator (not bias-corrected) of the batches' costs under
        pi_old, mean_s E_pi_old[Q_c] (the E-step's cost baseline, ``cvpo.cost_baseline_rate``).
      alpha_mu, alpha_sigma: [] M-step KL multipliers.
      env_state: brax State of the N environments (leaves [N, ...], sharded).
      replay: ring buffer (leaves [N, capacity_per_env, ...], sharded).
      block: [] int32 blocks done.
      env_steps: [] int32 transitions collected (all environments).
      updates: [] int32 gradient updates done.
    """

    actor: Any
    target_actor: Any
    critic: Any
    target_critic: Any
    actor_opt: Any
    critic_opt: Any
    eta: jax.Array
    lam: jax.Array
    cost_baseline: jax.Array
    alpha_mu: jax.Array
    alpha_sigma: jax.Array
    env_state: Any
    replay: ReplayBuffer
    block: jax.Array
    env_steps: jax.Array
    updates: jax.Array


class CVPOAgent(NamedTuple):
    """The pure functions of one CVPO configuration bound to one environment.

    Attributes:
      init: ``init(key) -> CVPOState``.
      train_step: ``train_step(state, key) -> (state, metrics)``, one block.
      act: ``act(actor_params, obs [N, obs_dim], key, deterministic) -> env action``.
      thresholds: [m] Q-space thresholds of the normalised costs.
      limits: [m] episode-average limits (env units).
      update_block: ``update_block(state, key) -> (state, metrics)``: the block's
        ``updates_per_block`` gradient updates alone (no collection; the replay must already
        hold ``min_replay`` transitions), what ``eval/bench_cvpo.py`` times.
    """

    init: Callable[[jax.Array], CVPOState]
    train_step: Callable[[CVPOState, jax.Array], tuple[CVPOState, dict]]
    act: Callable[..., jax.Array]
    thresholds: jax.Array
    limits: jax.Array
    update_block: Callable[[CVPOState, jax.Array], tuple[CVPOState, dict]]


# ----------------------------------------------------------------------------- env facts
def env_limits(env: Any) -> jax.Array:
    """[m] episode-average cost limits of a ``meg_jax.env.make`` environment (s, J)."""
    return jnp.asarray(env.params.limits, jnp.float32)


def env_horizon(env: Any) -> int:
    """Requests per episode T."""
    return int(env.episode_length)


def env_num_envs(env: Any) -> int:
    """Parallel environments N of a batched env."""
    return int(env.num_envs)


# ----------------------------------------------------------------------------- the agent
# XLA:CPU: chunks that keep a layer's activations in cache (measured in eval/bench_cvpo.py)
PARTICLE_ROWS_PER_CHUNK = 256  # (state, action) pairs per chunk of the particle evaluation
CRITIC_ROWS_PER_CHUNK = 512  # batch rows per chunk of the critics' TD step (4 heads x 512 x 128 f32 = 1 MiB)
UNCHUNKED = 1 << 30  # a chunk larger than any batch: one call


def default_rows_per_chunk(cpu_rows: int, backend: Optional[str] = None) -> int:
    """``cpu_rows`` on XLA:CPU; on a GPU or TPU one unchunked call (each chunk of a loop is a
    kernel launch of its own there: B = 4096 ran 256 particle chunks in sequence on an H200)."""
    return cpu_rows if (backend or jax.default_backend()) == "cpu" else UNCHUNKED


def make_cvpo(
    config: CVPOConfig, env: Any, mesh: Optional[Mesh] = None, *, particle_rows_per_chunk: Optional[int] = None,
    critic_rows_per_chunk: Optional[int] = None,
) -> CVPOAgent:
    """Binds CVPO to a batched environment.

    Args:
      config: hyperparameters.
      env: a ``meg_jax.env.make`` environment (N = ``env.num_envs`` parallel episodes);
        ``config.discrete`` must match how it was made.
      mesh: a ``"data"`` mesh (``meg_jax.parallel.make_mesh``); when given, sampled batches
        are constrained to be sharded over it (environment and replay shardings come from
        how the state is placed, see ``meg_jax.rl.sharding``).
      particle_rows_per_chunk: chunk size of the next-state particle evaluation (speed only;
        ``eval/bench_cvpo.py`` sets it to B x K, one chunk, to count FLOPs without a loop).
        None: :func:`default_rows_per_chunk` of ``PARTICLE_ROWS_PER_CHUNK``.
      critic_rows_per_chunk: batch rows per chunk of the critics' loss and gradient (speed
        only, ``blocks.chunked_value_and_grad``; B or more: one unchunked call). None:
        :func:`default_rows_per_chunk` of ``CRITIC_ROWS_PER_CHUNK``.

    Returns:
      the agent's pure functions.
    """
    _validate(config, env)
    if particle_rows_per_chunk is None:
        particle_rows_per_chunk = default_rows_per_chunk(PARTICLE_ROWS_PER_CHUNK)
    if critic_rows_per_chunk is None:
        critic_rows_per_chunk = default_rows_per_chunk(CRITIC_ROWS_PER_CHUNK)
    num_envs = env_num_envs(env)
    limits = env_limits(env)
    m = int(limits.shape[0])
    obs_dim = int(env.observation_size)
    discrete = config.discrete
    num_reward = config.reward_critics
    num_heads = num_reward + m
    capacity_per_env = max(1, config.replay_capacity // num_envs)
    min_replay_steps = max(1, math.ceil(config.min_replay / num_envs))
    thresholds = dual_lib.q_space_threshold(
        jnp.full((m,), 1.0 - config.cost_margin, jnp.float32), config.gamma, None
    )
    # the cost critics' units (cvpo.cost_scale): what the E-step compares their values with
    q_thresholds = thresholds * config.cost_scale

    if discrete:
        num_actions = int(env.num_actions)
        actor_net = networks.CategoricalPolicy(config.actor_hidden, num_actions)
        if config.discrete_critic == "coordinates":
            coords = np.asarray(env.unwrapped.action_coordinates, np.float32)
            critic_net = networks.CoordinateCriticEnsemble(
                config.critic_hidden, num_heads, tuple(map(tuple, coords.tolist())), config.critic_layer_norm
            )
        else:
            critic_net = networks.DiscreteCriticEnsemble(
                config.critic_hidden, num_heads, num_actions, config.critic_layer_norm
            )
    else:
        action_dim = int(env.action_size)
        actor_net = networks.GaussianPolicy(config.actor_hidden, action_dim, config.init_std, config.min_std)
        critic_net = networks.CriticEnsemble(config.critic_hidden, num_heads, config.critic_layer_norm)

    actor_tx = blocks.clipped_adam(config.actor_lr, config.max_grad_norm)
    critic_lr: float | optax.Schedule = config.critic_lr
    if config.critic_lr_halflife > 0:
        critic_lr = lambda t: config.critic_lr / (1.0 + t / config.critic_lr_halflife)  # noqa: E731
    critic_tx = blocks.clipped_adam(critic_lr, config.max_grad_norm)

    constrain = blocks.batch_constrainer(mesh)
    critic_chunks = blocks.num_row_chunks(config.batch_size, critic_rows_per_chunk)

    # ---------------------------------------------------------------- acting
    def act(actor_params: Any, obs: jax.Array, key: jax.Array, deterministic: bool = False,
            temperature: float = 1.0) -> jax.Array:
        """Environment action for obs [N, obs_dim]: [N, d] in [-1, 1] or [N] int32. ``temperature``
        flattens the policy for collection (logits / T; the Gaussian's std x T); 1 = the policy."""
        if discrete:
            logits = actor_net.apply(actor_params, obs)
            if deterministic:
                return jnp.argmax(logits, axis=-1).astype(jnp.int32)
            return jax.random.categorical(key, logits / temperature).astype(jnp.int32)
        mean, std = actor_net.apply(actor_params, obs)
        a = mean if deterministic else networks.gaussian_sample(key, mean, std * temperature)
        return jnp.clip(a, -1.0, 1.0)

    def random_action(key: jax.Array, n: int) -> jax.Array:
        if discrete:
            return jax.random.randint(key, (n,), 0, num_actions, jnp.int32)
        return jax.random.uniform(key, (n, action_dim), jnp.float32, -1.0, 1.0)

    # ---------------------------------------------------------------- init
    def init(key: jax.Array) -> CVPOState:
        k_actor, k_critic, k_env = jax.random.split(key, 3)
        obs = jnp.zeros((1, obs_dim), jnp.float32)
        actor = actor_net.init(k_actor, obs)
        if discrete:
            critic = critic_net.init(k_critic, obs)
            example_action = jnp.zeros((num_envs,), jnp.int32)
        else:
            critic = critic_net.init(k_critic, obs, jnp.zeros((1, action_dim), jnp.float32))
            example_action = jnp.zeros((num_envs, action_dim), jnp.float32)
        env_state = env.reset(k_env)
        zeros_n = jnp.zeros_like(env_state.reward)
        example = Transition(
            obs=env_state.obs,
            action=example_action,
            reward=zeros_n,
            costs=jnp.zeros_like(env_state.info["costs"]),
            next_obs=env_state.obs,
            discount=zeros_n,
        )
        return CVPOState(
            actor=actor,
            target_actor=actor,
            critic=critic,
            target_critic=critic,
            actor_opt=actor_tx.init(actor),
            critic_opt=critic_tx.init(critic),
            eta=jnp.asarray(config.eta_init, jnp.float32),
            lam=jnp.zeros((m,), jnp.float32),
            cost_baseline=jnp.zeros((m,), jnp.float32),
            alpha_mu=jnp.zeros((), jnp.float32),
            alpha_sigma=jnp.zeros((), jnp.float32),
            env_state=env_state,
            replay=replay_init(example, capacity_per_env),
            block=jnp.zeros((), jnp.int32),
            env_steps=jnp.zeros((), jnp.int32),
            updates=jnp.zeros((), jnp.int32),
        )

    # ---------------------------------------------------------------- collection
    def collect_one(carry: tuple[CVPOState, EpisodeTracker], key: jax.Array):
        state, tracker = carry
        k_pol, k_rand = jax.random.split(key)
        es = state.env_state
        warm = state.replay.size < min_replay_steps
        policy_action = act(state.actor, es.obs, k_pol, temperature=config.explore_temperature)
        action = jnp.where(warm, random_action(k_rand, num_envs), policy_action)
        nxt = env.step(es, action)
        done = nxt.done
        truncation = nxt.info["truncation"]
        transition = Transition(
            obs=es.obs,
            action=action,
            reward=nxt.reward,
            costs=nxt.info["costs"] / limits,
            next_obs=nxt.obs,  # continuing view: after an episode end, the next episode's start
            discount=1.0 - done * (1.0 - truncation),
        )
        replay = replay_add(state.replay, transition)
        ep_costs = jnp.stack([nxt.metrics["avg_latency_s"], nxt.metrics["avg_energy_j"]], axis=-1)
        tracker = EpisodeTracker(
            episodes=tracker.episodes + jnp.sum(done),
            quality=tracker.quality + jnp.sum(done * nxt.metrics["avg_quality"]),
            costs=tracker.costs + jnp.sum(done[:, None] * ep_costs, axis=0),
        )
        state = state.replace(env_state=nxt, replay=replay, env_steps=state.env_steps + num_envs)
        return (state, tracker), None

    # ---------------------------------------------------------------- one update
    num_particles = max(config.num_action_samples, config.target_samples)

    def next_state_particles(state: CVPOState, next_obs: jax.Array, key: jax.Array):
        """pi_old (the target actor) at the next states and the target critics' values of its
        actions there, computed once and shared by the TD target and the E-step.

        Returns (candidates, q): discrete: logits_old [B, A] and q [B, A, H] (every action);
        continuous: (actions [B, K, d] unclipped, mean_old [B, d], std_old [B, d]) and
        q [B, K, H] at the clipped actions, K = max(M, target_samples).
        """
        if discrete:
            logits_old = actor_net.apply(state.target_actor, next_obs)  # [B, A]
            return logits_old, critic_net.apply(state.target_critic, next_obs)  # [B, A, H]
        mean_old, std_old = actor_net.apply(state.target_actor, next_obs)
        a = networks.gaussian_sample(key, mean_old, std_old, num_particles)  # [K, B, d]
        a = jnp.swapaxes(a, 0, 1)  # [B, K, d]
        q = networks.critic_ensemble_particles(
            state.target_critic, next_obs, jnp.clip(a, -1.0, 1.0), config.critic_layer_norm, particle_rows_per_chunk,
            jnp.dtype(config.particle_matmul_dtype),
        )
        return (a, mean_old, std_old), q

    def combined_reward(q: jax.Array) -> jax.Array:
        """[...] the reward heads of q [..., H] combined (``cvpo.reward_combine``)."""
        if config.reward_combine == "mean":
            return jnp.mean(q[..., :num_reward], axis=-1)
        return jnp.min(q[..., :num_reward], axis=-1)

    def next_values(candidates: Any, q: jax.Array) -> jax.Array:
        """[B, H] next-state values for the TD targets (packed as heads, see critic_targets)."""
        if discrete:
            probs = jax.nn.softmax(candidates, axis=-1)  # [B, A]
            v_r = jnp.sum(probs * combined_reward(q), axis=-1)
            v_c = jnp.einsum("ba,bah->bh", probs, q[..., num_reward:])
        else:
            q = q[:, : config.target_samples]
            # the reward heads combined per sampled action, then the mean over actions
            v_r = jnp.mean(combined_reward(q), axis=1)
            v_c = jnp.mean(q[..., num_reward:], axis=1)
        # pack as heads so critic_targets' min is the identity on (v_r, v_r)
        return jnp.concatenate([v_r[:, None], v_r[:, None], v_c], axis=-1)

    def critic_update(state: CVPOState, batch: Transition, nv: jax.Array):
        reward = batch.reward
        if config.center_reward:
            # rewards relative to the replay's mean: the critics learn Q - mean / (1 - gamma), a
            # shift common to every action of a state (the E-step's softmax and the M-step do not
            # see it); an n-step sum holds sum_k gamma^k of them
            steps = sum(config.gamma**k for k in range(config.n_step))
            reward = reward - steps * jax.lax.stop_gradient(replay_mean_reward(state.replay))
        # the critics learn reward_scale x Q_r and cost_scale x Q_c (the E-step's thresholds carry
        # cost_scale; its q does not change with either scale, eta and lam absorb them)
        reward, costs = reward * config.reward_scale, batch.costs * config.cost_scale
        # n-step batches carry the discounted n-step sums; the bootstrap is gamma^n away
        y_r, y_c = critic_targets(
            reward, costs, batch.discount, jax.lax.stop_gradient(nv), config.gamma**config.n_step
        )
        targets = jnp.concatenate([jnp.repeat(y_r[:, None], num_reward, axis=-1), y_c], axis=-1)  # [B, H]

        def loss_fn(params, rows):
            obs, action, target = rows
            q = critic_net.apply(params, obs, action)  # [rows, H]: the taken actions' values
            if critic_chunks == 1:
                per_head = jnp.mean((q - target) ** 2, axis=0)  # [H]
            else:  # this chunk's share of the batch mean
                per_head = jnp.sum((q - target) ** 2, axis=0) / config.batch_size
            return jnp.sum(per_head), per_head

        (loss, per_head), grads = blocks.chunked_value_and_grad(
            loss_fn, state.critic, (batch.obs, batch.action, targets), critic_chunks
        )
        updates, opt = critic_tx.update(grads, state.critic_opt, state.critic)
        critic = optax.apply_updates(state.critic, updates)
        metrics = {"critic_loss": loss, "reward_critic_loss": per_head[0], "cost_critic_loss": per_head[num_reward:]}
        return state.replace(critic=critic, critic_opt=opt), metrics

    def estep(state: CVPOState, candidates: Any, q: jax.Array):
        """The E-step on the next states' particles: their prior under pi_old and the solved dual.

        The cost constraint is read relative to the batch's own cost under pi_old: q may move
        mean_s E_q[Q_c] by (threshold - J) from the batch's mean_s E_pi_old[Q_c], J the
        policy's cost level smoothed over batches (EMA at ``cost_baseline_rate``). The batch
        mean alone is a noisy estimate of J (B states of random channels), noisier than what
        q can change within the KL ball, which pinned lam at 0 or lam_max batch by batch.
        The dual is solved on the costs centred per state (Q_c - E_pi_old[Q_c | s], threshold
        minus the batch mean: the same q and lam), so a large lam multiplies differences of
        Q_c, not its level (float32 keeps the reward's differences at lam = lam_max).

        Returns (candidates, weights [B, M], solution, cost_baseline accumulator [m],
        diagnostics).
        """
        if discrete:
            log_prior = jax.nn.log_softmax(candidates, axis=-1)
        else:
            a, mean_old, std_old = candidates
            m_samples = config.num_action_samples
            candidates = (a[:, :m_samples], mean_old, std_old)
            q = q[:, :m_samples]
            log_prior = jnp.full(q.shape[:2], -math.log(m_samples), jnp.float32)
        q = jax.lax.stop_gradient(q)
        q_r = combined_reward(q)
        q_c = q[..., num_reward:]
        state_costs = jnp.einsum("bk,bkj->bj", jnp.exp(log_prior), q_c)  # [B, m] E_pi_old[Q_c | s]
        prior_costs = jnp.mean(state_costs, axis=0)  # [m]
        accumulator, baseline = dual_lib.ema_update(
            state.cost_baseline, prior_costs, config.cost_baseline_rate, state.updates + 1
        )
        batch_thresholds = q_thresholds + (prior_costs - baseline)
        q_c = q_c - state_costs[:, None, :]  # centred per state; the threshold follows
        centred_thresholds = q_thresholds - baseline
        if config.feasibility_margin > 0:
            # thresholds beyond the KL ball (or at its edge) are raised to a cost a q strictly
            # inside it meets, so the dual's minimiser is finite: lam no longer runs to lam_max
            dual_thresholds, least_weights, _ = dual_lib.reachable_thresholds(
                q_c, log_prior, config.kl_epsilon, centred_thresholds, config.feasibility_margin,
                max_iters=config.dual_iters, tol=config.dual_tol,
            )
        else:
            dual_thresholds = centred_thresholds
        def solve(init_eta, init_lam, fixed_lam=None):
            s = dual_lib.solve_estep_dual(
                q_r, q_c, log_prior, config.kl_epsilon, dual_thresholds, init_eta, init_lam,
                max_iters=config.dual_iters, tol=config.dual_tol, lam_max=config.lam_max, fixed_lam=fixed_lam,
            )
            return s.replace(expected_costs=s.expected_costs + prior_costs)  # back to Q_c's level

        sol = solve(state.eta, state.lam)
        solved_thresholds = dual_thresholds + prior_costs  # the batch thresholds the dual was asked to meet
        infeasible = dual_lib.estep_infeasible(sol, solved_thresholds, config.lam_max, rtol=1e-4)
        batch_lam = sol.lam
        if config.lam_rate < 1.0:
            # q at the running average of the batches' multipliers, eta re-solved for the KL bound
            rate = jnp.maximum(jnp.float32(config.lam_rate), 1.0 / (state.updates + 1).astype(jnp.float32))
            sol = solve(sol.eta, None, fixed_lam=state.lam + rate * (batch_lam - state.lam))
        weights = dual_lib.estep_weights(q_r, q_c, log_prior, sol.eta, sol.lam)
        if config.estep_fallback:
            # no q in the KL ball meets the violated thresholds: take the least-cost q there
            if config.feasibility_margin > 0:
                weights = jnp.where(infeasible, least_weights, weights)
            else:
                which = (sol.expected_costs > solved_thresholds).astype(jnp.float32)
                weights = jax.lax.cond(
                    infeasible,
                    lambda: dual_lib.min_cost_estep(q_c, log_prior, config.kl_epsilon, which, sol.eta,
                                                    max_iters=config.dual_iters, tol=config.dual_tol)[0],
                    lambda: weights,
                )
        weights = jax.lax.stop_gradient(weights)
        diagnostics = {
            "estep_infeasible": infeasible.astype(jnp.float32),
            # the batch threshold was raised to what the KL ball can meet (feasibility_margin)
            "estep_relaxed": jnp.any(dual_thresholds > centred_thresholds).astype(jnp.float32),
            "estep_lam_at_cap": dual_lib.lam_at_cap(batch_lam, config.lam_max),
            "estep_batch_lam": batch_lam,  # the batch's own multipliers (= lam unless lam_rate < 1)
            # > 0: q still exceeds a batch threshold at the solution (infeasible in the KL ball)
            "estep_violation": jnp.max((sol.expected_costs - batch_thresholds) / q_thresholds),
            "estep_prior_costs_over_threshold": prior_costs / q_thresholds,
            "estep_baseline_over_threshold": baseline / q_thresholds,
        }
        return candidates, weights, sol, accumulator, diagnostics

    def mstep(state: CVPOState, obs: jax.Array, candidates: Any, weights: jax.Array):
        if discrete:
            logits_old = candidates

            def loss_fn(params):
                return categorical_mstep_loss(actor_net.apply(params, obs), logits_old, weights, state.alpha_mu)

            def kl_of(params):
                kl = jnp.mean(networks.categorical_kl(logits_old, actor_net.apply(params, obs)))
                return jnp.stack([kl, jnp.zeros_like(kl)])
        else:
            actions, mean_old, std_old = candidates

            def loss_fn(params):
                mean, std = actor_net.apply(params, obs)
                return gaussian_mstep_loss(
                    mean, std, mean_old, std_old, actions, weights, state.alpha_mu, state.alpha_sigma
                )

            def kl_of(params):
                mean, std = actor_net.apply(params, obs)
                return jnp.stack([jnp.mean(networks.gaussian_kl_mean(mean_old, mean, std_old)),
                                  jnp.mean(networks.gaussian_kl_std(std_old, std))])

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.actor)
        updates, opt = actor_tx.update(grads, state.actor_opt, state.actor)
        bounds = jnp.asarray([config.kl_mean, config.kl_std], jnp.float32)
        actor, step_fraction, kls, full_kls = backtrack_to_kl_bounds(state.actor, updates, kl_of, bounds)
        # the multipliers ascend on the KL the full step would have reached, so they learn to
        # keep the fit inside the bounds and the backtracking rarely has to cut
        alpha_mu = update_alpha(state.alpha_mu, full_kls[0], config.kl_mean, config.alpha_lr, config.alpha_max)
        alpha_sigma = update_alpha(state.alpha_sigma, full_kls[1], config.kl_std, config.alpha_lr, config.alpha_max)
        metrics = {
            "actor_loss": loss, "nll": aux["nll"], "kl_mean": kls[0], "kl_std": kls[1],
            "mstep_step_fraction": step_fraction, "alpha_mu": state.alpha_mu, "alpha_sigma": state.alpha_sigma,
        }
        return state.replace(actor=actor, actor_opt=opt, alpha_mu=alpha_mu, alpha_sigma=alpha_sigma), metrics

    def update(state: CVPOState, key: jax.Array):
        k_sample, k_particles = jax.random.split(key)
        # the named scopes only label the profile's ops by phase (eval/bench_cvpo.py)
        with jax.named_scope("sample"):
            batch = constrain(replay_sample_nstep(state.replay, k_sample, config.batch_size, config.n_step, config.gamma))
        # one evaluation of pi_old's actions at the next states serves the TD target and the
        # E-step (both score pi_old's actions with the target critics, which the critic step
        # below does not change); the E- and M-steps therefore fit the policy on the next states
        with jax.named_scope("particles"):
            particles, q_next = next_state_particles(state, batch.next_obs, k_particles)
        with jax.named_scope("critic_td"):
            state, c_metrics = critic_update(state, batch, next_values(particles, q_next))
        with jax.named_scope("estep"):
            candidates, weights, sol, cost_baseline, e_metrics = estep(state, particles, q_next)
        with jax.named_scope("mstep"):
            state, a_metrics = mstep(state, batch.next_obs, candidates, weights)
        with jax.named_scope("polyak"):
            target_critic = polyak(state.target_critic, state.critic, config.tau)
            target_actor = polyak(state.target_actor, state.actor, config.tau)
        state = state.replace(
            target_critic=target_critic,
            target_actor=target_actor,
            eta=sol.eta,
            lam=sol.lam,
            cost_baseline=cost_baseline,
            updates=state.updates + 1,
        )
        if not discrete:
            a_metrics["policy_std"] = jnp.mean(candidates[2])
        metrics = {
            **c_metrics,
            **a_metrics,
            **e_metrics,
            "eta": sol.eta,
            "lam": sol.lam,
            "estep_kl": sol.kl,
            "estep_costs_over_threshold": sol.expected_costs / q_thresholds,
            "estep_reward": sol.expected_reward,
            "dual_value": sol.value,
            "dual_iterations": sol.iterations,
        }
        return state, metrics

    maybe_update = blocks.update_when_ready(update, min_replay_steps)

    # ---------------------------------------------------------------- the block
    def train_step(state: CVPOState, key: jax.Array) -> tuple[CVPOState, dict[str, Any]]:
        """One block: collection, then updates. Update metrics come back [updates_per_block]
        (zeros, with ``updated`` = 0, before the replay holds ``min_replay`` transitions);
        episode metrics are sums over the episodes that ended in the block."""
        k_collect, k_update = jax.random.split(key)
        (state, tracker), _ = jax.lax.scan(
            collect_one, (state, EpisodeTracker.zeros(m)), jax.random.split(k_collect, config.env_steps_per_block)
        )
        state, update_metrics = jax.lax.scan(
            maybe_update, state, jax.random.split(k_update, config.updates_per_block)
        )
        state = state.replace(block=state.block + 1)
        metrics = {
            **update_metrics,
            "episodes": tracker.episodes,
            "episode_quality_sum": tracker.quality,
            "episode_costs_sum": tracker.costs,
            "env_steps": state.env_steps,
        }
        return state, metrics

    def update_block(state: CVPOState, key: jax.Array) -> tuple[CVPOState, dict[str, Any]]:
        """``updates_per_block`` updates (``lax.scan``), metrics [updates_per_block]."""
        return jax.lax.scan(update, state, jax.random.split(key, config.updates_per_block))

    return CVPOAgent(init=init, train_step=train_step, act=act, thresholds=thresholds, limits=limits,
                     update_block=update_block)


def _validate(config: CVPOConfig, env: Any) -> None:
    problems = []
    if config.discrete != bool(getattr(env.unwrapped, "discrete", False)):
        problems.append(
            f"cvpo.discrete={config.discrete} but the environment was made with discrete="
            f"{bool(getattr(env.unwrapped, 'discrete', False))}; make both agree"
        )
    if not 0.0 <= config.gamma < 1.0:
        problems.append(f"cvpo.gamma must be in [0, 1), got {config.gamma}")
    for name in ("batch_size", "num_action_samples", "env_steps_per_block", "updates_per_block", "target_samples"):
        if getattr(config, name) < 1:
            problems.append(f"cvpo.{name} must be >= 1, got {getattr(config, name)}")
    for name in ("kl_epsilon", "kl_mean", "kl_std", "tau", "actor_lr", "critic_lr"):
        if getattr(config, name) <= 0:
            problems.append(f"cvpo.{name} must be > 0, got {getattr(config, name)}")
    if not 0.0 <= config.cost_margin < 1.0:
        problems.append(f"cvpo.cost_margin must be in [0, 1), got {config.cost_margin}")
    if not 0.0 < config.cost_baseline_rate <= 1.0:
        problems.append(f"cvpo.cost_baseline_rate must be in (0, 1], got {config.cost_baseline_rate}")
    for name in ("reward_scale", "cost_scale", "explore_temperature"):
        if not getattr(config, name) > 0:
            problems.append(f"cvpo.{name} must be > 0, got {getattr(config, name)}")
    if not 0.0 < config.lam_rate <= 1.0:
        problems.append(f"cvpo.lam_rate must be in (0, 1] (1: each batch's own lam), got {config.lam_rate}")
    if not 0.0 <= config.feasibility_margin < 1.0:
        problems.append(f"cvpo.feasibility_margin must be in [0, 1), got {config.feasibility_margin}")
    if config.reward_critics < 1:
        problems.append(f"cvpo.reward_critics must be >= 1, got {config.reward_critics}")
    if config.reward_combine not in ("min", "mean"):
        problems.append(f"cvpo.reward_combine must be 'min' or 'mean', got {config.reward_combine!r}")
    if config.n_step < 1:
        problems.append(f"cvpo.n_step must be >= 1, got {config.n_step}")
    if config.particle_matmul_dtype not in ("float32", "bfloat16"):
        problems.append(f"cvpo.particle_matmul_dtype must be 'float32' or 'bfloat16', got {config.particle_matmul_dtype!r}")
    if config.critic_lr_halflife < 0:
        problems.append(f"cvpo.critic_lr_halflife must be >= 0 (0: constant step), got {config.critic_lr_halflife}")
    if config.discrete_critic not in ("table", "coordinates"):
        problems.append(f"cvpo.discrete_critic must be 'table' or 'coordinates', got {config.discrete_critic!r}")
    elif config.discrete_critic == "coordinates" and config.discrete:
        coords = getattr(env.unwrapped, "action_coordinates", None)
        if coords is None:
            problems.append(f"cvpo.discrete_critic='coordinates' needs an environment with action_coordinates "
                            f"(an [A, F] array); {type(env.unwrapped).__name__} has none")
        elif np.ndim(coords) != 2 or np.shape(coords)[0] != int(env.num_actions):
            problems.append(f"cvpo.discrete_critic='coordinates': the environment's action_coordinates has shape "
                            f"{np.shape(coords)}, expected [num_actions={int(env.num_actions)}, F]")
    if config.replay_capacity < env_num_envs(env):
        problems.append(
            f"cvpo.replay_capacity={config.replay_capacity} is below the {env_num_envs(env)} parallel "
            "environments; it must hold at least one step of each"
        )
    if problems:
        raise ValueError("invalid CVPO config:\n  - " + "\n  - ".join(problems))


def make_train(config: CVPOConfig, env: Any, num_blocks: int) -> Callable[[jax.Array], tuple[CVPOState, dict]]:
    """``train(key) -> (final state, stacked metrics)``: a whole run as one function.

    Block b uses key ``fold_in(key_run, b)``, the same keys the host loop of
    ``train/cvpo.py`` uses, so a vmapped ``train`` over seeds reproduces the job's runs.
    """
    agent = make_cvpo(config, env)
    return blocks.scan_train(agent.init, agent.train_step, num_blocks)
