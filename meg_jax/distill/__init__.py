"""Distillation of the backbone: VAE, teacher LDM, and one step-conditioned student for K ∈ {1, 2, 4, 8}.

Library side of ``python -m train.distill`` (configs in ``config``, losses and samplers in
``losses``, train states, steps and the host loop in ``train``), plus the generation
helpers every consumer of a shipped backbone uses::

    from meg_jax.checkpoint import load_backbone
    from meg_jax import distill

    bb = load_backbone("checkpoints/tiny")
    latents = distill.generate_latents(bb, tokens, noise, num_steps=4)          # student, [B, 8, 8, 4]
    images = distill.decode_latents(bb, latents)                                # [B, 32, 32, 3] in [-1, 1]
    ref = distill.generate(bb, tokens, noise, num_steps=50, model="teacher")     # guided teacher DDIM-50

All functions are jittable with ``num_steps`` and ``model`` static (the backbone's configs
are static fields of the ``Backbone`` pytree).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp

from meg_jax.backbone import schedules
from meg_jax.distill import losses

__all__ = ["encode_text", "generate_latents", "decode_latents", "generate", "noise_shape"]


def _modules(bb: Any) -> tuple[Any, Any, Any]:
    from meg_jax.backbone import AutoencoderKL, TextEncoder, UNet

    return UNet(bb.config.unet), AutoencoderKL(bb.config.vae), TextEncoder(bb.config.text_encoder)


def noise_shape(bb: Any, batch: int) -> tuple[int, int, int, int]:
    """Shape ``[B, h, w, c]`` of the initial noise (and of the latents) of ``bb``."""
    h = bb.config.latent_size
    return (batch, h, h, bb.config.vae.latent_channels)


def encode_text(bb: Any, tokens: jax.Array) -> jax.Array:
    """Text context ``[B, L, D]`` of token ids ``[B, L]`` (``meg_jax.data.tokenizer``)."""
    _, _, text = _modules(bb)
    return text.apply(bb.text_encoder, tokens)


@functools.partial(jax.jit, static_argnames=("num_steps", "model", "guidance_scale"))
def generate_latents(bb: Any, tokens: jax.Array, noise: jax.Array, *, num_steps: int,
                     model: Literal["student", "teacher"] = "student",
                     guidance_scale: float | None = None) -> jax.Array:
    """Denoised latents (scaled, as the UNet sees them) from noise and prompts.

    Args:
      bb: the ``Backbone``.
      tokens: ``[B, L]`` int32 prompt tokens.
      noise: ``[B, h, w, c]`` unit Gaussian noise (``noise_shape``).
      num_steps: K, trailing-spaced DDIM steps (static).
      model: "student" (conditioned on K, no guidance) or "teacher" (classifier-free
        guidance with ``guidance_scale``, default the shipped ``sampling.guidance_scale``).
      guidance_scale: teacher only.

    Returns:
      ``[B, h, w, c]`` latents; ``decode_latents`` turns them into images.
    """
    unet, _, _ = _modules(bb)
    context = encode_text(bb, tokens)
    schedule = schedules.make_schedule()
    s = bb.sampling
    pred = bb.config.prediction_type
    if model == "student":
        return losses.student_sample(unet, bb.student, schedule, noise, context, num_steps=num_steps,
                                     embedding_dim=s.step_embedding_dim, prediction_type=pred,
                                     spacing=s.spacing)
    if model == "teacher":
        scale = s.guidance_scale if guidance_scale is None else guidance_scale
        return losses.teacher_sample(unet, bb.teacher, schedule, noise, context, num_steps=num_steps,
                                     guidance_scale=scale, prediction_type=pred, spacing=s.spacing)
    raise ValueError(f"model must be 'student' or 'teacher', got {model!r}")


@jax.jit
def decode_latents(bb: Any, latents: jax.Array) -> jax.Array:
    """Images ``[B, H, W, 3]`` in [-1, 1] from UNet-scale latents ``[B, h, w, c]`` (the UE's VAE decoder).

    The one decode of the project (``meg_jax.meg.pipeline.decode_latents`` is this function):
    latents are divided by the latent scale, decoded, and **clipped to [-1, 1]**, the valid
    image range, as diffusers' ``VaeImageProcessor`` clamps ``x / 2 + 0.5`` to [0, 1]. Every
    metric (PSNR, SSIM, classifier) therefore sees images as a display would, and the
    reference and the generated images follow the same convention.
    """
    _, vae, _ = _modules(bb)
    z = latents / bb.config.latent_scaling_factor
    return jnp.clip(vae.apply(bb.vae, z, method="decode"), -1.0, 1.0)


def generate(bb: Any, tokens: jax.Array, noise: jax.Array, *, num_steps: int,
             model: Literal["student", "teacher"] = "student",
             guidance_scale: float | None = None) -> jax.Array:
    """``decode_latents(generate_latents(...))``: images ``[B, H, W, 3]`` in [-1, 1]."""
    latents = generate_latents(bb, tokens, noise, num_steps=num_steps, model=model,
                               guidance_scale=guidance_scale)
    return decode_latents(bb, latents)
