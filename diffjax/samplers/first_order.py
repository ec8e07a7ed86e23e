"""The core solvers: DDIM (with eta), ancestral DDPM sampling, probability-flow ODE Euler and
Heun, and Euler-Maruyama on the reverse SDE. All work on any Gaussian path."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.samplers.base import Solver

__all__ = ["DDIM", "Ancestral", "Euler", "Heun", "EulerMaruyama"]


def _posterior_std(process, t, s):
    """Std of q(x_s | x_t, x0) for s < t: sigma_s sqrt(1 - exp(lambda_t - lambda_s))."""
    return process.sigma(s) * jnp.sqrt(-jnp.expm1(process.log_snr(t) - process.log_snr(s)))


def ddim_update(denoiser, x, t, t_next, key, eta: float):
    """x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z,  c = eta * posterior std
    (Song, Meng & Ermon 2021, eq. 12, for a general Gaussian path)."""
    process = denoiser.process
    x0, eps = denoiser.predict(x, t)
    alpha_s, sigma_s = process.alpha(t_next), process.sigma(t_next)
    if eta == 0.0:
        return alpha_s * x0 + sigma_s * eps
    c = eta * _posterior_std(process, t, t_next)
    noise = jax.random.normal(key, x.shape, x.dtype)
    return alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s**2 - c**2, 0.0)) * eps + c * noise


@dataclasses.dataclass(frozen=True)
class DDIM(Solver):
    """DDIM (Song, Meng & Ermon 2021). eta = 0: deterministic (the first-order exponential
    integrator of the probability-flow ODE); eta = 1: ancestral sampling. 1 NFE per step."""

    eta: float = 0.0

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.eta > 0

    def check(self, process, steps, t_min, t_max):
        if not (isinstance(self.eta, (int, float)) and 0.0 <= self.eta <= 1.0):
            raise ValueError(f"DDIM eta must lie in [0, 1], got {self.eta!r}")

    def step(self, denoiser, x, state, t, t_next, key):
        return ddim_update(denoiser, x, t, t_next, key, float(self.eta)), state


@dataclasses.dataclass(frozen=True)
class Ancestral(Solver):
    """Ancestral sampling (Ho et al. 2020): draw x_s from the Gaussian posterior q(x_s | x_t, x0)
    with x0 predicted, mean (alpha_{t|s} sigma_s^2 x_t + alpha_s sigma_{t|s}^2 x0)/sigma_t^2.
    Identical to DDIM with eta = 1. 1 NFE per step."""

    stochastic: ClassVar[bool] = True

    def step(self, denoiser, x, state, t, t_next, key):
        return ddim_update(denoiser, x, t, t_next, key, 1.0), state


@dataclasses.dataclass(frozen=True)
class Euler(Solver):
    """Euler on the probability-flow ODE dx/dt = f x - g^2/2 score = alpha' x0 + sigma' eps.
    1 NFE per step; first order."""

    def step(self, denoiser, x, state, t, t_next, key):
        return x + (t_next - t) * denoiser.flow(x, t), state


@dataclasses.dataclass(frozen=True)
class Heun(Solver):
    """Heun's method (explicit trapezoid) on the probability-flow ODE, as in EDM (Karras et al.
    2022, Alg. 1). 2 NFE per step; second order."""

    nfe_per_step: ClassVar[int] = 2

    def step(self, denoiser, x, state, t, t_next, key):
        h = t_next - t
        d_cur = denoiser.flow(x, t)
        x_euler = x + h * d_cur
        d_next = denoiser.flow(x_euler, t_next)
        return x + 0.5 * h * (d_cur + d_next), state


@dataclasses.dataclass(frozen=True)
class EulerMaruyama(Solver):
    """Euler-Maruyama on the reverse SDE (Anderson 1982; Song et al. 2021):
    dx = [f x - g^2 score] dt + g dW,  stepped backwards in t. 1 NFE per step; strong order 1/2."""

    stochastic: ClassVar[bool] = True

    def check(self, process, steps, t_min, t_max):
        with jax.ensure_compile_time_eval():  # evaluate eagerly even inside a jit trace
            f, g = process.sde(np.float32(t_max))
        if not (np.isfinite(f) and np.isfinite(g)):
            raise ValueError(
                f"euler_maruyama: the SDE of {type(process).__name__} is singular at t_max={t_max} "
                "(alpha(t_max) = 0); pass a smaller t_max (e.g. 0.999) or use 'ancestral'/'ddim'"
            )

    def step(self, denoiser, x, state, t, t_next, key):
        f, g = denoiser.process.sde(t)
        dt = t_next - t  # negative
        drift = f * x - g**2 * denoiser.score(x, t)
        noise = jax.random.normal(key, x.shape, x.dtype)
        return x + dt * drift + g * jnp.sqrt(-dt) * noise, state
