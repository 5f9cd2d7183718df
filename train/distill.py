"""Distillation job: classifier, VAE, teacher LDM and the step-conditioned student.

Stages, in order: classifier, vae, decoder (decoder refinement, encoder frozen), teacher,
teacher_ft (teacher continuation on more latents), student. The two refinements keep the
latent space and can be switched off (``--decoder None``).

    python -m train.distill --preset tiny --stage all --workdir runs/tiny
    python -m train.distill --preset tiny --stage student --workdir runs/tiny --student.steps 400
    python -m train.distill --preset tiny --stage all --workdir runs/tiny --decoder None --teacher_ft None
    python -m train.distill --preset tiny --workdir runs/tiny --export checkpoints/tiny

Continuing from a shipped backbone (``--init_from`` writes its weights as the finished stages
before ``--stage``; ``--student.init_weights`` starts the student from the shipped student
instead of the teacher; ``meg_jax.distill.seeding``)::

    python -m train.distill --preset tiny --workdir runs/more --init_from checkpoints/tiny \
        --stage student --student.init_weights checkpoints/tiny --student.steps 150

Distilling a diffusers Stable Diffusion folder on image–caption data (only the student stage
runs; ``--export`` then writes a diffusers pipeline folder of the student at K
``--export_steps``)::

    python -m train.distill --preset tiny --workdir runs/sd --pipeline.teacher path/to/sd15 \
        --pipeline.data path/to/images --student.batch_size 64 --parallel.params fsdp \
        --compute.dtype bfloat16 --compute.rollout_remat --export runs/sd/student_k4 --export_steps 4

On several hosts run the same command on each with ``--distributed`` (README, "Distilling your
own model on a pod").

``--preset`` picks the defaults (``tiny``: the shipped checkpoints; ``test``: seconds per
stage); every field of ``meg_jax.distill.config.DistillConfig`` is then a flag
(``--student.steps 400``, ``--vae.learning_rate 3e-4``); ``--preset test --help`` lists them
with that preset's defaults.

(``meg-jax distill ...`` is the same command.) Rerunning a command resumes every unfinished
stage from its latest checkpoint; a work directory made with other settings is refused with
the differing fields named. NaN in the loss stops the job (exit status 3) with the last good
checkpoint kept. The resolved config is written to ``WORKDIR/config.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any, Callable, Literal, Optional, Sequence

from meg_jax import config as config_lib
from meg_jax.distill import config as distill_config

__all__ = ["main", "parse_args", "Args"]

log = logging.getLogger("train.distill")

DistillFlags = config_lib.inline(distill_config.DistillConfig)


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m train.distill`` (= ``meg-jax distill``); every DistillConfig field is one too."""

    workdir: str  # run directory (checkpoints, metrics, config)
    # which stage to run; 'all' runs every stage the preset enables, in order (finished ones are
    # skipped; decoder and teacher_ft are optional refinements)
    stage: Literal["classifier", "vae", "decoder", "teacher", "teacher_ft", "student", "ue_decoder", "all",
                   "none"] = "all"
    # an exported backbone folder (e.g. checkpoints/tiny): first write its weights into the work
    # directory as the finished stages before --stage (every enabled stage with --stage all or
    # none), so training continues from a shipped checkpoint (meg_jax.distill.seeding)
    init_from: Optional[str] = None
    export: Optional[str] = None  # after the stages, write the compact shipped form here (e.g. checkpoints/tiny)
    # with --pipeline.*: the K of the exported diffusers student (None: the largest student.step_counts)
    export_steps: Optional[int] = None
    distributed: bool = False  # call jax.distributed.initialize() first (one process per host)
    coordinator: Optional[str] = None  # coordinator address host:port (None: from the cluster env)
    num_processes: Optional[int] = None  # number of processes (None: from the cluster env)
    process_id: Optional[int] = None  # this process's id (None: from the cluster env)
    progress: bool = True  # show the progress bars
    compile_cache: bool = True  # persistent XLA compilation cache in the user cache dir (meg_jax.job_setup)
    config: DistillFlags = distill_config.preset("tiny")


