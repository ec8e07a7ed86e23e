"""Denoisers: one network, every view of it.

A network `fn(x, t) -> array` predicts one of the views

    eps       the noise:               x = alpha x0 + sigma eps
    x0        the clean data (the posterior mean E[x0 | x_t])
    v         v = alpha eps - sigma x0                       (Salimans & Ho 2022)
    score     grad log p_t(x) = -eps / sigma
    velocity  the probability-flow velocity dx/dt = alpha' x0 + sigma' eps (Lipman et al. 2022;
              for alpha = 1 - t, sigma = t it is eps - x0)

and, given (alpha, sigma) of the process at t, each converts into the pair (x0, eps) and back.
`Denoiser` wraps the network with its process and exposes every view; samplers, losses,
guidance and likelihood only talk to it.

A raw network F trained behind EDM preconditioning (Karras et al. 2022) is given the prediction
`EDMPreconditioned(sigma_data)`: the Denoiser (and `denoising_loss`) then wrap it in
`EDMPreconditioning`, the x0-predictor D(x; sigma) = c_skip x + c_out F(c_in x; c_noise). The same
spelling serves the loss and the denoiser.

A network may declare what it predicts with a `prediction` attribute (a view name or an
`EDMPreconditioned`); `EDMPreconditioning` declares "x0". A Denoiser or loss given another
prediction raises instead of silently converting the wrong quantity, e.g. a raw EDM network
tagged `apply.prediction = EDMPreconditioned(0.5)` cannot be used as an x0-predictor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp

from diffjax.processes import GaussianProcess, broadcast_to_data, per_example
from diffjax.validation import check_choice, check_positive, is_finite_real

__all__ = [
    "PREDICTIONS",
    "PRECONDITIONED",
    "Denoiser",
    "EDMPreconditioned",
    "EDMPreconditioning",
    "PathCoefficients",
    "to_x0_eps",
    "from_x0_eps",
    "check_prediction",
    "network_view",
    "check_network",
    "check_wrapped_network",
    "check_declared_prediction",
    "guided",
    "classifier_free_guidance",
    "autoguidance",
    "gaussian_posterior",
    "interpolated_log_variance",
    "split_learned_variance",
    "LearnedVarianceDenoiser",
]

PREDICTIONS = ("eps", "x0", "v", "score", "velocity")
# Former spellings, refused with the new one named.
_RENAMED = {"flow": "'velocity'", "edm": "EDMPreconditioned(sigma_data=...) (config name 'edm_preconditioned')"}


def check_prediction(prediction: str, allowed=PREDICTIONS) -> None:
    """ValueError unless `prediction` is one of the view names `allowed`."""
    if isinstance(prediction, str) and prediction in _RENAMED and prediction not in allowed:
        raise ValueError(f"prediction {prediction!r} is now spelled {_RENAMED[prediction]}; allowed: {list(allowed)}")
    check_choice("prediction", prediction, allowed)


@dataclasses.dataclass(frozen=True)
class PathCoefficients:
    """alpha, sigma and their time derivatives at t, shaped to broadcast against the data."""

    alpha: jax.Array
    sigma: jax.Array
    dalpha: jax.Array
    dsigma: jax.Array

    @classmethod
    def at(cls, process: GaussianProcess, t, like: jax.Array) -> PathCoefficients:
        dalpha, dsigma = process.alpha_sigma_derivatives(t)
        shape = lambda c: broadcast_to_data(c, like)  # noqa: E731
        return cls(shape(process.alpha(t)), shape(process.sigma(t)), shape(dalpha), shape(dsigma))


def to_x0_eps(output, prediction: str, x, c: PathCoefficients):
    """Convert a network output of the given prediction type to (x0, eps) at x."""
    if prediction == "x0":
        x0 = output
        return x0, (x - c.alpha * x0) / c.sigma
    if prediction == "eps":
        eps = output
        return (x - c.sigma * eps) / c.alpha, eps
    if prediction == "score":
        eps = -c.sigma * output
        return (x - c.sigma * eps) / c.alpha, eps
    if prediction == "v":
        # [x; v] = [[alpha, sigma], [-sigma, alpha]] [x0; eps]
        norm = c.alpha**2 + c.sigma**2
        return (c.alpha * x - c.sigma * output) / norm, (c.sigma * x + c.alpha * output) / norm
    if prediction == "velocity":
        # [x; u] = [[alpha, sigma], [alpha', sigma']] [x0; eps]; det > 0 as log-SNR decreases.
        det = c.alpha * c.dsigma - c.sigma * c.dalpha
        return (c.dsigma * x - c.sigma * output) / det, (c.alpha * output - c.dalpha * x) / det
    check_prediction(prediction)
    raise AssertionError("unreachable")


def from_x0_eps(x0, eps, prediction: str, c: PathCoefficients):
    """The view `prediction` of the pair (x0, eps)."""
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return eps
    if prediction == "score":
        return -eps / c.sigma
    if prediction == "v":
        return c.alpha * eps - c.sigma * x0
    if prediction == "velocity":
        return c.dalpha * x0 + c.dsigma * eps
    check_prediction(prediction)
    raise AssertionError("unreachable")


def _time_for_batch(t, x) -> jax.Array:
    """t as an array of shape (batch,), from a scalar or a (batch,) array; checks the shape."""
    t = jnp.asarray(t, jnp.float32)
    if x.ndim < 1:
        raise ValueError(f"x must have a leading batch axis, got shape {x.shape}")
    if t.ndim == 0:
        return jnp.broadcast_to(t, (x.shape[0],))
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or of shape (batch,) = ({x.shape[0]},), got {t.shape}")
    return t


@dataclasses.dataclass(frozen=True)
class EDMPreconditioned:
    """The prediction of a raw network F trained behind EDM preconditioning with data std
    `sigma_data` (Karras et al. 2022): `Denoiser(F, process, EDMPreconditioned(0.5))` and
    `denoising_loss(F, process, prediction=EDMPreconditioned(0.5))` wrap F in `EDMPreconditioning`.
    As a loss target it is F's space: |F_hat - F|^2 = |D_hat - x0|^2 / c_out^2."""

    sigma_data: float = 0.5

    def __post_init__(self):
        check_positive("sigma_data", self.sigma_data)

    def wrap(self, net: Callable, process: GaussianProcess) -> EDMPreconditioning:
        return EDMPreconditioning(net, process, self.sigma_data)


