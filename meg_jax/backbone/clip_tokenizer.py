"""CLIP's tokenizer loaded from a pipeline folder with the ``tokenizers`` library, padded and
truncated as diffusers' ``encode_prompt`` does (``meg_jax.backbone.clip`` re-exports it)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from meg_jax.config import read_json_object

__all__ = ["CLIPTokenizer", "load_tokenizer"]

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# Tokens above this are transformers' "no limit" sentinel (int(1e30)), not a length.
_MAX_SANE_LENGTH = 1_000_000
# CLIPTokenizer's pre-tokenizer pattern (transformers' tokenization_clip.py).
_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token_spec(value: Any, where: str) -> tuple[str, dict[str, bool]] | None:
    """A special-token entry of tokenizer_config.json: plain string or AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value, {"normalized": False}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return value["content"], flags
    raise ValueError(f"{where}: a special token must be a string or an AddedToken object, got {value!r}")


class CLIPTokenizer:
    """Prompts -> CLIP token ids, padded and truncated as diffusers' ``encode_prompt``.

    ``tokenizer(prompts)`` is transformers' ``CLIPTokenizer(prompts, padding="max_length",
    max_length=model_max_length, truncation=True).input_ids`` as an int32 array. Build it
    with :func:`load_tokenizer`.

    Attributes:
      model_max_length: L, the padded length (the text encoder's positions).
      bos_token_id, eos_token_id, pad_token_id: the special ids.
      vocab_size: ids including the added special tokens.
      backend: the ``tokenizers.Tokenizer`` (padding and truncation enabled).
    """

    def __init__(self, backend: Any, model_max_length: int, bos_token: str, eos_token: str, pad_token: str):
        self.backend = backend
        self.model_max_length = model_max_length
        self.bos_token_id = backend.token_to_id(bos_token)
        self.eos_token_id = backend.token_to_id(eos_token)
        self.pad_token_id = backend.token_to_id(pad_token)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask.

        Args:
          prompts: one prompt or B prompts.

        Returns:
          ``(input_ids, attention_mask)``, both int32 [B, model_max_length]; the mask is 1 for
          real tokens (bos, text, eos) and 0 for padding.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        if not prompts:
            empty = np.zeros((0, self.model_max_length), np.int32)
            return empty, empty.copy()
        encodings = self.backend.encode_batch(prompts)
        ids = np.asarray([e.ids for e in encodings], np.int32)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32)
        return ids, mask

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """int32 [B, model_max_length] token ids (see :meth:`encode`)."""
        return self.encode(prompts)[0]


