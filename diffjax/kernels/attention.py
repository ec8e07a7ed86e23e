"""`flash_attention`: bidirectional multi-head attention with an optional key-padding mask.

    O = softmax(scale * Q K^T + B) V,     B_bj = 0 where mask[b, j] else -inf

Implementations: "pallas_gpu" (Triton), "pallas_tpu" (Mosaic), both FlashAttention-2 (Dao 2023)
forward and backward that recompute attention blockwise from the saved log-sum-exp, so memory is
linear in sequence length, plus a blockwise tangent kernel for forward mode (`jax.jvp`, as
continuous-time consistency models need; Lu & Song 2024, appendix); "xla" and "cudnn" go through
`jax.nn.dot_product_attention`. This module does the user-facing part: checking inputs, choosing
the implementation, padding to the kernels' tile sizes, and the custom derivatives (a custom JVP
whose tangent is transposed by the flash backward; see `_flash_core` below).
"""

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp

from diffjax.kernels import (
    linear_call_batching,  # noqa: F401 -- registers jax.vmap of linear_call
    pallas_gpu,
    pallas_tpu,
    reference,
)
from diffjax.kernels.tiling import largest_power_of_two_divisor, round_up

IMPLEMENTATIONS = ("xla", "cudnn", "pallas_gpu", "pallas_tpu")
PALLAS_IMPLEMENTATIONS = ("pallas_gpu", "pallas_tpu")
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
MAX_PALLAS_HEAD_DIM = 256
# What `implementation=None` runs on each platform (jax.default_backend()).
DEFAULT_IMPLEMENTATION = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}


