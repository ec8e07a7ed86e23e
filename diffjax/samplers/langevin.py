"""Predictor-corrector sampling with a Langevin corrector (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", Alg. 4/5)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.samplers.base import check_option, check_positive_option
from diffjax.samplers.ddim import ddim_step
from diffjax.samplers.predictor_corrector import PredictorCorrector

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
class LangevinPC(PredictorCorrector):
    """Predictor-corrector sampler (Song et al. 2021, Alg. 4/5) on the shared mechanism: at each
    grid time `n_corrector` Langevin steps with signal-to-noise ratio `snr` at t (`relax`), then
    the reverse-diffusion (ancestral) predictor to t_next. It reuses no evaluation:
    (n_corrector + 1) NFE per step.
    """

    stochastic: ClassVar[bool] = True
    reuses_evaluations: ClassVar[bool] = False
    snr: float = 0.16
    n_corrector: int = 1

    def __post_init__(self):
        check_positive_option(self, "snr")
        check_option(
            self,
            "n_corrector",
            isinstance(self.n_corrector, int) and not isinstance(self.n_corrector, bool) and self.n_corrector >= 0,
            "an int >= 0",
        )

    @property
    def nfe_per_step(self) -> int:  # type: ignore[override]
        return self.n_corrector + 1

    def _keys(self, key):
        """n_corrector keys for the Langevin steps, then the predictor's."""
        return jax.random.split(key, self.n_corrector + 1)

    def relax(self, denoiser, step):
        x, keys = step.x, self._keys(step.key)
        for k in range(self.n_corrector):
            x = langevin_step(denoiser, x, step.t, keys[k], float(self.snr))
        return x

    def predict(self, denoiser, step, state):
        x0, eps = denoiser.predict(step.x, step.t)
        return ddim_step(denoiser.process, x0, eps, step.t_next, 1.0, step.t, self._keys(step.key)[-1])
