"""EDM2's magnitude-preserving U-Net: equal to the reference (NVlabs/edm2) on a committed random-weight
fixture (experiments/pretrained/make_edm2_fixture.py), the MP layers against their closed forms, the
preset sizes against the reference's, forced weight normalisation and the uncertainty-weighted loss."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from diffjax import losses, models
from diffjax import processes as P
from diffjax.denoisers import Denoiser, EDMPreconditioned
from diffjax.models import edm2

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "pretrained", "edm2_tiny.npz")


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def converted(reference):
    """(apply, params) of our network with the fixture's weights, from the reference state dict."""
    network = json.loads(str(reference["network"]))
    cfg = models.EDM2UNetConfig(
        image_size=network["img_resolution"],
        in_channels=network["img_channels"],
        num_classes=network["label_dim"],
        model_channels=network["model_channels"],
        channel_mult=tuple(network["channel_mult"]),
        num_blocks=network["num_blocks"],
        attn_resolutions=tuple(network["attn_resolutions"]),
        channels_per_head=network["channels_per_head"],
        logvar_channels=network["logvar_channels"],
    )
    apply, template = models.functional(nnx.eval_shape(lambda: models.build(cfg)))  # the weights come from the fixture
    state = {k.removeprefix("state/"): v for k, v in reference.items() if k.startswith("state/")}
    params = edm2.params_from_edm2_state(state)
    assert jax.tree.structure(params) == jax.tree.structure(template)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, params, template)) == [True] * len(
        jax.tree.leaves(template)
    )
    return jax.jit(apply), params


def relative_rms(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def test_network_equals_the_reference(reference, converted):
    """Raw U-Net output, preconditioned denoiser D(x; sigma) (diffjax's EDM preconditioning) and the
    log-variance head, at four noise levels with three labels and the null class: <= 1e-4."""
    apply, params = converted
    x, sigma, y = reference["x"], reference["sigma"], jnp.asarray(reference["y"], jnp.int32)
    c_in = 1 / np.sqrt(0.5**2 + sigma**2)
    raw = apply(params, x * c_in[:, None, None, None], np.log(sigma) / 4, y)
    assert relative_rms(raw, reference["raw"]) <= 1e-4
    denoiser = Denoiser(lambda x, t: apply(params, x, t, y), P.EDM(), EDMPreconditioned(0.5))
    assert relative_rms(denoiser.x0(jnp.asarray(x), jnp.asarray(sigma)), reference["denoised"]) <= 1e-4
    logvar = edm2.logvar_from_params(params, jnp.log(sigma) / 4)
    np.testing.assert_allclose(logvar, reference["logvar"], rtol=1e-4, atol=1e-5)
    # the labels matter (the check above could fail on them): another label changes the output
    other = apply(params, x * c_in[:, None, None, None], np.log(sigma) / 4, (y + 1) % 5)
    assert relative_rms(other, reference["raw"]) > 1e-2


def test_preset_sizes_match_the_reference(reference):
    """Parameters + Fourier buffers of published sizes (abstract models: nothing is allocated)."""
    for name in ("EDM2-img512-xxl", "EDM2-img64-s"):
        model = nnx.eval_shape(lambda name=name: models.create(name))
        assert models.param_count(model) == int(reference[f"state_size/{name}"]), name


@jax.jit
def _magnitudes(key):
    """RMS (and shares) of the MP layers' outputs for unit-Gaussian inputs, in one program."""
    key_a, key_b = jax.random.split(key)
    a = jax.random.normal(key_a, (4096, 64))
    b = jax.random.normal(key_b, (4096, 32))

    def rms(x, axis=None):
        return jnp.sqrt(jnp.mean(x**2, axis))

    out = {"silu": rms(edm2.mp_silu(a)), "normalize": rms(edm2.normalize(3.0 * a, -1), -1)}
    for t in (0.3, 0.5, 0.9):
        cat = edm2.mp_cat(a, b, t)
        out[f"sum{t}"], out[f"cat{t}"] = rms(edm2.mp_sum(a[:, :32], b, t)), rms(cat)
        out[f"share{t}"] = jnp.sum(cat[:, 64:] ** 2) / jnp.sum(cat**2)
    w = edm2.mp_weight(jax.random.normal(key_b, (3, 3, 16, 8)), gain=2.0)
    out["weight_norms"] = jnp.linalg.norm(w.reshape(-1, 8), axis=0)
    out["fourier"] = rms(edm2.mp_fourier(jnp.linspace(-3, 3, 4096), 2 * np.pi * a[0], 2 * np.pi * jnp.abs(a[1])))
    return out


def test_mp_layers_preserve_magnitude():
    m = jax.device_get(_magnitudes(jax.random.key(0)))
    assert m["silu"] == pytest.approx(1.0, abs=0.01)  # E[silu(z)^2] = 0.596^2 for z ~ N(0, 1)
    for t in (0.3, 0.5, 0.9):
        assert m[f"sum{t}"] == pytest.approx(1.0, abs=0.02)
        assert m[f"cat{t}"] == pytest.approx(1.0, abs=0.02)
        # the halves' shares of the squared magnitude are (1 - t)^2 : t^2
        assert m[f"share{t}"] == pytest.approx(t**2 / ((1 - t) ** 2 + t**2), abs=0.02)
    np.testing.assert_allclose(m["normalize"], 1.0, rtol=1e-3)
    np.testing.assert_allclose(m["weight_norms"], 2.0, rtol=1e-3)
    assert m["fourier"] == pytest.approx(1.0, abs=0.05)


def test_forced_weight_normalization_projects_the_updated_weights():
    params = {"conv": {"weight": 5.0 * jnp.ones((3, 3, 4, 2))}, "gain": jnp.asarray(0.3)}
    grads = {"conv": {"weight": jnp.arange(72.0).reshape(3, 3, 4, 2) / 72}, "gain": jnp.asarray(1.0)}
    plain = optax.sgd(0.1)
    forced = optax.chain(plain, edm2.forced_weight_normalization())
    updates, _ = forced.update(grads, forced.init(params), params)
    new = optax.apply_updates(params, updates)
    plain_new = optax.apply_updates(params, plain.update(grads, plain.init(params), params)[0])
    expected = edm2.normalize(plain_new["conv"]["weight"], (0, 1, 2))
    np.testing.assert_allclose(new["conv"]["weight"], expected, rtol=1e-6)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(new["conv"]["weight"] ** 2, (0, 1, 2))), 1.0, rtol=1e-3)
    assert float(new["gain"]) == pytest.approx(float(plain_new["gain"]))


