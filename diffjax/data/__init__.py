"""diffjax.data: TFDS builders without TensorFlow, grain input pipelines, presets of real data sets.

Public API:

    default_data_config(name) -> ConfigDict        presets "digits", "mnist", "fashion_mnist", "cifar10"
    DATA_KEYS                                      every key: (type, default, meaning)
    base_data_config() -> ConfigDict               every key with its default (see diffjax.data.config)
    validate_data_config(config) -> ConfigDict     checked, complete copy
    dataset_info(config) -> DataInfo               image_shape, source_shape, num_examples, num_classes
    make_iterator(config, *, split, global_batch_size, seed, process_index=0, process_count=1,
                  shuffle=True, num_epochs=None, drop_remainder=True) -> InputIterator
    prepare(config) -> str                         prepare a local source as TFDS data; its TFDS name

An `InputIterator` yields this host's batch {"image": float32 (B, S, S, C) in [-1, 1], "label": int32 (B,)}
with B = global_batch_size // process_count. Save `iterator.get_state()` (a small JSON-able dict, equal
on every host) with each checkpoint and call `iterator.set_state(state)` on a fresh iterator built from
the same config, split, seed and global batch size to continue with exactly the batches an
uninterrupted run would have seen. With orbax, either store it as JSON
(`ocp.args.JsonSave(iterator.get_state())` / `ocp.args.JsonRestore()`) or hand the iterator itself to
`grain.checkpoint.CheckpointSave(iterator)` / `grain.checkpoint.CheckpointRestore(iterator)`.
"""

from diffjax.data import builders
from diffjax.data.builders import Idx, ImageArchive, Npz
from diffjax.data.config import (
    CUSTOM,
    DATA_KEYS,
    PRESETS,
    SOURCES,
    base_data_config,
    default_data_config,
    shared_data_dir,
    validate_data_config,
)
from diffjax.data.pipeline import InputIterator, make_iterator
from diffjax.data.sources import DataInfo, dataset_info, open_source


def prepare(data_config) -> str:
    """Prepares a local source (npz, idx, image_tar, image_folder) as array_record TFDS data in the
    config's data_dir, once; returns the TFDS name to read it with `tfds.data_source(name, data_dir=...)`."""
    config = validate_data_config(data_config)
    if config.source not in builders.LOCAL_SOURCES:
        raise ValueError(f"prepare() is for local sources {builders.LOCAL_SOURCES}; source is {config.source!r}")
    dataset_info(config)  # checks the config against the data before the work
    return builders.build_array_record(
        config.source, config.path, config.channels, config.data_dir or builders.default_data_dir()
    )


__all__ = [
    "CUSTOM",
    "DATA_KEYS",
    "PRESETS",
    "SOURCES",
    "DataInfo",
    "Idx",
    "ImageArchive",
    "InputIterator",
    "Npz",
    "base_data_config",
    "dataset_info",
    "default_data_config",
    "make_iterator",
    "open_source",
    "prepare",
    "shared_data_dir",
    "validate_data_config",
]
