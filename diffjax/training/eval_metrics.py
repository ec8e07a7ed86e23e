"""`--mode eval`: sample quality (FID, KID against the evaluation split) and likelihood (bits/dim
by the probability-flow ODE or the ELBO) of a trained run.

Everything runs on the run's mesh; the Inception features are extracted batched and sharded over
the devices of this process (`diffjax.evaluation.extract_features`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from diffjax import data as data_lib
from diffjax import evaluation, likelihood
from diffjax.io import interactive
from diffjax.training.build import network
from diffjax.training.images import to_uint8
from diffjax.training.run import Run, make_jitted_sampler

__all__ = [
    "draw_samples",
    "sample_images",
    "split_images",
    "sample_quality",
    "dataset_bits_per_dim",
    "likelihood_denoiser",
]

# Above this many dimensions the divergence is estimated (Hutchinson) instead of computed exactly.
EXACT_DIVERGENCE_MAX_DIM = 64


def _sample_batches(run: Run, params, num: int, key, batch_size: int, progress: bool):
    """Batches of the run's samples (numpy, decoded by run.decode in a latent run), `batch_size` per
    compiled call, batch i drawn with fold_in(key, i); `num` in all once the last is cut."""
    sampler = make_jitted_sampler(run, batch_size)
    batches = math.ceil(num / batch_size)
    for i in tqdm.trange(batches, desc="sampling", unit="batch", disable=not (progress and interactive())):
        samples = sampler(params, jax.random.fold_in(key, i))
        samples = np.asarray(run.decode(samples) if run.decode is not None else samples, np.float32)
        yield samples[: num - i * batch_size]


def draw_samples(run: Run, params, num: int, key, *, batch_size: int, progress: bool = True) -> np.ndarray:
    """`num` float32 samples from the run's sampler, as it returns them (data space, not clipped)."""
    return np.concatenate(list(_sample_batches(run, params, num, key, batch_size, progress)))


def sample_images(run: Run, params, num: int, key, *, batch_size: int, progress: bool = True) -> np.ndarray:
    """The same samples as `draw_samples`, as uint8 images (converted batch by batch)."""
    return np.concatenate([to_uint8(x) for x in _sample_batches(run, params, num, key, batch_size, progress)])


def split_images(data_config, split: str, num: int, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """The first `num` images (uint8, in the data set's order) and labels of `split`, on this host."""
    iterator = data_lib.make_iterator(
        data_config,
        split=split,
        global_batch_size=batch_size,
        seed=0,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
    )
    images, labels = [], []
    for batch in iterator:
        keep = np.asarray(batch.get("mask", np.ones(len(batch["image"]), bool)))  # drop padding
        images.append(to_uint8(batch["image"])[keep])
        if "label" in batch:
            labels.append(np.asarray(batch["label"])[keep])
        if sum(len(x) for x in images) >= num:
            break
    images = np.concatenate(images)[:num]
    return images, (np.concatenate(labels)[:num] if labels else None)


def _rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def sample_quality(
    samples: np.ndarray, reference: evaluation.ReferenceStatistics, inception_params, *, batch_size: int = 256
) -> dict:
    """FID and KID (x 1e3) of uint8 samples against cached reference statistics."""
    features = evaluation.extract_features(
        inception_params, _rgb(samples), batch_size=batch_size, desc="Inception features (samples)"
    )
    stats = evaluation.compute_statistics(features)
    fid = evaluation.frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)
    subset = min(1000, len(features), reference.num_samples)
    kid_mean, kid_std = evaluation.kid(features, reference.features, subset_size=subset)
    return {
        "fid": float(fid),
        "kid_x1e3": 1e3 * kid_mean,
        "kid_std_x1e3": 1e3 * kid_std,
        "num_samples": int(len(samples)),
        "num_reference": int(reference.num_samples),
    }


def reference_for_split(
    data_config, split: str, num: int, inception_params, *, batch_size: int = 256
) -> evaluation.ReferenceStatistics:
    """Inception statistics of the first `num` images of `split`, cached by data set, size and count."""
    name = f"{data_config.name}_{split}_{int(data_config.image_size)}px_{num}"
    return evaluation.reference_statistics(
        name, lambda: _rgb(split_images(data_config, split, num, batch_size=batch_size)[0]), params=inception_params
    )


def likelihood_denoiser(run: Run, params, labels):
    """The model whose density is measured: unconditional models as they are; class-conditional
    ones trained with label dropout through the null class (the unconditional model); otherwise
    conditioned on the true labels (then the number is log p(x | y))."""
    spec = run.spec
    if not spec.conditional:
        return run.to_denoiser(network(spec.apply, params))
    if run.label_dropout > 0:
        labels = jnp.full((labels.shape[0],), spec.num_classes, jnp.int32)
    return run.to_denoiser(network(spec.apply, params, jnp.asarray(labels, jnp.int32)))


def dataset_bits_per_dim(
    run: Run, params, images: np.ndarray, labels, key, *, batch_size: int, estimator: str = "ode"
) -> dict:
    """Mean bits/dim of uint8 `images` under the model, by the probability-flow ODE ("ode": exact
    divergence up to EXACT_DIVERGENCE_MAX_DIM dimensions, else Hutchinson with one Rademacher probe)
    or the ELBO ("elbo", an upper bound on bits/dim). Returns mean, standard error over examples
    and the mean number of ODE evaluations."""
    dim = math.prod(images.shape[1:])
    if labels is None:
        labels = np.zeros(len(images), np.int32)

    def bpd_batch(params, x, y, key):
        denoiser = likelihood_denoiser(run, params, y)
        if estimator == "elbo":
            log_prob = lambda x, key: likelihood.elbo(denoiser, x, key).value  # noqa: E731
        else:
            divergence = "exact" if dim <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
            log_prob = lambda x, key: likelihood.log_likelihood(denoiser, x, key, divergence=divergence).log_prob  # noqa: E731
        return likelihood.bits_per_dim(log_prob, x, key)

    step = jax.jit(run.under_mesh(bpd_batch))
    values = []
    for i in tqdm.trange(
        math.ceil(len(images) / batch_size), desc=f"bits/dim ({estimator})", unit="batch", disable=not interactive()
    ):
        x = images[i * batch_size : (i + 1) * batch_size]
        y = labels[i * batch_size : (i + 1) * batch_size]
        values.append(np.asarray(jax.device_get(step(params, x, y, jax.random.fold_in(key, i)))))
    values = np.concatenate(values)
    finite = values[np.isfinite(values)]
    return {
        "bits_per_dim": float(finite.mean()) if finite.size else float("nan"),
        "stderr": float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1 else float("nan"),
        "examples": int(values.size),
        "failed": int(values.size - finite.size),
    }