# Config names of the predictions that take options (the view names are their own config names).
PRECONDITIONED = {"edm_preconditioned": EDMPreconditioned}

Prediction = str | EDMPreconditioned


_NO_PROCESS = object()  # check_wrapped_network's marker for wrappers that take no process


def check_wrapped_network(net, sigma_data: float, process=_NO_PROCESS) -> None:
    """The fields of a network wrapper (EDM preconditioning, consistency functions): a callable `net`,
    sigma_data > 0 and, for wrappers that take one, a diffjax process."""
    if not callable(net):
        raise TypeError(f"net must be callable, got {type(net).__name__}")
    if process is not _NO_PROCESS and not isinstance(process, GaussianProcess):
        raise TypeError(f"process must be a diffjax process, got {type(process).__name__}")
    check_positive("sigma_data", sigma_data)


def check_declared_prediction(fn: Callable, prediction: Prediction) -> None:
    """ValueError if `fn` declares (by a `prediction` attribute) another prediction than `prediction`:
    e.g. a raw EDM network given as an x0-predictor, or an `EDMPreconditioning` preconditioned again."""
    declared = getattr(fn, "prediction", None)
    if not (isinstance(declared, EDMPreconditioned) or (isinstance(declared, str) and declared in PREDICTIONS)):
        return
    if declared != prediction:
        hint = " (it is already preconditioned: pass prediction='x0')" if isinstance(fn, EDMPreconditioning) else ""
        raise ValueError(f"the network declares prediction {declared!r} but was given prediction {prediction!r}{hint}")


