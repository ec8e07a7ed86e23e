"""Training on autoencoder latents: the autoencoder trainer, its file format, configs/dit_latents.py's
CPU variant built on a tiny latent cache, decoded sample grids and the errors of a latent run."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from sklearn.datasets import load_digits

from configs import dit_latents
from diffjax import evaluation
from diffjax.data import default_data_config, validate_data_config
from diffjax.data.latents import build_latent_cache
from diffjax.data.sources import ArraySource
from diffjax.models.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    decode_latents,
    load_autoencoder,
    save_autoencoder,
)
from diffjax.training import load, load_run, loop
from diffjax.training.autoencoder import (
    autoencoder_command,
    latent_scaling_factor,
    reconstruction_error,
    train_autoencoder,
)
from diffjax.training.config import ConfigError
from diffjax.training.discrete_run import make_run_iterator
from diffjax.training.images import to_uint8
from diffjax.training.latents import (
    autoencoder_file,
    latent_channel_images,
    load_latent_decoder,
    reference_images_config,
)
from diffjax.training.run import init_state, make_jitted_train_step
from diffjax.training.sharding import global_batch

# 8x8 digits -> 4x4x2 latents, at the smallest widths GroupNorm allows (compiling is the tests' cost).
TINY = AutoencoderConfig(in_channels=1, latent_channels=2, block_out_channels=(4, 8), layers_per_block=1, norm_groups=4)


def digits(n):
    data = load_digits()
    images = np.round(data.images[:n] * (255 / 16)).astype(np.uint8)[..., None]
    return images, data.target[:n].astype(np.int32)


def random_autoencoder(config):
    """An AutoencoderKL of `config` with random N(0, 0.1^2) parameters, set without running its
    initialisers (eagerly, they take longer than the test)."""
    model = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(0)
    values = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory):
    """An (untrained) autoencoder file and a latent cache of 96 digits whose meta names it and the
    images; the latents are stand-ins (subsampled pixels), the decoder is the file's."""
    directory = tmp_path_factory.mktemp("latents")
    model = random_autoencoder(TINY)
    path = save_autoencoder(model, directory / "autoencoder.npz")
    x, y = digits(96)
    meta = {
        "autoencoder": {"path": str(path), "config": dataclasses.asdict(model.cfg)},
        "scaling_factor": model.cfg.scaling_factor,
        "images": {**default_data_config("digits").to_dict(), "image_size": 8, "resize_method": "none"},
    }
    splits = {"train": ArraySource(x, y)}  # train only, like the 8x8 digits data set (the FID reference)

    def encode(images):
        return np.repeat(images[:, ::2, ::2], 2, axis=-1)

    cache = build_latent_cache(splits, encode, directory / "latents.npz", num_classes=10, flips=False, meta=meta)
    return str(cache), str(path), model


@pytest.mark.slow  # ~1 min, most of it compiling the autoencoder's gradient
def test_train_autoencoder_reduces_the_reconstruction_error():
    images, _ = digits(512)
    model, losses = train_autoencoder(TINY, images, jax.random.key(0), steps=200, batch_size=32, learning_rate=3e-3)
    assert losses.shape == (200,) and np.all(np.isfinite(losses))
    assert losses[-20:].mean() < 0.3 * losses[:3].mean(), (losses[:3], losses[-20:])
    # the posterior mean's reconstruction is better than predicting the mean image
    x = images / 127.5 - 1.0
    baseline = float(np.mean((x - x.mean(0)) ** 2))
    assert reconstruction_error(model, images[:256]) < 0.5 * baseline
    scale = latent_scaling_factor(model, images[:256])
    z = np.asarray(model.encode(x[:256].astype(np.float32))[0])
    np.testing.assert_allclose(np.std(z * scale), 1.0, rtol=1e-4)


def test_train_autoencoder_refuses_bad_input():
    images, _ = digits(8)
    with pytest.raises(ValueError, match="3 channels"):
        train_autoencoder(dataclasses.replace(TINY, in_channels=3), images, jax.random.key(0), steps=1)
    with pytest.raises(ValueError, match="steps"):
        train_autoencoder(TINY, images, jax.random.key(0), steps=0)
    with pytest.raises(ValueError, match="divisible"):
        train_autoencoder(TINY, images[:, :7, :7], jax.random.key(0), steps=1)


