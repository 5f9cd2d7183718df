"""Pipeline benchmark: seconds per image of meg-jax's ``load_pipeline`` vs diffusers (PyTorch).

Two workloads, both measured in the same run, each side on the same number of CPU threads
(XLA's intra-op threads and ``torch.set_num_threads``):

1. **Tiny SD pipeline, whole call.** A random SD-1.x-like pipeline (diffusers' own pipeline-test
   UNet: block_out_channels (32, 64), 2 layers per block; a 2-level VAE; a 5-layer CLIP text
   encoder of width 32 with 77 tokens; 64x64 images), written with ``save_pretrained`` and
   loaded by both sides: ``pipe(prompt, num_inference_steps=N, guidance_scale=7.5,
   latents=...)`` end to end (prompt + negative encoding, N guided DDIM steps, VAE decode).
2. **SD-1.5-architecture UNet + scheduler loop.** diffusers' SD-1.5 ``unet/config.json``
   (860 M parameters) with random weights, 64x64x4 latents, a 77x768 text context, batch 1,
   no CFG, N DDIM steps: the denoising loop only. The full SD-1.5 pipeline (CLIP ViT-L text
   tower and the 512x512 VAE decode) is not timed: on this CPU it would not fit the run's
   time budget; the UNet loop is where the time goes.

meg-jax runs jitted (float32, and bfloat16 params/compute); the first call compiles, and
"compile s" is that call's time minus the steady per-call median (compile plus first-run
overhead). Timings are medians over ``--repeats`` calls; the tiny pipeline's are timed
round-robin (meg-jax fp32, meg-jax bf16, diffusers, ...), so every side sees the same
machine load; the SD-1.5 ones one after the other, to keep one copy of the weights in memory. "max abs diff" is
a sanity column: meg-jax fp32 vs diffusers on the same latents (images in [0, 1] for 1,
final latents for 2).

Run from the repository root::

    python -m eval.bench_pipeline                     # writes docs/bench_pipeline.md
    python -m eval.bench_pipeline --steps 4 --sd15_steps 2 --repeats 2 --sd15_repeats 1 --threads 1
    python -m eval.bench_pipeline --help              # every flag with its default

``--threads N`` pins the process to N CPUs (the last N it may use) and sets ``XLA_FLAGS`` before
JAX starts (unless ``XLA_FLAGS`` is already set), so run it as its own process. The table goes to stdout, progress to the log (stderr).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

__all__ = ["Args", "main", "parse_args"]

log = logging.getLogger("eval.bench_pipeline")


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.bench_pipeline``."""

    steps: int = 10  # scheduler steps of the tiny pipeline
    sd15_steps: int = 2  # DDIM steps of the SD-1.5 UNet loop
    repeats: int = 3  # timed calls per side (tiny pipeline)
    sd15_repeats: int = 1  # timed loops per side on the SD-1.5 UNet
    threads: int = 1  # CPU threads for XLA and PyTorch each
    sd15: bool = True  # time the SD-1.5 UNet workload (--no_sd15 skips it)
    sd15_bf16: bool = True  # time meg-jax bf16 on the SD-1.5 UNet (--no_sd15_bf16 skips it)
    out: str = "docs/bench_pipeline.md"  # markdown report ('' to skip writing)


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> :class:`Args`.

    Raises:
      SystemExit: ``--help`` (0); an unknown flag or a bad value (2, naming it).
    """
    from meg_jax import config as config_lib

    prog = "python -m eval.bench_pipeline"
    args = config_lib.parse_cli(Args, argv, prog=prog, description=(__doc__ or "").split("\n\n")[0])
    for name in ("steps", "sd15_steps", "repeats", "sd15_repeats", "threads"):
        if getattr(args, name) < 1:
            sys.stderr.write(f"{prog}: error: --{name} must be >= 1, got {getattr(args, name)}\n")
            raise SystemExit(2)
    return args


def _set_threads(threads: int) -> None:
    """Pins the process to ``threads`` CPUs and sets XLA's thread flags, before JAX starts.

    The pinning is what makes the thread count true for meg-jax: XLA:CPU runs its YNNPACK
    fusions on a thread pool of its own that ``XLA_FLAGS`` do not reach (measured with one
    "thread": process CPU time ~1.8x wall time on 2 idle cores, so the unpinned meg-jax rows
    used two cores against PyTorch's one whenever the machine had one free). PyTorch and
    meg-jax then share the same ``threads`` CPUs.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        os.sched_setaffinity(0, set(cpus[-threads:]))
    if "XLA_FLAGS" in os.environ:
        return
    if "jax" in sys.modules:
        log.warning("JAX is already imported: --threads %d does not reach XLA (run as its own process)", threads)
        return
    os.environ["XLA_FLAGS"] = (
        "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" if threads == 1
        else f"intra_op_parallelism_threads={threads}"
    )


SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
# diffusers' StableDiffusionPipeline test UNet (tests/pipelines/stable_diffusion), 1.4 M parameters.
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=32)
TINY_VAE = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=32, sample_size=64)
PROMPT = ["a photo of an astronaut riding a horse on the moon"]


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """First-call seconds and median steady seconds per function, timed round-robin."""
    first: dict[str, float] = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return first, {name: statistics.median(v) for name, v in times.items()}


