"""Continuous-time consistency models, simplified and stabilised (sCM; Lu & Song 2024, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models").

TrigFlow is the Gaussian path x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2] (alpha =
cos t, sigma = sd sin t: `TrigFlow`), whose diffusion model predicts sd F = dx_t/dt and whose
consistency model is parameterised as

    f_theta(x_t, t) = cos(t) x_t - sin(t) sd F_theta(x_t / sd, t),     f(x, 0) = x exactly.

The continuous-time CM objective has gradient E[w(t) grad_theta sd F_theta^T df_theta^-/dt]; sCM's
Algorithm 1 writes it as a regression onto a stop-gradient target,

    g = -cos^2(t) (sd F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sd dF^-/dt)          (= cos t df^-/dt at r = 1)
    L = e^{w_phi(t)} / D ||F_theta(x_t/sd, t) - F^-(x_t/sd, t) - g / (||g|| + c)||^2 - w_phi(t),

with F^- = stop_gradient(F_theta), dx_t/dt = cos(t) z - sin(t) x0 (consistency training) or the
teacher's velocity sd F_teacher (distillation), r = min(1, iteration / H) the tangent warm-up, and
cos(t) sin(t) sd dF^-/dt one forward-mode product `jax.jvp(F^-, (x_t/sd, t), (cos sin dx_t/dt,
cos sin sd))` (`scm_tangent`). w_phi is the adaptive weighting, a small network trained jointly
(`AdaptiveWeighting`). Times: log(sd tan t) ~ N(P_mean, P_std^2), i.e. `LogNormal(-1.0, 1.4)` on
TrigFlow.
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
    apply_student,
    batch_data,
    batch_iteration,
    check_loss_inputs,
    check_name,
    network_params,
    resolve_teacher,
)
from diffjax.losses import LogNormal
from diffjax.processes import GaussianProcess, broadcast_to_data, per_example
from diffjax.validation import check_count, check_number, check_positive

__all__ = [
    "TrigFlow",
    "TrigFlowConsistency",
    "TangentNormalization",
    "TangentClipping",
    "AdaptiveWeighting",
    "scm_tangent",
    "scm_loss",
]


@dataclasses.dataclass(frozen=True)
class TrigFlow(GaussianProcess):
    """TrigFlow (Lu & Song 2024): alpha = cos t, sigma = sd sin t, t in [t_min, t_max] within
    [0, pi/2]; the EDM noise level is s = sd tan t. Defaults: s from 0.002 to 80."""

    sigma_data: float = 0.5
    t_min: float = math.atan(0.002 / 0.5)
    t_max: float = math.atan(80.0 / 0.5)
    name: ClassVar[str] = "trigflow"

    def __post_init__(self):
        check_positive("TrigFlow sigma_data", self.sigma_data)
        check_number("TrigFlow t_min", self.t_min)
        check_number("TrigFlow t_max", self.t_max)
        if not (0.0 < self.t_min < self.t_max <= math.pi / 2):
            raise ValueError(f"TrigFlow needs 0 < t_min < t_max <= pi/2, got t_min={self.t_min}, t_max={self.t_max}")

    def alpha(self, t):
        return jnp.cos(jnp.asarray(t, jnp.float32))

    def sigma(self, t):
        return self.sigma_data * jnp.sin(jnp.asarray(t, jnp.float32))

    def log_snr(self, t):
        t = jnp.asarray(t, jnp.float32)
        return -2.0 * jnp.log(self.sigma_data * jnp.tan(t))

    def t_from_log_snr(self, lam):
        t = jnp.arctan(jnp.exp(-0.5 * jnp.asarray(lam, jnp.float32)) / self.sigma_data)
        return jnp.clip(t, self.t_min, self.t_max)


jax.tree_util.register_dataclass(TrigFlow, data_fields=[], meta_fields=["sigma_data", "t_min", "t_max"])


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as static pytree data
class TrigFlowConsistency:
    """sCM's consistency function f(x, t) = cos(t) x - sin(t) sd F(x / sd, t) (Lu & Song 2024, eq. 7),
    f(x, 0) = x. Calling it returns the x0-estimate (prediction "x0")."""

    net: Callable
    sigma_data: float = 0.5
    prediction: ClassVar[str] = "x0"

    def __post_init__(self):
        check_wrapped_network(self.net, self.sigma_data)

    def __call__(self, x, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        raw = self.net(x / self.sigma_data, t)
        if raw.shape != x.shape:
            raise ValueError(
                f"the raw network maps x of shape {x.shape} to shape {raw.shape}; it must return x's shape"
            )
        b = lambda c: broadcast_to_data(c, x)  # noqa: E731
        return b(jnp.cos(t)) * x - b(jnp.sin(t)) * self.sigma_data * raw

    def denoiser(self, process: TrigFlow) -> Denoiser:
        if not (isinstance(process, TrigFlow) and process.sigma_data == self.sigma_data):
            raise ValueError(
                f"a TrigFlowConsistency with sigma_data={self.sigma_data} needs a TrigFlow of that sigma_data"
            )
        return Denoiser(self, process, "x0")


# ------------------------------------------------------------------------------------------------
# tangent, its normalisation, the adaptive weighting
# ------------------------------------------------------------------------------------------------


def scm_tangent(net: Callable, x_t, t, dxdt, sigma_data: float, warmup=1.0):
    """(F^-, g): the network F^-(x_t/sd, t) and sCM's tangent (module docstring)
    g = -cos^2 t (sd F^- - dx_t/dt) - warmup cos t sin t (x_t + sd dF^-/dt), with cos t sin t sd dF^-/dt
    from one `jax.jvp` of F^- along (cos t sin t dx_t/dt, cos t sin t sd). At warmup = 1,
    g = cos(t) df^-/dt along dx_t/dt; it is zero for the exact consistency function and the exact
    velocity. t has shape (batch,); net(x_scaled, t) -> array of x's shape."""
    b = lambda c: broadcast_to_data(c, x_t)  # noqa: E731
    cos, sin = jnp.cos(t), jnp.sin(t)
    tangents = (b(cos * sin) * dxdt, cos * sin * sigma_data)
    value, dvalue = jax.jvp(net, (x_t / sigma_data, t), tangents)
    g = -b(cos**2) * (sigma_data * value - dxdt) - warmup * (b(cos * sin) * x_t + dvalue)
    return value, g


