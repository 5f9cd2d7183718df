"""The denoising UNet of the LDM: diffusers' ``UNet2DConditionModel`` in Flax linen, NHWC.

Supports the blocks SD1.x and SDXL use (``CrossAttnDownBlock2D``, ``DownBlock2D``,
``UNetMidBlock2DCrossAttn``, ``CrossAttnUpBlock2D``, ``UpBlock2D``), SDXL's ``text_time``
added conditioning, and ``time_cond_proj_dim`` (an extra vector added to the sinusoidal
timestep embedding; the step-conditioned student uses it). Parameter names follow the
diffusers state dict (``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q`` ->
``down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q``), so ``diffusers_io``
converts checkpoints both ways, and the forward pass matches diffusers' to float32 rounding.

Optional token merging (ToMe for SD) runs inside the self-attention of the transformer
blocks when ``UNetConfig.tome`` has ``ratio > 0``; with ``use_rand`` the module needs a
``"tome"`` RNG stream (``apply(..., rngs={"tome": key})``).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from meg_jax.backbone.config import UNetConfig
from meg_jax.backbone.layers import (
    Attention,
    Conv2d,
    Downsample2D,
    FeedForward,
    GroupNorm,
    LayerNorm,
    Linear,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    get_timestep_embedding,
    init_from_shapes,
)

Dtype = Any

__all__ = ["UNet", "BasicTransformerBlock", "Transformer2DModel", "example_inputs", "init_unet"]


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward; each pre-LayerNorm and residual.

    ``tome`` (a ``ToMeConfig`` or None) merges tokens around ``attn1`` only, as ToMe for SD:
    ``attn1_out = unmerge(attn1(merge(norm1(x))))`` with the plan computed from ``x``.
    """

    num_heads: int
    norm_eps: float = 1e-5
    tome: Any = None
    dtype: Dtype = jnp.float32
    attention: str = "reference"  # layers.multi_head_attention implementation

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, height: int, width: int, latent_tokens: int
    ) -> jax.Array:
        """x [B, N = height*width, C], context [B, L, D] -> [B, N, C]."""
        norm1 = LayerNorm(self.norm_eps, dtype=self.dtype, name="norm1")
        attn1 = Attention(self.num_heads, dtype=self.dtype, attention=self.attention, name="attn1")
        merge_plan = self._merge_plan(x, height, width, latent_tokens)
        if merge_plan is None:
            x = attn1(norm1(x)) + x
        else:
            from meg_jax.backbone import tome as tome_lib  # only needed when merging

            x = tome_lib.unmerge(attn1(tome_lib.merge(norm1(x), merge_plan)), merge_plan) + x
        x = Attention(self.num_heads, dtype=self.dtype, attention=self.attention, name="attn2")(
            LayerNorm(self.norm_eps, dtype=self.dtype, name="norm2")(x), context
        ) + x
        x = FeedForward(dtype=self.dtype, name="ff")(LayerNorm(self.norm_eps, dtype=self.dtype, name="norm3")(x)) + x
        return x

    def _merge_plan(self, x: jax.Array, height: int, width: int, latent_tokens: int) -> Any:
        """ToMe plan for this block, or None when merging is off here (static decision)."""
        cfg = self.tome
        n = x.shape[1]
        # ToMe for SD: merge only at resolutions at most max_downsample below the latent's.
        if cfg is None or not cfg.applies(n, latent_tokens):
            return None
        from meg_jax.backbone import tome as tome_lib

        r = tome_lib.num_merged(n, cfg.ratio, cfg.sx, cfg.sy, height, width)
        if r <= 0:
            return None
        key = self.make_rng("tome") if cfg.use_rand else None
        return tome_lib.compute_merge(x, height, width, r, cfg.sx, cfg.sy, key=key)


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` on continuous input: GroupNorm, proj_in, blocks, proj_out, residual."""

    num_heads: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    tome: Any = None
    dtype: Dtype = jnp.float32
    attention: str = "reference"
    remat: str = "none"  # jax.checkpoint_policies name for each resnet / transformer layer

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, latent_tokens: int) -> jax.Array:
        """x [B, H, W, C], context [B, L, D] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        residual = x
        x = GroupNorm(self.norm_num_groups, 1e-6, dtype=self.dtype, name="norm")(x)  # eps fixed in diffusers
        if self.use_linear_projection:
            x = Linear(c, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = Conv2d(c, 1, dtype=self.dtype, name="proj_in")(x).reshape(b, h * w, c)
        for k in range(self.num_layers):
            x = _remat(BasicTransformerBlock, self.remat, (3, 4, 5))(
                self.num_heads, tome=self.tome, dtype=self.dtype, attention=self.attention,
                name=f"transformer_blocks_{k}",
            )(x, context, h, w, latent_tokens)
        if self.use_linear_projection:
            x = Linear(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = Conv2d(c, 1, dtype=self.dtype, name="proj_out")(x.reshape(b, h, w, c))
        return x + residual


def _remat(cls: type, policy_name: str, static_argnums: tuple[int, ...] = ()) -> type:
    """``cls`` wrapped in ``nn.remat`` with ``jax.checkpoint_policies.<policy_name>`` ("none": as is).

    ``static_argnums`` count ``self`` (flax's convention): the Python ints of ``__call__``.
    """
    if policy_name == "none":
        return cls
    policy = getattr(jax.checkpoint_policies, policy_name, None)
    if policy is None or policy_name.startswith("_"):
        raise ValueError(f"UNet.remat={policy_name!r} is not a jax.checkpoint_policies name "
                         "(e.g. 'nothing_saveable', 'dots_saveable') or 'none'")
    return nn.remat(cls, policy=policy, static_argnums=static_argnums)


def _resnet_and_attention(
    block: "_DownBlock | _UpBlock", j: int, x: jax.Array, temb: jax.Array, context: jax.Array, latent_tokens: int
) -> jax.Array:
    """Layer ``j`` of a down/up block: ``resnets_j`` then, with attention, ``attentions_j``.

    Called from the block's compact ``__call__``, so the submodules belong to ``block``.
    """
    cfg = block.config
    resnet = _remat(ResnetBlock2D, block.remat)
    x = resnet(block.out_channels, cfg.norm_num_groups, cfg.norm_eps, dtype=block.dtype, name=f"resnets_{j}")(
        x, temb
    )
    if block.with_attention:
        x = Transformer2DModel(
            block.num_heads,
            block.transformer_layers,
            cfg.norm_num_groups,
            cfg.use_linear_projection,
            tome=cfg.tome,
            dtype=block.dtype,
            attention=block.attention,
            remat=block.remat,
            name=f"attentions_{j}",
        )(x, context, latent_tokens)
    return x


class _DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (with_attention) or ``DownBlock2D``."""

    out_channels: int
    num_layers: int
    with_attention: bool
    add_downsample: bool
    config: UNetConfig
    num_heads: int
    transformer_layers: int
    dtype: Dtype = jnp.float32
    attention: str = "reference"
    remat: str = "none"  # jax.checkpoint_policies name for each resnet / transformer layer

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array, latent_tokens: int
    ) -> tuple[jax.Array, list[jax.Array]]:
        cfg = self.config
        skips = []
        for j in range(self.num_layers):
            x = _resnet_and_attention(self, j, x, temb, context, latent_tokens)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, cfg.downsample_padding, dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class _UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` (with_attention) or ``UpBlock2D``: each resnet eats one skip."""

    out_channels: int
    num_layers: int
    with_attention: bool
    add_upsample: bool
    config: UNetConfig
    num_heads: int
    transformer_layers: int
    dtype: Dtype = jnp.float32
    attention: str = "reference"
    remat: str = "none"  # jax.checkpoint_policies name for each resnet / transformer layer

    @nn.compact
    def __call__(
        self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array, context: jax.Array, latent_tokens: int
    ) -> jax.Array:
        """skips: this block's ``num_layers`` skip tensors in the order the down path made them."""
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = _resnet_and_attention(self, j, x, temb, context, latent_tokens)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class _MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    config: UNetConfig
    dtype: Dtype = jnp.float32
    attention: str = "reference"
    remat: str = "none"  # jax.checkpoint_policies name for each resnet / transformer layer

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, latent_tokens: int) -> jax.Array:
        cfg = self.config
        c = x.shape[-1]
        resnet = _remat(ResnetBlock2D, self.remat)
        x = resnet(c, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor, dtype=self.dtype, name="resnets_0")(
            x, temb
        )
        x = Transformer2DModel(
            cfg.num_heads_tuple[-1],
            cfg.transformer_layers_tuple[-1],
            cfg.norm_num_groups,
            cfg.use_linear_projection,
            tome=cfg.tome,
            dtype=self.dtype,
            attention=self.attention,
            remat=self.remat,
            name="attentions_0",
        )(x, context, latent_tokens)
        return resnet(
            c, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor, dtype=self.dtype, name="resnets_1"
        )(x, temb)


