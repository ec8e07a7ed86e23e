"""`sample()`: the whole sampling loop as one compiled program, cached across eager calls.

The loop (prior draw, every solver step, the optional final denoising) is built from `lax.scan`
(`lax.while_loop` for `Adaptive`). Called eagerly, `sample` runs a module-level `jax.jit` whose
static arguments are the solver, the grid, the shape, the steps and the range, and whose traced
argument is the `Denoiser` pytree (its process's arrays are leaves, the network is static), so a
repeated call with the same static arguments and network reuses the compiled program. Inside a
user's `jit`/`vmap` the same function simply inlines.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.denoisers import Denoiser, PathCoefficients, to_x0_eps
from diffjax.processes import GaussianProcess
from diffjax.samplers.adaptive import Adaptive
from diffjax.samplers.base import Solver
from diffjax.samplers.ddim import DDIM, Ancestral
from diffjax.samplers.deis import DEIS
from diffjax.samplers.dpm_solver import DPMSolver, DPMSolverPP, DPMSolverPPSDE
from diffjax.samplers.euler import Euler, EulerMaruyama
from diffjax.samplers.gaussian_pc import GaussianPC
from diffjax.samplers.grids import GRIDS, Grid, Times, as_grid
from diffjax.samplers.heun import EDMHeun, EDMStochastic, Heun
from diffjax.samplers.langevin import LangevinPC
from diffjax.samplers.learned_variance import LearnedVarianceAncestral
from diffjax.samplers.sa_solver import SASolver
from diffjax.samplers.unipc import UniPC
from diffjax.validation import check_count, check_key, check_shape

__all__ = [
    "sample",
    "SampleResult",
    "SOLVERS",
    "GRIDS",
    "default_solver",
    "FEW_STEPS",
    "check_prediction_is_defined",
    "resolve_range",
]

# The names a config may use; `validation.build_named(SOLVERS, name, options, "solver")` makes the
# instance. The dataclasses' own defaults are the only defaults.
SOLVERS: dict[str, type[Solver]] = {
    "ddim": DDIM,
    "ancestral": Ancestral,
    "euler": Euler,
    "heun": Heun,
    "euler_maruyama": EulerMaruyama,
    "dpm_solver": DPMSolver,
    "dpm_solver++": DPMSolverPP,
    "dpm_solver++_sde": DPMSolverPPSDE,
    "unipc": UniPC,
    "deis": DEIS,
    "edm_heun": EDMHeun,
    "edm_stochastic": EDMStochastic,
    "adaptive": Adaptive,
    "pc": LangevinPC,
    "sa_solver": SASolver,
    "gaussian_pc": GaussianPC,
    "learned_variance": LearnedVarianceAncestral,
}

# The default solver depends on the number of steps. At each NFE of the sampler suite
# (experiments/benchmarks/sampler_suite.py; tables: experiments/results/sampler_suite.md) the setting
# with the smallest worst ratio to the best method (ours or diffusers') per problem is `GaussianPC()` on
# its flow-time grid at 5 and 10 NFE and UniPC bh2 (order by step) on its log-SNR grid at 20; measured
# in between, the two cross between 12 and 13 NFE. Both take one network call per step.
FEW_STEP_SOLVER: Solver = GaussianPC()
MANY_STEP_SOLVER: Solver = UniPC()
FEW_STEPS = 11  # up to this many steps (12 network calls with the final denoising): FEW_STEP_SOLVER


def default_solver(steps: int) -> Solver:
    """The solver `sample` uses for `steps` steps when none is given: `GaussianPC()` (on its
    `FlowTime()` grid) up to `FEW_STEPS` steps, `UniPC()` (on its `LogSNR()` grid) beyond."""
    return FEW_STEP_SOLVER if check_count("steps", steps) <= FEW_STEPS else MANY_STEP_SOLVER


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampleResult:
    """What `sample` returns (a pytree): the samples, the network evaluations they took (an int, or
    an array for `Adaptive`), the grid of times, and the states at every grid time
    (steps + 1, *shape) when asked for, else None."""

    samples: jax.Array
    nfe: Any
    ts: jax.Array
    trajectory: jax.Array | None = None


def check_prediction_is_defined(denoiser: Denoiser, t_max: float) -> None:
    """An eps- or score-network says nothing about x0 where alpha = 0 (x0 = (x - sigma eps)/alpha),
    and the flow view is singular where alpha' sigma - alpha sigma' = 0: refuse such a start."""
    try:
        with jax.ensure_compile_time_eval():
            one = jnp.ones((1,), jnp.float32)
            c = PathCoefficients.at(denoiser.process, jnp.full((1,), t_max, jnp.float32), one)
            x0, eps = to_x0_eps(one, denoiser.prediction, one, c)
            finite = bool(jnp.all(jnp.isfinite(x0)) & jnp.all(jnp.isfinite(eps)))
    except jax.errors.ConcretizationTypeError:  # a traced process: can't tell now
        return
    if not finite:
        raise ValueError(
            f"a {denoiser.prediction!r}-prediction network does not determine x0 at t_max={t_max} of "
            f"{type(denoiser.process).__name__} (alpha = {float(c.alpha[0])}); pass a smaller t_max "
            "(e.g. 0.999), or use an x0-, v- or flow-prediction network"
        )


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


def _run(denoiser, key, solver, grid, shape, steps, t_min, t_max, denoise_final, return_trajectory):
    """The sampling program; every argument but the denoiser and the key is static."""
    _check_network_output(denoiser, shape)  # at trace time only
    process = denoiser.process
    ts = grid(process, steps, t_min, t_max)
    key_prior, key_steps = jax.random.split(key)
    x = process.prior_sample(key_prior, shape, jnp.result_type(float), t=t_max)
    x_end, trajectory, nfe = solver.run(denoiser, x, ts, jax.random.split(key_steps, steps), return_trajectory)
    out = denoiser.x0(x_end, ts[-1]) if denoise_final else x_end
    trajectory = jnp.concatenate([x[None], trajectory]) if return_trajectory else None
    return SampleResult(out, nfe + (1 if denoise_final else 0), ts, trajectory)


_STATIC = ("solver", "grid", "shape", "steps", "t_min", "t_max", "denoise_final", "return_trajectory")
_run_compiled = jax.jit(_run, static_argnames=_STATIC)


def _hashable(denoiser: Denoiser) -> bool:
    """Whether the denoiser's static part (network, prediction, process options) can key a cache."""
    try:
        hash(jax.tree_util.tree_structure(denoiser))
    except TypeError:
        return False
    return True


