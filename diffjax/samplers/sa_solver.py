"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion
Models"): stochastic Adams predictor and corrector in the data form."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.processes import broadcast_to_data
from diffjax.samplers.base import History, check_nonnegative, check_option, check_order
from diffjax.samplers.ddim import ddim_data_form
from diffjax.samplers.exponential import check_lower_order_final, half_log_snr, polynomial_correction
from diffjax.samplers.predictor_corrector import PredictorCorrector
from diffjax.validation import is_finite_real

__all__ = ["SASolver"]


@dataclasses.dataclass(frozen=True)
class SASolver(PredictorCorrector):
    """SA-Predictor / SA-Corrector (Xue et al. 2023, eq. 14-18) with noise level tau (eta = tau^2):

        x_s = (sigma_s/sigma_t) e^{-eta h} x_t
              + alpha_s (1+eta) int_{lam_t}^{lam_s} e^{-(1+eta)(lam_s - lam)} P(lam) dlam
              + sigma_s sqrt(1 - e^{-2 eta h}) xi,

    P the Lagrange polynomial through the last `order` x0 evaluations (predictor) or through the
    evaluation at the predicted point and the last `corrector_order - 1` ones (corrector; same xi).
    tau = 0 gives a deterministic exponential Adams method. `tau_interval` = (lo, hi) applies the
    noise only where the EDM noise level sigma/alpha lies in [lo, hi]. 1 NFE per step (the
    evaluation at the predicted point serves both); the last step has no corrector. State: a
    `History` of x0 evaluations at their half log-SNRs.
    """

    stochastic: ClassVar[bool] = True
    order: int = 2
    corrector_order: int = 2
    tau: float = 1.0
    tau_interval: tuple | None = None
    lower_order_final: str = "last_steps"  # exponential.LOWER_ORDER_FINAL

    def __post_init__(self):
        check_order(self, (1, 2, 3))
        check_lower_order_final(self)
        check_option(
            self,
            "corrector_order",
            self.corrector_order in (0, 1, 2, 3, 4) and not isinstance(self.corrector_order, bool),
            "one of [0, 1, 2, 3, 4]",
        )
        check_nonnegative(self, "tau")
        interval = self.tau_interval
        check_option(
            self,
            "tau_interval",
            interval is None
            or (
                isinstance(interval, (tuple, list))
                and len(interval) == 2
                and all(is_finite_real(v) for v in interval)
                and 0 <= interval[0] < interval[1]
            ),
            "None or (lo, hi) with 0 <= lo < hi",
        )
        if interval is not None:
            object.__setattr__(self, "tau_interval", tuple(float(v) for v in interval))  # hashable

    @property
    def corrects(self) -> bool:
        return self.corrector_order > 0

    def init(self, denoiser, x, ts):
        size = max(self.order, self.corrector_order - 1, 1)
        return History.empty(size, x).push(self.evaluate(denoiser, x, ts[0]), half_log_snr(denoiser.process, ts[0]))

    def draw_noise(self, key, x):
        return jax.random.normal(key, x.shape, x.dtype) if self.tau > 0 else None

    def _eta(self, process, t):
        eta = jnp.float32(self.tau**2)
        if self.tau_interval is not None:
            level = process.sigma(t) / process.alpha(t)
            eta = jnp.where((level >= self.tau_interval[0]) & (level <= self.tau_interval[1]), eta, 0.0)
        return eta

    def _update(self, process, step, values, lams):
        eta = self._eta(process, step.t)
        x_s = ddim_data_form(process, step.x, values[0], step.t, step.t_next, eta, step.noise)
        if len(values) == 1:
            return x_s
        c = 1.0 + eta
        corr = polynomial_correction(values, lams, step.lam_t, step.lam_s, -c)
        return x_s + broadcast_to_data(process.alpha(step.t_next) * c, step.x) * corr

    def predict(self, denoiser, step, state):
        order = self.step_order
        values = [state.values[k] for k in range(order)]
        return self._update(denoiser.process, step, values, [state.nodes[k] for k in range(order)])

    def correct(self, denoiser, step, state, x0_new):
        n = min(self.corrector_order, self.step_order + 1)
        values = ([x0_new] + [state.values[k] for k in range(n - 1)])[:n]
        nodes = ([step.lam_s] + [state.nodes[k] for k in range(n - 1)])[:n]
        return self._update(denoiser.process, step, values, nodes)
