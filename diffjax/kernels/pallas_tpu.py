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


def _block_backward(q, k, v, do, bias_ref, lse_ref, delta_ref, scale, precision):
    """`block_math.block_backward` with the bias and the row statistics read from their refs."""
    lse, delta = _row_to_column(lse_ref), _row_to_column(delta_ref)
    return block_math.block_backward(q, k, v, do, _bias_row(bias_ref), lse, delta, scale, precision)


_COMPILER_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _bias_rows(bias):
    """(batch, seq_k) -> (batch, 1, seq_k), the bias operand's layout; None stays None."""
    return None if bias is None else bias.reshape(bias.shape[0], 1, bias.shape[1])


def _reduction_step(*scratches):
    """The step of the reduction over grid axis 3; zeroes the accumulators when it starts (step 0)."""
    step = pl.program_id(3)

    @pl.when(step == 0)
    def _start():
        for scratch in scratches:
            scratch[...] = jnp.zeros(scratch.shape, jnp.float32)

    return step


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


def _launch(
    kernel,
    name: str,
    inputs,
    layout,
    bias,
    *,
    bq: int,
    bk: int,
    over_keys: bool,
    outputs,
    scratch,
    interpret,
    **options,
):
    """`block_math.launch` on a grid (batch, heads, a, r) reducing over axis r: key blocks when
    over_keys (a = query block), else query blocks. layout names each input's BlockSpec and outputs
    is [(name, ShapeDtypeStruct)]: "q" (a query block of a q-like array), "kv" (a key block of a
    k-like array), "row" (the query block's row statistics, like lse). scratch: f32 VMEM shapes."""
    batch, heads, seq_q, head_dim = inputs[0].shape
    seq_k = inputs[1].shape[2]
    q_spec, kv_spec, row_spec, bias_spec = _block_specs(bq, bk, head_dim, over_keys=over_keys)
    specs = {"q": q_spec, "kv": kv_spec, "row": row_spec}
    blocks = (seq_q // bq, seq_k // bk) if over_keys else (seq_k // bk, seq_q // bq)
    return block_math.launch(
        kernel,
        inputs,
        [specs[role] for role in layout],
        _bias_rows(bias),
        bias_spec,
        grid=(batch, heads, *blocks),
        out_specs=[specs[role] for role, _ in outputs],
        out_shape=[shape for _, shape in outputs],
        scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch],
        compiler_params=_COMPILER_PARAMS,
        interpret=_interpret_params(interpret),
        name=f"diffjax_flash_{name}_tpu",
        options=options,
    )


def _like(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


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
    bq = blocks.block_q
    return _launch(
        _forward_kernel,
        "forward",
        [q, k, v],
        ("q", "kv", "kv"),
        bias,
        bq=bq,
        bk=blocks.block_k,
        over_keys=True,
        outputs=[("q", _like(q)), ("row", jax.ShapeDtypeStruct((batch, heads, 1, seq_q), jnp.float32))],
        scratch=[(bq, 1), (bq, 1), (bq, head_dim)],
        interpret=interpret,
        scale=scale,
        precision=block_math.matmul_precision(q.dtype),
    )


# --------------------------------------------------------------------------------------------------
# backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bias_ref, dq_ref, dq_scratch, *, scale, precision):
    k_step = _reduction_step(dq_scratch)

    k = k_ref[...]
    _, ds = _block_backward(q_ref[...], k, v_ref[...], do_ref[...], bias_ref, lse_ref, delta_ref, scale, precision)
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
    q_step = _reduction_step(dk_scratch, dv_scratch)

    q, do = q_ref[...], do_ref[...]
    p, ds = _block_backward(q, k_ref[...], v_ref[...], do, bias_ref, lse_ref, delta_ref, scale, precision)
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
    head_dim = q.shape[-1]
    bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
    precision = block_math.matmul_precision(q.dtype)
    delta = jnp.einsum("bhsd,bhsd->bhs", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta[:, :, None, :]
    if d_lse is not None:
        delta = delta - d_lse
    args = [q, k, v, d_out, lse, delta]

    layout = ("q", "kv", "kv", "q", "row", "row")
    tiles = dict(bq=bq, bk=bk, interpret=interpret, scale=scale, precision=precision)
    # dQ: q blocks on grid axis 2, k blocks (reduced) on axis 3.
    (dq,) = _launch(
        _dq_kernel,
        "dq",
        args,
        layout,
        bias,
        over_keys=True,
        outputs=[("q", _like(q))],
        scratch=[(bq, head_dim)],
        **tiles,
    )
    # dK, dV: k blocks on grid axis 2, q blocks (reduced) on axis 3.
    dk, dv = _launch(
        _dkv_kernel,
        "dkv",
        args,
        layout,
        bias,
        over_keys=False,
        outputs=[("kv", _like(k)), ("kv", _like(v))],
        scratch=[(bk, head_dim), (bk, head_dim)],
        **tiles,
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
    k_step = _reduction_step(acc_scratch, mu_scratch)

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
    bq = blocks.block_q
    (t_out,) = _launch(
        _tangent_kernel,
        "tangent",
        [q, k, v, tq, tk, tv, out, lse],
        ("q", "kv", "kv", "q", "kv", "kv", "q", "row"),
        bias,
        bq=bq,
        bk=blocks.block_k,
        over_keys=True,
        outputs=[("q", _like(q))],
        scratch=[(bq, q.shape[-1]), (bq, 1)],
        interpret=interpret,
        scale=scale,
        precision=block_math.matmul_precision(q.dtype),
    )
    return t_out
