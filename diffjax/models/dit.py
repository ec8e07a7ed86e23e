"""DiT: Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers").

Images or latents come in NHWC and are cut into p x p patches inside; the blocks are stacked along a
leading "layers" axis and run with `nnx.scan`, so compile time does not grow with depth
(`scan_layers=False` runs the same stacked parameters in an unrolled Python loop).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffjax.models import layers as L
from diffjax.models.configs import DiTConfig

_LAYERS_AXIS = {nnx.PARTITION_NAME: "layers"}


def xavier_uniform(in_axis=-2, out_axis=-1):
    return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis, out_axis)


def sincos_2d_positions(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE / DiT): half the features encode the column, half the
    row, each as [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/4)). Shape (h*w, dim)."""

    def one_axis(pos, d):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    emb = np.concatenate([one_axis(cols, dim // 2), one_axis(rows, dim // 2)], axis=1)
    return emb.astype(np.float32)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nnx.Module):
    """adaLN-Zero transformer block: x += gate * f(LN(x) * (1 + scale) + shift) for f in (attention,
    MLP), with (shift, scale, gate) x 2 regressed from the conditioning and zero-initialised."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d, dt = cfg.hidden_size, dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
        self.attn = L.Attention(
            d,
            cfg.num_heads,
            qkv_init=xavier_uniform(0, (1, 2, 3)),
            out_init=xavier_uniform((0, 1), 2),
            attention_impl=cfg.attention_impl,
            attention_interpret=cfg.attention_interpret,
            **dt,
        )
        self.fc1 = L.Dense(d, cfg.mlp_hidden, names=("embed", "mlp"), kernel_init=xavier_uniform(), **dt)
        self.fc2 = L.Dense(cfg.mlp_hidden, d, names=("mlp", "embed"), kernel_init=xavier_uniform(), **dt)
        self.modulation = L.Dense(d, 6 * d, names=("embed", "mlp"), kernel_init=L.zeros_init, **dt)
        self.mlp_norm_eps = cfg.mlp_norm_eps

    def __call__(self, x, silu_c):
        mod = self.modulation(silu_c)[:, None, :]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        x = x + gate_a * self.attn(modulate(L.layer_norm(x), shift_a, scale_a))
        h = self.fc1(modulate(L.layer_norm(x, self.mlp_norm_eps), shift_m, scale_m))
        h = L.constrain(jax.nn.gelu(h, approximate=True), ("batch", "seq", "act_mlp"))
        x = x + gate_m * self.fc2(h)
        return L.constrain(x, ("batch", "seq", "act_embed"))


def _block_step(x, silu_c, block):
    return block(x, silu_c)


def time_mlp_layers(frequency_embedding_size: int, d: int, dt: dict) -> tuple[L.Dense, L.Dense]:
    """The two layers of the time MLP, frequency features -> d -> d, kernels N(0, 0.02) as in DiT."""
    time0 = L.Dense(frequency_embedding_size, d, names=(None, "mlp"), kernel_init=L.normal_init(0.02), **dt)
    time1 = L.Dense(d, d, names=("mlp", "embed"), kernel_init=L.normal_init(0.02), **dt)
    return time0, time1


def stacked_blocks(block_cls, cfg: DiTConfig, rngs: nnx.Rngs):
    """cfg.depth blocks `block_cls(cfg)` with their parameters stacked on a leading "layers" axis."""

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_AXIS)
    def make_blocks(rngs):
        return block_cls(cfg, rngs=rngs)

    return make_blocks(rngs)


def scan_blocks(blocks, x, silu_c, remat: str):
    """x through the stacked blocks with `nnx.scan` (compile time flat in depth)."""
    step = L.maybe_remat(_block_step, remat)
    scan = nnx.scan(step, in_axes=(nnx.Carry, None, 0), out_axes=nnx.Carry, transform_metadata=_LAYERS_AXIS)
    return scan(x, silu_c, blocks)


def final_layers(d: int, out_features: int, dt: dict) -> tuple[L.Dense, L.Dense]:
    """The adaLN final layer's modulation (d -> shift, scale) and linear (d -> out_features), zero-initialised."""
    modulation = L.Dense(d, 2 * d, names=("embed", "mlp"), kernel_init=L.zeros_init, **dt)
    linear = L.Dense(d, out_features, names=("embed", None), kernel_init=L.zeros_init, **dt)
    return modulation, linear


def apply_final_layer(modulation, linear, tokens, silu_c):
    """linear(LN(tokens) * (1 + scale) + shift), (shift, scale) = modulation(silu_c)."""
    shift, scale = jnp.split(modulation(silu_c)[:, None, :], 2, axis=-1)
    return linear(modulate(L.layer_norm(tokens), shift, scale))


class DiT(nnx.Module):
    """Diffusion Transformer (Peebles & Xie 2023): patch embedding + fixed 2-D sin-cos positions,
    time MLP on sinusoidal features, class embedding with a null class (row num_classes),
    `depth` adaLN-Zero blocks, adaLN final layer (zero-initialised) and unpatchify.

    With learn_sigma the output has 2C channels (the prediction, then the variance interpolation v),
    as the reference DiT; the position table is a constant of the input size, not a stored buffer.
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
        self.patch_embed = L.DenseGeneral(
            (p, p, c), (d,), names=(None, None, None, "embed"), kernel_init=xavier_uniform((0, 1, 2), 3), **dt
        )
        self.time0, self.time1 = time_mlp_layers(cfg.frequency_embedding_size, d, dt)
        self.class_embed = (
            L.ClassEmbedding(cfg.num_classes, d, init=L.normal_init(0.02), **dt) if cfg.num_classes else None
        )
        self.blocks = stacked_blocks(DiTBlock, cfg, rngs)
        self.final_modulation, self.final_linear = final_layers(d, p * p * cfg.out_channels, dt)

    def _patchify(self, x):
        b, h, w, c = x.shape
        p = self.cfg.patch_size
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        tokens = self.patch_embed(x).reshape(b, (h // p) * (w // p), -1)
        pos = sincos_2d_positions(h // p, w // p, self.cfg.hidden_size)
        return tokens + jnp.asarray(pos, tokens.dtype)[None]

    def _unpatchify(self, tokens, h, w):
        b, p, c = tokens.shape[0], self.cfg.patch_size, self.cfg.out_channels
        x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, c)

    def _run_blocks(self, x, silu_c):
        if self.cfg.scan_layers:
            return scan_blocks(self.blocks, x, silu_c, self.cfg.remat)
        step = L.maybe_remat(_block_step, self.cfg.remat)
        graphdef, state = nnx.split(self.blocks)
        for i in range(self.cfg.depth):
            x = step(x, silu_c, nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)))
        return x

    def __call__(self, x, t, y=None, *, train: bool = False, rngs=None):
        del train, rngs  # DiT has no dropout (label dropout is the trainer's job: drop_labels)
        cfg = self.cfg
        b, h, w, c = x.shape if x.ndim == 4 else (None,) * 4
        p = cfg.patch_size
        if x.ndim != 4 or c != cfg.in_channels or h % p or w % p:
            raise ValueError(
                f"DiT expects NHWC input with {cfg.in_channels} channels and height/width "
                f"divisible by patch_size {p}, got shape {tuple(x.shape)}"
            )
        t = L.check_time(t, b)
        y = L.labels_or_null(y, b, cfg.num_classes)
        tokens = L.constrain(self._patchify(x.astype(cfg.compute_dtype)), ("batch", "seq", "act_embed"))
        freq = L.sinusoidal_embedding(
            cfg.time_scale * t, cfg.frequency_embedding_size, endpoint=cfg.frequency_shift == 1
        )
        cond = self.time1(jax.nn.silu(self.time0(freq)))
        if y is not None:
            cond = cond + self.class_embed(y)
        silu_c = jax.nn.silu(cond)
        tokens = self._run_blocks(tokens, silu_c)
        out = apply_final_layer(self.final_modulation, self.final_linear, tokens, silu_c)
        return self._unpatchify(out, h, w).astype(jnp.float32)
