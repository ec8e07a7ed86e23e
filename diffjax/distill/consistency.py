"""Consistency models: the boundary-condition parameterisation, discretisation schedules, and the
consistency distillation (CD) and consistency training (CT) losses.

A consistency function maps every point of a probability-flow ODE trajectory to its start,
f(x_t, t) = x_{t_min} (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models"). It is learned
by making f agree at two neighbouring times t > r of one trajectory:

    L = E[ lambda(t, r) d( f_theta(x_t, t), f_theta^-(x_r, r) ) ],

with x_t = alpha_t x0 + sigma_t z and x_r either one ODE step of a teacher from x_t (CD) or
alpha_r x0 + sigma_r z with the same z (CT, an unbiased estimate of the teacher's step with the
true score as t - r -> 0). theta^- is stop_gradient(theta) (iCT, ECT) or an EMA (the original CM;
see `common.update_target`). Times are drawn by a *schedule* in the EDM noise level s = sigma/alpha:

    KarrasDiscretisation  a fixed Karras grid of N intervals, uniform index (CM, for CD)
    ImprovedDiscretisation iCT (Song & Dhariwal 2023): N doubling from s0 to s1 over training, index
                          drawn from a discretised log-normal, lambda = 1/(s_{i+1} - s_i)
    EasyDiscretisation    ECT (Geng et al. 2024, "Consistency Models Made Easy"): continuous
                          log-normal t, r = t - t n(t) / q^stage clipped at s_min (stage 0 is plain
                          diffusion training), lambda = 1/(t - r)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.denoisers import Denoiser, check_wrapped_network
from diffjax.distill.common import (
    L2,
    PseudoHuber,
    apply_student,
    batch_data,
    batch_iteration,
    check_loss_inputs,
    check_metric,
    check_name,
    check_teacher,
    check_teacher_solver,
    network_params,
    resolve_teacher,
    target_params,
)
from diffjax.processes import GaussianProcess, broadcast_to_data
from diffjax.samplers.base import NoState, Solver
from diffjax.samplers.ddim import DDIM
from diffjax.validation import check_count, check_number, check_positive

__all__ = [
    "ConsistencyFunction",
    "noise_level_range",
    "times_of_noise_levels",
    "karras_noise_levels",
    "KarrasDiscretisation",
    "ImprovedDiscretisation",
    "EasyDiscretisation",
    "teacher_ode_step",
    "consistency_distillation_loss",
    "consistency_training_loss",
]


def noise_level_range(process: GaussianProcess) -> tuple[float, float]:
    """(s_min, s_max): the EDM noise level s = sigma/alpha at the process's t_min and t_max (finite)."""
    with jax.ensure_compile_time_eval():
        ends = [
            float(process.sigma(jnp.float32(t)) / process.alpha(jnp.float32(t))) for t in (process.t_min, process.t_max)
        ]
    if not all(math.isfinite(s) and s > 0 for s in ends):
        raise ValueError(
            f"{type(process).__name__} has noise levels sigma/alpha = {ends} at (t_min, t_max); consistency "
            "schedules need both finite and positive (use a process with alpha(t_max) > 0 and sigma(t_min) > 0)"
        )
    return ends[0], ends[1]


def times_of_noise_levels(process: GaussianProcess, s):
    """t with sigma(t)/alpha(t) = s (exact for EDM, where t = s), clipped to the process's range."""
    return process.t_from_log_snr(-2.0 * jnp.log(s))


