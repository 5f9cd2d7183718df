"""``meg-jax demo``: the main job — train MEG-CVPO and PPO-Lagrangian on the shipped checkpoints, evaluate, report.

    meg-jax demo                          # ~10 minutes on a 2-core CPU; report in runs/demo/report.md
    meg-jax demo --smoke                  # the same pipeline at a toy budget (under 2 minutes; tests)
    meg-jax demo --budget 60000 --workdir runs/demo-long
    meg-jax demo --recalibrate            # re-measure the calibration artifact first (minutes more)

Steps: (0) check the shipped backbone (``checkpoints/tiny``) and calibration artifact
(``checkpoints/calibration/<preset>.npz``), or re-measure the artifact into
``WORKDIR/calibration`` with ``--recalibrate``; (1) train MEG-CVPO and (2) PPO-Lagrangian
on the channel environment of ``--preset`` with ``--budget`` environment steps each
(``python -m train.cvpo`` run directories ``WORKDIR/cvpo`` and ``WORKDIR/ppo_lag``); (3)
evaluate both on fresh episodes beside the oracle, the fixed policies and the conventional
schemes, retrain CVPO at several latency limits (one vmapped run), test robustness to a
shifted channel and generate images with the backbone at the policy's choices; (4) write
``WORKDIR/report.md`` with plots and ``WORKDIR/metrics.json``, print the summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from typing import Any, Optional, Sequence

__all__ = ["main", "parse_args", "DemoPlan", "plan", "check_shipped", "MissingCheckpointError"]

DEFAULT_BACKBONE = "checkpoints/tiny"
DEFAULT_BUDGET = 24_576  # environment steps per agent (the default run; see DemoPlan)
SMOKE_BUDGET = 512


class MissingCheckpointError(FileNotFoundError):
    """A shipped file the demo needs is missing (the message names it and the command that makes it)."""


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run (derived from ``--budget`` and ``--smoke``)."""

    budget: int  # environment steps per agent
    num_envs: int  # parallel environments during training
    episode_length: int  # requests per episode
    eval_episodes: int  # fresh evaluation episodes
    cvpo_hidden: tuple[int, ...]  # actor and critic widths
    batch_size: int  # CVPO batch
    num_action_samples: int  # CVPO M
    target_samples: int  # CVPO next-state actions in the critic target
    updates_per_block: int  # CVPO gradient updates per vectorised env step
    min_replay: int  # CVPO warm-up transitions
    replay_capacity: int  # CVPO replay size
    ppo_rollout: int  # PPO-Lagrangian rollout length
    sweep_blocks: int  # CVPO blocks per swept latency limit (0: oracle/fixed only)
    sweep_fractions: tuple[float, ...]  # swept latency limits (see eval.orchestrate.sweep_latency_limits)
    image_snrs_db: tuple[float, ...]  # channel states of the item-5 images
    grid_steps: tuple[int, ...]  # (K, r) image grid rows
    grid_ratios: tuple[float, ...]  # and columns
    blocks_per_log: int  # CVPO blocks per logged iteration


