"""``python -m train.calibrate`` (= ``meg-jax calibrate``): measure MEG's quality grid, write artifacts.

Loads the shipped backbone, measures quality on the (K, r, SNR, task class) grid with the real
split pipeline and writes one calibration artifact per cost preset to ``--out``
(``checkpoints/calibration/<preset>.npz`` by default, which the environment presets read).

Examples::

    python -m train.calibrate                                   # the shipped default
    python -m train.calibrate --link-mode digital --bits 8      # -> <preset>-digital8.npz
    python -m train.calibrate --set prompts_per_class=128 --set batch_size=256
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from typing import Sequence

from meg_jax import config as config_lib
from meg_jax.meg.calibrate import CalibrationConfig, run


def parse(argv: Sequence[str]) -> CalibrationConfig:
    """Command line -> validated ``CalibrationConfig``."""
    parser = argparse.ArgumentParser(prog="meg-jax calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="backbone folder (default checkpoints/tiny)")
    parser.add_argument("--out", dest="out_dir", help="artifact folder (default checkpoints/calibration)")
    parser.add_argument("--presets", help="comma-separated cost presets (default tiny,sd15-512,sdxl-1024)")
    parser.add_argument("--link-mode", dest="link_mode", choices=("analog", "digital"))
    parser.add_argument("--fading", choices=("awgn", "rayleigh"))
    parser.add_argument("--bits", type=int, choices=(4, 6, 8))
    parser.add_argument("--prompts-per-class", dest="prompts_per_class", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any CalibrationConfig field (repeatable)")
    args = parser.parse_args(list(argv))
    config = CalibrationConfig()
    direct = {k: v for k, v in vars(args).items() if k not in ("set", "presets") and v is not None}
    if args.presets:
        direct["cost_presets"] = tuple(p.strip() for p in args.presets.split(",") if p.strip())
    config = dataclasses.replace(config, **direct)
    config = config_lib.apply_overrides(config, args.set)
    return config.validate()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse(argv)
    command = "meg-jax calibrate" + ("" if not argv else " " + shlex.join(argv))
    paths = run(config, command=command)
    for preset, path in paths.items():
        print(f"{preset}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
