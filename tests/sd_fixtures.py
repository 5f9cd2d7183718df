"""Tiny Stable-Diffusion building blocks written to disk for tests (no downloads).

A plain helper module, not a test file: tests import it as ``from sd_fixtures import ...``
(pytest puts ``tests/`` on ``sys.path`` because the folder has no ``__init__.py``; every
xdist worker does the same). Everything here is built by transformers' PyTorch classes and
written with their ``save_pretrained``, so folders look exactly like the ones users own.

* :func:`clip_vocab_and_merges` — a hand-made byte-level CLIP BPE vocabulary: the 256 byte
  symbols and their ``</w>`` (end-of-word) forms in CLIP's order, merges learned from
  :data:`FIXTURE_WORDS` so each of those words is one token, then ``<|startoftext|>`` and
  ``<|endoftext|>`` last (as in CLIP, so the end token has the highest id).
* :func:`save_clip_tokenizer` — a ``CLIPTokenizer`` folder (transformers' layout, or the
  hub's ``vocab.json`` + ``merges.txt`` layout of SD 1.x/2.x/SDXL checkpoints).
* :func:`clip_text_config` / :func:`save_clip_text_encoder` — tiny random
  ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` folders, with old (``eos_token_id=2``)
  or new (the real end-token id) configs, ``quick_gelu`` or ``gelu``, fp32/fp16/bf16 storage.
* :func:`save_clip_model` — a tiny random ``CLIPModel`` folder (text + vision towers, the
  tokenizer, optionally ``preprocessor_config.json``) for the CLIP score.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Words that become single tokens: the shapes grammar of meg_jax.data.shapes, plus the usual
# words of Stable Diffusion prompts so tests can write natural ones.
FIXTURE_WORDS: tuple[str, ...] = (
    # meg_jax.data.shapes
    "a", "small", "large", "red", "green", "blue", "yellow", "cyan", "magenta", "white", "black",
    "circle", "square", "triangle", "cross", "at", "the", "top", "left", "center", "right",
    "bottom", "on", "background",
    # common prompt words
    "an", "of", "in", "and", "with", "photo", "picture", "painting", "astronaut", "riding",
    "horse", "moon", "cat", "dog", "sitting", "house", "tree", "sky", "sun", "city", "night",
    "high", "quality", "detailed", "blurry", "low", "ugly", "orange", "purple", "gray",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode symbol table (CLIP's vocab order of bytes)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Greedy BPE training until every word is one symbol (most frequent pair first).

    Encoding a training word with the learned merges by rank replays training, so each word
    of ``words`` tokenizes to exactly one token.
    """
    table = bytes_to_unicode()
    seqs = []
    for w in dict.fromkeys(words):
        symbols = [table[b] for b in w.encode("utf-8")]
        symbols[-1] += "</w>"
        seqs.append(symbols)
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter((s[i], s[i + 1]) for s in seqs for i in range(len(s) - 1))
        if not counts:
            return merges
        pair = max(counts, key=lambda p: (counts[p], p))  # ties broken by the pair itself: deterministic
        merges.append(pair)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == pair:
                    s[i : i + 2] = [s[i] + s[i + 1]]
                i += 1


