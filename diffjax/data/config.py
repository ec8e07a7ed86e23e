"""Data configs: the keys, their defaults, presets for the project's data sets, and validation.

A data config is an `ml_collections.ConfigDict`; `DATA_KEYS` lists every key with its type, default and
meaning (`base_data_config()` builds the defaults from it). `name` selects the data set: one of
`PRESETS` (`default_data_config(name)` fills the other keys) or "custom" (the other keys say where the
data are); a preset name on a config whose source is not the preset's is refused.

Sources:
    sklearn_digits  the 8x8 digits shipped in scikit-learn (1797 images, split "train" only)
    npz             .npz with x_<split>, y_<split> arrays
    idx             directory of MNIST-style idx(.gz) files
    image_tar       tar of [<split>/]<class>/<image>
    image_folder    directory of [<split>/]<class>/<image>
    tfds            a data set already prepared by TFDS in array_record format in data_dir
    toy             2-D toy distributions: sampled by `diffjax.data.toy`, not by this image pipeline

The project's shared data sets (mnist.npz, cifar10-jpeg.tar) are looked up in this order:
$DIFFJAX_SHARED_DATA, then shared/data and ../shared/data relative to the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from diffjax.validation import check_choice

SOURCES = ("sklearn_digits", "npz", "idx", "image_tar", "image_folder", "tfds", "toy", "latents")
FILE_SOURCES = ("npz", "idx", "image_tar", "image_folder", "latents")
RESIZE_METHODS = ("none", "nearest", "bilinear", "bicubic", "box", "lanczos")
PRESETS = ("digits", "mnist", "fashion_mnist", "cifar10")
CUSTOM = "custom"  # data.name of a data set described by its keys, not a preset
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SHARED_DATA_ENV = "DIFFJAX_SHARED_DATA"
SHARED_DATA_CANDIDATES = ("shared/data", "../shared/data")  # relative to the working directory

# key: (type, default, meaning)
DATA_KEYS = {
    "name": (str, CUSTOM, f"the data set: a preset {PRESETS} or 'custom' (described by the other keys)"),
    "source": (str, "npz", f"where the images come from: one of {SOURCES}"),
    "path": (str, "", "file or directory of a local source (relative paths: to the working directory)"),
    "tfds_name": (str, "", "prepared TFDS data set for source 'tfds', e.g. 'mnist', 'cifar10:3.0.2'"),
    "data_dir": (str, "", "TFDS data directory ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)"),
    "image_key": (str, "image", "feature holding the image in TFDS records"),
    "label_key": (str, "label", "feature holding the class label ('' = unlabelled, labels are 0)"),
    "image_size": (int, 32, "output height = width"),
    "channels": (int, 3, "1 (grayscale) or 3 (RGB); archives are converted to it; latents: their channels"),
    "resize_method": (str, "none", f"'none' (images already image_size) or a PIL filter {RESIZE_METHODS[1:]}"),
    "center_crop": (bool, False, "crop the largest centred square before resizing"),
    "random_flip": (bool, False, "random horizontal flip, p = 1/2 per example"),
    "dequantize": (bool, False, "uniform dequantization (x + u) / 256, u ~ U[0, 1), instead of x / 255"),
    "num_classes": (int, 10, "classes in the data (checked), or 0 to ignore labels"),
    "autoencoder": (str, "", "latents: the save_autoencoder .npz that decodes them ('' = the one the cache names)"),
    "in_memory": (bool, False, "decode the whole split once into RAM (arrays then need no preparation)"),
    "worker_count": (int, 0, "grain worker processes (0: decode in the training process, in threads)"),
    "num_threads": (int, 2, "reader threads per process"),
    "prefetch": (int, 4, "batches buffered ahead per process"),
}
_TYPES = {key: kind for key, (kind, _, _) in DATA_KEYS.items()}


def shared_data_dir() -> Path:
    """The project's shared real data: $DIFFJAX_SHARED_DATA if set, else the first of shared/data and
    ../shared/data (relative to the working directory) that exists, else ../shared/data."""
    if os.environ.get(SHARED_DATA_ENV):
        return Path(os.path.abspath(os.path.expanduser(os.environ[SHARED_DATA_ENV])))
    candidates = [Path(os.path.abspath(c)) for c in SHARED_DATA_CANDIDATES]
    return next((c for c in candidates if c.is_dir()), candidates[-1])


def base_data_config() -> ml_collections.ConfigDict:
    """Every key with its default (a labelled 32x32 RGB set with no augmentation)."""
    return ml_collections.ConfigDict({key: default for key, (_, default, _) in DATA_KEYS.items()})


def _preset_keys(name: str) -> dict:
    shared = shared_data_dir()
    return {
        "digits": dict(source="sklearn_digits", image_size=16, channels=1, resize_method="bilinear", in_memory=True),
        "mnist": dict(
            source="npz", path=str(shared / "mnist.npz"), tfds_name="mnist", image_size=28, channels=1, in_memory=True
        ),
        "fashion_mnist": dict(
            source="idx", path=FASHION_MNIST_DIR, tfds_name="fashion_mnist", image_size=28, channels=1, in_memory=True
        ),
        "cifar10": dict(
            source="image_tar",
            path=str(shared / "cifar10-jpeg.tar"),
            tfds_name="cifar10",
            image_size=32,
            channels=3,
            random_flip=True,
        ),
    }[name]


def default_data_config(name: str) -> ml_collections.ConfigDict:
    """Preset data config for "digits", "mnist", "fashion_mnist" or "cifar10".

    digits: scikit-learn's 8x8 digits upscaled (bilinear) to 16x16, 1797 images, in memory; the default
      offline data set of the project.
    mnist: mnist.npz in the shared data directory (set source="tfds" to read a prepared TFDS "mnist").
    fashion_mnist: the idx files of the Debian package dataset-fashion-mnist (or TFDS "fashion_mnist").
    cifar10: cifar10-jpeg.tar in the shared data directory, JPEG decoded on the fly, random flips (or
      TFDS "cifar10").
    """
    if name not in PRESETS:
        raise ValueError(f"unknown data preset {name!r}; presets are {PRESETS}")
    config = base_data_config()
    config.update(name=name, **_preset_keys(name))
    return config


def _missing_path_hint(path: str, source: str = "") -> str:
    if source == "latents":
        return (
            " Build the latent cache first with diffjax.data.latents.build_latent_cache (an npz) or "
            "build_latent_records (a directory of array_record shards; for MNIST, "
            "`python -m diffjax.training.autoencoder --data=mnist --out=DIR` trains a tiny autoencoder and "
            "writes DIR/latents.npz)."
        )
    if path.startswith(FASHION_MNIST_DIR):
        return " Install it with `apt-get install -y dataset-fashion-mnist`, or set source='tfds'."
    if str(shared_data_dir()) in path:
        return (
            f" The project's shared data sets live in ${SHARED_DATA_ENV}, else shared/data or ../shared/data "
            "relative to the working directory (see its README.md), or set source='tfds' to read a prepared "
            "TFDS copy."
        )
    return ""


def _check_name(c: ml_collections.ConfigDict) -> None:
    """`name` is a preset or "custom"; a preset's data come from its own source (or a TFDS copy)."""
    check_choice("data.name", c.name, PRESETS + (CUSTOM,))
    if c.name in PRESETS:
        source = _preset_keys(c.name)["source"]
        if c.source not in (source, "tfds"):
            raise ValueError(
                f"data.name {c.name!r} is a preset read from source {source!r} (or 'tfds'), but data.source is "
                f"{c.source!r}: start from diffjax.data.default_data_config({c.name!r}) (on the command line "
                f"--config.data.name={c.name} does), or name a data set described by its keys {CUSTOM!r}"
            )


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
    full.autoencoder = os.path.expanduser(full.autoencoder) if full.autoencoder else ""
    _check_values(full)
    return full


