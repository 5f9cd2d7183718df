"""Checkpoint interop: diffusers folders -> Flax, Flax -> folders diffusers loads, and the errors."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import UNet2DConditionModel

from meg_jax.backbone import (
    AutoencoderKL,
    UNet,
    UNetConfig,
    VAEConfig,
    from_diffusers,
    init_unet,
    init_vae,
    params_from_torch_state_dict,
    params_to_torch_state_dict,
    to_diffusers,
)

TOL = 1e-4

UNET = UNetConfig(
    sample_size=8,
    block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=8,
    attention_head_dim=2,
    time_cond_proj_dim=4,
)
VAE = VAEConfig(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)


def perturb_flax(variables, key, scale=0.1):
    """Adds N(0, scale^2) to every leaf so norms and biases are not at their trivial init.

    One normal draw split over the leaves: a threefry per leaf would take long to compile.
    """
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    sizes = [x.size for x in leaves]
    noise = np.asarray(jax.random.normal(key, (sum(sizes),))) * scale
    offsets = np.cumsum([0] + sizes)
    return jax.tree_util.tree_unflatten(
        treedef,
        [jnp.asarray(np.asarray(x) + noise[a:b].reshape(x.shape)) for x, a, b in zip(leaves, offsets, offsets[1:])],
    )


def unet_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([7, 420]),
        "encoder_hidden_states": torch.randn(2, 3, 8, generator=gen),
        "timestep_cond": torch.randn(2, 4, generator=gen),
    }


def jax_inputs(inputs):
    return {k: jnp.asarray(v.numpy().transpose(0, 2, 3, 1) if k == "sample" else v.numpy()) for k, v in inputs.items()}


def assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@functools.cache
def unet_apply():
    return jax.jit(UNet(UNET).apply)


@pytest.fixture(scope="module")
def flax_unet_folder(tmp_path_factory):
    """Random Flax UNet params written with to_diffusers."""
    params = perturb_flax(init_unet(UNET, jax.random.key(0)), jax.random.key(1))
    path = tmp_path_factory.mktemp("flax_unet")
    to_diffusers(UNet(UNET), params, path)
    return path, params


@pytest.fixture(scope="module")
def torch_unet_folder(tmp_path_factory):
    """A perturbed diffusers UNet saved with save_pretrained (safetensors and .bin)."""
    torch.manual_seed(3)
    model = UNet2DConditionModel(**UNET.to_diffusers()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    st = tmp_path_factory.mktemp("torch_unet_st")
    binary = tmp_path_factory.mktemp("torch_unet_bin")
    model.save_pretrained(st)
    model.save_pretrained(binary, safe_serialization=False)
    return model, st, binary


def test_to_diffusers_then_from_pretrained_gives_the_same_outputs(flax_unet_folder):
    path, params = flax_unet_folder
    assert sorted(os.listdir(path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    model = UNet2DConditionModel.from_pretrained(path).eval()
    inputs = unet_inputs()
    with torch.no_grad():
        ref = model(**inputs).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(unet_apply()(params, **jax_inputs(inputs)))
    assert np.abs(ref).max() > 0.1
    assert np.abs(out - ref).max() < TOL
    # and back: the folder loads into bit-identical params and outputs
    module, again = from_diffusers(path)
    assert isinstance(module, UNet) and module.config == UNET
    assert_trees_equal(again, params)
    np.testing.assert_array_equal(np.asarray(unet_apply()(again, **jax_inputs(inputs))), out)


def test_from_diffusers_reads_save_pretrained_folders(torch_unet_folder):
    model, st, binary = torch_unet_folder
    module, params = from_diffusers(st)
    assert module.config == UNET
    inputs = unet_inputs(1)
    with torch.no_grad():
        ref = model(**inputs).sample.numpy().transpose(0, 2, 3, 1)
    assert np.abs(np.asarray(unet_apply()(params, **jax_inputs(inputs))) - ref).max() < TOL
    # a pickled .bin (read with torch.load(weights_only=True)) gives the same params
    assert sorted(os.listdir(binary)) == ["config.json", "diffusion_pytorch_model.bin"]
    _, from_bin = from_diffusers(binary)
    assert_trees_equal(from_bin, params)


def test_state_dict_round_trip_is_exact(torch_unet_folder):
    model = torch_unet_folder[0]
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    back = params_to_torch_state_dict(UNET, params_from_torch_state_dict(UNET, sd))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_shape_mismatch_names_the_parameter(torch_unet_folder):
    sd = dict(torch_unet_folder[0].state_dict())
    sd["down_blocks.1.resnets.0.conv1.weight"] = torch.zeros(16, 8, 1, 3)
    with pytest.raises(ValueError, match=r"down_blocks\.1\.resnets\.0\.conv1\.weight: checkpoint shape \(16, 8, 1, 3\)"):
        params_from_torch_state_dict(UNET, sd)
    # a config that disagrees with the checkpoint (cross_attention_dim) names the attn2 projections
    wider = dataclasses.replace(UNET, cross_attention_dim=12)
    with pytest.raises(ValueError, match=r"attn2\.to_k\.weight"):
        params_from_torch_state_dict(wider, torch_unet_folder[0].state_dict())


def test_missing_and_unexpected_keys_are_listed(torch_unet_folder):
    sd = dict(torch_unet_folder[0].state_dict())
    del sd["time_embedding.cond_proj.weight"]
    sd["time_embedding.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        params_from_torch_state_dict(UNET, sd)
    msg = str(err.value)
    assert "missing from the checkpoint (1): ['time_embedding.cond_proj.weight']" in msg
    assert "unexpected in the checkpoint (1): ['time_embedding.extra.weight']" in msg


def test_vae_round_trip_through_diffusers(tmp_path):
    params = perturb_flax(init_vae(VAE, jax.random.key(2)), jax.random.key(3))
    to_diffusers(AutoencoderKL(VAE), params, tmp_path)
    model = TorchAutoencoderKL.from_pretrained(tmp_path).eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    z = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        mean_ref = model.encode(x).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
        dec_ref = model.decode(z).sample.numpy().transpose(0, 2, 3, 1)
    module = AutoencoderKL(VAE)
    encode = jax.jit(functools.partial(module.apply, method="encode"))
    decode = jax.jit(functools.partial(module.apply, method="decode"))
    mean, _ = encode(params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    dec = decode(params, jnp.asarray(z.numpy().transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(mean) - mean_ref).max() < TOL
    assert np.abs(np.asarray(dec) - dec_ref).max() < TOL
    module2, again = from_diffusers(tmp_path)
    assert isinstance(module2, AutoencoderKL) and module2.config == VAE
    assert_trees_equal(again, params)


def test_old_vae_attention_names_are_accepted():
    params = init_vae(VAE, jax.random.key(4))
    sd = params_to_torch_state_dict(VAE, params)
    old = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, v in sd.items():
        for new, legacy in renames.items():
            if ".attentions.0." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{legacy}.")
                # the oldest checkpoints stored these linear layers as 1x1 convs
                if legacy == "query" and v.ndim == 2:
                    v = v[:, :, None, None]
        old[k] = v
    assert any(".query.weight" in k for k in old) and any(".proj_attn.bias" in k for k in old)
    assert_trees_equal(params_from_torch_state_dict(VAE, old), params)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        from_diffusers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="UNet2DModel"):
        from_diffusers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **VAE.to_diffusers()}))
    with pytest.raises(ValueError, match="safetensors"):
        from_diffusers(tmp_path)
    with pytest.raises(TypeError, match="UNet or AutoencoderKL"):
        to_diffusers(object(), {}, tmp_path)
