"""Readers for the local file layouts that diffjax prepares into TFDS data sets.

Pure file parsing, no TFDS: header-only reads (cheap, for `dataset_info` and validation) and full
reads (for the builders). Three layouts:

- idx: a directory of MNIST-style files ``<prefix>-images-idx3-ubyte[.gz]`` and
  ``<prefix>-labels-idx1-ubyte[.gz]``; prefix ``train`` is split "train", ``t10k`` is "test", any
  other prefix names its own split.
- npz: one ``.npz`` with ``x_<split>`` (N, H, W) or (N, H, W, C) uint8 and optional ``y_<split>`` (N,)
  integer labels (the Keras layout of ``mnist.npz``).
- image archive: a directory or a tar (optionally gzip/bz2/xz) of image files laid out as
  ``[<split>/]<class>/<file>`` (labelled) or ``[<split>/]<file>`` (unlabelled). The top level holds
  split directories when every top-level directory is a known split name (train, test, validation,
  val, valid); otherwise the whole archive is the split "train".
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import os
import re
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLIT_DIR_NAMES = ("train", "test", "validation", "val", "valid")
_IDX_PREFIX_TO_SPLIT = {"train": "train", "t10k": "test"}
_IDX_FILE = re.compile(r"^(?P<prefix>.+)-(?P<kind>images|labels)-idx(?P<ndim>\d)-ubyte(?P<gz>\.gz)?$")
_NPZ_IMAGES = re.compile(r"^x_(?P<split>\w+)$")


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """Header facts of one split of an array layout (idx or npz)."""

    num_examples: int
    image_shape: tuple[int, int, int]  # (H, W, C)
    has_labels: bool


# ----------------------------------------------------------------------------------------------
# idx (MNIST layout)


def _open_maybe_gzip(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_idx_header(stream) -> tuple[int, ...]:
    """Parses an idx header: two zero bytes, type code 0x08 (uint8), ndim, then ndim big-endian int32."""
    magic = stream.read(4)
    if len(magic) != 4 or magic[0] != 0 or magic[1] != 0:
        raise ValueError(f"not an idx file (magic bytes {magic!r})")
    if magic[2] != 0x08:
        raise ValueError(f"idx type code {magic[2]:#04x} is not supported; only 0x08 (uint8) is")
    ndim = magic[3]
    dims = np.frombuffer(stream.read(4 * ndim), dtype=">i4")
    if dims.size != ndim:
        raise ValueError("idx header is truncated")
    return tuple(int(d) for d in dims)


def idx_files(directory: str | os.PathLike) -> dict[str, tuple[Path, Path | None]]:
    """Maps split name -> (images file, labels file or None) for an idx directory."""
    directory = Path(directory)
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(directory.iterdir()):
        match = _IDX_FILE.match(path.name)
        if match:
            found.setdefault(match["prefix"], {})[match["kind"]] = path
    splits = {}
    for prefix, kinds in found.items():
        if "images" not in kinds:
            continue
        splits[_IDX_PREFIX_TO_SPLIT.get(prefix, prefix)] = (kinds["images"], kinds.get("labels"))
    if not splits:
        raise FileNotFoundError(
            f"no idx image files (<prefix>-images-idx3-ubyte[.gz]) in {directory}; found "
            f"{sorted(p.name for p in directory.iterdir())[:10]}"
        )
    return splits


def idx_split_headers(directory: str | os.PathLike) -> dict[str, ArraySplit]:
    """Reads only the idx headers: split -> (count, (H, W, 1), labelled)."""
    headers = {}
    for split, (images_path, labels_path) in idx_files(directory).items():
        with _open_maybe_gzip(images_path) as stream:
            dims = _read_idx_header(stream)
        if len(dims) != 3:
            raise ValueError(f"{images_path}: expected 3 image dimensions (N, H, W), got {dims}")
        if labels_path is not None:
            with _open_maybe_gzip(labels_path) as stream:
                label_dims = _read_idx_header(stream)
            if label_dims != (dims[0],):
                raise ValueError(f"{labels_path}: labels have shape {label_dims}, images {dims}; expected ({dims[0]},)")
        headers[split] = ArraySplit(dims[0], (dims[1], dims[2], 1), labels_path is not None)
    return headers


def read_idx_array(path: str | os.PathLike) -> np.ndarray:
    """Reads a whole idx file (optionally gzipped) into a uint8 array."""
    path = Path(path)
    with _open_maybe_gzip(path) as stream:
        dims = _read_idx_header(stream)
        data = stream.read()
    expected = int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but holds {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def read_idx_split(directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns (images (N, H, W, 1) uint8, labels (N,) int64 or None) of one idx split."""
    images_path, labels_path = idx_files(directory)[split]
    images = read_idx_array(images_path)[..., None]
    labels = None if labels_path is None else read_idx_array(labels_path).astype(np.int64)
    return images, labels


# ----------------------------------------------------------------------------------------------
# npz


def _npz_member_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.open(key + ".npy") as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
    return tuple(shape), np.dtype(dtype)


