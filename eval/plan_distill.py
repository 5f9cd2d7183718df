"""Plan a distillation run on a pod from this machine: the compiler's memory and FLOPs of the student step.

Lowers and compiles the real student train step (``meg_jax.distill.train.make_train_step`` over
``student_loss_fn``: text encoder forward, K unrolled student UNet passes, backward, AdamW, EMA)
for an SD-1.5 or SDXL-sized backbone on abstract shapes (``jax.ShapeDtypeStruct`` carrying the
partition rules' shardings), over N fake CPU devices, and prints per device what XLA's
``compiled.memory_analysis()`` reports (arguments, outputs, temporaries, generated code), the
step's FLOPs (``cost_analysis()``), whether it fits ``--device_memory``, and the step time a
given peak FLOP/s and MFU imply. Nothing is allocated and nothing runs::

    python -m eval.plan_distill --model sd15 --devices 8 --device_memory 16 --batch_per_device 8 \\
        --steps 4 --params fsdp --bf16 --remat nothing_saveable --rollout_remat
    python -m eval.plan_distill --help    # every flag with its default

The command sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (and the CPU platform)
before importing JAX, so run it as its own process. Compiling SD-1.5/SDXL steps on a CPU takes
minutes and several GB of host memory. The figures go to stdout, progress to the log (stderr).

Reading the numbers:

* ``peak = arguments + outputs - aliased + temporaries``: the train state is donated, so its
  output buffers alias the input's and count once.
* The FLOP count is XLA's ``HloCostAnalysis`` of the un-partitioned program, all devices
  together (2 per multiply-accumulate, elementwise ops 1, see ``meg_jax.backbone.flops``).
  XLA counts a ``while`` loop's body once whatever its trip count, so each ``scan`` of the
  traced step (the K sampling passes, the microbatches, the chunked attention's query
  chunks, and their transposes) adds its body's count ``length - 1`` more times
  (:func:`loop_aware_flops`: each body lowered on its own, nothing compiled).
* The CPU compiler's memory figures are what XLA:CPU's buffer assignment needs; a GPU/TPU
  compiler fuses differently (e.g. flash attention never materialises ``[B, H, N, N]``
  logits), so they are an upper-bound-style estimate, not a measurement on the accelerator.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Literal, Optional, Sequence

__all__ = ["Args", "main", "parse_args", "plan"]

log = logging.getLogger("eval.plan_distill")

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.plan_distill``."""

    model: Literal["sd15", "sdxl", "tiny"]  # backbone preset (tiny: the shipped 32x32 model, for a quick check)
    devices: int  # N devices of the mesh (fake CPU devices)
    device_memory: float = 80.0  # memory per device, GiB
    # student batch per data-axis device and optimizer step (split into --grad_accum microbatches)
    batch_per_device: int = 1
    steps: int = 4  # K, unrolled student steps of the trained branch
    params: Literal["replicated", "fsdp"] = "replicated"  # parameter layout
    model_axis: int = 1  # devices on the tensor-parallel axis
    bf16: bool = False  # UNet computes in bfloat16 (fp32 master weights)
    remat: str = "none"  # jax.checkpoint_policies name for each UNet block (nothing_saveable, dots_saveable, ...)
    rollout_remat: bool = False  # rematerialise each of the K UNet passes (memory ~ one pass)
    attention: Literal["reference", "chunked", "xla", "cudnn"] = "reference"  # attention implementation
    grad_accum: int = 1  # microbatches per step
    peak_tflops: float = 989.0  # peak dense TFLOP/s per device for the step-time estimate (H100 SXM bf16: 989)
    mfu: float = 0.4  # model FLOP utilisation assumed for the step time
    flops: bool = True  # count FLOPs with each loop body per iteration (--no_flops skips it)
    memory: bool = True  # compile for the memory analysis (--no_memory: trace and lower only, for the FLOPs)
    full_codegen: bool = False  # optimise the generated CPU code too (slower compile; same memory figures)
    json: Optional[str] = None  # also write the figures as JSON to this path


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> :class:`Args` (imports no JAX: the device count is set after this).

    Raises:
      SystemExit: ``--help`` (0); an unknown flag, a bad value or an inconsistent mesh (2, naming it).
    """
    from meg_jax import config as config_lib

    prog = "python -m eval.plan_distill"
    args = config_lib.parse_cli(Args, argv, prog=prog, description=__doc__.split("\n\n")[0])
    bad = None
    for name in ("devices", "batch_per_device", "steps", "model_axis", "grad_accum"):
        if getattr(args, name) < 1:
            bad = f"--{name} must be >= 1, got {getattr(args, name)}"
            break
    if bad is None and args.batch_per_device % args.grad_accum:
        bad = f"--grad_accum {args.grad_accum} must divide --batch_per_device {args.batch_per_device}"
    if bad is None and args.devices % args.model_axis:
        bad = f"--model_axis {args.model_axis} must divide --devices {args.devices}"
    if bad is not None:
        sys.stderr.write(f"{prog}: error: {bad}\n")
        raise SystemExit(2)
    return args


def _set_devices(n: int, fast_codegen_off: bool = False) -> None:
    """Asks XLA for ``n`` host devices; must run before JAX is imported."""
    if "jax" in sys.modules:
        import jax

        if jax.device_count() != n:
            raise RuntimeError(f"JAX is already imported with {jax.device_count()} devices; run "
                               f"`python -m eval.plan_distill` as its own process to get {n}")
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    # First: XLA stops reading XLA_FLAGS at a word that is not a --flag (e.g. a stray
    # "intra_op_parallelism_threads=1"), and a device count after it would be dropped.
    flags.insert(0, f"--xla_force_host_platform_device_count={n}")
    if not fast_codegen_off:
        # LLVM's optimisation of the CPU code is most of the compile time and changes nothing
        # the plan reads: buffer assignment (the memory analysis) is done on the optimised HLO
        # before code generation.
        flags += ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"


def distill_config(args: Args) -> Any:
    """The ``DistillConfig`` of the planned student stage (one trained K, global batch B·N/M)."""
    from meg_jax.backbone.config import preset as backbone_preset
    from meg_jax.data.classifier import ClassifierConfig
    from meg_jax.data.shapes import ShapesConfig
    from meg_jax.distill import config as dconfig
    from meg_jax.partition import ParallelConfig

    sampling = dconfig.SamplingConfig()
    b = backbone_preset(args.model)
    b = dataclasses.replace(b, unet=dataclasses.replace(b.unet, time_cond_proj_dim=sampling.step_embedding_dim))
    if args.model == "tiny":
        b = dataclasses.replace(b, prediction_type="v_prediction")
    res = b.vae.sample_size if isinstance(b.vae.sample_size, int) else b.vae.sample_size[0]
    data = ShapesConfig(resolution=res, max_length=b.text_encoder.max_length)
    global_batch = args.batch_per_device * (args.devices // args.model_axis)  # per step (all microbatches)
    student = dconfig.StudentStageConfig(batch_size=global_batch, step_counts=(args.steps,), step_probs=(1.0,),
                                         num_targets=global_batch, target_chunk=global_batch)
    return dconfig.DistillConfig(
        preset=f"plan-{args.model}", backbone=b, data=data, sampling=sampling,
        classifier_model=ClassifierConfig(data=data), student=student,
        parallel=ParallelConfig(params=args.params, model_axis=args.model_axis),
        compute=dconfig.ComputeConfig(dtype="bfloat16" if args.bf16 else "float32", remat=args.remat,
                                      rollout_remat=args.rollout_remat, attention=args.attention,
                                      grad_accum_steps=args.grad_accum),
    )


def _abstract_student(config: Any) -> tuple[Any, Any]:
    """Abstract (shape-only) student params ``{"params": ...}`` and frozen inputs of ``config``."""
    import jax
    import jax.numpy as jnp

    from meg_jax.backbone.text_encoder import TextEncoder
    from meg_jax.backbone.unet import UNet, example_inputs

    b = config.backbone
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    unet = jax.eval_shape(lambda k: UNet(b.unet).init({"params": k, "tome": k}, **example_inputs(b.unet)), key)
    tokens = jax.ShapeDtypeStruct((1, b.text_encoder.max_length), jnp.int32)
    text = jax.eval_shape(TextEncoder(b.text_encoder).init, key, tokens)
    n, h, c = config.student.num_targets, b.latent_size, b.vae.latent_channels
    targets = {
        "noise": jax.ShapeDtypeStruct((n, h, h, c), jnp.float32),
        "latents": jax.ShapeDtypeStruct((n, h, h, c), jnp.float32),
        "tokens": jax.ShapeDtypeStruct((n, b.text_encoder.max_length), jnp.int32),
    }
    if b.unet.addition_embed_type == "text_time":
        targets["text_embeds"] = jax.ShapeDtypeStruct((n, b.unet.text_embeds_dim), jnp.float32)
    # pixel_weight = 0: the VAE decoder is not part of the step (an empty tree).
    inputs = {"vae": {}, "latent_scale": jax.ShapeDtypeStruct((), jnp.float32), "text_encoder": text,
              "targets": targets}
    return unet, inputs


def compile_step(config: Any, compile: bool = True) -> tuple[Any, Any, Any, Any, dict[str, float]]:
    """Traces, lowers (and compiles) the student train step on abstract sharded shapes.

    Returns:
      ``(compiled or None, lowered, traced, (abstract state, its specs, mesh), seconds)``,
      ``seconds`` the wall time of each phase: ``trace_s``, ``lower_s``, ``compile_s``.
    """
    import jax
    import jax.numpy as jnp

    from meg_jax import parallel, partition
    from meg_jax.backbone import layers
    from meg_jax.distill import train

    mesh = parallel.make_mesh(model=config.parallel.model_axis)
    models = train.build_models(config)
    tx = train.make_optimizer(config.student)
    params, inputs = _abstract_student(config)
    state = jax.eval_shape(lambda p: train.create_state(p, tx), params)
    state_specs = train.state_specs(state, tx, config.parallel, mesh)
    state_abs = partition.abstract(state, mesh, state_specs)
    inputs_abs = partition.abstract(inputs, mesh, train.input_specs(inputs, config.parallel, mesh))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated_sharding(mesh))
    step = train.make_train_step(train.student_loss_fn(models, config, mesh), tx, config.student.ema_decay,
                                 mesh, config.parallel, config.compute.grad_accum_steps)
    seconds: dict[str, float] = {}
    t0 = time.time()
    # the plan models an accelerator's step: trace without the CPU-only kernel rewrites (tiled
    # attention, convs as matmuls) that would otherwise apply on these fake CPU devices
    with layers.plain_kernels():
        traced = step.trace(state_abs, inputs_abs, key)
    seconds["trace_s"] = time.time() - t0
    log.info("traced in %.1f s (%d equations at the top level)", seconds["trace_s"], len(traced.jaxpr.eqns))
    t0 = time.time()
    lowered = traced.lower()
    seconds["lower_s"] = time.time() - t0
    log.info("lowered in %.1f s (StableHLO: %.1f MB of text)", seconds["lower_s"], len(lowered.as_text()) / 1e6)
    compiled = None
    if compile:
        log.info("compiling (XLA:CPU; set TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=hlo_pass_pipeline=1 "
                 "to log each pass)")
        t0 = time.time()
        compiled = lowered.compile()
        seconds["compile_s"] = time.time() - t0
        log.info("compiled in %.1f s", seconds["compile_s"])
    return compiled, lowered, traced, (state, state_specs, mesh), seconds


def loop_aware_flops(jaxpr: Any, flops_as_counted: float) -> float:
    """FLOPs of a traced program with every ``scan`` body counted ``length`` times.

    XLA's cost analysis counts a ``while`` loop's body once whatever its trip count. Every
    ``scan`` of the jaxpr (the K sampling passes, the microbatches, the query chunks of the
    chunked attention, their transposes in the backward; at any depth, inside ``jit``,
    ``checkpoint`` or another scan) adds what XLA missed: ``(length - 1)`` times its body's
    XLA count plus ``length`` times the body's own correction, recursively. Each body is
    lowered on its own (no compile), identical small bodies once, so the count costs about
    one more lowering of the program instead of a lowering with every loop unrolled.

    Args:
      jaxpr: the program (``jax.extend.core.ClosedJaxpr``, e.g. ``jit(f).trace(...).jaxpr``).
      flops_as_counted: XLA's count of the whole program as lowered (loops once).

    Returns:
      FLOPs with loops counted per iteration (XLA's conventions otherwise: 2 per
      multiply-accumulate, 1 per elementwise output; the loop counters' own arithmetic is
      counted once).
    """
    import jax
    from jax.extend import core as jcore

    body_flops: dict[Any, float] = {}
    corrections: dict[int, float] = {}

    def key_of(closed: Any) -> Any:
        # Identical small bodies (one query chunk of attention in every layer, pass and
        # transpose) are lowered once; big ones are distinct objects anyway.
        return str(closed.jaxpr) if len(closed.jaxpr.eqns) < 200 else id(closed.jaxpr)

    def xla_count(closed: Any) -> float:
        k = key_of(closed)
        if k not in body_flops:
            args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals]
            body_flops[k] = _flops(jax.jit(jcore.jaxpr_as_fun(closed)).lower(*args).cost_analysis())
        return body_flops[k]

    def correction(open_jaxpr: Any) -> float:
        if id(open_jaxpr) in corrections:
            return corrections[id(open_jaxpr)]
        total = 0.0
        for eqn in open_jaxpr.eqns:
            if eqn.primitive.name == "scan":
                body, length = eqn.params["jaxpr"], eqn.params["length"]
                total += (length - 1) * xla_count(body) + length * correction(body.jaxpr)
            else:
                if eqn.primitive.name == "while":
                    log.warning("a while loop of unknown trip count is counted once in the FLOPs")
                total += sum(correction(sub) for sub in jcore.jaxprs_in_params(eqn.params))
        corrections[id(open_jaxpr)] = total
        return total

    return flops_as_counted + correction(jaxpr.jaxpr)


def _flops(cost: Any) -> float:
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def plan(args: Args, command: Optional[str] = None) -> dict[str, Any]:
    """Compiles the step(s) and returns the figures (bytes per device, FLOPs per step).

    Args:
      args: the parsed flags.
      command: the command line recorded with the figures (None: this process's ``sys.argv``).
    """
    import jax

    from meg_jax import partition

    if jax.device_count() != args.devices:
        raise RuntimeError(f"--devices {args.devices} but JAX sees {jax.device_count()} devices; check XLA_FLAGS "
                           f"({os.environ.get('XLA_FLAGS', '')!r}) and run `python -m eval.plan_distill` as its own process")
    config = distill_config(args)
    log.info("planning the %s student step on %d devices", args.model, args.devices)
    compiled, lowered, traced, (state, specs, mesh), seconds = compile_step(config, compile=args.memory)
    if command is None:
        command = "python -m eval.plan_distill " + " ".join(sys.argv[1:])
    out: dict[str, Any] = {
        "command": command,
        "model": args.model, "devices": args.devices, "model_axis": args.model_axis,
        "batch_per_device": args.batch_per_device, "global_batch": config.student.batch_size,
        "steps": args.steps, "params": args.params, "bf16": args.bf16, "remat": args.remat,
        "rollout_remat": args.rollout_remat, "attention": args.attention, "grad_accum": args.grad_accum,
        "state_per_device": partition.bytes_per_device(state, mesh, specs),
        "device_memory_gib": args.device_memory,
        **seconds,
    }
    if compiled is not None:
        mem = compiled.memory_analysis()
        out.update(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                   aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
                   generated_code=mem.generated_code_size_in_bytes)
        out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
        out["fits"] = out["peak"] + out["generated_code"] <= args.device_memory * GIB
    out["flops_xla_as_counted"] = _flops(lowered.cost_analysis())
    if args.flops:
        log.info("counting FLOPs with each loop body per iteration")
        t0 = time.time()
        out["flops_per_step"] = loop_aware_flops(traced.jaxpr, out["flops_xla_as_counted"])
        out["flops_s"] = time.time() - t0
        log.info("counted FLOPs in %.1f s", out["flops_s"])
        t = out["flops_per_step"] / (args.devices * args.peak_tflops * 1e12 * args.mfu)
        out["step_time_s"] = t
        out["peak_tflops"], out["mfu"] = args.peak_tflops, args.mfu
    return out


def _report(out: dict[str, Any]) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB" if b >= 0.1 * GIB else f"{b / 2**20:8.2f} MiB"  # noqa: E731
    lines = [
        f"{out['model']}: {out['devices']} devices (model axis {out['model_axis']}), batch "
        f"{out['batch_per_device']}/device (global {out['global_batch']}), K = {out['steps']}, params "
        f"{out['params']}, {'bf16' if out['bf16'] else 'fp32'} compute, remat {out['remat']}, rollout remat "
        f"{out['rollout_remat']}, attention {out['attention']}, grad accum {out['grad_accum']}",
        f"  traced in {out['trace_s']:.0f} s, lowered in {out['lower_s']:.0f} s"
        + (f", compiled in {out['compile_s']:.0f} s" if "compile_s" in out else "")
        + (f", FLOPs counted in {out['flops_s']:.0f} s" if "flops_s" in out else ""),
    ]
    if "peak" in out:
        lines += [
        "  per device (XLA:CPU memory analysis):",
        f"    arguments       {g(out['arguments'])}   (train state {g(out['state_per_device']).strip()})",
        f"    outputs         {g(out['outputs'])}   (aliased with donated arguments: {g(out['aliased']).strip()})",
        f"    temporaries     {g(out['temporaries'])}",
        f"    generated code  {g(out['generated_code'])}",
        f"    peak            {g(out['peak'])}   -> {'fits' if out['fits'] else 'does NOT fit'} in "
        f"{out['device_memory_gib']:g} GiB",
        ]
    else:
        lines.append(f"  per device: train state {g(out['state_per_device']).strip()} (not compiled: --no_memory)")
    if "flops_per_step" in out:
        lines.append(f"  FLOPs per step (all devices): {out['flops_per_step']:.4g} "
                     f"(XLA counts {out['flops_xla_as_counted']:.4g} with each loop body once)")
        lines.append(f"  step time at {out['peak_tflops']:g} TFLOP/s/device and MFU {out['mfu']:g}: "
                     f"{out['step_time_s']:.3g} s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: prints the plan (and writes ``--json``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from meg_jax import job_setup

    job_setup.configure_logging()
    _set_devices(args.devices, args.full_codegen)
    out = plan(args, command="python -m eval.plan_distill " + " ".join(argv))
    print(_report(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
