"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"),
rho-AB-DEIS in the scaled variables x~ = x/alpha and the EDM noise level s = sigma/alpha, where the
probability-flow ODE is dx~/ds = eps(x, t(s))."""

from __future__ import annotations

import dataclasses

from diffjax.processes import broadcast_to_data
from diffjax.samplers.base import History, Solver, check_order, group_phases, phase_field, specialise
from diffjax.samplers.ddim import ddim_step
from diffjax.samplers.exponential import polynomial_correction
from diffjax.samplers.heun import noise_level

__all__ = ["DEIS"]


@dataclasses.dataclass(frozen=True)
class DEIS(Solver):
    """rho-AB-DEIS (Zhang & Chen 2023, eq. 15): Adams-Bashforth on dx~/ds = eps with the Lagrange
    polynomial through the last `order` eps predictions integrated exactly, so the order holds on
    any grid (iPNDM uses fixed coefficients instead). Warm-up with lower orders. State: a `History`
    of eps predictions at their noise levels. 1 NFE per step; global order = `order`.
    """

    order: int = 3
    step_order: int = phase_field(0)  # the order of this phase's steps (warm-up: 1, 2, ...)

    def __post_init__(self):
        check_order(self, (1, 2, 3, 4))

    def init(self, denoiser, x, ts):
        return History.empty(max(self.order - 1, 1), x)

    def phases(self, steps):
        return group_phases([specialise(self, step_order=min(self.order, i + 1)) for i in range(steps)])

    def step(self, denoiser, x, state, t, t_next, key):
        process = denoiser.process
        x0, eps = denoiser.predict(x, t)
        s_t, s_next = noise_level(process, t), noise_level(process, t_next)
        x_next = ddim_step(process, x0, eps, t_next)
        order = self.step_order
        if order > 1:
            values = [eps] + [state.values[k] for k in range(order - 1)]
            nodes = [s_t] + [state.nodes[k] for k in range(order - 1)]
            corr = polynomial_correction(values, nodes, s_t, s_next, 0.0)
            x_next = x_next + broadcast_to_data(process.alpha(t_next), x) * corr
        return x_next, state.push(eps, s_t)
