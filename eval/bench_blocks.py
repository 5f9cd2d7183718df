"""Per-block CPU timing of the SD-1.5 UNet: meg-jax's Flax layers vs diffusers' PyTorch modules.

Each building block of the SD-1.5 UNet is built on its real shape twice -- the diffusers
module with random weights, and meg-jax's Flax layer with the SAME weights (converted with
``diffusers_io``'s rules) -- and timed round-robin in one process (JAX call, torch call, JAX
call, ...) so that the load of this shared machine affects both alike. It is the tool for
finding where ``eval/bench_pipeline.py``'s SD-1.5 row loses time.

Run from the repository root, one thread each side::

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        python -m eval.bench_blocks --repeats 3
    python -m eval.bench_blocks --only resnet64,attn64 --attention chunked

The table (block, JAX ms, torch ms, torch/JAX, max abs diff) goes to stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

__all__ = ["main"]


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
        "resnet32": resnet(32, 640, 640),
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
        "up32": up(32, 640),
        "temb": temb,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.bench_blocks", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed round-robin calls per side (median)")
    p.add_argument("--only", default="", help="comma-separated block names (default: all)")
    p.add_argument("--attention", default="reference", help="layers.multi_head_attention implementation")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    blocks = _blocks(a.attention)
    names = [n for n in a.only.split(",") if n] or list(blocks)
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise SystemExit(f"unknown block(s) {unknown}; known: {list(blocks)}")
    print("| block | meg-jax ms | torch ms | torch / meg-jax | max abs diff |")
    print("|---|---|---|---|---|")
    for name in names:
        torch_fn, jax_fn, layout = blocks[name]()
        ref = torch_fn().numpy()
        got = layout(jax_fn())
        tj, tt = [], []
        for _ in range(a.repeats):
            t = time.perf_counter(); jax_fn(); tj.append(time.perf_counter() - t)  # noqa: E702
            t = time.perf_counter(); torch_fn(); tt.append(time.perf_counter() - t)  # noqa: E702
        mj, mt = statistics.median(tj) * 1e3, statistics.median(tt) * 1e3
        print(f"| {name} | {mj:.1f} | {mt:.1f} | {mt / mj:.2f} | {float(np.abs(got - ref).max()):.2e} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
