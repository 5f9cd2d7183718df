"""Train states, jitted train steps and the host loop of the distillation stages.

Each stage (classifier, VAE, decoder, teacher, teacher_ft, student, ue_decoder) is one pure function
``train_step(state, inputs, key) -> (state, metrics)`` over a ``TrainState`` pytree (params,
EMA params, optimizer state, step), jitted once with the state donated. Batches are
generated on device from ``key`` (``meg_jax.data.sample_batch``) and sharded over the
``"data"`` mesh axis (``meg_jax.parallel``); ``inputs`` holds the frozen arrays a stage reads
(the VAE for the teacher; the text encoder and the precomputed teacher samples for the
student). The key of step ``s`` is ``fold_in(PRNGKey(seed), s)``, so a resumed run draws the
same batches as an uninterrupted one and ends with identical parameters.

``train_stage`` is the host loop: progress bar, metrics (JSONL + TensorBoard), NaN guard,
orbax checkpoints (keep N, async), resume, config check. ``run`` chains the stages of a
``DistillConfig`` in a work directory (the optional ``decoder``, ``teacher_ft`` and
``ue_decoder`` stages run when their config is set); ``run_ue_decoder_from_backbone`` trains
the ``ue_decoder`` stage from a shipped backbone folder instead of a work directory, and
``export_ue_decoder`` writes its component; ``export`` writes the compact shipped form
(``meg_jax.checkpoint.load_backbone`` reads it). With ``DistillConfig.pipeline`` set, only the
student stage runs, its teacher a diffusers pipeline folder and its data images with captions
(``meg_jax.distill.pipeline_teacher``), and ``export`` writes a diffusers pipeline folder. The stage objectives live in
``meg_jax.distill.objectives`` and what stages keep on disk in ``meg_jax.distill.stage_io``;
both are re-exported here.

Work directory layout::

    WORKDIR/config.json                      resolved DistillConfig of the last run
    WORKDIR/<stage>/config.json              settings the stage's checkpoints depend on
    WORKDIR/<stage>/checkpoints/<step>/      orbax steps (latest N)
    WORKDIR/<stage>/metrics.jsonl, events.*  metrics
    WORKDIR/<stage>/final/                   EMA params of the finished stage (safetensors)
    WORKDIR/teacher/latents/chunk_*.npz      cached VAE latents of the teacher (resumable)
    WORKDIR/teacher_ft/latents/chunk_*.npz   the continuation's own latents
    WORKDIR/student/targets/chunk_*.npz      cached teacher samples (resumable)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import struct

from meg_jax import checkpoint as ckpt
from meg_jax import config as config_lib
from meg_jax import parallel
from meg_jax import partition
from meg_jax import run_log
from meg_jax.distill.config import OPTIONAL_STAGES, STAGES, DistillConfig, StageConfig, StudentStageConfig
from meg_jax.partition import ParallelConfig
from meg_jax.distill.objectives import (  # noqa: F401  (re-exported: the stage objectives)
    LossFn,
    Models,
    build_models,
    classifier_loss_fn,
    decoder_loss_fn,
    merge_vae,
    ue_decoder_loss_fn,
    split_vae,
    student_loss_fn,
    teacher_loss_fn,
    vae_loss_fn,
    zero_step_conditioning,
)
from meg_jax.distill.stage_io import (  # noqa: F401  (re-exported: what stages keep on disk)
    latent_scale,
    load_final,
    make_latent_cache,
    make_targets,
    mark_done,
    measure_latent_scale,
    save_final,
    stage_done,
    student_init,
)

__all__ = [
    "TrainState",
    "Models",
    "build_models",
    "make_optimizer",
    "create_state",
    "make_train_step",
    "state_specs",
    "input_specs",
    "vae_loss_fn",
    "decoder_loss_fn",
    "ue_decoder_loss_fn",
    "teacher_loss_fn",
    "student_loss_fn",
    "classifier_loss_fn",
    "init_stage_state",
    "stage_record",
    "stage_inputs",
    "measure_latent_scale",
    "make_latent_cache",
    "make_targets",
    "train_stage",
    "compiled_train_step",
    "run",
    "export",
    "run_ue_decoder_from_backbone",
    "export_ue_decoder",
    "load_final",
]


@struct.dataclass
class TrainState:
    """Everything a stage's train step changes; a pytree (orbax saves it whole).

    Attributes:
      step: scalar int32, optimizer steps done.
      params: the trained parameters.
      ema_params: exponential moving average of ``params`` (what is exported).
      opt_state: optax state.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any



