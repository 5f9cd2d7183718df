"""Train MEG-CVPO (or a baseline) on the MEG environment; resumable, sharded, multi-host.

    python -m train.cvpo --env.preset tiny --seed 0 --workdir runs/cvpo-tiny-0
    python -m train.cvpo --algo ppo_lag --env.preset sdxl-mobile --workdir runs/ppo-sdxl --cvpo.batch_size 512
    python -m train.cvpo --algo sac_lag --workdir runs/sac-tiny --num_seeds 5   # or ddpg_lag, ppo_pid
    python -m train.cvpo --distributed --coordinator host0:1234 --num_processes 2 --process_id 0 ...

Every field of ``meg_jax.rl.config.RunConfig`` is a flag, ``--a.b value`` (``--env.preset``,
``--cvpo.batch_size``, ``--cvpo.actor_hidden 64 64``, ``--eval.deterministic``,
``--total_env_steps`` ...); ``--help`` lists them all with their defaults.
``--env.artifact synthetic`` uses the synthetic test artifact (for tests and labelled
synthetic results only).

The work directory receives ``config.json`` (the resolved config; a rerun with another
config is refused naming the fields), ``metrics.jsonl`` + TensorBoard events (one record
per host iteration), ``estep/`` (eta, lam, the achieved KL and expected costs under q for
every update), orbax checkpoints of the whole train state (``checkpoints/``) and, at the end,
``eval.json``: the policy and the baselines on the same fresh episodes
(``--eval.deterministic`` writes ``eval-deterministic.json`` beside it). A rerun of the
same command resumes from the latest checkpoint and ends bit-identical to an uninterrupted run on
CPU. A non-finite metric or parameter stops the run with exit code 3, keeping the last good
checkpoint. ``--algo fixed|oracle|max_quality`` only evaluates the baseline.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from meg_jax import config as config_lib
from meg_jax.rl.config import ALGOS, RunConfig

__all__ = ["main", "parse_args", "run", "TrainResult", "estep_summary"]

EXIT_BAD_CONFIG = 2
EXIT_NON_FINITE = 3

log = logging.getLogger("train.cvpo")


@dataclasses.dataclass
class TrainResult:
    """What :func:`run` returns to callers and tests."""

    config: RunConfig
    state: Any  # final train state (None for evaluation-only algos)
    iterations: int  # host iterations done in total (including resumed ones)
    evaluation: Optional[dict]  # eval.json content (None if halted before the end)


RunFlags = config_lib.inline(RunConfig)


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m train.cvpo`` (= ``meg-jax train``); every RunConfig field is one too."""

    workdir: str  # run directory (created; resumed if it holds a checkpoint)
    config: Optional[str] = None  # a config.json to start from (the other flags then override it)
    distributed: bool = False  # call jax.distributed.initialize() first
    coordinator: Optional[str] = None  # coordinator address host:port (None: from the cluster env)
    num_processes: Optional[int] = None  # number of processes (None: from the cluster env)
    process_id: Optional[int] = None  # this process's id (None: from the cluster env)
    progress: bool = True  # show the progress bar
    compile_cache: bool = True  # persistent XLA compilation cache in the user cache dir (meg_jax.job_setup)
    run: RunFlags = RunConfig()


def parse_args(argv: Sequence[str]) -> tuple[Args, RunConfig]:
    """Splits the command line into job flags and a resolved ``RunConfig``.

    Raises:
      SystemExit: ``--help`` (0); an unknown flag, a malformed value, an unknown algo or an
        unreadable ``--config`` file (2, naming the field or file).
    """
    argv = list(argv)
    prog = "python -m train.cvpo"
    base_path = config_lib.flag_value(argv, "--config")
    try:
        base = config_lib.load_json(RunConfig, base_path) if base_path else RunConfig()
    except (OSError, ValueError) as e:
        sys.stderr.write(f"{prog}: error: --config: {e}\n")
        raise SystemExit(EXIT_BAD_CONFIG) from e
    args = config_lib.parse_cli(Args, argv, prog=prog, description=__doc__.split("\n")[0], config=base)
    if args.run.algo not in ALGOS:
        sys.stderr.write(f"{prog}: error: --algo: unknown {args.run.algo!r}; choose from {list(ALGOS)}\n")
        raise SystemExit(EXIT_BAD_CONFIG)
    return args, args.run