def npz_split_headers(path: str | os.PathLike) -> dict[str, ArraySplit]:
    """Reads only the .npy headers inside an .npz: split -> (count, (H, W, C), labelled)."""
    with zipfile.ZipFile(path) as archive:
        keys = {name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")}
        headers = {}
        for key in sorted(keys):
            match = _NPZ_IMAGES.match(key)
            if not match:
                continue
            split = match["split"]
            shape, dtype = _npz_member_header(archive, key)
            if dtype != np.uint8 or len(shape) not in (3, 4):
                raise ValueError(f"{path}: '{key}' must be uint8 (N, H, W) or (N, H, W, C); got {dtype} {shape}")
            image_shape = shape[1:] if len(shape) == 4 else (*shape[1:], 1)
            has_labels = f"y_{split}" in keys
            if has_labels:
                label_shape, label_dtype = _npz_member_header(archive, f"y_{split}")
                if label_shape != shape[:1] or label_dtype.kind not in "iu":
                    raise ValueError(
                        f"{path}: 'y_{split}' must be integer ({shape[0]},); got {label_dtype} {label_shape}"
                    )
            headers[split] = ArraySplit(shape[0], tuple(int(d) for d in image_shape), has_labels)
    if not headers:
        raise ValueError(f"{path}: no image arrays named x_<split>; keys are {sorted(keys)}")
    return headers


def read_npz_split(path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Returns (images (N, H, W, C) uint8, labels (N,) int64 or None) of one npz split."""
    with np.load(path) as arrays:
        images = arrays[f"x_{split}"]
        labels = arrays[f"y_{split}"].astype(np.int64) if f"y_{split}" in arrays.files else None
    if images.ndim == 3:
        images = images[..., None]
    return images, labels


# ----------------------------------------------------------------------------------------------
# image archives (folder or tar)


@dataclasses.dataclass(frozen=True)
class ArchiveEntry:
    """One image of an archive: its split, class name ('' if unlabelled) and member/relative path."""

    split: str
    class_name: str
    member: str


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not Path(name).name.startswith(".")


def _entries_from_relative_paths(paths: list[str], where: str) -> list[ArchiveEntry]:
    """Interprets relative image paths as [split/]class/file or [split/]file."""
    parts = [tuple(p.split("/")) for p in paths]
    top_dirs = {p[0] for p in parts if len(p) > 1}
    has_split_dirs = bool(top_dirs) and top_dirs <= set(SPLIT_DIR_NAMES) and all(len(p) > 1 for p in parts)
    entries = []
    depths = set()
    for path, p in zip(paths, parts):
        split, rest = (p[0], p[1:]) if has_split_dirs else ("train", p)
        if len(rest) > 2:
            raise ValueError(f"{where}: '{path}' is nested too deep; expected [<split>/]<class>/<file>")
        depths.add(len(rest))
        entries.append(ArchiveEntry(split, rest[0] if len(rest) == 2 else "", path))
    if len(depths) > 1:
        raise ValueError(
            f"{where}: mixes images inside class folders and images without a class folder; "
            "use [<split>/]<class>/<file> for all or [<split>/]<file> for all"
        )
    if not entries:
        raise ValueError(f"{where}: holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(entries, key=lambda e: (e.split, e.class_name, e.member))


def list_folder(directory: str | os.PathLike) -> list[ArchiveEntry]:
    """Lists the images of a folder archive, sorted by (split, class, path)."""
    directory = Path(directory)
    paths = []
    for root, _, files in os.walk(directory):
        for name in files:
            if _is_image_name(name):
                paths.append(Path(root, name).relative_to(directory).as_posix())
    return _entries_from_relative_paths(paths, str(directory))


def list_tar(path: str | os.PathLike) -> list[ArchiveEntry]:
    """Lists the images of a tar archive (reads every header once), sorted by (split, class, path)."""
    stat = Path(path).stat()
    return list(_list_tar_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _list_tar_cached(path: str, size: int, mtime_ns: int) -> tuple[ArchiveEntry, ...]:
    del size, mtime_ns  # cache keys: a changed file is listed again
    with tarfile.open(path, "r:*") as archive:
        names = [m.name for m in archive if m.isfile() and _is_image_name(m.name)]
    names = [n[2:] if n.startswith("./") else n for n in names]
    return tuple(_entries_from_relative_paths(names, path))


def iter_tar_bytes(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """Streams (member name, file bytes) of the image files of a tar, in archive order."""
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if member.isfile() and _is_image_name(member.name):
                name = member.name[2:] if member.name.startswith("./") else member.name
                yield name, archive.extractfile(member).read()


def read_folder_member(directory: str | os.PathLike, member: str) -> bytes:
    return Path(directory, member).read_bytes()


def first_image_bytes(path: str | os.PathLike, is_tar: bool) -> bytes:
    """The bytes of the first image file of an archive (cheap: stops at the first image)."""
    if is_tar:
        for _, data in iter_tar_bytes(path):
            return data
        raise ValueError(f"{path}: holds no image files")
    return read_folder_member(path, list_folder(path)[0].member)


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What PIL reads from an image file's header without decoding its pixels."""

    format: str  # "JPEG", "PNG", ...
    mode: str  # "RGB", "L", ...
    size: tuple[int, int]  # (H, W)

    @property
    def channels(self) -> int:
        return 1 if self.mode in ("1", "L", "I", "I;16", "F") else 3


def image_header(data: bytes) -> ImageHeader:
    with Image.open(io.BytesIO(data)) as image:
        return ImageHeader(image.format, image.mode, (image.height, image.width))