def test_saved_autoencoder_decodes_the_same(latent_cache, tmp_path):
    _, path, model = latent_cache
    loaded = load_autoencoder(path)
    assert loaded.cfg == model.cfg
    z = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
    np.testing.assert_array_equal(decode_latents(loaded, z), decode_latents(model, z))
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not an autoencoder"):
        load_autoencoder(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_autoencoder(tmp_path / "missing.npz")


def tiny_latent_config(cache: str, **data):
    config = dit_latents.get_config("mnist_tiny")
    config.data.update(path=cache, image_size=4, **data)
    config.model.overrides.update(hidden_size=16, depth=1, num_heads=2, frequency_embedding_size=16)
    config.train.update(num_steps=2, batch_size=8, log_every=1, checkpoint_every=2, progress_bar=False)
    config.train.async_checkpointing = False
    config.sample.update(num_samples=4, steps=2, latent_grid=True)
    config.eval.update(batch_size=8, loss_batches=1, num_samples=8)
    return config


def test_dit_latents_variants():
    assert dit_latents.get_config().model.name == "DiT-XL/2"
    tiny = dit_latents.get_config("mnist_tiny")
    assert tiny.data.source == "latents" and tiny.data.path == dit_latents.MNIST_TINY_CACHE
    with pytest.raises(ValueError, match="variants are"):
        dit_latents.get_config("cifar")


def test_latent_config_builds_and_decodes_its_samples(latent_cache, tmp_path):
    cache, _, model = latent_cache
    run = loop.prepare_run(tiny_latent_config(cache), str(tmp_path / "run"))
    assert run.image_shape == (4, 4, 2) and run.spec.num_classes == 10 and run.decode is not None
    assert not (tmp_path / "run").exists()  # prepare_run creates nothing
    latents = np.asarray(jax.random.normal(jax.random.key(2), (5, 4, 4, 2)))
    images = run.decode(latents)
    assert images.shape == (5, 8, 8, 1)  # the data's images, not the latents
    np.testing.assert_allclose(images, decode_latents(model, latents), rtol=1e-5, atol=1e-6)
    png = run.save_samples(latents, str(tmp_path / "grid"))  # what train/sample/eval write
    grid = np.asarray(Image.open(png))
    upscale = 64 // 8
    assert grid.shape == ((2 * 9 + 1) * upscale, (3 * 9 + 1) * upscale)  # 5 images of 8x8 in 3 columns
    first = grid[upscale : 9 * upscale : upscale, upscale : 9 * upscale : upscale]
    np.testing.assert_array_equal(first, to_uint8(images[0, ..., 0]))
    channels = np.asarray(Image.open(tmp_path / "grid_latents.png"))  # sample.latent_grid=True
    assert channels.shape == ((2 * 5 + 1) * upscale, (3 * 9 + 1) * upscale)  # 4x(2*4) channel tiles


@pytest.mark.slow  # ~15 s; the slow end-to-end run trains on latent batches too
def test_one_train_step_on_latent_batches(latent_cache, tmp_path):
    config = tiny_latent_config(latent_cache[0])
    run = loop.prepare_run(config, str(tmp_path))
    iterator = make_run_iterator(config, split="train", global_batch_size=8, seed=0, process_index=0, process_count=1)
    batch = next(iterator)
    assert batch["image"].shape == (8, 4, 4, 2) and batch["image"].dtype == np.float32
    state, metrics = make_jitted_train_step(run)(init_state(run), global_batch(batch, run.mesh))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_without_an_autoencoder_grids_show_latents_and_fid_is_refused(latent_cache, tmp_path, caplog):
    cache, _, _ = latent_cache
    with np.load(cache) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["meta"] = np.frombuffer(json.dumps({"meta": {}, "num_classes": 10}).encode(), np.uint8)
    bare = tmp_path / "bare.npz"
    np.savez(bare, **arrays)
    config = tiny_latent_config(str(bare))
    with caplog.at_level("WARNING", logger="diffjax"):
        run = loop.prepare_run(config, str(tmp_path / "run"))
    assert run.decode is None and "config.data.autoencoder" in caplog.text
    png = run.save_samples(np.zeros((4, 4, 4, 2), np.float32), str(tmp_path / "grid"))
    assert np.asarray(Image.open(png)).shape == ((2 * 5 + 1) * 8, (2 * 9 + 1) * 8)
    with pytest.raises(ConfigError, match="data.autoencoder or config.eval.fid=False"):
        loop._check_latent_evaluation(config, run)


def test_a_cache_moved_with_its_autoencoder_finds_it_beside_it(latent_cache, tmp_path):
    cache, autoencoder, _ = latent_cache
    with np.load(cache) as z:
        arrays = {k: z[k] for k in z.files}
    stored = json.loads(arrays["meta"].tobytes())
    stored["meta"]["autoencoder"]["path"] = "/a/machine/it/left/autoencoder.npz"
    arrays["meta"] = np.frombuffer(json.dumps(stored).encode(), np.uint8)
    moved = tmp_path / "latents.npz"
    np.savez(moved, **arrays)
    data = tiny_latent_config(str(moved)).data
    assert autoencoder_file(data) is None  # the named file is gone and none lies beside the cache
    shutil.copy(autoencoder, tmp_path / "autoencoder.npz")
    assert autoencoder_file(data) == str(tmp_path / "autoencoder.npz")
    assert load_latent_decoder(data) is not None


def test_load_run_without_the_stored_cache_keeps_latents_and_warns(tmp_path, caplog):
    run = object()  # load_run's parameters and network do not need the cache
    config = tiny_latent_config(str(tmp_path / "moved_away" / "latents.npz"))
    with caplog.at_level("WARNING", logger="diffjax"):
        assert load._with_stored_latent_decoder(run, config) is run
    assert "samples stay latents" in caplog.text and "moved_away" in caplog.text


def test_latent_channel_images_puts_channels_side_by_side():
    latents = np.stack([np.full((2, 3), 1.5), np.full((2, 3), -6.0)], axis=-1)[None]
    tiles = latent_channel_images(latents)
    assert tiles.shape == (1, 2, 6, 1)
    np.testing.assert_allclose(tiles[0, :, :3, 0], 0.5)  # 1.5 / 3
    np.testing.assert_allclose(tiles[0, :, 3:, 0], -1.0)  # clipped


def test_bad_latent_inputs_are_named_before_compiling(latent_cache, tmp_path):
    cache, _, model = latent_cache
    with pytest.raises(FileNotFoundError, match="data.autoencoder 'nowhere.npz'"):
        loop.prepare_run(tiny_latent_config(cache, autoencoder="nowhere.npz"), str(tmp_path))
    other = save_autoencoder(random_autoencoder(dataclasses.replace(TINY, latent_channels=3)), tmp_path / "three.npz")
    with pytest.raises(ValueError, match="3 latent channels, but data.channels = 2"):
        loop.prepare_run(tiny_latent_config(cache, autoencoder=other), str(tmp_path))
    with pytest.raises(ValueError, match="channels"):
        loop.prepare_run(tiny_latent_config(cache, channels=4), str(tmp_path))
    config = tiny_latent_config(cache)
    config.data.update(source="npz", channels=1, autoencoder=latent_cache[1])
    with pytest.raises(ValueError, match="needs source 'latents'"):
        loop.prepare_run(config, str(tmp_path))


@pytest.mark.slow  # ~1-2 min: two train steps, sampling and eval with FID (random Inception weights)
def test_latent_run_trains_samples_and_evaluates_decoded(latent_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(
        evaluation, "load_inception_params", lambda path=None: evaluation.init_inception_params(jax.random.key(0))
    )
    monkeypatch.setenv("DIFFJAX_CACHE", str(tmp_path / "cache"))
    cache, _, _ = latent_cache
    config = tiny_latent_config(cache)
    workdir = str(tmp_path / "run")
    summary = loop.train(config, workdir)
    assert summary["step"] == 2 and np.isfinite(summary["loss"])
    assert np.asarray(Image.open(summary["samples"])).shape == ((2 * 9 + 1) * 8, (2 * 9 + 1) * 8)  # 4 decoded
    sampled = loop.sample_from_checkpoint(config, workdir)
    with np.load(sampled["npz"]) as z:
        assert z["images"].shape == (4, 8, 8, 1) and z["images"].dtype == np.uint8
        assert z["latents"].shape == (4, 4, 4, 2)
    loaded = load_run(workdir)  # in a notebook: the stored config's autoencoder decodes
    key = jax.random.key(3)
    latents = loaded.sample(key, 2, decode=False)
    assert latents.shape == (2, 4, 4, 2)
    np.testing.assert_allclose(loaded.sample(key, 2), decode_latents(latent_cache[2], latents), rtol=1e-5, atol=1e-6)
    result = loop.evaluate(config, workdir)
    assert result["split"] == "train" and result["num_samples"] == result["num_reference"] == 8
    assert np.isfinite(result["fid"]) and np.isfinite(result["test_loss"])
    config.eval.bits_per_dim_examples = 4
    with pytest.raises(ConfigError, match="bits/dim is measured on uint8 images"):
        loop.evaluate(config, workdir)


@pytest.mark.slow  # ~1-2 min: compiles the tiny autoencoder's training step
def test_autoencoder_command_writes_a_decodable_latent_cache(tmp_path):
    out = tmp_path / "ae"
    argv = ["--data=digits", "--image-size=8", f"--out={out}", "--steps=5", "--batch-size=8"]
    assert autoencoder_command(argv) == 0
    summary = json.loads((out / "autoencoder_summary.json").read_text())
    assert summary["latent_shape"] == [4, 4, 2] and summary["mse_split"] == "train" and len(summary["loss_curve"]) == 5
    config = validate_data_config(
        {"source": "latents", "path": summary["latent_cache"], "image_size": 4, "channels": 2}
    )
    with np.load(summary["latent_cache"]) as z:
        latents, labels = z["latents_train"], z["labels_train"]
    assert latents.shape == (1797, 4, 4, 2) and labels.shape == (1797,) and "flipped_train" not in z.files
    np.testing.assert_allclose(latents.std(), 1.0, rtol=1e-3)  # scaled to unit variance
    decode = load_latent_decoder(config)
    assert autoencoder_file(config) == summary["autoencoder"] and decode(latents[:3]).shape == (3, 8, 8, 1)
    assert reference_images_config(config).name == "digits"
