"""Throughput of the MEG environment: JAX (jit + vmap + lax.scan) vs NumPy vs a gymnasium loop.

    python -m eval.bench_env                       # the table in docs/bench_env.md
    python -m eval.bench_env --sizes 1 64 --steps 200 --quick
    python -m eval.bench_env --help                # every flag with its default
    python -m eval.bench_env --quality_source replay --energy_scope system   # replay on (docs/replay.md)

Rows, all measured in the same process with random actions:

* ``jax``: ``meg_jax.env.make("tiny", num_envs=N)`` (fresh auto-reset, episode limit, vmap),
  one jitted ``lax.scan`` of ``--steps`` env steps whose body draws uniform random actions
  and steps the env; timed after a compile run, best of ``--repeats``.
* ``numpy``: ``numpy_reference.NumpyMEGEnv`` (same dynamics, vectorized over N, float32,
  noise from ``numpy.random.Generator``, fresh resets), ``--numpy_steps`` steps.
* ``gym``: ``MEGGymEnv`` (one env, one jitted call per step) in a Python loop with
  ``action_space.sample()``, resetting at truncation; ``--gym_steps`` steps.

Env-steps/s = N x steps / wall seconds. Each row also reports env-steps per CPU-second of
this process (``time.process_time``, all threads), which is far less sensitive to other jobs
on a shared machine than wall time. The load average (``os.getloadavg``) is printed with the
table. Progress goes to the log (stderr); the table and its context lines to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import meg_jax.env as menv
from meg_jax.env import numpy_reference
from meg_jax.env.gym_adapter import MEGGymEnv
from meg_jax.env.wrappers import replace_params
from meg_jax.meg.artifact import CalibrationArtifact, synthetic_artifact

__all__ = ["Args", "main", "parse_args"]

log = logging.getLogger("eval.bench_env")

EPISODE_LENGTH = 64


@dataclasses.dataclass(frozen=True)
class Args:
    """Flags of ``python -m eval.bench_env``."""

    sizes: tuple[int, ...] = (1, 64, 1024, 4096, 16384)  # batch sizes N of the JAX and NumPy rows
    steps: int = 1000  # scan length of the JAX rows
    repeats: int = 3  # timed JAX runs per size (best counts)
    numpy_steps: int = 100  # steps of the NumPy rows
    gym_steps: int = 2000  # steps of the gymnasium single-env loop
    artifact: str = "auto"  # 'auto' (tiny.npz if present), 'synthetic' or a path
    # env quality source: "class_mean" or "replay" (per-prompt tables; an artifact without them
    # is replaced by synthetic_artifact(prompts_per_class=...) and the output says so)
    quality_source: str = "class_mean"
    prompts_per_class: int = 128  # P of that synthetic replay artifact (meg-jax calibrate's default)
    energy_scope: str = "ue"  # env energy scope: "ue" or "system"
    quick: bool = False  # fewer steps everywhere (smoke test: steps 100, repeats 1, numpy 10, gym 200)
    out: Optional[str] = None  # write the results as JSON here


def parse_args(argv: Sequence[str]) -> Args:
    """Command line -> :class:`Args` (``--quick`` applied).

    Raises:
      SystemExit: ``--help`` (0); an unknown flag or a bad value (2, naming it).
    """
    from meg_jax import config as config_lib

    prog = "python -m eval.bench_env"
    args = config_lib.parse_cli(Args, argv, prog=prog, description=__doc__.split("\n\n")[0])
    for name in ("steps", "repeats", "numpy_steps", "gym_steps"):
        if getattr(args, name) < 1:
            sys.stderr.write(f"{prog}: error: --{name} must be >= 1, got {getattr(args, name)}\n")
            raise SystemExit(2)
    from meg_jax.env.config import ENERGY_SCOPES, QUALITY_SOURCES

    for name, allowed in (("quality_source", QUALITY_SOURCES), ("energy_scope", ENERGY_SCOPES)):
        if getattr(args, name) not in allowed:
            sys.stderr.write(f"{prog}: error: --{name} must be one of {list(allowed)}, got {getattr(args, name)!r}\n")
            raise SystemExit(2)
    if args.prompts_per_class < 1:
        sys.stderr.write(f"{prog}: error: --prompts_per_class must be >= 1, got {args.prompts_per_class}\n")
        raise SystemExit(2)
    if not args.sizes or min(args.sizes) < 1:
        sys.stderr.write(f"{prog}: error: --sizes must be one or more sizes >= 1, got {list(args.sizes)}\n")
        raise SystemExit(2)
    if args.quick:
        args = dataclasses.replace(args, steps=100, repeats=1, numpy_steps=10, gym_steps=200)
    return args


def _artifact(arg: str, replay: bool = False, prompts: int = 128) -> tuple[CalibrationArtifact, str]:
    """The artifact to benchmark and a description; with ``replay``, one with per-prompt tables."""
    if arg == "synthetic":
        artifact, source = synthetic_artifact(), "synthetic_artifact() (tests-only artifact)"
    elif arg == "auto":
        path = menv.resolve_artifact_path(menv.get_preset("tiny").artifact_path)
        if os.path.exists(path):
            artifact, source = CalibrationArtifact.load(path), path
        else:
            artifact, source = synthetic_artifact(), "synthetic_artifact() (tiny.npz not found)"
    else:
        artifact, source = CalibrationArtifact.load(arg), arg
    if replay and artifact.prompts_per_class is None:
        return (synthetic_artifact(prompts_per_class=prompts),
                f"synthetic_artifact(prompts_per_class={prompts}) (tests-only; {source} has no per-prompt tables)")
    return artifact, source


def _env_overrides(args: Args) -> dict:
    """``MEGEnvConfig`` overrides of every env built here."""
    overrides = {"limit_samples": 1024, "quality_source": args.quality_source, "energy_scope": args.energy_scope}
    if args.energy_scope == "system":
        overrides["es_device"] = "edge_gpu_l4"  # synthetic artifacts name none (the shipped ones: this one)
    return overrides


def jax_rate(num_envs: int, steps: int, repeats: int, artifact: CalibrationArtifact,
             overrides: Optional[dict] = None) -> tuple[float, float, float]:
    """(env-steps/s, env-steps per CPU-second, compile seconds) of the batched JAX env."""
    overrides = {"limit_samples": 1024} if overrides is None else overrides
    env = menv.make("tiny", num_envs=num_envs, episode_length=EPISODE_LENGTH, artifact=artifact, **overrides)
    params = env.params

    # params enter as an argument (not closed-over constants): XLA then does not constant-fold
    # the tables, which on this shared CPU once took minutes of compile time.
    @jax.jit
    def run(params, state, key):
        e = replace_params(env, params)

        def body(carry, k):
            s, total = carry
            a = jax.random.uniform(k, (num_envs, 2), minval=-1.0, maxval=1.0)
            s = e.step(s, a)
            return (s, total + s.reward), None

        (state, total), _ = jax.lax.scan(body, (state, jnp.zeros(num_envs)), jax.random.split(key, steps))
        return state, total

    state = jax.jit(env.reset)(jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    state, total = run(params, state, jax.random.PRNGKey(1))
    jax.block_until_ready(total)
    compile_s = time.perf_counter() - t0
    best, best_cpu = float("inf"), float("inf")
    for i in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        state, total = run(params, state, jax.random.PRNGKey(2 + i))
        jax.block_until_ready(total)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    assert np.all(np.isfinite(np.asarray(total)))
    return num_envs * steps / best, num_envs * steps / best_cpu, compile_s


def numpy_rate(num_envs: int, steps: int, params) -> tuple[float, float]:
    """(env-steps/s, env-steps per CPU-second) of the NumPy reference."""
    rng = np.random.default_rng(0)
    env = numpy_reference.NumpyMEGEnv(params, num_envs, rng, dtype=np.float32)
    env.reset()
    env.step(rng.uniform(-1, 1, (num_envs, 2)).astype(np.float32))  # warm caches
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        env.step(rng.uniform(-1, 1, (num_envs, 2)).astype(np.float32))
    return num_envs * steps / (time.perf_counter() - t0), num_envs * steps / (time.process_time() - c0)


def gym_rate(steps: int, artifact: CalibrationArtifact, overrides: Optional[dict] = None) -> tuple[float, float]:
    """(env-steps/s, env-steps per CPU-second) of a gymnasium single-env Python loop."""
    overrides = {"limit_samples": 1024} if overrides is None else overrides
    env = MEGGymEnv("tiny", episode_length=EPISODE_LENGTH, artifact=artifact, **overrides)
    env.action_space.seed(0)
    env.reset(seed=0)
    env.step(env.action_space.sample())  # compile
    env.reset(seed=1)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - t0), steps / (time.process_time() - c0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: measures every row and prints the table."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from meg_jax import job_setup

    job_setup.configure_logging()
    artifact, source = _artifact(args.artifact, args.quality_source == "replay", args.prompts_per_class)
    overrides = _env_overrides(args)
    params = menv.make_unbatched("tiny", EPISODE_LENGTH, artifact, **overrides)[0].params
    load_before = os.getloadavg()
    log.info("artifact: %s; gym loop of %d steps first", source, args.gym_steps)
    gym, gym_cpu = gym_rate(args.gym_steps, artifact, overrides)
    rows = []
    for n in args.sizes:
        jr, jr_cpu, compile_s = jax_rate(n, args.steps, args.repeats, artifact, overrides)
        nr, nr_cpu = numpy_rate(n, args.numpy_steps, params)
        rows.append({"num_envs": n, "jax": jr, "numpy": nr, "jax_over_numpy": jr / nr, "jax_over_gym": jr / gym,
                     "jax_cpu": jr_cpu, "numpy_cpu": nr_cpu, "compile_s": compile_s, "load": os.getloadavg()[0]})
        log.info("N=%6d  jax %8.3f M/s (%.3f M/CPU-s)  numpy %8.3f M/s (%.3f M/CPU-s)  ratio %7.1fx  "
                 "vs gym %9.0fx  (compile %.1f s, load %.1f)", n, jr / 1e6, jr_cpu / 1e6, nr / 1e6, nr_cpu / 1e6,
                 jr / nr, jr / gym, compile_s, os.getloadavg()[0])
    load_after = os.getloadavg()

    print(f"env: quality_source={args.quality_source}, energy_scope={args.energy_scope}, "
          f"quality table {tuple(params.quality_table.shape)}")
    print(f"artifact: {source}; device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; jax {jax.__version__}")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1-min)")
    print(f"gym single-env loop: {gym:,.0f} env-steps/s, {gym_cpu:,.0f} per CPU-second ({args.gym_steps} steps)")
    print()
    print("| envs | JAX env-steps/s | NumPy env-steps/s | JAX / NumPy | JAX / gym loop "
          "| JAX per CPU-s | NumPy per CPU-s | JAX / NumPy per CPU-s | load |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['num_envs']} | {r['jax']:,.0f} | {r['numpy']:,.0f} | {r['jax_over_numpy']:.1f}x | "
              f"{r['jax_over_gym']:,.0f}x | {r['jax_cpu']:,.0f} | {r['numpy_cpu']:,.0f} | "
              f"{r['jax_cpu'] / r['numpy_cpu']:.1f}x | {r['load']:.1f} |")
    print(f"| gym loop (1 env) | {gym:,.0f} | | | | {gym_cpu:,.0f} | | | |")
    at = {r["num_envs"]: r for r in rows}
    if 4096 in at:
        r = at[4096]
        print()
        print(f"targets at 4096 envs: >= 3 M steps/s: {r['jax'] / 1e6:.2f} M ({'met' if r['jax'] >= 3e6 else 'NOT met'}); "
              f">= 10x NumPy: {r['jax_over_numpy']:.1f}x ({'met' if r['jax_over_numpy'] >= 10 else 'NOT met'}); "
              f">= 1000x gym: {r['jax_over_gym']:,.0f}x ({'met' if r['jax_over_gym'] >= 1000 else 'NOT met'})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "gym": gym, "gym_cpu": gym_cpu, "artifact": source, "env": overrides,
                       "load_before": load_before,
                       "load_after": load_after, "args": dataclasses.asdict(args)}, f, indent=2)
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
