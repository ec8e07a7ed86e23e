"""Train a small KL autoencoder on images and encode a data set into a latent cache.

`train_autoencoder(config, images, key, steps=...)` fits an `AutoencoderKL` by Adam on

    loss = mean |x - D(z)|^2 + kl_weight * mean KL(N(mu, s^2) || N(0, I)),   z = mu + s * eps

(the VAE objective of latent diffusion, Rombach et al. 2022, with an L2 reconstruction and no
perceptual or adversarial term), one jitted step per batch. `latent_scaling_factor` is 1 / the
standard deviation of the posterior means over a data set (LDM's rescaling to unit variance), and
`reconstruction_error` the mean squared error of decode(encode(x)) on images in [-1, 1].

`python -m diffjax.training.autoencoder --data=mnist --out=DIR` trains `TINY_AUTOENCODER` on a data
preset (MNIST box-filtered to 16x16 by default: 8x8x2 latents), saves
it to DIR/autoencoder.npz (`save_autoencoder`, with the scaling factor) and encodes the train and
test splits into DIR/latents.npz (`diffjax.data.latents.build_latent_cache`, whose meta names the
autoencoder file and the image data it encoded), then writes DIR/autoencoder_summary.json (with the
mean squared reconstruction error on the test split, or on train for a data set without one).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

from diffjax.data import dataset_info, default_data_config, open_source, validate_data_config
from diffjax.data.config import PRESETS
from diffjax.data.latents import build_latent_cache
from diffjax.io import atomic_write_json, interactive
from diffjax.models.autoencoder import (
    TINY_AUTOENCODER,
    AutoencoderConfig,
    AutoencoderKL,
    decode_latents,
    encode_latents,
    save_autoencoder,
)
from diffjax.validation import check_count, check_number, check_positive

__all__ = [
    "autoencoder_loss",
    "train_autoencoder",
    "latent_scaling_factor",
    "reconstruction_error",
    "source_images",
    "autoencoder_command",
]

AUTOENCODER_FILE = "autoencoder.npz"
LATENT_CACHE_FILE = "latents.npz"
SUMMARY_FILE = "autoencoder_summary.json"


def _as_float(images) -> np.ndarray:
    """uint8 images to [-1, 1]; float images are taken as already in [-1, 1]."""
    images = np.asarray(images)
    return images.astype(np.float32) / 127.5 - 1.0 if images.dtype == np.uint8 else images.astype(np.float32)


def autoencoder_loss(model: AutoencoderKL, x, key, kl_weight: float):
    """(loss, {"reconstruction", "kl"}): mean squared error of D(z), z a posterior sample, plus
    kl_weight times the mean per-latent KL divergence from N(0, 1)."""
    mean, logvar = model.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    reconstruction = jnp.mean((model.decode(z) - x) ** 2)
    kl = jnp.mean(0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar))
    return reconstruction + kl_weight * kl, {"reconstruction": reconstruction, "kl": kl}


def train_autoencoder(
    config: AutoencoderConfig,
    images,
    key,
    *,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-4,
    progress: bool = True,
) -> tuple[AutoencoderKL, np.ndarray]:
    """Fit an AutoencoderKL of `config` to `images` (NHWC, uint8 or float in [-1, 1]) for `steps`
    Adam steps (cosine-decayed learning rate) on random batches. Returns (model, reconstruction
    loss per step)."""
    check_count("steps", steps)
    check_count("batch_size", batch_size)
    check_positive("learning_rate", learning_rate)
    if check_number("kl_weight", kl_weight) < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")
    config = config.validate()
    x = _as_float(images)
    if x.ndim != 4 or x.shape[-1] != config.in_channels:
        raise ValueError(f"images must be NHWC with {config.in_channels} channels (config.in_channels), got {x.shape}")
    if x.shape[1] % config.downsampling or x.shape[2] % config.downsampling:
        raise ValueError(f"image size {x.shape[1:3]} must be divisible by the downsampling {config.downsampling}")
    init_key, key = jax.random.split(key)
    model = AutoencoderKL(config, rngs=nnx.Rngs(init_key))
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch, key):
        def loss(p):
            return autoencoder_loss(nnx.merge(graphdef, p), batch, key, kl_weight)

        (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux["reconstruction"]

    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel()[-1])
    losses = np.zeros(steps, np.float32)
    bar = tqdm.trange(steps, desc="autoencoder", unit="step", disable=not (progress and interactive()))
    for i in bar:
        batch = x[rng.integers(0, len(x), batch_size)]
        params, opt_state, value = step(params, opt_state, batch, jax.random.fold_in(key, i))
        losses[i] = float(value)
        if i % 50 == 0:
            bar.set_postfix(mse=f"{losses[i]:.4f}", refresh=False)
    return nnx.merge(graphdef, params), losses


@jax.jit
def _encode_mean(model, x):
    return encode_latents(model, x)


@jax.jit
def _posterior_mean(model, x):
    return model.encode(x)[0]


def _batches(images, batch_size: int):
    for start in range(0, len(images), batch_size):
        yield _as_float(images[start : start + batch_size])


def latent_scaling_factor(model: AutoencoderKL, images, *, batch_size: int = 256) -> float:
    """1 / std of the (unscaled, unshifted) posterior means of `images`: latents * it have unit variance."""
    z = np.concatenate([np.asarray(_posterior_mean(model, x)) for x in _batches(images, batch_size)])
    return float(1.0 / z.std())


def reconstruction_error(model: AutoencoderKL, images, *, batch_size: int = 256) -> float:
    """Mean squared error of decode(encode(x)) (posterior mean) on `images`, in [-1, 1] units."""
    reconstruct = jax.jit(lambda m, x: jnp.sum((decode_latents(m, encode_latents(m, x)) - x) ** 2))
    total = sum(float(reconstruct(model, x)) for x in _batches(images, batch_size))
    return total / math.prod(np.shape(images))


def source_images(data_config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All uint8 images and labels of `split` of an image data config (read through open_source)."""
    source = open_source(data_config, split)
    return source.read(np.arange(len(source)))


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m diffjax.training.autoencoder", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="mnist", choices=PRESETS, help="image data preset (default mnist)")
    parser.add_argument(
        "--image-size", type=int, default=16, help="resize the images to this size (box filter; default 16)"
    )
    parser.add_argument("--out", required=True, help="directory for autoencoder.npz, latents.npz and the summary")
    parser.add_argument("--steps", type=int, default=800, help="Adam steps (default 800)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--latent-channels", type=int, default=TINY_AUTOENCODER.latent_channels)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def autoencoder_command(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring): train, save, encode, summarise; returns 0."""
    args = _parse(argv)
    data = default_data_config(args.data)
    if args.image_size != data.image_size:
        data.update(image_size=args.image_size, resize_method="box")
    data = validate_data_config(data)
    config = dataclasses.replace(TINY_AUTOENCODER, in_channels=data.channels, latent_channels=args.latent_channels)
    config.validate()
    split_names = [s for s in ("train", "test") if s in dataset_info(data).num_examples]
    heldout = split_names[-1]  # the reconstruction error is measured on "test" where there is one
    os.makedirs(args.out, exist_ok=True)
    train_images, _ = source_images(data, "train")
    test_images, _ = source_images(data, heldout)
    start = time.perf_counter()
    model, losses = train_autoencoder(
        config,
        train_images,
        jax.random.key(args.seed),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        kl_weight=args.kl_weight,
    )
    train_seconds = time.perf_counter() - start
    scaling = latent_scaling_factor(model, train_images)
    model.cfg = dataclasses.replace(model.cfg, scaling_factor=scaling)
    path = save_autoencoder(model, os.path.join(args.out, AUTOENCODER_FILE))
    meta = {
        "autoencoder": {"path": os.path.abspath(path), "config": dataclasses.asdict(model.cfg)},
        "scaling_factor": scaling,
        "shift_factor": model.cfg.shift_factor,
        "images": json.loads(data.to_json()),
    }
    encode = functools.partial(_encode_mean, model)
    splits = {split: open_source(data, split) for split in split_names}
    cache = build_latent_cache(
        splits, encode, os.path.join(args.out, LATENT_CACHE_FILE), num_classes=data.num_classes, flips=False, meta=meta
    )
    summary = {
        "data": args.data,
        "autoencoder": path,
        "latent_cache": cache,
        "config": dataclasses.asdict(model.cfg),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "kl_weight": args.kl_weight,
        "train_seconds": train_seconds,
        "final_train_mse": float(losses[-50:].mean()),
        "mse_split": heldout,
        "test_mse": reconstruction_error(model, test_images),
        "scaling_factor": scaling,
        "latent_shape": [*(s // config.downsampling for s in train_images.shape[1:3]), config.latent_channels],
        "loss_curve": [float(v) for v in losses],
    }
    atomic_write_json(os.path.join(args.out, SUMMARY_FILE), summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(autoencoder_command())
