"""SequenceTransformer: logits of the right shape for sequences and token images, bidirectional unless
causal (then no position sees a later one), bad configs and inputs refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax.models import SequenceConfig, SequenceTransformer, functional, logical_partition_specs


def _perturbed(causal: bool, length=6):
    """An abstract model, its jitted apply, and random parameters drawn on the host (initial values
    would hide dependence behind zero-initialised output layers; initialising through the model's
    initialisers would compile one program per parameter)."""
    cfg = SequenceConfig(num_states=5, vocab_size=4, length=length, hidden_size=16, depth=2, num_heads=2, causal=causal)
    model = nnx.eval_shape(lambda: SequenceTransformer(cfg, rngs=nnx.Rngs(0)))
    apply, abstract_params = functional(model)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), p.dtype), abstract_params)
    return model, jax.jit(apply), params


@pytest.mark.parametrize("causal", [False, True])
def test_sequence_transformer_sees_later_positions_only_when_bidirectional(causal):
    _, apply, params = _perturbed(causal)
    x = jnp.zeros((2, 6), jnp.int32)
    t = jnp.full((2,), 0.3)
    a, b = apply(params, x, t), apply(params, x.at[:, -1].set(3), t)
    assert a.shape == (2, 6, 4)
    earlier_change = float(jnp.abs(a[:, :-1] - b[:, :-1]).max())
    assert (earlier_change == 0.0) if causal else (earlier_change > 1e-4)


@pytest.mark.slow
def test_pixel_variant_and_sharding_names():
    cfg = SequenceConfig(num_states=3, vocab_size=2, length=(4, 4), hidden_size=16, depth=1, num_heads=2)
    model = SequenceTransformer(cfg, rngs=nnx.Rngs(0))
    assert model(jnp.zeros((3, 4, 4), jnp.int32), jnp.zeros(3)).shape == (3, 4, 4, 2)
    specs = logical_partition_specs(model)
    assert "layers" in jax.tree.leaves(specs["blocks"]["attn"]["qkv"]["kernel"])[0]


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="num_states 3 < vocab_size 4"):
        SequenceConfig(num_states=3, vocab_size=4, length=8).validate()
    with pytest.raises(ValueError, match="length"):
        SequenceConfig(num_states=5, vocab_size=4, length=0).validate()
    cfg = SequenceConfig(num_states=5, vocab_size=4, length=6, hidden_size=16, depth=2, num_heads=2)
    model = nnx.eval_shape(lambda: SequenceTransformer(cfg, rngs=nnx.Rngs(0)))  # refused before any compute
    with pytest.raises(ValueError, match="integer tokens of shape"):
        model(np.zeros((2, 7), np.int32), jnp.zeros(2))
