"""DPM-Solver family: single-step DPM-Solver-1/2/3 (and DPM-Solver++ 2S/3S), multistep
DPM-Solver++ (2M, 3M) and SDE-DPM-Solver++(2M). All are exponential integrators in the half
log-SNR lam = log(alpha/sigma); see `exponential.py` for the shared pieces."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.processes import broadcast_to_data
from diffjax.samplers.base import (
    History,
    Solver,
    check_option,
    check_order,
    check_unit_interval,
    group_phases,
    phase_field,
    specialise,
)
from diffjax.samplers.ddim import ddim_data_form, ddim_step
from diffjax.samplers.exponential import (
    check_lower_order_final,
    half_log_snr,
    multistep_orders,
    phi_functions,
    polynomial_correction,
)

__all__ = ["DPMSolver", "DPMSolverPP", "DPMSolverPPSDE"]


def _b(coef, x):
    return broadcast_to_data(coef, x)


@dataclasses.dataclass(frozen=True)
class DPMSolver(Solver):
    """Single-step DPM-Solver-k (Lu et al. 2022, Alg. 1 and 2, r1 = 1/2 for k = 2, r1 = 1/3,
    r2 = 2/3 for k = 3) in the noise form, or DPM-Solver++(2S/3S) (Lu et al. 2022b) in the data form
    (`data_prediction=True`). Each step evaluates the network at `order` points: order NFE per step;
    global order = `order`. The noise form multiplies its eps differences by sigma_next (e^h - 1),
    which grows like e^h: with a step or two over the whole range (5 NFE or fewer) it is far off,
    and `data_prediction=True` is the stable choice (experiments/results/sampler_defaults_review.md).
    """

    order: int = 3
    data_prediction: bool = False

    def __post_init__(self):
        check_order(self, (1, 2, 3))

    def nfe(self, steps):
        return steps * self.order

    def step(self, denoiser, x, state, t, t_next, key):
        process = denoiser.process
        lam_t, lam_s = half_log_snr(process, t), half_log_snr(process, t_next)
        h = lam_s - lam_t
        sign = -1.0 if self.data_prediction else 1.0  # exponent sign: e^{-h} (data), e^{h} (noise)

        def view(x0, eps):
            return x0 if self.data_prediction else eps

        def scale(s):  # the integral's prefactor: + alpha_s (data) or - sigma_s (noise)
            return _b(process.alpha(s) if self.data_prediction else -process.sigma(s), x)

        def at(r):
            """The time at lam_t + r h and the ratio r it really has (t_from_log_snr rounds)."""
            s = process.t_from_log_snr(2.0 * (lam_t + r * h))
            return s, (half_log_snr(process, s) - lam_t) / h

        x0, eps = denoiser.predict(x, t)
        base = view(x0, eps)
        x_s = ddim_step(process, x0, eps, t_next)
        if self.order == 1:
            return x_s, state
        if self.order == 2:
            s1, r1 = at(0.5)
            d1 = view(*denoiser.predict(ddim_step(process, x0, eps, s1), s1)) - base
            (phi1,) = phi_functions(sign * h, 1)
            return x_s + scale(t_next) * (h * phi1 / (2 * r1)) * d1, state
        (s1, r1), (s2, r2) = at(1.0 / 3.0), at(2.0 / 3.0)
        d1 = view(*denoiser.predict(ddim_step(process, x0, eps, s1), s1)) - base
        _, phi2_r2 = phi_functions(sign * r2 * h, 2)
        u2 = ddim_step(process, x0, eps, s2) + scale(s2) * (r2 / r1 * r2 * h * phi2_r2) * d1
        d2 = view(*denoiser.predict(u2, s2)) - base
        _, phi2 = phi_functions(sign * h, 2)
        return x_s + scale(t_next) * (h * phi2 / r2) * d2, state


@dataclasses.dataclass(frozen=True)
class _Multistep(Solver):
    """State: a `History` of the last x0 predictions at their half log-SNRs, newest first."""

    order: int = 2
    lower_order_final: str = "before_denoise"
    step_order: int = phase_field(0)  # the order of this phase's steps (warm-up and final: lower)

    def init(self, denoiser, x, ts):
        return History.empty(max(self.order - 1, 1), x)

    def phases(self, steps):
        orders = multistep_orders(steps, self.order, self.lower_order_final)
        return group_phases([specialise(self, step_order=order) for order in orders])


QUADRATIC_WEIGHTS = ("exact", "halved")


@dataclasses.dataclass(frozen=True)
class DPMSolverPP(_Multistep):
    """Multistep DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", Alg. 2 for 2M), data form.

    2M: x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) (x0 + (x0 - x0_prev)/(2r)), r = h_prev/h.
    3M: the quadratic through the last three x0 predictions (in lam), integrated exactly against
    e^{-(lam_s - lam)} (`quadratic_weight="exact"`: third order), or with its quadratic term
    weighted by half its exact integral (`"halved"`: diffusers' DPMSolverMultistepScheduler, formally
    second order). The first steps use orders 1, 2 (no history yet); the last ones are lowered as
    `lower_order_final` says (exponential.LOWER_ORDER_FINAL; default "before_denoise"). 1 NFE per
    step; global order = `order`.

    Against diffusers' DPMSolverMultistepScheduler (dpmsolver++, solver_type "midpoint", the
    default) on its grid: its run of N steps ends with a first-order step into sigma = 0, which is
    the x0 prediction at its last nonzero node; here that is `sample(..., denoise_final=True)` on
    the N nonzero nodes (N - 1 steps) with lower_order_final="before_denoise", which also lowers
    3M's step before it to order 2 like diffusers does below 15 steps. Its 3M needs
    `quadratic_weight="halved"`. Its "heun" solver_type, its SDE variants and thresholding have no
    counterpart here.
    """

    quadratic_weight: str = "exact"

    def __post_init__(self):
        check_order(self, (1, 2, 3))
        check_lower_order_final(self)
        check_option(
            self, "quadratic_weight", self.quadratic_weight in QUADRATIC_WEIGHTS, f"one of {list(QUADRATIC_WEIGHTS)}"
        )

    def step(self, denoiser, x, state, t, t_next, key):
        process = denoiser.process
        history, lams = state.values, state.nodes
        order = self.step_order
        x0, _ = denoiser.predict(x, t)
        lam_t, lam_s = half_log_snr(process, t), half_log_snr(process, t_next)
        h = lam_s - lam_t
        x_s = ddim_data_form(process, x, x0, t, t_next)
        alpha_s = _b(process.alpha(t_next), x)
        if order == 2:
            r = (lam_t - lams[0]) / h
            (phi1,) = phi_functions(-h, 1)
            x_s = x_s + alpha_s * (h * phi1 / (2.0 * r)) * (x0 - history[0])
        elif order == 3:
            values, nodes = [x0, history[0], history[1]], [lam_t, lams[0], lams[1]]
            correction = polynomial_correction(values, nodes, lam_t, lam_s, -1.0)
            if self.quadratic_weight == "halved":
                correction = correction - half_quadratic_integral(values, nodes, h)
            x_s = x_s + alpha_s * correction
        return x_s, state.push(x0, lam_t)


def half_quadratic_integral(values, nodes, h):
    """Half the exact integral of the quadratic term c2 (lam - lam_t)^2 of the polynomial through
    (nodes, values) against e^{-(lam_s - lam)} over one step: c2 h^3 phi_3(-h), c2 the second
    divided difference."""
    slope_new = (values[0] - values[1]) / (nodes[0] - nodes[1])
    slope_old = (values[1] - values[2]) / (nodes[1] - nodes[2])
    c2 = (slope_new - slope_old) / (nodes[0] - nodes[2])
    _, _, phi3 = phi_functions(-h, 3)
    return (h**3 * phi3) * c2


@dataclasses.dataclass(frozen=True)
class DPMSolverPPSDE(_Multistep):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, Sec. 5 / App.; "midpoint" form of its reference
    implementations): the data-form step of the SDE with noise rate `eta` (1 = the reverse SDE,
    0 = the ODE solver DPM-Solver++(2M)),

        x_s = (sigma_s/sigma_t) e^{-eta h} x_t + alpha_s (1 - e^{-(1+eta) h}) (x0 + (x0 - x0_prev)/(2r))
              + sigma_s sqrt(1 - e^{-2 eta h}) z.

    1 NFE per step; weak order 1 with eta > 0.
    """

    stochastic: ClassVar[bool] = True
    eta: float = 1.0

    def __post_init__(self):
        check_order(self, (1, 2))
        check_lower_order_final(self)
        check_unit_interval(self, "eta")

    def step(self, denoiser, x, state, t, t_next, key):
        process = denoiser.process
        history, lams = state.values, state.nodes
        x0, _ = denoiser.predict(x, t)
        lam_t, lam_s = half_log_snr(process, t), half_log_snr(process, t_next)
        noise = jax.random.normal(key, x.shape, x.dtype)
        x_s = ddim_data_form(process, x, x0, t, t_next, float(self.eta), noise)
        if self.step_order == 2:
            h = lam_s - lam_t
            r = (lam_t - lams[0]) / h
            weight = -jnp.expm1(-(1.0 + self.eta) * h) / (2.0 * r)
            x_s = x_s + _b(process.alpha(t_next) * weight, x) * (x0 - history[0])
        return x_s, state.push(x0, lam_t)
