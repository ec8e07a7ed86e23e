"""Particle methods: resampling schemes, SMC / Feynman-Kac steering and the twisted diffusion sampler against
the closed-form tilted Gaussian mixture, the unbiasedness of the normalising-constant estimate, best-of-N
and noise search, and bad input."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CountingNetwork

from diffjax import processes as P
from diffjax.control import exact as E
from diffjax.control import operators as O
from diffjax.control import particles as Pa
from diffjax.data.toy import GaussianMixture, gaussian
from diffjax.denoisers import Denoiser
from diffjax.samplers import DDIM, LogSNR, sample

PROCESS = P.VP()
PRIOR = GaussianMixture.create([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [[0.3, 0.5], [0.4, 0.3]])
MATRIX = np.array([[1.0, 1.0]])
NOISE = 0.5
Y = 0.3
OBS = O.Observation(O.DenseLinear.from_matrix(MATRIX), jnp.array([[Y]]), NOISE)
POSTERIOR = E.mixture_posterior(PRIOR, MATRIX, [Y], NOISE)
STEPS = 400  # the ancestral transition's discretisation error is below the checks' tolerances here


# ------------------------------------------------------------------------------------------------
# Resampling
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(Pa.RESAMPLERS))
def test_resampling_is_unbiased_and_low_variance_schemes_are_within_one(name):
    w = np.array([0.05, 0.4, 0.15, 0.3, 0.1])
    n = len(w)
    counts = jax.jit(jax.vmap(lambda k: jnp.bincount(Pa.RESAMPLERS[name](k, jnp.log(w)), length=n)))(
        jax.random.split(jax.random.key(0), 20_000)
    )
    counts = np.asarray(counts, np.float64)
    se = counts.std(0) / math.sqrt(len(counts)) + 1e-3
    np.testing.assert_array_less(np.abs(counts.mean(0) - n * w), 4 * se)
    if name == "systematic":  # every count is floor(N w) or ceil(N w)
        assert np.all((counts >= np.floor(n * w)) & (counts <= np.ceil(n * w)))
    if name == "multinomial":
        assert np.any(np.abs(counts - n * w) >= 2)  # multinomial is not (the check above can fail)


def test_effective_sample_size():
    assert float(Pa.effective_sample_size(jnp.zeros(8))) == pytest.approx(8.0)
    assert float(Pa.effective_sample_size(jnp.array([0.0, -jnp.inf, -jnp.inf]))) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# SMC against the closed form
# ------------------------------------------------------------------------------------------------


def _run(n, twist, potential="difference", key=0, steps=STEPS, log_potential=None, scale=1.0):
    lp = log_potential or Pa.measurement_log_potential(OBS, data_std=0.6, process=PROCESS)
    return Pa.smc(
        PRIOR.denoiser(PROCESS),
        jax.random.key(key),
        (n, 2),
        lp,
        steps=steps,
        twist=twist,
        potential=potential,
        scale=scale,
    )


@pytest.mark.parametrize("twist", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_smc_converges_to_the_closed_form_posterior(twist):
    """FK steering with the difference potential of the measurement's log-likelihood (and TDS, its twisted
    version) targets p(x) p(y | x) / p(y): weights, component means and covariances of the weighted
    particles match the closed form, and the log normalising constant estimate matches log p(y)."""
    result = _run(20_000, twist)
    err = E.mixture_fit_errors(POSTERIOR, result.samples, np.asarray(result.weights()))
    assert err["weights"] < 0.03 and err["means"] < 0.08 and err["covs"] < 0.08, err
    assert abs(float(result.log_normalizer) - POSTERIOR.log_normalizer) < 0.03
    # the same particles without their weights are the prior, far from the posterior: the check can fail
    prior_err = E.mixture_fit_errors(POSTERIOR, PRIOR.sample(jax.random.key(9), 20_000))
    assert prior_err["weights"] > 0.1 and prior_err["means"] > 0.3, prior_err


def test_normalising_constant_estimate_is_unbiased():
    """E[Z_hat] = Z: over 256 independent runs of 64 particles, the mean of Z_hat / p(y) is 1 within three
    standard errors plus 1% (the ancestral chain's discretisation at 400 steps)."""
    lp = Pa.measurement_log_potential(OBS, data_std=0.6, process=PROCESS)
    run = functools.partial(
        Pa._smc_compiled, log_potential=lp, shape=(64, 2), steps=STEPS, grid=LogSNR(), t_min=PROCESS.t_min,
        t_max=PROCESS.t_max, lam=1.0, potential="difference", twist=True, eta=1.0,
        resampler=Pa.systematic_resampling, threshold=0.5,
    )  # fmt: skip
    log_z = jax.jit(jax.vmap(lambda k: run(PRIOR.denoiser(PROCESS), k).log_normalizer))(
        jax.random.split(jax.random.key(1), 256)
    )
    ratio = np.exp(np.asarray(log_z, np.float64) - POSTERIOR.log_normalizer)
    se = ratio.std() / math.sqrt(len(ratio))
    assert abs(ratio.mean() - 1.0) < 3 * se + 0.01, (ratio.mean(), se)
    assert ratio.std() > 0  # a random estimate, not a constant


@pytest.mark.slow
def test_fk_steering_of_a_linear_reward_targets_the_tilted_mixture():
    """A reward b^T x0 with lambda: p exp(lambda b^T x) is the closed-form `linear_tilt` mixture."""
    b = np.array([0.8, -0.4])
    target = E.linear_tilt(PRIOR, 1.5 * b)
    result = _run(20_000, False, log_potential=lambda x0, t: x0 @ jnp.asarray(b, jnp.float32), scale=1.5)
    err = E.mixture_fit_errors(target, result.samples, np.asarray(result.weights()))
    assert err["weights"] < 0.03 and err["means"] < 0.08 and err["covs"] < 0.08, err
    assert abs(float(result.log_normalizer) - target.log_normalizer) < 0.03


@pytest.mark.slow
@pytest.mark.parametrize("potential", ["max", "sum"])
def test_other_potentials_run_and_resample(potential):
    result = _run(512, False, potential=potential, steps=50)
    assert np.all(np.isfinite(np.asarray(result.samples))) and np.isfinite(float(result.log_normalizer))


# ------------------------------------------------------------------------------------------------
# Best-of-N and noise search
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_best_of_n_and_noise_search_raise_the_reward():
    d = gaussian([0.0, 0.0], 1.0).denoiser(PROCESS)

    def reward(x):
        return x[:, 0]

    samples, rewards = Pa.best_of_n(d, jax.random.key(0), (2000, 2), reward, 4, steps=20)
    np.testing.assert_allclose(np.asarray(rewards), np.asarray(samples[:, 0]))
    # E[max of 4 standard normals] = 1.0294
    assert abs(float(jnp.mean(rewards)) - 1.0294) < 0.06
    _, start = Pa.noise_search(d, jax.random.key(1), (64, 2), reward, rounds=0, steps=10)
    _, searched = Pa.noise_search(d, jax.random.key(1), (64, 2), reward, rounds=3, steps=10)
    assert np.all(np.asarray(searched) >= np.asarray(start)) and float(jnp.mean(searched - start)) > 0.3


def test_an_explicit_grid_that_starts_early_is_where_the_particles_start():
    """A grid that starts at sigma 2 < t_max = 80 of EDM: smc and noise_search draw the prior at
    sigma 2, so their spread is sample()'s on the same grid (drawn at 80, smc's was about 10 times
    the data's), and a t_max that disagrees with the grid is refused."""
    edm, data = P.EDM(), gaussian([0.0, 0.0], 0.5)
    denoiser, ts = data.denoiser(edm), np.geomspace(2.0, edm.t_min, 41)

    def spread_of_sample(solver, grid):
        return float(
            jnp.std(
                sample(denoiser, jax.random.key(2), (4000, 2), solver=solver, steps=len(grid) - 1, grid=grid).samples
            )
        )

    result = Pa.smc(denoiser, jax.random.key(0), (4000, 2), lambda x0, t: 0.0 * x0[:, 0], steps=40, grid=ts)
    assert abs(float(jnp.std(result.samples)) / spread_of_sample(DDIM(eta=1.0), ts) - 1) < 0.05
    x, _ = Pa.noise_search(denoiser, jax.random.key(1), (4000, 2), lambda x: x[:, 0], rounds=0, grid=ts[::4], steps=10)
    assert abs(float(jnp.std(x)) / spread_of_sample(DDIM(), ts[::4]) - 1) < 0.05
    with pytest.raises(ValueError, match="t_max=80.0 disagrees with the explicit grid"):
        Pa.smc(denoiser, jax.random.key(0), (8, 2), lambda x0, t: x0[:, 0], steps=40, grid=ts, t_max=80.0)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shape=(0, 2)), "at least one particle"),
        (dict(log_potential=lambda x0, t: x0), "must return \\(8,\\)"),
        (dict(resampling="systemic"), "did you mean 'systematic'"),
        (dict(eta=0.0), "eta must lie in \\(0, 1\\]"),
        (dict(potential="mean"), "unknown potential"),
        (dict(ess_threshold=1.5), "ess_threshold"),
    ],
)
def test_bad_smc_input_is_refused_before_the_network_runs(kwargs, match):
    net = CountingNetwork()
    options = dict(shape=(8, 2), log_potential=lambda x0, t: x0[:, 0]) | kwargs
    shape, lp = options.pop("shape"), options.pop("log_potential")
    with pytest.raises(ValueError, match=match):
        Pa.smc(Denoiser(net, PROCESS, "eps"), jax.random.key(0), shape, lp, **options)
    assert net.calls == 0


def test_bad_reward_shape_for_best_of_n():
    with pytest.raises(ValueError, match="reward returned shape \\(4, 2\\)"):
        Pa.best_of_n(gaussian([0.0, 0.0], 1.0).denoiser(PROCESS), jax.random.key(0), (4, 2), lambda x: x, 2)
