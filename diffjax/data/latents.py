"""Latent data: a data set encoded once by an autoencoder into float latents, read by the pipeline.

`build_latent_cache({split: source}, encode, path)` reads image sources in order (e.g.
`diffjax.data.open_source(config, split)`: the same decoding and deterministic preprocessing as the
image pipeline), maps the images to [-1, 1], encodes them with `encode(images) -> latents` (e.g. `functools.partial(
diffjax.models.autoencoder.encode_latents, vae)`, already scaled) in batches, and writes one npz
(atomically) holding, per split, `latents_<split>` (N, h, w, c) float32, `flipped_<split>` (the
latents of the horizontally flipped images, as DiT flips images before encoding) and
`labels_<split>`, plus `meta` (JSON: the autoencoder's identity and scaling, the source). The
trainer reads meta["autoencoder"]["path"] (the decoder of sample grids), meta["scaling_factor"]
(checked against the decoder's) and meta["images"] (the image data config, FID's reference); see
diffjax/training/latents.py.

A data config with `source="latents"` and `path` that file yields {"image": latents, "label"}
batches; `random_flip=True` takes each example's flipped latents with probability 1/2 (the same
per-example draw as image flips).

A data set too large for one npz (ImageNet at 256 px: 1.28M x 32x32x4 float32, ~21 GB, twice with
flips) goes into a directory instead: `build_latent_records({split: source}, encode, directory,
num_classes=..., process_index=..., process_count=...)` writes `meta.json` (format and version, the
latent shape, flips, num_classes, per split the example count and the shard plan, and `meta`) and per
split `<split>-<i>-of-<n>.array_record` shards of `examples_per_shard` consecutive examples (the
last one shorter), one record per example: the bytes of one element of `record_dtype(shape, flips)`
(latents float32, flipped latents if built with flips, label int32, little-endian). Shard g (counted
over all splits in order) is encoded by process g % process_count, so hosts split the work. A shard
is written to a hidden temporary file and renamed when complete: a shard file under its final name
is a finished shard, an interrupted run leaves none, and a re-run skips the shards that exist.
`open_latent_source`, `latent_cache_info` and a data config's `path` take the npz or the directory;
the directory is read by index (`LatentRecordSource`), never loaded whole.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from tqdm import tqdm

from diffjax.io import atomic_write, atomic_write_json
from diffjax.validation import check_count

__all__ = [
    "LatentRecordSource",
    "LatentSource",
    "RecordsBuild",
    "build_latent_cache",
    "build_latent_records",
    "latent_cache_info",
    "open_latent_source",
    "read_records_info",
    "record_dtype",
]

log = logging.getLogger("diffjax")

RECORDS_FORMAT = "diffjax.latent_records"
RECORDS_VERSION = 1
RECORDS_META_FILE = "meta.json"
# group_size:1 puts each record in its own chunk (random access reads one example); float latents
# hardly compress, so they are stored uncompressed.
RECORDS_WRITER_OPTIONS = "group_size:1,uncompressed"
RECORDS_READER_OPTIONS = "readahead_buffer_size:0"


@dataclasses.dataclass(frozen=True)
class LatentSource:
    """One split of a latent cache in memory: read(indices) -> (latents float32, labels int32)."""

    latents: np.ndarray
    flipped: np.ndarray | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.latents)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.latents[indices], self.labels[indices]

    def read_flipped(self, indices: np.ndarray, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latents of the flipped image where `flips` is set (the cache must hold them)."""
        if self.flipped is None:
            raise ValueError("random_flip=True needs a latent cache built with flips=True")
        out = np.where(flips[:, None, None, None], self.flipped[indices], self.latents[indices])
        return out, self.labels[indices]


def _encode_batch(source, indices: np.ndarray, encode: Callable, flips: bool):
    """(latents, latents of the flipped images or None, int32 labels) of source's examples `indices`."""
    images, labels = source.read(indices)
    x = images.astype(np.float32) / 127.5 - 1.0
    latents = np.asarray(encode(x), np.float32)
    flipped = np.asarray(encode(np.ascontiguousarray(x[:, :, ::-1])), np.float32) if flips else None
    return latents, flipped, np.asarray(labels, np.int32)


