"""What the distillation stages keep on disk between them: finished params, the latent scale,
the teacher's latent cache and the student's teacher targets (resumable chunks)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax import checkpoint as ckpt
from meg_jax import run_log
from meg_jax.data.shapes import sample_batch
from meg_jax.distill import losses
from meg_jax.distill.config import DistillConfig
from meg_jax.distill.objectives import Models



def _final_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage, "final")


def stage_done(workdir: str, stage: str) -> bool:
    """Whether ``stage`` of ``workdir`` has finished (its ``final/DONE`` marker exists)."""
    return os.path.exists(os.path.join(_final_dir(workdir, stage), "DONE"))


def mark_done(workdir: str, stage: str, steps: int) -> None:
    """Marks ``stage`` finished after ``steps`` steps (written last, after its final params)."""
    with open(os.path.join(_final_dir(workdir, stage), "DONE"), "w") as f:
        f.write(f"{steps}\n")


def save_final(workdir: str, stage: str, params: Mapping[str, Any]) -> None:
    """Writes a finished stage's EMA params as safetensors (read by later stages and export)."""
    folder = _final_dir(workdir, stage)
    os.makedirs(folder, exist_ok=True)
    for part, p in params.items():
        ckpt.save_params(p, os.path.join(folder, f"{part}.safetensors"))


def load_final(workdir: str, stage: str, parts: tuple[str, ...]) -> dict[str, Any]:
    """Reads the finished stage's params written by ``save_final``."""
    folder = _final_dir(workdir, stage)
    missing = [p for p in parts if not os.path.exists(os.path.join(folder, f"{p}.safetensors"))]
    if missing:
        raise FileNotFoundError(
            f"stage {stage!r} has not finished in {workdir} (missing {missing} in {folder}); "
            f"run `--stage {stage}` first"
        )
    return {p: ckpt.load_params(os.path.join(folder, f"{p}.safetensors")) for p in parts}


def measure_latent_scale(models: Models, vae_params: Any, config: DistillConfig) -> float:
    """1 / std of the VAE's latent means over fresh images (so teacher latents have unit std)."""
    n = config.teacher.latent_scale_samples
    key = jax.random.fold_in(jax.random.PRNGKey(config.teacher.seed), 0x5CA1E)
    images, _, _ = sample_batch(key, n, config.data)
    mean, _ = jax.jit(lambda p, x: models.vae.apply(p, x, method="encode"))(vae_params, images)
    return float(1.0 / jnp.std(mean))


def latent_scale(workdir: str, models: Models, vae_params: Any, config: DistillConfig) -> float:
    """The latent scale of this work directory (measured once, cached as JSON)."""
    path = os.path.join(workdir, "vae", "latent_scale.json")
    if os.path.exists(path):
        with open(path) as f:
            return float(json.load(f)["latent_scale"])
    scale = measure_latent_scale(models, vae_params, config)
    tmp = f"{path}.{os.getpid()}.tmp"  # stages may run side by side in one work directory
    with open(tmp, "w") as f:
        json.dump({"latent_scale": scale}, f)
    os.replace(tmp, path)
    return scale


