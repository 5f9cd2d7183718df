"""CLIP's vision tower in Flax, and CLIPImageProcessor's preprocessing in JAX.

transformers' ``CLIPVisionModelWithProjection`` (and the vision half of ``CLIPModel``),
configured from the ``config.json`` transformers writes, weights from ``model.safetensors``::

    pixel_values [B, S, S, C] (NHWC; S = image_size)
      -> patch_embedding: conv p x p, stride p, no bias -> [B, (S/p)^2, D] (row-major patches)
      -> prepend class_embedding [D] -> + position_embedding (positions 0..(S/p)^2)
      -> pre_layrnorm (transformers' spelling)
      -> num_hidden_layers x pre-LN layer (no mask):  x += out_proj(attn(LN1(x)))
                                                      x += fc2(act(fc1(LN2(x))))  (quick_gelu / gelu)
      -> last_hidden_state [B, 1 + (S/p)^2, D] (no final LayerNorm on it)
      -> pooler_output [B, D] = post_layernorm(last_hidden_state[:, 0])   (the class token)
      -> image_embeds [B, P] = visual_projection(pooler_output)           (no bias)

The encoder layers are the text encoder's (:mod:`meg_jax.backbone.clip`) without the causal
mask.

:class:`CLIPImagePreprocessor` is ``CLIPImageProcessor`` (``preprocessor_config.json``):
resize so the shortest side is ``size["shortest_edge"]`` (the long side
``int(shortest_edge * long / short)``) with bicubic resampling, centre-crop to
``crop_size``, rescale by ``rescale_factor`` (1/255) and normalise with ``image_mean`` /
``image_std``. The input is the 8-bit image (``round(255 x)`` of a [0, 1] float image, as
diffusers' ``numpy_to_pil``). The resize reproduces Pillow's 8-bit bicubic resampling
(``Image.resize(..., BICUBIC)``, what ``CLIPImageProcessor`` runs on uint8 images without
torchvision): Pillow's filter (Keys cubic, a = -0.5, support widened by the downscale
factor, weights normalised over the taps inside the image), its 22-bit fixed-point
coefficients, a horizontal then a vertical pass, each rounded and clipped to 8 bits; done
here as two integer matrix products, so it is jittable and bit-exact with Pillow (the
tests compare with ``CLIPImageProcessor``). ``jax.image.resize(..., "bicubic")`` is not
used: on random 8-bit images it differs from Pillow by up to 26 levels (16 -> 32 upscale)
and 3.5 levels (512 -> 224), mostly at the borders, which Pillow treats by renormalising
the in-image weights.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from meg_jax import config as config_lib
from meg_jax.backbone.clip import _IGNORED_KEYS, _Encoder, fill_params, flax_path
from meg_jax.backbone.layers import LayerNorm, Linear

Dtype = Any

__all__ = [
    "CLIPVisionConfig",
    "CLIPVisionOutput",
    "CLIPVisionTransformer",
    "CLIPImagePreprocessor",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "pil_bicubic_coefficients",
    "vision_params_from_state_dict",
    "load_vision_encoder",
]

PREPROCESSOR_NAME = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' image_utils defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_ACTIVATIONS = ("quick_gelu", "gelu")
_VISION_ARCHITECTURES = {"CLIPVisionModelWithProjection": True, "CLIPVisionModel": False}
# Pillow's fixed point: coefficients carry 32 - 8 - 2 = 22 fractional bits (Resample.c).
_PRECISION_BITS = 22
_PIL_BICUBIC = 3  # PILImageResampling.BICUBIC, CLIPImageProcessor's resample


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers ``CLIPVisionConfig`` (the fields that shape the forward pass).

    Field names and defaults are transformers' (a key missing from ``config.json`` takes
    transformers' default). The encoder layers read the same field names as
    :class:`~meg_jax.backbone.clip.CLIPTextConfig`.
    """

    hidden_size: int = 768  # width D
    intermediate_size: int = 3072  # MLP hidden width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12  # D must be divisible
    num_channels: int = 3  # image channels C
    image_size: int = 224  # S, the square input side (pixels)
    patch_size: int = 32  # p, the patch side (pixels); S must be divisible
    hidden_act: str = "quick_gelu"  # "quick_gelu" (x * sigmoid(1.702 x)) or "gelu" (exact, erf)
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # P, width of image_embeds (with_projection only)
    with_projection: bool = True  # a bias-free D -> P visual_projection (CLIPModel, ...WithProjection)

    def __post_init__(self) -> None:
        for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "image_size", "patch_size", "projection_dim"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CLIPVisionConfig.{f} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPVisionConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIPVisionConfig: image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIPVisionConfig: unsupported value hidden_act={self.hidden_act!r}; "
                f"meg-jax implements {list(_ACTIVATIONS)}"
            )
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)) \
                or self.layer_norm_eps <= 0:
            raise ValueError(f"CLIPVisionConfig.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if not isinstance(self.with_projection, bool):
            raise ValueError(f"CLIPVisionConfig.with_projection must be a bool, got {self.with_projection!r}")

    @property
    def num_patches(self) -> int:
        """(S / p)^2 patch tokens (the class token comes on top)."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers(cls, data: Mapping[str, Any], *, with_projection: bool | None = None) -> CLIPVisionConfig:
        """Builds the config from a ``config.json`` dict of a CLIP vision model.

        Args:
          data: the parsed ``config.json`` of a ``CLIPVisionModel(WithProjection)``, or the
            ``vision_config`` object of a ``CLIPModel``'s.
          with_projection: whether the model has ``visual_projection``; None = from
            ``architectures`` (True when that key is absent or null).

        Raises:
          ValueError: naming the key, for unknown keys and unsupported values.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"with_projection"}
        kwargs: dict[str, Any] = {}
        arch_projection = True
        for key, value in data.items():
            if key in _IGNORED_KEYS:
                continue
            if key == "model_type":
                if value != "clip_vision_model":
                    raise ValueError(
                        f"CLIPVisionConfig: unsupported value model_type={value!r}; meg-jax reads 'clip_vision_model'"
                    )
            elif key == "architectures":
                if value is None:  # what a CLIPModel's vision_config held before transformers 5
                    continue
                if not isinstance(value, list) or len(value) != 1 or value[0] not in _VISION_ARCHITECTURES:
                    raise ValueError(
                        f"CLIPVisionConfig: unsupported value architectures={value!r}; meg-jax reads one of "
                        f"{sorted(_VISION_ARCHITECTURES)}"
                    )
                arch_projection = _VISION_ARCHITECTURES[value[0]]
            elif key in ("pruned_heads", "bos_token_id", "eos_token_id", "pad_token_id"):
                if key == "pruned_heads" and value:
                    raise ValueError(f"CLIPVisionConfig: unsupported value pruned_heads={value!r}; heads must be whole")
            elif key in names:
                kwargs[key] = value
            else:
                raise ValueError(
                    f"CLIPVisionConfig: unknown or unsupported config.json key {key!r} (value {value!r}); "
                    f"supported keys are {sorted(names | {'model_type', 'architectures', 'pruned_heads'})}"
                )
        if with_projection is None:
            with_projection = arch_projection
        return cls(**kwargs, with_projection=with_projection)


