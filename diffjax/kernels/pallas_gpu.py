"""FlashAttention-2 forward and backward as Pallas kernels on Triton (NVIDIA / AMD GPUs).

Layout (batch, seq, heads, head_dim), read in place. One program owns one block of rows and loops
over the other sequence with `fori_loop`; nothing of size seq x seq is ever stored.

  forward:  grid (q blocks, batch, heads)  -> out, lse (batch, heads, seq_q)
  dK, dV:   grid (k blocks, batch, heads), loop over q blocks
  dQ:       grid (q blocks, batch, heads), loop over k blocks
  tangent:  grid (q blocks, batch, heads), loop over k blocks (forward mode, from the saved lse)

Callers pad: seq_q a multiple of block_q, seq_k of block_k, head_dim a power of two >= 16 (Triton
tensors are powers of two); padded keys are masked through the bias. See attention.py.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from diffjax.kernels import block_math, tiling

SMALLEST_BLOCK = 16  # Triton's dot needs every matmul dimension >= 16


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes(tiling.TileSizes):
    """Tile sizes and Triton launch parameters (powers of two). Tune with the benchmark."""

    smallest: ClassVar[int] = SMALLEST_BLOCK

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = None  # None: 4 for head_dim <= 64, else 8
    num_stages: int = 2

    def warps(self, head_dim: int) -> int:
        if self.num_warps is not None:
            return self.num_warps
        return 4 if head_dim <= 64 else 8


def gpu_padded_head_dim(head_dim: int) -> int:
    """Triton tensors have power-of-two sizes: 64 -> 64, 72 -> 128, 8 -> 16."""
    return max(SMALLEST_BLOCK, 1 << (head_dim - 1).bit_length())


def _compiler_params(blocks: GpuBlockSizes, head_dim: int):
    return plgpu.CompilerParams(num_warps=blocks.warps(head_dim), num_stages=blocks.num_stages)


def _key_rows(j, block_k):
    """(start, row slice) of key block j."""
    start = pl.multiple_of(j * block_k, block_k)
    return start, pl.ds(start, block_k)


def _bias_row(bias_ref, start, size):
    """(1, size) slice of the key bias, or None without a bias."""
    if bias_ref is None:
        return None
    return bias_ref[pl.ds(start, size)][None, :]


# --------------------------------------------------------------------------------------------------
# forward


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, *, scale, block_k, precision):
    q = q_ref[...]
    block_q, head_dim = q.shape
    num_k_blocks = k_ref.shape[0] // block_k

    def visit_key_block(j, carry):
        start, keys = _key_rows(j, block_k)
        s = block_math.block_scores(q, k_ref[keys, :], _bias_row(bias_ref, start, block_k), scale, precision)
        return block_math.online_softmax_step(s, v_ref[keys, :], *carry, precision)

    init = (
        jnp.full((block_q, 1), block_math.ROW_MAX_INIT, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, head_dim), jnp.float32),
    )
    m, l, acc = lax.fori_loop(0, num_k_blocks, visit_key_block, init)
    out, lse = block_math.finalize_rows(m, l, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _query_row_specs(block_q: int, seq_k: int, head_dim: int):
    """(a block of query rows, every key, the rows' statistics, the whole bias row) BlockSpecs of a
    grid over (q blocks, batch, heads)."""
    row_block = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
    all_keys = pl.BlockSpec((None, seq_k, None, head_dim), lambda i, b, h: (b, 0, h, 0))
    stats_block = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
    all_bias = pl.BlockSpec((None, seq_k), lambda i, b, h: (b, 0))
    return row_block, all_keys, stats_block, all_bias


def _launch_over_query_blocks(
    kernel,
    name: str,
    inputs,
    layout,
    bias,
    *,
    blocks: GpuBlockSizes,
    block_q: int,
    interpret,
    with_lse=False,
    **options,
):
    """`block_math.launch` on a grid (query blocks, batch, heads), each program seeing every key.
    layout names each input's BlockSpec: "rows" (the block's rows of a q-like input), "keys" (all of
    a k-like input), "stats" (the block's entries of an lse-like input). Returns the output like
    inputs[0], and with_lse also its row statistics lse (batch, heads, seq_q) f32."""
    q = inputs[0]
    batch, seq_q, heads, head_dim = q.shape
    rows, keys, stats, all_bias = _query_row_specs(block_q, inputs[1].shape[1], head_dim)
    specs = {"rows": rows, "keys": keys, "stats": stats}
    out_specs, out_shape = rows, jax.ShapeDtypeStruct(q.shape, q.dtype)
    if with_lse:
        out_specs = [rows, stats]
        out_shape = [out_shape, jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32)]
    return block_math.launch(
        kernel,
        inputs,
        [specs[role] for role in layout],
        bias,
        all_bias,
        grid=(seq_q // block_q, batch, heads),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(blocks, head_dim),
        interpret=interpret,
        name=f"diffjax_flash_{name}_gpu",
        options=options,
    )


def gpu_flash_forward(q, k, v, bias, *, scale, blocks: GpuBlockSizes, interpret=False):
    """Padded (batch, seq, heads, d) inputs -> (out like q, lse (batch, heads, seq_q) f32).
    bias: (batch, seq_k) f32 or None."""
    return _launch_over_query_blocks(
        _forward_kernel,
        "forward",
        [q, k, v],
        ("rows", "keys", "keys"),
        bias,
        blocks=blocks,
        block_q=blocks.block_q,
        interpret=interpret,
        with_lse=True,
        scale=scale,
        block_k=blocks.block_k,
        precision=block_math.matmul_precision(q.dtype),
    )


# --------------------------------------------------------------------------------------------------
# backward


def _dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bias_ref, dk_ref, dv_ref, *, scale, block_q, precision
):
    k = k_ref[...]
    v = v_ref[...]
    block_k, head_dim = k.shape
    bias_row = None if bias_ref is None else bias_ref[...][None, :]
    num_q_blocks = q_ref.shape[0] // block_q

    def visit_query_block(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        rows = pl.ds(start, block_q)
        q = q_ref[rows, :]
        do = do_ref[rows, :]
        p, ds = block_math.block_backward(
            q, k, v, do, bias_row, lse_ref[rows][:, None], delta_ref[rows][:, None], scale, precision
        )
        dv = dv + block_math.dot_nn(p.astype(do.dtype).T, do, precision)
        dk = dk + block_math.dot_nn(ds.astype(q.dtype).T, q, precision)
        return dk, dv

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = lax.fori_loop(0, num_q_blocks, visit_query_block, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bias_ref, dq_ref, *, scale, block_k, precision):
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    block_q, head_dim = q.shape
    num_k_blocks = k_ref.shape[0] // block_k

    def visit_key_block(j, dq):
        start, keys = _key_rows(j, block_k)
        k = k_ref[keys, :]
        _, ds = block_math.block_backward(
            q, k, v_ref[keys, :], do, _bias_row(bias_ref, start, block_k), lse, delta, scale, precision
        )
        return dq + block_math.dot_nn(ds.astype(k.dtype), k, precision)

    dq = lax.fori_loop(0, num_k_blocks, visit_key_block, jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def gpu_flash_backward(q, k, v, bias, out, lse, d_out, *, scale, blocks: GpuBlockSizes, interpret=False, d_lse=None):
    """Padded inputs and saved (out, lse) -> (dq, dk, dv), two kernels, no atomics.
    d_lse: optional cotangent of lse, like lse; since d lse_i / d S_ij = P_ij it enters as
    dS = P * (dP - delta + d_lse), i.e. through delta."""
    batch, seq_q, heads, head_dim = q.shape
    seq_k = k.shape[1]
    bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
    precision = block_math.matmul_precision(q.dtype)
    delta = jnp.einsum("bshd,bshd->bhs", d_out.astype(jnp.float32), out.astype(jnp.float32))
    if d_lse is not None:
        delta = delta - d_lse
    args = [q, k, v, d_out, lse, delta]

    all_rows = pl.BlockSpec((None, seq_q, None, head_dim), lambda j, b, h: (b, 0, h, 0))
    all_stats = pl.BlockSpec((None, None, seq_q), lambda j, b, h: (b, h, 0))
    key_block = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
    dk, dv = block_math.launch(
        _dkv_kernel,
        args,
        [all_rows, key_block, key_block, all_rows, all_stats, all_stats],
        bias,
        pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
        grid=(seq_k // bk, batch, heads),
        out_specs=[key_block, key_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(blocks, q.shape[-1]),
        interpret=interpret,
        name="diffjax_flash_dkv_gpu",
        options=dict(scale=scale, block_q=bq, precision=precision),
    )

    dq = _launch_over_query_blocks(
        _dq_kernel,
        "dq",
        args,
        ("rows", "keys", "keys", "rows", "stats", "stats"),
        bias,
        blocks=blocks,
        block_q=bq,
        interpret=interpret,
        scale=scale,
        block_k=bk,
        precision=precision,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# forward mode (JVP)


def _tangent_kernel(
    q_ref, k_ref, v_ref, tq_ref, tk_ref, tv_ref, out_ref, lse_ref, bias_ref, t_out_ref, *, scale, block_k, precision
):
    q = q_ref[...]
    tq = tq_ref[...]
    lse = lse_ref[...][:, None]
    block_q, head_dim = q.shape
    num_k_blocks = k_ref.shape[0] // block_k

    def visit_key_block(j, carry):
        acc, mu = carry
        start, keys = _key_rows(j, block_k)
        acc_j, mu_j = block_math.block_tangent(
            q,
            k_ref[keys, :],
            v_ref[keys, :],
            tq,
            tk_ref[keys, :],
            tv_ref[keys, :],
            _bias_row(bias_ref, start, block_k),
            lse,
            scale,
            precision,
        )
        return acc + acc_j, mu + mu_j

    init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.zeros((block_q, 1), jnp.float32))
    acc, mu = lax.fori_loop(0, num_k_blocks, visit_key_block, init)
    t_out_ref[...] = block_math.finalize_tangent(acc, mu, out_ref[...]).astype(t_out_ref.dtype)


def gpu_flash_tangent(q, k, v, bias, out, lse, tq, tk, tv, *, scale, blocks: GpuBlockSizes, interpret=False):
    """Forward-mode tangent of the output: padded inputs, their tangents (tq, tk, tv) and the saved
    (out, lse) -> d out like q. One kernel with the forward's tiles; linear in (tq, tk, tv)."""
    return _launch_over_query_blocks(
        _tangent_kernel,
        "tangent",
        [q, k, v, tq, tk, tv, out, lse],
        ("rows", "keys", "keys", "rows", "keys", "keys", "rows", "stats"),
        bias,
        blocks=blocks,
        block_q=blocks.block_q,
        interpret=interpret,
        scale=scale,
        block_k=blocks.block_k,
        precision=block_math.matmul_precision(q.dtype),
    )
