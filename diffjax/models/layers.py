"""Building blocks shared by the U-Nets and DiT: dense/conv layers with logical axis names, norms,
the one attention layer, time/class embeddings, FIR resampling, dropout and rematerialization.

Every parameter is created through `_param`, which attaches its logical axis names as NNX sharding
metadata (`out_sharding`, with eager sharding off so models build without a mesh). See
`diffjax.models.LOGICAL_AXES` for the list of names.

Precision: parameters are stored in `param_dtype`; matmuls and convolutions run in `dtype` (both
operands cast); normalization statistics, softmax and time embeddings are computed in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd

from diffjax import kernels

Names = tuple  # a tuple of logical axis names (str or None), one per array axis

# Remat policy names -> jax.checkpoint policies (None means "save nothing").
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ("none",) + tuple(REMAT_POLICIES)


# ----------------------------------------------------------------------------------------------
# Parameters and initializers
# ----------------------------------------------------------------------------------------------


def _param(init: Callable, key: jax.Array, shape: Sequence[int], dtype, names: Names) -> nnx.Param:
    """A Param holding `init(key, shape, dtype)` with logical axis `names` as sharding metadata."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match parameter shape {tuple(shape)}")
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False)


def zeros_init(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def scaled_fan_avg_uniform(scale: float = 1.0, in_axis=-2, out_axis=-1) -> Callable:
    """score-SDE's `default_init`: variance scaling, fan_avg, uniform; scale 0 gives zeros."""
    if scale == 0.0:
        return zeros_init
    return jax.nn.initializers.variance_scaling(scale, "fan_avg", "uniform", in_axis, out_axis)


def torch_default_init(in_axis=-2, out_axis=-1) -> Callable:
    """PyTorch's default Linear/Conv weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (used by ADM)."""
    return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis, out_axis)


def normal_init(stddev: float) -> Callable:
    return jax.nn.initializers.normal(stddev)


# ----------------------------------------------------------------------------------------------
# Activation sharding constraints (no-ops unless a mesh and logical axis rules are active)
# ----------------------------------------------------------------------------------------------


def logical_to_mesh_spec(names: Names, rules) -> jax.sharding.PartitionSpec:
    """PartitionSpec for logical `names` under `rules` ((logical, mesh axes) pairs, first match
    wins); names without a rule are replicated (None)."""
    table: dict = {}
    for logical, mesh_axes in rules:
        table.setdefault(logical, mesh_axes)
    return jax.sharding.PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def constrain(x: jax.Array, names: Names) -> jax.Array:
    """`with_sharding_constraint` on logical activation axis `names` (see LOGICAL_AXES).

    A no-op unless called under both a mesh (`jax.set_mesh`) and logical axis rules
    (`nnx.logical_axis_rules(rules)`); the rules map logical names to mesh axes.
    """
    rules = flax_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(names, rules))


# ----------------------------------------------------------------------------------------------
# Dense, conv, norms
# ----------------------------------------------------------------------------------------------