@struct.dataclass
class CLIPVisionOutput:
    """What the vision tower returns (fields as transformers' outputs).

    Attributes:
      last_hidden_state: [B, 1 + (S/p)^2, D], the last layer's output (class token first).
      pooler_output: [B, D], ``post_layernorm`` of the class token.
      image_embeds: [B, P] projected pooler_output (with_projection), else None.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    image_embeds: jax.Array | None = None


class _VisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, name="patch_embedding")(pixel_values)  # [B, S/p, S/p, D]
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major, as torch's flatten(2).transpose(1, 2)
        init = nn.initializers.normal(0.02)
        cls = self.param("class_embedding", init, (cfg.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size)), patches], axis=1)
        pos = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, dtype=self.dtype, embedding_init=init,
                       name="position_embedding")
        return x + pos(jnp.arange(cfg.num_patches + 1))[None]


class CLIPVisionTransformer(nn.Module):
    """``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` forward pass (inference).

    Parameter names follow transformers' state dict (``vision_model.`` dropped,
    ``encoder.layers.0.mlp.fc1`` -> ``encoder/layers_0/mlp/fc1``; the conv weight
    ``[D, C, p, p]`` -> ``kernel [p, p, C, D]``).

    Attributes:
      config: the architecture.
      dtype: computation dtype (float32, or bfloat16 with LayerNorm statistics and the
        attention softmax in float32).
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        """Encodes preprocessed images.

        Args:
          pixel_values: [B, S, S, C] normalised images, NHWC (transformers' ``pixel_values``
            is the same data as [B, C, S, S]).

        Returns:
          :class:`CLIPVisionOutput` in ``dtype``.
        """
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [B, {want[0]}, {want[1]}, {want[2]}] (NHWC), "
                             f"got shape {pixel_values.shape}")
        x = _VisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values.astype(self.dtype))
        x = LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
        last = _Encoder(cfg, self.dtype, name="encoder")(x, None)[-1]
        pooled = LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(last[:, 0])
        embeds = None
        if cfg.with_projection:
            embeds = Linear(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")(pooled)
        return CLIPVisionOutput(last_hidden_state=last, pooler_output=pooled, image_embeds=embeds)


# ---- preprocessing (CLIPImageProcessor) ----------------------------------------------------


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (Keys, a = -0.5) at ``x``."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pil_bicubic_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's 8-bit bicubic resampling of one axis as an integer matrix.

    Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` (``libImaging/Resample.c``):
    output pixel ``o`` is centred at input coordinate ``(o + 0.5) * in/out``, its taps are
    the input pixels within ``2 * max(in/out, 1)`` (the kernel widened when downscaling),
    their weights normalised to sum to 1, then rounded to 22-bit fixed point.

    Args:
      in_size: input length (pixels), >= 1.
      out_size: output length (pixels), >= 1.

    Returns:
      int32 [out_size, in_size]: ``out = clip((coeffs @ in + 2^21) >> 22, 0, 255)`` is
      Pillow's pass over 8-bit values.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be >= 1, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    out = np.zeros((out_size, in_size), np.int64)
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # C's (int) truncates toward zero; then clamped
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = _pil_bicubic((taps - center + 0.5) / filterscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << _PRECISION_BITS)), np.trunc(0.5 + w * (1 << _PRECISION_BITS)))
        out[o, lo:hi] = fixed.astype(np.int64)
    return out.astype(np.int32)