# ----------------------------------------------------------------------------- helpers
def _make_envs(config: RunConfig):
    """(training env, its discreteness); ``--env.artifact synthetic`` is resolved by ``make_env``."""
    from meg_jax.rl.agents import is_discrete
    from meg_jax.rl.evaluate import make_env

    discrete = is_discrete(config)
    return make_env(config.env, discrete=discrete), discrete


def _local(tree: Any) -> Any:
    """Host copy of a replicated (possibly multi-process) pytree."""
    import jax

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def _all_finite_on_device(tree: Any) -> Any:
    """jnp bool []: every floating leaf of ``tree`` is finite (traced; one reduction on device)."""
    import jax
    import jax.numpy as jnp

    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


@functools.cache
def _all_finite_jit() -> Any:
    import jax

    return jax.jit(_all_finite_on_device)


def params_finite(tree: Any) -> bool:
    """Whether every floating leaf of a (possibly sharded) pytree is finite.

    One jitted reduction on the devices; only its boolean comes to the host (the train state
    itself stays where it is). Compiled once per tree structure.
    """
    return bool(_local(_all_finite_jit()(tree)))


def _summarize(algo: str, metrics: dict, limits: np.ndarray) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Host summary of one iteration's stacked metrics, and the per-update E-step records."""
    m = {k: np.asarray(v) for k, v in _local(metrics).items()}
    out: dict[str, float] = {}
    episodes = float(m["episodes"].sum())
    out["episodes"] = episodes
    if episodes > 0:
        out["episode_quality"] = float(m["episode_quality_sum"].sum() / episodes)
        costs = m["episode_costs_sum"].sum(axis=0) / episodes
        for j, name in enumerate(("latency", "energy")):
            out[f"episode_{name}_over_limit"] = float(costs[j] / limits[j])
    out["env_steps"] = float(m["env_steps"].reshape(-1)[-1])
    per_update: list[dict[str, float]] = []
    if algo == "cvpo":
        updated = m["updated"].reshape(-1) > 0.5
        out["updates_done"] = float(updated.sum())
        if updated.any():
            for k in ("critic_loss", "reward_critic_loss", "actor_loss", "nll", "kl_mean", "kl_std", "estep_kl",
                      "estep_reward", "dual_iterations", "policy_std"):
                if k in m:
                    out[k] = float(m[k].reshape(-1)[updated].mean())
            last = {k: m[k].reshape((-1,) + m[k].shape[2:])[updated][-1] for k in ("eta", "lam", "alpha_mu", "alpha_sigma")}
            out["eta"] = float(last["eta"])
            out["alpha_mu"] = float(last["alpha_mu"])
            out["alpha_sigma"] = float(last["alpha_sigma"])
            for j in range(limits.shape[0]):
                out[f"lam_{j}"] = float(last["lam"][j])
            keys = ("eta", "lam", "estep_kl", "estep_costs_over_threshold", "estep_lam_at_cap", "estep_infeasible", "estep_relaxed",
                    "estep_violation",
                    "estep_prior_costs_over_threshold", "estep_baseline_over_threshold")
            flat = {k: m[k].reshape((-1,) + m[k].shape[2:])[updated] for k in keys}
            out.update(estep_summary(flat))
            for i in range(flat["eta"].shape[0]):
                rec = {"eta": float(flat["eta"][i]), "estep_kl": float(flat["estep_kl"][i]),
                       "lam_at_cap": float(flat["estep_lam_at_cap"][i]),
                       "infeasible": float(flat["estep_infeasible"][i]), "relaxed": float(flat["estep_relaxed"][i]),
                       "estep_violation": float(flat["estep_violation"][i])}
                for j in range(limits.shape[0]):
                    rec[f"lam_{j}"] = float(flat["lam"][i][j])
                    rec[f"estep_cost_{j}_over_threshold"] = float(flat["estep_costs_over_threshold"][i][j])
                    rec[f"prior_cost_{j}_over_threshold"] = float(flat["estep_prior_costs_over_threshold"][i][j])
                per_update.append(rec)
    else:
        if "updated" in m:  # off-policy agents: averages over the updates that ran
            updated = m["updated"].reshape(-1) > 0.5
            out["updates_done"] = float(updated.sum())
            for k in ("critic_loss", "reward_critic_loss", "actor_loss", "alpha", "entropy"):
                if k in m and updated.any():
                    out[k] = float(m[k].reshape(-1)[updated].mean())
        else:  # PPO
            out["policy_loss"] = float(m["policy_loss"].mean())
            out["value_loss"] = float(m["value_loss"].mean())
        lam = m["lam"].reshape((-1, limits.shape[0]))[-1]
        for j in range(limits.shape[0]):
            out[f"lam_{j}"] = float(lam[j])
    return out, per_update


