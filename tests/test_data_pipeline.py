"""grain pipeline: host shards, epochs, augmentation, exact resume from saved state."""

import json

import numpy as np
import pytest

import diffjax.data as dd
from diffjax.data import pipeline

NUM_RECORDS = 203  # prime: no batch size divides an epoch


@pytest.fixture(scope="module")
def indexed_npz(tmp_path_factory):
    """Images whose first two pixels spell their record index (little endian), labels = index % 7."""
    path = tmp_path_factory.mktemp("data") / "indexed.npz"
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (NUM_RECORDS, 4, 4), dtype=np.uint8)
    index = np.arange(NUM_RECORDS)
    images[:, 0, 0], images[:, 0, 1] = index % 256, index // 256
    np.savez(path, x_train=images, y_train=index % 7)
    return path


def _config(path, **overrides):
    config = dd.base_data_config()
    config.update(source="npz", path=str(path), image_size=4, channels=1, num_classes=7, in_memory=True, **overrides)
    return config


def _record_ids(batch):
    pixels = np.round((batch["image"][:, 0, :2, 0] + 1) * 127.5).astype(np.int64)
    return pixels[:, 0] + 256 * pixels[:, 1]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_two_hosts_see_disjoint_shards_covering_an_epoch(indexed_npz):
    config = _config(indexed_npz)
    seen = []
    for host in (0, 1):
        iterator = dd.make_iterator(
            config,
            split="train",
            global_batch_size=16,
            seed=5,
            process_index=host,
            process_count=2,
            num_epochs=1,
            drop_remainder=False,
        )
        batches = list(iterator)
        assert len(batches) == -(-NUM_RECORDS // 16)
        assert all(b["image"].shape == (8, 4, 4, 1) for b in batches)
        seen.append(np.concatenate([_record_ids(b)[b["mask"]] for b in batches]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(NUM_RECORDS))


def test_host_batches_concatenate_to_the_single_host_batch(indexed_npz):
    """With flips and dequantization on: randomness is per example, so host count does not matter."""
    config = _config(indexed_npz, random_flip=True, dequantize=True)
    single = _take(dd.make_iterator(config, split="train", global_batch_size=24, seed=3), 20)
    hosts = [
        _take(
            dd.make_iterator(config, split="train", global_batch_size=24, seed=3, process_index=h, process_count=3), 20
        )
        for h in range(3)
    ]
    for step, batch in enumerate(single):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([h[step][key] for h in hosts]), batch[key])
        assert batch["image"].shape == (24, 4, 4, 1) and hosts[0][step]["image"].shape == (8, 4, 4, 1)


def test_every_epoch_is_a_new_permutation(indexed_npz):
    config = _config(indexed_npz)
    iterator = dd.make_iterator(config, split="train", global_batch_size=NUM_RECORDS, seed=0)
    epochs = [_record_ids(b) for b in _take(iterator, 3)]
    for ids in epochs:
        assert sorted(ids) == list(range(NUM_RECORDS))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    unshuffled = dd.make_iterator(config, split="train", global_batch_size=NUM_RECORDS, seed=0, shuffle=False)
    np.testing.assert_array_equal(_record_ids(next(unshuffled)), np.arange(NUM_RECORDS))


def test_seed_changes_order_and_same_seed_repeats(indexed_npz):
    config = _config(indexed_npz)

    def run(seed):
        return _record_ids(next(dd.make_iterator(config, split="train", global_batch_size=50, seed=seed)))

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_batches_straddle_epochs_without_losing_examples(indexed_npz):
    """Endless stream: the first 2n positions are two full epochs even though 32 does not divide n."""
    config = _config(indexed_npz)
    ids = np.concatenate(
        [
            _record_ids(b)
            for b in _take(
                dd.make_iterator(config, split="train", global_batch_size=32, seed=9), -(-2 * NUM_RECORDS // 32)
            )
        ]
    )
    assert sorted(ids[:NUM_RECORDS]) == list(range(NUM_RECORDS))
    assert sorted(ids[NUM_RECORDS : 2 * NUM_RECORDS]) == list(range(NUM_RECORDS))


def test_finite_stream_lengths_and_mask(indexed_npz):
    config = _config(indexed_npz)
    kept = list(dd.make_iterator(config, split="train", global_batch_size=32, seed=0, num_epochs=2))
    assert len(kept) == 2 * NUM_RECORDS // 32 and "mask" not in kept[0]
    padded = list(
        dd.make_iterator(config, split="train", global_batch_size=32, seed=0, num_epochs=2, drop_remainder=False)
    )
    assert len(padded) == -(-2 * NUM_RECORDS // 32)
    assert sum(int(b["mask"].sum()) for b in padded) == 2 * NUM_RECORDS
    assert padded[-1]["mask"].sum() == 2 * NUM_RECORDS % 32


@pytest.mark.parametrize("worker_count", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_from_saved_state_is_exact(indexed_npz, worker_count):
    """Interrupted after 5 batches, restored from its saved state: batches 6..12 are the uninterrupted
    ones. The reference runs in-process, so worker processes must not change the batches either."""
    uninterrupted = _take(
        dd.make_iterator(
            _config(indexed_npz, random_flip=True, dequantize=True), split="train", global_batch_size=30, seed=11
        ),
        12,
    )
    config = _config(indexed_npz, random_flip=True, dequantize=True, worker_count=worker_count)
    make = lambda: dd.make_iterator(config, split="train", global_batch_size=30, seed=11)
    interrupted = make()
    first = _take(interrupted, 5)
    saved = json.loads(json.dumps(interrupted.get_state()))  # as written to a checkpoint
    interrupted.close()
    resumed = make()
    resumed.set_state(saved)
    _assert_same_batches(first + _take(resumed, 7), uninterrupted)
    resumed.close()


def test_resume_with_other_host_count_gives_the_same_global_batches(indexed_npz):
    config = _config(indexed_npz, random_flip=True)
    one_host = dd.make_iterator(config, split="train", global_batch_size=20, seed=4)
    _take(one_host, 3)
    state = one_host.get_state()
    want = _take(one_host, 2)
    parts = []
    for host in (0, 1):
        iterator = dd.make_iterator(
            config, split="train", global_batch_size=20, seed=4, process_index=host, process_count=2
        )
        iterator.set_state(state)
        parts.append(_take(iterator, 2))
    for step in range(2):
        np.testing.assert_array_equal(np.concatenate([p[step]["image"] for p in parts]), want[step]["image"])


def test_state_from_another_pipeline_is_rejected(indexed_npz):
    config = _config(indexed_npz)
    state = dd.make_iterator(config, split="train", global_batch_size=8, seed=0).get_state()
    other = dd.make_iterator(config, split="train", global_batch_size=8, seed=1)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)
    with pytest.raises(ValueError, match="not a diffjax input iterator state"):
        other.set_state({"next_index": 3})


def test_orbax_checkpoint_round_trip(indexed_npz, tmp_path):
    """The trainer's way: the iterator goes into the orbax checkpoint through grain's handler."""
    grain = pytest.importorskip("grain")
    ocp = pytest.importorskip("orbax.checkpoint")
    config = _config(indexed_npz, dequantize=True)
    make = lambda: dd.make_iterator(config, split="train", global_batch_size=16, seed=2)
    iterator = make()
    _take(iterator, 4)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    want = _take(iterator, 2)
    restored = make()
    manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same_batches(_take(restored, 2), want)
    manager.close()


def test_augment_scaling_flip_and_dequantization():
    images = np.arange(2 * 2 * 3 * 1, dtype=np.uint8).reshape(2, 2, 3, 1) * 20
    images[0, 0, 0, 0], images[1, 0, 0, 0] = 0, 255
    plain = pipeline.augment(images, np.arange(2), seed=0, random_flip=False, dequantize=False)
    np.testing.assert_allclose(plain, images / 127.5 - 1, atol=1e-6)
    assert plain.dtype == np.float32 and plain.min() == -1.0 and plain.max() == 1.0
    positions = np.arange(400)
    many = np.repeat(images[:1], 400, axis=0)
    flipped = pipeline.augment(many, positions, seed=0, random_flip=True, dequantize=False)
    as_flipped = (many[:, :, ::-1] / 127.5 - 1).astype(np.float32)
    is_flipped = np.all(np.isclose(flipped, as_flipped, atol=1e-6), axis=(1, 2, 3))
    is_plain = np.all(np.isclose(flipped, many / 127.5 - 1, atol=1e-6), axis=(1, 2, 3))
    assert np.all(is_flipped ^ is_plain)
    assert 150 < is_flipped.sum() < 250
    noisy = pipeline.augment(many, positions, seed=0, random_flip=False, dequantize=True)
    units = (noisy.astype(np.float64) + 1) * 128  # x + u, up to float32 rounding
    assert np.all(units >= many - 1e-4) and np.all(units <= many + 1 + 1e-4)
    assert len(np.unique(noisy[:, 0, 0, 0])) == len(noisy)  # every example draws its own noise
    assert abs(float((units - many).mean()) - 0.5) < 0.02
    np.testing.assert_array_equal(noisy, pipeline.augment(many, positions, seed=0, random_flip=False, dequantize=True))
    assert not np.array_equal(noisy, pipeline.augment(many, positions, seed=1, random_flip=False, dequantize=True))


def test_batch_plan_positions_are_host_blocks():
    plan = pipeline.BatchPlan(num_records=10, global_batch_size=6, seed=0, process_index=1, process_count=3)
    np.testing.assert_array_equal(plan.positions(0), [2, 3])
    np.testing.assert_array_equal(plan.positions(2), [14, 15])
    records, valid = plan.records(plan.positions(2))
    assert valid.all()
    np.testing.assert_array_equal(records, pipeline.epoch_order(10, 0, 1, True)[[4, 5]])
