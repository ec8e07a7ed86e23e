"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion
Models"): stochastic Adams predictor and corrector in the data form."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.processes import broadcast_to_data
from diffjax.samplers.base import Solver
from diffjax.samplers.exponential import (
    PredictorCorrector,
    check_order,
    data_first_order,
    polynomial_correction,
)

__all__ = ["SASolver"]


@dataclasses.dataclass(frozen=True)
class SASolver(PredictorCorrector, Solver):
    """SA-Predictor / SA-Corrector (Xue et al. 2023, eq. 14-18) with noise level tau (eta = tau^2):

        x_s = (sigma_s/sigma_t) e^{-eta h} x_t + alpha_s (1+eta) int_{lam_t}^{lam_s} e^{-(1+eta)(lam_s - lam)} P(lam) dlam
              + sigma_s sqrt(1 - e^{-2 eta h}) xi,

    P the Lagrange polynomial through the last `order` x0 evaluations (predictor) or through the
    evaluation at the predicted point and the last `corrector_order - 1` ones (corrector; same xi).
    tau = 0 gives a deterministic exponential Adams method. `tau_interval` = (lo, hi) applies the
    noise only where the EDM noise level sigma/alpha lies in [lo, hi]. 1 NFE per step (the
    evaluation at the predicted point serves both); the last step has no corrector.
    """

    stochastic: ClassVar[bool] = True
    order: int = 2
    corrector_order: int = 2
    tau: float = 1.0
    tau_interval: tuple | None = None
    lower_order_final: bool = True

    @property
    def _corrects(self) -> bool:
        return self.corrector_order > 0

    def _history_size(self) -> int:
        return max(self.order, self.corrector_order - 1, 1)

    def check(self, process, steps, t_min, t_max):
        check_order("sa_solver", self.order, (1, 2, 3))
        if self.corrector_order not in (0, 1, 2, 3, 4):
            raise ValueError(
                f"sa_solver: corrector_order {self.corrector_order!r} is not supported; allowed: [0, 1, 2, 3, 4]"
            )
        if not (isinstance(self.tau, (int, float)) and self.tau >= 0):
            raise ValueError(f"sa_solver: tau must be a number >= 0, got {self.tau!r}")
        if self.tau_interval is not None and not (
            len(self.tau_interval) == 2 and 0 <= self.tau_interval[0] < self.tau_interval[1]
        ):
            raise ValueError(f"sa_solver: tau_interval must be (lo, hi) with 0 <= lo < hi, got {self.tau_interval!r}")

    def _noise(self, key, x):
        return jax.random.normal(key, x.shape, x.dtype) if self.tau > 0 else None

    def _eta(self, process, t):
        eta = jnp.float32(self.tau**2)
        if self.tau_interval is not None:
            level = process.sigma(t) / process.alpha(t)
            eta = jnp.where((level >= self.tau_interval[0]) & (level <= self.tau_interval[1]), eta, 0.0)
        return eta

    def _update(self, process, x, values, lams, t, t_next, lam_t, lam_s, noise):
        eta = self._eta(process, t)
        x_s = data_first_order(process, x, values[0], t, t_next, eta, noise)
        if len(values) == 1:
            return x_s
        c = 1.0 + eta
        corr = polynomial_correction(values, lams, lam_t, lam_s, -c)
        return x_s + broadcast_to_data(process.alpha(t_next) * c, x) * corr

    def _predict(self, process, x, history, lams, t, t_next, lam_t, lam_s, order, noise):
        values = [history[k] for k in range(order)]
        return self._update(process, x, values, [lams[k] for k in range(order)], t, t_next, lam_t, lam_s, noise)

    def _correct(self, process, x, history, lams, x0_new, t, t_next, lam_t, lam_s, order, noise):
        n = min(self.corrector_order, order + 1)
        values = ([x0_new] + [history[k] for k in range(n - 1)])[:n]
        nodes = ([lam_s] + [lams[k] for k in range(n - 1)])[:n]
        return self._update(process, x, values, nodes, t, t_next, lam_t, lam_s, noise)