def clip_vocab_and_merges(words: Sequence[str] = FIXTURE_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-layout BPE vocabulary (token -> id) and its merges.

    Layout as CLIP's: ids [0, 256) the byte symbols (``!`` is 0), [256, 512) the same with
    ``</w>``, then one token per merge, then ``<|startoftext|>``, ``<|endoftext|>`` (largest).
    Any text tokenizes (unknown words fall back to byte symbols).
    """
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = _learn_merges(words)
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def clip_vocab_size(words: Sequence[str] = FIXTURE_WORDS) -> int:
    """Number of ids of :func:`clip_vocab_and_merges` (the text encoders' ``vocab_size``)."""
    return len(clip_vocab_and_merges(words)[0])


def save_clip_tokenizer(
    path: str | os.PathLike,
    *,
    model_max_length: int = 77,
    pad_token: str = EOS_TOKEN,
    layout: str = "transformers",
    words: Sequence[str] = FIXTURE_WORDS,
) -> Any:
    """Writes a ``CLIPTokenizer`` folder and returns the transformers tokenizer.

    Args:
      path: folder to write (created).
      model_max_length: the tokenizer's ``model_max_length`` (diffusers pads prompts to it).
      pad_token: ``<|endoftext|>`` (SD 1.x) or ``!`` (SD 2.x, SDXL's second tokenizer).
      layout: ``"transformers"``: what ``save_pretrained`` writes (``tokenizer.json`` +
        ``tokenizer_config.json``); ``"hub"``: ``vocab.json`` + ``merges.txt`` +
        ``tokenizer_config.json`` + ``special_tokens_map.json`` with no ``tokenizer.json``,
        as SD 1.5 on the hub stores it (special tokens as AddedToken objects);
        ``"hub_v4"``: the same files as transformers 4.3x wrote them (SD 2.x, SDXL: plain
        special tokens, flags in ``added_tokens_decoder``).
      words: words that get their own token.

    Returns:
      The ``transformers.CLIPTokenizer`` the folder holds.
    """
    from transformers import CLIPTokenizer

    path = os.fspath(path)
    vocab, merges = clip_vocab_and_merges(words)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)
    if layout == "transformers":
        tok.save_pretrained(path)
        return tok
    if layout not in ("hub", "hub_v4"):
        raise ValueError(f"layout must be 'transformers', 'hub' or 'hub_v4', got {layout!r}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # The forms SD 1.5's tokenizer folder uses: AddedToken dicts (normalized) and a plain pad string.
    def added(content: str) -> dict[str, Any]:
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special = {"bos_token": added(BOS_TOKEN), "eos_token": added(EOS_TOKEN), "unk_token": added(EOS_TOKEN),
               "pad_token": pad_token}
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer",
              **{k: {"__type": "AddedToken", **v} if isinstance(v, dict) else v for k, v in special.items()}}
    if layout == "hub_v4":
        # What transformers 4.3x wrote (SD 2.x, SDXL on the hub): plain-string special tokens,
        # their flags in added_tokens_decoder.
        config = {**config, **{k: v["content"] if isinstance(v, dict) else v for k, v in special.items()}}
        config["added_tokens_decoder"] = {
            str(vocab[t]): {**added(t), "special": True} for t in dict.fromkeys([pad_token, BOS_TOKEN, EOS_TOKEN])
        }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return CLIPTokenizer.from_pretrained(path)


def clip_text_config(
    *,
    hidden_act: str = "quick_gelu",
    legacy_eos: bool = False,
    hidden_size: int = 32,
    intermediate_size: int = 37,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    max_position_embeddings: int = 77,
    projection_dim: int = 32,
    pad_token: str = EOS_TOKEN,
    words: Sequence[str] = FIXTURE_WORDS,
    **overrides: Any,
) -> Any:
    """A tiny ``transformers.CLIPTextConfig`` matching :func:`clip_vocab_and_merges`.

    Args:
      hidden_act: ``quick_gelu`` (SD 1.x) or ``gelu`` (SD 2.x, SDXL).
      legacy_eos: ``eos_token_id=2`` (bos 0, pad 1) as configs written before transformers
        PR #24773 (the SD checkpoints) — pooling then takes the argmax of the ids; else the
        real ids of the fixture vocabulary (pooling at the first end token).
      pad_token: the tokenizer's pad token, for ``pad_token_id`` in new configs.
      **overrides: any other ``CLIPTextConfig`` field.
    """
    from transformers import CLIPTextConfig

    vocab, _ = clip_vocab_and_merges(words)
    if legacy_eos:
        ids = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
    else:
        ids = {"bos_token_id": vocab[BOS_TOKEN], "pad_token_id": vocab[pad_token], "eos_token_id": vocab[EOS_TOKEN]}
    kwargs = dict(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        projection_dim=projection_dim,
        hidden_act=hidden_act,
        **ids,
    )
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def random_clip_text_model(config: Any, *, with_projection: bool = False, seed: int = 0, noise: float = 0.1) -> Any:
    """A random ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (eval mode, float32).

    transformers' init leaves LayerNorms at 1/0 and draws small weights; N(0, noise^2) is
    added to every parameter so each one matters to the output (a parity test then checks them
    all). Deterministic in ``seed``; the global torch RNG is left as it was.
    """
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config).eval()
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen))
    return model