class DenseGeneral(nnx.Module):
    """y = x W + b, contracting the last len(in_shape) axes of x with W of shape in_shape + out_shape."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        names: Names,
        kernel_init: Callable,
        bias_init: Callable = zeros_init,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.num_in = len(in_shape)
        self.dtype = dtype
        self.kernel = _param(kernel_init, rngs.params(), in_shape + out_shape, param_dtype, names)
        self.bias = (
            _param(bias_init, rngs.params(), out_shape, param_dtype, names[len(in_shape) :]) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        n = self.num_in
        contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def Dense(in_features: int, out_features: int, *, names: Names, **kwargs) -> DenseGeneral:
    """A plain (in_features -> out_features) dense layer; `names` = (in_name, out_name)."""
    return DenseGeneral((in_features,), (out_features,), names=names, **kwargs)


class Conv2d(nnx.Module):
    """NHWC 2-D convolution, kernel (k, k, in, out) named (None, None, "conv_in", "conv_out")."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding="SAME",
        kernel_init: Callable,
        use_bias: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.stride = stride
        self.padding = padding
        self.dtype = dtype
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = _param(kernel_init, rngs.params(), shape, param_dtype, (None, None, "conv_in", "conv_out"))
        self.bias = _param(zeros_init, rngs.params(), (out_channels,), param_dtype, ("conv_out",)) if use_bias else None

    def __call__(self, x: jax.Array, *, lhs_dilation: int = 1, padding=None) -> jax.Array:
        y = conv2d(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            stride=self.stride,
            padding=self.padding if padding is None else padding,
            lhs_dilation=lhs_dilation,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def conv2d(x, kernel, *, stride=1, padding="SAME", lhs_dilation=1, groups=1):
    """NHWC x HWIO convolution (thin wrapper over lax.conv_general_dilated)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=padding,
        lhs_dilation=(lhs_dilation, lhs_dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


class GroupNorm(nnx.Module):
    """Group normalization (Wu & He 2018) over NHWC maps; statistics in float32."""

    def __init__(
        self, channels: int, groups: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        self.groups, self.eps, self.dtype = groups, eps, dtype
        self.scale = _param(ones_init, rngs.params(), (channels,), param_dtype, ("norm",))
        self.bias = _param(zeros_init, rngs.params(), (channels,), param_dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        size = c // self.groups
        x32 = x.astype(jnp.float32).reshape(b, h * w, c)

        def group_mean(v):  # (b, h*w, c) -> (b, 1, c): the mean over each channel's group and the pixels
            group_means = v.sum(1).reshape(b, self.groups, size).sum(-1) / (h * w * size)
            return jnp.broadcast_to(group_means[:, :, None], (b, self.groups, size)).reshape(b, c)[:, None, :]

        # Summing over the pixels first, per channel, then over each group's channels, rather than one
        # reduction over a (b, h, w, groups, size) view: the CPU U-Net train step 1.11x faster split
        # into 2 devices, 1.05x on one (experiments/results/cpu_group_norm.md).
        centred = x32 - group_mean(x32)
        inv_std = jax.lax.rsqrt(group_mean(jnp.square(centred)) + self.eps)
        y = centred * (inv_std * self.scale[...].astype(jnp.float32)) + self.bias[...].astype(jnp.float32)
        return y.reshape(b, h, w, c).astype(self.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without learned affine (DiT's adaLN blocks); statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `key` is None (inference) or rate == 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


# ----------------------------------------------------------------------------------------------
# Attention: the only place models compute attention
# ----------------------------------------------------------------------------------------------


def activation_spec(names: Names) -> jax.sharding.PartitionSpec | None:
    """The PartitionSpec of logical activation `names` under the active mesh and rules (None when
    no mesh or no rules are active)."""
    rules = flax_spmd.get_logical_axis_rules()
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return None
    return logical_to_mesh_spec(names, rules)


@functools.partial(jax.jit, static_argnames=("softmax_scale", "implementation", "interpret"))
def diffjax_attention(q, k, v, *, softmax_scale: float, implementation: str | None, interpret: bool = False):
    """softmax(q k^T * scale) v on (batch, seq, heads, head_dim) via `diffjax.kernels.flash_attention`.

    Wrapped in its own jit so FLOP counting (`diffjax.models.forward_macs`) can recognise it by name
    and count 2 * batch * heads * seq_q * seq_k * head_dim multiply-adds whatever kernel runs inside.
    """
    return kernels.flash_attention(
        q,
        k,
        v,
        softmax_scale=softmax_scale,
        implementation=implementation,
        interpret=interpret,
        partition_spec=activation_spec(("batch", "seq", "act_heads", "act_kv")),
    )


class Attention(nnx.Module):
    """Multi-head self-attention on tokens (batch, seq, features) (Vaswani et al. 2017).

    qkv kernel (features, 3, heads, head_dim) named ("embed", None, "heads", "kv");
    output kernel (heads, head_dim, features) named ("heads", "kv", "embed").
    """

    def __init__(
        self,
        features: int,
        num_heads: int,
        *,
        qkv_init: Callable,
        out_init: Callable,
        attention_impl: str | None = None,
        attention_interpret: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if features % num_heads:
            raise ValueError(f"Attention: features {features} not divisible by num_heads {num_heads}")
        head_dim = features // num_heads
        self.head_dim, self.attention_impl, self.attention_interpret = head_dim, attention_impl, attention_interpret
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = DenseGeneral(
            (features,), (3, num_heads, head_dim), names=("embed", None, "heads", "kv"), kernel_init=qkv_init, **common
        )
        self.out = DenseGeneral(
            (num_heads, head_dim), (features,), names=("heads", "kv", "embed"), kernel_init=out_init, **common
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        qkv = self.qkv(x)  # (batch, seq, 3, heads, head_dim)
        q, k, v = (constrain(qkv[:, :, i], ("batch", "seq", "act_heads", "act_kv")) for i in range(3))
        o = diffjax_attention(
            q,
            k,
            v,
            softmax_scale=self.head_dim**-0.5,
            implementation=self.attention_impl,
            interpret=self.attention_interpret,
        )
        return self.out(o)


# ----------------------------------------------------------------------------------------------
# Time and class embeddings
# ----------------------------------------------------------------------------------------------


def sinusoidal_embedding(
    t: jax.Array, dim: int, *, max_period: float = 10000.0, cos_first: bool = True, endpoint: bool = False
) -> jax.Array:
    """Transformer sinusoidal features of t (Vaswani et al. 2017), float32, shape (batch, dim).

    freqs_i = max_period^(-i / n), i < dim/2, with n = dim/2 (ADM, DiT) or dim/2 - 1 (endpoint=True:
    DDPM, score-SDE); features [cos, sin] (cos_first) or [sin, cos].
    """
    half = dim // 2
    denom = max(half - 1, 1) if endpoint else half
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / denom)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    parts = [jnp.cos(args), jnp.sin(args)] if cos_first else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def gaussian_fourier_embedding(t: jax.Array, freqs: jax.Array) -> jax.Array:
    """Fourier features [sin(2 pi t w), cos(2 pi t w)] of t for frequencies `freqs` (Tancik et al. 2020;
    NCSN++ in Song et al. 2021, where w ~ N(0, scale^2) is drawn once and kept fixed). Output
    (batch, 2 * len(freqs)), float32.
    """
    proj = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None] * (2 * np.pi)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class FourierFeatures(nnx.Module):
    """NCSN++'s Gaussian Fourier time features with the frequencies stored as a parameter `freqs`
    (w ~ N(0, scale^2) at init, like score-SDE's `W` and EDM's `freqs` buffer) so a trained network's
    frequencies load with it. The frequencies get no gradient (stop_gradient), as in the references."""

    def __init__(self, num_features: int, *, scale: float, rngs: nnx.Rngs):
        init = lambda key, shape, dtype: scale * jax.random.normal(key, shape, dtype)  # noqa: E731
        self.freqs = _param(init, rngs.params(), (num_features,), jnp.float32, (None,))

    def __call__(self, t: jax.Array) -> jax.Array:
        return gaussian_fourier_embedding(t, jax.lax.stop_gradient(self.freqs[...]))


class ClassEmbedding(nnx.Module):
    """Table of num_classes + 1 rows; row `num_classes` is the null class used for classifier-free
    guidance (Ho & Salimans 2022) and when no labels are given."""

    def __init__(
        self,
        num_classes: int,
        features: int,
        *,
        init: Callable = normal_init(0.02),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_classes, self.dtype = num_classes, dtype
        self.table = _param(init, rngs.params(), (num_classes + 1, features), param_dtype, ("classes", "embed"))

    def __call__(self, y: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], y, axis=0).astype(self.dtype)


def labels_or_null(y: jax.Array | None, batch: int, num_classes: int) -> jax.Array | None:
    """Validate labels against the model's classes; y=None means the null class for every example."""
    if num_classes == 0:
        if y is not None:
            raise ValueError("labels y were given to an unconditional model (num_classes=0)")
        return None
    if y is None:
        return jnp.full((batch,), num_classes, jnp.int32)
    y = jnp.asarray(y)
    if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"labels y must be integers of shape ({batch},), got {y.dtype}{y.shape}")
    return y


