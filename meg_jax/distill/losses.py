"""Losses of the distillation stages, and the teacher/student samplers they are built on.

Pure functions over arrays and params; the train steps in ``meg_jax.distill.train`` wrap
them with ``jax.value_and_grad``.

* VAE: ``reconstruction_loss`` (pixel MSE), ``edge_loss`` (MSE of image gradients, which
  sharpens the shape borders that dominate PSNR on this data) and ``gaussian_kl`` (KL to
  N(0, I), per latent element, with a small weight).
* Teacher: ``diffusion_target`` (ε or v, Salimans & Ho 2022) and ``drop_context``
  (classifier-free guidance dropout: a dropped prompt becomes an all-zero context, which
  makes every cross-attention output exactly its output bias).
* Student: ``step_embedding`` (sinusoid of the step size T/K, the UNet's ``timestep_cond``),
  ``student_sample`` (K trailing DDIM steps of the step-conditioned student) and
  ``rollout_loss`` (MSE between the student's K-step sample and the teacher's guided
  50-step DDIM sample from the same noise and prompt, backpropagated through all K steps),
  optionally with pixel terms on the decoded sample: whole-image MSE and the MSE over the
  target's shape normalised by its area (``border_background`` + ``foreground_mask`` +
  ``masked_mse``, the decoder stage's shape term on a generated target).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from meg_jax.backbone import schedules

__all__ = [
    "reconstruction_loss",
    "edge_loss",
    "gaussian_kl",
    "foreground_mask",
    "masked_mse",
    "border_background",
    "diffusion_target",
    "drop_context",
    "step_embedding",
    "teacher_model_fn",
    "student_model_fn",
    "teacher_sample",
    "student_sample",
    "rollout_loss",
]


# --------------------------------------------------------------------------- VAE


def reconstruction_loss(recon: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over every element. ``[B, H, W, C]`` x2 -> scalar."""
    return jnp.mean(jnp.square(recon - target))