# --------------------------------------------------------------------------- optimisation


def make_optimizer(cfg: StageConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay to ``final_lr_fraction``, global-norm clipping."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.final_lr_fraction,
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(lr, weight_decay=cfg.weight_decay),
    )


def create_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0 (EMA starts at the initial params)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
    )


def state_specs(state: TrainState, tx: optax.GradientTransformation | None, cfg: ParallelConfig,
                mesh: jax.sharding.Mesh) -> TrainState:
    """``PartitionSpec``s of a train state (arrays or ``ShapeDtypeStruct``s) by the partition rules.

    Params and their EMA by ``partition.tree_specs``; the step is replicated. The optimiser
    state follows the params by structure (``partition.opt_state_specs``) when ``tx`` is
    given; without it the rules are applied to its leaves directly, which gives moments the
    spec of their parameter too (the rules read only a leaf's path suffix and shape) and
    works for any state (``train_stage`` does not know the optimiser).
    """
    params = partition.tree_specs(state.params, cfg, mesh)
    if tx is None:
        opt = partition.tree_specs(state.opt_state, cfg, mesh)
    else:
        opt = partition.opt_state_specs(tx, state.opt_state, params)
    return TrainState(step=jax.sharding.PartitionSpec(), params=params, ema_params=params, opt_state=opt)


