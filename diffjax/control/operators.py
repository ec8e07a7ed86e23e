"""Measurement operators y = A(x) + noise_std * n for inverse problems.

An operator is a small immutable pytree with the per-example shapes `in_shape` (of x, without the
batch axis) and `out_shape` (of y), `apply(x)` for a batch x of shape (batch, *in_shape) and, for
a linear operator, `adjoint(y)` = A^T y. Operators with a singular value decomposition
A = U diag(s) V^T (Kawar et al. 2022, DDRM, Sec. 4) also give it in factored form:

    vt(x) = V^T x      (batch, n),  n = prod(in_shape): the spectral coordinates of x
    v(z)  = V z        the inverse of vt
    ut(y) = U^T y      (batch, n), zero where s = 0
    u(z)  = U z        (batch, *out_shape), reading only the entries where s > 0
    singular_values    (n,), zero for the null space of A

so that A x = u(s * vt(x)), A^T y = v(s * ut(y)) and the pseudo-inverse A^+ y = v(s^+ * ut(y)).
The structured operators never form a matrix of size n x n except `DenseLinear`:

    Inpainting       keep a subset of the entries (box or random-pixel masks)     y: (m,)
    GroupAverage     average over groups of entries: `super_resolution` (k x k pooling),
                     `colorization` (mean over channels)
    SeparableBlur    zero-padded separable convolution (box, Gaussian), A = A_rows (x) A_cols
    DenseLinear      any matrix (random projections: compressed sensing)
    FunctionOperator a user's function, linear (adjoint by transposition) or not (no adjoint)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.validation import check_count, check_number, check_positive

__all__ = [
    "Operator",
    "Inpainting",
    "GroupAverage",
    "SeparableBlur",
    "DenseLinear",
    "FunctionOperator",
    "box_inpainting",
    "random_inpainting",
    "super_resolution",
    "colorization",
    "box_blur",
    "gaussian_blur",
    "random_projection",
    "OPERATORS",
    "dense_matrix",
    "Observation",
    "measure",
    "SINGULAR_RTOL",
]


def _per_example_shape(name: str, shape) -> tuple[int, ...]:
    """A per-example shape (no batch axis) as a tuple of positive ints."""
    ok = isinstance(shape, (tuple, list)) and len(shape) >= 1
    ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    if not ok:
        raise ValueError(f"{name} must be a non-empty tuple of positive ints (no batch axis), got {shape!r:.100}")
    return tuple(shape)


class Operator:
    """Base class. Subclasses set `in_shape`, `out_shape` and implement `apply` (and, when linear,
    `adjoint`; with an SVD, `vt`, `v`, `ut`, `u`, `singular_values`)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    linear: ClassVar[bool] = True
    has_svd: ClassVar[bool] = True

    @property
    def in_dim(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_dim(self) -> int:
        return math.prod(self.out_shape)

    # -- shape checks (plain Python, before anything is traced) ----------------------------------
    def check_input(self, x, name: str = "x") -> None:
        """ValueError unless x has shape (batch, *in_shape)."""
        self._check_batch_of(x, name, self.in_shape, "maps data")

    def check_measurement(self, y, name: str = "y") -> None:
        """ValueError unless y has shape (batch, *out_shape)."""
        self._check_batch_of(y, name, self.out_shape, "gives measurements")

    def _check_batch_of(self, x, name: str, per_example_shape, role: str) -> None:
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) < 1 or shape[1:] != tuple(per_example_shape):
            raise ValueError(
                f"{type(self).__name__} {role} of per-example shape {per_example_shape}; {name} has shape "
                f"{shape} (need (batch, *{per_example_shape}))"
            )

    def check_svd(self, method: str) -> None:
        if not self.has_svd:
            raise ValueError(
                f"{method} needs an operator with a singular value decomposition (Inpainting, GroupAverage, "
                f"SeparableBlur, DenseLinear); got {type(self).__name__}"
            )

    # -- the map ----------------------------------------------------------------------------------
    def apply(self, x):
        raise NotImplementedError

    def __call__(self, x):
        return self.apply(x)

    def adjoint(self, y):
        """A^T y (linear operators only)."""
        return self.v(self.singular_values * self.ut(y))

    # -- SVD ----------------------------------------------------------------------------------------
    @property
    def singular_values(self):
        raise NotImplementedError

    def vt(self, x):
        raise NotImplementedError

    def v(self, z):
        raise NotImplementedError

    def ut(self, y):
        raise NotImplementedError

    def u(self, z):
        raise NotImplementedError

    def pinv(self, y):
        """The pseudo-inverse A^+ y = V diag(s^+) U^T y."""
        s = self.singular_values
        inverse = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
        return self.v(inverse * self.ut(y))

    def _flat(self, x):
        return jnp.reshape(x, (x.shape[0], self.in_dim))

    def _unflat(self, z):
        return jnp.reshape(z, (z.shape[0],) + tuple(self.in_shape))


