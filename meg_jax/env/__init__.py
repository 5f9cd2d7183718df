"""meg_jax.env: the vectorized wireless CMDP in which MEG-CVPO chooses (K, r) per request.

``make(preset, num_envs, episode_length)`` returns a batched, self-resetting brax env::

    env = meg_jax.env.make("tiny", num_envs=1024, episode_length=64)
    state = jax.jit(env.reset)(jax.random.PRNGKey(0))            # obs [1024, obs_dim]
    state = jax.jit(env.step)(state, actions)                    # actions [1024, 2] in [-1, 1]
    state.reward, state.info["costs"], state.info["truncation"]  # [1024], [1024, 2], [1024]

The environment reads only the calibration artifact (``meg_jax.meg.artifact``) — never a
Flax model. Modules: ``wireless`` (channel and link models), ``state`` (``EnvParams`` and the
state pytrees), ``channel`` (noise draws and channel dynamics), ``meg_env`` (pricing, the
transition and the brax env), ``params`` (``EnvParams`` from config + artifact, limits),
``wrappers`` (episode limit, fresh auto-reset), ``gym_adapter`` (gymnasium), ``numpy_reference``
(plain NumPy dynamics for testing and benchmarking), ``oracle`` (Lagrangian oracle and
fixed-action baselines), ``config`` (presets).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from brax.envs.base import Env
from brax.envs.wrappers.training import VmapWrapper

from meg_jax.env.config import PRESETS, MEGEnvConfig, get_preset
from meg_jax import shipped
from meg_jax.env.meg_env import EnvParams, MEGEnv
from meg_jax.env.params import LimitReport, build_params, resolve_artifact_path
from meg_jax.env.wrappers import EpisodeLimitWrapper, FreshAutoResetWrapper, ObservationFieldsWrapper, replace_params
from meg_jax.meg.artifact import CalibrationArtifact

__all__ = [
    "make",
    "make_unbatched",
    "load_artifact",
    "MEGEnv",
    "MEGEnvConfig",
    "EnvParams",
    "PRESETS",
    "get_preset",
    "replace_params",
]


def load_artifact(config: MEGEnvConfig, artifact: CalibrationArtifact | str | os.PathLike | None = None) -> CalibrationArtifact:
    """The artifact to use: ``artifact`` if given (object or path), else ``config.artifact_path``.

    Raises:
      FileNotFoundError: naming the path and the command that creates it.
    """
    if isinstance(artifact, CalibrationArtifact):
        return artifact.validate()
    given = artifact is not None
    path = resolve_artifact_path(os.fspath(artifact) if given else config.artifact_path)
    if not os.path.exists(path):
        hint = (
            f"the calibration artifact {path} does not exist. "
            + (
                ""
                if given
                else f"It is preset {config.name!r}'s default and is written by `meg-jax calibrate` "
                "(the MEG system's calibration; for 'sdxl-mobile' use the sdxl-1024 cost preset). "
            )
            + "Create it, or pass artifact=<CalibrationArtifact or .npz path> to make() ("
            + shipped.missing_hint() + ")."
        )
        raise FileNotFoundError(hint)
    return CalibrationArtifact.load(path)


def _config_with_overrides(preset: str | MEGEnvConfig, overrides: dict[str, Any]) -> MEGEnvConfig:
    config = get_preset(preset) if isinstance(preset, str) else preset
    names = {f.name for f in dataclasses.fields(MEGEnvConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown environment config field(s) {unknown}; MEGEnvConfig has {sorted(names)}")
    return dataclasses.replace(config, **overrides).validate()


def make_unbatched(
    preset: str | MEGEnvConfig = "tiny",
    episode_length: int = 64,
    artifact: CalibrationArtifact | str | os.PathLike | None = None,
    discrete: bool = False,
    **overrides: Any,
) -> tuple[MEGEnv, LimitReport]:
    """The bare single-UE ``MEGEnv`` and the report of how its limits were set."""
    config = _config_with_overrides(preset, overrides)
    params, report = build_params(config, load_artifact(config, artifact), episode_length)
    return MEGEnv(params, discrete=discrete, config=config), report


def make(
    preset: str | MEGEnvConfig = "tiny",
    num_envs: int = 1,
    episode_length: int = 64,
    artifact: CalibrationArtifact | str | os.PathLike | None = None,
    discrete: bool = False,
    **overrides: Any,
) -> Env:
    """The batched, episode-limited, freshly auto-resetting MEG environment.

    Args:
      preset: "tiny", "sdxl-mobile", "paper" or a ``MEGEnvConfig``.
      num_envs: parallel episodes N (the batch axis of every state leaf).
      episode_length: requests per episode T.
      artifact: a ``CalibrationArtifact`` or a path; default the preset's ``artifact_path``.
      discrete: one integer action index over the K x R grid instead of ``[-1, 1]²``.
      **overrides: ``MEGEnvConfig`` fields, e.g. ``limits=(0.2, 0.02)``, ``slot_s=0.05``,
        ``quality_source="replay"``, ``reward_metric="neg_log_mse"``, ``energy_scope="system"``;
        and ``observe``: names of ``observation_fields`` to keep (``ObservationFieldsWrapper``).

    Returns:
      ``FreshAutoResetWrapper(EpisodeLimitWrapper(VmapWrapper(MEGEnv)))``; ``reset(key)``
      takes one key (or N keys); ``env.params``, ``env.config``, ``env.limit_report`` reach
      through the wrappers.
    """
    observe = overrides.pop("observe", None)
    base, report = make_unbatched(preset, episode_length, artifact, discrete, **overrides)
    base.limit_report = report
    inner = base if observe is None else ObservationFieldsWrapper(base, observe)
    return FreshAutoResetWrapper(EpisodeLimitWrapper(VmapWrapper(inner), episode_length), num_envs)


# Registers the gymnasium ids (meg_jax/MEG-tiny-v0, ...); needs no artifact.
from meg_jax.env import gym_adapter as _gym_adapter  # noqa: E402,F401
