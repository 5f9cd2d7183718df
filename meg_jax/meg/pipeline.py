"""The split generation pipeline: ES text encode + K student steps -> merge -> link -> UE.

``generate(backbone, prompts, K, r, link, key)`` runs, for a batch of prompts,

1. **ES**: text encoder, then K trailing DDIM steps of the step-conditioned student
   (``meg_jax.distill.losses.student_sample``, the distillation's own sampler) from unit
   Gaussian noise;
2. **feature merging**: the ``h·w`` latent tokens (``C`` channels each) are merged with
   ratio r by ToMe's bipartite soft matching (``meg_jax.backbone.tome``, top-left
   destination per 2×2 cell, similarity on the latent itself);
3. **link**: the merged tokens go through the digital or analog link
   (``meg_jax.meg.link``); the merge map travels as error-free side information;
4. **UE**: unmerge, divide by the latent scale, VAE decode, clip -> images in [-1, 1]
   (:func:`decode_latents` is ``meg_jax.distill.decode_latents``, the one decode convention
   of the project, so calibration and backbone evaluation score the same images). The UE
   decodes with the backbone's merging-aware decoder when it has one
   (``Backbone.ue_decoder``, trained on latents that went through this very merge -> link ->
   unmerge path: :func:`ue_decode_latents`); :func:`plain_decoder` drops it, and
   ``generate(..., ue_decoder=False)`` decodes with the plain VAE decoder.

``generate`` also takes a diffusers pipeline (``meg_jax.backbone.load_pipeline``): the ES
runs the pipeline's own scheduler for K steps, merging and the link are the same, and the UE
decodes with the pipeline's VAE, mapped to the same [-1, 1] convention
(``meg_jax.meg.generator``, the interface both kinds of model provide).

It returns the images and the :class:`~meg_jax.meg.costs.Costs` of the request under a cost
preset. The whole path is one jitted function per static ``(K, r, link)``, cached by
``jax.jit``; the SNR, noise and key are dynamic.

The pieces are public too, because the calibration reuses the ES latents across r and SNR:
:func:`encode_text`, :func:`es_latents`, :func:`teacher_latents`, :func:`transmit_latents`,
:func:`decode_latents`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.backbone import schedules, tome
from meg_jax.distill import decode_latents  # the one decode: UE VAE decoder, clipped to [-1, 1]
from meg_jax.meg import costs as costs_lib
from meg_jax.meg import link as link_lib
from meg_jax.meg.link import LinkConfig

__all__ = [
    "DEFAULT_SNR_DB",
    "tokenize",
    "encode_text",
    "es_latents",
    "teacher_latents",
    "merge_for_transmission",
    "transmit_latents",
    "transmit_latents_per_sample",
    "decode_latents",
    "ue_decode_latents",
    "plain_decoder",
    "generate",
    "reference_images",
    "init_random_backbone",
]

DEFAULT_SNR_DB = 20.0  # receive SNR used when the caller gives none (dB)


def _modules(backbone: Any) -> tuple[Any, Any, Any]:
    from meg_jax.backbone.text_encoder import TextEncoder
    from meg_jax.backbone.unet import UNet
    from meg_jax.backbone.vae import AutoencoderKL

    cfg = backbone.config
    return TextEncoder(cfg.text_encoder), UNet(cfg.unet), AutoencoderKL(cfg.vae)


def _schedule() -> schedules.NoiseSchedule:
    # The distillation trains with schedules.make_schedule() defaults (scaled-linear betas).
    # Built per trace (not cached): a cached table made under one trace would leak into others.
    return schedules.make_schedule()


def tokenize(backbone: Any, prompts_or_tokens: Sequence[str] | np.ndarray | jax.Array) -> jax.Array:
    """Prompts (list of str) or token ids ``[B, L]`` -> int32 token ids ``[B, L]``."""
    if isinstance(prompts_or_tokens, str):
        raise ValueError("give a list of prompts, not one str")
    if isinstance(prompts_or_tokens, (list, tuple)) and prompts_or_tokens and isinstance(prompts_or_tokens[0], str):
        from meg_jax.data import tokenizer

        return jnp.asarray(tokenizer.encode(list(prompts_or_tokens), backbone.config.text_encoder.max_length))
    tokens = jnp.asarray(prompts_or_tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"token ids must be an integer array [B, L], got {tokens.dtype} {tokens.shape}")
    return tokens.astype(jnp.int32)


def encode_text(backbone: Any, tokens: jax.Array) -> jax.Array:
    """Text context ``[B, L, D]`` from token ids ``[B, L]`` (the distillation's encoding)."""
    text_encoder, _, _ = _modules(backbone)
    return text_encoder.apply(backbone.text_encoder, tokens)


def _latent_shape(backbone: Any, batch: int) -> tuple[int, int, int, int]:
    h = backbone.config.latent_size
    return (batch, h, h, backbone.config.vae.latent_channels)


def es_latents(backbone: Any, context: jax.Array, noise: jax.Array, steps: int) -> jax.Array:
    """K trailing DDIM steps of the step-conditioned student (traceable; K static).

    Args:
      backbone: ``meg_jax.checkpoint.Backbone``.
      context: ``[B, L, D]`` text context.
      noise: ``[B, h, w, C]`` unit Gaussian noise.
      steps: K.

    Returns:
      ``[B, h, w, C]`` scaled latents (the UNet's units).
    """
    from meg_jax.distill import losses

    _, unet, _ = _modules(backbone)
    return losses.student_sample(
        unet, backbone.student, _schedule(), noise, context,
        num_steps=steps,
        embedding_dim=backbone.sampling.step_embedding_dim,
        prediction_type=backbone.config.prediction_type,
        spacing=backbone.sampling.spacing,
    )


def teacher_latents(backbone: Any, context: jax.Array, noise: jax.Array, steps: int | None = None) -> jax.Array:
    """The teacher's guided DDIM sample (the reference; ``steps`` defaults to 50 as shipped)."""
    from meg_jax.distill import losses

    _, unet, _ = _modules(backbone)
    return losses.teacher_sample(
        unet, backbone.teacher, _schedule(), noise, context,
        num_steps=backbone.sampling.teacher_steps if steps is None else steps,
        guidance_scale=backbone.sampling.guidance_scale,
        prediction_type=backbone.config.prediction_type,
        spacing=backbone.sampling.spacing,
    )


def merge_for_transmission(latents: jax.Array, merge_ratio: float) -> tuple[jax.Array, tome.MergePlan]:
    """Merges the ``h·w`` latent tokens: ``[B, h, w, C]`` -> ``([B, h·w − r, C], plan)``.

    Top-left destination per 2×2 cell (known to the UE, so only the merge itself is side
    information: ``costs.merge_map_bits``); similarity on the latent features.
    """
    b, h, w, c = latents.shape
    return tome.merge_tokens(latents.reshape(b, h * w, c), h, w, merge_ratio, key=None)


def transmit_latents(
    latents: jax.Array, merge_ratio: float, link: LinkConfig, snr_db: jax.Array | float, key: jax.Array
) -> jax.Array:
    """What the UE holds after merge -> link -> unmerge: ``[B, h, w, C]`` (traceable).

    ``merge_ratio`` and ``link`` are static; with ``r = 0`` nothing is merged, and an analog
    AWGN link at ``snr_db = inf`` returns the latents bit for bit.
    """
    b, h, w, c = latents.shape
    merged, plan = merge_for_transmission(latents, merge_ratio)
    received = link_lib.transmit_features(merged, link, snr_db, key)
    return tome.unmerge(received, plan).reshape(b, h, w, c)


def transmit_latents_per_sample(
    latents: jax.Array,
    ratio_index: jax.Array,
    merge_ratios: Sequence[float],
    link: LinkConfig,
    snr_db: jax.Array | float,
    key: jax.Array,
) -> jax.Array:
    """:func:`transmit_latents` with each sample's own merge ratio: ``[B, h, w, C]`` (traceable).

    The number of merged tokens is static, so every ratio of ``merge_ratios`` is one call of
    :func:`transmit_latents` on the whole batch (same ``snr_db`` and ``key``), and sample
    ``b`` keeps the output of ratio ``merge_ratios[ratio_index[b]]``. Merge, link and unmerge
    act on each sample alone, so sample ``b`` is exactly what the pipeline delivers for it at
    its ratio with this key (what the UE decoder's training stage sends its latents through).

    Args:
      latents: ``[B, h, w, C]`` scaled latents.
      ratio_index: ``[B]`` int, index into ``merge_ratios``.
      merge_ratios: the ratios (static).
      link: the link config (static).
      snr_db: receive SNR in dB, scalar or ``[B]``.
      key: the channel's PRNG key (shared by every ratio's call).
    """
    outs = jnp.stack([transmit_latents(latents, float(r), link, snr_db, key) for r in merge_ratios])  # [R, B, ...]
    pick = jax.nn.one_hot(ratio_index, len(merge_ratios), dtype=jnp.bool_).T  # [R, B]
    pick = pick.reshape(pick.shape + (1,) * (latents.ndim - 1))
    # One True per sample: the sum adds exact zeros to the selected output.
    return jnp.sum(jnp.where(pick, outs, 0.0), axis=0).astype(latents.dtype)


def plain_decoder(backbone: Any) -> Any:
    """``backbone`` without its merging-aware UE decoder (the UE then decodes with the VAE's)."""
    return backbone.replace(ue_decoder=None) if getattr(backbone, "ue_decoder", None) is not None else backbone


def ue_decode_latents(backbone: Any, latents: jax.Array) -> jax.Array:
    """What the UE shows for received latents ``[B, h, w, C]``: images ``[B, H, W, 3]`` in [-1, 1].

    :func:`decode_latents` (the project's one decode convention) with the backbone's
    merging-aware decoder (``Backbone.ue_decoder``: the decoder groups, over the VAE's own
    encoder groups) when it has one, else with the VAE's decoder.
    """
    ue = getattr(backbone, "ue_decoder", None)
    if ue is None:
        return decode_latents(backbone, latents)
    return decode_latents(backbone.replace(vae={"params": {**backbone.vae["params"], **ue}}), latents)


@functools.partial(jax.jit, static_argnames=("steps", "merge_ratio", "link"))
def _generate_jit(backbone, tokens, noise, snr_db, key, *, steps, merge_ratio, link):
    context = encode_text(backbone, tokens)
    latents = es_latents(backbone, context, noise, steps)
    received = transmit_latents(latents, merge_ratio, link, snr_db, key)
    return ue_decode_latents(backbone, received)


_transmit_jit = jax.jit(transmit_latents, static_argnames=("merge_ratio", "link"))


def generate(
    model: Any,
    prompts_or_tokens: Sequence[str] | np.ndarray | jax.Array,
    steps: int,
    merge_ratio: float,
    link: LinkConfig,
    key: jax.Array,
    *,
    snr_db: float | jax.Array = DEFAULT_SNR_DB,
    noise: jax.Array | None = None,
    cost: str | costs_lib.CostPreset = "tiny",
    ue_decoder: bool = True,
) -> tuple[jax.Array, costs_lib.Costs]:
    """Generates images with K ES steps, merge ratio r, over ``link`` at ``snr_db``.

    Args:
      model: the tiny ``meg_jax.checkpoint.Backbone`` (teacher, student, VAE, text encoder;
        the whole path is one jitted program), a diffusers pipeline from
        ``meg_jax.backbone.load_pipeline`` (its scheduler run for K steps; encode, denoise,
        link and decode are separate jitted programs), or any
        ``meg_jax.meg.generator.Generator``.
      prompts_or_tokens: B prompts, or token ids ``[B, L]`` (tiny backbone only).
      steps: K ES denoising steps (static: one compile per K).
      merge_ratio: r, fraction of latent tokens merged away (static), ``0 <= r <= 0.75``.
      link: the link config (static).
      key: PRNG key for the initial noise (unless ``noise`` is given) and the channel.
      snr_db: receive SNR in dB, scalar or ``[B]``; ``inf`` is a noiseless channel.
      noise: ``[B, h, w, C]`` initial noise, to compare settings on the same noise.
      cost: cost preset (name or :class:`~meg_jax.meg.costs.CostPreset`) that prices the
        request; its latent grid need not be the model's (e.g. price ``sdxl-1024``).
      ue_decoder: decode with the backbone's merging-aware UE decoder when it has one
        (``False``: the plain VAE decoder, e.g. to measure the difference).

    Returns:
      ``(images [B, H, W, 3] in [-1, 1], costs)``; every ``Costs`` field is ``[B]``.
    """
    from meg_jax.meg import generator as generator_lib

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not 0.0 <= merge_ratio <= tome.max_ratio():
        raise ValueError(f"merge_ratio must be in [0, {tome.max_ratio()}], got {merge_ratio!r}")
    gen = generator_lib.as_generator(model)
    is_backbone = isinstance(gen, generator_lib.BackboneGenerator)
    if is_backbone:
        prompts_or_tokens = tokenize(gen.backbone, prompts_or_tokens)
    elif isinstance(prompts_or_tokens, str):
        prompts_or_tokens = [prompts_or_tokens]
    batch = len(prompts_or_tokens)
    shape = gen.latent_shape(batch)
    k_noise, k_channel = jax.random.split(key)
    if noise is None:
        noise = jax.random.normal(k_noise, shape)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
    snr = jnp.broadcast_to(jnp.asarray(snr_db, jnp.float32), (batch,))
    if is_backbone:
        backbone = gen.backbone if ue_decoder else plain_decoder(gen.backbone)
        images = _generate_jit(backbone, prompts_or_tokens, noise, snr, k_channel,
                               steps=steps, merge_ratio=float(merge_ratio), link=link)
    else:
        latents = gen.es_latents(gen.encode(prompts_or_tokens), noise, steps)
        received = _transmit_jit(latents, float(merge_ratio), link, snr, k_channel)
        images = gen.decode(received)
    preset = costs_lib.cost_preset(cost) if isinstance(cost, str) else cost
    return images, costs_lib.meg_costs(preset, link, steps, merge_ratio, snr)


@jax.jit
def _reference_jit(backbone, tokens, noise):
    context = encode_text(backbone, tokens)
    return decode_latents(backbone, teacher_latents(backbone, context, noise))


def reference_images(backbone: Any, prompts_or_tokens: Any, noise: jax.Array) -> jax.Array:
    """The teacher's 50-step, uncompressed, noiseless images ``[B, H, W, 3]`` (the reference)."""
    return _reference_jit(backbone, tokenize(backbone, prompts_or_tokens), noise)


def init_random_backbone(key: jax.Array, preset: str = "tiny") -> Any:
    """A randomly initialised ``Backbone`` (for tests and shape checks, never for results).

    The student's step-conditioning projection is random too, so K matters from the start.
    The classifier is ``None``.
    """
    from meg_jax.backbone.text_encoder import init_text_encoder
    from meg_jax.backbone.unet import init_unet
    from meg_jax.backbone.vae import init_vae
    from meg_jax.checkpoint import Backbone
    from meg_jax.distill.config import SamplingConfig
    from meg_jax.distill.config import preset as distill_preset

    config = distill_preset(preset).backbone
    k_text, k_vae, k_teacher, k_student = jax.random.split(key, 4)
    return Backbone(
        classifier=None,
        vae=init_vae(config.vae, k_vae),
        text_encoder=init_text_encoder(config.text_encoder, k_text),
        teacher=init_unet(config.unet, k_teacher),
        student=init_unet(config.unet, k_student),
        config=config,
        classifier_config=None,
        sampling=SamplingConfig(),
    )
