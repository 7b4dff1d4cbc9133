"""Fréchet distance between two Gaussians fitted to feature sets (the FID formula).

For ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``::

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2})

All arithmetic is float64. The matrix square root uses ``scipy.linalg.sqrtm`` when scipy is
importable, as the reference FID code does (with an ``eps`` ridge when the product is
near-singular and small imaginary parts dropped; scipy's singularity warnings are caught
and trigger that ridge). Without scipy, or when sqrtm's result is not
usable, the trace is taken through symmetric eigen-decompositions in numpy:
``Tr((s1 s2)^{1/2}) = sum(sqrt(eig(s1^{1/2} s2 s1^{1/2})))``, which is exact for symmetric
positive semi-definite inputs.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..errors import ConfigError

try:  # scipy is optional
    from scipy import linalg as _scipy_linalg
except ImportError:  # pragma: no cover - exercised only without scipy
    _scipy_linalg = None

__all__ = ["feature_statistics", "frechet_distance"]

_IMAG_TOLERANCE = 1e-3  # |imag| on sqrtm's diagonal that still counts as round-off


def _as_float64(array: Any, name: str) -> np.ndarray:
    """A numpy float64 copy of an array-like or (CPU/GPU) torch tensor."""
    if hasattr(array, "detach"):  # torch.Tensor without importing torch
        array = array.detach().cpu().double().numpy()
    try:
        return np.array(array, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a real numeric array: {exc}") from exc


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set, in float64.

    Args:
        features: (N, F) array or tensor, one row per sample; N >= 2.

    Returns:
        ``(mu, sigma)``: float64 (F,) and (F, F) (unbiased covariance, divisor N - 1).
    """
    x = _as_float64(features, "features")
    if x.ndim != 2:
        raise ConfigError(f"features must have shape (N, F), got {x.shape}")
    if x.shape[0] < 2:
        raise ConfigError(f"need at least 2 samples to estimate a covariance, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ConfigError("features contain NaN or infinite values")
    mu = x.mean(axis=0)
    sigma = np.atleast_2d(np.cov(x, rowvar=False))
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix; negative eigenvalues clip to 0."""
    vals, vecs = np.linalg.eigh(0.5 * (sigma + sigma.T))
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr((sigma1 sigma2)^{1/2})`` via eigen-decompositions (numpy only)."""
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1  # similar to sigma1 sigma2, symmetric PSD
    vals = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    return float(np.sqrt(np.clip(vals, 0.0, None)).sum())


def _scipy_sqrtm(matrix: np.ndarray) -> tuple[np.ndarray, bool]:
    """``scipy.linalg.sqrtm`` with its warnings caught; returns (root, warned)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        root = _scipy_linalg.sqrtm(matrix)
    return root, bool(caught)


def _trace_sqrt_product_scipy(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """``Tr((sigma1 sigma2)^{1/2})`` via ``scipy.linalg.sqrtm`` as in the reference FID code."""
    covmean, warned = _scipy_sqrtm(sigma1 @ sigma2)
    if warned or not np.isfinite(covmean).all():
        # Product is (near-)singular: add a small ridge to both covariances and retry.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean, _ = _scipy_sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.isfinite(covmean).all():
        return _trace_sqrt_product_eigh(sigma1, sigma2)
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=_IMAG_TOLERANCE):
            # Large imaginary parts: sqrtm went astray on an ill-conditioned product. The
            # reference code raises here; the symmetric route is exact for PSD inputs.
            return _trace_sqrt_product_eigh(sigma1, sigma2)
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Squared Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    Args:
        mu1: (F,) mean of the first feature set.
        sigma1: (F, F) covariance of the first feature set.
        mu2: (F,) mean of the second feature set.
        sigma2: (F, F) covariance of the second feature set.
        eps: Ridge added to both covariances when their product is too singular for sqrtm.

    Returns:
        The distance as a Python float (>= 0 up to round-off; clipped at 0).

    Raises:
        ConfigError: Shapes do not match or values are not finite.
    """
    mu1, mu2 = _as_float64(mu1, "mu1").reshape(-1), _as_float64(mu2, "mu2").reshape(-1)
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1, "sigma1")), np.atleast_2d(_as_float64(sigma2, "sigma2"))
    dim = mu1.shape[0]
    if mu2.shape != (dim,):
        raise ConfigError(f"mu1 and mu2 differ in length: {mu1.shape} vs {mu2.shape}")
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ConfigError(f"{name} must have shape ({dim}, {dim}), got {sigma.shape}")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ConfigError(f"{name} contains NaN or infinite values")

    diff = mu1 - mu2
    if _scipy_linalg is not None:
        tr_covmean = _trace_sqrt_product_scipy(sigma1, sigma2, eps)
    else:
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(distance, 0.0)
