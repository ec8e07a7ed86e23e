"""Closed forms for conditioning a Gaussian-mixture prior: the targets the posterior samplers and
particle methods are checked against.

With the prior p(x) = sum_k w_k N(x; mu_k, S_k) and a linear-Gaussian measurement
y = A x + s n, n ~ N(0, I) (equivalently the quadratic reward r(x) = -|A x - y|^2 / (2 s^2)),

    p(x | y) = sum_k w'_k N(x; m_k, C_k),     G_k = A S_k A^T + s^2 I,
    m_k = mu_k + S_k A^T G_k^{-1} (y - A mu_k),   C_k = S_k - S_k A^T G_k^{-1} A S_k,
    w'_k  proportional to  w_k N(y; A mu_k, G_k),    p(y) = sum_k w_k N(y; A mu_k, G_k)

(s = 0 is allowed where every G_k is invertible). A linear reward r(x) = b^T x tilts the mixture
to sum_k w'_k N(mu_k + S_k b, S_k) with w'_k proportional to w_k exp(b^T mu_k + b^T S_k b / 2).
Everything is computed in float64 with numpy.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from diffjax.data.toy import GaussianMixture

__all__ = [
    "FullMixture",
    "mixture_posterior",
    "linear_tilt",
    "quadratic_reward_log_normalizer",
    "mixture_fit_errors",
    "logsumexp",
]


def logsumexp(a, axis=None, keepdims=False):
    """log sum exp(a) in numpy float64 (scikit-learn brings scipy, but the library does not rely on it)."""
    a = np.asarray(a, np.float64)
    top = np.max(a, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(a - top), axis=axis, keepdims=True)) + top
    return out if keepdims else (np.squeeze(out, axis=axis) if axis is not None else out.item())


@dataclasses.dataclass(frozen=True)
class FullMixture:
    """sum_k weights[k] N(means[k], covs[k]) with full covariances (numpy float64), and the log
    normalising constant of the conditioning that produced it (log p(y) for `mixture_posterior`)."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, D)
    covs: np.ndarray  # (K, D, D)
    log_normalizer: float = 0.0

    def mean(self) -> np.ndarray:
        return self.weights @ self.means

    def cov(self) -> np.ndarray:
        second = np.einsum("k,kij->ij", self.weights, self.covs + np.einsum("ki,kj->kij", self.means, self.means))
        mean = self.mean()
        return second - np.outer(mean, mean)

    def component_log_densities(self, x) -> np.ndarray:
        """log w_k N(x; m_k, C_k), shape (n, K)."""
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        out = []
        for w, m, c in zip(self.weights, self.means, self.covs):
            chol = np.linalg.cholesky(c + 1e-12 * np.eye(len(m)))
            z = np.linalg.solve(chol, (x - m).T)
            logdet = 2 * np.sum(np.log(np.diag(chol)))
            out.append(math.log(w) - 0.5 * np.sum(z**2, 0) - 0.5 * logdet - 0.5 * len(m) * math.log(2 * math.pi))
        return np.stack(out, 1)

    def log_prob(self, x) -> np.ndarray:
        return logsumexp(self.component_log_densities(x), axis=1)

    def sample(self, key, n: int) -> np.ndarray:
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
        k = rng.choice(len(self.weights), size=n, p=self.weights / self.weights.sum())
        chols = np.linalg.cholesky(self.covs + 1e-12 * np.eye(self.means.shape[1]))
        z = rng.standard_normal((n, self.means.shape[1]))
        return self.means[k] + np.einsum("nij,nj->ni", chols[k], z)


def _prior_arrays(prior: GaussianMixture):
    weights = np.asarray(prior.weights, np.float64)
    means = np.asarray(prior.means, np.float64)
    covs = np.stack([np.diag(s**2) for s in np.asarray(prior.stds, np.float64)])
    return weights, means, covs


