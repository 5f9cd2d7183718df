"""Per-block CPU timing of the SD-1.5 UNet: meg-jax's Flax layers vs diffusers' PyTorch modules.

Each building block of the SD-1.5 UNet is built on its real shape twice -- the diffusers
module with random weights, and meg-jax's Flax layer with the SAME weights (converted with
``diffusers_io``'s rules) -- and timed round-robin in one process (JAX call, torch call, JAX
call, ...) so that the load of this shared machine affects both alike. It is the tool for
finding where ``eval/bench_pipeline.py``'s SD-1.5 row loses time.

Run from the repository root; the process pins itself to one CPU (both sides then run on
one core: XLA's YNNPACK fusions otherwise use a second thread whatever XLA_FLAGS say)::

    python -m eval.bench_blocks --out docs/bench_blocks.md   # every block, writes the report
    python -m eval.bench_blocks --only resnet64,selfattn64 --attention chunked
    python -m eval.bench_blocks --help

The table (block, meg-jax ms, torch ms, torch / meg-jax, max abs diff) goes to stdout.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

__all__ = ["Args", "main", "parse_args"]


def _convert(torch_module: Any, init: Callable[[], Any]) -> dict[str, Any]:
    """The torch module's weights as Flax variables for ``flax_module`` (diffusers_io's rules)."""
    import jax
    from flax import traverse_util

    from meg_jax.backbone import diffusers_io

    shapes = jax.eval_shape(init)["params"]
    expected = {p: tuple(s.shape) for p, s in traverse_util.flatten_dict(shapes).items()}
    flat = {}
    for key, value in torch_module.state_dict().items():
        arr = value.detach().numpy()
        target, transform = diffusers_io._flax_target(key, tuple(arr.shape), expected)
        if target is None:
            raise ValueError(f"no Flax parameter for torch key {key}")
        flat[target] = np.ascontiguousarray(diffusers_io._convert_array(arr, transform))
    missing = set(expected) - set(flat)
    if missing:
        raise ValueError(f"Flax parameters without torch weights: {sorted(missing)}")
    return {"params": traverse_util.unflatten_dict(flat)}


def _blocks(attention: str) -> dict[str, Callable[[], tuple[Any, Any, Any, Any, Callable[[Any], Any]]]]:
    """name -> builder of (torch_fn, jax_fn, torch_inputs, jax_inputs, jax_out_to_torch_layout)."""
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers.models.embeddings import TimestepEmbedding as TTimestepEmbedding
    from diffusers.models.resnet import Downsample2D as TDownsample2D
    from diffusers.models.resnet import ResnetBlock2D as TResnetBlock2D
    from diffusers.models.resnet import Upsample2D as TUpsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel as TTransformer2DModel

    from meg_jax.backbone import layers, unet

    nchw_to_nhwc = lambda a: a.transpose(0, 2, 3, 1)  # noqa: E731
    to_torch = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731

    def make(tmod: Any, fmod: Any, t_inputs: tuple, f_inputs: tuple, call: Callable | None = None,
             out_layout: Callable = to_torch, t_call: Callable | None = None) -> tuple:
        if call is None:
            variables = _convert(tmod, lambda: fmod.init(jax.random.key(0), *f_inputs))
        else:
            variables = _convert(tmod, lambda: call(fmod, None, *f_inputs))
        variables = jax.tree_util.tree_map(jnp.asarray, variables)
        apply = jax.jit(lambda v, *a: fmod.apply(v, *a) if call is None else call(fmod, v, *a))

        def jax_fn() -> Any:
            return jax.block_until_ready(apply(variables, *f_inputs))

        def torch_fn() -> Any:
            with torch.no_grad():
                return tmod(*t_inputs) if t_call is None else t_call(tmod, *t_inputs)

        return torch_fn, jax_fn, out_layout

    def resnet(h: int, cin: int, cout: int) -> Callable[[], tuple]:
        def build() -> tuple:
            torch.manual_seed(0)
            tmod = TResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=1280, groups=32, eps=1e-5).eval()
            x = torch.randn(1, cin, h, h)
            temb = torch.randn(1, 1280)
            fmod = layers.ResnetBlock2D(cout, 32, 1e-5)
            return make(tmod, fmod, (x, temb), (jnp.asarray(nchw_to_nhwc(x.numpy())), jnp.asarray(temb.numpy())))
        return build

    def transformer(h: int, c: int) -> Callable[[], tuple]:
        def build() -> tuple:
            torch.manual_seed(0)
            tmod = TTransformer2DModel(num_attention_heads=8, attention_head_dim=c // 8, in_channels=c,
                                       cross_attention_dim=768, norm_num_groups=32).eval()
            x = torch.randn(1, c, h, h)
            ctx = torch.randn(1, 77, 768)
            fmod = unet.Transformer2DModel(8, attention=attention)
            return make(tmod, fmod, (x, ctx), (jnp.asarray(nchw_to_nhwc(x.numpy())), jnp.asarray(ctx.numpy())),
                        call=lambda m, v, a, b: (m.init(jax.random.key(0), a, b, h * h) if v is None
                                                         else m.apply(v, a, b, h * h)),
                        t_call=lambda m, a, b: m(a, encoder_hidden_states=b).sample)
        return build

    def attn(h: int, c: int, cross: bool) -> Callable[[], tuple]:
        def build() -> tuple:
            from diffusers.models.attention_processor import Attention as TAttention

            torch.manual_seed(0)
            tmod = TAttention(query_dim=c, cross_attention_dim=768 if cross else None, heads=8, dim_head=c // 8,
                              bias=False, out_bias=True).eval()
            x = torch.randn(1, h * h, c)
            ctx = torch.randn(1, 77, 768) if cross else None
            fmod = layers.Attention(8, attention=attention)
            f_in = (jnp.asarray(x.numpy()),) + ((jnp.asarray(ctx.numpy()),) if cross else ())
            t_in = (x, ctx)
            return make(tmod, fmod, t_in, f_in, out_layout=np.asarray,
                        t_call=lambda m, a, b: m(a, encoder_hidden_states=b))
        return build

    def down(h: int, c: int) -> Callable[[], tuple]:
        def build() -> tuple:
            torch.manual_seed(0)
            tmod = TDownsample2D(c, use_conv=True, out_channels=c, padding=1, name="op").eval()
            x = torch.randn(1, c, h, h)
            return make(tmod, layers.Downsample2D(c), (x,), (jnp.asarray(nchw_to_nhwc(x.numpy())),))
        return build

    def up(h: int, c: int) -> Callable[[], tuple]:
        def build() -> tuple:
            torch.manual_seed(0)
            tmod = TUpsample2D(c, use_conv=True, out_channels=c).eval()
            x = torch.randn(1, c, h, h)
            return make(tmod, layers.Upsample2D(c), (x,), (jnp.asarray(nchw_to_nhwc(x.numpy())),))
        return build

    def temb() -> tuple:
        torch.manual_seed(0)
        tmod = TTimestepEmbedding(320, 1280).eval()
        x = torch.randn(1, 320)
        return make(tmod, layers.TimestepEmbedding(1280), (x,), (jnp.asarray(x.numpy()),), out_layout=np.asarray)

    return {
        "resnet64": resnet(64, 320, 320),
        "resnet64_640to320": resnet(64, 640, 320),
        "resnet64_960to320": resnet(64, 960, 320),
        "resnet32": resnet(32, 640, 640),
        "resnet32_1920to640": resnet(32, 1920, 640),
        "resnet16": resnet(16, 1280, 1280),
        "resnet8": resnet(8, 1280, 1280),
        "transformer64": transformer(64, 320),
        "transformer32": transformer(32, 640),
        "transformer16": transformer(16, 1280),
        "transformer8": transformer(8, 1280),
        "selfattn64": attn(64, 320, False),
        "crossattn64": attn(64, 320, True),
        "selfattn32": attn(32, 640, False),
        "down64": down(64, 320),
        "down32": down(32, 640),
        "down16": down(16, 1280),
        "up32": up(32, 640),
        "temb": temb,
    }


BLOCKS = {
    "resnet64": "ResnetBlock2D 64x64, 320 -> 320 (down_blocks.0)",
    "resnet64_640to320": "ResnetBlock2D 64x64, 640 -> 320 (up_blocks.3, skip concatenated)",
    "resnet64_960to320": "ResnetBlock2D 64x64, 960 -> 320 (up_blocks.3, skip concatenated)",
    "resnet32": "ResnetBlock2D 32x32, 640 -> 640 (down_blocks.1)",
    "resnet32_1920to640": "ResnetBlock2D 32x32, 1920 -> 640 (up_blocks.2, skip concatenated)",
    "resnet16": "ResnetBlock2D 16x16, 1280 -> 1280 (down_blocks.2)",
    "resnet8": "ResnetBlock2D 8x8, 1280 -> 1280 (down_blocks.3, mid_block)",
    "transformer64": "Transformer2DModel 64x64x320: GroupNorm, proj_in, self-attn (4096 tokens), cross-attn, GEGLU FF",
    "transformer32": "Transformer2DModel 32x32x640 (1024 tokens)",
    "transformer16": "Transformer2DModel 16x16x1280 (256 tokens)",
    "transformer8": "Transformer2DModel 8x8x1280 (mid_block, 64 tokens)",
    "selfattn64": "Attention alone, self, 4096 tokens x 320, 8 heads",
    "crossattn64": "Attention alone, cross, 4096 queries x 77 keys (768 wide)",
    "selfattn32": "Attention alone, self, 1024 tokens x 640, 8 heads",
    "down64": "Downsample2D 64x64x320 -> 32x32 (stride-2 3x3 conv)",
    "down32": "Downsample2D 32x32x640 -> 16x16 (down_blocks.1)",
    "down16": "Downsample2D 16x16x1280 -> 8x8 (down_blocks.2)",
    "up32": "Upsample2D 32x32x640 -> 64x64 (nearest x2, 3x3 conv)",
    "temb": "TimestepEmbedding 320 -> 1280",
}

NOTES = """## Findings

