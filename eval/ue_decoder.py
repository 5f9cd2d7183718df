"""The merging-aware UE decoder against the plain decoder: quality over (r, SNR) on the split path.

    python -m eval.ue_decoder checkpoints/tiny [--num 512] [--steps 4] [--merge_ratio 0.5]
        [--plot docs/images/ue_decoder_quality_vs_r.png] [--json out.json]

Both decoders see exactly the same received latents: fresh prompts (``--num``, balanced over
the four task classes; seed ``--seed``), one noise latent each, the student's K-step latents
(``--steps``), then per merge ratio r of the calibration grid the pipeline's merge -> link ->
unmerge at every SNR of the calibration grid (analog AWGN, the calibration's link; one channel
key per batch of prompts, shared by the two decoders), and each decoder decodes them
(``meg_jax.meg.pipeline.ue_decode_latents`` with and without ``Backbone.ue_decoder``). Scored
as the calibration scores (``meg_jax.meg.calibrate``): **all-five accuracy** (every one of
the five attributes right) by the attribute classifier and by the analytic pixel reading
(``meg_jax.data.pixel_reading``), and PSNR against the prompt's reference (the teacher's
guided DDIM-50 sample decoded by the plain VAE decoder). Prints the table at
``--merge_ratio`` over every SNR (with the paired standard error of each difference) and
draws quality against r at ``--plot_snrs``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import tyro

from meg_jax import config as config_lib

__all__ = ["Args", "measure", "table", "plot", "main"]


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.ue_decoder``."""

    path: tyro.conf.Positional[str]  # shipped backbone folder with a ue_decoder/ component (checkpoints/tiny)
    num: int = 512  # prompts (a multiple of the 4 task classes)
    steps: int = 4  # K, the student's ES steps
    merge_ratio: float = 0.5  # r of the table (must be on the calibration's r grid)
    seed: int = 20261126  # prompts, noise and channel draws (not the calibration's seed 0)
    batch_size: int = 32  # prompts per jitted call (as the calibration)
    plot_snrs: tuple[float, ...] = (0.0, 10.0, 30.0)  # SNRs (dB, on the grid) of the quality-vs-r plot
    plot: Optional[str] = "docs/images/ue_decoder_quality_vs_r.png"  # the figure (None: no figure)
    json_out: Optional[str] = None  # all measured means as JSON (None: not written)


