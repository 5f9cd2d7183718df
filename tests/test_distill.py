"""Tests of meg_jax.distill: losses on hand-checked cases, samplers, one train step per stage,
resume to identical parameters, config mismatch refused, NaN guard, the CLI.

Compile time dominates on CPU, so the seven stages of the ``test`` preset run once per module
(``stages`` fixture) and every other test reuses the compiled steps
(``train.compiled_train_step`` caches them per process).
"""

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
from meg_jax import parallel, run_log
from meg_jax.backbone import schedules
from meg_jax.distill import config as dconfig
from meg_jax.distill import losses, train

# --------------------------------------------------------------------------- losses


def test_gaussian_kl_hand_cases():
    # KL(N(0,1) || N(0,1)) = 0.
    assert float(losses.gaussian_kl(jnp.zeros(4), jnp.zeros(4))) == pytest.approx(0.0)
    # mean 1, var 1: 0.5 * (1 + 1 - 1 - 0) = 0.5 per element.
    assert float(losses.gaussian_kl(jnp.ones(4), jnp.zeros(4))) == pytest.approx(0.5)
    # mean 0, var 2: 0.5 * (0 + 2 - 1 - ln 2) = 0.153426.
    assert float(losses.gaussian_kl(jnp.zeros(3), jnp.full(3, math.log(2.0)))) == pytest.approx(
        0.5 * (1.0 - math.log(2.0)), rel=1e-6)
    # mixed elements average: (0.5 + 0) / 2 = 0.25.
    assert float(losses.gaussian_kl(jnp.array([1.0, 0.0]), jnp.zeros(2))) == pytest.approx(0.25)


def test_reconstruction_and_edge_loss_hand_cases():
    target = jnp.zeros((1, 2, 2, 1))
    recon = jnp.array([[[1.0], [0.0]], [[0.0], [0.0]]])[None]  # one pixel at 1
    # MSE: one of four elements off by 1 -> 0.25.
    assert float(losses.reconstruction_loss(recon, target)) == pytest.approx(0.25)
    # Vertical differences of recon: [[-1, 0]] (2 values), horizontal: [[-1], [0]] (2 values);
    # target differences are 0 -> each mean is 1/2, averaged -> 0.5.
    assert float(losses.edge_loss(recon, target)) == pytest.approx(0.5)
    # A constant offset has no edges.
    assert float(losses.edge_loss(target + 3.0, target)) == pytest.approx(0.0)


def test_foreground_mask_and_masked_mse_hand_cases():
    bg = jnp.array([[-1.0, -1.0, -1.0]])  # black background
    images = jnp.full((1, 5, 5, 3), -1.0).at[0, 2, 2].set(jnp.array([1.0, -1.0, -1.0]))  # one red pixel
    exact = losses.foreground_mask(images, bg)
    assert exact.shape == (1, 5, 5, 1) and float(exact.sum()) == 1.0 and float(exact[0, 2, 2, 0]) == 1.0
    wide = losses.foreground_mask(images, bg, dilation=3)
    assert float(wide.sum()) == 9.0 and float(wide[0, 1:4, 1:4].min()) == 1.0  # the 3x3 around it
    # Error 2 on one channel of the shape pixel: masked MSE = 4 / (3 channels x 1 pixel);
    # whole-image MSE dilutes the same error 25-fold.
    recon = images.at[0, 2, 2, 0].set(-1.0)
    assert float(losses.masked_mse(recon, images, exact)) == pytest.approx(4.0 / 3.0)
    assert float(losses.reconstruction_loss(recon, images)) == pytest.approx(4.0 / 75.0)
    # Normalised per image: the same error on a shape twice the size counts half.
    assert float(losses.masked_mse(recon, images, wide)) == pytest.approx(4.0 / 27.0)
    assert float(losses.masked_mse(recon, images, jnp.zeros_like(exact))) == 0.0  # empty mask: 0