def make_latent_cache(workdir: str, models: Models, config: DistillConfig, vae: Any, scale: float,
                      progress: bool = True, stage: str = "teacher") -> dict[str, np.ndarray]:
    """Scaled VAE latents and tokens of ``<stage>.num_latents`` generated images (cached, resumable).

    Chunk ``i`` draws its images from ``fold_in(PRNGKey(<stage>.seed + 2), i)``; ``stage``
    is "teacher" or "teacher_ft" (each has its own seed and cache folder).

    Returns:
      ``{"latents": [N, h, w, c] float32, "tokens": [N, L] int32}``.
    """
    cfg = getattr(config, stage)
    folder = os.path.join(workdir, stage, "latents")
    os.makedirs(folder, exist_ok=True)

    @jax.jit
    def chunk_fn(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        images, tokens, _ = sample_batch(key, cfg.latent_chunk, config.data)
        mean, _ = models.vae.apply(vae, images, method="encode")
        return mean * scale, tokens

    return _cached_chunks(folder, cfg.num_latents // cfg.latent_chunk, chunk_fn,
                          jax.random.PRNGKey(cfg.seed + 2), ("latents", "tokens"), f"{stage} latents", progress)


def _cached_chunks(folder: str, num_chunks: int, chunk_fn: Callable, base: jax.Array,
                   names: tuple[str, ...], desc: str, progress: bool) -> dict[str, np.ndarray]:
    """Runs ``chunk_fn(fold_in(base, i))`` for each chunk not yet on disk; returns all, concatenated."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    bar = run_log.progress(num_chunks, desc=desc, disable=not progress)
    for i in range(num_chunks):
        path = os.path.join(folder, f"chunk_{i:05d}.npz")
        if not os.path.exists(path):
            arrays = jax.device_get(chunk_fn(jax.random.fold_in(base, i)))
            with open(path + ".tmp", "wb") as f:
                np.savez(f, **dict(zip(names, arrays)))
            os.replace(path + ".tmp", path)
        with np.load(path) as data:
            for k in names:
                parts[k].append(data[k])
        bar.update(1)
    bar.close()
    return {k: np.concatenate(v) for k, v in parts.items()}


def make_targets(workdir: str, models: Models, config: DistillConfig, teacher: Mapping[str, Any],
                 progress: bool = True) -> dict[str, np.ndarray]:
    """Teacher DDIM samples (with CFG) from (noise, prompt) pairs, cached in resumable chunks.

    Chunk ``i`` uses key ``fold_in(PRNGKey(student.seed + 1), i)``: noise ``[C, h, w, c]``
    and prompts of a fresh batch; the teacher's EMA params sample ``target_steps`` trailing
    DDIM steps with ``sampling.guidance_scale``.

    Returns:
      ``{"noise": [N, h, w, c], "tokens": [N, L] int32, "latents": [N, h, w, c]}``.
    """
    cfg = config.student
    folder = os.path.join(workdir, "student", "targets")
    os.makedirs(folder, exist_ok=True)
    b = config.backbone
    h = b.latent_size
    c = b.vae.latent_channels
    pred = b.prediction_type

    @jax.jit
    def chunk_fn(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        k_data, k_noise = jax.random.split(key)
        _, tokens, _ = sample_batch(k_data, cfg.target_chunk, config.data)
        noise = jax.random.normal(k_noise, (cfg.target_chunk, h, h, c))
        context = models.text_encoder.apply(teacher["text_encoder"], tokens)
        latents = losses.teacher_sample(models.unet, teacher["unet"], models.schedule, noise, context,
                                        num_steps=cfg.target_steps,
                                        guidance_scale=config.sampling.guidance_scale,
                                        prediction_type=pred, spacing=config.sampling.spacing)
        return noise, tokens, latents

    return _cached_chunks(folder, cfg.num_targets // cfg.target_chunk, chunk_fn,
                          jax.random.PRNGKey(cfg.seed + 1), ("noise", "tokens", "latents"),
                          "teacher targets", progress)


def student_init(workdir: str, config: DistillConfig, template: Any) -> Any:
    """The student's starting UNet params from ``student.init_weights`` (continue a student).

    ``init_weights`` is an exported backbone folder (its ``student/unet.safetensors``) or a
    ``.safetensors`` file. Where the weights came from (path, sha256, the component's stage
    record) is written once to ``WORKDIR/student/init.json``, so the export can record it
    even after the source folder is overwritten.

    Args:
      workdir: the work directory.
      config: the job config.
      template: the UNet params the student would start from (the teacher copy): the loaded
        tree must have the same parameter names and shapes.

    Raises:
      FileNotFoundError: no such file (the message names it).
      ValueError: a parameter missing, extra or of another shape (named, with the file).
    """
    from meg_jax.distill.seeding import file_sha256

    path = config.student.init_weights
    file = path if path.endswith(".safetensors") else os.path.join(path, "student", "unet.safetensors")
    if not os.path.exists(file):
        raise FileNotFoundError(f"--student.init_weights {path}: {file} not found (expected an exported backbone "
                                "folder with student/unet.safetensors, or a .safetensors file)")
    params = ckpt.load_params(file)
    want = {k: v.shape for k, v in ckpt.flatten_params(template).items()}
    got = {k: v.shape for k, v in ckpt.flatten_params(params).items()}
    bad = sorted(set(want) ^ set(got)) or [k for k in sorted(want) if want[k] != got[k]]
    if bad:
        k = bad[0]
        raise ValueError(f"--student.init_weights {path}: {file} does not fit the student UNet: parameter {k!r} "
                         f"has shape {got.get(k, 'missing')}, the config needs {want.get(k, 'none')} "
                         f"({len(bad)} parameter(s) differ)")
    record_path = os.path.join(workdir, "student", "init.json")
    if not os.path.exists(record_path):
        meta_path = os.path.join(os.path.dirname(file), ckpt.CONFIG_FILE)
        stage = None
        if not path.endswith(".safetensors") and os.path.exists(meta_path):
            stage = ckpt.read_json(meta_path, "the student's settings").get("stage")
        os.makedirs(os.path.dirname(record_path), exist_ok=True)
        with open(record_path, "w") as f:
            json.dump({"path": path, "sha256": file_sha256(file), "stage": stage}, f, indent=2, sort_keys=True)
            f.write("\n")
    return params

