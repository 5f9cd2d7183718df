"""A user's diffusers Stable Diffusion folder as the student stage's frozen teacher, and
image–caption data from disk as what it is distilled on (``DistillConfig.pipeline``).

What the student stage does with a pipeline (the objective is the procedural one,
``objectives.student_loss_fn``: K unrolled student DDIM steps regressed onto the teacher's
guided many-step DDIM sample from the same start):

* **Teacher**: the pipeline's UNet, float32 master weights computing in ``compute.dtype``,
  sampled with ``student.target_steps`` DDIM steps (``sampling.spacing``) and classifier-free
  guidance at the fixed ``sampling.guidance_scale``, the unconditional branch being the
  pipeline's own CLIP embedding of the empty prompt (diffusers' default negative prompt).
  The guidance is distilled at that one w: the student has no guidance input (it is sampled
  without CFG, as diffusers runs a UNet with ``time_cond_proj_dim``); another w means
  another distillation.
* **Schedule**: the β table and ``prediction_type`` of the folder's ``scheduler/`` config,
  whatever its class (SD-1.5 ships PNDM), sampled as DDIM (η = 0, ``set_alpha_to_one=False``).
* **Student**: the teacher UNet with ``time_cond_proj_dim = sampling.step_embedding_dim``
  added and its ``cond_proj`` kernel at zero (as LCM adds a guidance projection to a stock
  UNet), so at step 0 the student is exactly the teacher; the step count K enters as
  ``losses.step_embedding(K)`` through ``timestep_cond``.
* **Text**: the pipeline's CLIP text encoder (frozen, ``last_hidden_state``) on the pipeline
  tokenizer's ids of each caption.
* **Data**: records of an image folder (``metadata.jsonl`` or a ``.txt`` beside each image)
  or webdataset tar shards, through the grain loader (``meg_jax.data.loader``): decoded,
  resized + centre-cropped to the pipeline's size, seeded order, split over processes,
  bad records skipped with a counted warning or raised naming the file
  (``pipeline.on_error``). Each image is encoded once by the pipeline's VAE (posterior
  mean × ``scaling_factor``) and noised to the first timestep t₀ of the samplers (999 for
  trailing spacing): the rollouts of teacher and student start from
  ``x_t₀ = sqrt(ᾱ_t₀) x₀ + sqrt(1 − ᾱ_t₀) ε``, the exact forward marginal of the data,
  instead of pure noise (at SD's schedule sqrt(ᾱ_999) = 0.068: close to the N(0, I) start of
  inference, but the data's low frequencies are there, so the teacher's targets follow the
  data's captions *and* images).

The targets (start, tokens, teacher sample) are made once in resumable chunks of
``student.target_chunk`` records (``WORKDIR/student/targets/chunk_*.npz``), each computed on
the whole mesh (batch split over ``"data"``; the teacher laid out by ``parallel.params``).
Each process stores its grain iterator state after every chunk
(``chunk_*.grain-<process>.json``, written before the chunk), so an interrupted run restores
the loader where the last finished chunk left it: the records of every chunk, and so the
whole run, are identical to an uninterrupted one.

Supported: ``StableDiffusionPipeline`` folders (SD 1.x/2.x) whose UNet has no
``time_cond_proj_dim`` or added conditioning. SDXL (two encoders, pooled embeddings) and
already-distilled LCM folders are refused, naming the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax import config as config_lib
from meg_jax import parallel, partition, run_log
from meg_jax.backbone import schedules
from meg_jax.backbone.config import UNetConfig, VAEConfig
from meg_jax.distill.config import DistillConfig

__all__ = [
    "CLIPContext",
    "PipelineSpec",
    "read_pipeline",
    "pipeline_models",
    "scheduler_config",
    "image_resolution",
    "open_source",
    "init_student",
    "make_pipeline_targets",
    "student_inputs",
    "pipeline_record",
    "export",
]

log = logging.getLogger(__name__)

# Keys of a diffusers scheduler config that define the noise schedule and what the UNet
# predicts; every scheduler class that SD folders ship (PNDM, DDIM, Euler, ...) has them.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "rescale_betas_zero_snr", "steps_offset")


@dataclasses.dataclass(frozen=True)
class CLIPContext:
    """A pipeline's CLIP text encoder as the student's text encoder (``Models.text_encoder``).

    ``apply(params, tokens [B, L] int32) -> last_hidden_state [B, L, D]`` (no attention mask:
    SD's encoders are read without one, see ``read_pipeline``).
    """

    encoder: Any  # meg_jax.backbone.clip.CLIPTextTransformer

    def apply(self, params: Any, tokens: jax.Array) -> jax.Array:
        return self.encoder.apply({"params": params}, tokens, None).last_hidden_state


class CLIPTokenIds:
    """The loader's tokenizer: caption -> ``[L]`` int32 ids of the pipeline's CLIP tokenizer
    (padded/truncated to its ``model_max_length``, as diffusers' ``encode_prompt``)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, caption: str) -> np.ndarray:
        return self.tokenizer.encode([caption])[0][0]


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """What a pipeline folder's configs say (no weights read).

    Attributes:
      path: the folder.
      teacher_unet: the teacher UNet's config.
      student_unet: the same with ``time_cond_proj_dim`` = the step-embedding width.
      vae: the VAE's config (``scaling_factor`` scales its latents).
      text: the CLIP text encoder's config.
      scheduler: the folder's schedule as a DDIM ``schedulers.Scheduler``.
      scheduler_config: that DDIM config (what the export writes).
      prediction_type: "epsilon", "v_prediction" or "sample".
    """

    path: str
    teacher_unet: UNetConfig
    student_unet: UNetConfig
    vae: VAEConfig
    text: Any
    scheduler: Any
    scheduler_config: Mapping[str, Any]
    prediction_type: str


def _folder(value: str, field: str) -> str:
    if not value:
        raise ValueError(f"pipeline.{field} is empty: pass --pipeline.{field} PATH")
    return os.path.abspath(os.path.expanduser(value))


def scheduler_config(path: str, spacing: str) -> dict[str, Any]:
    """The folder's noise schedule and prediction type as a ``DDIMScheduler`` config.

    Args:
      path: the pipeline folder.
      spacing: ``timestep_spacing`` of the DDIM sampler (``sampling.spacing``).

    Returns:
      A diffusers ``DDIMScheduler`` config dict (η = 0, ``set_alpha_to_one=False``,
      ``clip_sample=False``) over the folder's β table.
    """
    source = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: the pipeline folder has no scheduler config")
    data = config_lib.read_json_object(source, "the scheduler's config")
    out: dict[str, Any] = {"_class_name": "DDIMScheduler", "clip_sample": False, "set_alpha_to_one": False,
                           "timestep_spacing": spacing}
    out.update({k: data[k] for k in _SCHEDULE_KEYS if k in data})
    if out.get("rescale_betas_zero_snr") and out.get("prediction_type", "epsilon") == "epsilon":
        raise ValueError(f"{source}: rescale_betas_zero_snr with prediction_type 'epsilon' leaves x0 undefined "
                         "at the first timestep (ᾱ = 0); such a teacher cannot be sampled from noise")
    return out


@functools.lru_cache(maxsize=8)
def read_pipeline(path: str, step_embedding_dim: int, spacing: str) -> PipelineSpec:
    """Reads and checks a pipeline folder's configs (``model_index.json``, unet, vae, text encoder, scheduler).

    Raises:
      FileNotFoundError: the folder or one of its parts is missing (named).
      ValueError: a pipeline this stage does not distil (SDXL, LCM, a UNet with
        ``time_cond_proj_dim`` or added conditioning, a text encoder read with an attention
        mask), naming the file and the reason.
    """
    from meg_jax.backbone import clip, schedulers
    from meg_jax.backbone.diffusers_io import read_config
    from meg_jax.backbone.sd_pipeline import PIPELINE_CLASSES

    if not os.path.isdir(path):
        raise FileNotFoundError(f"pipeline.teacher: {path!r} is not a folder (a diffusers pipeline folder "
                                "written by save_pretrained)")
    index_path = os.path.join(path, "model_index.json")
    index = config_lib.read_json_object(index_path, "the pipeline's model index")
    name = index.get("_class_name")
    if PIPELINE_CLASSES.get(name) != ("sd", True):
        raise ValueError(f"{index_path}: _class_name={name!r}; the pipeline student distils a "
                         "StableDiffusionPipeline (SD 1.x/2.x). SDXL (two text encoders, pooled "
                         "embeddings) is not supported yet; an LCM pipeline is already distilled")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(path, part)):
            raise FileNotFoundError(f"{os.path.join(path, part)}: model_index.json lists {part} but the folder "
                                    "is missing")
    unet = read_config(os.path.join(path, "unet"))
    vae = read_config(os.path.join(path, "vae"))
    if not isinstance(unet, UNetConfig) or not isinstance(vae, VAEConfig):
        raise ValueError(f"{path}: unet/ must hold a UNet2DConditionModel and vae/ an AutoencoderKL")
    unet_file = os.path.join(path, "unet", "config.json")
    if unet.time_cond_proj_dim is not None:
        raise ValueError(f"{unet_file}: time_cond_proj_dim={unet.time_cond_proj_dim}: this UNet is already "
                         "conditioned on a guidance/step embedding (LCM); distil a stock SD UNet")
    if unet.addition_embed_type is not None:
        raise ValueError(f"{unet_file}: addition_embed_type={unet.addition_embed_type!r} is not supported "
                         "by the pipeline student")
    text_file = os.path.join(path, "text_encoder", "config.json")
    data = config_lib.read_json_object(text_file, "the text encoder's config")
    try:
        text = clip.CLIPTextConfig.from_transformers(data, with_projection=None if "architectures" in data else False)
    except ValueError as e:
        raise ValueError(f"{text_file}: {e}") from e
    if text.use_attention_mask:
        raise ValueError(f"{text_file}: use_attention_mask=True is not supported by the pipeline student "
                         "(the targets keep token ids only)")
    if text.hidden_size not in unet.cross_attention_dim_tuple:
        raise ValueError(f"{path}: the text encoder gives {text.hidden_size} features but unet "
                         f"cross_attention_dim is {unet.cross_attention_dim}")
    sched_cfg = scheduler_config(path, spacing)
    scheduler = schedulers.load_scheduler(sched_cfg)
    student = dataclasses.replace(unet, time_cond_proj_dim=step_embedding_dim)
    return PipelineSpec(path=path, teacher_unet=unet, student_unet=student, vae=vae, text=text,
                        scheduler=scheduler, scheduler_config=sched_cfg,
                        prediction_type=str(scheduler.config["prediction_type"]))


def spec_of(config: DistillConfig) -> PipelineSpec:
    """``read_pipeline`` of ``config.pipeline.teacher`` with the config's step embedding and spacing."""
    assert config.pipeline is not None
    return read_pipeline(_folder(config.pipeline.teacher, "teacher"), config.sampling.step_embedding_dim,
                         config.sampling.spacing)


def pipeline_models(config: DistillConfig) -> Any:
    """``objectives.Models`` of a pipeline run: the student UNet (compute options applied), the
    pipeline's VAE and CLIP, its schedule and prediction type (configs only, no weights)."""
    from meg_jax.backbone import clip
    from meg_jax.backbone.unet import UNet
    from meg_jax.backbone.vae import AutoencoderKL
    from meg_jax.distill.objectives import Models

    spec = spec_of(config)
    c = config.compute
    return Models(
        unet=UNet(spec.student_unet, dtype=jnp.dtype(c.dtype), attention=c.attention, remat=c.remat),
        vae=AutoencoderKL(spec.vae),
        text_encoder=CLIPContext(clip.CLIPTextTransformer(spec.text)),
        classifier=None,
        schedule=spec.scheduler.schedule,
        prediction_type=spec.prediction_type,
    )


def image_resolution(config: DistillConfig, spec: PipelineSpec) -> int:
    """The training image side: ``pipeline.resolution``, or the pipeline's default (UNet
    ``sample_size`` × VAE factor); it must be a multiple of VAE factor × UNet downsampling."""
    factor = 2 ** (len(spec.vae.block_out_channels) - 1)
    size = spec.teacher_unet.sample_size or 64
    size = size[0] if isinstance(size, (tuple, list)) else size
    res = config.pipeline.resolution or int(size) * factor
    step = factor * spec.teacher_unet.downsample_factor
    if res % step:
        raise ValueError(f"pipeline.resolution={res} must be a multiple of {step} (VAE factor {factor} x UNet "
                         f"downsampling {spec.teacher_unet.downsample_factor})")
    return res


def open_source(config: DistillConfig) -> Any:
    """The record source of ``pipeline.data``: an image folder, or tar shards (a glob or a file)."""
    from meg_jax.data.sources import ImageFolderSource, TarShardSource

    p = config.pipeline
    path = _folder(p.data, "data")
    if os.path.isdir(path):
        return ImageFolderSource(path, caption_column=p.caption_column, image_column=p.image_column)
    return TarShardSource(path)


def init_student(teacher_unet: Any, spec: PipelineSpec) -> Any:
    """The student's initial variables: the teacher's, plus a zero ``cond_proj`` kernel.

    Every leaf of the student architecture must be the teacher's except the step projection
    (``time_embedding/cond_proj``), which starts at zero so the student equals the teacher.
    """
    from meg_jax.backbone.unet import UNet, example_inputs

    shapes = jax.eval_shape(lambda: UNet(spec.student_unet).init(
        {"params": jax.random.key(0), "tome": jax.random.key(0)}, **example_inputs(spec.student_unet)))
    flat_teacher = dict(jax.tree_util.tree_leaves_with_path(teacher_unet))

    def fill(path: tuple, leaf: Any) -> jax.Array:
        if path in flat_teacher:
            return jnp.array(flat_teacher[path], jnp.float32)
        names = [getattr(k, "key", "") for k in path]
        if "cond_proj" not in names:
            raise ValueError(f"the student UNet has a parameter the teacher lacks: {'/'.join(names)}")
        return jnp.zeros(leaf.shape, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, {"params": shapes["params"]})


def _chunk_fn(config: DistillConfig, spec: PipelineSpec, models: Any, mesh: jax.sharding.Mesh,
              uncond_ids: np.ndarray) -> Any:
    """Jitted ``(params, images [C, R, R, 3], tokens [C, L], key) -> (start, teacher sample)``."""
    from meg_jax.backbone.unet import UNet

    s = config.student
    w = float(config.sampling.guidance_scale)
    spacing = config.sampling.spacing
    schedule = models.schedule
    pred = models.prediction_type
    t0 = int(schedules.timesteps(s.target_steps, spacing, schedule.num_train_timesteps)[0])
    teacher = UNet(spec.teacher_unet, dtype=jnp.dtype(config.compute.dtype), attention=config.compute.attention)
    scale = float(spec.vae.scaling_factor)

    @jax.jit
    def fn(params: Any, images: jax.Array, tokens: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        params = partition.gather_for_compute(params, config.parallel, mesh)
        images, tokens = parallel.constrain_batch((images, tokens), mesh)
        mean, _ = models.vae.apply(params["vae"], images, method="encode")
        x0 = mean.astype(jnp.float32) * scale
        noise = parallel.constrain_batch(jax.random.normal(key, x0.shape), mesh)
        start = schedules.add_noise(schedule, x0, noise, jnp.full((x0.shape[0],), t0, jnp.int32))
        cond = models.text_encoder.apply(params["text_encoder"], tokens)
        if w == 1.0:
            context = cond
            guidance = None
        else:  # [uncond; cond], as diffusers' CFG batch
            uncond = models.text_encoder.apply(params["text_encoder"], jnp.asarray(uncond_ids))
            context = jnp.concatenate([jnp.broadcast_to(uncond, cond.shape), cond])
            guidance = w

        def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
            return teacher.apply(params["unet"], x, t, context).astype(jnp.float32)

        latents = schedules.sample(model_fn, schedule, start, num_steps=s.target_steps, spacing=spacing,
                                   prediction_type=pred, guidance_scale=guidance)
        return start, latents

    return fn


def _state_path(folder: str, chunk: int, process: int) -> str:
    return os.path.join(folder, f"chunk_{chunk:05d}.grain-{process:03d}.json")


def make_pipeline_targets(workdir: str, models: Any, config: DistillConfig, teacher: Mapping[str, Any],
                          mesh: jax.sharding.Mesh, progress: bool = True) -> dict[str, np.ndarray]:
    """The student's targets from the data: start latents, tokens and guided teacher samples.

    Chunk ``i`` is the loader's i-th batch of ``student.target_chunk`` records (order seeded
    by ``student.seed + 1``, repeating over epochs), its noise ``fold_in(PRNGKey(student.seed
    + 1), i)``. Resumable (see the module docstring).

    Args:
      workdir: the job's work directory.
      models: ``pipeline_models(config)``.
      config: the job config (``pipeline`` set).
      teacher: ``{"unet", "vae", "text_encoder"}`` params of the pipeline.
      mesh: the device mesh (the chunk's batch is split over ``"data"``).
      progress: show a progress bar.

    Returns:
      ``{"noise": [N, h, w, c] start latents x_t₀, "tokens": [N, L] int32, "latents": [N, h,
      w, c] teacher samples}`` (N = ``student.num_targets``; the key "noise" is the start of
      the rollouts, as in the procedural targets).

    Raises:
      meg_jax.data.sources.DataRecordError: a bad record with ``pipeline.on_error="raise"``.
    """
    from meg_jax.backbone import clip
    from meg_jax.data.loader import ImageCaptionLoader, LoaderConfig

    s = config.student
    p = config.pipeline
    spec = spec_of(config)
    parallel.check_batch_size(s.target_chunk, mesh, what="student.target_chunk")
    folder = os.path.join(workdir, "student", "targets")
    os.makedirs(folder, exist_ok=True)
    names = ("noise", "tokens", "latents")
    num_chunks = s.num_targets // s.target_chunk
    chunk_path = lambda i: os.path.join(folder, f"chunk_{i:05d}.npz")  # noqa: E731
    todo = [i for i in range(num_chunks) if not os.path.exists(chunk_path(i))]
    process, count = jax.process_index(), jax.process_count()
    if todo:
        tokenizer = clip.load_tokenizer(os.path.join(spec.path, "tokenizer"))
        loader = ImageCaptionLoader(
            open_source(config),
            LoaderConfig(resolution=image_resolution(config, spec), batch_size=s.target_chunk, seed=s.seed + 1,
                         shuffle=True, num_epochs=None, on_error=p.on_error, read_threads=p.read_threads),
            tokenizer=CLIPTokenIds(tokenizer))
        fn = _chunk_fn(config, spec, models, mesh, tokenizer.encode([""])[0])
        params = partition.shard(dict(teacher), mesh, partition.tree_specs(dict(teacher), config.parallel, mesh))
        base = jax.random.PRNGKey(s.seed + 1)
        sharding = parallel.batch_sharding(mesh)
        it, prev = None, None
        bar = run_log.progress(len(todo), desc="teacher targets", disable=not progress)
        for i in todo:
            if it is None or prev != i - 1:
                it = iter(loader)
                if i > 0:  # where the loader stood after the chunk before
                    with open(_state_path(folder, i - 1, process), "rb") as f:
                        it.set_state(f.read())
            batch = next(it)
            images = jax.make_array_from_process_local_data(sharding, batch["image"])
            tokens = jax.make_array_from_process_local_data(sharding, batch["tokens"])
            out = fn(params, images, tokens, jax.random.fold_in(base, i))
            if count > 1:
                from jax.experimental import multihost_utils

                start, latents = multihost_utils.process_allgather(out, tiled=True)
                tokens_all = multihost_utils.process_allgather(tokens, tiled=True)
            else:
                start, latents = jax.device_get(out)
                tokens_all = np.asarray(batch["tokens"])
            state = it.get_state()
            tmp = f"{_state_path(folder, i, process)}.tmp"
            with open(tmp, "wb") as f:
                f.write(state)
            os.replace(tmp, _state_path(folder, i, process))
            if process == 0:  # the chunk last: its presence means every state before it is written
                with open(chunk_path(i) + ".tmp", "wb") as f:
                    np.savez(f, **dict(zip(names, (np.asarray(start), np.asarray(tokens_all, np.int32),
                                                   np.asarray(latents)))))
                os.replace(chunk_path(i) + ".tmp", chunk_path(i))
            prev = i
            bar.update(1)
        bar.close()
        if loader.num_skipped:
            log.warning("targets: skipped %d bad record(s) of %s (pipeline.on_error='skip')",
                        loader.num_skipped, p.data)
        if count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("meg_jax student targets written")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for i in range(num_chunks):
        with np.load(chunk_path(i)) as data:
            for k in names:
                parts[k].append(data[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def student_inputs(workdir: str, models: Any, config: DistillConfig, mesh: jax.sharding.Mesh,
                   progress: bool = True) -> tuple[dict[str, Any], Any]:
    """The student stage's frozen inputs and initial params for a pipeline teacher.

    Returns:
      ``(inputs, params)``: inputs as ``objectives.student_loss_fn`` reads them (the
      pipeline's VAE and CLIP params, its ``scaling_factor``, the targets) and the student's
      initial UNet variables (``init_student``).
    """
    from meg_jax.backbone.sd_loading import load_pipeline

    spec = spec_of(config)
    pipe = load_pipeline(spec.path, scheduler=dict(spec.scheduler_config))
    teacher = {"unet": pipe.params["unet"], "vae": pipe.params["vae"],
               "text_encoder": pipe.params["text_encoders"][0]}
    targets = make_pipeline_targets(workdir, models, config, teacher, mesh, progress=progress)
    inputs = {"vae": teacher["vae"], "latent_scale": jnp.float32(spec.vae.scaling_factor),
              "text_encoder": teacher["text_encoder"],
              "targets": {k: jnp.asarray(v) for k, v in targets.items()}}
    return inputs, init_student(teacher["unet"], spec)


@functools.lru_cache(maxsize=8)
def _folder_hash(path: str) -> str:
    from meg_jax.meg.calibrate import checkpoint_hash

    return checkpoint_hash(path)


def pipeline_record(config: DistillConfig) -> dict[str, Any]:
    """What the student's checkpoints depend on in a pipeline run: the pipeline options
    (without the two paths: a moved folder still resumes) and the SHA-256 of the teacher
    folder (other weights at the same path are refused). The data's identity is checked by
    grain when a chunk's iterator state is restored."""
    d = config_lib.to_dict(config.pipeline)
    return {"pipeline": {k: v for k, v in d.items() if k not in ("teacher", "data")},
            "teacher_folder": _folder_hash(spec_of(config).path)}


def export(workdir: str, out: str, config: DistillConfig, steps: int | None = None) -> int:
    """Writes the finished student as a diffusers pipeline folder for ``steps`` K.

    Args:
      workdir: the finished run.
      out: the output folder.
      config: the run's config (``pipeline`` set).
      steps: K (default: the largest of ``student.step_counts``).

    Returns:
      The K exported.
    """
    from meg_jax.backbone.sd_export import export_pipeline_student
    from meg_jax.distill.stage_io import load_final

    spec = spec_of(config)
    k = max(config.student.step_counts) if steps is None else int(steps)
    student = load_final(workdir, "student", ("unet",))["unet"]
    export_pipeline_student(spec.path, spec.student_unet, student, out, steps=k,
                            scheduler_config=spec.scheduler_config,
                            step_embedding_dim=config.sampling.step_embedding_dim,
                            guidance_scale=config.sampling.guidance_scale)
    return k
