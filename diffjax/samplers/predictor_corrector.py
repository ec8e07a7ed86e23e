"""The one predictor-corrector mechanism (UniPC, SA-Solver, gaussian_pc, Langevin PC).

One step from t to s < t runs, in this order,

    x    = relax(x at t)                          MCMC corrector at t (Langevin; default: none)
    x_p  = predict(x, state)                      the predictor, from what is known at t
    e    = evaluate(x_p at s)                     one network evaluation at the predicted point
    x_s  = correct(x, state, e)                   the corrector re-does the step with e
    state = remember(state, e)                    e feeds the next step's predictor

Solvers that reuse evaluations (Zhao et al. 2023, Alg. 1: UniPC, SA-Solver, gaussian_pc) evaluate
the network once per step: the first evaluation (at the prior sample) is in `init`, and the last
step evaluates nothing (no corrector), so NFE = steps. Every hook gets the same typed `PCStep`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax

from diffjax.samplers.base import Phase, Solver, group_phases, phase_field, specialise
from diffjax.samplers.exponential import half_log_snr, multistep_orders

__all__ = ["PCStep", "PredictorCorrector"]


class PCStep(NamedTuple):
    """What every hook of one predictor-corrector step sees: x at t, the step's times and half
    log-SNRs lam = log(alpha/sigma), the step's key and the noise it draws (None: deterministic)."""

    x: jax.Array
    t: jax.Array
    t_next: jax.Array
    lam_t: jax.Array
    lam_s: jax.Array
    key: jax.Array
    noise: Any


@dataclasses.dataclass(frozen=True)
class PredictorCorrector(Solver):
    """Base class of the predictor-corrector solvers (module docstring). Subclasses implement
    `predict` and, when they reuse evaluations, `init`, `evaluate`, `correct` and `remember`."""

    reuses_evaluations: ClassVar[bool] = True
    evaluate_next: bool = phase_field(True)  # False in the last step: no evaluation, no corrector
    step_order: int = phase_field(0)  # for multistep predictors: the order of this phase's steps

    # -- hooks ----------------------------------------------------------------------------------
    @property
    def corrects(self) -> bool:
        return True

    def draw_noise(self, key, x):
        """The noise the step's predictor and corrector share; None for a deterministic step."""
        return None

    def relax(self, denoiser, step: PCStep):
        """An MCMC corrector at t before the predictor; default: x unchanged."""
        return step.x

    def predict(self, denoiser, step: PCStep, state):
        raise NotImplementedError

    def evaluate(self, denoiser, x, t):
        """The evaluation at the predicted point (default: the x0-prediction)."""
        x0, _ = denoiser.predict(x, t)
        return x0

    def correct(self, denoiser, step: PCStep, state, evaluation):
        raise NotImplementedError

    def remember(self, state, evaluation, step: PCStep):
        """Default: push the evaluation on a `History` at lam_s."""
        return state.push(evaluation, step.lam_s)

    # -- the mechanism --------------------------------------------------------------------------
    def nfe(self, steps):
        return steps if self.reuses_evaluations else super().nfe(steps)

    def step_orders(self, steps: int) -> list[int]:
        """The predictor order of each step (default: warm-up 1, 2, ..., and `lower_order_final`)."""
        return multistep_orders(steps, self.order, self.lower_order_final)

    def phases(self, steps) -> tuple[Phase, ...]:
        if not self.reuses_evaluations:
            return (Phase(steps, specialise(self, evaluate_next=False)),)
        orders = self.step_orders(steps)
        return group_phases(
            [specialise(self, step_order=order, evaluate_next=i < steps - 1) for i, order in enumerate(orders)]
        )

    def step(self, denoiser, x, state, t, t_next, key):
        process = denoiser.process
        step = PCStep(x, t, t_next, half_log_snr(process, t), half_log_snr(process, t_next), key, None)
        step = step._replace(x=self.relax(denoiser, step), noise=self.draw_noise(key, x))
        x_pred = self.predict(denoiser, step, state)
        if not self.evaluate_next:
            return x_pred, state
        evaluation = self.evaluate(denoiser, x_pred, t_next)
        x_next = self.correct(denoiser, step, state, evaluation) if self.corrects else x_pred
        return x_next, self.remember(state, evaluation, step)