def load_tokenizer(folder: str | os.PathLike, max_length: int | None = None) -> CLIPTokenizer:
    """Loads a ``CLIPTokenizer`` folder (``tokenizer/`` of a pipeline) on the ``tokenizers`` library.

    Reads the vocabulary and merges from ``tokenizer.json`` when present (what transformers
    5 writes, and what it reads first), else from ``vocab.json`` + ``merges.txt`` (the hub's
    SD checkpoints); the special tokens and ``model_max_length`` from ``tokenizer_config.json``
    (then ``special_tokens_map.json``; CLIP's defaults for tokens it does not name).

    Args:
      folder: the tokenizer folder.
      max_length: padded length L; None = the folder's ``model_max_length`` (what diffusers
        pads to).

    Returns:
      A :class:`CLIPTokenizer`.

    Raises:
      FileNotFoundError: no ``tokenizer.json`` and no ``vocab.json`` + ``merges.txt`` (named).
      ValueError: naming the file: no usable ``model_max_length``, a ``tokenizer_class``
        other than CLIP's, unreadable files, special tokens missing from the vocabulary, or
        tokens added after training (textual inversion; not read).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    folder = os.fspath(folder)
    tok_json = os.path.join(folder, "tokenizer.json")
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    cfg_file, map_file = os.path.join(folder, "tokenizer_config.json"), os.path.join(folder, "special_tokens_map.json")
    config = read_json_object(cfg_file) if os.path.isfile(cfg_file) else {}
    token_map = read_json_object(map_file) if os.path.isfile(map_file) else {}
    if config.get("tokenizer_class", "CLIPTokenizer") not in ("CLIPTokenizer", "CLIPTokenizerFast"):
        raise ValueError(
            f"{cfg_file}: tokenizer_class={config['tokenizer_class']!r}; meg-jax reads CLIP tokenizers only"
        )

    if os.path.isfile(tok_json):
        model = read_json_object(tok_json).get("model", {})
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise ValueError(f"{tok_json}: expected a BPE model with a vocab, got model type {model.get('type')!r}")
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        source = tok_json
    elif os.path.isfile(vocab_file) and os.path.isfile(merges_file):
        try:
            vocab, merges = BPE.read_file(vocab_file, merges_file)
        except Exception as e:  # tokenizers raises plain Exception for malformed files
            raise ValueError(f"{vocab_file} / {merges_file}: not a BPE vocabulary and merges: {e}") from e
        source = vocab_file
    else:
        raise FileNotFoundError(
            f"{folder}: a CLIP tokenizer folder needs tokenizer.json, or vocab.json and merges.txt; found "
            f"{sorted(os.listdir(folder)) if os.path.isdir(folder) else 'no such folder'}"
        )

    # Special tokens: transformers takes tokenizer_config.json's values over special_tokens_map.json's.
    specs: dict[str, tuple[str, dict[str, bool]]] = {}
    defaults = {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS}
    for name, default in defaults.items():
        if name in config:
            spec = _token_spec(config[name], cfg_file)
        elif name in token_map:
            spec = _token_spec(token_map[name], map_file)
        else:
            spec = (default, {"normalized": False})
        if spec is None:
            raise ValueError(f"{cfg_file}: {name} is null; a CLIP tokenizer needs one")
        specs[name] = spec
    for name, (content, _) in specs.items():
        if content not in vocab:
            raise ValueError(f"{source}: {name} {content!r} is not in the vocabulary")

    backend = Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="</w>",
            fuse_unk=False, unk_token=specs["unk_token"][0])
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    # Added tokens, as transformers 5 resolves them: a folder written by transformers 4.3x lists
    # every added token with its flags in tokenizer_config.json's added_tokens_decoder, and a
    # special token named there by a plain string takes those flags; otherwise a plain string
    # is matched on the raw text (normalized=False) and an AddedToken object keeps its own.
    # Named tokens go in transformers' order; a later entry with the same text wins.
    added: dict[str, dict[str, bool]] = {}
    for token_id, entry in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        spec = _token_spec(entry, f"{cfg_file}: added_tokens_decoder[{token_id}]")
        if spec is None or vocab.get(spec[0]) != int(token_id):
            raise ValueError(
                f"{cfg_file}: added token {entry!r} with id {token_id} is not that id of the vocabulary "
                "(tokens added after training, e.g. textual inversion, are not read)"
            )
        added[spec[0]] = spec[1]
    listed = dict(added)
    extra_file = os.path.join(folder, "added_tokens.json")  # transformers 4's list of tokens added later
    for content, token_id in (read_json_object(extra_file) if os.path.isfile(extra_file) else {}).items():
        if vocab.get(content) != token_id:
            raise ValueError(
                f"{extra_file}: added token {content!r} with id {token_id} is not that id of the vocabulary "
                "(tokens added after training, e.g. textual inversion, are not read)"
            )
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        content, flags = specs[name]
        plain = isinstance(config.get(name, token_map.get(name)), str)
        added[content] = listed[content] if plain and content in listed else flags
    backend.add_special_tokens([AddedToken(c, special=True, **f) for c, f in added.items()])
    bos, eos, pad = specs["bos_token"][0], specs["eos_token"][0], specs["pad_token"][0]
    backend.post_processor = processors.RobertaProcessing(
        (eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False, add_prefix_space=False
    )

    if max_length is None:
        max_length = config.get("model_max_length")
        if isinstance(max_length, float) and max_length.is_integer():
            max_length = int(max_length)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= _MAX_SANE_LENGTH:
            raise ValueError(
                f"{cfg_file}: model_max_length={max_length!r} is not a usable prompt length (diffusers pads "
                "prompts to it); pass max_length= (77 for SD's CLIP)"
            )
    elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (bos + eos), got {max_length!r}")
    backend.enable_truncation(max_length=max_length)
    backend.enable_padding(direction="right", pad_id=vocab[pad], pad_token=pad, length=max_length)
    return CLIPTokenizer(backend, max_length, bos, eos, pad)