def test_diffusion_target_hand_cases():
    sched = schedules.make_schedule()
    x0 = jnp.full((1, 2), 2.0)
    noise = jnp.full((1, 2), -1.0)
    t = jnp.array([499])
    a = float(sched.alphas_cumprod[499])  # 0.27767 (reference/schedules.md)
    assert a == pytest.approx(0.27767, abs=1e-4)
    v = losses.diffusion_target(sched, x0, noise, t, "v_prediction")
    # v = sqrt(a) * eps - sqrt(1 - a) * x0 = 0.52694 * -1 - 0.84990 * 2 = -2.22674.
    np.testing.assert_allclose(v, math.sqrt(a) * -1.0 - math.sqrt(1 - a) * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(losses.diffusion_target(sched, x0, noise, t, "epsilon"), noise)
    np.testing.assert_array_equal(losses.diffusion_target(sched, x0, noise, t, "sample"), x0)
    with pytest.raises(ValueError, match="prediction_type"):
        losses.diffusion_target(sched, x0, noise, t, "flow")


def test_drop_context():
    ctx = jnp.ones((64, 3, 2))
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(losses.drop_context(key, ctx, 0.0), ctx)
    np.testing.assert_array_equal(losses.drop_context(key, ctx, 1.0), jnp.zeros_like(ctx))
    half = losses.drop_context(key, ctx, 0.5)
    rows = np.asarray(half[:, 0, 0])
    assert set(np.unique(rows)) <= {0.0, 1.0}
    assert np.all(np.asarray(half) == rows[:, None, None])  # whole prompts are dropped
    assert 10 < rows.sum() < 54


def test_step_embedding_hand_case():
    # dim 2: one frequency f = 10000^0 = 1; K = 4 -> s = 1000 / 4 = 250 -> [cos 250, sin 250].
    np.testing.assert_allclose(losses.step_embedding(4, 2), [math.cos(250.0), math.sin(250.0)], rtol=1e-5)
    e = np.asarray(jnp.stack([losses.step_embedding(k, 32) for k in (1, 2, 4, 8)]))
    assert e.shape == (4, 32)
    assert np.min(np.linalg.norm(e[:, None] - e[None], axis=-1) + np.eye(4) * 9) > 0.5  # distinct
    with pytest.raises(ValueError, match="even"):
        losses.step_embedding(1, 3)


def test_rollout_loss_selects_one_branch():
    # sample_fn(K) = K everywhere; target 0 -> latent MSE = K^2 for the chosen K.
    target = jnp.zeros((2, 2, 2, 1))
    fn = lambda k: jnp.full_like(target, float(k))  # noqa: E731
    for idx, k in enumerate((1, 2, 4, 8)):
        loss, m = losses.rollout_loss(fn, target, jnp.int32(idx), (1, 2, 4, 8))
        assert float(loss) == pytest.approx(k * k)
        assert float(m["pixel_mse"]) == 0.0
    # with a pixel term: decode doubles -> pixel MSE = (2K)^2 = 16 for K = 2; weight 0.5 -> 4 + 8.
    loss, m = losses.rollout_loss(fn, target, jnp.int32(1), (1, 2, 4, 8), lambda z: 2.0 * z,
                                  jnp.zeros_like(target), 0.5)
    assert float(m["pixel_mse"]) == pytest.approx(16.0)
    assert float(loss) == pytest.approx(4.0 + 0.5 * 16.0)


# --------------------------------------------------------------------------- samplers


@pytest.fixture(scope="module")
def test_config():
    return dconfig.preset("test")


@pytest.fixture(scope="module")
def models(test_config):
    return train.build_models(test_config)


def test_student_starts_as_teacher(test_config, models):
    """Zeroed step projection: the student's K-step sample equals the unguided teacher's."""
    from meg_jax.backbone import init_text_encoder, init_unet

    b = test_config.backbone
    teacher = init_unet(b.unet, jax.random.PRNGKey(1))
    student = train.zero_step_conditioning(teacher)
    assert float(jnp.abs(student["params"]["time_embedding"]["cond_proj"]["kernel"]).max()) == 0.0
    context = models.text_encoder.apply(init_text_encoder(b.text_encoder, jax.random.PRNGKey(2)),
                                        jnp.ones((2, b.text_encoder.max_length), jnp.int32))
    noise = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 4))
    s = losses.student_sample(models.unet, student, models.schedule, noise, context, num_steps=2,
                              embedding_dim=32, prediction_type="v_prediction")
    t = losses.teacher_sample(models.unet, teacher, models.schedule, noise, context, num_steps=2,
                              guidance_scale=1.0, prediction_type="v_prediction")
    np.testing.assert_allclose(s, t, atol=1e-5)


