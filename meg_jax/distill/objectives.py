"""The objective of each distillation stage, as ``loss_fn(params, inputs, key) -> (loss, metrics)``.

``Models`` holds the stateless Flax modules of a backbone; each ``*_loss_fn(models, config,
mesh)`` closes over them and the stage's config and draws (and shards) its own batch from
``key``. The train step that differentiates them lives in ``meg_jax.distill.train``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from meg_jax import parallel, partition
from meg_jax.backbone import schedules
from meg_jax.data.shapes import sample_batch
from meg_jax.distill import losses
from meg_jax.distill.config import DistillConfig

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Models:
    """The Flax modules of a backbone (stateless; params live in the states).

    ``text_encoder.apply(params, tokens [B, L]) -> [B, L, D]`` is the context the UNet
    cross-attends to (the tiny ``TextEncoder``, or a pipeline's CLIP through
    ``meg_jax.distill.pipeline_teacher.CLIPContext``); ``prediction_type`` is what the UNet
    predicts under ``schedule``.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    classifier: Any
    schedule: schedules.NoiseSchedule
    prediction_type: str = "epsilon"


def build_models(config: DistillConfig) -> Models:
    """Instantiates the UNet, VAE, text encoder and classifier modules and the schedule.

    With ``config.pipeline`` set, the modules are the pipeline's (configs read from its
    folder, no weights): ``meg_jax.distill.pipeline_teacher.pipeline_models``.
    """
    if config.pipeline is not None:
        from meg_jax.distill.pipeline_teacher import pipeline_models

        return pipeline_models(config)
    from meg_jax.backbone.text_encoder import TextEncoder
    from meg_jax.backbone.unet import UNet
    from meg_jax.backbone.vae import AutoencoderKL

    b = config.backbone
    c = config.compute
    return Models(
        unet=UNet(b.unet, dtype=jnp.dtype(c.dtype), attention=c.attention, remat=c.remat),
        vae=AutoencoderKL(b.vae),
        text_encoder=TextEncoder(b.text_encoder),
        classifier=_classifier_module(config),
        schedule=schedules.make_schedule(),
        prediction_type=b.prediction_type,
    )


def _classifier_module(config: DistillConfig) -> Any:
    try:
        from meg_jax.data.classifier import AttributeClassifier
    except ImportError:  # the classifier stage is then unavailable; the others still run
        return None
    return AttributeClassifier(config.classifier_model)


# --------------------------------------------------------------------------- losses per stage


def micro_batch_size(batch_size: int, config: DistillConfig, mesh: jax.sharding.Mesh, stage: str) -> int:
    """The batch one loss call draws: ``batch_size / compute.grad_accum_steps``.

    Raises:
      ValueError: the batch does not split into that many microbatches each divisible by
        the mesh's data axis (names the fields to change).
    """
    n = config.compute.grad_accum_steps
    if batch_size % n:
        raise ValueError(f"{stage}.batch_size={batch_size} is not divisible by "
                         f"compute.grad_accum_steps={n}")
    micro = batch_size // n
    parallel.check_batch_size(micro, mesh, what=f"{stage}.batch_size / compute.grad_accum_steps =")
    return micro


