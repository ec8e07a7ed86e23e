"""Toy distributions with exact answers: Gaussian mixtures and 2-D sets.

The labelled 2-D set is `ring_mixture()`: equal-weight Gaussians on a circle, whose component index
is the label (`mixture.sample(key, n, return_components=True)`), with exact denoisers both
unconditional (`mixture.denoiser(process)`) and per label (`mixture.component(k).denoiser(process)`).

A mixture p(x0) = sum_k w_k N(mu_k, diag(s_k^2)) stays a mixture under any Gaussian path
x_t = alpha x0 + sigma eps:

    p_t(x) = sum_k w_k N(x; alpha mu_k, diag(alpha^2 s_k^2 + sigma^2)),
    E[x0 | x_t = x] = sum_k r_k(x) [mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x - alpha mu_k)],

with responsibilities r_k(x) proportional to w_k N(x; alpha mu_k, ...). The exact posterior mean
is the exact x0-denoiser, so samplers, losses and likelihoods have closed-form targets.
Data may have any trailing shape; it is flattened to D = prod(shape[1:]) features.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.denoisers import Denoiser
from diffjax.processes import GaussianProcess

__all__ = [
    "GaussianMixture",
    "gaussian",
    "benchmark_mixture",
    "ring_mixture",
    "TOY_2D",
    "sample_toy_2d",
]


def _per_example(coef, n):
    coef = jnp.asarray(coef, jnp.float32)
    return jnp.broadcast_to(coef, (n,))[:, None, None]  # (n, 1, 1) against (n, K, D)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """sum_k weights[k] N(means[k], diag(stds[k]^2)); means and stds of shape (K, D)."""

    weights: jax.Array
    means: jax.Array
    stds: jax.Array

    @classmethod
    def create(cls, weights, means, stds) -> "GaussianMixture":
        weights = np.asarray(weights, np.float64)
        means = np.asarray(means, np.float64)
        if weights.ndim != 1 or means.ndim != 2 or means.shape[0] != weights.shape[0]:
            raise ValueError(f"need weights (K,) and means (K, D); got {weights.shape} and {means.shape}")
        stds = np.asarray(stds, np.float64)
        if stds.ndim == 1:  # one isotropic std per component
            stds = stds[:, None]
        stds = np.broadcast_to(stds, means.shape)
        if np.any(weights <= 0) or abs(weights.sum() - 1) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got {weights.tolist()}")
        if np.any(stds <= 0):
            raise ValueError("component standard deviations must be positive")
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        return cls(f32(weights), f32(means), f32(stds))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def component(self, k: int) -> "GaussianMixture":
        """Component k alone, N(means[k], diag(stds[k]^2)): the distribution of the examples labelled k,
        so `mixture.component(k).denoiser(process)` is the exact class-conditional denoiser."""
        if not (isinstance(k, int) and 0 <= k < self.num_components):
            raise ValueError(f"component index must be an int in [0, {self.num_components}), got {k!r}")
        return GaussianMixture(jnp.ones((1,), jnp.float32), self.means[k : k + 1], self.stds[k : k + 1])

    # -- data distribution ----------------------------------------------------------------------
    def sample(self, key, n: int, return_components: bool = False):
        key_k, key_x = jax.random.split(key)
        k = jax.random.categorical(key_k, jnp.log(self.weights), shape=(n,))
        x = self.means[k] + self.stds[k] * jax.random.normal(key_x, (n, self.dim))
        return (x, k) if return_components else x

    def log_prob(self, x):
        """log p(x0), one value per example."""
        return self.marginal_log_prob(x, 1.0, 0.0)

    # -- marginals of a Gaussian path ------------------------------------------------------------
    def _component_log_probs(self, x, alpha, sigma):
        """(log w_k N(x; alpha mu_k, alpha^2 s_k^2 + sigma^2) for each k, and the variances)."""
        flat = jnp.reshape(x, (x.shape[0], -1))
        if flat.shape[1] != self.dim:
            raise ValueError(f"data has {flat.shape[1]} features, the mixture {self.dim}")
        a, s = _per_example(alpha, x.shape[0]), _per_example(sigma, x.shape[0])
        var = a**2 * self.stds[None] ** 2 + s**2  # (n, K, D)
        diff = flat[:, None, :] - a * self.means[None]
        log_n = -0.5 * jnp.sum(diff**2 / var + jnp.log(2 * math.pi * var), axis=-1)
        return jnp.log(self.weights)[None] + log_n, diff, var, flat, a

    def marginal_log_prob(self, x, alpha, sigma):
        """log p_t(x) for the path at (alpha, sigma), one value per example."""
        log_joint, *_ = self._component_log_probs(x, alpha, sigma)
        return jax.nn.logsumexp(log_joint, axis=-1)

    def posterior_mean(self, x, alpha, sigma):
        """E[x0 | x_t = x], the exact x0-denoiser; alpha, sigma scalars or (batch,)."""
        log_joint, diff, var, _, a = self._component_log_probs(x, alpha, sigma)
        resp = jax.nn.softmax(log_joint, axis=-1)[..., None]  # (n, K, 1)
        means_k = self.means[None] + a * self.stds[None] ** 2 / var * diff
        return jnp.reshape(jnp.sum(resp * means_k, axis=1), x.shape)

    def score(self, x, alpha, sigma):
        """grad_x log p_t(x)."""
        log_joint, diff, var, _, _ = self._component_log_probs(x, alpha, sigma)
        resp = jax.nn.softmax(log_joint, axis=-1)[..., None]
        return jnp.reshape(jnp.sum(resp * (-diff / var), axis=1), x.shape)

    def denoiser(self, process: GaussianProcess) -> Denoiser:
        """The exact x0-denoiser of this mixture under `process`."""
        return Denoiser(lambda x, t: self.posterior_mean(x, process.alpha(t), process.sigma(t)), process, "x0")

    # -- checking samples -------------------------------------------------------------------------
    def assign(self, x):
        """Most probable component of each sample under the mixture itself."""
        log_joint, *_ = self._component_log_probs(x, 1.0, 0.0)
        return jnp.argmax(log_joint, axis=-1)

    def sample_statistics(self, x):
        """(weights, stds) estimated from samples: each sample goes to its most probable
        component; a component's std is the RMS deviation from its mean over samples and features
        (compare with the RMS of `stds[k]`). Components with no sample get std nan."""
        flat = np.asarray(jnp.reshape(x, (x.shape[0], -1)), np.float64)
        k = np.asarray(self.assign(x))
        means = np.asarray(self.means, np.float64)
        weights = np.bincount(k, minlength=self.num_components) / len(k)
        stds = np.full(self.num_components, np.nan)
        for j in range(self.num_components):
            members = flat[k == j]
            if len(members):
                stds[j] = np.sqrt(np.mean((members - means[j]) ** 2))
        return weights, stds

    def rms_stds(self):
        return np.sqrt(np.mean(np.asarray(self.stds, np.float64) ** 2, axis=1))

    def sample_errors(self, x):
        """(sum |w_hat - w|, max_k |s_hat_k / s_k - 1|): the two numbers the accuracy checks use."""
        weights, stds = self.sample_statistics(x)
        weight_error = float(np.sum(np.abs(weights - np.asarray(self.weights, np.float64))))
        std_error = float(np.max(np.abs(stds / self.rms_stds() - 1.0)))
        return weight_error, std_error


def gaussian(mean, std) -> GaussianMixture:
    """A single Gaussian N(mean, diag(std^2)) as a one-component mixture."""
    mean = np.atleast_1d(np.asarray(mean, np.float64))
    std = np.broadcast_to(np.asarray(std, np.float64), mean.shape)
    return GaussianMixture.create([1.0], mean[None], std[None])


def benchmark_mixture(dim: int = 16) -> GaussianMixture:
    """The mixture the sampler checks use: `dim`-D, 4 isotropic components with stds
    0.05, 0.1, 0.25, 0.5 and weights 0.1, 0.2, 0.3, 0.4, means on orthogonal +-0.75 sign
    patterns (Hadamard rows 1-4, skipping the constant row 0), so each mean has norm 0.75 sqrt(dim)
    and pairs are far apart."""
    if not isinstance(dim, int) or dim < 8 or dim & (dim - 1):
        raise ValueError(f"dim must be a power of two >= 8 (four non-constant Hadamard rows), got {dim!r}")
    hadamard = np.array([[1.0]])
    while hadamard.shape[0] < dim:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    means = 0.75 * hadamard[1:5]
    return GaussianMixture.create([0.1, 0.2, 0.3, 0.4], means, [0.05, 0.1, 0.25, 0.5])


def ring_mixture(num_components: int = 8, radius: float = 1.0, std: float = 0.1) -> GaussianMixture:
    """The labelled 2-D toy set: `num_components` equal-weight isotropic Gaussians N(mu_k, std^2 I)
    with mu_k = radius (cos 2 pi k / K, sin 2 pi k / K); the label of an example is its component k."""
    if not (isinstance(num_components, int) and num_components >= 1):
        raise ValueError(f"num_components must be a positive int, got {num_components!r}")
    if not (radius > 0 and std > 0):
        raise ValueError(f"radius and std must be positive, got radius={radius!r}, std={std!r}")
    angles = 2 * np.pi * np.arange(num_components) / num_components
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return GaussianMixture.create(np.full(num_components, 1.0 / num_components), means, np.full(num_components, std))


def sample_ring(key, n: int):
    """Samples of the default `ring_mixture()` (without labels; see the module docstring for them)."""
    return ring_mixture().sample(key, n)


# ------------------------------------------------------------------------------------------------
# 2-D toy sets (no exact score except the ring; for training demos and loss checks)
# ------------------------------------------------------------------------------------------------


def sample_moons(key, n: int, noise: float = 0.05):
    """Two interleaving half circles, roughly centred and scaled to [-1, 1]."""
    key_side, key_angle, key_noise = jax.random.split(key, 3)
    side = jax.random.bernoulli(key_side, 0.5, (n,))
    angle = jnp.pi * jax.random.uniform(key_angle, (n,))
    upper = jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)
    lower = jnp.stack([1.0 - jnp.cos(angle), 0.5 - jnp.sin(angle)], axis=1)
    x = jnp.where(side[:, None], upper, lower)
    x = (x - jnp.array([0.5, 0.25])) / 1.2
    return x + noise * jax.random.normal(key_noise, x.shape)


def sample_checkerboard(key, n: int, cells: int = 4):
    """Uniform on the black squares of a cells x cells board over [-1, 1]^2."""
    key_cell, key_pos = jax.random.split(key)
    black = [(i, j) for i in range(cells) for j in range(cells) if (i + j) % 2 == 0]
    corner = jnp.asarray(black, jnp.float32)[jax.random.randint(key_cell, (n,), 0, len(black))]
    return -1.0 + (corner + jax.random.uniform(key_pos, (n, 2))) * (2.0 / cells)


def sample_swiss_roll(key, n: int, noise: float = 0.03):
    """A 2-D spiral, scaled to about [-1, 1]^2."""
    key_t, key_noise = jax.random.split(key)
    turn = 1.5 * jnp.pi * (1.0 + 2.0 * jax.random.uniform(key_t, (n,)))
    x = jnp.stack([turn * jnp.cos(turn), turn * jnp.sin(turn)], axis=1) / 15.0
    return x + noise * jax.random.normal(key_noise, x.shape)


TOY_2D = {
    "moons": sample_moons,
    "checkerboard": sample_checkerboard,
    "swiss_roll": sample_swiss_roll,
    "ring": sample_ring,
}


def sample_toy_2d(name: str, key, n: int):
    if name not in TOY_2D:
        raise ValueError(f"unknown 2-D toy set {name!r}; known: {sorted(TOY_2D)}")
    if not (isinstance(n, int) and n > 0):
        raise ValueError(f"n must be a positive int, got {n!r}")
    return TOY_2D[name](key, n)