def estep_summary(flat: dict[str, np.ndarray]) -> dict[str, float]:
    """Statistics of the E-steps of one host iteration (only the updates that ran).

    Args:
      flat: per-update arrays, [U] or [U, m]: ``estep_lam_at_cap`` (1 when any lam sat on
        ``cvpo.lam_max``), ``estep_infeasible`` (1 when a lam sat on its cap with its batch
        threshold still unmet: no q in the KL ball meets it; ``dual.estep_infeasible``; the
        fallback's trigger), ``estep_relaxed`` (optional: 1 when a batch threshold was raised
        to what the KL ball can meet, ``cvpo.feasibility_margin``),
        ``estep_prior_costs_over_threshold`` (the
        batch's mean_s E_pi_old[Q_c] / threshold) and ``estep_baseline_over_threshold`` (the
        smoothed cost level the batch is read against).

    Returns:
      ``estep_lam_at_cap_frac`` (fraction of E-steps with any lam at its cap),
      ``estep_infeasible_frac`` (fraction that could not meet a batch threshold within the
      KL ball), ``estep_relaxed_frac`` (fraction whose threshold was raised; when logged),
      and per constraint j the mean and the between-batch standard deviation of
      ``prior_cost_j_over_threshold`` and the last ``baseline_cost_j_over_threshold``.
    """
    out = {
        "estep_lam_at_cap_frac": float(np.mean(flat["estep_lam_at_cap"] > 0.5)),
        "estep_infeasible_frac": float(np.mean(flat["estep_infeasible"] > 0.5)),
    }
    if "estep_relaxed" in flat:
        out["estep_relaxed_frac"] = float(np.mean(flat["estep_relaxed"] > 0.5))
    prior = np.asarray(flat["estep_prior_costs_over_threshold"])
    for j in range(prior.shape[-1]):
        out[f"prior_cost_{j}_over_threshold"] = float(prior[:, j].mean())
        out[f"prior_cost_{j}_over_threshold_std"] = float(prior[:, j].std())
        out[f"baseline_cost_{j}_over_threshold"] = float(np.asarray(flat["estep_baseline_over_threshold"])[-1, j])
    return out


def _postfix(summary: dict[str, float]) -> dict[str, str]:
    post = {}
    if "episode_quality" in summary:
        post["ret"] = f"{summary['episode_quality']:.4f}"
        post["lat/lim"] = f"{summary['episode_latency_over_limit']:.3f}"
        post["en/lim"] = f"{summary['episode_energy_over_limit']:.3f}"
    lams = [summary[k] for k in sorted(summary) if k.startswith("lam_")]
    if lams:
        post["lam"] = "[" + ",".join(f"{x:.3g}" for x in lams) + "]"
    return post


