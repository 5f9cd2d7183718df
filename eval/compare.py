"""Every learned agent on one preset, one table: MEG-CVPO against the safe-RL baselines.

    python -m eval.compare --preset tiny --seeds 5 --out runs/compare-tiny
    python -m eval.compare --preset tiny --seeds 5 --offpolicy_env_steps 32768 --onpolicy_env_steps 131072
    python -m eval.compare --preset paper --agents cvpo --gamma 0.97 --set cvpo.n_step=2   # the authors' settings

Each agent of ``--agents`` (default: MEG-CVPO, PPO-Lagrangian, PID-Lagrangian PPO,
DDPG-Lagrangian, SAC-Lagrangian) is trained by the training job itself
(``train.cvpo.run``: one jitted scan of blocks per host iteration, the ``--seeds`` seeds
vmapped, orbax checkpoints in ``OUT/<algo>``, so a rerun of the same command resumes or only
re-reads finished agents) and scored by its final evaluation: every seed on its own
``--episodes`` fresh episodes (key ``fold_in(PRNGKey(seed), 10**6)``), the same requests for
every agent. Off-policy agents (CVPO, DDPG, SAC) get ``--offpolicy_env_steps`` per seed,
on-policy PPO variants ``--onpolicy_env_steps`` (docs/results.md gives PPO 4x the steps).

Columns (medians over seeds unless said otherwise):

* quality: mean episode-average quality; latency / limit, energy / limit: the worst seed's
  mean episode-average cost over its limit; feasible seeds: both <= 1.02 x limit;
* gap closed (oracle): (Q - Q_fixed) / (Q_oracle - Q_fixed), Q_fixed the best fixed feasible
  (K, r) and Q_oracle the Lagrangian oracle with perfect channel knowledge, on the seed's
  episodes; gap closed (observable): the same with the observable-information ceiling in place
  of the oracle, the table policy over (estimated-SNR bin, class) of
  ``eval.observable_oracle`` (it sees what the agents see, up to the SNR history; on ``paper``,
  whose observation has no class, over the SNR alone);
  gap closed (equal cost): 1 - (Q_eq - Q) / (Q_oracle - Q_fixed), Q_eq the oracle fitted at
  the seed's own mean costs (``eval.observable_oracle.equal_cost_oracle``): the seed's distance
  below the frontier at its own costs, in units of the preset's fixed -> oracle gap at the
  limits (the same denominator for every agent), so quality bought with cost above a limit
  (allowed up to the feasibility tolerance) earns nothing: the column that ranks agents where
  that tolerance is worth as much as the gap (``paper``). A seed at the limits scores its
  gap closed (oracle); one on the frontier 100 % at any cost;
  gap closed (observable, equal cost): 1 - (T_eq - Q) / (T - Q_fixed), the same reading against
  the observable table: T_eq the table fitted to spend the seed's own mean costs, T the table at
  the limits. The oracle's frontier includes what the agents cannot observe (the class on
  ``paper``, the true SNR elsewhere), and what that is worth changes along the frontier, so the
  equal-cost column against the oracle still favours some cost levels over others; against the
  table every agent is read by the frontier of what it sees. A learned policy may exceed the
  table (it also has the SNR history), so the column can pass 100 %;
* env steps: transitions collected per seed; wall time: the training job's wall clock
  (compilation included, evaluation excluded; all seeds together); updates/s: gradient
  updates of all seeds per second of that wall time (PPO: one Adam step per minibatch).

Under the table, how exact the equal-cost columns can be on this preset: what lowering each
limit by 1e-4 of itself (the other kept) costs the oracle and the observable table, in % of
their fixed -> frontier gaps (median over seeds). Where a limit sits just above the cheapest
action's mean cost (``sdxl-mobile``'s energy: every action spends 0.9999-1.0002 x the limit)
that is tens of % of the gap, and the equal-cost columns then rank agents by spends a few 1e-5
of that limit apart, far inside the feasibility tolerance (docs/results.md, sixth round).

Writes ``OUT/compare.json`` (per-seed rows and the settings) and ``OUT/compare.md`` (the
table), and prints the table; ``--deterministic`` re-scores finished agents with their mean /
argmax action (no retraining) into ``OUT/compare-deterministic.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["Args", "agent_run_config", "summarise_agent", "format_table", "limit_probes", "frontier_sensitivity",
           "compare", "main"]

DEFAULT_AGENTS = ("cvpo", "ppo_lag", "ppo_pid", "ddpg_lag", "sac_lag")
# MEG-CVPO's discrete critic per preset, as measured (docs/results.md, fifth round): on `paper`
# (81 actions, costs piecewise-affine in K and r at a given channel) critics over the action's
# (K, r) coordinates close 98.5 % of the observable gap at equal cost against the table
# critics' 70.6 %; on `tiny` and `sdxl-mobile` (32 actions) the table critics are the better
# (96.8 vs 96.2 %, 88.5 vs 86.2 %) and 4-8x faster
CVPO_CRITIC = {"paper": "coordinates"}
ON_POLICY = ("ppo_lag", "ppo_pid", "ppo")
SENSITIVITY_STEP = 1e-4  # the fraction of a limit by which frontier_sensitivity lowers it


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.compare``."""

    preset: str = "tiny"  # environment preset
    seeds: int = 5  # seeds 0 .. seeds - 1, trained together (vmapped) per agent
    out: str = "runs/compare"  # output folder: one run directory per agent, compare.json, compare.md
    agents: tuple[str, ...] = DEFAULT_AGENTS  # --algo values of train.cvpo to compare
    num_envs: int = 64  # parallel training environments
    offpolicy_env_steps: int = 131_072  # transitions per seed of CVPO, DDPG-Lag, SAC-Lag
    onpolicy_env_steps: int = 524_288  # transitions per seed of the PPO variants
    log_iterations: int = 8  # host iterations (log lines, checkpoints) per training run
    episodes: int = 1024  # evaluation episodes per seed
    deterministic: bool = False  # score every agent's mean / argmax action instead of sampling it
    cvpo_discrete: bool = True  # MEG-CVPO with its categorical head (docs/results.md's headline)
    # how MEG-CVPO's discrete critics read an action (CVPOConfig.discrete_critic); None = the
    # preset's entry of CVPO_CRITIC ("table" where it has none)
    cvpo_critic: Optional[str] = None
    hidden: tuple[int, ...] = (64, 64)  # hidden widths of every agent's networks
    gamma: Optional[float] = None  # discount of every agent; None = each agent's default (0.5)
    # further settings of every agent's RunConfig as dotted FIELD=VALUE (JSON values), applied last,
    # e.g. --set cvpo.n_step=2 cvpo.critic_lr=3e-4 (meg_jax.config.apply_overrides)
    set: tuple[str, ...] = ()
    artifact: Optional[str] = None  # calibration artifact; None = the preset's, "synthetic" for tests
    episode_length: Optional[int] = None  # requests per episode; None = the preset's
    observable: bool = True  # also score the observable-information ceiling (eval.observable_oracle)
    equal_cost: bool = True  # also score every seed against the oracle at its own mean costs
    fit_episodes: int = 4096  # episodes that fit the observable table policy
    bin_db: float = 0.5  # SNR-estimate bin width of the observable table policy (dB)


