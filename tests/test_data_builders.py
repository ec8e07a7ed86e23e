"""TFDS builders without TensorFlow: exact round trips of small generated folders, tars, idx and npz files."""

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import diffjax.data as dd
from diffjax.data import builders, sources

RNG = np.random.default_rng(0)


def _config(source, path, data_dir, **overrides):
    config = dd.base_data_config()
    config.update(source=source, path=str(path), data_dir=str(data_dir), in_memory=False, **overrides)
    return config


def _read_back(name, split, data_dir):
    """Every record of a prepared split decoded by TFDS itself (no diffjax code), in stored order."""
    records = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
    return [records[i] for i in range(len(records))]


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="png")
    return buffer.getvalue()


def _jpeg(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="jpeg", quality=90)
    return buffer.getvalue()


def _archive_files():
    """{relative path: bytes} of a labelled archive: 2 splits, 3 classes, PNG and JPEG, one grayscale."""
    files = {}
    for split, per_class in (("train", 3), ("test", 2)):
        for label in ("cat", "dog", "emu"):
            for i in range(per_class):
                image = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
                encode = _jpeg if i == 0 else _png
                files[f"{split}/{label}/{i:03d}.{'jpg' if i == 0 else 'png'}"] = encode(image)
    files["train/emu/gray.png"] = _png(RNG.integers(0, 256, (6, 5), dtype=np.uint8))
    return files


def _expected_archive(files, split):
    """(pixels as PIL decodes the original file, converted to RGB; label) in sorted (class, path) order."""
    classes = sorted({name.split("/")[1] for name in files})
    expected = []
    for name in sorted(n for n in files if n.startswith(split + "/")):
        with Image.open(io.BytesIO(files[name])) as image:
            expected.append((np.asarray(image.convert("RGB")), classes.index(name.split("/")[1])))
    return expected


def _assert_round_trip(read, expected):
    assert len(read) == len(expected)
    for record, (image, label) in zip(read, expected):
        np.testing.assert_array_equal(record["image"], image.reshape(record["image"].shape))
        assert record["label"] == label


def test_npz_round_trip_exact(tmp_path):
    arrays = {
        "x_train": RNG.integers(0, 256, (11, 7, 6, 3), dtype=np.uint8),
        "y_train": RNG.integers(0, 4, 11).astype(np.uint8),
        "x_test": RNG.integers(0, 256, (5, 7, 6, 3), dtype=np.uint8),
        "y_test": np.array([3, 0, 1, 2, 3], np.uint8),
    }
    np.savez(tmp_path / "small.npz", **arrays)
    name = dd.prepare(
        _config(
            "npz",
            tmp_path / "small.npz",
            tmp_path / "tfds",
            image_size=7,
            channels=3,
            resize_method="bilinear",
            num_classes=4,
        )
    )
    assert name.startswith("diffjax_npz/small-c3-")
    for split in ("train", "test"):
        expected = list(zip(arrays[f"x_{split}"], arrays[f"y_{split}"]))
        _assert_round_trip(_read_back(name, split, tmp_path / "tfds"), expected)


def test_idx_round_trip_exact(tmp_path):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    images = {
        "train": RNG.integers(0, 256, (9, 4, 5), dtype=np.uint8),
        "t10k": RNG.integers(0, 256, (4, 4, 5), dtype=np.uint8),
    }
    labels = {"train": RNG.integers(0, 10, 9, dtype=np.uint8), "t10k": np.array([9, 0, 5, 5], np.uint8)}
    for prefix in images:
        _write_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz", images[prefix])
        _write_idx(idx_dir / f"{prefix}-labels-idx1-ubyte.gz", labels[prefix])
    config = _config("idx", idx_dir, tmp_path / "tfds", image_size=4, channels=1, resize_method="nearest")
    info = dd.dataset_info(config)
    assert info.num_examples == {"train": 9, "test": 4}
    assert info.source_shape == (4, 5, 1) and info.num_classes == 10
    name = dd.prepare(config)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        expected = list(zip(images[prefix], labels[prefix]))
        _assert_round_trip(_read_back(name, split, tmp_path / "tfds"), expected)


@pytest.mark.parametrize("layout", ["image_folder", "image_tar"])
def test_image_archive_round_trip_exact(tmp_path, layout):
    files = _archive_files()
    folder = tmp_path / "images"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    path = folder
    if layout == "image_tar":
        path = tmp_path / "images.tar"
        with tarfile.open(path, "w") as archive:
            archive.add(folder, arcname=".")
    config = _config(layout, path, tmp_path / "tfds", image_size=6, channels=3, num_classes=3, resize_method="bilinear")
    name = dd.prepare(config)
    for split in ("train", "test"):
        _assert_round_trip(_read_back(name, split, tmp_path / "tfds"), _expected_archive(files, split))
    # Original files are stored byte for byte (the grayscale one is converted to RGB PNG).
    records = tfds.data_source(
        name, split="test", data_dir=str(tmp_path / "tfds"), decoders={"image": tfds.decode.SkipDecoding()}
    )
    assert records[0]["image"] == files["test/cat/000.jpg"]


