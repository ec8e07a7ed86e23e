"""Batched Inception feature extraction sharded over a mesh's data axis, and cached reference statistics."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from diffjax.evaluation.inception import (
    FEATURE_DIM,
    INCEPTION_SIZE,
    Params,
    Preprocessing,
    _check_method,
    check_image_values,
    check_images,
    inception_features,
)
from diffjax.evaluation.metrics import compute_statistics
from diffjax.evaluation.weights import default_cache_dir, load_inception_params
from diffjax.io import atomic_write, interactive

_STATS_FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

# One compiled function for every call; shardings come from the committed inputs.
_features_jit = jax.jit(
    inception_features, static_argnames=("value_range", "preprocessing", "quantize", "size", "precision")
)


def data_mesh(devices=None, axis: str = "data") -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with one axis named ``axis``."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (axis,))


def _iter_batches(images: Any, batch_size: int) -> tuple[Iterator[np.ndarray], int | None]:
    """Host batches of at most batch_size rows, and the total count when known (arrays only)."""
    if isinstance(images, (np.ndarray, jax.Array)):
        batches: Iterable = [images]
        total = int(images.shape[0]) if images.ndim else None
    elif isinstance(images, Iterable):
        batches, total = images, None
    else:
        raise TypeError(
            f"images must be an (N, H, W, C) array or an iterable of such batches, got {type(images).__name__}"
        )

    def chunks():
        for batch in batches:
            if not isinstance(batch, (np.ndarray, jax.Array)):
                batch = np.asarray(batch)
            if batch.ndim == 0:
                yield np.asarray(batch)  # rejected with a clear message by check_images
            for i in range(0, batch.shape[0] if batch.ndim else 0, batch_size):
                yield np.asarray(batch[i : i + batch_size])

    return chunks(), total


def _value_range(value_range) -> tuple[float, float] | None:
    if value_range is None:
        return None
    try:
        lo, hi = value_range
        return (float(lo), float(hi))
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be None or a pair (low, high), got {value_range!r}") from None


def extract_features(
    params: Params,
    images: Any,
    *,
    value_range: tuple[float, float] | None = None,
    preprocessing: Preprocessing = "tf",
    quantize: bool = True,
    size: int = INCEPTION_SIZE,
    mesh: Mesh | None = None,
    data_axis: str | tuple[str, ...] = "data",
    batch_size: int = 256,
    precision: lax.Precision = lax.Precision.HIGHEST,
    progress: bool = True,
    desc: str = "Inception features",
) -> np.ndarray:
    """Inception pool features (N, 2048) float32 of many images, batch sharded over ``mesh``'s data axis.

    Args:
      params: Inception params (``load_inception_params()``); replicated over the mesh.
      images: an (N, H, W, C) array, or an iterable of such batches (any sizes). uint8 in [0, 255],
        or float with ``value_range``; values are checked on the host before they are sent.
      mesh: the device mesh; default a 1-D mesh over all devices named ``data_axis``.
      data_axis: the mesh axis (or axes) the batch is split over.
      batch_size: images per compiled step (at most the number of images, when known), rounded up
        to a multiple of the data-axis size. Every step has this shape (the last is padded with
        copies of its last image, whose features are dropped), so it compiles once.
      value_range, preprocessing, quantize, size, precision: see ``inception_features``.
      progress: show a tqdm progress bar.
    Returns:
      (N, 2048) float32 numpy array, in input order. The result does not depend on the mesh.
    """
    if jax.process_count() > 1:
        raise NotImplementedError("extract_features runs in a single process; gather the images on one host first")
    _check_method(preprocessing)
    value_range = _value_range(value_range)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
    if mesh is None:
        if len(axes) != 1:
            raise ValueError(f"data_axis={data_axis!r} names several axes: pass the mesh that has them")
        mesh = data_mesh(axis=axes[0])
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"data_axis {missing} not in the mesh axes {tuple(mesh.shape)}")
    n_data = int(np.prod([mesh.shape[a] for a in axes]))
    total = int(images.shape[0]) if isinstance(images, (np.ndarray, jax.Array)) and images.ndim else None
    step = min(batch_size, total) if total else batch_size  # a small set is not padded to batch_size
    step = -(-step // n_data) * n_data
    batch_sharding = NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))
    params = jax.device_put(params, NamedSharding(mesh, P()))

    batches, total = _iter_batches(images, step)
    outputs: list[np.ndarray] = []
    pending = None  # the step in flight: its result is fetched after the next one is dispatched
    with tqdm(total=total, desc=desc, unit="img", disable=not (progress and interactive())) as bar:

        def fetch(feats, n):
            outputs.append(np.asarray(feats)[:n])
            bar.update(n)

        for batch in batches:
            check_images(batch, value_range)
            check_image_values(batch, value_range)
            n = batch.shape[0]
            if n == 0:
                continue
            if n < step:  # pad with copies of the last image (valid values), dropped below
                batch = np.concatenate([batch, np.repeat(batch[-1:], step - n, axis=0)], axis=0)
            x = jax.device_put(batch, batch_sharding)
            feats = _features_jit(
                params,
                x,
                value_range=value_range,
                preprocessing=preprocessing,
                quantize=quantize,
                size=size,
                precision=precision,
            )
            if pending is not None:
                fetch(*pending)
            pending = (feats, n)
        if pending is not None:
            fetch(*pending)
    if not outputs:
        raise ValueError("no images were given")
    return np.concatenate(outputs, axis=0)


class ReferenceStatistics(NamedTuple):
    """Cached reference set: FID statistics, and the features themselves (for KID) when kept."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    num_samples: int


