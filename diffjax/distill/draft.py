"""Reward fine-tuning by differentiating through sampling (DRaFT; Clark et al. 2024, "Directly
Fine-Tuning Diffusion Models on Differentiable Rewards").

The model draws x_T from the prior and integrates it with a fixed solver over a fixed grid of N
steps to x_0; the loss is -r(x_0), averaged over the batch, for a differentiable reward r. DRaFT-K
back-propagates through the last K steps only: the first N - K steps run with the parameters
behind `stop_gradient`, and the solver's state where they end is cut from the graph, so

    grad = -E[ d r(x_0) / d theta ]  through steps N - K + 1 .. N (and the final denoising).

K = N is full back-propagation through the sampler. Each differentiated step is rematerialised
(`jax.checkpoint`): the backward pass keeps one solver state per step, not the network's
activations, so memory grows with K by one state per step (measured in
experiments/benchmarks/draft_memory.py).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax.denoisers import Denoiser, network_view
from diffjax.distill.common import apply_student, batch_data, check_name, network_params
from diffjax.processes import GaussianProcess
from diffjax.samplers.base import Solver, run_phases, split_phases
from diffjax.samplers.ddim import DDIM
from diffjax.samplers.grids import Times, as_grid
from diffjax.samplers.sampling import check_prediction_is_defined
from diffjax.validation import check_count

__all__ = ["draft_loss"]


def draft_loss(
    apply_fn: Callable,
    process: GaussianProcess,
    reward: Callable,
    *,
    prediction="eps",
    solver: Solver = DDIM(),
    steps: int = 50,
    grad_steps: int = 1,
    grid=None,
    t_min: float | None = None,
    t_max: float | None = None,
    denoise_final: bool = True,
    remat: bool = True,
    student: str = "student",
    data_key: str = "image",
):
    """`loss_fn(params, key, batch) -> (loss, aux)`: DRaFT-K, the negative mean reward of samples
    drawn by `solver` over `steps` steps, differentiated through the last `grad_steps` (K) of them
    (module docstring).

    apply_fn(params[student], x, t) is a network of `prediction` on `process`; reward(x0) returns
    one value per example, shape (batch,). The batch gives only the batch size and sample shape.
    grid, t_min, t_max, denoise_final: as in `diffjax.samplers.sample` (the grid's default: the
    solver's). remat: rematerialise each differentiated step. aux: "reward" (the batch mean).
    """
    for name, fn in (("apply_fn", apply_fn), ("reward", reward)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    if not isinstance(solver, Solver) or not solver.fixed_nfe:
        raise ValueError(f"solver must be a fixed-step Solver (e.g. DDIM(), UniPC()), got {solver!r:.100}")
    steps = check_count("steps", steps)
    grad_steps = check_count("grad_steps", grad_steps)
    if grad_steps > steps:
        raise ValueError(f"grad_steps={grad_steps} exceeds steps={steps}: at most every step is differentiated")
    check_name("student", student)
    check_name("data_key", data_key)
    network_view(lambda x, t: x, process, prediction)  # validates the prediction
    grid = solver.default_grid if grid is None else as_grid(grid)
    if isinstance(grid, Times):
        raise ValueError("draft_loss takes a Grid (e.g. LogSNR(), Uniform()), not an explicit array of times")
    t_min, t_max = process.resolve_times(t_min, t_max)
    solver.check(process, steps, t_min, t_max)
    solver = solver.prepare(process, steps, t_min, t_max)
    check_prediction_is_defined(Denoiser(lambda x, t: x, process, prediction), t_max)
    cut = steps - grad_steps  # the steps taken behind a stop-gradient
    frozen_phases, live_phases = split_phases(solver.phases(steps), cut)

    def denoiser(params):
        return Denoiser(apply_student(apply_fn, params), process, prediction)

    def loss_fn(params, key, batch):
        shape = batch_data(batch, data_key).shape
        live = denoiser(network_params(params, student))
        frozen = denoiser(jax.lax.stop_gradient(network_params(params, student)))
        ts = grid(process, steps, t_min, t_max)
        key_prior, key_steps = jax.random.split(key)
        x = process.prior_sample(key_prior, shape, jnp.result_type(float), t=t_max)
        keys = jax.random.split(key_steps, steps)
        state = solver.init(frozen, x, ts)
        x, state, _ = run_phases(frozen_phases, frozen, x, state, ts[: cut + 1], keys[:cut])
        x, state = jax.lax.stop_gradient((x, state))
        x, _, _ = run_phases(live_phases, live, x, state, ts[cut:], keys[cut:], remat=remat)
        x0 = live.x0(x, ts[-1]) if denoise_final else x
        rewards = reward(x0)
        if getattr(rewards, "shape", None) != shape[:1]:
            raise ValueError(f"reward must return one value per example, shape {shape[:1]}, got {jnp.shape(rewards)}")
        return -jnp.mean(rewards), {"reward": jnp.mean(rewards)}

    return loss_fn
