"""Forward mode through flash attention: `jax.jvp` of the Pallas kernels (interpret mode on CPU) and
of the XLA path against `jax.jvp` of the plain-JAX reference (values and tangents), reverse mode
of a function of the JVP (as consistency-model losses need), the raw tangent kernels on several
blocks per grid axis, lowering of the JVP for TPU and CUDA, and sCM / MeanFlow training of a DiT and
a U-Net through the kernels (slow)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturbed
from test_kernels import (
    TOLERANCE,
    TRITON_CUSTOM_CALL,
    Case,
    _padded_problem,
    largest_array,
    make_inputs,
    relative_error,
)

from diffjax import distill, models
from diffjax.kernels import attention, flash_attention, pallas_gpu, pallas_tpu, reference_attention
from diffjax.processes import FlowMatching

PALLAS = ("pallas_gpu", "pallas_tpu")
IMPLEMENTATIONS = PALLAS + ("xla",)

CASES = [
    Case("ragged_random_mask_f32", 2, 40, 72, 2, 32, mask="random"),
    Case("three_heads_scale_f32", 1, 32, 32, 3, 16, softmax_scale=0.3),
    Case("all_masked_row_f32", 2, 24, 48, 1, 16, mask="empty_row"),
    Case("ragged_prefix_mask_bf16", 1, 33, 50, 2, 64, jnp.bfloat16, mask="prefix"),
]
SLOW_CASES = [
    Case("ragged_prefix_mask_d128_f32", 1, 200, 130, 1, 128, mask="prefix"),
    Case("odd_head_dim_f32", 2, 33, 33, 2, 40, mask="random"),
    Case("ragged_random_mask_bf16", 2, 100, 100, 2, 64, jnp.bfloat16, mask="random"),
]


def tangents_like(q, k, v, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, x.shape, x.dtype) for key, x in zip(keys, (q, k, v)))


def attention_fn(implementation, mask, softmax_scale):
    return lambda q, k, v: flash_attention(
        q,
        k,
        v,
        mask=mask,
        softmax_scale=softmax_scale,
        implementation=implementation,
        interpret=implementation in PALLAS,
    )


def reference_fn(mask, softmax_scale):
    return lambda q, k, v: reference_attention(q, k, v, mask=mask, softmax_scale=softmax_scale)


def f32(xs):
    return tuple(x.astype(jnp.float32) for x in xs)


def max_abs_error(x, ref):
    return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(ref, np.float64))))


def check_jvp(case, implementation, seed):
    q, k, v, mask, _ = make_inputs(case, seed)
    tangents = tangents_like(q, k, v, seed + 1)
    fn = attention_fn(implementation, mask, case.softmax_scale)
    out, t_out = jax.jit(lambda p, t: jax.jvp(fn, p, t))((q, k, v), tangents)
    ref_out, ref_t_out = jax.jvp(reference_fn(mask, case.softmax_scale), f32((q, k, v)), f32(tangents))
    tol = TOLERANCE[jnp.dtype(case.dtype)]
    assert out.dtype == t_out.dtype == q.dtype and t_out.shape == q.shape
    assert relative_error(out, ref_out) < tol
    assert relative_error(t_out, ref_t_out) < tol
    if case.mask == "empty_row":  # a query with no key: output 0, and so tangent 0
        assert not mask[0].any()
        np.testing.assert_array_equal(np.asarray(t_out[0], np.float32), 0.0)
    return t_out, ref_t_out


@pytest.mark.slow
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES + SLOW_CASES, ids=lambda c: c.name)
def test_jvp_matches_reference(case, implementation):
    check_jvp(case, implementation, seed=(CASES + SLOW_CASES).index(case))


def test_gpu_kernel_jvp_closed_forms_and_reference():
    """pallas_gpu, one compiled jvp, three inputs. Closed forms: a tangent only in v gives P dV, so
    with uniform scores (q = 0) the tangent is the mean of dV over the attended keys; moving q along
    a direction no key has changes no score, so the tangent is 0. Then random inputs against the
    reference (ragged: 3 query and 3 key tiles of 16; a key-padding mask)."""
    k = jax.random.normal(jax.random.key(0), (1, 36, 2, 16))
    v = jax.random.normal(jax.random.key(1), k.shape)
    q = jnp.zeros((1, 40, 2, 16))
    tq, tk, tv = tangents_like(q, k, v, seed=2)
    mask = (jnp.arange(36) < 29)[None]
    zeros = jnp.zeros_like
    jvp = jax.jit(lambda p, t: jax.jvp(attention_fn("pallas_gpu", mask, None), p, t))

    _, t_out = jvp((q, k, v), (zeros(q), zeros(k), tv))
    expected = jnp.broadcast_to(tv[:, :29].mean(axis=1, keepdims=True), t_out.shape)
    assert max_abs_error(t_out, expected) < 1e-6

    k_orthogonal = k.at[..., 0].set(0.0)  # no key has a component along e_0 ...
    _, t_out = jvp((q, k_orthogonal, v), (zeros(q).at[..., 0].set(1.0), zeros(k), zeros(v)))  # ... q moves along it
    assert max_abs_error(t_out, 0.0) < 1e-7

    q = jax.random.normal(jax.random.key(3), q.shape)
    out, t_out = jvp((q, k, v), (tq, tk, tv))
    ref_out, ref_t_out = jax.jvp(reference_fn(mask, None), (q, k, v), (tq, tk, tv))
    assert relative_error(out, ref_out) < 1e-5 and relative_error(t_out, ref_t_out) < 1e-5


# --------------------------------------------------------------------------------------------------
# reverse mode: of the attention (still the flash backward) and of a function of its JVP


def jvp_loss(fn):
    """A scalar of both the output and its tangent, like the sCM / MeanFlow losses."""

    def loss(q, k, v, tq, tk, tv):
        out, t_out = jax.jvp(fn, (q, k, v), (tq, tk, tv))
        return jnp.sum(jnp.sin(out.astype(jnp.float32))) + jnp.sum(t_out.astype(jnp.float32) ** 2)

    return loss


# One compiled program per implementation (interpret-mode compiles dominate the test time): the
# output, its tangent and the gradients of a function of both, on ragged lengths (several key
# tiles on GPU), two heads, a mask with a query row that has no key at all.
COMBINED = Case("ragged_empty_row_mask_f32", 2, 40, 72, 2, 32, mask="empty_row")


@pytest.mark.parametrize("implementation", [pytest.param("pallas_gpu", marks=pytest.mark.slow), "pallas_tpu", "xla"])
def test_jvp_and_grad_of_jvp_match_reference(implementation, monkeypatch):
    monkeypatch.setattr(attention, "SECOND_DERIVATIVE_QUERY_CHUNK", 32)  # several query chunks
    q, k, v, mask, _ = make_inputs(COMBINED, seed=20)
    tangents = tangents_like(q, k, v, seed=21)

    def loss_and_grads(fn):
        def loss(*args):
            out, t_out = jax.jvp(fn, args[:3], args[3:])
            value = jnp.sum(jnp.sin(out)) + jnp.sum(t_out**2)
            return value, (out, t_out)

        return jax.grad(loss, argnums=range(6), has_aux=True)

    fn = attention_fn(implementation, mask, None)
    grads, (out, t_out) = jax.jit(loss_and_grads(fn))(q, k, v, *tangents)
    ref_grads, (ref_out, ref_t_out) = loss_and_grads(reference_fn(mask, None))(q, k, v, *tangents)
    assert relative_error(out, ref_out) < 1e-5
    assert relative_error(t_out, ref_t_out) < 1e-5
    assert not mask[0].any()  # no key for the first batch row: output, tangent and gradients 0
    np.testing.assert_array_equal(np.asarray(t_out[0]), 0.0)
    for name, grad, ref_grad in zip(("q", "k", "v", "tq", "tk", "tv"), grads, ref_grads):
        assert relative_error(grad, ref_grad) < 1e-5, name
    np.testing.assert_array_equal(np.asarray(grads[0][0]), 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_grad_of_function_of_jvp_matches_reference(implementation):
    case = Case("grad", 2, 40, 72, 2, 32, mask="random")
    q, k, v, mask, _ = make_inputs(case, seed=20)
    tangents = tangents_like(q, k, v, seed=21)
    fn = attention_fn(implementation, mask, None)
    grads = jax.jit(jax.grad(jvp_loss(fn), argnums=range(6)))(q, k, v, *tangents)
    ref_grads = jax.grad(jvp_loss(reference_fn(mask, None)), argnums=range(6))(q, k, v, *tangents)
    for name, grad, ref_grad in zip(("q", "k", "v", "tq", "tk", "tv"), grads, ref_grads):
        assert relative_error(grad, ref_grad) < 1e-5, name


def pallas_kernel_names(jaxpr) -> set[str]:
    return set(re.findall(r"diffjax_flash_\w+", str(jaxpr)))


def test_each_mode_runs_its_kernels():
    """jvp: forward + tangent kernels; grad: forward + the flash backward (the tangent kernel's
    transpose), no tangent kernel; the plain call: forward only."""
    q, k, v, mask, d_out = make_inputs(Case("modes", 1, 40, 40, 1, 16, mask="random"), seed=3)
    fn = attention_fn("pallas_gpu", mask, None)

    def names(f, *args):
        found = pallas_kernel_names(jax.make_jaxpr(f)(*args))
        return {n.removeprefix("diffjax_flash_").removesuffix("_gpu") for n in found}

    assert names(lambda *a: jax.jvp(fn, a[:3], a[3:]), q, k, v, q, k, v) == {"forward", "tangent"}
    assert names(lambda *a: jax.vjp(fn, *a)[1](d_out), q, k, v) == {"forward", "dq", "dkv"}
    assert names(fn, q, k, v) == {"forward"}


@pytest.mark.slow
def test_linearize_matches_reference():
    q, k, v, mask, d_out = make_inputs(Case("linearize", 1, 40, 40, 1, 16, mask="random"), seed=3)
    _, linear = jax.linearize(attention_fn("pallas_gpu", mask, None), q, k, v)
    _, ref_linear = jax.linearize(reference_fn(mask, None), q, k, v)
    assert relative_error(linear(d_out, k, v), ref_linear(d_out, k, v)) < 1e-5


def test_linear_call_vmap_rule_on_a_closed_form():
    """The vmap rule of linear_call_batching.py on y = r * x (residual r, linear x; transpose
    ct -> r * ct), batched in r only, in x only, and in both; then the transpose under vmap."""
    custom = lambda r, x: jax.custom_derivatives.linear_call(
        lambda r, x: r * x, lambda r, ct: r * ct + 0.0 * ct, r, x
    )  # the transpose is written differently from the callee, so the test sees which one ran
    r = jnp.arange(1.0, 7.0).reshape(2, 3)
    x = jnp.arange(10.0, 16.0).reshape(2, 3)
    np.testing.assert_array_equal(jax.vmap(custom)(r, x), r * x)
    np.testing.assert_array_equal(jax.vmap(custom, in_axes=(0, None))(r, x[0]), r * x[0])
    np.testing.assert_array_equal(jax.vmap(custom, in_axes=(None, 1))(r[:, 0], x), (r[:, :1] * x).T)
    transposed = jax.vmap(lambda r, ct: jax.linear_transpose(lambda x: custom(r, x), x[0])(ct)[0])(r, x)
    np.testing.assert_array_equal(transposed, r * x)
    grads = jax.vmap(jax.grad(lambda r, x: jnp.sum(custom(r, x) ** 2), argnums=1), in_axes=(None, 0))(r[0], x)
    np.testing.assert_array_equal(grads, 2 * r[0] ** 2 * x)


VMAP_VARIANTS = {
    "vmap_of_jvp": lambda f, x, tx: jax.vmap(lambda x, tx: jax.jvp(f, (x,), (tx,))[1])(x, tx),
    "grad_of_vmap": lambda f, x, tx: jax.grad(lambda x: jnp.sum(jax.vmap(f)(x) * tx))(x),
    "vmap_of_grad": lambda f, x, tx: jax.vmap(jax.grad(lambda x, tx: jnp.sum(f(x) * tx)))(x, tx),
}


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param("vmap_of_grad", marks=pytest.mark.slow),
        pytest.param("vmap_of_jvp", marks=pytest.mark.slow),
        pytest.param("grad_of_vmap", marks=pytest.mark.slow),
    ],
)
def test_vmap_of_jvp_and_grad(variant):
    """jax.vmap with jvp and grad (the tangent's `linear_call` needs the vmap rule of
    linear_call_batching.py)."""
    x = jax.random.normal(jax.random.key(6), (2, 1, 20, 1, 16))  # vmapped axis first
    tx = jax.random.normal(jax.random.key(7), x.shape)
    self_attention = lambda attn: lambda x: attn(x, x, x)
    result = jax.jit(VMAP_VARIANTS[variant], static_argnums=0)(
        self_attention(attention_fn("pallas_gpu", None, None)), x, tx
    )
    expected = VMAP_VARIANTS[variant](self_attention(reference_fn(None, None)), x, tx)
    assert relative_error(result, expected) < 1e-5


@pytest.mark.slow
def test_jvp_per_shard_under_a_mesh():
    """With a mesh and partition_spec, the kernel runs per head shard inside shard_map; its JVP and
    the gradient of a function of the JVP equal the reference's."""
    mesh = jax.make_mesh((2,), ("tensor",), devices=jax.devices()[:2])
    spec = jax.sharding.PartitionSpec(None, None, "tensor", None)
    q, k, v, mask, _ = make_inputs(Case("mesh", 2, 24, 40, 4, 16, mask="random"), seed=8)
    tangents = tangents_like(q, k, v, seed=9)
    attn = lambda q, k, v: flash_attention(
        q, k, v, mask=mask, implementation="pallas_gpu", interpret=True, partition_spec=spec
    )
    with jax.set_mesh(mesh):
        on_mesh = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
        args = [on_mesh(x) for x in (q, k, v, *tangents)]
        _, t_out = jax.block_until_ready(jax.jit(lambda *a: jax.jvp(attn, a[:3], a[3:]))(*args))
        grads = jax.block_until_ready(jax.jit(jax.grad(jvp_loss(attn), argnums=range(6)))(*args))
    _, ref_t_out = jax.jvp(reference_fn(mask, None), (q, k, v), tangents)
    ref_grads = jax.grad(jvp_loss(reference_fn(mask, None)), argnums=range(6))(q, k, v, *tangents)
    assert relative_error(t_out, ref_t_out) < 1e-5
    for grad, ref_grad in zip(grads, ref_grads):
        assert relative_error(grad, ref_grad) < 1e-5


