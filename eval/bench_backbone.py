"""Backbone benchmark: Flax UNet vs diffusers' PyTorch UNet, and ToMe on a transformer block.

Two tables, each with its baseline measured in the same run:

1. UNet forward, same tiny config and same weights (the PyTorch state dict loaded into
   Flax): the library's Flax ``UNet`` as it is (jitted, float32; nothing patched in) vs
   diffusers ``UNet2DConditionModel`` under ``torch.no_grad()``. Every row is a *pair*
   timed round-robin (Flax call, PyTorch call, Flax call, ...) in one process, so both see
   the same machine load — this CPU is shared. Rows: all cores
   (``torch.set_num_threads(cores)``); one core (process pinned to one CPU, PyTorch 1
   thread); all cores with PyTorch at 1 thread (its best setting on a loaded machine); and,
   as a diagnostic, all cores with XLA's CPU YNNPACK fusions switched off
   (``--xla_cpu_experimental_ynn_fusion_type=``). Each row runs in a child process because
   CPU affinity and ``XLA_FLAGS`` must be set before JAX starts. Max abs output difference
   against PyTorch is a sanity column.
2. Token merging (ToMe for SD) inside the UNet's own ``BasicTransformerBlock`` (self-attn,
   cross-attn, GEGLU FF) at 64x64 = 4096 tokens: time per forward at ratio 0, 0.3, 0.5
   (round-robin), speed-up vs ratio 0, and the relative L2 error of the output vs ratio 0.

A short XLA profile of the Flax UNet (top ops by time, with the Flax op each came from) is
printed and written too: it is what to look at when Flax is slower.

Timings are medians over ``--repeats`` after ``--warmup`` untimed calls (the first compiles).
Run from the repository root::

    python -m eval.bench_backbone            # full run, writes docs/bench_backbone.md
    python -m eval.bench_backbone --quick    # smoke test (few repeats, small ToMe block)
    python -m eval.bench_backbone --help     # every flag with its default

Tables go to stdout, progress to the log (stderr).

On a machine whose default JAX device is a GPU, the Flax rows are repeated on the GPU
(PyTorch stays on the CPU: CI installs the CPU build).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import glob
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np

__all__ = ["Args", "BenchSettings", "main", "parse_args"]

log = logging.getLogger("eval.bench_backbone")

# The tiny UNet of diffusers' Stable Diffusion pipeline tests (1.43 M parameters).
TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
UNET_BATCH = 8
UNET_LATENT = 32
TEXT_LEN = 77  # CLIP's sequence length, as SD pipelines pass it
TOME_RATIOS = (0.0, 0.3, 0.5)
# XLA:CPU setting of the diagnostic row: no YNNPACK library fusions (plain XLA codegen).
NO_YNN_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run measures."""

    # Timed calls per row (the median is reported).
    repeats: int = 20
    # Untimed calls before timing (the first one compiles).
    warmup: int = 3
    # Timed calls per ToMe ratio (one call at 4096 tokens takes seconds on 2 cores).
    tome_repeats: int = 10
    # ToMe block: token grid side (side**2 tokens), channels, batch, heads, context width.
    tome_side: int = 64
    tome_channels: int = 320
    tome_batch: int = 1
    tome_heads: int = 8
    tome_context_dim: int = 768
    # jax.default_matmul_precision for the Flax rows ("default", "high" or "highest").
    matmul_precision: str = "default"


@dataclasses.dataclass(frozen=True)
class UNetRow:
    """One paired UNet measurement (a child process)."""

    label: str  # what the row varies
    single_core: bool  # pin the process to one CPU (PyTorch then runs 1 thread)
    xla_flags: str = ""  # extra XLA_FLAGS for the child ("" = XLA defaults)
    torch_threads: int | None = None  # None: one per available core


UNET_ROWS = (
    UNetRow("all cores", single_core=False),
    UNetRow("1 core", single_core=True),
    # On a loaded machine PyTorch's OpenMP threads wait on each other; its 1-thread time
    # with all cores available is then its best, and the fair baseline.
    UNetRow("all cores, PyTorch 1 thread", single_core=False, torch_threads=1),
    # Diagnostic: how much of the Flax time XLA:CPU's YNNPACK library fusions account for.
    UNetRow(f"all cores, XLA_FLAGS={NO_YNN_FLAGS}", single_core=False, xla_flags=NO_YNN_FLAGS),
)


# ------------------------------------------------------------------------------ helpers


