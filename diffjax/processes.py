"""Forward processes as Gaussian paths.

Every continuous-state process here is a Gaussian path

    x_t = alpha(t) * x_0 + sigma(t) * eps,    eps ~ N(0, I),   t in [t_min, t_max],

and everything else is derived from (alpha, sigma) with no per-process code:

- log-SNR  lambda(t) = log(alpha^2 / sigma^2), decreasing in t, and its inverse;
- the forward SDE  dx = f(t) x dt + g(t) dW  with  f = d log(alpha)/dt  and
  g^2 = d(sigma^2)/dt - 2 f sigma^2  (Song et al. 2021, "Score-Based Generative Modeling
  through SDEs", eq. 5 generalised), computed by forward-mode autodiff;
- the prior at t_max: N(0, sigma(t_max)^2 I), which ignores the alpha(t_max) x_0 remainder.

Processes are immutable pytrees. Scalar hyper-parameters are static (fixed at trace time);
only arrays (the betas of a discrete chain) are leaves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.validation import (
    build_named,
    check_choice,
    check_number,
    check_positive,
    is_finite_real,
)

__all__ = [
    "GaussianProcess",
    "VP",
    "DiscreteVP",
    "CosineVP",
    "SubVP",
    "VE",
    "EDM",
    "FlowMatching",
    "PROCESSES",
    "get_process",
    "broadcast_to_data",
    "per_example",
]

# Where a path reaches alpha = 0 (flow matching, cosine at t = 1), log-SNR is -inf. Grids that
# are spaced in log-SNR clip it to this range; the grid end points themselves stay exact.
LOG_SNR_CLIP = 30.0


def _static_dataclass(cls):
    """A frozen dataclass registered as a pytree whose fields are all static metadata."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=[], meta_fields=fields)


def _check_range(t_min: float, t_max: float, lo: float, hi: float, cls_name: str) -> None:
    check_number(f"{cls_name} t_min", t_min)
    check_number(f"{cls_name} t_max", t_max)
    if not (lo <= t_min < t_max <= hi):
        raise ValueError(f"{cls_name}: need {lo} <= t_min < t_max <= {hi}, got t_min={t_min!r}, t_max={t_max!r}")


