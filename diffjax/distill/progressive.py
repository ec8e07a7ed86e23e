"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Alg. 2): a student learns to take in ONE DDIM step what the teacher takes in two.

On the teacher's grid T_0 > T_1 > ... > T_2N, with t = T_2i, t' = T_2i+1, s = T_2i+2, the teacher
takes two deterministic steps x_t -> x_t' -> x_s; the student's DDIM step
x_s = alpha_s x0_hat + sigma_s (x_t - alpha_t x0_hat)/sigma_t lands on x_s exactly when

    x0_target = (x_s - (sigma_s/sigma_t) x_t) / (alpha_s - (sigma_s/sigma_t) alpha_t)

(`progressive_target`), regressed in the x0 or v space (v = alpha eps - sigma x0 with
eps = (x_t - alpha_t x0_target)/sigma_t). The student then samples with DDIM on T_0, T_2, ..., T_2N
(N steps) and becomes the next round's teacher.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.denoisers import PathCoefficients, from_x0_eps, network_view, to_x0_eps
from diffjax.distill.common import (
    batch_data,
    check_name,
    check_teacher,
    check_teacher_solver,
    network_params,
    resolve_teacher,
)
from diffjax.distill.consistency import teacher_ode_step
from diffjax.processes import GaussianProcess, broadcast_to_data, per_example
from diffjax.samplers.base import Solver
from diffjax.samplers.ddim import DDIM
from diffjax.validation import check_choice

__all__ = ["progressive_target", "progressive_distillation_loss", "student_times"]


def progressive_target(process: GaussianProcess, x_t, x_s, t, s):
    """The x0 whose DDIM step from (x_t, t) reaches x_s at s < t (t, s scalars or (batch,))."""
    b = lambda c: broadcast_to_data(c, x_t)  # noqa: E731
    ratio = b(process.sigma(s) / process.sigma(t))
    return (x_s - ratio * x_t) / (b(process.alpha(s)) - ratio * b(process.alpha(t)))


def student_times(teacher_times) -> tuple[float, ...]:
    """The student's grid: every second time of the teacher's (2N + 1 times -> N + 1)."""
    times = np.asarray(teacher_times, np.float64)
    if times.ndim != 1 or times.size < 3 or times.size % 2 == 0 or not np.all(np.diff(times) < 0):
        raise ValueError(
            "teacher_times must be a strictly decreasing 1-D grid of 2N + 1 >= 3 times, "
            f"got {np.asarray(teacher_times).tolist()}"
        )
    return tuple(float(t) for t in times[::2])


def progressive_distillation_loss(
    apply_fn: Callable,
    process: GaussianProcess,
    teacher,
    teacher_times,
    *,
    prediction: str = "v",
    target: str = "v",
    teacher_solver: Solver = DDIM(),
    student: str = "student",
    data_key: str = "image",
):
    """`loss_fn(params, key, batch) -> (loss, aux)` of one round of progressive distillation.

    apply_fn(params[student], x, t) predicts `prediction` ("x0", "v", "eps", "velocity"); teacher a
    `Denoiser` on `process` (or `teacher(params) -> Denoiser`), stepped by `teacher_solver` (DDIM())
    over `teacher_times` (2N + 1 decreasing times); the student learns the N-step grid
    `student_times(teacher_times)`. target: "x0" or "v", the regression space (Salimans & Ho use
    x0 with weight max(SNR, 1), or v). aux: "mse".
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    check_teacher(teacher, process)
    check_teacher_solver(teacher_solver)
    check_choice("target", target, ("x0", "v"))
    network_view(lambda x, t: x, process, prediction)  # validates the prediction
    check_name("student", student)
    check_name("data_key", data_key)
    student_times(teacher_times)
    lo, hi = float(np.min(teacher_times)), float(np.max(teacher_times))
    process.check_times(lo, hi)
    times = jnp.asarray(np.asarray(teacher_times, np.float64), jnp.float32)
    steps = (times.shape[0] - 1) // 2

    def loss_fn(params, key, batch):
        x0 = batch_data(batch, data_key)
        n = x0.shape[0]
        key_i, key_eps = jax.random.split(key)
        i = jax.random.randint(key_i, (n,), 0, steps)
        t, t_mid, s = times[2 * i], times[2 * i + 1], times[2 * i + 2]
        x_t = process.perturb(x0, t, jax.random.normal(key_eps, x0.shape, x0.dtype))
        den = resolve_teacher(teacher, params)
        x_s = teacher_ode_step(den, teacher_solver, teacher_ode_step(den, teacher_solver, x_t, t, t_mid), t_mid, s)
        coef = PathCoefficients.at(process, t, x0)
        x0_target = jax.lax.stop_gradient(progressive_target(process, x_t, x_s, t, s))
        eps_target = (x_t - coef.alpha * x0_target) / coef.sigma
        net, view = network_view(lambda x, u: apply_fn(network_params(params, student), x, u), process, prediction)
        x0_hat, eps_hat = to_x0_eps(net(x_t, t), view, x_t, coef)
        err = from_x0_eps(x0_hat, eps_hat, target, coef) - from_x0_eps(x0_target, eps_target, target, coef)
        mse = per_example(jnp.mean, err.astype(jnp.float32) ** 2)
        if target == "x0":
            mse = mse * jnp.maximum(jnp.exp(process.log_snr(t)), 1.0)
        return jnp.mean(mse), {"mse": jnp.mean(mse)}

    return loss_fn
