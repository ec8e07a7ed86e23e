"""Data configs: presets on the real data at hand, and clear errors before any work."""

import os
from pathlib import Path

import numpy as np
import pytest

import diffjax.data as dd
from diffjax.data import config as config_lib

MNIST = config_lib.shared_data_dir() / "mnist.npz"
CIFAR10 = config_lib.shared_data_dir() / "cifar10-jpeg.tar"
needs_mnist = pytest.mark.skipif(not MNIST.exists(), reason=f"{MNIST} is not present")
needs_cifar10 = pytest.mark.skipif(not CIFAR10.exists(), reason=f"{CIFAR10} is not present")
needs_fashion = pytest.mark.skipif(
    not Path(config_lib.FASHION_MNIST_DIR).exists(), reason="apt package dataset-fashion-mnist is not installed"
)


@pytest.fixture
def small_npz(tmp_path):
    path = tmp_path / "small.npz"
    np.savez(
        path,
        x_train=np.zeros((10, 28, 28), np.uint8),
        y_train=np.arange(10) % 10,
        x_test=np.zeros((3, 28, 28), np.uint8),
        y_test=np.arange(3),
    )
    config = dd.base_data_config()
    config.update(
        source="npz", path=str(path), image_size=28, channels=1, num_classes=10, data_dir=str(tmp_path / "tfds")
    )
    return config


def _uint8_units(images):
    return (images.astype(np.float64) + 1) * 127.5


def test_digits_default_works():
    from sklearn.datasets import load_digits

    config = dd.default_data_config("digits")
    info = dd.dataset_info(config)
    assert info.image_shape == (16, 16, 1) and info.source_shape == (8, 8, 1)
    assert info.num_examples == {"train": len(load_digits().images)} and info.num_classes == 10
    batches = list(dd.make_iterator(config, split="train", global_batch_size=599, seed=0, num_epochs=1))
    assert len(batches) == 3
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert images.shape == (1797, 16, 16, 1) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert labels.dtype == np.int32
    assert np.bincount(labels).tolist() == np.bincount(load_digits().target).tolist()


@needs_mnist
def test_mnist_from_shared_npz_has_the_known_shapes_and_statistics():
    config = dd.default_data_config("mnist")
    info = dd.dataset_info(config)
    assert info.image_shape == (28, 28, 1)
    assert info.num_examples == {"train": 60000, "test": 10000} and info.num_classes == 10
    total = total_sq = count = 0.0
    labels = []
    for batch in dd.make_iterator(config, split="train", global_batch_size=10000, seed=0, shuffle=False, num_epochs=1):
        pixels = _uint8_units(batch["image"])
        total, total_sq, count = total + pixels.sum(), total_sq + (pixels**2).sum(), count + pixels.size
        labels.append(batch["label"])
    mean = total / count
    std = np.sqrt(total_sq / count - mean**2)
    assert round(mean, 2) == 33.32 and round(std, 2) == 78.57
    assert len(np.concatenate(labels)) == 60000 and set(np.concatenate(labels)) == set(range(10))


@needs_fashion
def test_fashion_mnist_from_debian_idx():
    config = dd.default_data_config("fashion_mnist")
    info = dd.dataset_info(config)
    assert info.num_examples == {"train": 60000, "test": 10000} and info.num_classes == 10
    batch = next(dd.make_iterator(config, split="test", global_batch_size=10000, seed=0, shuffle=False))
    assert batch["image"].shape == (10000, 28, 28, 1)
    assert np.bincount(batch["label"]).tolist() == [1000] * 10


@pytest.mark.slow
@needs_mnist
def test_mnist_prepared_as_tfds_equals_the_npz(tmp_path):
    config = dd.default_data_config("mnist")
    config.update(in_memory=False, data_dir=str(tmp_path))
    name = dd.prepare(config)
    from_tfds = next(dd.make_iterator(config, split="test", global_batch_size=10000, seed=0, shuffle=False))
    with np.load(MNIST) as arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
    np.testing.assert_array_equal(np.round(_uint8_units(from_tfds["image"][..., 0])).astype(np.uint8), x_test)
    np.testing.assert_array_equal(from_tfds["label"], y_test)
    assert name.startswith("diffjax_npz/mnist-c1-")


@pytest.mark.slow
@needs_cifar10
def test_cifar10_from_shared_tar(tmp_path):
    config = dd.default_data_config("cifar10")
    config.data_dir = str(tmp_path)
    info = dd.dataset_info(config)
    assert info.num_examples == {"train": 50000, "test": 10000} and info.num_classes == 10
    batch = next(dd.make_iterator(config, split="test", global_batch_size=10000, seed=0, shuffle=False))
    assert batch["image"].shape == (10000, 32, 32, 3)
    assert np.bincount(batch["label"]).tolist() == [1000] * 10
    channel_means = _uint8_units(batch["image"]).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(channel_means, [126.0, 123.7, 114.9], atol=2.0)  # CIFAR-10 test set


