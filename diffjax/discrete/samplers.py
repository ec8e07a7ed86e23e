"""Discrete-state samplers; `sample_tokens` runs the whole loop as one compiled program.

Time runs from t = 1 (the prior: all mask, or uniform) to t = 0 on the uniform grid
t_i = 1 - i / steps. Samplers (config name: class):

    ancestral     DiscreteAncestral()      x_s ~ p(x_s | x_t) = sum mu(x0) q(x_s | x_t, x0) at every
                                           position (Austin et al. 2021; Shi et al. 2024); any process.
    tau_leaping   TauLeaping()             x_s ~ delta(x_t) + (t - s) R^(x_t -> .) with the reverse
                                           rates at the interval's midpoint, clipped and renormalised
                                           (Campbell et al. 2022); continuous-time processes.
    first_hitting FirstHitting()           masked process: draws the exact time at which the next
                                           masked position is revealed, 1 - alpha_s = (1 - alpha_t)
                                           u^(1/n) for n masked positions, reveals one uniformly chosen
                                           position from mu (Zheng et al. 2024). It takes one step per
                                           position whatever `steps` is, and is exact with the exact mu.
    confidence    ConfidenceUnmasking(t)   masked process: at step i reveals the masked positions
                                           whose max_v mu is highest (plus temperature * Gumbel noise),
                                           as many as the schedule says: round(n (1 - alpha(s))) stay
                                           masked (MaskGIT, Chang et al. 2022). The confidence does not
                                           look at the drawn token, so one position per step is exact.
    block         BlockDiffusion(b, inner) masked process: block-autoregressive (block diffusion,
                                           Arriola et al. 2025): blocks of b positions left to right,
                                           each by `inner` ("first_hitting" or "ancestral", `steps`
                                           per block) with the prefix clean and later blocks masked.
                                           First-hitting blocks are exact with the exact mu.

Every sampler's last step (to t = 0) draws the remaining positions from mu.

Caching (`cache=True`, RADD, Ou et al. 2024): with a time-free denoiser of the masked process,
mu depends on x_t only, so a step after which no sequence of the batch changed reuses it. The
returned `nfe` counts the network evaluations made.

Block diffusion and the network: `fn(x_t, t)` sees the whole sequence, the later blocks as masks,
and is called on it at every event or step (caching as above); a key/value cache of the prefix
would need a block-causal network with incremental decoding, which the functional `fn(x_t, t)`
interface does not have.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.discrete.denoisers import CategoricalDenoiser
from diffjax.discrete.processes import MaskedProcess
from diffjax.validation import build_named, check_choice, check_count, check_key, check_number, check_shape

__all__ = [
    "DiscreteAncestral",
    "TauLeaping",
    "FirstHitting",
    "ConfidenceUnmasking",
    "BlockDiffusion",
    "BLOCK_INNER_SAMPLERS",
    "DISCRETE_SAMPLERS",
    "TokenSamples",
    "sample_tokens",
    "build_discrete_sampler",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenSamples:
    """What `sample_tokens` returns: the tokens and the network evaluations they took."""

    tokens: jax.Array
    nfe: Any


def _draw(key, probs):
    return jax.random.categorical(key, jnp.log(jnp.maximum(probs, 0.0)))


def _mu(denoiser, x, t, cached, cache: bool):
    """(mu, network evaluations): the cached mu if `cache` and x did not change since it was made."""
    if not cache:
        return denoiser.x0_probs(x, t), 1
    mu_old, valid = cached
    mu = jax.lax.cond(valid, lambda: mu_old, lambda: denoiser.x0_probs(x, t))
    return mu, 1 - valid.astype(jnp.int32)


def _run_grid(denoiser, key, shape, steps, cache, step_fn):
    """Prior draw, then `step_fn(x, mu, s, t, key) -> x` on the grid, with the last step drawing from mu."""
    process = denoiser.process
    ts = jnp.linspace(1.0, 0.0, steps + 1)
    key_prior, key_steps = jax.random.split(key)
    x = process.prior_sample(key_prior, shape)
    mu0 = jnp.zeros(shape + (process.vocab_size,), jnp.float32)

    def body(carry, inputs):
        x, mu_old, valid, nfe = carry
        t, s, k, last = inputs
        mu, used = _mu(denoiser, x, t, (mu_old, valid), cache)
        x_new = jax.lax.cond(
            last,
            lambda: _draw(k, denoiser.posterior_probs(x, s, t, mu)),
            lambda: step_fn(x, mu, s, t, k),
        )
        return (x_new, mu, jnp.all(x_new == x), nfe + used), None

    last = jnp.arange(steps) == steps - 1
    init = (x, mu0, jnp.array(False), jnp.int32(0))
    (x, _, _, nfe), _ = jax.lax.scan(body, init, (ts[:-1], ts[1:], jax.random.split(key_steps, steps), last))
    return x, nfe


@dataclasses.dataclass(frozen=True)
class DiscreteAncestral:
    """x_s ~ p(x_s | x_t) at every position."""

    def check(self, denoiser):
        pass

    def step(self, denoiser, key, x_t, s, t, x0_probs=None):
        """One step: x_s ~ p(x_s | x_t) at every position, drawn as argmax(log p + Gumbel(key)).
        x0_probs: a precomputed (e.g. cached) mu."""
        return _draw(key, denoiser.posterior_probs(x_t, s, t, x0_probs))

    def run(self, denoiser, key, shape, steps, cache):
        def step(x, mu, s, t, k):
            return self.step(denoiser, k, x, s, t, mu)

        return _run_grid(denoiser, key, shape, steps, cache, step)


@dataclasses.dataclass(frozen=True)
class TauLeaping:
    """Euler (tau-leaping) steps of the reverse CTMC with rates at the interval's midpoint."""

    def check(self, denoiser):
        if not denoiser.process.continuous_time:
            raise ValueError(f"tau_leaping needs a continuous-time process, got {type(denoiser.process).__name__}")

    def run(self, denoiser, key, shape, steps, cache):
        num_states = denoiser.process.num_states

        def step(x, mu, s, t, k):
            jump = denoiser.reverse_rates(x, 0.5 * (s + t), mu) * (t - s)
            stay = jnp.maximum(1.0 - jnp.sum(jump, axis=-1, keepdims=True), 0.0)
            return _draw(k, jump + jax.nn.one_hot(x, num_states) * stay)

        return _run_grid(denoiser, key, shape, steps, cache, step)