def reference_statistics_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/fid_stats/<name>.npz``; ``name`` is letters, digits, '_', '.', '-'."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"reference name {name!r} must match {_NAME_RE.pattern} (it becomes a file name)")
    return default_cache_dir(cache_dir) / "fid_stats" / f"{name}.npz"


def _save_npz_atomic(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def reference_statistics(
    name: str,
    images: Any,
    *,
    params: Params | None = None,
    cache_dir: str | os.PathLike | None = None,
    value_range: tuple[float, float] | None = None,
    preprocessing: Preprocessing = "tf",
    quantize: bool = True,
    size: int = INCEPTION_SIZE,
    keep_features: bool = True,
    recompute: bool = False,
    **extract_kwargs,
) -> ReferenceStatistics:
    """FID statistics of a reference data set, computed once and cached at ``<cache>/fid_stats/<name>.npz``.

    Args:
      name: the data set's name, e.g. ``"mnist_test"``; the cache key.
      images: what ``extract_features`` takes, or a zero-argument callable returning it, so that
        a cache hit does not even load the data.
      params: Inception params; loaded with ``load_inception_params()`` when needed and None.
      keep_features: also store the (N, 2048) features (KID needs them).
      recompute: ignore and overwrite the cache.
      value_range, preprocessing, quantize, size, **extract_kwargs: passed to ``extract_features``.
    The cache file records ``preprocessing`` and ``size``; loading it with different ones raises,
    since FIDs against it would not be comparable. The file is written to a temporary name in
    the same directory and renamed, so a crash never leaves a partial cache behind.
    """
    path = reference_statistics_path(name, cache_dir)
    _check_method(preprocessing)
    if path.is_file() and not recompute:
        with np.load(path, allow_pickle=False) as z:
            cached_pre, cached_size = str(z["preprocessing"]), int(z["size"])
            if (cached_pre, cached_size) != (preprocessing, size):
                raise ValueError(
                    f"cached reference statistics {str(path)!r} were computed with preprocessing={cached_pre!r}, "
                    f"size={cached_size}, not preprocessing={preprocessing!r}, size={size}; use another name "
                    f"or recompute=True"
                )
            if "features" in z or not keep_features:
                feats = np.array(z["features"]) if "features" in z and keep_features else None
                return ReferenceStatistics(np.array(z["mu"]), np.array(z["sigma"]), feats, int(z["num_samples"]))
    if callable(images) and not isinstance(images, (np.ndarray, jax.Array)):
        images = images()
    params = load_inception_params() if params is None else params
    feats = extract_features(
        params,
        images,
        value_range=value_range,
        preprocessing=preprocessing,
        quantize=quantize,
        size=size,
        desc=f"reference {name}",
        **extract_kwargs,
    )
    mu, sigma = compute_statistics(feats)
    arrays: dict[str, Any] = dict(
        mu=mu,
        sigma=sigma,
        num_samples=np.int64(feats.shape[0]),
        preprocessing=np.str_(preprocessing),
        size=np.int64(size),
        quantize=np.bool_(quantize),
        format=np.int64(_STATS_FORMAT),
    )
    if keep_features:
        arrays["features"] = feats.astype(np.float32)
    _save_npz_atomic(path, **arrays)
    return ReferenceStatistics(mu, sigma, feats if keep_features else None, int(feats.shape[0]))


__all__ = [
    "ReferenceStatistics",
    "data_mesh",
    "extract_features",
    "reference_statistics",
    "reference_statistics_path",
    "FEATURE_DIM",
]
