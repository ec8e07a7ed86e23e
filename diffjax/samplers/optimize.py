"""Optimized time grids: choose the times of a few-step sampler by minimizing its error against a
high-accuracy solution of the same ODE, the idea of "Align Your Steps" (Sabour, Fidler & Kreis
2024), with the sampling error itself as the objective instead of AYS's KL upper bound."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffjax.denoisers import Denoiser
from diffjax.processes import GaussianProcess
from diffjax.samplers.base import Solver
from diffjax.samplers.dpm_solver import DPMSolverPP
from diffjax.samplers.grids import Grid, LogSNR
from diffjax.validation import check_count

__all__ = ["optimize_grid", "empirical_denoiser", "grid_from_increments", "increments_from_grid"]


def empirical_denoiser(data, process: GaussianProcess) -> Denoiser:
    """The exact x0-denoiser of the empirical distribution of `data` (n, ...): the posterior mean
    sum_i softmax_i(-|x - alpha x_i|^2 / (2 sigma^2)) x_i."""
    data = jnp.asarray(data, jnp.float32)
    flat = jnp.reshape(data, (data.shape[0], -1))
    sq = jnp.sum(flat**2, axis=1)

    def fn(x, t):
        alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
        xf = jnp.reshape(x, (x.shape[0], -1))
        # -|x - a y|^2 / (2 s^2) up to terms constant in y
        logits = (alpha * (xf @ flat.T) - 0.5 * alpha**2 * sq[None]) / sigma**2
        return jnp.reshape(jax.nn.softmax(logits, axis=1) @ flat, x.shape)

    return Denoiser(fn, process, "x0")


def grid_from_increments(logits, t_min: float, t_max: float):
    """Decreasing grid t_max = t_0 > ... > t_N = t_min with step lengths softmax(logits) (t_max - t_min)."""
    frac = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(jax.nn.softmax(logits))])
    ts = t_max - frac * (t_max - t_min)
    return ts.at[-1].set(t_min)


def increments_from_grid(ts):
    return jnp.log(-jnp.diff(jnp.asarray(ts, jnp.float32)))


def _relative_error(x, ref, eps: float = 1e-12):
    axes = tuple(range(1, x.ndim))
    return jnp.mean(jnp.sum((x - ref) ** 2, axis=axes)) / jnp.maximum(jnp.mean(jnp.sum(ref**2, axis=axes)), eps)


def optimize_grid(
    target: Any,
    process: GaussianProcess | None = None,
    steps: int = 10,
    solver: Solver = DPMSolverPP(),
    *,
    key=None,
    num_samples: int = 2048,
    shape: tuple[int, ...] | None = None,
    iterations: int = 300,
    learning_rate: float = 0.05,
    init_grid: Grid = LogSNR(),
    reference_steps: int = 256,
    reference_solver: Solver = DPMSolverPP(),
    denoise_final: bool = True,
    t_min: float | None = None,
    t_max: float | None = None,
    return_history: bool = False,
):
    """The `steps + 1` times that minimize a solver's sampling error, as a list of floats (save it
    in a config; pass it back as `sample(..., grid=that_list)`).

    Objective: E |x(grid) - x_ref|^2 / E |x_ref|^2 over `num_samples` fixed prior draws, where x(grid)
    is the solver's output on the grid (with the final denoising when `denoise_final`) and x_ref the
    output of `reference_solver` with `reference_steps` log-SNR steps from the same draws (a
    high-accuracy solution of the same probability-flow ODE). The interior times are parametrized
    by the logits of the step lengths, so the grid stays ordered, and optimized with Adam from
    `init_grid`. The gradient flows through the whole compiled sampler.

    Args:
      target: a `Denoiser`, or a data sample (n, ...) whose empirical distribution's exact denoiser
        is used (then `process` is required).
      process: the process (default: the denoiser's).
      steps, solver: the solver (a `Solver` instance) to tune the grid for.
      key: a `jax.random` key for the prior draws (and the noise of stochastic solvers).
      shape: the per-example shape (default: the data's; required with a denoiser).
    """
    if isinstance(target, Denoiser):
        denoiser = target
        process = denoiser.process if process is None else process
        if shape is None:
            raise ValueError("optimize_grid: pass shape=(per-example shape) with a denoiser target")
    else:
        data = np.asarray(target)
        if process is None:
            raise ValueError("optimize_grid: a data sample needs the process it is diffused with")
        if data.ndim < 2 or data.shape[0] < 2:
            raise ValueError(f"optimize_grid: data must be (n >= 2, ...), got shape {data.shape}")
        denoiser = empirical_denoiser(data, process)
        shape = data.shape[1:] if shape is None else tuple(shape)
    steps = check_count("optimize_grid: steps", steps)
    for name, value in (("solver", solver), ("reference_solver", reference_solver)):
        if not isinstance(value, Solver):
            raise TypeError(f"optimize_grid: {name} must be a Solver instance (e.g. UniPC()), got {value!r:.100}")
    if not isinstance(init_grid, Grid):
        raise TypeError(f"optimize_grid: init_grid must be a Grid instance (e.g. LogSNR()), got {init_grid!r:.100}")
    t_min = process.t_min if t_min is None else float(t_min)
    t_max = process.t_max if t_max is None else float(t_max)
    process.check_times(t_min, t_max)
    solver.check(process, steps, t_min, t_max)
    solver = solver.prepare(process, steps, t_min, t_max)
    key = jax.random.key(0) if key is None else key

    key_prior, key_steps, key_ref = jax.random.split(key, 3)
    x_t = process.prior_sample(key_prior, (num_samples, *shape), jnp.result_type(float), t=t_max)
    keys = jax.random.split(key_steps, steps)

    def finish(x, t_end):
        return denoiser.x0(x, t_end) if denoise_final else x

    ts_ref = LogSNR()(process, reference_steps, t_min, t_max)
    x_ref, _, _ = reference_solver.run(denoiser, x_t, ts_ref, jax.random.split(key_ref, reference_steps), False)
    x_ref = finish(x_ref, ts_ref[-1])

    def loss(logits):
        ts = grid_from_increments(logits, t_min, t_max)
        x, _, _ = solver.run(denoiser, x_t, ts, keys, False)
        return _relative_error(finish(x, ts[-1]), x_ref)

    logits = increments_from_grid(init_grid(process, steps, t_min, t_max))
    opt = optax.adam(learning_rate)
    state = opt.init(logits)

    @jax.jit
    def update(logits, state):
        value, grad = jax.value_and_grad(loss)(logits)
        grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
        updates, state = opt.update(grad, state)
        return optax.apply_updates(logits, updates), state, value

    history, best = [], (np.inf, logits)
    for _ in range(iterations):
        new_logits, state, value = update(logits, state)
        value = float(value)
        history.append(value)
        if value < best[0]:
            best = (value, logits)
        logits = new_logits
    final = float(jax.jit(loss)(logits))
    if final < best[0]:
        best = (final, logits)
    ts = [float(t) for t in np.asarray(grid_from_increments(best[1], t_min, t_max), np.float64)]
    ts[0], ts[-1] = t_max, t_min
    return (ts, history) if return_history else ts