def input_specs(inputs: Any, cfg: ParallelConfig, mesh: jax.sharding.Mesh) -> Any:
    """Specs of a stage's frozen inputs: the same rules as parameters (a cache ``[N, ...]``
    splits on N under fsdp; scalars stay replicated)."""
    return partition.tree_specs(inputs, cfg, mesh)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float,
                    mesh: jax.sharding.Mesh, parallel_config: ParallelConfig = ParallelConfig(),
                    grad_accum_steps: int = 1,
                    ) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]]:
    """Builds the jitted ``train_step(state, inputs, key) -> (state, metrics)``.

    The same function runs on one device and on a mesh: the state arrives laid out by
    ``state_specs`` (replicated or FSDP, ``partition.shard``), the inputs by
    ``input_specs``, and the step constrains gradients and the new state to those specs, so
    XLA reduce-scatters the gradients onto their shards and the output layout equals the
    input's (the donated buffers are reused).

    Args:
      loss_fn: ``loss_fn(params, inputs, key) -> (loss, metrics)``; it generates (and
        shards) its batch from ``key``.
      tx: the optimizer.
      ema_decay: EMA decay d; the effective decay is ``min(d, (1 + s) / (10 + s))`` so the
        average forgets the random initialisation early in short runs.
      mesh: device mesh; batches are sharded on its ``"data"`` axis inside ``loss_fn``.
      parallel_config: the partition rules of params, EMA and optimiser state.
      grad_accum_steps: N > 1 calls ``loss_fn`` on keys ``fold_in(key, i)``, i < N, in a
        ``lax.scan`` (each draws a microbatch) and averages losses, metrics and gradients;
        1 calls it once on ``key``.

    Returns:
      The jitted step (state donated).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, inputs: Any, key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        specs = state_specs(state, tx, parallel_config, mesh)
        if grad_accum_steps == 1:
            (loss, metrics), grads = grad_fn(state.params, inputs, key)
            grads = partition.constrain(grads, mesh, specs.params)
        else:
            def micro(carry: Any, i: jax.Array) -> tuple[Any, None]:
                (l, m), g = grad_fn(state.params, inputs, jax.random.fold_in(key, i))
                g = partition.constrain(g, mesh, specs.params)
                return jax.tree.map(jnp.add, carry, (l, m, g)), None

            (l0, m0), g0 = jax.eval_shape(grad_fn, state.params, inputs, key)
            zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (l0, m0, g0))
            zero = (zero[0], zero[1], partition.constrain(zero[2], mesh, specs.params))
            total, _ = jax.lax.scan(micro, zero, jnp.arange(grad_accum_steps))
            loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps, total)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        s = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + s) / (10.0 + s))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        new = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return partition.constrain(new, mesh, specs), metrics

    return jax.jit(step, donate_argnums=(0,))


# --------------------------------------------------------------------------- init



def init_stage_state(stage: str, models: Models, config: DistillConfig,
                     teacher_params: Any | None = None, vae_params: Any | None = None) -> TrainState:
    """A fresh ``TrainState`` for ``stage`` (seeded by the stage's ``seed``).

    Args:
      stage: one of ``STAGES``.
      models: from ``build_models``.
      config: the job config.
      teacher_params: for "student" and "teacher_ft": the teacher's ``{"unet",
        "text_encoder"}`` EMA params (the continuation starts from them; the student's UNet
        starts as a copy with the step projection zeroed).
      vae_params: for "decoder": the VAE stage's params (its decoder groups are trained on);
        for "ue_decoder": the refined VAE's (the decoder stage's, or a shipped backbone's).
    """
    cfg = getattr(config, stage)
    key = jax.random.PRNGKey(cfg.seed)
    b = config.backbone
    if stage == "classifier":
        from meg_jax.data.classifier import init_classifier

        params = init_classifier(config.classifier_model, key)
    elif stage == "vae":
        from meg_jax.backbone.vae import init_vae

        params = init_vae(b.vae, key)
    elif stage == "teacher":
        from meg_jax.backbone.text_encoder import init_text_encoder
        from meg_jax.backbone.unet import init_unet

        k_unet, k_text = jax.random.split(key)
        params = {"unet": init_unet(b.unet, k_unet), "text_encoder": init_text_encoder(b.text_encoder, k_text)}
    elif stage in ("decoder", "ue_decoder"):
        if vae_params is None:
            raise ValueError(f"the {stage} stage needs the trained VAE's params")
        params = jax.tree.map(jnp.copy, split_vae(vae_params)[1])
    elif stage == "teacher_ft":
        if teacher_params is None:
            raise ValueError("the teacher_ft stage needs the trained teacher's params")
        params = jax.tree.map(jnp.copy, dict(teacher_params))
    elif stage == "student":
        if teacher_params is None:
            raise ValueError("the student stage needs the trained teacher's params")
        params = zero_step_conditioning(jax.tree.map(jnp.copy, teacher_params["unet"]))
    else:
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
    return create_state(params, make_optimizer(cfg))


_LATER_STUDENT_FIELDS = ("shape_weight", "mask_dilation", "init_weights")


def stage_record(stage: str, config: DistillConfig) -> dict[str, Any]:
    """The settings a stage's checkpoints depend on (compared on resume)."""
    d = config_lib.to_dict(config)
    record: dict[str, Any] = {stage: d[stage], "data": d["data"]}
    if stage == "student":  # fields added later: absent at their defaults, so older records stay valid
        defaults = config_lib.to_dict(StudentStageConfig())
        record[stage] = {k: v for k, v in d[stage].items()
                         if k not in _LATER_STUDENT_FIELDS or v != defaults[k]}
    if stage == "classifier":
        record["classifier_model"] = d["classifier_model"]
    if stage in ("vae", "decoder", "teacher", "teacher_ft", "student", "ue_decoder"):
        record["backbone.vae"] = d["backbone"]["vae"]
    if stage in ("decoder", "ue_decoder"):
        record["vae"] = d["vae"]
    if stage == "ue_decoder" and d["decoder"] is not None:  # it starts from the refined decoder
        record["decoder"] = d["decoder"]
    if stage in ("teacher", "teacher_ft", "student"):
        record["backbone"] = {k: v for k, v in d["backbone"].items() if k != "vae"}
        record["vae"] = d["vae"]
    # Compute options that change a stage's numbers (not just its memory or speed: remat and
    # the attention kernel may differ on resume, as the layout may); absent at the defaults,
    # so records made before these options existed stay valid.
    compute = {}
    if config.compute.grad_accum_steps != 1:  # other microbatches are drawn
        compute["grad_accum_steps"] = config.compute.grad_accum_steps
    if stage in ("teacher", "teacher_ft", "student") and config.compute.dtype != "float32":
        compute["dtype"] = config.compute.dtype
    if compute:
        record["compute"] = compute
    if stage in ("teacher_ft", "student"):
        record["teacher"] = d["teacher"]
    if stage == "student":
        record["sampling"] = d["sampling"]
        if d["teacher_ft"] is not None:  # absent when off, so records made before it stay valid
            record["teacher_ft"] = d["teacher_ft"]
        if d["decoder"] is not None and (d["student"]["pixel_weight"] > 0 or d["student"]["shape_weight"] > 0):
            record["decoder"] = d["decoder"]
        if config.pipeline is not None:  # absent otherwise, so records made before it stay valid
            from meg_jax.distill.pipeline_teacher import pipeline_record

            record.update(pipeline_record(config))
    return record


