"""Guidance combinators: classifier-free guidance (scale, interval, rescale) and autoguidance,
against closed forms on exact Gaussian denoisers, with every solver, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CountingNetwork

from diffjax import processes as P
from diffjax.data.toy import gaussian
from diffjax.denoisers import Denoiser, autoguidance, classifier_free_guidance, guided
from diffjax.samplers import SOLVERS, sample
from diffjax.validation import build_named

PROCESS = P.VP()
COND = gaussian([1.0, -0.5], [0.4, 0.4])
UNCOND = gaussian([0.0, 0.5], [0.4, 0.4])


def test_scale_one_is_the_conditional_model():
    cond, uncond = COND.denoiser(PROCESS), UNCOND.denoiser(PROCESS)
    g = classifier_free_guidance(cond, uncond, 1.0)
    x = jax.random.normal(jax.random.key(0), (64, 2))
    t = jnp.full((64,), 0.4)
    np.testing.assert_allclose(g.x0(x, t), cond.x0(x, t), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(classifier_free_guidance(cond, uncond, 0.0).x0(x, t), uncond.x0(x, t), atol=1e-6)
    assert classifier_free_guidance(cond, None, 1.0) is cond


@pytest.mark.parametrize("name", ["gaussian_pc", "unipc", "dpm_solver++", "edm_heun", "deis", "sa_solver", "heun"])
@pytest.mark.parametrize("scale", [2.0, 4.0])
def test_cfg_of_two_gaussians_samples_the_closed_form_guided_gaussian(name, scale):
    """With equal covariances the guided denoiser D_u + w (D_c - D_u) is the exact denoiser of
    N(mu_u + w (mu_c - mu_u), s^2): samples have that mean and the common std."""
    g = classifier_free_guidance(COND.denoiser(PROCESS), UNCOND.denoiser(PROCESS), scale)
    x = sample(g, jax.random.key(1), (20_000, 2), solver=build_named(SOLVERS, name, {}, "solver"), steps=30).samples
    mu_guided = np.array([0.0, 0.5]) + scale * (np.array([1.0, -0.5]) - np.array([0.0, 0.5]))
    np.testing.assert_allclose(np.asarray(jnp.mean(x, 0)), mu_guided, rtol=0.01, atol=0.02)
    np.testing.assert_allclose(np.asarray(jnp.std(x, 0)), [0.4, 0.4], rtol=0.03)


# One solver per family in the default run (the rest: `pytest -m slow`).
GUIDED_DEFAULT_RUN = ("ancestral", "ddim", "dpm_solver++_sde", "edm_heun", "gaussian_pc", "pc", "unipc")


@pytest.mark.parametrize(
    "name", [n if n in GUIDED_DEFAULT_RUN else pytest.param(n, marks=pytest.mark.slow) for n in sorted(SOLVERS)]
)
def test_guidance_works_with_every_solver(name):
    g = classifier_free_guidance(
        COND.denoiser(PROCESS), UNCOND.denoiser(PROCESS), 2.0, interval=(0.1, 10.0), rescale=0.5
    )
    x = sample(g, jax.random.key(0), (256, 2), solver=SOLVERS[name](), steps=12).samples
    assert np.all(np.isfinite(np.asarray(x))), name


def test_guidance_interval_switches_on_the_noise_level():
    cond, uncond = COND.denoiser(PROCESS), UNCOND.denoiser(PROCESS)
    g = classifier_free_guidance(cond, uncond, 3.0, interval=(0.5, 2.0))
    full = classifier_free_guidance(cond, uncond, 3.0)
    x = jax.random.normal(jax.random.key(0), (8, 2))
    for t, inside in [(0.1, False), (0.3, True), (0.9, False)]:
        level = float(PROCESS.sigma(t) / PROCESS.alpha(t))
        assert (0.5 < level <= 2.0) == inside, level
        expected = full.x0(x, t) if inside else cond.x0(x, t)
        np.testing.assert_allclose(g.x0(x, t), expected, rtol=1e-5, atol=1e-6)


def test_rescale_matches_the_conditional_std():
    cond, uncond = COND.denoiser(PROCESS), UNCOND.denoiser(PROCESS)
    x = jax.random.normal(jax.random.key(0), (16, 2))
    t = 0.3
    rescaled = classifier_free_guidance(cond, uncond, 5.0, rescale=1.0).x0(x, t)
    np.testing.assert_allclose(jnp.std(rescaled, axis=1), jnp.std(cond.x0(x, t), axis=1), rtol=1e-4)
    half = classifier_free_guidance(cond, uncond, 5.0, rescale=0.5).x0(x, t)
    plain = classifier_free_guidance(cond, uncond, 5.0).x0(x, t)
    np.testing.assert_allclose(half, 0.5 * rescaled + 0.5 * plain, rtol=1e-4, atol=1e-6)


def test_autoguidance_extrapolates_away_from_the_weak_model():
    model = COND.denoiser(PROCESS)
    weak = gaussian([0.8, -0.3], [0.6, 0.6]).denoiser(PROCESS)
    g = autoguidance(model, weak, 2.0)
    x = jax.random.normal(jax.random.key(0), (8, 2))
    np.testing.assert_allclose(g.x0(x, 0.3), 2.0 * model.x0(x, 0.3) - weak.x0(x, 0.3), rtol=1e-5, atol=1e-5)


def test_guided_denoiser_mixes_prediction_types():
    """Guidance combines in x0, so an eps-network and a v-network can be combined."""
    cond = COND.denoiser(PROCESS)
    uncond = UNCOND.denoiser(PROCESS)
    uncond_v = Denoiser(lambda x, t: uncond.v(x, t), PROCESS, "v")
    x = jax.random.normal(jax.random.key(0), (8, 2))
    np.testing.assert_allclose(
        guided(cond, uncond_v, 2.0).x0(x, 0.5), guided(cond, uncond, 2.0).x0(x, 0.5), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda c, u: classifier_free_guidance(c, None, 3.0),
            "guidance scale 3.0 needs a conditional and a separate unconditional denoiser, "
            "but no unconditional model was given",
        ),
        (lambda c, u: classifier_free_guidance(c, c, 3.0), "the unconditional model is the conditional one"),
        (lambda c, u: classifier_free_guidance(c, u, float("nan")), "scale must be a finite number"),
        (
            lambda c, u: classifier_free_guidance(c, u, 2.0, interval=(2.0, 1.0)),
            "interval must be \\(sigma_lo, sigma_hi\\)",
        ),
        (lambda c, u: classifier_free_guidance(c, u, 2.0, rescale=1.5), "rescale must lie in \\[0, 1\\], got 1.5"),
        (lambda c, u: classifier_free_guidance(c, Denoiser(u.fn, P.EDM(), "eps"), 2.0), "different processes"),
        (lambda c, u: autoguidance(c, c, 2.0), "needs a separate weaker model"),
    ],
)
def test_bad_guidance_input(make, match):
    cond_net, uncond_net = CountingNetwork(), CountingNetwork()
    cond, uncond = Denoiser(cond_net, PROCESS, "eps"), Denoiser(uncond_net, PROCESS, "eps")
    with pytest.raises(ValueError, match=match):
        make(cond, uncond)
    assert cond_net.calls == uncond_net.calls == 0
