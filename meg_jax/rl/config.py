"""Configs of the constrained RL agents and of a training run.

Agents: MEG-CVPO, PPO-Lagrangian (gradient or PID multipliers), plain PPO, DDPG-Lagrangian and
SAC-Lagrangian.

Every config is a frozen dataclass of plain values (see ``meg_jax.config`` for the JSON
round-trip and ``a.b=value`` overrides). Defaults are the values the results in
``docs/results.md`` were made with; the reference hyperparameters of the original CVPO code
and FSRL are listed in ``shared/reference/cvpo.md``.

Cost scale: every agent divides the environment's cost vector by the episode-average limits
before learning, so a cost of 1.0 means "exactly at the limit". Q-space thresholds, λ and the
cost critics all live in that normalised scale.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = [
    "EnvSpec",
    "CVPOConfig",
    "PPOConfig",
    "OffPolicyConfig",
    "DDPGConfig",
    "SACConfig",
    "DUALS",
    "EvalConfig",
    "RunConfig",
    "ALGOS",
    "FEASIBILITY_TOLERANCE",
    "REFERENCE_TOLERANCE",
]

# the --algo choices of train/cvpo.py: the learned agents (``meg_jax.rl.agents.LEARNED``),
# then the reference policies that are only evaluated
ALGOS = ("cvpo", "ppo_lag", "ppo_pid", "ppo", "ddpg_lag", "sac_lag", "fixed", "oracle", "max_quality")

# how the Lagrangian agents move their multipliers (``meg_jax.rl.dual.update_lagrange``):
# "gradient": projected ascent lam <- clip(lam + lr (cost - target), 0, max);
# "pid": Stooke, Achiam & Abbeel (ICML 2020), lam = (Kp e + Ki I + Kd (J - J_prev)+)+
DUALS = ("gradient", "pid")

# A policy is feasible when each mean episode-average cost is <= limit x this: the one
# definition, used by training's final evaluation, the evaluation report and the benchmarks.
FEASIBILITY_TOLERANCE = 1.02
# The references chosen on the very requests they are scored on (the best fixed action, the
# Lagrangian oracle) carry no estimation error to forgive: they meet the limits exactly. With
# 1.02 a fixed action up to 2 % over a limit could beat the oracle, which is held to the limit.
REFERENCE_TOLERANCE = 1.0


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """Which environment to build (forwarded to ``meg_jax.env.make``)."""

    preset: str = "tiny"  # environment preset: "tiny", "sdxl-mobile" or "paper"
    num_envs: int = 64  # parallel environments used for collection (sharded over devices)
    episode_length: Optional[int] = None  # requests per episode; None = the preset's default
    artifact: Optional[str] = None  # calibration artifact path; None = the preset's default
    # episode-average limits (latency s, UE energy J); None = the preset's default limits
    limits: Optional[tuple[float, ...]] = None
    # channel-estimate quality (``MEGEnvConfig`` fields); None = the preset's. Zero delay and
    # zero error give the agent the channel the oracle sees.
    csi_delay_s: Optional[float] = None
    csi_error_std: Optional[float] = None
    # reward and energy (``MEGEnvConfig`` fields); None = the preset's. "replay" rewards each
    # request's own prompt (a schema-2 artifact's per-prompt tables), see docs/replay.md.
    quality_source: Optional[str] = None  # "class_mean" or "replay"
    reward_metric: Optional[str] = None  # "accuracy", "pixel_accuracy", "psnr" or "neg_log_mse"
    energy_scope: Optional[str] = None  # "ue" (UE decode + reception) or "system" (+ ES compute + transmit)
    # names of the observation's fields to keep (``meg_jax.env.state.observation_fields``), in that
    # order; None = the whole observation. An ablation of what agents see (dynamics unchanged)
    observe: Optional[tuple[str, ...]] = None


@dataclasses.dataclass(frozen=True)
class CVPOConfig:
    """MEG-CVPO hyperparameters (Liu et al. 2022, extended to a vector of constraints)."""

    discrete: bool = False  # categorical head over the K x r grid (exact E-step) instead of a Gaussian
    actor_hidden: tuple[int, ...] = (128, 128)  # actor MLP widths
    critic_hidden: tuple[int, ...] = (128, 128)  # critic MLP widths (each head its own MLP)
    critic_layer_norm: bool = True  # LayerNorm after each hidden critic layer (stabilises TD)
    gamma: float = 0.5  # discount; the task is nearly myopic (the channel ignores the action)
    batch_size: int = 256  # transitions per gradient update
    num_action_samples: int = 16  # M: actions sampled from pi_old per state (continuous head)
    replay_capacity: int = 100_000  # total transitions kept (split evenly over the envs)
    min_replay: int = 1_000  # transitions collected before the first update
    env_steps_per_block: int = 1  # vectorised env steps per train_step block (x num_envs transitions)
    updates_per_block: int = 4  # gradient updates per train_step block
    actor_lr: float = 5e-4  # Adam step of the actor (M-step)
    critic_lr: float = 1e-3  # Adam step of the critics
    max_grad_norm: float = 10.0  # global gradient clip of both optimisers
    tau: float = 0.05  # polyak rate of the target critics and target actor
    kl_epsilon: float = 0.02  # E-step KL bound epsilon (nats, mean over states)
    kl_mean: float = 0.01  # M-step bound on the mean part of KL(pi_old || pi) (categorical: total KL)
    kl_std: float = 1e-4  # M-step bound on the covariance part of KL(pi_old || pi)
    alpha_lr: float = 1.0  # dual ascent step of alpha_mu / alpha_sigma per unit of (C / eps - 1)
    alpha_max: float = 1e4  # upper clip of alpha_mu / alpha_sigma
    init_std: float = 0.5  # initial policy standard deviation (action units)
    min_std: float = 1e-3  # floor of the policy standard deviation
    eta_init: float = 1.0  # initial E-step temperature
    # upper bound of each lambda (normalised costs). The multiplier grows without bound as the
    # batch threshold nears the least cost q can reach in the KL ball, which shrinks with the
    # policy's spread: 100 clipped feasible E-steps late in training (docs/results.md)
    lam_max: float = 1e4
    dual_iters: int = 30  # max projected Newton iterations of the E-step dual per update
    dual_tol: float = 2e-7  # relative decrease of the dual below which the solver stops
    cost_margin: float = 0.0  # thresholds use limit * (1 - cost_margin)
    target_samples: int = 16  # next-state actions averaged in the critic target (continuous)
    # E-step cost baseline: the batch's cost constraint is read relative to its own cost under
    # pi_old, with the policy's cost level taken from an EMA of those batch costs at this rate
    # per update (bias-corrected); 1.0 = the batch's own estimate (no smoothing)
    cost_baseline_rate: float = 0.05
    # a batch threshold the E-step's KL ball cannot meet with room to spare is raised to the cost of
    # a q that gives up this fraction of the least cost reachable in the ball (dual.reachable_thresholds),
    # so the dual stays feasible and lam finite; 0 = off (lam runs to lam_max on such batches)
    feasibility_margin: float = 0.1
    estep_fallback: bool = True  # an E-step that cannot meet a threshold within the KL ball takes the least-cost q there
    n_step: int = 1  # TD targets over n consecutive steps (the authors use 2; 1 = one-step)
    # the reward critics learn Q minus a constant: the TD targets' rewards are taken relative to
    # the replay's mean reward (every update), so the critics need not carry a large offset
    # (paper: reward ~6.9, Q ~ 6.9 / (1 - gamma)); the E- and M-steps are unchanged by it
    center_reward: bool = False
    # reward critics (independently initialised heads); 2 = the twins of clipped double Q
    reward_critics: int = 2
    # how the reward critics combine into the reward value of the TD target and the E-step:
    # "min" (clipped double Q, Fujimoto et al. 2018) or "mean". The min is biased low by about the
    # critics' disagreement, largest for the actions the policy rarely takes
    reward_combine: str = "min"
    # how the discrete head's critics read an action: "table" (one output per action of the K x r
    # grid, each learnt only from the transitions that took it) or "coordinates" (the action's
    # (K, r), scaled to [-1, 1], is an input of the critic MLP, so neighbouring actions share
    # what they learn; A times the rows in the particle evaluation). Continuous head: unused
    discrete_critic: str = "table"
    # > 0: the critics' Adam step decays as critic_lr / (1 + t / critic_lr_halflife) over updates t
    # (halved after that many updates), so late in training the critics average their noisy
    # targets over ever more batches (a Robbins-Monro step); 0 = the constant critic_lr
    critic_lr_halflife: int = 0
    # operand type of the hidden GEMMs of the next-state particle evaluation (continuous head;
    # the update's largest work): "float32", or "bfloat16" (products accumulated in float32; on
    # CPUs with AMX and on GPUs several times the float32 rate)
    particle_matmul_dtype: str = "float32"
    # < 1: the E-step's q uses running averages of the batches' multipliers, lam_bar += r (lam_batch
    # - lam_bar) with r = max(lam_rate, 1 / t) over updates t, and eta re-solved at lam_bar (q keeps
    # the KL bound; the thresholds hold on average, not per batch). lam sets where the policy trades
    # reward for cost; a per-batch lam that jumps ±25 % blurs that trade-off across the policy's
    # fits (on 'paper' averaging it did worse: docs/results.md, fourth round). 1.0 = each batch's
    # own lam (Liu et al. 2022)
    lam_rate: float = 1.0
    # the critics learn reward_scale x the reward and cost_scale x the normalised costs (the E-step's
    # thresholds scale with the costs; q is the same at any scale, eta and lam absorb it). Adam
    # moves each weight by ~critic_lr whatever the loss scale, so the critics' step-to-step jitter is
    # fixed in output units: a larger scale makes it smaller against the values the decision turns on
    # (on 'paper', neighbouring actions' Lagrangian values differ by ~0.01; cost_scale 10 did not
    # help there). lam is reported in units of reward_scale / cost_scale
    reward_scale: float = 1.0
    cost_scale: float = 1.0
    # the replay's actions are drawn from the policy at this temperature (logits / T; the
    # Gaussian's std x T): T > 1 keeps the critics seeing the actions a sharp policy has left,
    # so their values there are learnt, not extrapolated (T = 3 did not help on 'paper').
    # Evaluation and act() use T = 1
    explore_temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO-Lagrangian (and unconstrained PPO when ``lagrangian`` is False) hyperparameters."""

    discrete: bool = False  # categorical head instead of a Gaussian
    lagrangian: bool = True  # False: plain PPO on the reward (unconstrained baseline)
    hidden: tuple[int, ...] = (64, 64)  # actor and critic MLP widths
    rollout_length: int = 32  # env steps per rollout (x num_envs transitions)
    epochs: int = 4  # passes over each rollout
    num_minibatches: int = 4  # minibatches per epoch
    lr: float = 3e-4  # Adam step of actor and critics
    gamma: float = 0.5  # discount (same nearly-myopic task as CVPO)
    gae_lambda: float = 0.95  # GAE lambda
    clip_eps: float = 0.2  # PPO ratio clip
    entropy_coef: float = 0.0  # entropy bonus
    value_coef: float = 0.5  # weight of the value losses
    max_grad_norm: float = 0.5  # global gradient clip
    init_std: float = 0.5  # initial policy standard deviation
    lagrange_lr: float = 0.05  # multiplier step per unit of (normalised average cost - 1)
    lagrange_init: float = 0.0  # initial multipliers
    lagrange_max: float = 100.0  # upper clip of each multiplier
    cost_margin: float = 0.0  # the multipliers aim at limit * (1 - cost_margin)
    dual: str = "gradient"  # multiplier update, one of DUALS (--algo ppo_pid sets "pid")
    pid_kp: float = 1.0  # PID: proportional gain on the error e = avg normalised cost - target
    pid_ki: float = 0.05  # PID: integral gain (Kp = Kd = 0 and Ki = lagrange_lr is the gradient update)
    pid_kd: float = 1.0  # PID: derivative gain on the rise of the (smoothed) cost, (J_k - J_k-1)+
    pid_ema_p: float = 0.0  # PID: EMA weight of the previous error in the P term (0 = none)
    pid_ema_d: float = 0.0  # PID: EMA weight of the previous cost in the D term (0 = none)


