"""Posterior sampling for inverse problems through the Denoiser: any process, any prediction type.

Two shapes of method, both run by `posterior_sample(denoiser, observation, key, method)`:

- guidance (a denoiser transform, used with any solver): the conditional score
  grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x) is written in the x0 view,
  x0' = x0 + sigma^2/alpha * g with g the likelihood-score approximation:

    PiGDM  g = scale (dx0/dx)^T A^T (r_t^2 A A^T + s^2 I)^{-1} (y - A x0),  r_t^2 the variance
           of x0 | x_t for data of std data_std (Song et al. 2023, "Pseudoinverse-Guided
           Diffusion Models"); exact for isotropic Gaussian data of that std
    DDNM   x0' = x0 + A^+ (y - A x0): range-null-space decomposition, noiseless (Wang et al. 2023)

- solver steps (one `step(denoiser, x, state, t, t_next, key)` like every solver):

    DPS          Chung et al. 2023, "Diffusion Posterior Sampling for General Noisy Inverse Problems",
                 Alg. 1: a DDIM(eta) step (eta = 1: ancestral) from the same evaluation, then
                 x_next -= scale * grad_{x_t} |y - A x0(x_t)| (normalize=True, the reference code's step)
                 or scale * grad_{x_t} |y - A x0(x_t)|^2 / (2 s^2) (normalize=False)

    Replacement  score_sde's imputation (Song et al. 2021, App. I.2): after each step of an inner
                 solver, the measured spectral part of x is replaced by a draw of alpha y + sigma z
    DDRM         Kawar et al. 2022, eq. 7-8, in the spectral coordinates of A's SVD
    DiffPIR      Zhu et al. 2023, Alg. 1: a proximal data step on x0, then a DDIM-like step with zeta
    DAPS         Zhang et al. 2024: x0 ~ p(x0 | x_t, y) with p(x0 | x_t) = N(D(x_t), r_t^2 I) (sampled
                 exactly through the SVD rather than by Langevin), then x_next = alpha' x0 + sigma' z
    RedDiff      Mardani et al. 2023 ("A Variational Perspective on Solving Inverse Problems with
                 Diffusion Models"): gradient steps on mu for |y - A mu|^2/2 + lambda_t sg(eps(x_t) - z)^T mu,
                 plain gradient steps (the paper uses Adam)

The methods that need A's SVD (PiGDM, DDNM, Replacement, DDRM, DiffPIR, DAPS) refuse operators without
one (a nonlinear `FunctionOperator`); DPS and RedDiff only need A's gradient.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.control.operators import Observation
from diffjax.denoisers import Denoiser
from diffjax.processes import broadcast_to_data, per_example
from diffjax.samplers.base import Phase, Solver, check_nonnegative, check_positive_option, check_unit_interval
from diffjax.samplers.ddim import DDIM, Ancestral, ddim_step
from diffjax.samplers.sampling import SampleResult, sample
from diffjax.validation import check_count, check_key

__all__ = [
    "PosteriorMethod",
    "DPS",
    "PiGDM",
    "DDNM",
    "Replacement",
    "DDRM",
    "DiffPIR",
    "DAPS",
    "RedDiff",
    "POSTERIOR_METHODS",
    "posterior_sample",
    "x0_correction",
    "x0_variance",
]


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def x0_correction(process, t, x, score_shift):
    """The x0-view change sigma^2/alpha * g of a score change g (zero where alpha = 0)."""
    alpha = broadcast_to_data(process.alpha(t), x)
    sigma = broadcast_to_data(process.sigma(t), x)
    safe = jnp.where(alpha > 0, alpha, 1.0)
    return jnp.where(alpha > 0, sigma**2 / safe, 0.0) * score_shift


def x0_variance(process, t, data_std: float | None):
    """Var(x0 | x_t) per entry for isotropic Gaussian data of std `data_std`:
    sd^2 sigma^2 / (sigma^2 + alpha^2 sd^2); data_std None gives the noise level (sigma/alpha)^2."""
    alpha, sigma = process.alpha(t), process.sigma(t)
    if data_std is None:
        return sigma**2 / jnp.maximum(alpha, 1e-12) ** 2
    sd2 = data_std**2
    return sd2 * sigma**2 / (sigma**2 + alpha**2 * sd2)


def _safe_divide(num, den, fallback):
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), fallback)


def _per_example_column(value, like):
    """A (batch,) value as (batch, 1) against spectral coordinates (batch, n)."""
    value = jnp.asarray(value, jnp.float32)
    return jnp.broadcast_to(value, (like.shape[0],))[:, None] if value.ndim else value


def _spectral_measurement(observation: Observation):
    """(U^T y, s): the measurement in spectral coordinates and the singular values."""
    return observation.operator.ut(observation.y), observation.operator.singular_values


def _noise_level(process, t):
    """The EDM noise level sigma/alpha (inf where alpha = 0)."""
    return process.sigma(t) / process.alpha(t)


class PosteriorMethod:
    """Base class of the methods' option objects."""

    needs_svd: ClassVar[bool] = True
    noiseless_only: ClassVar[bool] = False
    denoise_final: ClassVar[bool] = False
    is_guidance: ClassVar[bool] = False

    def check_observation(self, observation: Observation) -> None:
        name = type(self).__name__
        if not isinstance(observation, Observation):
            raise TypeError(
                f"{name}: observation must be a diffjax.control Observation, got {type(observation).__name__}"
            )
        if self.needs_svd:
            observation.operator.check_svd(name)
        if self.noiseless_only and observation.noise_std > 0:
            raise ValueError(
                f"{name} is defined for noiseless measurements, got noise_std={observation.noise_std}; use DDRM, "
                "PiGDM, DiffPIR, DAPS or DPS for noisy ones"
            )