class UNet(nn.Module):
    """diffusers ``UNet2DConditionModel`` (SD1.x / SDXL subset), NHWC.

    Attributes:
      config: the architecture.
      dtype: computation dtype (parameters stay float32; norms and softmax run in float32).
      attention: ``layers.multi_head_attention`` implementation ("reference", "xla", "cudnn").
      remat: a ``jax.checkpoint_policies`` name ("nothing_saveable", "dots_saveable", ...):
        each resnet and each transformer layer is rematerialised (``nn.remat``) in the
        backward pass and keeps only what the policy saves; "none" keeps every activation.
        Per layer rather than per down/up block: an SD up block recomputed whole holds three
        resnets' and three transformers' activations at once (measured with
        ``eval.plan_distill``). Values and parameter names are unchanged.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    attention: str = "reference"
    remat: str = "none"

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timestep: jax.Array | float | int,
        encoder_hidden_states: jax.Array,
        timestep_cond: jax.Array | None = None,
        added_cond_kwargs: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array:
        """Predicts the noise (or v / x0) for a noisy latent.

        Args:
          sample: [B, H, W, in_channels] noisy latents; H, W multiples of
            ``config.downsample_factor``.
          timestep: scalar or [B] diffusion timesteps (int or float).
          encoder_hidden_states: [B, L, cross_attention_dim] text features.
          timestep_cond: [B, time_cond_proj_dim] or None (only with ``time_cond_proj_dim``).
          added_cond_kwargs: SDXL ``{"text_embeds": [B, E], "time_ids": [B, 6]}`` when
            ``addition_embed_type == "text_time"``.

        Returns:
          [B, H, W, out_channels].
        """
        cfg = self.config
        b, h, w, cin = sample.shape
        if cin != cfg.in_channels:
            raise ValueError(f"sample has {cin} channels but UNetConfig.in_channels={cfg.in_channels} (NHWC input)")
        f = cfg.downsample_factor
        if h % f or w % f:
            raise ValueError(f"sample height/width {h}x{w} must be multiples of {f} (2**(num_blocks-1))")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
            raise ValueError(
                f"encoder_hidden_states must be [B={b}, L, D], got shape {encoder_hidden_states.shape}"
            )
        for i, d in enumerate(cfg.cross_attention_dim_tuple):
            if encoder_hidden_states.shape[-1] != d:
                raise ValueError(
                    f"encoder_hidden_states width {encoder_hidden_states.shape[-1]} != cross_attention_dim "
                    f"{d} of block {i}"
                )
        sample = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        # Time embedding: sinusoid of width block_out_channels[0] -> MLP of width time_embed_dim.
        t = jnp.asarray(timestep)
        if t.ndim == 0:
            t = t[None]
        t = jnp.broadcast_to(t.reshape(-1), (b,))
        t_emb = get_timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, cfg.time_cond_proj_dim, dtype=self.dtype, name="time_embedding")(
            t_emb.astype(self.dtype), None if timestep_cond is None else timestep_cond.astype(self.dtype)
        )
        if cfg.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(added_cond_kwargs, b)
        elif added_cond_kwargs:
            raise ValueError("added_cond_kwargs given but UNetConfig.addition_embed_type is None")

        x = Conv2d(cfg.block_out_channels[0], cfg.conv_in_kernel, dtype=self.dtype, name="conv_in")(sample)
        latent_tokens = h * w
        _remat(ResnetBlock2D, self.remat)  # an unknown policy name fails here, before any block

        n = cfg.num_blocks
        skips = [x]
        for i, block_type in enumerate(cfg.down_block_types):
            x, block_skips = _DownBlock(
                cfg.block_out_channels[i],
                cfg.layers_per_block_tuple[i],
                block_type == "CrossAttnDownBlock2D",
                i < n - 1,
                cfg,
                cfg.num_heads_tuple[i],
                cfg.transformer_layers_tuple[i],
                dtype=self.dtype,
                attention=self.attention,
                remat=self.remat,
                name=f"down_blocks_{i}",
            )(x, emb, context, latent_tokens)
            skips.extend(block_skips)

        x = _MidBlock(cfg, dtype=self.dtype, attention=self.attention, remat=self.remat, name="mid_block")(
            x, emb, context, latent_tokens
        )

        rev = lambda v: tuple(reversed(v))  # noqa: E731 - up blocks read per-block values reversed
        for i, block_type in enumerate(cfg.up_block_types):
            num_layers = rev(cfg.layers_per_block_tuple)[i] + 1
            block_skips, skips = tuple(skips[-num_layers:]), skips[:-num_layers]
            x = _UpBlock(
                rev(cfg.block_out_channels)[i],
                num_layers,
                block_type == "CrossAttnUpBlock2D",
                i < n - 1,
                cfg,
                rev(cfg.num_heads_tuple)[i],
                rev(cfg.transformer_layers_tuple)[i],
                dtype=self.dtype,
                attention=self.attention,
                remat=self.remat,
                name=f"up_blocks_{i}",
            )(x, block_skips, emb, context, latent_tokens)

        x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype, name="conv_norm_out")(x)
        x = nn.silu(x)
        return Conv2d(cfg.out_channels, cfg.conv_out_kernel, dtype=self.dtype, name="conv_out")(x)

    def _text_time_embedding(self, added_cond_kwargs: Mapping[str, jax.Array] | None, batch: int) -> jax.Array:
        """SDXL: ``add_embedding([text_embeds, sinusoid(time_ids)])`` -> [B, time_embed_dim]."""
        cfg = self.config
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError(
                "addition_embed_type='text_time' needs added_cond_kwargs={'text_embeds': [B, E], 'time_ids': [B, 6]}"
            )
        text_embeds = added_cond_kwargs["text_embeds"]
        time_ids = added_cond_kwargs["time_ids"]
        time_embeds = get_timestep_embedding(
            time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
        ).reshape(text_embeds.shape[0], -1)
        add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
        if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds ({text_embeds.shape[-1]}) + time_ids ({time_ids.shape[-1]} x "
                f"{cfg.addition_time_embed_dim}) = {add.shape[-1]} values, but "
                f"projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim}"
            )
        return TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype, name="add_embedding")(add.astype(self.dtype))


def example_inputs(
    config: UNetConfig,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    seq_len: int = 1,
    dtype: Dtype = jnp.float32,
) -> dict[str, Any]:
    """Zero inputs of the right shapes for ``UNet(config)`` (for init, eval_shape, lowering).

    Args:
      config: the UNet architecture.
      batch: B.
      height, width: latent size; default ``config.downsample_factor`` (smallest valid).
      seq_len: L of ``encoder_hidden_states``.
      dtype: float dtype of the arrays.

    Returns:
      Keyword arguments for ``UNet.__call__``.
    """
    height = height or config.downsample_factor
    width = width or height
    inputs: dict[str, Any] = {
        "sample": jnp.zeros((batch, height, width, config.in_channels), dtype),
        "timestep": jnp.zeros((batch,), jnp.int32),
        "encoder_hidden_states": jnp.zeros((batch, seq_len, config.cross_attention_dim_tuple[0]), dtype),
    }
    if config.time_cond_proj_dim is not None:
        inputs["timestep_cond"] = jnp.zeros((batch, config.time_cond_proj_dim), dtype)
    if config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": jnp.zeros((batch, config.text_embeds_dim), dtype),
            "time_ids": jnp.zeros((batch, 6), dtype),
        }
    return inputs


def init_unet(config: UNetConfig, key: jax.Array) -> dict[str, Any]:
    """Randomly initialised UNet variables ``{"params": ...}``.

    Same distributions as ``UNet(config).init`` (PyTorch-default kernel scale, zero biases,
    unit norm scales; see ``layers.init_from_shapes``) at a fraction of its compile time;
    the values differ from ``init`` with the same key.
    """
    shapes = jax.eval_shape(
        lambda: UNet(config).init({"params": jax.random.key(0), "tome": jax.random.key(0)}, **example_inputs(config))
    )
    return {"params": init_from_shapes(shapes["params"], key)}
