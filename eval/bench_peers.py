"""Peer benchmark: meg-jax's MEG-CVPO against FSRL's CVPO (PyTorch) on the ``tiny`` MEG environment.

    python -m eval.bench_peers --setup-peer                   # once: builds .peer_venv/ with FSRL
    python -m eval.bench_peers --budget-s 600 --out runs/bench_peers     # the table in docs/benchmarks.md
    python -m eval.bench_peers --budget-s 60 --eval-every 15 --episodes 256   # smoke run

Both agents train on the same machine in the same run, one after the other (never at the same
time: the machine has 2 cores), each for ``--budget-s`` seconds of training wall clock, and
each single-threaded by default (``--threads``: XLA's Eigen pool off, ``torch.set_num_threads``).
The table gives, per agent, the wall-clock time to

(a) a **feasible** policy: the mean over the evaluation episodes of each episode-average cost
    is at most ``limit x FEASIBILITY_TOLERANCE`` (1.02; ``EvalConfig.feasibility_tolerance``), and
(b) **90% of the fixed -> oracle quality gap** closed, ``(Q - Q_fixed) / (Q_oracle - Q_fixed)
    >= 0.9``, by a feasible policy (a policy that breaks a limit can exceed any quality),

with Q_fixed the best fixed feasible (K, r) and Q_oracle the Lagrangian oracle fitted on the
evaluation episodes: exactly the metric of ``meg_jax.rl.evaluate`` / ``meg_jax.rl.baselines``
and ``docs/results.md``. Times are the first checkpoint that meets the bar (checkpoints every
``--eval-every`` seconds of training, and at the end); "not reached in N s" when none does.
The table also gives env steps/s and gradient updates/s, totals over training wall clock.

**Clocks.** An agent's clock starts when its networks are built (after imports and after the
environment is constructed) and runs until its budget is spent; it includes compilation (XLA
for meg-jax, listed separately) and excludes checkpoint export. Evaluation happens after both
runs, in this process, so it costs neither agent training time.

**meg-jax side** (project venv): ``meg_jax.rl.cvpo.make_cvpo`` with ``RunConfig()`` defaults
(every ``RunConfig`` field is a flag, as in ``train.cvpo``: ``--cvpo.updates_per_block 8``); blocks run as one
jitted ``lax.scan`` of ``--chunk-blocks`` blocks with the key schedule of ``cvpo.make_train`` /
``train.cvpo`` (block b uses ``fold_in(k_run, b)``), so the run is the library's own.

**FSRL side** (``.peer_venv``, a subprocess running this file with ``--peer-worker``): FSRL
0.1.0 needs ``numpy<2`` while jax 0.10 needs ``numpy>=2``, so the FSRL process cannot import
JAX and cannot run the JAX gymnasium adapter (``meg_jax.env.gym_adapter.MEGGymEnv``). It runs
instead a ``gymnasium.Env`` with the same interface (``Box([-1, 1]^2)`` actions, reward =
quality, ``info["cost"]``, ``info["costs"]``, truncation after T requests) over
``meg_jax/env/numpy_reference.py`` (the NumPy twin of the JAX dynamics that
``tests/test_env.py`` checks for parity; loaded by file path, it imports only NumPy/SciPy),
with the ``EnvParams`` of the parent's JAX environment (exported to ``.npz``). Agent and trainer
are FSRL's own (``fsrl.agent.CVPOAgent`` builds the networks and policy with its defaults;
``fsrl.trainer.OffpolicyTrainer`` and ``FastCollector`` train it as ``CVPOAgent.learn`` does, one
collection of ``episode_per_collect`` episodes per epoch so the budget is checked often), on
``training_num`` environments in a ``DummyVectorEnv`` (in-process: no worker processes on 2
cores). Choices where FSRL differs from the task (``--peer-set key=value`` to change them):

* FSRL's CVPO takes one constraint (one cost critic, one ``cost_limit``). The environment has
  two (latency, UE energy). The script gives FSRL the cost of every limit that binds at the
  optimum (the oracle's multiplier, fitted on the evaluation episodes before training, is
  positive), divided by its limit, as ``info["cost"]``, and ``cost_limit = T x (number of
  binding limits)``. A limit with a zero multiplier can be dropped without changing the optimal
  policy, so with one binding limit this is the task's constraint problem; with two it is
  their sum, a relaxation the table names. Feasibility is always judged on both limits. Dividing by the limit is what meg-jax's agent does
  internally; raw costs (about 1e-4 s) would leave FSRL's Adam-stepped lambda (lr 0.02) far
  too small for tens of thousands of updates.
* ``gamma`` = meg-jax's ``cvpo.gamma`` (0.5; the task is nearly myopic), not FSRL's default
  0.97 for locomotion; everything else is FSRL's ``TrainCfg`` default (128x128 networks,
  B = 256, M = 16 sampled actions, ``update_per_step`` 0.2, ``n_step`` 2, ...).

**Evaluating FSRL's policy in our harness.** The worker exports the actor's weights at each
checkpoint (with training time, env steps and gradient updates, as JSON lines). The parent
evaluates them in ``meg_jax.rl.evaluate.evaluate_policy`` on the JAX environment with the same
key, hence the same fresh episodes, as the baselines and meg-jax's agent. The actor is
tianshou's ``ActorProb`` (ReLU MLP trunk, ``max_action * tanh`` mean head, log-std head clamped
to [-20, 2]); the parent re-implements its forward pass, and checks it against the torch
outputs on probe observations exported with every checkpoint (a mismatch stops the run).
Evaluating in the NumPy env instead would draw other episodes than the baselines'. Actions are
sampled from the policy and clipped, as in ``docs/results.md``; ``--deterministic`` uses the
mean action for both agents (FSRL's own evaluation default).

Output: the table on stdout, ``bench_peers.md`` (header with load averages + table) and
``bench_peers.jsonl`` (one line per evaluated checkpoint, then a summary line) in ``--out``.
"""

