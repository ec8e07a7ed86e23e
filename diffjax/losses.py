"""Denoising losses: targets, weightings and time samplers as small typed objects.

Every loss here is one weighted denoising regression (Kingma & Gao 2023, "Understanding Diffusion
Objectives as the ELBO"): draw t from a time sampler, x_t = alpha x0 + sigma eps, and regress the
network onto a *target* view of (x0, eps) under a *weighting* of t:

    loss = E_t E_{x0, eps} [ w(t) * mean_dims (target_hat - target)^2 ].

All targets measure the same error up to a factor of t: with e = eps_hat - eps,
|x0_hat - x0|^2 = e^{-lambda} |e|^2, |v_hat - v|^2 = (alpha^2 + sigma^2)^2/alpha^2 |e|^2, ...
so a weighting defined in one space (min-SNR in x0-space, EDM's lambda(sigma) on D, the ELBO in
eps-space) is converted to the chosen target exactly.

Weightings (config name: class):

    constant       Constant()             w = 1 in the target space (the "simple" losses: eps, v, velocity, EDM F).
    snr            SNR()                  w = SNR = e^lambda on the eps-MSE (SNR^2 on the x0-MSE).
    min_snr        MinSNR(gamma=5)        min(SNR, gamma) on the x0-MSE (Hang et al. 2023).
    edm_weighting  EDMWeighting(sd=0.5)   (s^2 + sd^2)/(s sd)^2 on the x0-MSE, s = sigma/alpha (Karras et al. 2022).
    likelihood     LikelihoodWeighting()  the continuous-time ELBO diffusion term 1/2 (-dlambda/dt) |e|^2 (Kingma
                                          et al. 2021), divided by the sampler density p(t) so that the loss
                                          estimates it without bias (nats per dimension); use UniformLogSNR().
    sigmoid        Sigmoid(bias=2)        sigmoid(bias - lambda) times the ELBO term (Kingma & Gao 2023).

Time samplers: `UniformTime(antithetic=False)` in [t_min, t_max] ("uniform"), `LogNormal(mean=-1.2,
std=1.2)` (EDM: log s ~ N(P_mean, P_std^2), "lognormal"), `LogitNormal(mean=0, std=1)` (Esser et al.
2024: t = sigmoid(N(m, s^2)), "logit_normal") and `UniformLogSNR()` (uniform in lambda, i.e. density
proportional to -dlambda/dt, which makes the likelihood weighting constant, "uniform_log_snr").

Writing your own. A weighting is any object (a frozen dataclass, like these) with

    __call__(self, process, t, density) -> w of shape t.shape
    space: str = "eps"   # the view whose MSE w multiplies: "eps", "x0", ..., or "target" (the loss's own)

and a time sampler any object with `__call__(self, process, key, n, t_min, t_max) -> (t, density)`,
t of shape (n,) in [t_min, t_max] and density its probability density with respect to dt (used by
density-aware weightings such as the likelihood one). Validate the options in `__post_init__`.

The name tables `WEIGHTINGS` and `TIME_SAMPLERS` are for the config boundary only
(`diffjax.validation.build_named`); the dataclass defaults are the only defaults.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.denoisers import (
    PREDICTIONS,
    EDMPreconditioned,
    PathCoefficients,
    check_network,
    check_prediction,
    from_x0_eps,
    gaussian_posterior,
    interpolated_log_variance,
    network_view,
    split_learned_variance,
    to_x0_eps,
)
from diffjax.processes import (
    LOG_SNR_CLIP,
    DiscreteVP,
    GaussianProcess,
    broadcast_to_data,
    per_example,
)
from diffjax.validation import check_number, check_positive

__all__ = [
    "Constant",
    "SNR",
    "MinSNR",
    "EDMWeighting",
    "LikelihoodWeighting",
    "Sigmoid",
    "UniformTime",
    "LogNormal",
    "LogitNormal",
    "UniformLogSNR",
    "WEIGHTINGS",
    "TIME_SAMPLERS",
    "FORMER_NAMES",
    "target_error_scale",
    "loss_weight",
    "denoising_loss",
    "uncertainty_weighted",
    "gaussian_kl",
    "discretized_gaussian_log_likelihood",
    "vlb_term",
    "hybrid_loss",
]


def _log_snr_slope(process, t):
    """d lambda / dt (negative)."""
    _, slope = jax.jvp(process.log_snr, (t,), (jnp.ones_like(t),))
    return slope


def _normal_log_pdf(z, mean, std):
    return -0.5 * ((z - mean) / std) ** 2 - jnp.log(std) - 0.5 * math.log(2 * math.pi)


# ------------------------------------------------------------------------------------------------
# time samplers: (process, key, n, t_min, t_max) -> (t, p(t))
# ------------------------------------------------------------------------------------------------


def _clipped_log_snr_range(process, t_min: float, t_max: float):
    """(lambda(t_max), lambda(t_min)), each clipped to +-LOG_SNR_CLIP (infinite where alpha = 0)."""
    lam_lo = jnp.maximum(process.log_snr(jnp.float32(t_max)), -LOG_SNR_CLIP)
    lam_hi = jnp.minimum(process.log_snr(jnp.float32(t_min)), LOG_SNR_CLIP)
    return lam_lo, lam_hi


def _times_of_log_snr(process, lam, log_density_lam):
    """t(lambda) and its density in t, p(t) = p(lambda) |dlambda/dt|."""
    t = process.t_from_log_snr(lam)
    return t, jnp.exp(log_density_lam) * jnp.abs(_log_snr_slope(process, t))


@dataclasses.dataclass(frozen=True)
class UniformTime:
    """t uniform in [t_min, t_max]; antithetic: pairs (u, 1 - u) of uniforms (variance reduction)."""

    antithetic: bool = False

    def __post_init__(self):
        if not isinstance(self.antithetic, bool):
            raise TypeError(f"UniformTime antithetic must be True or False, got {self.antithetic!r:.100}")

    def __call__(self, process, key, n: int, t_min: float, t_max: float):
        if self.antithetic:
            u = jax.random.uniform(key, ((n + 1) // 2,))
            u = jnp.concatenate([u, 1.0 - u])[:n]
        else:
            u = jax.random.uniform(key, (n,))
        t = t_min + u * (t_max - t_min)
        return t, jnp.full((n,), 1.0 / (t_max - t_min))


@dataclasses.dataclass(frozen=True)
class LogNormal:
    """EDM's noise levels (Karras et al. 2022): log s ~ N(mean, std^2), s = sigma/alpha = e^{-lambda/2},
    clipped to the log-SNR range of [t_min, t_max]."""

    mean: float = -1.2
    std: float = 1.2

    def __post_init__(self):
        check_number("LogNormal mean", self.mean)
        check_positive("LogNormal std", self.std)

    def __call__(self, process, key, n: int, t_min: float, t_max: float):
        lam_lo, lam_hi = _clipped_log_snr_range(process, t_min, t_max)
        log_s = self.mean + self.std * jax.random.normal(key, (n,))
        lam = jnp.clip(-2.0 * log_s, lam_lo, lam_hi)
        return _times_of_log_snr(process, lam, _normal_log_pdf(-0.5 * lam, self.mean, self.std) - math.log(2.0))


@dataclasses.dataclass(frozen=True)
class LogitNormal:
    """t = t_min + sigmoid(z) (t_max - t_min), z ~ N(mean, std^2) (Esser et al. 2024)."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        check_number("LogitNormal mean", self.mean)
        check_positive("LogitNormal std", self.std)

    def __call__(self, process, key, n: int, t_min: float, t_max: float):
        z = self.mean + self.std * jax.random.normal(key, (n,))
        u = jax.nn.sigmoid(z)
        t = t_min + u * (t_max - t_min)
        log_density = _normal_log_pdf(z, self.mean, self.std) - jnp.log(u * (1 - u)) - math.log(t_max - t_min)
        return t, jnp.exp(log_density)


