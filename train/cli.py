"""The ``meg-jax`` console script: one entry point with a subcommand per job.

Each subcommand forwards its remaining arguments to the job module's ``main(argv)``, so
``meg-jax distill ...`` and ``python -m train.distill ...`` are the same thing.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import job_module

# subcommand -> (module with main(argv), one-line help); module names are relative to the jobs'
# parent (the repository root, or ``meg_jax_jobs`` when installed: see train/__init__.py)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("train.demo", "run the main job on the shipped small checkpoints and write a report"),
    "distill": ("train.distill", "train the VAE, teacher and step-conditioned student (python -m train.distill)"),
    "calibrate": ("train.calibrate", "measure quality on the (K, r, SNR) grid and write the calibration artifact"),
    "train": ("train.cvpo", "train MEG-CVPO or a baseline on the channel environment (python -m train.cvpo)"),
    "evaluate": ("eval.evaluate", "evaluate a run directory or the shipped checkpoints and write a report"),
    "compare": ("eval.compare", "train every learned agent on one preset and write one comparison table"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="meg-jax",
        description="Mobile edge generation in JAX: distil a step-conditioned LDM, calibrate "
        "the split system, train MEG-CVPO, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        parser.error(f"unknown command {command!r}; choose from {sorted(SUBCOMMANDS)}")
    module_name = SUBCOMMANDS[command][0]
    try:
        module = job_module(module_name)
    except ModuleNotFoundError as e:
        if not (e.name or "").endswith(module_name):
            raise
        parser.error(f"command {command!r} is not available in this installation ({module_name} is missing)")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
