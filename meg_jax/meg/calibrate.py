"""Calibration: measure MEG's quality on the (K, r, SNR, task class) grid, write the artifact.

The environment never runs the backbone; it reads the table this module measures with the
real pipeline (``meg_jax.meg.pipeline``) and the shipped checkpoints, priced by a cost
preset (``meg_jax.meg.costs``), stored as one versioned
``meg_jax.meg.artifact.CalibrationArtifact``.

A diffusers pipeline folder (``config.pipeline``, ``meg-jax calibrate --pipeline PATH``) is
measured by ``meg_jax.meg.calibrate_pipeline`` instead: PSNR/MSE against the pipeline's own
N_ref-step image (and the CLIP score of the images vs their prompts when ``clip_model`` names
a CLIP folder), one task class, priced here the same way.

Measurement (:func:`measure`):

* ``prompts_per_class`` prompts of each task class (the shape: circle, square, triangle,
  cross), other attributes random, and one fixed noise latent per prompt, all from ``seed``;
* the reference: the teacher's guided 50-step DDIM sample, decoded, noiseless, unmerged;
* per K: the student's K-step latents, computed **once** and reused for every r and SNR
  (the ES part does not depend on them);
* per (K, r), vmapped over the whole SNR grid: merge -> link (one fixed channel
  key, so every SNR sees the same noise draw scaled differently) -> unmerge -> decode with
  the UE's decoder (the merging-aware ``ue_decoder`` when the checkpoint has one and
  ``ue_decoder`` is on; ``meg_jax.meg.pipeline.ue_decode_latents``) ->
  score with ``meg_jax.meg.schemes.score_images`` (8-bit image; attribute accuracy; PSNR vs
  the reference), averaged per task class; digital links run every SNR too;
* the conventional schemes on the same prompts and noise: the reference itself (centralised
  and on-device) and the teacher's latents over the link (MEG uncompressed), and the PNG
  size of the reference images.

Artifacts (:func:`build_artifact`): the quality of one measurement priced by any cost
preset; for ``sd15-512``/``sdxl-1024`` the quality is the tiny backbone's (the provenance
says so) and the centralised scheme's file size is the measured PNG bits per pixel times the
preset's pixels.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.meg import artifact as artifact_lib
from meg_jax.meg import costs as costs_lib
from meg_jax.meg import devices as devices_lib
from meg_jax.meg import pipeline, schemes
from meg_jax.meg.link import LinkConfig

__all__ = [
    "CalibrationConfig",
    "QualityGrid",
    "balanced_prompts",
    "measure",
    "build_artifact",
    "checkpoint_hash",
    "artifact_filename",
    "run",
]


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """What ``meg-jax calibrate`` measures and writes."""

    checkpoint: str = "checkpoints/tiny"  # shipped backbone folder (meg_jax.checkpoint.load_backbone)
    out_dir: str = "checkpoints/calibration"  # where the artifacts go (<cost preset>.npz)
    cost_presets: tuple[str, ...] = ("tiny", "sd15-512", "sdxl-1024")  # one artifact per preset
    link_mode: str = "analog"  # "analog" (quality depends on SNR) or "digital"
    fading: str = "awgn"  # analog channel: "awgn" or "rayleigh"
    bits: int = 8  # digital quantisation bits (4, 6, 8)
    bandwidth_hz: float = 5e6  # link bandwidth B (Hz): a UE's share of an NR n78 carrier
    tx_power_dbm: float = 30.0  # ES transmit power (dBm), recorded for the environment
    noise_figure_db: float = 7.0  # UE noise figure (dB), recorded for the environment
    steps: tuple[int, ...] = (1, 2, 4, 8)  # K grid
    merge_ratios: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # r grid
    # SNR grid (dB): 11 values, denser where analog quality changes fastest; holds 0, 10, 20.
    snr_db: tuple[float, ...] = (-5.0, -2.5, 0.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 25.0, 30.0)
    prompts_per_class: int = 128  # prompts per (K, r, SNR, task class) cell: 4 x 128 = 512 per (K, r, SNR)
    batch_size: int = 32  # prompts per jitted call (32 decodes fastest per image on this CPU)
    seed: int = 0  # prompts, noise and channel draws
    # Decode what crossed the link with the checkpoint's merging-aware UE decoder (ue_decoder/)
    # when it has one; --no_ue_decoder: the plain VAE decoder (the reference is always plain).
    ue_decoder: bool = True
    # --- a diffusers pipeline instead of the tiny backbone (meg_jax.meg.calibrate_pipeline) ---
    pipeline: Optional[str] = None  # pipeline folder (load_pipeline); quality = PSNR/MSE vs its N_ref-step image
    prompts: Optional[str] = None  # pipeline prompts file, one a line (default: a built-in list); cycled to prompts_per_class
    reference_steps: int = 50  # pipeline: N_ref, the reference's steps with the same scheduler
    guidance_scale: float = 7.5  # pipeline: CFG scale (LCM: the guidance embedding's w + 1)
    timestep_spacing: Optional[str] = None  # pipeline: override the scheduler's spacing (e.g. trailing); None: its own
    clip_model: Optional[str] = None  # pipeline: a transformers CLIPModel folder; also measure the CLIP score per cell

    def validate(self) -> "CalibrationConfig":
        """Raises ``ValueError`` naming the field to change."""
        problems = []
        try:
            self.link()
        except ValueError as e:
            problems.append(str(e))
        for name in self.cost_presets:
            if name not in costs_lib.COST_PRESETS:
                problems.append(f"cost_presets: unknown {name!r}; choose from {sorted(costs_lib.COST_PRESETS)}")
        if not self.cost_presets:
            problems.append("cost_presets is empty")
        if any(k < 1 for k in self.steps) or list(self.steps) != sorted(set(self.steps)):
            problems.append(f"steps must be increasing ints >= 1, got {self.steps}")
        if list(self.merge_ratios) != sorted(set(self.merge_ratios)) or len(self.merge_ratios) < 2:
            problems.append(f"merge_ratios must be >= 2 increasing values, got {self.merge_ratios}")
        if self.merge_ratios and not 0.0 <= min(self.merge_ratios) <= max(self.merge_ratios) <= 0.75:
            problems.append(f"merge_ratios must lie in [0, 0.75] (2x2 ToMe cells), got {self.merge_ratios}")
        if list(self.snr_db) != sorted(set(self.snr_db)) or len(self.snr_db) < 2:
            problems.append(f"snr_db must be >= 2 increasing values, got {self.snr_db}")
        if self.prompts_per_class < 1 or self.batch_size < 1:
            problems.append("prompts_per_class and batch_size must be >= 1")
        if self.reference_steps < 1:
            problems.append(f"reference_steps must be >= 1, got {self.reference_steps}")
        if self.timestep_spacing not in (None, "leading", "trailing", "linspace"):
            problems.append(f"timestep_spacing must be leading, trailing or linspace, got {self.timestep_spacing!r}")
        if self.pipeline is None and self.prompts is not None:
            problems.append("prompts: a prompts file is for --pipeline (the tiny backbone draws its own prompts)")
        if self.pipeline is None and self.clip_model is not None:
            problems.append("clip_model: the CLIP score is measured for --pipeline (the tiny backbone is scored by "
                            "its attribute classifier)")
        if problems:
            raise ValueError("invalid CalibrationConfig:\n  - " + "\n  - ".join(problems))
        return self

    def link(self) -> LinkConfig:
        """The link this calibration measures."""
        return LinkConfig(
            mode=self.link_mode,
            bandwidth_hz=self.bandwidth_hz,
            tx_power_dbm=self.tx_power_dbm,
            noise_figure_db=self.noise_figure_db,
            bits=self.bits,
            fading=self.fading,
        )


@dataclasses.dataclass(frozen=True)
class QualityGrid:
    """Everything :func:`measure` found (numpy, host side).

    ``K, R, S, C`` = steps, merge ratios, SNRs, task classes.
    """

    accuracy: np.ndarray  # [K, R, S, C] mean attribute accuracy
    psnr: np.ndarray  # [K, R, S, C] mean PSNR vs the reference (dB)
    num_samples: np.ndarray  # [K, R, S, C] prompts per cell
    reference_accuracy: np.ndarray  # [C] the 8-bit reference image (centralised, on-device)
    reference_psnr: np.ndarray  # [C] its PSNR vs the float reference (8-bit rounding only)
    uncompressed_accuracy: np.ndarray  # [S, C] teacher latents over the link, r = 0
    uncompressed_psnr: np.ndarray  # [S, C]
    png_bits_mean: float  # mean PNG size of the reference images (bits)
    png_bits_per_pixel: float  # the same per pixel
    task_classes: tuple[str, ...]  # C names
    seconds: float  # wall time of the measurement
    mse: Optional[np.ndarray] = None  # [K, R, S, C] mean MSE vs the reference ([-1, 1] images; pipelines)
    prompt_accuracy: Optional[np.ndarray] = None  # [K, R, S, C, P] each prompt's accuracy (replay)
    prompt_psnr: Optional[np.ndarray] = None  # [K, R, S, C, P] each prompt's PSNR (dB)
    pixel_accuracy: Optional[np.ndarray] = None  # [K, R, S, C] the analytic pixel reading's accuracy
    prompt_pixel_accuracy: Optional[np.ndarray] = None  # [K, R, S, C, P] the same per prompt
    clip_score: Optional[np.ndarray] = None  # [K, R, S, C] mean CLIP score in [0, 100] (pipelines, clip_model)
    reference_clip_score: Optional[np.ndarray] = None  # [C] the reference image's CLIP score
    uncompressed_clip_score: Optional[np.ndarray] = None  # [S, C] the teacher latents over the link, r = 0


def balanced_prompts(key: jax.Array, per_class: int, max_length: int = 16) -> tuple[jax.Array, Any]:
    """``per_class`` prompts of every task class (shape), the other attributes random.

    Args:
      key: PRNG key.
      per_class: prompts per class.
      max_length: token length (the text encoder's ``max_length``).

    Returns:
      ``(tokens [C·per_class, L], attrs)`` with the task classes in blocks of ``per_class``.
    """
    from meg_jax.data import shapes, tokenizer

    n = per_class * shapes.NUM_TASK_CLASSES
    attrs = shapes.sample_attributes(key, n)
    attrs = attrs.replace(shape=jnp.repeat(jnp.arange(shapes.NUM_TASK_CLASSES, dtype=jnp.int32), per_class))
    return tokenizer.tokens_from_attributes(attrs, max_length), attrs


@jax.jit
def _context(backbone, tokens):
    return pipeline.encode_text(backbone, tokens)


@jax.jit
def _teacher(backbone, context, noise):
    return pipeline.teacher_latents(backbone, context, noise)


@jax.jit
def _decode(backbone, latents):
    return pipeline.decode_latents(backbone, latents)


_ue_decode = jax.jit(pipeline.ue_decode_latents)  # what crossed the link, as the UE decodes it
_transmit = jax.jit(pipeline.transmit_latents, static_argnums=(1, 2))  # one (r, link) cell (figures)
_student = jax.jit(pipeline.es_latents, static_argnums=(3,))


@jax.jit
def _score_reference(backbone, reference, attrs):
    q = schemes.score_images(backbone, reference, attrs, reference)
    return q.accuracy, q.psnr


def _transmit_over_snr(
    latents: jax.Array, snr_db: jax.Array, key: jax.Array, *, merge_ratio: float, link: LinkConfig
) -> jax.Array:
    """What the UE holds for ``latents [B, h, w, C]`` at every SNR of ``snr_db [S]``: ``[S, B, h, w, C]``.

    merge -> link -> unmerge, vmapped over the SNR axis. The merge and the channel's noise
    draw do not depend on the SNR, so ``vmap`` computes them once (the key is shared: every
    SNR sees the same draw, scaled differently).
    """
    batch = latents.shape[0]

    def one(snr):
        return pipeline.transmit_latents(latents, merge_ratio, link, jnp.broadcast_to(snr, (batch,)), key)

    return jax.vmap(one)(snr_db)


def _score_received(backbone: Any, received: jax.Array, attrs: Any,
                    reference: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decodes and scores ``received [S, B, h, w, C]`` against ``reference [B, H, W, 3]``.

    The ``S·B`` latents go through the decoder, the classifier and the pixel reading as one batch.

    Returns:
      ``(accuracy [S, B], psnr [S, B], pixel_accuracy [S, B])``.
    """
    s, b = received.shape[:2]
    images = pipeline.ue_decode_latents(backbone, received.reshape((s * b,) + received.shape[2:]))
    tile = lambda a: jnp.broadcast_to(a, (s,) + a.shape).reshape((s * b,) + a.shape[1:])  # noqa: E731
    tiled = jax.tree.map(tile, attrs)
    q = schemes.score_images(backbone, images, tiled, tile(reference))
    pix = schemes.pixel_accuracy(backbone, images, tiled)
    return q.accuracy.reshape(s, b), q.psnr.reshape(s, b), pix.reshape(s, b)


# Compiled programs: one small link program per static (merge ratio, link) and one decoder +
# classifier program for every (K, r), per batch shape. Neither depends on K (the student's
# latents come in as data), so a (K, r) grid compiles R + 1 programs, not K·R.
_transmit_cells = jax.jit(_transmit_over_snr, static_argnames=("merge_ratio", "link"))
_score_cells = jax.jit(_score_received)


def _quality_over_snr(backbone, latents, attrs, reference, snrs, key, merge_ratio, link):
    # Two dispatches that stay on the device: no host transfer between or after them.
    received = _transmit_cells(latents, snrs, key, merge_ratio=merge_ratio, link=link)
    return _score_cells(backbone, received, attrs, reference)


def measure(
    backbone: Any,
    config: CalibrationConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> QualityGrid:
    """Measures quality on the grid of ``config`` with ``backbone`` (see the module docstring).

    Per batch of prompts: one jitted call per K (the student), and per (K, r) one link call
    vmapped over every SNR (:func:`_transmit_over_snr`) and one decode-and-score call on
    all of its ``S·B`` images (:func:`_score_received`), for analog and digital links alike
    (a digital link is error-free, so its rows come out flat in SNR because every SNR is
    actually sent, not by copying). Scores stay on the device until one transfer at the end;
    per batch only the reference images come to the host (their PNG size).
    """
    from meg_jax.data import shapes

    config.validate()
    link = config.link()
    num_c = shapes.NUM_TASK_CLASSES
    k_, r_, s_ = len(config.steps), len(config.merge_ratios), len(config.snr_db)
    key = jax.random.PRNGKey(config.seed)
    k_prompts, k_noise, k_channel = jax.random.split(key, 3)
    tokens, attrs = balanced_prompts(k_prompts, config.prompts_per_class,
                                     backbone.config.text_encoder.max_length)
    n = tokens.shape[0]
    h = backbone.config.latent_size
    noise = jax.random.normal(k_noise, (n, h, h, backbone.config.vae.latent_channels))
    task = np.repeat(np.arange(num_c), config.prompts_per_class)  # balanced_prompts' blocks, no transfer
    snrs = jnp.asarray(config.snr_db, jnp.float32)  # [S]

    batches = [(i, min(i + config.batch_size, n)) for i in range(0, n, config.batch_size)]
    total = len(batches) * (2 + k_ * (1 + r_))
    from meg_jax import run_log

    bar = run_log.progress(total, desc="calibrate", disable=not progress)
    start = time.time()
    reference_scores, uncompressed_scores, grid_scores, png = [], [], [], []
    for b, (lo, hi) in enumerate(batches):
        sl = slice(lo, hi)
        tok, nz = tokens[sl], noise[sl]
        at = jax.tree.map(lambda a: a[sl], attrs)
        key_b = jax.random.fold_in(k_channel, b)
        context = _context(backbone, tok)
        ref_latents = _teacher(backbone, context, nz)
        reference = _decode(backbone, ref_latents)
        reference_scores.append(_score_reference(backbone, reference, at))
        bar.update(1)
        uncompressed_scores.append(_quality_over_snr(backbone, ref_latents, at, reference, snrs, key_b, 0.0, link))
        bar.update(1)
        per_k = []
        for k in config.steps:
            latents = _student(backbone, context, nz, k)  # reused for every r and SNR
            bar.update(1)
            per_r = []
            for r in config.merge_ratios:
                per_r.append(_quality_over_snr(backbone, latents, at, reference, snrs, key_b, float(r), link))
                bar.update(1)
            per_k.append(per_r)
        grid_scores.append(per_k)
        png.append(schemes.png_bits(reference))  # the one host transfer per batch
        if log is not None:
            log(f"batch {b + 1}/{len(batches)} done after {time.time() - start:.0f} s")
    # One transfer of every score; per-sample arrays with the samples last.
    reference_scores, uncompressed_scores, grid_scores = jax.device_get(
        (reference_scores, uncompressed_scores, grid_scores))
    ref_acc, ref_psnr = (np.concatenate([np.asarray(s[i], np.float64) for s in reference_scores], -1) for i in (0, 1))
    unc_acc, unc_psnr = (np.concatenate([np.asarray(s[i], np.float64) for s in uncompressed_scores], -1)
                         for i in (0, 1))  # [S, N]
    acc, psnr, pix = (np.concatenate([np.asarray([[cell[i] for cell in row] for row in batch], np.float32)
                                      for batch in grid_scores], -1) for i in (0, 1, 2))  # [K, R, S, N]
    bar.close()

    counts = np.bincount(task, minlength=num_c)  # [C] every sample is measured in every cell
    one_hot = (task[:, None] == np.arange(num_c)[None, :]).astype(np.float64)  # [N, C]

    def class_mean(values: np.ndarray) -> np.ndarray:  # [..., N] -> [..., C]
        return (np.asarray(values, np.float64) @ one_hot) / counts

    # balanced_prompts lays the samples out in class blocks of prompts_per_class: [..., N] -> [..., C, P]
    def per_prompt(values: np.ndarray) -> np.ndarray:
        return np.asarray(values, np.float32).reshape(values.shape[:-1] + (num_c, config.prompts_per_class))

    png_bits = np.concatenate(png)
    image_size = int(reference.shape[1]) * int(reference.shape[2])
    return QualityGrid(
        accuracy=per_prompt(acc).astype(np.float64).mean(-1),  # the mean of the stored float32 values
        psnr=per_prompt(psnr).astype(np.float64).mean(-1),
        prompt_accuracy=per_prompt(acc),
        prompt_psnr=per_prompt(psnr),
        pixel_accuracy=per_prompt(pix).astype(np.float64).mean(-1),
        prompt_pixel_accuracy=per_prompt(pix),
        num_samples=np.broadcast_to(counts, (k_, r_, s_, num_c)).astype(np.int64).copy(),
        reference_accuracy=class_mean(ref_acc),
        reference_psnr=class_mean(ref_psnr),
        uncompressed_accuracy=class_mean(unc_acc),
        uncompressed_psnr=class_mean(unc_psnr),
        png_bits_mean=float(png_bits.mean()),
        png_bits_per_pixel=float(png_bits.mean() / image_size),
        task_classes=tuple(shapes.SHAPES[:num_c]),
        seconds=time.time() - start,
    )


def _flops_time(flops: float, profile: devices_lib.DeviceProfile) -> float:
    return float(devices_lib.compute_time(flops, profile))


def _flops_energy(flops: float, profile: devices_lib.DeviceProfile) -> float:
    return float(devices_lib.compute_energy(flops, profile))


def build_artifact(
    grid: QualityGrid,
    config: CalibrationConfig,
    cost_preset: str | costs_lib.CostPreset,
    provenance: dict[str, Any],
) -> artifact_lib.CalibrationArtifact:
    """Prices the measured quality with ``cost_preset`` into a validated artifact.

    Args:
      grid: from :func:`measure`.
      config: the calibration config (grids, link).
      cost_preset: name or preset (FLOPs, devices).
      provenance: at least ``backbone_checkpoint_hash``, ``backbone_preset`` and ``command``;
        ``cost_preset`` and ``created`` are filled in here when absent.
    """
    preset = costs_lib.cost_preset(cost_preset) if isinstance(cost_preset, str) else cost_preset
    link = config.link()
    es, ue = preset.es, preset.ue
    s_, c_ = len(config.snr_db), len(grid.task_classes)

    es_time = [
        _flops_time(preset.text_encoder_flops + k * preset.student_unet_evals * preset.unet_flops, es)
        for k in config.steps
    ]
    loads = [costs_lib.latent_payload(preset, link, r) for r in config.merge_ratios]
    payload = [float(l.data_bits if link.mode == "digital" else l.data_symbols) for l in loads]
    side = [float(l.side_bits) for l in loads]
    ue_time = [_flops_time(preset.vae_decoder_flops, ue)] * len(config.merge_ratios)
    ue_energy = [_flops_energy(preset.vae_decoder_flops, ue)] * len(config.merge_ratios)

    teacher_unet = preset.teacher_steps * preset.teacher_unet_evals * preset.unet_flops
    pixels = preset.image_size * preset.image_size
    image_bits = grid.png_bits_per_pixel * pixels
    ref_acc = np.broadcast_to(grid.reference_accuracy, (s_, c_)).copy()
    ref_psnr = np.broadcast_to(grid.reference_psnr, (s_, c_)).copy()
    full = loads[0] if config.merge_ratios[0] == 0.0 else costs_lib.latent_payload(preset, link, 0.0)
    conventional = {
        "centralised": artifact_lib.ConventionalScheme(
            link_mode="digital",
            es_compute_time_s=_flops_time(preset.text_encoder_flops + teacher_unet + preset.vae_decoder_flops, es),
            payload=float(image_bits),
            side_info_bits=0.0,
            ue_compute_time_s=0.0,
            ue_compute_energy_j=0.0,
            accuracy=ref_acc,
            psnr=ref_psnr,
        ),
        "meg_uncompressed": artifact_lib.ConventionalScheme(
            link_mode=link.mode,
            es_compute_time_s=_flops_time(preset.text_encoder_flops + teacher_unet, es),
            payload=float(full.data_bits if link.mode == "digital" else full.data_symbols),
            side_info_bits=float(full.side_bits),
            ue_compute_time_s=_flops_time(preset.vae_decoder_flops, ue),
            ue_compute_energy_j=_flops_energy(preset.vae_decoder_flops, ue),
            accuracy=grid.uncompressed_accuracy,
            psnr=grid.uncompressed_psnr,
        ),
        "on_device": artifact_lib.ConventionalScheme(
            link_mode="none",
            es_compute_time_s=0.0,
            payload=0.0,
            side_info_bits=0.0,
            ue_compute_time_s=_flops_time(preset.text_encoder_flops + teacher_unet + preset.vae_decoder_flops, ue),
            ue_compute_energy_j=_flops_energy(preset.text_encoder_flops + teacher_unet + preset.vae_decoder_flops, ue),
            accuracy=ref_acc,
            psnr=ref_psnr,
        ),
    }
    prov = {
        "cost_preset": preset.name,
        "created": datetime.date.today().isoformat(),
        **provenance,
        "es_device": es.name,
        "ue_device": ue.name,
        "es_device_source": es.source,
        "ue_device_source": ue.source,
        "flops": {
            "text_encoder": preset.text_encoder_flops,
            "unet": preset.unet_flops,
            "vae_decoder": preset.vae_decoder_flops,
            "student_unet_evals_per_step": preset.student_unet_evals,
            "teacher_unet_evals_per_step": preset.teacher_unet_evals,
            "teacher_steps": preset.teacher_steps,
        },
        "latent": [preset.latent_size, preset.latent_size, preset.latent_channels],
        "image_size": preset.image_size,
        "fading": link.fading,
        "quality_source": provenance.get("quality_source", "measured with the backbone named by backbone_checkpoint_hash"),
        "accuracy_definition": "fraction of the 5 prompt attributes the classifier reads right on the 8-bit image",
        "psnr_definition": "PSNR (data range 2) of the 8-bit image vs the teacher's 50-step float image",
        "pixel_accuracy_definition": ("fraction of the 5 prompt attributes the analytic pixel reading "
                                      "(meg_jax.data.pixel_reading) reads right on the 8-bit image"),
        **{k: provenance[k] for k in ("accuracy_definition", "psnr_definition") if k in provenance},
        **({"mse": grid.mse.tolist()} if grid.mse is not None else {}),
        "png_bits_per_pixel": grid.png_bits_per_pixel,
        "centralised_image_bits": float(image_bits),
        "not_counted": "ES merge, UE unmerge, prompt uplink, queueing",
        "prompts_per_class": config.prompts_per_class,
        "seed": config.seed,
        "measure_seconds": grid.seconds,
    }
    return artifact_lib.CalibrationArtifact(
        steps=np.asarray(config.steps, np.int64),
        merge_ratios=np.asarray(config.merge_ratios, np.float64),
        snr_db=np.asarray(config.snr_db, np.float64),
        task_classes=grid.task_classes,
        accuracy=grid.accuracy,
        psnr=grid.psnr,
        num_samples=grid.num_samples,
        prompt_accuracy=grid.prompt_accuracy,
        prompt_psnr=grid.prompt_psnr,
        pixel_accuracy=grid.pixel_accuracy,
        prompt_pixel_accuracy=grid.prompt_pixel_accuracy,
        clip_score=grid.clip_score,
        es_compute_time_s=np.asarray(es_time),
        payload=np.asarray(payload),
        side_info_bits=np.asarray(side),
        ue_compute_time_s=np.asarray(ue_time),
        ue_compute_energy_j=np.asarray(ue_energy),
        ue_receive_power_w=ue.rx_power_w,
        bandwidth_hz=link.bandwidth_hz,
        link_mode=link.mode,
        bits_per_value=link.bits if link.mode == "digital" else None,
        tx_power_dbm=link.tx_power_dbm,
        noise_figure_db=link.noise_figure_db,
        provenance=prov,
        conventional_schemes=conventional,
    ).validate()


def checkpoint_hash(path: str | os.PathLike) -> str:
    """SHA-256 over every file of a checkpoint folder (relative paths and contents, sorted)."""
    path = os.fspath(path)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def artifact_filename(config: CalibrationConfig, cost_preset: str) -> str:
    """``<preset>.npz`` for the default analog AWGN link, else tagged with the link.

    A pipeline's artifacts are prefixed with the pipeline folder's name
    (``<folder>-<preset>.npz``), so they never replace the tiny backbone's.
    """
    prefix = "" if config.pipeline is None else os.path.basename(os.path.normpath(config.pipeline)) + "-"
    if config.link_mode == "analog" and config.fading == "awgn":
        return f"{prefix}{cost_preset}.npz"
    tag = f"digital{config.bits}" if config.link_mode == "digital" else f"analog-{config.fading}"
    return f"{prefix}{cost_preset}-{tag}.npz"


def run(
    config: CalibrationConfig,
    *,
    command: str,
    backbone: Any | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Measures once and writes one artifact per cost preset; returns preset -> path.

    Args:
      config: what to measure and where to write.
      command: the command line that made it (stored in the provenance).
      backbone: a loaded ``Backbone``; default ``load_backbone(config.checkpoint)``.
      progress: show the progress bar.
      log: where progress lines go.
    """
    config.validate()
    if config.pipeline is not None:
        return _run_pipeline(config, command=command, progress=progress, log=log)
    if backbone is None:
        from meg_jax.checkpoint import load_backbone

        backbone = load_backbone(config.checkpoint, ue_decoder=config.ue_decoder)
        ckpt_hash = checkpoint_hash(config.checkpoint)
        backbone_preset = _backbone_preset_name(config.checkpoint)
        checkpoint = config.checkpoint
    else:
        ckpt_hash = "in-memory backbone (not a checkpoint folder)"
        backbone_preset = "unknown"
        checkpoint = None
    grid = measure(backbone, config, progress=progress, log=log)
    log(f"measured {int(grid.num_samples.sum())} cell-samples in {grid.seconds:.0f} s")
    paths = {}
    for name in config.cost_presets:
        art = build_artifact(
            grid, config, name,
            {
                "backbone_checkpoint_hash": ckpt_hash,
                "backbone_checkpoint": checkpoint,
                "backbone_preset": backbone_preset,
                "command": command,
                "quality_source": f"{backbone_preset} backbone at {checkpoint} ({ckpt_hash})",
                "ue_decoder": ("merging-aware (ue_decoder/)" if getattr(backbone, "ue_decoder", None) is not None
                               else "plain VAE decoder"),
            },
        )
        path = os.path.join(config.out_dir, artifact_filename(config, name))
        art.save(path)
        paths[name] = path
        log(f"wrote {path}")
    return paths


def _run_pipeline(config: CalibrationConfig, *, command: str, progress: bool,
                  log: Callable[[str], None]) -> dict[str, str]:
    """:func:`run` for ``config.pipeline`` (``meg_jax.meg.calibrate_pipeline``)."""
    from meg_jax.meg import calibrate_pipeline as cp

    scorer = None
    if config.clip_model is not None:  # loaded first: a bad CLIP folder fails before the long measurement
        from meg_jax.backbone.clip_score import load_clip_scorer

        scorer = load_clip_scorer(config.clip_model)
    gen = cp.load_generator(config)
    prompts = cp.read_prompts(config.prompts, config.prompts_per_class)
    grid = cp.measure_generator(gen, config, prompts, progress=progress, log=log, scorer=scorer)
    log(f"measured {len(prompts)} prompts on {grid.psnr.size} cells in {grid.seconds:.0f} s")
    prov = cp.provenance(gen, config, prompts, command, checkpoint_hash(config.pipeline), grid)
    paths = {}
    for name in config.cost_presets:
        path = os.path.join(config.out_dir, artifact_filename(config, name))
        build_artifact(grid, config, name, prov).save(path)
        paths[name] = path
        log(f"wrote {path}")
    return paths


def _backbone_preset_name(checkpoint: str) -> str:
    import json

    with open(os.path.join(checkpoint, "backbone.json")) as f:
        meta = json.load(f)
    return str(meta.get("distill_preset", "unknown"))