@dataclasses.dataclass(frozen=True)
class UniformLogSNR:
    """lambda uniform over the (clipped) log-SNR range of [t_min, t_max]: p(t) proportional to
    -dlambda/dt, the importance sampler that makes the likelihood weighting constant."""

    def __call__(self, process, key, n: int, t_min: float, t_max: float):
        lam_lo, lam_hi = _clipped_log_snr_range(process, t_min, t_max)
        lam = lam_lo + jax.random.uniform(key, (n,)) * (lam_hi - lam_lo)
        return _times_of_log_snr(process, lam, -jnp.log(lam_hi - lam_lo) * jnp.ones((n,)))


TIME_SAMPLERS: dict[str, type] = {
    "uniform": UniformTime,
    "lognormal": LogNormal,
    "logit_normal": LogitNormal,
    "uniform_log_snr": UniformLogSNR,
}


# ------------------------------------------------------------------------------------------------
# targets and weightings
# ------------------------------------------------------------------------------------------------


def target_error_scale(target, process: GaussianProcess, t):
    """|target_hat - target|^2 / |eps_hat - eps|^2 at t (a function of t only); `target` a view name
    or `EDMPreconditioned` (the raw network's space)."""
    alpha, sigma = process.alpha(t), process.sigma(t)
    if isinstance(target, EDMPreconditioned):
        s = sigma / alpha
        c_out2 = (s * target.sigma_data) ** 2 / (s**2 + target.sigma_data**2)
        return s**2 / c_out2
    if target == "eps":
        return jnp.ones_like(t)
    if target == "x0":
        return (sigma / alpha) ** 2
    if target == "score":
        return 1.0 / sigma**2
    if target == "v":
        return ((alpha**2 + sigma**2) / alpha) ** 2
    if target == "velocity":
        dalpha, dsigma = process.alpha_sigma_derivatives(t)
        return (dsigma - dalpha * sigma / alpha) ** 2
    check_prediction(target)
    raise AssertionError("unreachable")


