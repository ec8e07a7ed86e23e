"""The solver protocol and the loop that runs a solver over a grid as one compiled program.

A solver is a frozen dataclass of static options, validated on construction, with ONE step
signature for every solver:

    step(denoiser, x, state, t, t_next, key) -> (x_next, state)

`state` is the solver's own typed pytree (`NoState`, `History`, ...), made by `init`. A run is
split into static `phases`: consecutive steps taken by the same *phase-specialised copy* of the
solver (e.g. a multistep solver's warm-up steps are taken by a copy of lower `order`), each phase
one `lax.scan`, so no branch is chosen at run time. Solvers that pick their own steps (adaptive)
override `run` instead.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from diffjax.denoisers import Denoiser
from diffjax.processes import GaussianProcess
from diffjax.samplers.grids import Grid, LogSNR
from diffjax.validation import is_finite_real

__all__ = [
    "Solver",
    "Phase",
    "NoState",
    "History",
    "phase_field",
    "specialise",
    "check_option",
    "run_phases",
    "split_phases",
]


class NoState(NamedTuple):
    """The state of a one-step solver: nothing."""


class History(NamedTuple):
    """The last few evaluations of a multistep solver, newest first, with the node (a half log-SNR
    or a noise level) each was taken at: values (k, *x.shape), nodes (k,)."""

    values: jax.Array
    nodes: jax.Array

    @classmethod
    def empty(cls, size: int, x, node_dtype=jnp.float32) -> "History":
        return cls(jnp.zeros((size,) + x.shape, x.dtype), jnp.zeros((size,), node_dtype))

    def push(self, value, node) -> "History":
        """Put (value, node) in front and drop the oldest; the node takes the stack's dtype (a
        discrete chain's log-SNR is float64 under x64)."""
        return History(push(self.values, value), push(self.nodes, node))


def push(stack, value):
    """`value` in front of a fixed-size stack (newest first), dropping the oldest."""
    return jnp.concatenate([jnp.asarray(value, stack.dtype)[None], stack[:-1]], axis=0)


def phase_field(default):
    """A static choice made per phase (not a user option): set only through `specialise`."""
    return dataclasses.field(default=default, init=False, repr=False)


def specialise(solver, **choices):
    """A copy of `solver` with the per-phase fields `choices` set (they are not init arguments)."""
    copy = copy_module.copy(solver)
    for name, value in choices.items():
        object.__setattr__(copy, name, value)
    return copy


def check_option(solver, name: str, ok: bool, allowed: str) -> None:
    """ValueError naming the solver, the option, its value and what is allowed, unless `ok`."""
    if not ok:
        value = getattr(solver, name)
        raise ValueError(
            f"{type(solver).__name__} option {name}={value!r:.100} is not allowed; {name} must be {allowed}"
        )


def _check_number_option(solver, name: str, in_range, allowed: str) -> None:
    value = getattr(solver, name)
    check_option(solver, name, is_finite_real(value) and in_range(value), allowed)