def drop_labels(key: jax.Array, y: jax.Array, rate: float, num_classes: int) -> jax.Array:
    """Replace each label by the null class `num_classes` with probability `rate` (classifier-free
    guidance training, Ho & Salimans 2022). Pure; one Bernoulli draw per example."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"drop_labels: rate must be in [0, 1], got {rate}")
    drop = jax.random.bernoulli(key, rate, jnp.shape(y))
    return jnp.where(drop, jnp.asarray(num_classes, jnp.asarray(y).dtype), y)


def check_time(t: jax.Array, batch: int) -> jax.Array:
    """Noise-conditioning input: shape (batch,) (a scalar is broadcast)."""
    t = jnp.asarray(t)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},) (one value per example), got {t.shape}")
    return t.astype(jnp.float32)


def check_image(x: jax.Array, image_size: tuple[int, int], channels: int, what: str) -> None:
    if x.ndim != 4 or tuple(x.shape[1:3]) != tuple(image_size) or x.shape[3] != channels:
        raise ValueError(
            f"{what} expects NHWC input (batch, {image_size[0]}, {image_size[1]}, "
            f"{channels}), got shape {tuple(x.shape)}"
        )


def check_image_call(x: jax.Array, t, y, cfg, what: str) -> tuple[jax.Array, jax.Array | None]:
    """An image model's call model(x, t, y) checked against its config (`check_image`, `check_time`,
    `labels_or_null`): returns (t of shape (batch,), the labels or None)."""
    check_image(x, cfg.hw, cfg.in_channels, what)
    batch = x.shape[0]
    return check_time(t, batch), labels_or_null(y, batch, cfg.num_classes)


def dropout_keys(rngs, train: bool, rate: float, count: int) -> list:
    """One dropout key per block when training with dropout; otherwise Nones (no randomness needed).
    rngs: an `nnx.Rngs` with a "dropout" stream, or a key."""
    if not train or rate == 0.0:
        return [None] * count
    if rngs is None:
        raise ValueError("train=True with dropout > 0 needs call-time rngs (e.g. nnx.Rngs(dropout=key))")
    if isinstance(rngs, jax.Array):
        return list(jax.random.split(rngs, count))
    return list(jax.random.split(rngs.dropout(), count))


# ----------------------------------------------------------------------------------------------
# Resampling (nearest / box and FIR filters of StyleGAN2, used by NCSN++)
# ----------------------------------------------------------------------------------------------


def upsample_nearest(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_mean(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _fir_kernel(k: Sequence[float], gain: float) -> np.ndarray:
    k = np.asarray(k, np.float32)
    k2 = np.outer(k, k)
    return k2 / k2.sum() * gain


def upfirdn2d(x: jax.Array, k2: np.ndarray, *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> jax.Array:
    """Upsample by zero insertion, pad, convolve with FIR `k2` per channel, downsample (StyleGAN2)."""
    c = x.shape[-1]
    kernel = jnp.asarray(k2[::-1, ::-1].copy(), x.dtype)[:, :, None, None]
    kernel = jnp.tile(kernel, (1, 1, 1, c))
    # lhs_dilation inserts up-1 zeros *between* samples; upfirdn also has them after the last one.
    padding = [(pad[0], pad[1] + up - 1)] * 2
    return conv2d(x, kernel, stride=down, padding=padding, lhs_dilation=up, groups=c)


def fir_upsample(x: jax.Array, k: Sequence[float]) -> jax.Array:
    k2 = _fir_kernel(k, 4.0)
    p = k2.shape[0] - 2
    return upfirdn2d(x, k2, up=2, pad=((p + 1) // 2 + 1, p // 2))


def fir_downsample(x: jax.Array, k: Sequence[float]) -> jax.Array:
    k2 = _fir_kernel(k, 1.0)
    p = k2.shape[0] - 2
    return upfirdn2d(x, k2, down=2, pad=((p + 1) // 2, p // 2))


class Resample(nnx.Module):
    """x2 up- or down-sampling, optionally with a 3x3 conv (in -> out channels) and FIR filtering.

    Without FIR (fir_kernel None): nearest up (+conv) / stride-2 conv after `down_pad` padding ((0, 1):
    DDPM and score-SDE; (1, 1): ADM), or 2x2 mean without conv. With an FIR kernel: StyleGAN2's fused
    up-conv / conv-down with it (NCSN++).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        up: bool,
        with_conv: bool,
        kernel_init: Callable,
        fir_kernel: Sequence[float] | None = None,
        down_pad: tuple[int, int] = (0, 1),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not with_conv and in_channels != out_channels:
            raise ValueError("Resample without conv cannot change the number of channels")
        self.up, self.with_conv, self.down_pad = up, with_conv, tuple(down_pad)
        self.fir_kernel = None if fir_kernel is None else tuple(float(v) for v in fir_kernel)
        fir = self.fir_kernel is not None
        self.conv = (
            Conv2d(
                in_channels,
                out_channels,
                3,
                stride=1 if up else 2,
                padding="SAME" if up and not fir else "VALID",
                kernel_init=kernel_init,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if with_conv
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        fir = self.fir_kernel is not None
        if not self.with_conv:
            if self.up:
                return fir_upsample(x, self.fir_kernel) if fir else upsample_nearest(x)
            return fir_downsample(x, self.fir_kernel) if fir else downsample_mean(x)
        if not fir:
            if self.up:
                return self.conv(upsample_nearest(x))
            return self.conv(jnp.pad(x, ((0, 0), self.down_pad, self.down_pad, (0, 0))))
        k2 = _fir_kernel(self.fir_kernel, 4.0 if self.up else 1.0)
        if self.up:
            # Transposed 3x3 conv with stride 2 (zero insertion, pad 2), then the FIR filter.
            h = self.conv(x, lhs_dilation=2, padding=[(2, 2), (2, 2)])
            p = k2.shape[0] - 2 - 2
            return upfirdn2d(h, k2, pad=((p + 1) // 2 + 1, p // 2 + 1))
        p = k2.shape[0] - 2 + 2
        h = upfirdn2d(x, k2, pad=((p + 1) // 2, p // 2))
        return self.conv(h, padding="VALID")


# ----------------------------------------------------------------------------------------------
# Rematerialization
# ----------------------------------------------------------------------------------------------


def maybe_remat(fn: Callable, policy_name: str) -> Callable:
    """Wrap `fn` (whose arguments may be NNX modules) in nnx.remat with the named policy."""
    if policy_name == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[policy_name], prevent_cse=True)


def _call(block, *args):
    return block(*args)


def block_runner(policy_name: str) -> Callable:
    """run(block, *args) = block(*args), rematerialized with the named policy."""
    return maybe_remat(_call, policy_name)
