"""FlashAttention-2 forward and backward as Pallas kernels on Mosaic (TPU).

Layout (batch, heads, seq, head_dim), so each tile is (seq block, head_dim) with head_dim on the
128-wide lanes. The reduction over the other sequence is the innermost grid axis ("arbitrary"),
with running statistics in VMEM scratch; the pipeline streams the k/v (or q/dO) tiles from HBM.

  forward:  grid (batch, heads, q blocks, k blocks)  -> out, lse (batch, heads, 1, seq_q)
  dQ:       grid (batch, heads, q blocks, k blocks)
  dK, dV:   grid (batch, heads, k blocks, q blocks)
  tangent:  grid (batch, heads, q blocks, k blocks)   (forward mode, from the saved lse)

Per-row statistics (lse, delta) live in HBM as rows (1, seq) (lane-dense) and become columns
(bq, 1) inside the kernels. Callers pad seq to multiples of the tiles (all multiples of 128) and
head_dim to 64 or a multiple of 128; padded keys are masked through the bias.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from diffjax.kernels import block_math, tiling

LANES = 128
SMALLEST_BLOCK = LANES  # sequence tiles sit on lanes (bias, lse rows), so multiples of 128


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes(tiling.TileSizes):
    """Tile sizes, powers of two >= 128 (multiples of the MXU width). Tune with the benchmark."""

    smallest: ClassVar[int] = SMALLEST_BLOCK

    block_q: int = 256
    block_k: int = 512
    block_q_bwd: int = 256
    block_k_bwd: int = 256


def tpu_padded_head_dim(head_dim: int) -> int:
    """64 stays 64 (half a lane row, as in the bundled kernels); otherwise a multiple of 128."""
    return 64 if head_dim <= 64 else tiling.round_up(head_dim, LANES)


HLO_INTERPRETER = "hlo"


def _interpret_params(interpret: bool | str):
    """True: Pallas' TPU interpret mode (models TPU memory; uses ordered callbacks, i.e. effects).
    HLO_INTERPRETER: the generic Pallas HLO interpreter, effect-free, for places that cannot carry
    effects (`jax.custom_derivatives.linear_call`)."""
    if interpret == HLO_INTERPRETER:
        return True
    return pltpu.InterpretParams() if interpret else False


def _column_to_row(col):
    """(n, 1) -> (1, n) through an aligned (n, 128) transpose, which Mosaic always supports."""
    return jnp.broadcast_to(col, (col.shape[0], LANES)).T[:1, :]


def _row_to_column(row_ref):
    """A (1, n) ref block -> (n, 1) value."""
    return row_ref[0][:, None]


def _bias_row(bias_ref):
    return None if bias_ref is None else bias_ref[...]


_COMPILER_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _bias_rows(bias):
    """(batch, seq_k) -> (batch, 1, seq_k), the bias operand's layout; None stays None."""
    return None if bias is None else bias.reshape(bias.shape[0], 1, bias.shape[1])


def _zero_at_first_step(step, *scratches):
    """Zeroes the accumulators when the reduction over grid axis 3 starts (step == 0)."""

    @pl.when(step == 0)
    def _start():
        for scratch in scratches:
            scratch[...] = jnp.zeros(scratch.shape, jnp.float32)


def _block_specs(bq: int, bk: int, head_dim: int, *, over_keys: bool):
    """(query block, key/value block, row statistics, bias) BlockSpecs of a grid (batch, heads, a, r)
    that reduces over axis r: key blocks when over_keys (a = query block), else query blocks."""

    def indices(a, r):
        return (a, r) if over_keys else (r, a)

    q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, a, r: (b, h, indices(a, r)[0], 0))
    kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, a, r: (b, h, indices(a, r)[1], 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, a, r: (b, h, 0, indices(a, r)[0]))
    bias_spec = pl.BlockSpec((None, 1, bk), lambda b, h, a, r: (b, 0, indices(a, r)[1]))
    return q_spec, kv_spec, row_spec, bias_spec


# --------------------------------------------------------------------------------------------------
# forward