class GaussianProcess:
    """Base class: subclasses define `alpha` and `sigma` (and may override the log-SNR maps)."""

    t_min: float
    t_max: float
    name: ClassVar[str] = "gaussian"

    # -- the path -------------------------------------------------------------------------
    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def log_snr(self, t):
        """lambda(t) = log(alpha(t)^2 / sigma(t)^2)."""
        return 2.0 * (jnp.log(self.alpha(t)) - jnp.log(self.sigma(t)))

    def t_from_log_snr(self, lam):
        """Inverse of `log_snr`, by bisection on [t_min, t_max] (log-SNR is decreasing).

        Subclasses with a closed form override this. Values of lambda outside the range of the
        process are clamped to the end points.
        """
        lam = jnp.asarray(lam, jnp.float32)
        lo = jnp.full_like(lam, self.t_min)
        hi = jnp.full_like(lam, self.t_max)

        def bisect(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            too_early = self.log_snr(mid) > lam  # log-SNR still above target: move right
            return jnp.where(too_early, mid, lo), jnp.where(too_early, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 40, bisect, (lo, hi))
        return 0.5 * (lo + hi)

    def log_alpha(self, t):
        return jnp.log(self.alpha(t))

    # -- SDE view ---------------------------------------------------------------------------
    def drift(self, t):
        """f(t) = d log alpha / dt, the linear drift coefficient of dx = f x dt + g dW."""
        t = jnp.asarray(t, jnp.float32)
        _, dlog_alpha = jax.jvp(self.log_alpha, (t,), (jnp.ones_like(t),))
        return dlog_alpha

    def diffusion(self, t):
        """g(t) with g^2 = d sigma^2/dt - 2 f(t) sigma^2."""
        t = jnp.asarray(t, jnp.float32)
        sigma, dsigma = jax.jvp(self.sigma, (t,), (jnp.ones_like(t),))
        g2 = 2.0 * sigma * dsigma - 2.0 * self.drift(t) * sigma**2
        return jnp.sqrt(jnp.maximum(g2, 0.0))

    def sde(self, t):
        """(f(t), g(t)) of the forward SDE."""
        return self.drift(t), self.diffusion(t)

    def alpha_sigma_derivatives(self, t):
        """(d alpha/dt, d sigma/dt), used by the flow-velocity view."""
        t = jnp.asarray(t, jnp.float32)
        ones = jnp.ones_like(t)
        _, dalpha = jax.jvp(self.alpha, (t,), (ones,))
        _, dsigma = jax.jvp(self.sigma, (t,), (ones,))
        return dalpha, dsigma

    # -- marginals and prior ------------------------------------------------------------------
    def perturb(self, x0, t, eps):
        """x_t = alpha(t) x0 + sigma(t) eps for given noise eps; t is a scalar or of shape (batch,)."""
        return broadcast_to_data(self.alpha(t), x0) * x0 + broadcast_to_data(self.sigma(t), x0) * eps

    def marginal_sample(self, key, x0, t):
        """Draw x_t ~ N(alpha(t) x0, sigma(t)^2 I); t broadcasts over the leading axis."""
        return self.perturb(x0, t, jax.random.normal(key, x0.shape, x0.dtype))

    def prior_std(self, t=None):
        """sigma(t) at the start of sampling, t_max by default."""
        return self.sigma(jnp.float32(self.t_max if t is None else t))

    def prior_sample(self, key, shape, dtype=jnp.float32, t=None):
        """x_t ~ N(0, sigma(t)^2 I), t = t_max by default (alpha(t) x0 is taken as negligible): the
        prior, or the start of a run whose grid begins below t_max."""
        return self.prior_std(t).astype(dtype) * jax.random.normal(key, shape, dtype)

    def prior_logp(self, x, t=None):
        """log N(x; 0, sigma(t)^2 I) per example (summed over all axes but the first); t defaults to
        t_max, where it is the prior that `prior_sample` draws from."""
        std = self.prior_std() if t is None else self.sigma(t)
        d = math.prod(x.shape[1:])
        sq = per_example(jnp.sum, x**2)
        return -0.5 * sq / std**2 - d * jnp.log(std) - 0.5 * d * math.log(2 * math.pi)

    # -- validation --------------------------------------------------------------------------
    def check_times(self, t_min: float, t_max: float) -> None:
        """Raise ValueError unless self.t_min <= t_min < t_max <= self.t_max."""
        check_number("t_min", t_min)
        check_number("t_max", t_max)
        if not (self.t_min <= t_min < t_max <= self.t_max):
            raise ValueError(
                f"time range t_min, t_max = [{t_min}, {t_max}] is outside {type(self).__name__}'s range "
                f"[{self.t_min}, {self.t_max}] (or empty)"
            )

    def resolve_times(self, t_min=None, t_max=None) -> tuple[float, float]:
        """(t_min, t_max) as floats, None meaning the process's own; checked by `check_times`."""
        t_min = self.t_min if t_min is None else check_number("t_min", t_min)
        t_max = self.t_max if t_max is None else check_number("t_max", t_max)
        self.check_times(t_min, t_max)
        return float(t_min), float(t_max)


def broadcast_to_data(coef, x):
    """Reshape a per-example coefficient of shape () or (batch,) to broadcast against x."""
    coef = jnp.asarray(coef, jnp.float32)
    if coef.ndim == 0:
        return coef
    return jnp.reshape(coef, coef.shape + (1,) * (x.ndim - coef.ndim))


def per_example(reduction, x, keepdims: bool = False):
    """`reduction` (jnp.sum, jnp.mean, jnp.std, jnp.max, ...) over all non-batch axes of x: shape
    (batch,), or (batch, 1, ..., 1) with keepdims. The one per-example reduction of the library."""
    out = reduction(jnp.reshape(x, (x.shape[0], -1)), axis=1)
    return jnp.reshape(out, out.shape + (1,) * (x.ndim - 1)) if keepdims else out


# ------------------------------------------------------------------------------------------------
# Variance-preserving family
# ------------------------------------------------------------------------------------------------


def _sigma_from_log_alpha(log_alpha):
    """sigma = sqrt(1 - alpha^2), accurate for alpha near 1."""
    return jnp.sqrt(-jnp.expm1(2.0 * log_alpha))


def _vp_log_snr(log_alpha):
    """lambda = log(alpha^2) - log(1 - alpha^2)."""
    return 2.0 * log_alpha - jnp.log(-jnp.expm1(2.0 * log_alpha))


@_static_dataclass
class _LinearBetaPath(GaussianProcess):
    """The fields and alpha shared by VP and sub-VP: beta(t) = beta_min + t (beta_max - beta_min),
    log alpha(t) = -1/2 int_0^t beta. Subclasses define sigma."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def __post_init__(self):
        name = type(self).__name__
        check_positive("beta_min", self.beta_min)
        check_positive("beta_max", self.beta_max)
        if self.beta_max <= self.beta_min:
            raise ValueError(f"{name} needs beta_max > beta_min, got {self.beta_min}, {self.beta_max}")
        _check_range(self.t_min, self.t_max, 0.0, 1.0, name)
        if self.t_min <= 0:
            raise ValueError(f"{name} needs t_min > 0 (sigma(0) = 0), got {self.t_min}")

    def log_alpha(self, t):
        t = jnp.asarray(t, jnp.float32)
        return -0.5 * (0.5 * (self.beta_max - self.beta_min) * t**2 + self.beta_min * t)

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))


@_static_dataclass
class VP(_LinearBetaPath):
    """Variance-preserving SDE with linear beta (Song et al. 2021; DDPM in continuous time).

    beta(t) = beta_min + t (beta_max - beta_min),  log alpha(t) = -1/2 int_0^t beta,
    sigma^2 = 1 - alpha^2,  f = -beta/2,  g = sqrt(beta).
    """

    name: ClassVar[str] = "vp"

    def sigma(self, t):
        return _sigma_from_log_alpha(self.log_alpha(t))

    def log_snr(self, t):
        return _vp_log_snr(self.log_alpha(t))

    def t_from_log_snr(self, lam):
        integral = jax.nn.softplus(-jnp.asarray(lam, jnp.float32))  # = -log(alpha^2)
        delta = self.beta_max - self.beta_min
        t = (jnp.sqrt(self.beta_min**2 + 2.0 * delta * integral) - self.beta_min) / delta
        return jnp.clip(t, self.t_min, self.t_max)

    @staticmethod
    def from_betas(betas, **kwargs) -> DiscreteVP:
        """A discrete DDPM chain (Ho et al. 2020) given by its betas, embedded in continuous time."""
        return DiscreteVP.from_betas(betas, **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiscreteVP(GaussianProcess):
    """A discrete DDPM chain with betas beta_1..beta_N, embedded in continuous time.

    Step i (1-based) sits at t_i = i / N with alpha_bar_i = prod_{j<=i} (1 - beta_j). Between
    knots, log(alpha_bar) is linear in t (so beta(t) is piecewise constant, N log(1/(1-beta_i))),
    which makes every solver able to query any t while the knots are exactly the DDPM chain.
    """

    log_alpha_bar: jax.Array  # (N + 1,) at t = 0, 1/N, ..., 1; leaf of the pytree
    t_min: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    t_max: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    name: ClassVar[str] = "ddpm"

    @classmethod
    def from_betas(cls, betas, t_min=None, t_max=1.0) -> DiscreteVP:
        try:
            betas_np = np.asarray(betas, np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"betas must be a 1-D array of numbers, got {betas!r:.100}") from err
        if betas_np.ndim != 1 or betas_np.size < 2:
            raise ValueError(f"betas must be a 1-D array of length >= 2, got shape {betas_np.shape}")
        if not np.all((betas_np > 0) & (betas_np < 1)):
            raise ValueError(f"betas must lie in (0, 1); got min {betas_np.min()}, max {betas_np.max()}")
        n = betas_np.size
        log_alpha_bar = np.concatenate([[0.0], np.cumsum(np.log1p(-betas_np))])
        t_min = 1.0 / n if t_min is None else t_min
        _check_range(t_min, t_max, 1.0 / n, 1.0, "DiscreteVP")
        return cls(jnp.asarray(log_alpha_bar, jnp.float32), t_min=float(t_min), t_max=float(t_max))

    @property
    def num_steps(self) -> int:
        return self.log_alpha_bar.shape[0] - 1

    def _knots(self):
        return jnp.linspace(0.0, 1.0, self.num_steps + 1)

    def log_alpha(self, t):
        t = jnp.asarray(t, jnp.float32)
        return 0.5 * jnp.interp(t, self._knots(), self.log_alpha_bar)

    def alpha(self, t):
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        return _sigma_from_log_alpha(self.log_alpha(t))

    def log_snr(self, t):
        return _vp_log_snr(self.log_alpha(t))

    def t_from_log_snr(self, lam):
        # log(alpha^2) = log_sigmoid(lam); log_alpha_bar is decreasing, so interpolate reversed.
        log_alpha_bar = jax.nn.log_sigmoid(jnp.asarray(lam, jnp.float32))
        t = jnp.interp(log_alpha_bar, self.log_alpha_bar[::-1], self._knots()[::-1])
        return jnp.clip(t, self.t_min, self.t_max)


@_static_dataclass
class CosineVP(GaussianProcess):
    """Cosine schedule (Nichol & Dhariwal 2021, improved DDPM) in continuous time.

    alpha(t) = cos(theta(t)) / cos(theta(0)),  theta(t) = (t + s)/(1 + s) * pi/2,  sigma^2 = 1 - alpha^2.
    alpha(1) = 0, so the prior N(0, I) is exact.
    """

    s: float = 0.008
    t_min: float = 1e-3
    t_max: float = 1.0
    name: ClassVar[str] = "cosine"

    def __post_init__(self):
        if not (is_finite_real(self.s) and 0 <= self.s < 1):
            raise ValueError(f"CosineVP offset s must lie in [0, 1), got {self.s!r}")
        _check_range(self.t_min, self.t_max, 0.0, 1.0, "CosineVP")
        if self.t_min <= 0:
            raise ValueError(f"CosineVP needs t_min > 0 (sigma(0) = 0), got {self.t_min}")

    def _theta(self, t):
        return (jnp.asarray(t, jnp.float32) + self.s) / (1.0 + self.s) * (math.pi / 2)

    def alpha(self, t):
        # cos(theta) written as sin(pi/2 - theta): exactly 0 at t = 1 in float32 (cos(pi/2) is
        # not), with the right derivative there.
        t = jnp.asarray(t, jnp.float32)
        return jnp.sin((1.0 - t) / (1.0 + self.s) * (math.pi / 2)) / math.cos(self.s / (1.0 + self.s) * math.pi / 2)

    def sigma(self, t):
        # 1 - cos^2(theta)/cos^2(theta0) = sin(theta - theta0) sin(theta + theta0) / cos^2(theta0),
        # accurate at both ends and differentiable at t = 1 where alpha = 0.
        theta, theta0 = self._theta(t), self._theta(0.0)
        return jnp.sqrt(jnp.sin(theta - theta0) * jnp.sin(theta + theta0)) / jnp.cos(theta0)

    def log_snr(self, t):
        return 2.0 * (jnp.log(self.alpha(t)) - jnp.log(self.sigma(t)))

    def t_from_log_snr(self, lam):
        alpha = jnp.sqrt(jax.nn.sigmoid(jnp.asarray(lam, jnp.float32)))
        theta = jnp.arccos(alpha * math.cos(self.s / (1.0 + self.s) * math.pi / 2))
        t = theta * (1.0 + self.s) / (math.pi / 2) - self.s
        return jnp.clip(t, self.t_min, self.t_max)


@_static_dataclass
class SubVP(_LinearBetaPath):
    """Sub-VP SDE (Song et al. 2021): alpha as in VP, sigma(t) = 1 - alpha(t)^2.

    f = -beta/2,  g^2 = beta (1 - exp(-2 int beta)).
    """

    name: ClassVar[str] = "subvp"

    def sigma(self, t):
        return -jnp.expm1(2.0 * self.log_alpha(t))


def _check_sigma_bounds(process) -> None:
    """0 < sigma_min < sigma_max (VE and EDM)."""
    check_positive("sigma_min", process.sigma_min)
    check_positive("sigma_max", process.sigma_max)
    if process.sigma_max <= process.sigma_min:
        raise ValueError(
            f"{type(process).__name__} needs sigma_max > sigma_min, got {process.sigma_min}, {process.sigma_max}"
        )


@_static_dataclass
class VE(GaussianProcess):
    """Variance-exploding SDE (Song et al. 2021, NCSN): alpha = 1,
    sigma(t) = sigma_min (sigma_max / sigma_min)^t,  f = 0,  g = sigma sqrt(2 log(sigma_max/sigma_min)).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 0.0
    t_max: float = 1.0
    name: ClassVar[str] = "ve"

    def __post_init__(self):
        _check_sigma_bounds(self)
        _check_range(self.t_min, self.t_max, 0.0, 1.0, "VE")

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t, jnp.float32))

    def log_alpha(self, t):
        return jnp.zeros_like(jnp.asarray(t, jnp.float32))

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** jnp.asarray(t, jnp.float32)

    def log_snr(self, t):
        log_sigma = math.log(self.sigma_min) + jnp.asarray(t, jnp.float32) * math.log(self.sigma_max / self.sigma_min)
        return -2.0 * log_sigma

    def t_from_log_snr(self, lam):
        log_sigma = -0.5 * jnp.asarray(lam, jnp.float32)
        t = (log_sigma - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)
        return jnp.clip(t, self.t_min, self.t_max)


