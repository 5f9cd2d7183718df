"""Building blocks shared by the UNet, the VAE and the text encoder (Flax linen, NHWC).

Each layer computes what the diffusers PyTorch layer of the same name computes, and its
sub-module names are the diffusers state-dict names with ``.i`` folded into ``_i``
(``to_out.0`` -> ``to_out_0``), so checkpoint conversion is a rename plus a transpose
(see ``diffusers_io``). Kernels are initialised like PyTorch's defaults (uniform with
variance 1/(3·fan_in)) so that training from scratch behaves like diffusers'.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen.dtypes import promote_dtype

Dtype = Any

__all__ = [
    "torch_default_init",
    "init_from_shapes",
    "Conv2d",
    "Linear",
    "GroupNorm",
    "LayerNorm",
    "get_timestep_embedding",
    "TimestepEmbedding",
    "ResnetBlock2D",
    "Downsample2D",
    "Upsample2D",
    "multi_head_attention",
    "plain_kernels",
    "Attention",
    "FeedForward",
]

# PyTorch's nn.Linear / nn.Conv2d default: kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def init_from_shapes(shapes: Any, key: jax.Array) -> Any:
    """Draws a params tree for ``shapes`` with the initializers of this module's layers.

    ``kernel`` ~ U(±1/sqrt(fan_in)) (``torch_default_init``; fan_in = all axes but the
    last), ``bias`` = 0, ``scale`` = 1 — the same distributions ``Module.init`` uses, drawn
    in ONE uniform call. Compiling ``Module.init`` of a UNet costs ~30 s of CPU (one
    threefry per parameter, plus the forward pass); this costs one small RNG kernel.

    Args:
      shapes: pytree of arrays / ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape`` of init).
      key: PRNG key.

    Returns:
      A pytree like ``shapes`` with float32 arrays.

    Raises:
      ValueError: a leaf named other than kernel/bias/scale (no rule for it).
    """
    flat = traverse_util.flatten_dict(shapes)
    kernels = [p for p in flat if p[-1] == "kernel"]
    unknown = [p for p in flat if p[-1] not in ("kernel", "bias", "scale")]
    if unknown:
        raise ValueError(f"no initializer rule for {['/'.join(map(str, p)) for p in unknown]}")
    sizes = [int(np.prod(flat[p].shape)) for p in kernels]
    u = np.asarray(jax.random.uniform(key, (max(sum(sizes), 1),), jnp.float32, -1.0, 1.0))
    out, offset = {}, 0
    for p, size in zip(kernels, sizes):
        shape = tuple(flat[p].shape)
        bound = 1.0 / math.sqrt(int(np.prod(shape[:-1])))
        out[p] = jnp.asarray((u[offset : offset + size] * bound).reshape(shape))
        offset += size
    for p, leaf in flat.items():
        if p[-1] == "bias":
            out[p] = jnp.zeros(leaf.shape, jnp.float32)
        elif p[-1] == "scale":
            out[p] = jnp.ones(leaf.shape, jnp.float32)
    return traverse_util.unflatten_dict(out)


def Conv2d(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | tuple[tuple[int, int], tuple[int, int]] | str | None = None,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Module:
    """An NHWC conv with PyTorch's symmetric padding (default ``(k - 1) // 2``).

    Parameters ``kernel`` [k, k, Cin, features] and ``bias`` as ``flax.linen.Conv``'s.
    """
    if padding is None:
        padding = (kernel_size - 1) // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return _Conv2d(features, kernel_size, stride, padding, use_bias, dtype, name=name)


# CPU backend: a conv producing at most MATMUL_CONV_MAX_PIXELS output pixels (batch included)
# from at least MATMUL_CONV_MIN_CHANNELS input channels runs as one matmul over its im2col
# patches (see _Conv2d).
MATMUL_CONV_MAX_PIXELS = 512
MATMUL_CONV_MIN_CHANNELS = 512
# CPU backend, other convs: more than CONV_SPLIT_ABOVE input channels are convolved in chunks of
# at most CONV_SPLIT_CHANNELS, the partial outputs summed (see _Conv2d).
CONV_SPLIT_ABOVE = 512
CONV_SPLIT_CHANNELS = 320
# CPU backend, float32: a k > 1 conv with at least EIGEN_CONV_MIN_CHANNELS input and output
# channels is written in a form XLA:CPU's YNNPACK fusion declines (stride 1: one output row more
# than the input has; stride > 1: a dilated input), so that XLA's Eigen conv runs it (see _Conv2d).
EIGEN_CONV_MIN_CHANNELS = 256
_cpu_rewrites = [True]


@contextlib.contextmanager
def plain_kernels() -> Iterator[None]:
    """Within this context, models trace without this module's CPU-only rewrites.

    Those rewrites (tiled attention, convs as matmuls) compute the same values up to float
    rounding, faster on XLA:CPU; ``flops`` counts FLOPs on the plain graph so that its numbers
    do not depend on the backend (padding taps of an im2col matmul would count; a
    ``lax.map``'s body would count once).
    """
    _cpu_rewrites.append(False)
    try:
        yield
    finally:
        _cpu_rewrites.pop()


def _on_cpu() -> bool:
    """Whether the CPU-only rewrites apply to what is being traced now."""
    return _cpu_rewrites[-1] and jax.default_backend() == "cpu"


def _conv(x: jax.Array, kernel: jax.Array, stride: int, pad: Any, dilation: int = 1) -> jax.Array:
    """NHWC x HWIO conv; ``dilation`` dilates both the input and the kernel by that factor."""
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad, lhs_dilation=(dilation, dilation),
                                        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))


class _Conv2d(nn.Module):
    """``flax.linen.Conv`` (NHWC, HWIO kernel, square kernel and stride), same parameters.

    On the CPU backend two forms XLA:CPU runs slowly are computed as matmuls instead (the
    same sums of products, in another order: equal up to float rounding):
    a 1x1 stride-1 unpadded conv is ``x @ kernel`` (1.2-3x faster than XLA's conv), and a conv
    with at most ``MATMUL_CONV_MAX_PIXELS`` output pixels from at least
    ``MATMUL_CONV_MIN_CHANNELS`` input channels is one matmul of its im2col patches
    ``[B*Ho*Wo, k*k*Cin]`` with the kernel ``[k*k*Cin, features]``: at SD-1.5's 16x16 and 8x8
    levels (1280-2560 channels) that is ~2x faster than XLA:CPU's conv, which is tuned for
    large maps (``eval/bench_blocks.py``); the patches there are at most a few tens of MB.
    With few channels (tiny models) the patch copy costs more than it saves (16x16x64,
    batch 2: 218 us as a conv, 327 us as a matmul), so those stay convs. On larger maps a conv
    with more than ``CONV_SPLIT_ABOVE`` input channels (SD-1.5's up blocks, whose input
    concatenates a skip: 640-1920 channels) is the sum of convs over chunks of at most
    ``CONV_SPLIT_CHANNELS`` input channels: XLA:CPU's conv is faster on those (64x64,
    960 -> 320: 176 ms whole, 139 ms in three chunks; PyTorch 126 ms).

    Before both of those, a float32 ``k > 1`` conv with at least ``EIGEN_CONV_MIN_CHANNELS``
    input and output channels (every 3x3 conv of SD-1.5's UNet but ``conv_in``/``conv_out``)
    is written in a form XLA:CPU's YNNPACK fusion declines, so that XLA's Eigen conv runs
    it, which is faster on one core. Stride 1: padded one row further at the bottom, so
    that it computes one output row more than its input has (YNNPACK declines taller
    outputs); that row is dropped. Against XLA's YNNPACK conv: 64x64 320 -> 320 1.16x as
    fast, 32x32 1280 -> 640 1.53x, 16x16 1280 -> 1280 2.1x, 8x8 1280 -> 1280 3.7x (and
    1.2-1.6x the im2col matmul above); the extra row costs 1/H more FLOPs. Stride s > 1:
    the input dilated by s (zeros between pixels; YNNPACK declines input dilation), kernel
    taps s apart and windows s*s apart, padding times s -- the same taps of the same pixels
    (SD-1.5's downsamplers: 64x64x320 1.3x, 32x32x640 1.4x the im2col matmul, 16x16x1280
    2.3x). The values are the same sums of products (equal up to float rounding); if a
    later XLA stopped declining these forms, they would run as YNNPACK convs again. With few
    channels (SD's ``conv_out``, 320 -> 4: 2.2 ms YNNPACK, 5.0 ms Eigen) or in bfloat16
    (YNNPACK takes no bf16 convs) a conv keeps its plain form.
    """

    features: int
    kernel_size: int
    stride: int
    padding: tuple[tuple[int, int], tuple[int, int]] | str
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, Cin] -> [B, Ho, Wo, features]."""
        k, s = self.kernel_size, self.stride
        kernel = self.param("kernel", torch_default_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        pad = ((0, 0), (0, 0)) if self.padding == "VALID" else self.padding
        if isinstance(pad, str):
            raise ValueError(f"Conv2d padding must be an int, pairs or 'VALID', got {pad!r}")
        b, h, w, c = x.shape
        ho = (h + pad[0][0] + pad[0][1] - k) // s + 1
        wo = (w + pad[1][0] + pad[1][1] - k) // s + 1
        if _on_cpu() and k == 1 and s == 1 and pad == ((0, 0), (0, 0)):
            y = jnp.dot(x.reshape(-1, c), kernel.reshape(c, -1)).reshape(b, h, w, -1)
        elif _on_cpu() and k > 1 and x.dtype == jnp.float32 and min(c, self.features) >= EIGEN_CONV_MIN_CHANNELS:
            if s == 1:
                extra = max(h + 1 - ho, 0)  # output rows then h + 1 > h: YNNPACK declines, Eigen runs it
                y = _conv(x, kernel, s, ((pad[0][0], pad[0][1] + extra), pad[1]))[:, :ho]
            else:  # input dilated by s (YNNPACK declines), taps s apart, windows s*s apart: the same taps
                y = _conv(x, kernel, s * s, [(s * lo, s * hi) for lo, hi in pad], dilation=s)
        elif _on_cpu() and b * ho * wo <= MATMUL_CONV_MAX_PIXELS and c >= MATMUL_CONV_MIN_CHANNELS:
            xp = jnp.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
            patches = [
                jax.lax.slice(xp, (0, i, j, 0), (b, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c), (1, s, s, 1))
                for i in range(k)
                for j in range(k)
            ]  # tap (i, j) -> columns [(i*k + j)*Cin, ...): the order of kernel.reshape below
            cols = jnp.concatenate(patches, axis=-1).reshape(b * ho * wo, k * k * c)
            y = jnp.dot(cols, kernel.reshape(k * k * c, -1)).reshape(b, ho, wo, -1)
        elif _on_cpu() and c > CONV_SPLIT_ABOVE:
            n = -(-c // CONV_SPLIT_CHANNELS)
            size = -(-c // n)
            y = sum(_conv(x[..., i : i + size], kernel[:, :, i : i + size], s, pad) for i in range(0, c, size))
        else:
            y = _conv(x, kernel, s, pad)
        if bias is not None:
            y = y + bias
        return y


def Linear(features: int, *, use_bias: bool = True, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=torch_default_init, name=name)


class _GroupNorm(nn.Module):
    """GroupNorm over the last (channel) axis with ``flax.linen.GroupNorm``'s parameters.

    Same maths as ``nn.GroupNorm(use_fast_variance=False)`` (two-pass variance, float32
    statistics), but each statistic is a sum over the spatial axis (a reduction XLA:CPU does
    well) followed by a tiny one-hot ``[B, C] @ [C, G]`` matmul over the channels of a group,
    instead of one reduction over the strided ``(H, W, C/G)`` axes of a ``[B, H, W, G, C/G]``
    view. ``eval/bench_backbone.py`` measured the strided reduction among the slowest ops of
    the UNet on CPU.
    """

    num_groups: int
    epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible by num_groups={self.num_groups}")
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        b = x.shape[0]
        xf = x.reshape(b, -1, c).astype(jnp.float32)  # [B, N, C]
        size = c // self.num_groups
        count = xf.shape[1] * size
        onehot = (np.arange(c)[:, None] // size == np.arange(self.num_groups)[None, :]).astype(np.float32)
        hi = jax.lax.Precision.HIGHEST
        mean = jnp.dot(xf.sum(1), onehot, precision=hi) / count  # [B, G]
        centred = xf - jnp.dot(mean, onehot.T, precision=hi)[:, None, :]
        var = jnp.dot(jnp.square(centred).sum(1), onehot, precision=hi) / count  # [B, G]
        inv = jnp.dot(jax.lax.rsqrt(var + self.epsilon), onehot.T, precision=hi)[:, None, :]  # [B, 1, C]
        out = centred * inv * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return out.reshape(x.shape).astype(self.dtype)


def GroupNorm(num_groups: int, eps: float, *, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Module:
    """GroupNorm over the last (channel) axis; statistics in float32, two-pass variance.

    Parameters ``scale`` and ``bias`` as ``flax.linen.GroupNorm`` (and diffusers' ``weight`` /
    ``bias`` after conversion).
    """
    return _GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, name=name)


def LayerNorm(eps: float, *, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def get_timestep_embedding(
    timesteps: jax.Array,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> jax.Array:
    """Sinusoidal timestep embedding, as diffusers' ``get_timestep_embedding`` (DDPM).

    Args:
      timesteps: [N] (fractional allowed).
      embedding_dim: output width D.
      flip_sin_to_cos: output ``[cos, sin]`` instead of ``[sin, cos]``.
      downscale_freq_shift: frequencies are ``exp(-log(max_period) * i / (D/2 - shift))``.
      scale: multiplies the phase.
      max_period: lowest frequency is ``1 / max_period``.

    Returns:
      [N, D] float32.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D [N], got shape {timesteps.shape}")
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` on a sinusoidal embedding (diffusers ``TimestepEmbedding``).

    With ``cond_proj_dim`` set, ``sample + cond_proj(condition)`` (no bias) is embedded
    instead of ``sample``; ``condition=None`` then means no conditioning (diffusers skips the
    projection), which equals passing zeros.
    """

    time_embed_dim: int
    cond_proj_dim: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        """sample [B, Din], condition [B, cond_proj_dim] -> [B, time_embed_dim]."""
        if self.cond_proj_dim is not None:
            proj = Linear(sample.shape[-1], use_bias=False, dtype=self.dtype, name="cond_proj")
            if condition is not None:
                sample = sample + proj(condition)
            elif self.is_initializing():
                proj(jnp.zeros(sample.shape[:-1] + (self.cond_proj_dim,), sample.dtype))  # create params
        elif condition is not None:
            raise ValueError(
                "timestep_cond was given but the config has time_cond_proj_dim=None; set "
                "UNetConfig.time_cond_proj_dim or drop timestep_cond"
            )
        sample = Linear(self.time_embed_dim, dtype=self.dtype, name="linear_1")(sample)
        sample = nn.silu(sample)
        return Linear(self.time_embed_dim, dtype=self.dtype, name="linear_2")(sample)


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block (diffusers ``ResnetBlock2D``, time_embedding_norm="default").

    ``x + conv2(drop(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb))))))``, with a 1x1
    ``conv_shortcut`` on x when the channel count changes; divided by ``output_scale_factor``.
    """

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x [B, H, W, Cin], temb [B, T] or None -> [B, H, W, out_channels]."""
        h = GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm1")(x)
        h = nn.silu(h)
        h = Conv2d(self.out_channels, 3, dtype=self.dtype, name="conv1")(h)
        if temb is not None:
            t = Linear(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm2")(h)
        h = nn.silu(h)
        h = Conv2d(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv2d(self.out_channels, 1, dtype=self.dtype, name="conv_shortcut")(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (diffusers ``Downsample2D``, use_conv=True).

    ``padding > 0`` pads symmetrically (UNet: 1); ``padding == 0`` pads one row/column at the
    bottom/right and convolves VALID (VAE).
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H/2, W/2, out_channels]."""
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            pad: Any = "VALID"
        else:
            pad = self.padding
        return Conv2d(self.out_channels, 3, stride=2, padding=pad, dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv (diffusers ``Upsample2D``, use_conv=True)."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, 2H, 2W, out_channels]."""
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return Conv2d(self.out_channels, 3, dtype=self.dtype, name="conv")(x)


def multi_head_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    num_heads: int,
    mask: jax.Array | None = None,
    implementation: str = "reference",
) -> jax.Array:
    """Scaled dot-product attention; logits and softmax in float32.

    Args:
      q: [B, Nq, C] queries (already projected).
      k: [B, Nk, C] keys.
      v: [B, Nk, Cv] values.
      num_heads: H; C and Cv must be divisible by H.
      mask: optional boolean, True = attend; broadcastable to [B, H, Nq, Nk].
      implementation: "reference" (the matmul-softmax-matmul below, parity-tested against
        diffusers; on the CPU backend, without a mask and with more than ``CPU_TILE_ABOVE``
        bytes of logits, computed tile by tile in cache: ``_tiled_attention``); "chunked": the same per query row, computed ``QUERY_CHUNK`` queries at a
        time under ``jax.checkpoint`` (Rabe & Staats 2021), so the ``[B, H, Nq, Nk]`` logits
        never exist whole, forward or backward: memory-efficient attention on any backend;
        or ``jax.nn.dot_product_attention`` with "xla" (any backend) or "cudnn" (cuDNN's
        fused flash attention, NVIDIA GPUs only; needs Cv == C).

    Returns:
      [B, Nq, Cv] in q's dtype.
    """
    b, nq, c = q.shape
    nk = k.shape[1]
    d = c // num_heads
    if implementation in ("xla", "cudnn"):
        if v.shape[-1] != c:
            raise ValueError(f"attention implementation {implementation!r} needs values as wide as "
                             f"queries ({v.shape[-1]} != {c}); use implementation='reference'")
        out = jax.nn.dot_product_attention(
            q.reshape(b, nq, num_heads, d), k.reshape(b, nk, num_heads, d), v.reshape(b, nk, num_heads, d),
            mask=mask, implementation=implementation,
        )  # [B, Nq, H, d]; logits and softmax in float32 for bf16 inputs too
        return out.reshape(b, nq, c)
    if implementation not in ("reference", "chunked"):
        raise ValueError(
            f"attention implementation must be 'reference', 'chunked', 'xla' or 'cudnn', got {implementation!r}"
        )
    # Heads before tokens ([B, H, N, d]) so both products are plain batched matmuls: on
    # XLA:CPU the "bqhd,bkhd" einsum form was fused with the softmax into one kernel several
    # times slower (eval/bench_backbone.py). q is pre-scaled by 1/sqrt(d) (same maths).
    qh = (q * (1.0 / math.sqrt(d))).reshape(b, nq, num_heads, d).transpose(0, 2, 1, 3)  # [B, H, Nq, d]
    kh = k.reshape(b, nk, num_heads, d).transpose(0, 2, 3, 1)  # [B, H, d, Nk]
    vh = v.reshape(b, nk, num_heads, v.shape[-1] // num_heads).transpose(0, 2, 1, 3)  # [B, H, Nk, dv]

    def attend(qc: jax.Array, m: jax.Array | None) -> jax.Array:
        logits = jnp.matmul(qc, kh, preferred_element_type=jnp.float32)  # [B, H, nq, Nk]
        if m is not None:
            logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.matmul(weights, vh)  # [B, H, nq, dv]

    if implementation == "reference" and mask is None and _tile_on_cpu(b * num_heads * nq * nk):
        return _tiled_attention(qh, kh, vh).transpose(0, 2, 1, 3).reshape(b, nq, -1)
    chunk = _query_chunk(nq)
    if implementation == "reference" or chunk == nq:
        out = attend(qh, mask)
    else:
        n = nq // chunk
        qs = qh.reshape(b, num_heads, n, chunk, d).transpose(2, 0, 1, 3, 4)  # [n, B, H, chunk, d]
        if mask is not None:
            m = jnp.broadcast_to(mask, (b, num_heads, nq, nk)).reshape(b, num_heads, n, chunk, nk)
            xs: Any = (qs, m.transpose(2, 0, 1, 3, 4))
        else:
            xs = (qs, None)
        outs = jax.lax.map(jax.checkpoint(lambda a: attend(*a), prevent_cse=False), xs)  # [n, B, H, chunk, dv]
        out = outs.transpose(1, 2, 0, 3, 4).reshape(b, num_heads, nq, -1)
    return out.transpose(0, 2, 1, 3).reshape(b, nq, -1)


QUERY_CHUNK = 512  # queries per step of the "chunked" attention (logits [B, H, 512, Nk])
# "reference" attention on the CPU backend: logits of more than CPU_TILE_ABOVE bytes in all are
# computed one (batch, head) and at most CPU_TILE_BYTES of logits at a time (see _tiled_attention).
CPU_TILE_ABOVE = 8 << 20
CPU_TILE_BYTES = 8 << 20


def _tile_on_cpu(num_logits: int) -> bool:
    """Whether "reference" attention with ``num_logits`` float32 logits runs tiled (CPU backend only)."""
    return 4 * num_logits > CPU_TILE_ABOVE and _on_cpu()


def _tiled_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array) -> jax.Array:
    """Softmax attention one (batch, head) and one block of queries at a time.

    The reference's per-query-row maths (float32 logits, max-subtracted exponentials), with
    the division by the row sum applied after the second matmul instead of before it (one
    pass fewer over the logits; equal up to float rounding). On XLA:CPU the untiled form
    writes the whole ``[B, H, Nq, Nk]`` float32 logits (512 MB for SD-1.5's 4096-token
    self-attention) to memory and reads them back for each softmax pass and the second
    matmul: memory-bound, 3-4x slower than PyTorch's fused SDPA kernel
    (``eval/bench_blocks.py``). Here each step's logits (at most ``CPU_TILE_BYTES``) stay in
    cache. The outer loop runs over (batch, head) so that a step's keys and values are that
    head's contiguous ``[d, Nk]`` / ``[Nk, dv]`` slices, sliced once per head.

    Two more passes over the logits are saved (SD-1.5's 4096-token self-attention, head
    width 40, one core: 0.80x -> 0.84x PyTorch's SDPA): the exponentials are taken as
    ``exp2(x * log2(e))`` (the same values; XLA:CPU computes exp2 in its own loop fusion
    rather than in the YNNPACK fusion of the first matmul, and faster), and when
    ``dv`` is not a multiple of 16 (the float32 vector width of AVX-512) the values get a
    column of ones and zero columns up to the next multiple, so that the second matmul
    yields each row's sum of exponentials in the otherwise wasted vector lanes instead of a
    separate reduction over the logits.

    Args:
      qh: [B, H, Nq, d] queries, pre-scaled.
      kh: [B, H, d, Nk] keys, transposed.
      vh: [B, H, Nk, dv] values.

    Returns:
      [B, H, Nq, dv] in vh's dtype.
    """
    b, h, nq, d = qh.shape
    nk, dv = vh.shape[-2:]
    n = -(-nq * nk * 4 // CPU_TILE_BYTES)  # query blocks per head
    chunk = -(-nq // n)
    n = -(-nq // chunk)
    q = qh.reshape(b * h, nq, d)
    if n * chunk != nq:  # pad the queries to whole blocks; padded rows are dropped below
        q = jnp.pad(q, ((0, 0), (0, n * chunk - nq), (0, 0)))
    q = q.reshape(b * h, n, chunk, d)
    v = vh.reshape(b * h, nk, dv)
    sum_column = dv % 16 != 0
    if sum_column:  # [values, 1, 0...]: width the next multiple of 16
        width = -(-(dv + 1) // 16) * 16
        v = jnp.concatenate([v, jnp.ones((b * h, nk, 1), v.dtype), jnp.zeros((b * h, nk, width - dv - 1), v.dtype)], -1)

    def per_head(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        qi, ki, vi = args  # [n, chunk, d], [d, Nk], [Nk, dv (+ sum and pad columns)]

        def block(qc: jax.Array) -> jax.Array:
            logits = jnp.matmul(qc, ki, preferred_element_type=jnp.float32)  # [chunk, Nk]
            e = jnp.exp2((logits - logits.max(-1, keepdims=True)) * math.log2(math.e))  # exp(x) = exp2(x log2 e)
            out = jnp.matmul(e.astype(vi.dtype), vi, preferred_element_type=jnp.float32)  # [chunk, width]
            total = out[:, dv : dv + 1] if sum_column else e.sum(-1, keepdims=True)
            return (out[:, :dv] / total).astype(vi.dtype)

        return jax.lax.map(block, qi)  # [n, chunk, dv]

    out = jax.lax.map(per_head, (q, kh.reshape(b * h, d, nk), v))
    return out.reshape(b * h, n * chunk, dv)[:, :nq].reshape(b, h, nq, dv)


def _query_chunk(nq: int) -> int:
    """The largest divisor of ``nq`` that is at most ``QUERY_CHUNK``."""
    if nq <= QUERY_CHUNK:
        return nq
    return max(c for c in range(1, QUERY_CHUNK + 1) if nq % c == 0)


class Attention(nn.Module):
    """diffusers ``Attention`` as SD uses it: to_q/to_k/to_v, heads, to_out.0 (with bias).

    ``qkv_bias`` is False in the UNet's transformer blocks, True in the VAE's mid block.
    """

    num_heads: int
    qkv_bias: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "reference"  # multi_head_attention's implementation

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        """x [B, N, C]; context [B, L, Dc] (None: self-attention) -> [B, N, C]."""
        inner = x.shape[-1]
        context = x if context is None else context
        q = Linear(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)
        k = Linear(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(context)
        v = Linear(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(context)
        out = multi_head_attention(q, k, v, self.num_heads, mask, self.attention)
        return Linear(inner, dtype=self.dtype, name="to_out_0")(out)


class _GEGLU(nn.Module):
    """``h * gelu(gate)`` with ``[h, gate] = proj(x)`` (exact erf GELU, as torch's default)."""

    inner_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Linear(2 * self.inner_dim, dtype=self.dtype, name="proj")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net.0`` (GEGLU, C -> 2·mult·C), ``net.2`` (mult·C -> C)."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., C] -> [..., C]."""
        dim = x.shape[-1]
        h = _GEGLU(self.mult * dim, dtype=self.dtype, name="net_0")(x)
        return Linear(dim, dtype=self.dtype, name="net_2")(h)