def check_network(fn: Callable, process: GaussianProcess, prediction: Prediction, name: str = "fn") -> None:
    """A callable network `name`, a diffjax process and a prediction; refuses a network whose declared
    prediction differs from `prediction`, and an `EDMPreconditioning` built for another process."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    if not isinstance(process, GaussianProcess):
        raise TypeError(f"process must be a diffjax process, got {type(process).__name__}")
    if not isinstance(prediction, EDMPreconditioned):
        check_prediction(prediction)
    check_declared_prediction(fn, prediction)
    if isinstance(fn, EDMPreconditioning) and fn.process != process:
        raise ValueError(f"the EDMPreconditioning was built for {fn.process!r}, not for {process!r}")


def network_view(fn: Callable, process: GaussianProcess, prediction: Prediction) -> tuple[Callable, str]:
    """(network, view): `fn` as a network that outputs the view `view`, wrapping a raw EDM network
    in its preconditioning; checked by `check_network`."""
    check_network(fn, process, prediction)
    if isinstance(prediction, EDMPreconditioned):
        return prediction.wrap(fn, process), "x0"
    return fn, prediction


@jax.tree_util.register_pytree_node_class
class Denoiser:
    """A network with its process and prediction type; every view from one evaluation.

    Args:
      fn: the network, `fn(x, t) -> array` with t of shape (batch,); conditioning (labels,
        parameters) is closed over.
      process: the forward process the network was trained with.
      prediction: what `fn` predicts: one of "eps", "x0", "v", "score", "velocity", or
        `EDMPreconditioned(sigma_data)` for a raw EDM network F (which then sees (c_in x, c_noise)).

    `fn` and `prediction` are afterwards the network of the view and the view: for a raw EDM
    network, `EDMPreconditioning(F, process, sigma_data)` and "x0".
    """

    # the attributes a pytree carries as static aux data (its one child is the process)
    _static_attributes: ClassVar[tuple[str, ...]] = ("fn", "prediction")

    def __init__(self, fn: Callable, process: GaussianProcess, prediction: Prediction = "eps"):
        self.fn, self.prediction = network_view(fn, process, prediction)
        self.process = process

    def tree_flatten(self):
        return (self.process,), tuple(getattr(self, name) for name in self._static_attributes)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for name, value in zip(cls._static_attributes, aux, strict=True):
            setattr(obj, name, value)
        (obj.process,) = children
        return obj

    def __repr__(self):
        kind = (
            f"EDMPreconditioned(sigma_data={self.fn.sigma_data})"
            if isinstance(self.fn, EDMPreconditioning)
            else (repr(self.prediction))
        )
        return f"Denoiser(prediction={kind}, process={self.process!r})"

    def coefficients(self, t, x) -> PathCoefficients:
        return PathCoefficients.at(self.process, _time_for_batch(t, x), x)

    def predict(self, x, t):
        """(x0, eps) at (x, t): one network evaluation."""
        t = _time_for_batch(t, x)
        output = self.fn(x, t)
        if output.shape != x.shape:
            raise ValueError(f"network output shape {output.shape} differs from input shape {x.shape}")
        return to_x0_eps(output, self.prediction, x, PathCoefficients.at(self.process, t, x))

    def view(self, prediction: str, x, t):
        """Any view ("eps", "x0", "v", "score", "velocity") of the network at (x, t)."""
        check_prediction(prediction)
        x0, eps = self.predict(x, t)
        return from_x0_eps(x0, eps, prediction, self.coefficients(t, x))

    def x0(self, x, t):
        return self.view("x0", x, t)

    def eps(self, x, t):
        return self.view("eps", x, t)

    def score(self, x, t):
        return self.view("score", x, t)

    def v(self, x, t):
        return self.view("v", x, t)

    def velocity(self, x, t):
        """The probability-flow ODE velocity dx/dt (= f x - g^2/2 score)."""
        return self.view("velocity", x, t)

    def with_fn(self, fn: Callable, prediction: str | None = None) -> Denoiser:
        """The same process with another network (used by guidance combinators)."""
        return Denoiser(fn, self.process, self.prediction if prediction is None else prediction)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as static pytree data
class EDMPreconditioning:
    """Karras et al. 2022 (EDM), Table 1, generalised to any Gaussian path by scaling.

    With x~ = x / alpha and s = sigma / alpha (the EDM noise level of the scaled path):
      c_in = 1/sqrt(s^2 + sd^2),  c_skip = sd^2/(s^2 + sd^2),  c_out = s sd/sqrt(s^2 + sd^2),
      c_noise = log(s)/4,        D(x, t) = c_skip x~ + c_out F(c_in x~, c_noise).
    Calling it returns the x0-prediction D (it declares prediction "x0"); usually it is built by
    `Denoiser(F, process, EDMPreconditioned(sd))` rather than by hand.
    """

    net: Callable
    process: GaussianProcess
    sigma_data: float = 0.5
    prediction: ClassVar[str] = "x0"

    def __post_init__(self):
        check_wrapped_network(self.net, self.sigma_data, self.process)

    def coefficients(self, t):
        """(c_in, c_skip, c_out, c_noise) at t, each of t's shape."""
        alpha, sigma = self.process.alpha(t), self.process.sigma(t)
        s = sigma / alpha
        sd2 = self.sigma_data**2
        norm = jnp.sqrt(s**2 + sd2)
        return 1.0 / norm, sd2 / (s**2 + sd2), s * self.sigma_data / norm, jnp.log(s) / 4.0

    def __call__(self, x, t):
        t = _time_for_batch(t, x)
        c_in, c_skip, c_out, c_noise = self.coefficients(t)
        x_scaled = x / broadcast_to_data(self.process.alpha(t), x)
        raw = self.net(broadcast_to_data(c_in, x) * x_scaled, c_noise)
        if raw.shape != x.shape:  # c_skip x + c_out raw would broadcast
            raise ValueError(
                f"the raw network maps x of shape {x.shape} to shape {raw.shape}; it must return x's shape"
            )
        return broadcast_to_data(c_skip, x) * x_scaled + broadcast_to_data(c_out, x) * raw