def _interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Wall seconds of each ``fn()``, called round-robin ``repeats`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _machine() -> dict[str, Any]:
    import jax
    import torch

    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": ", ".join(str(d) for d in jax.devices()),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        return v if isinstance(v, str) else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ UNet


def _torch_unet():
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).eval()


def _unet_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NCHW latents [8, 4, 32, 32], timesteps [8] int, text features [8, 77, 32]."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((UNET_BATCH, 4, UNET_LATENT, UNET_LATENT)).astype(np.float32)
    t = rng.integers(0, 1000, size=(UNET_BATCH,)).astype(np.int64)
    ctx = rng.standard_normal((UNET_BATCH, TEXT_LEN, TINY_UNET["cross_attention_dim"])).astype(np.float32)
    return x, t, ctx


def _flax_unet(
    torch_model: Any, device: Any, precision: str
) -> tuple[Callable[[], Any], Callable[[], np.ndarray], Any]:
    """(timed call, NCHW numpy output, jitted forward with its args bound for lowering)."""
    import functools

    import jax

    from meg_jax.backbone import UNet, UNetConfig, params_from_torch_state_dict

    config = UNetConfig.from_diffusers(dict(torch_model.config))
    params = params_from_torch_state_dict(config, torch_model.state_dict())
    x, t, ctx = _unet_inputs()
    args = jax.device_put((params, x.transpose(0, 2, 3, 1), t.astype(np.int32), ctx), device)
    model = UNet(config)

    @jax.jit
    def forward(params, sample, timestep, context):
        with jax.default_matmul_precision(precision):
            return model.apply(params, sample, timestep, context)

    def call() -> Any:
        return forward(*args).block_until_ready()

    return call, lambda: np.asarray(call()).transpose(0, 3, 1, 2), functools.partial(forward.lower, *args)


def _torch_unet_call(torch_model: Any) -> tuple[Callable[[], Any], Callable[[], np.ndarray]]:
    import torch

    x, t, ctx = (torch.from_numpy(a) for a in _unet_inputs())

    def call() -> Any:
        with torch.no_grad():
            return torch_model(x, t, ctx).sample

    return call, lambda: call().numpy()


def _child_unet(settings: BenchSettings, single_core: bool, torch_threads: int | None, profile: bool) -> None:
    """Child mode: one paired Flax/PyTorch measurement, printed as JSON.

    Affinity is set here, before JAX creates its thread pool; ``XLA_FLAGS`` comes from the
    parent's environment for this child.
    """
    if single_core:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import jax
    import torch

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(torch_threads or cores)
    model = _torch_unet()
    torch_call, torch_out = _torch_unet_call(model)
    flax_call, flax_out, lower = _flax_unet(model, jax.devices("cpu")[0], settings.matmul_precision)
    diff = float(np.abs(flax_out() - torch_out()).max())
    times = _interleaved_times({"flax": flax_call, "torch": torch_call}, settings.repeats, settings.warmup)
    result: dict[str, Any] = {
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "flax_ms": statistics.median(times["flax"]) * 1e3,
        "torch_ms": statistics.median(times["torch"]) * 1e3,
        "flax_min_ms": min(times["flax"]) * 1e3,
        "torch_min_ms": min(times["torch"]) * 1e3,
        "max_abs_diff": diff,
        "load": _load_average(),
    }
    if profile:
        result["profile"] = _xla_profile(flax_call, lower)
    print("CHILD_RESULT " + json.dumps(result), flush=True)


def child_main(spec: str) -> None:
    """Entry point of a row's child process: ``spec`` is the JSON :func:`_run_child` passes."""
    job = json.loads(spec)
    _child_unet(BenchSettings(**job["settings"]), job["single_core"], job["torch_threads"], job["profile"])


def _run_child(settings: BenchSettings, row: UNetRow, profile: bool) -> dict[str, Any] | None:
    spec = {"settings": dataclasses.asdict(settings), "single_core": row.single_core,
            "torch_threads": row.torch_threads, "profile": profile}
    module = __spec__.name if __spec__ is not None else "eval.bench_backbone"  # also as meg_jax_jobs.eval...
    cmd = [sys.executable, "-c", f"import sys; from {module} import child_main; child_main(sys.argv[1])",
           json.dumps(spec)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), row.xla_flags) if f)
    if flags:
        env["XLA_FLAGS"] = flags
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT "):])
    log.error("UNet row '%s' failed (rc %d):\n%s", row.label, proc.returncode, proc.stderr[-3000:])
    return None


def bench_unet(settings: BenchSettings) -> tuple[list[list[Any]], list[list[Any]]]:
    """(table rows, profile rows of the first row's Flax UNet)."""
    import jax

    rows: list[list[Any]] = []
    profile: list[list[Any]] = []
    for i, row in enumerate(UNET_ROWS):
        res = _run_child(settings, row, profile=(i == 0))
        if res is None:
            rows.append([row.label, "failed", "", "", "", "", ""])
            continue
        rows.append([
            row.label,
            f"{res['cores']} / {res['torch_threads']}",
            res["flax_ms"],
            res["torch_ms"],
            res["torch_ms"] / res["flax_ms"],
            res["max_abs_diff"],
            res["load"].split()[0],
        ])
        profile = res.get("profile", profile)
        log.info("  %s", " | ".join(str(v) for v in rows[-1]))

    if jax.devices()[0].platform == "gpu":
        import torch

        model = _torch_unet()
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        torch_call, torch_out = _torch_unet_call(model)
        gpu = jax.devices()[0]
        gpu_call, gpu_out, _ = _flax_unet(model, gpu, settings.matmul_precision)
        diff = float(np.abs(gpu_out() - torch_out()).max())
        times = _interleaved_times({"flax": gpu_call, "torch": torch_call}, settings.repeats, settings.warmup)
        f_ms, t_ms = (statistics.median(times[k]) * 1e3 for k in ("flax", "torch"))
        rows.append([f"Flax on GPU {gpu.device_kind}, PyTorch on CPU", f"{len(os.sched_getaffinity(0))} / "
                     f"{torch.get_num_threads()}", f_ms, t_ms, t_ms / f_ms, diff, _load_average().split()[0]])
    return rows, profile


def _xla_profile(call: Callable[[], Any], lower: Callable[[], Any], top: int = 10, calls: int = 5) -> list[list[Any]]:
    """Top XLA ops of ``call()`` by device time: [op, ms per call, share, Flax op it came from]."""
    import jax
    from jax.profiler import ProfileData

    # Map each HLO instruction of the compiled module to the Flax op (metadata op_name).
    hlo = lower().compile().as_text()
    origin = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = .*?op_name=\"([^\"]+)\"", hlo)}
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(calls):
            call()
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return []
        data = ProfileData.from_file(files[0])
    per_op: collections.Counter[str] = collections.Counter()
    total = 0.0
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA's runtime threads, not Python's
                continue
            for ev in line.events:
                if ev.name == "ThunkExecutor::Execute":
                    total += ev.duration_ns
                elif not ev.name.startswith("ThunkExecutor"):  # skip the executor's own waits
                    per_op[ev.name] += ev.duration_ns
    rows = []
    for name, ns in per_op.most_common(top):
        src = origin.get(name, "?").replace("jit(forward)/", "")
        rows.append([name, ns / calls / 1e6, (ns / total) if total else float("nan"), src[-90:]])
    return rows


# ------------------------------------------------------------------------------ ToMe


def _smooth_tokens(key: Any, batch: int, side: int, channels: int) -> Any:
    """[B, side², C] features with spatial structure, as latent features have.

    A random 8x8 field upsampled bilinearly to side x side plus 10 % white noise; on pure
    white noise no two tokens are alike and merging can only add error.
    """
    import jax

    k1, k2 = jax.random.split(key)
    coarse = jax.random.normal(k1, (batch, 8, 8, channels))
    fine = jax.image.resize(coarse, (batch, side, side, channels), "bilinear")
    fine = fine + 0.1 * jax.random.normal(k2, fine.shape)
    return fine.reshape(batch, side * side, channels)


def bench_tome(settings: BenchSettings, device: Any) -> list[list[Any]]:
    """Rows: ratio, tokens merged, median ms, min ms, speed-up vs ratio 0, relative error."""
    import jax

    from meg_jax.backbone.tome import ToMeConfig, num_merged
    from meg_jax.backbone.unet import BasicTransformerBlock

    side, c, b = settings.tome_side, settings.tome_channels, settings.tome_batch
    n = side * side
    kx, kc, kp, kt = jax.random.split(jax.random.PRNGKey(0), 4)
    x = _smooth_tokens(kx, b, side, c)
    context = jax.random.normal(kc, (b, TEXT_LEN, settings.tome_context_dim))
    params = BasicTransformerBlock(settings.tome_heads).init(kp, x, context, side, side, n)
    x, context, params, kt = jax.device_put((x, context, params, kt), device)

    calls: dict[float, Callable[[], Any]] = {}
    for ratio in TOME_RATIOS:
        tome = ToMeConfig(ratio=ratio, max_downsample=1, use_rand=True)
        block = BasicTransformerBlock(settings.tome_heads, tome=tome)

        @jax.jit
        def forward(params, x, context, tome_key, block=block):
            with jax.default_matmul_precision(settings.matmul_precision):
                return block.apply(params, x, context, side, side, n, rngs={"tome": tome_key})

        calls[ratio] = lambda forward=forward: forward(params, x, context, kt).block_until_ready()

    outputs = {ratio: np.asarray(call()) for ratio, call in calls.items()}
    times = _interleaved_times(calls, settings.tome_repeats, min(settings.warmup, 2))
    base = statistics.median(times[0.0])
    ref = outputs[0.0]
    rows: list[list[Any]] = []
    for ratio in TOME_RATIOS:
        med = statistics.median(times[ratio])
        rel = float(np.linalg.norm(outputs[ratio] - ref) / np.linalg.norm(ref))
        r = num_merged(n, ratio, 2, 2, side, side)
        rows.append([ratio, f"{r} / {n}", med * 1e3, min(times[ratio]) * 1e3, base / med, rel])
    return rows


# ------------------------------------------------------------------------------ report


UNET_HEADER = [
    "setting", "cores / torch threads", "Flax ms", "PyTorch ms", "PyTorch / Flax (≥ 1: Flax not slower)",
    "max abs diff", "load (1 min)",
]
TOME_HEADER = ["ratio", "merged tokens", "median ms", "min ms", "speed-up vs ratio 0", "rel. error vs ratio 0"]
PROFILE_HEADER = ["XLA op", "ms per call", "share of executor time (ops may overlap)", "from (Flax op)"]


def _report(
    settings: BenchSettings,
    machine: dict[str, Any],
    command: str,
    load_before: str,
    load_after: str,
    unet: tuple[list[list[Any]], list[list[Any]]] | None,
    tome_tables: list[tuple[str, list[list[Any]]]],
) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# Backbone benchmark",
        "",
        "Written by `eval/bench_backbone.py` (rerun it rather than editing the numbers).",
        "",
        f"- Command: `{command}`",
        f"- Date: {date}",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores available; {machine['platform']}",
        f"- Software: Python {machine['python']}, jax {machine['jax']} ({machine['jax_backend']}: "
        f"{machine['jax_devices']}), torch {machine['torch']}; XLA_FLAGS=`{machine['xla_flags']}`",
        f"- Load average (1/5/15 min) before: {load_before}; after: {load_after}. Load above the core "
        "count means other jobs shared the CPU: absolute times are then inflated, and the paired, "
        "round-robin timing is what keeps the ratios comparable.",
        f"- Medians over {settings.repeats} timed calls (UNet) and {settings.tome_repeats} (ToMe) after "
        f"warm-up rounds (UNet {settings.warmup}, ToMe {min(settings.warmup, 2)}); Flax matmul precision "
        f"`{settings.matmul_precision}`.",
        "",
    ]
    if unet is not None:
        rows, profile = unet
        parts += [
            f"## UNet forward: Flax vs diffusers PyTorch (batch {UNET_BATCH}, "
            f"{UNET_LATENT}x{UNET_LATENT}x4 latents, text {TEXT_LEN}x{TINY_UNET['cross_attention_dim']})",
            "",
            "Config (diffusers' SD pipeline test UNet, 1.43 M parameters): "
            + ", ".join(f"{k}={v}" for k, v in TINY_UNET.items())
            + ". Same weights: the PyTorch state dict is loaded into Flax. Each row is one child "
            "process timing Flax (jit, float32) and PyTorch (`torch.no_grad()`) round-robin. "
            "'1 core': the process is pinned to one CPU and PyTorch runs 1 thread. "
            "'PyTorch 1 thread': all cores available, `torch.set_num_threads(1)` (on a loaded "
            "machine PyTorch's OpenMP threads wait on each other, so this is then its best setting). "
            "Flax is `meg_jax.backbone` as committed, nothing patched in. Diagnostic row: "
            "XLA:CPU without its YNNPACK library fusions (a process-wide `XLA_FLAGS` setting, "
            "not a library change).",
            "",
            _markdown_table(UNET_HEADER, rows),
            "",
        ]
        if profile:
            parts += [
                "### Where the Flax UNet spends its time (XLA profile, first row's setting)",
                "",
                _markdown_table(PROFILE_HEADER, profile),
                "",
            ]
    for title, rows in tome_tables:
        parts += [
            f"## ToMe in a transformer block ({title})",
            "",
            f"`meg_jax.backbone.unet.BasicTransformerBlock` (self-attn, cross-attn to {TEXT_LEN}x"
            f"{settings.tome_context_dim} context, GEGLU FF), {settings.tome_side}x{settings.tome_side} = "
            f"{settings.tome_side**2} tokens, C = {settings.tome_channels}, {settings.tome_heads} heads, "
            f"batch {settings.tome_batch}, float32, all cores; ToMe merges around self-attention only "
            "(sx = sy = 2, random dst per cell from a fixed key, merge plan computed inside the timed "
            "call). Input: a smooth random field (8x8 upsampled + 10 % noise). Ratios timed round-robin. "
            "Relative error = ||y_r − y_0|| / ||y_0|| of the block output (residual included).",
            "",
            _markdown_table(TOME_HEADER, rows),
            "",
        ]
    return "\n".join(parts)


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.bench_backbone``."""

    repeats: Optional[int] = None  # timed calls per row (None: 20; --quick: 3)
    warmup: Optional[int] = None  # untimed rounds first (None: 3; --quick: 1)
    tome_repeats: Optional[int] = None  # timed calls per ToMe ratio (None: 10; --quick: 3)
    quick: bool = False  # smoke test: few repeats, 16x16 tokens, C=64 ToMe block, no report
    tome_channels: Optional[int] = None  # ToMe block width C (None: 320; --quick: 64)
    tome_side: Optional[int] = None  # ToMe token grid side (None: 64 -> 4096 tokens; --quick: 16)
    tome_batch: int = 1  # ToMe block batch
    matmul_precision: Literal["default", "high", "highest"] = "default"  # jax.default_matmul_precision of the Flax rows
    skip_unet: bool = False  # skip the UNet table
    skip_tome: bool = False  # skip the ToMe table
    out: Optional[str] = None  # markdown report (None: docs/bench_backbone.md; --quick: none; '' for none)


def parse_args(argv: Sequence[str]) -> tuple[Args, BenchSettings]:
    """Command line -> (:class:`Args` with ``out`` resolved, the run's :class:`BenchSettings`).

    Raises:
      SystemExit: ``--help`` (0); an unknown flag or a bad value (2, naming it).
    """
    from meg_jax import config as config_lib

    prog = "python -m eval.bench_backbone"
    args = config_lib.parse_cli(Args, argv, prog=prog, description=(__doc__ or "").split("\n\n")[0])
    quick = args.quick
    if args.out is None:
        args = dataclasses.replace(args, out="" if quick else "docs/bench_backbone.md")
    settings = BenchSettings(
        repeats=args.repeats if args.repeats is not None else (3 if quick else 20),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3),
        tome_repeats=args.tome_repeats if args.tome_repeats is not None else (3 if quick else 10),
        tome_side=args.tome_side if args.tome_side is not None else (16 if quick else 64),
        tome_channels=args.tome_channels if args.tome_channels is not None else (64 if quick else 320),
        tome_batch=args.tome_batch,
        tome_context_dim=64 if quick else 768,
        matmul_precision=args.matmul_precision,
    )
    bad = None
    for name in ("repeats", "warmup", "tome_repeats", "tome_side", "tome_channels", "tome_batch"):
        if getattr(settings, name) < 1:  # the first warm-up call compiles
            bad = f"--{name} must be >= 1, got {getattr(settings, name)}"
            break
    if bad is None and settings.tome_side % 2:
        bad = f"--tome_side must be even (2x2 ToMe cells), got {settings.tome_side}"
    if bad is not None:
        sys.stderr.write(f"{prog}: error: {bad}\n")
        raise SystemExit(2)
    return args, settings


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point: measures the tables, prints them and writes the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, settings = parse_args(argv)
    from meg_jax import job_setup

    job_setup.configure_logging()
    import jax

    command = ("python -m eval.bench_backbone " + " ".join(argv)).strip()
    load_before = _load_average()
    machine = _machine()
    log.info("machine: %s; load average before: %s", machine, load_before)

    unet = None
    if not args.skip_unet:
        log.info("UNet forward (batch 8, 32x32x4 latents): one child process per row")
        unet = bench_unet(settings)
        print(_markdown_table(UNET_HEADER, unet[0]), flush=True)
        if unet[1]:
            print("\nXLA profile of the Flax UNet (first row)\n" + _markdown_table(PROFILE_HEADER, unet[1]), flush=True)

    tome_tables = []
    if not args.skip_tome:
        devices = [("CPU", jax.devices("cpu")[0])]
        if jax.devices()[0].platform == "gpu":
            devices.append((f"GPU {jax.devices()[0].device_kind}", jax.devices()[0]))
        for name, device in devices:
            log.info("ToMe block on %s", name)
            rows = bench_tome(settings, device)
            tome_tables.append((name, rows))
            print(f"\nToMe block on {name}\n" + _markdown_table(TOME_HEADER, rows), flush=True)

    load_after = _load_average()
    log.info("load average after: %s", load_after)
    if args.out:
        text = _report(settings, machine, command, load_before, load_after, unet, tome_tables)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
