"""A small transformer text encoder for the project's own prompts (CLIP-like, Flax linen).

tokens [B, L] int -> token embedding + learned position embedding -> ``num_layers`` pre-LN
transformer layers (self-attention, GELU MLP) -> final LayerNorm -> [B, L, width]. The
UNet cross-attends to the output, so ``width`` equals the UNet's ``cross_attention_dim``.
The vocabulary (and what token 0 means) is the data module's; only its size is configured.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from meg_jax.backbone.config import TextEncoderConfig
from meg_jax.backbone.layers import LayerNorm, Linear, multi_head_attention

Dtype = Any

__all__ = ["TextEncoder", "init_text_encoder"]


class _EncoderLayer(nn.Module):
    config: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        c = cfg.width
        h = LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
        q = Linear(c, dtype=self.dtype, name="q_proj")(h)
        k = Linear(c, dtype=self.dtype, name="k_proj")(h)
        v = Linear(c, dtype=self.dtype, name="v_proj")(h)
        h = multi_head_attention(q, k, v, cfg.num_heads, mask)
        x = x + Linear(c, dtype=self.dtype, name="out_proj")(h)
        h = LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
        h = nn.gelu(Linear(cfg.mlp_ratio * c, dtype=self.dtype, name="fc1")(h), approximate=False)
        return x + Linear(c, dtype=self.dtype, name="fc2")(h)


class TextEncoder(nn.Module):
    """Token ids [B, L] -> hidden states [B, L, width].

    Attributes:
      config: the architecture.
      dtype: computation dtype (parameters float32).
    """

    config: TextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Encodes a batch of prompts.

        Args:
          tokens: [B, L] integer ids in [0, vocab_size), L <= max_length.
          attention_mask: optional [B, L], 1/True for real tokens and 0/False for padding;
            padded positions are not attended to (their own outputs are still computed).

        Returns:
          [B, L, width] hidden states after the final LayerNorm.
        """
        cfg = self.config
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L] integer ids, got shape {tokens.shape}")
        length = tokens.shape[1]
        if length > cfg.max_length:
            raise ValueError(f"prompt length {length} exceeds TextEncoderConfig.max_length={cfg.max_length}")
        embed = nn.Embed(
            cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(0.02), name="token_embedding"
        )
        pos = self.param("position_embedding", nn.initializers.normal(0.01), (cfg.max_length, cfg.width))
        x = (embed(tokens) + pos[None, :length]).astype(self.dtype)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.astype(bool)[:, None, None, :]  # keys only: [B, 1, 1, L]
        if cfg.causal:
            causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
            mask = causal if mask is None else mask & causal
        for i in range(cfg.num_layers):
            x = _EncoderLayer(cfg, dtype=self.dtype, name=f"layers_{i}")(x, mask)
        return LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)


def init_text_encoder(config: TextEncoderConfig, key: jax.Array) -> dict[str, Any]:
    """Randomly initialised text-encoder variables ``{"params": ...}``."""
    return jax.jit(TextEncoder(config).init)(key, jnp.zeros((1, config.max_length), jnp.int32))
