"""The magnitude-preserving U-Net of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Fig. 21, config G).

Every layer keeps the expected magnitude of its activations: no biases; weights normalised to unit
norm per output channel and scaled by 1/sqrt(fan_in) (`mp_weight`; with forced weight
normalisation in training, `forced_weight_normalization`); learned scalar gains where a layer must
start at zero; MP-SiLU, MP-sum and MP-concatenation; cosine attention (pixel-normalised q, k, v);
an extra constant input channel; and a log-variance head u(sigma) for the uncertainty-weighted loss
L = E[w(sigma) ||D - y||^2 / exp(u)] + E[u] (`losses.denoising_loss(..., uncertainty=)`, `logvar_from_params`).
Images are NHWC; convolution kernels HWIO.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diffjax.models import layers as L
from diffjax.models.configs import EDM2UNetConfig

__all__ = [
    "EDM2UNet",
    "normalize",
    "mp_weight",
    "mp_silu",
    "mp_sum",
    "mp_cat",
    "mp_fourier",
    "logvar_from_params",
    "forced_weight_normalization",
    "params_from_edm2_state",
]

EPS = 1e-4


def normalize(x: jax.Array, axes, eps: float = EPS) -> jax.Array:
    """x / (eps + ||x||_axes / sqrt(n)), n the number of entries reduced: unit RMS over `axes`
    (EDM2 Eq. 46; pixel norm over channels, weight norm over a kernel's input axes). Float32 statistics."""
    axes = tuple(a % x.ndim for a in np.atleast_1d(axes))
    n = math.prod(x.shape[a] for a in axes)
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))
    return x / (eps + norm / math.sqrt(n)).astype(x.dtype)


def mp_weight(w: jax.Array, gain=1.0) -> jax.Array:
    """The weight a magnitude-preserving layer uses: each output column (last axis) normalised to
    unit RMS and scaled by gain / sqrt(fan_in) (EDM2 Eq. 47 and 66)."""
    fan_in = math.prod(w.shape[:-1])
    return normalize(w.astype(jnp.float32), tuple(range(w.ndim - 1))) * (gain / math.sqrt(fan_in))


def mp_silu(x: jax.Array) -> jax.Array:
    """SiLU(x) / 0.596: unit magnitude for unit-Gaussian input (EDM2 Eq. 81)."""
    return jax.nn.silu(x) / 0.596


def mp_sum(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2) (EDM2 Eq. 88)."""
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: jax.Array, b: jax.Array, t: float = 0.5) -> jax.Array:
    """Concatenation along channels with the halves weighted (1 - t) : t and the result of unit
    magnitude (EDM2 Eq. 103)."""
    na, nb = a.shape[-1], b.shape[-1]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return jnp.concatenate([a * (scale / math.sqrt(na) * (1 - t)), b * (scale / math.sqrt(nb) * t)], axis=-1)


def mp_fourier(t: jax.Array, freqs: jax.Array, phases: jax.Array) -> jax.Array:
    """sqrt(2) cos(t f + phi) of fixed random f ~ 2 pi N(0, 1), phi ~ 2 pi U(0, 1) (EDM2 Eq. 75):
    (batch, len(freqs)), float32, unit magnitude."""
    y = t.astype(jnp.float32)[:, None] * freqs.astype(jnp.float32)[None] + phases.astype(jnp.float32)[None]
    return jnp.cos(y) * math.sqrt(2.0)


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, dtype)


def _fourier_params(num: int, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param]:
    """(freqs, phases) of MP Fourier features: fixed buffers, stored as params so that a trained
    network's load with it; they get no gradient (stop_gradient), as in the reference."""

    def freqs(key, shape, dtype):
        return 2 * np.pi * jax.random.normal(key, shape, dtype)

    def phases(key, shape, dtype):
        return 2 * np.pi * jax.random.uniform(key, shape, dtype)

    return tuple(L._param(init, rngs.params(), (num,), jnp.float32, (None,)) for init in (freqs, phases))