# --------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def stages(tmp_path_factory, test_config):
    """Runs all seven stages of the test preset once (also compiles every step)."""
    workdir = str(tmp_path_factory.mktemp("distill"))
    finished = train.run(test_config, dconfig.STAGES, workdir, progress=False)
    return workdir, finished


@pytest.mark.parametrize("stage", dconfig.STAGES)
def test_one_train_run_per_stage(stages, test_config, stage):
    workdir, finished = stages
    assert finished[stage]
    records = run_log.read_metrics(os.path.join(workdir, stage))
    cfg = getattr(test_config, stage)
    assert [r["step"] for r in records] == list(range(1, cfg.steps + 1))  # log_every 1
    assert all(math.isfinite(r["loss"]) for r in records)
    assert os.path.exists(os.path.join(workdir, stage, "final", "DONE"))
    mgr = ckpt.make_manager(os.path.join(workdir, stage, "checkpoints"), max_to_keep=2)
    assert mgr.all_steps() == [2, 4]  # every 2 steps, keep 2
    mgr.close()
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["preset"] == "test"


@pytest.mark.parametrize("stage", dconfig.STAGES)
def test_each_stage_lowers_its_loss_on_a_fixed_batch(stages, test_config, stage):
    """Every stage's compiled step (the very one the run used) lowers its own loss.

    The logged losses of the test preset's 4 steps do not show it (fresh random batches,
    warm-up from lr 0, the student's K drawn per step: e.g. the decoder logged 4.98, 5.25,
    4.61, 5.40), so the step is run 4 times on one batch (same key) from the stage's fresh
    state: the loss at the 4th call (after 3 updates) is below the first. Measured drops:
    classifier 13 %, vae 18 %, decoder 16 %, teacher 38 %, teacher_ft 23 %, student 19 %;
    5 % leaves room for other CPUs' rounding while a step that does not descend (wrong sign,
    frozen params, a loss cut from its parameters) fails.
    """
    workdir, _ = stages
    mesh = parallel.make_mesh()
    inputs, state = train.stage_inputs(stage, workdir, train.build_models(test_config), test_config, progress=False)
    step = train.compiled_train_step(stage, test_config, mesh)  # cached: compiled by the run
    state, inputs = parallel.replicate(state, mesh), parallel.replicate(inputs, mesh)
    key = jax.random.PRNGKey(7)
    losses = []
    for _ in range(4):
        state, metrics = step(state, inputs, key)
        losses.append(float(metrics["loss"]))
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.95 * losses[0], losses