# ------------------------------------------------------------------------------------------------
# Guidance combinators
# ------------------------------------------------------------------------------------------------


def _check_guidance_options(name: str, scale, interval, rescale) -> None:
    if not is_finite_real(scale):
        raise ValueError(f"{name}: scale must be a finite number, got {scale!r}")
    if interval is not None:
        ok = (
            isinstance(interval, (tuple, list))
            and len(interval) == 2
            and all(isinstance(v, (int, float)) for v in interval)
            and 0 <= interval[0] < interval[1]
        )
        if not ok:
            raise ValueError(
                f"{name}: interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi "
                f"(EDM noise levels sigma/alpha; use float('inf') for no upper bound), got {interval!r}"
            )
    if not (isinstance(rescale, (int, float)) and 0.0 <= rescale <= 1.0):
        raise ValueError(f"{name}: rescale must lie in [0, 1], got {rescale!r}")


def guided(
    positive: Denoiser,
    negative: Denoiser,
    scale: float,
    *,
    interval: tuple[float, float] | None = None,
    rescale: float = 0.0,
    name: str = "guidance",
) -> Denoiser:
    """The guided denoiser D = D_neg + scale (D_pos - D_neg), combined in the x0 view (every view is
    affine in x0 at fixed (x, t), so this is the same guidance in eps, v, score or velocity).

    - `interval` = (sigma_lo, sigma_hi): guide only where the EDM noise level s = sigma/alpha lies in
      (sigma_lo, sigma_hi]; elsewhere D = D_pos (Kynkaanniemi et al. 2024, "Applying Guidance in a
      Limited Interval Improves Sample and Distribution Quality").
    - `rescale` = phi: x0 <- phi * x0 * std(x0_pos)/std(x0) + (1 - phi) * x0, stds per example over
      all non-batch axes (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
      Flawed", Sec. 3.4, applied to the x0 prediction).

    One evaluation of the guided denoiser costs one call of each network (2 network calls); samplers
    count it as one NFE.
    """
    _check_guidance_options(name, scale, interval, rescale)
    for label, d in (("positive", positive), ("negative", negative)):
        if not isinstance(d, Denoiser):
            raise TypeError(f"{name}: the {label} model must be a diffjax.Denoiser, got {type(d).__name__}")
    if positive.process != negative.process:
        raise ValueError(
            f"{name}: the two denoisers use different processes: {positive.process!r} vs {negative.process!r}"
        )
    process = positive.process
    scale, rescale = float(scale), float(rescale)

    def fn(x, t):
        x0_pos, _ = positive.predict(x, t)
        x0_neg, _ = negative.predict(x, t)
        x0 = x0_neg + scale * (x0_pos - x0_neg)
        if rescale > 0:
            ratio = per_example(jnp.std, x0_pos, keepdims=True) / jnp.maximum(
                per_example(jnp.std, x0, keepdims=True), 1e-12
            )
            x0 = rescale * x0 * ratio + (1.0 - rescale) * x0
        if interval is not None:
            level = broadcast_to_data(process.sigma(t) / process.alpha(t), x)
            inside = (level > interval[0]) & (level <= interval[1])
            x0 = jnp.where(inside, x0, x0_pos)
        return x0

    return Denoiser(fn, process, "x0")


def classifier_free_guidance(
    conditional: Denoiser,
    unconditional: Denoiser | None,
    scale: float,
    *,
    interval: tuple[float, float] | None = None,
    rescale: float = 0.0,
) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_uncond + scale (D_cond - D_uncond).
    scale = 1 is the conditional model; scale = 0 the unconditional one. `interval` and `rescale`
    as in `guided`. Raises ValueError for a guidance scale without an unconditional model (None, or
    the conditional denoiser itself)."""
    _check_guidance_options("classifier_free_guidance", scale, interval, rescale)
    if unconditional is None or unconditional is conditional:
        if scale == 1.0:
            return conditional
        what = (
            "no unconditional model was given"
            if unconditional is None
            else ("the unconditional model is the conditional one")
        )
        raise ValueError(
            f"classifier_free_guidance: guidance scale {scale!r} needs a conditional and a separate "
            f"unconditional denoiser, but {what}; pass the model with its condition dropped as "
            "`unconditional`, or use scale=1.0 (no guidance)"
        )
    return guided(
        conditional, unconditional, scale, interval=interval, rescale=rescale, name="classifier_free_guidance"
    )


def autoguidance(
    model: Denoiser,
    weak_model: Denoiser,
    scale: float,
    *,
    interval: tuple[float, float] | None = None,
) -> Denoiser:
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"):
    D = D_weak + scale (D_model - D_weak), the weak model being a smaller or less-trained version of
    the same (conditional or unconditional) model."""
    if weak_model is model and scale != 1.0:
        raise ValueError(f"autoguidance: guidance scale {scale!r} needs a separate weaker model; got the model itself")
    return guided(model, weak_model, scale, interval=interval, name="autoguidance")


