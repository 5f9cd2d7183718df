"""The registry of learned agents: one place that maps ``RunConfig.algo`` to an agent.

``train.cvpo``, ``eval.runs``, ``rl.baselines.evaluate_all`` and ``eval.compare`` enumerate
agents through this module, so a new agent is registered here once. Every agent has the same
surface: ``init(key) -> state``, ``train_step(state, key) -> (state, metrics)`` (one block),
``act(actor_params, obs, key, deterministic)`` and ``limits``; its state has ``actor``,
``critic``, ``lam``, ``block`` and ``env_steps`` fields (checkpointed whole by orbax).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
from jax.sharding import Mesh

__all__ = ["LEARNED", "LABELS", "agent_config", "unused_sections", "is_discrete", "make_agent",
           "env_steps_per_block", "gradient_updates"]

# --algo values with a trained policy, in the order of the comparison table
LEARNED = ("cvpo", "ppo_lag", "ppo_pid", "ppo", "ddpg_lag", "sac_lag")

# display names
LABELS = {
    "cvpo": "MEG-CVPO",
    "ppo_lag": "PPO-Lagrangian",
    "ppo_pid": "PID-Lagrangian PPO",
    "ppo": "PPO (unconstrained)",
    "ddpg_lag": "DDPG-Lagrangian",
    "sac_lag": "SAC-Lagrangian",
}

_PPO = ("ppo_lag", "ppo_pid", "ppo")
# each learned agent's own section of a RunConfig
_SECTION = {"cvpo": "cvpo", "ppo_lag": "ppo", "ppo_pid": "ppo", "ppo": "ppo", "ddpg_lag": "ddpg", "sac_lag": "sac"}


def _check(algo: str) -> None:
    if algo not in LEARNED:
        raise ValueError(f"algo {algo!r} has no trained policy; the learned agents are {list(LEARNED)}")


def agent_config(config: Any) -> Any:
    """The agent's own config of a ``RunConfig`` (``ppo_lag`` / ``ppo_pid`` / ``ppo`` set the PPO variant)."""
    algo = config.algo
    _check(algo)
    section = getattr(config, _SECTION[algo])
    if algo in _PPO:
        ppo = dataclasses.replace(section, lagrangian=algo != "ppo")
        return dataclasses.replace(ppo, dual="pid") if algo == "ppo_pid" else ppo
    return section


def unused_sections(algo: str) -> tuple[str, ...]:
    """The agents' ``RunConfig`` sections a run of ``algo`` never reads (every section but its own).

    They do not change what the run trains, so a run directory resumes under any value of
    them (``train.cvpo`` passes them to ``checkpoint.check_config`` as ``ignore``): a sweep of
    ``--cvpo.*`` settings reuses the baselines trained beside it.
    """
    _check(algo)
    return tuple(s for s in dict.fromkeys(_SECTION.values()) if s != _SECTION[algo])


def is_discrete(config: Any) -> bool:
    """Whether the run's agent acts on the discrete K x r grid (DDPG and SAC never do)."""
    algo = config.algo
    if algo == "cvpo":
        return bool(config.cvpo.discrete)
    if algo in _PPO:
        return bool(config.ppo.discrete)
    return False


def make_agent(config: Any, env: Any, mesh: Optional[Mesh] = None) -> Any:
    """The agent of ``config.algo`` bound to ``env`` (made with ``discrete=is_discrete(config)``)."""
    algo = config.algo
    cfg = agent_config(config)
    if algo == "cvpo":
        from meg_jax.rl.cvpo import make_cvpo

        return make_cvpo(cfg, env, mesh)
    if algo in _PPO:
        from meg_jax.rl.ppo_lagrangian import make_ppo

        return make_ppo(cfg, env, mesh)
    if algo == "ddpg_lag":
        from meg_jax.rl.ddpg_lagrangian import make_ddpg

        return make_ddpg(cfg, env, mesh)
    from meg_jax.rl.sac_lagrangian import make_sac

    return make_sac(cfg, env, mesh)


def env_steps_per_block(config: Any) -> int:
    """Transitions one ``train_step`` block collects (all environments)."""
    cfg = agent_config(config)
    steps = cfg.rollout_length if config.algo in _PPO else cfg.env_steps_per_block
    return int(config.env.num_envs) * int(steps)


def gradient_updates(config: Any, state: Any) -> np.ndarray:
    """Gradient updates done so far, per seed ([S] for a vmapped state, [] otherwise).

    PPO: blocks x epochs x minibatches (one Adam step of actor and critic each); the
    off-policy agents count their updates (none before ``min_replay``).
    """
    if config.algo in _PPO:
        ppo = config.ppo
        return np.asarray(state.block) * ppo.epochs * ppo.num_minibatches
    return np.asarray(state.updates)
