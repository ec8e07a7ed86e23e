"""Tile-level FlashAttention math (and a little kernel plumbing) shared by the GPU (Triton) and
TPU (Mosaic) kernels.

Everything here acts on values already loaded from refs: q (bq, d), k and v (bk, d), a key bias row
(1, bk) (0 or -inf), and per-row statistics kept as columns (bq, 1), all in f32 except the matmul
operands, which stay in the input dtype with f32 accumulation (FlashAttention-2, Dao 2023).
"""

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Running-max start value: finite so that (m_prev - m_next) never becomes -inf - (-inf).
ROW_MAX_INIT = float(jnp.finfo(jnp.float32).min)

_NN = (((1,), (0,)), ((), ()))  # (m, k) @ (k, n)
_NT = (((1,), (1,)), ((), ()))  # (m, k) @ (n, k)^T


def matmul_precision(dtype):
    """True f32 products for f32 inputs (Triton would otherwise use TF32); native otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot_nn(a, b, precision):
    return lax.dot_general(a, b, _NN, precision=precision, preferred_element_type=jnp.float32)


def dot_nt(a, b, precision):
    return lax.dot_general(a, b, _NT, precision=precision, preferred_element_type=jnp.float32)


def block_scores(q, k, bias_row, scale, precision):
    """S = scale * q k^T + bias, shape (bq, bk), f32. bias_row is (1, bk) or None."""
    s = dot_nt(q, k, precision) * scale
    return s if bias_row is None else s + bias_row


def online_softmax_step(s, v, m_prev, l_prev, acc_prev, precision):
    """One key block of the online softmax (Milakov & Gimelshein 2018; FlashAttention-2 Alg. 1).

    m' = max(m, rowmax S),  P = exp(S - m'),  l' = e^(m - m') l + rowsum P,
    acc' = e^(m - m') acc + P V.
    """
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    rescale = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next)
    l_next = rescale * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_next = rescale * acc_prev + dot_nn(p.astype(v.dtype), v, precision)
    return m_next, l_next, acc_next


def finalize_rows(m, l, acc):
    """out = acc / l and lse = m + log l; a row with no attended key gets out = 0, lse = +inf."""
    empty = l == 0.0
    safe_l = jnp.where(empty, 1.0, l)
    out = acc / safe_l
    lse = jnp.where(empty, jnp.inf, m + jnp.log(safe_l))
    return out, lse


def block_backward(q, k, v, do, bias_row, lse_col, delta_col, scale, precision):
    """Recomputes one (bq, bk) tile of the backward pass from the saved log-sum-exp.

        P = exp(S - lse),  dP = dO V^T,  dS = P * (dP - delta),  delta_i = sum_d dO_id O_id.
    Returns (P, dS) in f32; then dV = P^T dO, dK = scale dS^T Q, dQ = scale dS K.
    """
    s = block_scores(q, k, bias_row, scale, precision)
    p = jnp.exp(s - lse_col)
    dp = dot_nt(do, v, precision)
    ds = p * (dp - delta_col)
    return p, ds


def block_tangent(q, k, v, tq, tk, tv, bias_row, lse_col, scale, precision):
    """One (bq, bk) tile of the forward-mode (JVP) pass, from the saved log-sum-exp.

    With P = softmax(S) and dS = scale (dQ K^T + Q dK^T) (the mask has no tangent), the tangent of
    O = P V is  dO = (P * dS) V + P dV - mu O,  mu_i = sum_j P_ij dS_ij  (from dP = P * (dS - mu)).
    Returns this tile's share of (P * dS) V + P dV, (bq, d), and of mu, (bq, 1), both f32; summed
    over key tiles they need no rescaling because P = exp(S - lse) is already normalized.
    """
    s = block_scores(q, k, bias_row, scale, precision)
    p = jnp.exp(s - lse_col)
    ds = (dot_nt(tq, k, precision) + dot_nt(q, tk, precision)) * scale
    p_ds = p * ds
    acc = dot_nn(p_ds.astype(v.dtype), v, precision) + dot_nn(p.astype(tv.dtype), tv, precision)
    return acc, jnp.sum(p_ds, axis=1, keepdims=True)


def finalize_tangent(acc, mu, out):
    """dO = acc - mu * O (f32), where acc and mu are summed over all key tiles."""
    return acc - mu * out.astype(jnp.float32)


def launch(kernel, args, in_specs, bias, bias_spec, *, options: dict, **pallas_call_args):
    """pl.pallas_call of kernel(*arg_refs, bias_ref, *out_refs, *scratch, **options): the bias (or
    None, then the kernel sees bias_ref None) is the last input."""
    kernel = functools.partial(with_optional_bias(kernel, bias is not None, num_inputs=len(args)), **options)
    if bias is not None:
        args, in_specs = [*args, bias], [*in_specs, bias_spec]
    return pl.pallas_call(kernel, in_specs=in_specs, **pallas_call_args)(*args)


def with_optional_bias(kernel, has_bias: bool, *, num_inputs: int):
    """Adapts kernel(*input_refs, bias_ref, *output_and_scratch_refs) to a call without a bias
    operand (bias_ref becomes None), so each kernel is written once."""
    if has_bias:
        return kernel

    @functools.wraps(kernel)
    def without_bias(*refs, **kwargs):
        return kernel(*refs[:num_inputs], None, *refs[num_inputs:], **kwargs)

    return without_bias
