"""Evaluate trained MEG policies (or the shipped checkpoints) and write a report with plots.

    python -m eval.evaluate runs/cvpo-tiny-0                  # one train.cvpo run directory
    python -m eval.evaluate runs/demo                         # every run directory below it
    python -m eval.evaluate checkpoints                       # shipped backbone + calibration, no policy
    python -m eval.evaluate runs/demo --episodes 256 --sweep_blocks 200 --out /tmp/report

(``meg-jax evaluate ...`` is the same command.) ``RUN_DIR`` is a directory written by
``python -m train.cvpo`` (``config.json`` + ``checkpoints/``), a directory holding several of
them (e.g. the demo's ``runs/demo`` with ``cvpo/`` and ``ppo_lag/``), or a folder without
runs (then the Lagrangian oracle stands in for a policy). Writes to ``--out`` (default
``RUN_DIR/eval``): ``metrics.json``, ``report.md`` and one PNG per report item — (1) latency
and UE energy against the conventional schemes at matched quality, (2) constraints and λ
during training, (3) the trade-off over latency limits, (4) chosen K and r against SNR and
task class, (5) images at the policy's choices beside the teacher's, (6) robustness to a
shifted channel.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Optional, Sequence

import tyro

__all__ = ["main", "parse_args", "Args"]

log = logging.getLogger("eval.evaluate")

DEFAULT_BACKBONE = "checkpoints/tiny"


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``meg-jax evaluate``."""

    # train.cvpo run dir, a folder of them, or a checkpoints folder
    run_dir: tyro.conf.Positional[str]
    episodes: int = 1024  # fresh evaluation episodes (>= 2)
    out: Optional[str] = None  # report folder (None: RUN_DIR/eval)
    preset: str = "tiny"  # environment preset when RUN_DIR holds no run
    # backbone folder for the images (None: checkpoints/tiny if it exists; 'none' skips the images)
    backbone: Optional[str] = None
    sweep_blocks: int = 0  # retrain MEG-CVPO at each swept latency limit for this many blocks (0: oracle/fixed only)
    # swept latency limits, as fractions from the lowest reachable latency to max-quality's
    sweep_fractions: tuple[float, ...] = (0.15, 0.35, 0.6, 1.0)
    image_snrs: tuple[float, ...] = (0.0, 10.0, 25.0)  # true SNRs (dB) of the images at the policy's choices
    grid: bool = True  # draw the (K, r) image grid
    seed: int = 0  # evaluation key
    artifact: Optional[str] = None  # calibration artifact .npz, or 'synthetic' for the synthetic test artifact
    compile_cache: bool = True  # persistent XLA compilation cache in the user cache dir (meg_jax.job_setup)


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> :class:`Args`.

    Raises:
      SystemExit: ``--help`` (0); an unknown flag or a bad value (2, naming it).
    """
    from meg_jax import config as config_lib

    prog = "meg-jax evaluate"
    args = config_lib.parse_cli(Args, argv, prog=prog, description=__doc__.split("\n\n")[0])
    if args.episodes < 2:
        sys.stderr.write(f"{prog}: error: --episodes must be >= 2, got {args.episodes}\n")
        raise SystemExit(2)
    if args.sweep_blocks < 0:
        sys.stderr.write(f"{prog}: error: --sweep_blocks must be >= 0, got {args.sweep_blocks}\n")
        raise SystemExit(2)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (also ``meg-jax evaluate``)."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help, or a bad flag (already reported)
        return int(e.code or 0)
    from meg_jax import job_setup

    job_setup.configure_logging()
    if not os.path.isdir(args.run_dir):
        log.error("%s is not a directory", args.run_dir)
        return 2
    job_setup.enable_compile_cache(args.compile_cache)
    from . import orchestrate, report
    from .runs import find_runs

    runs = find_runs(args.run_dir)
    backbone_path = args.backbone
    if backbone_path is None:
        from meg_jax import shipped

        for candidate in (os.path.join(args.run_dir, "tiny"), shipped.resolve(DEFAULT_BACKBONE)):
            if os.path.isfile(os.path.join(candidate, "backbone.json")):
                backbone_path = candidate
                break
    if backbone_path == "none":
        backbone_path = None
    elif backbone_path is not None and not os.path.isfile(os.path.join(backbone_path, "backbone.json")):
        log.error("%s/backbone.json not found; make the backbone with `python -m train.distill --preset tiny "
                  "--workdir runs/tiny --export %s` or pass --backbone none", backbone_path, backbone_path)
        return 2
    artifact = None
    if args.artifact == "synthetic":
        from meg_jax.meg.artifact import synthetic_artifact

        artifact = synthetic_artifact()
    elif args.artifact is not None:
        from meg_jax.meg.artifact import load

        artifact = load(args.artifact)
    out = args.out or os.path.join(args.run_dir, "eval")
    log.info("evaluating %d run(s) in %s: %s", len(runs), args.run_dir, ", ".join(runs) or "none (oracle stands in)")
    t0 = time.time()
    try:
        results = orchestrate.evaluate_runs(
            runs, episodes=args.episodes, preset=args.preset, sweep_blocks=args.sweep_blocks,
            sweep_fractions=args.sweep_fractions, backbone_path=backbone_path,
            image_snrs_db=args.image_snrs, grid_steps=(1, 2, 4, 8) if args.grid else (),
            seed=args.seed, artifact=artifact, progress=lambda m: log.info("  [%6.1f s] %s", time.time() - t0, m),
        )
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    path = report.write_report(results, out, title=f"MEG evaluation: {args.run_dir}")
    sys.stdout.write(report.format_summary_table(results["comparisons"][0]) + "\n")  # the result: stdout
    log.info("wrote %s and %s in %.0f s", path, os.path.join(out, "metrics.json"), time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
