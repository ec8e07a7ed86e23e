"""Discrete-state forward processes over tokens in {0, ..., vocab_size - 1}.

Every process here is given by two stochastic matrices at times 0 <= s < t <= 1:

    marginal_matrix(t)        Qbar_t[i, j] = q(x_t = j | x_0 = i)     (vocab_size, num_states)
    transition_matrix(s, t)   Q_{s,t}[j, k] = q(x_t = k | x_s = j)    (num_states, num_states)

with Qbar_t = Qbar_s Q_{s,t}. Everything else follows with no per-process code: the posterior
q(x_s | x_t, x_0) = Q_{s,t}[x_s, x_t] Qbar_s[x_0, x_s] / Qbar_t[x_0, x_t] (Bayes' rule), the prior at
t = 1, and (for the continuous-time processes) the forward rate matrix R_t = d/dt Q_{s,t} at s = t.

- `MaskedProcess` (absorbing; Austin et al. 2021, Shi et al. 2024 "MD4", Sahoo et al. 2024): a token
  stays itself with probability alpha_t and becomes the mask token (id vocab_size) otherwise. The
  masking schedule alpha(t) decreases from alpha(0) = 1 to alpha(1) = 0; it may depend on the token
  (MD4's state-dependent schedule `LearnedPolynomial`).
- `UniformProcess`: Qbar_t = alpha_t I + (1 - alpha_t) / V (Austin et al. 2021; Lou et al. 2024).
- `D3PM`: Austin et al. 2021's discrete-time chains of T steps, Q_1 ... Q_T, with transitions
  "uniform", "absorbing", "gaussian" (discretised Gaussian) or "band" (nearest neighbour on the
  token line, Q_t = expm(beta_t R) with R the band graph's rate matrix). Time t in [0, 1] is step
  round(t T); Qbar_t is the cumulative product Q_1 ... Q_t.

Processes are immutable pytrees: static hyper-parameters, arrays (the D3PM matrices, learnable
schedule exponents) as leaves. The name tables are for the config boundary (`build_named`).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.validation import build_named, check_choice, check_count, check_positive

__all__ = [
    "LinearSchedule",
    "CosineSchedule",
    "PolynomialSchedule",
    "LearnedPolynomial",
    "MASKING_SCHEDULES",
    "DiscreteProcess",
    "MaskedProcess",
    "UniformProcess",
    "D3PM",
    "D3PM_TRANSITIONS",
    "DISCRETE_PROCESSES",
    "build_discrete_process",
    "check_tokens",
]


def _static(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=[], meta_fields=[f.name for f in dataclasses.fields(cls)])


def check_tokens(name: str, x, num_states: int) -> None:
    """TypeError unless x is an integer array; ValueError naming the bad values unless (when x is
    concrete) every entry is in [0, num_states). Runs before tracing; traced values are only type-checked."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array of token ids, got {dtype or type(x).__name__}")
    if isinstance(x, jax.core.Tracer):
        return
    x = np.asarray(x)
    bad = (x < 0) | (x >= num_states)
    if bad.any():
        raise ValueError(
            f"{name} has token ids outside [0, {num_states}): e.g. {int(x[bad].flat[0])} "
            f"({int(bad.sum())} of {x.size} entries)"
        )


# ------------------------------------------------------------------------------------------------
# masking schedules alpha(t): the probability that a token is still itself at time t
# ------------------------------------------------------------------------------------------------


@_static
class LinearSchedule:
    """alpha(t) = 1 - t."""

    def alpha(self, t, vocab_size: int):
        return jnp.broadcast_to((1.0 - t)[..., None], t.shape + (vocab_size,))


@_static
class CosineSchedule:
    """alpha(t) = 1 - cos(pi/2 (1 - t)) (MD4's cosine schedule)."""

    def alpha(self, t, vocab_size: int):
        a = 1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))
        return jnp.broadcast_to(a[..., None], t.shape + (vocab_size,))