def test_refinement_stages_keep_the_latent_space(stages, test_config):
    """decoder: encoder groups bit-identical to the VAE stage's, decoder changed;
    teacher_ft: starts from the teacher and moves away; the student reads teacher_ft."""
    workdir, _ = stages
    vae = train.load_final(workdir, "vae", ("vae",))["vae"]
    refined = train.load_final(workdir, "decoder", ("vae",))["vae"]
    enc_a, dec_a = train.split_vae(vae)
    enc_b, dec_b = train.split_vae(refined)
    for x, y in zip(jax.tree.leaves(enc_a), jax.tree.leaves(enc_b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(dec_a), jax.tree.leaves(dec_b)))
    assert sorted(os.listdir(os.path.join(workdir, "teacher_ft", "latents"))) == ["chunk_00000.npz", "chunk_00001.npz"]
    with np.load(os.path.join(workdir, "teacher", "latents", "chunk_00000.npz")) as a, \
            np.load(os.path.join(workdir, "teacher_ft", "latents", "chunk_00000.npz")) as b:
        assert not np.array_equal(a["tokens"], b["tokens"])  # its own seed: other images
    teacher = train.load_final(workdir, "teacher", ("unet",))["unet"]
    ft = train.load_final(workdir, "teacher_ft", ("unet",))["unet"]
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(teacher), jax.tree.leaves(ft)))
    assert train.teacher_stage(test_config) == "teacher_ft" and train.vae_stage(test_config) == "decoder"
    assert "teacher_ft" in train.stage_record("student", test_config)


def test_refinement_stages_are_optional(stages, test_config, capsys):
    from train import distill as cli

    off = dataclasses.replace(test_config, decoder=None, teacher_ft=None, ue_decoder=None)
    assert train.enabled_stages(off) == ("classifier", "vae", "teacher", "student")
    assert train.enabled_stages(dataclasses.replace(off, ue_decoder=test_config.ue_decoder))[-1] == "ue_decoder"
    assert train.teacher_stage(off) == "teacher" and train.vae_stage(off) == "vae"
    # Off, the student's record is the one made before the refinements existed.
    assert sorted(train.stage_record("student", off)) == ["backbone", "backbone.vae", "data", "sampling",
                                                          "student", "teacher", "vae"]
    # A finished work directory: run() with them off skips them; the earlier stages are
    # unaffected, but the student learnt from teacher_ft and is refused, naming it.
    assert train.run(off, dconfig.STAGES[:4], stages[0], progress=False) == dict.fromkeys(
        ("classifier", "vae", "teacher"), True)
    with pytest.raises(ckpt.ConfigMismatchError, match="teacher_ft"):
        train.run(off, ("student",), stages[0], progress=False)
    assert cli.main(["--preset", "test", "--stage", "decoder", "--workdir", stages[0],
                     "--decoder", "None"]) == 2
    assert "'decoder' is off" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown stage"):
        train.run(test_config, ("teacher2",), stages[0], progress=False)


def test_student_targets_cached(stages, test_config):
    workdir, _ = stages
    folder = os.path.join(workdir, "student", "targets")
    chunks = sorted(os.listdir(folder))
    assert chunks == ["chunk_00000.npz", "chunk_00001.npz"]  # 16 targets in chunks of 8
    with np.load(os.path.join(folder, chunks[0])) as d:
        assert d["noise"].shape == (8, 8, 8, 4) and d["latents"].shape == (8, 8, 8, 4)
        assert d["tokens"].shape == (8, 16) and d["tokens"].dtype == np.int32
        assert np.all(np.isfinite(d["latents"]))