def agent_run_config(args: Args, algo: str) -> Any:
    """The ``RunConfig`` of one agent's training run."""
    from meg_jax import config as config_lib
    from meg_jax.rl import agents
    from meg_jax.rl.config import EnvSpec, EvalConfig, RunConfig

    if algo not in agents.LEARNED:
        raise ValueError(f"--agents: {algo!r} is not a learned agent; choose from {list(agents.LEARNED)}")
    base = RunConfig()
    gamma = {} if args.gamma is None else {"gamma": args.gamma}
    critic = CVPO_CRITIC.get(args.preset, "table") if args.cvpo_critic is None else args.cvpo_critic
    config = dataclasses.replace(
        base, algo=algo, seed=0, num_seeds=args.seeds,
        env=EnvSpec(preset=args.preset, num_envs=args.num_envs, artifact=args.artifact,
                    episode_length=args.episode_length),
        eval=EvalConfig(num_episodes=args.episodes, deterministic=args.deterministic),
        cvpo=dataclasses.replace(base.cvpo, discrete=args.cvpo_discrete, discrete_critic=critic,
                                 actor_hidden=args.hidden, critic_hidden=args.hidden, **gamma),
        ppo=dataclasses.replace(base.ppo, hidden=args.hidden, **gamma),
        ddpg=dataclasses.replace(base.ddpg, hidden=args.hidden, **gamma),
        sac=dataclasses.replace(base.sac, hidden=args.hidden, **gamma),
        total_env_steps=args.onpolicy_env_steps if algo in ON_POLICY else args.offpolicy_env_steps,
    )
    try:  # the config module's dotted overrides: typed, nested, unknown fields listed
        config = config_lib.apply_overrides(config, args.set)
    except ValueError as e:
        raise ValueError(f"--set: {e}") from None
    per_block = agents.env_steps_per_block(config)
    blocks = max(1, -(-config.total_env_steps // per_block))
    blocks_per_log = max(1, -(-blocks // max(1, args.log_iterations)))
    return dataclasses.replace(config, blocks_per_log=blocks_per_log, checkpoint_every_logs=1)


def _train(config: Any, workdir: str) -> tuple[Any, float]:
    """Trains (or resumes) one agent, then evaluates it; returns (TrainResult, training seconds).

    The training seconds accumulate over resumed calls in ``workdir/timing.json``; a call that
    finds the run finished adds nothing.
    """
    from train import cvpo as train_job

    timing_path = os.path.join(workdir, "timing.json")
    timing = {"train_seconds": 0.0, "iterations": 0}
    if os.path.isfile(timing_path):
        with open(timing_path) as f:
            timing = json.load(f)
    t0 = time.perf_counter()
    result = train_job.run(config, workdir, progress=False, evaluate=False)
    seconds = time.perf_counter() - t0
    if result.iterations > timing["iterations"]:
        timing = {"train_seconds": timing["train_seconds"] + seconds, "iterations": result.iterations}
        with open(timing_path, "w") as f:
            json.dump(timing, f)
    result = train_job.run(config, workdir, progress=False, evaluate=True)  # restores, only evaluates
    return result, float(timing["train_seconds"])


def _seed_evals(config: Any, workdir: str) -> list[dict]:
    from train import cvpo as train_job

    seeds = [config.seed + i for i in range(config.num_seeds)]
    dirs = [os.path.join(workdir, f"seed_{s}") for s in seeds] if config.num_seeds > 1 else [workdir]
    out = []
    for s, d in zip(seeds, dirs):
        with open(os.path.join(d, train_job.eval_filename(config))) as f:
            ev = json.load(f)
        out.append(dict(seed=s, limits=ev["limits"], **ev["summary"]))
    return out


def summarise_agent(algo: str, rows: list[dict], ceiling: Optional[dict[int, dict]], env_steps: float,
                    train_seconds: float, updates: float,
                    equal_cost: Optional[dict[int, float]] = None,
                    equal_cost_observable: Optional[dict[int, float]] = None) -> dict[str, Any]:
    """One table row from the per-seed evaluation summaries (``eval.json``'s ``summary``).

    Args:
      algo: the agent's --algo.
      rows: per seed: ``seed``, ``quality``, ``costs_over_limit``, ``feasible``, ``gap_closed``,
        ``fixed_quality``, and ``oracle_quality`` (the oracle at the limits) with ``equal_cost``.
      ceiling: seed -> :func:`eval.observable_oracle.observable_ceiling` entry, or None.
      env_steps: transitions per seed; train_seconds: wall clock of training (all seeds);
      updates: gradient updates per seed.
      equal_cost: seed -> the oracle's quality at this agent's mean costs on that seed, or None.
      equal_cost_observable: seed -> the observable table policy's quality at this agent's mean
        costs on that seed (needs ``ceiling``), or None.
    """
    from meg_jax.rl.agents import LABELS
    from meg_jax.rl.evaluate import gap_closed

    costs = np.asarray([r["costs_over_limit"] for r in rows], np.float64)
    row: dict[str, Any] = {
        "algo": algo, "agent": LABELS.get(algo, algo), "seeds": [r["seed"] for r in rows],
        "quality": float(np.median([r["quality"] for r in rows])),
        "worst_costs_over_limit": costs.max(axis=0).tolist(),
        "feasible_seeds": int(sum(bool(r["feasible"]) for r in rows)),
        "gap_closed": float(np.median([r["gap_closed"] for r in rows])),
        "per_seed_gap_closed": [float(r["gap_closed"]) for r in rows],
        "env_steps": float(env_steps), "train_seconds": float(train_seconds),
        "updates_per_second": float(updates * len(rows) / train_seconds) if train_seconds > 0 else float("nan"),
    }
    if ceiling is not None:
        obs = [gap_closed(r["quality"], r["fixed_quality"], ceiling[r["seed"]]["quality"]) for r in rows]
        row["gap_closed_observable"] = float(np.median(obs))
        row["per_seed_gap_closed_observable"] = [float(x) for x in obs]
    # the shortfall below a frontier at the seed's own costs over that frontier's gap at the limits
    # (gap_closed of Q - (F_eq - F): 1 - (F_eq - Q) / (F - Q_fixed)); a denominator at the seed's
    # own costs would grow with what it spends over a limit, and shrink the same shortfall for an
    # agent that spends more. The oracle's frontier, then the observable table's
    frontiers = []
    if equal_cost is not None:
        frontiers.append(("gap_closed_equal_cost", equal_cost, {r["seed"]: r["oracle_quality"] for r in rows}))
    if equal_cost_observable is not None:
        if ceiling is None:
            raise ValueError("equal_cost_observable needs the observable ceiling")
        frontiers.append(("gap_closed_observable_equal_cost", equal_cost_observable,
                          {r["seed"]: ceiling[r["seed"]]["quality"] for r in rows}))
    for key, at_cost, at_limits in frontiers:
        eq = [gap_closed(r["quality"] - (at_cost[r["seed"]] - at_limits[r["seed"]]), r["fixed_quality"],
                         at_limits[r["seed"]]) for r in rows]
        row[key] = float(np.median(eq))
        row[f"per_seed_{key}"] = [float(x) for x in eq]
    return row


def limit_probes(limits: Sequence[float], step: float = SENSITIVITY_STEP) -> list[np.ndarray]:
    """The limits, then each limit lowered by ``step`` of itself with the others kept: [m + 1][m]."""
    limits = np.asarray(limits, np.float64)
    return [limits] + [limits * (1.0 - step * np.eye(len(limits))[k]) for k in range(len(limits))]


def frontier_sensitivity(at_probes: dict[int, Sequence[float]], fixed_quality: dict[int, float]) -> dict[str, Any]:
    """What lowering each limit costs a frontier, as a fraction of its fixed -> frontier gap.

    Args:
      at_probes: seed -> the frontier's quality at :func:`limit_probes` (the limits first).
      fixed_quality: seed -> the best fixed feasible action's quality on the same requests.

    Returns:
      {"per_seed": seed -> [m] fractions, "median": [m]}: (F(limits) - F(limit k lowered)) /
      (F(limits) - Q_fixed), one solver path on both sides of the difference.
    """
    per_seed = {}
    for seed, f in at_probes.items():
        f = np.asarray(f, np.float64)
        per_seed[int(seed)] = ((f[0] - f[1:]) / (f[0] - fixed_quality[seed])).tolist()
    return {"per_seed": per_seed, "median": np.median(np.asarray(list(per_seed.values())), axis=0).tolist()}


def format_table(rows: list[dict], references: Optional[dict[str, Any]] = None) -> str:
    """Markdown table of :func:`summarise_agent` rows (plus the observable ceiling's row)."""
    head = ("| agent | quality | latency / limit | energy / limit | feasible seeds | gap closed (oracle) | "
            "gap closed (observable) | gap closed (equal cost) | gap closed (observable, equal cost) | "
            "env steps / seed | wall time (s) | updates/s |")
    lines = [head, "|" + "---|" * 12]
    pct = lambda r, k: f"{100 * r[k]:.1f}%" if k in r else "—"  # noqa: E731
    for r in rows:
        n = len(r["seeds"])
        lines.append(
            f"| {r['agent']} | {r['quality']:.4f} | {r['worst_costs_over_limit'][0]:.4f} | "
            f"{r['worst_costs_over_limit'][1]:.4f} | {r['feasible_seeds']}/{n} | {100 * r['gap_closed']:.1f}% | "
            f"{pct(r, 'gap_closed_observable')} | {pct(r, 'gap_closed_equal_cost')} | "
            f"{pct(r, 'gap_closed_observable_equal_cost')} | {int(r['env_steps']):,} | "
            f"{r['train_seconds']:.0f} | {r['updates_per_second']:.0f} |")
    if references and "observable" in references:
        o = references["observable"]
        seen = {"snr": "estimated SNR", "class": "class"}
        inputs = ", ".join(seen[k] for k in o["observes"]) or "nothing"
        lines.append(
            f"| table policy on ({inputs}) (observable ceiling) | {o['quality']:.4f} | "
            f"{o['worst_latency_over_limit']:.4f} | {o['worst_energy_over_limit']:.4f} | "
            f"{o['feasible_seeds']}/{o['seeds']} | {100 * o['gap_closed']:.1f}% | 100% | — | — | — | — | — |")
    sens = (references or {}).get("frontier_sensitivity")
    if sens:
        names = ("latency", "energy")
        read = "; ".join(names[k] + " " + " / ".join(f"{100 * sens[f]['median'][k]:.1f} %" for f in sens["frontiers"])
                         for k in range(len(names)))
        lines.append("")
        lines.append(f"Lowering a limit by {sens['step']:g} of itself lowers the {' / '.join(sens['frontiers'])} "
                     f"frontier by (% of its fixed -> frontier gap, median over seeds): {read}.")
        worst = max(max(sens[f]["median"]) for f in sens["frontiers"])
        if worst > 0.01:
            lines.append(f"The equal-cost columns here move by up to {100 * worst:.0f} points when an agent's spend "
                         f"moves by {sens['step']:g} of a limit: read them with that in mind.")
    return "\n".join(lines)


def compare(args: Args) -> dict[str, Any]:
    """Trains and scores every agent of ``args``; returns the JSON written to ``OUT/compare.json``."""
    from meg_jax.rl import agents
    from meg_jax.rl.config import FEASIBILITY_TOLERANCE

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    configs = {algo: agent_run_config(args, algo) for algo in args.agents}  # refuses unknown agents first
    if args.observable and args.artifact == "synthetic":
        raise ValueError("--observable needs the preset's artifact file; pass --no_observable with synthetic")
    first = next(iter(configs.values()))
    spec = first.env  # every agent's environment (--set env.* included)
    if args.observable:  # an observation the table cannot read is refused before anything trains
        from eval.observable_oracle import observed_information
        from meg_jax.rl.evaluate import make_env

        observed_information(make_env(spec, num_envs=1, discrete=True).params, spec.observe)
    os.makedirs(args.out, exist_ok=True)
    per_seed, stats = {}, {}
    for algo, config in configs.items():
        workdir = os.path.join(args.out, algo)
        result, seconds = _train(config, workdir)
        evals = _seed_evals(config, workdir)
        env_steps = float(np.asarray(result.state.env_steps).reshape(-1)[0])
        updates = float(np.asarray(agents.gradient_updates(config, result.state)).reshape(-1)[0])
        stats[algo] = (env_steps, seconds, updates)
        per_seed[algo] = evals
        print(format_table([summarise_agent(algo, evals, None, *stats[algo])]).splitlines()[-1], flush=True)
    # every agent's seeds against the oracle and the observable table at their own mean costs, on
    # the same requests (the environment of the runs)
    seeds = sorted(r["seed"] for r in next(iter(per_seed.values())))
    by_seed = {algo: {r["seed"]: r for r in evals} for algo, evals in per_seed.items()}
    costs = {s: [np.multiply(by_seed[a][s]["costs_over_limit"], by_seed[a][s]["limits"]) for a in by_seed]
             for s in seeds}
    n_agents = len(by_seed)
    anyone = next(iter(by_seed.values()))
    fixed = {s: anyone[s]["fixed_quality"] for s in seeds}
    # after the agents' own costs, the limits and each limit lowered by SENSITIVITY_STEP (frontier_sensitivity)
    at_costs = {s: costs[s] + limit_probes(anyone[s]["limits"]) for s in seeds}
    ceiling = None
    references: dict[str, Any] = {}
    if args.observable:
        from eval.observable_oracle import observable_ceiling

        ceiling = observable_ceiling(spec, seeds, args.episodes, args.fit_episodes, args.bin_db,
                                     episode_length=_episode_length(first),
                                     at_costs=at_costs if args.equal_cost else None)
        for evals in per_seed.values():
            for r in evals:  # the same requests: the fixed action's quality agrees to rounding
                assert abs(r["fixed_quality"] - ceiling[r["seed"]]["fixed_quality"]) < 1e-4, (r, ceiling[r["seed"]])
        tol = FEASIBILITY_TOLERANCE
        references["observable"] = {
            "quality": float(np.median([c["quality"] for c in ceiling.values()])),
            "worst_latency_over_limit": max(c["latency_over_limit"] for c in ceiling.values()),
            "worst_energy_over_limit": max(c["energy_over_limit"] for c in ceiling.values()),
            "feasible_seeds": sum(c["latency_over_limit"] <= tol and c["energy_over_limit"] <= tol
                                  for c in ceiling.values()),
            "seeds": len(ceiling),
            "gap_closed": float(np.median([c["gap_closed"] for c in ceiling.values()])),
            "observes": ceiling[seeds[0]]["observes"],
            "per_seed": {str(k): v for k, v in ceiling.items()},
        }
    oracle_q = None
    if args.equal_cost:
        from eval.observable_oracle import equal_cost_oracle

        oracle_q = equal_cost_oracle(spec, at_costs, args.episodes)
        frontiers = {"oracle": {s: oracle_q[s][n_agents:] for s in seeds}}
        if ceiling is not None:
            frontiers["observable"] = {s: ceiling[s]["at_costs"][n_agents:] for s in seeds}
        references["frontier_sensitivity"] = {"step": SENSITIVITY_STEP, "frontiers": list(frontiers),
                                              **{k: frontier_sensitivity(v, fixed) for k, v in frontiers.items()}}
    rows = []
    for i, algo in enumerate(per_seed):
        rows.append(summarise_agent(
            algo, per_seed[algo], ceiling, *stats[algo],
            equal_cost=None if oracle_q is None else {s: oracle_q[s][i] for s in seeds},
            equal_cost_observable=None if oracle_q is None or ceiling is None
            else {s: ceiling[s]["at_costs"][i] for s in seeds}))
    out = {"settings": dataclasses.asdict(args), "rows": rows, "per_seed": per_seed, "references": references}
    table = format_table(rows, references)
    stem = "compare-deterministic" if args.deterministic else "compare"  # a re-score keeps the sampled table
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(table + "\n")
    return out


def _episode_length(config: Any) -> int:
    from meg_jax.rl.evaluate import make_env

    return int(make_env(config.env, num_envs=1, discrete=True).episode_length)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from meg_jax import config as config_lib
    from meg_jax import job_setup

    argv = sys.argv[1:] if argv is None else list(argv)
    args = config_lib.parse_cli(Args, argv, prog="python -m eval.compare", description=__doc__.split("\n")[0])
    job_setup.configure_logging()
    job_setup.enable_compile_cache(True)
    try:
        out = compare(args)
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"python -m eval.compare: error: {e}\n")
        return 2
    print(format_table(out["rows"], out["references"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