@_static_dataclass
class EDM(GaussianProcess):
    """EDM (Karras et al. 2022): alpha = 1, sigma(t) = t, t in [sigma_min, sigma_max].

    f = 0,  g = sqrt(2 t).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    name: ClassVar[str] = "edm"

    def __post_init__(self):
        _check_sigma_bounds(self)

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t, jnp.float32))

    def log_alpha(self, t):
        return jnp.zeros_like(jnp.asarray(t, jnp.float32))

    def sigma(self, t):
        return jnp.asarray(t, jnp.float32)

    def log_snr(self, t):
        return -2.0 * jnp.log(jnp.asarray(t, jnp.float32))

    def t_from_log_snr(self, lam):
        return jnp.clip(jnp.exp(-0.5 * jnp.asarray(lam, jnp.float32)), self.t_min, self.t_max)


@_static_dataclass
class FlowMatching(GaussianProcess):
    """Rectified flow / flow matching linear interpolant (Liu et al. 2022; Lipman et al. 2022):
    alpha = 1 - t, sigma = t. alpha(1) = 0, so the prior N(0, I) is exact.

    f = -1/(1 - t),  g^2 = 2t + 2t^2/(1 - t).
    """

    t_min: float = 1e-3
    t_max: float = 1.0
    name: ClassVar[str] = "flow"

    def __post_init__(self):
        _check_range(self.t_min, self.t_max, 0.0, 1.0, "FlowMatching")
        if self.t_min <= 0:
            raise ValueError(f"FlowMatching needs t_min > 0 (sigma(0) = 0), got {self.t_min}")

    def alpha(self, t):
        return 1.0 - jnp.asarray(t, jnp.float32)

    def log_alpha(self, t):
        return jnp.log1p(-jnp.asarray(t, jnp.float32))

    def sigma(self, t):
        return jnp.asarray(t, jnp.float32)

    def log_snr(self, t):
        t = jnp.asarray(t, jnp.float32)
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def t_from_log_snr(self, lam):
        t = jax.nn.sigmoid(-0.5 * jnp.asarray(lam, jnp.float32))
        return jnp.clip(t, self.t_min, self.t_max)


PROCESSES = {
    "vp": VP,
    "cosine": CosineVP,
    "subvp": SubVP,
    "ve": VE,
    "edm": EDM,
    "flow": FlowMatching,
    "ddpm": DiscreteVP,
}


def get_process(name: str, **kwargs) -> GaussianProcess:
    """Build a process by name. "ddpm" takes `betas` or (`beta_start`, `beta_end`, `num_steps`)."""
    check_choice("process", name, PROCESSES)
    if name == "ddpm":
        if "betas" in kwargs:
            betas = kwargs.pop("betas")
        else:
            start = kwargs.pop("beta_start", 1e-4)
            end = kwargs.pop("beta_end", 0.02)
            steps = kwargs.pop("num_steps", 1000)
            betas = np.linspace(start, end, steps)
        return DiscreteVP.from_betas(betas, **kwargs)
    return build_named(PROCESSES, name, kwargs, "process")