@_static
class PolynomialSchedule:
    """alpha(t) = 1 - t^exponent (MD4's polynomial schedule)."""

    exponent: float = 1.0

    def __post_init__(self):
        check_positive("PolynomialSchedule exponent", self.exponent)

    def alpha(self, t, vocab_size: int):
        return jnp.broadcast_to((1.0 - t**self.exponent)[..., None], t.shape + (vocab_size,))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LearnedPolynomial:
    """MD4's state-dependent schedule: alpha_v(t) = 1 - t^{w_v}, w_v = exp(log_exponent[v]) per token.

    `log_exponent` (vocab_size,) is a leaf: put the process in the params pytree to learn it. Only
    the pathwise part of its gradient is taken (MD4's REINFORCE term for the sampling of x_t is not)."""

    log_exponent: jax.Array

    @classmethod
    def constant(cls, vocab_size: int, exponent: float = 1.0) -> LearnedPolynomial:
        check_count("vocab_size", vocab_size)
        check_positive("LearnedPolynomial exponent", exponent)
        return cls(jnp.full((vocab_size,), math.log(exponent), jnp.float32))

    def alpha(self, t, vocab_size: int):
        if self.log_exponent.shape != (vocab_size,):
            raise ValueError(
                f"LearnedPolynomial has {self.log_exponent.shape} exponents; the process has vocab_size {vocab_size}"
            )
        t = jnp.maximum(t, 0.0)[..., None]
        return 1.0 - jnp.where(t > 0, jnp.exp(jnp.exp(self.log_exponent) * jnp.log(jnp.maximum(t, 1e-30))), 0.0)


# Config names; "learned_polynomial" is built by the process (it needs the vocabulary size).
MASKING_SCHEDULES = {"linear": LinearSchedule, "cosine": CosineSchedule, "polynomial": PolynomialSchedule}


def _alpha_and_slope(schedule, t, vocab_size):
    """alpha(t) and d alpha / dt, each t.shape + (vocab_size,)."""
    t = jnp.asarray(t, jnp.float32)
    return jax.jvp(lambda u: schedule.alpha(u, vocab_size), (t,), (jnp.ones_like(t),))


# ------------------------------------------------------------------------------------------------
# the processes
# ------------------------------------------------------------------------------------------------


