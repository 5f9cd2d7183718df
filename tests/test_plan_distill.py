"""eval.plan_distill's FLOP count: every loop body counted per iteration, nothing compiled."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jax._src.lax.control_flow import loops

from eval import plan_distill
from meg_jax.backbone import layers
from meg_jax.backbone.layers import multi_head_attention

N, C = 64, 64  # tokens and width of the toy program below
STEPS = 3  # outer scan length


def _program(x: jax.Array, w: jax.Array) -> jax.Array:
    """Sum of STEPS rounds of chunked self-attention (a lax.map of 4 query chunks) inside a scan."""

    def body(h: jax.Array, _: None) -> tuple[jax.Array, None]:
        return jnp.tanh(multi_head_attention(h @ w, h, h, 4, None, "chunked")), None

    h, _ = jax.lax.scan(body, x, None, length=STEPS)
    return jnp.sum(h)


@pytest.fixture(scope="module")
def shapes():
    return jax.ShapeDtypeStruct((1, N, C), jnp.float32), jax.ShapeDtypeStruct((C, C), jnp.float32)


def _count(fn, shapes):
    traced = jax.jit(lambda *a: fn(*a)).trace(*shapes)  # a fresh function: no cached trace
    as_counted = plan_distill._flops(traced.lower().cost_analysis())
    return as_counted, plan_distill.loop_aware_flops(traced.jaxpr, as_counted)


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "value_and_grad"])
def test_loops_count_per_iteration(shapes, grad, monkeypatch):
    monkeypatch.setattr(layers, "QUERY_CHUNK", N // 4)  # 4 query chunks of 16 (a lax.map)
    fn = jax.value_and_grad(_program, argnums=1) if grad else _program
    as_counted, loop_aware = _count(fn, shapes)
    # The same program with every scan (lax.map's too) fully unrolled: XLA sees, and
    # counts, every iteration; the checkpointed chunks are recomputed in the backward alike.
    scan = loops.scan
    unroll = lambda *a, **kw: scan(*a, **{**kw, "unroll": True})  # noqa: E731
    monkeypatch.setattr(loops, "scan", unroll)
    monkeypatch.setattr(jax.lax, "scan", unroll)
    unrolled, _ = _count(fn, shapes)
    # XLA alone misses 2 of 3 outer iterations and 3 of 4 chunks in each: far below.
    assert as_counted < 0.5 * unrolled
    # Counted per iteration, the two are the same arithmetic but for the loops' own counter
    # and index arithmetic (a few FLOPs per iteration, counted once by loop_aware_flops and
    # absent when unrolled). Each iteration does >= 2 * 16 * 64 * 64 = 1.3e5 FLOPs of
    # matmuls, so 1e-3 bounds that slack.
    assert loop_aware == pytest.approx(unrolled, rel=1e-3)


def test_device_count_survives_a_bare_word_in_xla_flags():
    # XLA stops reading XLA_FLAGS at a word without "--"; the README's one-core recipe has one.
    code = ("import os; os.environ['XLA_FLAGS'] = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'\n"
            "from eval import plan_distill; plan_distill._set_devices(3)\n"
            "import jax; print(jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "3"