# ------------------------------------------------------------------------------------------------
# Guidance: denoiser transforms
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PiGDM(PosteriorMethod):
    """Pseudoinverse-guided diffusion; see the module docstring."""

    data_std: float = 1.0
    scale: float = 1.0
    denoise_final: ClassVar[bool] = True
    is_guidance: ClassVar[bool] = True

    def __post_init__(self):
        check_positive_option(self, "data_std")
        check_positive_option(self, "scale")

    def guide(self, denoiser: Denoiser, observation: Observation) -> Denoiser:
        self.check_observation(observation)
        operator, noise_var, scale, data_std = observation.operator, observation.noise_std**2, self.scale, self.data_std

        def fn(x, t):
            x0, pullback = jax.vjp(lambda x: denoiser.x0(x, t), x)
            w = operator.ut(observation.residual(x0))
            s = operator.singular_values
            r2 = _per_example_column(x0_variance(denoiser.process, t, data_std), w)
            coef = _safe_divide(s, r2 * s**2 + noise_var, 0.0)
            (g,) = pullback(operator.v(coef * w))
            return x0 + x0_correction(denoiser.process, t, x, scale * g)

        return Denoiser(fn, denoiser.process, "x0")


@dataclasses.dataclass(frozen=True)
class DDNM(PosteriorMethod):
    """Range-null-space projection of every x0 prediction; see the module docstring."""

    noiseless_only: ClassVar[bool] = True
    denoise_final: ClassVar[bool] = True
    is_guidance: ClassVar[bool] = True

    def guide(self, denoiser: Denoiser, observation: Observation) -> Denoiser:
        self.check_observation(observation)
        operator = observation.operator

        def fn(x, t):
            x0 = denoiser.x0(x, t)
            return x0 + operator.pinv(observation.residual(x0))

        return Denoiser(fn, denoiser.process, "x0")


# ------------------------------------------------------------------------------------------------
# Solver steps
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ObservedSolver(Solver, PosteriorMethod):
    """A solver whose steps use an observation (bound by `posterior_sample` via `bind`)."""

    observation: Observation | None = dataclasses.field(default=None, repr=False)

    def bind(self, observation: Observation, inner: Solver | None = None) -> Solver:
        self.check_observation(observation)
        if inner is not None:
            raise ValueError(f"{type(self).__name__} is a solver itself; pass solver=None")
        return dataclasses.replace(self, observation=observation)