def parse_with_preset(args_cls: type, argv: Sequence[str], prog: str, describe: Callable[[str], str]) -> Any:
    """``argv`` -> ``args_cls`` flags whose ``config`` starts from ``--preset``'s DistillConfig.

    ``describe(preset name)`` is the ``--help`` description. Shared by the distillation jobs.

    Raises:
      SystemExit: ``--help`` (0); an unknown preset or field, a malformed value (2, naming it).
    """
    argv = list(argv)
    name = config_lib.flag_value(argv, "--preset") or "tiny"
    try:
        base = distill_config.preset(name)
    except ValueError as e:
        sys.stderr.write(f"{prog}: error: --preset: {e}\n")
        raise SystemExit(2) from e
    return config_lib.parse_cli(args_cls, argv, prog=prog, description=describe(name), config=base)


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> job flags with the resolved config (``--preset`` picks the defaults).

    Raises:
      SystemExit: ``--help`` (0); an unknown preset or field, a malformed value (2, naming it).
    """
    def describe(name: str) -> str:
        return ("Train the attribute classifier, VAE, teacher LDM and the step-conditioned student on "
                "procedural data, or (--pipeline.teacher FOLDER --pipeline.data DATA) distil a diffusers "
                "SD pipeline on image-caption data; resume; export. --preset picks the defaults "
                f"({' or '.join(sorted(distill_config.PRESETS))}; shown: {name}).")

    return parse_with_preset(Args, argv, "python -m train.distill", describe)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help, or a bad flag (already reported)
        return int(e.code or 0)
    # Imported after parsing so --help is quick.
    from meg_jax import job_setup
    from meg_jax.checkpoint import ConfigMismatchError
    from meg_jax.distill import train
    from meg_jax.data.sources import DataRecordError
    from meg_jax.run_log import NonFiniteError

    job_setup.configure_logging()
    if args.distributed:
        job_setup.init_distributed(args.coordinator, args.num_processes, args.process_id)
    job_setup.enable_compile_cache(args.compile_cache)
    config = args.config
    all_stages = ("student",) if config.pipeline is not None else distill_config.STAGES
    stages = {"all": all_stages, "none": ()}.get(args.stage, (args.stage,))
    if config.pipeline is not None and set(stages) - {"student"}:
        log.error("with a pipeline teacher (--pipeline.*) only the student stage runs; got --stage %s", args.stage)
        return 2
    if args.stage in distill_config.OPTIONAL_STAGES and getattr(config, args.stage) is None:
        log.error("stage %r is off (--%s None); use a preset that enables it (tiny does) and do not "
                  "pass --%s None", args.stage, args.stage, args.stage)
        return 2
    start = time.time()
    try:
        if args.init_from:
            from meg_jax.distill import seeding

            seeded = seeding.seed_workdir(args.workdir, args.init_from, config,
                                          seeding.stages_to_seed(config, tuple(stages)))
            log.info("seeded %s of %s from %s", seeded or "no stage (already seeded)", args.workdir, args.init_from)
        finished = train.run(config, tuple(stages), args.workdir, progress=args.progress)
        if args.export:
            train.export(args.workdir, args.export, config, args.export_steps)
            log.info("exported the %s to %s", "student pipeline" if config.pipeline else "backbone", args.export)
    except ConfigMismatchError as e:
        log.error("%s", e)
        return 2
    except NonFiniteError as e:
        log.error("training diverged: %s. The last good checkpoint is kept in %s; lower the learning rate "
                  "(--STAGE.learning_rate ...) and rerun.", e, args.workdir)
        return 3
    except DataRecordError as e:  # a bad image or caption with --pipeline.on_error raise
        log.error("bad data record %s (--pipeline.on_error skip drops such records with a warning)", e)
        return 2
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("stages finished: %s; wall time %.0f s", finished, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
