"""Tests of meg_jax.meg.calibrate and ``python -m train.calibrate`` on a random tiny backbone."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
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


def test_digital_calibration_is_flat_in_snr(calibrated):
    folder, _, _ = calibrated
    bb = checkpoint.load_backbone(folder)
    cfg = calibrate.CalibrationConfig(
        link_mode="digital", bits=4, steps=(1,), merge_ratios=(0.0, 0.5), snr_db=(-5.0, 30.0), prompts_per_class=2
    )
    grid = calibrate.measure(bb, cfg, progress=False)
    # Error-free at the Shannon rate: the SNR only sets the air time, never the image.
    np.testing.assert_array_equal(grid.psnr[:, :, 0], grid.psnr[:, :, 1])
    np.testing.assert_array_equal(grid.uncompressed_psnr[0], grid.uncompressed_psnr[1])
    prov = {"backbone_checkpoint_hash": "x", "backbone_preset": "test", "command": "test"}
    art = calibrate.build_artifact(grid, cfg, "tiny", prov)
    # r = 0: 64 tokens x 4 channels x 4 bits = 1024 bits; side = 64 range bits, no map.
    assert art.bits_per_value == 4 and art.payload[0] == 1024 and art.side_info_bits[0] == 64
    assert art.conventional_schemes["meg_uncompressed"].link_mode == "digital"