def enabled_stages(config: DistillConfig, stages: tuple[str, ...] = STAGES) -> tuple[str, ...]:
    """``stages`` without the optional ones whose config is ``None``."""
    return tuple(s for s in stages if s not in OPTIONAL_STAGES or getattr(config, s) is not None)


def teacher_stage(config: DistillConfig) -> str:
    """The stage whose final weights are the teacher: "teacher_ft" when enabled."""
    return "teacher_ft" if config.teacher_ft is not None else "teacher"


def vae_stage(config: DistillConfig) -> str:
    """The stage whose final weights are the shipped VAE: "decoder" when enabled."""
    return "decoder" if config.decoder is not None else "vae"


def train_stage(
    name: str,
    workdir: str,
    record: Mapping[str, Any],
    init_state: TrainState,
    train_step: Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]],
    inputs: Any,
    cfg: StageConfig,
    mesh: jax.sharding.Mesh,
    *,
    keep: int = 2,
    async_save: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    parallel_config: ParallelConfig = ParallelConfig(),
) -> tuple[TrainState, bool]:
    """Runs (or resumes) one stage to ``cfg.steps`` with checkpoints and logging.

    Args:
      name: stage name (sub-directory of ``workdir``).
      workdir: the job's work directory.
      record: the settings the checkpoints depend on; a stored different one is refused
        (``ConfigMismatchError`` naming the fields).
      init_state: fresh state (also the restore template).
      train_step: from ``make_train_step``.
      inputs: frozen arrays for the step (replicated on the mesh here).
      cfg: the stage config (steps, intervals, seed).
      mesh: the device mesh.
      keep: checkpoints kept.
      async_save: orbax async saving.
      progress: show a tqdm bar.
      stop_after: stop after this many steps of this call (as if killed right after the
        last checkpoint); for tests of resumption.
      parallel_config: how state and inputs are laid out on ``mesh`` (``state_specs``,
        ``input_specs``); a checkpoint restores into that layout whatever it was saved from.

    Returns:
      ``(state, finished)``.

    Raises:
      run_log.NonFiniteError: a metric became NaN/inf; checkpoints up to the last good step
        are kept and nothing later is saved.
    """
    directory = os.path.join(workdir, name)
    ckpt.check_config(directory, dict(record))
    manager = ckpt.make_manager(os.path.join(directory, "checkpoints"), max_to_keep=keep,
                                async_save=async_save)
    try:
        specs = state_specs(init_state, None, parallel_config, mesh)
        state = partition.shard(init_state, mesh, specs)
        state, start = ckpt.restore_or_init(manager, state)
        state = partition.shard(state, mesh, specs)
        if start >= cfg.steps:
            return state, True
        inputs = partition.shard(inputs, mesh, input_specs(inputs, parallel_config, mesh))
        base = jax.random.PRNGKey(cfg.seed)
        bar = run_log.progress(cfg.steps, initial=start, desc=name, disable=not progress)
        last = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
        with run_log.MetricsWriter(directory) as writer:
            t0, s0 = time.time(), start
            for s in range(start, last):
                state, metrics = train_step(state, inputs, jax.random.fold_in(base, s))
                done = s + 1
                is_ckpt = done % cfg.checkpoint_every == 0 or done == cfg.steps
                if done % cfg.log_every == 0 or is_ckpt:
                    values = run_log.check_finite(metrics, done)
                    values["steps_per_s"] = (done - s0) / max(time.time() - t0, 1e-9)
                    t0, s0 = time.time(), done
                    writer.write(done, values)
                    run_log.set_metrics(bar, values)
                if is_ckpt:
                    if not ckpt.all_finite(state.params):
                        raise run_log.NonFiniteError(f"non-finite parameters at step {done} of {name}")
                    ckpt.save(manager, done, state)
                bar.update(1)
        bar.close()
        manager.wait_until_finished()
        return state, last >= cfg.steps
    finally:
        manager.close()


