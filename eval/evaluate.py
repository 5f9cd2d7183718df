"""Evaluate trained MEG policies (or the shipped checkpoints) and write a report with plots.

    python -m eval.evaluate runs/cvpo-tiny-0                  # one train.cvpo run directory
    python -m eval.evaluate runs/demo                         # every run directory below it
    python -m eval.evaluate checkpoints                       # shipped backbone + calibration, no policy
    python -m eval.evaluate runs/demo --episodes 256 --sweep-blocks 200 --out /tmp/report

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

import argparse
import os
import sys
import time
from typing import Optional, Sequence

__all__ = ["main", "parse_args"]

DEFAULT_BACKBONE = "checkpoints/tiny"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="train.cvpo run dir, a folder of them, or a checkpoints folder")
    parser.add_argument("--episodes", type=int, default=1024, help="fresh evaluation episodes (default 1024)")
    parser.add_argument("--out", default=None, help="report folder (default RUN_DIR/eval)")
    parser.add_argument("--preset", default="tiny", help="environment preset when RUN_DIR holds no run (default tiny)")
    parser.add_argument("--backbone", default=None,
                        help=f"backbone folder for the images (default {DEFAULT_BACKBONE} if it exists; 'none' skips)")
    parser.add_argument("--sweep-blocks", type=int, default=0,
                        help="retrain MEG-CVPO at each swept latency limit for this many blocks (0: oracle/fixed only)")
    parser.add_argument("--sweep-fractions", default="0.15,0.35,0.6,1.0",
                        help="swept latency limits, as fractions from the lowest reachable latency to max-quality's")
    parser.add_argument("--image-snrs", default="0,10,25", help="true SNRs (dB) of the images at the policy's choices")
    parser.add_argument("--no-grid", action="store_true", help="skip the (K, r) image grid")
    parser.add_argument("--seed", type=int, default=0, help="evaluation key")
    parser.add_argument("--artifact", default=None, help="'synthetic' to evaluate on the synthetic test artifact")
    args = parser.parse_args(list(argv))
    if args.episodes < 2:
        parser.error("--episodes must be >= 2")
    if args.sweep_blocks < 0:
        parser.error("--sweep-blocks must be >= 0")
    return args


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (also ``meg-jax evaluate``)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.isdir(args.run_dir):
        print(f"error: {args.run_dir} is not a directory", file=sys.stderr)
        return 2
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
        print(f"error: {backbone_path}/backbone.json not found; make the backbone with "
              f"`python -m train.distill --preset tiny --workdir runs/tiny --export {backbone_path}` or pass --backbone none",
              file=sys.stderr)
        return 2
    artifact = None
    if args.artifact == "synthetic":
        from meg_jax.meg.artifact import synthetic_artifact

        artifact = synthetic_artifact()
    elif args.artifact is not None:
        from meg_jax.meg.artifact import load

        artifact = load(args.artifact)
    out = args.out or os.path.join(args.run_dir, "eval")
    print(f"evaluating {len(runs)} run(s) in {args.run_dir}: " + (", ".join(runs) or "none (oracle stands in)"))
    t0 = time.time()
    try:
        results = orchestrate.evaluate_runs(
            runs, episodes=args.episodes, preset=args.preset, sweep_blocks=args.sweep_blocks,
            sweep_fractions=_floats(args.sweep_fractions), backbone_path=backbone_path,
            image_snrs_db=_floats(args.image_snrs), grid_steps=() if args.no_grid else (1, 2, 4, 8),
            seed=args.seed, artifact=artifact, progress=lambda m: print(f"  [{time.time() - t0:6.1f} s] {m}", flush=True),
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = report.write_report(results, out, title=f"MEG evaluation: {args.run_dir}")
    print(report.format_summary_table(results["comparisons"][0]))
    print(f"wrote {path} and {os.path.join(out, 'metrics.json')} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
