"""Denoising losses: targets, weightings and time samplers.

Every loss here is one weighted denoising regression (Kingma & Gao 2023, "Understanding Diffusion
Objectives as the ELBO"): draw t from a time sampler, x_t = alpha x0 + sigma eps, and regress the
network onto a *target* view of (x0, eps) under a *weighting* of t:

    loss = E_t E_{x0, eps} [ w(t) * mean_dims (target_hat - target)^2 ].

All targets measure the same error up to a factor of t: with e = eps_hat - eps,
|x0_hat - x0|^2 = e^{-lambda} |e|^2, |v_hat - v|^2 = (alpha^2 + sigma^2)^2/alpha^2 |e|^2, ...
so a weighting defined in one space (min-SNR in x0-space, EDM's lambda(sigma) on D, the ELBO in
eps-space) is converted to the chosen target exactly. Weightings:

    uniform      w = 1 in the target space (the usual "simple" losses: eps, v, flow, EDM F).
    snr          SNR = e^lambda times the eps-MSE, i.e. uniform x0-MSE.
    min_snr      min(SNR, gamma) on the x0-MSE (Hang et al. 2023).
    edm          (s^2 + sd^2)/(s sd)^2 on the x0-MSE, s = sigma/alpha (Karras et al. 2022).
    likelihood   the continuous-time ELBO diffusion term 1/2 (-dlambda/dt) |e|^2 (Kingma et al.
                 2021), divided by the sampler density p(t) so that the loss estimates it
                 without bias (in nats per dimension); use time_sampler="importance".
    sigmoid      sigmoid(b - lambda) times the ELBO term (Kingma & Gao 2023).

Time samplers: "uniform" in [t_min, t_max] (optionally antithetic), "lognormal" (EDM:
log s ~ N(P_mean, P_std^2)), "logit_normal" (Esser et al. 2024: t = sigmoid(N(m, s^2))), and
"importance" (uniform in lambda, i.e. density proportional to -dlambda/dt, which makes the
likelihood weighting constant).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from diffjax.denoisers import (
    PREDICTIONS,
    EDMPreconditioning,
    PathCoefficients,
    check_prediction,
    from_x0_eps,
    to_x0_eps,
)
from diffjax.processes import LOG_SNR_CLIP, GaussianProcess
from diffjax.validation import is_finite_real

__all__ = [
    "TARGETS",
    "WEIGHTINGS",
    "TIME_SAMPLERS",
    "LOSS_PREDICTIONS",
    "sample_times",
    "loss_weight",
    "denoising_loss",
]

LOSS_PREDICTIONS = PREDICTIONS + ("edm",)  # "edm": a raw network F behind EDM preconditioning
TARGETS = ("eps", "x0", "v", "flow", "score", "edm")
WEIGHTINGS = ("uniform", "likelihood", "snr", "min_snr", "edm", "sigmoid")
TIME_SAMPLERS = ("uniform", "lognormal", "logit_normal", "importance")

_WEIGHTING_OPTIONS = {"min_snr": {"gamma"}, "sigmoid": {"bias"}}
_SAMPLER_OPTIONS = {
    "uniform": {"antithetic"},
    "lognormal": {"mean", "std"},
    "logit_normal": {"mean", "std"},
    "importance": set(),
}


# ------------------------------------------------------------------------------------------------
# time samplers
# ------------------------------------------------------------------------------------------------


def _log_snr_slope(process, t):
    """d lambda / dt (negative)."""
    _, slope = jax.jvp(process.log_snr, (t,), (jnp.ones_like(t),))
    return slope


def _normal_log_pdf(z, mean, std):
    return -0.5 * ((z - mean) / std) ** 2 - jnp.log(std) - 0.5 * math.log(2 * math.pi)


def sample_times(
    name: str,
    process: GaussianProcess,
    key,
    n: int,
    t_min: float,
    t_max: float,
    **options,
):
    """Draw n times in [t_min, t_max] and return (t, p(t)), p the density with respect to dt.

    uniform(antithetic=False) | lognormal(mean=-1.2, std=1.2) | logit_normal(mean=0, std=1) |
    importance (uniform in log-SNR).
    """
    if name == "uniform":
        if options.get("antithetic", False):
            u = jax.random.uniform(key, ((n + 1) // 2,))
            u = jnp.concatenate([u, 1.0 - u])[:n]
        else:
            u = jax.random.uniform(key, (n,))
        t = t_min + u * (t_max - t_min)
        return t, jnp.full((n,), 1.0 / (t_max - t_min))
    if name in ("lognormal", "importance"):
        lam_lo = jnp.maximum(process.log_snr(jnp.float32(t_max)), -LOG_SNR_CLIP)
        lam_hi = jnp.minimum(process.log_snr(jnp.float32(t_min)), LOG_SNR_CLIP)
        if name == "lognormal":
            mean, std = options.get("mean", -1.2), options.get("std", 1.2)
            log_s = mean + std * jax.random.normal(key, (n,))  # s = sigma/alpha = exp(-lambda/2)
            lam = jnp.clip(-2.0 * log_s, lam_lo, lam_hi)
            log_density_lam = _normal_log_pdf(-0.5 * lam, mean, std) - math.log(2.0)
        else:
            lam = lam_lo + jax.random.uniform(key, (n,)) * (lam_hi - lam_lo)
            log_density_lam = -jnp.log(lam_hi - lam_lo) * jnp.ones((n,))
        t = process.t_from_log_snr(lam)
        return t, jnp.exp(log_density_lam) * jnp.abs(_log_snr_slope(process, t))
    if name == "logit_normal":
        mean, std = options.get("mean", 0.0), options.get("std", 1.0)
        z = mean + std * jax.random.normal(key, (n,))
        u = jax.nn.sigmoid(z)
        t = t_min + u * (t_max - t_min)
        log_density = _normal_log_pdf(z, mean, std) - jnp.log(u * (1 - u)) - math.log(t_max - t_min)
        return t, jnp.exp(log_density)
    raise ValueError(f"unknown time sampler {name!r}; known: {list(TIME_SAMPLERS)}")


# ------------------------------------------------------------------------------------------------
# weightings
# ------------------------------------------------------------------------------------------------


def target_error_scale(target: str, process: GaussianProcess, t, sigma_data: float = 0.5):
    """|target_hat - target|^2 / |eps_hat - eps|^2 at t (a function of t only)."""
    alpha, sigma = process.alpha(t), process.sigma(t)
    if target == "eps":
        return jnp.ones_like(t)
    if target == "x0":
        return (sigma / alpha) ** 2
    if target == "score":
        return 1.0 / sigma**2
    if target == "v":
        return ((alpha**2 + sigma**2) / alpha) ** 2
    if target == "flow":
        dalpha, dsigma = process.alpha_sigma_derivatives(t)
        return (dsigma - dalpha * sigma / alpha) ** 2
    if target == "edm":
        s = sigma / alpha
        c_out2 = (s * sigma_data) ** 2 / (s**2 + sigma_data**2)
        return s**2 / c_out2
    raise ValueError(f"unknown target {target!r}; known targets: {list(TARGETS)}")


def eps_space_weight(weighting: str, process, t, density, sigma_data=0.5, **options):
    """The weight w(t) of a weighting, expressed on the eps-MSE."""
    lam = process.log_snr(t)
    if weighting == "snr":
        return jnp.exp(lam)
    if weighting == "min_snr":
        gamma = options.get("gamma", 5.0)
        return jnp.minimum(jnp.exp(lam), gamma) * jnp.exp(-lam)  # min(SNR, gamma) on x0-MSE
    if weighting == "edm":
        s2 = jnp.exp(-lam)
        return (s2 + sigma_data**2) / (s2 * sigma_data**2) * s2  # lambda(s) on x0-MSE
    elbo = 0.5 * -_log_snr_slope(process, t) / density
    if weighting == "likelihood":
        return elbo
    if weighting == "sigmoid":
        return jax.nn.sigmoid(options.get("bias", 2.0) - lam) * elbo
    raise ValueError(f"unknown weighting {weighting!r}; known weightings: {list(WEIGHTINGS)}")


def loss_weight(weighting, target, process, t, density, sigma_data=0.5, **options):
    """The weight of the target-space MSE at t for the given weighting."""
    if weighting == "uniform":
        return jnp.ones_like(t)
    w_eps = eps_space_weight(weighting, process, t, density, sigma_data, **options)
    return w_eps / target_error_scale(target, process, t, sigma_data)


# ------------------------------------------------------------------------------------------------
# the loss factory
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The static choices of a denoising loss (validated on construction)."""

    prediction: str = "eps"
    target: str | None = None
    weighting: str = "uniform"
    time_sampler: str = "uniform"
    sigma_data: float = 0.5
    weighting_options: tuple = ()
    time_sampler_options: tuple = ()

    def __post_init__(self):
        check_prediction(self.prediction, LOSS_PREDICTIONS)
        if self.target is not None and self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; known targets: {list(TARGETS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; known weightings: {list(WEIGHTINGS)}")
        if self.time_sampler not in TIME_SAMPLERS:
            raise ValueError(
                f"unknown time sampler {self.time_sampler!r} (time_sampler); known: {list(TIME_SAMPLERS)}"
            )
        _check_options("weighting", self.weighting, dict(self.weighting_options), _WEIGHTING_OPTIONS)
        _check_options(
            "time sampler", self.time_sampler, dict(self.time_sampler_options), _SAMPLER_OPTIONS
        )
        if not (is_finite_real(self.sigma_data) and self.sigma_data > 0):
            raise ValueError(f"sigma_data must be a positive number, got {self.sigma_data!r}")

    @property
    def resolved_target(self) -> str:
        if self.target is not None:
            return self.target
        return "edm" if self.prediction == "edm" else self.prediction


def _check_options(kind, name, options, allowed_table):
    allowed = allowed_table.get(name, set())
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for {kind} {name!r}; allowed: {sorted(allowed) or 'none'}"
        )
    for key, value in options.items():
        if key == "antithetic":
            valid, expected = isinstance(value, bool), "True or False"
        elif key in ("gamma", "std"):
            valid, expected = is_finite_real(value) and value > 0, "positive"
        else:
            valid, expected = is_finite_real(value), "a finite number"
        if not valid:
            raise ValueError(f"{kind} {name!r} option {key} must be {expected}, got {value!r:.100}")


def _check_loss_arguments(apply_fn, process, weighting_options, time_sampler_options, data_key, rng_arg) -> None:
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    if not isinstance(process, GaussianProcess):
        raise TypeError(f"process must be a diffjax process, got {type(process).__name__}")
    for name, options in (("weighting_options", weighting_options), ("time_sampler_options", time_sampler_options)):
        if not (options is None or isinstance(options, dict) and all(isinstance(k, str) for k in options)):
            raise TypeError(f"{name} must be a dict of named options or None, got {options!r:.100}")
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


def denoising_loss(
    apply_fn: Callable,
    process: GaussianProcess,
    *,
    prediction: str = "eps",
    target: str | None = None,
    weighting: str = "uniform",
    time_sampler: str = "uniform",
    sigma_data: float = 0.5,
    weighting_options: dict | None = None,
    time_sampler_options: dict | None = None,
    t_min: float | None = None,
    t_max: float | None = None,
    data_key: str = "image",
    cond_keys: Sequence[str] = (),
    rng_arg: str | None = None,
):
    """Build `loss_fn(params, key, batch) -> (loss, aux)`, a pure, jittable denoising loss.

    Args:
      apply_fn: the network, `apply_fn(params, x, t, **cond) -> array` shaped like x.
      process: the forward process.
      prediction: what the network predicts: "eps", "x0", "v", "score", "flow", or "edm"
        (a raw network F behind EDM preconditioning, which then sees c_noise instead of t).
      target: the regression space; default: the prediction's own ("edm" -> EDM's F target).
      weighting, time_sampler: see the module docstring; their options as dicts
        (min_snr: gamma=5; sigmoid: bias=2; uniform: antithetic=False;
        lognormal: mean=-1.2, std=1.2; logit_normal: mean=0, std=1).
      sigma_data: the data std used by EDM preconditioning and the EDM weighting.
      t_min, t_max: the training time range (default: the process's).
      data_key: the batch entry holding x0.
      cond_keys: batch entries passed to apply_fn as keyword arguments (e.g. {"y": "label"}
        is written as cond_keys=("label",) and arrives as label=...). A mapping
        {argument name: batch key} is accepted too.
      rng_arg: if set, apply_fn receives a fresh key under this keyword (e.g. for dropout).

    aux holds "mse" (unweighted target MSE) and "weight_mean".
    """
    _check_loss_arguments(apply_fn, process, weighting_options, time_sampler_options, data_key, rng_arg)
    cond_map = _condition_map(cond_keys)
    config = LossConfig(
        prediction,
        target,
        weighting,
        time_sampler,
        sigma_data,
        tuple(sorted((weighting_options or {}).items())),
        tuple(sorted((time_sampler_options or {}).items())),
    )
    t_min, t_max = process.resolve_times(t_min, t_max)
    target = config.resolved_target

    def loss_fn(params, key, batch):
        x0 = batch[data_key]
        n = x0.shape[0]
        key_t, key_eps, key_net = jax.random.split(key, 3)
        t, density = sample_times(
            config.time_sampler, process, key_t, n, t_min, t_max, **dict(config.time_sampler_options)
        )
        eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
        coef = PathCoefficients.at(process, t, x0)
        x_t = coef.alpha * x0 + coef.sigma * eps

        kwargs = {arg: batch[k] for arg, k in cond_map.items()}
        if rng_arg is not None:
            kwargs[rng_arg] = key_net
        net = lambda x, s: apply_fn(params, x, s, **kwargs)  # noqa: E731
        if config.prediction == "edm":
            net, output_type = EDMPreconditioning(net, process, config.sigma_data), "x0"
        else:
            output_type = config.prediction
        output = net(x_t, t)

        if target == output_type:
            err = output - from_x0_eps(x0, eps, target, coef)
        else:
            x0_hat, eps_hat = to_x0_eps(output, output_type, x_t, coef)
            if target == "edm":
                scale = target_error_scale("edm", process, t, config.sigma_data) / target_error_scale(
                    "x0", process, t
                )
                err = (x0_hat - x0) * jnp.sqrt(scale).reshape((n,) + (1,) * (x0.ndim - 1))
            else:
                err = from_x0_eps(x0_hat, eps_hat, target, coef) - from_x0_eps(x0, eps, target, coef)
        mse = jnp.mean(jnp.reshape(err.astype(jnp.float32) ** 2, (n, -1)), axis=1)
        weight = loss_weight(
            config.weighting, target, process, t, density, config.sigma_data, **dict(config.weighting_options)
        )
        loss = jnp.mean(weight * mse)
        return loss, {"mse": jnp.mean(mse), "weight_mean": jnp.mean(weight)}

    return loss_fn
