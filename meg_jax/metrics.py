"""Image-quality metrics of the backbone's quality table and of the calibration.

* :func:`psnr` and :func:`ssim` compare a generated image with a reference (e.g. the
  teacher's 50-step sample), per image, in JAX (jittable).
* :func:`frechet_distance` compares two *sets* of images through features (the attribute
  classifier's penultimate layer), host side in float64.
* :func:`attribute_accuracy` scores prompt adherence from the classifier's logits.

Images are ``[B, H, W, C]`` in the project's [-1, 1] range unless ``data_range`` says
otherwise.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "psnr",
    "ssim",
    "gaussian_window",
    "frechet_distance",
    "frechet_distance_from_stats",
    "attribute_accuracy",
]


def _check_pair(a: jax.Array, b: jax.Array, name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: images must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim != 4:
        raise ValueError(f"{name}: expected images [B, H, W, C], got shape {a.shape}")


def psnr(a: jax.Array, b: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio per image, in dB.

    ``10 log10(data_range^2 / MSE)`` with the MSE over all pixels and channels of an image;
    identical images give +inf.

    Args:
      a: [B, H, W, C] images.
      b: [B, H, W, C] reference images.
      data_range: max - min of the pixel range (2.0 for [-1, 1]).

    Returns:
      [B] float32 PSNR in dB.
    """
    _check_pair(a, b, "psnr")
    diff = a.astype(jnp.float32) - b.astype(jnp.float32)
    mse = jnp.mean(diff**2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian of ``size`` taps (the separable factor of the SSIM window)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    w = np.exp(-(x**2) / (2.0 * sigma**2))
    return (w / w.sum()).astype(np.float32)


def ssim(
    a: jax.Array,
    b: jax.Array,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Structural similarity per image (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004).

    Local statistics use the paper's 11 x 11 circular Gaussian window with sigma = 1.5
    (normalised; population, not sample, variances), constants ``C1 = (k1 L)^2`` and
    ``C2 = (k2 L)^2`` with ``L = data_range``. The SSIM map is computed at every window
    position fully inside the image ("valid"), averaged over positions and channels. This
    equals ``skimage.metrics.structural_similarity(a, b, data_range=L, channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``, which crops the same
    border.

    Args:
      a: [B, H, W, C] images, H and W >= window_size.
      b: [B, H, W, C] reference images.
      data_range: max - min of the pixel range (2.0 for [-1, 1]).
      window_size: side of the Gaussian window, pixels.
      sigma: standard deviation of the window, pixels.
      k1, k2: stabilising constants of the paper.

    Returns:
      [B] float32 SSIM in [-1, 1] (1 for identical images).
    """
    _check_pair(a, b, "ssim")
    _, h, w, c = a.shape
    if h < window_size or w < window_size:
        raise ValueError(f"ssim: images of {h}x{w} are smaller than the {window_size}x{window_size} window")
    window = jnp.asarray(gaussian_window(window_size, sigma))

    def blur(x: jax.Array) -> jax.Array:
        # Separable Gaussian, valid positions only, each channel on its own: [B, H, W, C]
        # -> [B, H - ws + 1, W - ws + 1, C].
        n = x.shape[0]
        x = jnp.moveaxis(x, -1, 1).reshape(n * c, h, w, 1)
        x = jax.lax.conv_general_dilated(
            x, window.reshape(window_size, 1, 1, 1), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.lax.conv_general_dilated(
            x, window.reshape(1, window_size, 1, 1), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.moveaxis(x.reshape(n, c, h - window_size + 1, w - window_size + 1), 1, -1)

    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return jnp.mean(ssim_map, axis=(1, 2, 3))


def frechet_distance_from_stats(
    mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """Fréchet distance between Gaussians N(mu_a, cov_a) and N(mu_b, cov_b).

    ``|mu_a - mu_b|^2 + tr(cov_a + cov_b - 2 (cov_a^{1/2} cov_b cov_a^{1/2})^{1/2})``
    (Dowson and Landau 1982; the FID of Heusel et al. 2017). The trace of the matrix square
    root uses the symmetric form, whose eigenvalues are real and >= 0, so no complex parts
    appear; float64 on the host.

    Args:
      mu_a, mu_b: [F] means.
      cov_a, cov_b: [F, F] covariances (symmetric positive semi-definite).

    Returns:
      The squared Fréchet (2-Wasserstein) distance, >= 0.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    f = mu_a.shape[0]
    if mu_b.shape != (f,) or cov_a.shape != (f, f) or cov_b.shape != (f, f):
        raise ValueError(
            f"frechet_distance: means [F] and covariances [F, F] must agree, got {mu_a.shape}, "
            f"{cov_a.shape}, {mu_b.shape}, {cov_b.shape}"
        )
    cov_a = (cov_a + cov_a.T) / 2
    cov_b = (cov_b + cov_b.T) / 2
    eigval, eigvec = np.linalg.eigh(cov_a)
    sqrt_a = (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def frechet_distance(feats_a: np.ndarray | jax.Array, feats_b: np.ndarray | jax.Array) -> float:
    """Fréchet distance between two sets of feature vectors (host side, float64).

    Fits a Gaussian to each set (mean and unbiased covariance, as FID does) and returns
    :func:`frechet_distance_from_stats`.

    Args:
      feats_a: [N, F] features of one image set (N >= 2).
      feats_b: [M, F] features of the other (M >= 2).

    Returns:
      The Fréchet distance, >= 0; 0 for identical sets.
    """
    feats_a = np.asarray(feats_a, np.float64)
    feats_b = np.asarray(feats_b, np.float64)
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"frechet_distance: expected [N, F] and [M, F] features, got {feats_a.shape}, {feats_b.shape}")
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("frechet_distance: each set needs at least 2 samples for a covariance")
    return frechet_distance_from_stats(
        feats_a.mean(0), np.cov(feats_a, rowvar=False), feats_b.mean(0), np.cov(feats_b, rowvar=False)
    )


def attribute_accuracy(logits: Mapping[str, jax.Array], attrs: Any) -> dict[str, jax.Array]:
    """Fraction of samples whose predicted class equals the true one, per attribute (jittable).

    Args:
      logits: attribute name -> [B, num_classes] logits (the classifier's output).
      attrs: true classes: an object (e.g. ``meg_jax.data.Attributes``) or a mapping with a
        [B] int array under each name of ``logits``.

    Returns:
      name -> scalar accuracy in [0, 1] for every name of ``logits``, plus ``"all"``: the
      fraction of samples with every attribute right.
    """
    if not logits:
        raise ValueError("attribute_accuracy needs at least one attribute's logits")
    correct = {}
    for name, value in logits.items():
        truth = attrs[name] if isinstance(attrs, Mapping) else getattr(attrs, name)
        if value.shape[:-1] != truth.shape:
            raise ValueError(
                f"attribute_accuracy: logits of {name!r} {value.shape} do not match labels {truth.shape}"
            )
        correct[name] = jnp.argmax(value, axis=-1) == truth
    result = {name: jnp.mean(c.astype(jnp.float32)) for name, c in correct.items()}
    result["all"] = jnp.mean(jnp.all(jnp.stack(list(correct.values())), axis=0).astype(jnp.float32))
    return result