def _elbo_weight(process, t, density):
    """The eps-space weight of the continuous-time ELBO, 1/2 (-dlambda/dt) / p(t)."""
    return 0.5 * -_log_snr_slope(process, t) / density


@dataclasses.dataclass(frozen=True)
class Constant:
    """w = 1 on the MSE of the loss's own target."""

    space: ClassVar[str] = "target"

    def __call__(self, process, t, density):
        return jnp.ones_like(t)


@dataclasses.dataclass(frozen=True)
class SNR:
    """w = SNR = e^lambda on the eps-MSE."""

    space: ClassVar[str] = "eps"

    def __call__(self, process, t, density):
        return jnp.exp(process.log_snr(t))


@dataclasses.dataclass(frozen=True)
class MinSNR:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) on the x0-MSE."""

    gamma: float = 5.0
    space: ClassVar[str] = "eps"

    def __post_init__(self):
        check_positive("MinSNR gamma", self.gamma)

    def __call__(self, process, t, density):
        lam = process.log_snr(t)
        return jnp.minimum(jnp.exp(lam), self.gamma) * jnp.exp(-lam)  # min(SNR, gamma) on x0-MSE


@dataclasses.dataclass(frozen=True)
class EDMWeighting:
    """EDM's lambda(s) = (s^2 + sd^2)/(s sd)^2 on the x0-MSE, s = sigma/alpha (Karras et al. 2022): a
    constant weight on the raw network's F-MSE."""

    sigma_data: float = 0.5
    space: ClassVar[str] = "eps"

    def __post_init__(self):
        check_positive("EDMWeighting sigma_data", self.sigma_data)

    def __call__(self, process, t, density):
        s2 = jnp.exp(-process.log_snr(t))
        return (s2 + self.sigma_data**2) / (s2 * self.sigma_data**2) * s2  # lambda(s) on x0-MSE


@dataclasses.dataclass(frozen=True)
class LikelihoodWeighting:
    """The continuous-time ELBO's diffusion term (Kingma et al. 2021), unbiased under any sampler."""

    space: ClassVar[str] = "eps"

    def __call__(self, process, t, density):
        return _elbo_weight(process, t, density)


@dataclasses.dataclass(frozen=True)
class Sigmoid:
    """sigmoid(bias - lambda) times the ELBO weight (Kingma & Gao 2023)."""

    bias: float = 2.0
    space: ClassVar[str] = "eps"

    def __post_init__(self):
        check_number("Sigmoid bias", self.bias)

    def __call__(self, process, t, density):
        return jax.nn.sigmoid(self.bias - process.log_snr(t)) * _elbo_weight(process, t, density)