# --------------------------------------------------------------------------------------------------
# the raw tangent kernels, several blocks on every grid axis, each on its own interpreter


def small_padded_problem(implementation):
    """Raw kernel inputs with two key blocks (the accumulation over key tiles), a key bias with
    masked entries."""
    if implementation == "pallas_gpu":
        blocks = pallas_gpu.GpuBlockSizes(16, 16, 16, 16)
        shape_q, shape_k = (1, 32, 1, 16), (1, 32, 1, 16)
        to_bshd = lambda x: x
    else:
        blocks = pallas_tpu.TpuBlockSizes(128, 128, 128, 128)
        shape_q, shape_k = (1, 1, 128, 64), (1, 1, 256, 64)
        to_bshd = lambda x: jnp.transpose(x, (0, 2, 1, 3))
    kq, kk, kv, km = jax.random.split(jax.random.key(5), 4)
    q, k, v = (jax.random.normal(key, shape) for key, shape in ((kq, shape_q), (kk, shape_k), (kv, shape_k)))
    mask = jax.random.bernoulli(km, 0.7, (1, to_bshd(k).shape[1])).at[:, 0].set(True)
    return blocks, to_bshd, (q, k, v, mask)


def check_tangent_kernel(implementation, blocks, to_bshd, q, k, v, mask):
    forward, tangent = {
        "pallas_gpu": (pallas_gpu.gpu_flash_forward, pallas_gpu.gpu_flash_tangent),
        "pallas_tpu": (pallas_tpu.tpu_flash_forward, pallas_tpu.tpu_flash_tangent),
    }[implementation]
    tq, tk, tv = tangents_like(q, k, v, seed=4)
    scale = 0.2
    bias = jnp.where(mask, 0.0, -jnp.inf)
    out, lse = forward(q, k, v, bias, scale=scale, blocks=blocks, interpret=True)
    t_out = tangent(q, k, v, bias, out, lse, tq, tk, tv, scale=scale, blocks=blocks, interpret=True)
    assert jnp.isfinite(t_out).all(), "the tangent has unwritten (NaN) or non-finite elements"
    reference = lambda q, k, v: reference_attention(to_bshd(q), to_bshd(k), to_bshd(v), mask=mask, softmax_scale=scale)
    _, ref_t_out = jax.jvp(reference, (q, k, v), (tq, tk, tv))
    assert relative_error(to_bshd(t_out), ref_t_out) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("implementation", PALLAS)