def test_presets_and_unknown_preset():
    for name in dd.PRESETS:
        config = dd.default_data_config(name)
        assert config.name == name and config.source in dd.SOURCES
        assert sorted(config.keys()) == sorted(dd.base_data_config().keys())
        if config.path and not Path(config.path).exists():  # data not installed here: a clear error
            with pytest.raises(FileNotFoundError, match=config.path):
                dd.validate_data_config(config)
        else:
            assert dd.validate_data_config(config) is not config
    with pytest.raises(ValueError, match="unknown data preset 'imagenet'.*digits"):
        dd.default_data_config("imagenet")


def test_bad_config_values_are_named(small_npz, tmp_path):
    cases = [
        (dict(source="hdf5"), ValueError, "unknown data source 'hdf5'.*sklearn_digits"),
        (dict(resize_method="cubic"), ValueError, "unknown resize_method 'cubic'.*bilinear"),
        (dict(channels=2), ValueError, "channels must be 1 or 3, got 2"),
        (dict(path=str(tmp_path / "nowhere.npz")), FileNotFoundError, "nowhere.npz"),
        (dict(source="idx"), ValueError, "needs `path` to be a directory"),
        (dict(source="tfds"), ValueError, "needs `tfds_name`"),
        (dict(image_size=32), ValueError, "image_size=32 does not match the data's 28x28 images"),
        (dict(channels=3), ValueError, "channels=3 but the 'npz' data has 1 channel"),
        (dict(num_classes=7), ValueError, "num_classes=7 but the data has 10 classes"),
        (dict(source="toy"), ValueError, "diffjax.data.toy"),
    ]
    for overrides, error, message in cases:
        config = small_npz.copy_and_resolve_references()
        config.update(**overrides)
        with pytest.raises(error, match=message):
            dd.dataset_info(config)
        with pytest.raises(error, match=message):
            dd.make_iterator(config, split="train", global_batch_size=2, seed=0)
    assert not (tmp_path / "tfds").exists()  # nothing was prepared


def test_unknown_keys_and_wrong_types_are_named(small_npz):
    with pytest.raises(ValueError, match=r"unknown data config key\(s\) \['imag_size'\]"):
        dd.validate_data_config({**small_npz.to_dict(), "imag_size": 3})
    with pytest.raises(ValueError, match="'image_size' must be int, got '28'"):
        dd.validate_data_config({**small_npz.to_dict(), "image_size": "28"})
    with pytest.raises(ValueError, match="'random_flip' must be bool, got 1"):
        dd.validate_data_config({**small_npz.to_dict(), "random_flip": 1})


def test_bad_iterator_arguments_are_named(small_npz, tmp_path):
    cases = [
        (dict(split="validation"), "unknown split 'validation'.*'test', 'train'"),
        (dict(global_batch_size=9, process_count=2), "global_batch_size=9 is not divisible by process_count=2"),
        (dict(process_index=2, process_count=2), "process_index=2 must be < process_count=2"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(num_epochs=0), "num_epochs must be an integer >= 1"),
        (dict(global_batch_size=0), "global_batch_size must be an integer >= 1"),
        (dict(global_batch_size=16, num_epochs=1), "hold no full global batch of 16"),
    ]
    small_npz.in_memory = False
    for overrides, message in cases:
        kwargs = dict(split="train", global_batch_size=2, seed=0) | overrides
        with pytest.raises(ValueError, match=message):
            dd.make_iterator(small_npz, **kwargs)
    assert not (tmp_path / "tfds").exists()


def test_missing_shared_data_names_where_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFJAX_SHARED_DATA", os.fspath(tmp_path / "absent"))
    where = r"mnist.npz.*shared data sets live in \$DIFFJAX_SHARED_DATA, else shared/data or ../shared/data"
    with pytest.raises(FileNotFoundError, match=where):
        dd.dataset_info(dd.default_data_config("mnist"))


def test_name_selects_the_data_set_or_is_refused(small_npz):
    digits_named_mnist = dd.default_data_config("digits")
    digits_named_mnist.name = "mnist"  # a label only, before: trained on digits
    with pytest.raises(ValueError, match="data.name 'mnist' is a preset read from source 'npz'.*default_data_config"):
        dd.validate_data_config(digits_named_mnist)
    small_npz.name = "mnst"
    with pytest.raises(ValueError, match=r"unknown data.name 'mnst' \(did you mean 'mnist'\?\).*'custom'"):
        dd.dataset_info(small_npz)
    small_npz.name = dd.CUSTOM  # a data set described by its keys
    assert dd.dataset_info(small_npz).image_shape == (28, 28, 1)
    tfds_copy = dd.default_data_config("mnist")
    tfds_copy.source = "tfds"  # a preset may read its prepared TFDS copy
    assert dd.validate_data_config(tfds_copy).tfds_name == "mnist"


def test_shared_data_is_looked_up_from_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFJAX_SHARED_DATA", raising=False)
    (tmp_path / "repo").mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    assert config_lib.shared_data_dir().resolve() == (tmp_path / "shared" / "data").resolve()  # ../shared/data
    (tmp_path / "repo" / "shared" / "data").mkdir(parents=True)
    assert config_lib.shared_data_dir().resolve() == (tmp_path / "repo" / "shared" / "data").resolve()
    monkeypatch.setenv("DIFFJAX_SHARED_DATA", os.fspath(tmp_path / "elsewhere"))  # first in the order
    assert Path(dd.default_data_config("mnist").path).resolve() == (tmp_path / "elsewhere" / "mnist.npz").resolve()