WEIGHTINGS: dict[str, type] = {
    "constant": Constant,
    "snr": SNR,
    "min_snr": MinSNR,
    "edm_weighting": EDMWeighting,
    "likelihood": LikelihoodWeighting,
    "sigmoid": Sigmoid,
}


# The config names used before they were made unambiguous, {loss key: {former name: name}}: for reading
# the configs stored with older checkpoints (refused everywhere else).
FORMER_NAMES = {
    "prediction": {"edm": "edm_preconditioned", "flow": "velocity"},
    "target": {"edm": "edm_preconditioned", "flow": "velocity"},
    "weighting": {"uniform": "constant", "edm": "edm_weighting"},
    "time_sampler": {"importance": "uniform_log_snr"},
}


def loss_weight(weighting, target, process, t, density):
    """The weight of the target-space MSE at t: the weighting's own, converted from its space."""
    space = getattr(weighting, "space", "eps")
    weight = weighting(process, t, density)
    if space == "target" or space == target:
        return weight
    return weight * target_error_scale(space, process, t) / target_error_scale(target, process, t)


# ------------------------------------------------------------------------------------------------
# the loss factory
# ------------------------------------------------------------------------------------------------


def _check_option_object(name: str, value, example: str, table: dict) -> None:
    if isinstance(value, str) or not callable(value):
        named = isinstance(value, str) and value in table
        hint = f" (the config name {value!r} is {table[value].__name__}())" if named else ""
        raise TypeError(f"{name} must be an object such as {example}{hint}, got {value!r:.100}")


def _check_target(target) -> None:
    valid_view = isinstance(target, str) and target in PREDICTIONS
    if not (target is None or isinstance(target, EDMPreconditioned) or valid_view):
        raise ValueError(
            f"unknown target {target!r:.100}; allowed: None (the prediction's own), {list(PREDICTIONS)} "
            "or EDMPreconditioned(sigma_data)"
        )


def _check_loss_arguments(apply_fn, process, prediction, target, weighting, time_sampler, data_key, rng_arg) -> None:
    check_network(apply_fn, process, prediction, "apply_fn")
    _check_target(target)
    _check_option_object("weighting", weighting, "MinSNR(gamma=5.0)", WEIGHTINGS)
    _check_option_object("time_sampler", time_sampler, "LogNormal(mean=-1.2, std=1.2)", TIME_SAMPLERS)
    if not isinstance(data_key, str):
        raise TypeError(f"data_key must be a str, got {data_key!r:.100}")
    if not (rng_arg is None or isinstance(rng_arg, str)):
        raise TypeError(f"rng_arg must be a str or None, got {rng_arg!r:.100}")


def _condition_map(cond_keys) -> dict:
    """{argument name: batch key} from a sequence of keys or a dict."""
    if isinstance(cond_keys, dict):
        pairs = list(cond_keys.items())
    elif isinstance(cond_keys, (list, tuple)):
        pairs = [(k, k) for k in cond_keys]
    else:
        pairs = [(None, None)]
    if not all(isinstance(a, str) and isinstance(k, str) for a, k in pairs):
        raise TypeError(
            f"cond_keys must be a sequence of batch keys or a dict {{argument: key}}, got {cond_keys!r:.100}"
        )
    return dict(pairs)


def _unpack_batch(batch, data_key: str, cond_map: dict):
    """(x0, conditioning kwargs) from a dict batch, or (batch, {}) from an array batch."""
    if isinstance(batch, Mapping):
        missing = [k for k in (data_key, *cond_map.values()) if k not in batch]
        if missing:
            raise ValueError(
                f"the batch has no entry {missing[0]!r} (data_key / cond_keys); its entries: {sorted(batch)}"
            )
        x0, cond = batch[data_key], {arg: batch[k] for arg, k in cond_map.items()}
    elif cond_map:
        raise ValueError(f"cond_keys {sorted(cond_map.values())} need a dict batch, got an array batch")
    else:
        x0, cond = batch, {}
    shape, dtype = getattr(x0, "shape", None), getattr(x0, "dtype", None)
    if shape is None or len(shape) < 2 or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"the data must be a floating array of shape (batch, ...) with at least 2 axes, got shape {shape} "
            f"and dtype {dtype}"
        )
    return x0, cond