def test_the_trainer_config_adds_forced_weight_normalization():
    from test_training import tiny_config

    from diffjax.training import from_config as fc

    config = tiny_config()
    config.optim.forced_weight_normalization = True
    config.optim.grad_clip = 0.0
    optimizer = fc.optimizer_from_config(config, optax.constant_schedule(0.1))
    params = {"layer": {"weight": jnp.full((4, 3), 5.0)}, "out_gain": jnp.asarray(0.0)}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(new["layer"]["weight"] ** 2, 0)), 1.0, rtol=1e-3)
    assert float(new["out_gain"]) != 0.0  # trained, not normalised


def test_uncertainty_weighted_loss_is_minimal_at_the_log_loss():
    loss = jnp.asarray([0.01, 0.5, 3.0])
    grad = jax.grad(lambda u: jnp.sum(losses.uncertainty_weighted(loss, u)))(jnp.log(loss))
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)
    values = losses.uncertainty_weighted(loss, jnp.log(loss))
    assert np.all(values < losses.uncertainty_weighted(loss, jnp.log(loss) + 0.1))
    assert np.all(values < losses.uncertainty_weighted(loss, jnp.log(loss) - 0.1))


@pytest.mark.parametrize(
    "override, field",
    [
        ({"learn_sigma": True}, "learn_sigma"),
        ({"channels_per_head": 48}, "channels_per_head"),
        ({"res_balance": 1.5}, "res_balance"),
        ({"attn_resolutions": (12,)}, "attn_resolutions"),
        ({"channel_mult_emb": -1}, "channel_mult_emb"),
        ({"clip_act": -1.0}, "clip_act"),
    ],
)
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        models.get_config("EDM2-img512-xs", **override)


def test_the_trainer_weights_the_loss_by_the_edm2_log_variance_head(reference, converted):
    """config.loss.uncertainty_weighting: u(sigma) is the network's head at c_noise = log(sigma) / 4;
    the loss trains its linear layer, never its Fourier buffers; refused for a model without a head."""
    from test_training import tiny_config

    from diffjax.training import ConfigError
    from diffjax.training import from_config as fc

    _, params = converted
    config = tiny_config()
    config.model.name = "EDM2-img64-xs"
    config.loss.uncertainty_weighting = True
    uncertainty = fc.uncertainty_from_config(config, P.EDM())
    sigma = jnp.asarray([0.1, 1.0, 20.0])
    np.testing.assert_array_equal(uncertainty(params, sigma), edm2.logvar_from_params(params, jnp.log(sigma) / 4))
    data = jnp.asarray(reference["x"])
    # a stand-in for the U-Net (its gradients are not the subject): only the head's parameters matter
    loss_fn = losses.denoising_loss(lambda p, x, t: 0.5 * x, P.EDM(), prediction="x0", uncertainty=uncertainty)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, jax.random.key(1), data)[0]))(params)
    assert float(jnp.abs(grads["logvar_linear"]["weight"]).max()) > 0
    assert float(jnp.abs(grads["logvar_fourier_freqs"]).max()) == 0.0
    config.model.name = "unet-small"
    with pytest.raises(ConfigError, match="uncertainty_weighting = True needs a model with a log-variance head"):
        fc.uncertainty_from_config(config, P.EDM())
