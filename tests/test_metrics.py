"""Tests of the image metrics (meg_jax.metrics) on hand-computed cases and references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage

from meg_jax import metrics

_psnr = jax.jit(metrics.psnr)
_ssim = jax.jit(metrics.ssim)


def test_psnr_of_a_known_mse():
    a = jnp.zeros((2, 8, 8, 3))
    b = jnp.stack([jnp.full((8, 8, 3), 0.1), jnp.full((8, 8, 3), 0.5)])
    # MSE 0.01 -> 10 log10(2^2 / 0.01) = 10 log10(400) = 26.0206 dB;
    # MSE 0.25 -> 10 log10(4 / 0.25) = 10 log10(16) = 12.0412 dB.
    np.testing.assert_allclose(np.asarray(_psnr(a, b)), [26.0206, 12.0412], atol=1e-3)
    # Range [0, 1]: MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB.
    np.testing.assert_allclose(np.asarray(metrics.psnr(a[:1], b[:1], data_range=1.0)), [20.0], atol=1e-4)
    assert np.isinf(np.asarray(_psnr(a, a))).all()


def _ssim_reference(a: np.ndarray, b: np.ndarray, data_range: float) -> np.ndarray:
    """Per-image SSIM as scikit-image computes it (gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False): scipy's Gaussian filter (truncate 3.5 -> 11 taps), then
    the 5-pixel border cropped, mean over pixels and channels. float64."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        values = []
        for ch in range(x.shape[-1]):
            f = lambda z: scipy.ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5)  # noqa: E731
            xc, yc = x[..., ch], y[..., ch]
            mx, my = f(xc), f(yc)
            vx, vy, cxy = f(xc * xc) - mx**2, f(yc * yc) - my**2, f(xc * yc) - mx * my
            s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            values.append(s[5:-5, 5:-5].mean())
        out.append(np.mean(values))
    return np.array(out)


def test_ssim_matches_the_numpy_reference():
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.uniform(key_a, (3, 32, 24, 3), minval=-1, maxval=1)
    # Reference = a plus noise of three strengths, so SSIM spans high to low.
    noise = jax.random.normal(key_b, a.shape) * jnp.array([0.05, 0.3, 1.0])[:, None, None, None]
    b = jnp.clip(a + noise, -1, 1)
    got = np.asarray(_ssim(a, b))
    want = _ssim_reference(np.asarray(a), np.asarray(b), 2.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert want[0] > want[1] > want[2]


def test_ssim_hand_checked_cases():
    a = jnp.full((1, 16, 16, 3), 0.5)
    np.testing.assert_allclose(np.asarray(_ssim(a, a)), [1.0], atol=1e-6)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    np.testing.assert_allclose(np.asarray(_ssim(x, x)), [1.0, 1.0], atol=1e-5)
    # Constant 0.5 vs constant -0.5, L = 2: variances and covariance are 0, so SSIM is the
    # luminance term (2 * 0.5 * -0.5 + C1) / (0.25 + 0.25 + C1) with C1 = (0.01 * 2)^2 = 4e-4:
    # (-0.5 + 4e-4) / 0.5004 = -0.998401.
    np.testing.assert_allclose(np.asarray(_ssim(a, -a)), [-0.998401], atol=1e-5)


def test_ssim_window_is_the_papers():
    w = metrics.gaussian_window()
    assert w.shape == (11,) and abs(w.sum() - 1) < 1e-6
    # Ratio of the centre tap to the tap 1 px away: exp(1 / (2 * 1.5^2)) = exp(0.2222) = 1.2488.
    np.testing.assert_allclose(w[5] / w[6], 1.2488, atol=1e-4)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(jnp.zeros((1, 8, 8, 3)), jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        metrics.psnr(jnp.zeros((8, 8, 3)), jnp.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_frechet_distance_of_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    # float64 on the host: 2 tr(C) - 2 tr(sqrt(C^1/2 C C^1/2)) with tr(C) ~ 300; symmetric
    # eigensolvers are backward stable to ~F eps |C| (16 x 2.2e-16 x ~100 = 4e-13), so the
    # cancellation leaves ~1e-12 on any LAPACK: 1e-8 has four decades to spare.
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_forms():
    eye = np.eye(3)
    # N(0, I) vs N(mu, I): |mu|^2 = 1 + 4 + 4 = 9 (the trace term is 3 + 3 - 2 * 3 = 0).
    mu = np.array([1.0, 2.0, 2.0])
    assert metrics.frechet_distance_from_stats(np.zeros(3), eye, mu, eye) == pytest.approx(9.0, abs=1e-10)
    # Diagonal covariances diag(1, 4) and diag(4, 9): sum (sqrt(a_i) - sqrt(b_i))^2
    # = (1 - 2)^2 + (2 - 3)^2 = 2.
    assert metrics.frechet_distance_from_stats(
        np.zeros(2), np.diag([1.0, 4.0]), np.zeros(2), np.diag([4.0, 9.0])
    ) == pytest.approx(2.0, abs=1e-10)
    # Non-commuting covariances: the textbook formula with scipy's sqrtm of cov_a @ cov_b.
    rng = np.random.default_rng(2)
    m, n = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    cov_a, cov_b = m @ m.T + 0.1 * np.eye(5), n @ n.T + 0.1 * np.eye(5)
    mu_a, mu_b = rng.normal(size=5), rng.normal(size=5)
    want = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    # two float64 algorithms (eigh of the symmetric form vs scipy's Schur sqrtm): both accurate
    # to ~cond x eps (cond <= ~1e3 with the 0.1 ridge: ~1e-13), so rel 1e-8 is safe anywhere
    assert metrics.frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(want, rel=1e-8)


def test_frechet_distance_from_gaussian_samples():
    rng = np.random.default_rng(3)
    mu = np.array([1.0, 2.0, 2.0])
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) + mu
    # Exact value |mu|^2 = 9; the sample estimate is off by O(F / N) ~ 1e-3 plus noise of
    # the mean difference, sd ~ 2 |mu| sqrt(2 / N) ~ 0.06.
    assert metrics.frechet_distance(a, b) == pytest.approx(9.0, abs=0.2)


def test_attribute_accuracy():
    logits = {
        "size": jnp.array([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]]),  # predicts 0, 1, 0, 1
        "shape": jnp.array([[0.0, 1.0, 0.0, 0.0]] * 4),  # predicts 1 always
    }
    truth = {"size": jnp.array([0, 1, 1, 1]), "shape": jnp.array([1, 1, 1, 2])}
    acc = jax.jit(metrics.attribute_accuracy)(logits, truth)
    # size right on 3 of 4; shape on 3 of 4; both right on samples 0 and 1 only -> 2 / 4.
    assert {k: float(v) for k, v in acc.items()} == {"size": 0.75, "shape": 0.75, "all": 0.5}
    with pytest.raises(ValueError, match="do not match"):
        metrics.attribute_accuracy(logits, {"size": jnp.zeros(3, int), "shape": jnp.zeros(4, int)})
