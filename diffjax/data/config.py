"""Data configs: the keys, their defaults, presets for the project's data sets, and validation.

A data config is an `ml_collections.ConfigDict` with these keys (defaults in `base_data_config`):

    name            preset name, informational
    source          one of SOURCES (see below)
    path            file or directory of a local source (relative paths: to the working directory)
    tfds_name       prepared TFDS data set for source "tfds", e.g. "mnist", "cifar10:3.0.2"
    data_dir        TFDS data directory: where "tfds" data is read and local sources are prepared
                    ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
    image_key       feature holding the image in TFDS records ("image")
    label_key       feature holding the class label ("label"; "" = unlabelled, labels are 0)
    image_size      output height = width
    channels        1 (grayscale) or 3 (RGB); must match array data; archives are converted to it
    resize_method   "none" (the data must already be image_size) or a PIL filter
                    ("nearest", "bilinear", "bicubic", "box", "lanczos")
    center_crop     crop the largest centred square before resizing
    random_flip     random horizontal flip, p = 1/2 per example
    dequantize      uniform dequantization: (x + u) / 256, u ~ U[0, 1), instead of x / 255
    num_classes     classes in the data (checked), or 0 to ignore labels (then all labels are 0)
    in_memory       decode the whole split once into RAM (fast for small sets; arrays need no preparation)
    worker_count    grain worker processes (0: decode in the training process, in threads)
    num_threads     reader threads per process
    prefetch        batches buffered ahead per process

Sources:
    sklearn_digits  the 8x8 digits shipped in scikit-learn (1797 images, split "train" only)
    npz             .npz with x_<split>, y_<split> arrays
    idx             directory of MNIST-style idx(.gz) files
    image_tar       tar of [<split>/]<class>/<image>
    image_folder    directory of [<split>/]<class>/<image>
    tfds            a data set already prepared by TFDS in array_record format in data_dir
    toy             2-D toy distributions: sampled by `diffjax.data.toy`, not by this image pipeline
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

SOURCES = ("sklearn_digits", "npz", "idx", "image_tar", "image_folder", "tfds", "toy")
FILE_SOURCES = ("npz", "idx", "image_tar", "image_folder")
RESIZE_METHODS = ("none", "nearest", "bilinear", "bicubic", "box", "lanczos")
PRESETS = ("digits", "mnist", "fashion_mnist", "cifar10")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_TYPES = {
    "name": str,
    "source": str,
    "path": str,
    "tfds_name": str,
    "data_dir": str,
    "image_key": str,
    "label_key": str,
    "image_size": int,
    "channels": int,
    "resize_method": str,
    "center_crop": bool,
    "random_flip": bool,
    "dequantize": bool,
    "num_classes": int,
    "in_memory": bool,
    "worker_count": int,
    "num_threads": int,
    "prefetch": int,
}


def shared_data_dir() -> Path:
    """The project's shared real data: $DIFFJAX_SHARED_DATA, else <repo>/../shared/data."""
    if os.environ.get("DIFFJAX_SHARED_DATA"):
        return Path(os.environ["DIFFJAX_SHARED_DATA"])
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def base_data_config() -> ml_collections.ConfigDict:
    """Every key with its default (a labelled 32x32 RGB set with no augmentation)."""
    return ml_collections.ConfigDict(
        dict(
            name="custom",
            source="npz",
            path="",
            tfds_name="",
            data_dir="",
            image_key="image",
            label_key="label",
            image_size=32,
            channels=3,
            resize_method="none",
            center_crop=False,
            random_flip=False,
            dequantize=False,
            num_classes=10,
            in_memory=False,
            worker_count=0,
            num_threads=2,
            prefetch=4,
        )
    )