def build_latent_cache(
    splits: dict,
    encode: Callable[[np.ndarray], np.ndarray],
    path: str | os.PathLike,
    *,
    num_classes: int,
    batch_size: int = 256,
    flips: bool = True,
    meta: dict | None = None,
) -> str:
    """Encode image sources {split: source} (`len(source)`, `source.read(indices) -> (uint8 images,
    labels)`) into the latent cache `path` (see the module docstring); returns the path. `meta`
    (JSON-able, e.g. the autoencoder's config and scaling factor) is stored beside the latents."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    arrays: dict[str, np.ndarray] = {}
    for split, source in splits.items():
        parts, flipped, labels = [], [], []
        for start in tqdm(range(0, len(source), batch_size), desc=f"encoding {split}", leave=False):
            z, z_flipped, y = _encode_batch(
                source, np.arange(start, min(start + batch_size, len(source))), encode, flips
            )
            parts.append(z)
            if flips:
                flipped.append(z_flipped)
            labels.append(y)
        arrays[f"latents_{split}"] = np.concatenate(parts)
        arrays[f"labels_{split}"] = np.concatenate(labels)
        if flips:
            arrays[f"flipped_{split}"] = np.concatenate(flipped)
    info = {"meta": meta or {}, "num_classes": int(num_classes)}
    arrays["meta"] = np.frombuffer(json.dumps(info).encode(), np.uint8)

    def write(f):
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        f.write(buffer.getvalue())

    return atomic_write(path, write)


def latent_cache_info(path: str | os.PathLike) -> tuple[tuple[int, int, int], dict[str, int], int, dict]:
    """(latent shape (h, w, c), examples per split, num_classes, meta) of an npz cache (from its
    headers) or a records directory (from meta.json; raises if a shard is missing)."""
    path = Path(path)
    if path.is_dir():
        info = read_records_info(path)
        counts = {split: entry["count"] for split, entry in info["splits"].items()}
        return tuple(info["shape"]), counts, int(info["num_classes"]), info["meta"]
    with zipfile.ZipFile(path) as zf:
        names = [n[: -len(".npy")] for n in zf.namelist()]
        shapes = {}
        for name in names:
            if name.startswith("latents_"):
                with zf.open(name + ".npy") as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = (
                        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    )
                    shape, _, _ = read_header(f)
                shapes[name[len("latents_") :]] = shape
    if not shapes or "meta" not in names:
        raise ValueError(f"{str(path)!r} is not a latent cache (no latents_<split> arrays and meta)")
    with np.load(path) as z:
        info = json.loads(z["meta"].tobytes().decode())
    shape_set = {s[1:] for s in shapes.values()}
    if len(shape_set) != 1:
        raise ValueError(f"{str(path)!r}: splits have different latent shapes {sorted(shape_set)}")
    return shape_set.pop(), {k: s[0] for k, s in shapes.items()}, int(info.get("num_classes", 0)), info.get("meta", {})


def open_latent_source(path: str | os.PathLike, split: str, num_classes: int) -> LatentSource | LatentRecordSource:
    """A split of the cache: an npz's in memory, a records directory's read by index; with
    num_classes=0 all labels are 0."""
    if Path(path).is_dir():
        return LatentRecordSource(path, split, num_classes)
    with np.load(path) as z:
        if f"latents_{split}" not in z.files:
            raise ValueError(f"{str(path)!r} has no split {split!r}")
        latents = z[f"latents_{split}"]
        flipped = z[f"flipped_{split}"] if f"flipped_{split}" in z.files else None
        labels = z[f"labels_{split}"] if num_classes else np.zeros(len(latents), np.int32)
    return LatentSource(latents, flipped, labels.astype(np.int32))


# ---------------------------------------------------------------------------------------------------
# The records directory: meta.json and array_record shards.


def record_dtype(shape, flips: bool) -> np.dtype:
    """One example's record: latents float32 `shape`, flipped latents (with flips), label int32."""
    shape = tuple(int(d) for d in shape)
    fields = [("latents", "<f4", shape)] + ([("flipped", "<f4", shape)] if flips else []) + [("label", "<i4")]
    return np.dtype(fields)


def _shard_plan(counts: dict[str, int], examples_per_shard: int) -> dict:
    plan = {}
    for split, count in counts.items():
        starts = list(range(0, count, examples_per_shard))
        shards = [
            {
                "file": f"{split}-{i:05d}-of-{len(starts):05d}.array_record",
                "start": start,
                "stop": min(start + examples_per_shard, count),
            }
            for i, start in enumerate(starts)
        ]
        plan[split] = {"count": count, "shards": shards}
    return plan


