"""Discrete diffusion losses, per example in nats.

- `masked_diffusion_loss`: the continuous-time ELBO of the masked process (Shi et al. 2024, MD4;
  Sahoo et al. 2024, MDLM) as a weighted cross-entropy. For a masked position with clean token x0,
  beta_t(v) = -alpha'_t(v) / (1 - alpha_t(v)) and mu the denoiser's x_0 distribution,

      integrand = sum_v mu(v) beta_t(v) - beta_t(x0) - beta_t(x0) log mu(x0),

  which is -beta_t log mu(x0) for a state-independent schedule; summed over masked positions and
  averaged over t ~ U[0, 1] it is -ELBO >= -log p(x0).
- `step_kl`: KL(q(x_s | x_t, x0) || p(x_s | x_t)) summed over positions (at s = 0 it is the
  reconstruction term -log p(x0 | x_t)), the term of every discrete-time bound.
- `d3pm_hybrid_loss`: Austin et al. 2021's L_vb + lambda L_ce on one random step i of a T-step grid:
  KL_i + lambda sum_n -log mu(x0^n | x_t).

Time sampling (`DiscreteTimes`): "uniform" (iid), "antithetic" (pairs u, 1 - u) or "stratified"
(low-discrepancy, t_i = (u + i / n) mod 1, Kingma et al. 2021); all have density 1 on [0, 1].

`make_discrete_loss_fn` gives the trainer's `loss_fn(params, key, batch) -> (loss, aux)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax.discrete.denoisers import CategoricalDenoiser
from diffjax.discrete.processes import DiscreteProcess, MaskedProcess
from diffjax.validation import check_choice, check_count, check_number

__all__ = [
    "DiscreteTimes",
    "DISCRETE_LOSSES",
    "masked_elbo_integrand",
    "masked_diffusion_loss",
    "step_kl",
    "d3pm_hybrid_loss",
    "make_discrete_loss_fn",
]

TIME_METHODS = ("uniform", "antithetic", "stratified")


@dataclasses.dataclass(frozen=True)
class DiscreteTimes:
    """n times in [0, 1) with density 1: iid, antithetic pairs, or stratified (low-discrepancy)."""

    method: str = "stratified"

    def __post_init__(self):
        check_choice("time sampling method", self.method, TIME_METHODS)

    def __call__(self, key, n: int):
        return self.from_uniforms(jax.random.uniform(key, self.uniforms_shape(n)), n)

    def uniforms_shape(self, n: int) -> tuple[int, ...]:
        """The U[0, 1) draws n times are made from: one ("stratified"), (n + 1) // 2 ("antithetic") or n."""
        return {"stratified": (), "antithetic": ((n + 1) // 2,)}.get(self.method, (n,))

    def from_uniforms(self, u, n: int):
        """The n times made from uniforms u of shape `uniforms_shape(n)`: "stratified" is
        (u + i / n) mod 1 (MD4's `antithetic_time_sampling`), "antithetic" is (u, 1 - u)."""
        if self.method == "stratified":
            return jnp.mod(u + jnp.arange(n) / n, 1.0)
        if self.method == "antithetic":
            return jnp.concatenate([u, 1.0 - u])[:n]
        return u


def _per_example_sum(x):
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _check_masked(denoiser) -> MaskedProcess:
    if not isinstance(denoiser, CategoricalDenoiser):
        raise TypeError(f"denoiser must be a CategoricalDenoiser, got {type(denoiser).__name__}")
    if not isinstance(denoiser.process, MaskedProcess):
        raise ValueError(f"the masked ELBO needs a MaskedProcess, got {type(denoiser.process).__name__}")
    return denoiser.process


def masked_elbo_integrand(denoiser: CategoricalDenoiser, x0, x_t, t):
    """The continuous-time integrand at t (batch,) for the draw x_t ~ q(x_t | x0): (batch,) nats."""
    process = _check_masked(denoiser)
    beta = process.unmasking_rate(t)  # (batch, V)
    beta = beta.reshape((x0.shape[0],) + (1,) * (x0.ndim - 1) + (process.vocab_size,))
    masked = (x_t == process.mask_id)[..., None]
    log_mu = jnp.where(masked, jax.nn.log_softmax(denoiser.logits(x_t, t), axis=-1), 0.0)
    beta_x0 = jnp.take_along_axis(jnp.broadcast_to(beta, log_mu.shape), x0[..., None], axis=-1)
    term = jnp.sum(jnp.exp(log_mu) * beta, axis=-1, keepdims=True) - beta_x0
    term = term - beta_x0 * jnp.take_along_axis(log_mu, x0[..., None], axis=-1)
    return _per_example_sum(jnp.where(masked, term, 0.0))


def masked_diffusion_loss(denoiser: CategoricalDenoiser, key, x0, times: DiscreteTimes = DiscreteTimes()):
    """One-sample estimate of -ELBO (nats per example, (batch,)) of the masked process."""
    _check_masked(denoiser).check_data(x0)
    key_t, key_x = jax.random.split(key)
    t = times(key_t, x0.shape[0])
    x_t = denoiser.process.marginal_sample(key_x, x0, t)
    return masked_elbo_integrand(denoiser, x0, x_t, t)


def _categorical_kl(q, p):
    safe_q = jnp.where(q > 0, q, 1.0)
    return jnp.sum(jnp.where(q > 0, q * (jnp.log(safe_q) - jnp.log(jnp.maximum(p, 1e-30))), 0.0), axis=-1)


def step_kl(denoiser: CategoricalDenoiser, x0, x_t, s, t):
    """KL(q(x_s | x_t, x0) || p(x_s | x_t)) summed over positions, (batch,) nats."""
    process = denoiser.process
    q = process.posterior_probs(x_t, jax.nn.one_hot(x0, process.vocab_size), s, t)
    return _per_example_sum(_categorical_kl(q, denoiser.posterior_probs(x_t, s, t)))


def d3pm_hybrid_loss(denoiser: CategoricalDenoiser, key, x0, num_steps: int, ce_weight: float = 0.01):
    """KL_i + ce_weight * sum_n -log mu(x0^n | x_t) at a uniformly drawn step i of num_steps, (batch,)."""
    denoiser.process.check_data(x0)
    check_count("num_steps", num_steps)
    key_i, key_x = jax.random.split(key)
    i = jax.random.randint(key_i, (x0.shape[0],), 1, num_steps + 1)
    t, s = i / num_steps, (i - 1) / num_steps
    x_t = denoiser.process.marginal_sample(key_x, x0, t)
    log_mu = jax.nn.log_softmax(denoiser.logits(x_t, t), axis=-1)
    ce = -jnp.take_along_axis(jnp.maximum(log_mu, -1e30), x0[..., None], axis=-1)[..., 0]
    return step_kl(denoiser, x0, x_t, s, t) + ce_weight * _per_example_sum(ce)


DISCRETE_LOSSES = ("masked_elbo", "d3pm_hybrid")


def make_discrete_loss_fn(
    apply: Callable,
    process: DiscreteProcess,
    loss: str = "masked_elbo",
    *,
    time_free: bool = False,
    times: DiscreteTimes = DiscreteTimes(),
    num_steps: int | None = None,
    ce_weight: float = 0.01,
) -> Callable:
    """`loss_fn(params, key, batch) -> (loss, aux)` for `make_train_step`: apply(params, x_t, t) -> logits;
    batch: tokens (batch, ...) or a dict with "tokens". num_steps (d3pm_hybrid): the grid, by default the
    D3PM's own steps (1000 for continuous-time processes). loss is nats per token; aux["bits_per_token"]
    is the same in bits (for "masked_elbo" an unbiased estimate of the -ELBO)."""
    check_choice("discrete loss", loss, DISCRETE_LOSSES)
    if num_steps is None:
        num_steps = getattr(process, "num_steps", 1000)
    check_count("num_steps", num_steps)
    check_number("ce_weight", ce_weight)

    def loss_fn(params, key, batch):
        x0 = batch["tokens"] if isinstance(batch, dict) else batch
        denoiser = CategoricalDenoiser(lambda x, t: apply(params, x, t), process, time_free)
        if loss == "masked_elbo":
            per_example = masked_diffusion_loss(denoiser, key, x0, times)
        else:
            per_example = d3pm_hybrid_loss(denoiser, key, x0, num_steps, ce_weight)
        per_token = jnp.mean(per_example) / math.prod(x0.shape[1:])
        return per_token, {"bits_per_token": per_token / math.log(2.0)}

    return loss_fn