def _forward_kernel(
    q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref, m_scratch, l_scratch, acc_scratch, *, scale, precision
):
    k_step = pl.program_id(3)

    @pl.when(k_step == 0)
    def _start_row_block():
        m_scratch[...] = jnp.full(m_scratch.shape, block_math.ROW_MAX_INIT, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    s = block_math.block_scores(q_ref[...], k_ref[...], _bias_row(bias_ref), scale, precision)
    m, l, acc = block_math.online_softmax_step(
        s, v_ref[...], m_scratch[...], l_scratch[...], acc_scratch[...], precision
    )
    m_scratch[...] = m
    l_scratch[...] = l
    acc_scratch[...] = acc

    @pl.when(k_step == pl.num_programs(3) - 1)
    def _finish_row_block():
        out, lse = block_math.finalize_rows(m, l, acc)
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = _column_to_row(lse)


def tpu_flash_forward(q, k, v, bias, *, scale, blocks: TpuBlockSizes, interpret=False):
    """Padded (batch, heads, seq, d) inputs -> (out, lse (batch, heads, 1, seq_q) f32).
    bias: (batch, seq_k) f32 or None."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    q_spec, kv_spec, row_spec, bias_spec = _block_specs(bq, bk, head_dim, over_keys=True)
    return block_math.launch(
        _forward_kernel,
        [q, k, v],
        [q_spec, kv_spec, kv_spec],
        _bias_rows(bias),
        bias_spec,
        grid=(batch, heads, seq_q // bq, seq_k // bk),
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, 1, seq_q), jnp.float32)],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, head_dim), jnp.float32),
        ],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret_params(interpret),
        name="diffjax_flash_forward_tpu",
        options=dict(scale=scale, precision=block_math.matmul_precision(q.dtype)),
    )


# --------------------------------------------------------------------------------------------------
# backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bias_ref, dq_ref, dq_scratch, *, scale, precision):
    k_step = pl.program_id(3)

    _zero_at_first_step(k_step, dq_scratch)

    k = k_ref[...]
    _, ds = block_math.block_backward(
        q_ref[...],
        k,
        v_ref[...],
        do_ref[...],
        _bias_row(bias_ref),
        _row_to_column(lse_ref),
        _row_to_column(delta_ref),
        scale,
        precision,
    )
    dq = dq_scratch[...] + block_math.dot_nn(ds.astype(k.dtype), k, precision)
    dq_scratch[...] = dq

    @pl.when(k_step == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    bias_ref,
    dk_ref,
    dv_ref,
    dk_scratch,
    dv_scratch,
    *,
    scale,
    precision,
):
    q_step = pl.program_id(3)

    _zero_at_first_step(q_step, dk_scratch, dv_scratch)

    q, do = q_ref[...], do_ref[...]
    p, ds = block_math.block_backward(
        q,
        k_ref[...],
        v_ref[...],
        do,
        _bias_row(bias_ref),
        _row_to_column(lse_ref),
        _row_to_column(delta_ref),
        scale,
        precision,
    )
    dv = dv_scratch[...] + block_math.dot_nn(p.T.astype(do.dtype), do, precision)
    dk = dk_scratch[...] + block_math.dot_nn(ds.T.astype(q.dtype), q, precision)
    dv_scratch[...] = dv
    dk_scratch[...] = dk

    @pl.when(q_step == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)


def tpu_flash_backward(q, k, v, bias, out, lse, d_out, *, scale, blocks: TpuBlockSizes, interpret=False, d_lse=None):
    """Padded inputs and saved (out, lse) -> (dq, dk, dv), two kernels, no atomics.
    d_lse: optional cotangent of lse, like lse; it enters through delta (see gpu_flash_backward)."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
    precision = block_math.matmul_precision(q.dtype)
    delta = jnp.einsum("bhsd,bhsd->bhs", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta[:, :, None, :]
    if d_lse is not None:
        delta = delta - d_lse
    args = [q, k, v, d_out, lse, delta]

    # dQ: q blocks on grid axis 2, k blocks (reduced) on axis 3.
    q_spec, kv_spec, row_spec, bias_spec = _block_specs(bq, bk, head_dim, over_keys=True)
    dq = block_math.launch(
        _dq_kernel,
        args,
        [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        _bias_rows(bias),
        bias_spec,
        grid=(batch, heads, seq_q // bq, seq_k // bk),
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret_params(interpret),
        name="diffjax_flash_dq_tpu",
        options=dict(scale=scale, precision=precision),
    )

    # dK, dV: k blocks on grid axis 2, q blocks (reduced) on axis 3.
    q_spec, kv_spec, row_spec, bias_spec = _block_specs(bq, bk, head_dim, over_keys=False)
    dk, dv = block_math.launch(
        _dkv_kernel,
        args,
        [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        _bias_rows(bias),
        bias_spec,
        grid=(batch, heads, seq_k // bk, seq_q // bq),
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret_params(interpret),
        name="diffjax_flash_dkv_tpu",
        options=dict(scale=scale, precision=precision),
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# forward mode (JVP)


def _tangent_kernel(
    q_ref,
    k_ref,
    v_ref,
    tq_ref,
    tk_ref,
    tv_ref,
    out_ref,
    lse_ref,
    bias_ref,
    t_out_ref,
    acc_scratch,
    mu_scratch,
    *,
    scale,
    precision,
):
    k_step = pl.program_id(3)

    _zero_at_first_step(k_step, acc_scratch, mu_scratch)

    acc_j, mu_j = block_math.block_tangent(
        q_ref[...],
        k_ref[...],
        v_ref[...],
        tq_ref[...],
        tk_ref[...],
        tv_ref[...],
        _bias_row(bias_ref),
        _row_to_column(lse_ref),
        scale,
        precision,
    )
    acc = acc_scratch[...] + acc_j
    mu = mu_scratch[...] + mu_j
    acc_scratch[...] = acc
    mu_scratch[...] = mu

    @pl.when(k_step == pl.num_programs(3) - 1)
    def _finish():
        t_out_ref[...] = block_math.finalize_tangent(acc, mu, out_ref[...]).astype(t_out_ref.dtype)


def tpu_flash_tangent(q, k, v, bias, out, lse, tq, tk, tv, *, scale, blocks: TpuBlockSizes, interpret=False):
    """Forward-mode tangent of the output: padded (batch, heads, seq, d) inputs, their tangents and
    the saved (out, lse) -> d out like q. One kernel with the forward's tiles; linear in (tq, tk, tv)."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    q_spec, kv_spec, row_spec, bias_spec = _block_specs(bq, bk, head_dim, over_keys=True)
    return block_math.launch(
        _tangent_kernel,
        [q, k, v, tq, tk, tv, out, lse],
        [q_spec, kv_spec, kv_spec, q_spec, kv_spec, kv_spec, q_spec, row_spec],
        _bias_rows(bias),
        bias_spec,
        grid=(batch, heads, seq_q // bq, seq_k // bk),
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32)],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret_params(interpret),
        name="diffjax_flash_tangent_tpu",
        options=dict(scale=scale, precision=block_math.matmul_precision(q.dtype)),
    )