def flash_attention(
    q, k, v, *, mask=None, softmax_scale=None, implementation=None, interpret=False, partition_spec=None
):
    """Non-causal attention softmax(scale * q k^T + bias) v, like `jax.nn.dot_product_attention`.

    Args:
      q: queries, (batch, seq_q, heads, head_dim), float32 or bfloat16.
      k, v: keys and values, (batch, seq_k, heads, head_dim), same dtype as q.
      mask: optional key-padding mask, (batch, seq_k) bool; True = this key may be attended to.
        A query whose keys are all masked gets output 0 (and zero gradients).
      softmax_scale: Python float multiplying q k^T; default 1 / sqrt(head_dim).
      implementation: None (best for the platform: "pallas_gpu" on GPU, "pallas_tpu" on TPU, "xla"
        elsewhere), "xla", "cudnn" (bfloat16 only), "pallas_gpu" or "pallas_tpu".
      interpret: run the Pallas kernel in interpret mode (on CPU); needs implementation
        "pallas_gpu" (Pallas HLO interpreter) or "pallas_tpu" (Pallas TPU interpret mode).
        TPU interpret mode synchronizes the devices of a mesh; on a CPU with fewer cores than
        (virtual) devices, it can deadlock (seen with 8 devices on 2 cores).
      partition_spec: how q, k, v are sharded over the current mesh (`jax.set_mesh`), as a
        PartitionSpec (batch, seq, heads, head_dim) of mesh axes. GSPMD cannot split a Pallas
        kernel, so under a mesh the Pallas implementations run per shard inside `jax.shard_map`
        with this spec; only batch and heads may be sharded. Ignored without a mesh and by
        "xla"/"cudnn", which XLA partitions itself.

    Returns:
      (batch, seq_q, heads, head_dim) in q's dtype. Accumulation is in float32 throughout.

    Raises:
      ValueError: on wrong ranks, mismatched shapes, unsupported dtypes or unknown implementation,
        before anything is traced.
    """
    q, k, v, mask, scale, impl = _checked(q, k, v, mask, softmax_scale, implementation, interpret)
    if impl in ("xla", "cudnn"):
        return _dot_product_attention(q, k, v, mask, scale, impl)
    kernel = functools.partial(_pallas_attention, scale=scale, impl=impl, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if partition_spec is None or mesh.empty:
        return kernel(q, k, v, mask)
    return _per_shard(kernel, mesh, partition_spec, q, k, v, mask)


def _per_shard(kernel, mesh, spec, q, k, v, mask):
    """Run `kernel(q, k, v, mask)` on each shard: batch over spec[0], heads over spec[2]."""
    spec = jax.sharding.PartitionSpec(*tuple(spec) + (None,) * (4 - len(tuple(spec))))
    if spec[1] is not None or spec[3] is not None:
        raise ValueError(
            f"partition_spec={spec}: flash attention needs whole sequences and head_dim "
            "on each device; shard only batch (axis 0) and heads (axis 2)."
        )
    qkv_spec = jax.sharding.PartitionSpec(spec[0], None, spec[2], None)
    if mask is None:
        return jax.shard_map(
            lambda q, k, v: kernel(q, k, v, None),
            mesh=mesh,
            in_specs=(qkv_spec,) * 3,
            out_specs=qkv_spec,
            check_vma=False,
        )(q, k, v)
    mask_spec = jax.sharding.PartitionSpec(spec[0], None)
    return jax.shard_map(
        kernel, mesh=mesh, in_specs=(qkv_spec,) * 3 + (mask_spec,), out_specs=qkv_spec, check_vma=False
    )(q, k, v, mask)


def pallas_flash_attention(
    q, k, v, *, mask=None, softmax_scale=None, implementation, interpret=False, block_sizes=None
):
    """`flash_attention` restricted to the Pallas kernels, with explicit tile sizes (for tuning).

    block_sizes: a `GpuBlockSizes` for "pallas_gpu", a `TpuBlockSizes` for "pallas_tpu", or None
    for the defaults. Tiles are still shrunk for short sequences.
    """
    if implementation not in PALLAS_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; allowed: 'pallas_gpu', 'pallas_tpu'.")
    expected = {"pallas_gpu": pallas_gpu.GpuBlockSizes, "pallas_tpu": pallas_tpu.TpuBlockSizes}[implementation]
    if block_sizes is not None and not isinstance(block_sizes, expected):
        raise ValueError(
            f"block_sizes for {implementation!r} must be a {expected.__name__} or None; got {block_sizes!r}."
        )
    q, k, v, mask, scale, impl = _checked(q, k, v, mask, softmax_scale, implementation, interpret)
    return _pallas_attention(q, k, v, mask, scale=scale, impl=impl, interpret=interpret, blocks=block_sizes)


# --------------------------------------------------------------------------------------------------
# input checks (all on static shapes / dtypes, so they run before tracing anything)


def _checked(q, k, v, mask, softmax_scale, implementation, interpret):
    """Validated (q, k, v, mask, scale, implementation); ValueError naming any bad argument."""
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check_qkv(q, k, v)
    if mask is not None:
        mask = jnp.asarray(mask)
        _check_mask(mask, q, k)
    scale = _check_scale(softmax_scale, q.shape[-1])
    impl = _resolve_implementation(implementation, interpret, q)
    return q, k, v, mask, scale, impl


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 (batch, seq, heads, head_dim); got shape {x.shape}.")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; supported: float32, bfloat16.")
        if any(d == 0 for d in x.shape):
            raise ValueError(f"{name} has an empty dimension, shape {x.shape}; all must be >= 1.")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}.")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch, heads and head_dim (only seq may differ).")


def _check_mask(mask, q, k):
    expected = (q.shape[0], k.shape[1])
    if mask.shape != expected:
        raise ValueError(f"mask must be a (batch, seq_k) = {expected} key-padding mask; got shape {mask.shape}.")
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask must have dtype bool (True = attend); got {mask.dtype}.")


