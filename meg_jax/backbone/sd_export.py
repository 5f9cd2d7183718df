"""Export of the distilled step-conditioned student as a diffusers pipeline folder.

:func:`export_student` writes the folder diffusers' ``StableDiffusionPipeline`` loads (the
tiny backbone's student); :func:`export_pipeline_student` writes a student distilled from a
user's SD pipeline as a complete pipeline beside its teacher's text encoder and VAE;
:func:`fold_step_conditioning` folds the student's fixed step conditioning into its time
embedding so the exported UNet needs no ``timestep_cond``. Both are re-exported by
``meg_jax.backbone.sd_pipeline``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from meg_jax.backbone.config import UNetConfig
from meg_jax.backbone.unet import UNet
from meg_jax.backbone.vae import AutoencoderKL
from meg_jax.config import read_json_object

__all__ = ["fold_step_conditioning", "export_student", "export_pipeline_student"]




def fold_step_conditioning(unet_config: UNetConfig, params: Any, timestep_cond: np.ndarray) -> dict[str, Any]:
    """Student params with a fixed ``timestep_cond`` folded into ``time_embedding.linear_1``.

    The UNet embeds ``linear_1(t_emb + cond_proj(c))``; for a constant ``c`` that is
    ``linear_1(t_emb) + W1 cond_proj(c)``, so ``linear_1``'s bias absorbs
    ``cond_proj(c) @ W1`` and ``cond_proj`` becomes zero: the UNet then ignores whatever
    ``timestep_cond`` a caller passes (diffusers' guidance embedding) and computes exactly
    the student at ``c`` (up to float32 rounding of the folded bias).

    Args:
      unet_config: the student's config (needs ``time_cond_proj_dim``).
      params: ``{"params": ...}`` of the student.
      timestep_cond: ``[time_cond_proj_dim]`` the conditioning to fold.

    Returns:
      New variables (numpy float32 leaves), same tree.
    """
    if unet_config.time_cond_proj_dim is None:
        raise ValueError("the UNet has no time_cond_proj_dim: there is no step conditioning to fold")
    tree = jax.tree_util.tree_map(lambda a: np.array(a, np.float32), jax.device_get(params))
    emb = tree["params"]["time_embedding"]
    c = np.asarray(timestep_cond, np.float64).reshape(-1)
    if c.shape != (unet_config.time_cond_proj_dim,):
        raise ValueError(f"timestep_cond must have {unet_config.time_cond_proj_dim} values, got {c.shape}")
    shift = c @ emb["cond_proj"]["kernel"].astype(np.float64)  # [block_out_channels[0]]
    emb["linear_1"]["bias"] = (emb["linear_1"]["bias"] + shift @ emb["linear_1"]["kernel"].astype(np.float64)
                               ).astype(np.float32)
    emb["cond_proj"]["kernel"] = np.zeros_like(emb["cond_proj"]["kernel"])
    return tree


def export_student(backbone: Any, path: str | os.PathLike, steps: int) -> None:
    """Writes the step-conditioned student at K = ``steps`` as a diffusers pipeline folder.

    What is written (``StableDiffusionPipeline.from_pretrained(path, text_encoder=None,
    tokenizer=None)`` loads it; diffusers wants the two empty components named):

    * ``unet/``: the student with its step conditioning for K folded into the time embedding
      (:func:`fold_step_conditioning`); ``time_cond_proj_dim`` is kept, so diffusers' pipeline
      runs it without CFG, as the student is sampled;
    * ``vae/``: the VAE with ``scaling_factor`` = the backbone's ``latent_scaling_factor``;
    * ``scheduler/``: ``DDIMScheduler`` with the distillation's schedule (scaled-linear
      betas 0.00085-0.012, T = 1000), trailing spacing, ``set_alpha_to_one=False``, the
      backbone's ``prediction_type``; run it with ``num_inference_steps=K``;
    * ``model_index.json`` with ``text_encoder``/``tokenizer`` empty: the tiny backbone's text
      encoder is bidirectional (no causal mask) and its tokenizer a word list, which no
      transformers CLIP class expresses (CLIPTextModel always applies a causal mask). Callers
      pass ``prompt_embeds`` (meg-jax's ``encode_text`` output) instead of prompts;
    * ``meg_jax_student.json``: K, the step-embedding width and the backbone's guidance
      convention (the student: no guidance).

    Args:
      backbone: ``meg_jax.checkpoint.Backbone`` (student, VAE, configs, sampling).
      path: output folder (created).
      steps: K, the student's step count this export is for.
    """
    import dataclasses as dc

    from meg_jax.backbone.diffusers_io import to_diffusers
    from meg_jax.distill.losses import step_embedding

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    cfg = backbone.config
    dim = backbone.sampling.step_embedding_dim
    if cfg.unet.time_cond_proj_dim != dim:
        raise ValueError(f"student time_cond_proj_dim={cfg.unet.time_cond_proj_dim} != step_embedding_dim={dim}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cond = np.asarray(step_embedding(steps, dim, 1000))
    unet_params = fold_step_conditioning(cfg.unet, backbone.student, cond)
    to_diffusers(UNet(cfg.unet), unet_params, os.path.join(path, "unet"))
    vae_cfg = dc.replace(cfg.vae, scaling_factor=float(cfg.latent_scaling_factor))
    to_diffusers(AutoencoderKL(vae_cfg), backbone.vae, os.path.join(path, "vae"))
    scheduler = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 0,
        "prediction_type": cfg.prediction_type,
        "timestep_spacing": backbone.sampling.spacing,
    }
    index = _student_model_index([None, None], [None, None])
    meta = {
        "steps": steps,
        "step_embedding_dim": dim,
        "guidance": "none (the step-conditioned student is sampled without CFG)",
        "text": "pass prompt_embeds from meg_jax.meg.pipeline.encode_text; the tiny text encoder is not a CLIP model",
    }
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    for name, data in ((os.path.join("scheduler", "scheduler_config.json"), scheduler),
                       ("model_index.json", index), ("meg_jax_student.json", meta)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")


def export_pipeline_student(teacher: str | os.PathLike, unet_config: UNetConfig, params: Any,
                            path: str | os.PathLike, *, steps: int, scheduler_config: dict[str, Any],
                            step_embedding_dim: int, guidance_scale: float) -> None:
    """Writes a student distilled from a diffusers SD pipeline as a complete pipeline folder at K = ``steps``.

    ``StableDiffusionPipeline.from_pretrained(path)`` loads it and generates from prompts
    (run it with ``num_inference_steps=K``; CFG is off because the UNet has
    ``time_cond_proj_dim``, as the student is sampled):

    * ``unet/``: the student with its step conditioning for K folded into the time embedding
      (:func:`fold_step_conditioning`; ``time_cond_proj_dim`` kept);
    * ``text_encoder/``, ``tokenizer/``, ``vae/``: copied from the teacher folder (frozen);
    * ``scheduler/``: ``DDIMScheduler`` over the teacher's β table and prediction type with
      the distillation's timestep spacing (``scheduler_config``);
    * ``meg_jax_student.json``: K, the step-embedding width, the guidance scale that was
      distilled in, and the teacher folder.

    Args:
      teacher: the teacher pipeline folder.
      unet_config: the student's config (with ``time_cond_proj_dim``).
      params: ``{"params": ...}`` of the student.
      path: output folder (created; existing files are replaced).
      steps: K.
      scheduler_config: the DDIM config (``meg_jax.distill.pipeline_teacher.scheduler_config``).
      step_embedding_dim: width of the step embedding.
      guidance_scale: the CFG scale of the teacher's targets (recorded).
    """
    import shutil

    from meg_jax.backbone.diffusers_io import to_diffusers
    from meg_jax.distill.losses import step_embedding

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if unet_config.time_cond_proj_dim != step_embedding_dim:
        raise ValueError(f"student time_cond_proj_dim={unet_config.time_cond_proj_dim} != "
                         f"step_embedding_dim={step_embedding_dim}")
    teacher, path = os.fspath(teacher), os.fspath(path)
    os.makedirs(path, exist_ok=True)
    num_train = int(scheduler_config.get("num_train_timesteps", 1000))
    cond = np.asarray(step_embedding(steps, step_embedding_dim, num_train))
    to_diffusers(UNet(unet_config), fold_step_conditioning(unet_config, params, cond), os.path.join(path, "unet"))
    for part in ("text_encoder", "tokenizer", "vae"):
        shutil.copytree(os.path.join(teacher, part), os.path.join(path, part), dirs_exist_ok=True)
    teacher_index = read_json_object(os.path.join(teacher, "model_index.json"), "the teacher pipeline's index")
    index = _student_model_index(
        teacher_index.get("text_encoder", ["transformers", "CLIPTextModel"]),
        teacher_index.get("tokenizer", ["transformers", "CLIPTokenizer"]))
    meta = {
        "steps": steps,
        "step_embedding_dim": step_embedding_dim,
        "guidance": f"distilled at guidance_scale={guidance_scale} (teacher CFG with the empty prompt); "
                    "the student is sampled without CFG",
        "teacher": os.path.abspath(teacher),
    }
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    for name, data in ((os.path.join("scheduler", "scheduler_config.json"), dict(scheduler_config)),
                       ("model_index.json", index), ("meg_jax_student.json", meta)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")


def _student_model_index(text_encoder: list, tokenizer: list) -> dict:
    """``model_index.json`` of an exported student: a DDIM StableDiffusionPipeline (no safety checker)."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
