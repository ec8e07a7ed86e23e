"""Flash attention: Pallas kernels (GPU/Triton and TPU/Mosaic, in interpret mode on CPU) and the XLA
path against the plain-JAX reference, plus input checks and lowering for TPU and CUDA."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from diffjax.kernels import (
    flash_attention,
    pallas_gpu,
    pallas_tpu,
    reference_attention,
    reference_attention_with_lse,
    tiling,
)

PALLAS = ("pallas_gpu", "pallas_tpu")
# Relative (Frobenius) error allowed against the f32 reference, by input dtype.
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def relative_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq_q: int
    seq_k: int
    heads: int
    head_dim: int
    dtype: type = jnp.float32
    mask: str | None = None  # None, "random", "prefix" (padding at the end), "empty_row"
    softmax_scale: float | None = None


CASES = [
    Case("aligned_f32", 1, 128, 128, 2, 64),
    Case("ragged_random_mask_f32", 2, 40, 72, 2, 64, mask="random"),
    Case("ragged_prefix_mask_d128_scale_f32", 1, 200, 130, 1, 128, mask="prefix", softmax_scale=0.3),
    Case("odd_head_dim_f32", 1, 33, 33, 2, 40),
    Case("all_masked_row_f32", 2, 24, 48, 1, 64, mask="empty_row"),
    Case("ragged_random_mask_bf16", 2, 100, 100, 2, 64, jnp.bfloat16, mask="random"),
    Case("ragged_d128_bf16", 1, 64, 160, 1, 128, jnp.bfloat16),
]


def make_inputs(case: Case, seed: int):
    """q, k, v ~ N(0, 1) in case.dtype, a (batch, seq_k) bool mask or None, and an f32 cotangent."""
    kq, kk, kv, km, kd = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(kq, (case.batch, case.seq_q, case.heads, case.head_dim), case.dtype)
    k = jax.random.normal(kk, (case.batch, case.seq_k, case.heads, case.head_dim), case.dtype)
    v = jax.random.normal(kv, (case.batch, case.seq_k, case.heads, case.head_dim), case.dtype)
    d_out = jax.random.normal(kd, q.shape, jnp.float32)
    keys = jnp.arange(case.seq_k)
    if case.mask is None:
        mask = None
    elif case.mask == "random":
        mask = jax.random.bernoulli(km, 0.6, (case.batch, case.seq_k)).at[:, 0].set(True)
    elif case.mask == "prefix":
        lengths = jnp.array([case.seq_k - 37] * case.batch)
        mask = keys[None, :] < lengths[:, None]
    elif case.mask == "empty_row":
        mask = jnp.stack([jnp.zeros(case.seq_k, bool)] + [keys % 3 != 0] * (case.batch - 1))
    else:
        raise ValueError(case.mask)
    return q, k, v, mask, d_out


def attention_and_grads(fn, q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(d_out.astype(out.dtype))


def run_case(case: Case, implementation: str, seed: int):
    q, k, v, mask, d_out = make_inputs(case, seed)
    kernel = jax.jit(
        lambda q, k, v: flash_attention(
            q,
            k,
            v,
            mask=mask,
            softmax_scale=case.softmax_scale,
            implementation=implementation,
            interpret=implementation in PALLAS,
        )
    )
    ref = lambda q, k, v: reference_attention(q, k, v, mask=mask, softmax_scale=case.softmax_scale)
    out, grads = attention_and_grads(kernel, q, k, v, d_out)
    f32 = lambda x: x.astype(jnp.float32)
    ref_out, ref_grads = attention_and_grads(ref, f32(q), f32(k), f32(v), d_out)
    return (q, mask), (out, grads), (ref_out, ref_grads)


# the TPU kernel's bf16 cases run with -m slow (its f32 cases and the GPU kernel's bf16 ones by default)
KERNEL_CASES = [
    pytest.param(case, impl, marks=pytest.mark.slow)
    if impl == "pallas_tpu" and case.dtype == jnp.bfloat16
    else (case, impl)
    for case in CASES
    for impl in PALLAS + ("xla",)
]


@pytest.mark.parametrize("case, implementation", KERNEL_CASES, ids=lambda v: getattr(v, "name", v))
def test_values_and_gradients_match_reference(case, implementation):
    seed = CASES.index(case) + 100 * (PALLAS + ("xla",)).index(implementation)
    (q, mask), (out, grads), (ref_out, ref_grads) = run_case(case, implementation, seed)
    tol = TOLERANCE[jnp.dtype(case.dtype)]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert relative_error(out, ref_out) < tol
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert grad.dtype == q.dtype, name
        assert relative_error(grad, ref_grad) < tol, name
    if case.mask == "empty_row":  # a query with no key to attend to: output 0, gradients 0
        assert not mask[0].any()
        np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[0][0], np.float32), 0.0)


def test_reference_matches_textbook_softmax():
    q, k, v, mask, _ = make_inputs(Case("ref", 2, 20, 30, 3, 16, mask="random"), seed=7)
    out, lse = reference_attention_with_lse(q, k, v, mask=mask)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / 4.0
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
    expected = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, precision="highest")
    assert relative_error(out, expected) < 1e-6
    assert relative_error(lse, jax.scipy.special.logsumexp(logits, axis=-1)) < 1e-6


# --------------------------------------------------------------------------------------------------
# every output element is written. Both interpreters start output buffers as NaN, so an output
# block the grid never visits stays NaN. A block visited but not stored to stays NaN on the GPU
# (HLO) interpreter; the TPU interpreter, like a TPU, copies back stale VMEM instead, which only a
# value check catches. So the test below checks the raw (padded) kernel outputs for NaN *and*
# against the reference, and the canary shows both failure modes are visible.


def _interpret_arg(implementation):
    return True if implementation == "pallas_gpu" else pltpu.InterpretParams()


def _copy_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...]


def _copy_all_but_last_block_kernel(x_ref, o_ref):
    @pl.when(pl.program_id(0) < pl.num_programs(0) - 1)
    def _copy():
        o_ref[...] = x_ref[...]


@pytest.mark.parametrize("implementation", PALLAS)
def test_interpreter_exposes_unwritten_output_blocks(implementation):
    """Canary for the next test: broken kernels must leave visibly wrong values behind."""
    x = jnp.arange(384 * 128, dtype=jnp.float32).reshape(384, 128)
    spec = pl.BlockSpec((128, 128), lambda i: (i, 0))
    copy = lambda kernel, steps: pl.pallas_call(
        kernel,
        grid=(steps,),
        in_specs=[spec],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        interpret=_interpret_arg(implementation),
    )(x)

    grid_too_short = copy(_copy_kernel, 2)
    np.testing.assert_array_equal(grid_too_short[:256], x[:256])
    assert jnp.isnan(grid_too_short[256:]).all()

    store_skipped = copy(_copy_all_but_last_block_kernel, 3)
    np.testing.assert_array_equal(store_skipped[:256], x[:256])
    if implementation == "pallas_gpu":
        assert jnp.isnan(store_skipped[256:]).all()
    else:
        assert not np.isclose(np.asarray(store_skipped[256:]), np.asarray(x[256:])).any()


def _padded_problem(implementation):
    """Raw kernel inputs with several blocks on every grid axis, a key bias with masked entries."""
    if implementation == "pallas_gpu":
        kernels = pallas_gpu.gpu_flash_forward, pallas_gpu.gpu_flash_backward
        blocks = pallas_gpu.GpuBlockSizes(32, 16, 16, 32)
        shape_q, shape_k = (2, 64, 2, 32), (2, 96, 2, 32)  # (batch, seq, heads, d)
        to_bshd = lambda x: x
    else:
        kernels = pallas_tpu.tpu_flash_forward, pallas_tpu.tpu_flash_backward
        blocks = pallas_tpu.TpuBlockSizes(128, 128, 128, 128)
        shape_q, shape_k = (2, 2, 256, 64), (2, 2, 384, 64)  # (batch, heads, seq, d)
        to_bshd = lambda x: jnp.transpose(x, (0, 2, 1, 3))
    kq, kk, kv, km, kd = jax.random.split(jax.random.key(3), 5)
    q = jax.random.normal(kq, shape_q)
    k = jax.random.normal(kk, shape_k)
    v = jax.random.normal(kv, shape_k)
    d_out = jax.random.normal(kd, shape_q)
    mask = jax.random.bernoulli(km, 0.7, (2, to_bshd(k).shape[1])).at[:, 0].set(True)
    return kernels, blocks, to_bshd, (q, k, v, mask, d_out)


@pytest.mark.parametrize("implementation", PALLAS)
def test_kernels_write_every_output_element(implementation):
    (forward, backward), blocks, to_bshd, (q, k, v, mask, d_out) = _padded_problem(implementation)
    scale = 0.2
    bias = jnp.where(mask, 0.0, -jnp.inf)
    out, lse = forward(q, k, v, bias, scale=scale, blocks=blocks, interpret=True)
    grads = backward(q, k, v, bias, out, lse, d_out, scale=scale, blocks=blocks, interpret=True)
    for name, x in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
        assert jnp.isfinite(x).all(), f"{name} has unwritten (NaN) or non-finite elements"

    reference = lambda q, k, v: reference_attention_with_lse(
        to_bshd(q), to_bshd(k), to_bshd(v), mask=mask, softmax_scale=scale
    )
    (ref_out, ref_lse), vjp = jax.vjp(reference, q, k, v)
    ref_grads = vjp((to_bshd(d_out), jnp.zeros_like(ref_lse)))
    assert relative_error(to_bshd(out), ref_out) < 1e-5
    assert relative_error(lse.reshape(ref_lse.shape), ref_lse) < 1e-6
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert relative_error(grad, ref_grad) < 1e-5, name


# --------------------------------------------------------------------------------------------------
# lowering for the accelerators, from this CPU-only host


def export_forward_and_backward(implementation, platform, shape, dtype, masked):
    def loss_and_grads(q, k, v, mask):
        attn = lambda q, k, v: flash_attention(q, k, v, mask=mask if masked else None, implementation=implementation)
        return jax.value_and_grad(lambda *a: jnp.sum(attn(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2))(q, k, v)

    args = [jax.ShapeDtypeStruct(shape, dtype)] * 3 + [jax.ShapeDtypeStruct(shape[:2], jnp.bool_)]
    # Triton custom calls carry no serialization-compatibility guarantee, hence the opt-out.
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
    exported = jax.export.export(
        jax.jit(loss_and_grads), platforms=[platform], disabled_checks=checks if platform == "cuda" else []
    )(*args)
    return exported.mlir_module()


@pytest.mark.parametrize(
    "shape", [(2, 1000, 4, 64), (2, 1000, 4, 128), (1, 300, 2, 96)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(
    "implementation,platform,custom_call",
    [("pallas_tpu", "tpu", "tpu_custom_call"), ("pallas_gpu", "cuda", TRITON_CUSTOM_CALL)],
)
def test_forward_and_backward_lower_for_accelerator(implementation, platform, custom_call, dtype, shape):
    module = export_forward_and_backward(implementation, platform, shape, dtype, masked=True)
    suffix = "tpu" if platform == "tpu" else "gpu"
    kernels = set(re.findall(r"diffjax_flash_\w+", module))
    assert kernels == {f"diffjax_flash_{k}_{suffix}" for k in ("forward", "dq", "dkv")}
    assert f"custom_call @{custom_call}" in module


def largest_array(module_text: str) -> int:
    """Number of elements of the largest tensor type in a StableHLO module (kernel internals are
    opaque custom calls, so this is the memory XLA itself allocates around the kernels)."""
    shapes = re.findall(r"tensor<((?:\d+x)+)[a-z]", module_text)
    return max(math.prod(int(d) for d in s.rstrip("x").split("x")) for s in shapes)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_no_seq_by_seq_array_outside_the_kernels(platform):
    seq = 2048
    shape = (1, seq, 1, 64)
    implementation = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
    kernel_module = export_forward_and_backward(implementation, platform, shape, jnp.bfloat16, True)
    assert largest_array(kernel_module) <= seq * 64
    # Control: XLA's attention does materialize seq x seq, and the same check sees it.
    xla_module = export_forward_and_backward("xla", platform, shape, jnp.bfloat16, True)
    assert largest_array(xla_module) >= seq * seq


# --------------------------------------------------------------------------------------------------
# choosing the implementation, and bad input


def test_default_implementation_on_cpu_is_xla():
    q, k, v, mask, _ = make_inputs(Case("d", 1, 16, 16, 1, 32, mask="random"), seed=1)
    default_jaxpr = str(jax.make_jaxpr(lambda q: flash_attention(q, k, v, mask=mask))(q))
    pallas_jaxpr = str(
        jax.make_jaxpr(lambda q: flash_attention(q, k, v, mask=mask, implementation="pallas_gpu", interpret=True))(q)
    )
    assert "pallas_call" not in default_jaxpr and "pallas_call" in pallas_jaxpr
    assert relative_error(flash_attention(q, k, v, mask=mask), reference_attention(q, k, v, mask=mask)) < 1e-5


def _good_args():
    q = jnp.zeros((2, 8, 2, 16))
    return dict(q=q, k=q, v=q, mask=None)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(q=jnp.zeros((8, 2, 16))), "q must have rank 4"),
        (dict(k=jnp.zeros((2, 8, 3, 16))), "k and v must have the same shape"),
        (dict(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 16))), "must agree in batch, heads"),
        (dict(k=jnp.zeros((2, 8, 2, 8)), v=jnp.zeros((2, 8, 2, 8))), "must agree in batch, heads"),
        (dict(q=jnp.zeros((2, 8, 2, 16), jnp.float16)), "dtype float16"),
        (dict(v=jnp.zeros((2, 8, 2, 16), jnp.int32)), "dtype int32"),
        (dict(v=jnp.zeros((2, 8, 2, 16), jnp.bfloat16)), "must share a dtype"),
        (dict(q=jnp.zeros((2, 0, 2, 16))), "empty dimension"),
        (dict(mask=jnp.ones((2, 9), bool)), r"mask must be a \(batch, seq_k\) = \(2, 8\)"),
        (dict(mask=jnp.ones((2, 8), jnp.int32)), "mask must have dtype bool"),
        (dict(implementation="flash"), "implementation='flash' is unknown"),
        (dict(implementation="xla", interpret=True), "interpret=True runs a Pallas kernel"),
        (dict(interpret=True), "interpret=True runs a Pallas kernel"),
        (dict(interpret="yes"), "interpret must be True or False"),
        (dict(implementation="cudnn"), "implementation='cudnn' needs bfloat16"),
        (dict(softmax_scale=-1.0), "softmax_scale must be finite and > 0"),
        (dict(softmax_scale=jnp.float32(0.5)), "softmax_scale must be a Python float"),
        (
            dict(
                q=jnp.zeros((2, 8, 2, 512)),
                k=jnp.zeros((2, 8, 2, 512)),
                v=jnp.zeros((2, 8, 2, 512)),
                implementation="pallas_gpu",
            ),
            "head_dim=512 is too large",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_it(change, message):
    args = _good_args() | change
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **args)


def test_bad_input_raises_before_tracing_under_jit():
    q = jnp.zeros((2, 8, 2, 16))
    with pytest.raises(ValueError, match="rank 4"):
        jax.jit(lambda q: flash_attention(q[0], q[0], q[0]))(q)


@pytest.mark.parametrize("seq", [1, 15, 16, 40, 100, 257, 300, 1000, 4100, 16384])
@pytest.mark.parametrize("preferred,smallest", [((128, 64), 16), ((256, 256), 128), ((512, 256), 128)])
def test_tiles_divide_the_padded_sequence(seq, preferred, smallest):
    fwd, bwd = tiling.fit_pair(seq, *preferred, smallest)
    padded = tiling.round_up(seq, fwd)
    assert smallest <= fwd <= max(preferred[0], smallest) and smallest <= bwd
    assert padded % fwd == 0 and padded % bwd == 0 and padded >= seq
    assert padded <= (seq + smallest) * 1.125  # never much more padding than needed
