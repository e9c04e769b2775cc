"""Fidelity of accelerated samples against full-compute ones (numpy only).

PSNR: one number over the whole array, 10*log10(peak^2 / MSE). The peak defaults to the
reference's range, `b.max() - b.min()`; pass `peak=2.0` for pixel models in [-1, 1] to use
the nominal peak-to-peak (the two agree when the reference spans [-1, 1]).
Cosine: each sample flattened, cosine with its reference, averaged over samples.
Class accuracy and the Frechet distance of digits live in `soda.digits.classifier`.
"""
from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, peak: float | None = None) -> float:
    """PSNR in dB of `a` against the reference `b` (inf when they are equal)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    if peak is None:
        peak = float(b.max() - b.min())
    if peak <= 0:
        raise ValueError("psnr: the reference is constant; pass peak explicitly")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(peak**2 / mse))


def cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> float:
    """Mean over samples (axis 0) of the cosine similarity of the flattened samples."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cosine: shapes differ {a.shape} vs {b.shape}")
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    num = np.sum(a * b, axis=1)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), eps)
    return float(np.mean(num / den))


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 sqrt(C1 C2)): the FID formula (pytorch-fid's recipe)."""
    import warnings

    from scipy import linalg

    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product (e.g. constant images) is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov1.dot(cov2))
        if not np.isfinite(covmean).all():
            offset = np.eye(cov1.shape[0]) * eps
            covmean = linalg.sqrtm((cov1 + offset).dot(cov2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features [n, d], in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)