def read_records_info(directory: str | os.PathLike, *, check_shards: bool = True) -> dict:
    """A records directory's meta.json; with check_shards, raises FileNotFoundError naming the shards
    that are not (yet) there."""
    directory = Path(directory)
    meta_path = directory / RECORDS_META_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"latent records directory {str(directory)!r} does not exist")
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} is not a latent records directory: it has no {RECORDS_META_FILE} "
            "(build_latent_records' process 0 writes it)"
        )
    try:
        info = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(meta_path)!r} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format") != RECORDS_FORMAT:
        raise ValueError(f"{str(meta_path)!r} is not a latent records meta.json (format {RECORDS_FORMAT!r})")
    if info.get("version") != RECORDS_VERSION:
        raise ValueError(
            f"{str(meta_path)!r} has format version {info.get('version')!r}; "
            f"this diffjax reads version {RECORDS_VERSION}"
        )
    if check_shards:
        files = [shard["file"] for entry in info["splits"].values() for shard in entry["shards"]]
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"latent records {str(directory)!r} are incomplete: {len(missing)} of {len(files)} shards missing "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); run build_latent_records "
                "again (on every process) to finish them"
            )
    return info


class LatentRecordSource:
    """One split of a records directory, read by index: read(indices) -> (latents float32, labels
    int32), read_flipped(indices, flips). Opens each shard when first read; picklable (readers are
    reopened after unpickling)."""

    def __init__(self, directory: str | os.PathLike, split: str, num_classes: int):
        info = read_records_info(directory)
        if split not in info["splits"]:
            raise ValueError(f"{str(directory)!r} has no split {split!r}; splits are {sorted(info['splits'])}")
        self.directory = str(directory)
        self.split = split
        self.num_classes = int(num_classes)
        self.flips = bool(info["flips"])
        self.dtype = record_dtype(info["shape"], self.flips)
        shards = info["splits"][split]["shards"]
        self.count = int(info["splits"][split]["count"])
        self._paths = [os.path.join(self.directory, shard["file"]) for shard in shards]
        self._starts = np.array([shard["start"] for shard in shards], np.int64)
        self._readers: dict[int, ArrayRecordReader] = {}
        for i, shard in enumerate(shards):
            records = self._reader(i).num_records()
            if records != shard["stop"] - shard["start"]:
                raise ValueError(
                    f"latent records shard {self._paths[i]!r} holds {records} records; meta.json plans "
                    f"{shard['stop'] - shard['start']}"
                )

    def __len__(self) -> int:
        return self.count

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_readers"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._readers = {}

    def _reader(self, shard: int) -> ArrayRecordReader:
        if shard not in self._readers:
            self._readers[shard] = ArrayRecordReader(self._paths[shard], RECORDS_READER_OPTIONS)
        return self._readers[shard]

    def records(self, indices) -> np.ndarray:
        """The examples `indices` as a structured array of record_dtype (in the order asked)."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.count):
            raise IndexError(f"indices must be in [0, {self.count}) for split {self.split!r}, got {indices}")
        out = np.empty(len(indices), self.dtype)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        for shard in np.unique(shard_of):
            chosen = shard_of == shard
            raw = self._reader(int(shard)).read((indices[chosen] - self._starts[shard]).tolist())
            out[chosen] = np.frombuffer(b"".join(raw), self.dtype)
        return out

    def _labels(self, records: np.ndarray) -> np.ndarray:
        return records["label"].astype(np.int32) if self.num_classes else np.zeros(len(records), np.int32)

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        records = self.records(indices)
        return np.ascontiguousarray(records["latents"]), self._labels(records)

    def read_flipped(self, indices, flips) -> tuple[np.ndarray, np.ndarray]:
        """Latents of the flipped image where `flips` is set (the records must hold them)."""
        if not self.flips:
            raise ValueError(
                f"random_flip=True needs latent records built with flips=True; {self.directory!r} has none"
            )
        records = self.records(indices)
        flips = np.asarray(flips, bool)[:, None, None, None]
        return np.where(flips, records["flipped"], records["latents"]), self._labels(records)


@dataclasses.dataclass(frozen=True)
class RecordsBuild:
    """What one build_latent_records call did: the shards it wrote and those it found done."""

    directory: str
    written: tuple[str, ...]
    skipped: tuple[str, ...]


def _probe_shape(splits: dict, encode: Callable, batch_size: int) -> tuple[int, ...]:
    source = next((s for s in splits.values() if len(s)), None)
    if source is None:
        raise ValueError("build_latent_records needs at least one example; every split is empty")
    latents, _, _ = _encode_batch(source, np.arange(min(batch_size, len(source))), encode, False)
    return tuple(int(d) for d in latents.shape[1:])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_shard(path: Path, source, start: int, stop: int, encode: Callable, batch_size: int, dtype, flips) -> None:
    """Encode examples [start, stop) into the shard `path`, through a hidden temporary file renamed
    when complete (an error or interruption leaves no file under `path`)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # left by a killed run (only this shard's process writes it)
    writer = ArrayRecordWriter(str(tmp), RECORDS_WRITER_OPTIONS)
    try:
        for begin in range(start, stop, batch_size):
            latents, flipped, labels = _encode_batch(
                source, np.arange(begin, min(begin + batch_size, stop)), encode, flips
            )
            if latents.shape[1:] != dtype["latents"].shape:
                raise ValueError(
                    f"encode gave latents of shape {latents.shape[1:]} for examples {begin}.. of {path.name}; "
                    f"the records hold {dtype['latents'].shape}"
                )
            records = np.empty(len(latents), dtype)
            records["latents"] = latents
            if flips:
                records["flipped"] = flipped
            records["label"] = labels
            for record in records:
                writer.write(record.tobytes())
        writer.close()
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if writer.is_open():
            writer.close()
        tmp.unlink(missing_ok=True)
        raise


