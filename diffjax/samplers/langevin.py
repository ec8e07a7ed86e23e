"""Predictor-corrector sampling with a Langevin corrector (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", Alg. 4/5)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.samplers.base import Solver
from diffjax.samplers.first_order import ddim_update

__all__ = ["LangevinPC"]


def langevin_step(denoiser, x, t, key, snr: float):
    """One Langevin MCMC step targeting p_t: x + e score + sqrt(2 e) z with the step size
    e = 2 (snr |z| / |score|)^2, the norms per example averaged over the batch as in Song et al.'s
    reference code (per-example norms blow up for low-dimensional data, where |score| can be ~0).
    The step size therefore depends on the batch, unlike the other samplers."""
    score = denoiser.score(x, t)
    z = jax.random.normal(key, x.shape, x.dtype)
    axes = tuple(range(1, x.ndim))
    norm = lambda a: jnp.mean(jnp.sqrt(jnp.sum(a**2, axis=axes)))  # noqa: E731
    step = 2.0 * (snr * norm(z) / jnp.maximum(norm(score), 1e-20)) ** 2
    return x + step * score + jnp.sqrt(2.0 * step) * z


@dataclasses.dataclass(frozen=True)
class LangevinPC(Solver):
    """Predictor-corrector sampler: at each grid time `n_corrector` Langevin steps with
    signal-to-noise ratio `snr` at t, then the reverse-diffusion (ancestral) predictor to t_next.
    (n_corrector + 1) NFE per step.
    """

    stochastic: ClassVar[bool] = True
    snr: float = 0.16
    n_corrector: int = 1

    def check(self, process, steps, t_min, t_max):
        if not (isinstance(self.snr, (int, float)) and self.snr > 0):
            raise ValueError(f"pc: snr must be a positive number, got {self.snr!r}")
        if not (isinstance(self.n_corrector, int) and not isinstance(self.n_corrector, bool) and self.n_corrector >= 0):
            raise ValueError(f"pc: n_corrector must be an int >= 0, got {self.n_corrector!r}")

    def nfe(self, steps):
        return steps * (self.n_corrector + 1)

    def step(self, denoiser, x, state, t, t_next, key):
        keys = jax.random.split(key, self.n_corrector + 1)
        for k in range(self.n_corrector):
            x = langevin_step(denoiser, x, t, keys[k], float(self.snr))
        return ddim_update(denoiser, x, t, t_next, keys[-1], 1.0), state
