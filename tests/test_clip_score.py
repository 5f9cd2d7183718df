"""CLIP vision tower, CLIPImageProcessor preprocessing and the CLIP score: parity with transformers.

Every model is a tiny random transformers ``CLIPModel`` (text + vision towers, 32-pixel
images in 8-pixel patches) written with ``save_pretrained`` into a temp folder
(``sd_fixtures.save_clip_model``); the reference side is transformers' PyTorch model and
its ``CLIPImageProcessor`` (Pillow backend: torchvision is not installed), computed as
torchmetrics' ``CLIPScore`` does.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from sd_fixtures import save_clip_model

from meg_jax.backbone import clip_score as clip_score_lib
from meg_jax.backbone import clip_vision

# fp32 parity bound (done-when 1 of issue 14): both sides sum the same float32 products in a
# different order (XLA vs oneDNN); for D=32, 2 layers and O(1) activations the rounding is a
# few 1e-7 (measured 1.2e-7 on the unit embeddings), so 1e-4 leaves orders of margin while a
# real mistake (a transposed patch kernel, a missing pre-LayerNorm, the wrong pooled token)
# moves the embeddings by >= 1e-2.
TOL = 1e-4
# Preprocessing: the resize is bit-exact integer arithmetic (Pillow's), so the pixel values
# differ only by the float32 rounding of (x / 255 - mean) / std: |values| <= ~2.2, relative
# rounding 6e-8 per operation -> a few 1e-7 (measured 4.8e-7). 1e-5 still catches one 8-bit
# level (1 / 255 / 0.27 = 0.015).
PIXEL_TOL = 1e-5
PROMPTS = ["a photo of a cat", "a red circle on a blue background", "the moon", "a dog in a house",
           "a painting of a tree", "city at night"]
# A non-default mean/std in preprocessor_config.json must be read (OpenAI's would pass by default).
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip") / "clip-model")
    model = save_clip_model(path, seed=1, image_mean=MEAN, image_std=STD)
    return path, model


@pytest.fixture(scope="module")
def scorer(clip_folder):
    # 4 images per jitted call: the 6-image tests below run two chunks, the second padded
    return clip_score_lib.load_clip_scorer(clip_folder[0], batch_size=4)


def _processor(folder=None, size=32):
    from transformers import CLIPImageProcessor

    if folder is not None:
        return CLIPImageProcessor.from_pretrained(folder)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _images(seed, n, h, w):
    return np.random.default_rng(seed).random((n, h, w, 3)).astype(np.float32)


def _torch_pixels(processor, images):
    u8 = np.round(images * 255).astype(np.uint8)  # the 8-bit image, as diffusers' numpy_to_pil
    return processor(images=list(u8), return_tensors="np")["pixel_values"]  # [B, 3, S, S]


# (H, W) -> 32: upscale, downscale, both aspect ratios, identity, odd sizes; and SD-1.5's 512
# (landscape 512 x 768 too) -> CLIP-L's 224 (an 11-tap kernel per axis).
@pytest.mark.parametrize("h, w, size", [(16, 16, 32), (64, 48, 32), (40, 90, 32), (32, 32, 32), (7, 9, 32),
                                        (512, 768, 224)])
def test_preprocessing_matches_clip_image_processor(h, w, size):
    images = _images(h * w, 2, h, w)
    ref = _torch_pixels(_processor(size=size), images)
    ours = jax.jit(clip_vision.CLIPImagePreprocessor.for_image_size(size))(jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, rtol=0, atol=PIXEL_TOL)


def test_preprocessor_config_is_read(clip_folder):
    folder, _ = clip_folder
    pre = clip_vision.read_preprocessor(folder, 32)
    assert pre.image_mean == pytest.approx(MEAN) and pre.image_std == pytest.approx(STD)
    images = _images(5, 2, 24, 40)
    ref = _torch_pixels(_processor(folder), images)
    np.testing.assert_allclose(np.asarray(pre(jnp.asarray(images))).transpose(0, 3, 1, 2), ref, rtol=0,
                               atol=PIXEL_TOL)


def test_image_embeddings_match_transformers(clip_folder, scorer):
    """The tower's outputs, and the scorer's unit embeddings (6 images: two chunks of 4, one padded)."""
    folder, model = clip_folder
    images = _images(1, 6, 40, 56)
    pixels = _torch_pixels(_processor(folder), images)
    with torch.no_grad():
        out = model.vision_model(pixel_values=torch.as_tensor(pixels))
        embeds = model.get_image_features(pixel_values=torch.as_tensor(pixels)).pooler_output.numpy()
    module, params, config, pre = clip_vision.load_vision_encoder(folder)
    assert config.projection_dim == 24 and config.num_patches == 16
    ours = jax.jit(lambda p, x: module.apply({"params": p}, pre(x)))(params, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(ours.last_hidden_state), out.last_hidden_state.numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(ours.pooler_output), out.pooler_output.numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(ours.image_embeds), embeds, rtol=0, atol=TOL)
    unit = embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(scorer.image_embeds(jnp.asarray(images))), unit, rtol=0, atol=TOL)


def test_vision_model_with_projection_folder(tmp_path):
    """A ``CLIPVisionModelWithProjection`` folder (gelu) loads alone, keys prefixed ``vision_model.``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                           num_attention_heads=2, hidden_act="gelu", projection_dim=12)
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(tmp_path)
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.as_tensor(x.transpose(0, 3, 1, 2))).image_embeds.numpy()
    module, params, config, _ = clip_vision.load_vision_encoder(tmp_path)
    assert config.hidden_act == "gelu" and config.projection_dim == 12
    ours = jax.jit(lambda p, x: module.apply({"params": p}, x).image_embeds)(params, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=TOL)


