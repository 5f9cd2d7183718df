"""Parity of the Flax AutoencoderKL with diffusers' PyTorch AutoencoderKL on random tiny configs."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from meg_jax.backbone import AutoencoderKL, VAEConfig, params_from_torch_state_dict

TOL = 1e-4  # max abs, float32

CONFIGS = {
    # SD-VAE-like: mid-block attention, quant convs, two resnets per encoder block.
    "sd": VAEConfig(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=2,
        latent_channels=3,
        norm_num_groups=4,
        sample_size=16,
    ),
    # Three levels, no mid attention, no quant convs, different in/out channels.
    "plain": VAEConfig(
        in_channels=3,
        out_channels=2,
        block_out_channels=(8, 8, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ),
}


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Adds noise to every parameter: ~0.5/sqrt(fan_in) to weights, 0.1 to 1-D params."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.add_(noise * (0.5 / math.sqrt(p[0].numel()) if p.ndim >= 2 else 0.1))


@functools.cache
def build_case(name: str) -> dict:
    cfg = CONFIGS[name]
    seed = sorted(CONFIGS).index(name) + 10
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**cfg.to_diffusers()).eval()
    perturb_(model, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=gen)
    z = torch.randn(2, cfg.latent_channels, 16 // cfg.downsample_factor, 16 // cfg.downsample_factor, generator=gen)
    with torch.no_grad():
        posterior = model.encode(x).latent_dist
        mean, logvar = posterior.mean.numpy(), posterior.logvar.numpy()
        decoded = model.decode(z).sample.numpy()
    module = AutoencoderKL(cfg)
    return {
        "cfg": cfg,
        "model": model,
        "x": jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
        "z": jnp.asarray(z.numpy().transpose(0, 2, 3, 1)),
        "mean": mean.transpose(0, 2, 3, 1),
        "logvar": logvar.transpose(0, 2, 3, 1),
        "decoded": decoded.transpose(0, 2, 3, 1),
        "params": params_from_torch_state_dict(cfg, model.state_dict()),
        "encode": jax.jit(functools.partial(module.apply, method="encode")),
        "decode": jax.jit(functools.partial(module.apply, method="decode")),
    }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_parity(name):
    case = build_case(name)
    mean, logvar = case["encode"](case["params"], case["x"])
    assert np.abs(case["mean"]).max() > 0.1
    assert np.abs(np.asarray(mean) - case["mean"]).max() < TOL
    assert np.abs(np.asarray(logvar) - case["logvar"]).max() < TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_parity(name):
    case = build_case(name)
    out = np.asarray(case["decode"](case["params"], case["z"]))
    assert out.shape == case["decoded"].shape
    assert np.abs(case["decoded"]).max() > 0.1
    assert np.abs(out - case["decoded"]).max() < TOL


def test_param_count_matches_diffusers():
    for name in CONFIGS:
        case = build_case(name)
        n_torch = sum(p.numel() for p in case["model"].parameters())
        assert sum(x.size for x in jax.tree_util.tree_leaves(case["params"])) == n_torch


def test_logvar_is_clipped_like_diffusers():
    """Scaling quant_conv's weights by 1e3 pushes raw logvar far outside [-30, 20]."""
    case = build_case("sd")
    params = jax.tree_util.tree_map(lambda a: a, case["params"])
    qc = dict(params["params"]["quant_conv"])
    qc["kernel"] = qc["kernel"] * 1e3
    qc["bias"] = qc["bias"] * 1e3
    params = {"params": {**params["params"], "quant_conv": qc}}
    _, logvar = case["encode"](params, case["x"])
    logvar = np.asarray(logvar)
    assert logvar.min() == -30.0 and logvar.max() == 20.0


def test_call_reconstructs_through_the_mean_or_a_sample():
    case = build_case("sd")
    call = jax.jit(AutoencoderKL(case["cfg"]).apply)
    recon, mean, logvar = call(case["params"], case["x"])
    np.testing.assert_allclose(np.asarray(recon), np.asarray(case["decode"](case["params"], mean)), atol=1e-5)
    sampled, _, _ = call(case["params"], case["x"], jax.random.key(0))
    assert np.abs(np.asarray(sampled) - np.asarray(recon)).max() > 1e-4


def test_bad_shapes_say_what_to_change():
    case = build_case("sd")
    with pytest.raises(ValueError, match="multiples of 2"):
        case["encode"](case["params"], jnp.zeros((1, 15, 16, 3)))
    with pytest.raises(ValueError, match="latents"):
        case["decode"](case["params"], jnp.zeros((1, 8, 8, 4)))