def _ready(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def _build_tiny_pipeline(folder: str) -> Any:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from sd_fixtures import clip_text_config, random_clip_text_model, save_clip_tokenizer  # the offline CLIP vocab
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    save_clip_tokenizer(os.path.join(folder, "_tok"), model_max_length=77)
    tok = CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok"))
    te = random_clip_text_model(clip_text_config(hidden_size=32, intermediate_size=37, num_hidden_layers=5,
                                                 num_attention_heads=4, max_position_embeddings=77), seed=1)
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**TINY_VAE).eval(), text_encoder=te, tokenizer=tok,
                                   unet=UNet2DConditionModel(**TINY_UNET).eval(),
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(folder, "sd"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_tiny(args: Args) -> tuple[list[list[Any]], str]:
    import jax.numpy as jnp
    import numpy as np
    import torch

    from meg_jax.backbone import load_pipeline

    folder = tempfile.mkdtemp(prefix="bench_pipeline_")
    torch_pipe = _build_tiny_pipeline(folder)
    pipe32 = load_pipeline(os.path.join(folder, "sd"))
    pipe16 = load_pipeline(os.path.join(folder, "sd"), dtype=jnp.bfloat16)
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5)
    out: dict[str, np.ndarray] = {}

    def jax_call(pipe: Any, name: str) -> Callable[[], Any]:
        def call() -> Any:
            out[name] = pipe(PROMPT, latents=latents.numpy(), **kw)
        return call

    def torch_call() -> Any:
        with torch.no_grad():
            out["torch"] = torch_pipe(PROMPT, latents=latents.clone(), output_type="np", **kw).images

    first, median = _interleaved({"fp32": jax_call(pipe32, "fp32"), "bf16": jax_call(pipe16, "bf16"),
                                  "torch": torch_call}, args.repeats)
    diff32 = float(np.abs(out["fp32"] - out["torch"]).max())
    diff16 = float(np.abs(out["bf16"] - out["torch"]).max())
    rows = [
        ["tiny SD pipeline, whole call", "meg-jax fp32 (jit)", median["fp32"], first["fp32"] - median["fp32"],
         median["torch"] / median["fp32"], diff32],
        ["tiny SD pipeline, whole call", "meg-jax bf16 (jit)", median["bf16"], first["bf16"] - median["bf16"],
         median["torch"] / median["bf16"], diff16],
        ["tiny SD pipeline, whole call", "diffusers fp32 (torch)", median["torch"], None, 1.0, None],
    ]
    what = (f"64x64 image, batch 1, {args.steps} DDIM steps, CFG 7.5 (UNet on batch 2), prompt + negative "
            f"encoding, VAE decode")
    return rows, what


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(first-call seconds, median steady seconds) of one function timed on its own."""
    first, median = _interleaved({"f": fn}, repeats)
    return first["f"], median["f"]


def bench_sd15(args: Args) -> tuple[list[list[Any]], str]:
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from flax import traverse_util

    from meg_jax.backbone import UNet, params_from_torch_state_dict, preset, schedulers

    cfg = preset("sd15").unet
    torch.manual_seed(0)
    model = UNet2DConditionModel(**cfg.to_diffusers()).eval()
    n_params = sum(p.numel() for p in model.parameters())
    steps = args.sd15_steps
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn((1, 4, 64, 64), generator=gen)
    ctx_t = torch.randn((1, 77, 768), generator=gen)
    sched_t = DDIMScheduler(**SD_SCHEDULER)
    out: dict[str, np.ndarray] = {}

    def torch_loop() -> Any:
        sched_t.set_timesteps(steps)
        x = x_t * sched_t.init_noise_sigma
        with torch.no_grad():
            for t in sched_t.timesteps:
                eps = model(sched_t.scale_model_input(x, t), t, encoder_hidden_states=ctx_t).sample
                x = sched_t.step(eps, t, x).prev_sample
        out["torch"] = x.numpy()

    # One copy of the 3.4 GB of weights at a time (this machine's memory is shared): PyTorch is
    # timed first, then its weights move to JAX leaf by leaf and the torch model is freed.
    timings = {"torch": _timed(torch_loop, args.sd15_repeats)}
    flat = traverse_util.flatten_dict(
        params_from_torch_state_dict(cfg, {k: v.detach().numpy() for k, v in model.state_dict().items()}))
    del model
    gc.collect()
    for k in list(flat):
        flat[k] = jnp.asarray(flat.pop(k))
    params32 = traverse_util.unflatten_dict(flat)
    del flat
    sched = schedulers.load_scheduler({**SD_SCHEDULER, "_class_name": "DDIMScheduler"})
    plan = sched.plan(steps)
    x_j = jnp.asarray(x_t.numpy().transpose(0, 2, 3, 1))
    ctx_j = jnp.asarray(ctx_t.numpy())

    def make(dtype: Any) -> Callable[..., Any]:
        unet = UNet(cfg, dtype=dtype)

        @jax.jit
        def loop(params, plan, x, ctx):
            fn = lambda xi, t: unet.apply(params, xi, t, ctx)  # noqa: E731
            return schedulers.denoise(plan, fn, x * plan.init_noise_sigma)

        return loop

    loop32 = make(jnp.float32)
    timings["fp32"] = _timed(lambda: out.__setitem__("fp32", np.asarray(_ready(loop32(params32, plan, x_j, ctx_j)))),
                             args.sd15_repeats)
    if args.sd15_bf16:
        params16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params32)
        del params32
        gc.collect()
        loop16 = make(jnp.bfloat16)
        timings["bf16"] = _timed(lambda: _ready(loop16(params16, plan, x_j, ctx_j)), args.sd15_repeats)
    diff = float(np.abs(out["fp32"].transpose(0, 3, 1, 2) - out["torch"]).max())
    name = "SD-1.5 UNet + DDIM loop"
    torch_s = timings["torch"][1]
    rows = [[name, "meg-jax fp32 (jit)", timings["fp32"][1], timings["fp32"][0] - timings["fp32"][1],
             torch_s / timings["fp32"][1], diff]]
    if "bf16" in timings:
        rows.append([name, "meg-jax bf16 (jit)", timings["bf16"][1], timings["bf16"][0] - timings["bf16"][1],
                     torch_s / timings["bf16"][1], None])
    rows.append([name, "diffusers fp32 (torch)", torch_s, None, 1.0, None])
    what = (f"diffusers' SD-1.5 unet config ({n_params / 1e6:.0f} M parameters, random weights, the same in both), "
            f"64x64x4 latents, batch 1, text context 77x768, {steps} DDIM steps, no CFG; UNet + scheduler only "
            f"(no text encoder, no VAE). Timed one implementation after the other (PyTorch, then meg-jax fp32, "
            f"then bf16), not round-robin, so that one copy of the weights is in memory at a time")
    return rows, what


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _table(rows: Sequence[Sequence[Any]]) -> str:
    header = ["workload", "implementation", "s per image", "compile s", "diffusers / this (≥ 1: not slower)",
              "max abs diff vs diffusers"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point: times both workloads, prints the table and writes the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from meg_jax import job_setup

    job_setup.configure_logging()
    _set_threads(args.threads)
    import jax
    import torch

    torch.set_num_threads(args.threads)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.time()
    rows, notes = [], []
    log.info("tiny SD pipeline, %d steps, %d timed calls per side", args.steps, args.repeats)
    r, what = bench_tiny(args)
    rows += r
    notes.append(f"- tiny SD pipeline: {what}.")
    if args.sd15:
        log.info("SD-1.5 UNet + DDIM loop, %d steps, %d timed loops per side", args.sd15_steps, args.sd15_repeats)
        r, what = bench_sd15(args)
        rows += r
        notes.append(f"- SD-1.5 UNet: {what}.")
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    table = _table(rows)
    print(table)
    if not args.out:
        return
    command = "python -m eval.bench_pipeline " + " ".join(argv)
    cpu = platform.processor() or platform.machine()
    text = f"""# Pipeline benchmark: meg-jax `load_pipeline` vs diffusers

