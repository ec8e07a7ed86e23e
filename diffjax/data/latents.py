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
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from diffjax.io import atomic_write

__all__ = ["LatentSource", "build_latent_cache", "latent_cache_info", "open_latent_source"]


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
            images, y = source.read(np.arange(start, min(start + batch_size, len(source))))
            x = images.astype(np.float32) / 127.5 - 1.0
            parts.append(np.asarray(encode(x), np.float32))
            if flips:
                flipped.append(np.asarray(encode(np.ascontiguousarray(x[:, :, ::-1])), np.float32))
            labels.append(np.asarray(y, np.int32))
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
    """(latent shape (h, w, c), examples per split, num_classes, meta) from the cache's headers."""
    path = Path(path)
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


def open_latent_source(path: str | os.PathLike, split: str, num_classes: int) -> LatentSource:
    """A split of the cache in memory; with num_classes=0 all labels are 0."""
    with np.load(path) as z:
        if f"latents_{split}" not in z.files:
            raise ValueError(f"{str(path)!r} has no split {split!r}")
        latents = z[f"latents_{split}"]
        flipped = z[f"flipped_{split}"] if f"flipped_{split}" in z.files else None
        labels = z[f"labels_{split}"] if num_classes else np.zeros(len(latents), np.int32)
    return LatentSource(latents, flipped, labels.astype(np.int32))
