"""Sampling: `sample(denoiser, key, shape, solver=..., steps=..., grid=...)`.

The whole loop (prior draw, every solver step, the optional final denoising) is one traced
program built from `lax.scan`; wrap it in `jax.jit` (or `vmap` it) like any pure function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.denoisers import Denoiser
from diffjax.samplers.base import Phase, Solver
from diffjax.samplers.first_order import DDIM, Ancestral, Euler, EulerMaruyama, Heun
from diffjax.samplers.grids import GRIDS, check_grid, make_grid

__all__ = ["sample", "make_solver", "SOLVERS", "GRIDS", "make_grid", "Solver", "Phase"]

SOLVERS: dict[str, type[Solver]] = {
    "ddim": DDIM,
    "ancestral": Ancestral,
    "euler": Euler,
    "heun": Heun,
    "euler_maruyama": EulerMaruyama,
}

DEFAULT_SOLVER = "ddim"
DEFAULT_GRID = "logsnr"


def make_solver(solver: str | Solver, **options) -> Solver:
    """A solver instance from its name and options (or pass an instance through)."""
    if isinstance(solver, Solver):
        if options:
            raise ValueError(f"options {sorted(options)} given with a solver instance; set them on it")
        return solver
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known solvers: {sorted(SOLVERS)}")
    cls = SOLVERS[solver]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for solver {solver!r}; "
            f"allowed: {sorted(allowed) or 'none'}"
        )
    return cls(**options)


def _check_shape(shape) -> tuple[int, ...]:
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else shape
    if not (
        isinstance(shape, tuple)
        and len(shape) >= 1
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise ValueError(f"shape must be a non-empty tuple of positive ints (batch first), got {shape!r}")
    return shape


def _check_network_output(denoiser: Denoiser, shape) -> None:
    """Trace the network alone (no compilation) and compare its output shape with `shape`."""
    out = jax.eval_shape(
        denoiser.fn,
        jax.ShapeDtypeStruct(shape, jnp.float32),
        jax.ShapeDtypeStruct(shape[:1], jnp.float32),
    )
    if getattr(out, "shape", None) != shape:
        raise ValueError(
            f"the network maps inputs of shape {shape} to {getattr(out, 'shape', type(out))}; "
            "it must return the input's shape"
        )


def sample(
    denoiser: Denoiser,
    key: jax.Array,
    shape,
    *,
    solver: str | Solver | None = None,
    steps: int = 50,
    grid: Any = None,
    t_min: float | None = None,
    t_max: float | None = None,
    denoise_final: bool = True,
    return_trajectory: bool = False,
    return_info: bool = False,
    grid_options: dict | None = None,
    **solver_options,
):
    """Draw samples by integrating from the prior at t_max down to t_min.

    Args:
      denoiser: the `Denoiser` (network + process + prediction type).
      key: a `jax.random` key; split into the prior draw and one key per step.
      shape: the batch shape, e.g. (batch, H, W, C).
      solver: a name from `SOLVERS` or a `Solver` instance (default "ddim").
      steps: number of solver steps; the network is evaluated `solver.nfe(steps)` times, plus
        one for the final denoising.
      grid: a name from `GRIDS` (default "logsnr") or an explicit decreasing array of
        steps + 1 times.
      t_min, t_max: the integration range (default: the process's).
      denoise_final: finish with x0 = D(x, t_min) (one more evaluation) instead of x at t_min.
      return_trajectory: also return the states at every grid time, shape (steps + 1, *shape).
      return_info: also return {"nfe": ..., "ts": grid}.
      grid_options: options of the grid (e.g. {"rho": 7.0} for "karras").
      **solver_options: options of the solver (e.g. eta for "ddim").

    Returns:
      x, or the tuple (x, trajectory?, info?) with the requested extras in that order.
    """
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be a diffjax.Denoiser, got {type(denoiser).__name__}")
    shape = _check_shape(shape)
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    solver = make_solver(DEFAULT_SOLVER if solver is None else solver, **solver_options)
    grid = DEFAULT_GRID if grid is None else grid
    check_grid(grid)
    process = denoiser.process
    t_min = process.t_min if t_min is None else float(t_min)
    t_max = process.t_max if t_max is None else float(t_max)
    process.check_times(t_min, t_max)
    solver.check(process, steps, t_min, t_max)
    _check_network_output(denoiser, shape)

    ts = make_grid(grid, process, steps, t_min, t_max, **(grid_options or {}))
    key_prior, key_steps = jax.random.split(key)
    # The prior N(0, sigma(t_max)^2 I) (alpha(t_max) x0 is taken as negligible).
    x = process.sigma(jnp.float32(t_max)) * jax.random.normal(key_prior, shape)
    keys = jax.random.split(key_steps, steps)
    x_end, trajectory, nfe = solver.run(denoiser, x, ts, keys, return_trajectory)
    out = denoiser.x0(x_end, ts[-1]) if denoise_final else x_end
    nfe = nfe + (1 if denoise_final else 0)

    extras = []
    if return_trajectory:
        extras.append(jnp.concatenate([x[None], trajectory]))
    if return_info:
        extras.append({"nfe": nfe, "ts": ts})
    return (out, *extras) if extras else out