@dataclasses.dataclass(frozen=True)
class DPS(_ObservedSolver):
    """Diffusion posterior sampling; see the module docstring. 1 NFE and one backward pass per step;
    `normalize=False` needs noise_std > 0."""

    scale: float = 1.0
    normalize: bool = True
    eta: float = 1.0
    needs_svd: ClassVar[bool] = False
    denoise_final: ClassVar[bool] = True
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        check_positive_option(self, "scale")
        check_unit_interval(self, "eta")

    def check_observation(self, observation):
        super().check_observation(observation)
        if not self.normalize and observation.noise_std == 0:
            raise ValueError("DPS(normalize=False) weighs the residual by 1/noise_std^2 and needs noise_std > 0")

    def step(self, denoiser, x, state, t, t_next, key):
        obs = self.observation

        def loss(x):
            x0, eps = denoiser.predict(x, t)
            sq = per_example(jnp.sum, obs.residual(x0) ** 2)
            value = jnp.sqrt(sq) if self.normalize else sq / (2 * obs.noise_std**2)
            return jnp.sum(value), (x0, eps)

        grad, (x0, eps) = jax.grad(loss, has_aux=True)(x)
        x_next = ddim_step(denoiser.process, x0, eps, t_next, float(self.eta), t, key)
        return x_next - self.scale * grad, state


@dataclasses.dataclass(frozen=True)
class Replacement(_ObservedSolver):
    """Replacement imputation; the inner solver (default `Ancestral()`) takes each step."""

    inner: Solver = Ancestral()
    noiseless_only: ClassVar[bool] = True
    denoise_final: ClassVar[bool] = True
    stochastic: ClassVar[bool] = True

    def bind(self, observation, inner=None):
        self.check_observation(observation)
        if inner is not None and not isinstance(inner, Solver):
            raise TypeError(f"solver must be a Solver instance, got {inner!r:.100}")
        return dataclasses.replace(self, observation=observation, inner=self.inner if inner is None else inner)

    def check(self, process, steps, t_min, t_max):
        self.inner.check(process, steps, t_min, t_max)

    def prepare(self, process, steps, t_min, t_max):
        return dataclasses.replace(self, inner=self.inner.prepare(process, steps, t_min, t_max))

    def phases(self, steps):
        return tuple(Phase(p.length, dataclasses.replace(self, inner=p.solver)) for p in self.inner.phases(steps))

    def nfe(self, steps):
        return self.inner.nfe(steps)

    def init(self, denoiser, x, ts):
        return self.inner.init(denoiser, x, ts)

    def step(self, denoiser, x, state, t, t_next, key):
        key_inner, key_noise = jax.random.split(key)
        x_next, state = self.inner.step(denoiser, x, state, t, t_next, key_inner)
        operator = self.observation.operator
        uty, s = _spectral_measurement(self.observation)
        y_bar = _safe_divide(uty, s, 0.0)
        z = operator.vt(jax.random.normal(key_noise, x.shape, x.dtype))  # white noise in spectral coordinates
        process = denoiser.process
        noised = process.alpha(t_next) * y_bar + process.sigma(t_next) * z
        spectral = operator.vt(x_next)
        return operator.v(jnp.where(s > 0, noised, spectral)), state


@dataclasses.dataclass(frozen=True)
class DDRM(_ObservedSolver):
    """Denoising diffusion restoration models (eta, eta_b as in the paper); 1 NFE per step."""

    eta: float = 0.85
    eta_b: float = 1.0
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        check_unit_interval(self, "eta")
        check_unit_interval(self, "eta_b")

    def step(self, denoiser, x, state, t, t_next, key):
        process, operator, obs = denoiser.process, self.observation.operator, self.observation
        x0, eps = denoiser.predict(x, t)
        uty, s = _spectral_measurement(obs)
        x0_bar, eps_bar = operator.vt(x0), operator.vt(eps)
        z = jax.random.normal(key, x0_bar.shape, x0_bar.dtype)
        level = _noise_level(process, t_next)  # sigma'/alpha' of the scaled path x / alpha
        y_bar = _safe_divide(uty, s, 0.0)
        y_level = _safe_divide(jnp.full_like(s, obs.noise_std), s, jnp.inf)  # sigma_y / s_i
        eta, eta_b = self.eta, self.eta_b
        keep = jnp.sqrt(1.0 - eta**2)
        unmeasured = x0_bar + level * (keep * eps_bar + eta * z)
        below = x0_bar + keep * level * _safe_divide(y_bar - x0_bar, y_level, 0.0) + eta * level * z
        var_above = jnp.maximum(level**2 - jnp.where(s > 0, y_level, 0.0) ** 2 * eta_b**2, 0.0)
        above = (1.0 - eta_b) * x0_bar + eta_b * y_bar + jnp.sqrt(var_above) * z
        measured = jnp.where(level < y_level, below, above)
        scaled = jnp.where(s > 0, measured, unmeasured)
        return operator.v(scaled) * broadcast_to_data(process.alpha(t_next), x), state


