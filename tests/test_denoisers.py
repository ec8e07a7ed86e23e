"""Prediction conversions, the Denoiser views against closed forms, EDM preconditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import processes as P
from diffjax.data.toy import GaussianMixture
from diffjax.denoisers import (
    PREDICTIONS,
    Denoiser,
    EDMPreconditioned,
    EDMPreconditioning,
    PathCoefficients,
    from_x0_eps,
    to_x0_eps,
)

PROCESSES = {
    "vp": P.VP(),
    "ddpm": P.VP.from_betas(np.linspace(1e-4, 0.02, 1000)),
    "cosine": P.CosineVP(),
    "subvp": P.SubVP(),
    "ve": P.VE(),
    "edm": P.EDM(),
    "flow": P.FlowMatching(),
}

MIXTURE = GaussianMixture.create([0.3, 0.7], [[1.0, -0.5, 0.2], [-0.8, 0.4, 0.0]], [[0.3, 0.2, 0.5], [0.6, 0.4, 0.25]])


def random_times(process, key, n):
    u = jax.random.uniform(key, (n,), minval=0.05, maxval=0.95)
    return process.t_min + u * (process.t_max - process.t_min)


@pytest.mark.parametrize("name", PROCESSES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_conversions_round_trip(name, prediction):
    """output -> (x0, eps) -> output, and (x0, eps) is consistent with x = alpha x0 + sigma eps."""
    process = PROCESSES[name]
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (64, 5), jnp.float64)
        output = jax.random.normal(keys[1], (64, 5), jnp.float64)
        t = random_times(process, keys[2], 64).astype(jnp.float64)
        c = PathCoefficients.at(process, t, x)
        x0, eps = to_x0_eps(output, prediction, x, c)
        np.testing.assert_allclose(c.alpha * x0 + c.sigma * eps, x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(from_x0_eps(x0, eps, prediction, c), output, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PROCESSES)
def test_views_of_exact_mixture_denoiser_match_closed_forms(name):
    """The exact x0-denoiser's score view equals autodiff of the closed-form marginal density,
    and its flow view equals the probability-flow drift f x - g^2/2 score."""
    process = PROCESSES[name]
    denoiser = MIXTURE.denoiser(process)
    keys = jax.random.split(jax.random.key(1), 2)
    t = random_times(process, keys[0], 32)
    x = process.marginal_sample(keys[1], MIXTURE.sample(keys[1], 32), t)
    alpha, sigma = process.alpha(t), process.sigma(t)

    log_p = lambda x: jnp.sum(MIXTURE.marginal_log_prob(x, alpha, sigma))  # noqa: E731
    score_ref = jax.grad(log_p)(x)
    scale = np.abs(np.asarray(score_ref)).max()
    np.testing.assert_allclose(denoiser.score(x, t), score_ref, atol=2e-4 * scale)
    np.testing.assert_allclose(denoiser.eps(x, t), -sigma[:, None] * score_ref, atol=2e-4 * scale)

    f, g = process.sde(t)
    drift_ref = f[:, None] * x - 0.5 * (g**2)[:, None] * score_ref
    np.testing.assert_allclose(denoiser.velocity(x, t), drift_ref, rtol=2e-3, atol=2e-3 * np.abs(drift_ref).max())


@pytest.mark.parametrize("name", ["vp", "ve", "flow", "edm"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_prediction_type_recovers_the_posterior_mean(name, prediction):
    """A network predicting view p of the exact denoiser gives back the closed-form E[x0|x]."""
    process = PROCESSES[name]
    exact = MIXTURE.denoiser(process)
    wrapped = Denoiser(lambda x, t: exact.view(prediction, x, t), process, prediction)
    keys = jax.random.split(jax.random.key(2), 2)
    t = random_times(process, keys[0], 16)
    x = process.marginal_sample(keys[1], MIXTURE.sample(keys[1], 16), t)
    want = MIXTURE.posterior_mean(x, process.alpha(t), process.sigma(t))
    np.testing.assert_allclose(wrapped.x0(x, t), want, rtol=1e-3, atol=1e-3)


def test_v_prediction_matches_definition_for_vp():
    process = PROCESSES["cosine"]
    x0 = jnp.array([[0.5, -1.0]])
    eps = jnp.array([[0.2, 0.3]])
    t = jnp.array([0.4])
    c = PathCoefficients.at(process, t, x0)
    x = c.alpha * x0 + c.sigma * eps
    np.testing.assert_allclose(from_x0_eps(x0, eps, "v", c), c.alpha * eps - c.sigma * x0)
    # flow for the rectified-flow path is eps - x0
    fm = PROCESSES["flow"]
    c = PathCoefficients.at(fm, t, x0)
    np.testing.assert_allclose(from_x0_eps(x0, eps, "velocity", c), eps - x0, rtol=1e-6)
    del x


def test_edm_preconditioning_coefficients_match_karras_table():
    process = P.EDM()
    pre = EDMPreconditioning(lambda x, c: x, process, sigma_data=0.5)
    sigma = jnp.array([0.1, 1.0, 10.0])
    c_in, c_skip, c_out, c_noise = pre.coefficients(sigma)
    s, sd = np.array([0.1, 1.0, 10.0]), 0.5
    np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_skip, sd**2 / (s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_out, s * sd / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6)


@pytest.mark.parametrize("name", ["edm", "vp", "flow"])
def test_edm_preconditioned_exact_network_is_exact(name):
    """F = (D_exact - c_skip x~)/c_out behind the preconditioning reproduces D_exact, and the raw
    network sees c_in x~ and c_noise = log(sigma/alpha)/4."""
    process = PROCESSES[name]
    sd = 0.5

    def raw(x_in, c_noise):
        s = jnp.exp(4.0 * c_noise)  # the scaled path x~ = x0 + s eps
        x_scaled = x_in * jnp.sqrt(s**2 + sd**2)[:, None]
        d = MIXTURE.posterior_mean(x_scaled, 1.0, s)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / jnp.sqrt(s**2 + sd**2)
        return (d - c_skip[:, None] * x_scaled) / c_out[:, None]

    denoiser = Denoiser(EDMPreconditioning(raw, process, sd), process, "x0")
    keys = jax.random.split(jax.random.key(3), 2)
    t = random_times(process, keys[0], 16)
    x = process.marginal_sample(keys[1], MIXTURE.sample(keys[1], 16), t)
    want = MIXTURE.posterior_mean(x, process.alpha(t), process.sigma(t))
    np.testing.assert_allclose(denoiser.x0(x, t), want, rtol=2e-3, atol=2e-3)
    # The same network given as a raw EDM network: the Denoiser preconditions it itself.
    direct = Denoiser(raw, process, EDMPreconditioned(sigma_data=sd))
    np.testing.assert_allclose(direct.x0(x, t), denoiser.x0(x, t), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(direct.eps(x, t), denoiser.eps(x, t), rtol=1e-6, atol=1e-6)


def test_denoiser_is_a_pytree_and_jits():
    process = PROCESSES["ddpm"]
    denoiser = MIXTURE.denoiser(process)
    x = jnp.ones((4, 3))
    out = jax.jit(lambda d, x: d.x0(x, 0.5))(denoiser, x)
    np.testing.assert_allclose(out, denoiser.x0(x, 0.5), rtol=1e-6)


def test_bad_inputs():
    process = PROCESSES["vp"]
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        Denoiser(lambda x, t: x, process, "noise")
    with pytest.raises(TypeError, match="callable"):
        Denoiser(3, process)
    denoiser = Denoiser(lambda x, t: x, process)
    with pytest.raises(ValueError, match="shape"):
        denoiser.x0(jnp.ones((4, 3)), jnp.ones((3,)))
    bad = Denoiser(lambda x, t: x[:, :2], process)
    with pytest.raises(ValueError, match="output shape"):
        bad.x0(jnp.ones((4, 3)), 0.5)
    with pytest.raises(ValueError, match="unknown prediction"):
        denoiser.view("x1", jnp.ones((4, 3)), 0.5)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPreconditioning(lambda x, c: x, process, sigma_data=0.0)
    with pytest.raises(ValueError, match="sigma_data"):
        Denoiser(lambda x, c: x, process, EDMPreconditioned(sigma_data=-1.0))


@pytest.mark.parametrize(
    "prediction, match",
    [
        ("flow", "prediction 'flow' is now spelled 'velocity'"),
        ("edm", "prediction 'edm' is now spelled EDMPreconditioned"),
    ],
)
def test_renamed_predictions_name_their_new_spelling(prediction, match):
    with pytest.raises(ValueError, match=match):
        Denoiser(lambda x, t: x, PROCESSES["vp"], prediction)


def test_edm_network_misuse_is_caught():
    """Where it can be told: a preconditioned network given another prediction, preconditioned twice,
    built for another process, a network tagged as raw EDM used as an x0-predictor, and a raw network
    whose output would broadcast inside the preconditioning."""
    edm, vp = PROCESSES["edm"], PROCESSES["vp"]
    pre = EDMPreconditioning(lambda x, c: x, edm, 0.5)
    with pytest.raises(ValueError, match="declares prediction 'x0' but was given prediction 'eps'"):
        Denoiser(pre, edm, "eps")
    with pytest.raises(ValueError, match="already preconditioned"):
        Denoiser(pre, edm, EDMPreconditioned(0.5))
    with pytest.raises(ValueError, match="EDMPreconditioning was built for EDM"):
        Denoiser(pre, vp, "x0")
    Denoiser(pre, edm, "x0")  # right: fine

    def raw(x, c_noise):
        return x

    raw.prediction = EDMPreconditioned(0.5)
    with pytest.raises(
        ValueError, match="declares prediction EDMPreconditioned\\(sigma_data=0.5\\) but was given prediction 'x0'"
    ):
        Denoiser(raw, edm, "x0")
    with pytest.raises(ValueError, match="declares prediction"):
        Denoiser(raw, edm, EDMPreconditioned(1.0))  # another sigma_data than the network's
    Denoiser(raw, edm, EDMPreconditioned(0.5))

    narrow = Denoiser(lambda x, c: x[:, :1], edm, EDMPreconditioned(0.5))
    with pytest.raises(ValueError, match="the raw network maps x of shape \\(4, 3\\) to shape \\(4, 1\\)"):
        narrow.x0(jnp.ones((4, 3)), 1.0)


def test_denoiser_repr_names_the_preconditioning():
    d = Denoiser(lambda x, c: x, PROCESSES["edm"], EDMPreconditioned(0.25))
    assert "EDMPreconditioned(sigma_data=0.25)" in repr(d)
