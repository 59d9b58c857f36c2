"""Fréchet distance between two sets of feature vectors (the FID / FVD statistic).

d² = |μa − μb|² + tr(Σa + Σb − 2 (Σa Σb)^½), with Gaussians fitted to each set. The
matrix square root's trace is taken from the eigenvalues of Σa^½ Σb Σa^½, which is
symmetric positive semi-definite: `numpy.linalg.eigh` alone, no complex parts to drop
(the usual `scipy.linalg.sqrtm` route can return them for near-singular covariances).
"""
from __future__ import annotations

import numpy as np


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Squared Fréchet distance between the Gaussians fitted to rows of `a` (n, d) and `b` (m, d)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (n, d) feature sets with the same d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each feature set needs at least two rows for a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)