def test_tangent_kernel_writes_every_output_element(implementation):
    """Each kernel on its own interpreter (TPU: Pallas' TPU interpret mode, which the `jax.jvp` path
    cannot use inside `linear_call`), so unwritten or stale blocks show as NaN or wrong values."""
    blocks, to_bshd, (q, k, v, mask) = small_padded_problem(implementation)
    check_tangent_kernel(implementation, blocks, to_bshd, q, k, v, mask)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", PALLAS)
def test_tangent_kernel_writes_every_output_element_larger(implementation):
    _, blocks, to_bshd, (q, k, v, mask, _) = _padded_problem(implementation)
    check_tangent_kernel(implementation, blocks, to_bshd, q, k, v, mask)


# --------------------------------------------------------------------------------------------------
# lowering for the accelerators, from this CPU-only host


def export_module(fn, implementation, platform, shape, dtype):
    args = [jax.ShapeDtypeStruct(shape, dtype)] * 6 + [jax.ShapeDtypeStruct(shape[:2], jnp.bool_)]
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)] if platform == "cuda" else []
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    return exported.mlir_module()


def jvp_program(implementation):
    def program(q, k, v, tq, tk, tv, mask):
        attn = lambda q, k, v: flash_attention(q, k, v, mask=mask, implementation=implementation)
        return jax.jvp(attn, (q, k, v), (tq, tk, tv))

    return program