def _check_scale(softmax_scale, head_dim) -> float:
    if softmax_scale is None:
        return reference.default_softmax_scale(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise ValueError(f"softmax_scale must be a Python float or None; got {softmax_scale!r}.")
    scale = float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale must be finite and > 0; got {scale}.")
    return scale


def _resolve_implementation(implementation, interpret, q) -> str:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is unknown; allowed: None, "
            + ", ".join(repr(i) for i in IMPLEMENTATIONS)
            + "."
        )
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be True or False; got {interpret!r}.")
    if interpret and implementation not in PALLAS_IMPLEMENTATIONS:
        raise ValueError(
            f"interpret=True runs a Pallas kernel; pass implementation='pallas_gpu' or "
            f"'pallas_tpu' (got {implementation!r})."
        )
    impl = implementation or DEFAULT_IMPLEMENTATION.get(jax.default_backend(), "xla")
    if impl == "cudnn" and q.dtype != jnp.bfloat16:  # cuDNN's flash attention is 16-bit only
        raise ValueError(f"implementation='cudnn' needs bfloat16 inputs; got {q.dtype}.")
    if impl in PALLAS_IMPLEMENTATIONS and q.shape[-1] > MAX_PALLAS_HEAD_DIM:
        raise ValueError(
            f"head_dim={q.shape[-1]} is too large for {impl!r}; at most "
            f"{MAX_PALLAS_HEAD_DIM}. Use implementation='xla'."
        )
    return impl


# --------------------------------------------------------------------------------------------------
# XLA / cuDNN


def _dot_product_attention(q, k, v, mask, scale, impl):
    mask4 = None if mask is None else mask[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask4, scale=scale, implementation=impl)
    if mask is None:
        return out
    # jax.nn gives all-masked rows the mean of v; our convention is 0.
    has_key = jnp.any(mask, axis=1)[:, None, None, None]
    return jnp.where(has_key, out, jnp.zeros_like(out))


# --------------------------------------------------------------------------------------------------
# Pallas: padding, layout, custom VJP


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
    """Static description of one kernel launch (hashable: it is a custom_vjp nondiff argument)."""

    implementation: str
    scale: float
    blocks: pallas_gpu.GpuBlockSizes | pallas_tpu.TpuBlockSizes
    interpret: bool


def _pallas_attention(q, k, v, mask, *, scale, impl, interpret, blocks=None):
    batch, seq_q, heads, head_dim = q.shape
    seq_k = k.shape[1]
    if impl == "pallas_gpu":
        blocks = (blocks or pallas_gpu.GpuBlockSizes()).fitted(seq_q, seq_k)
        padded_d = pallas_gpu.gpu_padded_head_dim(head_dim)
    else:
        blocks = (blocks or pallas_tpu.TpuBlockSizes()).fitted(seq_q, seq_k)
        padded_d = pallas_tpu.tpu_padded_head_dim(head_dim)
    padded_q = round_up(seq_q, blocks.seq_q_multiple)
    padded_k = round_up(seq_k, blocks.seq_k_multiple)

    q_p = _pad_axes(q, {1: padded_q, 3: padded_d})
    k_p = _pad_axes(k, {1: padded_k, 3: padded_d})
    v_p = _pad_axes(v, {1: padded_k, 3: padded_d})
    bias = _key_bias(mask, batch, seq_k, padded_k)
    config = _KernelConfig(impl, scale, blocks, interpret)
    if impl == "pallas_tpu":  # Mosaic tiles want (seq, head_dim) minor: (batch, heads, seq, d)
        to_bhsd = lambda x: jnp.transpose(x, (0, 2, 1, 3))
        out = to_bhsd(_flash_core(config, to_bhsd(q_p), to_bhsd(k_p), to_bhsd(v_p), bias))
    else:
        out = _flash_core(config, q_p, k_p, v_p, bias)
    return out[:, :seq_q, :, :head_dim]


def _pad_axes(x, sizes):
    widths = [(0, sizes.get(axis, n) - n) for axis, n in enumerate(x.shape)]
    return x if all(w == (0, 0) for w in widths) else jnp.pad(x, widths)


def _key_bias(mask, batch, seq_k, padded_k):
    """(batch, padded_k) f32 additive bias: 0 attend, -inf masked or padding; None if all attend."""
    if mask is None and padded_k == seq_k:
        return None
    if mask is None:
        mask = jnp.ones((batch, seq_k), jnp.bool_)
    mask = jnp.pad(mask, ((0, 0), (0, padded_k - seq_k)), constant_values=False)
    return reference.key_padding_bias(mask)