from __future__ import annotations

# This file is also the FSRL worker, run by the peer venv's python: module-level imports are
# the standard library and NumPy only; everything else is imported where it is used.
import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np

DEFAULT_PEER_VENV = ".peer_venv"  # relative to the working directory (the repository root)

GAP_TARGET = 0.9  # fraction of the fixed -> oracle gap for (b)
SPEEDUP_TARGET = 10.0  # the issue's target: meg-jax >= 10x faster to (b)

# What --setup-peer installs, in two pip calls. The one-line `pip install fast-safe-rl 'numpy<2'
# 'setuptools<70' torch==2.13.0 gymnasium` cannot resolve: torch 2.13 declares setuptools>=77,
# while FSRL imports only with setuptools<70 (wandb 0.14's pkg_resources use); and FSRL's
# requirements include bullet-safety-gym (a PyBullet source build, only for FSRL's own tasks).
# So FSRL is installed without dependencies, after the dependencies its CVPO path imports.
PEER_REQUIREMENTS = (
    "numpy<2",
    "torch==2.13.0",
    "gymnasium",
    "tianshou==0.5.1",
    "wandb~=0.14.0",
    "protobuf~=3.19.0",
    "tensorboard",
    "pyyaml",
    "h5py>=2.10",
    "numba>=0.51",
    "prettytable~=3.7.0",
    "tqdm",
    "scipy",
)
PEER_NO_DEPS = ("fast-safe-rl==0.1.0", "setuptools<70")

# FSRL's CVPO settings (fsrl.config.cvpo_cfg.TrainCfg defaults) except gamma (set to meg-jax's
# at run time) and thread (--threads). Agent keys go to CVPOAgent(...), the others to the trainer.
FSRL_AGENT_KEYS = (
    "estep_iter_num", "estep_kl", "estep_dual_max", "estep_dual_lr", "sample_act_num", "mstep_iter_num",
    "mstep_kl_mu", "mstep_kl_std", "mstep_dual_max", "mstep_dual_lr", "actor_lr", "critic_lr", "gamma", "n_step",
    "tau", "hidden_sizes", "double_critic", "conditioned_sigma", "unbounded", "last_layer_scale",
    "deterministic_eval", "action_scaling", "action_bound_method",
)
FSRL_DEFAULTS: dict[str, Any] = {
    "estep_iter_num": 1, "estep_kl": 0.02, "estep_dual_max": 20.0, "estep_dual_lr": 0.02, "sample_act_num": 16,
    "mstep_iter_num": 1, "mstep_kl_mu": 0.005, "mstep_kl_std": 0.0005, "mstep_dual_max": 0.5, "mstep_dual_lr": 0.1,
    "actor_lr": 5e-4, "critic_lr": 1e-3, "gamma": None, "n_step": 2, "tau": 0.05, "hidden_sizes": [128, 128],
    "double_critic": False, "conditioned_sigma": True, "unbounded": False, "last_layer_scale": False,
    "deterministic_eval": True, "action_scaling": True, "action_bound_method": "clip",
    # trainer / collection
    "episode_per_collect": 10, "update_per_step": 0.2, "buffer_size": 200_000, "training_num": 20,
    "batch_size": 256,
}
PROBE_OBS = 8  # probe observations whose torch actor outputs travel with each FSRL checkpoint


# ============================================================================ pure helpers
def check_args(args: argparse.Namespace) -> None:
    """Refuses settings that cannot give a meaningful table (names the flag to change).

    Raises:
      ValueError: with every problem found.
    """
    problems = []
    if args.budget_s <= 0:
        problems.append(f"--budget-s must be > 0 seconds, got {args.budget_s}")
    if args.eval_every <= 0:
        problems.append(f"--eval-every must be > 0 seconds, got {args.eval_every}")
    elif args.budget_s > 0 and args.eval_every > args.budget_s:
        problems.append(f"--eval-every {args.eval_every} s exceeds --budget-s {args.budget_s} s: only the final "
                        "checkpoint would be evaluated; lower --eval-every")
    if args.episodes < 2:
        problems.append(f"--episodes must be >= 2 (a standard error needs two), got {args.episodes}")
    if args.chunk_blocks < 1:
        problems.append(f"--chunk-blocks must be >= 1, got {args.chunk_blocks}")
    if args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    unknown = sorted(set(args.agents) - {"megjax", "fsrl"})
    if unknown or not args.agents:
        problems.append(f"--agents takes megjax and/or fsrl, got {args.agents}")
    for item in args.peer_set:
        key = item.split("=", 1)[0]
        if "=" not in item:
            problems.append(f"--peer-set {item!r}: expected key=value")
        elif key not in FSRL_DEFAULTS:
            problems.append(f"--peer-set {key}: unknown FSRL setting; choose from {sorted(FSRL_DEFAULTS)}")
    if problems:
        raise ValueError("invalid benchmark arguments:\n  - " + "\n  - ".join(problems))


def parse_peer_settings(items: Sequence[str], gamma: float) -> dict[str, Any]:
    """FSRL settings: the defaults, gamma, then ``key=value`` items (values as JSON, else strings)."""
    settings = dict(FSRL_DEFAULTS, gamma=gamma)
    for item in items:
        key, raw = item.split("=", 1)
        if key not in FSRL_DEFAULTS:
            raise ValueError(f"unknown FSRL setting {key!r}; choose from {sorted(FSRL_DEFAULTS)}")
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    return settings


