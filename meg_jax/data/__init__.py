"""Procedural text-to-image data (coloured shapes with prompts), its tokenizer, and the
attribute classifier that scores generated images (DESIGN.md section 4).

* :mod:`meg_jax.data.shapes` — the grammar, attributes, on-device rendering and batches.
* :mod:`meg_jax.data.tokenizer` — word-level tokens, host (``encode``) and device
  (``tokens_from_attributes``) side.
* :mod:`meg_jax.data.classifier` — a small CNN predicting every attribute, its training step
  and evaluation; its penultimate features feed a Fréchet distance.

Image-caption data from disk (DESIGN.md section 9), every source behind one grain loader:

* :mod:`meg_jax.data.sources` — image folders, webdataset tar shards, ``datasets`` saved to
  disk, and the procedural shapes, as grain random-access sources of (image, caption) records.
* :mod:`meg_jax.data.loader` — decode, resize + centre-crop, batch; seeded order, process
  sharding, prefetch, resumable iterator state, skip-or-raise on bad records.
* :mod:`meg_jax.data.cache` — encoder outputs (VAE latents, text embeddings) computed once
  into sharded files, read back as a source.

Those three import grain (about a second), so their names here load on first use.
"""

import importlib
from typing import Any

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

# Loaded on first access (PEP 562): name -> defining module.
_LAZY = {
    **{n: "meg_jax.data.sources" for n in ("DataRecordError", "ImageFolderSource", "TarShardSource",
                                            "DiskDatasetSource", "ShapesSource")},
    **{n: "meg_jax.data.loader" for n in ("LoaderConfig", "ImageCaptionLoader", "prepare_image")},
    **{n: "meg_jax.data.cache" for n in ("write_latent_cache", "LatentCacheSource")},
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'meg_jax.data' has no attribute {name!r}")


__all__ = [
    *_LAZY,
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
