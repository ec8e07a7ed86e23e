"""From a validated config to the pieces of a run: process, model, loss, sampler."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from diffjax import losses, models
from diffjax.denoisers import Denoiser, EDMPreconditioning, classifier_free_guidance
from diffjax.processes import GaussianProcess, get_process
from diffjax.samplers import sample
from diffjax.training.config import ConfigError

__all__ = [
    "build_process",
    "model_overrides",
    "ModelSpec",
    "build_model_spec",
    "build_loss",
    "label_dropout_transform",
    "make_denoiser",
    "sampling_denoiser",
    "make_sample_fn",
]


def build_process(config) -> GaussianProcess:
    try:
        return get_process(config.process.name, **config.process.options.to_dict())
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.process: {err}") from err


def default_time_scale(config, process: GaussianProcess) -> float:
    """What the network multiplies its time input by before embedding it: EDM preconditioning
    feeds c_noise = log(s)/4 (about [-1.6, 1.1]); otherwise the process time, scaled to ~[0, 1000]."""
    if config.loss.prediction == "edm":
        return 250.0
    return 1000.0 / float(process.t_max)


def model_overrides(config, data_info, process: GaussianProcess) -> dict:
    """Preset overrides: the data's image size and channels, classes if conditional, the time
    scale, then config.model.overrides (which must agree with the data)."""
    height, width, channels = data_info.image_shape
    overrides = dict(
        image_size=height if height == width else (height, width),
        in_channels=channels,
        time_scale=default_time_scale(config, process),
    )
    if config.model.class_conditional:
        if not data_info.num_classes:
            raise ConfigError(
                "config.model.class_conditional = True, but the data set has no class labels"
            )
        overrides["num_classes"] = int(data_info.num_classes)
    user = config.model.overrides.to_dict()
    for key in ("image_size", "in_channels"):
        if key in user and user[key] != overrides[key]:
            raise ConfigError(
                f"config.model.overrides.{key} = {user[key]!r} does not match the data "
                f"(images of shape {tuple(data_info.image_shape)}): expected {overrides[key]!r}"
            )
    overrides.update(user)
    return overrides


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model known by its abstract shape: pure apply, abstract params, logical specs, and a
    function that materialises the parameters (to be jitted with output shardings)."""

    apply: Callable
    abstract_params: dict
    logical_specs: dict
    init_params: Callable[[], dict]
    num_params: int
    num_classes: int  # 0: unconditional
    dropout: bool

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0


