"""Configs of the constrained RL agents (MEG-CVPO, PPO-Lagrangian, PPO) and of a training run.

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
    "EvalConfig",
    "RunConfig",
    "ALGOS",
    "FEASIBILITY_TOLERANCE",
]

# the --algo choices of train/cvpo.py
ALGOS = ("cvpo", "ppo_lag", "ppo", "fixed", "oracle", "max_quality")

# A policy is feasible when each mean episode-average cost is <= limit x this: the one
# definition, used by training's final evaluation, the evaluation report and the benchmarks.
FEASIBILITY_TOLERANCE = 1.02


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
    lam_max: float = 100.0  # upper bound of each lambda (normalised costs; binds only when q cannot meet a threshold)
    dual_iters: int = 30  # max projected Newton iterations of the E-step dual per update
    dual_tol: float = 2e-7  # relative decrease of the dual below which the solver stops
    cost_margin: float = 0.0  # thresholds use limit * (1 - cost_margin)
    target_samples: int = 16  # next-state actions averaged in the critic target (continuous)


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
    eval: EvalConfig = EvalConfig()
    total_env_steps: int = 200_000  # stop after this many transitions collected
    blocks_per_log: int = 50  # train_step blocks per host iteration (one log line each)
    checkpoint_every_logs: int = 10  # host iterations between checkpoints
    keep_checkpoints: int = 2  # orbax checkpoints kept
