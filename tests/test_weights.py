"""Weights as users store them: single, sharded, variant, fp16/bf16 files, and the errors."""

from __future__ import annotations

import copy
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel

from meg_jax.backbone import from_diffusers
from meg_jax.backbone import weights as W

from test_diffusers_io import VAE  # noqa: E402  (the same tiny VAE config)


@pytest.fixture(scope="module")
def vae_folders(tmp_path_factory):
    """One random diffusers VAE saved in every layout save_pretrained writes."""
    torch.manual_seed(0)
    model = TorchAutoencoderKL(**VAE.to_diffusers()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folders = {}
    for name, kwargs in {
        "single": {},
        "sharded": {"max_shard_size": "20KB"},
        "variant": {"variant": "fp16"},
        "sharded_variant": {"variant": "fp16", "max_shard_size": "20KB"},
        "bin": {"safe_serialization": False},
    }.items():
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, **kwargs)
        folders[name] = path
    half = tmp_path_factory.mktemp("half")
    # the layout of a downloaded fp16 variant: float16 tensors under the fp16 name
    copy.deepcopy(model).to(torch.float16).save_pretrained(half, variant="fp16")
    folders["half"] = half
    bf16 = tmp_path_factory.mktemp("bf16")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(bf16)
    folders["bf16"] = bf16
    return model, folders


def flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = np.asarray(v)
    return out


def test_every_layout_reads_the_same_params(vae_folders):
    _, folders = vae_folders
    assert any("-00002-of-" in f for f in os.listdir(folders["sharded"]))
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in os.listdir(folders["sharded_variant"])
    _, ref = from_diffusers(folders["single"])
    ref = flat(ref)
    for name in ("sharded", "variant", "sharded_variant", "bin"):
        _, got = from_diffusers(folders[name])
        got = flat(got)
        assert got.keys() == ref.keys(), name
        for k in ref:  # the same float32 bytes, only split or named differently
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{name}: {k}")
    # the variant may also be named explicitly
    _, again = from_diffusers(folders["sharded_variant"], variant="fp16")
    np.testing.assert_array_equal(flat(again)[("params", "decoder", "conv_out", "kernel")], ref[("params", "decoder", "conv_out", "kernel")])


@pytest.mark.parametrize("name,torch_dtype", [("half", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_files_are_cast(vae_folders, name, torch_dtype):
    model, folders = vae_folders
    _, params = from_diffusers(folders[name])
    got = flat(params)[("params", "decoder", "conv_out", "kernel")]
    assert got.dtype == np.float32
    # exact: the stored half value widened to float32 (OIHW -> HWIO as every conv)
    want = model.decoder.conv_out.weight.detach().to(torch_dtype).float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(got, want)
    # and read as bfloat16 params when asked
    _, p16 = from_diffusers(folders[name], dtype=ml_dtypes.bfloat16)
    assert flat(p16)[("params", "decoder", "conv_out", "kernel")].dtype == ml_dtypes.bfloat16


def test_transformers_sharded_text_encoder(tmp_path):
    cfg = CLIPTextConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=50, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPTextModel(cfg).eval()
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    assert "model.safetensors.index.json" in os.listdir(tmp_path)
    state = W.load_state_dict(tmp_path)
    ref = model.state_dict()
    assert set(ref) <= set(state)
    for k, v in ref.items():
        np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)


def test_truncated_file_names_the_file(vae_folders, tmp_path):
    _, folders = vae_folders
    folder = tmp_path / "vae"
    shutil.copytree(folders["single"], folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(W.WeightsError, match=r"diffusion_pytorch_model\.safetensors: truncated"):
        from_diffusers(folder)
    path.write_bytes(data[:5])
    with pytest.raises(W.WeightsError, match=r"diffusion_pytorch_model\.safetensors: corrupt or truncated"):
        from_diffusers(folder)
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + data[8:])
    with pytest.raises(W.WeightsError, match="corrupt safetensors header"):
        from_diffusers(folder)


def test_missing_shard_and_missing_weights(vae_folders, tmp_path):
    _, folders = vae_folders
    folder = tmp_path / "sharded"
    shutil.copytree(folders["sharded"], folder)
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[1]
    os.remove(folder / shard)
    with pytest.raises(W.WeightsError, match=f"missing.*{shard}"):
        from_diffusers(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(folders["single"] / "config.json", empty)
    with pytest.raises(W.WeightsError, match="no weights found.*diffusion_pytorch_model.safetensors"):
        from_diffusers(empty)
    with pytest.raises(W.WeightsError, match="no such model folder"):
        W.load_state_dict(tmp_path / "nowhere")


def test_unread_formats_say_how_to_convert(vae_folders, tmp_path):
    _, folders = vae_folders
    ckpt = tmp_path / "v1-5-pruned-emaonly.ckpt"
    ckpt.write_bytes(b"\0" * 16)
    with pytest.raises(W.WeightsError, match="single-file checkpoints.*from_single_file"):
        from_diffusers(ckpt)
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(folders["single"] / "config.json", folder)
    shutil.copy(ckpt, folder / "model.ckpt")
    with pytest.raises(W.WeightsError, match=r"model\.ckpt \(a single-file.*from_single_file"):
        from_diffusers(folder)


def test_two_variants_need_a_choice(vae_folders, tmp_path):
    _, folders = vae_folders
    folder = tmp_path / "two"
    shutil.copytree(folders["variant"], folder)
    shutil.copy(folder / "diffusion_pytorch_model.fp16.safetensors", folder / "diffusion_pytorch_model.ema.safetensors")
    with pytest.raises(W.WeightsError, match=r"variants \['ema', 'fp16'\].*variant="):
        from_diffusers(folder)
    from_diffusers(folder, variant="ema")
    with pytest.raises(W.WeightsError, match=r"no weights found.*variants present"):
        from_diffusers(folder, variant="bf16")


def test_read_safetensors_matches_the_library(tmp_path):
    from safetensors.numpy import save_file

    arrays = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "ids": np.arange(4, dtype=np.int64),
              "empty": np.zeros((0, 3), np.float32)}
    save_file(arrays, tmp_path / "x.safetensors")
    got = W.read_safetensors(tmp_path / "x.safetensors")
    assert got["a"].dtype == np.float32 and got["ids"].dtype == np.int64 and got["empty"].shape == (0, 3)
    np.testing.assert_array_equal(got["a"], arrays["a"].astype(np.float32))
    np.testing.assert_array_equal(got["ids"], arrays["ids"])
    assert W.safetensors_shapes(tmp_path / "x.safetensors") == {"a": (2, 3), "ids": (4,), "empty": (0, 3)}
