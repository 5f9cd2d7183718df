"""CLIP score of generated images against their prompts, with a transformers ``CLIPModel`` folder.

As torchmetrics' ``CLIPScore`` (Hessel et al. 2021, "CLIPScore", with w = 100)::

    score(image, prompt) = 100 * max(cos(E_img(image), E_txt(prompt)), 0)

where ``E_img`` = ``CLIPModel.get_image_features`` (the vision tower's class token,
post-LayerNorm, ``visual_projection``) of the preprocessed image
(:class:`~meg_jax.backbone.clip_vision.CLIPImagePreprocessor`, CLIPImageProcessor's
resize / crop / normalise) and ``E_txt`` = ``CLIPModel.get_text_features`` (the text tower,
:mod:`meg_jax.backbone.clip`, pooled at the end token, ``text_projection``) of the prompt
tokenized by the folder's own tokenizer. Differences from torchmetrics, both deliberate:

* the clamp at 0 is per image; torchmetrics clamps the *mean* over the images it was given.
  The two agree whenever every cosine is >= 0 (real CLIP models on real images give
  0.15-0.40);
* prompts longer than the text tower's ``max_position_embeddings`` (77) are truncated by
  the tokenizer to ``<bos>`` + 75 tokens + ``<eos>`` (``truncation=True``, as
  ``CLIPProcessor`` and diffusers do); torchmetrics cuts the padded ids after the 77th,
  dropping ``<eos>``.

Images are [B, H, W, 3] floats in [0, 1] (diffusers' ``output_type="np"``; the project's
[-1, 1] images are ``(x + 1) / 2``), taken to 8 bits as ``round(255 x)`` before the
preprocessing, as an image is saved. The image path (preprocess, vision tower, cosine) is
one jitted program per input shape; the text path one per prompt batch size.

The CLIP folder is what ``CLIPModel.save_pretrained`` writes (``config.json`` with
``text_config`` and ``vision_config``, ``model.safetensors``) plus the tokenizer's files
(``tokenizer.json`` or ``vocab.json`` + ``merges.txt``; ``CLIPProcessor.save_pretrained``
writes them) and optionally ``preprocessor_config.json`` (else CLIPImageProcessor's
defaults at the model's ``image_size``), e.g. ``openai/clip-vit-large-patch14`` as
downloaded from the hub.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax import config as config_lib
from meg_jax.backbone import clip as clip_lib
from meg_jax.backbone import clip_vision

__all__ = ["CLIPScorer", "load_clip_scorer", "clip_score", "CLIP_SCORE_SCALE"]

CLIP_SCORE_SCALE = 100.0  # torchmetrics' w: the score is 100 x the clamped cosine
DEFAULT_BATCH_SIZE = 64  # images per jitted vision call (the last chunk is padded: one compile per input size)


def _unit(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPScorer:
    """A loaded CLIP model that scores images against prompts (module docstring).

    Build it with :func:`load_clip_scorer`. Attributes are the two towers' modules and
    params, the preprocessing, the tokenizer and ``batch_size``, the images per jitted
    vision call (more are scored in chunks, the last padded).
    """

    def __init__(self, folder: str, text_module: clip_lib.CLIPTextTransformer, text_params: Any,
                 vision_module: clip_vision.CLIPVisionTransformer, vision_params: Any,
                 preprocessor: clip_vision.CLIPImagePreprocessor, tokenizer: clip_lib.CLIPTokenizer,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"CLIPScorer: batch_size must be an integer >= 1, got {batch_size!r}")
        self.folder, self.batch_size = folder, batch_size
        self.text_module, self.text_params = text_module, text_params
        self.vision_module, self.vision_params = vision_module, vision_params
        self.preprocessor, self.tokenizer = preprocessor, tokenizer

        def text_embeds(params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
            return _unit(text_module.apply({"params": params}, ids, mask).text_embeds)

        def image_embeds(params: Any, images: jax.Array) -> jax.Array:
            return _unit(vision_module.apply({"params": params}, preprocessor(images)).image_embeds)

        def scores(params: Any, images: jax.Array, text: jax.Array) -> jax.Array:
            cos = jnp.sum(image_embeds(params, images) * text, axis=-1)
            return CLIP_SCORE_SCALE * jnp.maximum(cos, 0.0)

        self._text_embeds = jax.jit(text_embeds)
        self._image_embeds = jax.jit(image_embeds)
        self._scores = jax.jit(scores)

    @property
    def projection_dim(self) -> int:
        """P, the width of the shared embedding space."""
        return self.vision_module.config.projection_dim

    def text_embeds(self, prompts: Sequence[str]) -> jax.Array:
        """Unit-norm text embeddings, float32 [B, P] (``get_text_features`` / its norm)."""
        ids, mask = self.tokenizer.encode(list(prompts))
        return self._text_embeds(self.text_params, jnp.asarray(ids), jnp.asarray(mask))

    def image_embeds(self, images: jax.Array) -> jax.Array:
        """Unit-norm image embeddings, float32 [B, P], of [B, H, W, 3] images in [0, 1]."""
        return self._chunked(lambda x: self._image_embeds(self.vision_params, x), images)

    def score_embeds(self, images: jax.Array, text_embeds: jax.Array) -> jax.Array:
        """CLIP scores [B] of images [B, H, W, 3] in [0, 1] against unit text embeddings [B, P]."""
        images = jnp.asarray(images)
        text_embeds = jnp.asarray(text_embeds, jnp.float32)
        if images.ndim != 4 or text_embeds.shape != (images.shape[0], self.projection_dim):
            raise ValueError(f"score_embeds: images [B, H, W, 3] and text embeddings [B, {self.projection_dim}], "
                             f"got {images.shape} and {text_embeds.shape}")
        both = (images, text_embeds)
        return self._chunked(lambda pair: self._scores(self.vision_params, *pair), both)

    def __call__(self, images: jax.Array, prompts: Sequence[str]) -> jax.Array:
        """CLIP scores float32 [B] in [0, 100] of images [B, H, W, 3] in [0, 1] vs their prompts (B of them)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != np.shape(images)[0]:
            raise ValueError(f"clip score: {np.shape(images)[0]} images but {len(prompts)} prompts (one per image)")
        return self.score_embeds(images, self.text_embeds(prompts))

    def _chunked(self, fn: Any, inputs: Any) -> jax.Array:
        """``fn`` over the leading axis in chunks of ``batch_size`` (the last padded with its last row)."""
        n, size = jax.tree.leaves(inputs)[0].shape[0], self.batch_size
        if n <= size:
            return fn(inputs)
        outs = []
        for lo in range(0, n, size):
            part = jax.tree.map(lambda a: a[lo:lo + size], inputs)
            m = jax.tree.leaves(part)[0].shape[0]
            if m < size:
                part = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], size - m, 0)]), part)
            outs.append(fn(part)[:m])
        return jnp.concatenate(outs)