# Singular values below this fraction of the largest are treated as zero (null space), as numpy's
# pinv does with rcond: in float32 they are rounding noise, and inverting them amplifies it.
SINGULAR_RTOL = 1e-5


def _drop_tiny(s):
    return jnp.where(s > SINGULAR_RTOL * jnp.max(s), s, 0.0)


# ------------------------------------------------------------------------------------------------
# Inpainting
# ------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Inpainting(Operator):
    """Keep the entries `observed` (flat indices into x's per-example entries): y = x[observed],
    of shape (m,). V = I, singular values 1 on the kept entries and 0 elsewhere."""

    observed: jax.Array  # (m,) int32, sorted
    in_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def from_mask(cls, mask) -> Inpainting:
        """`mask` (boolean, the per-example shape of x): True where x is observed."""
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.ndim < 1:
            raise ValueError(f"mask must be a boolean array of x's per-example shape, got dtype {mask.dtype}")
        observed = np.flatnonzero(mask)
        if observed.size == 0:
            raise ValueError("mask observes no entry; at least one entry must be True")
        return cls(jnp.asarray(observed, jnp.int32), tuple(int(d) for d in mask.shape))

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (int(self.observed.shape[0]),)

    @property
    def mask(self):
        return jnp.zeros((self.in_dim,), bool).at[self.observed].set(True).reshape(self.in_shape)

    def apply(self, x):
        return self._flat(x)[:, self.observed]

    def adjoint(self, y):
        return self._unflat(jnp.zeros((y.shape[0], self.in_dim), y.dtype).at[:, self.observed].set(y))

    @property
    def singular_values(self):
        return jnp.zeros((self.in_dim,), jnp.float32).at[self.observed].set(1.0)

    def vt(self, x):
        return self._flat(x)

    def v(self, z):
        return self._unflat(z)

    def ut(self, y):
        return jnp.zeros((y.shape[0], self.in_dim), y.dtype).at[:, self.observed].set(y)

    def u(self, z):
        return z[:, self.observed]


def box_inpainting(in_shape, top: int, left: int, height: int, width: int) -> Inpainting:
    """Inpainting of a missing box: rows [top, top + height) and columns [left, left + width) of an
    (H, W, C) image are unobserved, the rest observed."""
    in_shape = _per_example_shape("in_shape", in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"box_inpainting needs an image shape (H, W, C), got {in_shape}")
    h, w, _ = in_shape
    for name, value, lo, hi in (("top", top, 0, h - 1), ("left", left, 0, w - 1)):
        if not (isinstance(value, int) and lo <= value <= hi):
            raise ValueError(f"box_inpainting: {name} must be an int in [{lo}, {hi}], got {value!r}")
    check_count("height", height)
    check_count("width", width)
    if top + height > h or left + width > w:
        raise ValueError(f"box_inpainting: the box {top}+{height} x {left}+{width} leaves the image {h} x {w}")
    mask = np.ones(in_shape, bool)
    mask[top : top + height, left : left + width] = False
    return Inpainting.from_mask(mask)