def test_resume_gives_identical_params(stages, test_config, tmp_path):
    """Stop after the step-2 checkpoint (as a kill would), rerun: same params as uninterrupted."""
    workdir, _ = stages
    other = str(tmp_path / "resumed")
    first = train.run(test_config, ("vae",), other, progress=False, stop_after=3)
    assert first == {"vae": False}
    mgr = ckpt.make_manager(os.path.join(other, "vae", "checkpoints"))
    assert mgr.latest_step() == 2  # step 3 ran but was never saved: it is lost, like a kill
    mgr.close()
    assert train.run(test_config, ("vae",), other, progress=False) == {"vae": True}
    a = train.load_final(workdir, "vae", ("vae",))
    b = train.load_final(other, "vae", ("vae",))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_mismatched_config_refused(stages, test_config):
    workdir, _ = stages
    changed = dataclasses.replace(test_config, teacher=dataclasses.replace(test_config.teacher, learning_rate=0.5))
    with pytest.raises(ckpt.ConfigMismatchError, match=r"teacher\.learning_rate"):
        train.run(changed, ("teacher",), workdir, progress=False)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    """A step whose loss turns NaN at step 5 stops the loop; checkpoints stop at step 4."""
    mesh = parallel.make_mesh()
    cfg = dconfig.StageConfig(steps=10, batch_size=1, checkpoint_every=2, log_every=1)

    @jax.jit
    def step(state, inputs, key):
        s = state.step + 1
        loss = jnp.where(s >= 5, jnp.nan, 1.0 / s)
        new = state.replace(step=s, params={"w": state.params["w"] + 1.0})
        return new, {"loss": loss}

    state = train.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(2)},
                             ema_params={"w": jnp.zeros(2)}, opt_state=())
    with pytest.raises(run_log.NonFiniteError, match="loss"):
        train.train_stage("toy", str(tmp_path), {"toy": 1}, state, step, {}, cfg, mesh,
                          progress=False, async_save=False)
    mgr = ckpt.make_manager(tmp_path / "toy" / "checkpoints")
    assert mgr.latest_step() == 4
    mgr.close()
    records = run_log.read_metrics(tmp_path / "toy")
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_cli_refuses_mismatch_and_unknown_override(stages, capsys):
    from train import distill as cli

    workdir, _ = stages
    assert cli.main(["--preset", "test", "--stage", "vae", "--workdir", workdir,
                     "--vae.kl_weight", "0.5", "--no_progress"]) == 2
    assert "vae.kl_weight" in capsys.readouterr().err
    assert cli.main(["--preset", "test", "--workdir", workdir, "--vae.nope", "1"]) == 2
    assert "--vae.nope" in capsys.readouterr().err