Where meg-jax lost to diffusers on one CPU core, and what changed (`eval/bench_blocks.py`):

- **Self-attention over 4096 tokens** (64x64 level, 5 blocks per UNet call) was the big loser:
  XLA:CPU wrote the whole `[1, 8, 4096, 4096]` float32 logits (512 MB) to memory and read them
  back for each softmax pass and for the second matmul -- memory-bound, while PyTorch's SDPA
  kernel works tile by tile in cache. `layers.multi_head_attention` ("reference", CPU backend,
  logits above 8 MB) now runs one (batch, head) and at most 8 MB of logits at a time, dividing
  by the row sum after the second matmul: the same per-row maths, equal up to float rounding.
- **3x3 convs on small maps** (16x16 and 8x8, 1280-2560 channels): XLA:CPU's conv (a YNNPACK
  fusion) is tuned for large maps and ran ~2x slower than one matmul over the im2col patches.
  `layers.Conv2d` on the CPU backend now computes convs with at most 512 output pixels (batch
  included) and at least 512 input channels that way (with fewer channels, e.g. the tiny
  pipeline's 64, the patch copy costs more than it saves), and 1x1 convs as a plain matmul
  (1.2-3x faster than XLA's conv).
  `flops` traces models under `layers.plain_kernels()` so FLOP counts do not change.
- **Wide-input convs on large maps** (SD-1.5's up blocks concatenate a skip: 640-1920 input
  channels at 64x64 and 32x32): XLA's YNNPACK conv is slower per FLOP there; on the CPU
  backend `layers.Conv2d` sums convs over chunks of at most 320 input channels when there are
  more than 512 (64x64 960->320 resnet: 249 -> 225 ms; 32x32 1920->640: 282 -> 258 ms).
- **XLA's Eigen conv instead of its YNNPACK conv** (issue 14): with YNNPACK, XLA:CPU ran
  3x3 convs with hundreds of channels at 0.6-0.85x PyTorch/oneDNN on one core, split or
  not. Its Eigen conv is faster there, and XLA hands a conv to YNNPACK only in forms
  YNNPACK takes: `layers.Conv2d` (CPU backend, float32, at least 256 input and output
  channels) computes a stride-1 conv with one output row more than its input has (dropped)
  and a strided conv with a dilated input (taps s apart, windows s*s apart), both declined
  by YNNPACK. Per conv (one core, CPU time, vs XLA's YNNPACK conv): 64x64 320 -> 320
  1.16x as fast, 32x32 1280 -> 640 1.5x, 16x16 1280 -> 1280 2.1x, 8x8 3.7x; the im2col and
  channel-split forms above now run only where this one does not (bf16, few channels).
  A/B on this script (`--cpu 0`, load 1.3-1.8 on 2 cores, torch / meg-jax before -> after):
  resnet64 0.92 -> 1.06, resnet64_960to320 0.85 -> 0.93, resnet32 0.78 -> 0.98,
  resnet32_1920to640 0.79 -> 1.02, resnet8 1.74 -> 2.74, up32 0.83 -> 1.08, down64
  0.73 -> 0.99, down32 1.03 -> 1.41, down16 2.10 -> 3.55. Tried and dropped: a 3x3 conv as 9
  shifted matmuls over the flattened padded map, or as an im2col matmul chunked by rows of
  taps (0.5-0.7x PyTorch at 64x64 and 32x32: XLA's matmul peaks at ~185 GFLOP/s on one
  core, below oneDNN's direct conv at ~215, and the slice/concatenate copies run at a few
  GB/s).
- **The 4096-token attention** (heads 40 wide): the tiled form now takes `exp2(x log2 e)`
  (XLA's own loop fusion, faster than YNNPACK's exp fused into the first matmul) and, for
  value widths off AVX-512's 16 lanes, gets each row's sum of exponentials from a ones
  column of the second matmul (values padded 40 -> 48) rather than a pass over the logits:
  selfattn64 0.80 -> 0.84 (A/B, `--cpu 0 --repeats 7`, twice each). **Still behind** there:
  the two matmuls alone take ~145 ms of meg-jax's ~225 ms against PyTorch's whole SDPA
  ~190 ms (XLA's `[512, 40] x [40, 4096]` 1.1 ms, PyTorch 0.9; `[512, 4096] x [4096, 40]`
  1.2 vs 1.0 ms); padding the head width to 48 or 64 made the first matmul slower, and a
  row max from a subset of keys was slower. Generally XLA's float32 matmuls run at
  ~0.85x PyTorch's on this CPU (4096x320x2560: 140 vs 163 GFLOP/s).
- GroupNorm (1-3 ms), the time embedding and the cross-attention are not where the time goes.
- Measuring: XLA:CPU runs its YNNPACK fusions on a thread pool of its own that
  `XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"` does not
  reach (and XLA stops parsing at `intra_op_parallelism_threads=1`, which has no `--`): the
  process's CPU time was ~1.8x its wall time on 2 idle cores. Unpinned "one thread" numbers
  therefore favour meg-jax on an idle machine and not on a loaded one. This script and
  `eval/bench_pipeline.py` pin the process to the CPUs they time on.

Before the two changes (commit a3e5a3f, same command, same machine, load ~1), for reference:

| block | meg-jax ms | torch ms | torch / meg-jax |
|---|---|---|---|
| resnet64 | 88.1 | 78.7 | 0.89 |
| resnet64_640to320 | 155.3 | 129.2 | 0.83 |
| resnet32 | 100.9 | 73.9 | 0.73 |
| resnet16 | 162.1 | 112.3 | 0.69 |
| resnet8 | 77.3 | 56.6 | 0.73 |
| transformer64 | 790.5 | 307.7 | 0.39 |
| transformer32 | 160.6 | 124.2 | 0.77 |
| transformer16 | 123.9 | 108.6 | 0.88 |
| transformer8 | 42.2 | 42.8 | 1.01 |
| selfattn64 | 679.7 | 192.9 | 0.28 |
| crossattn64 | 18.0 | 17.2 | 0.96 |
| selfattn32 | 52.3 | 34.7 | 0.66 |
| down64 | 12.8 | 9.5 | 0.74 |
| up32 | 172.9 | 163.3 | 0.94 |
| temb | 0.5 | 0.4 | 0.77 |
"""


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.bench_blocks``."""

    repeats: int = 5  # timed round-robin calls per side (median)
    only: str = ""  # comma-separated block names ('' = all; see BLOCKS)
    attention: str = "reference"  # layers.multi_head_attention implementation for the Flax side
    cpu: int = -1  # pin the process to this one CPU, an index into the allowed ones (-1: the last; -2: no pinning)
    out: str = ""  # also write the table as markdown here (e.g. docs/bench_blocks.md; '' = stdout only)


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> :class:`Args`.

    Raises:
      SystemExit: ``--help`` (0); an unknown flag or a bad value (2, naming it).
    """
    from meg_jax import config as config_lib

    prog = "python -m eval.bench_blocks"
    args = config_lib.parse_cli(Args, argv, prog=prog, description=(__doc__ or "").split("\n\n")[0])
    problem = None
    if args.repeats < 1:
        problem = f"--repeats must be >= 1, got {args.repeats}"
    elif [n for n in args.only.split(",") if n and n not in BLOCKS]:
        problem = f"--only: unknown block(s) {[n for n in args.only.split(',') if n and n not in BLOCKS]}; " \
                  f"known: {list(BLOCKS)}"
    elif args.attention not in ("reference", "chunked", "xla"):
        problem = f"--attention must be 'reference', 'chunked' or 'xla', got {args.attention!r}"
    elif args.cpu < -2:
        problem = f"--cpu must be >= -2, got {args.cpu}"
    if problem:
        sys.stderr.write(f"{prog}: error: {problem}\n")
        raise SystemExit(2)
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point: times each block, prints the table, writes ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.cpu != -2:
        # XLA:CPU runs YNNPACK fusions on a thread pool of its own that XLA_FLAGS do not reach
        # (process CPU time ~1.8x wall time on 2 idle cores): pinning the process to one CPU
        # makes "one thread each side" true for both.
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[a.cpu]})
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    import torch

    torch.set_num_threads(1)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    blocks = _blocks(a.attention)
    names = [n for n in a.only.split(",") if n] or list(blocks)
    lines = ["| block | what | meg-jax ms | torch ms | torch / meg-jax | max abs diff |", "|---|---|---|---|---|---|"]
    print(lines[0] + "\n" + lines[1], flush=True)
    for name in names:
        torch_fn, jax_fn, layout = blocks[name]()
        ref = torch_fn().numpy()
        got = layout(jax_fn())
        tj, tt = [], []
        for _ in range(a.repeats):
            t = time.perf_counter(); jax_fn(); tj.append(time.perf_counter() - t)  # noqa: E702
            t = time.perf_counter(); torch_fn(); tt.append(time.perf_counter() - t)  # noqa: E702
        mj, mt = statistics.median(tj) * 1e3, statistics.median(tt) * 1e3
        lines.append(f"| {name} | {BLOCKS[name]} | {mj:.1f} | {mt:.1f} | {mt / mj:.2f} | "
                     f"{float(np.abs(got - ref).max()):.2e} |")
        print(lines[-1], flush=True)
    if not a.out:
        return
    import datetime
    import platform

    import jax

    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    table = "\n".join(lines)
    text = f"""# SD-1.5 UNet blocks: meg-jax (Flax, jit) vs diffusers (PyTorch), one CPU core

Written by `eval/bench_blocks.py` (rerun it rather than editing the numbers); the per-block
breakdown behind the SD-1.5 row of `docs/bench_pipeline.md`.

- Command: `python -m eval.bench_blocks {' '.join(argv)}`
- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC
- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; process pinned to CPU(s) {sorted(os.sched_getaffinity(0))}
- Software: jax {jax.__version__}, torch {torch.__version__}; XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '')}`, torch 1 thread
- Load average (1/5/15 min) before: {load_before}; after: {load_after}
- Each block: diffusers module with random weights and meg-jax's Flax layer with the same weights,
  batch 1, text context 77x768 where used; median of {a.repeats} calls per side timed round-robin
  (meg-jax, torch, meg-jax, ...) after one untimed call (meg-jax's compile). float32.

{table}

{NOTES}"""
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
