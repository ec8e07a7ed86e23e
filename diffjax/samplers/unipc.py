"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): the unified predictor UniP-p and corrector UniC-p in the data form."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from diffjax.processes import broadcast_to_data
from diffjax.samplers.base import History, check_option, check_order
from diffjax.samplers.ddim import ddim_data_form
from diffjax.samplers.exponential import check_lower_order_final, half_log_snr, phi_functions
from diffjax.samplers.predictor_corrector import PredictorCorrector

__all__ = ["UniPC"]

VARIANTS = ("bh1", "bh2")

# The x0-prediction of a Gaussian component of std s, along its trajectory, is in lam = log(alpha/sigma)
# a sigmoid ~ 1/sqrt(1 + e^{-2 (lam - lam0)}), lam0 = -log s, with complex singularities at
# lam0 +- i pi/2: a polynomial through nodes more than about pi/2 away approximates it poorly.
# UniP-3 extrapolates from 2 steps back, UniP-2 from 1.
MAX_EXTRAPOLATION_SPAN = math.pi / 2


def default_order(process, steps: int, t_min: float, t_max: float) -> int:
    """3 where two mean log-SNR steps stay within MAX_EXTRAPOLATION_SPAN, else 2 (e.g. 9 steps of the
    DDPM chain or of EDM: h = 1.07 / 1.18). 3 when the range can't be read now (a traced process)."""
    try:
        with jax.ensure_compile_time_eval():
            span = float(half_log_snr(process, jnp.float32(t_min)) - half_log_snr(process, jnp.float32(t_max)))
    except jax.errors.ConcretizationTypeError:
        return 3
    return 3 if 2.0 * span / steps <= MAX_EXTRAPOLATION_SPAN else 2


def unipc_coefficients(rks, h, variant: str, p: int):
    """The linear system of UniPC-p (Zhao et al. 2023, Alg. 2/3, data form, hh = -h):
    R[i, k] = rks[k]^i and b[i] = (i+1)! hh phi_{i+2}(hh) / B(h), i = 0..p-1, with B(h) = hh (bh1)
    or e^{hh} - 1 (bh2). rks = (lam_j - lam_t)/h of the previous nodes, followed by 1."""
    hh = -h
    phis = phi_functions(hh, p + 1)
    b_h = hh if variant == "bh1" else hh * phis[0]
    b = jnp.stack([float(math.factorial(i + 1)) * hh * phis[i + 1] / b_h for i in range(p)])
    r = jnp.stack([jnp.stack([rk**i for rk in rks]) for i in range(p)])
    return r, b, b_h


def solve_small(a, b):
    """Solve a x = b for n <= 3 by Cramer's rule (no LAPACK call inside the sampling loop)."""
    n = b.shape[0]
    if n == 1:
        return b / a[0, 0]

    def det(m):
        if n == 2:
            return m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
        return (
            m[0, 0] * (m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1])
            - m[0, 1] * (m[1, 0] * m[2, 2] - m[1, 2] * m[2, 0])
            + m[0, 2] * (m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0])
        )

    d = det(a)
    return jnp.stack([det(a.at[:, k].set(b)) / d for k in range(n)])


@dataclasses.dataclass(frozen=True)
class UniPC(PredictorCorrector):
    """UniPC-p with B(h) variant "bh1" or "bh2" (Zhao et al. 2023), data prediction.

    Predictor UniP-p: x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) x0_t - alpha_s B(h) sum_k a_k D_k,
    D_k = (x0_{t_k} - x0_t)/r_k over the p-1 previous evaluations; corrector UniC-p re-does the step
    with the evaluation at the predicted point added, raising the order to p + 1. The evaluation at
    the predicted point also feeds the next step, so UniPC costs 1 NFE per step; the last step has no
    corrector. Orders warm up as 1, 2, ... and the last ones are lowered as `lower_order_final`
    says (exponential.LOWER_ORDER_FINAL; default "before_denoise"). Global order p + 1 with the
    corrector, p without. State: a `History` of x0 evaluations at their half log-SNRs.

    `order=None` (the default) picks p from the step size (`default_order`): 3, or 2 where the mean
    log-SNR step h is so large that UniP-3's extrapolation over 2h passes pi/2 (what that does on
    a trained MNIST model: experiments/results/mnist_unipc_order.md).

    Against diffusers' UniPCMultistepScheduler (predict_x0, bh1/bh2) on its grid: its run of N
    steps ends with an order-1 step into sigma = 0, which returns the x0 prediction at the
    (uncorrected) predicted point of its last nonzero node; here that is `sample(...,
    denoise_final=True)` on the N nonzero nodes (N - 1 steps) with lower_order_final=
    "before_denoise". Its runs that end at sigma_min (final_sigmas_type="sigma_min") correspond to
    all N + 1 nodes, denoise_final=False, lower_order_final="last_steps". Remaining differences:
    diffusers' default order is 2 (here: chosen by step size, `default_order`); diffusers lowers the
    final orders at any number of steps, this solver only below 15 (which matters only for order 3);
    its `disable_corrector` list and the noise-prediction form (predict_x0=False) have no
    counterpart here.
    """

    order: int | None = None
    variant: str = "bh2"
    corrector: bool = True
    lower_order_final: str = "before_denoise"

    def __post_init__(self):
        check_order(self, (None, 1, 2, 3))
        check_option(self, "variant", self.variant in VARIANTS, f"one of {list(VARIANTS)}")
        check_lower_order_final(self)

    @property
    def corrects(self) -> bool:
        return self.corrector

    def prepare(self, process, steps, t_min, t_max):
        if self.order is not None:
            return self
        return dataclasses.replace(self, order=default_order(process, steps, t_min, t_max))

    def init(self, denoiser, x, ts):
        first = self.evaluate(denoiser, x, ts[0])
        return History.empty(self.order, x).push(first, half_log_snr(denoiser.process, ts[0]))

    def _system(self, state, step, p):
        """D_k and the linear system of UniPC-p for this step."""
        h = step.lam_s - step.lam_t
        history, lams = state.values, state.nodes
        rks = [(lams[k] - step.lam_t) / h for k in range(1, p)]
        d1s = [(history[k] - history[0]) / rk for k, rk in zip(range(1, p), rks)]
        r, b, b_h = unipc_coefficients(rks + [jnp.ones_like(h)], h, self.variant, p)
        return d1s, r, b, b_h

    def predict(self, denoiser, step, state):
        process, x = denoiser.process, step.x
        x_s = ddim_data_form(process, x, state.values[0], step.t, step.t_next)
        order = self.step_order
        if order == 1:
            return x_s
        d1s, r, b, b_h = self._system(state, step, order)
        rhos = jnp.array([0.5]) if order == 2 else solve_small(r[:-1, :-1], b[:-1])
        res = sum(rhos[k] * d for k, d in enumerate(d1s))
        return x_s - broadcast_to_data(process.alpha(step.t_next) * b_h, x) * res

    def correct(self, denoiser, step, state, x0_new):
        process, x = denoiser.process, step.x
        x_s = ddim_data_form(process, x, state.values[0], step.t, step.t_next)
        order = self.step_order
        d1s, r, b, b_h = self._system(state, step, order)
        rhos = jnp.array([0.5]) if order == 1 else solve_small(r, b)
        res = sum(rhos[k] * d for k, d in enumerate(d1s)) + rhos[-1] * (x0_new - state.values[0])
        return x_s - broadcast_to_data(process.alpha(step.t_next) * b_h, x) * res
