"""Likelihood bounds of discrete diffusion: -ELBO in nats per example and bits per token.

- `masked_elbo_nats`: the continuous-time bound of the masked process, averaged over `num_samples`
  stratified times (no discretisation: with the exact denoiser it equals -log p(x0), since it is the
  any-order autoregressive likelihood; Ou et al. 2024).
- `discrete_elbo_nats`: the T-step bound of any process, KL(q(x_1 | x0) || prior) + sum_{i=1}^T
  E KL(q(x_{s_i} | x_{t_i}, x0) || p(x_{s_i} | x_{t_i})), one draw of x_t per step; it tightens as T grows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffjax.discrete.denoisers import CategoricalDenoiser
from diffjax.discrete.losses import DiscreteTimes, masked_elbo_integrand, step_kl
from diffjax.validation import check_count

__all__ = ["masked_elbo_nats", "discrete_elbo_nats", "prior_kl", "bits_per_token"]


def masked_elbo_nats(denoiser: CategoricalDenoiser, key, x0, num_samples: int = 16):
    """-ELBO (batch,) of the masked process, averaged over num_samples stratified times per example."""
    check_count("num_samples", num_samples)
    denoiser.process.check_data(x0)
    keys = jax.random.split(key, num_samples + 1)
    u = DiscreteTimes("stratified")(keys[0], num_samples)

    def one(carry, inputs):
        k, shift = inputs
        k_t, k_x = jax.random.split(k)
        t = jnp.mod(shift + jax.random.uniform(k_t, (x0.shape[0],)) / num_samples, 1.0)
        x_t = denoiser.process.marginal_sample(k_x, x0, t)
        return carry + masked_elbo_integrand(denoiser, x0, x_t, t), None

    total, _ = jax.lax.scan(one, jnp.zeros(x0.shape[0]), (keys[1:], u))
    return total / num_samples


def prior_kl(process, x0):
    """sum_n KL(q(x_1^n | x0^n) || prior), (batch,)."""
    q = process.marginal_probs(x0, jnp.float32(1.0))
    prior = process.prior_probs()
    safe = jnp.where(q > 0, q, 1.0)
    kl = jnp.sum(jnp.where(q > 0, q * (jnp.log(safe) - jnp.log(jnp.maximum(prior, 1e-30))), 0.0), axis=-1)
    return jnp.sum(kl.reshape(x0.shape[0], -1), axis=1)


def discrete_elbo_nats(denoiser: CategoricalDenoiser, key, x0, num_steps: int):
    """-ELBO (batch,) with the T = num_steps grid t_i = i / T, one draw of x_t per step."""
    check_count("num_steps", num_steps)
    denoiser.process.check_data(x0)

    def one(carry, inputs):
        i, k = inputs
        t, s = i / num_steps, (i - 1) / num_steps
        tb = jnp.full((x0.shape[0],), t)
        x_t = denoiser.process.marginal_sample(k, x0, tb)
        return carry + step_kl(denoiser, x0, x_t, jnp.full_like(tb, s), tb), None

    steps = jnp.arange(1, num_steps + 1, dtype=jnp.float32)
    total, _ = jax.lax.scan(one, prior_kl(denoiser.process, x0), (steps, jax.random.split(key, num_steps)))
    return total


def bits_per_token(nats, x0):
    """nats per example -> bits per token (per dimension for images)."""
    return nats / (math.prod(x0.shape[1:]) * math.log(2.0))