def karras_noise_levels(s_min: float, s_max: float, intervals, rho: float = 7.0, size: int | None = None):
    """s_i = (s_min^(1/rho) + i/N (s_max^(1/rho) - s_min^(1/rho)))^rho, i = 0..N (Karras et al. 2022,
    eq. 5, increasing). N = `intervals` may be traced; `size` (static, >= N + 1) pads the array."""
    size = int(intervals) + 1 if size is None else size
    i = jnp.arange(size, dtype=jnp.float32)
    frac = jnp.minimum(i / jnp.asarray(intervals, jnp.float32), 1.0)
    lo, hi = s_min ** (1.0 / rho), s_max ** (1.0 / rho)
    return (lo + frac * (hi - lo)) ** rho


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as static pytree data
class ConsistencyFunction:
    """The consistency-model parameterisation (Song et al. 2023, eq. 3 and App. C) on any Gaussian
    path, in the scaled variables x~ = x/alpha and s = sigma/alpha (s_min = s at `t_min`):

      f(x, t) = c_skip(s) x~ + c_out(s) F(c_in(s) x~, c_noise(s)),
      c_skip = sd^2 / ((s - s_min)^2 + sd^2),  c_out = sd (s - s_min) / sqrt(s^2 + sd^2),
      c_in = 1 / sqrt(s^2 + sd^2),            c_noise = log(s) / 4,

    so c_skip = 1 and c_out = 0 at t_min and the boundary condition f(x, t_min) = x / alpha(t_min)
    (= x for EDM and VE) holds exactly, whatever F is. Calling it returns the x0-estimate (it
    declares prediction "x0"): `Denoiser(ConsistencyFunction(F, process), process, "x0")` is the
    consistency model as a diffjax denoiser (for `ConsistencySampler`).
    """

    net: Callable
    process: GaussianProcess
    sigma_data: float = 0.5
    t_min: float | None = None
    prediction: ClassVar[str] = "x0"

    def __post_init__(self):
        check_wrapped_network(self.net, self.sigma_data, self.process)
        if self.t_min is not None:
            check_number("t_min", self.t_min)

    def coefficients(self, t):
        """(c_in, c_skip, c_out, c_noise) at t, each of t's shape."""
        process = self.process
        t_min = process.t_min if self.t_min is None else self.t_min
        s = process.sigma(t) / process.alpha(t)
        s_min = process.sigma(jnp.float32(t_min)) / process.alpha(jnp.float32(t_min))
        sd2 = self.sigma_data**2
        norm = jnp.sqrt(s**2 + sd2)
        c_skip = sd2 / ((s - s_min) ** 2 + sd2)
        c_out = self.sigma_data * (s - s_min) / norm
        return 1.0 / norm, c_skip, c_out, jnp.log(s) / 4.0

    def __call__(self, x, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        c_in, c_skip, c_out, c_noise = self.coefficients(t)
        b = lambda c: broadcast_to_data(c, x)  # noqa: E731
        x_scaled = x / b(self.process.alpha(t))
        raw = self.net(b(c_in) * x_scaled, c_noise)
        if raw.shape != x.shape:
            raise ValueError(
                f"the raw network maps x of shape {x.shape} to shape {raw.shape}; it must return x's shape"
            )
        return b(c_skip) * x_scaled + b(c_out) * raw

    def denoiser(self) -> Denoiser:
        return Denoiser(self, self.process, "x0")


# ------------------------------------------------------------------------------------------------
# discretisation schedules: (process, key, n, iteration) -> (t, r, weight), t > r, of shape (n,)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KarrasDiscretisation:
    """A fixed Karras grid of `intervals` noise-level intervals between the process's end points; the
    interval index is uniform, weight 1 (Song et al. 2023: N = 18 intervals for CD on CIFAR-10)."""

    intervals: int = 18
    rho: float = 7.0
    needs_iteration: ClassVar[bool] = False

    def __post_init__(self):
        check_count("KarrasDiscretisation intervals", self.intervals)
        check_positive("KarrasDiscretisation rho", self.rho)

    def __call__(self, process, key, n: int, iteration=None):
        s_min, s_max = noise_level_range(process)
        levels = karras_noise_levels(s_min, s_max, self.intervals, self.rho)
        i = jax.random.randint(key, (n,), 0, self.intervals)
        t, r = times_of_noise_levels(process, levels[i + 1]), times_of_noise_levels(process, levels[i])
        return t, r, jnp.ones((n,), jnp.float32)


def _log_normal_cdf_erf(s, mean, std):
    return jax.scipy.special.erf((jnp.log(s) - mean) / (math.sqrt(2.0) * std))


@dataclasses.dataclass(frozen=True)
class ImprovedDiscretisation:
    """iCT's curriculum (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models"):
    N(k) = min(s0 2^floor(k / K'), s1) intervals at iteration k, K' = floor(K / (log2(s1/s0) + 1)),
    on a Karras grid s_0 < ... < s_N; interval i drawn with probability proportional to
    erf((log s_{i+1} - P_mean)/(sqrt 2 P_std)) - erf((log s_i - P_mean)/(sqrt 2 P_std)); weight
    lambda = 1 / (s_{i+1} - s_i). Reads the iteration k from the batch."""

    total_iterations: int = 400_000
    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0
    rho: float = 7.0
    needs_iteration: ClassVar[bool] = True

    def __post_init__(self):
        check_count("ImprovedDiscretisation total_iterations", self.total_iterations)
        check_count("ImprovedDiscretisation s0", self.s0)
        check_count("ImprovedDiscretisation s1", self.s1)
        if self.s1 < self.s0:
            raise ValueError(f"ImprovedDiscretisation needs s1 >= s0, got s0={self.s0}, s1={self.s1}")
        check_number("ImprovedDiscretisation p_mean", self.p_mean)
        check_positive("ImprovedDiscretisation p_std", self.p_std)
        check_positive("ImprovedDiscretisation rho", self.rho)

    def intervals(self, iteration):
        """N(k), the number of intervals at iteration k (traceable)."""
        stage_length = max(self.total_iterations // int(math.log2(self.s1 / self.s0) + 1), 1)
        doublings = jnp.asarray(iteration, jnp.int32) // stage_length
        return jnp.minimum(self.s0 * 2 ** jnp.minimum(doublings, 30), self.s1)

    def __call__(self, process, key, n: int, iteration=None):
        s_min, s_max = noise_level_range(process)
        intervals = self.intervals(iteration)
        levels = karras_noise_levels(s_min, s_max, intervals, self.rho, size=self.s1 + 1)
        mass = _log_normal_cdf_erf(levels[1:], self.p_mean, self.p_std) - _log_normal_cdf_erf(
            levels[:-1], self.p_mean, self.p_std
        )
        valid = jnp.arange(self.s1) < intervals
        logits = jnp.where(valid, jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)
        i = jax.random.categorical(key, logits, shape=(n,))
        s_hi, s_lo = levels[i + 1], levels[i]
        t, r = times_of_noise_levels(process, s_hi), times_of_noise_levels(process, s_lo)
        return t, r, 1.0 / (s_hi - s_lo)


@dataclasses.dataclass(frozen=True)
class EasyDiscretisation:
    """ECT's schedule (Geng et al. 2024): log s_t ~ N(P_mean, P_std^2) (clipped to the process's
    range), s_r = max(s_t - s_t n(s_t) / q^a, s_min) with n(s) = 1 + k sigmoid(-b s) and stage
    a = floor(iteration / stage_iterations); weight 1/(s_t - s_r). Stage 0 (r = s_min, f(x_r) = x_r)
    is diffusion training; later stages shrink t - r by q each. Reads the iteration from the batch."""

    stage_iterations: int = 25_000
    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    p_mean: float = -1.1
    p_std: float = 2.0
    needs_iteration: ClassVar[bool] = True

    def __post_init__(self):
        check_count("EasyDiscretisation stage_iterations", self.stage_iterations)
        if not (isinstance(self.q, (int, float)) and self.q > 1):
            raise ValueError(f"EasyDiscretisation q must be a number > 1, got {self.q!r}")
        check_number("EasyDiscretisation k", self.k)
        check_number("EasyDiscretisation b", self.b)
        check_number("EasyDiscretisation p_mean", self.p_mean)
        check_positive("EasyDiscretisation p_std", self.p_std)

    def __call__(self, process, key, n: int, iteration=None):
        s_min, s_max = noise_level_range(process)
        log_s = self.p_mean + self.p_std * jax.random.normal(key, (n,))
        s_t = jnp.clip(jnp.exp(log_s), s_min * (1.0 + 1e-3), s_max)
        stage = jnp.asarray(iteration, jnp.int32) // self.stage_iterations
        shrink = jnp.power(jnp.float32(self.q), -jnp.minimum(stage, 60).astype(jnp.float32))
        ratio = (1.0 + self.k * jax.nn.sigmoid(-self.b * s_t)) * shrink
        s_r = jnp.maximum(s_t - s_t * ratio, s_min)
        t, r = times_of_noise_levels(process, s_t), times_of_noise_levels(process, s_r)
        return t, r, 1.0 / (s_t - s_r)


def _check_schedule(schedule) -> None:
    if isinstance(schedule, str) or not callable(schedule):
        raise TypeError(
            f"schedule must be an object such as ImprovedDiscretisation() or EasyDiscretisation(), "
            f"got {schedule!r:.100}"
        )


# ------------------------------------------------------------------------------------------------
# the losses
# ------------------------------------------------------------------------------------------------


def teacher_ode_step(teacher: Denoiser, solver: Solver, x_t, t, r):
    """One probability-flow ODE step of `teacher` from t to r < t (both (batch,)) by a deterministic
    one-step `solver` (DDIM(): the first-order exponential integrator; Heun(), EDMHeun(): 2 NFE)."""
    x_r, _ = solver.step(teacher, x_t, NoState(), t, r, None)
    return x_r


def _consistency_loss(apply_fn, process, schedule, metric, sigma_data, student, target, data_key, step_key, step_to_r):
    def loss_fn(params, key, batch):
        x0 = batch_data(batch, data_key)
        n = x0.shape[0]
        iteration = batch_iteration(batch, step_key, type(schedule).__name__) if schedule.needs_iteration else None
        key_t, key_z = jax.random.split(key)
        t, r, weight = schedule(process, key_t, n, iteration)
        z = jax.random.normal(key_z, x0.shape, x0.dtype)
        x_t = process.perturb(x0, t, z)
        x_r = jax.lax.stop_gradient(step_to_r(params, x0, z, x_t, t, r))
        online = ConsistencyFunction(apply_student(apply_fn, network_params(params, student)), process, sigma_data)
        frozen = ConsistencyFunction(
            apply_student(apply_fn, target_params(params, student, target)), process, sigma_data
        )
        distance = metric(online(x_t, t), jax.lax.stop_gradient(frozen(x_r, r)))
        loss = jnp.mean(weight * distance)
        return loss, {"distance": jnp.mean(distance), "weight_mean": jnp.mean(weight)}

    return loss_fn


def _check_common(apply_fn, process, schedule, metric, sigma_data, student, target, data_key, step_key):
    check_loss_inputs(apply_fn, process)
    _check_schedule(schedule)
    check_metric(metric)
    check_positive("sigma_data", sigma_data)
    check_name("student", student)
    if target is not None:
        check_name("target", target)
    check_name("data_key", data_key)
    check_name("step_key", step_key)
    noise_level_range(process)


def consistency_training_loss(
    apply_fn: Callable,
    process: GaussianProcess,
    *,
    schedule=ImprovedDiscretisation(),
    metric=PseudoHuber(),
    sigma_data: float = 0.5,
    student: str = "student",
    target: str | None = None,
    data_key: str = "image",
    step_key: str = "step",
):
    """Consistency training (Song et al. 2023, Alg. 3; iCT/ECT schedules): `loss_fn(params, key, batch)`
    with x_t = alpha_t x0 + sigma_t z, x_r = alpha_r x0 + sigma_r z (one z), and
    L = mean lambda d(f_theta(x_t, t), stop_gradient f_theta^-(x_r, r)).

    apply_fn(params[student], x_in, c_noise) is the raw network F of `ConsistencyFunction` (it sees
    c_noise = log(s)/4, not t). target: None for theta^- = stop_gradient(theta) (iCT, ECT), or the
    params entry of an EMA copy (refresh it with `update_target`). aux: "distance" (mean metric),
    "weight_mean".
    """
    _check_common(apply_fn, process, schedule, metric, sigma_data, student, target, data_key, step_key)

    def step_to_r(params, x0, z, x_t, t, r):
        return process.perturb(x0, r, z)

    return _consistency_loss(
        apply_fn, process, schedule, metric, sigma_data, student, target, data_key, step_key, step_to_r
    )


def consistency_distillation_loss(
    apply_fn: Callable,
    process: GaussianProcess,
    teacher,
    *,
    teacher_solver: Solver = DDIM(),
    schedule=KarrasDiscretisation(),
    metric=L2(),
    sigma_data: float = 0.5,
    student: str = "student",
    target: str | None = None,
    data_key: str = "image",
    step_key: str = "step",
):
    """Consistency distillation (Song et al. 2023, Alg. 2): x_r is one ODE step of the teacher from
    x_t = alpha_t x0 + sigma_t z by `teacher_solver` (`teacher_ode_step`), and
    L = mean lambda d(f_theta(x_t, t), stop_gradient f_theta^-(x_r, r)).

    teacher: a `Denoiser` on `process` (e.g. an exact one), or `teacher(params) -> Denoiser` built
    from the params pytree. Other arguments as in `consistency_training_loss`.
    """
    _check_common(apply_fn, process, schedule, metric, sigma_data, student, target, data_key, step_key)
    check_teacher(teacher, process)
    check_teacher_solver(teacher_solver)

    def step_to_r(params, x0, z, x_t, t, r):
        return teacher_ode_step(resolve_teacher(teacher, params), teacher_solver, x_t, t, r)

    return _consistency_loss(
        apply_fn, process, schedule, metric, sigma_data, student, target, data_key, step_key, step_to_r
    )
