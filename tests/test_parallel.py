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


# One student train step of the ``test`` distill preset (K = 1, the tiny UNet, text encoder
# frozen) on a 1-device mesh with replicated params and on all 8 devices with FSDP, in one
# subprocess. SGD with momentum instead of AdamW: its update is linear in the gradient, so a
# reduction-order difference shows as the same small relative difference in the update
# (Adam's first update g / (|g| + eps) turns it into an O(1) change for |g| ~ eps).
_FSDP_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json
    import jax, jax.numpy as jnp, numpy as np, optax
    from meg_jax import parallel, partition
    from meg_jax.backbone.text_encoder import init_text_encoder
    from meg_jax.backbone.unet import init_unet
    from meg_jax.distill import config as dconfig, train

    cfg = dconfig.preset("test")
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, step_counts=(1,), step_probs=(1.0,)))
    b = cfg.backbone
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    unet = init_unet(b.unet, k[0])
    n, h, c = 16, b.latent_size, b.vae.latent_channels
    inputs = {"vae": {}, "latent_scale": jnp.float32(1.0), "text_encoder": init_text_encoder(b.text_encoder, k[1]),
              "targets": {"noise": jax.random.normal(k[2], (n, h, h, c)),
                          "latents": jax.random.normal(k[3], (n, h, h, c)),
                          "tokens": jax.random.randint(k[4], (n, cfg.data.max_length), 0, 30)}}
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.sgd(1e-2, momentum=0.9))
    out = {}
    for name, devices, pcfg in (("one", 1, partition.ParallelConfig()),
                                ("fsdp", 8, partition.ParallelConfig(params="fsdp", min_shard_size=1024))):
        mesh = parallel.make_mesh(jax.devices()[:devices], model=1)
        c2 = dataclasses.replace(cfg, parallel=pcfg)
        state = train.create_state(jax.tree.map(jnp.copy, unet), tx)
        specs = train.state_specs(state, tx, pcfg, mesh)
        state = partition.shard(state, mesh, specs)
        inp = partition.shard(inputs, mesh, train.input_specs(inputs, pcfg, mesh))
        step = train.make_train_step(train.student_loss_fn(train.build_models(c2), c2, mesh), tx, 0.9, mesh, pcfg)
        state, metrics = step(state, inp, jax.random.PRNGKey(5))
        flat = jax.tree_util.tree_leaves_with_path(state.params)
        trace = jax.tree.leaves(state.opt_state[1][0].trace)
        out[name] = {
            "metrics": {k: float(v) for k, v in metrics.items()},
            "update": [(np.asarray(x, np.float64) - np.asarray(p0, np.float64)).tolist()
                       for (_, x), p0 in zip(flat, jax.tree.leaves(unet))],
            "param_max": [float(np.abs(np.asarray(x)).max()) for _, x in flat],
            "ema": [np.asarray(x).tolist() for x in jax.tree.leaves(state.ema_params)],
            "specs": [str(x.sharding.spec) for _, x in flat],
            "trace_specs": [str(x.sharding.spec) for x in trace],
            "shard_shapes": [list(x.addressable_shards[0].data.shape) for _, x in flat],
            "shapes": [list(x.shape) for _, x in flat],
            "text_specs": [str(x.sharding.spec) for x in jax.tree.leaves(inp["text_encoder"])],
        }
    print("RESULT" + json.dumps(out))
    """
)


def test_fsdp_student_step_on_eight_devices_matches_one():
    """Params, EMA and optimiser state really split 8 ways, and the step equals the 1-device one."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", _FSDP_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
    one, fsdp = out["one"], out["fsdp"]
    # Layout: on 1 device nothing is split; under FSDP every leaf of >= 1024 elements with a
    # dimension divisible by 8 is split on exactly one axis (a shard holds 1/8 of it), and
    # the momentum and the frozen text encoder follow the same rules.
    assert all(s in ("P()", "PartitionSpec()") for s in one["specs"])
    split = [i for i, s in enumerate(fsdp["specs"]) if "data" in s]
    assert len(split) >= 40, fsdp["specs"]
    for i in split:
        assert np.prod(fsdp["shard_shapes"][i]) * 8 == np.prod(fsdp["shapes"][i])
    assert fsdp["trace_specs"] == fsdp["specs"]
    assert any("data" in s for s in fsdp["text_specs"])
    # Same step: the loss is a mean over the same 8 examples summed in another order (float32,
    # relative error ~ 8 ulp ~ 1e-6); the update is lr x (clipped) gradient, whose per-device
    # partial sums are added in another order: relative error ~1e-6 of the largest summand,
    # so 1e-4 of each leaf's largest update bounds it with margin for cancellation; the new
    # params are float32, so each update also carries half an ulp of its parameter's rounding.
    for key in one["metrics"]:
        assert fsdp["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-7), key
    assert one["metrics"]["grad_norm"] > 0
    for a, b, pmax in zip(one["update"], fsdp["update"], one["param_max"]):
        a, b = np.asarray(a), np.asarray(b)
        ulp = float(np.spacing(np.float32(pmax)))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max() + ulp)
    for a, b in zip(one["ema"], fsdp["ema"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


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
