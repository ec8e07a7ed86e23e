"""The categorical denoiser: network logits over x_0 -> every reverse-time view.

A network `fn(x_t, t) -> logits` of shape x_t.shape + (vocab_size,) predicts mu(x_0 | x_t) at every
position (the x_0- or "mean" parameterisation of Austin et al. 2021, Shi et al. 2024, Sahoo et al.
2024). `CategoricalDenoiser` wraps it with its process:

    x0_probs(x_t, t)            mu, with values of x_0 that cannot produce x_t (q(x_t | x_0) = 0)
                                removed: for the masked process an unmasked token is carried over
                                and the mask is never predicted;
    posterior_probs(x_t, s, t)  p(x_s | x_t) = sum_{x0} mu(x0) q(x_s | x_t, x0);
    reverse_rates(x_t, t)       the reverse-time CTMC rates, for tau-leaping.

With mu the exact conditional p(x_0^n | x_t) these are exact per position. `time_free=True` is
RADD's parameterisation (Ou et al. 2024) for the masked process with a state-independent schedule:
there p(x_0 | x_t) does not depend on t, the network is called with t = 0, and its output can be
reused for as long as x_t does not change.

Guidance: `discrete_guidance(cond_fn, uncond_fn, scale)` is classifier-free guidance on the x_0 logits,
log mu_w = (1 + w) log mu(x_0 | x_t, c) - w log mu(x_0 | x_t), renormalised (Nisonoff et al. 2024 apply
it to rates; on the x_0 logits it is the form used by Schiff et al. 2024 and MaskGIT-style samplers).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax.discrete.processes import DiscreteProcess, MaskedProcess
from diffjax.validation import check_number

__all__ = ["CategoricalDenoiser", "discrete_guidance", "support_log_mask"]


def support_log_mask(process: DiscreteProcess, x_t, t):
    """0 where q(x_t | x_0 = v) > 0 and -inf elsewhere: x_t.shape + (vocab_size,)."""
    tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
    qbar = process.marginal_matrix(tb)  # (batch, V, S)
    flat = x_t.reshape(x_t.shape[0], -1)
    like = jnp.take_along_axis(qbar, flat[:, None, :], axis=2).transpose(0, 2, 1)
    return jnp.where(like > 0, 0.0, -jnp.inf).reshape(x_t.shape + (process.vocab_size,))


@jax.tree_util.register_pytree_node_class
class CategoricalDenoiser:
    """A logits network with its discrete process.

    Args:
      fn: `fn(x_t, t) -> logits`, x_t integer states (batch, ...), t of shape (batch,), logits
        x_t.shape + (vocab_size,); conditioning is closed over.
      process: the `DiscreteProcess` it was trained with.
      time_free: RADD's time-free parameterisation (masked process, state-independent schedule only).
    """

    def __init__(self, fn: Callable, process: DiscreteProcess, time_free: bool = False):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(process, DiscreteProcess):
            raise TypeError(f"process must be a diffjax.discrete process, got {type(process).__name__}")
        if not isinstance(time_free, bool):
            raise TypeError(f"time_free must be True or False, got {time_free!r:.100}")
        if time_free and not (isinstance(process, MaskedProcess) and not process.state_dependent):
            raise ValueError(
                "time_free (RADD) needs a MaskedProcess with a state-independent schedule, "
                f"got {type(process).__name__}"
            )
        self.fn, self.process, self.time_free = fn, process, time_free

    def tree_flatten(self):
        return (self.process,), (self.fn, self.time_free)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.fn, obj.time_free = aux
        (obj.process,) = children
        return obj

    def logits(self, x_t, t):
        """The network's logits with unreachable values of x_0 set to -inf."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
        raw = self.fn(x_t, jnp.zeros_like(t) if self.time_free else t)
        return raw.astype(jnp.float32) + support_log_mask(self.process, x_t, t)

    def x0_probs(self, x_t, t):
        return jax.nn.softmax(self.logits(x_t, t), axis=-1)

    def posterior_probs(self, x_t, s, t, x0_probs=None):
        """p(x_s | x_t) at every position; x0_probs: a precomputed (e.g. cached) mu."""
        mu = self.x0_probs(x_t, t) if x0_probs is None else x0_probs
        return self.process.posterior_probs(x_t, mu, s, t)

    def reverse_rates(self, x_t, t, x0_probs=None):
        mu = self.x0_probs(x_t, t) if x0_probs is None else x0_probs
        return self.process.reverse_rates(x_t, mu, t)


def discrete_guidance(cond_fn: Callable, uncond_fn: Callable, scale: float) -> Callable:
    """Classifier-free guidance on x_0 logits: (1 + w) log_softmax(cond) - w log_softmax(uncond).
    w = scale; w = 0 is the conditional network."""
    w = check_number("guidance scale", scale)

    def guided(x_t, t):
        cond = jax.nn.log_softmax(cond_fn(x_t, t).astype(jnp.float32), axis=-1)
        if w == 0.0:
            return cond
        uncond = jax.nn.log_softmax(uncond_fn(x_t, t).astype(jnp.float32), axis=-1)
        return (1.0 + w) * cond - w * uncond

    return guided