class DiscreteProcess(abc.ABC):
    """Base class. Subclasses define `vocab_size`, `marginal_matrix`, `transition_matrix` and
    `prior_probs`; continuous-time ones also `rate_matrix`."""

    vocab_size: int
    continuous_time: ClassVar[bool] = True
    name: ClassVar[str] = "discrete"

    @property
    def num_states(self) -> int:
        return self.vocab_size

    @property
    def mask_id(self) -> int | None:
        return None

    @abc.abstractmethod
    def marginal_matrix(self, t):
        """q(x_t = j | x_0 = i) for the clean tokens i: t.shape + (vocab_size, num_states)."""

    @abc.abstractmethod
    def transition_matrix(self, s, t):
        """q(x_t = j | x_s = i) for s <= t: t.shape + (num_states, num_states)."""

    def rate_matrix(self, t):
        raise NotImplementedError(f"{type(self).__name__} is a discrete-time process: it has no rate matrix")

    @abc.abstractmethod
    def prior_probs(self):
        """The distribution of x_1 that sampling starts from, (num_states,)."""

    # -- derived -------------------------------------------------------------------------------
    def marginal_probs(self, x0, t):
        """q(x_t | x_0) for tokens x0 of shape (batch, ...) and t of shape () or (batch,):
        x0.shape + (num_states,)."""
        q = self.marginal_matrix(_per_example(t, x0))  # (batch, V, S)
        return jnp.take_along_axis(q[:, None], x0.reshape(x0.shape[0], -1)[..., None, None], axis=2)[:, :, 0].reshape(
            x0.shape + (self.num_states,)
        )

    def marginal_sample(self, key, x0, t):
        """x_t ~ q(x_t | x_0), t broadcasting over the leading axis."""
        return jax.random.categorical(key, jnp.log(self.marginal_probs(x0, t)))

    def prior_sample(self, key, shape):
        return jax.random.categorical(key, jnp.log(self.prior_probs()), shape=shape)

    def posterior_probs(self, x_t, x0_probs, s, t):
        """sum_{x0} mu(x0) q(x_s | x_t, x0) for a distribution mu = x0_probs (x_t.shape + (vocab_size,))
        over x_0 at every position: x_t.shape + (num_states,). With mu a point mass it is the posterior
        q(x_s | x_t, x0) of Bayes' rule. Values of x0 with q(x_t | x0) = 0 must have mu = 0."""
        batch = x_t.shape[0]
        qbar_t = self.marginal_matrix(_per_example(t, x_t))  # (batch, V, S)
        qbar_s = self.marginal_matrix(_per_example(s, x_t))
        q_st = self.transition_matrix(_per_example(s, x_t), _per_example(t, x_t))  # (batch, S, S)
        flat = x_t.reshape(batch, -1)  # (batch, n)
        like = jnp.take_along_axis(qbar_t, flat[:, None, :], axis=2).transpose(0, 2, 1)  # (batch, n, V)
        mu = x0_probs.reshape(batch, flat.shape[1], -1)
        w = jnp.where(like > 0, mu / jnp.where(like > 0, like, 1.0), 0.0)
        into = jnp.take_along_axis(q_st, flat[:, None, :], axis=2).transpose(0, 2, 1)  # (batch, n, S)
        out = jnp.einsum("bnv,bvs->bns", w, qbar_s) * into
        return out.reshape(x_t.shape + (self.num_states,))

    def reverse_rates(self, x_t, x0_probs, t):
        """The reverse-time rates R^_t(x_t -> j) = R_t[j, x_t] sum_{x0} mu(x0) Qbar_t[x0, j] / Qbar_t[x0, x_t]
        (Campbell et al. 2022) for j != x_t, 0 at j = x_t: x_t.shape + (num_states,)."""
        batch = x_t.shape[0]
        tb = _per_example(t, x_t)
        qbar_t = self.marginal_matrix(tb)
        rate = self.rate_matrix(tb)  # (batch, S, S)
        flat = x_t.reshape(batch, -1)
        like = jnp.take_along_axis(qbar_t, flat[:, None, :], axis=2).transpose(0, 2, 1)
        mu = x0_probs.reshape(batch, flat.shape[1], -1)
        w = jnp.where(like > 0, mu / jnp.where(like > 0, like, 1.0), 0.0)
        ratio = jnp.einsum("bnv,bvs->bns", w, qbar_t)
        into = jnp.take_along_axis(rate, flat[:, None, :], axis=2).transpose(0, 2, 1)
        out = ratio * into * (1.0 - jax.nn.one_hot(flat, self.num_states))
        return jnp.maximum(out, 0.0).reshape(x_t.shape + (self.num_states,))

    def check_data(self, x0, name: str = "x0") -> None:
        """Clean data: integer ids in [0, vocab_size)."""
        check_tokens(name, x0, self.vocab_size)

    def check_state(self, x_t, name: str = "x_t") -> None:
        """Noisy states: integer ids in [0, num_states)."""
        check_tokens(name, x_t, self.num_states)


def _per_example(t, x):
    t = jnp.asarray(t, jnp.float32)
    return jnp.broadcast_to(t, (x.shape[0],)) if t.ndim == 0 else t


def _check_vocab(cls_name: str, vocab_size) -> None:
    check_count(f"{cls_name} vocab_size", vocab_size, minimum=2)


def _check_schedule(schedule) -> None:
    if not callable(getattr(schedule, "alpha", None)):
        raise TypeError(
            f"schedule must be a masking schedule (LinearSchedule(), CosineSchedule(), PolynomialSchedule(w), "
            f"LearnedPolynomial), got {schedule!r:.100}"
        )


