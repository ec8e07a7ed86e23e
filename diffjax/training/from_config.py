"""The config boundary: config names and options -> process, model, loss, denoiser, sampler,
optimizer objects. Every place where a config string or option dict becomes a library object or
call is in this module; everything below it takes plain values and objects.

`time_scale` (what the network multiplies its time input by) has its one owner here:
`network_time_scale`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from diffjax import losses, models
from diffjax.control.operators import OPERATORS, Operator
from diffjax.control.posterior import POSTERIOR_METHODS, PosteriorMethod
from diffjax.denoisers import PRECONDITIONED, Denoiser
from diffjax.models import edm2
from diffjax.processes import GaussianProcess, get_process
from diffjax.samplers import GRIDS, SOLVERS, sample
from diffjax.training import sharding as shard_lib
from diffjax.training.config import ConfigError
from diffjax.training.posthoc_ema import power_ema
from diffjax.training.state import ParamAverage, ema, make_learning_rate, make_optimizer
from diffjax.validation import build_named

__all__ = [
    "process_from_config",
    "network_time_scale",
    "model_config_from_config",
    "prediction_from_config",
    "loss_from_config",
    "denoiser_factory_from_config",
    "solver_and_grid_from_config",
    "sampler_from_config",
    "inverse_problem_from_config",
    "learning_rate_from_config",
    "optimizer_from_config",
    "average_from_config",
    "schedule_fields",
    "rules_from_config",
    "mesh_from_config",
]

# Model fields that come from the data (image size, channels, classes), not from the config.
DATA_FIELDS = ("image_size", "in_channels", "num_classes")


def process_from_config(config) -> GaussianProcess:
    try:
        return get_process(config.process.name, **config.process.options.to_dict())
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.process: {err}") from err


def network_time_scale(config, process: GaussianProcess) -> float:
    """What the network multiplies its time input by before embedding it: config.model.overrides
    .time_scale when given, else (the model preset's own default is not used) EDM preconditioning's
    c_noise = log(s)/4 (about [-1.6, 1.1]) times 250, or the process time scaled to [0, 1000]."""
    overrides = config.model.overrides
    if "time_scale" in overrides:
        return float(overrides.time_scale)
    if config.loss.prediction in PRECONDITIONED:
        return 250.0
    return 1000.0 / float(process.t_max)


def model_config_from_config(config, image_shape, num_classes: int, process: GaussianProcess):
    """The model preset's config with the data's image size, channels and classes (if
    config.model.class_conditional), the network time scale, then config.model.overrides (which
    must agree with the data)."""
    height, width, channels = image_shape
    fields = dict(
        image_size=height if height == width else (height, width),
        in_channels=channels,
        time_scale=network_time_scale(config, process),
    )
    if config.model.class_conditional:
        if not num_classes:
            raise ConfigError("config.model.class_conditional = True, but the data set has no class labels")
        fields["num_classes"] = int(num_classes)
    user = config.model.overrides.to_dict()
    for key in ("image_size", "in_channels"):
        if key in user and user[key] != fields[key]:
            raise ConfigError(
                f"config.model.overrides.{key} = {user[key]!r} does not match the data "
                f"(images of shape {tuple(image_shape)}): expected {fields[key]!r}"
            )
    if user.get("learn_sigma") is True:
        raise ConfigError(
            "config.model.overrides.learn_sigma = True is not supported by the trainer, whose losses train a "
            "network with the data's channels; train a learned-variance network (2C channels) with "
            "diffjax.losses.hybrid_loss through the Python API"
        )
    fields.update(user)
    try:
        return models.get_config(config.model.name, **fields)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.model: {err}") from err


def _optional(value):
    return value or None


def prediction_from_config(config, key: str = "prediction"):
    """config.loss.prediction (or .target) as what the library takes: a view name, or an
    `EDMPreconditioned` carrying config.loss.sigma_data."""
    name = config.loss[key]
    if name in PRECONDITIONED:
        return build_named(PRECONDITIONED, name, {"sigma_data": float(config.loss.sigma_data)}, f"loss.{key}")
    return name


def _with_sigma_data(cls: type, options: dict, sigma_data: float) -> dict:
    """The config's one loss.sigma_data goes to every option object with such a field."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return {"sigma_data": sigma_data, **options} if "sigma_data" in fields else options


def _loss_option(config, key: str, table: dict):
    name, options = config.loss[key], config.loss[f"{key}_options"].to_dict()
    if name in table:
        options = _with_sigma_data(table[name], options, float(config.loss.sigma_data))
    return build_named(table, name, options, f"loss.{key}")


def loss_from_config(
    config, apply: Callable, process: GaussianProcess, *, conditional: bool, dropout: bool
) -> Callable:
    """loss_fn(params, key, batch) -> (loss, aux) from config.loss; labels go to the model as y."""
    try:
        return losses.denoising_loss(
            apply,
            process,
            prediction=prediction_from_config(config),
            target=prediction_from_config(config, "target") if config.loss.target else None,
            weighting=_loss_option(config, "weighting", losses.WEIGHTINGS),
            time_sampler=_loss_option(config, "time_sampler", losses.TIME_SAMPLERS),
            cond_keys={"y": "label"} if conditional else (),
            rng_arg="key" if dropout else None,
            uncertainty=uncertainty_from_config(config, process),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.loss: {err}") from err


def uncertainty_from_config(config, process: GaussianProcess) -> Callable | None:
    """u(params, t): the EDM2 network's log-variance head at c_noise = log(sigma / alpha) / 4, or None."""
    if not config.loss.uncertainty_weighting:
        return None
    if not isinstance(models.get_config(config.model.name), models.EDM2UNetConfig):
        raise ConfigError(
            f"config.loss.uncertainty_weighting = True needs a model with a log-variance head (an EDM2 preset); "
            f"config.model.name = {config.model.name!r} has none"
        )
    return lambda params, t: edm2.logvar_from_params(params, jnp.log(process.sigma(t) / process.alpha(t)) / 4.0)


def denoiser_factory_from_config(config, process: GaussianProcess) -> Callable[[Callable], Denoiser]:
    """to_denoiser(net) -> Denoiser for a trained network net(x, t) (prediction
    "edm_preconditioned": the raw network behind EDM preconditioning)."""
    prediction = prediction_from_config(config)

    def to_denoiser(net: Callable) -> Denoiser:
        return Denoiser(net, process, prediction)

    return to_denoiser


def solver_and_grid_from_config(config) -> tuple:
    """(solver, grid) of config.sample, None for '' (the library default; the solver's own grid)."""
    s = config.sample
    solver = build_named(SOLVERS, s.solver, s.solver_options.to_dict(), "sample.solver") if s.solver else None
    grid = build_named(GRIDS, s.grid, s.grid_options.to_dict(), "sample.grid") if s.grid else None
    return solver, grid


def sampler_from_config(config) -> Callable:
    """sampler(denoiser, key, shape) -> samples, with config.sample's solver, steps and grid (''
    = the library default, the solver's own default grid)."""
    solver, grid = solver_and_grid_from_config(config)
    steps = int(config.sample.steps)

    def sampler(denoiser: Denoiser, key, shape):
        return sample(denoiser, key, shape, solver=solver, steps=steps, grid=grid).samples

    return sampler


def inverse_problem_from_config(config, image_shape) -> tuple[Operator, PosteriorMethod, float]:
    """(operator, posterior method, noise_std) of config.inverse for images of `image_shape`. A
    method with a `data_std` option gets config.loss.sigma_data unless its options set it."""
    inv = config.inverse
    try:
        operator = OPERATORS[inv.operator](tuple(image_shape), **inv.operator_options.to_dict())
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.inverse.operator_options: {err}") from err
    options = inv.method_options.to_dict()
    fields = {f.name for f in dataclasses.fields(POSTERIOR_METHODS[inv.method])}
    if "data_std" in fields:
        options.setdefault("data_std", float(config.loss.sigma_data))
    method = build_named(POSTERIOR_METHODS, inv.method, options, "inverse.method")
    return operator, method, float(inv.noise_std)


def learning_rate_from_config(config) -> optax.Schedule:
    o = config.optim
    return make_learning_rate(
        float(o.learning_rate),
        int(config.train.num_steps),
        warmup_steps=int(o.warmup_steps),
        schedule=o.schedule,
        min_lr_ratio=float(o.min_lr_ratio),
        decay_start=int(o.decay_start),
    )


def optimizer_from_config(config, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    """make_optimizer of config.optim, followed by EDM2's forced weight normalisation if asked."""
    o = config.optim
    optimizer = make_optimizer(
        learning_rate,
        name=o.name,
        b1=float(o.b1),
        b2=float(o.b2),
        eps=float(o.eps),
        weight_decay=float(o.weight_decay),
        grad_clip=float(o.grad_clip),
    )
    if o.forced_weight_normalization:
        optimizer = optax.chain(optimizer, edm2.forced_weight_normalization())
    return optimizer


def average_from_config(config) -> ParamAverage:
    return ema(float(config.train.ema_decay), warmup=bool(config.train.ema_warmup))


def tracked_averages_from_config(config) -> tuple[ParamAverage, ...]:
    """The post-hoc EMA profiles of config.train.posthoc_ema (kept in state.tracked_averages)."""
    return tuple(power_ema(float(s)) for s in config.train.posthoc_ema)


def schedule_fields(config) -> dict:
    """The config values the learning-rate schedule depends on (train.num_steps only for cosine
    decay: a constant or inverse-sqrt schedule is the same for any length)."""
    o = config.optim
    fields = {
        "optim.learning_rate": o.learning_rate,
        "optim.schedule": o.schedule,
        "optim.warmup_steps": o.warmup_steps,
    }
    if o.schedule == "cosine":
        fields.update({"optim.min_lr_ratio": o.min_lr_ratio, "train.num_steps": config.train.num_steps})
    if o.schedule == "inverse_sqrt":
        fields["optim.decay_start"] = o.decay_start
    return fields


def rules_from_config(config) -> dict:
    """Logical axis -> mesh axes from config.mesh.rules ("data,fsdp" strings; "" = replicated)."""
    try:
        return shard_lib.make_rules(
            {name: [a for a in str(axes).split(",") if a] for name, axes in config.mesh.rules.items()}
        )
    except ValueError as err:
        raise ConfigError(f"config.mesh.rules: {err}") from err


def mesh_from_config(config, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh of config.mesh over `devices` (default: all devices)."""
    try:
        return shard_lib.create_mesh(config.mesh, devices)
    except ValueError as err:
        raise ConfigError(f"config.mesh: {err}") from err