def test_export_and_load_backbone(stages, test_config, tmp_path):
    from meg_jax import distill

    workdir, _ = stages
    out = str(tmp_path / "backbone")
    train.export(workdir, out, test_config)
    bb = ckpt.load_backbone(out)
    # The shipped VAE is the decoder stage's and the teacher the continuation's.
    for shipped, final in ((bb.vae, train.load_final(workdir, "decoder", ("vae",))["vae"]),
                           (bb.teacher, train.load_final(workdir, "teacher_ft", ("unet",))["unet"])):
        for x, y in zip(jax.tree.leaves(shipped), jax.tree.leaves(final)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with open(os.path.join(out, "teacher", "config.json")) as f:
        assert sorted(json.load(f)["stage"]) == ["teacher", "teacher_ft"]
    # The merging-aware UE decoder ships beside the VAE (its decoder groups only).
    ue = train.load_final(workdir, "ue_decoder", ("decoder",))["decoder"]
    assert sorted(bb.ue_decoder) == ["decoder", "post_quant_conv"]
    for x, y in zip(jax.tree.leaves(bb.ue_decoder), jax.tree.leaves(ue)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with open(os.path.join(out, "ue_decoder", "config.json")) as f:
        assert json.load(f)["init_from"] == {"stages": {"decoder": {"seed": 1, "steps": 4},
                                                        "vae": {"seed": 0, "steps": 4}}}
    assert bb.config.prediction_type == "v_prediction"
    assert bb.config.latent_scaling_factor > 0
    tokens = jnp.ones((2, 16), jnp.int32)
    noise = jax.random.normal(jax.random.PRNGKey(0), distill.noise_shape(bb, 2))
    images = distill.generate(bb, tokens, noise, num_steps=1)
    assert images.shape == (2, 32, 32, 3)
    assert bool(jnp.all(jnp.isfinite(images)))


# --------------------------------------------------------------------------- memory options


class _StubUNet:
    """A one-layer stand-in with the UNet's call signature: cheap to compile."""

    def apply(self, params, x, t, context, timestep_cond=None, added_cond_kwargs=None):
        h = jnp.tanh(x @ params["w"] + jnp.mean(context) + jnp.sum(timestep_cond, -1)[:, None, None, None])
        return h * (t[:, None, None, None] / 1000.0)


def test_rollout_remat_same_loss_and_grad_and_really_checkpoints():
    """``remat=True`` wraps each pass in jax.checkpoint without changing loss or gradient."""
    sched = schedules.make_schedule()
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": 0.3 * jax.random.normal(k1, (4, 4))}
    x_T = jax.random.normal(k2, (2, 3, 3, 4))
    context = jax.random.normal(k3, (2, 5, 6))

    def loss(p, remat):
        out = losses.student_sample(_StubUNet(), p, sched, x_T, context, num_steps=4, embedding_dim=8,
                                    prediction_type="v_prediction", remat=remat)
        return jnp.mean(jnp.square(out))

    (l0, g0), (l1, g1) = (jax.value_and_grad(loss)(params, r) for r in (False, True))
    # Same operations recomputed in the backward: equal up to XLA fusing them differently.
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(g1["w"], g0["w"], rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g0["w"]).max()) > 0
    # The rematerialised program checkpoints (one remat per pass, inside the sampler's scan).
    assert "remat" in str(jax.make_jaxpr(lambda p: loss(p, True))(params))  # jax.checkpoint's primitive
    assert "remat" not in str(jax.make_jaxpr(lambda p: loss(p, False))(params))


def test_grad_accumulation_averages_microbatch_gradients():
    """accum = 2: the update uses the mean of the gradients on keys fold_in(key, 0) and fold_in(key, 1)."""
    import optax

    mesh = parallel.make_mesh()

    def loss_fn(params, inputs, key):
        x = jax.random.normal(key, (4, 3))
        loss = jnp.mean(jnp.square(x @ params["w"] - 1.0))
        return loss, {"x_mean": jnp.mean(x)}

    params = {"w": jnp.arange(3.0)}
    tx = optax.sgd(0.1)
    step = train.make_train_step(loss_fn, tx, 0.5, mesh, grad_accum_steps=2)
    state, metrics = step(train.create_state(jax.tree.map(jnp.copy, params), tx), {}, jax.random.PRNGKey(3))
    keys = [jax.random.fold_in(jax.random.PRNGKey(3), i) for i in range(2)]
    res = [jax.value_and_grad(loss_fn, has_aux=True)(params, {}, k) for k in keys]
    l, m, g = [r[0][0] for r in res], [r[0][1] for r in res], [r[1] for r in res]
    grad = (g[0]["w"] + g[1]["w"]) / 2
    # One SGD step: w - 0.1 * mean gradient (float32 sums of two terms: a few ulp).
    np.testing.assert_allclose(state.params["w"], params["w"] - 0.1 * grad, rtol=1e-6, atol=1e-7)
    assert float(metrics["loss"]) == pytest.approx(float(l[0] + l[1]) / 2, rel=1e-6)
    assert float(metrics["x_mean"]) == pytest.approx(float(m[0]["x_mean"] + m[1]["x_mean"]) / 2, rel=1e-5)


def test_compute_options_keep_unet_numerics():
    """Per-layer remat and chunked attention: same loss and gradient; bf16: close to fp32."""
    from meg_jax.backbone import layers
    from meg_jax.backbone.config import preset as backbone_preset
    from meg_jax.backbone.unet import UNet, example_inputs, init_unet

    cfg = backbone_preset("tiny").unet
    params = init_unet(cfg, jax.random.PRNGKey(0))
    inputs = example_inputs(cfg, batch=2, height=8, seq_len=16)
    inputs["sample"] = jax.random.normal(jax.random.PRNGKey(1), inputs["sample"].shape)
    inputs["encoder_hidden_states"] = jax.random.normal(jax.random.PRNGKey(2), inputs["encoder_hidden_states"].shape)
    inputs["timestep"] = jnp.array([10, 500])

    def loss_and_grad(unet):  # compiled: op-by-op dispatch of a UNet's backward pass took a minute
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(jnp.square(unet.apply(p, **inputs).astype(jnp.float32)))))

    l0, g0 = loss_and_grad(UNet(cfg))(params)
    chunk = layers.QUERY_CHUNK
    layers.QUERY_CHUNK = 16  # the 64-token self-attention then runs in 4 chunks (read while tracing)
    try:
        l1, g1 = loss_and_grad(UNet(cfg, remat="nothing_saveable", attention="chunked"))(params)
    finally:
        layers.QUERY_CHUNK = chunk
    # Same arithmetic per element (remat recomputes it; chunking splits independent query
    # rows): float32 rounding of differently fused kernels only. A kernel's gradient is a
    # sum over 2 x 64 positions with cancellation, so an element can carry an error of
    # ~1e-5 of the leaf's largest element (measured 3.1e-6 compiled).
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(jnp.abs(a).max()) + 1e-9)
    # bf16 compute with fp32 params: 8-bit mantissas (relative rounding 2^-9 per op) over a
    # ~20-layer network; the loss stays within a few percent and the gradient is float32.
    l2, g2 = loss_and_grad(UNet(cfg, dtype=jnp.bfloat16))(params)
    assert float(l2) == pytest.approx(float(l0), rel=0.05)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g2))