def binding_constraints(oracle_lambdas: Sequence[float]) -> list[int]:
    """Indices of the limits that bind at the optimum: the oracle's multiplier is positive.

    A limit whose multiplier is zero at the (LP) optimum can be dropped without changing the
    optimal policy's value, so FSRL's single constraint loses nothing by leaving it out. If
    none binds, every index is returned so FSRL still sees the costs.
    """
    idx = [i for i, lam in enumerate(oracle_lambdas) if lam > 0]
    return idx or list(range(len(oracle_lambdas)))


def peer_cost_weights(limits: Sequence[float], binding: Sequence[int]) -> np.ndarray:
    """``info["cost"] = costs . weights`` for FSRL: 1/limit on the binding costs, 0 elsewhere."""
    w = np.zeros(len(limits), np.float64)
    for i in binding:
        w[i] = 1.0 / float(limits[i])
    return w


def time_to_thresholds(records: Sequence[dict], gap_target: float = GAP_TARGET) -> tuple[Optional[float], Optional[float]]:
    """(first time feasible, first time feasible with ``gap_closed >= gap_target``), None if never.

    Args:
      records: evaluated checkpoints with ``wall_s``, ``feasible`` and ``gap_closed`` (any order).
    """
    t_feasible = t_gap = None
    for r in sorted(records, key=lambda r: r["wall_s"]):
        if not r["feasible"]:
            continue
        if t_feasible is None:
            t_feasible = float(r["wall_s"])
        gap = r["gap_closed"]
        if t_gap is None and gap is not None and not math.isnan(gap) and gap >= gap_target:
            t_gap = float(r["wall_s"])
    return t_feasible, t_gap


def format_time(t: Optional[float], budget_s: float) -> str:
    """``"12.3 s"`` or ``"not reached in 600 s"``."""
    if t is None:
        return f"not reached in {budget_s:.0f} s"
    return f"{t:.1f} s"


def speedup(t_ours: Optional[float], t_peer: Optional[float], peer_budget_s: float) -> tuple[Optional[float], str]:
    """Peer time / our time to a threshold, and how to read it.

    Returns:
      (ratio, kind): kind "exact" (both reached), "at least" (only we reached it: the peer's
      budget bounds its time from below), "peer only" or "neither" (ratio None).
    """
    if t_ours is None:
        return None, "peer only" if t_peer is not None else "neither"
    ours = max(t_ours, 1e-9)
    if t_peer is None:
        return peer_budget_s / ours, "at least"
    return t_peer / ours, "exact"


def format_speedup(ratio: Optional[float], kind: str) -> str:
    if ratio is None:
        return {"peer only": "only FSRL reached it", "neither": "neither reached it"}[kind]
    return f"{ratio:.1f}x" if kind == "exact" else f">= {ratio:.1f}x (FSRL did not reach it)"


def target_verdict(ratio: Optional[float], kind: str, target: float = SPEEDUP_TARGET) -> str:
    """'met', 'NOT met' or 'undecided' for the >= target speed-up to (b)."""
    if ratio is None:
        return "NOT met" if kind == "peer only" else "undecided (neither reached it)"
    if ratio >= target:
        return "met" if kind == "exact" else "met (lower bound)"
    return "NOT met" if kind == "exact" else "undecided (lower bound below target; raise --budget-s)"