def grad_of_jvp_program(implementation):
    def program(q, k, v, tq, tk, tv, mask):
        attn = lambda q, k, v: flash_attention(q, k, v, mask=mask, implementation=implementation)
        return jax.grad(jvp_loss(attn), argnums=range(6))(q, k, v, tq, tk, tv)

    return program


PLATFORMS = [("pallas_tpu", "tpu", "tpu_custom_call"), ("pallas_gpu", "cuda", TRITON_CUSTOM_CALL)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("implementation,platform,custom_call", PLATFORMS)
def test_jvp_lowers_for_accelerator(implementation, platform, custom_call, dtype):
    module = export_module(jvp_program(implementation), implementation, platform, (2, 1000, 4, 64), dtype)
    suffix = "tpu" if platform == "tpu" else "gpu"
    assert set(re.findall(r"diffjax_flash_\w+", module)) == {
        f"diffjax_flash_{k}_{suffix}" for k in ("forward", "tangent")
    }
    assert module.count(f"custom_call @{custom_call}") == 2  # one launch of each


@pytest.mark.parametrize("implementation,platform,custom_call", PLATFORMS)
def test_grad_still_launches_three_kernels(implementation, platform, custom_call):
    """jax.grad of the attention alone: forward, dQ and dK/dV, once each, as before forward mode."""

    def program(q, k, v, tq, tk, tv, mask):
        attn = lambda q, k, v: flash_attention(q, k, v, mask=mask, implementation=implementation)
        return jax.grad(lambda *a: jnp.sum(attn(*a).astype(jnp.float32) * tq), argnums=(0, 1, 2))(q, k, v)

    module = export_module(program, implementation, platform, (2, 1000, 4, 64), jnp.bfloat16)
    assert module.count(f"custom_call @{custom_call}") == 3
    assert "diffjax_flash_tangent" not in module


@pytest.mark.parametrize("implementation,platform,custom_call", PLATFORMS)
def test_grad_of_jvp_lowers_for_accelerator(implementation, platform, custom_call):
    module = export_module(grad_of_jvp_program(implementation), implementation, platform, (1, 300, 2, 96), jnp.bfloat16)
    suffix = "tpu" if platform == "tpu" else "gpu"
    kernels = {f"diffjax_flash_{k}_{suffix}" for k in ("forward", "tangent", "dq", "dkv")}
    assert set(re.findall(r"diffjax_flash_\w+", module)) == kernels


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_jvp_stores_no_seq_by_seq_array_outside_the_kernels(platform):
    seq = 2048
    shape = (1, seq, 1, 64)
    implementation = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
    kernel_module = export_module(jvp_program(implementation), implementation, platform, shape, jnp.bfloat16)
    assert largest_array(kernel_module) <= seq * 64
    xla_module = export_module(jvp_program("xla"), "xla", platform, shape, jnp.bfloat16)  # control
    assert largest_array(xla_module) >= seq * seq


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_grad_of_jvp_stores_only_query_chunks_by_seq(platform):
    """The second derivative (plain JAX) runs over query chunks under jax.checkpoint: its largest
    array is (chunk, seq_k), not (seq_q, seq_k) as for XLA attention."""
    seq = 2048
    shape = (1, seq, 1, 64)
    implementation = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
    module = export_module(grad_of_jvp_program(implementation), implementation, platform, shape, jnp.bfloat16)
    assert largest_array(module) <= attention.SECOND_DERIVATIVE_QUERY_CHUNK * seq
    xla_module = export_module(grad_of_jvp_program("xla"), "xla", platform, shape, jnp.bfloat16)  # control
    assert largest_array(xla_module) >= seq * seq


def test_case_table_covers_several_key_blocks_on_gpu():
    """The default cases must exercise the online accumulation over more than one key tile."""
    blocks = pallas_gpu.GpuBlockSizes().fitted(CASES[0].seq_q, CASES[0].seq_k)
    assert CASES[0].seq_k // blocks.block_k >= 2 and CASES[0].seq_q // blocks.block_q >= 2


# ------------------------------------------------------------------------------------------------
# few-step training through the kernels: a DiT and a U-Net, sCM and MeanFlow
# ------------------------------------------------------------------------------------------------


def few_step_losses(preset, implementation, **overrides):
    """{objective: (loss_fn, params)} of sCM training (TrigFlow) and MeanFlow on `preset` with
    attention by `implementation` (Pallas kernels in interpret mode); the same params for every
    implementation."""
    interpret = implementation in PALLAS
    c = overrides["in_channels"]

    def functional(extra_channels=0):
        model = models.create(
            preset,
            attention_impl=implementation,
            attention_interpret=interpret,
            **{**overrides, "in_channels": c + extra_channels},
        )
        apply, params = models.functional(model)
        return apply, perturbed(params)

    apply, params = functional()
    apply_mf, params_mf = functional(extra_channels=1)

    def average_velocity(p, x, t, r):
        lag = jnp.broadcast_to((t - r)[:, None, None, None], x.shape[:-1] + (1,))
        return apply_mf(p, jnp.concatenate([x, lag], axis=-1), t)[..., :c]

    weighting = distill.AdaptiveWeighting()
    return {
        "sCM": (
            distill.scm_loss(apply, distill.TrigFlow(), weighting=weighting),
            {"student": params, "weighting": weighting.init(jax.random.key(1))},
        ),
        "MeanFlow": (distill.meanflow_loss(average_velocity, FlowMatching()), {"student": params_mf}),
    }


MODELS = {
    "dit": ("DiT-S/2", dict(image_size=8, in_channels=2, depth=1, hidden_size=32, num_heads=2)),
    "unet": (
        "unet-small",
        dict(image_size=8, in_channels=1, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)),
    ),
}