def _error(output, output_type, target, x0, eps, x_t, coef, process, t):
    """target_hat - target for a network output of view `output_type`."""
    if target == output_type:
        return output - from_x0_eps(x0, eps, target, coef)
    x0_hat, eps_hat = to_x0_eps(output, output_type, x_t, coef)
    if isinstance(target, EDMPreconditioned):
        scale = target_error_scale(target, process, t) / target_error_scale("x0", process, t)
        return (x0_hat - x0) * broadcast_to_data(jnp.sqrt(scale), x0)
    return from_x0_eps(x0_hat, eps_hat, target, coef) - from_x0_eps(x0, eps, target, coef)


def uncertainty_weighted(loss, log_variance):
    """loss / exp(u) + u (Karras et al. 2024, Eq. 21): smallest at u = log(loss), where it is log(loss) + 1."""
    return loss * jnp.exp(-log_variance) + log_variance


def denoising_loss(
    apply_fn: Callable,
    process: GaussianProcess,
    *,
    prediction: str | EDMPreconditioned = "eps",
    target: str | EDMPreconditioned | None = None,
    weighting: Callable = Constant(),
    time_sampler: Callable = UniformTime(),
    t_min: float | None = None,
    t_max: float | None = None,
    data_key: str = "image",
    cond_keys: Sequence[str] = (),
    rng_arg: str | None = None,
    uncertainty: Callable | None = None,
):
    """Build `loss_fn(params, key, batch) -> (loss, aux)`, a pure, jittable denoising loss.

    Args:
      apply_fn: the network, `apply_fn(params, x, t, **cond) -> array` shaped like x.
      process: the forward process.
      prediction: what the network predicts: "eps", "x0", "v", "score", "velocity", or
        `EDMPreconditioned(sigma_data)` (a raw network F behind EDM preconditioning, which then
        sees c_noise instead of t); the same spelling as `Denoiser`'s.
      target: the regression space, a view name or `EDMPreconditioned(sigma_data)` (F's space);
        default: the prediction's own.
      weighting, time_sampler: objects such as `MinSNR(gamma=5.0)`, `LogNormal()` (see the module
        docstring, also for writing your own).
      t_min, t_max: the training time range (default: the process's).
      data_key: the batch entry holding x0 when the batch is a dict; an array batch is x0 itself.
      cond_keys: batch entries passed to apply_fn as keyword arguments (e.g. {"y": "label"}
        is written as cond_keys=("label",) and arrives as label=...). A mapping
        {argument name: batch key} is accepted too.
      rng_arg: if set, apply_fn receives a fresh key under this keyword (e.g. for dropout).
      uncertainty: optional `u(params, t) -> (batch,)`, a learned log-variance of the loss per noise
        level (EDM2's uncertainty head; Karras et al. 2024, Eq. 21): each example's weighted MSE
        l becomes l / exp(u) + u, which is smallest at u = log(l); aux then holds "log_variance".

    aux holds "mse" (unweighted target MSE), "weight_mean", and "nonfinite_data": the fraction of
    examples whose data hold a NaN or inf (0 for clean data; a NaN loss with nonfinite_data > 0
    comes from the data, not the network). A network output whose shape differs from the data's
    raises ValueError while tracing, before anything is compiled.
    """
    _check_loss_arguments(apply_fn, process, prediction, target, weighting, time_sampler, data_key, rng_arg)
    if not (uncertainty is None or callable(uncertainty)):
        raise TypeError(f"uncertainty must be None or a function u(params, t), got {type(uncertainty).__name__}")
    cond_map = _condition_map(cond_keys)
    t_min, t_max = process.resolve_times(t_min, t_max)
    target = prediction if target is None else target

    def loss_fn(params, key, batch):
        x0, kwargs = _unpack_batch(batch, data_key, cond_map)
        n = x0.shape[0]
        key_t, key_eps, key_net = jax.random.split(key, 3)
        t, density = time_sampler(process, key_t, n, t_min, t_max)
        if jnp.shape(t) != (n,) or jnp.shape(density) != (n,):
            raise ValueError(
                f"the time_sampler must return (t, density) of shape ({n},) each, got shapes "
                f"{jnp.shape(t)} and {jnp.shape(density)}"
            )
        eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
        x_t = process.perturb(x0, t, eps)

        if rng_arg is not None:
            kwargs[rng_arg] = key_net
        net, output_type = network_view(lambda x, s: apply_fn(params, x, s, **kwargs), process, prediction)
        output = net(x_t, t)
        if output.shape != x0.shape:
            raise ValueError(
                f"the network maps data of shape {x0.shape} to shape {output.shape}; it must return the data's shape"
            )

        err = _error(output, output_type, target, x0, eps, x_t, PathCoefficients.at(process, t, x0), process, t)
        mse = per_example(jnp.mean, err.astype(jnp.float32) ** 2)
        weight = loss_weight(weighting, target, process, t, density)
        if jnp.shape(weight) != (n,):
            raise ValueError(f"the weighting must return one weight per example, shape ({n},), got {jnp.shape(weight)}")
        nonfinite = jnp.mean(~per_example(jnp.all, jnp.isfinite(x0)))
        aux = {"mse": jnp.mean(mse), "weight_mean": jnp.mean(weight), "nonfinite_data": nonfinite.astype(jnp.float32)}
        loss = weight * mse
        if uncertainty is not None:
            log_variance = uncertainty(params, t)
            if jnp.shape(log_variance) != (n,):
                raise ValueError(
                    f"uncertainty must return one log-variance per example, shape ({n},), got {jnp.shape(log_variance)}"
                )
            loss = uncertainty_weighted(loss, log_variance)
            aux["log_variance"] = jnp.mean(log_variance)
        return jnp.mean(loss), aux

    return loss_fn


