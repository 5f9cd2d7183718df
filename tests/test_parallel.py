"""Tests of meg_jax.parallel: the mesh helpers, and 8 fake CPU devices vs 1 giving the same
train step (a subprocess with ``--xla_force_host_platform_device_count=8``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax import parallel

# A train step through the distill harness (make_train_step: batch generated on device from
# the key and sharded with constrain_batch, params replicated), on a small conv regression
# so the subprocess compiles in seconds. Prints the params after 3 steps and the metrics.
_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from meg_jax import parallel
    from meg_jax.distill import train
    from meg_jax.distill.config import StageConfig
    from meg_jax.data.shapes import ShapesConfig, sample_batch

    mesh = parallel.make_mesh()
    cfg = StageConfig(steps=3, batch_size=16, learning_rate=1e-2, warmup_steps=1, ema_decay=0.9)

    def loss_fn(params, inputs, key):
        images, _, attrs = sample_batch(key, cfg.batch_size, ShapesConfig())
        images, size = parallel.constrain_batch((images, attrs.size.astype(jnp.float32)), mesh)
        h = jax.lax.conv_general_dilated(images, params["conv"], (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        pred = jnp.mean(jnp.tanh(h), axis=(1, 2)) @ params["head"]
        loss = jnp.mean((pred[:, 0] - size) ** 2)
        return loss, {"pred_mean": jnp.mean(pred)}

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"conv": 0.3 * jax.random.normal(k1, (3, 3, 3, 8)), "head": 0.3 * jax.random.normal(k2, (8, 1))}
    tx = train.make_optimizer(cfg)
    state = parallel.replicate(train.create_state(params, tx), mesh)
    step = train.make_train_step(loss_fn, tx, cfg.ema_decay, mesh)
    for s in range(cfg.steps):
        state, metrics = step(state, {}, jax.random.fold_in(jax.random.PRNGKey(1), s))
    out = {"devices": jax.device_count(),
           "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)],
           "ema": [np.asarray(x).tolist() for x in jax.tree.leaves(state.ema_params)],
           "metrics": {k: float(v) for k, v in metrics.items()},
           "param_sharding": str(jax.tree.leaves(state.params)[0].sharding.spec)}
    print("RESULT" + json.dumps(out))
    """
)


def _run(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def one_and_eight():
    return _run(1), _run(8)


def test_eight_devices_match_one(one_and_eight):
    one, eight = one_and_eight
    assert one["devices"] == 1 and eight["devices"] == 8
    assert eight["param_sharding"] in ("P()", "PartitionSpec()")  # params stay replicated
    for a, b in zip(one["params"] + one["ema"], eight["params"] + eight["ema"]):
        # Only the summation order of the loss/gradient means differs between the runs: ~eps
        # sqrt(K) relative in the gradients (K = 16 x 16 x 16 summed terms: ~8e-6), and Adam's
        # steps (<= lr = 1e-2 each, 3 steps) carry it as ~1e-7 absolute on |w| ~ 0.3: inside
        # rtol 1e-5 / atol 1e-6 with >10x room.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for k in one["metrics"]:
        assert one["metrics"][k] == pytest.approx(eight["metrics"][k], rel=1e-5, abs=1e-6)
    # and the step really trained: params moved away from their initial values.
    assert one["metrics"]["grad_norm"] > 0


def test_mesh_and_shardings_on_one_device():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.devices.size == jax.device_count()
    batch = parallel.shard_batch({"x": np.arange(8.0).reshape(4, 2)}, mesh)
    assert batch["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    rep = parallel.replicate({"w": jnp.ones(3)}, mesh)
    assert rep["w"].sharding.spec == jax.sharding.PartitionSpec()
    np.testing.assert_array_equal(batch["x"], np.arange(8.0).reshape(4, 2))


def test_bad_batch_and_scalar_rejected():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="leading batch axis"):
        parallel.shard_batch({"x": np.float32(1.0)}, mesh)
    fake = type("FakeMesh", (), {"devices": np.empty((8,))})()
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        parallel.check_batch_size(12, fake)
    parallel.check_batch_size(16, fake)