@pytest.mark.slow  # 0.5-4 min each on 2 cores: interpret-mode kernels inside a network's JVP and its gradient
@pytest.mark.parametrize(
    "model, implementation", [("dit", "pallas_gpu"), ("dit", "pallas_tpu"), ("unet", "pallas_gpu")]
)
def test_few_step_training_through_the_kernels_matches_xla(model, implementation):
    """sCM's tangent and MeanFlow's target differentiate the network in forward mode, and training
    differentiates that in reverse: loss and gradient through the Pallas kernels equal XLA's."""
    preset, overrides = MODELS[model]
    batch = jax.random.normal(jax.random.key(2), (2, 8, 8, overrides["in_channels"]))
    expected = few_step_losses(preset, "xla", **overrides)
    for name, (loss_fn, params) in few_step_losses(preset, implementation, **overrides).items():
        want_fn, want_params = expected[name]
        value_and_grad = [
            jax.jit(jax.value_and_grad(lambda p, f=f: f(p, jax.random.key(3), batch)[0]))(p)
            for f, p in ((loss_fn, params), (want_fn, want_params))
        ]
        (loss, grad), (want_loss, want_grad) = value_and_grad
        assert float(want_loss) > 0 and np.isfinite(float(loss))
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-4, err_msg=name)
        got, want = jax.tree.leaves(grad), jax.tree.leaves(want_grad)
        error = max(relative_error(g, w) for g, w in zip(got, want) if float(jnp.max(jnp.abs(w))) > 0)
        assert error < 1e-3, (name, error)
        assert sum(float(jnp.max(jnp.abs(w))) > 0 for w in want) > len(want) // 2  # most parameters learn