def build_latent_records(
    splits: dict,
    encode: Callable[[np.ndarray], np.ndarray],
    directory: str | os.PathLike,
    *,
    num_classes: int,
    process_index: int | None = None,
    process_count: int | None = None,
    examples_per_shard: int = 10_000,
    batch_size: int = 256,
    flips: bool = True,
    meta: dict | None = None,
) -> RecordsBuild:
    """Encode image sources {split: source} (as build_latent_cache) into the records directory
    `directory` (see the module docstring), this process's shards only (process_index /
    process_count default to jax's). Shards already there are skipped (resume); meta.json, written
    by process 0, must match what an earlier run planned there. Returns what was written and skipped."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    check_count("process_count", process_count)
    check_count("process_index", process_index, minimum=0)
    if process_index >= process_count:
        raise ValueError(f"process_index must be < process_count = {process_count}, got {process_index}")
    check_count("examples_per_shard", examples_per_shard)
    check_count("batch_size", batch_size)
    check_count("num_classes", num_classes, minimum=0)
    for split in splits:
        if not split or "/" in split or split.startswith("."):
            raise ValueError(f"split names become file names: {split!r} is not allowed")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / RECORDS_META_FILE
    existing = read_records_info(directory, check_shards=False) if meta_path.exists() else None
    shape = existing["shape"] if existing else _probe_shape(splits, encode, batch_size)
    info = {
        "format": RECORDS_FORMAT,
        "version": RECORDS_VERSION,
        "shape": list(shape),
        "flips": bool(flips),
        "num_classes": int(num_classes),
        "examples_per_shard": int(examples_per_shard),
        "record": "latents float32 (shape) [, flipped float32 (shape)], label int32; little-endian",
        "splits": _shard_plan({split: len(source) for split, source in splits.items()}, examples_per_shard),
        "meta": meta or {},
    }
    info = json.loads(json.dumps(info))  # as meta.json reads back
    if existing is not None and existing != info:
        differ = sorted(k for k in set(info) | set(existing) if info.get(k) != existing.get(k))
        raise ValueError(
            f"{str(meta_path)!r} plans a different latent cache (differs in {differ}): build into a new "
            "directory, or delete this one to rebuild it"
        )
    if existing is None and process_index == 0:
        atomic_write_json(meta_path, info)
    dtype = record_dtype(shape, flips)
    shards = [(split, shard) for split, entry in info["splits"].items() for shard in entry["shards"]]
    mine = shards[process_index::process_count]
    written, skipped = [], []
    for split, shard in tqdm(mine, desc=f"latent shards (process {process_index})", unit="shard", leave=False):
        path = directory / shard["file"]
        if path.is_file():
            skipped.append(shard["file"])
            continue
        _write_shard(path, splits[split], shard["start"], shard["stop"], encode, batch_size, dtype, flips)
        written.append(shard["file"])
    log.info(
        "latent records %s: process %d of %d wrote %d shards, skipped %d already done (of %d in all)",
        directory,
        process_index,
        process_count,
        len(written),
        len(skipped),
        len(shards),
    )
    return RecordsBuild(str(directory), tuple(written), tuple(skipped))
