"""Guidance by gradients at sampling time: classifier guidance and reward-gradient guidance.

Both shift the score of a denoiser and return a new `Denoiser` (in the x0 view,
x0' = x0 + sigma^2/alpha * g), so they combine with every solver and with the combinators of
`diffjax.denoisers` (e.g. classifier-free guidance first, then a reward on top):

    classifier guidance   g = scale * grad_x log p_t(c | x)   (Dhariwal & Nichol 2021): the classifier
                          sees the noisy x_t and t
    reward guidance       g = scale * grad_x r(x0_hat(x, t)): the gradient of a reward of the denoised
                          sample, back-propagated through the network (universal guidance, Bansal et
                          al. 2023, without its recurrence); for Gaussian data and a linear reward it is
                          the exact score of the tilted density p exp(scale * r)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax.control.posterior import x0_correction
from diffjax.denoisers import Denoiser
from diffjax.validation import check_number

__all__ = ["classifier_guidance", "reward_guidance"]


def _check(name: str, denoiser, fn, scale) -> float:
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"{name}: denoiser must be a diffjax.Denoiser, got {type(denoiser).__name__}")
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable, got {fn!r:.100}")
    return check_number(f"{name} scale", scale)


def _per_example_value(name, value, x):
    if value.shape != (x.shape[0],):
        raise ValueError(f"{name} must return one value per example, shape ({x.shape[0]},); got {value.shape}")
    return jnp.sum(value)


def classifier_guidance(denoiser: Denoiser, log_prob: Callable, scale: float = 1.0) -> Denoiser:
    """The score plus scale * grad_x log_prob(x, t), log_prob(x_t, t) -> (batch,) the log-probability of
    the wanted class under a classifier of noisy inputs."""
    scale = _check("classifier_guidance", denoiser, log_prob, scale)

    def fn(x, t):
        x0 = denoiser.x0(x, t)
        g = jax.grad(lambda x: _per_example_value("log_prob", log_prob(x, t), x))(x)
        return x0 + x0_correction(denoiser.process, t, x, scale * g)

    return Denoiser(fn, denoiser.process, "x0")


def reward_guidance(denoiser: Denoiser, reward: Callable, scale: float = 1.0) -> Denoiser:
    """The score plus scale * grad_x reward(x0_hat(x, t)), reward(x0) -> (batch,)."""
    scale = _check("reward_guidance", denoiser, reward, scale)

    def fn(x, t):
        def total(x):
            x0 = denoiser.x0(x, t)
            return _per_example_value("reward", reward(x0), x), x0

        g, x0 = jax.grad(total, has_aux=True)(x)
        return x0 + x0_correction(denoiser.process, t, x, scale * g)

    return Denoiser(fn, denoiser.process, "x0")