# ------------------------------------------------------------------------------------------------
# Learned variances (improved DDPM, Nichol & Dhariwal 2021)
# ------------------------------------------------------------------------------------------------


def gaussian_posterior(process: GaussianProcess, x_t, x0, t, s):
    """q(x_s | x_t, x0) for s < t on any Gaussian path: (mean, log_var_min, log_var_max), where
    log_var_min is the posterior's own log-variance sigma_s^2 (1 - e^{lambda_t - lambda_s}) and
    log_var_max that of the forward step, sigma_{t|s}^2 = sigma_t^2 (1 - e^{lambda_t - lambda_s})
    (DDPM's beta_t); mean = (alpha_{t|s} sigma_s^2 x_t + alpha_s sigma_{t|s}^2 x0) / sigma_t^2.
    t and s are of shape (batch,); the variances have that shape too."""
    lam_t, lam_s = process.log_snr(t), process.log_snr(s)
    log_gap = jnp.log(-jnp.expm1(lam_t - lam_s))  # log(1 - e^{lambda_t - lambda_s})
    log_sigma_t, log_sigma_s = jnp.log(process.sigma(t)), jnp.log(process.sigma(s))
    alpha_t, alpha_s = process.alpha(t), process.alpha(s)
    keep = jnp.exp(lam_t - lam_s)  # alpha_{t|s}^2 sigma_s^2 / sigma_t^2
    b = lambda c: broadcast_to_data(c, x_t)  # noqa: E731
    mean = b(keep * alpha_s / alpha_t) * x_t + b(alpha_s * (1.0 - keep)) * x0
    return mean, 2.0 * log_sigma_s + log_gap, 2.0 * log_sigma_t + log_gap


def interpolated_log_variance(v, log_var_min, log_var_max):
    """Improved DDPM's learned variance: log var = f log_var_max + (1 - f) log_var_min with
    f = (v + 1) / 2, v the network's variance output (v = -1: the posterior's, v = 1: beta_t)."""
    frac = (v + 1.0) / 2.0
    return frac * broadcast_to_data(log_var_max, v) + (1.0 - frac) * broadcast_to_data(log_var_min, v)


def split_learned_variance(output):
    """(prediction, v) from a network output with 2C channels on the last axis (DiT, ADM order)."""
    c = output.shape[-1]
    if c % 2:
        raise ValueError(f"a learned-variance network returns 2C channels; got {c} channels")
    return output[..., : c // 2], output[..., c // 2 :]


@jax.tree_util.register_pytree_node_class
class LearnedVarianceDenoiser(Denoiser):
    """A Denoiser for a network `fn(x, t)` with 2C output channels: the prediction (of type
    `prediction`), then improved DDPM's variance interpolation v. Every view uses the prediction;
    `predict_with_variance` also returns v (for `LearnedVarianceAncestral` and the VLB loss)."""

    _static_attributes: ClassVar[tuple[str, ...]] = ("fn", "prediction", "full_fn")

    def __init__(self, fn: Callable, process: GaussianProcess, prediction: Prediction = "eps"):
        if isinstance(prediction, EDMPreconditioned):
            raise ValueError("a learned-variance network takes a view prediction, not EDMPreconditioned")
        super().__init__(lambda x, t: split_learned_variance(fn(x, t))[0], process, prediction)
        self.full_fn = fn

    def predict_with_variance(self, x, t):
        """(x0, eps, v) at (x, t): one network evaluation."""
        t = _time_for_batch(t, x)
        out, v = split_learned_variance(self.full_fn(x, t))
        if out.shape != x.shape:
            raise ValueError(f"network output shape {out.shape} (first half) differs from input shape {x.shape}")
        x0, eps = to_x0_eps(out, self.prediction, x, PathCoefficients.at(self.process, t, x))
        return x0, eps, v
