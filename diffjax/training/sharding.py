"""Meshes, logical axis rules and the shardings of the train state and batches (pjit semantics).

The mesh has three axes, ("data", "fsdp", "tensor"), sized from the config (one may be -1: the
remaining devices) over all devices of all hosts. Parameters carry logical axis names (see
`diffjax.models.LOGICAL_AXES`); a rules table maps each logical name to mesh axes:

    batch  -> ("data", "fsdp")   examples are split over both data-parallel axes
    embed  -> "fsdp"             FSDP: parameters, optimizer state and EMA sharded over fsdp
    conv_out -> "fsdp"
    mlp, heads -> "tensor"       tensor parallelism splits MLP hidden units and heads
    act_mlp, act_heads -> "tensor"   (activations: the same split inside a block)
    everything else replicated

A dimension whose size is not divisible by its mesh axes, or whose mesh axis is already used by
another dimension of the same array, is replicated instead. `config.mesh.rules` overrides
entries (a mesh axis name, a list of them, or "" for replicated).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from diffjax.training.state import trainable_leaves

__all__ = [
    "MESH_AXES",
    "DEFAULT_RULES",
    "mesh_shape",
    "create_mesh",
    "make_rules",
    "logical_to_mesh",
    "param_shardings",
    "placement",
    "state_shardings",
    "batch_sharding",
    "replicated",
    "traced_under_mesh",
    "global_batch",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: dict[str, tuple[str, ...] | None] = {
    # parameters
    "embed": ("fsdp",),
    "conv_out": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv": None,
    "conv_in": None,
    "classes": None,
    "layers": None,
    "norm": None,
    # activations (see diffjax.models.LOGICAL_AXES)
    "batch": BATCH_AXES,
    "seq": None,
    "act_embed": None,
    "act_mlp": ("tensor",),
    "act_heads": ("tensor",),
    "act_kv": None,
    "act_channels": None,
}


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes, resolving one -1 to the remaining devices."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed}) do not divide the {num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but there are {num_devices}"
        )
    return tuple(sizes)


def create_mesh(mesh_config, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes), with
    automatic (pjit-style) sharding propagation on every axis."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def make_rules(overrides: Mapping[str, Any] | None = None) -> dict[str, tuple[str, ...] | None]:
    """DEFAULT_RULES updated with config overrides; checks the mesh axis names."""
    rules = dict(DEFAULT_RULES)
    for logical, target in dict(overrides or {}).items():
        if target in ("", None):
            rules[logical] = None
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(
                f"mesh.rules[{logical!r}] = {target!r} names unknown mesh axes {unknown}; allowed: {list(MESH_AXES)}"
            )
        rules[logical] = axes
    return rules


def logical_to_mesh(logical: PartitionSpec, shape, mesh: Mesh, rules) -> PartitionSpec:
    """Map a PartitionSpec of logical names to mesh axes for an array of `shape` (trailing
    unsharded dimensions left out)."""
    used: set[str] = set()
    out = []
    for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axes = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        axes = tuple(a for a in (axes or ()) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
        else:
            out.append(None)
    while out and out[-1] is None:  # P(None, None) is P(): jit returns the latter, and a spec that
        out.pop()  # differs in form only would make the next call with its output compile again
    return PartitionSpec(*out)


def traced_under_mesh(fn, mesh: Mesh, rules):
    """fn, traced with `mesh` as the abstract mesh and `rules` as Flax's logical axis rules, so
    the models' activation constraints and per-shard kernels (flash attention) see them."""
    pairs = [(name, axes or None) for name, axes in rules.items()]

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(pairs):
            return fn(*args, **kwargs)

    return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def placement(mesh: Mesh, rules) -> Callable[[PartitionSpec, tuple], NamedSharding]:
    """`place(logical_spec, shape)`: the NamedSharding of a parameter with those logical axis names
    and shape (e.g. for `diffjax.models.load_pretrained(..., placement=placement(mesh, rules))`)."""
    return lambda spec, shape: NamedSharding(mesh, logical_to_mesh(spec, shape, mesh, rules))


def param_shardings(abstract_params, logical_specs, mesh: Mesh, rules) -> Any:
    """NamedShardings for a params tree from its tree of logical PartitionSpecs."""
    place = placement(mesh, rules)
    return jax.tree.map(
        lambda p, spec: place(spec, p.shape),
        abstract_params,
        logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def state_shardings(
    abstract_state, params_sharding, optimizer: optax.GradientTransformation, mesh: Mesh, trainable=None
):
    """Shardings of a TrainState: params and EMA by the rules, the optimizer's per-parameter
    statistics like their parameters (trained leaves only, see state.trainable_leaves), scalars
    replicated."""
    repl = replicated(mesh)
    mask = trainable_leaves(abstract_state.params, trainable)
    leaves, treedef = jax.tree.flatten(params_sharding, is_leaf=lambda x: isinstance(x, NamedSharding))
    trained_sharding = treedef.unflatten([s if m else optax.MaskedNode() for s, m in zip(leaves, mask)])
    opt_sharding = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state.opt_state,
        trained_sharding,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return abstract_state.replace(
        step=repl,
        params=params_sharding,
        ema_params=params_sharding,
        opt_state=opt_sharding,
        rng=repl,
        skipped_steps=repl,
        consecutive_nonfinite=repl,
        tracked_averages=tuple(params_sharding for _ in abstract_state.tracked_averages),
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Examples split over the data-parallel axes (data, fsdp); other dimensions replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each host's slice of the batch into global arrays sharded over (data, fsdp).

    Every process passes its own per-host batch (global_batch_size / process_count examples, in
    process order); the result is the global batch, with no data sent between hosts.
    """
    out = {}
    for name, local in local_batch.items():
        local = np.asarray(local)
        sharding = batch_sharding(mesh, local.ndim)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def replicates_params(mesh: Mesh) -> bool:
    """Whether `mesh` keeps every parameter whole on every device: only the data axis splits."""
    return all(size == 1 for axis, size in mesh.shape.items() if axis != "data")


def network_with_one_gradient_all_reduce(apply: Callable, mesh: Mesh) -> Callable:
    """`apply(params, x, t, y=None, *, key=None)` with the batch split over the mesh's data axis by
    `shard_map`, and its replicated parameters raveled into one array that is cast to varying once:
    the gradient of the parameters is then summed over the devices in one all-reduce of one buffer,
    where the partitioner all-reduces one array per parameter (on XLA's CPU runtime about 50 us each,
    experiments/results/cpu_all_reduce.md). The loss around the network stays in the global view (its
    noise, anything that mixes a batch's examples); the network must treat examples independently,
    as the U-Nets and DiT do. For meshes that replicate the parameters (`replicates_params`); calls
    with a dropout key, a batch the devices do not divide, or times that are neither one scalar nor
    one per example go to `apply` as they are."""
    devices = mesh.shape["data"]
    batch = PartitionSpec("data")

    @functools.wraps(apply)  # keeps what apply declares (its prediction)
    def network(params, x, t, y=None, *, key=None):
        if key is not None or x.shape[0] % devices or jax.numpy.ndim(t) > 1:
            return apply(params, x, t, y, key=key)
        flat, unravel = ravel_pytree(params)

        def local(flat, x, t, y):
            with nnx.logical_axis_rules(()):  # per device: the activation constraints have nothing to split
                return apply(unravel(jax.lax.pcast(flat, "data", to="varying")), x, t, y)

        t = jax.numpy.broadcast_to(t, x.shape[:1])
        specs = (PartitionSpec(), batch, batch, None if y is None else batch)
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=batch)(flat, x, t, y)

    return network
