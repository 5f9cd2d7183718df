"""Word-level tokenizer for the prompts of ``meg_jax.data.shapes``.

The vocabulary is exactly the grammar's words plus three special tokens; there is no
unknown token, so a word outside the vocabulary is an error, not a silent ``<unk>``. A prompt
is encoded as ``<bos> word ... word <eos>`` padded with ``<pad>`` to a fixed length (default
16; the longest prompt, e.g. ``a large red circle at the top left on a blue background``,
takes 12 words + bos + eos = 14 tokens).

Token ids: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then the words of :data:`WORDS` from 3
on. :data:`VOCAB_SIZE` (27) is what the text encoder's ``vocab_size`` (default 64) must be at
least.

Two encoders give identical ids: :func:`encode` on host strings, and
:func:`tokens_from_attributes` on device attributes, so training batches never leave the
device.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, Attributes

__all__ = [
    "PAD",
    "BOS",
    "EOS",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "SPECIAL_TOKENS",
    "WORDS",
    "VOCAB",
    "VOCAB_SIZE",
    "MAX_PROMPT_TOKENS",
    "DEFAULT_MAX_LENGTH",
    "token_id",
    "encode",
    "decode",
    "tokens_from_attributes",
]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def _grammar_words() -> tuple[str, ...]:
    words: list[str] = []
    for w in ("a", "at", "the", "on", "background", *SIZES, *COLORS, *SHAPES):
        if w not in words:
            words.append(w)
    for position in POSITIONS:
        for w in position.split(" "):
            if w not in words:
                words.append(w)
    return tuple(words)


WORDS: tuple[str, ...] = _grammar_words()
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + WORDS
VOCAB_SIZE: int = len(VOCAB)
_ID_OF: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}

# bos + "a size color shape at the" + up to 2 position words + "on a background-colour
# background" + eos = 1 + 6 + 2 + 4 + 1.
MAX_PROMPT_TOKENS = 14
DEFAULT_MAX_LENGTH = 16


def token_id(word: str) -> int:
    """Id of one vocabulary word or special token; ValueError naming it if unknown."""
    if word not in _ID_OF:
        raise ValueError(f"word {word!r} is not in the vocabulary; known words: {list(WORDS)}")
    return _ID_OF[word]


def encode(prompts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> np.ndarray:
    """Tokenizes prompts (host side).

    Args:
      prompts: B strings of vocabulary words separated by single spaces.
      max_length: L, the padded length (bos and eos included).

    Returns:
      [B, L] int32 token ids: bos, words, eos, then pad.

    Raises:
      ValueError: an unknown word (named), or a prompt longer than ``max_length`` tokens.
    """
    if isinstance(prompts, str):
        raise ValueError("encode takes a list of prompts, got one str; wrap it in a list")
    out = np.full((len(prompts), max_length), PAD_ID, dtype=np.int32)
    for b, prompt in enumerate(prompts):
        ids = [BOS_ID] + [token_id(w) for w in prompt.split(" ")] + [EOS_ID]
        if len(ids) > max_length:
            raise ValueError(
                f"prompt {prompt!r} takes {len(ids)} tokens with bos/eos, more than "
                f"max_length={max_length}; raise max_length"
            )
        out[b, : len(ids)] = ids
    return out


def decode(tokens: np.ndarray | jax.Array) -> list[str]:
    """Turns token ids back into prompts (host side); stops at eos, drops bos and pad.

    Args:
      tokens: [B, L] integer token ids.

    Returns:
      B strings.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"decode expects tokens of shape [B, L], got {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= VOCAB_SIZE):
        raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}), got [{tokens.min()}, {tokens.max()}]")
    prompts = []
    for row in tokens:
        words = []
        for t in row:
            if t == EOS_ID:
                break
            if t not in (PAD_ID, BOS_ID):
                words.append(VOCAB[t])
        prompts.append(" ".join(words))
    return prompts


# Position words per position index: the first word always exists, the second (col word
# of a corner) only for the four corners; -1 marks "absent".
_POSITION_FIRST = np.array([token_id(p.split(" ")[0]) for p in POSITIONS], np.int32)
_POSITION_SECOND = np.array(
    [token_id(p.split(" ")[1]) if " " in p else -1 for p in POSITIONS], np.int32
)
_SIZE_IDS = np.array([token_id(w) for w in SIZES], np.int32)
_COLOR_IDS = np.array([token_id(w) for w in COLORS], np.int32)
_SHAPE_IDS = np.array([token_id(w) for w in SHAPES], np.int32)


def tokens_from_attributes(attrs: Attributes, max_length: int = DEFAULT_MAX_LENGTH) -> jax.Array:
    """Tokens of the prompts of ``attrs``, computed on device (jittable).

    Equal to ``encode(prompt_of(attrs), max_length)``.

    Args:
      attrs: Attributes of B samples.
      max_length: L >= MAX_PROMPT_TOKENS (static).

    Returns:
      [B, L] int32 token ids.
    """
    if max_length < MAX_PROMPT_TOKENS:
        raise ValueError(
            f"max_length must be >= {MAX_PROMPT_TOKENS} (longest prompt with bos/eos), got {max_length}"
        )
    batch = attrs.size.shape[0]

    def const(word_id: int) -> jax.Array:
        return jnp.full((batch,), word_id, jnp.int32)

    second = jnp.asarray(_POSITION_SECOND)[attrs.position]
    # One slot per possible token; the second position word is the only optional one.
    slots = jnp.stack(
        [
            const(BOS_ID),
            const(token_id("a")),
            jnp.asarray(_SIZE_IDS)[attrs.size],
            jnp.asarray(_COLOR_IDS)[attrs.color],
            jnp.asarray(_SHAPE_IDS)[attrs.shape],
            const(token_id("at")),
            const(token_id("the")),
            jnp.asarray(_POSITION_FIRST)[attrs.position],
            second,
            const(token_id("on")),
            const(token_id("a")),
            jnp.asarray(_COLOR_IDS)[attrs.background],
            const(token_id("background")),
            const(EOS_ID),
        ],
        axis=1,
    )  # [B, MAX_PROMPT_TOKENS]
    present = slots >= 0
    # Pack the present slots to the left: slot j goes to (number of present slots before j);
    # absent slots are sent past the end and dropped.
    target = jnp.where(present, jnp.cumsum(present, axis=1) - 1, max_length)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], target.shape)
    out = jnp.full((batch, max_length), PAD_ID, jnp.int32)
    return out.at[rows, target].set(slots, mode="drop")
