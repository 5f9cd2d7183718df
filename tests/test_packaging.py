"""The wheel as a user gets it: ``pip install .`` (not editable) into a fresh venv, run elsewhere.

Builds the wheel from a copy of the source tree (offline: ``pip wheel --no-deps
--no-build-isolation``), installs it with ``--no-deps`` into a fresh venv that sees this
environment's dependencies through a ``.pth`` line (not its ``.pth`` files: an editable
install of this repository there stays invisible), and from an unrelated directory checks
that ``meg-jax demo --smoke`` runs on the shipped checkpoints installed as package data and
that no top-level ``train`` or ``eval`` module exists. Slow (a build, an install and a smoke
demo), still run in CI.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "meg_jax", "train", "eval", "checkpoints")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info next to the sources
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                 "-w", str(out), str(src)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = glob.glob(str(out / "*.whl"))
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("venv")
    proc = _run([sys.executable, "-m", "venv", "--without-pip", str(root)])
    assert proc.returncode == 0, proc.stderr
    python = str(root / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site, "_dependencies.pth"), "w") as f:
        f.write("\n".join(sorted(deps)) + "\n")
    proc = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return str(root)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEG_JAX_CHECKPOINTS")}
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    return env


def test_wheel_holds_the_library_the_jobs_and_the_checkpoints(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"meg_jax", "meg_jax_jobs"}  # no top-level train/ or eval/
    # every package of the library (pyproject lists them by hand) is in the wheel
    library = {os.path.relpath(os.path.dirname(p), REPO).replace(os.sep, "/")
               for p in glob.glob(os.path.join(REPO, "meg_jax", "**", "__init__.py"), recursive=True)}
    assert {p for p in library if not any(n.startswith(p + "/__init__.py") for n in names)} == set()
    for job in ("train/cli.py", "train/demo.py", "eval/orchestrate.py", "eval/report.py"):
        assert f"meg_jax_jobs/{job}" in names
    shipped = {os.path.relpath(p, REPO).replace(os.sep, "/")
               for p in glob.glob(os.path.join(REPO, "checkpoints", "**", "*"), recursive=True) if os.path.isfile(p)}
    assert {f"meg_jax_jobs/{p}" for p in shipped} <= set(names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "meg-jax = meg_jax_jobs.train.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_demo_runs_from_an_unrelated_directory(venv, tmp_path, demo_smoke_run):
    # ``demo_smoke_run`` (the session's one in-tree smoke demo) runs first, so the installed
    # demo, which inherits the session's JAX_COMPILATION_CACHE_DIR and XLA flags, loads those
    # compiled programs instead of compiling them again: the test checks packaging, not XLA.
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    python = os.path.join(venv, "bin", "python")
    for name in ("train", "eval"):
        proc = _run([python, "-c", f"import {name}"], cwd=cwd, env=_clean_env())
        assert proc.returncode != 0 and f"No module named '{name}'" in proc.stderr, (name, proc.stderr)
    proc = _run([python, "-c", "import meg_jax, meg_jax_jobs.train.cli as c; print(meg_jax.__file__); print(c.__file__)"],
                cwd=cwd, env=_clean_env())
    assert proc.returncode == 0 and all(line.startswith(venv) for line in proc.stdout.split()), proc.stdout
    proc = _run([os.path.join(venv, "bin", "meg-jax"), "demo", "--smoke", "--no-progress", "--workdir", "runs"],
                cwd=cwd, env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (cwd / "runs" / "report.md").is_file()
    # the backbone came from the installed package data (the job logs its path on stderr)
    assert os.path.join(venv, "lib") in proc.stdout + proc.stderr


def test_a_bad_checkpoints_setting_is_named(monkeypatch, tmp_path, capsys):
    from train import demo

    monkeypatch.chdir(tmp_path)  # no checkpoints/ here: the setting decides
    monkeypatch.setenv("MEG_JAX_CHECKPOINTS", str(tmp_path / "nowhere"))
    assert demo.main(["--smoke", "--workdir", str(tmp_path / "runs")]) == 2
    assert "MEG_JAX_CHECKPOINTS" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MEG_JAX_CHECKPOINTS", str(empty))
    assert demo.main(["--smoke", "--workdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert os.path.join("checkpoints", "tiny", "backbone.json") in err and "MEG_JAX_CHECKPOINTS" in err


def test_jobs_still_run_from_the_repository_root():
    proc = _run([sys.executable, "-m", "train.cvpo", "--help"], cwd=REPO, env=_clean_env())
    assert proc.returncode == 0 and "--workdir" in proc.stdout, proc.stderr
