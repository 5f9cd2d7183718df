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