def build_model_spec(config, data_info, process: GaussianProcess) -> ModelSpec:
    overrides = model_overrides(config, data_info, process)
    try:
        model_config = models.get_config(config.model.name, **overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config.model: {err}") from err
    seed = int(config.seed)
    abstract = nnx.eval_shape(lambda: models.build(model_config, seed=seed))
    apply, abstract_params = models.functional(abstract)
    specs = models.logical_partition_specs(abstract)

    def init_params():
        # An "rbg" key: one RngBitGenerator op per parameter compiles 3-4x faster on CPU than
        # threefry's unrolled rounds, and initial values need no cross-backend reproducibility.
        rngs = nnx.Rngs(jax.random.key(seed, impl="rbg"))
        return models.functional(models.build(model_config, rngs=rngs))[1]

    return ModelSpec(
        apply=apply,
        abstract_params=abstract_params,
        logical_specs=specs,
        init_params=init_params,
        num_params=models.param_count(abstract_params),
        num_classes=int(getattr(model_config, "num_classes", 0) or 0),
        dropout=float(getattr(model_config, "dropout", 0.0)) > 0,
    )


def _optional(value):
    return value or None


def weighting_options(loss_config) -> dict:
    """The options of the configured weighting ({} = the library defaults)."""
    return loss_config.weighting_options.to_dict()


def time_sampler_options(loss_config) -> dict:
    """The options of the configured time sampler ({} = the library defaults)."""
    return loss_config.time_sampler_options.to_dict()


def build_loss(config, spec: ModelSpec, process: GaussianProcess) -> Callable:
    """loss_fn(params, key, batch) from config.loss; labels go to the model as y."""
    loss = config.loss
    try:
        return losses.denoising_loss(
            spec.apply,
            process,
            prediction=loss.prediction,
            target=_optional(loss.target),
            weighting=loss.weighting,
            time_sampler=loss.time_sampler,
            sigma_data=loss.sigma_data,
            weighting_options=weighting_options(loss),
            time_sampler_options=time_sampler_options(loss),
            cond_keys={"y": "label"} if spec.conditional else (),
            rng_arg="key" if spec.dropout else None,
        )
    except ValueError as err:
        raise ConfigError(f"config.loss: {err}") from err


def label_dropout_transform(rate: float, num_classes: int) -> Callable | None:
    """batch_transform for classifier-free guidance training: labels -> null class at `rate`."""
    if rate <= 0:
        return None

    def transform(key, batch):
        return {**batch, "label": models.drop_labels(key, batch["label"], rate, num_classes)}

    return transform


def make_denoiser(config, apply: Callable, params, process: GaussianProcess, labels=None) -> Denoiser:
    """The Denoiser of a trained network (EDM prediction = preconditioned x0-predictor)."""
    net = lambda x, t: apply(params, x, t, labels)  # noqa: E731
    if config.loss.prediction == "edm":
        return Denoiser(EDMPreconditioning(net, process, config.loss.sigma_data), process, "x0")
    return Denoiser(net, process, config.loss.prediction)


def sampling_kwargs(config) -> dict:
    s = config.sample
    return dict(
        solver=_optional(s.solver),
        steps=int(s.steps),
        grid=_optional(s.grid),
        grid_options=s.grid_options.to_dict() or None,
        **s.solver_options.to_dict(),
    )


def sampling_denoiser(config, spec: ModelSpec, params, process: GaussianProcess, num: int) -> Denoiser:
    """The denoiser that sample() runs for `num` images. Class-conditional models get labels
    0, 1, ..., cycling over the classes (so a grid shows every class in order), with
    classifier-free guidance at config.sample.guidance_scale (1 = none) against the null class."""
    if not spec.conditional:
        return make_denoiser(config, spec.apply, params, process)
    labels = jnp.arange(num, dtype=jnp.int32) % spec.num_classes
    denoiser = make_denoiser(config, spec.apply, params, process, labels)
    scale = float(config.sample.guidance_scale)
    if scale == 1.0:
        return denoiser
    null = jnp.full_like(labels, spec.num_classes)  # the class that label dropout trains
    return classifier_free_guidance(denoiser, make_denoiser(config, spec.apply, params, process, null), scale)


def make_sample_fn(config, spec: ModelSpec, process: GaussianProcess, image_shape) -> Callable:
    """sample_fn(params, key, num) -> images (num, H, W, C) in data space, jittable with num static."""
    kwargs = sampling_kwargs(config)

    def sample_fn(params, key, num: int):
        denoiser = sampling_denoiser(config, spec, params, process, num)
        return sample(denoiser, key, (num, *image_shape), **kwargs)

    return sample_fn


def check_sampling_config(config, process: GaussianProcess, spec: ModelSpec, image_shape) -> None:
    """Validate config.sample by tracing sample() once with abstract inputs (no compilation)."""
    if float(config.sample.guidance_scale) != 1.0 and not spec.conditional:
        raise ConfigError(
            f"config.sample.guidance_scale = {config.sample.guidance_scale} needs a class-conditional "
            "model trained with label dropout (model.class_conditional=True, train.label_dropout > 0); "
            "use 1.0 for this unconditional model"
        )
    sample_fn = make_sample_fn(config, spec, process, image_shape)
    try:
        jax.eval_shape(lambda p, k: sample_fn(p, k, 2), spec.abstract_params, jax.random.key(0))
    except ValueError as err:
        raise ConfigError(f"config.sample: {err}") from err
