"""A `jax.vmap` rule for `jax.custom_derivatives.linear_call`, which JAX (0.10) ships without one.

The flash-attention tangent is a `linear_call` (the tangent kernel, with the flash backward as its
transpose; see attention.py), and every `jax.grad` or `jax.jvp` of the attention goes through it,
so without this rule `jax.vmap(jax.grad(f))` or `jax.grad(jax.vmap(f))` over the attention would
fail. The rule vmaps the callee and its transpose (both jaxprs) over a leading axis: residuals keep
their batching, the linear inputs are all batched (so that the transpose's outputs, the linear
inputs' cotangents, have one shape). It is registered on import, only where JAX has no rule of its
own, and uses JAX internals (jax._src), so it is pinned to the JAX versions this package supports.
"""

import functools

from jax._src import core
from jax._src.custom_derivatives import linear_call_p
from jax._src.interpreters import batching
from jax._src.interpreters import partial_eval as pe


def _batched_jaxpr(closed_jaxpr, axis_data, in_batched):
    """(jaxpr with no consts, its new leading const args) vmapped over axis 0 of the batched inputs,
    every output batched at axis 0."""
    batched, _ = batching.batch_jaxpr(closed_jaxpr, axis_data, in_batched, instantiate=True)
    return core.ClosedJaxpr(pe.convert_constvars_jaxpr(batched.jaxpr), ()), list(batched.consts)


def _linear_call_batching_rule(axis_data, args, dims, *, callee, transpose_thunk, num_callee_consts, num_res):
    num_fixed = len(args) - (len(callee.in_avals) - num_callee_consts - num_res)  # consts and residuals
    moved = []
    for i, (x, d) in enumerate(zip(args, dims)):
        if i >= num_fixed:  # a linear input: always batched
            moved.append(batching.bdim_at_front(x, d, axis_data.size))
        else:
            moved.append(x if d is None else batching.moveaxis(x, d, 0))
    in_batched = [d is not None for d in dims[:num_fixed]] + [True] * (len(args) - num_fixed)
    new_callee, callee_consts = _batched_jaxpr(callee, axis_data, in_batched)
    res_batched = in_batched[num_callee_consts : num_callee_consts + num_res]

    @functools.cache
    def new_transpose_thunk():
        transpose, t_consts = transpose_thunk()
        num_cts = len(transpose.in_avals) - len(t_consts) - num_res
        t_batched = [False] * len(t_consts) + res_batched + [True] * num_cts
        new_transpose, new_consts = _batched_jaxpr(transpose, axis_data, t_batched)
        return new_transpose, new_consts + list(t_consts)

    out = linear_call_p.bind(
        *callee_consts,
        *moved,
        callee=new_callee,
        transpose_thunk=new_transpose_thunk,
        num_callee_consts=len(callee_consts) + num_callee_consts,
        num_res=num_res,
    )
    return out, [0] * len(out)


if linear_call_p not in batching.fancy_primitive_batchers:
    batching.fancy_primitive_batchers[linear_call_p] = _linear_call_batching_rule
