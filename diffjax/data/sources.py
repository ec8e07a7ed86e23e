"""Random-access image sources for the grain pipeline, and cheap data set facts (`dataset_info`).

A source has ``len(source)`` and ``source.read(indices) -> (images uint8 (B, S, S, C), labels int32 (B,))``
with images already decoded, cropped and resized to the data config's ``image_size`` (the deterministic
part of preprocessing; the random part is in `diffjax.data.pipeline`). Two kinds:

- `RecordSource`: encoded records of a prepared TFDS split (array_record) read with `tfds.data_source`
  as raw bytes; each ``tf.train.Example`` is parsed with TFDS's bundled proto (a few microseconds, no
  TensorFlow) and its image decoded with PIL.
- `ArraySource`: a whole split decoded in memory.

Both pickle cheaply enough to be sent to grain worker processes.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits
from tensorflow_datasets.proto import tf_example_pb2

from diffjax.data import builders, formats, latents
from diffjax.data.config import validate_data_config

DIGITS_NUM_EXAMPLES = 1797
_MODES = {1: "L", 3: "RGB"}
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}
_READ_CHUNK = 4096


# ----------------------------------------------------------------------------------------------
# Facts about a data set


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a data config yields, computed without reading pixels.

    image_shape: (H, W, C) of the pipeline's output images.
    source_shape: (H, W, C) as stored; H and W are None when they vary between images.
    num_examples: examples per split.
    num_classes: classes in the data (0 when unlabelled). A config's num_classes must equal it, or be 0,
      in which case the pipeline yields all labels as 0 (unconditional training).
    """

    image_shape: tuple[int, int, int]
    source_shape: tuple[int | None, int | None, int]
    num_examples: dict[str, int]
    num_classes: int


def dataset_info(data_config) -> DataInfo:
    """Shape, examples per split and classes of a data config; checks the config against the data.

    Cheap: headers only (a tar is listed once if not yet prepared). Raises ValueError when image_size,
    channels or num_classes do not fit the data, FileNotFoundError when files are missing.
    """
    config = validate_data_config(data_config)
    info = _source_info(config)
    check_config_fits_data(config, info)
    return info


def _source_info(config) -> DataInfo:
    output = (config.image_size, config.image_size, config.channels)
    if config.source == "toy":
        raise ValueError("source 'toy' is sampled by diffjax.data.toy, not by the image pipeline")
    if config.source == "sklearn_digits":
        return DataInfo(output, (8, 8, 1), {"train": DIGITS_NUM_EXAMPLES}, 10)
    if config.source == "latents":
        shape, counts, num_classes, _ = latents.latent_cache_info(config.path)
        return DataInfo(output, shape, counts, num_classes)
    if config.source in builders.LOCAL_SOURCES:
        data_dir = config.data_dir or builders.default_data_dir()
        if builders.is_prepared(config.source, config.path, config.channels, data_dir):
            name = builders.prepared_name(config.source, config.path, config.channels)
            return _tfds_info(tfds.builder(name, data_dir=data_dir), config, output)
        if config.source in builders.ARRAY_SOURCES:
            return _array_info(config, output)
        return _archive_info(config, output)
    return _tfds_info(stock_tfds_builder(config), config, output)


def _array_info(config, output) -> DataInfo:
    if config.source == "idx":
        headers = formats.idx_split_headers(config.path)
    else:
        headers = formats.npz_split_headers(config.path)
    shapes = {h.image_shape for h in headers.values()}
    if len(shapes) != 1:
        raise ValueError(f"{config.path}: splits have different image shapes {sorted(shapes)}")
    (shape,) = shapes
    return DataInfo(
        output,
        shape,
        {split: h.num_examples for split, h in headers.items()},
        builders.array_num_classes(config.source, config.path),
    )


def _archive_info(config, output) -> DataInfo:
    is_tar = config.source == "image_tar"
    entries = formats.list_tar(config.path) if is_tar else formats.list_folder(config.path)
    header = formats.image_header(formats.first_image_bytes(config.path, is_tar))
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.split] = counts.get(entry.split, 0) + 1
    labelled = any(e.class_name for e in entries)
    num_classes = len({e.class_name for e in entries}) if labelled else 0
    # The first image's size stands for all until preparation scans every header.
    return DataInfo(output, (*header.size, config.channels), counts, num_classes)


