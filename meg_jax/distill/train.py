"""Train states, jitted train steps and the host loop of the distillation stages.

Each stage (classifier, VAE, decoder, teacher, teacher_ft, student) is one pure function
``train_step(state, inputs, key) -> (state, metrics)`` over a ``TrainState`` pytree (params,
EMA params, optimizer state, step), jitted once with the state donated. Batches are
generated on device from ``key`` (``meg_jax.data.sample_batch``) and sharded over the
``"data"`` mesh axis (``meg_jax.parallel``); ``inputs`` holds the frozen arrays a stage reads
(the VAE for the teacher; the text encoder and the precomputed teacher samples for the
student). The key of step ``s`` is ``fold_in(PRNGKey(seed), s)``, so a resumed run draws the
same batches as an uninterrupted one and ends with identical parameters.

``train_stage`` is the host loop: progress bar, metrics (JSONL + TensorBoard), NaN guard,
orbax checkpoints (keep N, async), resume, config check. ``run`` chains the stages of a
``DistillConfig`` in a work directory (the optional ``decoder`` and ``teacher_ft`` stages run
when their config is set); ``export`` writes the compact shipped form
(``meg_jax.checkpoint.load_backbone`` reads it).

Work directory layout::

    WORKDIR/config.json                      resolved DistillConfig of the last run
    WORKDIR/<stage>/config.json              settings the stage's checkpoints depend on
    WORKDIR/<stage>/checkpoints/<step>/      orbax steps (latest N)
    WORKDIR/<stage>/metrics.jsonl, events.*  metrics
    WORKDIR/<stage>/final/                   EMA params of the finished stage (safetensors)
    WORKDIR/teacher/latents/chunk_*.npz      cached VAE latents of the teacher (resumable)
    WORKDIR/teacher_ft/latents/chunk_*.npz   the continuation's own latents
    WORKDIR/student/targets/chunk_*.npz      cached teacher samples (resumable)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from meg_jax import checkpoint as ckpt
from meg_jax import config as config_lib
from meg_jax import parallel
from meg_jax import run_log
from meg_jax.backbone import schedules
from meg_jax.data.shapes import sample_batch
from meg_jax.distill import losses
from meg_jax.distill.config import OPTIONAL_STAGES, STAGES, DistillConfig, StageConfig

__all__ = [
    "TrainState",
    "Models",
    "build_models",
    "make_optimizer",
    "create_state",
    "make_train_step",
    "vae_loss_fn",
    "decoder_loss_fn",
    "teacher_loss_fn",
    "student_loss_fn",
    "classifier_loss_fn",
    "init_stage_state",
    "stage_record",
    "stage_inputs",
    "measure_latent_scale",
    "make_latent_cache",
    "make_targets",
    "train_stage",
    "compiled_train_step",
    "run",
    "export",
    "load_final",
]

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@struct.dataclass
class TrainState:
    """Everything a stage's train step changes; a pytree (orbax saves it whole).

    Attributes:
      step: scalar int32, optimizer steps done.
      params: the trained parameters.
      ema_params: exponential moving average of ``params`` (what is exported).
      opt_state: optax state.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Models:
    """The Flax modules of a backbone (stateless; params live in the states)."""

    unet: Any
    vae: Any
    text_encoder: Any
    classifier: Any
    schedule: schedules.NoiseSchedule


def build_models(config: DistillConfig) -> Models:
    """Instantiates the UNet, VAE, text encoder and classifier modules and the schedule."""
    from meg_jax.backbone.text_encoder import TextEncoder
    from meg_jax.backbone.unet import UNet
    from meg_jax.backbone.vae import AutoencoderKL

    b = config.backbone
    return Models(
        unet=UNet(b.unet),
        vae=AutoencoderKL(b.vae),
        text_encoder=TextEncoder(b.text_encoder),
        classifier=_classifier_module(config),
        schedule=schedules.make_schedule(),
    )


def _classifier_module(config: DistillConfig) -> Any:
    try:
        from meg_jax.data.classifier import AttributeClassifier
    except ImportError:  # the classifier stage is then unavailable; the others still run
        return None
    return AttributeClassifier(config.classifier_model)


# --------------------------------------------------------------------------- optimisation


def make_optimizer(cfg: StageConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay to ``final_lr_fraction``, global-norm clipping."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.final_lr_fraction,
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(lr, weight_decay=cfg.weight_decay),
    )