# ----------------------------------------------------------------------------- the job
def run(
    config: RunConfig,
    workdir: str,
    *,
    progress: bool = True,
    halt_after: Optional[int] = None,
    evaluate: bool = True,
) -> TrainResult:
    """Trains (resuming from ``workdir`` if it holds a checkpoint) and evaluates.

    Args:
      config: the resolved run config.
      workdir: run directory.
      progress: show a tqdm bar.
      halt_after: stop after this many host iterations of this call, as if killed right
        after the checkpoint of that iteration (tests of resumption).
      evaluate: evaluate the policy and the baselines at the end.

    Raises:
      ValueError: the config cannot run (unknown preset, infeasible limits, ...).
      meg_jax.checkpoint.ConfigMismatchError: ``workdir`` holds another config.
      meg_jax.run_log.NonFiniteError: training diverged (the last good checkpoint is kept).
    """
    import jax

    from meg_jax import checkpoint as ckpt
    from meg_jax import run_log
    from meg_jax.rl import agents, baselines
    from meg_jax.parallel import check_batch_size
    from meg_jax.rl.sharding import jit_sharded, make_mesh

    env, discrete = _make_envs(config)  # refuses unknown presets / infeasible limits
    limits = np.asarray(env.params.limits, np.float64)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:  # one writer of config.json on a shared work directory
        # The final evaluation's settings do not change what is trained: a finished run can
        # be re-scored (e.g. --eval.deterministic) without retraining; nor do the other agents'
        # sections of the config (a --cvpo.* sweep resumes the baselines beside it).
        unused = agents.unused_sections(config.algo) if config.algo in agents.LEARNED else ()
        ckpt.check_config(workdir, config, ignore=("eval",) + unused)
    evaluate = evaluate and config.eval.num_episodes > 0

    if config.algo in baselines.BASELINES:
        evaluation = _evaluate(config, None, None) if evaluate else None
        if evaluate and is_main:
            _write_json(os.path.join(workdir, eval_filename(config)), evaluation)
        return TrainResult(config, None, 0, evaluation)

    per_block = agents.env_steps_per_block(config)
    vmapped = config.num_seeds > 1
    if config.num_seeds < 1:
        raise ValueError(f"num_seeds must be >= 1, got {config.num_seeds}")
    # one seed: the mesh over every device; several seeds: vmapped on the default device
    mesh = None if vmapped else make_mesh()
    if mesh is not None:
        check_batch_size(config.env.num_envs, mesh, what="env.num_envs")
    agent = agents.make_agent(config, env, mesh)
    blocks_per_log = config.blocks_per_log
    iterations = max(1, math.ceil(config.total_env_steps / (per_block * blocks_per_log)))
    seeds = [config.seed + i for i in range(config.num_seeds)]
    seed_keys = jax.numpy.stack([jax.random.PRNGKey(s) for s in seeds])
    k_init, run_key = jax.vmap(jax.random.split, out_axes=1)(seed_keys)  # [S, 2] each

    def run_blocks(state, key):
        def body(s, _):
            return agent.train_step(s, jax.random.fold_in(key, s.block))

        return jax.lax.scan(body, state, None, length=blocks_per_log)

    if vmapped:
        init_jit = jax.jit(jax.vmap(agent.init))
        step_jit = jax.jit(jax.vmap(run_blocks), donate_argnums=0)
        state = init_jit(k_init)
    else:
        k_init, run_key = k_init[0], run_key[0]
        init_jit, step_jit = jit_sharded(agent.init, run_blocks, mesh, k_init)
        state = init_jit(k_init)
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
                                async_save=False)
    state, start = ckpt.restore_or_init(manager, state)
    seed_dirs = [os.path.join(workdir, f"seed_{s}") for s in seeds] if vmapped else [workdir]
    writers = [run_log.MetricsWriter(d) for d in seed_dirs] if is_main else []
    estep_writers = ([run_log.MetricsWriter(os.path.join(d, "estep")) for d in seed_dirs]
                     if (is_main and config.algo == "cvpo") else [])
    bar = run_log.progress(iterations, initial=start, desc=config.algo, disable=not (progress and is_main))
    done_here = 0
    try:
        for it in range(start, iterations):
            if halt_after is not None and done_here >= halt_after:
                break
            t0 = time.time()
            state, metrics = step_jit(state, run_key)
            seconds = time.time() - t0
            per_seed = [jax.tree.map(lambda x, i=i: x[i], metrics) for i in range(len(seeds))] if vmapped else [metrics]
            summaries = []
            for i, m in enumerate(per_seed):
                summary, per_update = _summarize(config.algo, m, limits)
                summary["iteration_seconds"] = seconds
                summaries.append(summary)
                try:
                    run_log.check_finite(summary, it + 1)
                except run_log.NonFiniteError:
                    manager.wait_until_finished()
                    raise
                if writers:
                    writers[i].write(int(summary["env_steps"]), summary)
                if estep_writers:
                    updates = np.asarray(_local(state.updates)).reshape(-1)[i]
                    first = int(updates) - len(per_update)
                    for j, rec in enumerate(per_update):
                        estep_writers[i].write(first + j + 1, rec)
            if not params_finite((state.actor, state.critic)):
                raise run_log.NonFiniteError(f"non-finite actor or critic parameters at iteration {it + 1}")
            bar.set_postfix(_postfix(summaries[0]), refresh=False)
            bar.update(1)
            done_here += 1
            last = it + 1 == iterations
            every = config.checkpoint_every_logs
            if last or (every > 0 and (it + 1) % every == 0) or (halt_after is not None and done_here == halt_after):
                ckpt.save(manager, it + 1, state)
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
        for w in writers + estep_writers:
            w.close()
    total_iters = start + done_here
    evaluation = None
    if evaluate and total_iters >= iterations:
        actors = _local(state.actor)
        evals = []
        for i, seed in enumerate(seeds):
            params = jax.tree.map(lambda x, i=i: x[i], actors) if vmapped else actors
            ev = _evaluate(dataclasses.replace(config, seed=seed, num_seeds=1), agent, params)
            evals.append(ev)
            if is_main:
                _write_json(os.path.join(seed_dirs[i], eval_filename(config)), ev)
        evaluation = evals[0] if not vmapped else _combine(evals, seeds)
        if is_main and vmapped:
            _write_json(os.path.join(workdir, eval_filename(config)), evaluation)
    return TrainResult(config, state, total_iters, evaluation)


