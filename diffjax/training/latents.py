"""Runs on latent data (data.source = "latents"): their samples are decoded by the autoencoder that
made the latent cache, for sample grids, the sample .npz and FID.

The autoencoder is `data.autoencoder` when set, else the file the cache's meta names
(meta["autoencoder"]["path"], as `python -m diffjax.training.autoencoder` writes it), else, when
that path is gone, a file of the same name beside the cache (the two moved together; for a records
directory, inside it or beside it). It is a `save_autoencoder` .npz whose latent channels must equal
data.channels and whose scaling factor must equal the one the cache stored. Without one, training
and sampling go on with grids of the latents' channels (a warning names data.autoencoder) and FID is
refused. The FID reference is the
image data set the cache was encoded from (meta["images"], an image data config).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from diffjax.data.latents import latent_cache_info
from diffjax.models.autoencoder import decode_latents, load_autoencoder
from diffjax.training.config import ConfigError
from diffjax.training.images import save_image_grid
from diffjax.training.run import Run

__all__ = [
    "LATENT_GRID_RANGE",
    "autoencoder_file",
    "load_latent_decoder",
    "latent_channel_images",
    "save_latent_samples",
    "with_latent_decoder",
    "reference_images_config",
]

log = logging.getLogger("diffjax")

# Latent grids show each channel in grey levels over [-LATENT_GRID_RANGE, LATENT_GRID_RANGE] (latents
# scaled to unit variance: +-3 standard deviations).
LATENT_GRID_RANGE = 3.0


def _meta(data_config) -> dict:
    return latent_cache_info(data_config.path)[3]


def autoencoder_file(data_config) -> str | None:
    """The autoencoder of a latent data config: data.autoencoder, else the file the cache's meta
    names, else a file of that name beside the cache (the two moved together), else None."""
    if data_config.autoencoder:
        return data_config.autoencoder
    path = _meta(data_config).get("autoencoder", {}).get("path")
    if not path:
        return None
    cache = os.path.abspath(data_config.path)
    name = os.path.basename(path)
    candidates = [path, os.path.join(os.path.dirname(cache), name)]
    if os.path.isdir(cache):  # a records directory: the file inside it, else beside it
        candidates.insert(1, os.path.join(cache, name))
    return next((p for p in candidates if os.path.isfile(p)), None)


@functools.partial(jax.jit, static_argnames="chunk_size")
def _decode(model, latents, chunk_size):
    return decode_latents(model, latents, chunk_size=chunk_size)


def load_latent_decoder(data_config, *, chunk_size: int = 256) -> Callable[[np.ndarray], np.ndarray] | None:
    """decode(latents) -> images in [-1, 1] (numpy, NHWC) for a latent data config, or None when no
    autoencoder is available. Raises ValueError when the autoencoder does not fit the cache (latent
    channels, scaling factor)."""
    path = autoencoder_file(data_config)
    if path is None:
        return None
    model = load_autoencoder(path)
    cfg, meta = model.cfg, _meta(data_config)
    if cfg.latent_channels != data_config.channels:
        raise ValueError(
            f"the autoencoder {path!r} has {cfg.latent_channels} latent channels, but data.channels = "
            f"{data_config.channels}: use the autoencoder the latent cache {data_config.path!r} was encoded with"
        )
    stored = meta.get("scaling_factor")
    if stored is not None and not math.isclose(float(stored), cfg.scaling_factor, rel_tol=1e-6):
        raise ValueError(
            f"the autoencoder {path!r} scales latents by {cfg.scaling_factor}, but the latent cache "
            f"{data_config.path!r} was encoded with scaling_factor {stored}: use the autoencoder it names"
        )
    return lambda latents: np.asarray(_decode(model, np.asarray(latents, np.float32), chunk_size))


def latent_channel_images(latents) -> np.ndarray:
    """(N, h, w, C) latents as (N, h, C * w, 1) images in [-1, 1]: the channels side by side, each
    in grey levels over [-LATENT_GRID_RANGE, LATENT_GRID_RANGE]."""
    latents = np.asarray(latents, np.float32)
    n, h, w, c = latents.shape
    tiles = np.transpose(latents, (0, 1, 3, 2)).reshape(n, h, c * w, 1)
    return np.clip(tiles / LATENT_GRID_RANGE, -1.0, 1.0)


def save_latent_samples(samples, stem: str, *, decode: Callable | None, latent_grid: bool) -> str:
    """stem.png: the decoded samples' grid (without `decode`: the latents' channels); with
    `latent_grid` (or without `decode`) stem_latents.png: the latents' channels. Returns stem.png."""
    samples = np.asarray(samples)
    channels = latent_channel_images(samples)
    if decode is None:
        return save_image_grid(channels, stem + ".png", upscale=max(1, 64 // max(channels.shape[1:3])))
    images = decode(samples)
    if latent_grid:
        save_image_grid(channels, stem + "_latents.png", upscale=max(1, 64 // max(channels.shape[1:3])))
    return save_image_grid(images, stem + ".png", upscale=max(1, 64 // max(images.shape[1:3])))


def with_latent_decoder(run: Run, config) -> Run:
    """`run` with decode and save_samples of a latent run (config.data.source = "latents"): sample
    grids (and FID samples) are decoded; unchanged for image data. Warns, naming data.autoencoder,
    when no autoencoder is available."""
    if config.data.source != "latents":
        return run
    decode = load_latent_decoder(config.data)
    if decode is None:
        log.warning(
            "data.source='latents' but no autoencoder: the latent cache %r names none that exists and "
            "config.data.autoencoder is empty; sample grids show the latents' channels and FID is unavailable. "
            "Set --config.data.autoencoder=<a save_autoencoder .npz> to decode them.",
            config.data.path,
        )
    save = functools.partial(save_latent_samples, decode=decode, latent_grid=bool(config.sample.latent_grid))
    return dataclasses.replace(run, decode=decode, save_samples=save)


def reference_images_config(data_config) -> ml_collections.ConfigDict:
    """The image data config a latent cache was encoded from (its meta["images"]): the FID reference."""
    images = _meta(data_config).get("images")
    if not images:
        raise ConfigError(
            f"FID of a latent run compares decoded samples with the images the cache {data_config.path!r} was "
            "encoded from, but its meta names no image data ('images'); set config.eval.fid=False"
        )
    return ml_collections.ConfigDict(images)