@dataclasses.dataclass(frozen=True)
class OffPolicyConfig:
    """What DDPG- and SAC-Lagrangian share: replay, networks, optimisers, the block multipliers."""

    hidden: tuple[int, ...] = (64, 64)  # actor and critic MLP widths
    critic_layer_norm: bool = True  # LayerNorm after each hidden critic layer
    gamma: float = 0.5  # discount (same nearly-myopic task as CVPO)
    batch_size: int = 256  # transitions per gradient update
    replay_capacity: int = 100_000  # total transitions kept (split evenly over the envs)
    min_replay: int = 1_000  # transitions collected (uniform random actions) before the first update
    env_steps_per_block: int = 1  # vectorised env steps per block (x num_envs transitions)
    updates_per_block: int = 4  # gradient updates per block
    actor_lr: float = 3e-4  # Adam step of the actor
    critic_lr: float = 1e-3  # Adam step of the critics
    max_grad_norm: float = 10.0  # global gradient clip
    tau: float = 0.05  # polyak rate of the targets (optax.incremental_update)
    lagrange_lr: float = 0.01  # multiplier step per block per unit of (normalised block cost - target)
    lagrange_init: float = 0.0  # initial multipliers
    lagrange_max: float = 100.0  # upper clip of each multiplier
    cost_margin: float = 0.0  # the multipliers aim at limit * (1 - cost_margin)
    dual: str = "gradient"  # multiplier update, one of DUALS
    pid_kp: float = 0.1  # PID gains (see PPOConfig), per block
    pid_ki: float = 0.01
    pid_kd: float = 0.0
    pid_ema_p: float = 0.9
    pid_ema_d: float = 0.9


