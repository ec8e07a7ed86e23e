"""Adaptive-step integration: the embedded Dormand-Prince 5(4) pair (Dormand & Prince 1980) with
error control, inside `lax.while_loop`. `dopri5` is the library's one adaptive integrator (a generic
pytree ODE solver); the "adaptive" sampler and `diffjax.likelihood` both run on it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.samplers.base import Solver, check_option, check_positive_option

__all__ = ["Adaptive", "dopri5", "ODESolution"]

# Butcher tableau of DOPRI5; the 7th stage is first-same-as-last (FSAL).
_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0])
_A = np.zeros((7, 7))
for _i, _row in enumerate(
    (
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    )
):
    _A[_i, : len(_row)] = _row
_B = _A[6]  # the 5th-order weights (b_7 = 0)
_B_LOW = np.array([5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40])
_E = _B - _B_LOW


class ODESolution(NamedTuple):
    """What `dopri5` returns."""

    y: Any  # the state at ts[-1]
    ys: Any  # the states at ts[1:] (leading axis len(ts) - 1), or None
    nfe: jax.Array  # evaluations of the right-hand side
    success: jax.Array  # whether ts[-1] was reached within max_steps attempted steps


def _combine(y, h, coefs, ks):
    """y + h * sum_i coefs[i] * ks[i], leaf by leaf; ks holds the 7 stages on a leading axis."""
    return jax.tree.map(lambda y, k: y + h * jnp.tensordot(coefs.astype(k.dtype), k, axes=1), y, ks)


def _error_ratio(err, y, y_new, rtol, atol):
    """max over leaves and examples of RMS(err / (atol + rtol max(|y|, |y_new|))) over the example."""

    def leaf(e, a, b):
        ratio = e / (atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)))
        return jnp.max(jnp.sqrt(jnp.mean(jnp.reshape(ratio, (ratio.shape[0], -1)) ** 2, axis=1)))

    return jnp.max(jnp.stack(jax.tree.leaves(jax.tree.map(leaf, err, y, y_new))))


def dopri5(
    f: Callable,
    y0,
    ts,
    *,
    rtol: float,
    atol: float,
    max_steps: int = 4096,
    h0=None,
    save_all: bool = False,
) -> ODESolution:
    """Integrate dy/dt = f(y, t) from ts[0] through the checkpoints ts[1:] (increasing or
    decreasing), which are hit exactly, with Dormand-Prince 5(4) and error control.

    `y` is a pytree whose leaves share a leading batch axis. A step is accepted when, for every
    leaf and example, the RMS over the example's elements of err / (atol + rtol max(|y|, |y_new|))
    is <= 1 (one step size for the batch, set by its worst example and leaf); the next step is
    h * clip(0.9 err^(-1/5), 0.2, 5). The first step is |h0| (default: 5 % of the first interval).
    Each attempted step costs 6 evaluations of f (FSAL) plus 1 to start, at most `max_steps`
    attempts in all; `success` is False when they ran out before ts[-1].
    """
    ts = jnp.asarray(ts)
    direction = jnp.sign(ts[-1] - ts[0])
    h0 = 0.05 * (ts[1] - ts[0]) if h0 is None else direction * jnp.abs(h0)

    def attempt(y, k1, t, h):
        # The stages run in a fori_loop so that f is traced (and compiled) once, not six times.
        ks = jax.tree.map(lambda k: jnp.zeros((7,) + k.shape, k.dtype).at[0].set(k), k1)

        def stage(i, ks):
            k_i = f(_combine(y, h, jnp.asarray(_A)[i], ks), t + jnp.asarray(_C, t.dtype)[i] * h)
            return jax.tree.map(lambda k, new: k.at[i].set(new), ks, k_i)

        ks = jax.lax.fori_loop(1, 7, stage, ks)
        y_new = _combine(y, h, jnp.asarray(_B), ks)
        err = jax.tree.map(lambda k: h * jnp.tensordot(jnp.asarray(_E, k.dtype), k, axes=1), ks)
        return y_new, jax.tree.map(lambda k: k[6], ks), _error_ratio(err, y, y_new, rtol, atol)

    def interval(carry, t_end):
        def cond(c):
            return ((t_end - c[2]) * direction > 0) & (c[5] < max_steps)

        def body(c):
            y, k1, t, h, nfe, count = c
            last = (t + h - t_end) * direction >= 0  # the step would reach or pass the checkpoint
            h_try = jnp.where(last, t_end - t, h)
            y_new, k_new, err = attempt(y, k1, t, h_try)
            ok = err <= 1.0
            factor = jnp.clip(0.9 * jnp.maximum(err, 1e-10) ** -0.2, 0.2, 5.0)
            t_new = jnp.where(ok, jnp.where(last, t_end, t + h_try), t)
            h_new = jnp.where(ok & last, h, h_try * factor)  # a cut-short last step keeps h
            pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
            return (pick(y_new, y), pick(k_new, k1), t_new.astype(t.dtype), h_new.astype(h.dtype), nfe + 6, count + 1)

        carry = jax.lax.while_loop(cond, body, carry)
        return carry, (carry[0] if save_all else None)

    t0 = ts[0]
    init = (y0, f(y0, t0), t0, jnp.asarray(h0, t0.dtype), jnp.int32(1), jnp.int32(0))
    (y, _, t, _, nfe, _), ys = jax.lax.scan(interval, init, ts[1:])
    return ODESolution(y, ys, nfe, t == ts[-1])


@dataclasses.dataclass(frozen=True)
class Adaptive(Solver):
    """Dormand-Prince 5(4) (`dopri5`) on the probability-flow ODE dx/dt = alpha' x0 + sigma' eps in
    the process's time, with error control: a step is accepted when, for every example, the RMS over
    its elements of err / (atol + rtol max(|x|, |x_new|)) is <= 1 (one step size for the batch, set
    by its worst example), and the next step is h * clip(0.9 err^(-1/5), 0.2, 5).
    The grid's times are checkpoints that the integration hits exactly (what `return_trajectory`
    returns); `steps` only sets them. Each attempted step costs 6 NFE (FSAL) plus 1 to start; the
    count is dynamic and reported in `SampleResult.nfe`. At most `max_steps` attempts in total.
    """

    fixed_nfe: ClassVar[bool] = False
    rtol: float = 1e-4
    atol: float = 1e-4
    max_steps: int = 4096

    def __post_init__(self):
        check_positive_option(self, "rtol")
        check_positive_option(self, "atol")
        check_option(
            self,
            "max_steps",
            isinstance(self.max_steps, int) and not isinstance(self.max_steps, bool) and self.max_steps >= 1,
            "an int >= 1",
        )

    def nfe(self, steps):
        raise ValueError("the adaptive solver's NFE is known only after the run (SampleResult.nfe)")

    def run(self, denoiser, x, ts, keys, return_trajectory):
        solution = dopri5(
            lambda y, t: denoiser.velocity(y, t),
            x,
            ts,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            save_all=return_trajectory,
        )
        return solution.y, solution.ys, solution.nfe