_FLASH_FORWARD = {"pallas_gpu": pallas_gpu.gpu_flash_forward, "pallas_tpu": pallas_tpu.tpu_flash_forward}
_FLASH_BACKWARD = {"pallas_gpu": pallas_gpu.gpu_flash_backward, "pallas_tpu": pallas_tpu.tpu_flash_backward}
_FLASH_TANGENT = {"pallas_gpu": pallas_gpu.gpu_flash_tangent, "pallas_tpu": pallas_tpu.tpu_flash_tangent}


def _kernel_forward(config, q, k, v, bias):
    forward = _FLASH_FORWARD[config.implementation]
    return forward(q, k, v, bias, scale=config.scale, blocks=config.blocks, interpret=config.interpret)


def _kernel_backward(config, q, k, v, bias, out, lse, d_out, d_lse=None):
    backward = _FLASH_BACKWARD[config.implementation]
    return backward(
        q,
        k,
        v,
        bias,
        out,
        lse,
        d_out,
        scale=config.scale,
        blocks=config.blocks,
        interpret=config.interpret,
        d_lse=d_lse,
    )


def _kernel_tangent(config, residuals, tangents):
    """The linear map (tq, tk, tv) -> d out at the point `residuals` = (q, k, v, bias, out, lse)."""
    tangent = _FLASH_TANGENT[config.implementation]
    interpret = _linear_call_interpret(config)
    return tangent(*residuals, *tangents, scale=config.scale, blocks=config.blocks, interpret=interpret)


def _kernel_tangent_transpose(config, residuals, d_out):
    """Transpose of `_kernel_tangent`: the cotangent d_out -> (dq, dk, dv), i.e. the flash backward."""
    backward = _FLASH_BACKWARD[config.implementation]
    interpret = _linear_call_interpret(config)
    return tuple(backward(*residuals, d_out, scale=config.scale, blocks=config.blocks, interpret=interpret))


def _linear_call_interpret(config):
    """`linear_call` cannot lower a callee with effects, and the TPU interpret mode has some (ordered
    callbacks): there, the TPU kernels run on the generic (effect-free) Pallas HLO interpreter."""
    if config.interpret and config.implementation == "pallas_tpu":
        return pallas_tpu.HLO_INTERPRETER
    return config.interpret


# Differentiation structure (both modes use the Pallas kernels; nothing seq_q x seq_k is stored):
#
#   _flash_core           custom_jvp. Its JVP rule runs the forward kernel for (out, lse) and the
#                         tangent kernel for d out. Reverse mode (jax.grad / vjp) linearizes this
#                         rule and transposes the tangent, whose transpose is the flash backward.
#   _flash_forward_with_lse   custom_vjp (out, lse), so that the rule itself can be differentiated
#                         in reverse mode (jax.grad of a function of jax.jvp), by the flash backward.
#   _output_tangent       custom_jvp around a `linear_call`: the tangent kernel with the flash
#                         backward as its transpose. Its own JVP rule (used only when the tangent is
#                         differentiated again) is the same kernel for the tangent-of-tangent part
#                         plus a plain-JAX second derivative in (q, k, v), over query chunks under
#                         jax.checkpoint (arrays of chunk x seq_k, no fused kernel).


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _flash_core(config, q, k, v, bias):
    return _kernel_forward(config, q, k, v, bias)[0]


