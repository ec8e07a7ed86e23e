"""The solver interface and the loop that runs a solver over a grid as one compiled program.

A solver is a frozen dataclass of static options with a pure `step`. Multistep solvers keep a
fixed-shape `state` (their history) and split the run into static `phases` (e.g. a lower-order
warm-up step, then the full-order steps), each run as one `lax.scan`, so no branch is chosen at
run time. Solvers that pick their own steps (adaptive) override `run` instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from diffjax.denoisers import Denoiser
from diffjax.processes import GaussianProcess

__all__ = ["Solver", "Phase"]


@dataclasses.dataclass(frozen=True)
class Phase:
    """`length` consecutive steps run with the same static step options."""

    length: int
    options: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Solver:
    """Base class. Subclasses set `nfe_per_step` and implement `step`."""

    nfe_per_step: ClassVar[int] = 1
    stochastic: ClassVar[bool] = False
    default_grid: ClassVar[str] = "logsnr"  # the grid sample() uses when none is named

    # -- static description ---------------------------------------------------------------------
    def check(self, process: GaussianProcess, steps: int, t_min: float, t_max: float) -> None:
        """Raise ValueError for option/process combinations this solver can't handle."""

    def prepare(self, process: GaussianProcess, steps: int, t_min: float, t_max: float) -> "Solver":
        """A copy specialised to static facts of the run (e.g. alpha(t_max) = 0); default: self."""
        return self

    def phases(self, steps: int) -> tuple[Phase, ...]:
        return (Phase(steps),)

    def nfe(self, steps: int) -> int:
        """Network evaluations for `steps` steps (without the optional final denoising)."""
        return steps * self.nfe_per_step

    # -- the numerics -----------------------------------------------------------------------------
    def init(self, denoiser: Denoiser, x, ts):
        """Initial solver state (e.g. an empty history); () for one-step solvers."""
        return ()

    def step(self, denoiser: Denoiser, x, state, t, t_next, key, **options):
        """One step from time t to t_next < t; returns (x_next, state)."""
        raise NotImplementedError

    def run(self, denoiser: Denoiser, x, ts, keys, return_trajectory: bool):
        """Integrate over the grid `ts`. Returns (x, trajectory (steps, *x.shape) or None, nfe)."""
        state = self.init(denoiser, x, ts)
        start, trajectory = 0, []
        for phase in self.phases(ts.shape[0] - 1):
            if phase.length == 0:
                continue
            options = dict(phase.options)

            def body(carry, inputs, options=options):
                x, state = carry
                t, t_next, key = inputs
                x, state = self.step(denoiser, x, state, t, t_next, key, **options)
                return (x, state), (x if return_trajectory else None)

            stop = start + phase.length
            inputs = (ts[start:stop], ts[start + 1 : stop + 1], keys[start:stop])
            (x, state), xs = jax.lax.scan(body, (x, state), inputs)
            trajectory.append(xs)
            start = stop
        traj = jnp.concatenate(trajectory) if return_trajectory else None
        return x, traj, self.nfe(ts.shape[0] - 1)
