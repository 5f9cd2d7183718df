"""meg_jax.job_setup: where the jobs' compilation cache goes, and that the flag and the user's setting win."""

from __future__ import annotations

import logging
import os

import jax
import pytest

from meg_jax import job_setup


@pytest.fixture
def updates(monkeypatch):
    """Records jax.config.update calls instead of changing this test process's settings."""
    calls = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: calls.__setitem__(name, value))
    return calls


def test_default_dir_follows_xdg_and_the_project_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("MEG_JAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert job_setup.default_cache_dir() == os.path.join(str(tmp_path / "xdg"), "meg-jax", "xla")
    monkeypatch.setenv("MEG_JAX_CACHE_DIR", str(tmp_path / "mine"))
    assert job_setup.default_cache_dir() == os.path.join(str(tmp_path / "mine"), "xla")


def test_on_by_default_in_the_user_cache_dir(monkeypatch, tmp_path, updates):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("MEG_JAX_CACHE_DIR", str(tmp_path))
    path = job_setup.enable_compile_cache()
    assert path == os.path.join(str(tmp_path), "xla") and os.path.isdir(path)
    assert updates["jax_compilation_cache_dir"] == path
    assert updates["jax_persistent_cache_min_compile_time_secs"] == job_setup.MIN_COMPILE_TIME_S


def test_user_setting_is_respected_and_the_flag_turns_it_off(monkeypatch, tmp_path, updates):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "users"))
    assert job_setup.enable_compile_cache() == str(tmp_path / "users")
    assert updates == {}  # jax read the user's variables itself: nothing overridden
    assert job_setup.enable_compile_cache(False) is None
    assert updates == {"jax_enable_compilation_cache": False}


def test_logging_goes_to_the_current_stderr_once(capsys):
    job_setup.configure_logging()
    job_setup.configure_logging()  # idempotent: one handler, one line
    logging.getLogger("train.some_job").info("hello from a job")
    err = capsys.readouterr().err
    assert err.count("hello from a job") == 1 and "INFO" in err