@dataclasses.dataclass(frozen=True)
class TangentNormalization:
    """g <- g / (||g|| + c), the norm per example over all features (sCM, Sec. 4.2; c = 0.1)."""

    c: float = 0.1

    def __post_init__(self):
        check_positive("TangentNormalization c", self.c)

    def __call__(self, g):
        norm = jnp.sqrt(per_example(jnp.sum, g.astype(jnp.float32) ** 2, keepdims=True))
        return g / (norm + self.c)


@dataclasses.dataclass(frozen=True)
class TangentClipping:
    """g <- clip(g, -bound, bound) elementwise (the alternative sCM mentions, Sec. 4.2)."""

    bound: float = 1.0

    def __post_init__(self):
        check_positive("TangentClipping bound", self.bound)

    def __call__(self, g):
        return jnp.clip(g, -self.bound, self.bound)


@dataclasses.dataclass(frozen=True)
class AdaptiveWeighting:
    """sCM's learned weighting w_phi(t) (Sec. 4.3, after EDM2's uncertainty weighting): a linear map of
    `features` fixed Fourier features [cos(f_i t), sin(f_i t)], f_i log-spaced in [1, max_frequency].
    The loss is e^{w} mse - w, whose optimum in w is -log(mse): each t's loss is normalised.
    `init(key)` gives the params (zeros: w = 0 at the start); `weight(params, t)` gives w of t's shape."""

    features: int = 32
    max_frequency: float = 100.0

    def __post_init__(self):
        check_count("AdaptiveWeighting features", self.features)
        check_positive("AdaptiveWeighting max_frequency", self.max_frequency)

    def init(self, key=None):
        del key
        return {"kernel": jnp.zeros((2 * self.features,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}

    def weight(self, params, t):
        freqs = jnp.exp(jnp.linspace(0.0, math.log(self.max_frequency), self.features))
        angle = jnp.asarray(t, jnp.float32)[..., None] * freqs
        feats = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1) / math.sqrt(self.features)
        return feats @ params["kernel"] + params["bias"]


# ------------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------------


def scm_loss(
    apply_fn: Callable,
    process: TrigFlow,
    *,
    teacher=None,
    tangent_scaling=TangentNormalization(),
    weighting: AdaptiveWeighting | None = AdaptiveWeighting(),
    time_sampler=LogNormal(mean=-1.0, std=1.4),
    tangent_warmup: int = 0,
    student: str = "student",
    weighting_key: str = "weighting",
    data_key: str = "image",
    step_key: str = "step",
):
    """sCM (Lu & Song 2024, Alg. 1): `loss_fn(params, key, batch) -> (loss, aux)` (module docstring).

    apply_fn(params[student], x / sd, t) -> F, the raw network of `TrigFlowConsistency`.
    teacher: None for consistency training (dx_t/dt = cos t z - sin t x0), or a `Denoiser` on
      `process` (or `teacher(params) -> Denoiser`) whose velocity view is dx_t/dt (sCD).
    tangent_scaling: `TangentNormalization(c)`, `TangentClipping(bound)` or None.
    weighting: `AdaptiveWeighting()` with its params under params[weighting_key] (trained with the
      student), or None for w = 0.
    tangent_warmup: H, the iterations over which r rises linearly from 0 to 1 (0: r = 1); H > 0
      reads the iteration from batch[step_key].
    aux: "mse" (unweighted), "tangent_norm" (mean ||g|| before scaling), "weight" (mean w).
    """
    check_loss_inputs(apply_fn, process, teacher, TrigFlow)
    if not (tangent_scaling is None or callable(tangent_scaling)):
        raise TypeError(
            f"tangent_scaling must be TangentNormalization(), TangentClipping() or None, got {tangent_scaling!r:.100}"
        )
    if not (weighting is None or isinstance(weighting, AdaptiveWeighting)):
        raise TypeError(f"weighting must be AdaptiveWeighting() or None, got {weighting!r:.100}")
    if isinstance(time_sampler, str) or not callable(time_sampler):
        raise TypeError(f"time_sampler must be an object such as LogNormal(-1.0, 1.4), got {time_sampler!r:.100}")
    if not (isinstance(tangent_warmup, int) and tangent_warmup >= 0):
        raise ValueError(f"tangent_warmup must be an int >= 0 (iterations), got {tangent_warmup!r}")
    for name, value in (
        ("student", student),
        ("weighting_key", weighting_key),
        ("data_key", data_key),
        ("step_key", step_key),
    ):
        check_name(name, value)
    sd = process.sigma_data
    t_min, t_max = process.t_min, process.t_max

    def loss_fn(params, key, batch):
        x0 = batch_data(batch, data_key)
        n = x0.shape[0]
        key_t, key_z = jax.random.split(key)
        t, _ = time_sampler(process, key_t, n, t_min, t_max)
        eps = jax.random.normal(key_z, x0.shape, x0.dtype)
        x_t = process.perturb(x0, t, eps)
        if teacher is None:
            b = lambda c: broadcast_to_data(c, x0)  # noqa: E731
            dxdt = b(jnp.cos(t)) * sd * eps - b(jnp.sin(t)) * x0
        else:
            dxdt = resolve_teacher(teacher, params).velocity(x_t, t)
        dxdt = jax.lax.stop_gradient(dxdt)
        if tangent_warmup > 0:
            iteration = batch_iteration(batch, step_key, "the sCM tangent warm-up")
            warmup = jnp.minimum(1.0, iteration.astype(jnp.float32) / tangent_warmup)
        else:
            warmup = 1.0
        student_params = network_params(params, student)
        frozen_net = apply_student(apply_fn, jax.lax.stop_gradient(student_params))
        frozen, g = scm_tangent(frozen_net, x_t, t, dxdt, sd, warmup)
        g = jax.lax.stop_gradient(g)
        tangent_norm = jnp.mean(jnp.sqrt(per_example(jnp.sum, g**2)))
        if tangent_scaling is not None:
            g = tangent_scaling(g)
        online = apply_fn(student_params, x_t / sd, t)
        mse = per_example(jnp.mean, (online - jax.lax.stop_gradient(frozen) - g).astype(jnp.float32) ** 2)
        if weighting is None:
            w = jnp.zeros_like(mse)
        else:
            w = weighting.weight(network_params(params, weighting_key, "adaptive weighting"), t)
        loss = jnp.mean(jnp.exp(w) * mse - w)
        return loss, {"mse": jnp.mean(mse), "tangent_norm": tangent_norm, "weight": jnp.mean(w)}

    return loss_fn