def _resample_pass(images: jax.Array, coeffs: np.ndarray, axis: int) -> jax.Array:
    """One Pillow pass over ``axis`` (1 = rows, 2 = columns) of int32 [B, H, W, C] 8-bit values."""
    spec = "oh,bhwc->bowc" if axis == 1 else "ow,bhwc->bhoc"
    # |coeff| sum <= 1.2 x 2^22 for the bicubic kernel, x 255 < 2^31: int32 holds every partial sum.
    acc = jnp.einsum(spec, jnp.asarray(coeffs), images, preferred_element_type=jnp.int32)
    return jnp.clip(jnp.right_shift(acc + (1 << (_PRECISION_BITS - 1)), _PRECISION_BITS), 0, 255)


@dataclasses.dataclass(frozen=True)
class CLIPImagePreprocessor:
    """``CLIPImageProcessor`` as a jittable function of [0, 1] images (module docstring).

    Fields are the processor's (``preprocessor_config.json``); defaults are
    ``CLIPImageProcessor``'s with the model's ``image_size``.
    """

    shortest_edge: int = 224  # size["shortest_edge"]: the short side after resizing (pixels)
    crop_height: int = 224  # crop_size["height"] (pixels)
    crop_width: int = 224  # crop_size["width"] (pixels)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1.0 / 255.0  # 8-bit levels -> [0, 1]
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN  # per RGB channel
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def for_image_size(cls, image_size: int) -> CLIPImagePreprocessor:
        """CLIPImageProcessor's defaults for a model of input side ``image_size``."""
        return cls(shortest_edge=image_size, crop_height=image_size, crop_width=image_size)

    @classmethod
    def from_config(cls, data: Mapping[str, Any], *, source: str = PREPROCESSOR_NAME) -> CLIPImagePreprocessor:
        """Reads a ``preprocessor_config.json`` dict.

        Raises:
          ValueError: naming ``source`` and the key: a processor other than CLIP's, a
            resample other than bicubic, a malformed size, or convert-RGB switched off.
        """
        def fail(msg: str) -> ValueError:
            return ValueError(f"{source}: {msg}")

        kind = data.get("image_processor_type", data.get("feature_extractor_type", "CLIPImageProcessor"))
        if kind not in ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil",
                        "CLIPFeatureExtractor"):
            raise fail(f"image_processor_type={kind!r}; meg-jax implements CLIPImageProcessor only")
        if data.get("resample", _PIL_BICUBIC) != _PIL_BICUBIC:
            raise fail(f"resample={data['resample']!r}; meg-jax implements bicubic (3) only")
        if data.get("do_convert_rgb", True) is False:
            raise fail("do_convert_rgb=false; meg-jax scores RGB images")
        size = data.get("size", {"shortest_edge": 224})
        if isinstance(size, int):  # configs written by transformers < 4.26
            size = {"shortest_edge": size}
        if not isinstance(size, dict) or set(size) != {"shortest_edge"}:
            raise fail(f"size={size!r}; meg-jax reads {{'shortest_edge': N}} (CLIP's resize)")
        crop = data.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if not isinstance(crop, dict) or set(crop) != {"height", "width"}:
            raise fail(f"crop_size={crop!r}; meg-jax reads {{'height': H, 'width': W}}")
        kwargs: dict[str, Any] = dict(shortest_edge=size["shortest_edge"], crop_height=crop["height"],
                                      crop_width=crop["width"])
        for key in ("do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize"):
            if key in data:
                kwargs[key] = data[key]
        for key in ("image_mean", "image_std"):
            if key in data:
                value = data[key]
                if not isinstance(value, (list, tuple)) or len(value) != 3:
                    raise fail(f"{key}={value!r}; expected 3 numbers (one per RGB channel)")
                kwargs[key] = tuple(float(v) for v in value)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise fail(str(e)) from e

    def __post_init__(self) -> None:
        for f in ("shortest_edge", "crop_height", "crop_width"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CLIPImagePreprocessor.{f} must be an integer >= 1, got {value!r}")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"CLIPImagePreprocessor.image_std must be > 0, got {self.image_std}")

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after the shortest-edge resize (transformers' ``get_resize_output_image_size``)."""
        if not self.do_resize:
            return height, width
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the pixel values for an input of ``height x width``."""
        h, w = self.resized_shape(height, width)
        return (self.crop_height, self.crop_width) if self.do_center_crop else (h, w)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Preprocesses [0, 1] RGB images (traceable; shapes static).

        Args:
          images: [B, H, W, 3] float in [0, 1] (diffusers' ``output_type="np"``); values
            outside are clipped; each is taken to 8 bits as ``round(255 x)``.

        Returns:
          float32 [B, crop_height, crop_width, 3] pixel values (NHWC).

        Raises:
          ValueError: not [B, H, W, 3], or the resized image is smaller than the crop
            (CLIPImageProcessor would pad; not implemented).
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] RGB in [0, 1], got shape {images.shape}")
        _, height, width, _ = images.shape
        x = jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.int32)
        h, w = self.resized_shape(height, width)
        # Pillow resizes only the axes whose size changes: horizontal pass first, then vertical.
        if w != width:
            x = _resample_pass(x, pil_bicubic_coefficients(width, w), axis=2)
        if h != height:
            x = _resample_pass(x, pil_bicubic_coefficients(height, h), axis=1)
        if self.do_center_crop:
            if self.crop_height > h or self.crop_width > w:
                raise ValueError(
                    f"CLIPImagePreprocessor: the {h} x {w} resized image is smaller than crop_size "
                    f"{self.crop_height} x {self.crop_width} (CLIPImageProcessor would pad; not implemented)"
                )
            top, left = (h - self.crop_height) // 2, (w - self.crop_width) // 2
            x = x[:, top:top + self.crop_height, left:left + self.crop_width]
        out = x.astype(jnp.float32)
        if self.do_rescale:
            out = out * jnp.float32(self.rescale_factor)
        if self.do_normalize:
            mean = jnp.asarray(self.image_mean, jnp.float32)
            std = jnp.asarray(self.image_std, jnp.float32)
            out = (out - mean) / std
        return out


# ---- weights ------------------------------------------------------------------------------


def _torch_key_to_path(key: str) -> tuple[str, ...] | None:
    """transformers vision state-dict key (``vision_model.`` dropped) -> Flax param path."""
    if key == "embeddings.position_ids":
        return None
    if key == "embeddings.class_embedding":
        return ("embeddings", "class_embedding")
    return flax_path(key, embeddings=("position_embedding",), norms=("layer_norm", "pre_layrnorm", "post_layernorm"))


def vision_param_shapes(config: CLIPVisionConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``path -> shape`` of the Flax params for ``config`` (no arrays allocated)."""
    module = CLIPVisionTransformer(config)
    x = jnp.zeros((1, config.image_size, config.image_size, config.num_channels))
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x))["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def vision_params_from_state_dict(
    config: CLIPVisionConfig,
    state_dict: Mapping[str, Any],
    *,
    dtype: Dtype = jnp.float32,
    source: str = "state dict",
) -> dict[str, Any]:
    """Converts a transformers CLIP vision state dict to Flax params.

    Keys are a ``CLIPVisionModelWithProjection``'s or a ``CLIPModel``'s: ``vision_model.*``
    and ``visual_projection.weight``; any other key (the text tower, ``logit_scale``) is
    left for the caller.

    Args:
      config: the architecture the weights must fit.
      state_dict: torch key -> array (numpy; any float dtype).
      dtype: dtype of the returned params.
      source: what the state dict was read from, for error messages (a folder or file).

    Raises:
      ValueError: missing, unexpected or wrongly shaped vision weights (named).
    """
    def entries():
        for key, value in state_dict.items():
            if key.startswith("vision_model."):
                path = _torch_key_to_path(key[len("vision_model."):])
            elif key == "visual_projection.weight":
                path = ("visual_projection", "kernel")
            else:
                continue  # the text tower, logit_scale: the caller's
            if path is not None:
                yield key, path, np.asarray(value, np.float32)

    return fill_params(vision_param_shapes(config), entries(), dtype=dtype, source=source, what="CLIP vision tower")


