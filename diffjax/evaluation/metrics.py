"""FID, KID and Inception Score from Inception features, in float64 on the host; PSNR of images.

The metrics are small dense linear algebra on (N, 2048) features; float64 numpy keeps them exact
(FID cancels large traces; KID averages small differences of kernel means), and needs no scipy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np


class Statistics(NamedTuple):
    """Gaussian fit of features: mean (d,) and covariance (d, d), float64."""

    mu: np.ndarray
    sigma: np.ndarray


def _as_features(x, name: str, min_rows: int = 1) -> np.ndarray:
    f = np.asarray(x, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must be a (num_samples, dim) array, got shape {f.shape}")
    if f.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} samples, got {f.shape[0]}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return f


def compute_statistics(features) -> Statistics:
    """``mu = mean(f)``, ``sigma = cov(f)`` with the unbiased (N - 1) normalization, as the FID code does."""
    f = _as_features(features, "features", min_rows=2)
    return Statistics(f.mean(axis=0), np.cov(f, rowvar=False))


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off removed: below ``d * eps * max`` (numpy's matrix_rank
    tolerance) they are zero. Otherwise the square roots of ~1e-16 noise add up to ~1e-4 in a
    2048-d FID whenever a covariance is singular (fewer samples than dimensions)."""
    tol = w.shape[0] * np.finfo(w.dtype).eps * max(float(w.max(initial=0.0)), 0.0)
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):

        d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}).

    ``Tr (sigma1 sigma2)^{1/2}`` is computed as ``sum sqrt(eig(S1^{1/2} sigma2 S1^{1/2}))``, a symmetric
    PSD matrix with the same eigenvalues as sigma1 sigma2, so it stays real, and with round-off
    eigenvalues set to zero it stays exact when the covariances are singular (fewer samples than
    dimensions), where ``scipy.linalg.sqrtm`` of the product is off by ~1e-4 or needs the eps
    fix-up. Same value as the reference code (to ~1e-10 relative) otherwise.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be 1-D of equal length, got shapes {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}) to match the means, got {s1.shape} and {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or infinite values")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sum(np.sqrt(_clip_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_features(features1, features2) -> float:
    """FID between two feature sets: ``frechet_distance(*compute_statistics(f1), *compute_statistics(f2))``."""
    return frechet_distance(*compute_statistics(features1), *compute_statistics(features2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """KID's kernel ``k(x, y) = (x . y / d + coef0) ^ degree`` (Binkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x, y, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 with the polynomial kernel (Binkowski et al. 2018, eq. 3; Gretton et al. 2012):

    1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j).
    """
    x, y = _as_features(x, "x", min_rows=2), _as_features(y, "y", min_rows=2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: {x.shape[1]} and {y.shape[1]}")
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = (polynomial_kernel(a, b, degree, coef0) for a, b in ((x, x), (y, y), (x, y)))
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean()
    )


def kid(
    features1, features2, *, num_subsets: int = 100, subset_size: int = 1000, key: jax.Array | None = None
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and std of ``mmd2_unbiased`` over
    ``num_subsets`` random subsets of ``subset_size`` rows from each set (drawn without replacement
    within a subset), as in the reference implementation (100 subsets of 1000 by default).

    ``key`` (a ``jax.random`` key; ``jax.random.key(0)`` if None) picks the subsets.
    """
    f1, f2 = _as_features(features1, "features1", 2), _as_features(features2, "features2", 2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dims differ: {f1.shape[1]} and {f2.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    smallest = min(f1.shape[0], f2.shape[0])
    if not 2 <= subset_size <= smallest:
        raise ValueError(
            f"subset_size={subset_size} must be in [2, {smallest}] (the smaller set has {smallest} samples)"
        )
    key = jax.random.key(0) if key is None else key
    values = []
    for k in jax.random.split(key, num_subsets):
        k1, k2 = jax.random.split(k)
        i1 = np.asarray(jax.random.choice(k1, f1.shape[0], (subset_size,), replace=False))
        i2 = np.asarray(jax.random.choice(k2, f2.shape[0], (subset_size,), replace=False))
        values.append(mmd2_unbiased(f1[i1], f2[i2]))
    values = np.asarray(values)
    return float(values.mean()), float(values.std())


def inception_score(logits, *, num_splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` on each of
    ``num_splits`` equal consecutive splits, with ``p(y)`` the split's mean prediction; returns
    mean and std over splits. ``p(y|x) = softmax(logits)`` over all columns (1008 for the FID
    Inception; the original code softmaxes all 1008 logits). Use ``inception_logits`` for logits.
    """
    z = _as_features(logits, "logits")
    if not 1 <= num_splits <= z.shape[0]:
        raise ValueError(f"num_splits={num_splits} must be in [1, {z.shape[0]}] (number of samples)")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    scores = []
    n = log_p.shape[0]
    for i in range(num_splits):  # split boundaries as in the original code: i * n // num_splits
        part = log_p[i * n // num_splits : (i + 1) * n // num_splits]
        top = part.max(axis=0)
        log_py = top + np.log(np.exp(part - top).mean(axis=0))  # log mean_x p(y|x), no underflow
        kl = (np.exp(part) * (part - log_py)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def psnr(x, truth, data_range: float = 2.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image: 10 log10(data_range^2 / MSE), x clipped to the range
    [-data_range / 2, data_range / 2] of `truth` (default: images in [-1, 1]); MSE floored at 1e-12."""
    x, truth = np.asarray(x, np.float64), np.asarray(truth, np.float64)
    if x.shape != truth.shape or x.ndim < 2:
        raise ValueError(f"psnr needs two batches of the same shape (N, ...), got {x.shape} and {truth.shape}")
    half = data_range / 2
    mse = np.mean((np.clip(x, -half, half) - truth) ** 2, axis=tuple(range(1, x.ndim)))
    return 10 * np.log10(data_range**2 / np.maximum(mse, 1e-12))
