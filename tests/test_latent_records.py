"""The sharded latent cache (a directory of array_record shards, diffjax.data.latents.build_latent_records):
equal to the npz cache example by example, split over processes, resumable, crash-safe, and read by
the data pipeline and a latent run's iterator."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from sklearn.datasets import load_digits

from configs import dit_latents
from diffjax.data import base_data_config, dataset_info, make_iterator
from diffjax.data.latents import (
    LatentRecordSource,
    build_latent_cache,
    build_latent_records,
    latent_cache_info,
    open_latent_source,
)
from diffjax.data.sources import ArraySource
from diffjax.training import loop
from diffjax.training.discrete_run import make_run_iterator
from diffjax.training.latents import autoencoder_file
from diffjax.training.run import init_state, make_jitted_train_step
from diffjax.training.sharding import global_batch

SHARD = 8  # examples per shard: train (50) -> 7 shards, the last of 2; test (13) -> 2 shards
META = {"autoencoder": {"path": "/moved/away/autoencoder.npz"}, "scaling_factor": 0.5}


def digit_splits():
    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = data.target.astype(np.int32)
    return {"train": ArraySource(images[:50], labels[:50]), "test": ArraySource(images[50:63], labels[50:63])}


def encode(images):
    """A stand-in encoder, 8x8x1 -> 4x4x2, not symmetric: flipped images give other latents."""
    return np.concatenate([images[:, ::2, ::2], 0.5 * images[:, 1::2, ::2] + 0.25], axis=-1)


def build(directory, **options):
    return build_latent_records(
        digit_splits(), encode, directory, num_classes=10, examples_per_shard=SHARD, batch_size=5, meta=META, **options
    )


def shard_bytes(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """(npz cache, records directory) of the same digits, with flips."""
    root = tmp_path_factory.mktemp("latent_records")
    npz = build_latent_cache(digit_splits(), encode, root / "latents.npz", num_classes=10, flips=True, meta=META)
    result = build(root / "records")
    assert len(result.written) == 9 and result.skipped == ()
    return npz, root / "records"


def test_records_equal_the_npz_cache_example_by_example(caches):
    npz, records = caches
    assert latent_cache_info(records) == latent_cache_info(npz) == ((4, 4, 2), {"train": 50, "test": 13}, 10, META)
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("test", 13)):
        a, b = open_latent_source(npz, split, 10), open_latent_source(records, split, 10)
        assert isinstance(b, LatentRecordSource) and len(a) == len(b) == n
        order = rng.permutation(n)  # random access across shards, in any order
        for x, y in zip(a.read(order), b.read(order)):
            np.testing.assert_array_equal(x, y)
        flips = rng.random(n) < 0.5
        for x, y in zip(a.read_flipped(order, flips), b.read_flipped(order, flips)):
            np.testing.assert_array_equal(x, y)
        latents, _ = b.read_flipped(order, flips)
        assert not np.array_equal(latents[flips], a.latents[order][flips])  # the flipped latents differ
    restored = pickle.loads(pickle.dumps(b))  # as grain workers get it: the readers reopen
    np.testing.assert_array_equal(restored.read(order)[0], b.read(order)[0])
    unlabelled = open_latent_source(records, "train", 0)
    assert np.all(unlabelled.read(np.arange(50))[1] == 0)
    with pytest.raises(IndexError, match="50"):
        b.read([50])


def test_the_pipeline_reads_records_as_it_reads_the_npz(caches):
    batches = []
    for path in caches:
        config = base_data_config()
        config.update(source="latents", path=str(path), image_size=4, channels=2, num_classes=10, random_flip=True)
        iterator = make_iterator(config, split="train", global_batch_size=16, seed=3)
        batches.append([next(iterator) for _ in range(4)])  # past an epoch: shuffled over all shards
    for a, b in zip(*batches):
        assert a.keys() == b.keys() and a["image"].shape == (16, 4, 4, 2)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_processes_write_disjoint_shards_that_make_the_same_cache(caches, tmp_path):
    _, single = caches
    second = build(tmp_path, process_index=1, process_count=2)  # before process 0: meta.json is process 0's
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        latent_cache_info(tmp_path)
    first = build(tmp_path, process_index=0, process_count=2)
    assert not set(first.written) & set(second.written)
    assert len(first.written) == 5 and len(second.written) == 4  # shards 0, 2, 4, 6, 8 and 1, 3, 5, 7
    assert shard_bytes(tmp_path) == shard_bytes(single)  # meta.json and every shard, byte for byte


def test_a_rerun_skips_finished_shards_and_rebuilds_a_missing_one(caches, tmp_path):
    _, single = caches
    shutil.copytree(single, tmp_path / "records")
    os.remove(tmp_path / "records" / "train-00003-of-00007.array_record")
    with pytest.raises(FileNotFoundError, match="1 of 9 shards missing.*train-00003-of-00007"):
        latent_cache_info(tmp_path / "records")
    result = build(tmp_path / "records")
    assert result.written == ("train-00003-of-00007.array_record",) and len(result.skipped) == 8
    assert shard_bytes(tmp_path / "records") == shard_bytes(single)


def test_an_interrupted_build_leaves_no_partial_shard_and_resumes(caches, tmp_path):
    _, single = caches
    calls = []

    def failing(images):
        calls.append(len(images))
        # 1 shape probe, then 4 calls a shard (batches of 5 and 3, each with flips): mid-shard 2 (train 16..23)
        if len(calls) == 11:
            raise KeyboardInterrupt
        return encode(images)

    with pytest.raises(KeyboardInterrupt):
        build_latent_records(
            digit_splits(), failing, tmp_path, num_classes=10, examples_per_shard=SHARD, batch_size=5, meta=META
        )
    assert sorted(os.listdir(tmp_path)) == [
        "meta.json",
        "train-00000-of-00007.array_record",
        "train-00001-of-00007.array_record",
    ]
    with pytest.raises(FileNotFoundError, match="7 of 9 shards missing"):
        open_latent_source(tmp_path, "train", 10)
    result = build(tmp_path)
    assert len(result.skipped) == 2 and len(result.written) == 7
    assert shard_bytes(tmp_path) == shard_bytes(single)


def test_bad_records_are_named(caches, tmp_path):
    npz, single = caches
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_latent_source(tmp_path / "nowhere", "train", 10)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        latent_cache_info(tmp_path)
    with pytest.raises(ValueError, match="no split 'valid'"):
        open_latent_source(single, "valid", 10)
    with pytest.raises(ValueError, match=r"differs in \['examples_per_shard', 'splits'\]"):
        build_latent_records(digit_splits(), encode, single, num_classes=10, examples_per_shard=16, meta=META)
    with pytest.raises(ValueError, match="process_index must be < process_count"):
        build(tmp_path / "new", process_index=2, process_count=2)
    copy = tmp_path / "copy"
    shutil.copytree(single, copy)
    shutil.copy(copy / "train-00006-of-00007.array_record", copy / "train-00005-of-00007.array_record")
    with pytest.raises(ValueError, match="train-00005-of-00007.array_record' holds 2 records; meta.json plans 8"):
        open_latent_source(copy, "train", 10)
    info = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**info, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        latent_cache_info(copy)
    no_flips = build_latent_records(
        digit_splits(), encode, tmp_path / "noflips2", num_classes=10, examples_per_shard=64, flips=False
    )
    with pytest.raises(ValueError, match="flips=True"):
        open_latent_source(no_flips.directory, "test", 10).read_flipped(np.arange(2), np.ones(2, bool))
    config = base_data_config()
    config.update(source="latents", path=str(tmp_path / "absent"), image_size=4, channels=2)
    with pytest.raises(FileNotFoundError, match="build_latent_records"):
        dataset_info(config)


def test_the_autoencoder_is_found_inside_or_beside_a_moved_records_directory(caches, tmp_path):
    records = tmp_path / "data" / "records"
    shutil.copytree(caches[1], records)
    config = base_data_config()
    config.update(source="latents", path=str(records), image_size=4, channels=2)
    assert autoencoder_file(config) is None  # the meta's path is gone and no file of its name is near
    (tmp_path / "data" / "autoencoder.npz").write_bytes(b"beside")
    assert autoencoder_file(config) == str(tmp_path / "data" / "autoencoder.npz")
    (records / "autoencoder.npz").write_bytes(b"inside")
    assert autoencoder_file(config) == str(records / "autoencoder.npz")


def latent_run_config(path):
    config = dit_latents.get_config("mnist_tiny")
    config.data.update(path=str(path), image_size=4, random_flip=True)
    config.model.overrides.update(hidden_size=16, depth=1, num_heads=2, frequency_embedding_size=16)
    config.train.update(num_steps=1, batch_size=8, progress_bar=False)
    return config


def test_a_latent_run_iterates_the_records_as_the_npz(caches):
    batches = []
    for path in caches:
        iterator = make_run_iterator(
            latent_run_config(path), split="train", global_batch_size=8, seed=0, process_index=1, process_count=2
        )
        batches.append(next(iterator))
    assert batches[0]["image"].shape == (4, 4, 4, 2)  # this host's half
    for key in batches[0]:
        np.testing.assert_array_equal(batches[0][key], batches[1][key])


@pytest.mark.slow  # ~15 s, compiling the train step
def test_one_train_step_on_records(caches, tmp_path):
    config = latent_run_config(caches[1])
    run = loop.prepare_run(config, str(tmp_path))
    batch = next(
        make_run_iterator(config, split="train", global_batch_size=8, seed=0, process_index=0, process_count=1)
    )
    state, metrics = make_jitted_train_step(run)(init_state(run), global_batch(batch, run.mesh))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