@dataclasses.dataclass(frozen=True)
class DiffPIR(_ObservedSolver):
    """Diffusion plug-and-play restoration: rho_t = lam s^2 / (sigma/alpha)^2, zeta the share of fresh
    noise; 1 NFE per step."""

    lam: float = 7.0
    zeta: float = 0.3
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        check_positive_option(self, "lam")
        check_unit_interval(self, "zeta")

    def step(self, denoiser, x, state, t, t_next, key):
        process, operator, obs = denoiser.process, self.observation.operator, self.observation
        x0 = denoiser.x0(x, t)
        uty, s = _spectral_measurement(obs)
        x0_bar = operator.vt(x0)
        rho = _per_example_column(self.lam * obs.noise_std**2 / _noise_level(process, t) ** 2, x0_bar)
        x0_bar = _safe_divide(s * uty + rho * x0_bar, s**2 + rho, x0_bar)
        x0 = operator.v(x0_bar)
        b = lambda c: broadcast_to_data(c, x)  # noqa: E731
        eps = (x - b(process.alpha(t)) * x0) / b(process.sigma(t))
        noise = jax.random.normal(key, x.shape, x.dtype)
        mixed = jnp.sqrt(1.0 - self.zeta) * eps + jnp.sqrt(self.zeta) * noise
        return b(process.alpha(t_next)) * x0 + b(process.sigma(t_next)) * mixed, state


@dataclasses.dataclass(frozen=True)
class DAPS(_ObservedSolver):
    """Decoupled annealing posterior sampling with p(x0 | x_t) = N(D(x_t), r_t^2 I), r_t^2 the
    variance of x0 | x_t for isotropic Gaussian data of std `data_std` (None: r_t = sigma/alpha as
    in the paper); x0 | x_t, y is then Gaussian and drawn exactly through the SVD. Exact for
    isotropic Gaussian data of std data_std. 1 NFE per step."""

    data_std: float | None = 1.0
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        if self.data_std is not None:
            check_positive_option(self, "data_std")

    def step(self, denoiser, x, state, t, t_next, key):
        process, operator, obs = denoiser.process, self.observation.operator, self.observation
        key_x0, key_x = jax.random.split(key)
        x0_bar = operator.vt(denoiser.x0(x, t))
        uty, s = _spectral_measurement(obs)
        r2 = _per_example_column(x0_variance(process, t, self.data_std), x0_bar)
        noise_var = obs.noise_std**2
        den = noise_var + r2 * s**2
        exact = _safe_divide(uty, s, x0_bar)  # noiseless: measured entries are fixed
        mean = _safe_divide(noise_var * x0_bar + r2 * s * uty, den, exact)
        var = _safe_divide(r2 * noise_var, den, jnp.where(s > 0, 0.0, r2))
        z = jax.random.normal(key_x0, x0_bar.shape, x0_bar.dtype)
        x0 = operator.v(mean + jnp.sqrt(var) * z)
        b = lambda c: broadcast_to_data(c, x)  # noqa: E731
        return b(process.alpha(t_next)) * x0 + b(process.sigma(t_next)) * jax.random.normal(key_x, x.shape), state