# ------------------------------------------------------------------------------------------------
# Learned variances: the hybrid loss of improved DDPM (Nichol & Dhariwal 2021)
# ------------------------------------------------------------------------------------------------


def gaussian_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * jnp.exp(-log_var2))


def discretized_gaussian_log_likelihood(x, mean, log_var, *, bins: int = 256):
    """log P(x) per element for data x in [-1, 1] quantised to `bins` levels, under N(mean, e^log_var)
    integrated over x's bin of width 2 / (bins - 1); the end bins extend to -inf / +inf (Ho et al.
    2020's decoder L_0)."""
    half = 1.0 / (bins - 1)
    inv_std = jnp.exp(-0.5 * log_var)
    upper = inv_std * (x - mean + half)
    lower = inv_std * (x - mean - half)
    log_cdf_upper = jax.scipy.stats.norm.logcdf(upper)
    log_sf_lower = jax.scipy.stats.norm.logcdf(-lower)
    # log(Phi(u) - Phi(l)) without cancellation: on the side of the mode where both are small.
    # (the differences are < 0; the cap keeps a saturated, unselected branch finite: no NaN gradients)
    log1m_exp = lambda d: jnp.log(-jnp.expm1(jnp.minimum(d, -1e-30)))  # noqa: E731
    mid = jnp.where(
        lower > 0,
        log_sf_lower + log1m_exp(jax.scipy.stats.norm.logcdf(-upper) - log_sf_lower),
        log_cdf_upper + log1m_exp(jax.scipy.stats.norm.logcdf(lower) - log_cdf_upper),
    )
    edge = 1.0 - half
    return jnp.where(x < -edge, log_cdf_upper, jnp.where(x > edge, log_sf_lower, mid))