def edge_loss(recon: jax.Array, target: jax.Array) -> jax.Array:
    """MSE between the horizontal and vertical finite differences of two images.

    Args:
      recon, target: ``[B, H, W, C]``.

    Returns:
      scalar: mean over the ``[B, H-1, W, C]`` vertical and ``[B, H, W-1, C]`` horizontal
      differences, averaged.
    """
    def grads(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return x[:, 1:] - x[:, :-1], x[:, :, 1:] - x[:, :, :-1]

    (ry, rx), (ty, tx) = grads(recon), grads(target)
    return 0.5 * (jnp.mean(jnp.square(ry - ty)) + jnp.mean(jnp.square(rx - tx)))


def foreground_mask(images: jax.Array, background: jax.Array, dilation: int = 1,
                    threshold: float = 1e-3) -> jax.Array:
    """Pixels that differ from the background colour, widened by a ``dilation`` max-pool.

    Args:
      images: ``[B, H, W, C]``.
      background: ``[B, C]`` background colour of each image.
      dilation: odd window of the max-pool (1: the exact mask).
      threshold: a pixel is foreground when the sum over channels of ``|image - background|``
        exceeds it (1e-3: exact renderings; larger for decoded, noisy images).

    Returns:
      ``[B, H, W, 1]`` float mask in {0, 1}.
    """
    diff = jnp.sum(jnp.abs(images - background[:, None, None, :]), axis=-1, keepdims=True)
    mask = (diff > threshold).astype(jnp.float32)
    if dilation > 1:
        mask = jax.lax.reduce_window(mask, 0.0, jax.lax.max, (1, dilation, dilation, 1), (1, 1, 1, 1), "SAME")
    return mask


def masked_mse(recon: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-image MSE over the masked pixels (normalised by the mask's area), averaged.

    A small shape's error then counts as much as a large one's. Images with an empty mask
    contribute 0.

    Args:
      recon, target: ``[B, H, W, C]``.
      mask: ``[B, H, W, 1]`` weights.
    """
    err = jnp.sum(mask * jnp.square(recon - target), axis=(1, 2, 3))
    area = recon.shape[-1] * jnp.sum(mask, axis=(1, 2, 3))
    return jnp.mean(err / jnp.maximum(area, 1.0))


def border_background(images: jax.Array, palette: jax.Array) -> jax.Array:
    """Background colour of generated images: the palette colour nearest the mean of the
    one-pixel border ring (a shape covers at most a corner of it).

    Args:
      images: ``[B, H, W, C]`` in [-1, 1].
      palette: ``[P, C]`` the renderer's colours.

    Returns:
      ``[B, C]`` the nearest palette colour of each image's border mean.
    """
    ring = jnp.concatenate([images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1)
    mean = jnp.mean(ring, axis=1)  # [B, C]
    nearest = jnp.argmin(jnp.sum(jnp.square(mean[:, None, :] - palette[None]), axis=-1), axis=-1)
    return palette[nearest]


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over every latent element (nats).

    ``0.5 · (mean² + exp(logvar) − 1 − logvar)`` per element.
    """
    return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


# --------------------------------------------------------------------------- teacher


def diffusion_target(
    schedule: schedules.NoiseSchedule,
    x0: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    prediction_type: str,
) -> jax.Array:
    """What the denoiser should output at ``x_t = add_noise(x0, noise, t)``.

    Args:
      schedule: the noise schedule.
      x0: ``[B, ...]`` clean latents.
      noise: ``[B, ...]`` ε.
      t: ``[B]`` integer timesteps.
      prediction_type: "epsilon" (ε), "v_prediction" (v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x₀) or
        "sample" (x₀).

    Returns:
      ``[B, ...]``.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return schedules.get_velocity(schedule, x0, noise, t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")


def drop_context(key: jax.Array, context: jax.Array, p: float) -> jax.Array:
    """Zeroes each sample's text context with probability ``p`` (CFG dropout).

    Args:
      key: random key.
      context: ``[B, L, D]`` text-encoder output.
      p: drop probability in [0, 1].

    Returns:
      ``[B, L, D]``; dropped rows are all zero, the unconditional context used at sampling.
    """
    keep = jax.random.uniform(key, (context.shape[0],)) >= p
    return jnp.where(keep[:, None, None], context, jnp.zeros_like(context))


# --------------------------------------------------------------------------- samplers


def step_embedding(num_steps: int | jax.Array, dim: int, num_train_timesteps: int = 1000) -> jax.Array:
    """Sinusoidal embedding of the student's step size ``T / K`` (the UNet's ``timestep_cond``).

    The same frequencies as the timestep embedding (cos half first): ``cos(s · f_i)``,
    ``sin(s · f_i)`` with ``f_i = 10000^(−i / (dim/2))`` and ``s = T / K``.

    Args:
      num_steps: K (Python int or traced scalar).
      dim: embedding width (even).
      num_train_timesteps: T.

    Returns:
      ``[dim]`` float32.
    """
    if dim % 2:
        raise ValueError(f"step embedding width must be even, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    s = jnp.asarray(num_train_timesteps, jnp.float32) / jnp.asarray(num_steps, jnp.float32)
    args = s * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)])


def teacher_model_fn(unet: Any, params: Any, context: jax.Array) -> schedules.ModelFn:
    """The teacher as a doubled-batch ``ModelFn`` for ``schedules.sample(guidance_scale=...)``.

    Args:
      unet: the ``UNet`` module.
      params: its params.
      context: ``[B, L, D]`` conditional text context; the unconditional half is zeros.
    """
    doubled = jnp.concatenate([jnp.zeros_like(context), context])

    def fn(x: jax.Array, t: jax.Array) -> jax.Array:
        return unet.apply(params, x, t, doubled)

    return fn


def student_model_fn(unet: Any, params: Any, context: jax.Array, num_steps: int,
                     embedding_dim: int, num_train_timesteps: int = 1000, *, remat: bool = False,
                     added_cond_kwargs: Any = None,
                     prepare_params: Callable[[Any], Any] | None = None) -> schedules.ModelFn:
    """The student conditioned on its step count K, as a ``ModelFn`` (no guidance).

    Its output is float32 whatever the UNet computes in. With ``remat`` each call is a
    ``jax.checkpoint`` (policy ``nothing_saveable``): differentiated through a sampling
    loop, the backward keeps only each call's input latent and recomputes the pass, so the
    activation memory of a K-step rollout is that of one pass (plus K latents), not K passes.
    ``prepare_params`` maps the params at the start of every call (inside the checkpoint),
    e.g. ``partition.gather_for_compute`` (FSDP's all-gather at use).
    """
    emb = step_embedding(num_steps, embedding_dim, num_train_timesteps)
    cond = jnp.broadcast_to(emb, (context.shape[0], embedding_dim))

    def fn(x: jax.Array, t: jax.Array) -> jax.Array:
        p = params if prepare_params is None else prepare_params(params)
        out = unet.apply(p, x, t, context, timestep_cond=cond, added_cond_kwargs=added_cond_kwargs)
        return out.astype(jnp.float32)

    if remat:
        # prevent_cse=False: the call sits in a lax.scan, which already keeps XLA from
        # merging the recomputation with the forward (JAX's advice for checkpoint in scan).
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    return fn


def teacher_sample(unet: Any, params: Any, schedule: schedules.NoiseSchedule, x_T: jax.Array,
                   context: jax.Array, *, num_steps: int, guidance_scale: float,
                   prediction_type: str, spacing: str = "trailing") -> jax.Array:
    """Teacher DDIM sample with classifier-free guidance (zero context = unconditional).

    Args:
      unet, params: the teacher.
      schedule: the noise schedule.
      x_T: ``[B, h, w, c]`` unit Gaussian noise.
      context: ``[B, L, D]`` text context.
      num_steps: DDIM steps (static).
      guidance_scale: CFG scale s (1: conditional only, computed without the doubled batch).
      prediction_type, spacing: as ``schedules.sample``.

    Returns:
      ``[B, h, w, c]`` latents.
    """
    if guidance_scale == 1.0:
        fn = lambda x, t: unet.apply(params, x, t, context)  # noqa: E731
        return schedules.sample(fn, schedule, x_T, num_steps=num_steps, spacing=spacing,
                                prediction_type=prediction_type)
    return schedules.sample(teacher_model_fn(unet, params, context), schedule, x_T,
                            num_steps=num_steps, spacing=spacing, prediction_type=prediction_type,
                            guidance_scale=guidance_scale)


def student_sample(unet: Any, params: Any, schedule: schedules.NoiseSchedule, x_T: jax.Array,
                   context: jax.Array, *, num_steps: int, embedding_dim: int,
                   prediction_type: str, spacing: str = "trailing", remat: bool = False,
                   added_cond_kwargs: Any = None,
                   prepare_params: Callable[[Any], Any] | None = None) -> jax.Array:
    """K trailing DDIM steps of the step-conditioned student.

    Args:
      unet, params: the student.
      schedule: the noise schedule.
      x_T: ``[B, h, w, c]`` unit Gaussian noise.
      context: ``[B, L, D]`` text context.
      num_steps: K (static); also the value of the step conditioning.
      embedding_dim: width of ``timestep_cond``.
      prediction_type, spacing: as ``schedules.sample``.
      remat: rematerialise each pass in a backward pass (``student_model_fn``).
      added_cond_kwargs: SDXL's ``{"text_embeds", "time_ids"}`` (None otherwise).
      prepare_params: see ``student_model_fn``.

    Returns:
      ``[B, h, w, c]`` latents.
    """
    fn = student_model_fn(unet, params, context, num_steps, embedding_dim,
                          schedule.num_train_timesteps, remat=remat, added_cond_kwargs=added_cond_kwargs,
                          prepare_params=prepare_params)
    return schedules.sample(fn, schedule, x_T, num_steps=num_steps, spacing=spacing,
                            prediction_type=prediction_type)


def rollout_loss(
    sample_fn: Callable[[int], jax.Array],
    target: jax.Array,
    step_index: jax.Array,
    step_counts: Sequence[int],
    decode_fn: Callable[[jax.Array], jax.Array] | None = None,
    target_pixels: jax.Array | None = None,
    pixel_weight: float = 0.0,
    shape_mask: jax.Array | None = None,
    shape_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Student distillation loss for one randomly chosen step count, one compiled program.

    ``lax.switch`` over ``step_counts`` selects the branch that unrolls K student steps, so
    each train step pays for one K only while the step function is compiled once.

    Args:
      sample_fn: ``sample_fn(K) -> [B, h, w, c]`` the student's K-step sample (traced with
        the params being differentiated).
      target: ``[B, h, w, c]`` the teacher's guided many-step sample from the same noise.
      step_index: scalar int32 index into ``step_counts``.
      step_counts: the static K values.
      decode_fn: latents -> pixels (the frozen VAE decoder), for the pixel terms.
      target_pixels: ``[B, H, W, 3]`` decoded ``target`` (with ``pixel_weight`` or
        ``shape_weight > 0``).
      pixel_weight: weight of the whole-image pixel MSE.
      shape_mask: ``[B, H, W, 1]`` the target's shape pixels (with ``shape_weight > 0``).
      shape_weight: weight of the pixel MSE over ``shape_mask`` normalised by its area
        (``masked_mse``).

    Returns:
      ``(loss, metrics)`` with ``latent_mse``, ``pixel_mse`` and ``shape_mse`` (0 when unused).
    """
    zero = jnp.zeros((), jnp.float32)

    def branch(k: int) -> Callable[[], tuple[jax.Array, jax.Array, jax.Array]]:
        def run() -> tuple[jax.Array, jax.Array, jax.Array]:
            out = sample_fn(k)
            latent = jnp.mean(jnp.square(out - target))
            pixel, shape = zero, zero
            if pixel_weight > 0.0 or shape_weight > 0.0:
                pixels = decode_fn(out)
                if pixel_weight > 0.0:
                    pixel = jnp.mean(jnp.square(pixels - target_pixels))
                if shape_weight > 0.0:
                    shape = masked_mse(pixels, target_pixels, shape_mask)
            return latent, pixel, shape

        return run

    latent, pixel, shape = jax.lax.switch(step_index, [branch(k) for k in step_counts])
    loss = latent + pixel_weight * pixel + shape_weight * shape
    return loss, {"latent_mse": latent, "pixel_mse": pixel, "shape_mse": shape}
