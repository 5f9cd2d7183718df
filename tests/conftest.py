"""Shared pytest setup.

Compile time dominates on CPU, so compiled functions and tiny models are built once per
session in fixtures that the test modules share. Tests run on the host CPU; a test that
needs several devices starts a subprocess with ``--xla_force_host_platform_device_count``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Deterministic float32 matmuls on CPU for parity tests against PyTorch.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One on-disk XLA compilation cache per test session: many tests build fresh jitted closures
# of identical programs (every job run of a resume test, the notebook kernel, the processes
# of the two-process test), which then load the executable instead of compiling it again.
# Subprocesses inherit the variables. A cache the caller set up is used as is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="meg_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# pytest-xdist runs the files in several worker processes (see pyproject's addopts). When
# there are no more cores than workers, each worker's multi-threaded XLA runtime fights the
# others for the same cores (on a 2-core machine, two such workers took 1150 s, no better than
# one serial process; with one XLA thread each, 761 s), so each worker then runs XLA on one
# thread. Subprocesses started by tests set their own XLA_FLAGS. Flags the caller set are kept.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and (os.cpu_count() or 1) <= _workers and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")))


# A tiny MEG-CVPO run on the synthetic artifact (seconds of training, 2 logged iterations),
# shared by tests/test_evaluate.py and tests/test_notebook.py: both only read the run
# directory (restore, curves, evaluation), so one training per session serves both.
TINY_CVPO_RUN = [
    "--env.artifact", "synthetic", "--env.num_envs", "8", "--env.episode_length", "8",
    "--total_env_steps", "128", "--blocks_per_log", "8",
    "--cvpo.actor_hidden", "16", "16", "--cvpo.critic_hidden", "16", "16", "--cvpo.batch_size", "32",
    "--cvpo.num_action_samples", "4", "--cvpo.target_samples", "2", "--cvpo.min_replay", "32",
    "--cvpo.replay_capacity", "512", "--cvpo.updates_per_block", "1",
]


@pytest.fixture(scope="session")
def tiny_cvpo_runs(tmp_path_factory):
    """A folder holding one finished tiny ``train.cvpo`` run, ``<root>/cvpo`` (read-only for tests)."""
    from train import cvpo as cvpo_job

    root = tmp_path_factory.mktemp("tiny_cvpo_runs")
    args, config = cvpo_job.parse_args(["--workdir", str(root / "cvpo"), *TINY_CVPO_RUN])
    cvpo_job.run(config, args.workdir, progress=False, evaluate=False)
    return str(root)


# One `meg-jax demo --smoke` run per test session, read by the modules that check its output
# files (report.md, metrics.json). Under pytest-xdist the workers inherit this folder from the
# controller (this file runs there first), and a file lock lets the first worker that needs
# the run make it while the others wait and read it.
if "MEG_JAX_TESTS_SHARED_DIR" not in os.environ:
    _shared_dir = tempfile.mkdtemp(prefix="meg_jax_tests_shared_")
    atexit.register(shutil.rmtree, _shared_dir, ignore_errors=True)
    os.environ["MEG_JAX_TESTS_SHARED_DIR"] = _shared_dir

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_BACKBONE = os.path.join(_REPO, "checkpoints", "tiny", "backbone.json")
SHIPPED_ARTIFACT = os.path.join(_REPO, "checkpoints", "calibration", "tiny.npz")


@pytest.fixture(scope="session")
def demo_smoke_run():
    """``(workdir, stdout, report.md text, metrics.json dict)`` of one ``meg-jax demo --smoke``
    on the shipped checkpoints (read-only for tests)."""
    import contextlib
    import io
    import json

    from filelock import FileLock

    if not (os.path.exists(SHIPPED_BACKBONE) and os.path.exists(SHIPPED_ARTIFACT)):
        pytest.skip(f"the shipped checkpoints are not in this checkout ({SHIPPED_BACKBONE}, {SHIPPED_ARTIFACT})")
    shared = os.environ["MEG_JAX_TESTS_SHARED_DIR"]
    workdir = os.path.join(shared, "demo_smoke")
    with FileLock(os.path.join(shared, "demo_smoke.lock")):
        if not os.path.exists(os.path.join(shared, "demo_smoke.done")):
            from train import demo

            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                rc = demo.main(["--smoke", "--workdir", workdir, "--no-progress"])
            assert rc == 0, out.getvalue()
            with open(os.path.join(shared, "demo_smoke.stdout"), "w") as f:
                f.write(out.getvalue())
            with open(os.path.join(shared, "demo_smoke.done"), "w") as f:
                f.write("ok\n")
    with open(os.path.join(shared, "demo_smoke.stdout")) as f:
        stdout = f.read()
    with open(os.path.join(workdir, "report.md")) as f:
        report = f.read()
    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    return workdir, stdout, report, metrics
