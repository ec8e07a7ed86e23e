"""Adaptive-step integration of the probability-flow ODE: the embedded Dormand-Prince 5(4) pair
(Dormand & Prince 1980) with error control, inside `lax.while_loop`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffjax.samplers.base import Solver

__all__ = ["Adaptive"]

# Butcher tableau of DOPRI5; the 7th stage is first-same-as-last (FSAL).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B = _A[6] + (0.0,)
_B_LOW = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b - bl for b, bl in zip(_B, _B_LOW))


@dataclasses.dataclass(frozen=True)
class Adaptive(Solver):
    """Dormand-Prince 5(4) on the probability-flow ODE dx/dt = alpha' x0 + sigma' eps in the
    process's time, with error control: a step is accepted when, for every example, the RMS over
    its elements of err / (atol + rtol max(|x|, |x_new|)) is <= 1 (one step size for the batch, set
    by its worst example), and the next step is h * clip(0.9 err^(-1/5), 0.2, 5).
    The grid's times are checkpoints that the integration hits exactly (what `return_trajectory`
    returns); `steps` only sets them. Each attempted step costs 6 NFE (FSAL) plus 1 to start; the
    count is dynamic and reported in `info["nfe"]`. At most `max_steps` attempts in total.
    """

    rtol: float = 1e-4
    atol: float = 1e-4
    max_steps: int = 4096

    def check(self, process, steps, t_min, t_max):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"adaptive: {name} must be a positive number, got {value!r}")
        if not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ValueError(f"adaptive: max_steps must be an int >= 1, got {self.max_steps!r}")

    def nfe(self, steps):
        raise ValueError("the adaptive solver's NFE is known only after the run (see info['nfe'])")

    def run(self, denoiser, x, ts, keys, return_trajectory):
        flow = lambda y, t: denoiser.flow(y, t)  # noqa: E731
        axes = tuple(range(1, x.ndim))
        rms = lambda a: jnp.max(jnp.sqrt(jnp.mean(a**2, axis=axes)))  # noqa: E731  worst example

        def attempt(x, k1, t, h):
            ks = [k1]
            for i in range(1, 7):
                y = x + h * sum(a * k for a, k in zip(_A[i], ks))
                ks.append(flow(y, t + _C[i] * h))
            x_new = x + h * sum(b * k for b, k in zip(_B, ks[:6]))  # b_7 = 0
            err = h * sum(e * k for e, k in zip(_E, ks))
            scale = self.atol + self.rtol * jnp.maximum(jnp.abs(x), jnp.abs(x_new))
            return x_new, ks[6], rms(err / scale)

        def interval(carry, t_end):
            x, k1, t, h, nfe, count = carry

            def cond(c):
                return (c[2] > t_end) & (c[5] < self.max_steps)

            def body(c):
                x, k1, t, h, nfe, count = c
                last = (t + h) <= t_end  # the step would reach or pass the checkpoint
                h_try = jnp.where(last, t_end - t, h)
                x_new, k_new, err = attempt(x, k1, t, h_try)
                ok = err <= 1.0
                factor = jnp.clip(0.9 * jnp.maximum(err, 1e-10) ** -0.2, 0.2, 5.0)
                t_new = jnp.where(ok, jnp.where(last, t_end, t + h_try), t)
                h_new = jnp.where(ok & last, h, h_try * factor)  # a cut-short last step keeps h
                return (
                    jnp.where(ok, x_new, x), jnp.where(ok, k_new, k1), t_new.astype(t.dtype),
                    h_new.astype(h.dtype), nfe + 6, count + 1,
                )

            carry = jax.lax.while_loop(cond, body, (x, k1, t, h, nfe, count))
            return carry, (carry[0] if return_trajectory else None)

        t0 = ts[0]
        k1 = flow(x, t0)
        h0 = 0.05 * (ts[1] - ts[0])
        init = (x, k1, t0, h0, jnp.int32(1), jnp.int32(0))
        (x, _, _, _, nfe, _), traj = jax.lax.scan(interval, init, ts[1:])
        return x, traj, nfe