def test_record_source_matches_array_source(tmp_path):
    """diffjax's own record reader (raw bytes, PIL) gives the pixels of the in-memory arrays."""
    images = RNG.integers(0, 256, (10, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", x_train=images, y_train=np.arange(10) % 3)
    config = _config("npz", tmp_path / "g.npz", tmp_path / "tfds", image_size=8, channels=1, num_classes=3)
    from_records = sources.open_source(config, "train")
    config.in_memory = True
    from_arrays = sources.open_source(config, "train")
    assert isinstance(from_records, sources.RecordSource) and isinstance(from_arrays, sources.ArraySource)
    indices = np.array([7, 0, 3, 3, 9])
    for got, want in zip(from_records.read(indices), from_arrays.read(indices)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(from_arrays.read(indices)[0][..., 0], images[indices])


def test_fast_jpeg_decode_equals_pil(tmp_path):
    """The direct libjpeg path used for uniform JPEG archives decodes the same pixels as Image.open."""
    data = [_jpeg(RNG.integers(0, 256, (9, 7, 3), dtype=np.uint8)) for _ in range(5)]
    fast = sources.ImageSpec(7, 3, jpeg_hw=(9, 7))
    slow = sources.ImageSpec(7, 3)
    for item in data:
        np.testing.assert_array_equal(sources.decode_image(item, fast), sources.decode_image(item, slow))


def test_preparation_is_reused_and_redone_when_source_changes(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.array([0, 1, 1]))
    config = _config("npz", path, tmp_path / "tfds", image_size=4, channels=1, num_classes=2)
    name = dd.prepare(config)
    info_file = Path(tmp_path / "tfds", name, builders.VERSION, "dataset_info.json")
    first_mtime = info_file.stat().st_mtime_ns
    assert dd.prepare(config) == name and info_file.stat().st_mtime_ns == first_mtime
    np.savez(path, x_train=np.full((4, 4, 4), 7, np.uint8), y_train=np.array([0, 1, 1, 0]))
    new_name = dd.prepare(config)
    assert new_name != name
    assert len(_read_back(new_name, "train", tmp_path / "tfds")) == 4


def test_failed_preparation_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "b.npz"
    np.savez(path, x_train=np.zeros((6, 4, 4), np.uint8), y_train=np.zeros(6, np.uint8))
    config = _config("npz", path, tmp_path / "tfds", image_size=4, channels=1, num_classes=1)
    calls = []

    def failing_png(image):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk on fire")
        return _png(image[..., 0])

    monkeypatch.setattr(builders, "_png_bytes", failing_png)
    with pytest.raises(RuntimeError, match="disk on fire"):
        dd.prepare(config)
    assert list((tmp_path / "tfds").rglob("*")) == []
    assert not builders.is_prepared("npz", path, 1, tmp_path / "tfds")
    monkeypatch.undo()
    assert len(_read_back(dd.prepare(config), "train", tmp_path / "tfds")) == 6


def test_tfds_source_reads_prepared_data_by_name(tmp_path):
    """source='tfds' reads any array_record TFDS set in data_dir through tfds (here one diffjax prepared)."""
    images = RNG.integers(0, 256, (12, 5, 5), dtype=np.uint8)
    labels = np.arange(12) % 4
    np.savez(tmp_path / "c.npz", x_train=images, y_train=labels)
    name = dd.prepare(_config("npz", tmp_path / "c.npz", tmp_path / "tfds", image_size=5, channels=1, num_classes=4))
    config = _config("tfds", "", tmp_path / "tfds", tfds_name=name, image_size=5, channels=1, num_classes=4)
    assert dd.dataset_info(config).num_examples == {"train": 12}
    iterator = dd.make_iterator(config, split="train", global_batch_size=12, seed=0, shuffle=False, num_epochs=1)
    batch = next(iterator)
    np.testing.assert_array_equal(np.round((batch["image"][..., 0] + 1) * 127.5).astype(np.uint8), images)
    np.testing.assert_array_equal(batch["label"], labels)


def test_tfds_source_errors(tmp_path):
    missing = _config("tfds", "", tmp_path / "empty", tfds_name="mnist", image_size=28, channels=1)
    with pytest.raises(FileNotFoundError, match="not prepared.*--file_format=array_record"):
        dd.dataset_info(missing)
    unknown = _config("tfds", "", tmp_path / "empty", tfds_name="no_such_set_xyz", image_size=28, channels=1)
    with pytest.raises(ValueError, match="no_such_set_xyz"):
        dd.dataset_info(unknown)
