"""EDM samplers (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Alg. 1 and 2) and DEIS (Zhang & Chen 2023, rho-AB-DEIS). Both work in the scaled variables
of any Gaussian path: x~ = x/alpha and the EDM noise level s = sigma/alpha, where the
probability-flow ODE is dx~/ds = eps(x, t(s)) and x~ = x0 + s eps for the denoiser's pair."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.processes import broadcast_to_data
from diffjax.samplers.base import Phase, Solver
from diffjax.samplers.exponential import (
    check_order,
    ddim_step,
    half_log_snr,
    is_concrete_zero_alpha,
    order_phases,
    polynomial_correction,
    push,
)

__all__ = ["EDMHeun", "EDMStochastic", "DEIS"]


def noise_level(process, t):
    """The EDM noise level s = sigma/alpha = exp(-lam) (lam clipped, so finite where alpha = 0)."""
    return jnp.exp(-half_log_snr(process, t))


def _scaled_heun(denoiser, x, t, t_next, heun: bool):
    """Euler (+ Heun's trapezoid correction) in (x~, s) from x at t to t_next."""
    process = denoiser.process
    x0, eps = denoiser.predict(x, t)
    x_next = ddim_step(process, x0, eps, t_next)  # Euler in (x~, s) is DDIM
    if not heun:
        return x_next
    _, eps_next = denoiser.predict(x_next, t_next)
    ds = noise_level(process, t_next) - noise_level(process, t)
    return x_next + broadcast_to_data(process.alpha(t_next) * ds / 2.0, x) * (eps_next - eps)


@dataclasses.dataclass(frozen=True)
class EDMHeun(Solver):
    """EDM's deterministic sampler (Karras et al. 2022, Alg. 1): Heun's method on dx~/ds = eps in the
    EDM noise level s = sigma/alpha (not in the process's t, unlike "heun"). 2 NFE per step; second
    order. Where alpha(t_max) = 0 (flow matching, cosine) s is infinite at the start, so the first
    step is an Euler step (1 NFE), mirroring EDM's Euler step into s = 0.
    """

    nfe_per_step: ClassVar[int] = 2
    euler_first: bool = dataclasses.field(default=False, repr=False)

    def prepare(self, process, steps, t_min, t_max):
        return dataclasses.replace(self, euler_first=is_concrete_zero_alpha(process, t_max))

    def phases(self, steps):
        if self.euler_first:
            return (Phase(1, (("heun", False),)), Phase(steps - 1, (("heun", True),)))
        return (Phase(steps, (("heun", True),)),)

    def nfe(self, steps):
        return 2 * steps - (1 if self.euler_first else 0)

    def step(self, denoiser, x, state, t, t_next, key, heun):
        return _scaled_heun(denoiser, x, t, t_next, heun), state


@dataclasses.dataclass(frozen=True)
class EDMStochastic(EDMHeun):
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): at each step with s in [s_min, s_max]
    raise the noise level to s^ = s (1 + gamma), gamma = min(s_churn/steps, sqrt(2) - 1), by adding
    N(0, (s^2 - s^2) s_noise^2) noise to x~, then take the Heun step from s^. s^ is capped at the
    process's largest noise level. 2 NFE per step. Defaults follow the paper's ImageNet-64 setting
    except s_noise = 1 (the value that keeps the sampler exact for an exact denoiser).
    """

    stochastic: ClassVar[bool] = True
    s_churn: float = 40.0
    s_min: float = 0.05
    s_max: float = 50.0
    s_noise: float = 1.0

    def check(self, process, steps, t_min, t_max):
        for name in ("s_churn", "s_min", "s_noise"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"edm: {name} must be a number >= 0, got {value!r}")
        if not (isinstance(self.s_max, (int, float)) and self.s_max >= self.s_min):
            raise ValueError(f"edm: s_max must be a number >= s_min = {self.s_min}, got {self.s_max!r}")

    def phases(self, steps):
        gamma = min(self.s_churn / steps, math.sqrt(2.0) - 1.0)
        return tuple(
            Phase(p.length, p.options + (("gamma", gamma if dict(p.options)["heun"] else 0.0),))
            for p in super().phases(steps)
        )

    def step(self, denoiser, x, state, t, t_next, key, heun, gamma):
        if gamma > 0:
            process = denoiser.process
            s = noise_level(process, t)
            gamma_t = jnp.where((s >= self.s_min) & (s <= self.s_max), gamma, 0.0)
            t_hat = jnp.where(gamma_t > 0, process.t_from_log_snr(-2.0 * jnp.log(s * (1 + gamma_t))), t)
            s_hat = noise_level(process, t_hat)
            noise = jax.random.normal(key, x.shape, x.dtype)
            std = jnp.sqrt(jnp.maximum(s_hat**2 - s**2, 0.0)) * self.s_noise
            x = broadcast_to_data(process.alpha(t_hat), x) * (
                x / broadcast_to_data(process.alpha(t), x) + broadcast_to_data(std, x) * noise
            )
            t = t_hat
        return _scaled_heun(denoiser, x, t, t_next, heun), state


@dataclasses.dataclass(frozen=True)
class DEIS(Solver):
    """rho-AB-DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
    Integrator", eq. 15): Adams-Bashforth on dx~/ds = eps in the EDM noise level s = sigma/alpha with
    the Lagrange polynomial through the last `order` eps predictions integrated exactly, so the
    order holds on any grid (iPNDM uses fixed coefficients instead). Warm-up with lower orders.
    1 NFE per step; global order = `order`.
    """

    order: int = 3

    def check(self, process, steps, t_min, t_max):
        check_order("deis", self.order, (1, 2, 3, 4))

    def init(self, denoiser, x, ts):
        k = max(self.order - 1, 1)
        return jnp.zeros((k,) + x.shape, x.dtype), jnp.zeros((k,), jnp.float32)

    def phases(self, steps):
        return order_phases([min(self.order, i + 1) for i in range(steps)])

    def step(self, denoiser, x, state, t, t_next, key, order):
        process = denoiser.process
        history, levels = state
        x0, eps = denoiser.predict(x, t)
        s_t, s_next = noise_level(process, t), noise_level(process, t_next)
        x_next = ddim_step(process, x0, eps, t_next)
        if order > 1:
            values = [eps] + [history[k] for k in range(order - 1)]
            nodes = [s_t] + [levels[k] for k in range(order - 1)]
            corr = polynomial_correction(values, nodes, s_t, s_next, 0.0)
            x_next = x_next + broadcast_to_data(process.alpha(t_next), x) * corr
        return x_next, (push(history, eps), push(levels, s_t))
