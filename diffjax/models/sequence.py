"""Transformers over token sequences and token images, built from the DiT blocks without patching.

`SequenceTransformer` embeds integer states (tokens plus, for masked diffusion, the mask), adds fixed
sin-cos positions (1-D for sequences (batch, length); 2-D for token images (batch, height, width),
the pixel variant), runs `depth` DiT adaLN-Zero blocks conditioned on the time (the same logical axis
names, the same attention path through `diffjax.kernels`) and returns logits over the vocabulary,
x.shape + (vocab_size,). It is bidirectional; `causal=True` makes the autoregressive baseline of the
same size (causal attention with `jax.nn.dot_product_attention`, which the kernels do not offer).
Call as `model(x, t, y=None, *, train=False, rngs=None)` like every model; `time_scale = 0` ignores t.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffjax.models import layers as L
from diffjax.models.configs import DiTConfig
from diffjax.models.dit import (
    DiTBlock,
    apply_final_layer,
    final_layers,
    modulate,
    scan_blocks,
    sincos_2d_positions,
    stacked_blocks,
    time_mlp_layers,
)

__all__ = ["SequenceConfig", "SequenceTransformer", "sincos_1d_positions"]

# the SequenceConfig fields that configure the DiT blocks (time_scale stays here: 0 is allowed)
_BLOCK_FIELDS = (
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "frequency_embedding_size",
    "dtype",
    "param_dtype",
    "attention_impl",
    "attention_interpret",
    "remat",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceConfig:
    """num_states: input ids 0..num_states-1 (for masked diffusion vocab_size + 1, the mask last);
    vocab_size: logits per position; length: positions (int) or (height, width) for token images;
    the rest as in `DiTConfig`. causal: autoregressive attention (the baseline)."""

    num_states: int
    vocab_size: int
    length: int | tuple[int, int]
    hidden_size: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    frequency_embedding_size: int = 256
    time_scale: float = 1000.0
    causal: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str | None = None
    attention_interpret: bool = False
    remat: str = "none"

    def block_config(self) -> DiTConfig:
        """The DiT blocks' configuration: this config's `_BLOCK_FIELDS` on a 1 x 1 "image"."""
        shared = {name: getattr(self, name) for name in _BLOCK_FIELDS}
        return DiTConfig(image_size=1, in_channels=1, patch_size=1, **shared).validate()

    def validate(self) -> SequenceConfig:
        for name in ("num_states", "vocab_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 2):
                raise ValueError(f"SequenceConfig {name} must be an int >= 2, got {value!r}")
        if self.num_states < self.vocab_size:
            raise ValueError(f"SequenceConfig num_states {self.num_states} < vocab_size {self.vocab_size}")
        shape = self.length if isinstance(self.length, tuple) else (self.length,)
        if not (len(shape) in (1, 2) and all(isinstance(n, int) and n >= 1 for n in shape)):
            raise ValueError(f"SequenceConfig length must be a positive int or (height, width), got {self.length!r}")
        self.block_config()
        return self


def sincos_1d_positions(length: int, dim: int) -> np.ndarray:
    """[sin(pos w_k), cos(pos w_k)], w_k = 10000^(-k / (dim/2)): (length, dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(np.arange(length, dtype=np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


class _CausalBlock(DiTBlock):
    """The DiT block with causal self-attention (same parameters)."""

    def __call__(self, x, silu_c):
        mod = self.modulation(silu_c)[:, None, :]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        h = modulate(L.layer_norm(x), shift_a, scale_a)
        qkv = self.attn.qkv(h)
        o = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
        x = x + gate_a * self.attn.out(o)
        h = self.fc1(modulate(L.layer_norm(x), shift_m, scale_m))
        x = x + gate_m * self.fc2(jax.nn.gelu(h, approximate=True))
        return L.constrain(x, ("batch", "seq", "act_embed"))


class SequenceTransformer(nnx.Module):
    """Token embedding + sin-cos positions, time MLP, DiT blocks (scanned), adaLN final layer, logits."""

    def __init__(self, cfg: SequenceConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        block_cfg = cfg.block_config()
        d = cfg.hidden_size
        dt = dict(dtype=block_cfg.compute_dtype, param_dtype=block_cfg.storage_dtype, rngs=rngs)
        # the class-embedding table of num_states rows (its "null" row is the last state)
        self.embed = L.ClassEmbedding(cfg.num_states - 1, d, init=L.normal_init(0.02), **dt)
        self.time0, self.time1 = time_mlp_layers(cfg.frequency_embedding_size, d, dt)
        self.blocks = stacked_blocks(_CausalBlock if cfg.causal else DiTBlock, block_cfg, rngs)
        self.final_modulation, self.final_linear = final_layers(d, cfg.vocab_size, dt)

    def _positions(self):
        cfg = self.cfg
        if isinstance(cfg.length, tuple):
            return sincos_2d_positions(*cfg.length, cfg.hidden_size)
        return sincos_1d_positions(cfg.length, cfg.hidden_size)

    def __call__(self, x, t, y=None, *, train: bool = False, rngs=None):
        del train, rngs
        cfg = self.cfg
        expected = cfg.length if isinstance(cfg.length, tuple) else (cfg.length,)
        if y is not None:
            raise ValueError("SequenceTransformer is unconditional: y must be None")
        if tuple(x.shape[1:]) != expected or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(
                f"SequenceTransformer expects integer tokens of shape (batch, *{expected}), got {x.shape} {x.dtype}"
            )
        b = x.shape[0]
        t = L.check_time(t, b)
        tokens = self.embed(x.reshape(b, -1)) + jnp.asarray(self._positions())[None]
        tokens = L.constrain(tokens.astype(cfg.block_config().compute_dtype), ("batch", "seq", "act_embed"))
        freq = L.sinusoidal_embedding(cfg.time_scale * t, cfg.frequency_embedding_size)
        silu_c = jax.nn.silu(self.time1(jax.nn.silu(self.time0(freq))))
        tokens = scan_blocks(self.blocks, tokens, silu_c, cfg.remat)
        logits = apply_final_layer(self.final_modulation, self.final_linear, tokens, silu_c)
        return logits.reshape(x.shape + (cfg.vocab_size,)).astype(jnp.float32)
