"""Gymnasium front ends over the JAX MEG environment, for other libraries and users' own loops.

* :class:`MEGGymEnv` — a single ``gymnasium.Env`` (NumPy in, NumPy out; one jitted call per
  step). ``info["cost"]`` (float) and ``info["costs"]`` ([latency s, energy J]) carry the
  constraint signals the way safe-RL libraries (FSRL, OmniSafe) read them.
* :class:`MEGVectorEnv` — a ``gymnasium.vector.VectorEnv`` over the batched JAX env from
  :func:`meg_jax.env.make` (same-step autoreset: the observation after a finished episode
  is the next episode's first, the last one is in ``info["final_obs"]``).

Registered ids (importing this module registers them; ``import meg_jax.env`` does):
``meg_jax/MEG-tiny-v0``, ``meg_jax/MEG-sdxl-mobile-v0`` and ``...-discrete-v0`` variants,
``max_episode_steps = 64`` (= the default ``episode_length``; pass both to change it).
Registration needs no artifact; ``gymnasium.make`` loads the preset's artifact, or takes
``artifact=`` (a ``CalibrationArtifact`` or path)::

    env = gymnasium.make("meg_jax/MEG-tiny-v0", artifact=my_artifact)
    envs = gymnasium.make_vec("meg_jax/MEG-tiny-v0", num_envs=256,
                              vectorization_mode="vector_entry_point", artifact=my_artifact)
"""

from __future__ import annotations

from typing import Any

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from meg_jax.env.config import PRESETS

__all__ = ["MEGGymEnv", "MEGVectorEnv", "register_envs", "DEFAULT_EPISODE_LENGTH"]

DEFAULT_EPISODE_LENGTH = 64


def _spaces(params: Any, discrete: bool) -> tuple[spaces.Space, spaces.Space]:
    obs = spaces.Box(-np.inf, np.inf, (params.obs_dim,), np.float32)
    act = spaces.Discrete(params.num_actions) if discrete else spaces.Box(-1.0, 1.0, (2,), np.float32)
    return obs, act


class MEGGymEnv(gymnasium.Env):
    """One UE's MEG episodes as a ``gymnasium.Env``.

    Args:
      preset: "tiny" or "sdxl-mobile" (or a ``MEGEnvConfig``).
      episode_length: requests per episode; the env truncates there itself.
      artifact: ``CalibrationArtifact`` or path; default the preset's artifact file.
      discrete: ``Discrete(K*R)`` actions instead of ``Box([-1, 1]^2)``.
      render_mode: unused (no rendering).
      **overrides: ``MEGEnvConfig`` fields.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        preset: Any = "tiny",
        episode_length: int = DEFAULT_EPISODE_LENGTH,
        artifact: Any = None,
        discrete: bool = False,
        render_mode: str | None = None,
        **overrides: Any,
    ):
        from meg_jax.env import make_unbatched  # deferred: registration must not build anything

        self._env, self.limit_report = make_unbatched(preset, episode_length, artifact, discrete, **overrides)
        self.params = self._env.params
        self.episode_length = int(episode_length)
        self.discrete = discrete
        self.render_mode = render_mode
        self.observation_space, self.action_space = _spaces(self.params, discrete)
        base = self._env

        def reset_fn(key):
            s = base.reset(key)
            return s, s.obs

        def step_fn(s, action):
            s = base.step(s, action)
            return s, (s.obs, s.reward, s.info["cost"], s.info["costs"], s.pipeline_state.t, s.metrics)

        self._reset = jax.jit(reset_fn)
        self._step = jax.jit(step_fn)
        self._state = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        key = jax.random.PRNGKey(int(self.np_random.integers(0, 2**31 - 1)))
        self._state, obs = self._reset(key)
        return np.asarray(obs, dtype=np.float32), {}

    def step(self, action: Any):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if self.discrete:
            action = jnp.asarray(np.asarray(action).reshape(()), jnp.int32)
        else:
            action = jnp.asarray(np.asarray(action, dtype=np.float32).reshape(2))
        self._state, out = self._step(self._state, action)
        obs, reward, cost, costs, t, metrics = jax.device_get(out)
        info = {"cost": float(cost), "costs": np.asarray(costs, dtype=np.float64)}
        info.update({k: float(v) for k, v in metrics.items()})
        truncated = bool(t >= self.episode_length)
        return np.asarray(obs, dtype=np.float32), float(reward), False, truncated, info


class MEGVectorEnv(VectorEnv):
    """``num_envs`` MEG episodes stepped as one batched, jitted JAX call.

    Args: as :class:`MEGGymEnv`, plus ``num_envs``. ``max_episode_steps`` (passed by
    ``gymnasium.make_vec`` from the registration) is ignored: ``episode_length`` rules.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self,
        num_envs: int,
        preset: Any = "tiny",
        episode_length: int = DEFAULT_EPISODE_LENGTH,
        artifact: Any = None,
        discrete: bool = False,
        render_mode: str | None = None,
        max_episode_steps: int | None = None,
        **overrides: Any,
    ):
        from meg_jax.env import make

        del max_episode_steps
        self._env = make(preset, num_envs, episode_length, artifact, discrete, **overrides)
        self.params = self._env.params
        self.num_envs = int(num_envs)
        self.discrete = discrete
        self.render_mode = render_mode
        self.single_observation_space, self.single_action_space = _spaces(self.params, discrete)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        env = self._env

        def step_fn(s, action):
            s = env.step(s, action)
            return s, (s.obs, s.reward, s.done, s.info["truncation"], s.info["cost"], s.info["costs"], s.info["final_obs"])

        self._reset = jax.jit(env.reset)
        self._step = jax.jit(step_fn)
        self._state = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._np_random, self._np_random_seed = gymnasium.utils.seeding.np_random(seed) if (
            seed is not None or self._np_random is None
        ) else (self._np_random, self._np_random_seed)
        key = jax.random.PRNGKey(int(self._np_random.integers(0, 2**31 - 1)))
        self._state = self._reset(key)
        return np.asarray(self._state.obs, dtype=np.float32), {}

    def step(self, actions: Any):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        dtype = np.int32 if self.discrete else np.float32
        self._state, out = self._step(self._state, jnp.asarray(np.asarray(actions, dtype=dtype)))
        obs, reward, done, truncation, cost, costs, final_obs = jax.device_get(out)
        done = done > 0.5
        info: dict[str, Any] = {"cost": np.asarray(cost, np.float64), "costs": np.asarray(costs, np.float64)}
        if done.any():
            info["final_obs"] = np.where(done[:, None], final_obs, 0.0).astype(np.float32)
            info["_final_obs"] = done
        terminated = done & ~(truncation > 0.5)
        return (
            np.asarray(obs, dtype=np.float32),
            np.asarray(reward, np.float64),
            terminated,
            truncation > 0.5,
            info,
        )


def register_envs() -> list[str]:
    """Registers every preset (continuous and discrete) with gymnasium; returns the ids."""
    ids = []
    for preset in PRESETS:
        for discrete in (False, True):
            env_id = f"meg_jax/MEG-{preset}{'-discrete' if discrete else ''}-v0"
            if env_id not in gymnasium.registry:
                gymnasium.register(
                    id=env_id,
                    entry_point="meg_jax.env.gym_adapter:MEGGymEnv",
                    vector_entry_point="meg_jax.env.gym_adapter:MEGVectorEnv",
                    max_episode_steps=DEFAULT_EPISODE_LENGTH,
                    kwargs={"preset": preset, "episode_length": DEFAULT_EPISODE_LENGTH, "discrete": discrete},
                )
            ids.append(env_id)
    return ids


register_envs()
