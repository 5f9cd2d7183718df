"""The latent diffusion backbone in Flax: UNet, VAE, text encoder, configs, diffusers interop.

``preset(name)`` gives a :class:`BackboneConfig` (``tiny``, ``sd15``, ``sdxl``); ``UNet``,
``AutoencoderKL`` and ``TextEncoder`` are linen modules built from its parts;
``from_diffusers`` / ``to_diffusers`` move weights to and from diffusers model folders;
``load_pipeline`` loads a whole diffusers SD 1.x/2.x, SDXL or LCM pipeline folder;
``load_clip_scorer`` loads a CLIPModel folder that scores images against prompts
(the ``clip_score`` module; its function of the same name is not re-exported here, so
``meg_jax.backbone.clip_score`` stays the module).
Token merging (``tome``), schedules and FLOP counting live in sibling modules and are
imported from there (``meg_jax.backbone.tome`` ...).
"""

from meg_jax.backbone.clip import CLIPTextConfig, load_text_encoder, load_tokenizer
from meg_jax.backbone.clip_score import CLIPScorer, load_clip_scorer
from meg_jax.backbone.clip_vision import CLIPVisionConfig, load_vision_encoder
from meg_jax.backbone.config import BackboneConfig, TextEncoderConfig, UNetConfig, VAEConfig, preset
from meg_jax.backbone.diffusers_io import (
    from_diffusers,
    params_from_torch_state_dict,
    params_to_torch_state_dict,
    to_diffusers,
)
from meg_jax.backbone.sd_pipeline import StableDiffusionPipeline, load_pipeline
from meg_jax.backbone.text_encoder import TextEncoder, init_text_encoder
from meg_jax.backbone.unet import UNet, example_inputs, init_unet
from meg_jax.backbone.vae import AutoencoderKL, example_image, init_vae

__all__ = [
    "load_pipeline",
    "StableDiffusionPipeline",
    "preset",
    "BackboneConfig",
    "UNetConfig",
    "VAEConfig",
    "TextEncoderConfig",
    "UNet",
    "AutoencoderKL",
    "TextEncoder",
    "from_diffusers",
    "to_diffusers",
    "params_from_torch_state_dict",
    "params_to_torch_state_dict",
    "init_unet",
    "init_vae",
    "init_text_encoder",
    "example_inputs",
    "example_image",
    "CLIPTextConfig", "load_text_encoder", "load_tokenizer",
    "CLIPVisionConfig", "load_vision_encoder", "CLIPScorer", "load_clip_scorer",
]
