"""Data with exact denoisers beyond mixtures: Gaussians with any covariance, and finite sets of points.

Gaussian data N(mu, U diag(v) U^T) (U orthonormal) under a Gaussian path x_t = alpha x0 + sigma eps
decouples along the eigenvectors: with z = U^T (x - alpha mu),

    E[x0 | x_t = x] = mu + U diag(alpha v / (alpha^2 v + sigma^2)) z,

and the probability-flow ODE is linear per direction, because its velocity alpha' D + sigma' eps
(eps = (x - alpha D)/sigma) gives dz_k/dt = z_k d log(rho_k)/dt with rho_k = sqrt(alpha^2 v_k + sigma^2),
the marginal std. So its exact solution from (alpha_1, sigma_1) to (alpha_2, sigma_2) is

    x_2 = alpha_2 mu + U diag(rho_2 / rho_1) z_1,

the same map for every process (VP, cosine, VE/EDM, flow matching, a DDPM chain): only the (alpha, sigma)
pair matters. `GaussianData.flow_map` is this closed form.

The ideal (empirical) denoiser of N points y_i, the exact denoiser of their empirical distribution, is a
softmax over squared distances (Karras et al. 2022, eq. 57):

    E[x0 | x_t = x] = sum_i w_i y_i,   w = softmax_i(-|x - alpha y_i|^2 / (2 sigma^2)).

`EmpiricalData.posterior_mean` evaluates it in chunks of points with a running log-sum-exp, so memory
stays (batch, chunk) whatever N is.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.denoisers import Denoiser
from diffjax.processes import GaussianProcess
from diffjax.validation import check_count, check_positive

__all__ = ["GaussianData", "EmpiricalData", "random_basis", "power_law_gaussian"]


def _column(coef, x):
    """alpha or sigma (scalar or (batch,)) shaped (batch, 1) against flat data (batch, D)."""
    coef = jnp.asarray(coef, jnp.float32)
    return jnp.broadcast_to(coef, (x.shape[0],))[:, None]


def _flat(x, dim: int, what: str):
    flat = jnp.reshape(x, (x.shape[0], -1))
    if flat.shape[1] != dim:
        raise ValueError(f"data has {flat.shape[1]} features, the {what} {dim}")
    return flat


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianData:
    """N(mean, basis diag(variances) basis^T): mean (D,), orthonormal basis (D, D) (columns are the
    eigenvectors), variances (D,)."""

    mean: jax.Array
    basis: jax.Array
    variances: jax.Array

    @classmethod
    def create(cls, mean, basis, variances) -> "GaussianData":
        mean, basis, variances = (np.asarray(a, np.float64) for a in (mean, basis, variances))
        dim = mean.shape[0] if mean.ndim == 1 else -1
        if mean.ndim != 1 or basis.shape != (dim, dim) or variances.shape != (dim,):
            raise ValueError(
                f"need mean (D,), basis (D, D), variances (D,); got {mean.shape}, {basis.shape}, {variances.shape}"
            )
        if not np.all(variances > 0):
            raise ValueError(f"variances must be positive, got min {variances.min()}")
        if not np.allclose(basis.T @ basis, np.eye(dim), atol=1e-5):
            raise ValueError("basis must be orthonormal (basis^T basis = I)")
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        return cls(f32(mean), f32(basis), f32(variances))

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def sample(self, key, n: int):
        z = jax.random.normal(key, (n, self.dim)) * jnp.sqrt(self.variances)
        return self.mean + z @ self.basis.T

    def posterior_mean(self, x, alpha, sigma):
        """E[x0 | x_t = x], the exact x0-denoiser; alpha, sigma scalars or (batch,)."""
        flat = _flat(x, self.dim, "Gaussian")
        a, s = _column(alpha, flat), _column(sigma, flat)
        z = (flat - a * self.mean) @ self.basis
        shrink = a * self.variances / (a**2 * self.variances + s**2)
        return jnp.reshape(self.mean + (shrink * z) @ self.basis.T, x.shape)

    def flow_map(self, x, alpha_from, sigma_from, alpha_to, sigma_to):
        """The exact probability-flow ODE solution at (alpha_to, sigma_to) of the state x at
        (alpha_from, sigma_from) (module docstring); coefficients scalars or (batch,)."""
        flat = _flat(x, self.dim, "Gaussian")
        a1, s1, a2, s2 = (_column(c, flat) for c in (alpha_from, sigma_from, alpha_to, sigma_to))
        z = (flat - a1 * self.mean) @ self.basis
        ratio = jnp.sqrt((a2**2 * self.variances + s2**2) / (a1**2 * self.variances + s1**2))
        return jnp.reshape(a2 * self.mean + (ratio * z) @ self.basis.T, x.shape)

    def denoiser(self, process: GaussianProcess) -> Denoiser:
        """The exact x0-denoiser of this Gaussian under `process`."""
        return Denoiser(lambda x, t: self.posterior_mean(x, process.alpha(t), process.sigma(t)), process, "x0")


def random_basis(key, dim: int):
    """A Haar-random orthonormal (dim, dim) matrix (QR of a Gaussian matrix, signs fixed), float64 numpy."""
    dim = check_count("dim", dim)
    seed = np.asarray(jax.random.key_data(key)).ravel()
    rng = np.random.default_rng(seed.tolist())
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def power_law_gaussian(key, dim: int, exponent: float, scale: float = 1.0, mean_norm: float = 0.0) -> GaussianData:
    """Gaussian data with variances scale^2 (1 + k)^-exponent, k = 0..dim-1, in a random basis, with a
    mean of norm `mean_norm` in a random direction."""
    check_positive("scale", scale)
    key_basis, key_mean = jax.random.split(key)
    variances = scale**2 * (1.0 + np.arange(dim)) ** (-float(exponent))
    direction = np.asarray(jax.random.normal(key_mean, (dim,)), np.float64)
    mean = mean_norm * direction / np.linalg.norm(direction)
    return GaussianData.create(mean, random_basis(key_basis, dim), variances)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EmpiricalData:
    """The uniform distribution on N points (N, D), e.g. flattened training images, whose exact
    denoiser is the ideal denoiser (module docstring). `chunk`: points per block of the softmax."""

    points: jax.Array
    sq_norms: jax.Array
    chunk: int = dataclasses.field(default=1024, metadata=dict(static=True))

    @classmethod
    def create(cls, points, chunk: int = 1024) -> "EmpiricalData":
        points = np.asarray(points, np.float32)
        if points.ndim < 2 or points.shape[0] < 1:
            raise ValueError(f"points must have shape (N, ...) with N >= 1, got {points.shape}")
        chunk = check_count("chunk", chunk)
        flat = points.reshape(points.shape[0], -1)
        return cls(jnp.asarray(flat), jnp.asarray(np.sum(flat.astype(np.float64) ** 2, axis=1), jnp.float32), chunk)

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    @property
    def num_points(self) -> int:
        return self.points.shape[0]

    def _blocks(self):
        """points and squared norms in (blocks, chunk, ...) with a validity mask (padding is invalid)."""
        n, chunk = self.num_points, min(self.chunk, self.num_points)
        blocks = -(-n // chunk)
        pad = blocks * chunk - n
        points = jnp.pad(self.points, ((0, pad), (0, 0))).reshape(blocks, chunk, self.dim)
        sq = jnp.pad(self.sq_norms, (0, pad)).reshape(blocks, chunk)
        valid = (jnp.arange(blocks * chunk) < n).reshape(blocks, chunk)
        return points, sq, valid

    def posterior_mean(self, x, alpha, sigma):
        """E[x0 | x_t = x] = softmax-weighted mean of the points; alpha, sigma scalars or (batch,)."""
        flat = _flat(x, self.dim, "point set")
        a, s = _column(alpha, flat), _column(sigma, flat)
        inv_var = 1.0 / s**2

        def block(carry, inputs):
            top, total, acc = carry
            points, sq, valid = inputs
            # -|x - a y|^2 / (2 s^2) up to a term in x alone
            logits = (a * (flat @ points.T) - 0.5 * a**2 * sq[None]) * inv_var
            logits = jnp.where(valid[None], logits, -jnp.inf)
            new_top = jnp.maximum(top, jnp.max(logits, axis=1, keepdims=True))
            rescale = jnp.exp(top - new_top)
            weights = jnp.exp(logits - new_top)
            total = total * rescale + jnp.sum(weights, axis=1, keepdims=True)
            acc = acc * rescale + weights @ points
            return (new_top, total, acc), None

        start = (jnp.full((flat.shape[0], 1), -jnp.inf), jnp.zeros((flat.shape[0], 1)), jnp.zeros_like(flat))
        (_, total, acc), _ = jax.lax.scan(block, start, self._blocks())
        return jnp.reshape(acc / total, x.shape)

    def nearest(self, x):
        """Index of the nearest point to each row of x (Euclidean), chunked like the denoiser."""
        flat = _flat(x, self.dim, "point set")

        def block(carry, inputs):
            best, best_index, offset = carry
            points, sq, valid = inputs
            dist = jnp.where(valid[None], sq[None] - 2.0 * flat @ points.T, jnp.inf)
            index = jnp.argmin(dist, axis=1)
            value = jnp.min(dist, axis=1)
            better = value < best
            return (
                jnp.where(better, value, best),
                jnp.where(better, index + offset, best_index),
                offset + len(sq),
            ), None

        n = flat.shape[0]
        start = (jnp.full((n,), jnp.inf), jnp.zeros((n,), jnp.int32), jnp.int32(0))
        (_, index, _), _ = jax.lax.scan(block, start, self._blocks())
        return index

    def denoiser(self, process: GaussianProcess) -> Denoiser:
        """The ideal x0-denoiser of the point set under `process`."""
        return Denoiser(lambda x, t: self.posterior_mean(x, process.alpha(t), process.sigma(t)), process, "x0")