class MPConv(nnx.Module):
    """Magnitude-preserving convolution (kernel (k, k, in, out), NHWC) or linear layer (kernel
    (in, out)): y = x * mp_weight(W, gain). Weights ~ N(0, 1), no bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | None, *, names, dtype, param_dtype, rngs):
        shape = (in_channels, out_channels) if kernel is None else (kernel, kernel, in_channels, out_channels)
        self.dtype = dtype
        self.weight = L._param(_normal, rngs.params(), shape, param_dtype, names)

    def __call__(self, x: jax.Array, gain=1.0) -> jax.Array:
        w = mp_weight(self.weight[...], gain).astype(self.dtype)
        if w.ndim == 2:
            return jnp.dot(x.astype(self.dtype), w)
        return L.conv2d(x.astype(self.dtype), w)


def _conv(cin, cout, kernel, dt):
    return MPConv(cin, cout, kernel, names=(None, None, "conv_in", "conv_out"), **dt)


class EDM2Block(nnx.Module):
    """Encoder ("enc") or decoder ("dec") block of EDM2 (Fig. 21): resample, [enc: 1x1 skip conv and
    pixel norm], residual branch (MP-SiLU, 3x3 conv, embedding modulation 1 + gain * linear(emb),
    MP-SiLU, dropout, 3x3 conv), MP-sum with res_balance, optional cosine self-attention MP-summed
    with attn_balance, and activation clipping."""

    def __init__(
        self, cfg: EDM2UNetConfig, cin: int, cout: int, *, flavor: str, resample: str, attention: bool, rngs, dt
    ):
        self.flavor, self.resample, self.cfg = flavor, resample, cfg
        self.num_heads = cout // cfg.channels_per_head if attention else 0
        self.emb_gain = L._param(L.zeros_init, rngs.params(), (), dt["param_dtype"], ())
        self.conv_res0 = _conv(cout if flavor == "enc" else cin, cout, 3, dt)
        self.emb_linear = MPConv(cfg.emb_channels, cout, None, names=("embed", "conv_out"), **dt)
        self.conv_res1 = _conv(cout, cout, 3, dt)
        self.conv_skip = _conv(cin, cout, 1, dt) if cin != cout else None
        self.attn_qkv = _conv(cout, 3 * cout, 1, dt) if self.num_heads else None
        self.attn_proj = _conv(cout, cout, 1, dt) if self.num_heads else None

    def __call__(self, x, emb, dropout_key):
        cfg = self.cfg
        if self.resample == "down":
            x = L.downsample_mean(x)
        elif self.resample == "up":
            x = L.upsample_nearest(x)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, -1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain[...]) + 1
        y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
        y = self.conv_res1(L.dropout(y, cfg.dropout, dropout_key))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, cfg.res_balance)
        if self.num_heads:
            b, h, w, c = x.shape
            qkv = self.attn_qkv(x).reshape(b, h * w, self.num_heads, c // self.num_heads, 3)
            qkv = normalize(qkv, 3)  # pixel norm of each head's q, k and v
            q, k, v = (qkv[..., i] for i in range(3))
            o = L.diffjax_attention(
                q,
                k,
                v,
                softmax_scale=(c // self.num_heads) ** -0.5,
                implementation=cfg.attention_impl,
                interpret=cfg.attention_interpret,
            )
            x = mp_sum(x, self.attn_proj(o.reshape(b, h, w, c)), cfg.attn_balance)
        if cfg.clip_act:
            x = jnp.clip(x, -cfg.clip_act, cfg.clip_act)
        return L.constrain(x, ("batch", None, None, "act_channels"))


class EDM2UNet(nnx.Module):
    """EDM2's magnitude-preserving U-Net F(x, c_noise, y) (Karras et al. 2024), called with EDM's
    c_noise = log(sigma) / 4 (wrap it in `denoisers.EDMPreconditioned`). Labels enter as
    sqrt(num_classes) one_hot(y) (the null class num_classes: the zero vector) through an MP linear
    layer MP-summed with the noise embedding. The log-variance head (`logvar_fourier_*`,
    `logvar_linear`) is evaluated by `logvar_from_params(params, t)`, not by `__call__`.
    """

    def __init__(self, cfg: EDM2UNetConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
        cblock, cemb = cfg.level_channels, cfg.emb_channels
        self.out_gain = L._param(L.zeros_init, rngs.params(), (), cfg.storage_dtype, ())
        self.emb_fourier_freqs, self.emb_fourier_phases = _fourier_params(cfg.noise_channels, rngs)
        self.emb_noise = MPConv(cfg.noise_channels, cemb, None, names=(None, "embed"), **dt)
        self.emb_label = (
            MPConv(cfg.num_classes, cemb, None, names=("classes", "embed"), **dt) if cfg.num_classes else None
        )
        self.logvar_fourier_freqs, self.logvar_fourier_phases = _fourier_params(cfg.logvar_channels, rngs)
        self.logvar_linear = MPConv(cfg.logvar_channels, 1, None, names=(None, None), **dt)

        def block(cin, cout, flavor, resample="keep", attention=False):
            return EDM2Block(
                cfg, cin, cout, flavor=flavor, resample=resample, attention=attention, rngs=rngs, dt=dict(dt)
            )

        enc: dict[str, nnx.Module] = {}
        cout = cfg.in_channels + 1
        for level, channels in enumerate(cblock):
            res = cfg.hw[0] >> level
            if level == 0:
                enc[f"{res}x{res}_conv"] = _conv(cout, channels, 3, dt)
                cout = channels
            else:
                enc[f"{res}x{res}_down"] = block(cout, cout, "enc", "down")
            for idx in range(cfg.num_blocks):
                enc[f"{res}x{res}_block{idx}"] = block(cout, channels, "enc", attention=res in cfg.attn_resolutions)
                cout = channels
        skips = [channels for channels in self._enc_out_channels(cblock)]
        dec: dict[str, nnx.Module] = {}
        for level, channels in reversed(list(enumerate(cblock))):
            res = cfg.hw[0] >> level
            if level == len(cblock) - 1:
                dec[f"{res}x{res}_in0"] = block(cout, cout, "dec", attention=True)
                dec[f"{res}x{res}_in1"] = block(cout, cout, "dec")
            else:
                dec[f"{res}x{res}_up"] = block(cout, cout, "dec", "up")
            for idx in range(cfg.num_blocks + 1):
                dec[f"{res}x{res}_block{idx}"] = block(
                    cout + skips.pop(), channels, "dec", attention=res in cfg.attn_resolutions
                )
                cout = channels
        self.enc, self.dec = nnx.Dict(enc), nnx.Dict(dec)
        self.enc_order, self.dec_order = tuple(enc), tuple(dec)
        self.out_conv = _conv(cout, cfg.in_channels, 3, dt)

    def _enc_out_channels(self, cblock) -> list[int]:
        """Output channels of each encoder layer, in order (the skip connections)."""
        out = []
        for level, channels in enumerate(cblock):
            out += ([channels] if level == 0 else [out[-1]]) + [channels] * self.cfg.num_blocks
        return out

    def _embedding(self, t, y):
        cfg = self.cfg
        emb = self.emb_noise(
            mp_fourier(
                cfg.time_scale * t,
                jax.lax.stop_gradient(self.emb_fourier_freqs[...]),
                jax.lax.stop_gradient(self.emb_fourier_phases[...]),
            )
        )
        if self.emb_label is not None:
            one_hot = jax.nn.one_hot(y, cfg.num_classes, dtype=jnp.float32) * math.sqrt(cfg.num_classes)
            emb = mp_sum(emb, self.emb_label(one_hot), cfg.label_balance)
        return mp_silu(emb)

    def __call__(self, x, t, y=None, *, train: bool = False, rngs=None):
        cfg = self.cfg
        t, y = L.check_image_call(x, t, y, cfg, "EDM2UNet")
        emb = self._embedding(t, y).astype(cfg.compute_dtype)
        num_blocks = len(self.enc_order) + len(self.dec_order)
        keys = iter(L.dropout_keys(rngs, train, cfg.dropout, num_blocks))
        run = L.block_runner(cfg.remat)

        h = x.astype(cfg.compute_dtype)
        h = jnp.concatenate([h, jnp.ones_like(h[..., :1])], axis=-1)  # the constant channel
        skips = []
        for name in self.enc_order:
            layer = self.enc[name]
            h = layer(h) if name.endswith("_conv") else run(layer, h, emb, next(keys))
            skips.append(h)
        for name in self.dec_order:
            if "_block" in name:
                h = mp_cat(h, skips.pop(), cfg.concat_balance)
            h = run(self.dec[name], h, emb, next(keys))
        return self.out_conv(h, gain=self.out_gain[...]).astype(jnp.float32)


def logvar_from_params(params: dict, t: jax.Array, *, time_scale: float = 1.0) -> jax.Array:
    """The uncertainty head u(c_noise) of an EDM2UNet's params (as `models.functional` returns them),
    without the U-Net: (batch,) float32."""
    fixed = jax.lax.stop_gradient  # the Fourier features are buffers in EDM2, never trained
    features = mp_fourier(time_scale * t, fixed(params["logvar_fourier_freqs"]), fixed(params["logvar_fourier_phases"]))
    return jnp.dot(features, mp_weight(params["logvar_linear"]["weight"]))[:, 0]


def forced_weight_normalization(is_weight=None) -> optax.GradientTransformation:
    """An optax transform, last in a chain, that makes the updated weights W + u unit-RMS per
    output column again (EDM2 Eq. 66, "forced weight normalisation": the stored weights keep norm
    sqrt(fan_in), so the effective learning rate does not decay as they grow). is_weight(path, leaf)
    selects the leaves (default: arrays of rank >= 2 whose path ends in "weight", EDM2UNet's MP layers)."""

    def selected(path, leaf) -> bool:
        if is_weight is not None:
            return bool(is_weight(path, leaf))
        last = path[-1] if path else None
        return getattr(last, "key", getattr(last, "name", None)) == "weight" and jnp.ndim(leaf) >= 2

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("forced_weight_normalization needs the params (optax update(updates, state, params))")

        def project(path, u, p):
            if not selected(path, p):
                return u
            w = p + u
            return (normalize(w, tuple(range(w.ndim - 1))) - p).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(project, updates, params), state

    return optax.GradientTransformation(init, update)


def params_from_edm2_state(state: dict) -> dict:
    """EDM2UNet params (as `models.functional` returns them) from the state dict of NVlabs/edm2's
    `Precond` ({name: array}, torch layouts: conv (out, in, k, k), linear (out, in)), e.g. read from
    a network pickle: "unet.enc.8x8_block0.conv_res0.weight" -> params["enc"]["8x8_block0"]
    ["conv_res0"]["weight"] as (k, k, in, out); the Fourier buffers become "<name>_freqs" /
    "<name>_phases"."""
    params: dict = {}
    for name, value in state.items():
        value = np.asarray(value, np.float32)
        name = name.removeprefix("unet.")
        for buffer in ("emb_fourier", "logvar_fourier"):
            if name.startswith(buffer + "."):
                name = name.replace(".", "_", 1)
        *path, leaf = name.split(".")
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return params
