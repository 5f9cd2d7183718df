"""One generator interface for the MEG path: the tiny backbone and a diffusers pipeline.

The split path (``meg_jax.meg.pipeline.generate``) and the calibration
(``meg_jax.meg.calibrate``) need four things from a model, and ask nothing else:

* ``encode(prompts)``: the conditioning pytree the ES denoises with (prompt encoding and,
  where the model uses guidance, the negative/unconditional encoding);
* ``es_latents(cond, noise, K)``: K ES denoising steps from unit Gaussian noise
  ``[B, h, w, C]`` (NHWC) -> latents ``[B, h, w, C]`` in the denoiser's units (what is merged
  and sent over the link);
* ``reference_latents(cond, noise)``: the full-quality sample of the same prompt and noise
  (the teacher), the quality reference;
* ``decode(latents)``: latents -> images ``[B, H, W, 3]`` float32 in **[-1, 1]**, clipped,
  the project's one image convention (``meg_jax.distill.decode_latents``; a diffusers
  pipeline's [0, 1] output is mapped by ``2 x - 1``), so PSNR has data range 2 everywhere.

plus ``latent_shape(batch)`` and a ``describe()`` dict for provenance.

Adapters:

* :class:`BackboneGenerator`: the shipped tiny backbone (``meg_jax.checkpoint.Backbone``):
  its own text encoder (unconditional = zero context, as trained), the step-conditioned
  student for the K ES steps (a distilled student), the teacher's guided DDIM sample as
  the reference;
* :class:`PipelineGenerator`: a ``meg_jax.backbone.load_pipeline`` pipeline: the pipeline's
  own prompt encoding (encoded negative prompt, ``""`` by default, when CFG runs), the
  **same scheduler** run for K steps at the ES and for ``reference_steps`` = N_ref steps for
  the reference (``StableDiffusionPipeline.denoise``, one compile per step count), the
  pipeline's VAE decode.

:func:`as_generator` turns either model (or a generator) into a generator.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp

__all__ = ["Generator", "BackboneGenerator", "PipelineGenerator", "as_generator"]


@runtime_checkable
class Generator(Protocol):
    """What the MEG path needs from a text-to-image latent diffusion model (module docstring)."""

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        """NHWC latent shape ``[B, h, w, C]``."""
        ...

    def encode(self, prompts: Any) -> Any:
        """Prompts -> conditioning pytree (includes the negative/unconditional encoding if used)."""
        ...

    def es_latents(self, cond: Any, noise: jax.Array, steps: int) -> jax.Array:
        """K ES denoising steps: noise ``[B, h, w, C]`` -> latents ``[B, h, w, C]``."""
        ...

    def reference_latents(self, cond: Any, noise: jax.Array) -> jax.Array:
        """The full-quality (teacher) latents of the same prompts and noise."""
        ...

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents ``[B, h, w, C]`` -> images ``[B, H, W, 3]`` float32 in [-1, 1]."""
        ...

    def describe(self) -> dict[str, Any]:
        """Provenance: what model this is (JSON-ready)."""
        ...


@dataclasses.dataclass(frozen=True, eq=False)
class BackboneGenerator:
    """The shipped tiny backbone as a :class:`Generator` (its existing pipeline functions).

    Attributes:
      backbone: ``meg_jax.checkpoint.Backbone``.
    """

    backbone: Any

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        cfg = self.backbone.config
        return batch, cfg.latent_size, cfg.latent_size, cfg.vae.latent_channels

    def encode(self, prompts: Any) -> jax.Array:
        """Prompts (list of str) or token ids ``[B, L]`` -> context ``[B, L, D]``."""
        from meg_jax.meg import pipeline

        return _backbone_context(self.backbone, pipeline.tokenize(self.backbone, prompts))

    def es_latents(self, cond: jax.Array, noise: jax.Array, steps: int) -> jax.Array:
        return _backbone_student(self.backbone, cond, noise, steps)

    def reference_latents(self, cond: jax.Array, noise: jax.Array) -> jax.Array:
        return _backbone_teacher(self.backbone, cond, noise)

    def decode(self, latents: jax.Array) -> jax.Array:
        return _backbone_decode(self.backbone, latents)

    def describe(self) -> dict[str, Any]:
        return {"kind": "tiny backbone", "teacher_steps": int(self.backbone.sampling.teacher_steps)}


def _bb_context(backbone, tokens):
    from meg_jax.meg import pipeline

    return pipeline.encode_text(backbone, tokens)