@dataclasses.dataclass(frozen=True)
class RedDiff(_ObservedSolver):
    """RED-diff: the sample is mu, updated by `lr`-sized gradient steps of
    |y - A(mu)|^2 / 2 + lam (sigma/alpha) sg(eps_hat(x_t) - z)^T mu with x_t = alpha mu + sigma z.
    Starts at A^+ y where A has an SVD, else at zero; mu is the solver's state. 1 NFE per step."""

    lam: float = 0.25
    lr: float = 0.5
    needs_svd: ClassVar[bool] = False
    stochastic: ClassVar[bool] = True

    def __post_init__(self):
        check_nonnegative(self, "lam")
        check_positive_option(self, "lr")

    def init(self, denoiser, x, ts):
        operator = self.observation.operator
        if not operator.has_svd:
            return jnp.zeros_like(x)
        return jnp.broadcast_to(operator.pinv(self.observation.y), x.shape).astype(x.dtype)

    def step(self, denoiser, x, state, t, t_next, key):
        process, obs, mu = denoiser.process, self.observation, state
        b = lambda c: broadcast_to_data(c, mu)  # noqa: E731
        z = jax.random.normal(key, mu.shape, mu.dtype)
        x_t = b(process.alpha(t)) * mu + b(process.sigma(t)) * z
        eps_hat = jax.lax.stop_gradient(denoiser.eps(x_t, t))
        data_grad = jax.grad(lambda mu: 0.5 * jnp.sum(obs.residual(mu) ** 2))(mu)
        weight = b(self.lam * _noise_level(process, t))
        mu = mu - self.lr * (data_grad + weight * (eps_hat - z))
        return mu, mu


POSTERIOR_METHODS: dict[str, type] = {
    "dps": DPS,
    "pigdm": PiGDM,
    "ddnm": DDNM,
    "replacement": Replacement,
    "ddrm": DDRM,
    "diffpir": DiffPIR,
    "daps": DAPS,
    "red_diff": RedDiff,
}


def posterior_sample(
    denoiser: Denoiser,
    observation: Observation,
    key,
    method: PosteriorMethod,
    *,
    num_samples: int | None = None,
    solver: Solver | None = None,
    steps: int = 50,
    grid=None,
    t_min: float | None = None,
    t_max: float | None = None,
    denoise_final: bool | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Samples of x | y for `observation` = (A, y, noise_std) under the prior of `denoiser`.

    One sample per row of y (or `num_samples` of them when y has batch 1). Guidance methods
    (PiGDM, DDNM) run `sample()` with the guided denoiser and `solver` (default `DDIM(eta=1)`);
    solver methods run themselves (Replacement wraps `solver`, default `Ancestral()`).
    `denoise_final` defaults to the method's own choice. Everything else is `sample()`'s."""
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be a diffjax.Denoiser, got {type(denoiser).__name__}")
    if not isinstance(method, PosteriorMethod):
        raise TypeError(
            f"method must be a posterior method instance (e.g. PiGDM(), DDRM(eta=0.85)), got {method!r:.100}; "
            f"names for configs: {sorted(POSTERIOR_METHODS)}"
        )
    check_key(key)
    if not isinstance(observation, Observation):
        raise TypeError(f"observation must be a diffjax.control Observation, got {type(observation).__name__}")
    batch = observation.y.shape[0]
    if num_samples is not None:
        num_samples = check_count("num_samples", num_samples)
        if batch not in (1, num_samples):
            raise ValueError(f"num_samples={num_samples} disagrees with y's batch {batch} (it must be 1 to share y)")
    shape = (num_samples or batch,) + tuple(observation.operator.in_shape)
    observation.check_batch(shape)
    method.check_observation(observation)
    final = method.denoise_final if denoise_final is None else bool(denoise_final)
    options = dict(steps=steps, grid=grid, t_min=t_min, t_max=t_max, denoise_final=final)
    if method.is_guidance:
        guided = method.guide(denoiser, observation)
        solver = DDIM(eta=1.0) if solver is None else solver
        return sample(guided, key, shape, solver=solver, return_trajectory=return_trajectory, **options)
    bound = method.bind(observation, solver)
    return sample(denoiser, key, shape, solver=bound, return_trajectory=return_trajectory, **options)
