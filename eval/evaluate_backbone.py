"""Quality table of a distilled backbone: teacher DDIM-50 / DDIM-K vs the student at K steps.

    python -m eval.evaluate_backbone checkpoints/tiny [--num 512] [--out DIR]
    python -m eval.evaluate_backbone runs/tiny            # a finished work directory
    python -m eval.evaluate_backbone runs/x --steps 1 4 --no_teacher_rows   # a quick probe

Every row uses the same fresh prompts and the same initial noise (seed ``--seed``, never
used in training). Columns: attribute accuracy of the generated images read by the
attribute classifier (``acc all``: every one of the five attributes right; ``acc attr``:
mean over the five attributes), PSNR and SSIM against the teacher's guided 50-step DDIM
sample decoded to pixels, Fréchet distance of classifier features to the real images of
the same prompts, and generation throughput (text encoding + sampling + VAE decoding,
images/s, after compilation, on this machine). A second table reads the same images
analytically from pixels (``meg_jax.data.pixel_reading``: palette colours, area, centroid,
moment harmonics; nothing learnt), beside the classifier's all-five accuracy. Writes
``quality.md``, ``distill_grid.png`` (prompts × rows) and ``reading_disagreements.png``
(images the two readings disagree on) to ``--out``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from meg_jax import config as config_lib

__all__ = ["main", "load", "evaluate", "quality_table", "draw_grid", "pixel_scores", "draw_disagreements"]

STEP_COUNTS = (1, 2, 4, 8)


def load(path: str):
    """A ``Backbone`` from a shipped folder (``backbone.json``) or a finished work directory."""
    from meg_jax.checkpoint import load_backbone

    if os.path.exists(os.path.join(path, "backbone.json")):
        return load_backbone(path)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is neither a backbone folder (backbone.json) nor a work directory")
    from meg_jax import config as config_lib
    from meg_jax.distill import train
    from meg_jax.distill.config import DistillConfig

    config = config_lib.load_json(DistillConfig, os.path.join(path, "config.json"))
    out = tempfile.mkdtemp(prefix="backbone_")
    train.export(path, out, config)
    return load_backbone(out)


def evaluate(bb, num: int = 512, seed: int = 20261126, chunk: int = 128,
             steps: Sequence[int] = STEP_COUNTS, teacher_rows: bool = True) -> tuple[list[dict], dict]:
    """Generates every row and scores it.

    Rows: the teacher's guided DDIM-50 (the PSNR reference, always), the teacher's DDIM-K
    (unless ``teacher_rows`` is False) and the student at K, for K in ``steps``.

    Returns:
      ``(rows, samples)``: one dict of metrics per row, and ``samples`` with the images
      ``[num, H, W, 3]`` of every row (for the grid) plus ``prompts``.
    """
    from meg_jax import distill, metrics
    from meg_jax.data import classifier as clf
    from meg_jax.data import pixel_reading
    from meg_jax.data.shapes import prompt_of, sample_batch

    if num % chunk:
        chunk = num
    k_data, k_noise = jax.random.split(jax.random.PRNGKey(seed))
    real, tokens, attrs = sample_batch(k_data, num, bb.classifier_config.data)  # the data the backbone learnt
    noise = jax.random.normal(k_noise, distill.noise_shape(bb, num))
    ccfg = bb.classifier_config

    @jax.jit
    def score(images):
        logits = clf.AttributeClassifier(ccfg).apply(bb.classifier, images)
        feats = clf.AttributeClassifier(ccfg).apply(bb.classifier, images, method="features")
        return logits, feats

    read = jax.jit(lambda images: pixel_reading.read_attributes(images, ccfg.data))
    readings: dict[str, dict] = {"pixel": {}, "classifier": {}}

    def run(model: str, k: int) -> tuple[np.ndarray, float]:
        def gen(i: int) -> jax.Array:
            sl = slice(i * chunk, (i + 1) * chunk)
            return distill.generate(bb, tokens[sl], noise[sl], num_steps=k, model=model)

        jax.block_until_ready(gen(0))  # compile outside the timing
        t0 = time.time()
        out = [jax.block_until_ready(gen(i)) for i in range(num // chunk)]
        rate = num / (time.time() - t0)
        return np.concatenate([np.asarray(o) for o in out]), rate

    specs = ([("teacher", 50)] + [("teacher", k) for k in steps if teacher_rows]
             + [("student", k) for k in steps])
    images: dict[str, np.ndarray] = {}
    rows = []
    real_feats = np.asarray(score(real)[1])
    ref = None
    for model, k in specs:
        name = f"teacher DDIM-{k}" if model == "teacher" else f"student K={k}"
        x, rate = run(model, k)
        images[name] = x
        if ref is None:
            ref = x
        logits, feats = score(jnp.asarray(x))
        acc = {n: float(v) for n, v in metrics.attribute_accuracy(logits, attrs).items()}
        acc_small, acc_large = shape_accuracy_by_size(logits, attrs)
        attr_mean = float(np.mean([v for n, v in acc.items() if n != "all"]))
        rows.append({
            "row": name,
            "acc_all": acc["all"],
            "acc_attr": attr_mean,
            "psnr": float(np.mean(np.asarray(metrics.psnr(jnp.asarray(x), jnp.asarray(ref))))) if x is not ref else float("inf"),
            "ssim": float(np.mean(np.asarray(metrics.ssim(jnp.asarray(x), jnp.asarray(ref))))),
            "fd": metrics.frechet_distance(np.asarray(feats), real_feats),
            "images_per_s": rate,
            **{f"acc_{n}": v for n, v in acc.items() if n != "all"},
            "acc_shape_small": acc_small,
            "acc_shape_large": acc_large,
        })
        pixel = {n: np.asarray(v) for n, v in read(jnp.asarray(x)).items()}
        rows[-1].update(pixel_scores(pixel, attrs))
        readings["pixel"][name] = pixel
        readings["classifier"][name] = {n: np.asarray(jnp.argmax(v, axis=-1)) for n, v in logits.items()}
        print(f"{name:18s} acc_all {acc['all']:.3f} pixel {rows[-1]['pix_all']:.3f} psnr {rows[-1]['psnr']:.2f} "
              f"({time.strftime('%H:%M:%S')})", flush=True)
    prompts = prompt_of(attrs)
    recon = vae_reconstructions(bb, real, chunk)
    small, large = shape_accuracy_by_size(score(recon)[0], attrs)
    extra = {"vae_psnr": float(jnp.mean(metrics.psnr(recon, real))), "vae_shape_small": small,
             "vae_shape_large": large}
    vae_pixel = pixel_scores({n: np.asarray(v) for n, v in read(recon).items()}, attrs)
    extra["vae_pixel_shape"] = (vae_pixel["pix_shape_small"], vae_pixel["pix_shape_large"])
    print(f"VAE reconstruction PSNR {extra['vae_psnr']:.2f} dB, shape accuracy small {small:.3f} "
          f"large {large:.3f}", flush=True)
    truth = {n: np.asarray(getattr(attrs, n)) for n in ("size", "color", "shape", "position", "background")}
    return rows, {"images": images, "prompts": prompts, "real": np.asarray(real), "truth": truth,
                  "readings": readings, **extra}


def pixel_scores(reading: dict, attrs) -> dict[str, float]:
    """Accuracy of a pixel reading (``meg_jax.data.pixel_reading.read_attributes``) as row keys.

    Returns:
      ``pix_<attribute>`` and ``pix_all`` over every sample, ``pix_shape_small`` /
      ``pix_shape_large`` and ``pix_all_small`` / ``pix_all_large`` over the small and the
      large shapes apart.
    """
    from meg_jax.data import pixel_reading

    acc = {f"pix_{n}": float(v) for n, v in pixel_reading.reading_accuracy(reading, attrs).items()}
    small = np.asarray(attrs.size) == 0
    for part, mask in (("small", small), ("large", ~small)):
        sub = {n: np.asarray(v)[mask] for n, v in reading.items()}
        truth = {n: np.asarray(getattr(attrs, n))[mask] for n in reading}
        part_acc = pixel_reading.reading_accuracy(sub, truth) if mask.any() else {"shape": np.nan, "all": np.nan}
        acc[f"pix_shape_{part}"] = float(part_acc["shape"])
        acc[f"pix_all_{part}"] = float(part_acc["all"])
    return acc


def shape_accuracy_by_size(logits: dict, attrs) -> tuple[float, float]:
    """Shape accuracy of the small and of the large shapes (the classifier's ``logits``).

    Small shapes (about 6 pixels across at 32 x 32) are where the 8 x 8 latents lose detail,
    so the table reports them apart.
    """
    from meg_jax import metrics

    small = np.asarray(attrs.size) == 0
    shape, truth = np.asarray(logits["shape"]), np.asarray(attrs.shape)
    return tuple(float(metrics.attribute_accuracy({"shape": shape[m]}, {"shape": truth[m]})["shape"])
                 for m in (small, ~small))


def vae_reconstructions(bb, images: jax.Array, chunk: int = 128) -> jax.Array:
    """``decode(encode(x).mean)`` of ``x`` [N, H, W, 3], clipped to [-1, 1] like generated images."""
    from meg_jax import distill

    @jax.jit
    def recon(x):
        from meg_jax.backbone import AutoencoderKL

        mean, _ = AutoencoderKL(bb.config.vae).apply(bb.vae, x, method="encode")
        return distill.decode_latents(bb, mean * bb.config.latent_scaling_factor)

    return jnp.concatenate([recon(images[i:i + chunk]) for i in range(0, images.shape[0], chunk)])


def quality_table(rows: list[dict], num: int, vae_psnr: float | None = None,
                  vae_shape: tuple[float, float] | None = None,
                  vae_pixel_shape: tuple[float, float] | None = None) -> str:
    """Markdown table of the rows, and what the VAE's reconstructions of the real images score
    (PSNR; shape accuracy of small and of large shapes, the ceiling of any generated row).
    Rows with ``pix_*`` keys (:func:`pixel_scores`) add a second table: the pixel reading."""
    lines = [
        f"Quality on {num} fresh prompts (same noise every row); PSNR/SSIM vs the teacher's "
        "guided DDIM-50 sample; FD: Fréchet distance of classifier features to the real images.",
        "",
        "| row | acc all | acc attr | size | color | shape | shape small | shape large | position | background "
        "| PSNR dB | SSIM | FD | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        psnr = "ref" if not np.isfinite(r["psnr"]) else f"{r['psnr']:.2f}"
        lines.append(
            f"| {r['row']} | {r['acc_all']:.3f} | {r['acc_attr']:.3f} | {r['acc_size']:.3f} | "
            f"{r['acc_color']:.3f} | {r['acc_shape']:.3f} | {r['acc_shape_small']:.3f} | "
            f"{r['acc_shape_large']:.3f} | {r['acc_position']:.3f} | "
            f"{r['acc_background']:.3f} | {psnr} | {r['ssim']:.3f} | {r['fd']:.2f} | {r['images_per_s']:.0f} |"
        )
    if vae_psnr is not None or vae_shape is not None:
        parts = [] if vae_psnr is None else [f"PSNR {vae_psnr:.2f} dB"]
        if vae_shape is not None:
            parts.append(f"shape accuracy {vae_shape[0]:.3f} (small) / {vae_shape[1]:.3f} (large)")
        lines += ["", f"VAE reconstruction of the {num} real images: {', '.join(parts)}."]
    pixel_rows = [r for r in rows if "pix_all" in r]
    if pixel_rows:
        lines += [
            "",
            "Pixel reading of the same images (`meg_jax.data.pixel_reading`: analytic, nothing "
            "learnt), beside the classifier's all-five accuracy:",
            "",
            "| row | pixel all | classifier all | all small | all large | size | color | shape "
            "| shape small | shape large | position | background |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in pixel_rows:
            lines.append(
                f"| {r['row']} | {r['pix_all']:.3f} | {r['acc_all']:.3f} | {r['pix_all_small']:.3f} | "
                f"{r['pix_all_large']:.3f} | {r['pix_size']:.3f} | {r['pix_color']:.3f} | {r['pix_shape']:.3f} | "
                f"{r['pix_shape_small']:.3f} | {r['pix_shape_large']:.3f} | {r['pix_position']:.3f} | "
                f"{r['pix_background']:.3f} |"
            )
        if vae_pixel_shape is not None:
            lines += ["", f"Pixel reading of the VAE reconstructions: shape accuracy {vae_pixel_shape[0]:.3f} "
                      f"(small) / {vae_pixel_shape[1]:.3f} (large)."]
    return "\n".join(lines) + "\n"


def draw_grid(samples: dict, path: str, num_prompts: int = 6) -> None:
    """PNG grid: one prompt per row; columns real image, teacher-50, teacher DDIM-4, student K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["real", "teacher DDIM-50", "teacher DDIM-4"] + [f"student K={k}" for k in STEP_COUNTS]
    cols = [c for c in cols if c == "real" or c in samples["images"]]  # rows left out by --steps
    fig, axes = plt.subplots(num_prompts, len(cols), figsize=(1.6 * len(cols), 1.75 * num_prompts))
    for i in range(num_prompts):
        for j, c in enumerate(cols):
            img = samples["real"][i] if c == "real" else samples["images"][c][i]
            ax = axes[i, j]
            ax.imshow(np.clip((img + 1.0) / 2.0, 0.0, 1.0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(c, fontsize=7)
        axes[i, 0].set_ylabel(samples["prompts"][i].replace(" at the ", "\nat the "), fontsize=5.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_disagreements(samples: dict, path: str, rows: Sequence[str] = ("student K=1", "student K=4",
                       "teacher DDIM-50"), per_row: int = 12, crop: int = 16) -> None:
    """PNG grid of images the pixel reading and the classifier disagree on (shape or colour).

    One figure row per generated row: the first ``per_row`` disagreements, each cropped to
    ``crop`` x ``crop`` pixels around the middle of the prompt's third (small shapes are 6
    pixels across) and titled with the prompt's size, colour and shape and what each reading
    says (P: pixel, C: classifier).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meg_jax.data.shapes import COLORS, SHAPES

    def word(names, i):
        return names[i] if i >= 0 else "-"

    rows = [r for r in rows if r in samples["images"]]  # rows left out by --steps
    fig, axes = plt.subplots(len(rows), per_row, figsize=(1.45 * per_row, 1.9 * len(rows)), squeeze=False)
    truth = samples["truth"]
    for r, name in enumerate(rows):
        pix, cls = samples["readings"]["pixel"][name], samples["readings"]["classifier"][name]
        differ = np.flatnonzero((pix["shape"] != cls["shape"]) | (pix["color"] != cls["color"]))
        for j in range(per_row):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= differ.size:
                ax.axis("off")
                continue
            i = differ[j]
            image = samples["images"][name][i]
            side = image.shape[0]
            middle = (np.array(divmod(int(truth["position"][i]), 3)) + 0.5) * side / 3.0
            top, left = np.clip(np.round(middle - crop / 2.0).astype(int), 0, side - crop)
            window = image[top:top + crop, left:left + crop]
            ax.imshow(np.clip((window + 1.0) / 2.0, 0.0, 1.0), interpolation="nearest")
            size = "small" if truth["size"][i] == 0 else "large"
            ax.set_title(f"#{i} {size} {COLORS[truth['color'][i]]}\n{SHAPES[truth['shape'][i]]}\n"
                         f"P: {word(COLORS, pix['color'][i])} {word(SHAPES, pix['shape'][i])}\n"
                         f"C: {COLORS[cls['color'][i]]} {SHAPES[cls['shape'][i]]}", fontsize=5.5)
        axes[r, 0].set_ylabel(f"{name}\n({differ.size} disagree)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.evaluate_backbone``."""

    path: tyro.conf.Positional[str]  # checkpoints/tiny (shipped) or a finished work directory
    num: int = 512  # prompts (>= 512 for the shipped table)
    seed: int = 20261126  # seed of prompts and noise
    out: Optional[str] = None  # where quality.md and distill_grid.png go (None: PATH)
    steps: tuple[int, ...] = STEP_COUNTS  # the K of the teacher DDIM-K and student rows (teacher DDIM-50 always)
    teacher_rows: bool = True  # the teacher DDIM-K rows (--no_teacher_rows: student rows only, quicker)


def main(argv: Sequence[str] | None = None) -> int:
    args = config_lib.parse_cli(Args, sys.argv[1:] if argv is None else argv, prog="python -m eval.evaluate_backbone",
                                description=__doc__.split("\n")[0])
    bb = load(args.path)
    rows, samples = evaluate(bb, args.num, args.seed, steps=args.steps, teacher_rows=args.teacher_rows)
    table = quality_table(rows, args.num, samples["vae_psnr"],
                          (samples["vae_shape_small"], samples["vae_shape_large"]), samples["vae_pixel_shape"])
    print(table)
    out = args.out or args.path
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(f"Device: {jax.devices()[0].platform} ({jax.device_count()} device(s))\n\n" + table)
    draw_grid(samples, os.path.join(out, "distill_grid.png"))
    draw_disagreements(samples, os.path.join(out, "reading_disagreements.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
