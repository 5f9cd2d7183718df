"""The image autoencoder of the LDM: diffusers' ``AutoencoderKL`` in Flax linen, NHWC.

``encode(x) -> (mean, logvar)`` of the diagonal Gaussian posterior (after ``quant_conv``;
logvar clipped to [-30, 20] as diffusers does); ``decode(z) -> x`` (``post_quant_conv``
first). In MEG the edge server holds the encoder side and the user's device runs
``decode``. Parameter names follow the diffusers state dict (see ``diffusers_io``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from meg_jax.backbone.config import VAEConfig
from meg_jax.backbone.layers import (
    Conv2d,
    Downsample2D,
    GroupNorm,
    Linear,
    ResnetBlock2D,
    Upsample2D,
    init_from_shapes,
    multi_head_attention,
)

Dtype = Any

__all__ = ["AutoencoderKL", "Encoder", "Decoder", "example_image", "init_vae"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class _MidAttention(nn.Module):
    """Single-head spatial self-attention with GroupNorm and residual (VAE mid block)."""

    groups: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        t = GroupNorm(self.groups, self.eps, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, c)
        q = Linear(c, dtype=self.dtype, name="to_q")(t)
        k = Linear(c, dtype=self.dtype, name="to_k")(t)
        v = Linear(c, dtype=self.dtype, name="to_v")(t)
        # diffusers: heads = channels // attention_head_dim with attention_head_dim = channels.
        out = Linear(c, dtype=self.dtype, name="to_out_0")(multi_head_attention(q, k, v, 1))
        return out.reshape(b, h, w, c) + x


class _VAEMidBlock(nn.Module):
    """``UNetMidBlock2D`` without time embedding: resnet, (attention), resnet."""

    groups: int
    eps: float
    add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, self.eps, dtype=self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = _MidAttention(self.groups, self.eps, dtype=self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, self.eps, dtype=self.dtype, name="resnets_1")(x)


class _DownEncoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    add_downsample: bool
    groups: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            # diffusers' Encoder uses downsample_padding=0: pad bottom/right, VALID conv.
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class _UpDecoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    add_upsample: bool
    groups: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels] (before quant_conv)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        ch = cfg.block_out_channels
        x = Conv2d(ch[0], 3, dtype=self.dtype, name="conv_in")(x)
        for i in range(len(ch)):
            x = _DownEncoderBlock(
                ch[i], cfg.layers_per_block, i < len(ch) - 1, g, eps, dtype=self.dtype, name=f"down_blocks_{i}"
            )(x)
        x = _VAEMidBlock(g, eps, cfg.mid_block_add_attention, dtype=self.dtype, name="mid_block")(x)
        x = nn.silu(GroupNorm(g, eps, dtype=self.dtype, name="conv_norm_out")(x))
        return Conv2d(2 * cfg.latent_channels, 3, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """Latent [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels] (after post_quant_conv)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        rev = tuple(reversed(cfg.block_out_channels))
        x = Conv2d(rev[0], 3, dtype=self.dtype, name="conv_in")(z)
        x = _VAEMidBlock(g, eps, cfg.mid_block_add_attention, dtype=self.dtype, name="mid_block")(x)
        for i in range(len(rev)):
            x = _UpDecoderBlock(
                rev[i], cfg.layers_per_block + 1, i < len(rev) - 1, g, eps, dtype=self.dtype, name=f"up_blocks_{i}"
            )(x)
        x = nn.silu(GroupNorm(g, eps, dtype=self.dtype, name="conv_norm_out")(x))
        return Conv2d(cfg.out_channels, 3, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL``, NHWC. Use ``apply(variables, x, method="encode")`` etc.

    Attributes:
      config: the architecture.
      dtype: computation dtype (parameters float32).
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = Conv2d(2 * cfg.latent_channels, 1, dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv2d(cfg.latent_channels, 1, dtype=self.dtype)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior of images ``x`` [B, H, W, in_channels] (values in [-1, 1]).

        Returns:
          ``(mean, logvar)``, each [B, H/f, W/f, latent_channels], f = ``config.downsample_factor``;
          logvar clipped to [-30, 20].
        """
        cfg = self.config
        f = cfg.downsample_factor
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"encode expects NHWC images [B, H, W, {cfg.in_channels}] with H, W multiples of {f}; got {x.shape}"
            )
        moments = self.encoder(x.astype(self.dtype))
        if cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images [B, h*f, w*f, out_channels] from latents ``z`` [B, h, w, latent_channels] (unscaled)."""
        cfg = self.config
        if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
            raise ValueError(f"decode expects NHWC latents [B, h, w, {cfg.latent_channels}], got {z.shape}")
        z = z.astype(self.dtype)
        if cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Reconstruction through the posterior: mean if ``key`` is None, else a sample.

        Returns:
          ``(reconstruction, mean, logvar)``.
        """
        mean, logvar = self.encode(x)
        z = mean
        if key is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.decode(z), mean, logvar


def example_image(config: VAEConfig, batch: int = 1, size: int | None = None, dtype: Dtype = jnp.float32) -> jax.Array:
    """Zero images [B, size, size, in_channels]; default size is the smallest valid one."""
    size = size or config.downsample_factor
    return jnp.zeros((batch, size, size, config.in_channels), dtype)


def init_vae(config: VAEConfig, key: jax.Array) -> dict[str, Any]:
    """Randomly initialised VAE variables ``{"params": ...}``.

    Same distributions as ``AutoencoderKL(config).init`` (see ``layers.init_from_shapes``)
    without compiling one initializer per parameter; values differ from ``init``'s.
    """
    shapes = jax.eval_shape(lambda: AutoencoderKL(config).init(jax.random.key(0), example_image(config)))
    return {"params": init_from_shapes(shapes["params"], key)}