def test_clip_score_matches_torch(clip_folder, scorer):
    """torchmetrics' CLIPScore computed by hand on transformers' model (torchmetrics is not installed)."""
    from transformers import CLIPTokenizer

    folder, model = clip_folder
    # Solid colours (black, white, red, blue, green, yellow) under 30 % noise.
    colours = np.array([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 1, 0]], np.float32)
    images = 0.7 * colours[:, None, None, :] + 0.3 * _images(2, len(PROMPTS), 32, 48)
    pixels = torch.as_tensor(_torch_pixels(_processor(folder), images))
    tokens = CLIPTokenizer.from_pretrained(folder)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**tokens).pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1).numpy()
    ref = 100.0 * np.maximum(cos, 0.0)
    # This random model's cosines straddle 0 (measured -0.32, 0.23, 0.02, -0.17, -0.29, -0.26), so the
    # clamp is exercised on both sides.
    assert (cos > 0.01).any() and (cos < -0.01).any()
    ours = np.asarray(scorer(jnp.asarray(images), PROMPTS))
    # 100 x a cosine of unit vectors whose entries agree to ~1e-7: 1e-2 of a score point (1e-4 of a
    # cosine) is the embedding tolerance carried through.
    np.testing.assert_allclose(ours, ref, rtol=0, atol=100 * TOL)
    # The same program on the same inputs: identical up to nothing (1e-6 allowed for safety).
    np.testing.assert_allclose(np.asarray(clip_score_lib.clip_score(jnp.asarray(images), PROMPTS, scorer)), ours,
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="6 images but 2 prompts"):
        scorer(jnp.asarray(images), PROMPTS[:2])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_clip_folder_errors_name_the_file(clip_folder, tmp_path):
    folder, _ = clip_folder
    # a text-only folder (a pipeline's text_encoder/): no vision tower
    from sd_fixtures import save_clip_text_encoder

    text_only = tmp_path / "text_encoder"
    save_clip_text_encoder(text_only)
    with pytest.raises(ValueError, match=r"text_encoder/config.json: model_type='clip_text_model' has no CLIP vision"):
        clip_score_lib.load_clip_scorer(text_only)
    # a CLIPModel config whose vision_config is gone
    broken = _copy(folder, tmp_path / "no-vision-config")
    cfg_path = os.path.join(broken, "config.json")
    with open(cfg_path) as f:
        data = json.load(f)
    del data["vision_config"]
    with open(cfg_path, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match=r"no-vision-config/config.json: .*without a vision_config"):
        clip_score_lib.load_clip_scorer(broken)
    # no weights at all
    no_weights = _copy(folder, tmp_path / "no-weights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    with pytest.raises(ValueError, match=r"no-weights: no weights found"):
        clip_score_lib.load_clip_scorer(no_weights)
    # weights without the vision tower (a text model's file in a CLIPModel folder)
    no_vision = _copy(folder, tmp_path / "no-vision-weights")
    path = os.path.join(no_vision, "model.safetensors")
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("vision_model.")}, path)
    with pytest.raises(ValueError, match=r"no-vision-weights does not fit a CLIP vision tower.*missing params.*"
                                         r"embeddings/class_embedding"):
        clip_score_lib.load_clip_scorer(no_vision)
    # no tokenizer
    no_tok = _copy(folder, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(no_tok, name))
    with pytest.raises(FileNotFoundError, match=r"no-tokenizer: the CLIP folder has no tokenizer"):
        clip_score_lib.load_clip_scorer(no_tok)
    with pytest.raises(FileNotFoundError, match="nope: no such CLIP model folder"):
        clip_score_lib.load_clip_scorer(tmp_path / "nope")
