"""Likelihoods of a denoiser's model: the probability-flow ODE log-density, the continuous-time
ELBO, and bits per dimension of 8-bit images.

`log_likelihood` is the instantaneous change of variables (Chen et al. 2018, "Neural ODEs";
Grathwohl et al. 2019, FFJORD; Song et al. 2021, score_sde, App. D.2) along the probability-flow
ODE dx/dt = v(x, t), v the denoiser's velocity view:

    log p_{t_min}(x(t_min)) = log N(x(t_max); 0, sigma(t_max)^2 I) + int_{t_min}^{t_max} div v(x(t), t) dt,

integrated on the augmented state (x, int div v) by `dopri5`, the adaptive Dormand-Prince
integrator shared with the "adaptive" sampler, in log-SNR time lambda (dx/dlambda = v / lambda'(t)),
where the ODE is smooth and evenly scaled for every process. The divergence is the exact Jacobian
trace (D Jacobian-vector products: small D) or Hutchinson's estimator E[z^T (dv/dx) z] with one
fixed set of probes z reused along the whole trajectory.

`elbo` is the continuous-time variational bound of Kingma et al. 2021 ("Variational Diffusion
Models"), written in log-SNR, where it holds for every Gaussian path; `bits_per_dim` turns either
into bits per dimension of uniformly dequantized 8-bit data.

All results are in nats per example (summed over the non-batch axes); every function is pure and
jittable, and bad input raises ValueError naming the value before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax.denoisers import Denoiser
from diffjax.processes import LOG_SNR_CLIP, per_example
from diffjax.samplers import check_prediction_is_defined
from diffjax.samplers.adaptive import dopri5
from diffjax.validation import check_count, check_key, check_positive

__all__ = ["DIVERGENCES", "PROBES", "LogLikelihood", "ELBO", "log_likelihood", "elbo", "bits_per_dim"]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogLikelihood:
    """What `log_likelihood` returns (a pytree): log p in nats per example (nan where the run used up
    max_steps), the evaluations of the augmented right-hand side (one network evaluation with its
    JVPs each), and the standard error per example of the Hutchinson mean over probes
    (std over probes / sqrt(num_probes); 0 for "exact", nan for one probe)."""

    log_prob: jax.Array
    nfe: jax.Array
    stderr: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ELBO:
    """What `elbo` returns (a pytree): the bound in nats per example and its three positive loss
    terms, value = -(reconstruction + prior_kl + diffusion), each of shape (batch,)."""

    value: jax.Array
    reconstruction: jax.Array
    prior_kl: jax.Array
    diffusion: jax.Array


# ------------------------------------------------------------------------------------------------
# input checks (plain Python, at trace time: before anything is compiled or run)
# ------------------------------------------------------------------------------------------------


def _checked_inputs(denoiser, key, x, t_min, t_max):
    """Validate the arguments every estimator shares; returns (process, t_min, t_max)."""
    _check_denoiser(denoiser)
    check_key(key)
    t_min, t_max = denoiser.process.resolve_times(t_min, t_max)
    _check_x(denoiser, x)
    return denoiser.process, t_min, t_max


def _check_denoiser(denoiser) -> None:
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be a diffjax.Denoiser, got {type(denoiser).__name__}")


def _check_x(denoiser, x) -> None:
    """A floating x of shape (batch, ...) that the denoiser's network maps to x's shape."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) < 2:
        raise ValueError(f"x must be an array of shape (batch, ...) with at least 2 axes, got shape {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    spec = (jax.ShapeDtypeStruct(shape, x.dtype), jax.ShapeDtypeStruct(shape[:1], jnp.float32))
    try:
        out = jax.eval_shape(denoiser.fn, *spec)  # traces the network alone; nothing runs
    except (TypeError, ValueError) as error:
        raise ValueError(f"the network cannot take x of shape {shape}: {error}") from error
    if getattr(out, "shape", None) != shape:
        raise ValueError(
            f"the network maps x of shape {shape} to {getattr(out, 'shape', type(out))}; it must return x's shape"
        )


# ------------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------------


def _num_features(x) -> int:
    return math.prod(x.shape[1:])


def _per_example_keys(key, x):
    return jax.random.split(key, x.shape[0])


# ------------------------------------------------------------------------------------------------
# divergence estimators: given the JVP of the velocity at x, the divergence per example and probe
# ------------------------------------------------------------------------------------------------


def _exact_divergence(jvp, x):
    """tr(dv/dx) from D JVPs with the unit vectors, shape (batch, 1). Examples are independent, so
    one JVP of the batch with e_i in every example gives every example's i-th Jacobian column."""
    b, d = x.shape[0], _num_features(x)
    basis = jnp.reshape(jnp.eye(d, dtype=x.dtype), (d, 1) + x.shape[1:])
    columns = jax.vmap(lambda e: jvp(jnp.broadcast_to(e, x.shape)))(basis)  # (d, b, ...)
    return jnp.einsum("ibi->b", jnp.reshape(columns, (d, b, d)))[:, None]


def _hutchinson_divergence(jvp, probes):
    """z^T (dv/dx) z for each probe z, shape (batch, num_probes); probes (num_probes, batch, ...)."""
    products = jax.vmap(jvp)(probes) * probes
    return jnp.sum(jnp.reshape(products, products.shape[:2] + (-1,)), axis=2).T


def _draw_probes(key, x, probe: str, num_probes: int):
    """num_probes probes per example from per-example keys, shape (num_probes, batch, ...)."""
    shape = (num_probes,) + x.shape[1:]
    if probe == "rademacher":
        draw = lambda k: jax.random.rademacher(k, shape, x.dtype)  # noqa: E731
    else:
        draw = lambda k: jax.random.normal(k, shape, x.dtype)  # noqa: E731
    return jnp.swapaxes(jax.vmap(draw)(_per_example_keys(key, x)), 0, 1)


def _log_snr_range(process, t_min: float, t_max: float):
    """(lambda(t_min), lambda(t_max)) with an infinite end (alpha = 0 or sigma = 0) clipped to
    +-LOG_SNR_CLIP, as the log-SNR grids do."""
    lam = process.log_snr(jnp.asarray([t_min, t_max], jnp.float32))
    return jnp.clip(lam, -LOG_SNR_CLIP, LOG_SNR_CLIP)


def _log_snr_velocity(denoiser):
    """dx/dlambda = v(x, t) / (dlambda/dt) at t = t(lambda): the probability-flow ODE in log-SNR
    time, smooth for every process (in t, a DDPM chain's velocity jumps at each of its knots)."""
    process = denoiser.process

    def velocity(x, lam):
        t = process.t_from_log_snr(lam)
        _, dlam_dt = jax.jvp(process.log_snr, (t,), (jnp.ones_like(t),))
        return denoiser.velocity(x, t) / dlam_dt

    return velocity


# ------------------------------------------------------------------------------------------------
# log-likelihood by the probability-flow ODE
# ------------------------------------------------------------------------------------------------


def log_likelihood(
    denoiser: Denoiser,
    x: jax.Array,
    key: jax.Array,
    *,
    divergence: str = "exact",
    probe: str = "rademacher",
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    t_min: float | None = None,
    t_max: float | None = None,
) -> LogLikelihood:
    """log p_{t_min}(x) in nats per example by the probability-flow ODE (FFJORD; score_sde).

    Integrates d/dt [x, delta] = [v(x, t), div v(x, t)] from (x, 0) at t_min to t_max, v the
    denoiser's velocity view (in log-SNR time, lambda(t_min) down to lambda(t_max), an infinite end
    clipped to +-LOG_SNR_CLIP), and returns log N(x(t_max); 0, sigma(t_max)^2 I) + delta(t_max).
    This is the density of the model's marginal at t_min (with the exact denoiser: the data
    density under the noise of t_min); the prior ignores alpha(t_max) x0, like `sample`.

    Args:
      denoiser: the `Denoiser`; x: data of shape (batch, ...) (any trailing shape, e.g. NHWC).
      key: splits into per-example keys for the Hutchinson probes (unused by "exact").
      divergence: "exact" (Jacobian trace by D JVPs per evaluation: small D) or "hutchinson"
        (z^T J z with `num_probes` probes per example, drawn once and reused along the trajectory;
        unbiased up to the ODE error).
      probe: "rademacher" (lower variance) or "gaussian".
      num_probes: Hutchinson probes per example; each costs one JVP per evaluation.
      rtol, atol, max_steps: error control of `dopri5`, on x and on delta (one step size for the
        batch, so results depend on the batch's other examples only within the tolerance).
      t_min, t_max: the integration range (default: the process's).

    Returns:
      a `LogLikelihood`: `.log_prob` of shape (batch,), `.nfe`, `.stderr`.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r:.100}; allowed: {list(DIVERGENCES)}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r:.100}; allowed: {list(PROBES)}")
    check_count("num_probes", num_probes)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    check_count("max_steps", max_steps)
    process, t_min, t_max = _checked_inputs(denoiser, key, x, t_min, t_max)
    check_prediction_is_defined(denoiser, t_max)

    hutchinson = divergence == "hutchinson"
    probes = _draw_probes(key, x, probe, num_probes) if hutchinson else None

    velocity = _log_snr_velocity(denoiser)

    def rhs(state, lam):
        y, _ = state
        dy, jvp = jax.linearize(lambda z: velocity(z, lam), y)
        div = _hutchinson_divergence(jvp, probes) if hutchinson else _exact_divergence(jvp, y)
        return dy, div

    delta0 = jnp.zeros((x.shape[0], num_probes if hutchinson else 1), x.dtype)
    lams = _log_snr_range(process, t_min, t_max)
    solution = dopri5(rhs, (x, delta0), lams, rtol=rtol, atol=atol, max_steps=max_steps)
    x_end, delta = solution.y
    t_end = process.t_from_log_snr(lams[1])  # t_max, unless its log-SNR was clipped
    per_probe = process.prior_logp(x_end, t_end)[:, None] + delta
    logp = jnp.where(solution.success, jnp.mean(per_probe, axis=1), jnp.nan)
    if not hutchinson:
        stderr = jnp.zeros_like(logp)
    elif num_probes == 1:
        stderr = jnp.full_like(logp, jnp.nan)
    else:
        stderr = jnp.std(per_probe, axis=1, ddof=1) / math.sqrt(num_probes)
    return LogLikelihood(log_prob=logp, nfe=solution.nfe, stderr=stderr)


# ------------------------------------------------------------------------------------------------
# the continuous-time ELBO
# ------------------------------------------------------------------------------------------------


def _clipped_end(process, t: float):
    """(t', lambda') at an end of the range, log-SNR clipped to +-LOG_SNR_CLIP (where alpha = 0
    it is -inf); t' = t unless clipped."""
    t = jnp.float32(t)
    lam = process.log_snr(t)
    clipped = jnp.clip(lam, -LOG_SNR_CLIP, LOG_SNR_CLIP)
    return jnp.where(clipped == lam, t, process.t_from_log_snr(clipped)), clipped


def _diffusion_loss(denoiser, x, key, lam_lo, lam_hi, num_times: int):
    """1/2 int_{lam_lo}^{lam_hi} e^lam |x - x0_hat(z_lam)|^2 dlam, Monte Carlo with num_times
    log-SNR values per example, stratified (VDM's low-discrepancy sampler): lam_k uniform in its
    k-th of num_times equal slices, one uniform offset per example."""
    process = denoiser.process
    keys = jax.vmap(jax.random.split)(_per_example_keys(key, x))  # (batch, 2)
    offset = jax.vmap(lambda k: jax.random.uniform(k))(keys[:, 0])

    def at_slice(k):
        lam = lam_lo + (lam_hi - lam_lo) * jnp.mod(offset + k / num_times, 1.0)
        t = process.t_from_log_snr(lam)
        noise = lambda kk: jax.random.normal(jax.random.fold_in(kk, k), x.shape[1:], x.dtype)  # noqa: E731
        eps = jax.vmap(noise)(keys[:, 1])
        z = process.perturb(x, t, eps)
        return jnp.exp(lam) * per_example(jnp.sum, (x - denoiser.x0(z, t)) ** 2)

    weighted = jax.lax.map(at_slice, jnp.arange(num_times))  # (num_times, batch)
    return 0.5 * (lam_hi - lam_lo) * jnp.mean(weighted, axis=0)


def elbo(
    denoiser: Denoiser,
    x: jax.Array,
    key: jax.Array,
    *,
    num_times: int = 16,
    t_min: float | None = None,
    t_max: float | None = None,
) -> ELBO:
    """The continuous-time ELBO (Kingma et al. 2021, VDM: the T -> infinity bound), a lower bound on
    log p(x) in nats per example, for every Gaussian path (it depends on the path only through the
    log-SNR at its ends, VDM's invariance to the noise schedule):

        ELBO = -[ E_{z0 ~ q(z0|x)} -log p(x | z0)                            reconstruction
                  + KL(q(z_T | x) || N(0, sigma(t_max)^2 I))                  prior
                  + 1/2 int_{lam_T}^{lam_0} e^lam E_eps |x - x0_hat(z_lam)|^2 dlam ],  diffusion

    with lam_0 = lambda(t_min), lam_T = lambda(t_max) (clipped to +-LOG_SNR_CLIP where infinite) and
    z_lam = alpha x + sigma eps at the time of log-SNR lam. The decoder is the standard Gaussian one
    for continuous data, p(x | z0) = N(x; z0 / alpha_0, (sigma_0 / alpha_0)^2 I), whose term is
    exactly D/2 (log(2 pi e) - lam_0). The bounded model is the denoiser's reverse-time model
    followed by that decoder: with the exact denoiser, the data density convolved with
    N(0, 2 (sigma_0/alpha_0)^2 I). The diffusion term is a Monte Carlo estimate with `num_times`
    log-SNR values per example, uniform in log-SNR (importance sampling that makes the weight
    constant) and stratified; noise and times come from per-example keys.

    Returns:
      an `ELBO`: `.value` of shape (batch,) and its three loss terms.
    """
    check_count("num_times", num_times)
    process, t_min, t_max = _checked_inputs(denoiser, key, x, t_min, t_max)
    d = _num_features(x)

    _, lam_hi = _clipped_end(process, t_min)
    t_lo, lam_lo = _clipped_end(process, t_max)
    reconstruction = jnp.full((x.shape[0],), 0.5 * d * (math.log(2 * math.pi) + 1.0)) - 0.5 * d * lam_hi
    # KL(N(alpha x, sigma^2) || N(0, sigma_p^2)) summed over the d features.
    alpha, sigma, sigma_p = process.alpha(t_lo), process.sigma(t_lo), process.sigma(jnp.float32(t_max))
    ratio = (sigma / sigma_p) ** 2
    prior_kl = 0.5 * (alpha**2 * per_example(jnp.sum, x**2) / sigma_p**2 + d * (ratio - 1.0 - jnp.log(ratio)))
    diffusion = _diffusion_loss(denoiser, x, key, lam_lo, lam_hi, num_times)

    value = -(reconstruction + prior_kl + diffusion)
    return ELBO(value=value, reconstruction=reconstruction, prior_kl=prior_kl, diffusion=diffusion)


# ------------------------------------------------------------------------------------------------
# bits per dimension
# ------------------------------------------------------------------------------------------------


def bits_per_dim(log_prob_fn: Callable, images: jax.Array, key: jax.Array):
    """Bits per dimension of 8-bit data under a density on the model's data scale [-1, 1].

    The integers k in {0, ..., 255} are dequantized as the data pipeline does,
    x = (k + u) / 128 - 1 with u ~ U[0, 1)^D (per-example keys), so the 256 bins tile [-1, 1).
    By Jensen, -log2 P(k) <= -E_u log2 p_y(k + u) for the density p_y of y = (k + u)/256 in [0, 1),
    bins of width 1/256; p_y(y) = p(x) |dx/dy|^D with dx/dy = 2. Hence the (upper-bound) estimate

        bpd = -(log p(x) + D log 2) / (D ln 2) + 8  =  -log p(x) / (D ln 2) + 7,

    so the uniform density 2^-D on [-1, 1]^D has exactly 8 bits/dim.

    Args:
      log_prob_fn: `log_prob_fn(x, key) -> (batch,)` log-density in nats, e.g.
        `lambda x, key: log_likelihood(denoiser, x, key).log_prob` or
        `lambda x, key: elbo(denoiser, x, key).value` (a lower bound on log p, hence a further upper
        bound on bpd).
      images: integers of shape (batch, ...) in [0, 255] (e.g. uint8 NHWC).
      key: split into the dequantization noise and `log_prob_fn`'s key.

    Returns:
      bits per dimension of shape (batch,).
    """
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) < 2:
        raise ValueError(f"images must be an array of shape (batch, ...) with at least 2 axes, got shape {shape}")
    if not jnp.issubdtype(images.dtype, jnp.integer):
        raise ValueError(f"images must hold integers in [0, 255] (e.g. uint8), got dtype {images.dtype}")
    check_key(key)
    key_u, key_model = jax.random.split(key)
    u = jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(_per_example_keys(key_u, images))
    x = (images.astype(jnp.float32) + u) / 128.0 - 1.0
    logp = log_prob_fn(x, key_model)
    if isinstance(logp, LogLikelihood | ELBO):
        field = "log_prob" if isinstance(logp, LogLikelihood) else "value"
        raise TypeError(
            f"log_prob_fn must return an array of shape {shape[:1]}, got a {type(logp).__name__}: return its .{field}"
        )
    if getattr(logp, "shape", None) != shape[:1]:
        raise ValueError(
            f"log_prob_fn must return one log-density per example, shape {shape[:1]}; "
            f"got {getattr(logp, 'shape', type(logp))}"
        )
    d = math.prod(shape[1:])
    return -(logp + d * math.log(2.0)) / (d * math.log(2.0)) + 8.0
