"""FLOPs of the backbone networks from XLA's cost analysis, on abstract shapes only.

Each count lowers one forward pass of the Flax module with ``jax.jit(f).lower(...)`` on
``jax.ShapeDtypeStruct`` inputs and parameters (the parameter shapes come from
``jax.eval_shape(module.init, ...)``), and reads ``cost_analysis()["flops"]``. No parameter
or activation is ever allocated and nothing is compiled (unless the lowering's analysis
lacks a FLOP count, when the compiled one is read), so ``sd15`` and ``sdxl`` cost only the
tracing time. Models are traced under ``layers.plain_kernels()`` (without the CPU backend's
rewrites: tiled attention, convs as im2col matmuls), so the counts are the same on every
backend. Results are cached per (config, shape).

What XLA counts (``HloCostAnalysis``), which decides how the numbers compare with published
"MACs":

* a dot / matmul: 2 FLOPs per multiply-accumulate;
* a convolution: 2 FLOPs per multiply-accumulate **inside the input** — taps that fall on
  zero padding are not counted, so a 3x3 "SAME" conv on an ``n x n`` map counts
  ``((3n - 2) / 3n)**2`` of the full-kernel MACs (0.99 at 64x64, 0.84 at 8x8);
* every elementwise op (bias add, residual add, normalisation, activation, softmax's
  arithmetic): 1 FLOP per output element; ``exp``/``tanh``/``erf``... are counted apart as
  "transcendentals" and not included here.

The cost of token merging is included when ``UNetConfig.tome`` merges (the similarity
matmul, the gathers' arithmetic), and the attention then runs on fewer tokens.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from meg_jax.backbone.config import BackboneConfig, TextEncoderConfig, UNetConfig, VAEConfig
from meg_jax.backbone.layers import plain_kernels
from meg_jax.backbone.text_encoder import TextEncoder
from meg_jax.backbone.unet import UNet, example_inputs
from meg_jax.backbone.vae import AutoencoderKL

__all__ = [
    "xla_flops",
    "unet_flops",
    "vae_decoder_flops",
    "vae_encoder_flops",
    "text_encoder_flops",
    "cost_breakdown",
]

# Prompt length used for the UNet's encoder_hidden_states when only a UNetConfig is given
# (CLIP's 77 tokens, as SD1.x/SDXL pipelines pad prompts to).
DEFAULT_SEQ_LEN = 77


def _abstract(tree: Any) -> Any:
    """Arrays (or ShapeDtypeStructs) -> ShapeDtypeStructs, same tree."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def xla_flops(fn: Callable[..., Any], *args: Any) -> float:
    """FLOPs XLA's cost analysis counts for ``jax.jit(fn)(*args)``.

    Args:
      fn: a jittable function.
      *args: pytrees of ``jax.ShapeDtypeStruct`` (or arrays; only their shapes are used).

    Returns:
      The FLOP count (float; see the module docstring for what is counted).

    Raises:
      RuntimeError: the backend reports no FLOP count.
    """
    with plain_kernels():  # the same graph on every backend (no CPU-only rewrites)
        lowered = jax.jit(fn).lower(*_abstract(args))
    flops = _read_flops(lowered.cost_analysis())
    if flops is None:  # some backends only analyse the compiled executable
        flops = _read_flops(lowered.compile().cost_analysis())
    if flops is None:
        raise RuntimeError(f"XLA's cost analysis on {jax.default_backend()} reports no 'flops'")
    return flops


def _read_flops(cost: Any) -> float | None:
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _hw(latent_hw: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(latent_hw, int):
        latent_hw = (latent_hw, latent_hw)
    hw = tuple(int(v) for v in latent_hw)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"latent_hw must be an int or (height, width) of positive ints, got {latent_hw!r}")
    return hw  # type: ignore[return-value]


def _check_batch(batch: int) -> None:
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")


def _component(config: Any, attr: str, cls: type) -> Any:
    """The ``attr`` part of a BackboneConfig bundle, or ``config`` itself if it is a ``cls``."""
    if isinstance(config, BackboneConfig):
        return getattr(config, attr)
    if isinstance(config, cls):
        return config
    raise ValueError(f"expected a BackboneConfig or a {cls.__name__}, got {type(config).__name__}")


# ---- UNet --------------------------------------------------------------------------------------
def unet_flops(
    config: BackboneConfig | UNetConfig,
    latent_hw: int | tuple[int, int],
    batch: int = 1,
    seq_len: int | None = None,
) -> float:
    """FLOPs of one UNet forward (one denoising step without classifier-free guidance).

    Args:
      config: a ``BackboneConfig`` (``preset(name)``) or its ``UNetConfig``.
      latent_hw: latent height and width (an int for square latents), e.g. 64 for SD1.5 at 512².
      batch: B.
      seq_len: prompt length L of ``encoder_hidden_states``; default the bundle's
        ``text_encoder.max_length``, or 77 for a bare ``UNetConfig``.

    Returns:
      FLOPs (float). Token merging counts as configured by ``UNetConfig.tome``.
    """
    unet = _component(config, "unet", UNetConfig)
    if seq_len is None:
        seq_len = config.text_encoder.max_length if isinstance(config, BackboneConfig) else DEFAULT_SEQ_LEN
    hw = _hw(latent_hw)
    _check_batch(batch)
    f = unet.downsample_factor
    if hw[0] % f or hw[1] % f:
        raise ValueError(f"latent_hw {hw} must be multiples of {f} (2**(num_blocks-1)) for this UNet")
    return _unet_flops(unet, hw, batch, int(seq_len))


