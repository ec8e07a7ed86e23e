"""The toy-data pieces: the labelled 2-D ring mixture (exact denoisers against the mixture formula) and
the ToyMLP network (contract, errors, and a short training run that lowers the denoising loss)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import diffjax
from diffjax import models
from diffjax.data.toy import TOY_2D, benchmark_mixture, ring_mixture, sample_toy_2d


def _posterior_mean_formula(x, means, std, weights, alpha, sigma):
    """E[x0 | x_t = x] for isotropic components, written out in float64 numpy:
    r_k ~ w_k N(x; alpha mu_k, (alpha^2 s^2 + sigma^2) I), m_k = mu_k + alpha s^2 / var (x - alpha mu_k)."""
    var = alpha**2 * std**2 + sigma**2
    diff = x[:, None, :] - alpha * means[None]  # (n, K, 2)
    log_r = np.log(weights)[None] - 0.5 * np.sum(diff**2, axis=-1) / var
    r = np.exp(log_r - log_r.max(axis=1, keepdims=True))
    r /= r.sum(axis=1, keepdims=True)
    m = means[None] + alpha * std**2 / var * diff
    return np.sum(r[..., None] * m, axis=1), m


def test_ring_mixture_samples_have_labels_of_their_component():
    mixture = ring_mixture(num_components=6, radius=2.0, std=0.05)
    x, labels = mixture.sample(jax.random.key(0), 600, return_components=True)
    assert x.shape == (600, 2) and labels.shape == (600,)
    assert jnp.issubdtype(labels.dtype, jnp.integer)
    assert set(np.unique(np.asarray(labels))) == set(range(6))
    angles = 2 * np.pi * np.arange(6) / 6
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    np.testing.assert_allclose(np.asarray(mixture.means), means, atol=1e-6)
    # every example lies within 6 std of the mean of its label, and is assigned back to it
    dist = np.linalg.norm(np.asarray(x) - means[np.asarray(labels)], axis=1)
    assert dist.max() < 6 * 0.05
    np.testing.assert_array_equal(np.asarray(mixture.assign(x)), np.asarray(labels))


def test_ring_mixture_exact_denoisers_match_the_mixture_formula():
    mixture = ring_mixture()
    means, std = np.asarray(mixture.means, np.float64), 0.1
    x = np.asarray(jax.random.normal(jax.random.key(1), (64, 2)), np.float64)
    for alpha, sigma in ((1.0, 0.05), (0.8, 0.6), (0.3, 1.0)):
        expected, per_component = _posterior_mean_formula(x, means, std, np.full(8, 1 / 8), alpha, sigma)
        got = mixture.posterior_mean(jnp.asarray(x, jnp.float32), alpha, sigma)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
        for k in (0, 3):
            got_k = mixture.component(k).posterior_mean(jnp.asarray(x, jnp.float32), alpha, sigma)
            np.testing.assert_allclose(np.asarray(got_k), per_component[:, k], rtol=1e-4, atol=1e-5)
    # through the Denoiser of a process: x0 prediction at time t equals the formula at (alpha(t), sigma(t))
    process = diffjax.VP()
    t = jnp.full((64,), 0.4)
    alpha, sigma = float(process.alpha(t)[0]), float(process.sigma(t)[0])
    expected, _ = _posterior_mean_formula(x, means, std, np.full(8, 1 / 8), alpha, sigma)
    got = mixture.denoiser(process).x0(jnp.asarray(x, jnp.float32), t)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_ring_is_a_2d_toy_set_and_bad_arguments_raise():
    assert sample_toy_2d("ring", jax.random.key(0), 10).shape == (10, 2)
    assert "ring" in TOY_2D
    with pytest.raises(ValueError, match="num_components"):
        ring_mixture(num_components=0)
    with pytest.raises(ValueError, match="std"):
        ring_mixture(std=-1.0)
    with pytest.raises(ValueError, match="component index"):
        ring_mixture().component(8)


def test_toy_mlp_contract_and_errors():
    model = models.build(models.ToyMLPConfig(data_dim=2, width=32, depth=2, num_classes=8))
    apply, params = models.functional(model)
    x, t = jnp.ones((5, 2)), jnp.linspace(0.1, 1.0, 5)
    out = apply(params, x, t)
    assert out.shape == (5, 2) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)  # zero-initialised output layer
    assert apply(params, x, t, jnp.arange(5)).shape == (5, 2)
    assert apply(params, x, 0.5).shape == (5, 2)  # a scalar t is broadcast
    # per example: input, time MLP, 3 width x width matmuls per block, output (the class lookup is free)
    width, depth = 32, 2
    expected = 2 * width + 64 * width + width * width + depth * 3 * width * width + width * 2
    assert models.forward_macs(model, batch=3) == 3 * expected
    specs = models.logical_partition_specs(model)
    assert jax.tree.structure(specs) == jax.tree.structure(params)
    with pytest.raises(ValueError, match=r"\(batch, 2\)"):
        apply(params, jnp.ones((5, 3)), t)
    with pytest.raises(ValueError, match="labels y"):
        unconditional = models.ToyMLP(models.ToyMLPConfig(data_dim=2), rngs=nnx.Rngs(0))
        unconditional(x, t, jnp.arange(5))
    with pytest.raises(ValueError, match="width"):
        models.ToyMLPConfig(data_dim=2, width=0).validate()
    # the helper the MLP uses is the models' one time embedding
    emb = models.sinusoidal_embedding(jnp.array([0.0, 1.0]), 8)
    assert emb.shape == (2, 8)
    np.testing.assert_allclose(np.asarray(emb[0]), [1, 1, 1, 1, 0, 0, 0, 0])


def test_toy_mlp_training_lowers_the_denoising_loss():
    model = models.build(models.ToyMLPConfig(data_dim=2, width=64, depth=2), seed=0)
    apply, params = models.functional(model)
    loss_fn = diffjax.denoising_loss(apply, diffjax.VP(), prediction="eps")
    mixture = ring_mixture()
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, key):
        key_data, key_loss = jax.random.split(key)
        batch = {"image": mixture.sample(key_data, 256)}
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key_loss, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_batch = {"image": mixture.sample(jax.random.key(123), 4096)}
    eval_loss = jax.jit(lambda p: loss_fn(p, jax.random.key(7), eval_batch)[0])
    before = float(eval_loss(params))
    opt_state = optimizer.init(params)
    for key in jax.random.split(jax.random.key(1), 200):
        params, opt_state, _ = step(params, opt_state, key)
    after = float(eval_loss(params))
    assert np.isfinite(after)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("dim", [4, 12, 8.0])
def test_benchmark_mixture_refuses_dimensions_without_four_sign_patterns(dim):
    with pytest.raises(ValueError, match="power of two >= 8"):
        benchmark_mixture(dim)
    assert benchmark_mixture(8).means.shape == (4, 8)