def read_preprocessor(folder: str, image_size: int) -> CLIPImagePreprocessor:
    """The folder's ``preprocessor_config.json``, or CLIPImageProcessor's defaults at ``image_size``."""
    path = os.path.join(folder, PREPROCESSOR_NAME)
    if not os.path.isfile(path):
        return CLIPImagePreprocessor.for_image_size(image_size)
    return CLIPImagePreprocessor.from_config(config_lib.read_json_object(path), source=path)


def vision_config_of(data: Mapping[str, Any], cfg_path: str) -> CLIPVisionConfig:
    """The vision tower of a ``CLIPModel`` or ``CLIPVisionModel(WithProjection)`` ``config.json``.

    A ``CLIPModel``'s ``projection_dim`` (top level) is the projection's width; its
    ``vision_config.projection_dim`` is unused by transformers.

    Raises:
      ValueError: naming ``cfg_path``: the config has no vision tower, or an unsupported key.
    """
    model_type = data.get("model_type")
    try:
        if model_type == "clip":
            vision = data.get("vision_config")
            legacy = data.get("vision_config_dict")  # transformers < 4.2x: it overrides vision_config
            if isinstance(legacy, dict) and legacy:
                vision = {**(vision or {}), **legacy}
            if not isinstance(vision, dict):
                raise ValueError("a CLIPModel config.json without a vision_config object")
            config = CLIPVisionConfig.from_transformers(vision, with_projection=True)
            return dataclasses.replace(config, projection_dim=int(data.get("projection_dim", 512)))
        if model_type == "clip_vision_model":
            return CLIPVisionConfig.from_transformers(data)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    raise ValueError(
        f"{cfg_path}: model_type={model_type!r} has no CLIP vision tower; a CLIP score needs a transformers "
        "CLIPModel folder (config.json with model_type 'clip', text_config and vision_config, and "
        "model.safetensors), e.g. openai/clip-vit-large-patch14 saved with save_pretrained"
    )