def create_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0 (EMA starts at the initial params)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
    )


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float,
                    mesh: jax.sharding.Mesh) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]]:
    """Builds the jitted ``train_step(state, inputs, key) -> (state, metrics)``.

    Args:
      loss_fn: ``loss_fn(params, inputs, key) -> (loss, metrics)``; it generates (and
        shards) its batch from ``key``.
      tx: the optimizer.
      ema_decay: EMA decay d; the effective decay is ``min(d, (1 + s) / (10 + s))`` so the
        average forgets the random initialisation early in short runs.
      mesh: device mesh; state, inputs and key are replicated, batches sharded inside.

    Returns:
      The jitted step (state donated).
    """

    def step(state: TrainState, inputs: Any, key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, inputs, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        s = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + s) / (10.0 + s))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        new = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new, metrics

    repl = parallel.replicated_sharding(mesh)
    return jax.jit(step, in_shardings=(repl, repl, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))


# --------------------------------------------------------------------------- losses per stage


def classifier_loss_fn(models: Models, config: DistillConfig, mesh: jax.sharding.Mesh) -> LossFn:
    """Cross-entropy of the attribute classifier on a fresh batch (``inputs`` unused)."""
    from meg_jax.data.classifier import classifier_loss, training_batch

    batch_size = config.classifier.batch_size
    parallel.check_batch_size(batch_size, mesh)
    model_cfg = dataclasses.replace(config.classifier_model, batch_size=batch_size)

    def loss_fn(params: Any, inputs: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        images, attrs = training_batch(key, model_cfg)  # augmented like generated images
        images, attrs = parallel.constrain_batch((images, attrs), mesh)
        return classifier_loss(models.classifier, params, images, attrs)

    return loss_fn


def vae_loss_fn(models: Models, config: DistillConfig, mesh: jax.sharding.Mesh) -> LossFn:
    """VAE loss on a fresh batch: MSE + edge MSE + small KL (``inputs`` unused)."""
    cfg = config.vae
    parallel.check_batch_size(cfg.batch_size, mesh)

    def loss_fn(params: Any, inputs: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        k_data, k_z = jax.random.split(key)
        images, _, _ = sample_batch(k_data, cfg.batch_size, config.data)
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
    parallel.check_batch_size(cfg.batch_size, mesh)
    palette = jnp.asarray(COLOR_RGB, jnp.float32)

    def loss_fn(params: Any, inputs: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        images, _, attrs = sample_batch(key, cfg.batch_size, config.data)
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
    parallel.check_batch_size(cfg.batch_size, mesh)

    def loss_fn(params: Any, inputs: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        k_idx, k_noise, k_t, k_drop = jax.random.split(key, 4)
        n = inputs["latents"].shape[0]
        idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, n)
        x0, tokens = parallel.constrain_batch((inputs["latents"][idx], inputs["tokens"][idx]), mesh)
        noise = jax.random.normal(k_noise, x0.shape)
        t = jax.random.randint(k_t, (cfg.batch_size,), 0, schedule.num_train_timesteps)
        x_t = schedules.add_noise(schedule, x0, noise, t)
        context = models.text_encoder.apply(params["text_encoder"], tokens)
        context = losses.drop_context(k_drop, context, cfg.cond_dropout)
        out = models.unet.apply(params["unet"], x_t, t, context)
        target = losses.diffusion_target(schedule, x0, noise, t, pred)
        loss = jnp.mean(jnp.square(out - target))
        return loss, {}

    return loss_fn


def student_loss_fn(models: Models, config: DistillConfig, mesh: jax.sharding.Mesh) -> LossFn:
    """Rollout distillation loss; ``inputs`` holds the frozen text encoder, VAE, latent scale
    and the teacher targets ``{"noise", "tokens", "latents"}`` (``[N, ...]`` each)."""
    cfg = config.student
    pred = config.backbone.prediction_type
    schedule = models.schedule
    dim = config.sampling.step_embedding_dim
    spacing = config.sampling.spacing
    probs = jnp.asarray(cfg.step_probs, jnp.float32)
    probs = probs / jnp.sum(probs)
    parallel.check_batch_size(cfg.batch_size, mesh)

    def loss_fn(params: Any, inputs: Any, key: jax.Array) -> tuple[jax.Array, dict]:
        k_idx, k_steps = jax.random.split(key)
        targets = inputs["targets"]
        n = targets["noise"].shape[0]
        idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, n)
        batch = jax.tree.map(lambda a: a[idx], targets)
        batch = parallel.constrain_batch(batch, mesh)
        context = models.text_encoder.apply(inputs["text_encoder"], batch["tokens"])
        step_index = jax.random.choice(k_steps, len(cfg.step_counts), p=probs)

        def sample_fn(k: int) -> jax.Array:
            return losses.student_sample(models.unet, params, schedule, batch["noise"], context,
                                         num_steps=k, embedding_dim=dim, prediction_type=pred,
                                         spacing=spacing)

        def decode(z: jax.Array) -> jax.Array:
            return models.vae.apply(inputs["vae"], z / inputs["latent_scale"], method="decode")

        target_pixels = decode(batch["latents"]) if cfg.pixel_weight > 0 else None
        loss, metrics = losses.rollout_loss(sample_fn, batch["latents"], step_index, cfg.step_counts,
                                            decode, target_pixels, cfg.pixel_weight)
        k = jnp.asarray(cfg.step_counts, jnp.int32)[step_index]
        return loss, {**metrics, "num_steps": k.astype(jnp.float32)}

    return loss_fn


# --------------------------------------------------------------------------- init


def zero_step_conditioning(unet_params: Any) -> Any:
    """Zeroes the ``cond_proj`` kernel(s), so the student starts equal to the teacher."""

    def zero(path: tuple, leaf: jax.Array) -> jax.Array:
        names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
        return jnp.zeros_like(leaf) if "cond_proj" in names else leaf

    return jax.tree_util.tree_map_with_path(zero, unet_params)


def init_stage_state(stage: str, models: Models, config: DistillConfig,
                     teacher_params: Any | None = None, vae_params: Any | None = None) -> TrainState:
    """A fresh ``TrainState`` for ``stage`` (seeded by the stage's ``seed``).

    Args:
      stage: one of ``STAGES``.
      models: from ``build_models``.
      config: the job config.
      teacher_params: for "student" and "teacher_ft": the teacher's ``{"unet",
        "text_encoder"}`` EMA params (the continuation starts from them; the student's UNet
        starts as a copy with the step projection zeroed).
      vae_params: for "decoder": the VAE stage's params (its decoder groups are trained on).
    """
    cfg = getattr(config, stage)
    key = jax.random.PRNGKey(cfg.seed)
    b = config.backbone
    if stage == "classifier":
        from meg_jax.data.classifier import init_classifier

        params = init_classifier(config.classifier_model, key)
    elif stage == "vae":
        from meg_jax.backbone.vae import init_vae

        params = init_vae(b.vae, key)
    elif stage == "teacher":
        from meg_jax.backbone.text_encoder import init_text_encoder
        from meg_jax.backbone.unet import init_unet

        k_unet, k_text = jax.random.split(key)
        params = {"unet": init_unet(b.unet, k_unet), "text_encoder": init_text_encoder(b.text_encoder, k_text)}
    elif stage == "decoder":
        if vae_params is None:
            raise ValueError("the decoder stage needs the trained VAE's params")
        params = jax.tree.map(jnp.copy, split_vae(vae_params)[1])
    elif stage == "teacher_ft":
        if teacher_params is None:
            raise ValueError("the teacher_ft stage needs the trained teacher's params")
        params = jax.tree.map(jnp.copy, dict(teacher_params))
    elif stage == "student":
        if teacher_params is None:
            raise ValueError("the student stage needs the trained teacher's params")
        params = zero_step_conditioning(jax.tree.map(jnp.copy, teacher_params["unet"]))
    else:
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
    return create_state(params, make_optimizer(cfg))


def stage_record(stage: str, config: DistillConfig) -> dict[str, Any]:
    """The settings a stage's checkpoints depend on (compared on resume)."""
    d = config_lib.to_dict(config)
    record: dict[str, Any] = {stage: d[stage], "data": d["data"]}
    if stage == "classifier":
        record["classifier_model"] = d["classifier_model"]
    if stage in ("vae", "decoder", "teacher", "teacher_ft", "student"):
        record["backbone.vae"] = d["backbone"]["vae"]
    if stage == "decoder":
        record["vae"] = d["vae"]
    if stage in ("teacher", "teacher_ft", "student"):
        record["backbone"] = {k: v for k, v in d["backbone"].items() if k != "vae"}
        record["vae"] = d["vae"]
    if stage in ("teacher_ft", "student"):
        record["teacher"] = d["teacher"]
    if stage == "student":
        record["sampling"] = d["sampling"]
        if d["teacher_ft"] is not None:  # absent when off, so records made before it stay valid
            record["teacher_ft"] = d["teacher_ft"]
        if d["decoder"] is not None and d["student"]["pixel_weight"] > 0:
            record["decoder"] = d["decoder"]
    return record


def enabled_stages(config: DistillConfig, stages: tuple[str, ...] = STAGES) -> tuple[str, ...]:
    """``stages`` without the optional ones whose config is ``None``."""
    return tuple(s for s in stages if s not in OPTIONAL_STAGES or getattr(config, s) is not None)


def teacher_stage(config: DistillConfig) -> str:
    """The stage whose final weights are the teacher: "teacher_ft" when enabled."""
    return "teacher_ft" if config.teacher_ft is not None else "teacher"


def vae_stage(config: DistillConfig) -> str:
    """The stage whose final weights are the shipped VAE: "decoder" when enabled."""
    return "decoder" if config.decoder is not None else "vae"


# --------------------------------------------------------------------------- host side


def _final_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage, "final")


def save_final(workdir: str, stage: str, params: Mapping[str, Any]) -> None:
    """Writes a finished stage's EMA params as safetensors (read by later stages and export)."""
    folder = _final_dir(workdir, stage)
    os.makedirs(folder, exist_ok=True)
    for part, p in params.items():
        ckpt.save_params(p, os.path.join(folder, f"{part}.safetensors"))


def load_final(workdir: str, stage: str, parts: tuple[str, ...]) -> dict[str, Any]:
    """Reads the finished stage's params written by ``save_final``."""
    folder = _final_dir(workdir, stage)
    missing = [p for p in parts if not os.path.exists(os.path.join(folder, f"{p}.safetensors"))]
    if missing:
        raise FileNotFoundError(
            f"stage {stage!r} has not finished in {workdir} (missing {missing} in {folder}); "
            f"run `--stage {stage}` first"
        )
    return {p: ckpt.load_params(os.path.join(folder, f"{p}.safetensors")) for p in parts}


def measure_latent_scale(models: Models, vae_params: Any, config: DistillConfig) -> float:
    """1 / std of the VAE's latent means over fresh images (so teacher latents have unit std)."""
    n = config.teacher.latent_scale_samples
    key = jax.random.fold_in(jax.random.PRNGKey(config.teacher.seed), 0x5CA1E)
    images, _, _ = sample_batch(key, n, config.data)
    mean, _ = jax.jit(lambda p, x: models.vae.apply(p, x, method="encode"))(vae_params, images)
    return float(1.0 / jnp.std(mean))


def latent_scale(workdir: str, models: Models, vae_params: Any, config: DistillConfig) -> float:
    """The latent scale of this work directory (measured once, cached as JSON)."""
    path = os.path.join(workdir, "vae", "latent_scale.json")
    if os.path.exists(path):
        with open(path) as f:
            return float(json.load(f)["latent_scale"])
    scale = measure_latent_scale(models, vae_params, config)
    tmp = f"{path}.{os.getpid()}.tmp"  # stages may run side by side in one work directory
    with open(tmp, "w") as f:
        json.dump({"latent_scale": scale}, f)
    os.replace(tmp, path)
    return scale


def make_latent_cache(workdir: str, models: Models, config: DistillConfig, vae: Any, scale: float,
                      progress: bool = True, stage: str = "teacher") -> dict[str, np.ndarray]:
    """Scaled VAE latents and tokens of ``<stage>.num_latents`` generated images (cached, resumable).

    Chunk ``i`` draws its images from ``fold_in(PRNGKey(<stage>.seed + 2), i)``; ``stage``
    is "teacher" or "teacher_ft" (each has its own seed and cache folder).

    Returns:
      ``{"latents": [N, h, w, c] float32, "tokens": [N, L] int32}``.
    """
    cfg = getattr(config, stage)
    folder = os.path.join(workdir, stage, "latents")
    os.makedirs(folder, exist_ok=True)

    @jax.jit
    def chunk_fn(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        images, tokens, _ = sample_batch(key, cfg.latent_chunk, config.data)
        mean, _ = models.vae.apply(vae, images, method="encode")
        return mean * scale, tokens

    return _cached_chunks(folder, cfg.num_latents // cfg.latent_chunk, chunk_fn,
                          jax.random.PRNGKey(cfg.seed + 2), ("latents", "tokens"), f"{stage} latents", progress)


def _cached_chunks(folder: str, num_chunks: int, chunk_fn: Callable, base: jax.Array,
                   names: tuple[str, ...], desc: str, progress: bool) -> dict[str, np.ndarray]:
    """Runs ``chunk_fn(fold_in(base, i))`` for each chunk not yet on disk; returns all, concatenated."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    bar = run_log.progress(num_chunks, desc=desc, disable=not progress)
    for i in range(num_chunks):
        path = os.path.join(folder, f"chunk_{i:05d}.npz")
        if not os.path.exists(path):
            arrays = jax.device_get(chunk_fn(jax.random.fold_in(base, i)))
            with open(path + ".tmp", "wb") as f:
                np.savez(f, **dict(zip(names, arrays)))
            os.replace(path + ".tmp", path)
        with np.load(path) as data:
            for k in names:
                parts[k].append(data[k])
        bar.update(1)
    bar.close()
    return {k: np.concatenate(v) for k, v in parts.items()}


def make_targets(workdir: str, models: Models, config: DistillConfig, teacher: Mapping[str, Any],
                 progress: bool = True) -> dict[str, np.ndarray]:
    """Teacher DDIM samples (with CFG) from (noise, prompt) pairs, cached in resumable chunks.

    Chunk ``i`` uses key ``fold_in(PRNGKey(student.seed + 1), i)``: noise ``[C, h, w, c]``
    and prompts of a fresh batch; the teacher's EMA params sample ``target_steps`` trailing
    DDIM steps with ``sampling.guidance_scale``.

    Returns:
      ``{"noise": [N, h, w, c], "tokens": [N, L] int32, "latents": [N, h, w, c]}``.
    """
    cfg = config.student
    folder = os.path.join(workdir, "student", "targets")
    os.makedirs(folder, exist_ok=True)
    b = config.backbone
    h = b.latent_size
    c = b.vae.latent_channels
    pred = b.prediction_type

    @jax.jit
    def chunk_fn(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        k_data, k_noise = jax.random.split(key)
        _, tokens, _ = sample_batch(k_data, cfg.target_chunk, config.data)
        noise = jax.random.normal(k_noise, (cfg.target_chunk, h, h, c))
        context = models.text_encoder.apply(teacher["text_encoder"], tokens)
        latents = losses.teacher_sample(models.unet, teacher["unet"], models.schedule, noise, context,
                                        num_steps=cfg.target_steps,
                                        guidance_scale=config.sampling.guidance_scale,
                                        prediction_type=pred, spacing=config.sampling.spacing)
        return noise, tokens, latents

    return _cached_chunks(folder, cfg.num_targets // cfg.target_chunk, chunk_fn,
                          jax.random.PRNGKey(cfg.seed + 1), ("noise", "tokens", "latents"),
                          "teacher targets", progress)


def train_stage(
    name: str,
    workdir: str,
    record: Mapping[str, Any],
    init_state: TrainState,
    train_step: Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]],
    inputs: Any,
    cfg: StageConfig,
    mesh: jax.sharding.Mesh,
    *,
    keep: int = 2,
    async_save: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
) -> tuple[TrainState, bool]:
    """Runs (or resumes) one stage to ``cfg.steps`` with checkpoints and logging.

    Args:
      name: stage name (sub-directory of ``workdir``).
      workdir: the job's work directory.
      record: the settings the checkpoints depend on; a stored different one is refused
        (``ConfigMismatchError`` naming the fields).
      init_state: fresh state (also the restore template).
      train_step: from ``make_train_step``.
      inputs: frozen arrays for the step (replicated on the mesh here).
      cfg: the stage config (steps, intervals, seed).
      mesh: the device mesh.
      keep: checkpoints kept.
      async_save: orbax async saving.
      progress: show a tqdm bar.
      stop_after: stop after this many steps of this call (as if killed right after the
        last checkpoint); for tests of resumption.

    Returns:
      ``(state, finished)``.

    Raises:
      run_log.NonFiniteError: a metric became NaN/inf; checkpoints up to the last good step
        are kept and nothing later is saved.
    """
    directory = os.path.join(workdir, name)
    ckpt.check_config(directory, dict(record))
    manager = ckpt.make_manager(os.path.join(directory, "checkpoints"), max_to_keep=keep,
                                async_save=async_save)
    try:
        state = parallel.replicate(init_state, mesh)
        state, start = ckpt.restore_or_init(manager, state)
        state = parallel.replicate(state, mesh)
        if start >= cfg.steps:
            return state, True
        inputs = parallel.replicate(inputs, mesh)
        base = jax.random.PRNGKey(cfg.seed)
        bar = run_log.progress(cfg.steps, initial=start, desc=name, disable=not progress)
        last = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
        with run_log.MetricsWriter(directory) as writer:
            t0, s0 = time.time(), start
            for s in range(start, last):
                state, metrics = train_step(state, inputs, jax.random.fold_in(base, s))
                done = s + 1
                is_ckpt = done % cfg.checkpoint_every == 0 or done == cfg.steps
                if done % cfg.log_every == 0 or is_ckpt:
                    values = run_log.check_finite(metrics, done)
                    values["steps_per_s"] = (done - s0) / max(time.time() - t0, 1e-9)
                    t0, s0 = time.time(), done
                    writer.write(done, values)
                    run_log.set_metrics(bar, values)
                if is_ckpt:
                    if not ckpt.all_finite(state.params):
                        raise run_log.NonFiniteError(f"non-finite parameters at step {done} of {name}")
                    ckpt.save(manager, done, state)
                bar.update(1)
        bar.close()
        manager.wait_until_finished()
        return state, last >= cfg.steps
    finally:
        manager.close()


def stage_inputs(stage: str, workdir: str, models: Models, config: DistillConfig,
                 progress: bool = True) -> tuple[Any, TrainState]:
    """The frozen inputs and the fresh state of ``stage`` (reads earlier stages' outputs)."""
    if stage in ("classifier", "vae"):
        return {}, init_stage_state(stage, models, config)
    vae = load_final(workdir, "vae", ("vae",))["vae"]
    if stage == "decoder":
        return {"encoder": split_vae(vae)[0]}, init_stage_state(stage, models, config, vae_params=vae)
    scale = latent_scale(workdir, models, vae, config)
    if stage in ("teacher", "teacher_ft"):
        # The decoder stage leaves the encoder as it was: both caches read the VAE stage's.
        cache = make_latent_cache(workdir, models, config, vae, scale, progress=progress, stage=stage)
        inputs = {k: jnp.asarray(v) for k, v in cache.items()}
        teacher = load_final(workdir, "teacher", ("unet", "text_encoder")) if stage == "teacher_ft" else None
        return inputs, init_stage_state(stage, models, config, teacher_params=teacher)
    teacher = load_final(workdir, teacher_stage(config), ("unet", "text_encoder"))
    if vae_stage(config) != "vae":  # the refined decoder decodes for the pixel loss
        vae = load_final(workdir, vae_stage(config), ("vae",))["vae"]
    targets = make_targets(workdir, models, config, teacher, progress=progress)
    inputs = {"vae": vae, "latent_scale": jnp.float32(scale), "text_encoder": teacher["text_encoder"],
              "targets": {k: jnp.asarray(v) for k, v in targets.items()}}
    return inputs, init_stage_state(stage, models, config, teacher_params=teacher)


_LOSS_FNS = {
    "classifier": classifier_loss_fn,
    "vae": vae_loss_fn,
    "decoder": decoder_loss_fn,
    "teacher": teacher_loss_fn,
    "teacher_ft": functools.partial(teacher_loss_fn, stage="teacher_ft"),
    "student": student_loss_fn,
}


def _final_parts(stage: str, state: TrainState, inputs: Any) -> dict[str, Any]:
    ema = jax.device_get(state.ema_params)
    if stage == "classifier":
        return {"classifier": ema}  # ema_decay 0: the EMA equals the params
    if stage == "vae":
        return {"vae": ema}
    if stage == "decoder":  # the whole VAE: frozen encoder + refined decoder
        return {"vae": merge_vae(jax.device_get(inputs["encoder"]), ema)}
    if stage in ("teacher", "teacher_ft"):
        return {"unet": ema["unet"], "text_encoder": ema["text_encoder"]}
    return {"unet": ema}


@functools.lru_cache(maxsize=16)
def compiled_train_step(stage: str, config: DistillConfig, mesh: jax.sharding.Mesh) -> Callable:
    """The jitted train step of ``stage``, built once per (stage, config, mesh) in a process.

    Reruns in the same process (tests, notebooks) reuse the compiled executable.
    """
    cfg: StageConfig = getattr(config, stage)
    models = build_models(config)
    return make_train_step(_LOSS_FNS[stage](models, config, mesh), make_optimizer(cfg), cfg.ema_decay, mesh)


def run(config: DistillConfig, stages: tuple[str, ...], workdir: str, *, mesh: jax.sharding.Mesh | None = None,
        progress: bool = True, stop_after: int | None = None) -> dict[str, bool]:
    """Runs ``stages`` in order in ``workdir`` (each resumes or is skipped when finished).

    Optional stages whose config is ``None`` are left out (``enabled_stages``).

    Returns:
      stage -> finished, for the stages that ran or had finished.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {STAGES}")
    stages = enabled_stages(config, tuple(stages))
    mesh = parallel.make_mesh() if mesh is None else mesh
    os.makedirs(workdir, exist_ok=True)
    config_lib.save_json(config, os.path.join(workdir, "config.json"))
    models = build_models(config)
    finished: dict[str, bool] = {}
    for stage in stages:
        cfg: StageConfig = getattr(config, stage)
        if os.path.exists(os.path.join(_final_dir(workdir, stage), "DONE")):
            ckpt.check_config(os.path.join(workdir, stage), stage_record(stage, config))
            finished[stage] = True
            continue
        inputs, state = stage_inputs(stage, workdir, models, config, progress=progress)
        step = compiled_train_step(stage, config, mesh)
        state, done = train_stage(stage, workdir, stage_record(stage, config), state, step, inputs, cfg, mesh,
                                  keep=config.keep_checkpoints, async_save=config.async_checkpointing,
                                  progress=progress, stop_after=stop_after)
        finished[stage] = done
        if not done:
            break
        save_final(workdir, stage, _final_parts(stage, state, inputs))
        with open(os.path.join(_final_dir(workdir, stage), "DONE"), "w") as f:
            f.write(f"{cfg.steps}\n")
    return finished


def export(workdir: str, out: str, config: DistillConfig) -> None:
    """Writes the shipped compact form of a finished work directory to ``out``.

    ``out/backbone.json`` (backbone config with the measured latent scale, sampling
    settings, data config) and ``out/{classifier,vae,teacher,student}/`` (config.json +
    safetensors). The VAE is the decoder stage's and the teacher the teacher_ft stage's
    when those are enabled; each component's ``stage`` record lists the stages it went
    through. ``meg_jax.checkpoint.load_backbone(out)`` reads it back.
    """
    models = build_models(config)
    classifier = load_final(workdir, "classifier", ("classifier",))
    encoder_vae = load_final(workdir, "vae", ("vae",))["vae"]  # the latent space (and its scale)
    vae = {"vae": encoder_vae} if vae_stage(config) == "vae" else load_final(workdir, "decoder", ("vae",))
    teacher = load_final(workdir, teacher_stage(config), ("unet", "text_encoder"))
    student = load_final(workdir, "student", ("unet",))
    scale = latent_scale(workdir, models, encoder_vae, config)
    backbone = dataclasses.replace(config.backbone, latent_scaling_factor=scale)
    os.makedirs(out, exist_ok=True)
    meta = {s: {"steps": getattr(config, s).steps, "seed": getattr(config, s).seed}
            for s in enabled_stages(config)}

    def stages_of(*names: str) -> dict[str, Any]:
        chain = [n for n in names if n in meta]
        return meta[chain[0]] if len(chain) == 1 else {n: meta[n] for n in chain}

    ckpt.export_component(out, "classifier", config.classifier_model, classifier, stage=meta["classifier"])
    ckpt.export_component(out, "vae", backbone.vae, vae, stage=stages_of("vae", "decoder"), latent_scale=scale)
    ckpt.export_component(out, "teacher", backbone.unet, teacher, stage=stages_of("teacher", "teacher_ft"),
                          text_encoder=config_lib.to_dict(backbone.text_encoder))
    ckpt.export_component(out, "student", backbone.unet, {"unet": student["unet"]}, stage=meta["student"])
    record = {
        "backbone": config_lib.to_dict(backbone),
        "sampling": config_lib.to_dict(config.sampling),
        "data": config_lib.to_dict(config.data),
        "distill_preset": config.preset,
    }
    with open(os.path.join(out, "backbone.json"), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