Written by `eval/bench_pipeline.py` (rerun it rather than editing the numbers).

- Command: `{command.strip()}`
- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; wall time of the run {time.time() - t0:.0f} s
- Machine: {cpu}, {os.cpu_count()} cores; {platform.platform()}; no accelerator (JAX devices: {jax.devices()})
- Software: Python {platform.python_version()}, jax {jax.__version__}, torch {torch.__version__}
- Threads: {args.threads} for each side: the process pinned to CPUs {sorted(os.sched_getaffinity(0))} (XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '')}`, torch.set_num_threads({args.threads}))
- Load average (1/5/15 min) before: {load_before}; after: {load_after}. Load above the core count means other
  jobs shared the CPU: absolute times are then inflated; the tiny pipeline's round-robin timing keeps its ratios
  comparable, while the SD-1.5 rows are timed one after the other and their ratios carry any change of load.
- Medians over {args.repeats} (tiny pipeline) and {args.sd15_repeats} (SD-1.5 UNet) timed calls after one untimed
  call (which compiles meg-jax's programs).

{chr(10).join(notes)}

{table}

Where the SD-1.5 UNet's time goes, block by block against diffusers' modules on one core:
`docs/bench_blocks.md` (`python -m eval.bench_blocks`).

"compile s": the first call's time minus the steady median (meg-jax's jit compile plus first-run
overhead; diffusers compiles nothing). "max abs diff": meg-jax fp32 (or bf16) vs diffusers on the same
latents: image values in [0, 1] for the tiny pipeline, final latents for the SD-1.5 loop.
"""
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