@dataclasses.dataclass(frozen=True)
class DDPGConfig(OffPolicyConfig):
    """DDPG-Lagrangian hyperparameters (Lillicrap et al. 2016 with a Lagrangian on cost critics).

    Continuous head only (a deterministic tanh policy over the [-1, 1]^2 action); the target
    actor and the critics follow at rate ``tau``.
    """

    exploration_std: float = 0.1  # Gaussian noise added to the behaviour action (action units)


@dataclasses.dataclass(frozen=True)
class SACConfig(OffPolicyConfig):
    """SAC-Lagrangian hyperparameters (Haarnoja et al. 2018, automatic entropy, Lagrangian on cost critics).

    Continuous head only (a tanh-squashed Gaussian over the [-1, 1]^2 action); the target
    critics follow at rate ``tau``.
    """

    alpha_lr: float = 1e-3  # Adam step of log alpha (entropy temperature)
    alpha_init: float = 0.01  # initial entropy temperature (quality differences between actions are ~0.05)
    target_entropy: Optional[float] = None  # nats; None = -action_dim (Haarnoja et al. 2018b)
    init_std: float = 0.5  # initial pre-tanh standard deviation


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How policies are scored: fresh episodes, episode-average costs vs limits."""

    num_episodes: int = 1024  # fresh episodes (run in parallel, one per slot); 0 = no final evaluation
    deterministic: bool = False  # True: the mean / argmax action; False: sample the policy
    feasibility_tolerance: float = FEASIBILITY_TOLERANCE  # a policy is feasible if every cost <= limit x this


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run of ``train/cvpo.py``."""

    algo: str = "cvpo"  # one of ALGOS
    seed: int = 0  # PRNG seed of the run
    num_seeds: int = 1  # > 1: seeds seed .. seed + num_seeds - 1 trained together (vmapped, one device)
    env: EnvSpec = EnvSpec()
    cvpo: CVPOConfig = CVPOConfig()
    ppo: PPOConfig = PPOConfig()
    ddpg: DDPGConfig = DDPGConfig()
    sac: SACConfig = SACConfig()
    eval: EvalConfig = EvalConfig()
    total_env_steps: int = 200_000  # stop after this many transitions collected
    blocks_per_log: int = 50  # train_step blocks per host iteration (one log line each)
    checkpoint_every_logs: int = 10  # host iterations between checkpoints
    keep_checkpoints: int = 2  # orbax checkpoints kept
