"""Tests of meg_jax.checkpoint (config check, orbax restore, safetensors round trip, the
shipped backbone) and of meg_jax.run_log (metrics files, NaN guard)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax import checkpoint as ckpt
from meg_jax import run_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "checkpoints", "tiny")


@dataclasses.dataclass(frozen=True)
class _Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclasses.dataclass(frozen=True)
class _Cfg:
    name: str = "a"
    inner: _Inner = _Inner()


def test_check_config_writes_then_refuses_naming_fields(tmp_path):
    ckpt.check_config(tmp_path, _Cfg())
    assert json.loads((tmp_path / "config.json").read_text())["inner"]["lr"] == 1e-3
    ckpt.check_config(tmp_path, _Cfg())  # same config: accepted
    with pytest.raises(ckpt.ConfigMismatchError) as e:
        ckpt.check_config(tmp_path, _Cfg(inner=_Inner(lr=2e-3, steps=20)))
    msg = str(e.value)
    assert "inner.lr: 0.001 != 0.002" in msg and "inner.steps: 10 != 20" in msg
    assert "name" not in msg.split("requested):")[1]  # unchanged fields are not listed


def test_check_config_ignored_fields_may_differ_and_are_updated(tmp_path):
    ckpt.check_config(tmp_path, _Cfg(), ignore=("name",))
    # Only an ignored top-level field differs: accepted, and the file now holds the new value.
    ckpt.check_config(tmp_path, dataclasses.replace(_Cfg(), name="other"), ignore=("name",))
    assert json.loads((tmp_path / "config.json").read_text())["name"] == "other"
    # A non-ignored field still refuses, and the message lists only the blocking field.
    with pytest.raises(ckpt.ConfigMismatchError) as e:
        ckpt.check_config(tmp_path, _Cfg(name="third", inner=_Inner(lr=2e-3)), ignore=("name",))
    assert "inner.lr" in str(e.value) and "name:" not in str(e.value).split("requested):")[1]


def test_check_config_reads_a_field_the_stored_config_lacks_as_its_default(tmp_path):
    """A run written before a config field existed resumes (and is re-scored) under the new
    version: the missing field counts as its default; a non-default value is still refused,
    and a stored field the dataclass no longer has is named."""
    stored = {"name": "a", "inner": {"lr": 1e-3}}  # written before inner.steps existed
    (tmp_path / "config.json").write_text(json.dumps(stored))
    ckpt.check_config(tmp_path, _Cfg())  # steps = 10, the default: accepted
    assert json.loads((tmp_path / "config.json").read_text())["inner"]["steps"] == 10  # now complete
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ckpt.ConfigMismatchError, match=r"inner\.steps: 10 != 20"):
        ckpt.check_config(tmp_path, _Cfg(inner=_Inner(steps=20)))
    (tmp_path / "config.json").write_text(json.dumps({**stored, "removed": 1}))
    with pytest.raises(ckpt.ConfigMismatchError, match=r"removed: 1 != '<missing>'"):
        ckpt.check_config(tmp_path, _Cfg())


def test_restore_or_init_round_trip(tmp_path):
    state = {"step": jnp.int32(0), "w": jnp.arange(6.0).reshape(2, 3), "opt": (jnp.zeros(2), jnp.ones(()))}
    mgr = ckpt.make_manager(tmp_path, max_to_keep=2)
    restored, step = ckpt.restore_or_init(mgr, state)
    assert step == 0 and restored is state
    for s in (1, 2, 3):
        ckpt.save(mgr, s, jax.tree.map(lambda x: x + s, state))
    mgr.wait_until_finished()
    assert mgr.all_steps() == [2, 3]  # keep 2
    mgr.close()
    mgr = ckpt.make_manager(tmp_path, max_to_keep=2)
    restored, step = ckpt.restore_or_init(mgr, state)
    mgr.close()
    assert step == 3
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.tree.map(lambda x: x + 3, state))):
        np.testing.assert_array_equal(a, b)


def test_all_finite():
    assert ckpt.all_finite({"a": jnp.ones(2), "n": jnp.int32(3)})
    assert not ckpt.all_finite({"a": jnp.array([1.0, jnp.nan])})


def test_params_safetensors_round_trip(tmp_path):
    params = {"params": {"conv": {"kernel": np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32),
                                  "bias": np.zeros(4, np.float32)}, "head": {"w": np.ones((4,), np.float32)}}}
    flat = ckpt.flatten_params(params)
    assert sorted(flat) == ["params/conv/bias", "params/conv/kernel", "params/head/w"]
    ckpt.save_params(params, tmp_path / "p.safetensors")
    back = ckpt.load_params(tmp_path / "p.safetensors")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(ValueError, match="contains '/'"):
        ckpt.flatten_params({"a/b": np.zeros(1)})
    with pytest.raises(FileNotFoundError):
        ckpt.load_params(tmp_path / "missing.safetensors")


def test_load_backbone_missing_folder_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.distill --export"):
        ckpt.load_backbone(tmp_path)


def test_metrics_writer_and_nan_guard(tmp_path):
    with run_log.MetricsWriter(tmp_path) as w:
        w.write(1, {"loss": jnp.float32(0.5), "acc": 1})
        w.write(2, {"loss": 0.25})
    records = run_log.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 0.5), (2, 0.25)]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
    assert run_log.check_finite({"loss": jnp.float32(1.0)}, 3) == {"loss": 1.0}
    with pytest.raises(run_log.NonFiniteError, match=r"\['loss'\] at step 7"):
        run_log.check_finite({"loss": jnp.float32(math.nan), "acc": 1.0}, 7)
    with pytest.raises(ValueError, match="scalar"):
        run_log.check_finite({"v": jnp.ones(2)}, 1)


@pytest.mark.skipif(not os.path.exists(os.path.join(SHIPPED, "backbone.json")),
                    reason="shipped checkpoints not exported yet")
def test_shipped_backbone_loads_and_generates():
    from meg_jax import distill
    from meg_jax.data import tokenizer

    bb = ckpt.load_backbone(SHIPPED)
    assert bb.config.unet.time_cond_proj_dim == bb.sampling.step_embedding_dim
    tokens = jnp.asarray(tokenizer.encode(["a large red circle at the center on a blue background"] * 2))
    noise = jax.random.normal(jax.random.PRNGKey(0), distill.noise_shape(bb, 2))
    images = distill.generate(bb, tokens, noise, num_steps=4)
    assert images.shape == (2, 32, 32, 3)
    assert bool(jnp.all(jnp.isfinite(images)))
    # Colours follow the prompt (background 100%, colour 80% in the quality table; positions
    # and shapes do not yet): mostly blue, with some clearly red pixels.
    img = np.asarray(images[0])
    mean = img.mean((0, 1))
    assert mean[2] > 0.5 and mean[2] > mean[0] + 0.5
    assert np.any(img[..., 0] - img[..., 2] > 0.5)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SHIPPED) for f in fs)
    assert size < 50e6  # the folder stays small


# --------------------------------------------------------------------------- damaged files
def test_truncated_config_json_names_the_file(tmp_path):
    ckpt.check_config(tmp_path, _Cfg())
    path = tmp_path / "config.json"
    path.write_text(path.read_text()[:20])
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"config\.json .*is not valid JSON \(truncated or corrupt"):
        ckpt.check_config(tmp_path, _Cfg())


def test_damaged_backbone_json_names_the_file(tmp_path):
    import shutil

    if not os.path.isfile(os.path.join(SHIPPED, "backbone.json")):
        pytest.skip("the shipped backbone is not in this checkout")
    folder = tmp_path / "tiny"
    shutil.copytree(SHIPPED, folder)
    top = folder / "backbone.json"
    text = top.read_text()
    top.write_text(text[: len(text) // 2])
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"backbone\.json \(the backbone's settings\) is not valid JSON"):
        ckpt.load_backbone(folder)
    top.write_text(text)
    cls = folder / "classifier" / "config.json"
    cls.write_text(json.dumps({"nothing": 1}))
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"classifier/config\.json .*lacks the key\(s\) \['config'\]"):
        ckpt.load_backbone(folder)
    shutil.copy(os.path.join(SHIPPED, "classifier", "config.json"), cls)
    meta = json.loads(text)
    meta["backbone"]["unet"]["bogus_field"] = 1
    top.write_text(json.dumps(meta))
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"backbone\.json: not a valid BackboneConfig.*bogus_field"):
        ckpt.load_backbone(folder)


def test_truncated_orbax_checkpoint_names_the_step_folder(tmp_path):
    state = {"w": jnp.arange(1000.0).reshape(10, 100), "b": jnp.ones(7)}
    manager = ckpt.make_manager(tmp_path / "ckpt", async_save=False)
    ckpt.save(manager, 5, state)
    manager.close()
    # the largest file of the step is the array data; cut it in half, as a full disk would
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "ckpt" / "5") for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    manager = ckpt.make_manager(tmp_path / "ckpt", async_save=False)
    try:
        with pytest.raises(ckpt.CorruptCheckpointError, match=r"cannot restore the orbax checkpoint .*ckpt/5 \(step 5\)"):
            ckpt.restore_or_init(manager, state)
    finally:
        manager.close()


def test_a_run_resumes_under_another_agents_settings_but_not_its_own(tmp_path):
    # train.cvpo ignores the config sections its agent never reads: a --cvpo.* sweep reuses the
    # PPO run beside it, while a MEG-CVPO run still refuses a changed --cvpo.* field.
    from meg_jax.rl import agents
    from meg_jax.rl.config import RunConfig

    base = RunConfig(algo="ppo_lag")
    swept = dataclasses.replace(base, cvpo=dataclasses.replace(base.cvpo, discrete_critic="coordinates"))
    assert agents.unused_sections("ppo_lag") == ("cvpo", "ddpg", "sac")
    ckpt.check_config(tmp_path / "ppo", base, ignore=("eval",) + agents.unused_sections("ppo_lag"))
    ckpt.check_config(tmp_path / "ppo", swept, ignore=("eval",) + agents.unused_sections("ppo_lag"))
    with pytest.raises(ckpt.ConfigMismatchError, match=r"ppo\.lr"):
        ckpt.check_config(tmp_path / "ppo", dataclasses.replace(swept, ppo=dataclasses.replace(base.ppo, lr=1e-4)),
                          ignore=("eval",) + agents.unused_sections("ppo_lag"))
    cvpo = dataclasses.replace(base, algo="cvpo")
    ckpt.check_config(tmp_path / "cvpo", cvpo, ignore=("eval",) + agents.unused_sections("cvpo"))
    with pytest.raises(ckpt.ConfigMismatchError, match=r"cvpo\.discrete_critic"):
        ckpt.check_config(tmp_path / "cvpo", dataclasses.replace(swept, algo="cvpo"),
                          ignore=("eval",) + agents.unused_sections("cvpo"))
    with pytest.raises(ValueError, match="no trained policy"):
        agents.unused_sections("oracle")
