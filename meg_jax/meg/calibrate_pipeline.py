"""Calibration of a diffusers pipeline (``meg-jax calibrate --pipeline PATH``).

Same grid, link and pricing as the tiny backbone's calibration (``meg_jax.meg.calibrate``);
what differs is the model and the quality measure:

* the model: ``meg_jax.backbone.load_pipeline(PATH)`` as a
  ``meg_jax.meg.generator.PipelineGenerator``: the ES runs the pipeline's own scheduler for
  K steps, the reference is the same scheduler at ``reference_steps`` = N_ref steps on the
  same prompt, noise and guidance (optionally with ``timestep_spacing`` overridden for both);
* the prompts: ``prompts_per_class`` prompts taken in order (cycled) from ``--prompts FILE``
  (one prompt a line) or the built-in :data:`DEFAULT_PROMPTS`; one task class, ``"all"``;
* quality: there is no attribute classifier for a general pipeline, so quality is measured
  as **PSNR** (data range 2, the 8-bit image vs the pipeline's own N_ref-step float image,
  capped at :data:`PSNR_CAP_DB` where the two are identical) and **MSE** (same images, the
  [-1, 1] scale; stored in the provenance as ``mse`` ``[K][R][S][C]``). The artifact's
  ``accuracy`` table, which the environment's reward reads with weight
  ``1 - reward_psnr_weight``, holds the PSNR-based score ``clip(PSNR / 40 dB, 0, 1)`` per
  image (averaged per cell): the same term the environment's ``psnr / psnr_scale_db`` mix
  uses at its default ``psnr_scale_db = 40``, so an environment trained on a pipeline
  artifact optimises PSNR against the full-step image whatever ``reward_psnr_weight`` is.
  The provenance's ``accuracy_definition`` says so;
* prompt adherence, when ``clip_model`` names a transformers ``CLIPModel`` folder
  (``--clip_model DIR``): the **CLIP score** (``meg_jax.backbone.clip_score``: 100 x the
  clamped cosine of the CLIP image and prompt embeddings, torchmetrics' definition) of every
  8-bit image against its own prompt, averaged per cell into the artifact's optional
  ``clip_score`` table [K, R, S, C]; the reference's and the uncompressed scheme's scores go
  to the provenance (``clip_score_reference``, ``clip_score_uncompressed``), with the CLIP
  folder (``clip_model``) and its hash. The environment's reward does not read it.

The provenance names the pipeline: ``pipeline`` (path, ``model_index.json`` class,
scheduler, N_ref, guidance) and ``backbone_checkpoint_hash`` = SHA-256 of every file of the
folder (configs and weights).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.meg import generator as generator_lib
from meg_jax.meg import schemes

__all__ = ["DEFAULT_PROMPTS", "PSNR_CAP_DB", "PSNR_SCORE_SCALE_DB", "read_prompts", "load_generator",
           "measure_generator", "provenance"]

# A small, varied built-in prompt list (used when no --prompts file is given).
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photo of an astronaut riding a horse on the moon",
    "a red bicycle leaning against a brick wall",
    "a bowl of fruit on a wooden table, still life",
    "a lighthouse on a rocky coast at sunset",
    "a cat sleeping on a windowsill in the sun",
    "a city street at night in the rain, neon lights",
    "a snowy mountain lake with pine trees",
    "a watercolor painting of a sailing boat",
)
PSNR_CAP_DB = 100.0  # PSNR of identical 8-bit images (MSE 0) is reported as this, not +inf
PSNR_SCORE_SCALE_DB = 40.0  # the accuracy table's score: clip(PSNR / this, 0, 1) (= env psnr_scale_db)


def read_prompts(path: str | None, count: int) -> list[str]:
    """``count`` prompts, cycled in order from ``path`` (one a line; blank lines skipped) or the built-ins."""
    if path is None:
        base = list(DEFAULT_PROMPTS)
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompts: {path}: no such file")
        with open(path, encoding="utf-8") as f:
            base = [line.strip() for line in f if line.strip()]
        if not base:
            raise ValueError(f"prompts: {path} holds no prompt (one prompt a line)")
    return [base[i % len(base)] for i in range(count)]


def load_generator(config: Any) -> generator_lib.PipelineGenerator:
    """The pipeline of ``config.pipeline`` as a generator with the config's N_ref, guidance, spacing."""
    from meg_jax.backbone import load_pipeline

    pipe = load_pipeline(config.pipeline)
    if config.timestep_spacing is not None:
        sched = pipe.scheduler
        pipe = pipe.with_scheduler({**dict(sched.config), "_class_name": sched.class_name,
                                    "timestep_spacing": config.timestep_spacing})
    return generator_lib.PipelineGenerator(pipe, reference_steps=config.reference_steps,
                                           guidance_scale=config.guidance_scale, seed=config.seed)


