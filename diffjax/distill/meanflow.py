"""Average-velocity models: MeanFlow and shortcut models.

Both learn the average velocity of the probability-flow ODE over an interval [r, t] (r <= t),

    u(x_t, t, r) = 1/(t - r) int_r^t v(x_s, s) ds,      so that   x_r = x_t - (t - r) u(x_t, t, r)

is an exact jump, and u(x, t, t) = v(x, t) is the ordinary velocity. A network
`apply_fn(params, x, t, r) -> u` is wrapped by `AverageVelocity`, which is also a velocity-
prediction network `(x, t) -> u(x, t, t)` for a `Denoiser`; `AverageVelocityJump` (a `Solver`)
samples with jumps through `sample()`.

- MeanFlow (Geng, Deng, Bai, Kolter & He 2025, "Mean Flows for One-step Generative Modeling"):
  differentiating (t - r) u = int_r^t v ds in t gives the MeanFlow identity
  u(x_t, t, r) = v(x_t, t) - (t - r) du/dt with du/dt = v d_x u + d_t u along the trajectory, one
  `jax.jvp` of u along (v, 1). The loss regresses u_theta onto stop_gradient of that target, with
  v the conditional velocity alpha' x0 + sigma' eps (training from data) or a teacher's (distillation),
  and the adaptive weight w = 1 / (||Delta||^2 + c)^p.
- Shortcut models (Frans, Hafner, Levine & Abbeel 2024, "One Step Diffusion via Shortcut Models"):
  the step size d = t - r conditions the network; d = 0 is flow matching on v, and the self-
  consistency target for a jump of 2d is the mean of two jumps of d,
  u(x_t, t, t - 2d) <- stop_gradient(1/2 [u(x_t, t, t - d) + u(x_t - d u(x_t, t, t - d), t - d, t - 2d)]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.denoisers import Denoiser
from diffjax.distill.common import (
    batch_data,
    check_loss_inputs,
    check_name,
    network_params,
    resolve_teacher,
)
from diffjax.losses import LogitNormal
from diffjax.processes import GaussianProcess, broadcast_to_data, per_example
from diffjax.samplers.base import Solver
from diffjax.validation import check_count, check_number, check_positive

__all__ = [
    "AverageVelocity",
    "AverageVelocityJump",
    "meanflow_target",
    "meanflow_loss",
    "shortcut_loss",
]


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as static pytree data
class AverageVelocity:
    """An average-velocity network net(x, t, r) -> u (module docstring). Called as (x, t) it is the
    velocity u(x, t, t) (prediction "velocity"); `jump(x, t, r)` = x - (t - r) u(x, t, r)."""

    net: Callable
    prediction: ClassVar[str] = "velocity"

    def __post_init__(self):
        if not callable(self.net):
            raise TypeError(f"net must be callable, got {type(self.net).__name__}")

    def average(self, x, t, r):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        r = jnp.broadcast_to(jnp.asarray(r, jnp.float32), (x.shape[0],))
        u = self.net(x, t, r)
        if u.shape != x.shape:
            raise ValueError(f"the network maps x of shape {x.shape} to shape {u.shape}; it must return x's shape")
        return u

    def __call__(self, x, t):
        return self.average(x, t, t)

    def jump(self, x, t, r):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        return x - broadcast_to_data(t - r, x) * self.average(x, t, r)

    def denoiser(self, process: GaussianProcess) -> Denoiser:
        return Denoiser(self, process, "velocity")


@dataclasses.dataclass(frozen=True)
class AverageVelocityJump(Solver):
    """x_next = x - (t - t_next) u(x, t, t_next): one network evaluation per jump, exact for the exact
    average velocity. Needs a Denoiser whose network is an `AverageVelocity` (`model.denoiser(process)`);
    use `denoise_final=False`."""

    def step(self, denoiser, x, state, t, t_next, key):
        if not isinstance(denoiser.fn, AverageVelocity):
            raise TypeError(
                "AverageVelocityJump needs a Denoiser built by AverageVelocity(net).denoiser(process), "
                f"got a network of type {type(denoiser.fn).__name__}"
            )
        return denoiser.fn.jump(x, t, t_next), state


def meanflow_target(net: Callable, x_t, t, r, v):
    """(u, u_target): u = net(x_t, t, r) and the MeanFlow target v - (t - r) (v d_x u + d_t u), the
    total derivative from one `jax.jvp` along (v, 1) at fixed r. t, r of shape (batch,)."""
    u, dudt = jax.jvp(lambda x, s: net(x, s, r), (x_t, t), (v, jnp.ones_like(t)))
    return u, v - broadcast_to_data(t - r, x_t) * dudt


def _conditional_velocity(process, x0, eps, t):
    dalpha, dsigma = process.alpha_sigma_derivatives(t)
    return broadcast_to_data(dalpha, x0) * x0 + broadcast_to_data(dsigma, x0) * eps


def _check_average_velocity_loss(apply_fn, process, teacher, student, data_key):
    check_loss_inputs(apply_fn, process, teacher)
    check_name("student", student)
    check_name("data_key", data_key)


def _velocity(teacher, params, process, x0, eps, x_t, t):
    if teacher is None:
        return _conditional_velocity(process, x0, eps, t)
    return jax.lax.stop_gradient(resolve_teacher(teacher, params).velocity(x_t, t))


def meanflow_loss(
    apply_fn: Callable,
    process: GaussianProcess,
    *,
    teacher=None,
    time_sampler=LogitNormal(mean=-0.4, std=1.0),
    equal_fraction: float = 0.75,
    power: float = 1.0,
    c: float = 1e-3,
    student: str = "student",
    data_key: str = "image",
):
    """MeanFlow (module docstring): `loss_fn(params, key, batch) -> (loss, aux)`.

    apply_fn(params[student], x, t, r) -> u. Two times are drawn by `time_sampler` (MeanFlow's
    logit-normal) and ordered t >= r; a fraction `equal_fraction` of the examples gets r = t (flow
    matching). teacher: None (v = alpha' x0 + sigma' eps, from data) or a `Denoiser` on `process`
    (or `teacher(params) -> Denoiser`), whose velocity is v. Loss: mean of
    stop_gradient(w) ||u - stop_gradient(u_target)||^2 / D with w = 1/(||.||^2 / D + c)^power
    (power = 0: plain L2). aux: "mse".
    """
    _check_average_velocity_loss(apply_fn, process, teacher, student, data_key)
    if isinstance(time_sampler, str) or not callable(time_sampler):
        raise TypeError(f"time_sampler must be an object such as LogitNormal(-0.4, 1.0), got {time_sampler!r:.100}")
    check_number("equal_fraction", equal_fraction)
    if not 0.0 <= equal_fraction <= 1.0:
        raise ValueError(f"equal_fraction must lie in [0, 1], got {equal_fraction!r}")
    check_number("power", power)
    check_positive("c", c)
    t_min, t_max = process.t_min, process.t_max

    def loss_fn(params, key, batch):
        x0 = batch_data(batch, data_key)
        n = x0.shape[0]
        key_t, key_r, key_eq, key_eps = jax.random.split(key, 4)
        t1, _ = time_sampler(process, key_t, n, t_min, t_max)
        t2, _ = time_sampler(process, key_r, n, t_min, t_max)
        t, r = jnp.maximum(t1, t2), jnp.minimum(t1, t2)
        r = jnp.where(jax.random.uniform(key_eq, (n,)) < equal_fraction, t, r)
        eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
        x_t = process.perturb(x0, t, eps)
        v = _velocity(teacher, params, process, x0, eps, x_t, t)
        student_params = network_params(params, student)
        u, target = meanflow_target(lambda x, s, q: apply_fn(student_params, x, s, q), x_t, t, r, v)
        sq = per_example(jnp.mean, (u - jax.lax.stop_gradient(target)).astype(jnp.float32) ** 2)
        weight = jax.lax.stop_gradient(1.0 / (sq + c) ** power)
        return jnp.mean(weight * sq), {"mse": jnp.mean(sq)}

    return loss_fn


def shortcut_loss(
    apply_fn: Callable,
    process: GaussianProcess,
    *,
    teacher=None,
    max_doublings: int = 7,
    consistency_fraction: float = 0.25,
    student: str = "student",
    data_key: str = "image",
):
    """Shortcut models (module docstring): `loss_fn(params, key, batch) -> (loss, aux)`.

    apply_fn(params[student], x, t, r) -> u with step size d = t - r. The first
    round(consistency_fraction * batch) examples get the self-consistency target for a jump of 2d,
    d = (t_max - t_min) / 2^k with k uniform in 1..max_doublings and t uniform in
    [t_min + 2d, t_max]; the others flow matching, u(x_t, t, t) onto v (conditional, or the teacher's
    velocity). aux: "flow_mse", "consistency_mse".
    """
    _check_average_velocity_loss(apply_fn, process, teacher, student, data_key)
    check_count("max_doublings", max_doublings)
    check_number("consistency_fraction", consistency_fraction)
    if not 0.0 < consistency_fraction < 1.0:
        raise ValueError(f"consistency_fraction must lie in (0, 1), got {consistency_fraction!r}")
    t_min, t_max = process.t_min, process.t_max
    span = t_max - t_min

    def loss_fn(params, key, batch):
        x0 = batch_data(batch, data_key)
        n = x0.shape[0]
        k = max(1, min(n - 1, round(consistency_fraction * n)))
        key_t, key_k, key_eps = jax.random.split(key, 3)
        eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
        student_params = network_params(params, student)
        model = AverageVelocity(lambda x, s, q: apply_fn(student_params, x, s, q))
        frozen = AverageVelocity(lambda x, s, q: apply_fn(jax.lax.stop_gradient(student_params), x, s, q))
        # flow matching part
        u_t = jax.random.uniform(key_t, (n,))
        t_fm = t_min + u_t[k:] * span
        x_fm = process.perturb(x0[k:], t_fm, eps[k:])
        v = _velocity(teacher, params, process, x0[k:], eps[k:], x_fm, t_fm)
        flow_mse = per_example(jnp.mean, (model(x_fm, t_fm) - v) ** 2)
        # self-consistency part
        d = span / 2.0 ** jax.random.randint(key_k, (k,), 1, max_doublings + 1).astype(jnp.float32)
        t = t_min + 2 * d + u_t[:k] * (span - 2 * d)
        x_t = process.perturb(x0[:k], t, eps[:k])
        first = frozen.average(x_t, t, t - d)
        x_mid = x_t - broadcast_to_data(d, x_t) * first
        target = jax.lax.stop_gradient(0.5 * (first + frozen.average(x_mid, t - d, t - 2 * d)))
        consistency_mse = per_example(jnp.mean, (model.average(x_t, t, t - 2 * d) - target) ** 2)
        loss = (jnp.sum(flow_mse) + jnp.sum(consistency_mse)) / n
        return loss, {"flow_mse": jnp.mean(flow_mse), "consistency_mse": jnp.mean(consistency_mse)}

    return loss_fn