def save_clip_text_encoder(
    path: str | os.PathLike,
    *,
    with_projection: bool = False,
    seed: int = 0,
    dtype: Any = None,
    **config_kwargs: Any,
) -> Any:
    """Writes a tiny random CLIP text encoder folder (``config.json`` + ``model.safetensors``).

    Args:
      path: folder to write.
      with_projection: ``CLIPTextModelWithProjection`` (SDXL's second encoder) instead of
        ``CLIPTextModel``.
      seed: weights seed.
      dtype: torch dtype of the stored weights (``torch.float16`` / ``torch.bfloat16`` as
        users store them); None = float32.
      **config_kwargs: passed to :func:`clip_text_config` (``hidden_act``, ``legacy_eos`` ...).

    Returns:
      The PyTorch model in float32 whose weights equal the stored ones (fp16/bf16 storage
      rounds them; the returned model holds the rounded values), in eval mode.
    """
    import torch

    model = random_clip_text_model(clip_text_config(**config_kwargs), with_projection=with_projection, seed=seed)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
        model.save_pretrained(os.fspath(path))
        return model.to(torch.float32).eval()
    model.save_pretrained(os.fspath(path))
    return model


def save_tiny_sd_pipeline(path: str | os.PathLike, *, max_length: int = 16, seed: int = 0,
                          scheduler: str = "PNDMScheduler") -> str:
    """Writes a tiny random ``StableDiffusionPipeline`` folder (SD-1.x layout) and returns its path.

    UNet: one cross-attention level of 8 channels on 8 x 8 x 4 latents (``sample_size`` 8),
    cross-attention width 32; VAE: two levels (8, 16), one downsample, so images are 16 x 16;
    CLIP text encoder of width 32 with :func:`save_clip_tokenizer`'s vocabulary and
    ``max_length`` positions. Weights are perturbed by N(0, 0.05²) so every norm and bias
    matters. The scheduler is SD-1.5's (``scheduler``: its class, PNDM as on the hub),
    epsilon prediction.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    path = os.fspath(path)

    def perturb(module: Any, s: int) -> Any:
        gen = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        return module.eval()

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = perturb(UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8,),
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            norm_num_groups=4, cross_attention_dim=32, attention_head_dim=2), seed + 1)
        vae = perturb(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                                    sample_size=16, scaling_factor=0.5), seed + 2)
    text = random_clip_text_model(clip_text_config(hidden_size=32, max_position_embeddings=max_length), seed=seed + 3)
    save_clip_tokenizer(os.path.join(path, "_tokenizer"), model_max_length=max_length)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "_tokenizer"))
    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
              steps_offset=1, num_train_timesteps=1000)
    sched = {"PNDMScheduler": lambda: PNDMScheduler(skip_prk_steps=True, **sd),
             "DDIMScheduler": lambda: DDIMScheduler(clip_sample=False, **sd)}[scheduler]()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    import shutil

    shutil.rmtree(os.path.join(path, "_tokenizer"))
    return path


def save_clip_model(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    text_act: str = "gelu",
    vision_act: str = "quick_gelu",
    image_size: int = 32,
    patch_size: int = 8,
    projection_dim: int = 24,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> Any:
    """Writes a tiny random transformers ``CLIPModel`` folder (a CLIP-score model) and returns it.

    Text tower: :func:`clip_text_config` (width 32, 2 layers, the fixture vocabulary, new
    ``eos_token_id``); vision tower: width 32, 2 layers, 4 heads, ``image_size`` /
    ``patch_size`` (32 / 8: 16 patches + the class token); both projected to
    ``projection_dim`` (!= 32, so a transposed projection fails). Weights perturbed by
    N(0, 0.1²) as :func:`random_clip_text_model`. The folder also holds the tokenizer
    (:func:`save_clip_tokenizer`) and, when ``image_mean`` / ``image_std`` are given, a
    ``preprocessor_config.json`` (``CLIPImageProcessor`` at ``image_size`` with them).

    Returns:
      The float32 ``transformers.CLIPModel`` in eval mode.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = os.fspath(path)
    text = clip_text_config(hidden_act=text_act).to_dict()
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4, hidden_act=vision_act)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    save_clip_tokenizer(path)
    if image_mean is not None or image_std is not None:
        kwargs = {k: list(v) for k, v in (("image_mean", image_mean), ("image_std", image_std)) if v is not None}
        CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                           **kwargs).save_pretrained(path)
    return model
