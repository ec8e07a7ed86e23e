"""Few-step sampling through the library's `sample()`.

A consistency model (`ConsistencyFunction`, `TrigFlowConsistency`) wrapped as an x0-`Denoiser` is
sampled by `ConsistencySampler` on an explicit grid of the evaluation times (Song et al. 2023,
Alg. 1, multistep consistency sampling):

    x0 <- f(x_{tau_0}, tau_0),  x_{tau_n} = alpha(tau_n) x0 + sigma(tau_n) z_n,  x0 <- f(x_{tau_n}, tau_n), ...

    sample(cm.denoiser(), key, shape, solver=ConsistencySampler(), steps=k,
           grid=Times((t_max, tau_1, ..., tau_{k-1}, t_min)), denoise_final=False)

takes k network evaluations (the last grid time only ends the run: the last step returns f's
output). `consistency_grid(process, times)` builds that grid. A progressive-distillation student is
an ordinary denoiser, sampled by DDIM on its own grid of N steps.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from diffjax.processes import GaussianProcess, broadcast_to_data
from diffjax.samplers.base import Phase, Solver, phase_field, specialise
from diffjax.samplers.grids import Times

__all__ = ["ConsistencySampler", "consistency_grid"]


@dataclasses.dataclass(frozen=True)
class ConsistencySampler(Solver):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): each step evaluates the x0-estimate
    f(x, t) and, except the last, re-noises it to the next time with fresh noise,
    x_next = alpha(t_next) f(x, t) + sigma(t_next) z; the last step returns f(x, t). 1 NFE per step;
    use `denoise_final=False` (the model's output is the sample)."""

    stochastic: ClassVar[bool] = True
    final: bool = phase_field(False)

    def phases(self, steps: int):
        return (Phase(steps - 1, self), Phase(1, specialise(self, final=True)))

    def step(self, denoiser, x, state, t, t_next, key):
        x0 = denoiser.x0(x, t)
        if self.final:
            return x0, state
        process = denoiser.process
        z = jax.random.normal(key, x.shape, x.dtype)
        return broadcast_to_data(process.alpha(t_next), x) * x0 + broadcast_to_data(process.sigma(t_next), x) * z, state


def consistency_grid(process: GaussianProcess, intermediate=()) -> Times:
    """The explicit grid (t_max, *intermediate, t_min) for `ConsistencySampler`: len(intermediate) + 1
    network evaluations, the first at t_max; `intermediate` strictly decreasing inside (t_min, t_max)."""
    times = (float(process.t_max), *(float(t) for t in intermediate), float(process.t_min))
    return Times(times)