def _bb_student(backbone, context, noise, steps):
    from meg_jax.meg import pipeline

    return pipeline.es_latents(backbone, context, noise, steps)


def _bb_teacher(backbone, context, noise):
    from meg_jax.meg import pipeline

    return pipeline.teacher_latents(backbone, context, noise)


def _bb_decode(backbone, latents):
    from meg_jax.meg import pipeline

    return pipeline.decode_latents(backbone, latents)


_backbone_context = jax.jit(_bb_context)
_backbone_student = jax.jit(_bb_student, static_argnums=(3,))
_backbone_teacher = jax.jit(_bb_teacher)
_backbone_decode = jax.jit(_bb_decode)


@dataclasses.dataclass(frozen=True, eq=False)
class PipelineGenerator:
    """A diffusers pipeline (``meg_jax.backbone.load_pipeline``) as a :class:`Generator`.

    The ES runs the pipeline's own scheduler for K steps; the reference is the same
    scheduler at ``reference_steps`` (N_ref) steps on the same noise and conditioning, so
    quality is "how close K steps get to the pipeline's own full-step image".

    Attributes:
      pipe: ``meg_jax.backbone.sd_pipeline.StableDiffusionPipeline``.
      reference_steps: N_ref, the teacher's step count (diffusers' default is 50 for SD,
        4 for LCM).
      guidance_scale: CFG scale (or the LCM guidance embedding's w + 1), as diffusers'.
      negative_prompt: None (diffusers' default) or one string for every prompt.
      seed: key of the stochastic schedulers' per-step noise (Euler-a, LCM); fixed, so
        every K and the reference see the same draws.
    """

    pipe: Any
    reference_steps: int = 50
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.reference_steps, int) or self.reference_steps < 1:
            raise ValueError(f"reference_steps must be an int >= 1, got {self.reference_steps!r}")

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        return self.pipe.latent_shape(batch)

    def encode(self, prompts: Sequence[str]) -> Any:
        """B prompts -> ``PromptEmbeds`` (with the encoded negative when CFG runs)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("a pipeline generator takes a list of prompt strings")
        negative = None if self.negative_prompt is None else [self.negative_prompt] * len(prompts)
        return self.pipe.encode_prompt(list(prompts), negative, guidance_scale=self.guidance_scale)

    def _denoise(self, cond: Any, noise: jax.Array, steps: int) -> jax.Array:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        return self.pipe.denoise(cond, noise, steps, guidance_scale=self.guidance_scale,
                                 key=jax.random.key(self.seed))

    def es_latents(self, cond: Any, noise: jax.Array, steps: int) -> jax.Array:
        return self._denoise(cond, noise, steps)

    def reference_latents(self, cond: Any, noise: jax.Array) -> jax.Array:
        return self._denoise(cond, noise, self.reference_steps)

    def decode(self, latents: jax.Array) -> jax.Array:
        # the pipeline's [0, 1] image (diffusers' "np") in the project's [-1, 1] convention
        return self.pipe.decode(latents) * 2.0 - 1.0

    def describe(self) -> dict[str, Any]:
        sched = self.pipe.scheduler
        return {
            "kind": "diffusers pipeline",
            "path": self.pipe.path,
            "class_name": self.pipe.class_name,
            "scheduler": sched.class_name,
            "timestep_spacing": dict(sched.config).get("timestep_spacing"),
            "reference_steps": self.reference_steps,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": self.negative_prompt,
            "dtype": str(jnp.dtype(self.pipe.dtype)),
        }


def as_generator(model: Any, **pipeline_options: Any) -> Generator:
    """``model`` as a :class:`Generator`.

    Args:
      model: a generator (returned as is), a ``StableDiffusionPipeline`` (wrapped in
        :class:`PipelineGenerator` with ``pipeline_options``) or a tiny ``Backbone``.
    """
    from meg_jax.backbone.sd_pipeline import StableDiffusionPipeline

    if isinstance(model, (BackboneGenerator, PipelineGenerator)):
        return model
    if isinstance(model, StableDiffusionPipeline):
        return PipelineGenerator(model, **pipeline_options)
    if pipeline_options:
        raise ValueError(f"options {sorted(pipeline_options)} apply to a diffusers pipeline only")
    if hasattr(model, "student") and hasattr(model, "config"):
        return BackboneGenerator(model)
    if isinstance(model, Generator):
        return model
    raise TypeError(f"cannot use a {type(model).__name__} as a MEG generator (want a Backbone, a pipeline "
                    "from meg_jax.backbone.load_pipeline, or a meg_jax.meg.generator.Generator)")
