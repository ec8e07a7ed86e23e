"""DDIM (with eta) and ancestral DDPM sampling, and the one DDIM step the other solvers build on."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.processes import broadcast_to_data
from diffjax.samplers.base import Solver, check_unit_interval

__all__ = ["DDIM", "Ancestral", "ddim_step", "ddim_data_form"]


def _posterior_std(process, t, s):
    """Std of q(x_s | x_t, x0) for s < t: sigma_s sqrt(1 - exp(lambda_t - lambda_s))."""
    return process.sigma(s) * jnp.sqrt(-jnp.expm1(process.log_snr(t) - process.log_snr(s)))


def ddim_step(process, x0, eps, t_next, eta: float = 0.0, t=None, key=None):
    """x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z,  c = eta * posterior std of q(x_s | x_t, x0)
    (Song, Meng & Ermon 2021, eq. 12, for a general Gaussian path); eta = 0 (no t, key needed) is
    the first-order exponential integrator alpha_s x0 + sigma_s eps, exact where alpha_t = 0."""
    alpha_s = broadcast_to_data(process.alpha(t_next), x0)
    sigma_s = broadcast_to_data(process.sigma(t_next), x0)
    if eta == 0.0:
        return alpha_s * x0 + sigma_s * eps
    c = eta * _posterior_std(process, t, t_next)
    noise = jax.random.normal(key, x0.shape, x0.dtype)
    return alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s**2 - c**2, 0.0)) * eps + c * noise


def ddim_data_form(process, x, x0, t, s, noise_rate=0.0, noise=None):
    """The DDIM step written in (x_t, x0), the data form the multistep solvers correct:
    x_s = (sigma_s/sigma_t) e^{-eta h} x_t + alpha_s (1 - e^{-(1+eta) h}) x0 [+ sigma_s sqrt(1 - e^{-2 eta h}) z],
    DPM-Solver++(1) (= `ddim_step` with eta = 0) for noise rate eta = 0, its SDE version
    (SA-Solver, SDE-DPM-Solver++) for eta > 0. e^{-h} = alpha_t sigma_s / (sigma_t alpha_s) comes
    from the process, so alpha_t = 0 (lam_t = -inf) needs no clipping."""
    alpha_t, sigma_t = process.alpha(t), process.sigma(t)
    alpha_s, sigma_s = process.alpha(s), process.sigma(s)
    decay = alpha_t * sigma_s / (sigma_t * alpha_s)  # e^{-h}
    keep = decay**noise_rate  # e^{-eta h}
    b = lambda c: broadcast_to_data(c, x)  # noqa: E731
    out = b(sigma_s / sigma_t * keep) * x + b(alpha_s * (1.0 - decay * keep)) * x0
    if noise is not None:
        out = out + b(sigma_s * jnp.sqrt(jnp.maximum(1.0 - keep**2, 0.0))) * noise
    return out


@dataclasses.dataclass(frozen=True)
class DDIM(Solver):
    """DDIM (Song, Meng & Ermon 2021). eta = 0: deterministic (the first-order exponential
    integrator of the probability-flow ODE); eta = 1: ancestral sampling. 1 NFE per step.

    Against diffusers (eta = 0): its DDIMScheduler with set_alpha_to_one ends with a step into
    alpha = 1, i.e. the x0 prediction at its last timestep, which is `sample(...,
    denoise_final=True)` on its N timesteps as an explicit grid (N - 1 steps). It steps from
    timestep t to t - T // N (T training steps), which with "trailing" spacing is its next
    timestep only when N divides T; otherwise no grid reproduces it. Its default
    clip_sample=True clamps x0 to [-1, 1]; nothing here clips. Its EulerDiscreteScheduler (Euler in
    the noise level sigma/alpha on x/alpha, s_churn = 0) is this same step: DDIM on its nonzero
    sigmas with denoise_final=True reproduces it. eta > 0 was not compared.
    """

    eta: float = 0.0

    def __post_init__(self):
        check_unit_interval(self, "eta")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    def step(self, denoiser, x, state, t, t_next, key):
        x0, eps = denoiser.predict(x, t)
        return ddim_step(denoiser.process, x0, eps, t_next, float(self.eta), t, key), state


@dataclasses.dataclass(frozen=True)
class Ancestral(Solver):
    """Ancestral sampling (Ho et al. 2020): draw x_s from the Gaussian posterior q(x_s | x_t, x0)
    with x0 predicted, mean (alpha_{t|s} sigma_s^2 x_t + alpha_s sigma_{t|s}^2 x0)/sigma_t^2.
    Identical to DDIM with eta = 1. 1 NFE per step."""

    stochastic: ClassVar[bool] = True

    def step(self, denoiser, x, state, t, t_next, key):
        return DDIM(eta=1.0).step(denoiser, x, state, t, t_next, key)