@dataclasses.dataclass(frozen=True)
class _ScheduledProcess(DiscreteProcess):
    """What the masked and the uniform process share: `vocab_size` tokens and a masking schedule
    alpha_t (the probability that a token is still clean at time t)."""

    vocab_size: int = dataclasses.field(metadata=dict(static=True))
    schedule: object = dataclasses.field(default_factory=LinearSchedule)

    def __post_init__(self):
        _check_vocab(type(self).__name__, self.vocab_size)
        _check_schedule(self.schedule)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskedProcess(_ScheduledProcess):
    """Masked (absorbing) diffusion: q(x_t = x_0) = alpha_t(x_0), q(x_t = mask) = 1 - alpha_t(x_0).

    States 0 .. vocab_size - 1 are tokens, state vocab_size is the mask. `mask_id`, if given, must
    be vocab_size (a mask id inside the vocabulary would make a token unrecoverable)."""

    name: ClassVar[str] = "masked"

    @classmethod
    def create(cls, vocab_size: int, schedule=None, mask_id: int | None = None) -> MaskedProcess:
        _check_vocab("MaskedProcess", vocab_size)
        if mask_id is not None and mask_id != vocab_size:
            where = "inside the vocabulary" if 0 <= mask_id < vocab_size else "not the state after the vocabulary"
            raise ValueError(f"mask_id {mask_id!r} is {where}; the mask is state vocab_size = {vocab_size}")
        return cls(vocab_size, LinearSchedule() if schedule is None else schedule)

    @property
    def num_states(self) -> int:
        return self.vocab_size + 1

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def state_dependent(self) -> bool:
        return isinstance(self.schedule, LearnedPolynomial)

    def alpha(self, t):
        """alpha_t per token value: t.shape + (vocab_size,)."""
        return self.schedule.alpha(jnp.asarray(t, jnp.float32), self.vocab_size)

    def unmasking_rate(self, t):
        """beta_t(v) = -alpha'_t(v) / (1 - alpha_t(v)), the rate at which a masked position whose clean
        token is v becomes unmasked in reverse time: t.shape + (vocab_size,)."""
        a, da = _alpha_and_slope(self.schedule, t, self.vocab_size)
        return -da / jnp.maximum(1.0 - a, 1e-12)

    def marginal_matrix(self, t):
        a = self.alpha(t)  # (..., V)
        eye = jnp.eye(self.vocab_size, self.num_states)
        return a[..., :, None] * eye + (1.0 - a)[..., :, None] * jax.nn.one_hot(self.mask_id, self.num_states)

    def transition_matrix(self, s, t):
        a_s, a_t = self.alpha(s), self.alpha(t)
        keep = jnp.where(a_s > 0, a_t / jnp.where(a_s > 0, a_s, 1.0), 0.0)  # (..., V)
        keep = jnp.concatenate([keep, jnp.zeros(keep.shape[:-1] + (1,))], axis=-1)  # (..., S)
        eye = jnp.eye(self.num_states)
        to_mask = jax.nn.one_hot(self.mask_id, self.num_states)
        return keep[..., :, None] * eye + (1.0 - keep)[..., :, None] * to_mask

    def rate_matrix(self, t):
        a, da = _alpha_and_slope(self.schedule, t, self.vocab_size)
        out = jnp.where(a > 0, -da / jnp.where(a > 0, a, 1.0), 0.0)  # rate of j -> mask
        out = jnp.concatenate([out, jnp.zeros(out.shape[:-1] + (1,))], axis=-1)
        to_mask = jax.nn.one_hot(self.mask_id, self.num_states)
        return out[..., :, None] * (to_mask - jnp.eye(self.num_states))

    def prior_probs(self):
        return jax.nn.one_hot(self.mask_id, self.num_states)

    def reverse_rates(self, x_t, x0_probs, t):
        """Closed form of the base class's rates: R^(mask -> v) = mu(v) beta_t(v) at masked positions
        (finite at t = 1, where the generic ratio form is 0 * inf), 0 elsewhere."""
        beta = self.unmasking_rate(_per_example(t, x_t))  # (batch, V)
        beta = beta.reshape((x_t.shape[0],) + (1,) * (x_t.ndim - 1) + (self.vocab_size,))
        out = jnp.where((x_t == self.mask_id)[..., None], x0_probs * beta, 0.0)
        return jnp.concatenate([out, jnp.zeros(out.shape[:-1] + (1,))], axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UniformProcess(_ScheduledProcess):
    """Uniform diffusion: Qbar_t = alpha_t I + (1 - alpha_t) 1 1^T / V, a state-independent schedule."""

    name: ClassVar[str] = "uniform"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.schedule, LearnedPolynomial):
            raise ValueError("UniformProcess needs a state-independent schedule, got LearnedPolynomial")

    def _mix(self, keep):
        v = self.vocab_size
        return keep[..., None, None] * jnp.eye(v) + (1.0 - keep)[..., None, None] / v

    def alpha(self, t):
        return self.schedule.alpha(jnp.asarray(t, jnp.float32), 1)[..., 0]

    def marginal_matrix(self, t):
        return self._mix(self.alpha(t))

    def transition_matrix(self, s, t):
        a_s, a_t = self.alpha(s), self.alpha(t)
        return self._mix(jnp.where(a_s > 0, a_t / jnp.where(a_s > 0, a_s, 1.0), 0.0))

    def rate_matrix(self, t):
        a, da = _alpha_and_slope(self.schedule, t, 1)
        beta = jnp.where(a[..., 0] > 0, -da[..., 0] / jnp.where(a[..., 0] > 0, a[..., 0], 1.0), 0.0)
        v = self.vocab_size
        return beta[..., None, None] * (jnp.ones((v, v)) / v - jnp.eye(v))

    def prior_probs(self):
        return jnp.full((self.vocab_size,), 1.0 / self.vocab_size)