@functools.lru_cache(maxsize=64)
def _unet_flops(config: UNetConfig, hw: tuple[int, int], batch: int, seq_len: int) -> float:
    module = UNet(config)
    inputs = _abstract(example_inputs(config, batch=batch, height=hw[0], width=hw[1], seq_len=seq_len))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # "tome" RNG stream (used only if merging is random)
    variables = jax.eval_shape(
        lambda k, kw: module.init({"params": k, "tome": k}, **kw), key, inputs
    )

    def forward(variables: Any, inputs: dict[str, Any], key: jax.Array) -> jax.Array:
        return module.apply(variables, rngs={"tome": key}, **inputs)

    return xla_flops(forward, variables, inputs, key)


# ---- VAE ---------------------------------------------------------------------------------------
def vae_decoder_flops(
    config: BackboneConfig | VAEConfig, latent_hw: int | tuple[int, int], batch: int = 1
) -> float:
    """FLOPs of one VAE decode (``post_quant_conv`` + decoder) of ``[B, h, w, latent_channels]``.

    Args:
      config: a ``BackboneConfig`` or its ``VAEConfig``.
      latent_hw: latent height and width (the image is ``downsample_factor`` times larger).
      batch: B.
    """
    vae = _component(config, "vae", VAEConfig)
    hw = _hw(latent_hw)
    _check_batch(batch)
    return _vae_flops(vae, hw, batch, "decode")


def vae_encoder_flops(
    config: BackboneConfig | VAEConfig, latent_hw: int | tuple[int, int], batch: int = 1
) -> float:
    """FLOPs of one VAE encode (encoder + ``quant_conv``) of images that give ``latent_hw`` latents.

    Args:
      config: a ``BackboneConfig`` or its ``VAEConfig``.
      latent_hw: latent height and width; the image is ``downsample_factor`` times larger
        (e.g. 64 -> 512x512 for the SD VAE), so all counts here share one size argument.
      batch: B.
    """
    vae = _component(config, "vae", VAEConfig)
    hw = _hw(latent_hw)
    _check_batch(batch)
    return _vae_flops(vae, hw, batch, "encode")


@functools.lru_cache(maxsize=64)
def _vae_flops(config: VAEConfig, hw: tuple[int, int], batch: int, method: str) -> float:
    module = AutoencoderKL(config)
    f = config.downsample_factor
    image = jax.ShapeDtypeStruct((batch, hw[0] * f, hw[1] * f, config.in_channels), jnp.float32)
    latent = jax.ShapeDtypeStruct((batch, hw[0], hw[1], config.latent_channels), jnp.float32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    # init traces encode and decode (through __call__) at the smallest image size.
    small = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    variables = jax.eval_shape(module.init, key, small)
    if method == "decode":
        return xla_flops(lambda v, z: module.apply(v, z, method="decode"), variables, latent)
    return xla_flops(lambda v, x: module.apply(v, x, method="encode"), variables, image)


# ---- text encoder ------------------------------------------------------------------------------
def text_encoder_flops(
    config: BackboneConfig | TextEncoderConfig, batch: int = 1, seq_len: int | None = None
) -> float:
    """FLOPs of one text-encoder forward on ``[B, L]`` token ids.

    Args:
      config: a ``BackboneConfig`` or its ``TextEncoderConfig``.
      batch: B.
      seq_len: L; default ``max_length``.
    """
    text = _component(config, "text_encoder", TextEncoderConfig)
    _check_batch(batch)
    seq_len = text.max_length if seq_len is None else int(seq_len)
    if not 1 <= seq_len <= text.max_length:
        raise ValueError(f"seq_len must be in [1, max_length={text.max_length}], got {seq_len}")
    return _text_flops(text, batch, seq_len)


@functools.lru_cache(maxsize=64)
def _text_flops(config: TextEncoderConfig, batch: int, seq_len: int) -> float:
    module = TextEncoder(config)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    variables = jax.eval_shape(module.init, key, tokens)
    return xla_flops(module.apply, variables, tokens)


# ---- all together ------------------------------------------------------------------------------
def cost_breakdown(
    config: BackboneConfig, latent_hw: int | tuple[int, int], batch: int = 1
) -> dict[str, float]:
    """Per-forward FLOPs of every network of the LDM at one latent size.

    Args:
      config: the backbone bundle.
      latent_hw: latent height and width.
      batch: B.

    Returns:
      ``{"text_encoder", "unet", "vae_decoder", "vae_encoder"}`` -> FLOPs of one forward each
      (multiply ``unet`` by the number of steps, and by 2 with classifier-free guidance).
    """
    if not isinstance(config, BackboneConfig):
        raise ValueError(f"cost_breakdown needs a BackboneConfig (preset(name)), got {type(config).__name__}")
    return {
        "text_encoder": text_encoder_flops(config, batch),
        "unet": unet_flops(config, latent_hw, batch),
        "vae_decoder": vae_decoder_flops(config, latent_hw, batch),
        "vae_encoder": vae_encoder_flops(config, latent_hw, batch),
    }
