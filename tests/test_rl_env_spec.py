"""``EnvSpec`` -> environment: the optional channel-estimate fields reach ``MEGEnvConfig``."""

from __future__ import annotations

from meg_jax.meg.artifact import synthetic_artifact
from meg_jax.rl.config import EnvSpec
from meg_jax.rl.evaluate import make_env


def test_csi_fields_override_the_preset_only_when_given():
    art = synthetic_artifact()
    default = make_env(EnvSpec(num_envs=2), artifact=art)
    perfect = make_env(EnvSpec(num_envs=2, csi_delay_s=0.0, csi_error_std=0.0), artifact=art)
    assert default.config.csi_error_std > 0 and default.config.csi_delay_s > 0  # the preset's
    assert perfect.config.csi_error_std == 0.0 and perfect.config.csi_delay_s == 0.0