def _check_masked(name: str, denoiser) -> MaskedProcess:
    process = denoiser.process
    if not isinstance(process, MaskedProcess) or process.state_dependent:
        raise ValueError(
            f"{name} needs a MaskedProcess with a state-independent schedule, got {type(process).__name__}"
            + (" with a state-dependent schedule" if isinstance(process, MaskedProcess) else "")
        )
    return process


def _alpha_inverse(process: MaskedProcess, target):
    """t with alpha(t) = target (alpha decreasing), by bisection on [0, 1]."""
    lo, hi = jnp.zeros_like(target), jnp.ones_like(target)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        right = process.alpha(mid)[..., 0] > target  # still too early
        return jnp.where(right, mid, lo), jnp.where(right, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 40, bisect, (lo, hi))
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class FirstHitting:
    """Reveal one masked position per step at its exact (first-hitting) time."""

    def check(self, denoiser):
        _check_masked("first_hitting", denoiser)

    def run(self, denoiser, key, shape, steps, cache):
        del steps, cache  # one event per position; every event changes the sequence
        batch, n = shape[0], math.prod(shape[1:])
        x = jnp.full((batch, n), denoiser.process.mask_id, jnp.int32)

        def body(carry, k):
            return _reveal_one(denoiser, shape, *carry, k, jnp.ones((n,), bool)), None

        (x, _), _ = jax.lax.scan(body, (x, jnp.ones((batch,))), jax.random.split(key, n))
        return x.reshape(shape), jnp.int32(n)


def _reveal_one(denoiser, shape, x, t, key, eligible, mu_time=None):
    """One first-hitting event among the masked positions of x (batch, n) where `eligible` (n,): the
    time s < t at which the next of them is revealed, and x with one of them (uniformly chosen) drawn
    from mu(x, s) (mu(x, mu_time) if given). Returns (x, s)."""
    process, (batch, n) = denoiser.process, x.shape
    k_time, k_pos, k_tok = jax.random.split(key, 3)
    masked = (x == process.mask_id) & eligible
    count = jnp.maximum(jnp.sum(masked, axis=1), 1)
    u = jax.random.uniform(k_time, (batch,))
    one_minus = (1.0 - process.alpha(t)[..., 0]) * u ** (1.0 / count)
    s = _alpha_inverse(process, 1.0 - one_minus)
    mu = denoiser.x0_probs(x.reshape(shape), s if mu_time is None else mu_time).reshape(batch, n, -1)
    gumbel = jax.random.gumbel(k_pos, (batch, n))
    pos = jnp.argmax(jnp.where(masked, gumbel, -jnp.inf), axis=1)
    token = _draw(k_tok, jnp.take_along_axis(mu, pos[:, None, None], axis=1)[:, 0])
    return x.at[jnp.arange(batch), pos].set(token), s