def _cell(x: Optional[float], fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def render_table(summaries: Sequence[dict], budget_s: float) -> str:
    """The markdown table of the agents' summaries (keys as made by ``summarize``)."""
    lines = [
        "| agent | time to feasible | time to 90% gap | final gap closed | final feasible | final cost / limit "
        "| env steps/s | updates/s | env steps | updates | compile s | load (1-min) before / after |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in summaries:
        final = s.get("final") or {}
        ratio = final.get("costs_over_limit")
        lines.append(
            f"| {s['agent']} | {format_time(s['t_feasible'], budget_s)} | {format_time(s['t_gap'], budget_s)} | "
            f"{_cell(final.get('gap_closed'), '.1%')} | {'-' if not final else ('yes' if final['feasible'] else 'no')} | "
            f"{'-' if ratio is None else ' / '.join(f'{x:.3f}' for x in ratio)} | "
            f"{_cell(s['env_steps_per_s'], ',.0f')} | {_cell(s['updates_per_s'], ',.1f')} | "
            f"{s['env_steps']:,} | {s['updates']:,} | {_cell(s.get('compile_s'), '.1f')} | "
            f"{s['load_before']:.1f} / {s['load_after']:.1f} |"
        )
    return "\n".join(lines)


def summarize(agent: str, records: Sequence[dict], train_s: float, load_before: float, load_after: float,
              compile_s: Optional[float] = None) -> dict[str, Any]:
    """One table row from an agent's evaluated checkpoints (``records``, each with ``wall_s``,
    ``env_steps``, ``updates``, ``feasible``, ``gap_closed``, ``costs_over_limit``)."""
    ordered = sorted(records, key=lambda r: r["wall_s"])
    t_feasible, t_gap = time_to_thresholds(ordered)
    last = ordered[-1] if ordered else None
    env_steps = int(last["env_steps"]) if last else 0
    updates = int(last["updates"]) if last else 0
    return {
        "agent": agent, "t_feasible": t_feasible, "t_gap": t_gap, "train_s": train_s,
        "env_steps": env_steps, "updates": updates,
        "env_steps_per_s": env_steps / train_s if train_s > 0 else None,
        "updates_per_s": updates / train_s if train_s > 0 else None,
        "compile_s": compile_s, "load_before": load_before, "load_after": load_after,
        "final": None if last is None else {k: last[k] for k in ("wall_s", "quality", "feasible", "gap_closed",
                                                                 "costs_over_limit")},
    }


def fsrl_actor_forward(weights: dict[str, Any], obs: Any, xp: Any = np) -> tuple[Any, Any]:
    """Mean and standard deviation [B, 2] of tianshou's ``ActorProb`` from exported weights.

    ``weights``: ``trunk_w{i}`` [in, out] / ``trunk_b{i}`` (ReLU after each), ``mu_w``/``mu_b``,
    ``sigma_w``/``sigma_b`` (state-conditioned log-std) or ``sigma_param`` [2] (a free log-std),
    ``max_action`` and ``unbounded``. ``xp`` is ``numpy`` or ``jax.numpy``.
    """
    h = obs
    i = 0
    while f"trunk_w{i}" in weights:
        h = xp.maximum(h @ weights[f"trunk_w{i}"] + weights[f"trunk_b{i}"], 0.0)
        i += 1
    mu = h @ weights["mu_w"] + weights["mu_b"]
    if not bool(np.asarray(weights["unbounded"])):
        mu = float(np.asarray(weights["max_action"])) * xp.tanh(mu)
    if "sigma_w" in weights:
        log_std = xp.clip(h @ weights["sigma_w"] + weights["sigma_b"], -20.0, 2.0)  # tianshou SIGMA_MIN/MAX
    else:
        log_std = xp.zeros_like(mu) + weights["sigma_param"]
    return mu, xp.exp(log_std)


# ============================================================================ FSRL worker (peer venv)
def numpy_reference_path() -> str:
    """``meg_jax/env/numpy_reference.py`` wherever meg_jax is (source tree or installed), found
    without importing meg_jax (whose __init__ imports JAX)."""
    return os.path.join(importlib.util.find_spec("meg_jax").submodule_search_locations[0], "env", "numpy_reference.py")


def _load_numpy_reference(path: Optional[str] = None) -> Any:
    """``meg_jax/env/numpy_reference.py`` loaded by path (the peer venv has no JAX, nor meg_jax:
    the worker gets the path from its spec)."""
    spec = importlib.util.spec_from_file_location("meg_numpy_reference", path or numpy_reference_path())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_env_params(npz_path: str, static: dict[str, Any]) -> dict[str, Any]:
    with np.load(npz_path) as f:
        p = {k: f[k] for k in f.files}
    p.update(static)
    return p


def make_reference_env_class(ref: Any) -> type:
    """A ``gymnasium.Env`` class over the NumPy reference dynamics (one UE, float32)."""
    import gymnasium
    from gymnasium import spaces

    class MEGReferenceEnv(gymnasium.Env):
        """The MEG CMDP for libraries that cannot import JAX: same spaces and info keys as
        ``MEGGymEnv``; ``info["cost"] = costs . cost_weights``."""

        metadata = {"render_modes": []}

        def __init__(self, params: dict[str, Any], cost_weights: Sequence[float]):
            self.p = params
            self.cost_weights = np.asarray(cost_weights, np.float64)
            self.episode_length = int(params["episode_length"])
            self._state: Optional[dict] = None
            obs_dim = int(self._fresh(np.random.default_rng(0)).shape[-1])
            self.observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
            self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

        def _fresh(self, rng: np.random.Generator) -> np.ndarray:
            noise = ref.sample_reset_noise(rng, 1, self.p["history_length"], np.float32)
            self._state = ref.reset(self.p, noise)
            return ref.observe(self.p, self._state)[0].astype(np.float32)

        def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
            super().reset(seed=seed)
            return self._fresh(self.np_random), {}

        def step(self, action: Any):
            if self._state is None:
                raise RuntimeError("call reset() before step()")
            k_idx, r = ref.continuous_to_choice(self.p, np.asarray(action, np.float32).reshape(1, 2))
            noise = ref.sample_step_noise(self.np_random, 1, np.float32)
            self._state, out = ref.step(self.p, self._state, k_idx, r, noise)
            costs = np.array([out["latency_s"][0], out["energy_j"][0]], np.float64)
            obs = ref.observe(self.p, self._state)[0].astype(np.float32)
            truncated = bool(self._state["t"][0] >= self.episode_length)
            info = {"cost": float(costs @ self.cost_weights), "costs": costs}
            return obs, float(out["quality"][0]), False, truncated, info

    return MEGReferenceEnv


def _export_actor(actor: Any, probe: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Weights of tianshou's ActorProb in ``fsrl_actor_forward``'s layout, and its torch outputs
    (mean, std) on ``probe``. Refuses architectures the JAX forward does not reproduce."""
    import torch
    from torch import nn

    trunk = [m for m in actor.preprocess.modules() if isinstance(m, nn.Linear)]
    others = [m for m in actor.preprocess.modules()
              if not list(m.children()) and not isinstance(m, (nn.Linear, nn.ReLU, nn.Identity))]
    if others:
        raise RuntimeError(f"FSRL actor trunk has layers the JAX forward does not implement: {others}")
    out: dict[str, np.ndarray] = {}
    for i, m in enumerate(trunk):
        out[f"trunk_w{i}"] = m.weight.detach().numpy().T.copy()
        out[f"trunk_b{i}"] = m.bias.detach().numpy().copy()

    def single_linear(module: Any, name: str) -> None:
        layers = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if len(layers) != 1:
            raise RuntimeError(f"FSRL actor {name} head has {len(layers)} linear layers; the JAX forward expects 1")
        out[f"{name}_w"] = layers[0].weight.detach().numpy().T.copy()
        out[f"{name}_b"] = layers[0].bias.detach().numpy().copy()

    single_linear(actor.mu, "mu")
    if getattr(actor, "_c_sigma", False):
        single_linear(actor.sigma, "sigma")
    else:
        out["sigma_param"] = actor.sigma_param.detach().numpy().reshape(-1).copy()
    out["max_action"] = np.asarray(float(actor.max_action))
    out["unbounded"] = np.asarray(bool(actor._unbounded))
    with torch.no_grad():
        (mu, std), _ = actor(probe)
    return out, mu.numpy().astype(np.float64), std.numpy().astype(np.float64)


def peer_worker(spec_path: str) -> int:
    """Trains FSRL's CVPO for the budget; writes checkpoints (npz) and ``checkpoints.jsonl``."""
    with open(spec_path) as f:
        spec = json.load(f)
    t_import = time.perf_counter()
    import gymnasium
    import torch
    from fsrl.agent import CVPOAgent
    from fsrl.data import FastCollector
    from fsrl.trainer import OffpolicyTrainer
    from fsrl.utils import DummyLogger
    from tianshou.data import VectorReplayBuffer
    from tianshou.env import DummyVectorEnv

    import fsrl
    import tianshou

    ref = _load_numpy_reference(spec["numpy_reference"])
    params = _load_env_params(spec["params_npz"], spec["params_static"])
    env_class = make_reference_env_class(ref)
    env_id = "meg_jax_bench/MEGReference-tiny-v0"
    if env_id not in gymnasium.registry:
        gymnasium.register(id=env_id, entry_point=env_class, max_episode_steps=int(params["episode_length"]))

    def make_env():
        return gymnasium.make(env_id, params=params, cost_weights=spec["cost_weights"])

    settings = spec["fsrl"]
    out_dir = spec["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "checkpoints.jsonl"), "w")
    log.write(json.dumps({"versions": {"fsrl": fsrl.__version__, "tianshou": tianshou.__version__,
                                       "torch": torch.__version__, "numpy": np.__version__,
                                       "gymnasium": gymnasium.__version__},
                          "import_s": time.perf_counter() - t_import, "settings": settings}) + "\n")
    log.flush()
    probe = np.asarray(spec["probe_obs"], np.float32)
    budget_s, every_s = float(spec["budget_s"]), float(spec["eval_every_s"])
    episode_length = int(params["episode_length"])

    # --- the clock starts: networks, policy, collectors, trainer
    t0 = time.perf_counter()
    paused = 0.0
    env = make_env()
    agent = CVPOAgent(env, logger=DummyLogger(), cost_limit=float(spec["cost_limit"]), device="cpu",
                      thread=int(spec["threads"]), seed=int(spec["seed"]),
                      **{k: (tuple(v) if k == "hidden_sizes" else v) for k, v in settings.items() if k in FSRL_AGENT_KEYS})
    policy = agent.policy
    train_envs = DummyVectorEnv([make_env for _ in range(int(settings["training_num"]))])
    train_envs.seed(int(spec["seed"]))
    buffer = VectorReplayBuffer(int(settings["buffer_size"]), len(train_envs))
    collector = FastCollector(policy, train_envs, buffer, exploration_noise=True)
    steps_per_collect = int(settings["episode_per_collect"]) * episode_length
    trainer = OffpolicyTrainer(
        policy=policy, train_collector=collector, test_collector=None, max_epoch=10**9,
        batch_size=int(settings["batch_size"]), cost_limit=float(spec["cost_limit"]),
        step_per_epoch=steps_per_collect, update_per_step=float(settings["update_per_step"]),
        episode_per_test=1, episode_per_collect=int(settings["episode_per_collect"]), stop_fn=None,
        logger=DummyLogger(), save_model_interval=10**9, verbose=False, show_progress=False,
    )
    last_ckpt, index = 0.0, 0
    for _ in trainer:
        now = time.perf_counter() - t0 - paused
        done = now >= budget_s
        if done or now - last_ckpt >= every_s:
            p0 = time.perf_counter()
            weights, mu, std = _export_actor(policy.actor, probe)
            path = os.path.join(out_dir, f"actor_{index:04d}.npz")
            np.savez(path, **weights)
            log.write(json.dumps({"wall_s": now, "env_steps": int(trainer.env_step),
                                  "updates": int(trainer.gradient_steps), "weights": path,
                                  "probe_mean": mu.tolist(), "probe_std": std.tolist()}) + "\n")
            log.flush()
            index += 1
            last_ckpt = now
            paused += time.perf_counter() - p0
        if done:
            break
    log.write(json.dumps({"train_s": time.perf_counter() - t0 - paused}) + "\n")
    log.close()
    return 0


# ============================================================================ parent (project venv)
def _run(cmd: Sequence[str], **kwargs: Any) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(list(cmd), check=True, **kwargs)


def peer_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def setup_peer(venv: str) -> int:
    """Builds the peer virtualenv with FSRL (see ``PEER_REQUIREMENTS``) and checks the import."""
    python = getattr(sys, "_base_executable", None) or sys.executable
    if not os.path.exists(peer_python(venv)):
        _run([python, "-m", "venv", venv])
    pip = [peer_python(venv), "-m", "pip", "install"]
    _run(pip + list(PEER_REQUIREMENTS))
    _run(pip + ["--no-deps"] + list(PEER_NO_DEPS))
    _run([peer_python(venv), "-c",
          "import numpy, torch, gymnasium, tianshou, fsrl; from fsrl.agent import CVPOAgent; "
          "print('peer venv ok: fsrl', fsrl.__version__, 'tianshou', tianshou.__version__, 'torch', torch.__version__, "
          "'numpy', numpy.__version__, 'gymnasium', gymnasium.__version__)"])
    return 0


def _set_threads(threads: int) -> None:
    """Single-threaded by default: must run before JAX is imported."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        for flag in ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"):
            if flag.split("=")[0] not in flags:
                flags = f"{flags} {flag}".strip()
        os.environ["XLA_FLAGS"] = flags


def build_config(flags: Sequence[str], seed: int = 0) -> Any:
    """meg-jax's ``RunConfig`` from ``train.cvpo``-style flags (``--cvpo.updates_per_block 8``).

    Raises:
      SystemExit: an unknown field or a malformed value (2, naming it).
      ValueError: a setting FSRL's side cannot match.
    """
    import dataclasses

    from meg_jax import config as config_lib
    from meg_jax.rl.config import RunConfig

    config = config_lib.parse_cli(RunConfig, list(flags), prog="python -m eval.bench_peers (meg-jax RunConfig)")
    config = dataclasses.replace(config, seed=seed)
    if config.cvpo.discrete:
        raise ValueError("--cvpo.discrete: FSRL's side is the continuous Box action; keep it off")
    return config


def run_megjax(config: Any, env: Any, budget_s: float, every_s: float, chunk_blocks: int) -> dict[str, Any]:
    """Trains meg-jax's CVPO for ``budget_s`` seconds; returns checkpoints (host actor params)."""
    import jax

    from meg_jax.rl import cvpo

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    paused = 0.0
    agent = cvpo.make_cvpo(config.cvpo, env)
    k_init, k_run = jax.random.split(jax.random.PRNGKey(config.seed))  # as cvpo.make_train

    def run_chunk(state):
        def body(s, _):
            return agent.train_step(s, jax.random.fold_in(k_run, s.block))

        state, _ = jax.lax.scan(body, state, None, length=chunk_blocks)
        return state

    state = jax.jit(agent.init)(k_init)
    c0 = time.perf_counter()
    step = jax.jit(run_chunk, donate_argnums=0).lower(state).compile()
    compile_s = time.perf_counter() - c0
    checkpoints, last_ckpt = [], 0.0
    while True:
        state = step(state)
        jax.block_until_ready(state.updates)
        now = time.perf_counter() - t0 - paused
        done = now >= budget_s
        if done or now - last_ckpt >= every_s:
            p0 = time.perf_counter()
            checkpoints.append({"wall_s": now, "env_steps": int(state.env_steps), "updates": int(state.updates),
                                "params": jax.device_get(state.actor)})
            last_ckpt = now
            paused += time.perf_counter() - p0
        if done:
            break
    return {"agent": agent, "checkpoints": checkpoints, "train_s": time.perf_counter() - t0 - paused,
            "compile_s": compile_s, "load_before": load_before, "load_after": os.getloadavg()[0]}


def run_fsrl(args: argparse.Namespace, config: Any, env: Any, work: str, oracle_lam: Sequence[float]) -> dict[str, Any]:
    """Runs the FSRL worker in the peer venv; returns its checkpoint records."""
    import jax

    from meg_jax.env import numpy_reference

    python = peer_python(args.peer_venv)
    if not os.path.exists(python):
        raise FileNotFoundError(f"no peer venv at {args.peer_venv}; run `python -m eval.bench_peers --setup-peer` "
                                "first (or pass --peer-venv)")
    params = numpy_reference.params_to_numpy(env.params, np.float32)
    static = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()
              if not isinstance(v, np.ndarray)}
    arrays = {k: v for k, v in params.items() if isinstance(v, np.ndarray)}
    npz = os.path.join(work, "env_params.npz")
    np.savez(npz, **arrays)
    limits = np.asarray(env.params.limits, np.float64)
    binding = binding_constraints(oracle_lam)
    # probe observations: the JAX env's first observations of a few fresh episodes
    probe = np.asarray(jax.jit(env.reset)(jax.random.PRNGKey(12345)).obs[:PROBE_OBS], np.float32)
    spec = {
        "params_npz": npz, "params_static": static, "cost_weights": peer_cost_weights(limits, binding).tolist(),
        "cost_limit": float(int(env.episode_length) * len(binding)), "binding": binding,
        "fsrl": parse_peer_settings(args.peer_set, config.cvpo.gamma), "budget_s": args.budget_s,
        "eval_every_s": args.eval_every, "seed": config.seed, "threads": args.threads,
        "out_dir": os.path.join(work, "fsrl"), "probe_obs": probe.tolist(), "numpy_reference": numpy_reference_path(),
    }
    spec_path = os.path.join(work, "fsrl_spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    envvars = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   WANDB_MODE="disabled", PYTHONNOUSERSITE="1")
    envvars.pop("PYTHONPATH", None)
    load_before = os.getloadavg()[0]
    cmd = [python, os.path.abspath(__file__), "--peer-worker", spec_path]
    print(f"FSRL worker: {' '.join(cmd)}", flush=True)
    # the worker checks its own budget after each collect + update round; the slack covers imports
    proc = subprocess.run(cmd, env=envvars, timeout=args.budget_s + 600)
    if proc.returncode != 0:
        raise RuntimeError(f"the FSRL worker failed with exit code {proc.returncode} (its output is above)")
    lines = [json.loads(x) for x in open(os.path.join(spec["out_dir"], "checkpoints.jsonl"))]
    header, checkpoints = lines[0], [x for x in lines if "wall_s" in x]
    train_s = next(x["train_s"] for x in lines if "train_s" in x)
    return {"checkpoints": checkpoints, "train_s": train_s, "versions": header["versions"],
            "import_s": header["import_s"], "settings": header["settings"], "binding": binding,
            "cost_limit": spec["cost_limit"], "probe": probe, "load_before": load_before,
            "load_after": os.getloadavg()[0]}


@dataclasses.dataclass(frozen=True)
class FSRLPolicy:
    """An exported FSRL actor as a parametrised harness policy: ``policy(weights, state, key)``.

    ``weights`` (from :func:`fsrl_policy_params`) are traced arguments, so every checkpoint
    of one run is scored by one compiled rollout; ``unbounded`` and ``max_action`` change the
    program and are fields here.
    """

    deterministic: bool
    unbounded: bool
    max_action: float

    def __call__(self, weights: dict[str, Any], state: Any, key: Any) -> Any:
        import jax
        import jax.numpy as jnp

        w = dict(weights, unbounded=np.bool_(self.unbounded), max_action=np.float32(self.max_action))
        mu, std = fsrl_actor_forward(w, state.obs, jnp)
        a = mu if self.deterministic else mu + std * jax.random.normal(key, mu.shape)
        return jnp.clip(a, -1.0, 1.0)  # FSRL's action_bound_method="clip"; the env clips too


def fsrl_policy_params(weights: dict[str, np.ndarray], deterministic: bool) -> tuple[FSRLPolicy, dict[str, Any]]:
    """The harness policy of an exported FSRL actor and its traced weights (float32 arrays)."""
    policy = FSRLPolicy(deterministic, bool(np.asarray(weights["unbounded"])), float(np.asarray(weights["max_action"])))
    arrays = {k: np.asarray(v, np.float32) for k, v in weights.items() if k not in ("unbounded", "max_action")}
    return policy, arrays


def check_fsrl_export(weights: dict[str, np.ndarray], record: dict, probe: np.ndarray) -> None:
    """Our forward of the exported actor must match torch's on the probe observations."""
    mu, std = fsrl_actor_forward(weights, probe.astype(np.float64), np)
    err = max(np.max(np.abs(mu - np.asarray(record["probe_mean"]))),
              np.max(np.abs(np.log(std) - np.log(np.asarray(record["probe_std"])))))
    if not err < 1e-4:
        raise RuntimeError(f"the JAX re-implementation of FSRL's actor differs from torch by {err:.3g} on the "
                           f"probe observations ({record['weights']}); its evaluation would not be FSRL's policy")


def reference_policies(config: Any, episodes: int, deterministic: bool) -> tuple[Any, dict]:
    """The evaluation config and ``baselines.evaluate_all``'s fixed / oracle / max-quality scores."""
    from meg_jax.rl import baselines

    cfg = dataclasses.replace(config, algo="fixed", eval=dataclasses.replace(
        config.eval, num_episodes=episodes, deterministic=deterministic))
    return cfg, baselines.evaluate_all(cfg, None, None)


def evaluate_checkpoints(cfg: Any, ref: dict, runs: dict[str, dict]) -> dict[str, list[dict]]:
    """Every checkpoint of every agent on the baselines' fresh episodes (``reference_policies``)."""
    import jax

    from meg_jax.rl.evaluate import LearnedPolicy, evaluate_policy, gap_closed, make_env

    episodes, deterministic = cfg.eval.num_episodes, cfg.eval.deterministic
    fixed_q, oracle_q = ref["fixed"]["quality"], ref["oracle"]["quality"]
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 10**6)  # evaluate_all's key: the same episodes
    penv = make_env(cfg.env, num_envs=episodes, discrete=False)
    tol = cfg.eval.feasibility_tolerance
    evaluated: dict[str, list[dict]] = {}
    for name, run in runs.items():
        rows = []
        for ck in run["checkpoints"]:
            # one policy object per agent, weights as arguments: one compiled rollout per agent
            if name == "megjax":
                policy, params = LearnedPolicy(run["agent"].act, deterministic), ck["params"]
            else:
                with np.load(ck["weights"]) as f:
                    weights = {k: f[k] for k in f.files}
                check_fsrl_export(weights, ck, run["probe"])
                policy, params = fsrl_policy_params(weights, deterministic)
            res = evaluate_policy(penv, policy, key, policy_params=params, tolerance=tol).as_dict()
            res.update(agent=name, wall_s=ck["wall_s"], env_steps=ck["env_steps"], updates=ck["updates"],
                       gap_closed=gap_closed(res["quality"], fixed_q, oracle_q))
            rows.append(res)
            print(f"  {name:6s} t={ck['wall_s']:7.1f}s steps={ck['env_steps']:>9,} updates={ck['updates']:>7,} "
                  f"Q={res['quality']:.4f} cost/limit={['%.3f' % x for x in res['costs_over_limit']]} "
                  f"feasible={res['feasible']} gap={res['gap_closed']:.1%}", flush=True)
        evaluated[name] = rows
    return evaluated


def _versions() -> dict[str, str]:
    import jax

    return {"jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--peer-worker"]:
        if len(argv) != 2:
            print("usage: bench_peers.py --peer-worker SPEC.json", file=sys.stderr)
            return 2
        return peer_worker(argv[1])
    parser = argparse.ArgumentParser(prog="python -m eval.bench_peers", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--setup-peer", action="store_true", help="build the FSRL virtualenv and exit")
    parser.add_argument("--peer-venv", default=DEFAULT_PEER_VENV, help="FSRL virtualenv (default .peer_venv/)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="training wall clock per agent, seconds")
    parser.add_argument("--eval-every", type=float, default=30.0, help="checkpoint interval, training seconds")
    parser.add_argument("--episodes", type=int, default=1024, help="fresh evaluation episodes per checkpoint")
    parser.add_argument("--out", default=os.path.join("runs", "bench_peers"), help="directory for .md and .jsonl")
    parser.add_argument("--agents", nargs="+", default=["megjax", "fsrl"], help="which agents, in run order")
    parser.add_argument("--chunk-blocks", type=int, default=50, help="meg-jax train blocks per jitted call")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per agent (XLA, torch)")
    parser.add_argument("--deterministic", action="store_true", help="evaluate mean actions instead of samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of both agents and of the evaluation episodes")
    parser.add_argument("--peer-set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"FSRL setting (repeatable); keys: {', '.join(sorted(FSRL_DEFAULTS))}")
    parser.epilog = ("Every other flag is a field of meg-jax's RunConfig, as in train.cvpo "
                     "(--cvpo.updates_per_block 8; `python -m train.cvpo --help` lists them with their defaults).")
    args, run_flags = parser.parse_known_args(argv)
    args.peer_venv = os.path.abspath(args.peer_venv)
    if args.setup_peer:
        return setup_peer(args.peer_venv)
    try:
        check_args(args)
        _set_threads(args.threads)
        config = build_config(run_flags, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from meg_jax.rl.evaluate import make_env

    os.makedirs(args.out, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()
    env = make_env(config.env)  # before either clock: derives the limits, loads the artifact
    print(f"fitting the reference policies on {args.episodes} fresh episodes ...", flush=True)
    cfg, ref = reference_policies(config, args.episodes, args.deterministic)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as work:
        for name in args.agents:
            print(f"training {name} for {args.budget_s:.0f} s (load {os.getloadavg()[0]:.1f}) ...", flush=True)
            if name == "megjax":
                runs[name] = run_megjax(config, env, args.budget_s, args.eval_every, args.chunk_blocks)
            else:
                runs[name] = run_fsrl(args, config, env, work, ref["oracle"]["lam"])
        print(f"evaluating checkpoints on {args.episodes} fresh episodes ...", flush=True)
        evaluated = evaluate_checkpoints(cfg, ref, runs)
        if "fsrl" in runs:  # keep the FSRL weights beside the results
            shutil.copytree(os.path.join(work, "fsrl"), os.path.join(args.out, "fsrl_checkpoints"), dirs_exist_ok=True)
    load_end = os.getloadavg()

    labels = {"megjax": "meg-jax MEG-CVPO (JAX)", "fsrl": "FSRL CVPO (PyTorch)"}
    summaries = [summarize(labels[n], evaluated[n], runs[n]["train_s"], runs[n]["load_before"], runs[n]["load_after"],
                           runs[n].get("compile_s")) for n in args.agents]
    by_name = dict(zip(args.agents, summaries))
    lines = [
        f"# Peer benchmark: meg-jax CVPO vs FSRL CVPO ({started})",
        "",
        f"Command: `python -m eval.bench_peers {' '.join(argv)}`".rstrip(),
        f"Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, {args.threads} thread(s) per "
        f"agent; load average (1/5/15 min) at start {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f}, "
        f"at end {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f}.",
        f"Versions: {json.dumps(_versions())}" + (f"; peer: {json.dumps(runs['fsrl']['versions'])}" if "fsrl" in runs else ""),
        f"Environment: `tiny`, {int(env.episode_length)} requests per episode, limits {', '.join(f'{x:.4g}' for x in np.asarray(env.params.limits))} "
        f"(latency s, UE energy J); evaluation: {args.episodes} fresh episodes, "
        f"{'mean' if args.deterministic else 'sampled'} actions; fixed Q {ref['fixed']['quality']:.4f}, "
        f"oracle Q {ref['oracle']['quality']:.4f}; budget {args.budget_s:.0f} s per agent, checkpoints every "
        f"{args.eval_every:.0f} s.",
    ]
    if "fsrl" in runs:
        names = ["latency", "energy"]
        binding = runs["fsrl"]["binding"]
        lines.append(
            f"FSRL sees one cost: {' + '.join(names[i] + '/limit' for i in binding)} per request, cost_limit "
            f"{runs['fsrl']['cost_limit']:.0f} per episode ({'the task constraint exactly' if len(binding) == 1 else 'a relaxation: the sum'}); "
            f"settings {json.dumps(runs['fsrl']['settings'])}; worker import time {runs['fsrl']['import_s']:.1f} s (not on its clock).")
    lines += ["", render_table(summaries, args.budget_s), ""]
    if "megjax" in by_name and "fsrl" in by_name:
        ours, peer = by_name["megjax"], by_name["fsrl"]
        r_f, k_f = speedup(ours["t_feasible"], peer["t_feasible"], args.budget_s)
        r_g, k_g = speedup(ours["t_gap"], peer["t_gap"], args.budget_s)
        lines.append(f"meg-jax speed-up, time to (a) feasible: {format_speedup(r_f, k_f)}; to (b) 90% of the gap: "
                     f"{format_speedup(r_g, k_g)}. Target >= {SPEEDUP_TARGET:.0f}x to (b): {target_verdict(r_g, k_g)}.")
        if ours["env_steps_per_s"] and peer["env_steps_per_s"]:
            lines.append(f"Throughput ratios (meg-jax / FSRL): env steps/s {ours['env_steps_per_s'] / peer['env_steps_per_s']:.1f}x, "
                         f"updates/s {ours['updates_per_s'] / peer['updates_per_s']:.1f}x.")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    with open(os.path.join(args.out, "bench_peers.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "bench_peers.jsonl"), "w") as f:
        for name in args.agents:
            for row in evaluated[name]:
                f.write(json.dumps(row) + "\n")
        f.write(json.dumps({"summary": summaries, "fixed": ref["fixed"], "oracle": ref["oracle"],
                            "args": {k: v for k, v in vars(args).items()}, "load_start": load_start,
                            "load_end": load_end}) + "\n")
    print(f"wrote {os.path.join(args.out, 'bench_peers.md')} and bench_peers.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
