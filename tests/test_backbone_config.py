"""Backbone configs: diffusers key round trip, errors that name the key, presets, text encoder."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import UNet2DConditionModel

from meg_jax import config as config_lib
from meg_jax.backbone import (
    BackboneConfig,
    TextEncoder,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    init_text_encoder,
    preset,
)
from meg_jax.backbone.diffusers_io import check_state_dict_shapes, param_shapes
from meg_jax.backbone.tome import ToMeConfig

TINY_UNET = UNetConfig(
    sample_size=8,
    block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=8,
    attention_head_dim=2,
)


def n_params(config) -> int:
    return sum(int(np.prod(s)) for s in param_shapes(config).values())


# ---------------------------------------------------------------- diffusers round trip


def test_diffusers_written_config_round_trips():
    """The config.json diffusers writes (all keys, bookkeeping included) maps onto UNetConfig and back."""
    model = UNet2DConditionModel(**TINY_UNET.to_diffusers())
    data = json.loads(model.to_json_string())  # what save_pretrained writes to config.json
    assert data["_class_name"] == "UNet2DConditionModel" and "_diffusers_version" in data
    cfg = UNetConfig.from_diffusers(data)
    assert cfg == TINY_UNET
    # every init argument of diffusers is written back, with the same value
    out = cfg.to_diffusers()
    for key, value in data.items():
        if key.startswith("_"):
            continue
        assert key in out, key
        assert json.loads(json.dumps(out[key])) == value, key
    assert sum(p.numel() for p in model.parameters()) == n_params(cfg)


def test_in_memory_diffusers_config_is_accepted():
    """``model.config`` of a model built in memory carries ``_use_default_values``; it is bookkeeping."""
    import inspect

    defaults = inspect.signature(UNet2DConditionModel.__init__).parameters
    given = {k: v for k, v in TINY_UNET.to_diffusers().items() if k not in defaults or defaults[k].default != v}
    model = UNet2DConditionModel(**given)  # the rest left to diffusers' defaults
    data = dict(model.config)
    assert data.get("_use_default_values")
    assert UNetConfig.from_diffusers(data) == TINY_UNET


def test_vae_diffusers_config_round_trips():
    vae = preset("tiny").vae
    model = TorchAutoencoderKL(**vae.to_diffusers())
    assert VAEConfig.from_diffusers(json.loads(model.to_json_string())) == vae
    assert sum(p.numel() for p in model.parameters()) == n_params(vae)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_presets_match_diffusers_architecture_key_by_key(name):
    """sd15/sdxl built by diffusers on the meta device (no memory): every tensor name and shape fits."""
    b = preset(name)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**b.unet.to_diffusers())
        vae = TorchAutoencoderKL(**b.vae.to_diffusers())
    check_state_dict_shapes(b.unet, {k: tuple(v.shape) for k, v in unet.state_dict().items()})
    check_state_dict_shapes(b.vae, {k: tuple(v.shape) for k, v in vae.state_dict().items()})
    # published sizes: SD1.5 UNet 859.52 M, SDXL UNet 2.567 B, SD VAE 83.65 M parameters
    expected_unet = {"sd15": 859_520_964, "sdxl": 2_567_463_684}[name]
    assert sum(p.numel() for p in unet.parameters()) == expected_unet == n_params(b.unet)
    assert n_params(b.vae) == 83_653_863


# ---------------------------------------------------------------- errors name the key


@pytest.mark.parametrize(
    "key, value",
    [
        ("attention_type", "gated"),
        ("class_embed_type", "timestep"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("num_attention_heads", 8),
        ("dropout", 0.1),
        ("only_cross_attention", True),
        ("addition_embed_type", "text"),
        ("encoder_hid_dim", 32),
        ("time_embedding_type", "fourier"),
        ("some_future_key", 1),
    ],
)
def test_unsupported_unet_keys_raise_naming_the_key(key, value):
    data = {"_class_name": "UNet2DConditionModel", **TINY_UNET.to_diffusers(), key: value}
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_diffusers(data)


def test_unsupported_block_type_is_named():
    data = {**TINY_UNET.to_diffusers(), "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]}
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        UNetConfig.from_diffusers(data)


def test_fixed_keys_keep_bools_apart_from_numbers():
    # False == 0.0 in Python; a bool where diffusers expects a float is still an error
    data = {**TINY_UNET.to_diffusers(), "resnet_out_scale_factor": True}
    with pytest.raises(ValueError, match="resnet_out_scale_factor"):
        UNetConfig.from_diffusers(data)


def test_vae_unknown_key_and_activation():
    base = preset("tiny").vae.to_diffusers()
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_diffusers({**base, "act_fn": "relu"})
    with pytest.raises(ValueError, match="norm_type"):
        VAEConfig.from_diffusers({**base, "norm_type": "spatial"})
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        VAEConfig(down_block_types=("AttnDownEncoderBlock2D",))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"up_block_types": ("UpBlock2D",)}, "same length"),
        ({"norm_num_groups": 3}, "norm_num_groups"),
        ({"attention_head_dim": 3}, "number of heads"),
        ({"attention_head_dim": (2, 2, 2)}, "one entry per block"),
        ({"transformer_layers_per_block": (1,)}, "one entry per block"),
        ({"addition_embed_type": "text_time"}, "addition_time_embed_dim"),
        ({"conv_in_kernel": 2}, "odd"),
        ({"time_cond_proj_dim": 0}, "time_cond_proj_dim"),
    ],
)
def test_inconsistent_unet_configs_say_what_to_change(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY_UNET, **changes)


# ---------------------------------------------------------------- presets and bundle


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match=r"\['sd15', 'sdxl', 'tiny'\]"):
        preset("sd21")


def test_tiny_preset_sizes():
    b = preset("tiny")
    assert 300_000 <= n_params(b.unet) <= 600_000
    assert b.unet.time_cond_proj_dim == 32
    assert b.latent_size == 8 and b.vae.downsample_factor == 4
    assert b.unet.in_channels == b.vae.latent_channels == 4
    assert b.text_encoder.width == b.unet.cross_attention_dim


def test_backbone_config_json_round_trip_and_checks():
    b = preset("tiny")
    b = dataclasses.replace(b, unet=dataclasses.replace(b.unet, tome=ToMeConfig(ratio=0.5, use_rand=False)))
    again = config_lib.from_dict(BackboneConfig, config_lib.to_dict(b))
    assert again == b and isinstance(again.unet.tome, ToMeConfig)
    # the pipeline's latent scale defaults to the VAE's and may be overridden
    assert b.latent_scaling_factor == b.vae.scaling_factor
    assert dataclasses.replace(b, latent_scaling_factor=0.5).latent_scaling_factor == 0.5
    with pytest.raises(ValueError, match="latent_channels"):
        dataclasses.replace(b, vae=dataclasses.replace(b.vae, latent_channels=3))
    with pytest.raises(ValueError, match="text_encoder.width"):
        dataclasses.replace(b, text_encoder=dataclasses.replace(b.text_encoder, width=16))
    with pytest.raises(ValueError, match="prediction_type"):
        dataclasses.replace(b, prediction_type="x0")


def test_tome_is_not_a_diffusers_key():
    cfg = dataclasses.replace(TINY_UNET, tome=ToMeConfig(ratio=0.3))
    assert "tome" not in cfg.to_diffusers()
    with pytest.raises(ValueError, match="tome"):
        UNetConfig.from_diffusers({**cfg.to_diffusers(), "tome": {"ratio": 0.3}})
    assert UNetConfig.from_diffusers(cfg.to_diffusers(), tome=cfg.tome) == cfg


# ---------------------------------------------------------------- text encoder


@pytest.fixture(scope="module")
def text_encoder():
    cfg = preset("tiny").text_encoder
    params = init_text_encoder(cfg, jax.random.key(0))
    return cfg, params, jax.jit(TextEncoder(cfg).apply)


def test_text_encoder_shapes_and_mask(text_encoder):
    cfg, params, apply = text_encoder
    tokens = jax.random.randint(jax.random.key(1), (2, cfg.max_length), 0, cfg.vocab_size)
    hidden = apply(params, tokens)
    assert hidden.shape == (2, cfg.max_length, cfg.width) and hidden.dtype == jnp.float32
    # final LayerNorm (scale 1, bias 0 at init): every token vector has mean 0, variance 1
    np.testing.assert_allclose(np.asarray(hidden.mean(-1)), 0.0, atol=1e-5)
    # with a pad mask, changing padded tokens does not change the real tokens' outputs
    mask = jnp.arange(cfg.max_length)[None, :] < jnp.array([[5], [9]])
    other = jnp.where(mask, tokens, (tokens + 7) % cfg.vocab_size)
    a = apply(params, tokens, mask)
    b = apply(params, other, mask)
    keep = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(a)[keep], np.asarray(b)[keep], atol=1e-6)
    assert np.abs(np.asarray(apply(params, other)) - np.asarray(hidden)).max() > 1e-3  # without mask they do


def test_text_encoder_rejects_long_prompts():
    cfg = TextEncoderConfig(max_length=4)
    params = init_text_encoder(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(cfg).apply(params, jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="num_heads"):
        TextEncoderConfig(width=30, num_heads=4)