def stage_inputs(stage: str, workdir: str, models: Models, config: DistillConfig,
                 progress: bool = True, mesh: jax.sharding.Mesh | None = None) -> tuple[Any, TrainState]:
    """The frozen inputs and the fresh state of ``stage`` (reads earlier stages' outputs; with
    ``config.pipeline``, the pipeline folder and the data, the targets made on ``mesh``)."""
    if config.pipeline is not None:
        from meg_jax.distill.pipeline_teacher import student_inputs

        if stage != "student":
            raise ValueError(f"stage {stage!r} does not run with a pipeline teacher (--pipeline.*): "
                             "only the student stage does")
        if config.student.init_weights:
            raise ValueError("--student.init_weights continues a procedural student from an exported backbone; "
                             "with a pipeline teacher (--pipeline.*) the student starts from the pipeline's UNet")
        mesh = parallel.make_mesh(model=config.parallel.model_axis) if mesh is None else mesh
        inputs, params = student_inputs(workdir, models, config, mesh, progress=progress)
        return inputs, create_state(params, make_optimizer(config.student))
    if stage in ("classifier", "vae"):
        return {}, init_stage_state(stage, models, config)
    vae = load_final(workdir, "vae", ("vae",))["vae"]
    if stage == "decoder":
        return {"encoder": split_vae(vae)[0]}, init_stage_state(stage, models, config, vae_params=vae)
    scale = latent_scale(workdir, models, vae, config)
    if stage == "ue_decoder":  # from the refined decoder, over the (unchanged) encoder
        refined = load_final(workdir, vae_stage(config), ("vae",))["vae"]
        inputs = {"encoder": split_vae(refined)[0], "latent_scale": jnp.float32(scale)}
        return inputs, init_stage_state(stage, models, config, vae_params=refined)
    if stage in ("teacher", "teacher_ft"):
        # The decoder stage leaves the encoder as it was: both caches read the VAE stage's.
        cache = make_latent_cache(workdir, models, config, vae, scale, progress=progress, stage=stage)
        inputs = {k: jnp.asarray(v) for k, v in cache.items()}
        teacher = load_final(workdir, "teacher", ("unet", "text_encoder")) if stage == "teacher_ft" else None
        return inputs, init_stage_state(stage, models, config, teacher_params=teacher)
    teacher = load_final(workdir, teacher_stage(config), ("unet", "text_encoder"))
    if vae_stage(config) != "vae":  # the refined decoder decodes for the pixel loss
        vae = load_final(workdir, vae_stage(config), ("vae",))["vae"]
    targets = make_targets(workdir, models, config, teacher, progress=progress)
    inputs = {"vae": vae, "latent_scale": jnp.float32(scale), "text_encoder": teacher["text_encoder"],
              "targets": {k: jnp.asarray(v) for k, v in targets.items()}}
    state = init_stage_state(stage, models, config, teacher_params=teacher)
    if config.student.init_weights:  # continue a student instead of starting from the teacher
        state = create_state(student_init(workdir, config, state.params), make_optimizer(config.student))
    return inputs, state