def test_attention_implementations_agree():
    from meg_jax.backbone import layers

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    q, kk, v = (jax.random.normal(k[i], s) for i, s in enumerate([(2, 64, 32), (2, 48, 32), (2, 48, 32)]))
    mask = jax.random.bernoulli(k[3], 0.8, (2, 1, 64, 48))
    chunk = layers.QUERY_CHUNK
    layers.QUERY_CHUNK = 16
    try:
        for m in (None, mask):
            ref = layers.multi_head_attention(q, kk, v, 4, m)
            for impl in ("chunked", "xla"):
                # Same softmax per query row in float32; only the matmul blocking differs.
                np.testing.assert_allclose(layers.multi_head_attention(q, kk, v, 4, m, impl), ref,
                                           rtol=1e-5, atol=1e-6)
    finally:
        layers.QUERY_CHUNK = chunk
    with pytest.raises(ValueError, match="attention implementation"):
        layers.multi_head_attention(q, kk, v, 4, None, "flash")


def test_compute_and_parallel_config_validation_and_record():
    with pytest.raises(ValueError, match="ComputeConfig.remat"):
        dconfig.ComputeConfig(remat="sometimes")
    with pytest.raises(ValueError, match="ComputeConfig.dtype"):
        dconfig.ComputeConfig(dtype="float16")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        dconfig.ComputeConfig(grad_accum_steps=0)
    base = dconfig.preset("test")
    # Layout and memory-only options do not enter a stage's record (resume may change them);
    # bf16 changes the teacher/student numbers, accumulation every stage's batches.
    rec = train.stage_record("student", base)
    fsdp = dataclasses.replace(base, parallel=dconfig.ParallelConfig(params="fsdp"),
                               compute=dconfig.ComputeConfig(remat="dots_saveable", rollout_remat=True))
    assert train.stage_record("student", fsdp) == rec
    bf16 = dataclasses.replace(base, compute=dconfig.ComputeConfig(dtype="bfloat16"))
    assert train.stage_record("student", bf16)["compute"] == {"dtype": "bfloat16"}
    assert "compute" not in train.stage_record("vae", bf16)
    with pytest.raises(ValueError, match="not divisible by compute.grad_accum_steps=3"):
        models = train.build_models(base)
        acc = dataclasses.replace(base, compute=dconfig.ComputeConfig(grad_accum_steps=3))
        train.student_loss_fn(models, acc, parallel.make_mesh())