def stock_tfds_builder(config):
    """The TFDS builder of a prepared data set named by config.tfds_name, with clear errors."""
    data_dir = config.data_dir or builders.default_data_dir()
    try:
        builder = tfds.builder(config.tfds_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"TFDS data set {config.tfds_name!r} is neither a registered TFDS name nor prepared in "
            f"{data_dir!r}: {str(error).splitlines()[0]}"
        ) from None
    if not (Path(builder.data_dir) / "dataset_info.json").exists():
        raise FileNotFoundError(
            f"TFDS data set {config.tfds_name!r} is not prepared in data_dir={data_dir!r} (looked in "
            f"{builder.data_dir}). Prepare it where TensorFlow is installed with `tfds build "
            f"{config.tfds_name.split(':')[0]} --file_format=array_record --data_dir={data_dir}`."
        )
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"TFDS data set {config.tfds_name!r} in {builder.data_dir} is stored as "
            f"{builder.info.file_format.value}; random access needs array_record. Re-prepare it with "
            f"`tfds build {config.tfds_name.split(':')[0]} --file_format=array_record`."
        )
    return builder


def feature_keys(builder, config) -> tuple[str, str]:
    """(image key, label key or '') of TFDS records: fixed for diffjax-prepared data, else from config."""
    if config.source in builders.LOCAL_SOURCES:
        return "image", "label" if "label" in builder.info.features else ""
    return config.image_key, config.label_key


def _tfds_info(builder, config, output) -> DataInfo:
    features = builder.info.features
    image_key, label_key = feature_keys(builder, config)
    if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
        raise ValueError(
            f"{builder.info.full_name}: image_key {image_key!r} is not an Image feature; "
            f"features are {sorted(features.keys())}"
        )
    num_classes = 0
    if label_key:
        label = features[label_key] if label_key in features else None
        if not isinstance(label, tfds.features.ClassLabel):
            raise ValueError(
                f"{builder.info.full_name}: label_key {label_key!r} is not a ClassLabel feature; "
                f"features are {sorted(features.keys())} (set label_key='' for unlabelled data)"
            )
        num_classes = label.num_classes
    height, width, channels = features[image_key].shape
    metadata = builder.info.metadata or {}
    if metadata.get("image_hw"):
        height, width = metadata["image_hw"]
    splits = {name: split.num_examples for name, split in builder.info.splits.items()}
    return DataInfo(output, (height, width, channels), splits, num_classes)


def check_config_fits_data(config, info: DataInfo) -> None:
    """Raises ValueError naming the mismatch when image_size, channels or num_classes misfit the data."""
    height, width, channels = info.source_shape
    if channels != config.channels and config.source not in builders.ARCHIVE_SOURCES:
        raise ValueError(
            f"channels={config.channels} but the {config.source!r} data has {channels} channel(s); "
            f"set channels={channels}"
        )
    if config.resize_method == "none":
        if height is None:
            raise ValueError(
                "the images vary in size; set resize_method to one of "
                f"{tuple(_RESAMPLE)} to resize them to image_size={config.image_size}"
            )
        side = min(height, width) if config.center_crop else None
        fits = side == config.image_size if side else (height, width) == (config.image_size,) * 2
        if not fits:
            allowed = (
                f"image_size={side}" if side else (f"image_size={height}" if height == width else "center_crop=True")
            )
            raise ValueError(
                f"image_size={config.image_size} does not match the data's {height}x{width} images and "
                f"resize_method='none'; set {allowed}, or a resize_method from {tuple(_RESAMPLE)}"
            )
    if config.num_classes and config.num_classes != info.num_classes:
        raise ValueError(
            f"num_classes={config.num_classes} but the data has {info.num_classes} classes; set "
            f"num_classes={info.num_classes}, or 0 to ignore labels"
        )


def check_split(info: DataInfo, split: str, source: str) -> None:
    """Raises ValueError unless split names a split of the data (TFDS slices allowed for 'tfds')."""
    base = split.split("[")[0] if source == "tfds" else split
    if base not in info.num_examples:
        raise ValueError(f"unknown split {split!r}; the data has splits {sorted(info.num_examples)}")


# ----------------------------------------------------------------------------------------------
# Decoding and fitting


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """The deterministic image preprocessing: decode to `channels`, crop, resize to image_size."""

    image_size: int
    channels: int
    resize_method: str = "none"
    center_crop: bool = False
    jpeg_hw: tuple[int, int] | None = None  # every record is a JPEG of this (H, W) in the target mode

    @classmethod
    def from_config(cls, config, jpeg_hw=None) -> ImageSpec:
        return cls(config.image_size, config.channels, config.resize_method, config.center_crop, jpeg_hw)


