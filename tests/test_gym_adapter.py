"""Tests for meg_jax.env.gym_adapter: env_checker, registration, costs in info, vector env."""

from __future__ import annotations

import subprocess
import sys

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import meg_jax.env  # noqa: F401  (registers the ids)
from meg_jax.env.gym_adapter import MEGGymEnv, MEGVectorEnv
from meg_jax.meg.artifact import synthetic_artifact

T = 5


@pytest.fixture(scope="module")
def artifact():
    return synthetic_artifact()


@pytest.fixture(scope="module")
def single(artifact):
    return gymnasium.make("meg_jax/MEG-tiny-v0", artifact=artifact, episode_length=T, max_episode_steps=T)


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is.*")
def test_env_checker_passes(single):
    check_env(single.unwrapped)


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is.*")
def test_env_checker_passes_discrete(artifact):
    env = MEGGymEnv("tiny", episode_length=T, artifact=artifact, discrete=True)
    assert env.action_space == gymnasium.spaces.Discrete(32)
    check_env(env)


def test_episode_truncates_with_costs_in_info(single):
    obs, info = single.reset(seed=3)
    assert obs.shape == single.observation_space.shape and obs.dtype == np.float32
    for t in range(1, T + 1):
        obs, reward, terminated, truncated, info = single.step(single.action_space.sample())
        assert not terminated
        assert truncated == (t == T)
        assert isinstance(info["cost"], float) and info["costs"].shape == (2,)
        assert info["costs"][0] == pytest.approx(info["latency_s"]) and info["costs"][1] == pytest.approx(info["energy_j"])
        assert reward == pytest.approx(info["quality"])
    assert single.spec.max_episode_steps == T


def test_same_seed_same_episode(single):
    a, _ = single.reset(seed=11)
    b, _ = single.reset(seed=11)
    c, _ = single.reset(seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_registration_needs_no_artifact():
    code = (
        "import gymnasium, meg_jax.env;"
        "ids = sorted(i for i in gymnasium.registry if i.startswith('meg_jax/'));"
        "print(ids);"
        "spec = gymnasium.spec('meg_jax/MEG-tiny-v0'); print(spec.max_episode_steps)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'meg_jax/MEG-tiny-v0'" in out.stdout and "'meg_jax/MEG-sdxl-mobile-discrete-v0'" in out.stdout
    assert out.stdout.strip().endswith("64")


def test_vector_env(artifact):
    envs = gymnasium.make_vec(
        "meg_jax/MEG-tiny-v0", num_envs=4, vectorization_mode="vector_entry_point", artifact=artifact, episode_length=3
    )
    assert isinstance(envs, MEGVectorEnv)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (4, 13)
    for t in range(1, 4):
        obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())
        assert reward.shape == (4,) and info["costs"].shape == (4, 2) and info["cost"].shape == (4,)
        assert not terminated.any()
        np.testing.assert_array_equal(truncated, t == 3)
    # Same-step autoreset: obs is a fresh episode (progress 0), the last one in final_obs.
    assert info["_final_obs"].all()
    progress = 10  # est_snr [0:4], mean_snr [4], speed [5], task [6:10], progress [10], budget [11:13]
    np.testing.assert_allclose(info["final_obs"][:, progress], 1.0, rtol=1e-6)  # t / T in float32: <= 1 ulp
    np.testing.assert_array_equal(obs[:, progress], 0.0)
