"""Heun's method (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Alg. 1 and 2): in the process's t ("heun"), and EDM's deterministic and stochastic
samplers in the scaled variables of any Gaussian path, x~ = x/alpha and the EDM noise level
s = sigma/alpha, where the probability-flow ODE is dx~/ds = eps(x, t(s)) and x~ = x0 + s eps."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.processes import broadcast_to_data
from diffjax.samplers.base import (
    Phase,
    Solver,
    check_nonnegative,
    check_option,
    phase_field,
    specialise,
)
from diffjax.samplers.ddim import ddim_step
from diffjax.samplers.exponential import half_log_snr, is_concrete_zero_alpha

__all__ = ["Heun", "EDMHeun", "EDMStochastic", "heun_correction", "noise_level"]


def heun_correction(x_euler, d, d_next, h):
    """Heun's trapezoid from its Euler predictor x_euler = x + h d: x_euler + h/2 (d_next - d)."""
    return x_euler + h / 2.0 * (d_next - d)


def noise_level(process, t):
    """The EDM noise level s = sigma/alpha = exp(-lam) (lam clipped, so finite where alpha = 0)."""
    return jnp.exp(-half_log_snr(process, t))


@dataclasses.dataclass(frozen=True)
class Heun(Solver):
    """Heun's method (explicit trapezoid) on the probability-flow ODE dx/dt = alpha' x0 + sigma' eps
    in the process's t. 2 NFE per step; second order. diffusers' HeunDiscreteScheduler is Heun in
    the noise level sigma/alpha, i.e. `EDMHeun` (see there), not this solver."""

    nfe_per_step: ClassVar[int] = 2

    def step(self, denoiser, x, state, t, t_next, key):
        h = t_next - t
        d = denoiser.velocity(x, t)
        x_euler = x + h * d
        return heun_correction(x_euler, d, denoiser.velocity(x_euler, t_next), h), state


def _noise_level_heun(denoiser, x, t, t_next, correct: bool):
    """Euler (= DDIM) in (x~, s), then Heun's trapezoid when `correct`, from x at t to t_next."""
    process = denoiser.process
    x0, eps = denoiser.predict(x, t)
    x_euler = ddim_step(process, x0, eps, t_next)
    if not correct:
        return x_euler
    _, eps_next = denoiser.predict(x_euler, t_next)
    ds = noise_level(process, t_next) - noise_level(process, t)
    return heun_correction(x_euler, eps, eps_next, broadcast_to_data(process.alpha(t_next) * ds, x))


@dataclasses.dataclass(frozen=True)
class EDMHeun(Solver):
    """EDM's deterministic sampler (Karras et al. 2022, Alg. 1): Heun's method on dx~/ds = eps in the
    EDM noise level s = sigma/alpha (not in the process's t, unlike `Heun`). 2 NFE per step; second
    order. Where alpha(t_max) = 0 (flow matching, cosine) s is infinite at the start, so the first
    step is an Euler step (1 NFE), mirroring EDM's Euler step into s = 0.

    Against diffusers' HeunDiscreteScheduler (s_churn-free, prediction via x0): its N steps make
    2N - 1 network calls, the last step into sigma = 0 being an Euler step, which returns the x0
    prediction at its last nonzero sigma; that is `sample(..., denoise_final=True)` on its N
    nonzero sigmas (N - 1 steps) here, with the same count of calls.
    """

    nfe_per_step: ClassVar[int] = 2
    euler_first: bool = phase_field(False)  # set by prepare() where alpha(t_max) = 0
    correct: bool = phase_field(True)  # False: this phase takes Euler steps

    def prepare(self, process, steps, t_min, t_max):
        return specialise(self, euler_first=is_concrete_zero_alpha(process, t_max))

    def phases(self, steps):
        if self.euler_first:
            return (Phase(1, specialise(self, correct=False)), Phase(steps - 1, self))
        return (Phase(steps, self),)

    def nfe(self, steps):
        return 2 * steps - (1 if self.euler_first else 0)

    def step(self, denoiser, x, state, t, t_next, key):
        return _noise_level_heun(denoiser, x, t, t_next, self.correct), state


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
    gamma: float = phase_field(0.0)  # the churn of this phase (0 in an Euler phase)

    def __post_init__(self):
        for name in ("s_churn", "s_min", "s_noise", "s_max"):
            check_nonnegative(self, name)
        check_option(self, "s_max", self.s_max >= self.s_min, f"a number >= s_min = {self.s_min}")

    def phases(self, steps):
        gamma = min(self.s_churn / steps, math.sqrt(2.0) - 1.0)
        return tuple(
            Phase(p.length, specialise(p.solver, gamma=gamma if p.solver.correct else 0.0))
            for p in super().phases(steps)
        )

    def step(self, denoiser, x, state, t, t_next, key):
        if self.gamma > 0:
            process = denoiser.process
            s = noise_level(process, t)
            gamma_t = jnp.where((s >= self.s_min) & (s <= self.s_max), self.gamma, 0.0)
            t_hat = jnp.where(gamma_t > 0, process.t_from_log_snr(-2.0 * jnp.log(s * (1 + gamma_t))), t)
            s_hat = noise_level(process, t_hat)
            noise = jax.random.normal(key, x.shape, x.dtype)
            std = jnp.sqrt(jnp.maximum(s_hat**2 - s**2, 0.0)) * self.s_noise
            x = broadcast_to_data(process.alpha(t_hat), x) * (
                x / broadcast_to_data(process.alpha(t), x) + broadcast_to_data(std, x) * noise
            )
            t = t_hat
        return _noise_level_heun(denoiser, x, t, t_next, self.correct), state
