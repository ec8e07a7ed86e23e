"""The train state pytree and the train-step factory: any loss over any params pytree.

The pieces are optax-shaped (init/update): the optimizer is an `optax.GradientTransformation`,
the parameter average a `ParamAverage` (`ema(decay)`), and a mask says which parameters are
trained. A params pytree may hold several networks, e.g. {"student": ..., "teacher": ...,
"target": ...}; frozen leaves get no optimizer state, no gradient and no average update.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, NamedTuple, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = [
    "TrainState",
    "ParamAverage",
    "ema",
    "stream_key",
    "stream_id",
    "trainable_leaves",
    "make_optimizer",
    "make_learning_rate",
    "create_train_state",
    "make_train_step",
]

# Which leaves are trained: None (all), a pytree of bools that is a prefix of the params
# (e.g. {"student": True, "teacher": False}), or predicate(path, leaf) -> bool with path the
# tuple of dict keys / indices leading to the leaf, e.g. ("teacher", "conv", "kernel").
Trainable = Union[None, Any, Callable[[tuple, Any], bool]]


# ------------------------------------------------------------------------------------------------
# named random streams
# ------------------------------------------------------------------------------------------------


def stream_id(name: str) -> int:
    """A stable 31-bit id of a stream name (CRC-32: the same in every process and Python run)."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def stream_key(seed: int, name: str) -> jax.Array:
    """The root key of a named random stream: fold_in(key(seed), stream_id(name)).

    Streams of one seed are independent of each other and of the order they are drawn in; a
    run uses "train" (the train state's key), "sample_grid", "sample", "fid" and "bits_per_dim"."""
    return jax.random.fold_in(jax.random.key(seed), stream_id(name))


# ------------------------------------------------------------------------------------------------
# train state, optimizer, parameter average
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: a pytree, saved whole in every checkpoint.

    rng is raw key data (uint32) so that checkpoints hold plain arrays; the key of step s is
    fold_in(rng, s), so a resumed run draws the same randomness as an uninterrupted one.
    opt_state holds state for the trained leaves only (frozen ones are optax.MaskedNode).
    """

    step: jax.Array  # int32 scalar: batches consumed (updates applied + skipped_steps)
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    skipped_steps: jax.Array  # int32: updates skipped because of non-finite loss or gradients
    consecutive_nonfinite: jax.Array  # int32: non-finite steps in a row (reset by a finite one)
    tracked_averages: tuple = ()  # further averages of the trained leaves (e.g. post-hoc EMA profiles)


class ParamAverage(NamedTuple):
    """A running average of parameters, optax-style: init(params) -> average;
    update(average, params, step) -> average (step: the int32 step count before this update)."""

    init: Callable[[Any], Any]
    update: Callable[[Any, Any, jax.Array], Any]


def ema(decay: float, *, warmup: bool = True) -> ParamAverage:
    """Exponential moving average: avg <- d * avg + (1 - d) * params, with
    d = min(decay, (1 + step) / (10 + step)) if warmup (early averages are not dominated by the
    initialisation), else d = decay."""
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"ema decay must be in [0, 1), got {decay!r}")

    def init(params):
        return jax.tree.map(jnp.copy, params)

    def update(average, params, step):
        d = jnp.float32(decay)
        if warmup:
            s = step.astype(jnp.float32)
            d = jnp.minimum(d, (1.0 + s) / (10.0 + s))
        return jax.tree.map(lambda a, p: d * a + (1.0 - d) * p, average, params)

    return ParamAverage(init, update)


def inverse_sqrt_learning_rate(peak: float, warmup_steps: int, decay_start: int) -> optax.Schedule:
    """EDM2's schedule (Karras et al. 2024, Eq. 67): peak * min(step / warmup_steps, 1) /
    sqrt(max(step / decay_start, 1)), in the run's own step count."""

    def rate(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(step / warmup_steps, 1.0) if warmup_steps else 1.0
        return peak * warm / jnp.sqrt(jnp.maximum(step / decay_start, 1.0))

    return rate


def make_learning_rate(
    peak: float,
    num_steps: int,
    *,
    warmup_steps: int = 0,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    decay_start: int = 70_000,
) -> optax.Schedule:
    """Linear warm-up to `peak`, then constant, cosine decay to peak * min_lr_ratio at num_steps, or
    (schedule "inverse_sqrt") `inverse_sqrt_learning_rate` with decay from step decay_start."""
    if schedule not in ("constant", "cosine", "inverse_sqrt"):
        raise ValueError(f"schedule must be 'constant', 'cosine' or 'inverse_sqrt', got {schedule!r}")
    if schedule == "inverse_sqrt":
        if not (isinstance(decay_start, int) and decay_start >= 1):
            raise ValueError(f"decay_start must be an int >= 1, got {decay_start!r}")
        return inverse_sqrt_learning_rate(peak, warmup_steps, decay_start)
    if schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(peak, max(num_steps - warmup_steps, 1), alpha=min_lr_ratio)
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after], [warmup_steps])


def make_optimizer(
    learning_rate: optax.Schedule,
    *,
    name: str = "adamw",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
) -> optax.GradientTransformation:
    """Global-norm clipping (if grad_clip > 0), then Adam or AdamW on the scheduled rate."""
    if name == "adamw":
        opt = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    elif name == "adam":
        opt = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'adamw', got {name!r}")
    if grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
    return opt


# ------------------------------------------------------------------------------------------------
# the trainable mask
# ------------------------------------------------------------------------------------------------