def default_data_config(name: str) -> ml_collections.ConfigDict:
    """Preset data config for "digits", "mnist", "fashion_mnist" or "cifar10".

    digits: scikit-learn's 8x8 digits upscaled (bilinear) to 16x16, 1797 images, in memory; the default
      offline data set of the project.
    mnist: ../shared/data/mnist.npz (set source="tfds" to read a prepared TFDS "mnist" instead).
    fashion_mnist: the idx files of the Debian package dataset-fashion-mnist (or TFDS "fashion_mnist").
    cifar10: ../shared/data/cifar10-jpeg.tar, JPEG decoded on the fly, random flips (or TFDS "cifar10").
    """
    config = base_data_config()
    shared = shared_data_dir()
    if name == "digits":
        config.update(source="sklearn_digits", image_size=16, channels=1, resize_method="bilinear",
                      in_memory=True)
    elif name == "mnist":
        config.update(source="npz", path=str(shared / "mnist.npz"), tfds_name="mnist", image_size=28,
                      channels=1, in_memory=True)
    elif name == "fashion_mnist":
        config.update(source="idx", path=FASHION_MNIST_DIR, tfds_name="fashion_mnist", image_size=28,
                      channels=1, in_memory=True)
    elif name == "cifar10":
        config.update(source="image_tar", path=str(shared / "cifar10-jpeg.tar"), tfds_name="cifar10",
                      image_size=32, channels=3, random_flip=True)
    else:
        raise ValueError(f"unknown data preset {name!r}; presets are {PRESETS}")
    config.name = name
    return config


def _missing_path_hint(path: str) -> str:
    if path.startswith(FASHION_MNIST_DIR):
        return " Install it with `apt-get install -y dataset-fashion-mnist`, or set source='tfds'."
    if str(shared_data_dir()) in path:
        return (" The project's shared data sets live in ../shared/data (see its README.md; override the "
                "location with $DIFFJAX_SHARED_DATA), or set source='tfds' to read a prepared TFDS copy.")
    return ""


def validate_data_config(config) -> ml_collections.ConfigDict:
    """Checks a data config and returns a complete copy (missing keys take their defaults).

    Raises ValueError for unknown keys, wrong types, bad values, and FileNotFoundError for missing
    local files; all before any data is read.
    """
    defaults = base_data_config()
    given = dict(config.items()) if hasattr(config, "items") else None
    if given is None:
        raise TypeError(f"a data config must be a ConfigDict or dict, got {type(config).__name__}")
    unknown = sorted(set(given) - set(_TYPES))
    if unknown:
        raise ValueError(f"unknown data config key(s) {unknown}; allowed keys are {sorted(_TYPES)}")
    for key, value in given.items():
        expected = _TYPES[key]
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not ok:
            raise ValueError(f"data config key {key!r} must be {expected.__name__}, got {value!r}")
    full = defaults
    full.update(given)
    full.path = os.path.expanduser(full.path) if full.path else ""
    full.data_dir = os.path.expanduser(full.data_dir) if full.data_dir else ""
    _check_values(full)
    return full


def _check_values(c: ml_collections.ConfigDict) -> None:
    if c.source not in SOURCES:
        raise ValueError(f"unknown data source {c.source!r}; sources are {SOURCES}")
    if c.resize_method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize_method {c.resize_method!r}; allowed: {RESIZE_METHODS}")
    if c.channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {c.channels}")
    if c.image_size < 1:
        raise ValueError(f"image_size must be positive, got {c.image_size}")
    if c.num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {c.num_classes}")
    for key in ("worker_count", "num_threads", "prefetch"):
        if c[key] < 0:
            raise ValueError(f"{key} must be >= 0, got {c[key]}")
    if c.source in FILE_SOURCES:
        if not c.path:
            raise ValueError(f"source {c.source!r} needs `path` (a file or directory); it is empty")
        path = Path(c.path)
        if not path.exists():
            raise FileNotFoundError(f"data path {str(path)!r} for source {c.source!r} does not exist."
                                    + _missing_path_hint(str(path)))
        want_dir = c.source in ("idx", "image_folder")
        if path.is_dir() != want_dir:
            kind = "a directory" if want_dir else "a file"
            raise ValueError(f"source {c.source!r} needs `path` to be {kind}; {str(path)!r} is not")
    if c.source == "tfds" and not c.tfds_name:
        raise ValueError("source 'tfds' needs `tfds_name` (e.g. 'mnist', 'cifar10'); it is empty")
