"""The grain input pipeline: global shuffle, per-host shards, decode, augment, batch, prefetch, resume.

The examples of a split form one global stream over epochs: epoch e is a permutation of the split drawn
from (seed, e) (or the identity with shuffle=False), and stream position p holds record
order_e[p mod n] with e = p div n. Global batch j is positions [j G, (j + 1) G); host h of k takes the
contiguous block [j G + h B, j G + (h + 1) B) with B = G / k. Hence

- the hosts' batches are disjoint and together are exactly the global batch; concatenated in host
  order they are the batch a single host with batch G would see, so results do not depend on the
  number of hosts;
- each epoch visits every example once (drop_remainder only ends a finite stream early);
- augmentation randomness is drawn per example from (seed, p) with a Philox generator, so it does not
  depend on batch size, host count, worker count or prefetching.

Per host batch: read the B records (one batched array_record read), decode and fit them
(`diffjax.data.sources`), flip each horizontally with probability 1/2 (random_flip), and scale to
[-1, 1]: x / 127.5 - 1, or with dequantize (x + u) / 128 - 1, u ~ U[0, 1)^D.
Each host batch is one grain element; ``worker_count`` processes (grain ``mp_prefetch``) or
``num_threads`` threads compute batches ahead.

The iterator's state is the index of the next global batch plus a description of the pipeline, the
same on every host: restoring it gives exactly the batches an uninterrupted run would have given, also
with a different number of hosts or workers.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import grain
import numpy as np
from absl import flags

from diffjax.data import sources
from diffjax.data.config import validate_data_config
from diffjax.data.latents import LatentRecordSource, LatentSource

STATE_VERSION = 1


@functools.lru_cache(maxsize=4)
def epoch_order(num_records: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The record order of one epoch: a permutation drawn from (seed, epoch), or the identity."""
    if not shuffle:
        return np.arange(num_records)
    return np.random.default_rng([seed, epoch]).permutation(num_records)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which records go into which host batch (see the module docstring)."""

    num_records: int
    global_batch_size: int
    seed: int
    process_index: int = 0
    process_count: int = 1
    shuffle: bool = True
    num_epochs: int | None = None
    drop_remainder: bool = True

    @property
    def host_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def num_positions(self) -> int | None:
        return None if self.num_epochs is None else self.num_epochs * self.num_records

    @property
    def num_batches(self) -> int | None:
        """Global batches in the stream (None: endless); a partial last batch counts if kept."""
        total = self.num_positions
        if total is None:
            return None
        full, rest = divmod(total, self.global_batch_size)
        return full + (1 if rest and not self.drop_remainder else 0)

    def positions(self, batch_index: int) -> np.ndarray:
        """Stream positions of this host's part of global batch `batch_index`."""
        start = batch_index * self.global_batch_size + self.process_index * self.host_batch_size
        return start + np.arange(self.host_batch_size, dtype=np.int64)

    def records(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(record indices, valid) of stream positions; positions past a finite stream are invalid
        and point at record 0 (padding)."""
        total = self.num_positions
        valid = np.ones(len(positions), bool) if total is None else positions < total
        epochs, offsets = np.divmod(np.where(valid, positions, 0), self.num_records)
        records = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            order = epoch_order(self.num_records, self.seed, int(epoch), self.shuffle)
            records[in_epoch] = order[offsets[in_epoch]]
        return records, valid


def augment(images: np.ndarray, positions: np.ndarray, *, seed: int, random_flip: bool, dequantize: bool) -> np.ndarray:
    """uint8 (B, H, W, C) -> float32 in [-1, 1], with per-example randomness keyed by (seed, position).

    random_flip: horizontal flip with probability 1/2. dequantize: (x + u) / 128 - 1, u ~ U[0, 1)
    (uniform dequantization, e.g. Ho et al. 2019, Flow++), else x / 127.5 - 1.
    """
    out = images.astype(np.float32)
    if random_flip or dequantize:
        flips = np.zeros(len(out), bool)
        noise = np.empty_like(out) if dequantize else None
        for i, position in enumerate(positions):
            rng = np.random.Generator(np.random.Philox(key=[int(position), seed]))
            flips[i] = rng.random() < 0.5  # drawn even without random_flip: the noise stream stays the same
            if dequantize:
                rng.random(dtype=np.float32, out=noise[i])
        if random_flip:
            out[flips] = out[flips][:, :, ::-1]
        if dequantize:
            out += noise
            out /= np.float32(128.0)
            out -= np.float32(1.0)
            return out
    out /= np.float32(127.5)
    out -= np.float32(1.0)
    return out


def flip_draws(positions: np.ndarray, seed: int) -> np.ndarray:
    """The per-example flip decisions of `augment` (the first draw of each example's stream)."""
    return np.array([np.random.Generator(np.random.Philox(key=[int(p), seed])).random() < 0.5 for p in positions], bool)


@dataclasses.dataclass(frozen=True)
class BatchLoader:
    """batch index -> this host's batch {"image", "label"[, "mask"]}; picklable for grain workers."""

    plan: BatchPlan
    source: Any
    random_flip: bool = False
    dequantize: bool = False

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        positions = self.plan.positions(batch_index)
        records, valid = self.plan.records(positions)
        # float latents (an npz's or a records directory's); flips pick the flipped image's latents
        if isinstance(self.source, (LatentSource, LatentRecordSource)):
            flips = flip_draws(positions, self.plan.seed) if self.random_flip else np.zeros(len(records), bool)
            images, labels = self.source.read_flipped(records, flips) if self.random_flip else self.source.read(records)
            batch = {"image": np.asarray(images, np.float32), "label": labels.astype(np.int32)}
        else:
            images, labels = self.source.read(records)
            batch = {
                "image": augment(
                    images, positions, seed=self.plan.seed, random_flip=self.random_flip, dequantize=self.dequantize
                ),
                "label": labels.astype(np.int32),
            }
        if not self.plan.drop_remainder and self.plan.num_epochs is not None:
            batch["mask"] = valid
        return batch


class InputIterator(grain.DatasetIterator):
    """Iterator over host batches with an exact, host-independent state.

    ``get_state()`` -> ``{"version", "next_batch", "pipeline"}`` (JSON-able, equal on every host);
    ``set_state(state)`` continues from that global batch and raises ValueError if the state comes from
    a different pipeline. Being a grain ``DatasetIterator``, it also works with
    ``grain.checkpoint.CheckpointSave/CheckpointRestore`` in an orbax checkpoint.
    """

    def __init__(
        self,
        loader: BatchLoader,
        pipeline: dict[str, Any],
        *,
        num_threads: int = 2,
        prefetch: int = 4,
        worker_count: int = 0,
    ):
        super().__init__()
        self._loader = loader
        self._pipeline = pipeline
        self._read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._worker_count = worker_count
        self._next_batch = 0
        self._inner = None  # started lazily, at the first batch or start_prefetch()

    @property
    def host_batch_size(self) -> int:
        return self._loader.plan.host_batch_size

    @property
    def num_batches(self) -> int | None:
        """Global batches in the whole stream (None: endless)."""
        return self._loader.plan.num_batches

    def _start(self):
        stop = self.num_batches if self.num_batches is not None else sys.maxsize
        dataset = grain.MapDataset.range(self._next_batch, max(self._next_batch, stop)).map(self._loader)
        dataset = dataset.to_iter_dataset(self._read_options)
        if self._worker_count:
            _allow_grain_flag_defaults()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
        return iter(dataset)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self._inner is None:
            self._inner = self._start()
        batch = next(self._inner)
        self._next_batch += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "next_batch": self._next_batch, "pipeline": dict(self._pipeline)}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "next_batch" not in state:
            raise ValueError(f"not a diffjax input iterator state (version {STATE_VERSION}): {state!r:.200}")
        saved = state.get("pipeline", {})
        differing = {k: (saved.get(k), v) for k, v in self._pipeline.items() if saved.get(k) != v}
        if differing:
            raise ValueError(
                "the saved input state is from a different pipeline; (saved, current) values: "
                f"{differing}. Restore with the same data config, split, seed and global batch size."
            )
        self._close_inner()
        self._next_batch = int(state["next_batch"])

    def start_prefetch(self) -> None:
        if self._inner is None:
            self._inner = self._start()
        self._inner.start_prefetch()

    def _close_inner(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None

    def close(self) -> None:
        self._close_inner()
        self._closed = True

    def __str__(self) -> str:
        return f"InputIterator(next_batch={self._next_batch}, pipeline={self._pipeline})"


def _allow_grain_flag_defaults() -> None:
    """grain <= 0.2.18 reads an absl flag in mp_prefetch even outside an absl app, where flags are
    unparsed (google/grain#1355, fixed upstream in #1362). Marking flags parsed keeps their defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def make_iterator(
    data_config,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
) -> InputIterator:
    """This host's batches {"image": float32 (B, S, S, C) in [-1, 1], "label": int32 (B,)}.

    B = global_batch_size // process_count. num_epochs=None streams forever; a finite stream with
    drop_remainder=False pads the last batch and adds "mask" (bool (B,), False on padding) to every
    batch. All arguments are checked before any data is read or prepared.
    """
    config = validate_data_config(data_config)
    _check_int("global_batch_size", global_batch_size, 1)
    _check_int("process_count", process_count, 1)
    _check_int("process_index", process_index, 0)
    _check_int("seed", seed, 0)
    if process_index >= process_count:
        raise ValueError(f"process_index={process_index} must be < process_count={process_count}")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
    if num_epochs is not None:
        _check_int("num_epochs", num_epochs, 1)
    if seed >= 2**63:
        raise ValueError(f"seed must be < 2**63, got {seed}")
    info = sources.dataset_info(config)
    sources.check_split(info, split, config.source)
    plan_records = info.num_examples.get(split)
    if plan_records is not None and num_epochs is not None and drop_remainder:
        if num_epochs * plan_records < global_batch_size:
            raise ValueError(
                f"{num_epochs} epoch(s) of {plan_records} examples hold no full global batch "
                f"of {global_batch_size}; lower the batch size or set drop_remainder=False"
            )
    source = sources.open_source(config, split)
    plan = BatchPlan(
        len(source),
        global_batch_size,
        int(seed),
        int(process_index),
        int(process_count),
        shuffle,
        num_epochs,
        drop_remainder,
    )
    pipeline = dict(
        source=config.source,
        split=split,
        num_records=plan.num_records,
        image_size=config.image_size,
        channels=config.channels,
        resize_method=config.resize_method,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        dequantize=config.dequantize,
        num_classes=config.num_classes,
        seed=int(seed),
        global_batch_size=global_batch_size,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
    )
    loader = BatchLoader(plan, source, config.random_flip, config.dequantize)
    return InputIterator(
        loader, pipeline, num_threads=config.num_threads, prefetch=config.prefetch, worker_count=config.worker_count
    )