def plan(budget: Optional[int], smoke: bool) -> DemoPlan:
    """The run sizes for ``--budget`` (env steps per agent) and ``--smoke``."""
    if smoke:
        budget = budget or SMOKE_BUDGET
        return DemoPlan(
            budget=budget, num_envs=16, episode_length=16, eval_episodes=64, cvpo_hidden=(32, 32), batch_size=64,
            num_action_samples=8, target_samples=4, updates_per_block=2, min_replay=128, replay_capacity=2048,
            ppo_rollout=16, sweep_blocks=8, sweep_fractions=(0.3, 1.0), image_snrs_db=(0.0, 20.0),
            grid_steps=(1, 8), grid_ratios=(0.0, 0.5), blocks_per_log=4,
        )
    budget = budget or DEFAULT_BUDGET
    num_envs = 32
    return DemoPlan(
        budget=budget, num_envs=num_envs, episode_length=32, eval_episodes=1024, cvpo_hidden=(64, 64),
        batch_size=128, num_action_samples=16, target_samples=8, updates_per_block=4, min_replay=1024,
        replay_capacity=32_768, ppo_rollout=32, sweep_blocks=max(8, budget // (2 * num_envs)),
        sweep_fractions=(0.15, 0.35, 0.6, 1.0), image_snrs_db=(0.0, 10.0, 25.0), grid_steps=(1, 2, 4, 8),
        grid_ratios=(0.0, 0.25, 0.5, 0.75), blocks_per_log=max(1, budget // (num_envs * 24)),
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meg-jax demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where runs, plots and report.md go (default runs/demo)")
    parser.add_argument("--preset", default="tiny", help="environment preset: tiny (default) or sdxl-mobile")
    parser.add_argument("--budget", type=int, default=None,
                        help=f"environment steps per agent (default {DEFAULT_BUDGET}; smoke {SMOKE_BUDGET})")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: the whole pipeline in under 2 minutes")
    parser.add_argument("--checkpoints", default=DEFAULT_BACKBONE, help="shipped backbone folder")
    parser.add_argument("--artifact", default=None,
                        help="calibration artifact (.npz; default the preset's, checkpoints/calibration/...)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="re-measure the calibration artifact with the backbone into WORKDIR/calibration")
    parser.add_argument("--seed", type=int, default=0, help="training and evaluation seed")
    parser.add_argument("--no-progress", action="store_true", help="hide the training progress bars")
    args = parser.parse_args(list(argv))
    if args.budget is not None and args.budget < 1:
        parser.error("--budget must be a positive number of environment steps")
    return args


def _resolve(path: str) -> str:
    """``path`` as given if it exists, else the shipped copy (``meg_jax.shipped.resolve``:
    ``$MEG_JAX_CHECKPOINTS`` or the checkpoints installed with meg-jax)."""
    from meg_jax import shipped

    return shipped.resolve(path)


def _shipped_hint() -> str:
    from meg_jax import shipped

    return shipped.missing_hint()


def check_shipped(checkpoints: str, artifact: Optional[str], preset: str, recalibrate: bool) -> tuple[str, Optional[str]]:
    """Paths of the backbone folder and the artifact; raises :class:`MissingCheckpointError` if absent."""
    import meg_jax.env as menv

    backbone = _resolve(checkpoints)
    if not os.path.isfile(os.path.join(backbone, "backbone.json")):
        raise MissingCheckpointError(
            f"the shipped backbone {os.path.join(checkpoints, 'backbone.json')} is missing. Make it with:\n"
            f"  python -m train.distill --preset tiny --workdir runs/tiny --export {checkpoints}\n"
            f"(or pass --checkpoints DIR; {_shipped_hint()})"
        )
    if recalibrate:
        return backbone, None
    if artifact is None:
        artifact = menv.get_preset(preset).artifact_path
    path = _resolve(artifact)
    if not os.path.isfile(path):
        raise MissingCheckpointError(
            f"the calibration artifact {artifact} is missing. Make it with:\n"
            f"  meg-jax calibrate --checkpoint {checkpoints}\n"
            f"(python -m train.calibrate; or run the demo with --recalibrate; {_shipped_hint()})"
        )
    return backbone, path


def _run_config(algo: str, p: DemoPlan, preset: str, artifact: str, seed: int) -> Any:
    from meg_jax.rl.config import CVPOConfig, EnvSpec, EvalConfig, PPOConfig, RunConfig

    cvpo = CVPOConfig(
        actor_hidden=p.cvpo_hidden, critic_hidden=p.cvpo_hidden, batch_size=p.batch_size,
        num_action_samples=p.num_action_samples, target_samples=p.target_samples,
        updates_per_block=p.updates_per_block, min_replay=p.min_replay, replay_capacity=p.replay_capacity,
    )
    ppo = PPOConfig(rollout_length=p.ppo_rollout)
    # a PPO block is a whole rollout (ppo_rollout env steps): log about as often as CVPO
    blocks_per_log = p.blocks_per_log if algo == "cvpo" else max(1, p.blocks_per_log // p.ppo_rollout)
    return RunConfig(
        algo=algo, seed=seed,
        env=EnvSpec(preset=preset, num_envs=p.num_envs, episode_length=p.episode_length, artifact=artifact),
        cvpo=cvpo, ppo=ppo, eval=EvalConfig(num_episodes=p.eval_episodes),
        total_env_steps=p.budget, blocks_per_log=blocks_per_log, checkpoint_every_logs=0, keep_checkpoints=1,
    )


def _train(config: Any, workdir: str, progress: bool) -> float:
    """Runs ``train.cvpo`` into ``workdir`` (a stale run of another config is replaced)."""
    from meg_jax.checkpoint import ConfigMismatchError

    from . import cvpo as cvpo_job

    t0 = time.time()
    try:
        cvpo_job.run(config, workdir, progress=progress, evaluate=False)
    except ConfigMismatchError:
        print(f"  {workdir} holds a run with other settings: starting it afresh")
        shutil.rmtree(workdir)
        cvpo_job.run(config, workdir, progress=progress, evaluate=False)
    return time.time() - t0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``meg-jax demo``)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    t_start, cpu_start = time.time(), time.process_time()
    try:
        backbone_path, artifact_path = check_shipped(args.checkpoints, args.artifact, args.preset, args.recalibrate)
    except (MissingCheckpointError, NotADirectoryError) as e:  # NotADirectoryError: a bad $MEG_JAX_CHECKPOINTS
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = plan(args.budget, args.smoke)
    os.makedirs(args.workdir, exist_ok=True)
    timings: dict[str, float] = {}
    from meg_jax.run_log import progress as progress_bar

    stages = ["calibrate"] if args.recalibrate else []
    stages += ["MEG-CVPO", "PPO-Lagrangian", "evaluate", "report"]
    bar = progress_bar(len(stages), desc="demo", disable=args.no_progress)
    print(f"meg-jax demo: preset {args.preset}, {p.budget} env steps per agent, backbone {backbone_path}, "
          f"workdir {args.workdir}" + (" (smoke)" if args.smoke else ""), flush=True)

    if args.recalibrate:
        from meg_jax.meg.calibrate import CalibrationConfig, run as calibrate

        t0 = time.time()
        cal = CalibrationConfig(checkpoint=backbone_path, out_dir=os.path.join(args.workdir, "calibration"),
                                cost_presets=("tiny",) if args.preset == "tiny" else ("sdxl-1024",),
                                prompts_per_class=4 if args.smoke else 32)
        paths = calibrate(cal, command="meg-jax demo --recalibrate", progress=not args.no_progress)
        artifact_path = next(iter(paths.values()))
        timings["calibrate"] = time.time() - t0
        bar.update(1)

    run_dirs = []
    for algo, label in (("cvpo", "MEG-CVPO"), ("ppo_lag", "PPO-Lagrangian")):
        bar.set_description(f"demo: {label}")
        config = _run_config(algo, p, args.preset, artifact_path, args.seed)
        run_dir = os.path.join(args.workdir, algo)
        print(f"training {label} for {p.budget} env steps ({p.num_envs} parallel envs) -> {run_dir}", flush=True)
        try:
            cpu0 = time.process_time()
            timings[label] = _train(config, run_dir, not args.no_progress)
            print(f"  {label}: {timings[label]:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU", flush=True)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        run_dirs.append(run_dir)
        bar.update(1)

    from . import job_module

    orchestrate, report = job_module("eval.orchestrate"), job_module("eval.report")
    bar.set_description("demo: evaluate")
    t0 = time.time()
    results = orchestrate.evaluate_runs(
        run_dirs, episodes=p.eval_episodes, sweep_blocks=p.sweep_blocks, sweep_fractions=p.sweep_fractions,
        backbone_path=backbone_path, image_snrs_db=p.image_snrs_db, grid_steps=p.grid_steps,
        grid_ratios=p.grid_ratios, seed=args.seed,
        progress=lambda m: print(f"  [{time.time() - t_start:6.1f} s, CPU {time.process_time() - cpu_start:6.1f} s] {m}",
                                 flush=True),
    )
    timings["evaluate"] = time.time() - t0
    bar.update(1)
    bar.set_description("demo: report")
    t0 = time.time()
    total = time.time() - t_start
    cmd = "meg-jax demo" + ("" if not argv else " " + " ".join(argv))
    cpu = time.process_time() - cpu_start
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    preamble = [
        f"Made by `{cmd}` in {total:.0f} s wall-clock before the report was written "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}; {cpu:.0f} s of CPU time in this process, "
        f"{os.cpu_count()} CPUs, 1-minute load average {load:.1f} at the end); "
        f"{p.budget} environment steps per agent, {p.eval_episodes} evaluation episodes of {p.episode_length} requests.",
        f"Backbone `{backbone_path}`; calibration artifact `{artifact_path}`.",
    ]
    results["demo"] = {"command": cmd, "plan": dataclasses.asdict(p), "timings_s": timings, "cpu_s": cpu,
                       "load_average_1min": load, "cpu_count": os.cpu_count()}
    path = report.write_report(results, args.workdir, title=f"meg-jax demo report ({args.preset})", preamble=preamble)
    timings["report"] = time.time() - t0
    bar.update(1)
    bar.close()
    print()
    print(report.format_summary_table(results["comparisons"][0]))
    print()
    print(f"demo finished in {time.time() - t_start:.0f} s (CPU time {time.process_time() - cpu_start:.0f} s, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs); report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
