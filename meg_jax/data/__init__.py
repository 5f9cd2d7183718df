"""Procedural text-to-image data (coloured shapes with prompts), its tokenizer, and the
attribute classifier that scores generated images (DESIGN.md section 4).

* :mod:`meg_jax.data.shapes` — the grammar, attributes, on-device rendering and batches.
* :mod:`meg_jax.data.tokenizer` — word-level tokens, host (``encode``) and device
  (``tokens_from_attributes``) side.
* :mod:`meg_jax.data.classifier` — a small CNN predicting every attribute, its training step
  and evaluation; its penultimate features feed a Fréchet distance.
"""

from meg_jax.data.shapes import (
    ATTRIBUTE_NAMES,
    COLORS,
    NUM_CLASSES,
    NUM_TASK_CLASSES,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    ShapesConfig,
    attributes_of_prompt,
    attributes_of_prompts,
    prompt_of,
    render,
    sample_attributes,
    sample_batch,
    task_class,
)
from meg_jax.data.tokenizer import VOCAB_SIZE, decode, encode, tokens_from_attributes

__all__ = [
    "ATTRIBUTE_NAMES",
    "COLORS",
    "NUM_CLASSES",
    "NUM_TASK_CLASSES",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Attributes",
    "ShapesConfig",
    "attributes_of_prompt",
    "attributes_of_prompts",
    "prompt_of",
    "render",
    "sample_attributes",
    "sample_batch",
    "task_class",
    "VOCAB_SIZE",
    "decode",
    "encode",
    "tokens_from_attributes",
]
