"""``python -m train.calibrate`` (= ``meg-jax calibrate``): measure MEG's quality grid, write artifacts.

Loads the shipped backbone, measures quality on the (K, r, SNR, task class) grid with the real
split pipeline and writes one calibration artifact per cost preset to ``--out``
(``checkpoints/calibration/<preset>.npz`` by default, which the environment presets read).

Examples::

    python -m train.calibrate                                   # the shipped default
    python -m train.calibrate --link_mode digital --bits 8      # -> <preset>-digital8.npz
    python -m train.calibrate --prompts_per_class 128 --batch_size 256 --cost_presets tiny
    python -m train.calibrate --no_measure --tables --accuracy_floor 0.9   # docs tables
    python -m train.calibrate --no_measure --grid_figure docs/images/meg_grid.png
    python -m train.calibrate --pipeline PATH --reference_steps 50 --steps 1 2 4 8 \
        --prompts prompts.txt --prompts_per_class 64 --cost_presets sd15-512   # a diffusers folder
    python -m train.calibrate --pipeline PATH --clip_model CLIP_DIR ...       # + the CLIP score

With ``--pipeline PATH`` (a diffusers SD 1.x/2.x, SDXL or LCM folder) quality is PSNR/MSE
against the pipeline's own ``--reference_steps``-step image (``meg_jax.meg.calibrate_pipeline``)
and the artifacts are ``<folder name>-<preset>.npz``. ``--clip_model CLIP_DIR`` (a transformers
``CLIPModel`` folder with its tokenizer) also measures each cell's mean CLIP score into the
artifact's optional ``clip_score`` table.

Every field of ``meg_jax.meg.calibrate.CalibrationConfig`` is a flag (``--steps 1 2 4 8``,
``--snr_db -5 0 10``, ``--out_dir DIR``); ``--help`` lists them with their defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import sys
from typing import Optional, Sequence

from meg_jax import config as config_lib
from meg_jax.meg.calibrate import CalibrationConfig, run

log = logging.getLogger("train.calibrate")

CalibrationFlags = config_lib.inline(CalibrationConfig)


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``meg-jax calibrate``; every CalibrationConfig field is one too."""

    measure: bool = True  # measure the grid (--no_measure: use the artifacts already in --out_dir)
    tables: bool = False  # print the docs' comparison tables (markdown) from the artifacts in --out_dir
    # quality floor of the tables' best fixed (K, r): mean attribute accuracy, or a fraction of
    # --floor_relative_to's accuracy at the same SNR
    accuracy_floor: float = 0.95
    floor_relative_to: str = "meg_uncompressed"  # conventional scheme the floor is relative to ('none': absolute)
    table_snrs: tuple[float, ...] = (0.0, 10.0, 20.0)  # SNRs (dB) of the tables
    grid_figure: Optional[str] = None  # write the (K rows x r columns) image grid at two SNRs here
    grid_snrs: tuple[float, float] = (0.0, 20.0)  # the two SNRs (dB) of the grid figure
    progress: bool = True  # show the progress bar
    compile_cache: bool = True  # persistent XLA compilation cache in the user cache dir (meg_jax.job_setup)
    config: CalibrationFlags = CalibrationConfig()


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> job flags with a validated ``CalibrationConfig``.

    Raises:
      SystemExit: ``--help`` (0); an unknown field, a malformed value or an invalid grid (2, naming it).
    """
    prog = "meg-jax calibrate"
    args = config_lib.parse_cli(Args, argv, prog=prog, description=__doc__.split("\n\n")[0])
    try:
        args.config.validate()
    except ValueError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        raise SystemExit(2) from e
    return args


def parse(argv: Sequence[str]) -> CalibrationConfig:
    """Command line -> validated ``CalibrationConfig``."""
    return parse_args(argv).config


def comparison_tables(config: CalibrationConfig, snrs: Sequence[float], accuracy_floor: float,
                      relative_to: str | None = "meg_uncompressed") -> str:
    """Markdown: per cost preset and SNR, the conventional schemes and the best fixed (K, r)."""
    from meg_jax.meg import artifact as artifact_lib
    from meg_jax.meg import calibrate as calibrate_lib
    from meg_jax.meg import schemes

    labels = {"centralised": "centralised (ES all, PNG)", "meg_uncompressed": "MEG uncompressed (teacher 50, r = 0)",
              "on_device": "on-device (UE all)", "meg_best_fixed": "MEG best fixed (K, r)"}
    out = []
    for preset in config.cost_presets:
        path = os.path.join(config.out_dir, calibrate_lib.artifact_filename(config, preset))
        art = artifact_lib.load(path)
        out.append(f"### `{preset}` ({art.link_mode} link, B = {art.bandwidth_hz / 1e6:g} MHz, "
                   f"ES {art.provenance['es_device']}, UE {art.provenance['ue_device']})\n")
        out.append("| SNR (dB) | scheme | (K, r) | latency (s) | UE energy (J) | accuracy | PSNR (dB) |")
        out.append("|---:|---|---|---:|---:|---:|---:|")
        for snr in snrs:
            rows = schemes.comparison_rows(art, snr, accuracy_floor, relative_to)
            unc = next(r for r in rows if r["name"] == "meg_uncompressed")
            for r in rows:
                kr = f"({r['steps']}, {r['merge_ratio']:g})" if r.get("steps") else ""
                if r["name"] == "meg_best_fixed":
                    kr += f" (floor {r['floor']:.3f})"
                    if r.get("steps"):
                        cut = 1.0 - r["latency_s"] / unc["latency_s"]
                        kr += f", latency {-100 * cut:+.1f}% vs uncompressed"
                out.append(f"| {snr:g} | {labels[r['name']]} | {kr} | {r['latency_s']:.4g} | "
                           f"{r['ue_energy_j']:.4g} | {r['accuracy']:.3f} | {r['psnr']:.2f} |")
        out.append("")
    return "\n".join(out)


def grid_figure(config: CalibrationConfig, path: str, snrs: Sequence[float], prompt_index: int = 0) -> None:
    """Images of one prompt: rows K, columns r (+ the teacher reference), one panel per SNR."""
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from meg_jax.checkpoint import load_backbone
    from meg_jax.data import shapes
    from meg_jax.meg import calibrate as cal
    from meg_jax.meg import schemes

    bb = load_backbone(config.checkpoint, ue_decoder=config.ue_decoder)
    key = jax.random.PRNGKey(config.seed)
    k_prompts, k_noise, k_channel = jax.random.split(key, 3)
    tokens, attrs = cal.balanced_prompts(k_prompts, 1, bb.config.text_encoder.max_length)
    tokens = tokens[prompt_index:prompt_index + 1]
    h = bb.config.latent_size
    noise = jax.random.normal(k_noise, (1, h, h, bb.config.vae.latent_channels))
    context = cal._context(bb, tokens)
    reference = cal._decode(bb, cal._teacher(bb, context, noise))
    link = config.link()
    ks, rs = config.steps, config.merge_ratios
    fig, axes = plt.subplots(len(ks), (len(rs) + 1) * len(snrs), figsize=(1.1 * (len(rs) + 1) * len(snrs), 1.2 * len(ks) + 0.6))
    show = lambda ax, img: ax.imshow(np.asarray((schemes.to_display(img)[0] + 1) / 2))  # noqa: E731
    for ki, k in enumerate(ks):
        latents = cal._student(bb, context, noise, k)
        for pi, snr in enumerate(snrs):
            base = pi * (len(rs) + 1)
            for ri, r in enumerate(rs):
                rec = cal._transmit(latents, float(r), link, jax.numpy.full((1,), snr), k_channel)
                show(axes[ki, base + ri], cal._ue_decode(bb, rec))
                if ki == 0:
                    axes[ki, base + ri].set_title(f"r={r:g}" + (f"\n{snr:g} dB" if ri == 0 else ""), fontsize=7)
            show(axes[ki, base + len(rs)], reference)
            if ki == 0:
                axes[ki, base + len(rs)].set_title("teacher 50", fontsize=7)
        axes[ki, 0].set_ylabel(f"K={k}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    prompt = shapes.prompt_of(jax.tree.map(lambda a: a[prompt_index:prompt_index + 1], attrs))[0]
    fig.suptitle(f"\"{prompt}\" — {link.mode} link, rows K, columns r; left {snrs[0]:g} dB, right {snrs[1]:g} dB",
                 fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (already reported)
        return int(e.code or 0)
    from meg_jax import job_setup

    job_setup.configure_logging()
    job_setup.enable_compile_cache(args.compile_cache)
    config = args.config
    if args.measure:
        command = "meg-jax calibrate" + ("" if not argv else " " + shlex.join(argv))
        paths = run(config, command=command, progress=args.progress, log=log.info)
        for preset, path in paths.items():
            log.info("%s: %s", preset, path)
    if args.tables:  # the result, for the caller: stdout
        relative = None if args.floor_relative_to == "none" else args.floor_relative_to
        sys.stdout.write(comparison_tables(config, args.table_snrs, args.accuracy_floor, relative) + "\n")
    if args.grid_figure:
        grid_figure(config, args.grid_figure, list(args.grid_snrs))
        log.info("wrote %s", args.grid_figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