def _check_values(c: ml_collections.ConfigDict) -> None:
    if c.source not in SOURCES:
        raise ValueError(f"unknown data source {c.source!r}; sources are {SOURCES}")
    if c.resize_method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize_method {c.resize_method!r}; allowed: {RESIZE_METHODS}")
    if c.channels not in (1, 3) and not (c.source == "latents" and c.channels >= 1):
        raise ValueError(f"channels must be 1 or 3, got {c.channels}")
    if c.source == "latents" and (c.dequantize or c.resize_method != "none" or c.center_crop):
        raise ValueError("source 'latents' holds float latents: dequantize, resize_method and center_crop do not apply")
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
            raise FileNotFoundError(
                f"data path {str(path)!r} for source {c.source!r} does not exist."
                + _missing_path_hint(str(path), c.source)
            )
        want_dir = c.source in ("idx", "image_folder")
        if path.is_dir() != want_dir and c.source != "latents":  # latents: an npz or a records directory
            kind = "a directory" if want_dir else "a file"
            raise ValueError(f"source {c.source!r} needs `path` to be {kind}; {str(path)!r} is not")
    if c.autoencoder and c.source != "latents":
        raise ValueError(f"autoencoder {c.autoencoder!r} decodes latents: it needs source 'latents', not {c.source!r}")
    if c.autoencoder and not Path(c.autoencoder).is_file():
        raise FileNotFoundError(f"data.autoencoder {c.autoencoder!r} does not exist (a save_autoencoder .npz)")
    if c.source == "tfds" and not c.tfds_name:
        raise ValueError("source 'tfds' needs `tfds_name` (e.g. 'mnist', 'cifar10'); it is empty")
    _check_name(c)
