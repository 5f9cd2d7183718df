"""Distillation job: classifier, VAE, teacher LDM and the step-conditioned student.

Stages, in order: classifier, vae, decoder (decoder refinement, encoder frozen), teacher,
teacher_ft (teacher continuation on more latents), student. The two refinements keep the
latent space and can be switched off (``--set decoder=null``).

    python -m train.distill --preset tiny --stage all --workdir runs/tiny
    python -m train.distill --preset tiny --stage student --workdir runs/tiny --set student.steps=400
    python -m train.distill --preset tiny --stage all --workdir runs/tiny --set decoder=null --set teacher_ft=null
    python -m train.distill --preset tiny --workdir runs/tiny --export checkpoints/tiny

(``meg-jax distill ...`` is the same command.) Rerunning a command resumes every unfinished
stage from its latest checkpoint; a work directory made with other settings is refused with
the differing fields named. NaN in the loss stops the job (exit status 3) with the last good
checkpoint kept. The resolved config is written to ``WORKDIR/config.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.distill",
        description="Train the attribute classifier, VAE, teacher LDM and the step-conditioned "
        "student on procedural data; resume; export the compact checkpoints.",
    )
    parser.add_argument("--preset", default="tiny", help="distill preset: tiny (shipped) or test (seconds)")
    parser.add_argument("--stage", default="all",
                        choices=("classifier", "vae", "decoder", "teacher", "teacher_ft", "student", "all", "none"),
                        help="which stage to run; 'all' runs every stage the preset enables, in order "
                        "(finished ones are skipped; decoder and teacher_ft are optional refinements)")
    parser.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override, e.g. --set student.steps=100 (repeatable)")
    parser.add_argument("--export", default=None, metavar="DIR",
                        help="after the stages, write the compact shipped form to DIR (e.g. checkpoints/tiny)")
    parser.add_argument("--parallel.params", dest="parallel_params", choices=("replicated", "fsdp"), default=None,
                        help="parameter layout on the device mesh (same as --set parallel.params=...)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Imported after parsing so --help is instant.
    from meg_jax import config as config_lib
    from meg_jax.checkpoint import ConfigMismatchError
    from meg_jax.distill import config as distill_config
    from meg_jax.distill import train
    from meg_jax.run_log import NonFiniteError

    try:
        config = distill_config.preset(args.preset)
        overrides = list(args.overrides)
        if args.parallel_params is not None:
            overrides.append(f"parallel.params={args.parallel_params}")
        config = config_lib.apply_overrides(config, overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stages = {"all": distill_config.STAGES, "none": ()}.get(args.stage, (args.stage,))
    if args.stage in distill_config.OPTIONAL_STAGES and getattr(config, args.stage) is None:
        print(f"error: stage {args.stage!r} is off in preset {args.preset!r} ({args.stage} is null); "
              "use a preset that enables it (tiny does)", file=sys.stderr)
        return 2
    start = time.time()
    try:
        finished = train.run(config, tuple(stages), args.workdir, progress=not args.no_progress)
        if args.export:
            train.export(args.workdir, args.export, config)
            print(f"exported the backbone to {args.export}")
    except ConfigMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: training diverged: {e}. The last good checkpoint is kept in {args.workdir}; "
              "lower the learning rate (--set STAGE.learning_rate=...) and rerun.", file=sys.stderr)
        return 3
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"stages finished: {finished}; wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