def _text_config_of(data: dict[str, Any], cfg_path: str) -> clip_lib.CLIPTextConfig:
    """The text tower of a ``CLIPModel`` ``config.json`` (projection width from the top level)."""
    text = data.get("text_config")
    legacy = data.get("text_config_dict")  # transformers < 4.2x: it overrides text_config
    if isinstance(legacy, dict) and legacy:
        text = {**(text or {}), **legacy}
    if not isinstance(text, dict):
        raise ValueError(f"{cfg_path}: a CLIPModel config.json without a text_config object")
    text = {k: v for k, v in text.items() if not (k == "architectures" and v is None)}
    try:
        config = clip_lib.CLIPTextConfig.from_transformers(text, with_projection=True)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: text_config: {e}") from e
    return dataclasses.replace(config, projection_dim=int(data.get("projection_dim", 512)))


def load_clip_scorer(folder: str | os.PathLike, *, dtype: Any = jnp.float32,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> CLIPScorer:
    """Loads a transformers ``CLIPModel`` folder (module docstring) for scoring.

    Args:
      folder: the CLIP folder.
      dtype: params and computation dtype of both towers (float32, or bfloat16).
      batch_size: images per jitted vision call.

    Returns:
      A :class:`CLIPScorer`.

    Raises:
      FileNotFoundError: the folder, its ``config.json`` or its tokenizer files are missing
        (named).
      ValueError: naming the folder or file: a config that is not a ``CLIPModel``'s (e.g. a
        text-only or vision-only model), unsupported keys, missing or unreadable weights,
        weights that do not fit the config.
    """
    from meg_jax.backbone import weights as weights_lib

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such CLIP model folder (a transformers CLIPModel "
                                "save_pretrained folder)")
    cfg_path = os.path.join(folder, "config.json")
    data = config_lib.read_json_object(cfg_path, what="the CLIP model's config")
    vision_config = clip_vision.vision_config_of(data, cfg_path)  # refuses configs without a vision tower
    if data.get("model_type") != "clip":
        raise ValueError(
            f"{cfg_path}: model_type={data.get('model_type')!r} holds only a vision tower; a CLIP score needs the "
            "text tower too: a transformers CLIPModel folder (model_type 'clip')"
        )
    text_config = _text_config_of(data, cfg_path)
    state = weights_lib.load_state_dict(folder, None, np.float32, names=(weights_lib.TRANSFORMERS_WEIGHTS_NAME,))
    vision_params = clip_vision.vision_params_from_state_dict(vision_config, state, dtype=dtype, source=folder)
    text_state = {k: v for k, v in state.items() if k.startswith("text_model.") or k == "text_projection.weight"}
    text_params = clip_lib.params_from_state_dict(text_config, text_state, dtype=dtype, source=folder)
    try:
        tokenizer = clip_lib.load_tokenizer(folder, max_length=text_config.max_position_embeddings)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{folder}: the CLIP folder has no tokenizer (tokenizer.json, or vocab.json + merges.txt); save the "
            f"model's CLIPProcessor or CLIPTokenizer into it ({e})"
        ) from e
    return CLIPScorer(
        folder=folder,
        text_module=clip_lib.CLIPTextTransformer(text_config, dtype=dtype),
        text_params=text_params,
        vision_module=clip_vision.CLIPVisionTransformer(vision_config, dtype=dtype),
        vision_params=vision_params,
        preprocessor=clip_vision.read_preprocessor(folder, vision_config.image_size),
        tokenizer=tokenizer,
        batch_size=batch_size,
    )


def clip_score(images: jax.Array, prompts: Sequence[str], clip_model: str | os.PathLike | CLIPScorer) -> jax.Array:
    """CLIP score per image, float32 [B] in [0, 100] (module docstring).

    Args:
      images: [B, H, W, 3] in [0, 1].
      prompts: B prompts, one per image.
      clip_model: a CLIP folder (loaded on every call: load it once with
        :func:`load_clip_scorer` to score many batches) or a loaded :class:`CLIPScorer`.
    """
    scorer = clip_model if isinstance(clip_model, CLIPScorer) else load_clip_scorer(clip_model)
    return scorer(images, prompts)
