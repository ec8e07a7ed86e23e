"""Pure pieces of a run from plain values: the model spec, label dropout, the denoiser of a
trained network (conditional, guided) and the sample function. No config is read here
(the config -> object translation is training/from_config.py)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from diffjax import models
from diffjax.denoisers import Denoiser, classifier_free_guidance

__all__ = [
    "ModelSpec",
    "build_model_spec",
    "label_dropout_transform",
    "network",
    "sampling_labels",
    "sampling_denoiser",
    "make_sample_fn",
]


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


def build_model_spec(model_config, seed: int, constructor: Callable = models.build) -> ModelSpec:
    """The spec of a bundled model from its preset config; parameters drawn from `seed`.
    constructor(model_config, rngs=...) builds the module (e.g. SequenceTransformer)."""
    with models.fast_module_tracing():
        abstract = nnx.eval_shape(lambda: constructor(model_config, rngs=nnx.Rngs(seed)))
    apply, abstract_params = models.functional(abstract)
    specs = models.logical_partition_specs(abstract)

    def init_params():
        # An "rbg" key: one RngBitGenerator op per parameter compiles 3-4x faster on CPU than
        # threefry's unrolled rounds, and initial values need no cross-backend reproducibility.
        rngs = nnx.Rngs(jax.random.key(seed, impl="rbg"))
        with models.fast_module_tracing():
            return models.functional(constructor(model_config, rngs=rngs))[1]

    return ModelSpec(
        apply=apply,
        abstract_params=abstract_params,
        logical_specs=specs,
        init_params=init_params,
        num_params=models.param_count(abstract_params),
        num_classes=int(getattr(model_config, "num_classes", 0) or 0),
        dropout=float(getattr(model_config, "dropout", 0.0)) > 0,
    )


def label_dropout_transform(rate: float, num_classes: int) -> Callable | None:
    """batch_transform for classifier-free guidance training: labels -> null class at `rate`."""
    if rate <= 0:
        return None

    def transform(key, batch):
        return {**batch, "label": models.drop_labels(key, batch["label"], rate, num_classes)}

    return transform


def network(apply: Callable, params, labels=None) -> Callable:
    """net(x, t) = apply(params, x, t, labels): a trained network with its conditioning closed over;
    it declares the prediction `apply` declares (a `prediction` attribute), if any."""

    def net(x, t):
        return apply(params, x, t, labels)

    declared = getattr(apply, "prediction", None)
    if declared is not None:
        net.prediction = declared
    return net


def declaring(apply: Callable, prediction) -> Callable:
    """apply, tagged with the prediction it was trained for: a Denoiser or loss given another
    prediction refuses it (`denoisers.check_declared_prediction`)."""

    def tagged(*args, **kwargs):
        return apply(*args, **kwargs)

    tagged.prediction = prediction
    return tagged


def sampling_labels(num: int, num_classes: int) -> jax.Array:
    """The labels a class-conditional run samples with: 0, 1, ..., cycling over the classes."""
    return jnp.arange(num, dtype=jnp.int32) % num_classes


def sampling_denoiser(to_denoiser: Callable, spec: ModelSpec, params, num: int, guidance_scale: float) -> Denoiser:
    """The denoiser that draws `num` samples. Class-conditional models get labels 0, 1, ...,
    cycling over the classes (so a grid shows every class in order), with classifier-free
    guidance D_null + s (D_label - D_null) at `guidance_scale` (1 = none) against the null class."""
    if not spec.conditional:
        return to_denoiser(network(spec.apply, params))
    labels = sampling_labels(num, spec.num_classes)
    denoiser = to_denoiser(network(spec.apply, params, labels))
    if guidance_scale == 1.0:
        return denoiser
    null = jnp.full_like(labels, spec.num_classes)  # the class that label dropout trains
    return classifier_free_guidance(denoiser, to_denoiser(network(spec.apply, params, null)), guidance_scale)


def make_sample_fn(
    sampler: Callable, to_denoiser: Callable, spec: ModelSpec, image_shape, guidance_scale: float = 1.0
) -> Callable:
    """sample_fn(params, key, num) -> images (num, H, W, C) in data space, jittable with num static.
    sampler(denoiser, key, shape) draws the samples (see from_config.sampler_from_config)."""
    image_shape = tuple(image_shape)

    def sample_fn(params, key, num: int):
        denoiser = sampling_denoiser(to_denoiser, spec, params, num, guidance_scale)
        return sampler(denoiser, key, (num, *image_shape))

    return sample_fn
