"""TFDS builders that need no TensorFlow: local image files -> array_record, read with `tfds.data_source`.

Three builders, one per local layout (see `diffjax.data.formats`):

- ``diffjax_image_archive``: a folder or tar of images in ``[<split>/]<class>/<file>`` layout. Each image
  is stored as its original file bytes when its mode already has the requested channels (so decoding
  the record gives exactly the pixels of decoding the file), else converted by PIL and stored as PNG.
- ``diffjax_idx``: MNIST-style idx files; images stored as PNG (lossless).
- ``diffjax_npz``: ``x_<split>``/``y_<split>`` arrays of an ``.npz``; images stored as PNG (lossless).

Every record is a ``tf.train.Example`` with features ``image`` (`tfds.features.Image`, encoded bytes) and,
for labelled data, ``label`` (`tfds.features.ClassLabel`): the same schema as the stock TFDS image sets,
so one reader serves both. Records keep the source order (sorted by split, class, path for archives).

Where prepared data goes: ``<data_dir>/<builder>/<config>/1.0.0/`` where ``data_dir`` is the data config's
``data_dir`` (empty: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) and ``<config>`` is
``<file stem>-c<channels>-<fingerprint>``; the fingerprint hashes the source's absolute path, size and
modification time (for folders: of every image file), so a changed source is prepared afresh.
Preparation is atomic: TFDS writes into an ``incomplete.*`` directory and renames it when complete, and
removes it on failure. Concurrent preparers (several hosts on one file system) are safe: the loser of
the final rename reuses the winner's copy.

The builder classes skip the TFDS registry (no import-time side effects). Prepared data reads back by
name with ``tfds.data_source("<builder>/<config>", data_dir=...)`` or with `open_prepared`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from diffjax.data import formats

VERSION = "1.0.0"
ARCHIVE_SOURCES = ("image_tar", "image_folder")
ARRAY_SOURCES = ("idx", "npz")
LOCAL_SOURCES = ARCHIVE_SOURCES + ARRAY_SOURCES
_MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}


@dataclasses.dataclass(eq=False)
class LocalSourceConfig(tfds.core.BuilderConfig):
    """Which local source to prepare, and what the preparation scan found."""

    source_path: str = ""
    channels: int = 3
    splits: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()  # empty for unlabelled data
    num_classes: int = 0
    image_hw: tuple[int, int] | None = None  # (H, W) when every image has it, else None
    uniform_jpeg: bool = False  # every record is a JPEG of size image_hw already in the target mode
    archive_entries: tuple[formats.ArchiveEntry, ...] = ()
    convert_members: frozenset[str] = frozenset()  # archive members whose mode differs from the target


def _png_bytes(image: np.ndarray) -> bytes:
    """Losslessly encodes an (H, W, 1) or (H, W, 3) uint8 array as PNG."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    pil.save(buffer, format="png")
    return buffer.getvalue()


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared parts: features, metadata, record order kept (``disable_shuffling``)."""

    VERSION = tfds.core.Version(VERSION)
    builder_config: LocalSourceConfig

    # No download checksums file to find. (The lookup TFDS would do for a builder inside a package
    # needs the `importlib_resources` backport, which TFDS does not declare.)
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        shape = (*config.image_hw, config.channels) if config.image_hw else (None, None, config.channels)
        encoding = "jpeg" if config.uniform_jpeg else "png"  # informational: records keep their own format
        features = {"image": tfds.features.Image(shape=shape, encoding_format=encoding)}
        if config.class_names:
            features["label"] = tfds.features.ClassLabel(names=list(config.class_names))
        elif config.num_classes:
            features["label"] = tfds.features.ClassLabel(num_classes=config.num_classes)
        metadata = tfds.core.MetadataDict(
            source_path=config.source_path,
            channels=config.channels,
            image_hw=list(config.image_hw) if config.image_hw else None,
            uniform_jpeg=config.uniform_jpeg,
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Prepared by diffjax from {config.source_path}",
            features=tfds.features.FeaturesDict(features),
            metadata=metadata,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self.builder_config.splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        raise NotImplementedError


class ImageArchive(_LocalBuilder, skip_registration=True):
    """Images from a folder or tar with ``[<split>/]<class>/<file>`` layout."""

    name = "diffjax_image_archive"

    def _generate_examples(self, split):
        config = self.builder_config
        entries = [e for e in config.archive_entries if e.split == split]
        position = {e.member: i for i, e in enumerate(entries)}
        label_of = {name: i for i, name in enumerate(config.class_names)}
        for member, data in _iter_archive_bytes(config.source_path, [e.member for e in entries]):
            entry = entries[position[member]]
            if member in config.convert_members:
                data = _png_bytes(_decode_to_mode(data, config.channels))
            example = {"image": data}
            if config.class_names:
                example["label"] = label_of[entry.class_name]
            yield position[member], example


class Idx(_LocalBuilder, skip_registration=True):
    """Images and labels from MNIST-style idx files."""

    name = "diffjax_idx"

    def _generate_examples(self, split):
        images, labels = formats.read_idx_split(self.builder_config.source_path, split)
        yield from _array_examples(images, labels)


class Npz(_LocalBuilder, skip_registration=True):
    """Images and labels from ``x_<split>``/``y_<split>`` arrays of an .npz file."""

    name = "diffjax_npz"

    def _generate_examples(self, split):
        images, labels = formats.read_npz_split(self.builder_config.source_path, split)
        yield from _array_examples(images, labels)


_BUILDERS = {"image_tar": ImageArchive, "image_folder": ImageArchive, "idx": Idx, "npz": Npz}


def _array_examples(images: np.ndarray, labels: np.ndarray | None) -> Iterator[tuple[int, dict]]:
    for i, image in enumerate(images):
        example = {"image": _png_bytes(image)}
        if labels is not None:
            example["label"] = int(labels[i])
        yield i, example


def _decode_to_mode(data: bytes, channels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert(_MODE_FOR_CHANNELS[channels]))
    return array[..., None] if array.ndim == 2 else array


def _iter_archive_bytes(path: str, members: list[str]) -> Iterator[tuple[str, bytes]]:
    """(member, bytes) for the given members: one streaming pass for tars, direct reads for folders."""
    if Path(path).is_dir():
        for member in members:
            yield member, formats.read_folder_member(path, member)
        return
    wanted = set(members)
    for member, data in formats.iter_tar_bytes(path):
        if member in wanted:
            yield member, data


# ----------------------------------------------------------------------------------------------
# Naming, fingerprints and preparation


def default_data_dir() -> str:
    """Where prepared data lives when the data config leaves ``data_dir`` empty (the TFDS default)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def source_fingerprint(path: str | os.PathLike) -> str:
    """Hash of a source's absolute path, size and mtime (every image file's, for a folder)."""
    path = Path(path).resolve()
    if path.is_dir():
        stats = []
        for root, _, files in os.walk(path):
            for name in sorted(files):
                if name.lower().endswith(formats.IMAGE_EXTENSIONS):
                    file = Path(root, name)
                    stat = file.stat()
                    stats.append((file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
        stats.sort()
    else:
        stat = path.stat()
        stats = [(stat.st_size, stat.st_mtime_ns)]
    payload = json.dumps([str(path), VERSION, stats]).encode()
    return hashlib.sha256(payload).hexdigest()[:12]


def config_name(path: str | os.PathLike, channels: int) -> str:
    """``<stem>-c<channels>-<fingerprint>``, a valid TFDS config name."""
    stem = Path(path).name.split(".")[0] or "data"
    slug = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_") or "data"
    return f"{slug}-c{channels}-{source_fingerprint(path)}"


def prepared_name(source: str, path: str | os.PathLike, channels: int) -> str:
    """The TFDS name ``<builder>/<config>`` under which a local source is (or will be) prepared."""
    if source not in _BUILDERS:
        raise ValueError(f"source {source!r} has no builder; builders exist for {sorted(_BUILDERS)}")
    return f"{_BUILDERS[source].name}/{config_name(path, channels)}"


def prepared_dir(source: str, path: str | os.PathLike, channels: int, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir, prepared_name(source, path, channels), VERSION)


def is_prepared(source: str, path: str | os.PathLike, channels: int, data_dir: str | os.PathLike) -> bool:
    return (prepared_dir(source, path, channels, data_dir) / "dataset_info.json").exists()


@dataclasses.dataclass(frozen=True)
class ArchiveScan:
    """What a header pass over every image of an archive found."""

    entries: tuple[formats.ArchiveEntry, ...]
    class_names: tuple[str, ...]
    image_hw: tuple[int, int] | None
    uniform_jpeg: bool
    convert_members: frozenset[str]


def scan_archive(path: str | os.PathLike, channels: int) -> ArchiveScan:
    """Reads every image header (not the pixels): sizes, modes and formats, for the builder config."""
    is_dir = Path(path).is_dir()
    entries = tuple(formats.list_folder(path) if is_dir else formats.list_tar(path))
    target_mode = _MODE_FOR_CHANNELS[channels]
    sizes, all_jpeg, convert = set(), True, set()
    for member, data in _iter_archive_bytes(str(path), [e.member for e in entries]):
        header = formats.image_header(data)
        sizes.add(header.size)
        all_jpeg &= header.format == "JPEG"
        if header.mode != target_mode:
            convert.add(member)
    labelled = any(e.class_name for e in entries)
    class_names = tuple(sorted({e.class_name for e in entries})) if labelled else ()
    image_hw = next(iter(sizes)) if len(sizes) == 1 else None
    return ArchiveScan(
        entries=entries,
        class_names=class_names,
        image_hw=image_hw,
        uniform_jpeg=all_jpeg and not convert and image_hw is not None,
        convert_members=frozenset(convert),
    )


def _array_config(source: str, path: str, channels: int) -> dict:
    headers = formats.idx_split_headers(path) if source == "idx" else formats.npz_split_headers(path)
    shapes = {h.image_shape for h in headers.values()}
    if len(shapes) != 1:
        raise ValueError(f"{path}: splits have different image shapes {sorted(shapes)}")
    (shape,) = shapes
    if shape[-1] != channels:
        raise ValueError(f"{path}: images have {shape[-1]} channel(s) but channels={channels} was asked for")
    if shape[-1] not in _MODE_FOR_CHANNELS:
        raise ValueError(f"{path}: images with {shape[-1]} channels are not supported; use 1 or 3")
    return dict(
        splits=tuple(headers),
        num_classes=array_num_classes(source, path),
        image_hw=tuple(shape[:2]),
    )


def array_num_classes(source: str, path: str | os.PathLike) -> int:
    """1 + the largest label over all splits (0 when unlabelled); reads only the label arrays."""
    largest = -1
    if source == "idx":
        for _, labels_path in formats.idx_files(path).values():
            if labels_path is not None:
                labels = formats.read_idx_array(labels_path).astype(np.int64)
                largest = max(largest, int(labels.max(initial=-1)))
    else:
        with np.load(path) as arrays:
            for key in arrays.files:
                if key.startswith("y_"):
                    largest = max(largest, int(arrays[key].astype(np.int64).max(initial=-1)))
    return largest + 1


def make_builder(source: str, path: str | os.PathLike, channels: int, data_dir: str | os.PathLike):
    """A builder for a local source, configured by a scan of the source (does not prepare it)."""
    path = str(Path(path).resolve())
    name = config_name(path, channels)
    if source in ARCHIVE_SOURCES:
        scan = scan_archive(path, channels)
        fields = dict(
            splits=tuple(sorted({e.split for e in scan.entries})),
            class_names=scan.class_names,
            image_hw=scan.image_hw,
            uniform_jpeg=scan.uniform_jpeg,
            archive_entries=scan.entries,
            convert_members=scan.convert_members,
        )
    else:
        fields = _array_config(source, path, channels)
    config = LocalSourceConfig(name=name, source_path=path, channels=channels, **fields)
    return _BUILDERS[source](config=config, data_dir=os.fspath(data_dir), file_format="array_record")


def build_array_record(source: str, path: str | os.PathLike, channels: int, data_dir: str | os.PathLike) -> str:
    """Prepares a local source as array_record TFDS data under data_dir (once); returns its TFDS name.

    Atomic: a failure leaves nothing behind but empty parent directories.
    """
    name = prepared_name(source, path, channels)
    if is_prepared(source, path, channels, data_dir):
        return name
    builder = make_builder(source, path, channels, data_dir)
    with tempfile.TemporaryDirectory(prefix="diffjax_tfds_downloads_") as download_dir:
        try:
            builder.download_and_prepare(
                download_dir=download_dir,
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
        except OSError:
            # Another process may have finished the same preparation first (rename onto its copy).
            if not is_prepared(source, path, channels, data_dir):
                _remove_empty_parents(prepared_dir(source, path, channels, data_dir), Path(data_dir))
                raise
        except BaseException:
            _remove_empty_parents(prepared_dir(source, path, channels, data_dir), Path(data_dir))
            raise
    return name


def _remove_empty_parents(directory: Path, stop: Path) -> None:
    """Removes directory and its parents up to (not including) stop, while they are empty."""
    directory, stop = directory.resolve(), stop.resolve()
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:  # not empty, or already gone
            if directory.exists():
                return
        directory = directory.parent