def leaf_names(tree) -> list[str]:
    """The jax.tree_util.keystr path of each leaf of `tree`, in jax.tree.leaves order."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _path_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def trainable_leaves(params, trainable: Trainable = None) -> list[bool]:
    """One bool per leaf of params (in jax.tree.leaves order): is it trained?"""
    if trainable is None:
        return [True] * len(jax.tree.leaves(params))
    if callable(trainable):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        return [bool(trainable(_path_names(path), leaf)) for path, leaf in flat]
    full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub), trainable, params)
    return [bool(x) for x in jax.tree.leaves(full)]


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _split(tree, mask: list[bool]):
    """tree with its frozen leaves replaced by optax.MaskedNode (an empty pytree)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([x if m else optax.MaskedNode() for x, m in zip(leaves, mask)])


def _merge(trained, tree, mask: list[bool]):
    """tree with its trained leaves taken from `trained` (the output of _split)."""
    leaves, treedef = jax.tree.flatten(tree)
    new = jax.tree.leaves(trained, is_leaf=_is_masked)
    return treedef.unflatten([n if m else x for n, x, m in zip(new, leaves, mask)])


def create_train_state(
    params,
    optimizer: optax.GradientTransformation,
    key,
    *,
    average: ParamAverage | None = None,
    trainable: Trainable = None,
    tracked: Sequence[ParamAverage] = (),
) -> TrainState:
    """The state at step 0. key: a jax.random key (or an int seed for jax.random.key(seed)).
    average: the parameter average (default: ema(0.0), i.e. a copy of the parameters).
    tracked: further averages kept in state.tracked_averages (one params-shaped pytree each)."""
    if isinstance(key, int):
        key = jax.random.key(key)
    mask = trainable_leaves(params, trainable)
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(
        step=zero,
        params=params,
        ema_params=(average or ema(0.0)).init(params),
        opt_state=optimizer.init(_split(params, mask)),
        rng=jax.random.key_data(key),
        skipped_steps=zero,
        consecutive_nonfinite=zero,
        tracked_averages=tuple(a.init(params) for a in tracked),
    )
    return _placed_like(state, params)


def _placed_like(tree, params):
    """tree with its unplaced leaves (the fresh counters and key, an optimizer's step count) replicated
    on the mesh of `params` when they lie on one (e.g. from load_run), as a jitted step returns them:
    otherwise the step's second call, with its own output, compiles again. Anything else as given."""
    leaves = jax.tree.leaves(params)
    concrete = leaves and isinstance(leaves[0], jax.Array) and not isinstance(leaves[0], jax.core.Tracer)
    if not (concrete and isinstance(leaves[0].sharding, jax.sharding.NamedSharding)):
        return tree  # traced, numpy or single-device params
    replicated = jax.sharding.NamedSharding(leaves[0].sharding.mesh, jax.sharding.PartitionSpec())

    def place(x):
        on_mesh = isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding)
        return x if on_mesh else jax.device_put(x, replicated)

    return jax.tree.map(place, tree)


def _select(condition, new, old):
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


# ------------------------------------------------------------------------------------------------
# the train step
# ------------------------------------------------------------------------------------------------


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    average: ParamAverage,
    *,
    trainable: Trainable = None,
    batch_transform: Callable | None = None,
    learning_rate: optax.Schedule | None = None,
    tracked: Sequence[ParamAverage] = (),
) -> Callable:
    """Build the pure `train_step(state, batch) -> (state, metrics)`.

    loss_fn(params, key, batch) -> (loss, aux dict) over the whole params pytree; only the
    `trainable` leaves are differentiated, updated by `optimizer` and averaged by `average`;
    the others pass through bit-identical. batch_transform(key, batch) -> batch runs first
    (e.g. label dropout). A step whose loss or gradient norm is not finite applies no update
    (parameters, average and optimizer state unchanged) and is counted in `skipped_steps` and
    `consecutive_nonfinite`; the caller decides when to stop. learning_rate: a schedule to report
    in the metrics. tracked: the averages of state.tracked_averages, updated like `average`.
    """

    def train_step(state: TrainState, batch):
        if len(state.tracked_averages) != len(tracked):
            raise ValueError(f"the state tracks {len(state.tracked_averages)} averages, the step {len(tracked)}")
        mask = trainable_leaves(state.params, trainable)  # static: fixed by the params' structure
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        key_batch, key_loss = jax.random.split(key)
        if batch_transform is not None:
            batch = batch_transform(key_batch, batch)

        def trained_loss(trained):
            return loss_fn(_merge(trained, state.params, mask), key_loss, batch)

        trained = _split(state.params, mask)
        (loss, aux), grads = jax.value_and_grad(trained_loss, has_aux=True)(trained)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, opt_state = optimizer.update(grads, state.opt_state, trained)
        new_trained = optax.apply_updates(trained, updates)

        def averaged(update, old):
            new = update(_split(old, mask), new_trained, state.step)
            return _merge(_select(finite, new, _split(old, mask)), old, mask)

        nonfinite = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=_merge(_select(finite, new_trained, trained), state.params, mask),
            ema_params=averaged(average.update, state.ema_params),
            opt_state=_select(finite, opt_state, state.opt_state),
            skipped_steps=state.skipped_steps + nonfinite,
            consecutive_nonfinite=(state.consecutive_nonfinite + nonfinite) * nonfinite,
            tracked_averages=tuple(averaged(a.update, old) for a, old in zip(tracked, state.tracked_averages)),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": nonfinite, **dict(aux)}
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate(state.step)
        return new_state, metrics

    return train_step
