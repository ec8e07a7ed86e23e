"""Euler on the probability-flow ODE and Euler-Maruyama on the reverse SDE, in the process's t."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.samplers.base import Solver

__all__ = ["Euler", "EulerMaruyama"]


@dataclasses.dataclass(frozen=True)
class Euler(Solver):
    """Euler on the probability-flow ODE dx/dt = f x - g^2/2 score = alpha' x0 + sigma' eps.
    1 NFE per step; first order.

    This is Euler in the process's time t. diffusers' EulerDiscreteScheduler is Euler in the noise
    level sigma/alpha on x/alpha instead, which is `DDIM()` (see there), not this solver.
    """

    def step(self, denoiser, x, state, t, t_next, key):
        return x + (t_next - t) * denoiser.velocity(x, t), state


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
                f"EulerMaruyama: the SDE of {type(process).__name__} is singular at t_max={t_max} "
                "(alpha(t_max) = 0); pass a smaller t_max (e.g. 0.999) or use Ancestral()/DDIM()"
            )

    def step(self, denoiser, x, state, t, t_next, key):
        f, g = denoiser.process.sde(t)
        dt = t_next - t  # negative
        drift = f * x - g**2 * denoiser.score(x, t)
        noise = jax.random.normal(key, x.shape, x.dtype)
        return x + dt * drift + g * jnp.sqrt(-dt) * noise, state