@dataclasses.dataclass(frozen=True)
class ConfidenceUnmasking:
    """MaskGIT-style: reveal the most confident masked positions, as many per step as the schedule says."""

    temperature: float = 0.0

    def __post_init__(self):
        if check_number("ConfidenceUnmasking temperature", self.temperature) < 0:
            raise ValueError(f"ConfidenceUnmasking temperature must be >= 0, got {self.temperature!r}")

    def check(self, denoiser):
        _check_masked("confidence", denoiser)

    def run(self, denoiser, key, shape, steps, cache):
        process = denoiser.process
        batch, n = shape[0], math.prod(shape[1:])
        with jax.ensure_compile_time_eval():
            alphas = np.asarray(process.alpha(jnp.linspace(1.0, 0.0, steps + 1))[:, 0])
        still_masked = np.round(n * (1.0 - alphas)).astype(np.int32)
        still_masked[0], still_masked[-1] = n, 0
        reveal_counts = jnp.asarray(still_masked[:-1] - still_masked[1:])
        ts = jnp.linspace(1.0, 0.0, steps + 1)
        x = jnp.full(shape, process.mask_id, jnp.int32)
        mu0 = jnp.zeros(shape + (process.vocab_size,), jnp.float32)

        def body(carry, inputs):
            x, mu_old, valid, nfe = carry
            t, count, k = inputs
            mu, used = _mu(denoiser, x, t, (mu_old, valid), cache)
            k_conf, k_tok = jax.random.split(k)
            flat_mu = mu.reshape(batch, n, -1)
            masked = x.reshape(batch, n) == process.mask_id
            conf = jnp.max(flat_mu, axis=-1) + self.temperature * jax.random.gumbel(k_conf, (batch, n))
            conf = jnp.where(masked, conf, -jnp.inf)
            rank = jnp.argsort(jnp.argsort(-conf, axis=1), axis=1)
            reveal = masked & (rank < count)
            tokens = _draw(k_tok, flat_mu)
            x_new = jnp.where(reveal, tokens, x.reshape(batch, n)).reshape(shape)
            return (x_new, mu, jnp.all(x_new == x), nfe + used), None

        init = (x, mu0, jnp.array(False), jnp.int32(0))
        (x, _, _, nfe), _ = jax.lax.scan(body, init, (ts[:-1], reveal_counts, jax.random.split(key, steps)))
        return x, nfe


BLOCK_INNER_SAMPLERS = ("first_hitting", "ancestral")
BLOCK_SUPPORT_TIME = 0.5