def classifier_loss_fn(models: Models, config: DistillConfig, mesh: jax.sharding.Mesh) -> LossFn:
    """Cross-entropy of the attribute classifier on a fresh batch (``inputs`` unused)."""
    from meg_jax.data.classifier import classifier_loss, training_batch

    batch_size = micro_batch_size(config.classifier.batch_size, config, mesh, "classifier")
    model_cfg = dataclasses.replace(config.classifier_model, batch_size=batch_size)

    def loss_fn(params: Any, inputs: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        images, attrs = training_batch(key, model_cfg)  # augmented like generated images
        images, attrs = parallel.constrain_batch((images, attrs), mesh)
        return classifier_loss(models.classifier, params, images, attrs)

    return loss_fn


def vae_loss_fn(models: Models, config: DistillConfig, mesh: jax.sharding.Mesh) -> LossFn:
    """VAE loss on a fresh batch: MSE + edge MSE + small KL (``inputs`` unused)."""
    cfg = config.vae
    batch_size = micro_batch_size(cfg.batch_size, config, mesh, "vae")

    def loss_fn(params: Any, inputs: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        k_data, k_z = jax.random.split(key)
        images, _, _ = sample_batch(k_data, batch_size, config.data)
        images = parallel.constrain_batch(images, mesh)
        mean, logvar = models.vae.apply(params, images, method="encode")
        z = mean
        if cfg.sample_posterior:
            z = z + jnp.exp(0.5 * logvar) * jax.random.normal(k_z, mean.shape)
        recon = models.vae.apply(params, z, method="decode")
        rec = losses.reconstruction_loss(recon, images)
        edge = losses.edge_loss(recon, images)
        kl = losses.gaussian_kl(mean, logvar)
        loss = rec + cfg.edge_weight * edge + cfg.kl_weight * kl
        # PSNR of the batch on [-1, 1] images: peak-to-peak 2 -> 10 log10(4 / MSE).
        return loss, {"mse": rec, "edge": edge, "kl": kl, "psnr": 10.0 * jnp.log10(4.0 / rec)}

    return loss_fn


VAE_ENCODER = ("encoder", "quant_conv")  # VAE param groups the decoder stage keeps frozen
VAE_DECODER = ("decoder", "post_quant_conv")  # the groups it trains


def split_vae(vae: Any) -> tuple[dict, dict]:
    """``{"params": {...}}`` of the VAE -> (encoder groups, decoder groups)."""
    p = vae["params"]
    return {k: p[k] for k in VAE_ENCODER}, {k: p[k] for k in VAE_DECODER}


def merge_vae(encoder: Mapping[str, Any], decoder: Mapping[str, Any]) -> dict:
    """Inverse of ``split_vae``."""
    return {"params": {**encoder, **decoder}}


def decoder_loss_fn(models: Models, config: DistillConfig, mesh: jax.sharding.Mesh) -> LossFn:
    """Decoder refinement loss; ``params`` = the decoder groups, ``inputs = {"encoder": ...}``.

    MSE + ``edge_weight`` x edge MSE + ``shape_weight`` x the MSE over the dilated shape
    mask normalised by its area (``losses.masked_mse``), on reconstructions of the frozen
    encoder's posterior means of a fresh batch.
    """
    from meg_jax.data.shapes import COLOR_RGB

    cfg = config.decoder
    batch_size = micro_batch_size(cfg.batch_size, config, mesh, "decoder")
    palette = jnp.asarray(COLOR_RGB, jnp.float32)

    def loss_fn(params: Any, inputs: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        images, _, attrs = sample_batch(key, batch_size, config.data)
        images, attrs = parallel.constrain_batch((images, attrs), mesh)
        vae = merge_vae(inputs["encoder"], params)
        mean, _ = models.vae.apply(vae, images, method="encode")
        recon = models.vae.apply(vae, jax.lax.stop_gradient(mean), method="decode")
        rec = losses.reconstruction_loss(recon, images)
        edge = losses.edge_loss(recon, images)
        mask = losses.foreground_mask(images, palette[attrs.background], cfg.mask_dilation)
        shape = losses.masked_mse(recon, images, mask)
        loss = rec + cfg.edge_weight * edge + cfg.shape_weight * shape
        return loss, {"mse": rec, "edge": edge, "shape_mse": shape, "psnr": 10.0 * jnp.log10(4.0 / rec)}

    return loss_fn


def ue_decoder_loss_fn(models: Models, config: DistillConfig, mesh: jax.sharding.Mesh) -> LossFn:
    """Merging-aware UE decoder loss; ``params`` = the decoder groups,
    ``inputs = {"encoder": ..., "latent_scale": scalar}``.

    A fresh batch is encoded by the frozen encoder (posterior means times the latent scale:
    the UNet's units, what the ES merges and sends); each sample draws its merge ratio
    uniformly from ``merge_ratios`` and its SNR uniformly in dB over ``snr_db_range`` and goes
    through the split pipeline's own merge -> link -> unmerge
    (``meg_jax.meg.pipeline.transmit_latents_per_sample``); the decoded result is scored
    against the clean image with the decoder stage's loss (MSE + edge + shape mask).
    """
    from meg_jax.data.shapes import COLOR_RGB
    from meg_jax.meg import pipeline

    cfg = config.ue_decoder
    batch_size = micro_batch_size(cfg.batch_size, config, mesh, "ue_decoder")
    palette = jnp.asarray(COLOR_RGB, jnp.float32)
    link = cfg.link()
    ratios = tuple(float(r) for r in cfg.merge_ratios)
    low, high = (float(v) for v in cfg.snr_db_range)

    def loss_fn(params: Any, inputs: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        k_data, k_ratio, k_snr, k_link = jax.random.split(key, 4)
        images, _, attrs = sample_batch(k_data, batch_size, config.data)
        images, attrs = parallel.constrain_batch((images, attrs), mesh)
        vae = merge_vae(inputs["encoder"], params)
        mean, _ = models.vae.apply(vae, images, method="encode")
        scale = inputs["latent_scale"]
        latents = jax.lax.stop_gradient(mean) * scale
        ratio_index = jax.random.randint(k_ratio, (batch_size,), 0, len(ratios))
        snr_db = jax.random.uniform(k_snr, (batch_size,), minval=low, maxval=high)
        received = pipeline.transmit_latents_per_sample(latents, ratio_index, ratios, link, snr_db, k_link)
        recon = models.vae.apply(vae, received / scale, method="decode")
        mask = losses.foreground_mask(images, palette[attrs.background], cfg.mask_dilation)
        # The decoder stage's terms per sample (each on a batch of one): [B] each.
        rec, edge, shape = (_per_sample(fn, recon, images, *extra) for fn, extra in
                            ((losses.reconstruction_loss, ()), (losses.edge_loss, ()), (losses.masked_mse, (mask,))))
        per = rec + cfg.edge_weight * edge + cfg.shape_weight * shape  # [B]
        mean = jnp.mean(per)
        if cfg.balance_samples:
            # Value: the mean loss; gradient: each sample's scaled by mean / its own loss (that of
            # mean x mean(log loss_i)), so the low-SNR samples' large errors do not drown the
            # few-percent merging errors of high-SNR ones.
            loss = jnp.mean(jax.lax.stop_gradient(mean / per) * per)
        else:
            loss = mean
        mse = jnp.mean(rec)
        return loss, {"mse": mse, "edge": jnp.mean(edge), "shape_mse": jnp.mean(shape),
                      "psnr": 10.0 * jnp.log10(4.0 / mse)}

    return loss_fn


def _per_sample(fn: Callable[..., jax.Array], *arrays: jax.Array) -> jax.Array:
    """``fn`` (a batch-mean loss) of each sample alone: ``[B]``."""
    return jax.vmap(lambda *xs: fn(*(x[None] for x in xs)))(*arrays)


def teacher_loss_fn(models: Models, config: DistillConfig, mesh: jax.sharding.Mesh,
                    stage: str = "teacher") -> LossFn:
    """Teacher diffusion loss; ``inputs = {"latents": [N, h, w, c], "tokens": [N, L]}``.

    The latents are the frozen VAE's scaled posterior means of ``N`` generated images,
    encoded once (``make_latent_cache``): the VAE encoder at 32 × 32 costs about twice the
    tiny UNet's forward pass, so encoding every batch afresh would almost double the
    stage. Trains ``params = {"unet": ..., "text_encoder": ...}`` together. ``stage`` picks
    the config: "teacher" or its continuation "teacher_ft" (same loss).
    """
    cfg = getattr(config, stage)
    pred = config.backbone.prediction_type
    schedule = models.schedule
    batch_size = micro_batch_size(cfg.batch_size, config, mesh, stage)

    def loss_fn(params: Any, inputs: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        k_idx, k_noise, k_t, k_drop = jax.random.split(key, 4)
        n = inputs["latents"].shape[0]
        idx = jax.random.randint(k_idx, (batch_size,), 0, n)
        x0, tokens = parallel.constrain_batch((inputs["latents"][idx], inputs["tokens"][idx]), mesh)
        noise = jax.random.normal(k_noise, x0.shape)
        t = jax.random.randint(k_t, (batch_size,), 0, schedule.num_train_timesteps)
        x_t = schedules.add_noise(schedule, x0, noise, t)
        context = models.text_encoder.apply(params["text_encoder"], tokens)
        context = losses.drop_context(k_drop, context, cfg.cond_dropout)
        out = models.unet.apply(params["unet"], x_t, t, context).astype(jnp.float32)  # loss in fp32
        target = losses.diffusion_target(schedule, x0, noise, t, pred)
        loss = jnp.mean(jnp.square(out - target))
        return loss, {}

    return loss_fn


# A decoded target pixel is the shape's when its colour differs from the background by more
# than this (sum of |difference| over RGB). Palette colours are cube corners of [-1, 1]^3,
# so two of them differ by >= 2; the decoder's error is ~0.03 (35.8 dB reconstructions) and a
# shape's soft edge falls between the two.
SHAPE_THRESHOLD = 0.5


def student_loss_fn(models: Models, config: DistillConfig, mesh: jax.sharding.Mesh) -> LossFn:
    """Rollout distillation loss; ``inputs`` holds the frozen text encoder, VAE, latent scale
    and the teacher targets ``{"noise", "tokens", "latents"}`` (``[N, ...]`` each).

    With ``compute.rollout_remat`` each of the K UNet passes is rematerialised in the
    backward pass (same loss and gradient; activation memory of one pass instead of K).
    ``student.shape_weight > 0`` adds the MSE of the decoded sample over the decoded target's
    shape (pixels more than ``SHAPE_THRESHOLD`` off the border's palette colour, dilated by
    ``student.mask_dilation``) normalised by its area. An SDXL-style UNet (``addition_embed_type="text_time"``) also reads the pooled prompt
    embedding ``targets["text_embeds"]`` ``[N, E]``; its ``time_ids`` are the square
    training resolution with no crop.
    """
    cfg = config.student
    if cfg.shape_weight > 0 and config.pipeline is not None:
        raise ValueError("student.shape_weight reads shapes on the procedural data's palette; it does not "
                         "apply with a pipeline teacher (--pipeline.*): set --student.shape_weight 0")
    pred = models.prediction_type
    schedule = models.schedule
    dim = config.sampling.step_embedding_dim
    spacing = config.sampling.spacing
    probs = jnp.asarray(cfg.step_probs, jnp.float32)
    probs = probs / jnp.sum(probs)
    batch_size = micro_batch_size(cfg.batch_size, config, mesh, "student")
    text_time = config.backbone.unet.addition_embed_type == "text_time"
    res = config.data.resolution
    # FSDP: each pass gathers the UNet's params (cast to the compute dtype first) at use.
    gather = functools.partial(partition.gather_for_compute, cfg=config.parallel, mesh=mesh)
    compute_dtype = jnp.dtype(config.compute.dtype)
    from meg_jax.data.shapes import COLOR_RGB

    palette = jnp.asarray(COLOR_RGB, jnp.float32)

    def prepare(params: Any) -> Any:
        return gather(params, dtype=None if compute_dtype == jnp.float32 else compute_dtype)

    def loss_fn(params: Any, inputs: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        k_idx, k_steps = jax.random.split(key)
        targets = inputs["targets"]
        if text_time and "text_embeds" not in targets:
            raise ValueError("the UNet has addition_embed_type='text_time' (SDXL): the student's "
                             "targets need 'text_embeds' [N, E] (pooled prompt embeddings)")
        n = targets["noise"].shape[0]
        idx = jax.random.randint(k_idx, (batch_size,), 0, n)
        batch = jax.tree.map(lambda a: a[idx], targets)
        batch = parallel.constrain_batch(batch, mesh)
        context = models.text_encoder.apply(gather(inputs["text_encoder"]), batch["tokens"])
        step_index = jax.random.choice(k_steps, len(cfg.step_counts), p=probs)
        added = None
        if text_time:  # (original size, crop top-left, target size) of SDXL's micro-conditioning
            time_ids = jnp.asarray([res, res, 0, 0, res, res], jnp.float32)
            added = {"text_embeds": batch["text_embeds"],
                     "time_ids": jnp.broadcast_to(time_ids, (batch_size, 6))}

        def sample_fn(k: int) -> jax.Array:
            return losses.student_sample(models.unet, params, schedule, batch["noise"], context,
                                         num_steps=k, embedding_dim=dim, prediction_type=pred,
                                         spacing=spacing, remat=config.compute.rollout_remat,
                                         added_cond_kwargs=added, prepare_params=prepare)

        def decode(z: jax.Array) -> jax.Array:
            return models.vae.apply(inputs["vae"], z / inputs["latent_scale"], method="decode")

        target_pixels, mask = None, None
        if cfg.pixel_weight > 0 or cfg.shape_weight > 0:
            target_pixels = decode(batch["latents"])
        if cfg.shape_weight > 0:  # the target's shape: pixels off its background colour
            background = losses.border_background(target_pixels, palette)
            mask = losses.foreground_mask(target_pixels, background, cfg.mask_dilation,
                                          threshold=SHAPE_THRESHOLD)
        loss, metrics = losses.rollout_loss(sample_fn, batch["latents"], step_index, cfg.step_counts,
                                            decode, target_pixels, cfg.pixel_weight, mask, cfg.shape_weight)
        k = jnp.asarray(cfg.step_counts, jnp.int32)[step_index]
        return loss, {**metrics, "num_steps": k.astype(jnp.float32)}

    return loss_fn


def zero_step_conditioning(unet_params: Any) -> Any:
    """Zeroes the ``cond_proj`` kernel(s), so the student starts equal to the teacher."""

    def zero(path: tuple, leaf: jax.Array) -> jax.Array:
        names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
        return jnp.zeros_like(leaf) if "cond_proj" in names else leaf

    return jax.tree_util.tree_map_with_path(zero, unet_params)