def measure(bb, num: int, steps: int, seed: int, batch_size: int = 32) -> dict:
    """Scores both decoders on the calibration's (r, SNR) grid.

    Args:
      bb: a ``Backbone`` with ``ue_decoder`` set.
      num: prompts (multiple of 4).
      steps: K.
      seed: prompts, noise and channel key.
      batch_size: prompts per call.

    Returns:
      ``{"merge_ratios": [R], "snr_db": [S], "ue"/"plain": {"cls_all", "pix_all", "psnr": [R, S, N]}}``
      (per prompt; ``cls_all``/``pix_all`` are 0/1).
    """
    import jax
    import jax.numpy as jnp

    from meg_jax.data import shapes
    from meg_jax.meg import calibrate as cal
    from meg_jax.meg import pipeline

    if bb.ue_decoder is None:
        raise ValueError("the backbone has no ue_decoder component (train one: python -m train.ue_decoder)")
    if num % shapes.NUM_TASK_CLASSES:
        raise ValueError(f"num={num} must be a multiple of the {shapes.NUM_TASK_CLASSES} task classes")
    grid = cal.CalibrationConfig()
    link = grid.link()
    ratios, snrs = tuple(grid.merge_ratios), jnp.asarray(grid.snr_db, jnp.float32)
    key = jax.random.PRNGKey(seed)
    k_prompts, k_noise, k_channel = jax.random.split(key, 3)
    tokens, attrs = cal.balanced_prompts(k_prompts, num // shapes.NUM_TASK_CLASSES, bb.config.text_encoder.max_length)
    h = bb.config.latent_size
    noise = jax.random.normal(k_noise, (num, h, h, bb.config.vae.latent_channels))
    decoders = {"ue": bb, "plain": pipeline.plain_decoder(bb)}
    scores = {name: [] for name in decoders}  # per batch: [R] of (acc, psnr, pix) [S, B]
    t0 = time.time()
    for b, lo in enumerate(range(0, num, batch_size)):
        sl = slice(lo, min(lo + batch_size, num))
        at = jax.tree.map(lambda a: a[sl], attrs)
        context = cal._context(bb, tokens[sl])
        reference = cal._decode(decoders["plain"], cal._teacher(bb, context, noise[sl]))
        latents = cal._student(bb, context, noise[sl], steps)
        key_b = jax.random.fold_in(k_channel, b)
        per = {name: [] for name in decoders}
        for r in ratios:
            received = cal._transmit_cells(latents, snrs, key_b, merge_ratio=float(r), link=link)  # once for both
            for name, model in decoders.items():
                per[name].append(cal._score_cells(model, received, at, reference))
        for name in decoders:
            scores[name].append(per[name])
        print(f"batch {b + 1}/{-(-num // batch_size)} ({time.time() - t0:.0f} s)", flush=True)
    scores = jax.device_get(scores)
    out = {"merge_ratios": list(ratios), "snr_db": [float(s) for s in grid.snr_db], "num": num, "steps": steps,
           "seed": seed, "link": dataclasses.asdict(link)}
    for name in decoders:
        acc, psnr, pix = (np.concatenate([np.asarray([cell[i] for cell in batch], np.float64) for batch in scores[name]],
                                         axis=-1) for i in range(3))  # [R, S, N]
        # accuracy is the mean of five 0/1 attributes: exactly 1.0 when all five are right
        out[name] = {"cls_all": (acc == 1.0).astype(np.float64), "pix_all": (pix == 1.0).astype(np.float64),
                     "psnr": psnr}
    return out


METRICS = (("cls_all", "all-five (classifier)"), ("pix_all", "all-five (pixel reading)"), ("psnr", "PSNR (dB)"))


def table(result: dict, merge_ratio: float) -> str:
    """Markdown: per SNR at ``merge_ratio``, plain vs UE decoder on each metric, with the paired SE."""
    ratios = result["merge_ratios"]
    if merge_ratio not in ratios:
        raise ValueError(f"merge_ratio {merge_ratio} is not on the calibration grid {ratios}")
    ri = ratios.index(merge_ratio)
    head = ["SNR (dB)"]
    for _, label in METRICS:
        head += [f"{label} plain", "UE", "Δ ± SE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for si, snr in enumerate(result["snr_db"]):
        cells = [f"{snr:g}"]
        for m, _ in METRICS:
            a, b = result["plain"][m][ri, si], result["ue"][m][ri, si]
            d = b - a
            fmt = "{:.2f}" if m == "psnr" else "{:.3f}"
            se = d.std(ddof=1) / np.sqrt(d.size)
            cells += [fmt.format(a.mean()), fmt.format(b.mean()), f"{d.mean():+.3f} ± {se:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, snrs: Sequence[float], path: str) -> None:
    """Quality against r at ``snrs``: one panel per metric, plain (dashed) vs UE decoder (solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = np.asarray(result["merge_ratios"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for si_plot, snr in enumerate(snrs):
        if snr not in result["snr_db"]:
            raise ValueError(f"plot SNR {snr} is not on the calibration grid {result['snr_db']}")
        si = result["snr_db"].index(snr)
        for ax, (m, label) in zip(axes, METRICS):
            c = colors[si_plot % len(colors)]
            ax.plot(r, result["plain"][m][:, si].mean(-1), "--o", color=c, ms=3, label=f"plain, {snr:g} dB")
            ax.plot(r, result["ue"][m][:, si].mean(-1), "-o", color=c, ms=3, label=f"UE decoder, {snr:g} dB")
            ax.set_xlabel("merge ratio r")
            ax.set_title(label, fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.suptitle(f"student K = {result['steps']}, {result['num']} prompts, analog AWGN link: "
                 "plain VAE decoder (dashed) vs merging-aware UE decoder (solid)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = config_lib.parse_cli(Args, sys.argv[1:] if argv is None else argv, prog="python -m eval.ue_decoder",
                                description=__doc__.split("\n")[0])
    from meg_jax.checkpoint import load_backbone

    bb = load_backbone(args.path)
    result = measure(bb, args.num, args.steps, args.seed, args.batch_size)
    print(f"\nK = {args.steps}, r = {args.merge_ratio:g}, {args.num} prompts (seed {args.seed}):\n")
    print(table(result, args.merge_ratio))
    if args.plot:
        plot(result, args.plot_snrs, args.plot)
        print(f"\nwrote {args.plot}")
    if args.json_out:
        means = {k: v for k, v in result.items() if k not in ("ue", "plain")}
        for name in ("ue", "plain"):
            means[name] = {m: result[name][m].mean(-1).tolist() for m, _ in METRICS}  # [R][S]
        with open(args.json_out, "w") as f:
            json.dump(means, f, indent=1)
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
