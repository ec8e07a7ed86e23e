"""The SD autoencoder (AutoencoderKL) against diffusers on a tiny random-weight network (fixture from
experiments/pretrained/make_fixtures.py), the latent scaling and chunking."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax.models import load_pretrained
from diffjax.models.autoencoder import AutoencoderConfig, AutoencoderKL, decode_latents, encode_latents

FIXTURES = Path(__file__).parent / "fixtures" / "pretrained"


def rel_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


@pytest.fixture(scope="module")
def vae():
    with np.load(FIXTURES / "reference_outputs.npz") as z:
        ref = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("diffusers_vae/")}
    return load_pretrained(FIXTURES / "diffusers_vae"), ref


def test_encode_and_decode_equal_diffusers(vae):
    pt, ref = vae
    assert pt.format == "diffusers-vae" and pt.config.scaling_factor == 0.18215
    model = pt.model
    mean, logvar, decoded = jax.jit(lambda x, z: (*model.encode(x), model.decode(z)))(ref["x"], ref["z"])
    assert rel_rms(mean, ref["mean"]) < 1e-5 and rel_rms(logvar, ref["logvar"]) < 1e-5
    assert rel_rms(decoded, ref["decoded"]) < 1e-5


@pytest.mark.slow
def test_latents_scaled_chunked_and_sampled(vae):
    pt, ref = vae
    model = pt.model

    @jax.jit
    def run(x, z, key):
        mean, logvar = model.encode(x)
        chunked = encode_latents(model, x, chunk_size=1)
        sampled = encode_latents(model, x, key)
        return mean, logvar, chunked, sampled, decode_latents(model, pt.config.scaling_factor * z)

    mean, logvar, chunked, sampled, via_latents = run(ref["x"], ref["z"], jax.random.key(0))
    np.testing.assert_allclose(chunked, 0.18215 * mean, rtol=1e-5, atol=1e-6)
    assert rel_rms(via_latents, ref["decoded"]) < 1e-5
    # a posterior sample: standardised by the posterior it is N(0, 1)
    z = (sampled / 0.18215 - mean) / jnp.exp(0.5 * logvar)
    assert abs(float(jnp.mean(z))) < 0.2 and abs(float(jnp.std(z)) - 1) < 0.2


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(ValueError, match="block_out_channels"):
        AutoencoderConfig(block_out_channels=(8, 12), norm_groups=8).validate()
    model = nnx.eval_shape(
        lambda: AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_groups=4), rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError, match="divisible by 2"):
        model.encode(jnp.zeros((1, 15, 16, 3)))
    with pytest.raises(ValueError, match="4\\)"):
        model.decode(jnp.zeros((1, 8, 8, 3)))


# ----------------------------------------------------------------------------------------------
# The latent data path: a cache written once, read by the pipeline as float latents
# ----------------------------------------------------------------------------------------------


def _pool_encoder(images):
    """A stand-in encoder (2x2 mean pool, times 2): deterministic and exact to check against."""
    b, h, w, c = images.shape
    return 2.0 * images.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def test_latent_cache_feeds_the_pipeline(tmp_path):
    import diffjax.data as dd
    from diffjax.data.latents import build_latent_cache, latent_cache_info

    images_cfg = dd.default_data_config("digits")
    source = dd.open_source(images_cfg, "train")
    path = build_latent_cache(
        {"train": source},
        _pool_encoder,
        tmp_path / "digits_latents.npz",
        num_classes=10,
        batch_size=500,
        meta={"autoencoder": "pool2", "scaling_factor": 2.0},
    )
    shape, counts, num_classes, meta = latent_cache_info(path)
    assert shape == (8, 8, 1) and counts == {"train": len(source)} and num_classes == 10
    assert meta == {"autoencoder": "pool2", "scaling_factor": 2.0}

    config = dd.base_data_config()
    config.update(source="latents", path=str(path), image_size=8, channels=1, num_classes=10, random_flip=True)
    it = dd.make_iterator(config, split="train", global_batch_size=64, seed=3, shuffle=False)
    batch = next(it)
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (64, 8, 8, 1)
    images, labels = source.read(np.arange(64))
    x = images.astype(np.float32) / 127.5 - 1
    plain, flipped = _pool_encoder(x), _pool_encoder(x[:, :, ::-1])
    is_plain = np.all(np.isclose(batch["image"], plain, atol=1e-6), axis=(1, 2, 3))
    is_flipped = np.all(np.isclose(batch["image"], flipped, atol=1e-6), axis=(1, 2, 3))
    assert np.all(is_plain | is_flipped) and 10 < is_flipped.sum() < 54  # about half flipped
    np.testing.assert_array_equal(batch["label"], labels)
    config.update(dequantize=True)
    with pytest.raises(ValueError, match="float latents"):
        dd.make_iterator(config, split="train", global_batch_size=64, seed=3)
