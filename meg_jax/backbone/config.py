"""Architecture configs of the latent diffusion backbone, keyed like diffusers' ``config.json``.

``UNetConfig`` and ``VAEConfig`` carry the same field names, defaults and meaning as the
``__init__`` arguments of diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL``, so a
diffusers ``config.json`` maps onto them one to one (``from_diffusers``) and back
(``to_diffusers``). Only the block types and options that SD1.x / SDXL use are supported;
any other diffusers key is accepted only at the one value that changes nothing
(``_UNET_FIXED`` / ``_VAE_FIXED``), and everything else raises ``ValueError`` naming the key.

``BackboneConfig`` bundles the three networks of the LDM with the prediction type and the
latent scale, and :func:`preset` names the sizes the project uses: ``tiny`` (the model that
is trained on a CPU and shipped), ``sd15`` and ``sdxl`` (architecture only, for FLOP counts).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

from meg_jax.backbone.tome import ToMeConfig

__all__ = [
    "UNetConfig",
    "VAEConfig",
    "TextEncoderConfig",
    "BackboneConfig",
    "preset",
    "PRESETS",
    "DIFFUSERS_BOOKKEEPING_KEYS",
]

# Keys diffusers adds to every config.json that say nothing about the architecture.
# ``_use_default_values`` is added by diffusers to the config of a model built in memory.
DIFFUSERS_BOOKKEEPING_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})

UNET_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
UNET_MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)
VAE_DOWN_BLOCKS = ("DownEncoderBlock2D",)
VAE_UP_BLOCKS = ("UpDecoderBlock2D",)

# diffusers UNet2DConditionModel keys this port does not implement. Each is accepted only at
# the listed value(s), which select exactly the architecture implemented here; the first
# value is the one ``to_diffusers`` writes.
_UNET_FIXED: dict[str, tuple[Any, ...]] = {
    "only_cross_attention": (False,),
    "dropout": (0.0,),  # inference is unaffected, but training would differ
    "act_fn": ("silu", "swish"),  # diffusers maps both names to SiLU
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "addition_embed_type_num_heads": (64,),  # only read when addition_embed_type == "text"
}

_VAE_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
}

# Fields of our configs that are not diffusers keys (excluded from to/from_diffusers).
_UNET_NON_DIFFUSERS_FIELDS = frozenset({"tome"})


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps bools apart from numbers (``False == 0.0`` in Python)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _tuplify(value: Any) -> Any:
    """JSON lists -> tuples (recursively), so configs stay hashable and frozen."""
    if isinstance(value, list | tuple):
        return tuple(_tuplify(v) for v in value)
    return value


def _per_block(name: str, value: Any, n: int) -> tuple[Any, ...]:
    """Broadcasts an int-or-per-block value to a tuple of length ``n``."""
    if isinstance(value, tuple):
        if len(value) != n:
            raise ValueError(
                f"{name}={value!r} has {len(value)} entries but there are {n} down blocks; "
                f"give one entry per block or a single int"
            )
        return value
    return (value,) * n


def _split_diffusers_dict(
    cls_name: str,
    data: Mapping[str, Any],
    field_names: set[str],
    fixed: Mapping[str, tuple[Any, ...]],
) -> dict[str, Any]:
    """Checks a diffusers config dict and returns the kwargs for our dataclass."""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in DIFFUSERS_BOOKKEEPING_KEYS:
            continue
        if key in fixed:
            allowed = fixed[key]
            if not any(_same(value, a) for a in allowed):
                raise ValueError(
                    f"{cls_name}: unsupported value {key}={value!r}; meg-jax implements only "
                    f"{key} in {list(allowed)} (the SD1.x/SDXL architecture)"
                )
            continue
        if key not in field_names:
            raise ValueError(
                f"{cls_name}: unknown or unsupported diffusers key {key!r} (value {value!r}); "
                f"supported keys are {sorted(field_names | set(fixed))}"
            )
        kwargs[key] = _tuplify(value)
    return kwargs


def _check_int(cls_name: str, name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{cls_name}.{name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers ``UNet2DConditionModel`` architecture (SD1.x / SDXL subset).

    Field names and defaults are diffusers' (the defaults are SD1.x's UNet with
    ``cross_attention_dim`` 1280). Per-block values may be one int for all blocks or a tuple
    with one entry per down block (up blocks use the reversed tuple, as diffusers does).
    """

    # Latent height = width the model was trained at (informational; any multiple of
    # 2**(num_blocks-1) works). diffusers allows an [H, W] pair.
    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted channels out (eps / v / x0)
    center_input_sample: bool = False  # if True, the input is mapped x -> 2x - 1 first
    flip_sin_to_cos: bool = True  # timestep embedding order: cos first when True
    freq_shift: int = 0  # diffusers' downscale_freq_shift of the timestep embedding
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per resolution level
    layers_per_block: int | tuple[int, ...] = 2  # resnets per down block (up blocks get one more)
    downsample_padding: int = 1  # padding of the stride-2 downsample conv (0: pad right/bottom by 1)
    mid_block_scale_factor: float = 1.0  # mid-block resnet outputs are divided by this
    norm_num_groups: int = 32  # GroupNorm groups everywhere (tiny configs use 2-8)
    norm_eps: float = 1e-5  # GroupNorm eps of resnets and the output norm
    cross_attention_dim: int | tuple[int, ...] = 1280  # width of encoder_hidden_states
    transformer_layers_per_block: int | tuple[int, ...] = 1  # BasicTransformerBlocks per attention
    # diffusers' naming quirk: for these blocks this is the NUMBER of heads (SD1.5: 8); the
    # head width is channels // heads.
    attention_head_dim: int | tuple[int, ...] = 8
    # diffusers' UNet2DConditionModel rejects this key (issue #2011); only None is valid.
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False  # Transformer2D proj_in/out: Linear (SDXL) or 1x1 conv
    # diffusers computes q.k and softmax in float32 when True; this port always does.
    upcast_attention: bool = False
    addition_embed_type: str | None = None  # None or "text_time" (SDXL added conditioning)
    addition_time_embed_dim: int | None = None  # sinusoid width per SDXL time id (256)
    projection_class_embeddings_input_dim: int | None = None  # text_embeds + 6 * addition_time_embed_dim
    time_embedding_dim: int | None = None  # width of the time embedding; None: 4 * block_out_channels[0]
    # Width of ``timestep_cond``: a bias-free projection of it is added to the sinusoidal
    # embedding before linear_1 (LCM's guidance hook; here: the student's step conditioning).
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3  # kernel of conv_in (odd)
    conv_out_kernel: int = 3  # kernel of conv_out (odd)
    # Token merging in the self-attention of the transformer blocks (not a diffusers key).
    tome: ToMeConfig | None = None

    def __post_init__(self) -> None:
        name = "UNetConfig"
        for f in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, f, _tuplify(getattr(self, f)))
        for f in (
            "layers_per_block",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "attention_head_dim",
            "num_attention_heads",
            "sample_size",
        ):
            object.__setattr__(self, f, _tuplify(getattr(self, f)))
        n = len(self.down_block_types)
        if n == 0:
            raise ValueError("UNetConfig.down_block_types is empty; give at least one block")
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(
                f"UNetConfig: down_block_types ({n}), up_block_types ({len(self.up_block_types)}) and "
                f"block_out_channels ({len(self.block_out_channels)}) must have the same length"
            )
        for i, t in enumerate(self.down_block_types):
            if t not in UNET_DOWN_BLOCKS:
                raise ValueError(
                    f"UNetConfig: unsupported down_block_types[{i}]={t!r}; use one of {list(UNET_DOWN_BLOCKS)}"
                )
        for i, t in enumerate(self.up_block_types):
            if t not in UNET_UP_BLOCKS:
                raise ValueError(
                    f"UNetConfig: unsupported up_block_types[{i}]={t!r}; use one of {list(UNET_UP_BLOCKS)}"
                )
        if self.mid_block_type not in UNET_MID_BLOCKS:
            raise ValueError(
                f"UNetConfig: unsupported mid_block_type={self.mid_block_type!r}; use {UNET_MID_BLOCKS[0]!r}"
            )
        if self.num_attention_heads is not None:
            raise ValueError(
                f"UNetConfig: num_attention_heads={self.num_attention_heads!r} is rejected by diffusers' "
                "UNet2DConditionModel (naming issue #2011); set attention_head_dim instead, which "
                "diffusers reads as the number of heads for these blocks"
            )
        for f in ("in_channels", "out_channels", "norm_num_groups"):
            _check_int(name, f, getattr(self, f))
        if self.downsample_padding < 0:
            raise ValueError(f"UNetConfig.downsample_padding must be >= 0, got {self.downsample_padding}")
        for f in ("conv_in_kernel", "conv_out_kernel"):
            k = getattr(self, f)
            _check_int(name, f, k)
            if k % 2 == 0:
                raise ValueError(f"UNetConfig.{f}={k} must be odd so the conv keeps the spatial size")
        for i, c in enumerate(self.block_out_channels):
            _check_int(name, f"block_out_channels[{i}]", c)
            if c % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig: block_out_channels[{i}]={c} is not divisible by norm_num_groups="
                    f"{self.norm_num_groups}; change one so GroupNorm can split the channels"
                )
        if self.time_embedding_dim is not None:
            _check_int(name, "time_embedding_dim", self.time_embedding_dim)
        layers = self.layers_per_block_tuple
        tlayers = self.transformer_layers_tuple
        heads = self.num_heads_tuple
        cross = self.cross_attention_dim_tuple
        for i in range(n):
            _check_int(name, f"layers_per_block[{i}]", layers[i])
            _check_int(name, f"transformer_layers_per_block[{i}]", tlayers[i])
            _check_int(name, f"attention_head_dim[{i}]", heads[i])
            _check_int(name, f"cross_attention_dim[{i}]", cross[i])
        # Every block that attends (its own, and the mid block with the last level's values)
        # needs its channels split evenly into heads.
        attn_levels = [i for i, t in enumerate(self.down_block_types) if t.startswith("CrossAttn")]
        attn_levels += [n - 1 - i for i, t in enumerate(self.up_block_types) if t.startswith("CrossAttn")]
        attn_levels.append(n - 1)  # mid block
        for i in sorted(set(attn_levels)):
            c = self.block_out_channels[i]
            if c % heads[i]:
                raise ValueError(
                    f"UNetConfig: block_out_channels[{i}]={c} is not divisible by the number of heads "
                    f"attention_head_dim[{i}]={heads[i]}; change one of them"
                )
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"UNetConfig: unsupported addition_embed_type={self.addition_embed_type!r}; use None or 'text_time'"
            )
        if self.addition_embed_type == "text_time":
            if self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None:
                raise ValueError(
                    "UNetConfig: addition_embed_type='text_time' needs addition_time_embed_dim and "
                    "projection_class_embeddings_input_dim (text_embeds width + 6 * addition_time_embed_dim)"
                )
            _check_int(name, "addition_time_embed_dim", self.addition_time_embed_dim)
            if self.projection_class_embeddings_input_dim <= 6 * self.addition_time_embed_dim:
                raise ValueError(
                    f"UNetConfig: projection_class_embeddings_input_dim={self.projection_class_embeddings_input_dim} "
                    f"must exceed 6 * addition_time_embed_dim={6 * self.addition_time_embed_dim} "
                    "(it is text_embeds width + 6 time ids x addition_time_embed_dim)"
                )
        if self.time_cond_proj_dim is not None:
            _check_int(name, "time_cond_proj_dim", self.time_cond_proj_dim)
        if isinstance(self.sample_size, tuple) and len(self.sample_size) != 2:
            raise ValueError(f"UNetConfig.sample_size={self.sample_size!r}: give an int or [height, width]")

    # ---- derived per-block views -------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """Number of resolution levels."""
        return len(self.down_block_types)

    @property
    def layers_per_block_tuple(self) -> tuple[int, ...]:
        return _per_block("layers_per_block", self.layers_per_block, self.num_blocks)

    @property
    def transformer_layers_tuple(self) -> tuple[int, ...]:
        return _per_block("transformer_layers_per_block", self.transformer_layers_per_block, self.num_blocks)

    @property
    def num_heads_tuple(self) -> tuple[int, ...]:
        """Attention heads per level (diffusers: ``num_attention_heads or attention_head_dim``)."""
        return _per_block("attention_head_dim", self.attention_head_dim, self.num_blocks)

    @property
    def cross_attention_dim_tuple(self) -> tuple[int, ...]:
        return _per_block("cross_attention_dim", self.cross_attention_dim, self.num_blocks)

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding fed to every resnet."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        """Latent height/width must be a multiple of this."""
        return 2 ** (self.num_blocks - 1)

    @property
    def text_embeds_dim(self) -> int | None:
        """Width of ``added_cond_kwargs['text_embeds']`` for SDXL's text_time conditioning."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    # ---- diffusers round trip ----------------------------------------------------------
    @classmethod
    def from_diffusers(cls, data: Mapping[str, Any], **overrides: Any) -> "UNetConfig":
        """Builds the config from a diffusers ``UNet2DConditionModel`` ``config.json`` dict.

        Args:
          data: the parsed ``config.json``. Bookkeeping keys (``_class_name`` ...) are ignored.
          **overrides: fields that are not diffusers keys (``tome``).

        Raises:
          ValueError: naming the key for unknown keys and unsupported values.
        """
        names = {f.name for f in dataclasses.fields(cls)} - _UNET_NON_DIFFUSERS_FIELDS
        kwargs = _split_diffusers_dict("UNetConfig", data, names, _UNET_FIXED)
        return cls(**kwargs, **overrides)

    def to_diffusers(self) -> dict[str, Any]:
        """``UNet2DConditionModel(**config.to_diffusers())`` builds the same architecture."""
        out = {
            f.name: _listify(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in _UNET_NON_DIFFUSERS_FIELDS
        }
        out.update({k: v[0] for k, v in _UNET_FIXED.items()})
        return out


def _listify(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_listify(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` architecture (SD / SDXL VAE). Defaults are diffusers'."""

    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)  # encoder channels per level (decoder reversed)
    layers_per_block: int = 1  # resnets per encoder block (decoder blocks get one more)
    latent_channels: int = 4  # channels of the latent z
    norm_num_groups: int = 32  # GroupNorm groups (eps is fixed at 1e-6, as in diffusers)
    sample_size: int | tuple[int, int] = 32  # image height = width (informational)
    scaling_factor: float = 0.18215  # z_model = scaling_factor * (z - shift_factor)
    shift_factor: float | None = None  # SD3/Flux-style latent shift; None for SD/SDXL
    latents_mean: tuple[float, ...] | None = None  # per-channel stats (informational)
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # diffusers pipelines run the VAE in float32 when True
    use_quant_conv: bool = True  # 1x1 conv on the encoder moments
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
    mid_block_add_attention: bool = True  # single-head self-attention in both mid blocks

    norm_eps = 1e-6  # class constant: diffusers hard-codes it in Encoder/Decoder

    def __post_init__(self) -> None:
        name = "VAEConfig"
        for f in ("down_block_types", "up_block_types", "block_out_channels", "sample_size",
                  "latents_mean", "latents_std"):
            object.__setattr__(self, f, _tuplify(getattr(self, f)))
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("VAEConfig.block_out_channels is empty; give at least one level")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"VAEConfig: down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length"
            )
        for i, t in enumerate(self.down_block_types):
            if t not in VAE_DOWN_BLOCKS:
                raise ValueError(f"VAEConfig: unsupported down_block_types[{i}]={t!r}; use {VAE_DOWN_BLOCKS[0]!r}")
        for i, t in enumerate(self.up_block_types):
            if t not in VAE_UP_BLOCKS:
                raise ValueError(f"VAEConfig: unsupported up_block_types[{i}]={t!r}; use {VAE_UP_BLOCKS[0]!r}")
        for f in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            _check_int(name, f, getattr(self, f))
        for i, c in enumerate(self.block_out_channels):
            _check_int(name, f"block_out_channels[{i}]", c)
            if c % self.norm_num_groups:
                raise ValueError(
                    f"VAEConfig: block_out_channels[{i}]={c} is not divisible by norm_num_groups="
                    f"{self.norm_num_groups}; change one so GroupNorm can split the channels"
                )
        if not self.scaling_factor > 0:
            raise ValueError(f"VAEConfig.scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        """Image size / latent size."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, data: Mapping[str, Any]) -> "VAEConfig":
        """Builds the config from a diffusers ``AutoencoderKL`` ``config.json`` dict.

        Raises:
          ValueError: naming the key for unknown keys and unsupported values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**_split_diffusers_dict("VAEConfig", data, names, _VAE_FIXED))

    def to_diffusers(self) -> dict[str, Any]:
        """``AutoencoderKL(**config.to_diffusers())`` builds the same architecture."""
        out = {f.name: _listify(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out.update({k: v[0] for k, v in _VAE_FIXED.items()})
        return out


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """A small pre-LayerNorm transformer text encoder (CLIP-like) for the project's prompts.

    tokens [B, L] -> token + learned position embedding -> ``num_layers`` x (LN, self-attn,
    LN, GELU MLP) -> final LayerNorm -> hidden [B, L, width]. The vocabulary belongs to the
    data module; only its size is fixed here.
    """

    vocab_size: int = 64  # number of token ids (set by the data module's tokenizer)
    max_length: int = 16  # tokens per prompt (learned position embeddings)
    width: int = 32  # hidden width; must equal the UNet's cross_attention_dim
    num_layers: int = 2  # transformer layers
    num_heads: int = 2  # attention heads (width must be divisible)
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * width
    causal: bool = False  # CLIP uses a causal mask; the tiny encoder sees the whole prompt
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for f in ("vocab_size", "max_length", "width", "num_layers", "num_heads", "mlp_ratio"):
            _check_int("TextEncoderConfig", f, getattr(self, f))
        if self.width % self.num_heads:
            raise ValueError(
                f"TextEncoderConfig: width={self.width} is not divisible by num_heads={self.num_heads}"
            )


PredictionType = Literal["epsilon", "v_prediction", "sample"]


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """The three networks of the latent diffusion model and how latents are used."""

    unet: UNetConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    prediction_type: PredictionType = "epsilon"  # what the UNet predicts (diffusers' names)
    # Latents given to the UNet are ``latent_scaling_factor * z``. None takes the VAE's
    # ``scaling_factor``; a value here (e.g. 1/std measured after VAE training) wins.
    latent_scaling_factor: float | None = None

    def __post_init__(self) -> None:
        if self.latent_scaling_factor is None:
            object.__setattr__(self, "latent_scaling_factor", self.vae.scaling_factor)
        if not self.latent_scaling_factor > 0:
            raise ValueError(f"BackboneConfig.latent_scaling_factor must be > 0, got {self.latent_scaling_factor}")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"BackboneConfig.prediction_type={self.prediction_type!r}; use 'epsilon', 'v_prediction' or 'sample'"
            )
        if self.unet.in_channels != self.vae.latent_channels:
            raise ValueError(
                f"BackboneConfig: unet.in_channels={self.unet.in_channels} != vae.latent_channels="
                f"{self.vae.latent_channels}; the UNet denoises the VAE's latents"
            )
        cross = set(self.unet.cross_attention_dim_tuple)
        if cross != {self.text_encoder.width}:
            raise ValueError(
                f"BackboneConfig: unet.cross_attention_dim={self.unet.cross_attention_dim} != "
                f"text_encoder.width={self.text_encoder.width}; the UNet attends to the text encoder's output"
            )

    @property
    def latent_size(self) -> int:
        """Latent height = width for the VAE's ``sample_size`` images."""
        size = self.vae.sample_size if isinstance(self.vae.sample_size, int) else self.vae.sample_size[0]
        return size // self.vae.downsample_factor


def _tiny() -> BackboneConfig:
    unet = UNetConfig(
        sample_size=8,  # 8x8x4 latents of 32x32x3 images
        in_channels=4,
        out_channels=4,
        # Cross-attention at the 8x8 level (64 tokens, where ToMe acts) and in the 4x4 mid
        # block; plain resnets at 4x4. About 548 k parameters.
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 48),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,  # heads (diffusers' naming): head width 16 and 24
        time_cond_proj_dim=32,  # step conditioning of the few-step student (zeros for the teacher)
    )
    vae = VAEConfig(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        # Two downsamples (32x32 -> 8x8); a narrow first level keeps the 32x32 convs cheap
        # on a CPU. About 682 k parameters.
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=1.0,  # to be replaced by 1/std of the trained VAE's latents
    )
    text = TextEncoderConfig(vocab_size=64, max_length=16, width=32, num_layers=2, num_heads=2)
    return BackboneConfig(unet=unet, vae=vae, text_encoder=text, prediction_type="epsilon")


def _sd_vae(sample_size: int, scaling_factor: float) -> VAEConfig:
    return VAEConfig(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def _sd15() -> BackboneConfig:
    unet = UNetConfig(
        sample_size=64,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    # Stand-in for CLIP ViT-L/14's text tower (49408 tokens, 77 positions, width 768, 12
    # layers, 12 heads, causal); our encoder's MLP is GELU, CLIP's quick-GELU.
    text = TextEncoderConfig(vocab_size=49408, max_length=77, width=768, num_layers=12, num_heads=12, causal=True)
    return BackboneConfig(unet=unet, vae=_sd_vae(512, 0.18215), text_encoder=text)


def _sdxl() -> BackboneConfig:
    unet = UNetConfig(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 1280 pooled text + 6 * 256
        norm_num_groups=32,
        norm_eps=1e-5,
    )
    # Stand-in for SDXL's two text towers (CLIP ViT-L 768 + OpenCLIP ViT-bigG 1280, outputs
    # concatenated to 2048): one encoder of width 2048 with bigG's depth. It does not make
    # the pooled 1280-wide ``text_embeds``; callers pass those separately.
    text = TextEncoderConfig(vocab_size=49408, max_length=77, width=2048, num_layers=32, num_heads=16, causal=True)
    return BackboneConfig(unet=unet, vae=_sd_vae(1024, 0.13025), text_encoder=text)


PRESETS = {"tiny": _tiny, "sd15": _sd15, "sdxl": _sdxl}


def preset(name: str) -> BackboneConfig:
    """Named backbone sizes: ``tiny`` (trained here), ``sd15`` and ``sdxl`` (architecture only)."""
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