def eval_filename(config: RunConfig) -> str:
    """``eval.json`` for the sampled policy, ``eval-deterministic.json`` for its mean / argmax.

    Re-scoring a finished run with ``--eval.deterministic`` writes beside the first
    evaluation instead of over it.
    """
    return "eval-deterministic.json" if config.eval.deterministic else "eval.json"


def _combine(evals: list[dict], seeds: list[int]) -> dict:
    """Per-seed summaries and the medians / feasibility count over seeds."""
    rows = [dict(seed=s, **ev["summary"]) for s, ev in zip(seeds, evals)]
    gaps = [r["gap_closed"] for r in rows]
    return {
        "per_seed": rows,
        "summary": {
            "algo": rows[0]["algo"],
            "seeds": seeds,
            "median_gap_closed": float(np.median(gaps)),
            "feasible_seeds": int(sum(bool(r["feasible"]) for r in rows)),
            "median_quality": float(np.median([r["quality"] for r in rows])),
            "max_costs_over_limit": [float(max(r["costs_over_limit"][j] for r in rows)) for j in range(len(rows[0]["costs_over_limit"]))],
        },
    }


def _evaluate(config: RunConfig, agent: Any, actor_params: Any) -> dict:
    """The policy (if any) and every baseline on the same fresh episodes."""
    from meg_jax.rl import baselines

    return baselines.evaluate_all(config, agent, actor_params)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _init_distributed(args: Args) -> None:
    import jax

    # CPU collectives across processes need gloo; the setting only concerns the CPU backend, and
    # asking which backend is in use would initialise it (initialize() must come first)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if args.coordinator:
        kwargs["coordinator_address"] = args.coordinator
    if args.num_processes is not None:
        kwargs["num_processes"] = args.num_processes
    if args.process_id is not None:
        kwargs["process_id"] = args.process_id
    jax.distributed.initialize(**kwargs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (also ``meg-jax train``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, config = parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (already reported)
        return int(e.code or 0)
    from meg_jax import job_setup

    job_setup.configure_logging()
    if args.distributed:
        _init_distributed(args)
    job_setup.enable_compile_cache(args.compile_cache)
    from meg_jax import run_log
    from meg_jax.checkpoint import ConfigMismatchError

    try:
        result = run(config, args.workdir, progress=args.progress)
    except (ValueError, FileNotFoundError, ConfigMismatchError) as e:
        log.error("%s", e)
        return EXIT_BAD_CONFIG
    except run_log.NonFiniteError as e:
        log.error("training stopped: %s; the last good checkpoint in %s is kept", e, args.workdir)
        return EXIT_NON_FINITE
    if result.evaluation is not None:
        import jax

        if jax.process_index() == 0:  # the result, for the caller: stdout
            sys.stdout.write(json.dumps(result.evaluation.get("summary", result.evaluation), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