def mixture_posterior(prior: GaussianMixture, matrix, y, noise_std: float) -> FullMixture:
    """p(x | y) for y = matrix @ x + noise_std * n, with log p(y) as `log_normalizer`."""
    weights, means, covs = _prior_arrays(prior)
    a = np.asarray(matrix, np.float64)
    y = np.asarray(y, np.float64).ravel()
    if a.ndim != 2 or a.shape[1] != means.shape[1] or a.shape[0] != y.size:
        raise ValueError(f"matrix must be (m, {means.shape[1]}) with m = len(y) = {y.size}, got {a.shape}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    log_w, post_means, post_covs = [], [], []
    for w, mu, s in zip(weights, means, covs):
        g = a @ s @ a.T + noise_std**2 * np.eye(len(y))
        gain = np.linalg.solve(g, a @ s).T  # S A^T G^{-1}
        resid = y - a @ mu
        post_means.append(mu + gain @ resid)
        post_covs.append(s - gain @ a @ s)
        _, logdet = np.linalg.slogdet(g)
        log_w.append(
            math.log(w) - 0.5 * resid @ np.linalg.solve(g, resid) - 0.5 * logdet - 0.5 * len(y) * math.log(2 * math.pi)
        )
    log_w = np.asarray(log_w)
    log_evidence = float(logsumexp(log_w))
    return FullMixture(np.exp(log_w - log_evidence), np.stack(post_means), np.stack(post_covs), log_evidence)


def quadratic_reward_log_normalizer(posterior: FullMixture, num_measurements: int, noise_std: float) -> float:
    """log E_p[exp(-|A x - y|^2 / (2 s^2))] = log p(y) + m/2 log(2 pi s^2): the normalising
    constant of the prior tilted by the quadratic reward (what SMC estimates)."""
    return posterior.log_normalizer + 0.5 * num_measurements * math.log(2 * math.pi * noise_std**2)


def linear_tilt(prior: GaussianMixture, direction) -> FullMixture:
    """p(x) exp(b^T x) / Z for b = `direction`, with log Z as `log_normalizer`."""
    weights, means, covs = _prior_arrays(prior)
    b = np.asarray(direction, np.float64).ravel()
    if b.size != means.shape[1]:
        raise ValueError(f"direction must have {means.shape[1]} entries, got {b.size}")
    log_w = np.log(weights) + means @ b + 0.5 * np.einsum("i,kij,j->k", b, covs, b)
    log_z = float(logsumexp(log_w))
    return FullMixture(np.exp(log_w - log_z), means + covs @ b, covs, log_z)


def mixture_fit_errors(target: FullMixture, x, sample_weights=None) -> dict[str, float]:
    """How far (weighted) samples x are from `target`, by soft assignment to its components
    (responsibilities r_k(x); E[r_k] = w_k and E[r_k x] = w_k m_k hold exactly under the target):

      weights: sum_k |w_hat_k - w_k|;  means: max_k |m_hat_k - m_k| / sqrt(tr C_k / D)
      covs:    max_k |C_hat_k - C_k|_F / |C_k|_F;  mean, cov: the same for the whole mixture."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    pw = np.full(len(x), 1.0 / len(x)) if sample_weights is None else np.asarray(sample_weights, np.float64)
    pw = pw / pw.sum()
    log_r = target.component_log_densities(x)
    r = np.exp(log_r - logsumexp(log_r, axis=1, keepdims=True)) * pw[:, None]  # (n, K)
    w_hat = r.sum(0)
    errors = {"weights": float(np.sum(np.abs(w_hat - target.weights)))}
    mean_err, cov_err = 0.0, 0.0
    for k in range(len(target.weights)):
        if target.weights[k] < 0.02:  # too few samples to measure a component's moments
            continue
        m_hat = r[:, k] @ x / w_hat[k]
        c_hat = (r[:, k, None] * (x - m_hat)).T @ (x - m_hat) / w_hat[k]
        scale = math.sqrt(np.trace(target.covs[k]) / x.shape[1])
        mean_err = max(mean_err, float(np.linalg.norm(m_hat - target.means[k]) / scale))
        cov_err = max(cov_err, float(np.linalg.norm(c_hat - target.covs[k]) / np.linalg.norm(target.covs[k])))
    errors["means"], errors["covs"] = mean_err, cov_err
    mean = pw @ x
    cov = (pw[:, None] * (x - mean)).T @ (x - mean)
    scale = math.sqrt(np.trace(target.cov()) / x.shape[1])
    errors["mean"] = float(np.linalg.norm(mean - target.mean()) / scale)
    errors["cov"] = float(np.linalg.norm(cov - target.cov()) / np.linalg.norm(target.cov()))
    return errors
