"""Train the merging-aware UE decoder from a shipped backbone, and ship it beside the VAE.

    export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    python -m train.ue_decoder --backbone checkpoints/tiny --workdir runs/ue --export checkpoints/tiny
    python -m train.ue_decoder --backbone checkpoints/tiny --workdir runs/ue2 --ue_decoder.steps 500

The ``ue_decoder`` stage (``meg_jax.distill.config.UEDecoderStageConfig``) starts from the
folder's refined VAE decoder, keeps its encoder frozen and fine-tunes the decoder on latents
sent through the split pipeline's merge -> link -> unmerge path at a merge ratio and SNR drawn
per sample (``meg_jax.distill.objectives.ue_decoder_loss_fn``). ``--export DIR`` then writes
only ``DIR/ue_decoder/`` (config.json with the stage config, steps, seed and the sha256 of
the VAE it started from; ``decoder.safetensors``, float32): every other component stays byte
for byte, and ``meg_jax.checkpoint.load_backbone(DIR)`` picks it up.

In a work directory of ``python -m train.distill`` the same stage runs as ``--stage
ue_decoder`` (from the decoder stage's weights); this command needs only the shipped folder.
``--preset`` picks the defaults of every field (``--ue_decoder.steps 1500``,
``--ue_decoder.learning_rate 3e-4``); rerunning resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Optional, Sequence

from meg_jax import config as config_lib
from meg_jax.distill import config as distill_config

__all__ = ["main", "parse_args", "Args"]

log = logging.getLogger("train.ue_decoder")

DistillFlags = config_lib.inline(distill_config.DistillConfig)


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m train.ue_decoder``; every DistillConfig field is one too."""

    workdir: str  # run directory (the stage's checkpoints, metrics and final params go to WORKDIR/ue_decoder)
    backbone: str = "checkpoints/tiny"  # shipped backbone folder whose VAE the stage starts from
    export: Optional[str] = None  # after training, write DIR/ue_decoder/ (e.g. the same checkpoints/tiny)
    progress: bool = True  # show the progress bar
    compile_cache: bool = True  # persistent XLA compilation cache (meg_jax.job_setup)
    config: DistillFlags = distill_config.preset("tiny")


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> flags with the resolved config (``--preset`` picks the defaults).

    Raises:
      SystemExit: ``--help`` (0); an unknown preset or field, a malformed value (2, naming it).
    """
    from train.distill import parse_with_preset

    return parse_with_preset(Args, argv, "python -m train.ue_decoder", lambda _: __doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help, or a bad flag (already reported)
        return int(e.code or 0)
    from meg_jax import job_setup
    from meg_jax.checkpoint import ConfigMismatchError
    from meg_jax.distill import train
    from meg_jax.run_log import NonFiniteError

    job_setup.configure_logging()
    job_setup.enable_compile_cache(args.compile_cache)
    start = time.time()
    try:
        done = train.run_ue_decoder_from_backbone(args.config, args.backbone, args.workdir, progress=args.progress)
        if done and args.export:
            train.export_ue_decoder(args.workdir, args.export, args.config)
            log.info("wrote %s/ue_decoder", args.export)
    except ConfigMismatchError as e:
        log.error("%s", e)
        return 2
    except NonFiniteError as e:
        log.error("training diverged: %s; lower --ue_decoder.learning_rate and rerun in a new --workdir", e)
        return 3
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("ue_decoder %s; wall time %.0f s", "finished" if done else "stopped", time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
