"""CLIP text encoders of Stable Diffusion pipelines in Flax, and their tokenizers.

transformers' ``CLIPTextModel`` (SD 1.x/2.x, SDXL's first encoder) and
``CLIPTextModelWithProjection`` (SDXL's second encoder), configured from the ``config.json``
that transformers writes, with weights read from ``model.safetensors``::

    input_ids [B, L] -> token embedding + position embedding (positions 0..L-1)
      -> num_hidden_layers x pre-LN layer:  x += out_proj(attn(LN1(x)))  (causal mask)
                                            x += fc2(act(fc1(LN2(x))))   (quick_gelu / gelu)
      -> final LayerNorm -> last_hidden_state [B, L, D]
      -> pooler_output [B, D]: last_hidden_state at the end token (see below)
      -> text_embeds [B, P] = text_projection(pooler_output)  (WithProjection only, no bias)

``hidden_states`` is transformers' ``output_hidden_states=True`` tuple: the embeddings and
the output of every layer (``num_hidden_layers + 1`` entries, none after the final
LayerNorm), so SDXL's ``hidden_states[-2]`` is the penultimate layer's output.

Pooling, as transformers does it: configs written before transformers PR #24773 (the SD
checkpoints) say ``eos_token_id == 2`` and pool at the argmax of the ids (the end token has
the largest id in CLIP's vocabulary); newer configs pool at the first position of
``eos_token_id``.

:func:`load_tokenizer` rebuilds transformers' ``CLIPTokenizer`` (NFC, whitespace runs -> one
space, lower case, CLIP's split regex, byte-level BPE with ``</w>``, ``<|startoftext|>`` ...
``<|endoftext|>``) on the ``tokenizers`` library from the folder's ``tokenizer.json`` or
``vocab.json`` + ``merges.txt``, and pads/truncates as diffusers' ``encode_prompt`` does.
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
from meg_jax.backbone.layers import LayerNorm, Linear, multi_head_attention

Dtype = Any

__all__ = [
    "CLIPTextConfig",
    "CLIPTextOutput",
    "CLIPTextTransformer",
    "CLIPTokenizer",
    "load_text_encoder",
    "load_tokenizer",
    "params_from_state_dict",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Keys of a transformers config.json that do not change the forward pass at inference:
# bookkeeping, dropout and init (training only), generation settings that PretrainedConfig
# wrote into every config before transformers 4.3x, and dtype (weights are cast on load).
_IGNORED_KEYS = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "transformers_version",
    "torch_dtype", "dtype", "attention_dropout", "dropout", "initializer_range", "initializer_factor",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "torchscript",
    "use_bfloat16", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size", "finetuning_task",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss",
    "gradient_checkpointing",
})
_ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}
_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers ``CLIPTextConfig`` (the fields that shape the forward pass).

    Field names and defaults are transformers' (a key missing from ``config.json`` takes
    transformers' default, as ``from_pretrained`` does).
    """

    vocab_size: int = 49408  # token ids
    hidden_size: int = 512  # width D
    intermediate_size: int = 2048  # MLP hidden width
    num_hidden_layers: int = 12
    num_attention_heads: int = 8  # D must be divisible
    max_position_embeddings: int = 77  # learned positions; prompts are at most this long
    hidden_act: str = "quick_gelu"  # "quick_gelu" (x * sigmoid(1.702 x)) or "gelu" (exact, erf)
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # 2 = the pre-PR-#24773 configs: pool at argmax(input_ids)
    bos_token_id: int | None = 49406  # informational (the tokenizer adds it)
    pad_token_id: int | None = 1  # informational (the tokenizer pads)
    projection_dim: int = 512  # P, width of text_embeds (WithProjection only)
    with_projection: bool = False  # CLIPTextModelWithProjection: a bias-free D -> P text_projection
    use_attention_mask: bool = False  # diffusers passes the tokenizer's attention mask when True

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "projection_dim"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CLIPTextConfig.{f} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig: unsupported value hidden_act={self.hidden_act!r}; "
                f"meg-jax implements {list(_ACTIVATIONS)}"
            )
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)) \
                or self.layer_norm_eps <= 0:
            raise ValueError(f"CLIPTextConfig.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int) or self.eos_token_id < 0:
            raise ValueError(
                f"CLIPTextConfig.eos_token_id must be one integer id >= 0 (pooling needs one end token), "
                f"got {self.eos_token_id!r}"
            )
        for f in ("with_projection", "use_attention_mask"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"CLIPTextConfig.{f} must be a bool, got {getattr(self, f)!r}")

    @property
    def legacy_pooling(self) -> bool:
        """True when pooling takes the argmax of the ids (``eos_token_id == 2``), as transformers."""
        return self.eos_token_id == 2

    @classmethod
    def from_transformers(cls, data: Mapping[str, Any], *, with_projection: bool | None = None) -> CLIPTextConfig:
        """Builds the config from a transformers ``config.json`` dict of a CLIP text model.

        Args:
          data: the parsed ``config.json``.
          with_projection: whether the model has ``text_projection``; None = from
            ``architectures`` (``CLIPTextModel`` or ``CLIPTextModelWithProjection``), False
            when that key is absent.

        Raises:
          ValueError: naming the key, for unknown keys and unsupported values.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"with_projection"}
        kwargs: dict[str, Any] = {}
        arch_projection: bool | None = None
        for key, value in data.items():
            if key in _IGNORED_KEYS:
                continue
            if key == "model_type":
                if value != "clip_text_model":
                    raise ValueError(
                        f"CLIPTextConfig: unsupported value model_type={value!r}; meg-jax reads 'clip_text_model' "
                        "(a text_encoder folder of a diffusers pipeline)"
                    )
            elif key == "architectures":
                if not isinstance(value, list) or len(value) != 1 or value[0] not in _ARCHITECTURES:
                    raise ValueError(
                        f"CLIPTextConfig: unsupported value architectures={value!r}; meg-jax reads one of "
                        f"{sorted(_ARCHITECTURES)}"
                    )
                arch_projection = _ARCHITECTURES[value[0]]
            elif key == "pruned_heads":
                if value:
                    raise ValueError(f"CLIPTextConfig: unsupported value pruned_heads={value!r}; heads must be whole")
            elif key in names:
                kwargs[key] = value
            else:
                raise ValueError(
                    f"CLIPTextConfig: unknown or unsupported config.json key {key!r} (value {value!r}); "
                    f"supported keys are {sorted(names | {'model_type', 'architectures', 'pruned_heads'})}"
                )
        if with_projection is None:
            with_projection = bool(arch_projection)
        return cls(**kwargs, with_projection=with_projection)


@struct.dataclass
class CLIPTextOutput:
    """What a CLIP text encoder returns (fields as transformers' outputs).

    Attributes:
      last_hidden_state: [B, L, D] after the final LayerNorm.
      hidden_states: ``num_hidden_layers + 1`` arrays [B, L, D]: the embeddings, then each
        layer's output (before the final LayerNorm).
      pooler_output: [B, D], ``last_hidden_state`` at the end token.
      text_embeds: [B, P] projected pooler_output (``CLIPTextModelWithProjection``), else None.
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    pooler_output: jax.Array
    text_embeds: jax.Array | None = None


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return nn.gelu(x, approximate=False)
    raise ValueError(f"unsupported hidden_act {name!r}")


class _Attention(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        d = self.config.hidden_size
        q = Linear(d, dtype=self.dtype, name="q_proj")(x)
        k = Linear(d, dtype=self.dtype, name="k_proj")(x)
        v = Linear(d, dtype=self.dtype, name="v_proj")(x)
        h = multi_head_attention(q, k, v, self.config.num_attention_heads, mask)
        return Linear(d, dtype=self.dtype, name="out_proj")(h)


class _MLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _activation(cfg.hidden_act, Linear(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x))
        return Linear(cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


class _EncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        x = x + _Attention(self.config, self.dtype, name="self_attn")(
            LayerNorm(eps, dtype=self.dtype, name="layer_norm1")(x), mask
        )
        return x + _MLP(self.config, self.dtype, name="mlp")(LayerNorm(eps, dtype=self.dtype, name="layer_norm2")(x))


class _Encoder(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = _EncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
            states.append(x)
        return tuple(states)


class _Embeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(0.02)  # transformers' init of both tables
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, embedding_init=init, name="token_embedding")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, embedding_init=init,
                       name="position_embedding")
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[1]))[None]


class CLIPTextTransformer(nn.Module):
    """``CLIPTextModel`` / ``CLIPTextModelWithProjection`` forward pass (inference).

    Parameter names follow transformers' state dict (``encoder.layers.0.self_attn.q_proj``
    -> ``encoder/layers_0/self_attn/q_proj``; Linear ``weight`` -> ``kernel`` transposed,
    LayerNorm ``weight`` -> ``scale``, Embedding ``weight`` -> ``embedding``).

    Attributes:
      config: the architecture.
      dtype: computation dtype (float32, or bfloat16 with LayerNorm statistics and the
        attention softmax in float32). Parameters are used in the dtype they are given in.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """Encodes token ids.

        Args:
          input_ids: [B, L] integer ids, L <= max_position_embeddings.
          attention_mask: optional [B, L], 1/True for real tokens and 0/False for padding;
            padded keys are not attended to (on top of the causal mask), as transformers.
            A row whose every allowed key is masked (left padding) attends uniformly.

        Returns:
          :class:`CLIPTextOutput` in ``dtype``.
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L] integer ids, got shape {input_ids.shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt length {length} exceeds CLIPTextConfig.max_position_embeddings={cfg.max_position_embeddings}"
            )
        x = _Embeddings(cfg, self.dtype, name="embeddings")(input_ids)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, Lq, Lk]: key k <= query q
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {attention_mask.shape} does not match input_ids shape {input_ids.shape}"
                )
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        states = _Encoder(cfg, self.dtype, name="encoder")(x, mask)
        last = LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(states[-1])
        if cfg.legacy_pooling:
            # The end token has the largest id in CLIP's vocabulary; argmax takes the first maximum (as torch).
            index = jnp.argmax(input_ids, axis=-1)
        else:
            # First end token (the pad token may equal it); 0 when a row has none, as transformers.
            index = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, index[:, None, None], axis=1)[:, 0]
        text_embeds = None
        if cfg.with_projection:
            text_embeds = Linear(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
        return CLIPTextOutput(last_hidden_state=last, hidden_states=states, pooler_output=pooled,
                              text_embeds=text_embeds)


# ---- weights ------------------------------------------------------------------------------


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as host arrays in their stored dtype.

    bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays (safetensors' numpy reader
    does not know that dtype, its flax reader does).

    Raises:
      FileNotFoundError: the file is missing (naming it).
      ValueError: the file is not a readable safetensors file (naming it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def flax_path(key: str, *, embeddings: tuple[str, ...] = (), norms: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A transformers module key -> the Flax param path of meg-jax's CLIP towers.

    ``encoder.layers.3.mlp.fc1.weight`` -> ``("encoder", "layers_3", "mlp", "fc1", "kernel")``:
    numbered children join their list's name; a ``weight`` becomes ``embedding`` under a
    module named in ``embeddings``, ``scale`` under one whose name starts with one of
    ``norms``, else ``kernel``.
    """
    *mods, leaf = key.split(".")
    out: list[str] = []
    for m in mods:
        if m.isdigit() and out:
            out[-1] = f"{out[-1]}_{m}"
        else:
            out.append(m)
    last = out[-1] if out else ""
    if leaf == "weight":
        leaf = "embedding" if last in embeddings else "scale" if last.startswith(norms) else "kernel"
    return (*out, leaf)


def fill_params(
    expected: Mapping[tuple[str, ...], tuple[int, ...]],
    entries: Any,
    *,
    dtype: Dtype,
    source: str,
    what: str,
) -> dict[str, Any]:
    """Flax params from ``(torch key, Flax path, array)`` entries, checked against ``expected``.

    Linear kernels are transposed ([out, in] -> [in, out]) and conv kernels moved to HWIO
    ([D, C, p, p] -> [p, p, C, D]); every expected path must be filled exactly once.

    Args:
      expected: flat Flax path -> shape of the module's params (``jax.eval_shape`` of its init).
      entries: iterable of (torch key, Flax path, array: numpy, ml_dtypes or torch CPU tensor).
      dtype: dtype of the returned params.
      source: what the weights were read from, for error messages (a file or folder).
      what: the module the weights must fit, for error messages.

    Raises:
      ValueError: unexpected, missing or wrongly shaped weights (named).
    """
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, path, value in entries:
        if path not in expected:
            unexpected.append(key)
            continue
        arr = value.float().numpy() if hasattr(value, "numpy") and hasattr(value, "float") else np.asarray(value)
        if path[-1] == "kernel":
            arr = arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T
        if tuple(arr.shape) != expected[path]:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, which does not fit the config.json's "
                             f"{what} (Flax {'/'.join(path)} needs {expected[path]})")
        flat[path] = arr
    missing = sorted("/".join(p) for p in expected if p not in flat)
    if unexpected or missing:
        raise ValueError(f"{source} does not fit a {what} with this config.json: unexpected weights "
                         f"{sorted(unexpected)}, missing params {missing}")
    return traverse_util.unflatten_dict({p: jnp.asarray(a, dtype=dtype) for p, a in flat.items()})


def _torch_key_to_path(key: str) -> tuple[str, ...] | None:
    """transformers state-dict key -> Flax param path (None for the ``position_ids`` buffer).

    Both layouts are read: ``text_model.``-prefixed keys (checkpoints written before
    transformers 5, and every ``CLIPTextModelWithProjection``) and unprefixed ones
    (``CLIPTextModel.save_pretrained`` of transformers 5).
    """
    if key.startswith("text_model."):
        key = key[len("text_model."):]
    if key == "embeddings.position_ids":
        return None
    return flax_path(key, embeddings=("token_embedding", "position_embedding"), norms=("layer_norm", "final_layer_norm"))


def param_shapes(config: CLIPTextConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``path -> shape`` of the Flax params for ``config`` (no arrays allocated)."""
    module = CLIPTextTransformer(config)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def params_from_state_dict(
    config: CLIPTextConfig,
    state_dict: Mapping[str, Any],
    *,
    dtype: Dtype = jnp.float32,
    source: str = "state dict",
) -> dict[str, Any]:
    """Converts a transformers CLIP text-model state dict to Flax params.

    Args:
      config: the architecture the weights must fit.
      state_dict: torch key -> array (numpy / torch CPU tensors; any float dtype).
      dtype: dtype of the returned params (fp16/bf16 weights are cast, upcast included).
      source: what the state dict was read from, for error messages (a file path).

    Returns:
      Nested params for ``CLIPTextTransformer(config).apply({"params": params}, ...)``.

    Raises:
      ValueError: missing, unexpected or wrongly shaped weights (named).
    """
    entries = ((key, path, value) for key, value in state_dict.items()
               if (path := _torch_key_to_path(key)) is not None)
    what = "CLIPTextModelWithProjection" if config.with_projection else "CLIPTextModel"
    return fill_params(param_shapes(config), entries, dtype=dtype, source=source, what=what)


def load_text_encoder(
    folder: str | os.PathLike, *, dtype: Dtype = jnp.float32
) -> tuple[CLIPTextTransformer, dict[str, Any], CLIPTextConfig]:
    """Loads a transformers CLIP text-encoder folder (``text_encoder/`` of a pipeline).

    Args:
      folder: folder with ``config.json`` and ``model.safetensors``.
      dtype: params and computation dtype (``jnp.float32`` or ``jnp.bfloat16``); weights
        stored in fp16/bf16/fp32 are cast to it.

    Returns:
      ``(module, params, config)``: ``module.apply({"params": params}, input_ids)`` returns a
      :class:`CLIPTextOutput`.

    Raises:
      FileNotFoundError: ``config.json`` or ``model.safetensors`` missing (named).
      ValueError: an unsupported config key/value, an unreadable file, or weights that do
        not fit the config (named).
    """
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    data = config_lib.read_json_object(cfg_path)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    state = _read_safetensors(weights_path)
    # Without ``architectures`` the weights tell whether the model has a projection.
    with_projection = None if "architectures" in data else "text_projection.weight" in state
    try:
        config = CLIPTextConfig.from_transformers(data, with_projection=with_projection)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    params = params_from_state_dict(config, state, dtype=dtype, source=weights_path)
    return CLIPTextTransformer(config, dtype=dtype), params, config


# The tokenizer lives in its own module; re-exported so ``clip`` stays the one import.
from meg_jax.backbone.clip_tokenizer import CLIPTokenizer, load_tokenizer  # noqa: E402