def resolve_range(grid: Grid, process: GaussianProcess, steps: int, t_min=None, t_max=None) -> tuple[float, float]:
    """(t_min, t_max) of a sampling run: an explicit grid's end points (checked against its steps and
    the process; a given t_min / t_max that disagrees is an error), else the given range (default:
    the process's). The prior is drawn at sigma(t_max)."""
    if not isinstance(grid, Times):
        return process.resolve_times(t_min, t_max)
    grid.check(process, steps)
    for name, given, own in (("t_min", t_min, grid.times[-1]), ("t_max", t_max, grid.times[0])):
        if given is not None and not math.isclose(float(given), float(own), rel_tol=1e-6):  # float32 grids
            raise ValueError(f"{name}={given!r} disagrees with the explicit grid, which gives {name}={own}")
    return process.resolve_times(grid.times[-1], grid.times[0])


def sample(
    denoiser: Denoiser,
    key: jax.Array,
    shape,
    *,
    solver: Solver | None = None,
    steps: int = 50,
    grid: Grid | Any = None,
    t_min: float | None = None,
    t_max: float | None = None,
    denoise_final: bool = True,
    return_trajectory: bool = False,
) -> SampleResult:
    """Draw samples by integrating from the prior at the grid's first time down to its last.

    Args:
      denoiser: the `Denoiser` (network + process + prediction type).
      key: a `jax.random` key; split into the prior draw and one key per step.
      shape: the batch shape, e.g. (batch, H, W, C).
      solver: a `Solver` instance, e.g. `UniPC(order=2, variant="bh2")` (names for configs:
        `SOLVERS`). Default (`default_solver(steps)`): `GaussianPC()` on its `FlowTime()` grid
        up to `FEW_STEPS` = 11 steps, `UniPC()` (bh2, the order by step) on its `LogSNR()` grid
        beyond, 1 NFE per step: at each NFE the setting with the best worst case over the sampler
        suite of exact problems (experiments/results/sampler_suite.md).
      steps: number of solver steps; the network is evaluated `solver.nfe(steps)` times, plus
        one for the final denoising (`solver.steps_for_nfe(nfe)` inverts this).
      grid: a `Grid` instance (`LogSNR()`, `Karras(rho=7.0)`, `FlowTime(sigma_data=0.5)`,
        `Uniform()`, `Quadratic()`; default: the solver's `default_grid`) or an explicit
        decreasing array of steps + 1 times (e.g. the list `optimize_grid` returns), whose end
        points are then the range: the prior is drawn at sigma(times[0]).
      t_min, t_max: the integration range (default: the process's, or an explicit grid's ends).
      denoise_final: finish with x0 = D(x, t_min) (one more evaluation) instead of x at t_min.
      return_trajectory: also return the states at every grid time, shape (steps + 1, *shape).

    Returns:
      a `SampleResult(samples, nfe, ts, trajectory)`.
    """
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be a diffjax.Denoiser, got {type(denoiser).__name__}")
    check_key(key)
    shape = check_shape(shape)
    steps = check_count("steps", steps)
    solver = default_solver(steps) if solver is None else solver
    if not isinstance(solver, Solver):
        raise TypeError(
            f"solver must be a Solver instance (e.g. UniPC(), DDIM(eta=0.5)), got {solver!r:.100}; to build one "
            f"from a name use validation.build_named(SOLVERS, name, options, 'solver') with a name in {sorted(SOLVERS)}"
        )
    grid = solver.default_grid if grid is None else as_grid(grid)
    process = denoiser.process
    t_min, t_max = resolve_range(grid, process, steps, t_min, t_max)
    solver.check(process, steps, t_min, t_max)
    solver = solver.prepare(process, steps, t_min, t_max)
    check_prediction_is_defined(denoiser, t_max)

    run = _run_compiled if _hashable(denoiser) else _run
    result = run(
        denoiser,
        key,
        solver=solver,
        grid=grid,
        shape=shape,
        steps=steps,
        t_min=t_min,
        t_max=t_max,
        denoise_final=bool(denoise_final),
        return_trajectory=bool(return_trajectory),
    )
    if solver.fixed_nfe:  # known statically: a Python int, not an array
        result = dataclasses.replace(result, nfe=solver.nfe(steps) + (1 if denoise_final else 0))
    return result
