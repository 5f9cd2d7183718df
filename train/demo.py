"""``meg-jax demo``: the main job.

Interim version (until the evaluation issue lands the full demo): runs the generative half of
mobile edge generation on the ``tiny`` preset — text encoder, K trailing DDIM steps of the
step-conditioned UNet at the "edge server", token merging of the latents at ratio r (the
features that would be transmitted), unmerging and VAE decoding at the "device" — for a few
prompts over a grid of (K, r), and writes the image grid to ``WORKDIR/demo_grid.png``.

With the shipped checkpoints (``checkpoints/tiny``) the images show the prompts; without them
(randomly initialised weights) the job still exercises the whole stack but draws noise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_PROMPTS = (
    "a large red circle at the center on a blue background",
    "a small yellow square at the top left on a black background",
    "a large white triangle at the bottom on a green background",
    "a small cyan cross at the right on a magenta background",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meg-jax demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where the grid is written")
    parser.add_argument("--checkpoints", default="checkpoints/tiny", help="backbone folder")
    parser.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts K")
    parser.add_argument("--ratios", default="0,0.25,0.5,0.75", help="comma-separated merge ratios r")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="one K and one r: a quick check")
    args = parser.parse_args(argv)

    from meg_jax.backbone import AutoencoderKL, TextEncoder, UNet, init_text_encoder, init_unet, init_vae, preset
    from meg_jax.backbone import schedules, tome
    from meg_jax.data import tokenizer

    steps = [int(s) for s in args.steps.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.smoke:
        steps, ratios = steps[:1], ratios[-1:]
    config = preset("tiny")
    key = jax.random.PRNGKey(args.seed)

    trained = os.path.exists(os.path.join(args.checkpoints, "backbone.json"))
    if trained:
        from meg_jax.checkpoint import load_backbone

        backbone = load_backbone(args.checkpoints)
        config = backbone.config
        unet_vars, vae_vars, text_vars = backbone.student, backbone.vae, backbone.text_encoder
        print(f"loaded the shipped backbone from {args.checkpoints}")
    else:
        k1, k2, k3 = jax.random.split(key, 3)
        unet_vars, vae_vars, text_vars = init_unet(config.unet, k1), init_vae(config.vae, k2), init_text_encoder(config.text_encoder, k3)
        print(f"no checkpoints at {args.checkpoints}: random weights (the images will be noise)")

    tokens = jnp.asarray(tokenizer.encode(DEFAULT_PROMPTS, config.text_encoder.max_length))
    context = TextEncoder(config.text_encoder).apply(text_vars, tokens)
    schedule = schedules.make_schedule()
    h = w = config.latent_size
    c = config.unet.in_channels
    noise = jax.random.normal(jax.random.fold_in(key, 1), (len(DEFAULT_PROMPTS), h, w, c))
    unet, vae = UNet(config.unet), AutoencoderKL(config.vae)

    def generate(num_steps: int, ratio: float) -> jax.Array:
        cond = step_condition(num_steps, config.unet.time_cond_proj_dim, noise.shape[0])

        def model_fn(x, t):
            return unet.apply(unet_vars, x, t, context, timestep_cond=cond)

        latents = schedules.sample(model_fn, schedule, noise, num_steps=num_steps, spacing="trailing",
                                   prediction_type=config.prediction_type)
        flat = latents.reshape(latents.shape[0], h * w, c)
        merged, plan = tome.merge_tokens(flat, h, w, ratio, key=jax.random.fold_in(key, 2))
        received = tome.unmerge(merged, plan).reshape(latents.shape)
        return vae.apply(vae_vars, received / config.vae.scaling_factor, method="decode")

    rows = []
    t0 = time.perf_counter()
    for k in steps:
        row = []
        for r in ratios:
            images = jax.jit(lambda: generate(k, r))()
            row.append(np.asarray(images))
            print(f"  K={k} r={r:.2f}: {images.shape[0]} images")
        rows.append(row)
    print(f"generated {len(steps) * len(ratios) * len(DEFAULT_PROMPTS)} images in {time.perf_counter() - t0:.1f} s")
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, "demo_grid.png")
    save_grid(rows, steps, ratios, path)
    print(f"wrote {path}")
    return 0


def step_condition(num_steps: int, dim: int | None, batch: int) -> jax.Array | None:
    """The student's step conditioning, as the distillation stage defines it (if present)."""
    if dim is None:
        return None
    try:
        from meg_jax.distill.train import step_embedding
    except ImportError:
        return jnp.zeros((batch, dim))
    return step_embedding(jnp.full((batch,), num_steps), dim)


def save_grid(rows: list[list[np.ndarray]], steps: list[int], ratios: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(steps), len(ratios), figsize=(2.2 * len(ratios), 2.2 * len(steps)), squeeze=False)
    for i, k in enumerate(steps):
        for j, r in enumerate(ratios):
            images = (np.clip(rows[i][j], -1, 1) + 1) / 2
            axes[i, j].imshow(np.concatenate(list(images), axis=1))
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(f"r = {r:.2f}")
            if j == 0:
                axes[i, j].set_ylabel(f"K = {k}")
    fig.suptitle("ES: K student steps → merge r of the latent tokens → UE: unmerge, decode")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