def load_vision_encoder(
    folder: str | os.PathLike, *, dtype: Dtype = jnp.float32
) -> tuple[CLIPVisionTransformer, dict[str, Any], CLIPVisionConfig, CLIPImagePreprocessor]:
    """Loads the vision tower of a transformers ``CLIPModel`` or ``CLIPVisionModelWithProjection`` folder.

    Args:
      folder: ``config.json`` + ``model.safetensors`` (or its shards / a variant, as
        :mod:`meg_jax.backbone.weights` reads them) and optionally ``preprocessor_config.json``.
      dtype: params and computation dtype.

    Returns:
      ``(module, params, config, preprocessor)``: ``module.apply({"params": params},
      preprocessor(images))`` returns a :class:`CLIPVisionOutput`.

    Raises:
      FileNotFoundError: no ``config.json`` (named).
      ValueError: naming the file: a config without a vision tower, unsupported keys,
        missing / unreadable weights (``WeightsError``) or weights that do not fit.
    """
    from meg_jax.backbone import weights as weights_lib

    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    config = vision_config_of(config_lib.read_json_object(cfg_path), cfg_path)
    state = weights_lib.load_state_dict(folder, None, np.float32, names=(weights_lib.TRANSFORMERS_WEIGHTS_NAME,))
    params = vision_params_from_state_dict(config, state, dtype=dtype, source=folder)
    return CLIPVisionTransformer(config, dtype=dtype), params, config, read_preprocessor(folder, config.image_size)

