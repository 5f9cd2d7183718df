"""Loading a diffusers pipeline folder (``model_index.json`` and its component folders) into a
``meg_jax.backbone.sd_pipeline.StableDiffusionPipeline``; re-exported from ``sd_pipeline``."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax import config as config_lib
from meg_jax.backbone import weights as weights_lib
from meg_jax.backbone.config import UNetConfig, VAEConfig
from meg_jax.backbone.diffusers_io import params_from_torch_state_dict, read_config
from meg_jax.backbone.sd_pipeline import _COMPONENT_CLASSES, PIPELINE_CLASSES, StableDiffusionPipeline
from meg_jax.backbone.unet import UNet
from meg_jax.backbone.vae import AutoencoderKL

_REQUIRED = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
# Components diffusers may list that do not change the image of a plain text-to-image call
# (the safety checker only blacks out flagged images; it is not run here).
_IGNORED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
_OPTIONS = ("requires_safety_checker", "force_zeros_for_empty_prompt", "requires_aesthetics_score")


def _load_text_encoder(folder: str, variant: str | None, dtype: Any) -> tuple[Any, Any, Any]:
    """A CLIP text-encoder folder through ``weights`` (sharded/variant/fp16 files) and ``clip``."""
    from meg_jax.backbone import clip

    cfg_path = os.path.join(folder, "config.json")
    data = config_lib.read_json_object(cfg_path)
    state = weights_lib.load_state_dict(folder, variant, np.float32, names=(weights_lib.TRANSFORMERS_WEIGHTS_NAME,))
    has_projection = "text_projection.weight" in state
    try:
        config = clip.CLIPTextConfig.from_transformers(
            data, with_projection=None if "architectures" in data else has_projection
        )
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    params = clip.params_from_state_dict(config, state, dtype=dtype, source=folder)
    return clip.CLIPTextTransformer(config, dtype=dtype), params, config


def _check_model_index(path: str, index: dict[str, Any]) -> tuple[str, bool]:
    name = index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise ValueError(
            f"{os.path.join(path, 'model_index.json')}: _class_name={name!r} is not supported; meg-jax loads "
            f"{sorted(PIPELINE_CLASSES)} (text-to-image SD 1.x/2.x, SDXL, LCM)"
        )
    kind, cfg_allowed = PIPELINE_CLASSES[name]
    for comp, value in index.items():
        if comp.startswith("_") or comp in _OPTIONS or comp in _IGNORED_COMPONENTS:
            continue
        if comp not in _COMPONENT_CLASSES:
            raise ValueError(f"{path}/model_index.json: component {comp!r} ({value!r}) is not supported")
        if value is None or (isinstance(value, list) and value[1] is None):
            if comp in _REQUIRED[kind]:
                raise ValueError(f"{path}/model_index.json: {name} needs component {comp!r}, which is empty")
            continue
        allowed = _COMPONENT_CLASSES[comp]
        if allowed and value[1] not in allowed:
            raise ValueError(
                f"{path}/model_index.json: {comp} is a {value[1]!r}; meg-jax reads {list(allowed)} there"
            )
    missing = [c for c in _REQUIRED[kind] if c not in index]
    if missing:
        raise ValueError(f"{path}/model_index.json: {name} needs components {missing}")
    return kind, cfg_allowed


def load_pipeline(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    variant: str | None = None,
    scheduler: Any = None,
) -> StableDiffusionPipeline:
    """Loads a diffusers text-to-image pipeline folder (SD 1.x/2.x, SDXL, LCM).

    Args:
      path: the folder ``DiffusionPipeline.save_pretrained`` writes (``model_index.json``
        and one sub-folder per component).
      dtype: ``jnp.float32`` or ``jnp.bfloat16``: params and compute of the UNet and text
        encoders (the VAE stays float32 when its config says ``force_upcast``, as diffusers).
      variant: weight variant (``"fp16"``) for every component; None: the plain files, or
        each folder's single variant.
      scheduler: optional scheduler (a ``schedulers.Scheduler``, config dict or folder)
        instead of the folder's ``scheduler/``.

    Returns:
      A :class:`StableDiffusionPipeline`.

    Raises:
      ValueError / FileNotFoundError / weights.WeightsError: naming the file or key for
        unsupported pipeline classes, components, configs, and missing or unreadable weights.
    """
    from meg_jax.backbone import clip, schedulers

    path = os.fspath(path)
    if os.path.isfile(path):
        raise weights_lib.WeightsError(weights_lib._single_file_message(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such pipeline folder")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    index = config_lib.read_json_object(os.path.join(path, "model_index.json"))
    kind, cfg_allowed = _check_model_index(path, index)

    def sub(name: str) -> str:
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: model_index.json lists {name} but the folder is missing")
        return folder

    unet_cfg = read_config(sub("unet"))
    vae_cfg = read_config(sub("vae"))
    if not isinstance(unet_cfg, UNetConfig) or not isinstance(vae_cfg, VAEConfig):
        raise ValueError(f"{path}: unet/ must hold a UNet2DConditionModel and vae/ an AutoencoderKL")
    vae_dtype = jnp.float32 if vae_cfg.force_upcast else dtype
    params: dict[str, Any] = {}
    for name, cfg, dt in (("unet", unet_cfg, dtype), ("vae", vae_cfg, vae_dtype)):
        state = weights_lib.load_state_dict(sub(name), variant, np.float32, names=(weights_lib.DIFFUSERS_WEIGHTS_NAME,))
        try:
            p = params_from_torch_state_dict(cfg, state, dtype=np.dtype(dt))
        except ValueError as e:
            raise ValueError(f"{sub(name)}: {e}") from e
        params[name] = jax.tree_util.tree_map(jnp.asarray, p)
    te_names = ("text_encoder",) if kind == "sd" else ("text_encoder", "text_encoder_2")
    tok_names = ("tokenizer",) if kind == "sd" else ("tokenizer", "tokenizer_2")
    encoders = [_load_text_encoder(sub(n), variant, dtype) for n in te_names]
    tokenizers = tuple(clip.load_tokenizer(sub(n)) for n in tok_names)
    params["text_encoders"] = tuple(p for _, p, _ in encoders)
    cross = unet_cfg.cross_attention_dim_tuple[0]
    width = sum(c.hidden_size for _, _, c in encoders)
    if width != cross:
        raise ValueError(
            f"{path}: the text encoders give {width} features but unet cross_attention_dim is {cross}"
        )
    if kind == "sdxl":
        if unet_cfg.addition_embed_type != "text_time":
            raise ValueError(f"{path}: StableDiffusionXLPipeline needs a unet with addition_embed_type='text_time'")
        proj = encoders[1][2].projection_dim
        if proj != unet_cfg.text_embeds_dim:
            raise ValueError(
                f"{path}: text_encoder_2 projection_dim={proj} but the unet expects text_embeds of width "
                f"{unet_cfg.text_embeds_dim} (projection_class_embeddings_input_dim - 6 x addition_time_embed_dim)"
            )
    elif not cfg_allowed and unet_cfg.time_cond_proj_dim is None:
        raise ValueError(f"{path}: LatentConsistencyModelPipeline needs a unet with time_cond_proj_dim "
                         "(it feeds the guidance embedding to timestep_cond)")
    elif unet_cfg.addition_embed_type is not None:
        raise ValueError(f"{path}: {index['_class_name']} cannot feed a unet with addition_embed_type="
                         f"{unet_cfg.addition_embed_type!r}")
    sched = schedulers.load_scheduler(sub("scheduler") if scheduler is None else scheduler) \
        if not isinstance(scheduler, schedulers.Scheduler) else scheduler
    return StableDiffusionPipeline(
        path=path,
        class_name=index["_class_name"],
        kind=kind,
        cfg_allowed=cfg_allowed,
        unet=UNet(unet_cfg, dtype=dtype),
        vae=AutoencoderKL(vae_cfg, dtype=vae_dtype),
        text_encoders=tuple(m for m, _, _ in encoders),
        text_configs=tuple(c for _, _, c in encoders),
        tokenizers=tokenizers,
        scheduler=sched,
        params=params,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", kind == "sdxl")),
        dtype=dtype,
    )

