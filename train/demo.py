"""``meg-jax demo``: the main job — train MEG-CVPO and PPO-Lagrangian on the shipped checkpoints, evaluate, report.

    meg-jax demo                          # a few minutes on a 2-core CPU; report in runs/demo/report.md
    meg-jax demo --preset tiny            # the same at the tiny model's own (microsecond) costs
    meg-jax demo --smoke                  # the same pipeline at a toy budget (under 2 minutes; tests)
    meg-jax demo --budget 60000 --workdir runs/demo-long
    meg-jax demo --recalibrate            # re-measure the calibration artifact first (minutes more)
    meg-jax demo --overwrite              # replace runs in WORKDIR made with other settings

Compiled programs are kept in the persistent XLA cache (``meg_jax.job_setup``; off with
``--no_compile_cache``), so a second run skips most compilation.

The default preset is ``sd15-mobile``: the tiny model's measured quality tables priced at a
real model's scale (Stable Diffusion 1.5 at 512 x 512 on an edge GPU and a phone NPU, system
energy), so latencies and energies are seconds and joules; the report adds the conventional
schemes' comparison at the other presets' costs (``tiny``, ``sdxl-mobile``).

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

import dataclasses
import logging
import os
import shutil
import sys
import time
from typing import Any, Optional, Sequence

__all__ = ["main", "parse_args", "Args", "DemoPlan", "plan", "check_shipped", "cost_preset_of", "MissingCheckpointError",
           "StaleRunError"]

log = logging.getLogger("train.demo")

DEFAULT_BACKBONE = "checkpoints/tiny"
DEFAULT_PRESET = "sd15-mobile"  # a real model's scale (see the module docstring)
# presets whose scheme comparison the report adds beside the trained preset's
COMPARISON_PRESETS = ("sd15-mobile", "tiny", "sdxl-mobile")
DEFAULT_BUDGET = 24_576  # environment steps per agent (the default run; see DemoPlan)
SMOKE_BUDGET = 512


class MissingCheckpointError(FileNotFoundError):
    """A shipped file the demo needs is missing (the message names it and the command that makes it)."""


class StaleRunError(ValueError):
    """A run directory of the demo holds a run made with other settings and ``--overwrite`` was not given."""


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


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``meg-jax demo``."""

    workdir: str = "runs/demo"  # where runs, plots and report.md go
    preset: str = DEFAULT_PRESET  # environment preset: sd15-mobile, tiny or sdxl-mobile
    budget: Optional[int] = None  # environment steps per agent (None: 24576; with --smoke 512)
    smoke: bool = False  # toy sizes: the whole pipeline in under 2 minutes
    checkpoints: str = DEFAULT_BACKBONE  # shipped backbone folder
    artifact: Optional[str] = None  # calibration artifact (.npz; None: the preset's, checkpoints/calibration/...)
    recalibrate: bool = False  # re-measure the calibration artifact with the backbone into WORKDIR/calibration
    seed: int = 0  # training and evaluation seed
    # replace runs in WORKDIR that were made with other settings (without it the demo stops and says so)
    overwrite: bool = False
    progress: bool = True  # show the progress bars
    compile_cache: bool = True  # persistent XLA compilation cache in the user cache dir (meg_jax.job_setup)


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> :class:`Args`.

    Raises:
      SystemExit: ``--help`` (0); an unknown flag or a malformed value (2, naming it).
    """
    from meg_jax import config as config_lib

    prog = "meg-jax demo"
    args = config_lib.parse_cli(Args, list(argv), prog=prog, description=__doc__.split("\n\n")[0])
    if args.budget is not None and args.budget < 1:
        sys.stderr.write(f"{prog}: error: --budget must be a positive number of environment steps, got {args.budget}\n")
        raise SystemExit(2)
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


def cost_preset_of(preset: str) -> str:
    """The calibration cost preset (``meg_jax.meg.costs.COST_PRESETS``) whose artifact ``preset`` reads.

    The preset's artifact file is named after it (``checkpoints/calibration/<cost preset>.npz``).
    """
    import meg_jax.env as menv

    return os.path.splitext(os.path.basename(menv.get_preset(preset).artifact_path))[0]


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


def _train(config: Any, workdir: str, progress: bool, overwrite: bool) -> float:
    """Runs ``train.cvpo`` into ``workdir``; a run there with other settings is replaced only if ``overwrite``.

    Raises:
      StaleRunError: ``workdir`` holds a run of another config and ``overwrite`` is False.
    """
    from meg_jax.checkpoint import ConfigMismatchError

    from . import cvpo as cvpo_job

    t0 = time.time()
    try:
        cvpo_job.run(config, workdir, progress=progress, evaluate=False)
    except ConfigMismatchError as e:
        if not overwrite:
            raise StaleRunError(
                f"{workdir} holds a run made with other settings ({e}). Nothing was changed: pass --overwrite "
                "to delete it and train afresh, or --workdir DIR to use another directory."
            ) from e
        log.warning("%s holds a run with other settings; --overwrite: deleting it and starting afresh", workdir)
        shutil.rmtree(workdir)
        cvpo_job.run(config, workdir, progress=progress, evaluate=False)
    return time.time() - t0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``meg-jax demo``)."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help, or a bad flag (already reported)
        return int(e.code or 0)
    t_start, cpu_start = time.time(), time.process_time()
    from meg_jax import job_setup

    job_setup.configure_logging()
    cache_dir = job_setup.enable_compile_cache(args.compile_cache)
    try:
        backbone_path, artifact_path = check_shipped(args.checkpoints, args.artifact, args.preset, args.recalibrate)
    except (MissingCheckpointError, NotADirectoryError) as e:  # NotADirectoryError: a bad $MEG_JAX_CHECKPOINTS
        log.error("%s", e)
        return 2
    except ValueError as e:
        log.error("%s", e)
        return 2
    p = plan(args.budget, args.smoke)
    os.makedirs(args.workdir, exist_ok=True)
    timings: dict[str, float] = {}
    from meg_jax.run_log import progress as progress_bar

    stages = ["calibrate"] if args.recalibrate else []
    stages += ["MEG-CVPO", "PPO-Lagrangian", "evaluate", "report"]
    bar = progress_bar(len(stages), desc="demo", disable=not args.progress)
    log.info("meg-jax demo: preset %s, %d env steps per agent, backbone %s, workdir %s%s; compilation cache %s",
             args.preset, p.budget, backbone_path, args.workdir, " (smoke)" if args.smoke else "", cache_dir or "off")

    if args.recalibrate:
        from meg_jax.meg.calibrate import CalibrationConfig, run as calibrate

        t0 = time.time()
        cal = CalibrationConfig(checkpoint=backbone_path, out_dir=os.path.join(args.workdir, "calibration"),
                                cost_presets=(cost_preset_of(args.preset),),
                                prompts_per_class=4 if args.smoke else 32)
        paths = calibrate(cal, command="meg-jax demo --recalibrate", progress=args.progress, log=log.info)
        artifact_path = next(iter(paths.values()))
        timings["calibrate"] = time.time() - t0
        bar.update(1)

    run_dirs = []
    for algo, label in (("cvpo", "MEG-CVPO"), ("ppo_lag", "PPO-Lagrangian")):
        bar.set_description(f"demo: {label}")
        config = _run_config(algo, p, args.preset, artifact_path, args.seed)
        run_dir = os.path.join(args.workdir, algo)
        log.info("training %s for %d env steps (%d parallel envs) -> %s", label, p.budget, p.num_envs, run_dir)
        try:
            cpu0 = time.process_time()
            timings[label] = _train(config, run_dir, args.progress, args.overwrite)
            log.info("  %s: %.0f s wall, %.0f s CPU", label, timings[label], time.process_time() - cpu0)
        except (ValueError, FileNotFoundError) as e:
            bar.close()
            log.error("%s", e)
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
        extra_presets=tuple(x for x in COMPARISON_PRESETS if x != args.preset),
        progress=lambda m: log.info("  [%6.1f s, CPU %6.1f s] %s", time.time() - t_start,
                                    time.process_time() - cpu_start, m),
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
                       "load_average_1min": load, "cpu_count": os.cpu_count(), "compile_cache": cache_dir}
    path = report.write_report(results, args.workdir, title=f"meg-jax demo report ({args.preset})", preamble=preamble)
    timings["report"] = time.time() - t0
    bar.update(1)
    bar.close()
    sys.stdout.write("\n" + report.format_summary_table(results["comparisons"][0]) + "\n\n")  # the result: stdout
    sys.stdout.write(f"report: {path}\n")
    log.info("demo finished in %.0f s (CPU time %.0f s, load average %.1f on %d CPUs); report: %s",
             time.time() - t_start, time.process_time() - cpu_start, os.getloadavg()[0], os.cpu_count(), path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
