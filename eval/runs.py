"""Trained runs of ``train.cvpo`` as the evaluation job reads them: find, restore, training curves.

Application code of the evaluation job (``eval.evaluate``, ``meg-jax demo``, the notebook):
it reads run directories (``config.json``, orbax ``checkpoints/``, ``metrics.jsonl``) and
restores the actor through the library (``meg_jax.checkpoint``, the agents' ``init``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from meg_jax import checkpoint as ckpt
from meg_jax import config as config_lib
from meg_jax.meg.artifact import synthetic_artifact
from meg_jax.rl import agents
from meg_jax.rl.config import RunConfig
from meg_jax.rl.evaluate import make_env
from meg_jax.run_log import read_metrics

__all__ = ["ALGO_LABELS", "LoadedPolicy", "find_runs", "load_run", "policy_discrete", "training_curves"]

# display names of the algorithms of train.cvpo
ALGO_LABELS = dict(agents.LABELS)


@dataclasses.dataclass
class LoadedPolicy:
    """A trained policy restored from a ``train.cvpo`` run directory.

    Attributes:
      name: display name (``MEG-CVPO``, ``PPO-Lagrangian``).
      algo: ``config.algo``.
      run_dir: the run directory.
      config: its ``meg_jax.rl.config.RunConfig``.
      act: ``act(actor_params, obs [N, obs_dim], key, deterministic) -> action``.
      actor_params: the restored actor parameters.
      discrete: whether the policy acts on the discrete K x r grid.
      step: the checkpoint step (host iterations) restored.
      artifact: the ``CalibrationArtifact`` object the run used, or None (the preset's file).
      log_dir: the folder of its ``metrics.jsonl``.
    """

    name: str
    algo: str
    run_dir: str
    config: Any
    act: Callable[..., jax.Array]
    actor_params: Any
    discrete: bool
    step: int
    artifact: Any = None
    log_dir: str = ""  # where its metrics.jsonl is (the run dir, or its seed_<seed> folder)


def find_runs(path: str | os.PathLike) -> list[str]:
    """Run directories of ``train.cvpo`` at ``path`` or one level below it (sorted).

    A run directory holds ``config.json`` with an ``algo`` field and a ``checkpoints/``
    folder (baseline-only runs without checkpoints are skipped).
    """
    path = os.fspath(path)
    candidates = [path] + sorted(os.path.join(path, d) for d in os.listdir(path)) if os.path.isdir(path) else []
    runs = []
    for c in candidates:
        cfg = os.path.join(c, "config.json")
        if not (os.path.isfile(cfg) and os.path.isdir(os.path.join(c, "checkpoints"))):
            continue
        try:
            with open(cfg) as f:
                algo = json.load(f).get("algo")
        except (OSError, ValueError):
            continue
        if algo in ALGO_LABELS:
            runs.append(c)
    return runs


def _run_artifact(config: Any) -> Any:
    if config.env.artifact == "synthetic":
        return synthetic_artifact()
    return None


def _make_agent(config: Any, env: Any) -> Any:
    return agents.make_agent(config, env)


def policy_discrete(config: Any) -> bool:
    """Whether the run's agent acts on the discrete grid."""
    return agents.is_discrete(config)


def load_run(run_dir: str | os.PathLike, seed_index: int = 0) -> LoadedPolicy:
    """Restores the latest checkpoint of a ``train.cvpo`` run (CVPO or PPO) through the library API.

    A multi-seed run (``num_seeds > 1``, states stacked over seeds) yields the policy of seed
    ``seed + seed_index``; its training curves are under ``run_dir/seed_<seed>``.

    Raises:
      FileNotFoundError: no ``config.json`` or no checkpoint in ``run_dir``.
      ValueError: the run's algorithm has no policy (a baseline-only run).
    """
    run_dir = os.fspath(run_dir)
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: {run_dir!r} is not a run directory of `python -m train.cvpo`")
    config = config_lib.load_json(RunConfig, cfg_path)
    if config.algo not in ALGO_LABELS:
        raise ValueError(f"{run_dir}: algo {config.algo!r} has no trained policy (choose a run of {list(ALGO_LABELS)})")
    artifact = _run_artifact(config)
    discrete = policy_discrete(config)
    with warnings.catch_warnings():
        # the env's own job reported "limits do not bind" when it trained; only shapes matter here
        warnings.filterwarnings("ignore", message="limits .* do not bind")
        env = make_env(config.env, discrete=discrete, artifact=artifact)
    agent = _make_agent(config, env)
    k_init, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    # abstract template (no compile of init): the shapes of the saved state, on one device
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    num_seeds = int(getattr(config, "num_seeds", 1))
    if not 0 <= seed_index < num_seeds:
        raise ValueError(f"seed_index {seed_index} out of range: the run trained {num_seeds} seed(s)")
    if num_seeds > 1:  # train.cvpo stacks the seeds' states (vmapped init)
        keys = jnp.stack([jax.random.split(jax.random.PRNGKey(config.seed + i))[0] for i in range(num_seeds)])
        shapes = jax.eval_shape(jax.vmap(agent.init), keys)
    else:
        shapes = jax.eval_shape(agent.init, k_init)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    manager = ckpt.make_manager(os.path.join(run_dir, "checkpoints"), async_save=False)
    try:
        step = manager.latest_step()
        folder = None if step is None else os.path.join(str(manager.directory), str(step), "default")
    finally:
        manager.close()
    step = 0 if step is None else int(step)
    if step == 0:
        raise FileNotFoundError(
            f"{run_dir}/checkpoints holds no checkpoint; train first: "
            f"python -m train.cvpo --algo {config.algo} --workdir {run_dir}"
        )
    # Only the actor is read (a partial restore): the rest of the train state (critics, replay,
    # env state) is training's business, and a run saved before the env state gained a field
    # still evaluates.
    item = {"actor": template.actor}
    restored = ocp.PyTreeCheckpointer().restore(folder, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    actor = restored["actor"] if num_seeds == 1 else jax.tree.map(lambda x: x[seed_index], restored["actor"])
    log_dir = run_dir if num_seeds == 1 else os.path.join(run_dir, f"seed_{config.seed + seed_index}")
    return LoadedPolicy(
        name=ALGO_LABELS[config.algo], algo=config.algo, run_dir=run_dir, config=config, act=agent.act,
        actor_params=jax.tree.map(jnp.asarray, actor), discrete=discrete, step=int(step), artifact=artifact,
        log_dir=log_dir,
    )


# ---------------------------------------------------------------------- training curves
def training_curves(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Item 2: what the run logged per host iteration (``metrics.jsonl``), as lists.

    Returns ``env_steps``, ``episode_quality``, ``latency_over_limit``, ``energy_over_limit``,
    ``lam_0``/``lam_1`` (the multipliers at the end of each iteration) and, for CVPO,
    ``estep`` (per-update λ from ``estep/metrics.jsonl``) — each a list (missing keys: empty).
    """
    recs = read_metrics(run_dir)
    # a resumed run may have written an iteration twice: keep the last record per step
    by_step = {}
    for r in recs:
        by_step[int(r["step"])] = r
    recs = [by_step[s] for s in sorted(by_step)]

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in recs if key in r]

    with_eps = [r for r in recs if "episode_quality" in r]
    out = {
        "env_steps": [float(r["env_steps"]) for r in with_eps],
        "episode_quality": [float(r["episode_quality"]) for r in with_eps],
        "latency_over_limit": [float(r["episode_latency_over_limit"]) for r in with_eps],
        "energy_over_limit": [float(r["episode_energy_over_limit"]) for r in with_eps],
        "lam_steps": [float(r["env_steps"]) for r in recs if "lam_0" in r],
        "lam_0": col("lam_0"),
        "lam_1": col("lam_1"),
    }
    estep = read_metrics(os.path.join(os.fspath(run_dir), "estep"))
    out["estep_update"] = [int(r["step"]) for r in estep]
    out["estep_lam_0"] = [float(r.get("lam_0", float("nan"))) for r in estep]
    out["estep_lam_1"] = [float(r.get("lam_1", float("nan"))) for r in estep]
    if out["latency_over_limit"]:
        tail = max(1, len(out["latency_over_limit"]) // 5)  # the last 20% of training
        out["final_latency_over_limit"] = float(np.mean(out["latency_over_limit"][-tail:]))
        out["final_energy_over_limit"] = float(np.mean(out["energy_over_limit"][-tail:]))
        out["final_quality"] = float(np.mean(out["episode_quality"][-tail:]))
        out["tail_iterations"] = tail
    return out