def check_unit_interval(solver, name: str) -> None:
    _check_number_option(solver, name, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def check_nonnegative(solver, name: str) -> None:
    _check_number_option(solver, name, lambda v: v >= 0.0, "a finite number >= 0")


def check_positive_option(solver, name: str) -> None:
    _check_number_option(solver, name, lambda v: v > 0.0, "a finite number > 0")


def check_order(solver, allowed) -> None:
    order = solver.order
    check_option(solver, "order", order in allowed and not isinstance(order, bool), f"one of {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class Phase:
    """`length` consecutive steps taken by `solver` (a phase-specialised copy)."""

    length: int
    solver: Any


@dataclasses.dataclass(frozen=True)
class Solver:
    """Base class. Subclasses set `nfe_per_step`, implement `step`, and validate their options in
    `__post_init__`."""

    nfe_per_step: ClassVar[int] = 1
    stochastic: ClassVar[bool] = False
    fixed_nfe: ClassVar[bool] = True  # False: the NFE is known only after the run (adaptive)
    default_grid: ClassVar[Grid] = LogSNR()  # the grid sample() uses when none is given

    # -- static description ---------------------------------------------------------------------
    def check(self, process: GaussianProcess, steps: int, t_min: float, t_max: float) -> None:
        """Raise ValueError for process/range combinations this solver can't handle."""

    def prepare(self, process: GaussianProcess, steps: int, t_min: float, t_max: float) -> "Solver":
        """A copy specialised to static facts of the run (e.g. alpha(t_max) = 0); default: self."""
        return self

    def phases(self, steps: int) -> tuple[Phase, ...]:
        return (Phase(steps, self),)

    def nfe(self, steps: int) -> int:
        """Network evaluations for `steps` steps (without the optional final denoising)."""
        return steps * self.nfe_per_step

    def steps_for_nfe(self, nfe: int, denoise_final: bool = True) -> int:
        """The most steps whose network evaluations (with the final denoising when
        `denoise_final`) stay within `nfe`; ValueError when not even one step fits."""
        extra = 1 if denoise_final else 0
        steps = 0
        while self.nfe(steps + 1) + extra <= nfe:
            steps += 1
        if steps == 0:
            raise ValueError(
                f"{type(self).__name__} needs {self.nfe(1) + extra} evaluations for one step "
                f"(denoise_final={denoise_final}), more than nfe={nfe!r}"
            )
        return steps

    # -- the numerics -----------------------------------------------------------------------------
    def init(self, denoiser: Denoiser, x, ts):
        """The initial state (e.g. an empty history)."""
        return NoState()

    def step(self, denoiser: Denoiser, x, state, t, t_next, key):
        """One step from time t to t_next < t; returns (x_next, state)."""
        raise NotImplementedError

    def run(self, denoiser: Denoiser, x, ts, keys, return_trajectory: bool):
        """Integrate over the grid `ts`. Returns (x, trajectory (steps, *x.shape) or None, nfe)."""
        state = self.init(denoiser, x, ts)
        x, _, trajectory = run_phases(self.phases(ts.shape[0] - 1), denoiser, x, state, ts, keys, return_trajectory)
        return x, trajectory, self.nfe(ts.shape[0] - 1)


def run_phases(phases, denoiser: Denoiser, x, state, ts, keys, return_trajectory: bool = False, remat: bool = False):
    """Take the steps of `phases` (one `lax.scan` each) from (x, state) over the times `ts` (one more
    than the steps) with one key per step. Returns (x, state, trajectory or None). remat: each step
    is recomputed in the backward pass instead of storing its activations (`jax.checkpoint`)."""
    start, trajectory = 0, []
    for phase in phases:
        if phase.length == 0:
            continue

        def body(carry, inputs, solver=phase.solver):
            x, state = carry
            t, t_next, key = inputs
            x, state = solver.step(denoiser, x, state, t, t_next, key)
            return (x, state), (x if return_trajectory else None)

        stop = start + phase.length
        inputs = (ts[start:stop], ts[start + 1 : stop + 1], keys[start:stop])
        (x, state), xs = jax.lax.scan(jax.checkpoint(body) if remat else body, (x, state), inputs)
        trajectory.append(xs)
        start = stop
    return x, state, (jnp.concatenate(trajectory) if return_trajectory else None)


def split_phases(phases, at: int) -> tuple[tuple[Phase, ...], tuple[Phase, ...]]:
    """The phases of the first `at` steps and those of the rest (a phase across `at` is cut in two)."""
    head, tail, start = [], [], 0
    for phase in phases:
        cut = min(max(at - start, 0), phase.length)
        if cut:
            head.append(Phase(cut, phase.solver))
        if phase.length - cut:
            tail.append(Phase(phase.length - cut, phase.solver))
        start += phase.length
    return tuple(head), tuple(tail)


def group_phases(solvers) -> tuple[Phase, ...]:
    """Group a per-step list of (phase-specialised) solvers into Phases of consecutive equal ones."""
    phases: list[Phase] = []
    for solver in solvers:
        if phases and phases[-1].solver == solver:
            phases[-1] = Phase(phases[-1].length + 1, solver)
        else:
            phases.append(Phase(1, solver))
    return tuple(phases)