@dataclasses.dataclass(frozen=True)
class BlockDiffusion:
    """Block-autoregressive sampling (block diffusion, Arriola et al. 2025): the flattened positions in
    blocks of `block_size`, generated left to right, each block from all-mask by the masked sampler
    `inner` with the finished prefix clean and the later blocks masked in the network's input, so the
    network's x_0 distribution for the block is conditioned on the prefix. inner: "first_hitting"
    (one exact event per position, whatever `steps` is) or "ancestral" (`steps` steps per block; with
    cache=True the cached mu is carried across blocks too).

    The denoiser must be time-free (RADD): no single noise level t describes a clean prefix, a
    partly masked block and masked later blocks, while a time-free network's p(x_0 | x_t) does not
    need one. (Its support is taken at `BLOCK_SUPPORT_TIME`: for a state-independent masked process
    the support of q(x_t | x_0) is the same at every t in (0, 1), where it is not at the block's t = 1.)"""

    block_size: int = 16
    inner: str = "first_hitting"

    def __post_init__(self):
        check_count("BlockDiffusion block_size", self.block_size)
        check_choice("BlockDiffusion inner sampler", self.inner, BLOCK_INNER_SAMPLERS)

    def check(self, denoiser):
        _check_masked("block", denoiser)
        if not denoiser.time_free:
            raise ValueError("block needs a time-free denoiser (CategoricalDenoiser(..., time_free=True))")

    def check_shape(self, shape) -> None:
        """ValueError unless block_size divides the positions of one sample of `shape` (batch first)."""
        n = math.prod(shape[1:])
        if n % self.block_size:
            raise ValueError(
                f"BlockDiffusion block_size {self.block_size} does not divide the {n} positions of shape {tuple(shape)}"
            )

    def run(self, denoiser, key, shape, steps, cache):
        process = denoiser.process
        batch, n = shape[0], math.prod(shape[1:])
        blocks = jnp.arange(n // self.block_size)
        block_of = jnp.arange(n) // self.block_size
        x = jnp.full((batch, n), process.mask_id, jnp.int32)
        if self.inner == "first_hitting":

            def block(x, inputs):
                b, k = inputs

                def event(carry, k):
                    return _reveal_one(denoiser, shape, *carry, k, block_of == b, BLOCK_SUPPORT_TIME), None

                (x, _), _ = jax.lax.scan(event, (x, jnp.ones((batch,))), jax.random.split(k, self.block_size))
                return x, None

            x, _ = jax.lax.scan(block, x, (blocks, jax.random.split(key, blocks.size)))
            return x.reshape(shape), jnp.int32(n)

        ts = jnp.linspace(1.0, 0.0, steps + 1)

        def block(carry, inputs):
            b, k = inputs

            def step(carry, inputs):
                x, mu_old, valid, nfe = carry
                t, s, k = inputs
                mu, used = _mu(denoiser, x.reshape(shape), BLOCK_SUPPORT_TIME, (mu_old, valid), cache)
                drawn = DiscreteAncestral().step(denoiser, k, x.reshape(shape), s, t, mu).reshape(batch, n)
                x_new = jnp.where(block_of == b, drawn, x)
                return (x_new, mu, jnp.all(x_new == x), nfe + used), None

            carry, _ = jax.lax.scan(step, carry, (ts[:-1], ts[1:], jax.random.split(k, steps)))
            return carry, None

        mu0 = jnp.zeros(shape + (process.vocab_size,), jnp.float32)
        init = (x, mu0, jnp.array(False), jnp.int32(0))
        (x, _, _, nfe), _ = jax.lax.scan(block, init, (blocks, jax.random.split(key, blocks.size)))
        return x.reshape(shape), nfe


DISCRETE_SAMPLERS = {
    "ancestral": DiscreteAncestral,
    "tau_leaping": TauLeaping,
    "first_hitting": FirstHitting,
    "confidence": ConfidenceUnmasking,
    "block": BlockDiffusion,
}


def build_discrete_sampler(name: str, options: dict | None = None):
    """The config boundary: a name of DISCRETE_SAMPLERS and its options."""
    return build_named(DISCRETE_SAMPLERS, name, options, "discrete sampler")


@functools.partial(jax.jit, static_argnames=("sampler", "shape", "steps", "cache"))
def _sample_jit(denoiser, key, *, sampler, shape, steps, cache):
    x, nfe = sampler.run(denoiser, key, shape, steps, cache)
    return TokenSamples(x, nfe)


def sample_tokens(
    denoiser: CategoricalDenoiser,
    key,
    shape,
    sampler=None,
    steps: int = 64,
    *,
    cache: bool = False,
) -> TokenSamples:
    """Draw clean tokens of `shape` (batch first) with `sampler` (default `DiscreteAncestral()`) in
    `steps` steps, as one compiled program (cached across calls with the same static arguments).
    cache: reuse mu while no sequence changes (needs a time-free denoiser of the masked process)."""
    if not isinstance(denoiser, CategoricalDenoiser):
        raise TypeError(f"denoiser must be a CategoricalDenoiser, got {type(denoiser).__name__}")
    check_key(key)
    shape = check_shape(shape)
    steps = check_count("steps", steps)
    sampler = DiscreteAncestral() if sampler is None else sampler
    if not isinstance(sampler, tuple(DISCRETE_SAMPLERS.values())):
        raise TypeError(
            f"sampler must be one of {sorted(c.__name__ for c in DISCRETE_SAMPLERS.values())}, got {sampler!r:.100}"
        )
    sampler.check(denoiser)
    if not isinstance(cache, bool):
        raise TypeError(f"cache must be True or False, got {cache!r:.100}")
    if cache and not denoiser.time_free:
        raise ValueError("cache=True reuses the network's output while x_t is unchanged: it needs time_free=True")
    if isinstance(sampler, BlockDiffusion):
        sampler.check_shape(shape)
    _check_network_output(denoiser, shape)
    if isinstance(sampler, FirstHitting) or getattr(sampler, "inner", None) == "first_hitting":
        steps = 1  # unused: one compiled program for every step count
    return _sample_jit(denoiser, key, sampler=sampler, shape=shape, steps=steps, cache=cache)


def _check_network_output(denoiser: CategoricalDenoiser, shape) -> None:
    expected = shape + (denoiser.process.vocab_size,)
    out = jax.eval_shape(
        denoiser.fn, jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    )
    if getattr(out, "shape", None) != expected:
        raise ValueError(
            f"the network maps tokens of shape {shape} to {getattr(out, 'shape', type(out))}; it must return "
            f"logits of shape {expected} (vocab_size = {denoiser.process.vocab_size})"
        )
