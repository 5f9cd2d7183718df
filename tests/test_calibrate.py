"""Tests of meg_jax.meg.calibrate and ``python -m train.calibrate`` on a random tiny backbone."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax import checkpoint
from meg_jax import config as config_lib
from meg_jax.data.classifier import ClassifierConfig, init_classifier
from meg_jax.meg import artifact as artifact_lib
from meg_jax.meg import calibrate, costs, pipeline
from meg_jax.meg.link import LinkConfig

# A small grid: 2 K x 2 r x 3 SNR x 4 classes, 2 prompts per class (tests, not results).
ARGS = [
    "--cost_presets", "tiny", "sdxl-1024",
    "--prompts_per_class", "2",
    "--steps", "1", "2",
    "--merge_ratios", "0.0", "0.5",
    "--snr_db", "-5.0", "10.0", "30.0",
]


def _random_backbone():
    bb = pipeline.init_random_backbone(jax.random.PRNGKey(0))
    cls_cfg = ClassifierConfig()
    return bb.replace(
        classifier=init_classifier(cls_cfg, jax.random.PRNGKey(1)),
        classifier_config=cls_cfg,
        sampling=dataclasses.replace(bb.sampling, teacher_steps=4),
    )


def _export(bb, folder):
    """Writes ``bb`` in the shipped checkpoint layout that ``load_backbone`` reads."""
    checkpoint.export_component(folder, "classifier", bb.classifier_config, {"classifier": bb.classifier})
    checkpoint.export_component(folder, "vae", bb.config.vae, {"vae": bb.vae})
    checkpoint.export_component(folder, "teacher", bb.config.unet, {"unet": bb.teacher, "text_encoder": bb.text_encoder})
    checkpoint.export_component(folder, "student", bb.config.unet, {"unet": bb.student})
    with open(os.path.join(folder, "backbone.json"), "w") as f:
        json.dump({"backbone": config_lib.to_dict(bb.config), "sampling": config_lib.to_dict(bb.sampling),
                   "distill_preset": "test"}, f)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """One run of the command line on an exported random backbone."""
    from train import calibrate as cli

    folder = str(tmp_path_factory.mktemp("ckpt"))
    out = str(tmp_path_factory.mktemp("calibration"))
    _export(_random_backbone(), folder)
    argv = ["--checkpoint", folder, "--out_dir", out, *ARGS]
    assert cli.main(argv) == 0
    return folder, out, argv


def test_command_writes_one_valid_artifact_per_preset(calibrated):
    folder, out, argv = calibrated
    assert sorted(os.listdir(out)) == ["sdxl-1024.npz", "tiny.npz"]
    art = artifact_lib.load(os.path.join(out, "tiny.npz"))
    assert art.shape == (2, 2, 3, 4)
    assert art.task_classes == ("circle", "square", "triangle", "cross")
    # Two prompts of every class in every cell.
    assert np.all(art.num_samples == 2)
    assert np.all((art.accuracy >= 0) & (art.accuracy <= 1)) and np.all(np.isfinite(art.psnr))
    prov = art.provenance
    assert prov["backbone_checkpoint_hash"] == calibrate.checkpoint_hash(folder)
    assert prov["backbone_preset"] == "test" and prov["cost_preset"] == "tiny"
    assert prov["command"].startswith("meg-jax calibrate") and "--prompts_per_class 2" in prov["command"]
    assert set(art.conventional_schemes) == {"centralised", "meg_uncompressed", "on_device"}
    assert art.link_mode == "analog" and art.bits_per_value is None
    assert art.tx_power_dbm == 30.0 and art.noise_figure_db == 7.0


def test_artifact_costs_match_the_cost_model(calibrated):
    _, out, _ = calibrated
    art = artifact_lib.load(os.path.join(out, "sdxl-1024.npz"))
    preset = costs.cost_preset("sdxl-1024")
    link = LinkConfig(mode="analog", bandwidth_hz=art.bandwidth_hz)
    for i, k in enumerate(art.steps):
        for j, r in enumerate(art.merge_ratios):
            c = costs.meg_costs(preset, link, int(k), float(r), 10.0)
            # The environment's pricing formula (artifact module docstring) gives the same latency.
            rate = art.bandwidth_hz * np.log2(1 + 10.0)
            t_tx = art.payload[j] / art.bandwidth_hz + art.side_info_bits[j] / rate
            latency = art.es_compute_time_s[i] + t_tx + art.ue_compute_time_s[j]
            np.testing.assert_allclose(latency, float(c.latency_s), rtol=1e-5)
            energy = art.ue_compute_energy_j[j] + art.ue_receive_power_w * t_tx
            np.testing.assert_allclose(energy, float(c.ue_energy_j), rtol=1e-5)
    # Same quality tables as the tiny artifact (one measurement, priced twice).
    tiny = artifact_lib.load(os.path.join(out, "tiny.npz"))
    np.testing.assert_array_equal(art.accuracy, tiny.accuracy)
    assert art.es_compute_time_s[0] > tiny.es_compute_time_s[0]


def test_round_trip_and_validation_names_the_mismatch(calibrated, tmp_path):
    _, out, _ = calibrated
    art = artifact_lib.load(os.path.join(out, "tiny.npz"))
    path = str(tmp_path / "copy.npz")
    art.save(path)
    back = artifact_lib.load(path)
    for f in dataclasses.fields(art):
        a, b = getattr(art, f.name), getattr(back, f.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
    assert back.provenance == art.provenance
    # A broken table is refused, naming the field.
    broken = dataclasses.replace(art, psnr=art.psnr[:, :1])
    with pytest.raises(ValueError, match="psnr has shape"):
        broken.save(str(tmp_path / "broken.npz"))
    with pytest.raises(ValueError, match="provenance lacks"):
        dataclasses.replace(art, provenance={"command": "x"}).validate()


def test_quality_is_deterministic_and_reuses_latents(calibrated, tmp_path):
    # Same config and checkpoint again (in memory): the same numbers, bit for bit.
    folder, out, _ = calibrated
    bb = checkpoint.load_backbone(folder)
    cfg = calibrate.CalibrationConfig(
        steps=(1, 2), merge_ratios=(0.0, 0.5), snr_db=(-5.0, 10.0, 30.0), prompts_per_class=2
    )
    grid = calibrate.measure(bb, cfg, progress=False)
    art = artifact_lib.load(os.path.join(out, "tiny.npz"))
    np.testing.assert_array_equal(grid.accuracy, art.accuracy)
    np.testing.assert_array_equal(grid.psnr, art.psnr)
    # The teacher's own latents over the analog link (MEG uncompressed) are compared with
    # their noiseless decode, so only the channel separates them: far better at 30 dB than
    # at -5 dB. (The student rows are not used here: a random student differs from the
    # random teacher by more than the channel does.)
    assert np.all(grid.uncompressed_psnr[-1] > grid.uncompressed_psnr[0] + 10.0)


def test_balanced_prompts():
    tokens, attrs = calibrate.balanced_prompts(jax.random.PRNGKey(0), 3)
    assert tokens.shape == (12, 16)
    np.testing.assert_array_equal(np.asarray(attrs.shape), np.repeat(np.arange(4), 3))


def test_config_validation_and_file_names():
    with pytest.raises(ValueError, match="cost_presets"):
        calibrate.CalibrationConfig(cost_presets=("sd3",)).validate()
    with pytest.raises(ValueError, match="merge_ratios"):
        calibrate.CalibrationConfig(merge_ratios=(0.0, 0.9)).validate()
    with pytest.raises(ValueError, match="bits"):
        calibrate.CalibrationConfig(bits=5).validate()
    cfg = calibrate.CalibrationConfig()
    assert len(cfg.snr_db) >= 10 and min(cfg.snr_db) == -5 and max(cfg.snr_db) == 30
    assert {0.0, 10.0, 20.0} <= set(cfg.snr_db)
    assert calibrate.artifact_filename(cfg, "tiny") == "tiny.npz"
    digital = dataclasses.replace(cfg, link_mode="digital", bits=6)
    assert calibrate.artifact_filename(digital, "sdxl-1024") == "sdxl-1024-digital6.npz"


SMALL = dict(steps=(1, 2), merge_ratios=(0.0, 0.5), snr_db=(-5.0, 10.0, 30.0))


@pytest.fixture(scope="module")
def traced_grid(calibrated):
    """Two measurements (two seeds), 2 batches each, with every compiled program of the
    K x r x SNR loop counted, and every device -> host transfer counted."""
    import chex

    folder, _, _ = calibrated
    bb = checkpoint.load_backbone(folder)
    # 4 prompts per class in batches of 8: two batches of the fixture's batch shape, so the
    # text encoder, teacher and student programs come from its compile cache.
    cfgs = [calibrate.CalibrationConfig(**SMALL, prompts_per_class=4, batch_size=8, seed=s) for s in (0, 1)]
    transfers = []
    real_device_get = jax.device_get

    def counting_device_get(x):
        transfers.append(1)
        return real_device_get(x)

    with pytest.MonkeyPatch.context() as mp:
        # One link program per merge ratio (the uncompressed scheme shares r = 0's), one
        # decode-and-score program: per batch shape, whatever K, SNR, batch or seed.
        mp.setattr(calibrate, "_transmit_cells", jax.jit(
            chex.assert_max_traces(calibrate._transmit_over_snr, n=len(SMALL["merge_ratios"])),
            static_argnames=("merge_ratio", "link")))
        mp.setattr(calibrate, "_score_cells", jax.jit(chex.assert_max_traces(calibrate._score_received, n=1)))
        mp.setattr(jax, "device_get", counting_device_get)
        grids = []
        for cfg in cfgs:
            transfers.clear()
            with jax.transfer_guard_device_to_host("disallow"):  # no implicit transfer anywhere
                grids.append(calibrate.measure(bb, cfg, progress=False))
            # One explicit transfer per batch (the reference images' PNG size) and one for
            # all scores at the end, not one per (K, r, SNR) cell.
            assert len(transfers) == 2 + 1, len(transfers)
    return bb, cfgs[0], grids[0]


def test_calibration_compiles_once_per_merge_ratio_and_transfers_once(traced_grid):
    _, cfg, grid = traced_grid  # the assertions live in the fixture; here the grid's shape
    assert grid.psnr.shape == (2, 2, 3, 4) and np.all(grid.num_samples == 4)


def test_each_snr_cell_is_the_pipeline_at_that_snr(traced_grid):
    # Cells recomputed one SNR at a time with the pipeline's own functions and the shared
    # metric (no vmap over SNR), over both batches of 8 prompts (4 per class),
    # each with its channel key fold_in(k_channel, batch), then averaged per class.
    from meg_jax.meg import schemes

    bb, cfg, grid = traced_grid
    link = cfg.link()
    k_prompts, k_noise, k_channel = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    tokens, attrs = calibrate.balanced_prompts(k_prompts, cfg.prompts_per_class)
    noise = jax.random.normal(k_noise, (16, 8, 8, 4))
    cls = np.asarray(attrs.shape)
    ki, ri = 1, 1  # K = 2, r = 0.5

    @jax.jit
    def one_snr(latents, at, reference, snr, key):  # the cell's path at one SNR, unbatched
        received = pipeline.transmit_latents(latents, cfg.merge_ratios[ri], link, jnp.full((8,), snr), key)
        images = pipeline.decode_latents(bb, received)
        q = schemes.score_images(bb, images, at, reference)
        return q.accuracy, q.psnr, schemes.pixel_accuracy(bb, images, at)

    # The ES part (text, teacher reference, student latents) is unchanged code shared with
    # the fixture's compile cache; what is under test is the link -> decode -> score per SNR.
    batches = []
    for b in range(2):
        sl = slice(8 * b, 8 * b + 8)
        context = calibrate._context(bb, tokens[sl])
        reference = calibrate._decode(bb, calibrate._teacher(bb, context, noise[sl]))
        latents = calibrate._student(bb, context, noise[sl], cfg.steps[ki])
        batches.append((latents, jax.tree.map(lambda a: a[sl], attrs), reference, jax.random.fold_in(k_channel, b)))
    for si in (0, 2):  # -5 dB and 30 dB
        acc, psnr, pix = [], [], []
        for latents, at, reference, key in batches:
            a, p, x = one_snr(latents, at, reference, jnp.float32(cfg.snr_db[si]), key)
            acc.append(np.asarray(a))
            psnr.append(np.asarray(p))
            pix.append(np.asarray(x))
        acc, psnr, pix = np.concatenate(acc), np.concatenate(psnr), np.concatenate(pix)
        by_class = lambda v: np.array([v[cls == c].mean() for c in range(4)])  # noqa: E731
        # Unbatched vs vmapped programs differ by float32 rounding of the decoder (~1e-6),
        # which can flip an 8-bit display level: ~1e-3 dB per flip at these PSNRs.
        np.testing.assert_allclose(grid.psnr[ki, ri, si], by_class(psnr), atol=0.02)
        np.testing.assert_allclose(grid.accuracy[ki, ri, si], by_class(acc), atol=1e-6)
        # Per-prompt tables (the env's replay): prompt p of class c is sample c * P + p (the
        # class blocks of balanced_prompts). One prompt's PSNR moves ~1e-3 dB per flipped 8-bit
        # level and a few levels may flip (at most a few hundredths of a dB); an attribute
        # read is discrete (a flip would also show in the class means above, held at 1e-6).
        assert np.all(cls.reshape(4, 4) == np.arange(4)[:, None])
        np.testing.assert_allclose(grid.prompt_psnr[ki, ri, si], psnr.reshape(4, 4), atol=0.05)
        np.testing.assert_allclose(grid.prompt_accuracy[ki, ri, si], acc.reshape(4, 4), atol=1e-6)
        np.testing.assert_allclose(grid.prompt_pixel_accuracy[ki, ri, si], pix.reshape(4, 4), atol=1e-6)
        np.testing.assert_allclose(grid.pixel_accuracy[ki, ri, si], by_class(pix), atol=1e-6)
    # The analog link really is evaluated per SNR. A random student is far from the random
    # teacher (~15 dB), so the channel moves its cells by ~1 dB from -5 to 30 dB (> 0.3 dB
    # in every class); the teacher's own latents (MEG uncompressed) gain > 10 dB.
    assert np.all(grid.psnr[ki, ri, 2] > grid.psnr[ki, ri, 0] + 0.3)
    assert np.all(grid.uncompressed_psnr[2] > grid.uncompressed_psnr[0] + 10.0)


def test_every_snr_is_sent_for_a_digital_link_too(calibrated, monkeypatch):
    folder, _, _ = calibrated
    bb = checkpoint.load_backbone(folder)
    cfg = calibrate.CalibrationConfig(
        link_mode="digital", bits=4, steps=(1,), merge_ratios=(0.0, 0.5), snr_db=(-5.0, 30.0), prompts_per_class=2
    )
    grid = calibrate.measure(bb, cfg, progress=False)
    # Error-free at the Shannon rate: the SNR only sets the air time, never the image. Both
    # SNRs were decoded (in one batch of S·B images); equal images decode alike up to the
    # batch position's float32 rounding, hence a tolerance rather than equality.
    np.testing.assert_allclose(grid.psnr[:, :, 0], grid.psnr[:, :, 1], atol=1e-3)
    np.testing.assert_allclose(grid.accuracy[:, :, 0], grid.accuracy[:, :, 1], atol=1e-6)
    np.testing.assert_allclose(grid.uncompressed_psnr[0], grid.uncompressed_psnr[1], atol=1e-3)
    # ...and each SNR's cell is filled from that SNR's own evaluation, not copied from the
    # first: mark the scores of SNR slot s with +s dB and every cell carries its mark.
    real = calibrate._score_received

    def marked(backbone, received, attrs, reference):
        acc, psnr, pix = real(backbone, received, attrs, reference)
        return acc, psnr + jnp.arange(received.shape[0], dtype=psnr.dtype)[:, None], pix
    monkeypatch.setattr(calibrate, "_score_cells", jax.jit(marked))
    perturbed = calibrate.measure(bb, cfg, progress=False)
    # Another compiled program for the decoder: float32 rounding, ~1e-3 dB at most.
    marks = np.arange(len(cfg.snr_db), dtype=float)  # [S]
    np.testing.assert_allclose(perturbed.psnr - grid.psnr,
                               np.broadcast_to(marks[None, None, :, None], grid.psnr.shape), atol=1e-3)
    np.testing.assert_allclose(perturbed.uncompressed_psnr - grid.uncompressed_psnr,
                               np.broadcast_to(marks[:, None], grid.uncompressed_psnr.shape), atol=1e-3)
    prov = {"backbone_checkpoint_hash": "x", "backbone_preset": "test", "command": "test"}
    art = calibrate.build_artifact(grid, cfg, "tiny", prov)
    # r = 0: 64 tokens x 4 channels x 4 bits = 1024 bits; side = 64 range bits, no map.
    assert art.bits_per_value == 4 and art.payload[0] == 1024 and art.side_info_bits[0] == 64
    assert art.conventional_schemes["meg_uncompressed"].link_mode == "digital"