@_flash_core.defjvp
def _flash_core_jvp(config, primals, tangents):
    q, k, v, bias = primals
    tq, tk, tv, _ = tangents  # the key bias (the mask) has no derivative
    out, lse = _flash_forward_with_lse(config, q, k, v, bias)
    return out, _output_tangent(config, q, k, v, bias, out, lse, tq, tk, tv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_forward_with_lse(config, q, k, v, bias):
    return _kernel_forward(config, q, k, v, bias)


def _flash_forward_with_lse_fwd(config, q, k, v, bias):
    out, lse = _kernel_forward(config, q, k, v, bias)
    return (out, lse), (q, k, v, bias, out, lse)


def _flash_forward_with_lse_bwd(config, residuals, cotangents):
    d_out, d_lse = cotangents
    dq, dk, dv = _kernel_backward(config, *residuals, d_out, d_lse)
    bias = residuals[3]
    d_bias = None if bias is None else jnp.zeros_like(bias)  # the mask is not differentiable
    return dq, dk, dv, d_bias


_flash_forward_with_lse.defvjp(_flash_forward_with_lse_fwd, _flash_forward_with_lse_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _output_tangent(config, q, k, v, bias, out, lse, tq, tk, tv):
    """d out for input tangents (tq, tk, tv) at (q, k, v); out, lse are the forward's, saved."""
    return jax.custom_derivatives.linear_call(
        functools.partial(_kernel_tangent, config),
        functools.partial(_kernel_tangent_transpose, config),
        (q, k, v, bias, out, lse),
        (tq, tk, tv),
    )


def _output_tangent_jvp(config, primals, tangents):
    q, k, v, bias, out, lse, tq, tk, tv = primals
    dq, dk, dv, _, _, _, dtq, dtk, dtv = tangents  # out and lse are functions of q, k, v: no own terms
    t_out = _output_tangent(config, *primals)
    terms = []
    if not _all_symbolic_zeros(dtq, dtk, dtv):  # linear in (tq, tk, tv): the same kernel
        terms.append(_output_tangent(config, q, k, v, bias, out, lse, *_instantiate(dtq, dtk, dtv)))
    if not _all_symbolic_zeros(dq, dk, dv):  # the second derivative in (q, k, v): plain JAX
        terms.append(_second_derivative(config, q, k, v, bias, tq, tk, tv, *_instantiate(dq, dk, dv)))
    return t_out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(t_out)


_output_tangent.defjvp(_output_tangent_jvp, symbolic_zeros=True)


def _all_symbolic_zeros(*tangents):
    return all(isinstance(t, jax.custom_derivatives.SymbolicZero) for t in tangents)


def _instantiate(*tangents):
    return tuple(
        jnp.zeros(t.shape, t.dtype) if isinstance(t, jax.custom_derivatives.SymbolicZero) else t for t in tangents
    )


SECOND_DERIVATIVE_QUERY_CHUNK = 512


def _second_derivative(config, q, k, v, bias, tq, tk, tv, dq, dk, dv):
    """d/d(q, k, v) of the output tangent along (dq, dk, dv), with (tq, tk, tv) fixed, in plain JAX
    over chunks of queries, each under `jax.checkpoint`: reverse mode recomputes a chunk's
    (chunk, seq_k) scores instead of storing all seq_q x seq_k of them."""
    to_bshd = (lambda x: jnp.transpose(x, (0, 2, 1, 3))) if config.implementation == "pallas_tpu" else (lambda x: x)
    q, k, v, tq, tk, tv, dq, dk, dv = map(to_bshd, (q, k, v, tq, tk, tv, dq, dk, dv))
    mask = None if bias is None else bias == 0.0
    batch, seq_q, heads, head_dim = q.shape
    chunk = min(SECOND_DERIVATIVE_QUERY_CHUNK, largest_power_of_two_divisor(seq_q))

    def attend(q, k, v):
        return reference.reference_attention(q, k, v, mask=mask, softmax_scale=config.scale)

    @jax.checkpoint
    def one_chunk(q_i, tq_i, dq_i, k, v, tk, tv, dk, dv):
        tangent = lambda q_i, k, v: jax.jvp(attend, (q_i, k, v), (tq_i, tk, tv))[1]
        return jax.jvp(tangent, (q_i, k, v), (dq_i, dk, dv))[1]

    split = lambda x: jnp.moveaxis(x.reshape(batch, seq_q // chunk, chunk, heads, head_dim), 1, 0)
    chunks = jax.lax.map(lambda xs: one_chunk(*xs, k, v, tk, tv, dk, dv), (split(q), split(tq), split(dq)))
    return to_bshd(jnp.moveaxis(chunks, 0, 1).reshape(batch, seq_q, heads, head_dim))
