"""Enumerable distributions over short token sequences, with the exact denoiser of any process.

A distribution over all V^L sequences of length L is a table of V^L probabilities. For any discrete
process, the exact conditional of the clean token at each position is

    p(x_0^n = v | x_t) = sum_{x_0 : x_0^n = v} p(x_0) prod_m Qbar_t[x_0^m, x_t^m] / p(x_t),

computed by enumeration; its log is the exact denoiser's logits. Tests and experiments use these
to check samplers (total variation to the table), losses (zero-mean gradients) and ELBOs (against
the exact log-likelihood).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.discrete.processes import DiscreteProcess, check_tokens
from diffjax.validation import check_count

__all__ = ["EnumerableSequences"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EnumerableSequences:
    """A distribution given by `probs` over all sequences of `length` tokens from `vocab_size`,
    in lexicographic order (`all_sequences`)."""

    probs: jax.Array  # (vocab_size ** length,)
    vocab_size: int = dataclasses.field(metadata=dict(static=True))
    length: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def random_table(cls, seed: int, vocab_size: int, length: int, concentration: float = 0.5):
        """A Dirichlet(concentration) draw over all sequences."""
        check_count("vocab_size", vocab_size, 2)
        check_count("length", length)
        p = np.random.default_rng(seed).dirichlet(np.full(vocab_size**length, concentration))
        return cls(jnp.asarray(p, jnp.float32), vocab_size, length)

    @classmethod
    def markov_chain(cls, seed: int, vocab_size: int, length: int, concentration: float = 0.5):
        """A first-order Markov chain with Dirichlet(concentration) initial and transition rows."""
        check_count("vocab_size", vocab_size, 2)
        check_count("length", length)
        rng = np.random.default_rng(seed)
        init = rng.dirichlet(np.full(vocab_size, concentration))
        trans = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
        seqs = np.asarray(list(itertools.product(range(vocab_size), repeat=length)))
        p = init[seqs[:, 0]] * np.prod(trans[seqs[:, :-1], seqs[:, 1:]], axis=1)
        return cls(jnp.asarray(p / p.sum(), jnp.float32), vocab_size, length)

    def all_sequences(self) -> jax.Array:
        """(V^L, L) int32, lexicographic (the order of `probs`)."""
        grid = np.asarray(list(itertools.product(range(self.vocab_size), repeat=self.length)), np.int32)
        return jnp.asarray(grid)

    def index(self, x):
        """The row of each sequence x (batch, L) in `all_sequences`."""
        powers = self.vocab_size ** jnp.arange(self.length - 1, -1, -1)
        return jnp.sum(x * powers, axis=-1)

    def log_prob(self, x):
        return jnp.log(self.probs[self.index(x)])

    def sample(self, key, n: int):
        return self.all_sequences()[jax.random.categorical(key, jnp.log(self.probs), shape=(n,))]

    def x0_logits(self, process: DiscreteProcess, x_t, t):
        """log p(x_0^n = v | x_t) by enumeration: x_t (batch, L) states, t () or (batch,);
        (batch, L, V), -inf where impossible."""
        seqs = self.all_sequences()  # (N, L)
        tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
        qbar = process.marginal_matrix(tb)  # (batch, V, S)
        # log q(x_t | x0 = seq) for every batch row and sequence: (batch, N)
        per_pos = jax.vmap(lambda q, xt: q[seqs, xt[None, :]])(qbar, x_t)  # (batch, N, L)
        log_joint = jnp.log(self.probs)[None] + jnp.sum(jnp.log(per_pos), axis=-1)
        post = jax.nn.softmax(log_joint, axis=-1)  # (batch, N)
        marg = jnp.einsum("bn,nlv->blv", post, jax.nn.one_hot(seqs, self.vocab_size))
        return jnp.log(marg)

    def denoiser_fn(self, process: DiscreteProcess, time_free: bool = False):
        """The exact network `fn(x_t, t) -> logits` for `process`; time_free: ignore t (exact for the
        masked process with a state-independent schedule, whose p(x_0 | x_t) does not depend on t)."""

        def fn(x_t, t):
            return self.x0_logits(process, x_t, jnp.full_like(t, 0.5) if time_free else t)

        return fn

    def empirical_probs(self, samples):
        """Frequencies of every sequence in `samples` (n, L), (V^L,)."""
        check_tokens("samples", samples, self.vocab_size)
        counts = jnp.bincount(self.index(samples), length=self.probs.shape[0])
        return counts / samples.shape[0]

    def total_variation(self, samples) -> float:
        """TV(empirical distribution of samples, probs) = 1/2 sum |p_hat - p|."""
        return float(0.5 * jnp.sum(jnp.abs(self.empirical_probs(samples) - self.probs)))