def vlb_term(process, x0, x_t, t, s, x0_hat, v, *, bins: int = 256):
    """One term of the variational bound in bits per dimension, per example (Nichol & Dhariwal
    2021, eq. 4-5): KL(q(x_s | x_t, x0) || p(x_s | x_t)) with p's mean from `x0_hat` and its
    log-variance interpolated by `v`. Where s is the chain's start (sigma_s = 0) it is the decoder
    term -log p(x0 | x_t) under N(x0_hat, var) discretized to `bins` levels (data in [-1, 1]), the
    posterior variance end of the interpolation then taken from the next step (2t - s, t), as
    guided-diffusion's clipped log-variance does."""
    start = process.sigma(s) <= 0.0
    s_kl = jnp.where(start, 0.5 * (t + s), s)  # a placeholder where the KL is not used
    true_mean, log_min, log_max = gaussian_posterior(process, x_t, x0, t, s_kl)
    model_mean, _, _ = gaussian_posterior(process, x_t, x0_hat, t, s_kl)
    kl = gaussian_kl(
        true_mean, broadcast_to_data(log_min, x0), model_mean, interpolated_log_variance(v, log_min, log_max)
    )
    # (2t - s, t) only where s is the start, so that no branch holds an infinity (NaN gradients)
    _, log_min_next, _ = gaussian_posterior(process, x_t, x0, jnp.where(start, 2 * t - s, t), jnp.where(start, t, s))
    log_max_start = 2.0 * jnp.log(process.sigma(t))  # beta_1 = sigma_1^2 when sigma_s = 0
    decoder_log_var = interpolated_log_variance(v, log_min_next, log_max_start)
    decoder = -discretized_gaussian_log_likelihood(x0, x0_hat, decoder_log_var, bins=bins)
    nats = jnp.where(broadcast_to_data(start, x0), decoder, kl)
    return per_example(jnp.mean, nats) / math.log(2.0)


def hybrid_loss(
    apply_fn: Callable,
    process: DiscreteVP,
    *,
    vlb_weight: float = 1.0,
    data_key: str = "image",
    cond_keys: Sequence[str] = (),
    rng_arg: str | None = None,
    bins: int = 256,
):
    """Build `loss_fn(params, key, batch) -> (loss, aux)`: improved DDPM's L_hybrid for an
    eps-prediction network with a learned variance (2C output channels: eps, then v).

    A step i is drawn uniformly from the chain's 1..N (t = i / N, s = (i - 1) / N) and
    loss = mean_dims (eps_hat - eps)^2 + vlb_weight * L_{i-1}, where L_{i-1} (bits per dimension,
    `vlb_term`) sees the mean through stop_gradient, so the bound trains the variance only.
    vlb_weight = 1 is DiT's and guided-diffusion's hybrid loss (lambda = 0.001 on the bound summed
    over N = 1000 steps); `bins` is the data's quantisation (256 for 8-bit images in [-1, 1]).
    aux holds "mse" and "vlb" (bits per dimension).
    """
    if not isinstance(process, DiscreteVP):
        raise TypeError(f"hybrid_loss needs a DiscreteVP chain (its steps), got {type(process).__name__}")
    check_network(apply_fn, process, "eps", "apply_fn")
    check_number("vlb_weight", vlb_weight)
    if not isinstance(data_key, str):
        raise TypeError(f"data_key must be a str, got {data_key!r:.100}")
    cond_map = _condition_map(cond_keys)
    n_steps = process.num_steps

    def loss_fn(params, key, batch):
        x0, kwargs = _unpack_batch(batch, data_key, cond_map)
        n = x0.shape[0]
        key_t, key_eps, key_net = jax.random.split(key, 3)
        i = jax.random.randint(key_t, (n,), 1, n_steps + 1)
        t, s = i / n_steps, (i - 1) / n_steps
        eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
        x_t = process.perturb(x0, t, eps)
        if rng_arg is not None:
            kwargs[rng_arg] = key_net
        output = apply_fn(params, x_t, t, **kwargs)
        if output.shape != x0.shape[:-1] + (2 * x0.shape[-1],):
            raise ValueError(
                f"a learned-variance network maps data of shape {x0.shape} to 2C channels; got shape {output.shape}"
            )
        eps_hat, v = split_learned_variance(output)
        mse = per_example(jnp.mean, (eps_hat - eps).astype(jnp.float32) ** 2)
        coef = PathCoefficients.at(process, t, x0)
        x0_hat, _ = to_x0_eps(jax.lax.stop_gradient(eps_hat), "eps", x_t, coef)
        vlb = vlb_term(process, x0, x_t, t, s, x0_hat, v, bins=bins)
        return jnp.mean(mse + vlb_weight * vlb), {"mse": jnp.mean(mse), "vlb": jnp.mean(vlb)}

    return loss_fn