def decode_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Encoded image -> (H, W, channels) uint8.

    When every record is known to be a JPEG of one size in the target mode (checked at preparation),
    the libjpeg decoder is called directly, skipping PIL's Python header parsing; same pixels.
    """
    mode = _MODES[spec.channels]
    if spec.jpeg_hw is not None:
        height, width = spec.jpeg_hw
        array = np.asarray(Image.frombytes(mode, (width, height), data, "jpeg", mode, ""))
    else:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image if image.mode == mode else image.convert(mode))
    return array[..., None] if array.ndim == 2 else array


def fit_image(image: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Centre-crops (if asked) and resizes (H, W, C) uint8 to (image_size, image_size, C)."""
    if spec.center_crop:
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        image = image[top : top + side, left : left + side]
    size = spec.image_size
    if image.shape[:2] == (size, size):
        return image
    if spec.resize_method == "none":
        raise ValueError(
            f"an image of size {image.shape[0]}x{image.shape[1]} needs resizing to "
            f"{size}x{size} but resize_method='none'"
        )
    pil = Image.fromarray(image[..., 0] if spec.channels == 1 else image)
    resized = np.asarray(pil.resize((size, size), resample=_RESAMPLE[spec.resize_method]))
    return resized[..., None] if resized.ndim == 2 else resized


def fit_images(images: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """fit_image over a (N, H, W, C) batch; no copy when nothing changes."""
    if images.shape[1:3] == (spec.image_size,) * 2 and not spec.center_crop:
        return images
    return np.stack([fit_image(image, spec) for image in images])


# ----------------------------------------------------------------------------------------------
# Sources


@dataclasses.dataclass
class ArraySource:
    """A split held in memory: images (N, S, S, C) uint8 (already fitted), labels (N,) int32."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


@dataclasses.dataclass
class RecordSource:
    """Encoded tf.train.Example records of a prepared TFDS split, decoded and fitted on read."""

    records: Any  # a tfds data source with deserialize_method=RAW_BYTES
    spec: ImageSpec
    image_key: str = "image"
    label_key: str = ""  # "" -> all labels 0

    def __len__(self) -> int:
        return len(self.records)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raw = self.records.__getitems__([int(i) for i in indices])
        size, channels = self.spec.image_size, self.spec.channels
        images = np.empty((len(raw), size, size, channels), np.uint8)
        labels = np.zeros(len(raw), np.int32)
        for i, record in enumerate(raw):
            feature = tf_example_pb2.Example.FromString(record).features.feature
            encoded = feature[self.image_key].bytes_list.value[0]
            images[i] = fit_image(decode_image(encoded, self.spec), self.spec)
            if self.label_key:
                labels[i] = feature[self.label_key].int64_list.value[0]
        return images, labels


def load_into_memory(source) -> ArraySource:
    """Reads and decodes a whole source once (in chunks)."""
    if isinstance(source, ArraySource):
        return source
    chunks = [
        source.read(np.arange(start, min(start + _READ_CHUNK, len(source))))
        for start in range(0, len(source), _READ_CHUNK)
    ]
    return ArraySource(np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))


def _digits_source(spec: ImageSpec) -> ArraySource:
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ArraySource(fit_images(images, spec), digits.target.astype(np.int32))


def _array_source(config, split: str, spec: ImageSpec) -> ArraySource:
    read = formats.read_idx_split if config.source == "idx" else formats.read_npz_split
    images, labels = read(config.path, split)
    labels = np.zeros(len(images), np.int32) if labels is None else labels.astype(np.int32)
    return ArraySource(fit_images(images, spec), labels)


def _record_source(config, split: str, info: DataInfo) -> RecordSource:
    data_dir = config.data_dir or builders.default_data_dir()
    if config.source in builders.LOCAL_SOURCES:
        name = builders.build_array_record(config.source, config.path, config.channels, data_dir)
        builder = tfds.builder(name, data_dir=data_dir)
        # The full header scan of preparation may have found sizes that the first image did not show.
        check_config_fits_data(config, _tfds_info(builder, config, info.image_shape))
    else:
        builder = stock_tfds_builder(config)
    image_key, label_key = feature_keys(builder, config)
    metadata = builder.info.metadata or {}
    jpeg_hw = tuple(metadata["image_hw"]) if metadata.get("uniform_jpeg") else None
    records = builder.as_data_source(split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    return RecordSource(records, ImageSpec.from_config(config, jpeg_hw), image_key, label_key)


def open_source(data_config, split: str):
    """The source for one split; prepares local files as TFDS data first when needed (once, atomic).

    Arrays (npz, idx) with in_memory=True are read directly, with no preparation. With num_classes=0
    all labels are 0.
    """
    config = validate_data_config(data_config)
    info = dataset_info(config)
    check_split(info, split, config.source)
    if config.source == "latents":
        return latents.open_latent_source(config.path, split, config.num_classes)
    spec = ImageSpec.from_config(config)
    if config.source == "sklearn_digits":
        source = _digits_source(spec)
    elif config.source in builders.ARRAY_SOURCES and config.in_memory:
        source = _array_source(config, split, spec)
    else:
        source = _record_source(config, split, info)
        if not config.num_classes:
            source = dataclasses.replace(source, label_key="")
        if config.in_memory:
            source = load_into_memory(source)
    if isinstance(source, ArraySource) and not config.num_classes:
        source = ArraySource(source.images, np.zeros_like(source.labels))
    return source