@jax.jit
def _scores(images: jax.Array, reference: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(PSNR [N], MSE [N]) of the 8-bit ``images`` vs the float ``reference`` (both [-1, 1])."""
    diff = schemes.to_display(images) - reference
    mse = jnp.mean(jnp.square(diff), axis=(1, 2, 3))
    psnr = jnp.where(mse > 0, 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-30)), PSNR_CAP_DB)
    return jnp.minimum(psnr, PSNR_CAP_DB), mse


def _clip_scores(scorer: Any, images: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """CLIP scores [N] of [-1, 1] images [N, H, W, 3] (8-bit rounded) vs unit text embeddings [N, P]."""
    return scorer.score_embeds((schemes.to_display(images) + 1.0) / 2.0, text_embeds)


def _score_over_snr(gen, latents, reference, snrs, key, merge_ratio, link, scorer=None, text_embeds=None):
    """PSNR [S, B], MSE [S, B] and CLIP score [S, B] (None without ``scorer``) of ``latents`` sent
    at every SNR (one link call, one decode)."""
    from meg_jax.meg import calibrate

    received = calibrate._transmit_cells(latents, snrs, key, merge_ratio=merge_ratio, link=link)
    s, b = received.shape[:2]
    images = gen.decode(received.reshape((s * b,) + received.shape[2:]))
    ref = jnp.broadcast_to(reference, (s,) + reference.shape).reshape((s * b,) + reference.shape[1:])
    psnr, mse = _scores(images, ref)
    clip = None
    if scorer is not None:  # images are SNR-major ([S * B]): the B prompts' embeddings repeat S times
        clip = _clip_scores(scorer, images, jnp.tile(text_embeds, (s, 1))).reshape(s, b)
    return psnr.reshape(s, b), mse.reshape(s, b), clip


def measure_generator(
    gen: generator_lib.Generator,
    config: Any,
    prompts: Sequence[str],
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    scorer: Any | None = None,
) -> Any:
    """Measures PSNR/MSE (and the CLIP score) on the (K, r, SNR) grid of ``config`` (module docstring).

    Args:
      gen: the generator (a pipeline's, or any :class:`~meg_jax.meg.generator.Generator`).
      config: ``meg_jax.meg.calibrate.CalibrationConfig`` (grids, link, batch size, seed).
      prompts: N prompts.
      scorer: a ``meg_jax.backbone.clip_score.CLIPScorer``: also score every image against
        its prompt; None: no CLIP score.

    Returns:
      ``meg_jax.meg.calibrate.QualityGrid`` with one task class ``"all"``, ``accuracy`` the
      PSNR-based score and ``mse`` set; ``clip_score`` (and the reference's and uncompressed
      scheme's) when ``scorer`` is given.
    """
    from meg_jax import run_log
    from meg_jax.meg.calibrate import QualityGrid

    link = config.link()
    prompts = list(prompts)
    n = len(prompts)
    k_, r_, s_ = len(config.steps), len(config.merge_ratios), len(config.snr_db)
    _, k_noise, k_channel = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    noise = jax.random.normal(k_noise, gen.latent_shape(n))
    snrs = jnp.asarray(config.snr_db, jnp.float32)
    batches = [(i, min(i + config.batch_size, n)) for i in range(0, n, config.batch_size)]
    bar = run_log.progress(len(batches) * (2 + k_ * (1 + r_)), desc="calibrate", disable=not progress)
    start = time.time()
    ref_scores, unc_scores, grid_scores, png = [], [], [], []
    for b, (lo, hi) in enumerate(batches):
        nz, key_b = noise[lo:hi], jax.random.fold_in(k_channel, b)
        cond = gen.encode(prompts[lo:hi])
        text = None if scorer is None else scorer.text_embeds(prompts[lo:hi])
        ref_latents = gen.reference_latents(cond, nz)
        reference = gen.decode(ref_latents)
        ref_scores.append((*_scores(reference, reference),
                           None if scorer is None else _clip_scores(scorer, reference, text)))
        bar.update(1)
        unc_scores.append(_score_over_snr(gen, ref_latents, reference, snrs, key_b, 0.0, link, scorer, text))
        bar.update(1)
        per_k = []
        for k in config.steps:
            latents = gen.es_latents(cond, nz, int(k))  # reused for every r and SNR
            bar.update(1)
            per_r = []
            for r in config.merge_ratios:
                per_r.append(_score_over_snr(gen, latents, reference, snrs, key_b, float(r), link, scorer, text))
                bar.update(1)
            per_k.append(per_r)
        grid_scores.append(per_k)
        png.append(schemes.png_bits(reference))
        if log is not None:
            log(f"batch {b + 1}/{len(batches)} done after {time.time() - start:.0f} s")
    bar.close()
    ref_scores, unc_scores, grid_scores = jax.device_get((ref_scores, unc_scores, grid_scores))
    cat = lambda parts, i: np.concatenate([np.asarray(p[i], np.float64) for p in parts], -1)  # noqa: E731
    ref_psnr, unc_psnr = cat(ref_scores, 0), cat(unc_scores, 0)  # [N], [S, N]
    psnr, mse = (np.concatenate([np.asarray([[cell[i] for cell in row] for row in batch], np.float64)
                                 for batch in grid_scores], -1) for i in (0, 1))  # [K, R, S, N]
    clip = {}
    if scorer is not None:  # the means over the N images, [..., C=1]
        clip = dict(
            clip_score=np.concatenate([np.asarray([[cell[2] for cell in row] for row in batch], np.float64)
                                       for batch in grid_scores], -1).mean(-1)[..., None],
            reference_clip_score=cat(ref_scores, 2).mean(-1)[..., None],
            uncompressed_clip_score=cat(unc_scores, 2).mean(-1)[..., None],
        )
    score = lambda p: np.clip(p / PSNR_SCORE_SCALE_DB, 0.0, 1.0)  # noqa: E731
    mean = lambda a: a.mean(-1)[..., None]  # [..., N] -> [..., C=1]  # noqa: E731
    png_bits = np.concatenate(png)
    image_size = int(reference.shape[1]) * int(reference.shape[2])
    # per-prompt tables [K, R, S, C=1, N] (the env's per-request replay); the class tables are
    # the means of the stored float32 values
    prompt_acc, prompt_psnr = (a.astype(np.float32)[..., None, :] for a in (score(psnr), psnr))
    return QualityGrid(
        accuracy=prompt_acc.astype(np.float64).mean(-1),
        psnr=prompt_psnr.astype(np.float64).mean(-1),
        prompt_accuracy=prompt_acc,
        prompt_psnr=prompt_psnr,
        num_samples=np.full((k_, r_, s_, 1), n, np.int64),
        reference_accuracy=mean(score(ref_psnr)),
        reference_psnr=mean(ref_psnr),
        uncompressed_accuracy=mean(score(unc_psnr)),
        uncompressed_psnr=mean(unc_psnr),
        png_bits_mean=float(png_bits.mean()),
        png_bits_per_pixel=float(png_bits.mean() / image_size),
        task_classes=("all",),
        seconds=time.time() - start,
        mse=mean(mse),
        **clip,
    )


def provenance(gen: generator_lib.PipelineGenerator, config: Any, prompts: Sequence[str], command: str,
               pipeline_hash: str, grid: Any | None = None) -> dict[str, Any]:
    """The artifact provenance of a pipeline calibration (names the pipeline and the CLIP model; definitions)."""
    desc = gen.describe()
    clip = {}
    if config.clip_model is not None:
        from meg_jax.meg.calibrate import checkpoint_hash

        clip = {
            "clip_model": os.path.abspath(config.clip_model),
            "clip_model_hash": checkpoint_hash(config.clip_model),
            "clip_score_definition": ("100 x max(cos(CLIP image embedding, CLIP text embedding), 0) of the 8-bit "
                                      "image vs its own prompt (torchmetrics' CLIPScore, clamped per image), "
                                      "averaged over the cell's images; CLIP model at clip_model"),
        }
        if grid is not None and grid.clip_score is not None:
            clip["clip_score_reference"] = grid.reference_clip_score.tolist()  # [C]
            clip["clip_score_uncompressed"] = grid.uncompressed_clip_score.tolist()  # [S][C]
    return {
        **clip,
        "backbone_checkpoint_hash": pipeline_hash,
        "backbone_checkpoint": os.path.abspath(config.pipeline),
        "backbone_preset": f"pipeline:{desc['class_name']}",
        "command": command,
        "pipeline": {**desc, "hash": pipeline_hash},
        "quality_source": f"{desc['class_name']} pipeline at {os.path.abspath(config.pipeline)} ({pipeline_hash}), "
                          f"{desc['scheduler']} K steps vs {desc['reference_steps']} steps",
        "accuracy_definition": (f"no classifier: PSNR-based score clip(PSNR / {PSNR_SCORE_SCALE_DB:g} dB, 0, 1) per "
                                "image, averaged (the env's psnr / psnr_scale_db term at its default scale)"),
        "psnr_definition": (f"PSNR (data range 2, capped at {PSNR_CAP_DB:g} dB) of the 8-bit image vs the pipeline's "
                            f"own {desc['reference_steps']}-step float image, same prompt, noise and guidance"),
        "mse_definition": "mean squared error of the 8-bit image vs that reference, both in [-1, 1]",
        "prompts": list(dict.fromkeys(prompts)),
        "prompts_file": config.prompts,
    }

