"""Particle methods over a sampler's trajectory: SMC / Feynman-Kac steering, the twisted diffusion
sampler, best-of-N and search over the initial noise.

`smc` runs N particles (the batch axis) through the DDIM(eta) transition
p(x_s | x_t) = N(alpha_s x0 + sqrt(sigma_s^2 - c^2) eps, c^2 I), c = eta * the std of
q(x_s | x_t, x0) (eta = 1: ancestral sampling), with a log potential h(x0_hat(x_t), t) of the
denoised particle. The particles are weighted by potentials G_t and resampled when the effective
sample size drops below `ess_threshold` * N (Feynman-Kac steering, Singhal et al. 2025):

    difference  G_t = exp(lambda (h_t - h_{t+1})): the product telescopes to exp(lambda h_final), so the
                target is p(x0) exp(lambda h(x0)) / Z exactly (up to the sampler's discretisation)
    max         G_t = exp(lambda (m_t - m_{t+1})), m_t = max_{s >= t} h_s: target p exp(lambda max_s h_s)
    sum         G_t = exp(lambda h_t):  target p exp(lambda sum_s h_s)

With `twist=True` (the twisted diffusion sampler, Wu et al. 2023) the proposal moves each particle
by c^2 grad_x lambda h(x0_hat(x), t), the weights carry the correction p(x_s | x_t) / q(x_s | x_t),
and h should be a twisting function such as `measurement_log_potential` (log of the Gaussian
approximation of p(y | x_t), which is the exact likelihood at t_min). The product of the average
weights at every resampling and at the end is an unbiased estimate of Z = E[prod G_t];
`log_normalizer` is its log.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.control.operators import Observation
from diffjax.control.posterior import x0_variance
from diffjax.denoisers import Denoiser
from diffjax.processes import broadcast_to_data, per_example
from diffjax.samplers.base import Solver
from diffjax.samplers.ddim import DDIM
from diffjax.samplers.grids import Grid, as_grid
from diffjax.samplers.sampling import check_prediction_is_defined, resolve_range, sample
from diffjax.validation import check_choice, check_count, check_key, check_number, check_positive, check_shape

__all__ = [
    "RESAMPLERS",
    "POTENTIALS",
    "effective_sample_size",
    "multinomial_resampling",
    "systematic_resampling",
    "stratified_resampling",
    "SMCResult",
    "smc",
    "measurement_log_potential",
    "best_of_n",
    "noise_search",
]


# ------------------------------------------------------------------------------------------------
# Resampling
# ------------------------------------------------------------------------------------------------


def effective_sample_size(log_weights):
    """(sum w)^2 / sum w^2 of the normalised weights exp(log_weights)."""
    return jnp.exp(2 * jax.nn.logsumexp(log_weights) - jax.nn.logsumexp(2 * log_weights))


def _normalised(log_weights):
    return jnp.exp(log_weights - jax.nn.logsumexp(log_weights))


def _invert_cdf(log_weights, uniforms):
    """Indices i with cdf[i-1] <= u < cdf[i] for sorted or unsorted uniforms in [0, 1)."""
    cdf = jnp.cumsum(_normalised(log_weights))
    return jnp.clip(jnp.searchsorted(cdf, uniforms, side="right"), 0, log_weights.shape[0] - 1)


def multinomial_resampling(key, log_weights):
    """N independent draws from the weights."""
    return jax.random.categorical(key, log_weights, shape=log_weights.shape)


def systematic_resampling(key, log_weights):
    """One uniform u: the points (i + u) / N."""
    n = log_weights.shape[0]
    return _invert_cdf(log_weights, (jnp.arange(n) + jax.random.uniform(key)) / n)


def stratified_resampling(key, log_weights):
    """One uniform per stratum: (i + u_i) / N."""
    n = log_weights.shape[0]
    return _invert_cdf(log_weights, (jnp.arange(n) + jax.random.uniform(key, (n,))) / n)


RESAMPLERS: dict[str, Callable] = {
    "multinomial": multinomial_resampling,
    "systematic": systematic_resampling,
    "stratified": stratified_resampling,
}
POTENTIALS = ("difference", "max", "sum")


# ------------------------------------------------------------------------------------------------
# SMC
# ------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SMCResult:
    """The particles (denoised at t_min), their final log weights (normalise before use), the log
    normalising-constant estimate, the ESS before each step and whether it resampled there."""

    samples: jax.Array
    log_weights: jax.Array
    log_normalizer: jax.Array
    ess: jax.Array
    resampled: jax.Array
    nfe: Any

    def weights(self):
        return _normalised(self.log_weights)


def measurement_log_potential(observation: Observation, data_std: float = 1.0, process=None) -> Callable:
    """The TDS twisting function h(x0, t) = log N(y; A x0, r_t^2 A A^T + s^2 I) (PiGDM's Gaussian
    approximation of p(y | x_t), r_t^2 = Var(x0 | x_t) for data of std `data_std`), computed
    through A's SVD over the measured directions (rank of A = number of measurements). At t_min
    (r_t -> 0) it is the exact log-likelihood log N(y; A x0, s^2 I). Needs `process`."""
    if not isinstance(observation, Observation):
        raise TypeError(f"observation must be an Observation, got {type(observation).__name__}")
    observation.operator.check_svd("measurement_log_potential")
    check_positive("data_std", data_std)
    if process is None:
        raise ValueError("measurement_log_potential needs the process (to know Var(x0 | x_t))")
    operator, noise_var = observation.operator, observation.noise_std**2

    def log_potential(x0, t):
        w = operator.ut(observation.residual(x0))
        s = operator.singular_values
        r2 = jnp.reshape(jnp.broadcast_to(x0_variance(process, t, data_std), (x0.shape[0],)), (-1, 1))
        var = r2 * s**2 + noise_var
        measured = s > 0
        safe = jnp.where(measured, var, 1.0)
        terms = jnp.where(measured, w**2 / safe + jnp.log(2 * math.pi * safe), 0.0)
        return -0.5 * jnp.sum(terms, axis=1)

    return log_potential


def _transition(process, x0, eps, t, s, eta):
    """(mean, std) of the DDIM(eta) step x_t -> x_s."""
    alpha_s, sigma_s = process.alpha(s), process.sigma(s)
    c = eta * sigma_s * jnp.sqrt(-jnp.expm1(process.log_snr(t) - process.log_snr(s)))
    b = lambda v: broadcast_to_data(v, x0)  # noqa: E731
    mean = b(alpha_s) * x0 + b(jnp.sqrt(jnp.maximum(sigma_s**2 - c**2, 0.0))) * eps
    return mean, c


def _smc_program(
    denoiser, key, log_potential, shape, steps, grid, t_min, t_max, lam, potential, twist, eta, resampler, threshold
):
    process = denoiser.process
    n = shape[0]
    ts = grid(process, steps, t_min, t_max)
    key_prior, key_steps = jax.random.split(key)
    x = process.prior_sample(key_prior, shape, jnp.float32, t=t_max)

    def evaluate(x, t):
        """(x0, eps, lambda h, grad_x lambda h) at x."""

        def h(x):
            x0, eps = denoiser.predict(x, t)
            value = lam * log_potential(x0, t)
            if value.shape != (n,):
                raise ValueError(f"the log potential returned shape {value.shape}; it must return ({n},)")
            return jnp.sum(value), (value, x0, eps)

        if twist:
            grad, (value, x0, eps) = jax.grad(h, has_aux=True)(x)
        else:
            _, (value, x0, eps) = h(x)
            grad = None
        return x0, eps, value, grad

    x0, eps, h0, grad = evaluate(x, ts[0])
    # every potential starts at G_T = exp(lambda h_T)
    carry = dict(x=x, x0=x0, eps=eps, h=h0, grad=grad, tilt=h0, log_w=h0, log_z=jnp.zeros(()))

    def body(carry, inputs):
        t, s, key = inputs
        key_resample, key_noise = jax.random.split(key)
        log_w = carry["log_w"]
        ess = effective_sample_size(log_w)
        do = ess < threshold * n
        idx = jnp.where(do, resampler(key_resample, log_w), jnp.arange(n))
        log_z = carry["log_z"] + jnp.where(do, jax.nn.logsumexp(log_w) - math.log(n), 0.0)
        log_w = jnp.where(do, jnp.zeros_like(log_w), log_w)
        c_ = {k: (v[idx] if (v is not None and k not in ("log_w", "log_z")) else v) for k, v in carry.items()}
        mean_p, std = _transition(process, c_["x0"], c_["eps"], t, s, eta)
        mean_q = mean_p + std**2 * c_["grad"] if twist else mean_p
        x_s = mean_q + std * jax.random.normal(key_noise, mean_q.shape, mean_q.dtype)
        x0, eps, h, grad = evaluate(x_s, s)
        if potential == "difference":
            tilt = h
        elif potential == "max":
            tilt = jnp.maximum(c_["tilt"], h)
        else:
            tilt = c_["tilt"] + h
        increment = tilt - c_["tilt"]
        if twist:
            sq = lambda d: per_example(jnp.sum, d**2)  # noqa: E731
            increment = increment + (sq(x_s - mean_q) - sq(x_s - mean_p)) / (2 * std**2)
        new = dict(x=x_s, x0=x0, eps=eps, h=h, grad=grad, tilt=tilt, log_w=log_w + increment, log_z=log_z)
        return new, (ess, do)

    keys = jax.random.split(key_steps, steps)
    carry, (ess, resampled) = jax.lax.scan(body, carry, (ts[:-1], ts[1:], keys))
    log_z = carry["log_z"] + jax.nn.logsumexp(carry["log_w"]) - math.log(n)
    return SMCResult(carry["x0"], carry["log_w"], log_z, ess, resampled, steps + 1)


_STATIC = (
    "log_potential",
    "shape",
    "steps",
    "grid",
    "t_min",
    "t_max",
    "lam",
    "potential",
    "twist",
    "eta",
    "resampler",
    "threshold",
)
_smc_compiled = jax.jit(_smc_program, static_argnames=_STATIC)


def smc(
    denoiser: Denoiser,
    key,
    shape,
    log_potential: Callable,
    *,
    steps: int = 50,
    grid: Grid | Any = None,
    scale: float = 1.0,
    potential: str = "difference",
    twist: bool = False,
    eta: float = 1.0,
    resampling: str = "systematic",
    ess_threshold: float = 0.5,
    t_min: float | None = None,
    t_max: float | None = None,
) -> SMCResult:
    """Sequential Monte Carlo with shape[0] particles; see the module docstring.

    `log_potential(x0, t) -> (num_particles,)` is evaluated on the denoised particles x0 = D(x_t, t)
    (a reward r(x0) ignores t); `scale` is lambda. `twist=True` runs TDS (one network evaluation and
    one backward pass per step instead of one evaluation). `grid` as in `sample()`: an explicit
    array of times is the range, the particles start from the prior at its first time. Runs as one
    compiled program; use `jax.vmap` over keys for independent runs."""
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be a diffjax.Denoiser, got {type(denoiser).__name__}")
    check_key(key)
    if isinstance(shape, (tuple, list)) and len(shape) >= 1 and shape[0] == 0:
        raise ValueError("smc needs at least one particle; got shape[0] = 0")
    shape = check_shape(shape)
    steps = check_count("steps", steps)
    if not callable(log_potential):
        raise TypeError(f"log_potential must be callable (x0, t) -> (num_particles,), got {log_potential!r:.100}")
    scale = check_number("scale", scale)
    check_choice("potential", potential, POTENTIALS)
    check_choice("resampling", resampling, RESAMPLERS)
    eta = check_number("eta", eta)
    if not 0 < eta <= 1:
        raise ValueError(f"eta must lie in (0, 1] (the transition needs noise), got {eta}")
    threshold = check_number("ess_threshold", ess_threshold)
    if not 0 <= threshold <= 1:
        raise ValueError(f"ess_threshold must lie in [0, 1], got {ess_threshold!r}")
    grid = DDIM().default_grid if grid is None else as_grid(grid)
    t_min, t_max = resolve_range(grid, denoiser.process, steps, t_min, t_max)
    check_prediction_is_defined(denoiser, t_max)
    out = jax.eval_shape(
        lambda x: log_potential(x, jnp.full((shape[0],), t_min, jnp.float32)), jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    if getattr(out, "shape", None) != (shape[0],):
        raise ValueError(
            f"log_potential returned shape {getattr(out, 'shape', type(out))} for {shape[0]} particles; "
            f"it must return ({shape[0]},)"
        )
    return _smc_compiled(
        denoiser,
        key,
        log_potential=log_potential,
        shape=shape,
        steps=steps,
        grid=grid,
        t_min=t_min,
        t_max=t_max,
        lam=scale,
        potential=potential,
        twist=bool(twist),
        eta=eta,
        resampler=RESAMPLERS[resampling],
        threshold=threshold,
    )


# ------------------------------------------------------------------------------------------------
# Best-of-N and search over the initial noise
# ------------------------------------------------------------------------------------------------


def _check_reward(reward, shape) -> None:
    if not callable(reward):
        raise TypeError(f"reward must be callable x0 -> (batch,), got {reward!r:.100}")
    out = jax.eval_shape(reward, jax.ShapeDtypeStruct(shape, jnp.float32))
    if getattr(out, "shape", None) != (shape[0],):
        raise ValueError(
            f"reward returned shape {getattr(out, 'shape', type(out))} for a batch of {shape[0]}; "
            f"it must return ({shape[0]},)"
        )


def best_of_n(denoiser: Denoiser, key, shape, reward: Callable, num_candidates: int, **sample_options):
    """For each of shape[0] outputs, the highest-reward of `num_candidates` samples from `sample()`
    (`sample_options` are passed on). Returns (samples, rewards)."""
    shape = check_shape(shape)
    k = check_count("num_candidates", num_candidates)
    _check_reward(reward, shape)
    result = sample(denoiser, key, (k * shape[0],) + shape[1:], **sample_options)
    rewards = jnp.reshape(reward(result.samples), (k, shape[0]))
    best = jnp.argmax(rewards, axis=0)
    candidates = jnp.reshape(result.samples, (k,) + shape)
    return candidates[best, jnp.arange(shape[0])], rewards[best, jnp.arange(shape[0])]


def noise_search(
    denoiser: Denoiser,
    key,
    shape,
    reward: Callable,
    *,
    rounds: int = 4,
    candidates: int = 8,
    step_size: float = 0.5,
    solver: Solver | None = None,
    steps: int = 20,
    grid: Grid | Any = None,
):
    """Zero-order search over the initial noise of a deterministic sampler (default DDIM(eta=0)):
    each round draws `candidates` neighbours sqrt(1 - step^2) z + step xi of the best noise z of
    each output and keeps the best (the current one included). Returns (samples, rewards)."""
    shape = check_shape(shape)
    rounds = check_count("rounds", rounds, minimum=0)
    k = check_count("candidates", candidates)
    step_size = check_number("step_size", step_size)
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must lie in (0, 1], got {step_size}")
    _check_reward(reward, shape)
    solver = DDIM() if solver is None else solver
    if solver.stochastic:
        raise ValueError(f"noise_search needs a deterministic solver, got {solver!r}")
    grid = solver.default_grid if grid is None else as_grid(grid)
    process = denoiser.process
    t_min, t_max = resolve_range(grid, process, steps)
    ts = grid(process, steps, t_min, t_max)
    std = process.prior_std(t_max)

    @jax.jit
    def decode(denoiser, noise):
        x, _, _ = solver.run(denoiser, std * noise, ts, jax.random.split(jax.random.key(0), steps), False)
        x0 = denoiser.x0(x, ts[-1])
        return x0, reward(x0)

    key, key_init = jax.random.split(key)
    best_noise = jax.random.normal(key_init, shape)
    best_x, best_r = decode(denoiser, best_noise)
    for _ in range(rounds):
        key, key_round = jax.random.split(key)
        xi = jax.random.normal(key_round, (k,) + shape)
        noise = math.sqrt(1 - step_size**2) * best_noise[None] + step_size * xi
        x, r = decode(denoiser, jnp.reshape(noise, (k * shape[0],) + shape[1:]))
        x, r = jnp.reshape(x, (k,) + shape), jnp.reshape(r, (k, shape[0]))
        j = jnp.argmax(r, axis=0)
        cols = jnp.arange(shape[0])
        better = r[j, cols] > best_r
        pick = lambda new, old: jnp.where(broadcast_to_data(better, old), new, old)  # noqa: E731
        best_noise = pick(noise[j, cols], best_noise)
        best_x = pick(x[j, cols], best_x)
        best_r = jnp.where(better, r[j, cols], best_r)
    return best_x, best_r
