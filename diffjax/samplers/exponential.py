"""Shared math of the exponential-integrator solvers (DPM-Solver, DPM-Solver++, DEIS, UniPC, SA-Solver).

With the half log-SNR  lam(t) = log(alpha_t / sigma_t)  and h = lam_s - lam_t > 0 for a step from t
to s < t, the probability-flow ODE has the exact solutions (Lu et al. 2022, "DPM-Solver", eq. 3.4;
Lu et al. 2022b, "DPM-Solver++", eq. 8)

    x_s = (alpha_s/alpha_t) x_t - sigma_s int_{lam_t}^{lam_s} e^{lam_s - lam} eps(lam) dlam      (noise form)
    x_s = (sigma_s/sigma_t) x_t + alpha_s int_{lam_t}^{lam_s} e^{-(lam_s - lam)} x0(lam) dlam    (data form)

and the stochastic (SA-Solver, Xue et al. 2023, eq. 14) data form with noise level eta = tau^2:

    x_s = (sigma_s/sigma_t) e^{-eta h} x_t + alpha_s (1+eta) int e^{-(1+eta)(lam_s - lam)} x0(lam) dlam
          + sigma_s sqrt(1 - e^{-2 eta h}) xi.

Every solver here replaces x0(lam) (or eps(lam)) by a polynomial through a few evaluations and
integrates it exactly: with v = (lam - lam_t)/h and nodes v_j,

    int_{lam_t}^{lam_s} e^{-c(lam_s - lam)} l_j(lam) dlam = h int_0^1 e^{-c h (1-v)} l_j(v) dv
                                                          = h sum_k a_jk k! phi_{k+1}(-c h),

l_j the Lagrange basis with monomial coefficients a_jk, phi_k the usual phi-functions. The first-order
part is written as alpha_s x0_t + sigma_s eps_t (DDIM), which stays exact where alpha_t = 0 (flow
matching, cosine at t = 1: lam = -inf); the step sizes in lam use lam clipped to +-LOG_SNR_CLIP/2.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from diffjax.processes import LOG_SNR_CLIP
from diffjax.samplers.base import check_option

__all__ = [
    "half_log_snr",
    "phi_functions",
    "lagrange_exp_weights",
    "polynomial_correction",
    "multistep_orders",
    "check_lower_order_final",
    "LOWER_ORDER_FINAL",
    "is_concrete_zero_alpha",
]


def half_log_snr(process, t):
    """lam(t) = log(alpha/sigma) = log_snr/2, clipped to +-LOG_SNR_CLIP/2 (finite where alpha = 0)."""
    return jnp.clip(0.5 * process.log_snr(t), -0.5 * LOG_SNR_CLIP, 0.5 * LOG_SNR_CLIP)


def phi_functions(z, n: int):
    """[phi_1(z), ..., phi_n(z)] with phi_k(z) = int_0^1 e^{z(1-v)} v^{k-1}/(k-1)! dv.

    phi_1 = (e^z - 1)/z and phi_{k+1} = (phi_k - 1/k!)/z; the recursion cancels badly for small
    |z|, so there the Taylor series phi_k(z) = sum_m z^m/(m+k)! is used instead.
    """
    z = jnp.asarray(z)
    small = jnp.abs(z) < 1.0
    z_safe = jnp.where(small, 1.0, z)  # keep both branches finite (and their gradients)
    z_small = jnp.where(small, z, 0.0)
    out, phi = [], jnp.expm1(z_safe) / z_safe
    for k in range(1, n + 1):
        series = sum(z_small**m / float(math.factorial(m + k)) for m in range(18))
        out.append(jnp.where(small, series, phi))
        phi = (phi - 1.0 / math.factorial(k)) / z_safe
    return out


def _poly_mul_linear(coeffs: list, root):
    """Coefficients (lowest first) of p(v) * (v - root)."""
    out = [-root * coeffs[0]]
    for k in range(1, len(coeffs)):
        out.append(coeffs[k - 1] - root * coeffs[k])
    out.append(coeffs[-1])
    return out


def lagrange_exp_weights(nodes: Sequence, z):
    """w_j = int_0^1 e^{z (1-v)} l_j(v) dv for the Lagrange basis l_j on `nodes` (in units of h).

    The weights sum to phi_1(z); with z = 0 they are the plain (Adams) quadrature weights.
    """
    n = len(nodes)
    moments = [math.factorial(k) * p for k, p in enumerate(phi_functions(z, n))]
    weights = []
    for j, v_j in enumerate(nodes):
        coeffs, denom = [1.0], 1.0
        for m, v_m in enumerate(nodes):
            if m != j:
                coeffs = _poly_mul_linear(coeffs, v_m)
                denom = denom * (v_j - v_m)
        weights.append(sum(c * mk for c, mk in zip(coeffs, moments)) / denom)
    return weights


def polynomial_correction(values, lams, lam_t, lam_s, z_scale: float):
    """h sum_{j>=1} w_j (values[j] - values[0]): the higher-order part of the exponential integrator
    for the polynomial through (lams[j], values[j]) (values[0] at lam_t, the base of the step).

    z_scale is the exponent's sign and rate: -c for the data form (weight e^{-c(lam_s - lam)}),
    +1 for the noise form. Multiply by alpha_s c (data form) or -sigma_s (noise form).
    """
    h = lam_s - lam_t
    nodes = [(lam - lam_t) / h for lam in lams]
    weights = lagrange_exp_weights(nodes, z_scale * h)
    out = 0.0
    for w, value in zip(weights[1:], values[1:]):
        out = out + (h * w) * (value - values[0])
    return out


# How a multistep solver lowers its order at the end of a short run (fewer than
# LOWER_ORDER_MAX_STEPS steps, counting the final denoising as a step where it is one):
#   "before_denoise"  the final denoising x0 = D(x, t_min) counts as one more, first-order step, so
#                     the steps before it take ..., 3, 2 (order 3) and order 2 is never lowered;
#                     diffusers' convention, whose runs end with a step into sigma = 0 (= that x0)
#   "last_steps"      the last ODE steps themselves take ..., 2, 1 (then the final denoising, if
#                     any, is an extra evaluation); diffusers' DPM-Solver/DEIS/UniPC runs that end
#                     at sigma_min instead of 0 do this
#   "none"            no lowering
LOWER_ORDER_FINAL = ("before_denoise", "last_steps", "none")
LOWER_ORDER_MAX_STEPS = 15


def check_lower_order_final(solver) -> None:
    """ValueError unless `solver.lower_order_final` is one of LOWER_ORDER_FINAL."""
    value = solver.lower_order_final
    check_option(
        solver,
        "lower_order_final",
        isinstance(value, str) and value in LOWER_ORDER_FINAL,
        f"one of {list(LOWER_ORDER_FINAL)}",
    )


def multistep_orders(steps: int, order: int, lower_order_final: str) -> list[int]:
    """Warm-up with orders 1, 2, ... (no history yet), then `order`; the end lowered as
    `lower_order_final` says (LOWER_ORDER_FINAL above) in runs of fewer than 15 steps."""
    orders = [min(order, i + 1) for i in range(steps)]
    extra = 1 if lower_order_final == "before_denoise" else 0
    if lower_order_final != "none" and steps + extra < LOWER_ORDER_MAX_STEPS:
        orders = [min(o, steps - i + extra) for i, o in enumerate(orders)]
    return orders


def is_concrete_zero_alpha(process, t: float) -> bool:
    """True when alpha(t) == 0 can be decided now (False for traced processes)."""
    try:
        with jax.ensure_compile_time_eval():
            return bool(process.alpha(jnp.float32(t)) == 0.0)
    except jax.errors.ConcretizationTypeError:
        return False
