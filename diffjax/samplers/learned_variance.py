"""Ancestral sampling with a learned variance (improved DDPM, Nichol & Dhariwal 2021): the step DiT's
and ADM's own samplers take, on any grid of the chain (e.g. DiT's 250 respaced steps)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.denoisers import LearnedVarianceDenoiser, gaussian_posterior, interpolated_log_variance
from diffjax.samplers.base import Solver

__all__ = ["LearnedVarianceAncestral", "respaced_times"]


@dataclasses.dataclass(frozen=True)
class LearnedVarianceAncestral(Solver):
    """x_s ~ N(mu(x_t, x0_hat), exp(f log sigma_{t|s}^2 + (1 - f) log sigma_tilde^2)), f = (v + 1)/2:
    the Gaussian posterior q(x_s | x_t, x0) with x0 predicted and the variance interpolated by the
    network's v (`LearnedVarianceDenoiser`; a plain `Denoiser` has no v and gets v = -1). With
    v = -1 it is `Ancestral`. 1 NFE per step; the
    last step of guided-diffusion's loop (to the chain's start, no noise) is `sample`'s final
    denoising."""

    stochastic: ClassVar[bool] = True

    def step(self, denoiser, x, state, t, t_next, key):
        batch = x.shape[0]
        t_b, s_b = jnp.broadcast_to(t, (batch,)), jnp.broadcast_to(t_next, (batch,))
        if isinstance(denoiser, LearnedVarianceDenoiser):
            x0, _, v = denoiser.predict_with_variance(x, t_b)
        else:  # no learned variance: v = -1, the posterior's own (this is then `Ancestral`)
            x0, eps = denoiser.predict(x, t_b)
            v = -jnp.ones_like(x0)
        mean, log_min, log_max = gaussian_posterior(denoiser.process, x, x0, t_b, s_b)
        log_var = interpolated_log_variance(v, log_min, log_max)
        noise = jax.random.normal(key, x0.shape, x0.dtype)
        return mean + jnp.exp(0.5 * log_var) * noise, state


def respaced_times(num_steps: int, count: int) -> np.ndarray:
    """The times of guided-diffusion's `space_timesteps(num_steps, [count])` (DiT samples with
    count = 250 of 1000), decreasing, as (index + 1) / num_steps: steps i * (num_steps - 1) /
    (count - 1) rounded, i = 0..count-1. A `Times` grid for `sample` (count - 1 steps)."""
    if not (isinstance(num_steps, int) and isinstance(count, int) and 2 <= count <= num_steps):
        raise ValueError(f"respaced_times needs ints 2 <= count <= num_steps, got num_steps={num_steps}, count={count}")
    stride = (num_steps - 1) / (count - 1)
    index = sorted({round(i * stride) for i in range(count)})
    return (np.asarray(index[::-1], np.float64) + 1) / num_steps
