"""``eval.evaluate_backbone``: the per-size shape accuracy and the quality table, on hand cases."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from eval import evaluate_backbone as eb
from meg_jax.data.shapes import Attributes


def _attrs(shape, size):
    n = len(shape)
    z = jnp.zeros(n, jnp.int32)
    return Attributes(size=jnp.asarray(size, jnp.int32), color=z, shape=jnp.asarray(shape, jnp.int32),
                      position=z, background=z + 1, offset=jnp.zeros((n, 2), jnp.float32))


def test_shape_accuracy_splits_small_and_large():
    attrs = _attrs(shape=[0, 1, 2, 3, 0, 1], size=[0, 0, 0, 1, 1, 1])
    predicted = np.array([0, 0, 2, 0, 1, 1])  # small: 0 and 2 right (2 of 3); large: only the last (1 of 3)
    logits = {"shape": jnp.asarray(np.eye(4)[predicted])}
    small, large = eb.shape_accuracy_by_size(logits, attrs)
    assert small == pytest.approx(2 / 3) and large == pytest.approx(1 / 3)


def test_quality_table_has_the_size_split_and_the_vae_ceiling():
    row = {"row": "teacher DDIM-50", "acc_all": 0.5, "acc_attr": 0.9, "acc_size": 1.0, "acc_color": 0.99,
           "acc_shape": 0.75, "acc_shape_small": 0.5, "acc_shape_large": 1.0, "acc_position": 0.98,
           "acc_background": 0.97, "psnr": float("inf"), "ssim": 1.0, "fd": 12.345, "images_per_s": 15.2}
    table = eb.quality_table([row, {**row, "row": "student K=4", "psnr": 30.123}], 512, 33.2, (0.88, 1.0))
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| row"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[5:8] == ["shape", "shape small", "shape large"]
    first = [c.strip() for c in lines[lines.index(header) + 2].strip("|").split("|")]
    assert len(first) == len(cells)
    assert first[:8] == ["teacher DDIM-50", "0.500", "0.900", "1.000", "0.990", "0.750", "0.500", "1.000"]
    assert first[10] == "ref" and "| 30.12 |" in table
    assert "PSNR 33.20 dB, shape accuracy 0.880 (small) / 1.000 (large)" in table


def test_pixel_scores_split_small_and_large():
    attrs = _attrs(shape=[0, 1, 2, 3], size=[0, 0, 1, 1])
    truth = {n: np.asarray(getattr(attrs, n)) for n in ("size", "color", "shape", "position", "background")}
    reading = {n: v.copy() for n, v in truth.items()}
    reading["shape"][1] = 0  # small square read as a circle
    reading["color"][3] = -1  # large cross unreadable colour
    scores = eb.pixel_scores(reading, attrs)
    # shape: 3 of 4 right, small 1 of 2, large 2 of 2; all five: samples 0 and 2 -> 1/2,
    # small 1/2 (sample 0), large 1/2 (sample 2).
    assert scores["pix_shape"] == pytest.approx(0.75) and scores["pix_color"] == pytest.approx(0.75)
    assert scores["pix_shape_small"] == pytest.approx(0.5) and scores["pix_shape_large"] == 1.0
    assert scores["pix_all"] == pytest.approx(0.5)
    assert scores["pix_all_small"] == pytest.approx(0.5) and scores["pix_all_large"] == pytest.approx(0.5)


def test_quality_table_puts_the_pixel_reading_beside_the_classifier():
    row = {"row": "student K=1", "acc_all": 0.77, "acc_attr": 0.9, "acc_size": 1.0, "acc_color": 0.99,
           "acc_shape": 0.75, "acc_shape_small": 0.5, "acc_shape_large": 1.0, "acc_position": 0.98,
           "acc_background": 0.97, "psnr": 25.0, "ssim": 0.9, "fd": 1.0, "images_per_s": 400.0}
    pixel = {"pix_all": 0.64, "pix_all_small": 0.4, "pix_all_large": 0.88, "pix_size": 0.99, "pix_color": 0.95,
             "pix_shape": 0.66, "pix_shape_small": 0.37, "pix_shape_large": 0.9, "pix_position": 0.996,
             "pix_background": 1.0}
    assert "Pixel reading" not in eb.quality_table([row], 512)  # rows without pix_* keys: one table
    table = eb.quality_table([{**row, **pixel}], 512, 33.2, (0.88, 1.0), (0.99, 1.0))
    lines = table.splitlines()
    header = [line for line in lines if line.startswith("| row")][1]
    cells = [c.strip() for c in header.strip("|").split("|")]
    first = [c.strip() for c in lines[lines.index(header) + 2].strip("|").split("|")]
    assert cells[:3] == ["row", "pixel all", "classifier all"] and len(first) == len(cells)
    assert dict(zip(cells, first)) == {
        "row": "student K=1", "pixel all": "0.640", "classifier all": "0.770", "all small": "0.400",
        "all large": "0.880", "size": "0.990", "color": "0.950", "shape": "0.660", "shape small": "0.370",
        "shape large": "0.900", "position": "0.996", "background": "1.000"}
    assert "Pixel reading of the VAE reconstructions: shape accuracy 0.990 (small) / 1.000 (large)." in table


def test_disagreement_grid_draws_only_the_images_the_readings_disagree_on(tmp_path, monkeypatch):
    truth = {"size": np.array([0, 1, 0]), "color": np.array([0, 1, 2]), "shape": np.array([1, 2, 3]),
             "position": np.array([0, 4, 8]), "background": np.array([3, 3, 3])}
    pixel = {**truth, "shape": np.array([0, 2, -1])}  # disagree on samples 0 and 2
    images = np.linspace(-1, 1, 3 * 32 * 32 * 3, dtype=np.float32).reshape(3, 32, 32, 3)
    samples = {"truth": truth, "images": {"student K=1": images},
               "readings": {"pixel": {"student K=1": pixel}, "classifier": {"student K=1": truth}}}
    drawn = []
    import matplotlib.axes

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda self, x, **kw: drawn.append(x))
    eb.draw_disagreements(samples, str(tmp_path / "d.png"), rows=("student K=1",), per_row=3)
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    # Sample 0 (top left third) cropped at the corner; sample 2 (bottom right) at the far corner.
    assert len(drawn) == 2 and drawn[0].shape == (16, 16, 3)
    np.testing.assert_allclose(drawn[0], (images[0, :16, :16] + 1) / 2)
    np.testing.assert_allclose(drawn[1], (images[2, 16:, 16:] + 1) / 2)