_LOSS_FNS = {
    "classifier": classifier_loss_fn,
    "vae": vae_loss_fn,
    "decoder": decoder_loss_fn,
    "teacher": teacher_loss_fn,
    "teacher_ft": functools.partial(teacher_loss_fn, stage="teacher_ft"),
    "student": student_loss_fn,
    "ue_decoder": ue_decoder_loss_fn,
}


def _final_parts(stage: str, state: TrainState, inputs: Any) -> dict[str, Any]:
    ema = jax.device_get(state.ema_params)
    if stage == "classifier":
        return {"classifier": ema}  # ema_decay 0: the EMA equals the params
    if stage == "vae":
        return {"vae": ema}
    if stage == "decoder":  # the whole VAE: frozen encoder + refined decoder
        return {"vae": merge_vae(jax.device_get(inputs["encoder"]), ema)}
    if stage == "ue_decoder":  # only the decoder groups (shipped beside the VAE, whose encoder it uses)
        return {"decoder": ema}
    if stage in ("teacher", "teacher_ft"):
        return {"unet": ema["unet"], "text_encoder": ema["text_encoder"]}
    return {"unet": ema}


@functools.lru_cache(maxsize=16)
def compiled_train_step(stage: str, config: DistillConfig, mesh: jax.sharding.Mesh) -> Callable:
    """The jitted train step of ``stage``, built once per (stage, config, mesh) in a process.

    Reruns in the same process (tests, notebooks) reuse the compiled executable.
    """
    cfg: StageConfig = getattr(config, stage)
    models = build_models(config)
    return make_train_step(_LOSS_FNS[stage](models, config, mesh), make_optimizer(cfg), cfg.ema_decay, mesh,
                           config.parallel, config.compute.grad_accum_steps)


