"""The train state pytree, the optimizer from the config, and the pure train step."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "make_optimizer", "make_learning_rate", "create_train_state", "make_train_step"]


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: a pytree, saved whole in every checkpoint.

    rng is raw key data (uint32) so that checkpoints hold plain arrays; the key of step s is
    fold_in(rng, s), so a resumed run draws the same randomness as an uninterrupted one.
    """

    step: jax.Array  # int32 scalar: batches consumed (updates applied + skipped_steps)
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    skipped_steps: jax.Array  # int32: updates skipped because of non-finite loss or gradients
    consecutive_nonfinite: jax.Array  # int32: non-finite steps in a row (reset by a finite one)


def make_learning_rate(optim_config, num_steps: int) -> optax.Schedule:
    """Linear warm-up to learning_rate, then constant or cosine decay to min_lr_ratio."""
    peak = float(optim_config.learning_rate)
    warmup = int(optim_config.warmup_steps)
    if optim_config.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1), alpha=float(optim_config.min_lr_ratio))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (if grad_clip > 0), then Adam or AdamW on the scheduled rate."""
    lr = make_learning_rate(optim_config, num_steps)
    kwargs = dict(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps)
    if optim_config.name == "adamw":
        opt = optax.adamw(lr, weight_decay=optim_config.weight_decay, **kwargs)
    else:
        opt = optax.adam(lr, **kwargs)
    if optim_config.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), opt)
    return opt


def create_train_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped_steps=zero,
        consecutive_nonfinite=zero,
    )


def _select(condition, new, old):
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    *,
    ema_warmup: bool = True,
    batch_transform: Callable | None = None,
    learning_rate: optax.Schedule | None = None,
) -> Callable:
    """Build the pure `train_step(state, batch) -> (state, metrics)`.

    loss_fn(params, key, batch) -> (loss, aux). batch_transform(key, batch) -> batch runs first
    (e.g. label dropout). A step whose loss or gradient norm is not finite applies no update
    (parameters, EMA and optimizer state unchanged) and is counted in `skipped_steps` and
    `consecutive_nonfinite`; the caller decides when to stop (see the nonfinite policy).
    EMA: ema <- d * ema + (1 - d) * params after every applied update, with
    d = min(ema_decay, (1 + step) / (10 + step)) if ema_warmup (so early averages are not
    dominated by the initialisation), else d = ema_decay.
    """

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        key_batch, key_loss = jax.random.split(key)
        if batch_transform is not None:
            batch = batch_transform(key_batch, batch)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, key_loss, batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = jnp.float32(ema_decay)
        if ema_warmup:
            step = state.step.astype(jnp.float32)
            decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        nonfinite = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=_select(finite, params, state.params),
            ema_params=_select(finite, ema, state.ema_params),
            opt_state=_select(finite, opt_state, state.opt_state),
            skipped_steps=state.skipped_steps + nonfinite,
            consecutive_nonfinite=(state.consecutive_nonfinite + nonfinite) * nonfinite,
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "nonfinite": nonfinite,
            **{k: v for k, v in aux.items()},
        }
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate(state.step)
        return new_state, metrics

    return train_step
