"""A small residual MLP for vector (toy) data, with the same call contract as the image models:

    e       = MLP(sinusoidal(time_scale * t)) [+ class embedding of y]
    h_0     = W_in x
    h_{i+1} = h_i + W2_i silu(W1_i silu(h_i) + U_i e)        for i < depth
    out     = W_out silu(h_depth)                             (W_out starts at zero, as in ADM)

with every hidden layer `width` wide and the time embedding shared by all blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffjax.models import layers as L
from diffjax.models.configs import ToyMLPConfig


class _ResidualBlock(nnx.Module):
    """h + W2 silu(W1 silu(h) + U e): one time-conditioned residual block."""

    def __init__(self, width: int, *, kernel_init, rngs: nnx.Rngs):
        self.hidden = L.Dense(width, width, names=("embed", "mlp"), kernel_init=kernel_init, rngs=rngs)
        self.time = L.Dense(width, width, names=("embed", "mlp"), kernel_init=kernel_init, rngs=rngs)
        self.out = L.Dense(width, width, names=("mlp", "embed"), kernel_init=kernel_init, rngs=rngs)

    def __call__(self, h: jax.Array, emb: jax.Array) -> jax.Array:
        return h + self.out(jax.nn.silu(self.hidden(jax.nn.silu(h)) + self.time(emb)))


class ToyMLP(nnx.Module):
    """Residual MLP score/denoiser network for x of shape (batch, data_dim); see the module docstring.

    Called as `model(x, t, y=None, *, train=False, rngs=None)` like every bundled model, so
    `diffjax.models.functional(model)` gives `apply(params, x, t, y=None, *, key=None)`.
    """

    def __init__(self, cfg: ToyMLPConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        init = L.scaled_fan_avg_uniform(1.0)
        width = cfg.width
        self.x_in = L.Dense(cfg.data_dim, width, names=(None, "embed"), kernel_init=init, rngs=rngs)
        self.temb0 = L.Dense(cfg.embedding_dim, width, names=(None, "mlp"), kernel_init=init, rngs=rngs)
        self.temb1 = L.Dense(width, width, names=("mlp", "embed"), kernel_init=init, rngs=rngs)
        self.class_embed = (
            L.ClassEmbedding(cfg.num_classes, width, init=jax.nn.initializers.normal(1.0), rngs=rngs)
            if cfg.num_classes
            else None
        )
        self.blocks = nnx.List([_ResidualBlock(width, kernel_init=init, rngs=rngs) for _ in range(cfg.depth)])
        self.x_out = L.Dense(width, cfg.data_dim, names=("embed", None), kernel_init=L.zeros_init, rngs=rngs)

    def __call__(self, x, t, y=None, *, train: bool = False, rngs=None):
        del train, rngs  # no dropout
        cfg = self.cfg
        if x.ndim != 2 or x.shape[1] != cfg.data_dim:
            raise ValueError(f"ToyMLP expects x of shape (batch, {cfg.data_dim}), got {tuple(x.shape)}")
        batch = x.shape[0]
        t = L.check_time(t, batch)
        y = L.labels_or_null(y, batch, cfg.num_classes)
        emb = L.sinusoidal_embedding(cfg.time_scale * t, cfg.embedding_dim)
        emb = self.temb1(jax.nn.silu(self.temb0(emb)))
        if y is not None:
            emb = emb + self.class_embed(y)
        h = self.x_in(x.astype(jnp.float32))
        for block in self.blocks:
            h = block(h, emb)
        return self.x_out(jax.nn.silu(h))