def run(config: DistillConfig, stages: tuple[str, ...], workdir: str, *, mesh: jax.sharding.Mesh | None = None,
        progress: bool = True, stop_after: int | None = None) -> dict[str, bool]:
    """Runs ``stages`` in order in ``workdir`` (each resumes or is skipped when finished).

    Optional stages whose config is ``None`` are left out (``enabled_stages``).

    Returns:
      stage -> finished, for the stages that ran or had finished.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {STAGES}")
    if config.pipeline is not None and set(stages) - {"student"}:
        raise ValueError(f"with a pipeline teacher (--pipeline.*) only the student stage runs; got {list(stages)}")
    stages = enabled_stages(config, tuple(stages))
    mesh = parallel.make_mesh(model=config.parallel.model_axis) if mesh is None else mesh
    os.makedirs(workdir, exist_ok=True)
    config_lib.save_json(config, os.path.join(workdir, "config.json"))
    models = build_models(config)
    finished: dict[str, bool] = {}
    for stage in stages:
        cfg: StageConfig = getattr(config, stage)
        if stage_done(workdir, stage):
            ckpt.check_config(os.path.join(workdir, stage), stage_record(stage, config))
            finished[stage] = True
            continue
        inputs, state = stage_inputs(stage, workdir, models, config, progress=progress, mesh=mesh)
        step = compiled_train_step(stage, config, mesh)
        state, done = train_stage(stage, workdir, stage_record(stage, config), state, step, inputs, cfg, mesh,
                                  keep=config.keep_checkpoints, async_save=config.async_checkpointing,
                                  progress=progress, stop_after=stop_after, parallel_config=config.parallel)
        finished[stage] = done
        if not done:
            break
        save_final(workdir, stage, _final_parts(stage, state, inputs))
        mark_done(workdir, stage, cfg.steps)
    return finished


def export(workdir: str, out: str, config: DistillConfig, steps: int | None = None) -> None:
    """Writes the shipped compact form of a finished work directory to ``out``.

    With ``config.pipeline`` set, ``out`` is instead a diffusers pipeline folder of the student
    at K = ``steps`` (default: the largest trained K) beside the teacher's text encoder and VAE
    (``meg_jax.distill.pipeline_teacher.export``).

    ``out/backbone.json`` (backbone config with the measured latent scale, sampling
    settings, data config) and ``out/{classifier,vae,teacher,student}/`` (config.json +
    safetensors). The VAE is the decoder stage's and the teacher the teacher_ft stage's
    when those are enabled; each component's ``stage`` record lists the stages it went
    through. ``meg_jax.checkpoint.load_backbone(out)`` reads it back.
    """
    if config.pipeline is not None:
        from meg_jax.distill import pipeline_teacher

        pipeline_teacher.export(workdir, out, config, steps)
        return
    models = build_models(config)
    classifier = load_final(workdir, "classifier", ("classifier",))
    encoder_vae = load_final(workdir, "vae", ("vae",))["vae"]  # the latent space (and its scale)
    vae = {"vae": encoder_vae} if vae_stage(config) == "vae" else load_final(workdir, "decoder", ("vae",))
    teacher = load_final(workdir, teacher_stage(config), ("unet", "text_encoder"))
    student = load_final(workdir, "student", ("unet",))
    scale = latent_scale(workdir, models, encoder_vae, config)
    backbone = dataclasses.replace(config.backbone, latent_scaling_factor=scale)
    os.makedirs(out, exist_ok=True)
    meta = {s: {"steps": getattr(config, s).steps, "seed": getattr(config, s).seed}
            for s in enabled_stages(config)}

    def stages_of(*names: str) -> dict[str, Any]:
        chain = [n for n in names if n in meta]
        return meta[chain[0]] if len(chain) == 1 else {n: meta[n] for n in chain}

    ckpt.export_component(out, "classifier", config.classifier_model, classifier, stage=meta["classifier"])
    ckpt.export_component(out, "vae", backbone.vae, vae, stage=stages_of("vae", "decoder"), latent_scale=scale)
    ckpt.export_component(out, "teacher", backbone.unet, teacher, stage=stages_of("teacher", "teacher_ft"),
                          text_encoder=config_lib.to_dict(backbone.text_encoder))
    if config.student.init_weights:  # a continued student: what it started from and how it went on
        init = os.path.join(workdir, "student", "init.json")
        meta["student"] = {**meta["student"], "config": config_lib.to_dict(config.student),
                           "continued_from": ckpt.read_json(init, "where the student started from")}
    ckpt.export_component(out, "student", backbone.unet, {"unet": student["unet"]}, stage=meta["student"])
    if config.ue_decoder is not None and stage_done(workdir, "ue_decoder"):
        export_ue_decoder(workdir, out, config, init_from={"stages": stages_of("vae", "decoder")})
    record = {
        "backbone": config_lib.to_dict(backbone),
        "sampling": config_lib.to_dict(config.sampling),
        "data": config_lib.to_dict(config.data),
        "distill_preset": config.preset,
    }
    with open(os.path.join(out, "backbone.json"), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------- UE decoder from a shipped backbone


def _ue_init_record(backbone_dir: str) -> dict[str, Any]:
    """What a UE decoder trained from a shipped backbone starts from (its VAE file's sha256)."""
    from meg_jax.distill.seeding import file_sha256

    return {"vae_sha256": file_sha256(os.path.join(backbone_dir, "vae", "vae.safetensors"))}


def run_ue_decoder_from_backbone(config: DistillConfig, backbone_dir: str, workdir: str, *,
                                 mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                                 stop_after: int | None = None) -> bool:
    """Trains the ``ue_decoder`` stage from a shipped backbone's VAE (``load_backbone``).

    The stage starts from the folder's (refined) decoder groups, keeps its encoder frozen
    and uses its latent scale, so no work directory of the earlier stages is needed; the
    checkpoints, metrics and final params go to ``workdir/ue_decoder`` as in :func:`run`
    (resumable; the record adds the sha256 of the VAE file it started from, so a run is
    never continued from another VAE).

    Args:
      config: the job config; ``config.ue_decoder`` must be set and ``config.backbone.vae``
        must equal the folder's VAE architecture.
      backbone_dir: a shipped backbone folder (e.g. ``checkpoints/tiny``).
      workdir: where the stage's folder goes.
      mesh, progress, stop_after: as in :func:`run`.

    Returns:
      True when the stage has finished (``workdir/ue_decoder/final/decoder.safetensors``).
    """
    if config.ue_decoder is None:
        raise ValueError("config.ue_decoder is None: the ue_decoder stage is off (do not pass --ue_decoder None)")
    bb = ckpt.load_backbone(backbone_dir, ue_decoder=False)
    if bb.config.vae != config.backbone.vae:
        diffs = config_lib.diff(config_lib.to_dict(bb.config.vae), config_lib.to_dict(config.backbone.vae))
        raise ValueError(f"{backbone_dir}: its VAE architecture differs from the config's backbone.vae "
                         f"({'; '.join(diffs)}); pick the --preset it was made with")
    if stage_done(workdir, "ue_decoder"):
        ckpt.check_config(os.path.join(workdir, "ue_decoder"), _ue_record(config, backbone_dir))
        return True
    mesh = parallel.make_mesh(model=config.parallel.model_axis) if mesh is None else mesh
    models = build_models(config)
    inputs = {"encoder": split_vae(bb.vae)[0], "latent_scale": jnp.float32(bb.config.latent_scaling_factor)}
    state = init_stage_state("ue_decoder", models, config, vae_params=bb.vae)
    step = compiled_train_step("ue_decoder", config, mesh)
    state, done = train_stage("ue_decoder", workdir, _ue_record(config, backbone_dir), state, step, inputs,
                              config.ue_decoder, mesh, keep=config.keep_checkpoints,
                              async_save=config.async_checkpointing, progress=progress, stop_after=stop_after,
                              parallel_config=config.parallel)
    if done:
        save_final(workdir, "ue_decoder", _final_parts("ue_decoder", state, inputs))
        mark_done(workdir, "ue_decoder", config.ue_decoder.steps)
    return done


def _ue_record(config: DistillConfig, backbone_dir: str) -> dict[str, Any]:
    d = config_lib.to_dict(config)
    return {"ue_decoder": d["ue_decoder"], "data": d["data"], "backbone.vae": d["backbone"]["vae"],
            "init_from": _ue_init_record(backbone_dir)}


def export_ue_decoder(workdir: str, out: str, config: DistillConfig, *,
                      init_from: Mapping[str, Any] | None = None) -> None:
    """Writes ``out/ue_decoder/`` (config.json + ``decoder.safetensors``) from a finished stage.

    Only that folder is written: every other component of ``out`` stays byte for byte as it
    was. ``config.json`` records the VAE architecture (``config``), the stage's config
    (``stage_config``: ratios, SNR range, link, optimisation), its ``steps`` and ``seed``
    (``stage``) and what it started from (``init_from``).
    """
    cfg = config.ue_decoder
    if cfg is None:
        raise ValueError("config.ue_decoder is None: nothing to export")
    params = load_final(workdir, "ue_decoder", ("decoder",))
    if init_from is None:
        record = ckpt.read_json(os.path.join(workdir, "ue_decoder", ckpt.CONFIG_FILE), "the ue_decoder stage's record")
        init_from = record.get("init_from", {})
    ckpt.export_component(out, "ue_decoder", config.backbone.vae, {"decoder": params["decoder"]},
                          stage={"ue_decoder": {"steps": cfg.steps, "seed": cfg.seed}},
                          stage_config=config_lib.to_dict(cfg), init_from=dict(init_from))
