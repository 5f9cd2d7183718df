"""Tests for meg_jax.meg.artifact: round trip, validation messages, import isolation."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from meg_jax.meg import artifact as art_mod
from meg_jax.meg.artifact import SCHEMA_VERSION, CalibrationArtifact, synthetic_artifact


@pytest.mark.parametrize("link_mode", ["analog", "digital"])
def test_round_trip(tmp_path, link_mode):
    a = synthetic_artifact(link_mode=link_mode)
    path = tmp_path / "cal.npz"
    a.save(path)
    b = CalibrationArtifact.load(path)
    for f in dataclasses.fields(CalibrationArtifact):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=f.name)
            assert x.dtype.kind == y.dtype.kind, f.name
        elif f.name == "conventional_schemes":
            assert x.keys() == y.keys()
            for name in x:
                for g in dataclasses.fields(x[name]):
                    np.testing.assert_array_equal(getattr(x[name], g.name), getattr(y[name], g.name))
        else:
            assert x == y, f.name
    assert b.shape == (4, 8, 11, 4)


def test_synthetic_is_plausible():
    a = synthetic_artifact()
    # Quality rises with K, falls with r, rises with SNR (analog).
    assert np.all(np.diff(a.accuracy, axis=0) > 0)
    assert np.all(np.diff(a.accuracy, axis=1) < 0)
    assert np.all(np.diff(a.accuracy, axis=2) > 0)
    assert np.all(np.diff(a.payload) < 0)
    assert np.all(np.diff(a.es_compute_time_s) > 0)


def test_validation_names_every_problem():
    a = synthetic_artifact()
    bad = dataclasses.replace(
        a,
        accuracy=a.accuracy[:, :-1],  # wrong shape
        snr_db=a.snr_db[::-1],  # not increasing
        link_mode="smoke",
        provenance={"cost_preset": "tiny"},
    )
    with pytest.raises(ValueError) as err:
        bad.validate()
    msg = str(err.value)
    assert "accuracy has shape (4, 7, 11, 4)" in msg
    assert "snr_db must be strictly increasing" in msg
    assert "link_mode must be one of" in msg
    assert "provenance lacks ['backbone_checkpoint_hash', 'backbone_preset', 'created', 'command']" in msg


def test_non_finite_and_range_rejected():
    a = synthetic_artifact()
    acc = a.accuracy.copy()
    acc[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="accuracy has 1 non-finite"):
        dataclasses.replace(a, accuracy=acc).validate()
    with pytest.raises(ValueError, match="payload must be finite and >= 0"):
        dataclasses.replace(a, payload=-a.payload).validate()
    with pytest.raises(ValueError, match=r"merge_ratios must lie in \[0, 1\)"):
        dataclasses.replace(a, merge_ratios=a.merge_ratios + 0.5).validate()
    with pytest.raises(ValueError, match="bits_per_value must be a positive int"):
        dataclasses.replace(a, link_mode="digital").validate()


def test_load_rejects_other_schema_version_and_missing_keys(tmp_path):
    a = synthetic_artifact()
    path = tmp_path / "cal.npz"
    a.save(path)
    with np.load(path) as data:
        contents = {k: data[k] for k in data.files}
    meta = json.loads(str(contents["metadata.json"]))
    meta["schema_version"] = SCHEMA_VERSION + 1
    np.savez(tmp_path / "v2.npz", **{**contents, "metadata.json": np.array(json.dumps(meta))})
    with pytest.raises(ValueError, match=f"schema_version {SCHEMA_VERSION + 1}"):
        CalibrationArtifact.load(tmp_path / "v2.npz")
    del contents["psnr"]
    np.savez(tmp_path / "nopsnr.npz", **contents)
    with pytest.raises(ValueError, match="lacks array 'psnr'"):
        CalibrationArtifact.load(tmp_path / "nopsnr.npz")
    with pytest.raises(FileNotFoundError):
        CalibrationArtifact.load(tmp_path / "absent.npz")


def test_per_prompt_tables_round_trip_and_define_the_class_tables(tmp_path):
    a = synthetic_artifact(prompts_per_class=6)
    assert a.prompts_per_class == 6 and a.prompt_accuracy.shape == (4, 8, 11, 4, 6)
    a.save(tmp_path / "cal.npz")
    b = CalibrationArtifact.load(tmp_path / "cal.npz")
    for name in ("prompt_accuracy", "prompt_psnr", "prompt_pixel_accuracy", "pixel_accuracy"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    # prompts really differ (the replay has variance) and average to the class tables
    assert np.all(np.ptp(b.prompt_psnr, axis=-1) > 1.0)
    np.testing.assert_allclose(b.prompt_psnr.astype(np.float64).mean(-1), b.psnr, atol=1e-4)
    # the authors' reward: -ln MSE on [-1, 1] pixels; 20 dB = MSE 4e-2 -> -ln(0.04) = 3.2189
    np.testing.assert_allclose(art_mod.psnr_to_neg_log_mse(np.array([20.0])), [-np.log(0.04)], rtol=1e-12)
    np.testing.assert_allclose(b.prompt_quality("neg_log_mse"), art_mod.psnr_to_neg_log_mse(b.prompt_psnr))
    with pytest.raises(ValueError, match="unknown per-prompt quality metric 'ssim'"):
        b.prompt_quality("ssim")


def test_per_prompt_validation_names_the_problem():
    a = synthetic_artifact(prompts_per_class=4)
    shifted = a.prompt_psnr.copy()
    shifted[0, 0, 0, 0, 0] += 1.0  # no longer averages to psnr
    with pytest.raises(ValueError, match="prompt_psnr averaged over prompts differs from psnr by up to 0.25"):
        dataclasses.replace(a, prompt_psnr=shifted).validate()
    with pytest.raises(ValueError, match="per-prompt tables come as a set"):
        dataclasses.replace(a, prompt_psnr=None).validate()
    with pytest.raises(ValueError, match="num_samples must equal P"):
        dataclasses.replace(a, num_samples=a.num_samples * 2).validate()
    with pytest.raises(ValueError, match=r"prompt_accuracy has shape \(4, 8, 11, 4\)"):
        dataclasses.replace(a, prompt_accuracy=a.accuracy).validate()


def test_schema_1_file_loads_without_replay_and_says_how_to_regenerate(tmp_path):
    a = synthetic_artifact()
    a.save(tmp_path / "cal.npz")
    with np.load(tmp_path / "cal.npz") as data:
        contents = {k: data[k] for k in data.files}
    meta = json.loads(str(contents["metadata.json"]))
    meta["schema_version"] = 1  # what every file before the per-prompt tables says
    np.savez(tmp_path / "v1.npz", **{**contents, "metadata.json": np.array(json.dumps(meta))})
    b = CalibrationArtifact.load(tmp_path / "v1.npz")
    np.testing.assert_array_equal(a.accuracy, b.accuracy)
    assert b.prompts_per_class is None and b.provenance["loaded_schema_version"] == 1
    with pytest.raises(ValueError, match=r"schema 1.*regenerate it with `meg-jax calibrate`"):
        b.prompt_quality("accuracy")


def test_module_imports_no_flax_or_jax():
    code = (
        "import sys, meg_jax.meg.artifact as a; a.synthetic_artifact();"
        "bad = [m for m in ('flax', 'jax', 'meg_jax.backbone') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert art_mod.__name__ == "meg_jax.meg.artifact"


# --------------------------------------------------------------------------- damaged files
def _truncated_copy(src, dst, keep: int):
    data = src.read_bytes()
    dst.write_bytes(data[:keep])
    return dst


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.999])
def test_truncated_artifact_names_the_file(tmp_path, fraction):
    good = tmp_path / "good.npz"
    synthetic_artifact().save(good)
    size = good.stat().st_size
    bad = _truncated_copy(good, tmp_path / "cut.npz", int(size * fraction))
    with pytest.raises(ValueError, match=r"cut\.npz: not a readable calibration artifact .*truncated or corrupt"):
        art_mod.load(bad)
    art_mod.load(good)  # the original still loads: only the copy was damaged


def test_corrupt_artifact_entry_is_named(tmp_path):
    # np.savez stores entries uncompressed with a CRC-32 each: a flipped byte inside an array
    # leaves the zip directory readable and fails the CRC check of that one entry
    good = tmp_path / "good.npz"
    synthetic_artifact().save(good)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flipped\.npz: .*while reading entry '.*'.*CRC"):
        art_mod.load(bad)


def test_garbled_metadata_is_named(tmp_path):
    path = tmp_path / "meta.npz"
    np.savez(path, **{"metadata.json": np.array('{"schema_version": 1, "task_cl')})
    with pytest.raises(ValueError, match=r"meta\.npz: its 'metadata.json' entry is not valid JSON"):
        art_mod.load(path)


def test_optional_clip_score_table(tmp_path):
    """``clip_score`` [K, R, S, C] round-trips, is validated, and artifacts without it still load."""
    a = synthetic_artifact()
    assert a.clip_score is None
    a.save(tmp_path / "plain.npz")
    assert CalibrationArtifact.load(tmp_path / "plain.npz").clip_score is None
    table = np.linspace(0.0, 100.0, int(np.prod(a.shape))).reshape(a.shape)
    b = dataclasses.replace(a, clip_score=table)
    b.save(tmp_path / "clip.npz")
    np.testing.assert_array_equal(CalibrationArtifact.load(tmp_path / "clip.npz").clip_score, table)
    with pytest.raises(ValueError, match=r"clip_score must lie in \[0, 100\]"):
        dataclasses.replace(a, clip_score=table + 1.0).validate()
    with pytest.raises(ValueError, match=r"clip_score has shape \(4, 8, 11\), the grids say \(4, 8, 11, 4\)"):
        dataclasses.replace(a, clip_score=table[..., 0]).validate()
    nan = table.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"clip_score must lie in \[0, 100\] \(and be finite\)"):
        dataclasses.replace(a, clip_score=nan).validate()