# ------------------------------------------------------------------------------------------------
# D3PM: discrete-time structured transitions (Austin et al. 2021, appendix A)
# ------------------------------------------------------------------------------------------------

D3PM_TRANSITIONS = ("uniform", "absorbing", "gaussian", "band")


def _default_betas(transition: str, num_steps: int) -> np.ndarray:
    """Austin et al.'s choices: the cosine schedule's betas for uniform, 1/(T - t + 1) for absorbing
    (so that Qbar_T is all mask), linear 0.02 .. 1 for the discretised Gaussian and the band."""
    steps = np.arange(1, num_steps + 1, dtype=np.float64)
    if transition == "uniform":
        f = lambda u: np.cos((u / num_steps + 0.008) / 1.008 * np.pi / 2)  # noqa: E731
        return np.clip(1.0 - f(steps) / f(steps - 1), 0.0, 0.999)
    if transition == "absorbing":
        return 1.0 / (num_steps - steps + 1.0)
    return np.linspace(0.02, 1.0, num_steps)


def _step_matrix(transition: str, beta: float, vocab_size: int, band: int) -> np.ndarray:
    k = vocab_size
    if transition == "uniform":
        return (1.0 - beta) * np.eye(k) + beta / k
    if transition == "absorbing":
        q = (1.0 - beta) * np.eye(k + 1)
        q[:, k] += beta
        q[k, k] = 1.0
        return q
    if transition == "gaussian":
        n = np.arange(-(k - 1), k, dtype=np.float64)
        norm = np.exp(-4.0 * n**2 / ((k - 1) ** 2 * beta)).sum()
        d = np.arange(k)[:, None] - np.arange(k)[None, :]
        q = np.exp(-4.0 * d**2 / ((k - 1) ** 2 * beta)) / norm
        np.fill_diagonal(q, 0.0)
        np.fill_diagonal(q, 1.0 - q.sum(1))
        return q
    # band: expm(beta R), R[i, j] = 1 for 0 < |i - j| <= band, rows summing to 0
    d = np.abs(np.arange(k)[:, None] - np.arange(k)[None, :])
    rate = ((d > 0) & (d <= band)).astype(np.float64)
    rate -= np.diag(rate.sum(1))
    w, v = np.linalg.eigh(rate)
    return (v * np.exp(beta * w)) @ v.T


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class D3PM(DiscreteProcess):
    """A discrete-time chain of `num_steps` transition matrices Q_1..Q_T and their cumulative
    products Qbar_0 = I, Qbar_t = Qbar_{t-1} Q_t, both stored as leaves. Build with `D3PM.create`.
    Time t in [0, 1] means step round(t T). The prior is uniform (mask for "absorbing")."""

    step_matrices: jax.Array  # (T, S, S)
    cumulative: jax.Array  # (T + 1, S, S)
    vocab_size: int = dataclasses.field(metadata=dict(static=True))
    transition: str = dataclasses.field(metadata=dict(static=True))
    continuous_time: ClassVar[bool] = False
    name: ClassVar[str] = "d3pm"

    @classmethod
    def create(cls, vocab_size: int, transition: str = "uniform", num_steps: int = 1000, betas=None, band: int = 1):
        """betas: (num_steps,) in (0, 1] (default: `_default_betas`); band: neighbours per side ("band")."""
        _check_vocab("D3PM", vocab_size)
        check_choice("D3PM transition", transition, D3PM_TRANSITIONS)
        check_count("D3PM num_steps", num_steps)
        check_count("D3PM band", band)
        betas = _default_betas(transition, num_steps) if betas is None else np.asarray(betas, np.float64)
        if betas.shape != (num_steps,) or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError(f"D3PM betas must be num_steps = {num_steps} values in (0, 1], got {betas!r:.200}")
        steps = np.stack([_step_matrix(transition, float(b), vocab_size, band) for b in betas])
        cumulative = [np.eye(steps.shape[1])]
        for q in steps:
            cumulative.append(cumulative[-1] @ q)
        return cls(
            jnp.asarray(steps, jnp.float32), jnp.asarray(np.stack(cumulative), jnp.float32), vocab_size, transition
        )

    @property
    def num_steps(self) -> int:
        return self.step_matrices.shape[0]

    @property
    def num_states(self) -> int:
        return self.vocab_size + (1 if self.transition == "absorbing" else 0)

    @property
    def mask_id(self) -> int | None:
        return self.vocab_size if self.transition == "absorbing" else None

    def step_index(self, t):
        return jnp.clip(jnp.round(jnp.asarray(t, jnp.float32) * self.num_steps), 0, self.num_steps).astype(jnp.int32)

    def marginal_matrix(self, t):
        return self.cumulative[self.step_index(t)][..., : self.vocab_size, :]

    def transition_matrix(self, s, t):
        """Q_{s+1} ... Q_t (the identity where s = t)."""
        i, j = self.step_index(s), self.step_index(t)

        def product(i, j):
            eye = jnp.eye(self.num_states, dtype=self.step_matrices.dtype)
            return jax.lax.fori_loop(i, j, lambda n, m: m @ self.step_matrices[n], eye)

        if i.ndim == 0:
            return product(i, j)
        return jax.vmap(product)(i.reshape(-1), j.reshape(-1)).reshape(i.shape + (self.num_states,) * 2)

    def prior_probs(self):
        if self.transition == "absorbing":
            return jax.nn.one_hot(self.vocab_size, self.num_states)
        return jnp.full((self.num_states,), 1.0 / self.num_states)


DISCRETE_PROCESSES = {"masked": MaskedProcess, "uniform": UniformProcess, "d3pm": D3PM}


def build_discrete_process(name: str, vocab_size: int, options: dict | None = None) -> DiscreteProcess:
    """The config boundary: "masked" / "uniform" with options {"schedule": name, "exponent": w} (schedule
    names: MASKING_SCHEDULES and "learned_polynomial"), or "d3pm" with options of `D3PM.create`."""
    check_choice("discrete process", name, DISCRETE_PROCESSES)
    options = dict(options or {})
    if name == "d3pm":
        allowed = {"transition", "num_steps", "band"}
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for discrete process 'd3pm'; allowed: {sorted(allowed)}"
            )
        return D3PM.create(vocab_size, **options)
    schedule_name = options.pop("schedule", "linear")
    if schedule_name == "learned_polynomial":
        schedule = LearnedPolynomial.constant(vocab_size, **options)
    else:
        schedule = build_named(MASKING_SCHEDULES, schedule_name, options, "masking schedule")
    if name == "masked":
        return MaskedProcess.create(vocab_size, schedule)
    return UniformProcess(vocab_size, schedule)