def random_inpainting(in_shape, fraction_observed: float, seed: int = 0) -> Inpainting:
    """Inpainting of random pixels: each pixel (all channels of it) observed with probability
    `fraction_observed` (at least one is), drawn from numpy's generator with `seed`."""
    in_shape = _per_example_shape("in_shape", in_shape)
    if not (isinstance(fraction_observed, (int, float)) and 0 < fraction_observed <= 1):
        raise ValueError(f"fraction_observed must lie in (0, 1], got {fraction_observed!r}")
    pixels = in_shape[:-1] if len(in_shape) == 3 else in_shape
    keep = np.random.default_rng(seed).random(pixels) < fraction_observed
    keep.flat[0] = keep.flat[0] or not keep.any()
    mask = np.broadcast_to(keep[..., None], in_shape) if len(in_shape) == 3 else keep
    return Inpainting.from_mask(np.array(mask))


# ------------------------------------------------------------------------------------------------
# Averages over groups of entries: super-resolution, colourisation
# ------------------------------------------------------------------------------------------------


def _helmert(g: int) -> np.ndarray:
    """An orthonormal g x g matrix whose first column is ones / sqrt(g)."""
    basis = np.eye(g)
    basis[:, 0] = 1.0
    q, _ = np.linalg.qr(basis)
    return q * np.sign(q[0, 0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class GroupAverage(Operator):
    """y = the mean over groups of g entries of x: `kind` "pool" averages factor x factor blocks of
    an (H, W, C) image per channel (y: (H/f, W/f, C)); "channels" averages the C channels of each
    pixel (y: (H, W, 1)). Per group, V's first column is ones/sqrt(g) with singular value
    1/sqrt(g); the other g - 1 directions are the null space."""

    basis: jax.Array  # (g, g) orthonormal, first column ones / sqrt(g)
    in_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    kind: str = dataclasses.field(metadata=dict(static=True))
    factor: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def group_size(self) -> int:
        return self.factor**2 if self.kind == "pool" else self.in_shape[-1]

    @property
    def out_shape(self) -> tuple[int, ...]:
        h, w, c = self.in_shape
        f = self.factor
        return (h // f, w // f, c) if self.kind == "pool" else (h, w, 1)

    def _groups(self, x):
        """(batch, G, g), groups ordered like y's entries."""
        b = x.shape[0]
        h, w, c = self.in_shape
        if self.kind == "channels":
            return jnp.reshape(x, (b, h * w, c))
        f = self.factor
        x = jnp.reshape(x, (b, h // f, f, w // f, f, c))
        return jnp.reshape(jnp.transpose(x, (0, 1, 3, 5, 2, 4)), (b, -1, f * f))

    def _ungroup(self, groups):
        b = groups.shape[0]
        h, w, c = self.in_shape
        if self.kind == "channels":
            return jnp.reshape(groups, (b, h, w, c))
        f = self.factor
        x = jnp.reshape(groups, (b, h // f, w // f, c, f, f))
        return jnp.reshape(jnp.transpose(x, (0, 1, 4, 2, 5, 3)), (b, h, w, c))

    def apply(self, x):
        return jnp.reshape(jnp.mean(self._groups(x), axis=-1), (x.shape[0],) + self.out_shape)

    def adjoint(self, y):
        g = self.group_size
        flat = jnp.reshape(y, (y.shape[0], -1, 1))
        return self._ungroup(jnp.broadcast_to(flat / g, flat.shape[:2] + (g,)))

    @property
    def singular_values(self):
        g = self.group_size
        per_group = np.zeros(g)
        per_group[0] = 1.0 / math.sqrt(g)
        return jnp.asarray(np.tile(per_group, self.in_dim // g), jnp.float32)

    def vt(self, x):
        return jnp.reshape(self._groups(x) @ self.basis, (x.shape[0], -1))

    def v(self, z):
        g = self.group_size
        return self._ungroup(jnp.reshape(z, (z.shape[0], -1, g)) @ self.basis.T)

    def ut(self, y):
        g = self.group_size
        flat = jnp.reshape(y, (y.shape[0], -1, 1))
        return jnp.reshape(jnp.pad(flat, ((0, 0), (0, 0), (0, g - 1))), (y.shape[0], -1))

    def u(self, z):
        g = self.group_size
        return jnp.reshape(jnp.reshape(z, (z.shape[0], -1, g))[..., 0], (z.shape[0],) + self.out_shape)


def _image_shape(name: str, in_shape) -> tuple[int, int, int]:
    in_shape = _per_example_shape("in_shape", in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"{name} needs an image shape (H, W, C), got {in_shape}")
    return in_shape


def super_resolution(in_shape, factor: int) -> GroupAverage:
    """Super-resolution: y is x average-pooled over factor x factor blocks (per channel)."""
    h, w, c = in_shape = _image_shape("super_resolution", in_shape)
    check_count("factor", factor, minimum=2)
    if h % factor or w % factor:
        raise ValueError(f"super_resolution: factor {factor} must divide the image size {h} x {w}")
    return GroupAverage(jnp.asarray(_helmert(factor * factor), jnp.float32), in_shape, "pool", factor)


def colorization(in_shape) -> GroupAverage:
    """Colourisation: y is the grey image, the mean of x's channels."""
    in_shape = _image_shape("colorization", in_shape)
    if in_shape[-1] < 2:
        raise ValueError(f"colorization needs at least 2 channels, got shape {in_shape}")
    return GroupAverage(jnp.asarray(_helmert(in_shape[-1]), jnp.float32), in_shape, "channels")


# ------------------------------------------------------------------------------------------------
# Separable blur
# ------------------------------------------------------------------------------------------------


def _convolution_matrix(kernel: np.ndarray, size: int) -> np.ndarray:
    """The size x size matrix of the zero-padded 'same' convolution with an odd-length kernel."""
    radius = len(kernel) // 2
    matrix = np.zeros((size, size))
    for i in range(size):
        for k, weight in enumerate(kernel):
            j = i + k - radius
            if 0 <= j < size:
                matrix[i, j] = weight
    return matrix


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class SeparableBlur(Operator):
    """y = A_r x A_c^T per channel of an (H, W, C) image (a zero-padded separable convolution); its
    SVD is the Kronecker product of the two factors' SVDs (DDRM's deblurring operator)."""

    rows: jax.Array  # (H, H)
    cols: jax.Array  # (W, W)
    u_rows: jax.Array
    s_rows: jax.Array
    v_rows: jax.Array
    u_cols: jax.Array
    s_cols: jax.Array
    v_cols: jax.Array
    in_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def from_kernel(cls, kernel, in_shape) -> SeparableBlur:
        """The blur with the 1-D kernel `kernel` (odd length, applied along rows and columns)."""
        h, w, _ = in_shape = _image_shape("SeparableBlur", in_shape)
        kernel = np.asarray(kernel, np.float64)
        if kernel.ndim != 1 or kernel.size % 2 == 0 or not np.all(np.isfinite(kernel)):
            raise ValueError(f"the blur kernel must be a finite 1-D array of odd length, got shape {kernel.shape}")
        factors = []
        for size in (h, w):
            matrix = _convolution_matrix(kernel, size)
            u, s, vt = np.linalg.svd(matrix)
            factors.append((matrix, u, s, vt.T))
        (a_r, u_r, s_r, v_r), (a_c, u_c, s_c, v_c) = factors
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        return cls(f32(a_r), f32(a_c), f32(u_r), f32(s_r), f32(v_r), f32(u_c), f32(s_c), f32(v_c), in_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.in_shape)

    def apply(self, x):
        return jnp.einsum("ij,bjlc,kl->bikc", self.rows, x, self.cols)

    def adjoint(self, y):
        return jnp.einsum("ji,bjlc,lk->bikc", self.rows, y, self.cols)

    @property
    def singular_values(self):
        s = self.s_rows[:, None, None] * self.s_cols[None, :, None]
        return _drop_tiny(jnp.reshape(jnp.broadcast_to(s, tuple(self.in_shape)), (-1,)))

    def vt(self, x):
        return self._flat(jnp.einsum("ji,bjlc,lk->bikc", self.v_rows, x, self.v_cols))

    def v(self, z):
        return jnp.einsum("ij,bjlc,kl->bikc", self.v_rows, self._unflat(z), self.v_cols)

    def ut(self, y):
        return self._flat(jnp.einsum("ji,bjlc,lk->bikc", self.u_rows, y, self.u_cols))

    def u(self, z):
        return jnp.einsum("ij,bjlc,kl->bikc", self.u_rows, self._unflat(z), self.u_cols)


def box_blur(in_shape, size: int) -> SeparableBlur:
    """Box blur: the mean over a size x size window (size odd)."""
    check_count("size", size)
    if size % 2 == 0:
        raise ValueError(f"box_blur size must be odd, got {size}")
    return SeparableBlur.from_kernel(np.full(size, 1.0 / size), in_shape)


def gaussian_blur(in_shape, std: float, size: int | None = None) -> SeparableBlur:
    """Gaussian blur with standard deviation `std` pixels, truncated to `size` taps (odd; default
    2 ceil(3 std) + 1) and normalised to sum 1."""
    check_positive("std", std)
    size = 2 * math.ceil(3 * std) + 1 if size is None else check_count("size", size)
    if size % 2 == 0:
        raise ValueError(f"gaussian_blur size must be odd, got {size}")
    taps = np.arange(size) - size // 2
    kernel = np.exp(-0.5 * (taps / std) ** 2)
    return SeparableBlur.from_kernel(kernel / kernel.sum(), in_shape)


# ------------------------------------------------------------------------------------------------
# Dense matrices and user functions
# ------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class DenseLinear(Operator):
    """y = M x_flat with an (m, n) matrix M, n = prod(in_shape); the SVD is computed once (numpy,
    float64) on construction, so keep n to a few thousand."""

    matrix: jax.Array  # (m, n)
    left: jax.Array  # (m, k) left singular vectors, k = min(m, n)
    right: jax.Array  # (n, n) right singular vectors (columns)
    values: jax.Array  # (n,) singular values, zero-padded
    in_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def from_matrix(cls, matrix, in_shape=None) -> DenseLinear:
        matrix = np.asarray(matrix, np.float64)
        if matrix.ndim != 2 or not np.all(np.isfinite(matrix)):
            raise ValueError(f"matrix must be a finite 2-D array, got shape {matrix.shape}")
        m, n = matrix.shape
        in_shape = (n,) if in_shape is None else _per_example_shape("in_shape", in_shape)
        if math.prod(in_shape) != n:
            raise ValueError(f"the matrix has {n} columns but in_shape {in_shape} has {math.prod(in_shape)} entries")
        u, s, vt = np.linalg.svd(matrix, full_matrices=True)
        k = min(m, n)
        values = np.zeros(n)
        values[:k] = s
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        return cls(f32(matrix), f32(u[:, :k]), f32(vt.T), f32(values), in_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (int(self.matrix.shape[0]),)

    def apply(self, x):
        return self._flat(x) @ self.matrix.T

    def adjoint(self, y):
        return self._unflat(y @ self.matrix)

    @property
    def singular_values(self):
        return _drop_tiny(self.values)

    def vt(self, x):
        return self._flat(x) @ self.right

    def v(self, z):
        return self._unflat(z @ self.right.T)

    def ut(self, y):
        k = self.left.shape[1]
        return jnp.pad(y @ self.left, ((0, 0), (0, self.in_dim - k)))

    def u(self, z):
        return z[:, : self.left.shape[1]] @ self.left.T


def random_projection(in_shape, num_measurements: int, seed: int = 0) -> DenseLinear:
    """Compressed sensing: an (m, n) Gaussian matrix with entries N(0, 1/m) (numpy generator `seed`)."""
    in_shape = _per_example_shape("in_shape", in_shape)
    m = check_count("num_measurements", num_measurements)
    n = math.prod(in_shape)
    matrix = np.random.default_rng(seed).normal(size=(m, n)) / math.sqrt(m)
    return DenseLinear.from_matrix(matrix, in_shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class FunctionOperator(Operator):
    """A user's measurement function `fn(x) -> y` on batches, with declared per-example shapes.
    `linear=True` promises linearity: the adjoint is then jax's transpose of fn. No SVD, so only the
    gradient-based methods (DPS, reward guidance, SMC) accept it."""

    fn: Callable = dataclasses.field(metadata=dict(static=True))
    in_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    out_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    is_linear: bool = dataclasses.field(default=False, metadata=dict(static=True))
    has_svd: ClassVar[bool] = False

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"fn must be callable, got {type(self.fn).__name__}")
        object.__setattr__(self, "in_shape", _per_example_shape("in_shape", self.in_shape))
        object.__setattr__(self, "out_shape", _per_example_shape("out_shape", self.out_shape))
        out = jax.eval_shape(self.fn, jax.ShapeDtypeStruct((1,) + self.in_shape, jnp.float32))
        if getattr(out, "shape", None) != (1,) + self.out_shape:
            raise ValueError(
                f"fn maps a batch of shape {(1,) + self.in_shape} to {getattr(out, 'shape', type(out))}, "
                f"not to the declared {(1,) + self.out_shape}"
            )

    @property
    def linear(self) -> bool:  # type: ignore[override]
        return self.is_linear

    def apply(self, x):
        return self.fn(x)

    def adjoint(self, y):
        if not self.is_linear:
            raise ValueError(
                "FunctionOperator: a nonlinear operator has no adjoint; pass is_linear=True if fn is linear"
            )
        like = jax.ShapeDtypeStruct((y.shape[0],) + self.in_shape, y.dtype)
        (x,) = jax.linear_transpose(self.fn, like)(y)
        return x


# Config names: `OPERATORS[name](in_shape, **options)`.
OPERATORS: dict[str, Callable[..., Operator]] = {
    "box_inpainting": box_inpainting,
    "random_inpainting": random_inpainting,
    "super_resolution": super_resolution,
    "colorization": colorization,
    "box_blur": box_blur,
    "gaussian_blur": gaussian_blur,
    "random_projection": random_projection,
}


def dense_matrix(operator: Operator):
    """The (m, n) matrix of a linear operator, column by column (for small n: tests, closed forms)."""
    if not operator.linear:
        raise ValueError(f"{type(operator).__name__} is not linear")
    eye = jnp.eye(operator.in_dim, dtype=jnp.float32)
    columns = operator.apply(jnp.reshape(eye, (operator.in_dim,) + tuple(operator.in_shape)))
    return jnp.reshape(columns, (operator.in_dim, operator.out_dim)).T


# ------------------------------------------------------------------------------------------------
# A measurement: operator, y and the noise level
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as a static option of a solver
class Observation:
    """y = A(x) + noise_std * n, n ~ N(0, I): the operator, the measurements y of shape
    (batch, *out_shape) (batch 1 is shared by every sample) and noise_std >= 0."""

    operator: Operator
    y: jax.Array
    noise_std: float = 0.0

    def __post_init__(self):
        if not isinstance(self.operator, Operator):
            raise TypeError(f"operator must be a diffjax.control Operator, got {type(self.operator).__name__}")
        noise = check_number("noise_std", self.noise_std)
        if noise < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std!r}")
        object.__setattr__(self, "noise_std", noise)
        self.operator.check_measurement(self.y)
        object.__setattr__(self, "y", jnp.asarray(self.y, jnp.float32))

    def check_batch(self, shape) -> None:
        """ValueError unless samples of `shape` = (batch, *in_shape) fit the operator and y's batch
        is 1 or batch."""
        self.operator.check_input(jax.ShapeDtypeStruct(tuple(shape), jnp.float32), "the sample shape")
        if self.y.shape[0] not in (1, shape[0]):
            raise ValueError(f"y has batch {self.y.shape[0]}; it must be 1 or the sample batch {shape[0]}")

    def residual(self, x):
        """y - A(x), per example."""
        return self.y - self.operator.apply(x)

    def log_likelihood(self, x):
        """log N(y; A(x), noise_std^2 I) per example (noise_std > 0)."""
        r = self.residual(x)
        m = self.operator.out_dim
        sq = jnp.sum(jnp.reshape(r, (r.shape[0], -1)) ** 2, axis=1)
        var = self.noise_std**2
        return -0.5 * sq / var - 0.5 * m * math.log(2 * math.pi * var)


def measure(operator: Operator, key, x, noise_std: float = 0.0) -> Observation:
    """The observation y = A(x) + noise_std * n of a batch x."""
    operator.check_input(x)
    noise = check_number("noise_std", noise_std)
    if noise < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
    y = operator.apply(x)
    if noise > 0:
        y = y + noise * jax.random.normal(key, y.shape, y.dtype)
    return Observation(operator, y, noise)
