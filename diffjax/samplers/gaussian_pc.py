"""A predictor-corrector exponential integrator that is exact for isotropic Gaussian data.

In x~ = x/alpha and s~ = sigma/alpha the probability-flow ODE is dx~/ds~ = (x~ - D)/s~. For data
N(mu, s^2 I) its solution is x~ - mu = sqrt(s^2 + s~^2) c (c constant), and mu = D - s^2 b with
b = (x~ - D)/s~^2 = (alpha/sigma) eps. So with rho(t) = sqrt(alpha^2 s^2 + sigma^2) (the marginal
std of such data) and the "implied mean" m = D - s^2 b, the ODE's exact solution from t to s < t is

    x_s = (rho_s/rho_t) x_t + rho_s int_{u_t}^{u_s} m du,      u(lam) = 1/sqrt(s^2 + e^{-2 lam}),

for any s^2; with s^2 = 0 this is DPM-Solver++'s data form. For Gaussian data m is constant and the
step is exact. Per sample, s^2 is fitted to the last two evaluations (the s^2 that makes their
implied means closest, clipped to [0, max_std^2]), and m is taken constant (order 1) or linear in
lam through the two (order 2, only while sigma/alpha > sigma_data). As in UniPC (Zhao et al. 2023)
the network is evaluated once per step, at the predicted point, and that evaluation also corrects
the step (s^2 refitted, m linear through both ends: a trapezoidal rule); the last step has no
corrector. Global order 2 (1 without the corrector), and exact for isotropic Gaussian data from 2
steps on, whatever the step sizes.

The fit is what makes few steps work: once a sample has chosen a mode of the data, the solver
follows that mode's width exactly instead of extrapolating the sigmoid-shaped x0-prediction with a
polynomial in lam (see unipc.py). Its accuracy on the benchmark mixture, on each grid:
experiments/results/sampler_accuracy.md.

Where it wins and where it loses (the sampler suite, experiments/results/sampler_suite.md, exact
problems beside diffusers): it is exact for isotropic Gaussian data and the most accurate of all
settings at few NFE on Gaussian data, even with anisotropic power-law spectra, and on overlapping,
mildly anisotropic mixtures at every NFE measured. It loses wherever the data near a sample is far
from one isotropic Gaussian: on the ideal denoiser of real image sets and on well-separated strongly
anisotropic mixtures it is behind UniPC and DPM-Solver++ at every NFE, and on Gaussians with steep
spectra the polynomial solvers on the log-SNR grid overtake it as NFE grows. So it is the default
only for few steps (`sampling.default_solver`: up to `FEW_STEPS`), where its worst case over the suite
is the smallest of all settings; UniPC's is beyond.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from diffjax.processes import broadcast_to_data
from diffjax.samplers.base import check_order, check_positive_option, group_phases, phase_field, push, specialise
from diffjax.samplers.exponential import half_log_snr
from diffjax.samplers.grids import FlowTime, Grid
from diffjax.samplers.predictor_corrector import PredictorCorrector

__all__ = ["GaussianPC", "GaussianPCState", "fitted_variance", "gaussian_step"]


def _per_sample_sum(v):
    return jnp.sum(v, axis=tuple(range(1, v.ndim)), keepdims=True)


def fitted_variance(d_new, b_new, d_old, b_old, max_variance):
    """argmin_{s^2} |(d_new - s^2 b_new) - (d_old - s^2 b_old)|^2 per sample, clipped to
    [0, max_variance]; shape (batch, 1, ...). 0 where the two b coincide."""
    dd, db = d_new - d_old, b_new - b_old
    num, den = _per_sample_sum(dd * db), _per_sample_sum(db * db)
    s2 = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    return jnp.clip(s2, 0.0, max_variance)


def _asinhc(z2):
    """asinh(z)/z as a function of z^2 >= 0 (1 at 0; no sqrt at 0, so gradients stay finite)."""
    small = z2 < 1e-6
    z = jnp.sqrt(jnp.where(small, 1.0, z2))
    return jnp.where(small, 1.0 - z2 / 6.0, jnp.arcsinh(z) / z)


def gaussian_step(process, x, t, s, s2, mean, slope=None, h=None):
    """x_s = (rho_s/rho_t) x_t + (alpha_s - alpha_t rho_s/rho_t) m_t
             [+ slope (h alpha_s - rho_s (F(lam_s) - F(lam_t)))],
    the exact step for m(lam) = m_t (+ slope (lam - lam_t)), with F(lam) = asinh(s e^lam)/s the
    antiderivative of u. alpha_t = 0 (lam_t = -inf) needs no special case."""
    alpha_t, sigma_t = (broadcast_to_data(c, x) for c in (process.alpha(t), process.sigma(t)))
    alpha_s, sigma_s = (broadcast_to_data(c, x) for c in (process.alpha(s), process.sigma(s)))
    rho_t = jnp.sqrt(alpha_t**2 * s2 + sigma_t**2)
    rho_s = jnp.sqrt(alpha_s**2 * s2 + sigma_s**2)
    ratio = rho_s / rho_t
    out = ratio * x + (alpha_s - alpha_t * ratio) * mean
    if slope is None:
        return out

    def antiderivative(alpha, sigma):
        w = alpha / sigma  # e^lam
        return w * _asinhc(s2 * w**2)

    integral = broadcast_to_data(h, x) * alpha_s - rho_s * (
        antiderivative(alpha_s, sigma_s) - antiderivative(alpha_t, sigma_t)
    )
    return out + integral * slope


class GaussianPCState(NamedTuple):
    """The last two evaluations (newest first): x0-predictions D, b = (alpha/sigma) eps, and their
    half log-SNRs."""

    x0s: jax.Array
    bs: jax.Array
    lams: jax.Array


class GaussianEvaluation(NamedTuple):
    """One evaluation: the x0-prediction D and b = (alpha/sigma) eps."""

    x0: jax.Array
    b: jax.Array


@dataclasses.dataclass(frozen=True)
class GaussianPC(PredictorCorrector):
    """Gaussian-exact predictor-corrector (module docstring): 1 NFE per step, global order 2.

    order: 2 extrapolates the implied mean linearly in lam through the last two evaluations while
      sigma/alpha > sigma_data, and keeps it constant below; order 1 keeps it constant everywhere.
      How the two compare on a trained MNIST model: `experiments/results/mnist_gaussian_pc.md`.
    corrector: re-do each step with the new evaluation (trapezoidal); the last step has none.
    max_std: the largest per-sample data std the fit may return.
    sigma_data: the data's scale (EDM's 0.5 for images in [-1, 1]).
    """

    default_grid: ClassVar[Grid] = FlowTime()

    order: int = 2
    corrector: bool = True
    max_std: float = 1.0
    sigma_data: float = 0.5
    fit: bool = phase_field(True)  # False in the first step (one evaluation: s^2 = 0, DDIM)

    def __post_init__(self):
        check_order(self, (1, 2))
        check_positive_option(self, "max_std")
        check_positive_option(self, "sigma_data")

    @property
    def corrects(self) -> bool:
        return self.corrector

    def phases(self, steps):
        # The first step has one evaluation (s^2 = 0: DDIM); the others fit s^2 to the last two.
        # Every step but the last evaluates the network at its end and corrects.
        return group_phases([specialise(self, fit=i > 0, evaluate_next=i < steps - 1) for i in range(steps)])

    def evaluate(self, denoiser, x, t):
        x0, eps = denoiser.predict(x, t)
        return GaussianEvaluation(x0, _noise_over_scale(denoiser.process, eps, t))

    def init(self, denoiser, x, ts):
        first = self.evaluate(denoiser, x, ts[0])
        empty = jnp.zeros((2,) + x.shape, x.dtype)
        lam = half_log_snr(denoiser.process, ts[0])
        lams = jnp.zeros((2,), lam.dtype).at[0].set(lam)
        return GaussianPCState(empty.at[0].set(first.x0), empty.at[0].set(first.b), lams)

    def remember(self, state, evaluation, step):
        return GaussianPCState(
            push(state.x0s, evaluation.x0), push(state.bs, evaluation.b), push(state.lams, step.lam_s)
        )

    def predict(self, denoiser, step, state):
        process, x = denoiser.process, step.x
        x0s, bs, lams = state
        if not self.fit:
            return gaussian_step(process, x, step.t, step.t_next, 0.0, x0s[0])
        s2 = fitted_variance(x0s[0], bs[0], x0s[1], bs[1], float(self.max_std) ** 2)
        mean = _implied_mean(x0s[0], bs[0], s2)
        rate = None
        if self.order == 2:
            # lam_t < -log(sigma_data): a scalar switch, as the grid is only known when traced
            above = (step.lam_t < -math.log(self.sigma_data)).astype(x.dtype)
            rate = (mean - _implied_mean(x0s[1], bs[1], s2)) * broadcast_to_data(above / (step.lam_t - lams[1]), x)
        return gaussian_step(process, x, step.t, step.t_next, s2, mean, rate, step.lam_s - step.lam_t)

    def correct(self, denoiser, step, state, new):
        x0s, bs, _ = state
        s2 = fitted_variance(new.x0, new.b, x0s[0], bs[0], float(self.max_std) ** 2)
        mean_t, mean_s = _implied_mean(x0s[0], bs[0], s2), _implied_mean(new.x0, new.b, s2)
        h = step.lam_s - step.lam_t
        slope = (mean_s - mean_t) / broadcast_to_data(h, step.x)
        return gaussian_step(denoiser.process, step.x, step.t, step.t_next, s2, mean_t, slope, h)


def _implied_mean(x0, b, s2):
    """m = D - s^2 b: the mean of the Gaussian of variance s^2 that explains the evaluation."""
    return x0 - s2 * b


def _noise_over_scale(process, eps, t):
    """b = (x~ - D)/s~^2 = (alpha/sigma) eps."""
    return broadcast_to_data(process.alpha(t) / process.sigma(t), eps) * eps
