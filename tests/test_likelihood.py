"""Likelihoods against closed forms: the probability-flow ODE log-density of a Gaussian mixture's
exact denoiser under every process, Hutchinson against the exact trace within its standard error,
the ELBO against the exact density of the model it bounds, bits/dim of known densities, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from diffjax import processes as P
from diffjax.data.toy import GaussianMixture, gaussian
from diffjax.denoisers import Denoiser
from diffjax.likelihood import bits_per_dim, elbo, log_likelihood

# 4-D, three anisotropic components of very different widths.
MIXTURE = GaussianMixture.create(
    [0.2, 0.3, 0.5],
    [[0.8, -0.6, 0.3, 0.0], [-0.5, 0.5, -0.4, 0.6], [0.1, 0.2, 0.6, -0.5]],
    [[0.05, 0.1, 0.08, 0.1], [0.3, 0.2, 0.25, 0.15], [0.15, 0.4, 0.2, 0.3]],
)
GAUSSIAN = gaussian([0.3, -0.2], [0.5, 0.2])

ALL_PROCESSES = {
    "vp": P.VP(),
    "ddpm": P.get_process("ddpm"),  # the 1000-step DDPM chain
    "cosine": P.CosineVP(),
    "subvp": P.SubVP(),
    "ve": P.VE(),
    "edm": P.EDM(),
    "flow": P.FlowMatching(),
}


def marginal_log_prob(dist, process, t, x):
    """log p_t(x) of the data distribution under the process (closed form)."""
    t = jnp.float32(t)
    return dist.marginal_log_prob(x, process.alpha(t), process.sigma(t))


# ------------------------------------------------------------------------------------------------
# Probability-flow ODE log-likelihood
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_PROCESSES))
def test_exact_log_likelihood_matches_the_mixture_density(name):
    """The ODE returns log p_{t_min}(x), the mixture's density at t_min, to 0.01 nats/dim (what
    remains is mostly the prior's neglect of alpha(t_max) x0)."""
    process = ALL_PROCESSES[name]
    x = MIXTURE.sample(jax.random.key(1), 16)
    run = jax.jit(lambda x, key: log_likelihood(MIXTURE.denoiser(process), x, key))
    result = run(x, jax.random.key(0))
    exact = marginal_log_prob(MIXTURE, process, process.t_min, x)
    error = np.abs(np.asarray(result.log_prob - exact)) / MIXTURE.dim
    assert error.max() < 0.01, (name, error.max())
    assert 1 < int(result.nfe) < 1000 and (int(result.nfe) - 1) % 6 == 0
    np.testing.assert_array_equal(result.stderr, 0.0)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_agrees_with_the_exact_trace_within_its_standard_error(probe):
    process = P.VP()
    denoiser = MIXTURE.denoiser(process)
    x = MIXTURE.sample(jax.random.key(2), 8)
    exact = jax.jit(lambda x: log_likelihood(denoiser, x, jax.random.key(0)).log_prob)(x)
    run = jax.jit(lambda x, key: log_likelihood(denoiser, x, key, divergence="hutchinson", probe=probe, num_probes=128))
    estimate = run(x, jax.random.key(3))
    stderr = np.asarray(estimate.stderr)
    assert np.all(np.isfinite(stderr)) and np.all(stderr > 1e-3), stderr  # the probes do vary
    z = np.asarray(estimate.log_prob - exact) / stderr
    assert np.all(np.abs(z) < 4.0), z


def test_running_out_of_steps_gives_nan_not_a_wrong_number():
    x = GAUSSIAN.sample(jax.random.key(4), 4)
    run = jax.jit(lambda x, key: log_likelihood(GAUSSIAN.denoiser(P.EDM()), x, key, max_steps=3))
    result = run(x, jax.random.key(0))
    assert np.all(np.isnan(result.log_prob)) and int(result.nfe) == 1 + 3 * 6


def test_log_likelihood_on_image_shaped_data_and_bits_per_dim():
    """NHWC input through bits_per_dim: the ODE's bits/dim equal those of the exact density of the
    same dequantized images."""
    process = P.VP()
    images = jnp.round((jnp.clip(MIXTURE.sample(jax.random.key(5), 8), -1, 1) + 1) * 127.5)
    images = images.astype(jnp.uint8).reshape(8, 2, 2, 1)
    key = jax.random.key(6)
    log_prob = lambda x, k: log_likelihood(MIXTURE.denoiser(process), x, k).log_prob  # noqa: E731
    ode = jax.jit(lambda im, k: bits_per_dim(log_prob, im, k))
    exact_log_prob = lambda x, _: marginal_log_prob(MIXTURE, process, process.t_min, x)  # noqa: E731
    exact = jax.jit(lambda im, k: bits_per_dim(exact_log_prob, im, k))(images, key)
    got = ode(images, key)
    assert got.shape == (8,)
    np.testing.assert_allclose(got, exact, atol=5e-3)


# ------------------------------------------------------------------------------------------------
# ELBO
# ------------------------------------------------------------------------------------------------


def elbo_and_closed_form(process, num_points=8, replicas=512, num_times=64):
    """(ELBO averaged over `replicas` per-example-keyed estimates, its standard error, log p(x),
    log p(x) - E[ELBO(x)]) for num_points points x of GAUSSIAN = N(mu, diag(s^2)) and its exact
    denoiser, all in closed form but the first two.

    The bounded model is the reverse process followed by the decoder N(x; z0/a0, s0^2 I),
    a0, s0 = alpha, sigma/alpha at t_min: p(x) = N(x; mu, s^2 + 2 s0^2). With the exact denoiser
    the model's path given z0 is the forward one, so the gap log p(x) - ELBO(x) is
    KL(q(z0 | x) || p(z0 | x)) with q(z0 | x) = N(a0 x, sig0^2) and p(z0 | x) proportional to
    N(z0; a0 x, sig0^2) N(z0; a0 mu, a0^2 s^2 + sig0^2), per dimension (up to the prior's
    neglect of alpha(t_max) x0)."""
    x = GAUSSIAN.sample(jax.random.key(7), num_points)
    run = jax.jit(lambda x, key: elbo(GAUSSIAN.denoiser(process), x, key, num_times=num_times).value)
    values = np.asarray(run(jnp.repeat(x, replicas, axis=0), jax.random.key(8))).reshape(num_points, replicas)

    x, mu, s = (np.asarray(a, np.float64) for a in (x, GAUSSIAN.means[0], GAUSSIAN.stds[0]))
    t = jnp.float32(process.t_min)
    a0, sig0 = float(process.alpha(t)), float(process.sigma(t))
    var = s**2 + 2 * (sig0 / a0) ** 2
    log_p = np.sum(-0.5 * (x - mu) ** 2 / var - 0.5 * np.log(2 * np.pi * var), axis=1)
    marginal_var = a0**2 * s**2 + sig0**2
    post_var = 1.0 / (1.0 / sig0**2 + 1.0 / marginal_var)
    post_mean = post_var * (a0 * x / sig0**2 + a0 * mu / marginal_var)
    kl = 0.5 * np.sum(
        np.log(post_var / sig0**2) + sig0**2 / post_var + (a0 * x - post_mean) ** 2 / post_var - 1, axis=1
    )
    return values.mean(axis=1), values.std(axis=1, ddof=1) / math.sqrt(replicas), log_p, kl


@pytest.mark.parametrize(
    "process",
    [P.VP(), P.VP(t_min=0.05), P.EDM(sigma_min=0.1)],
    ids=["vp", "vp-tmin0.05", "edm-sigmamin0.1"],
)
def test_elbo_equals_the_closed_form_bound_for_a_gaussian(process):
    """E[ELBO] = log p(x) - KL, KL >= 0 in closed form: tiny (tight bound) at the default t_min,
    clearly positive (ELBO strictly below log p) when t_min leaves a noise comparable to the data's."""
    value, stderr, log_p, gap = elbo_and_closed_form(process)
    z = (value - (log_p - gap)) / stderr
    assert np.all(np.abs(z) < 4.0), z
    assert np.all(gap >= 0)
    if process.t_min < 0.01:  # the default: the bound is tight
        assert gap.max() < 0.01 * GAUSSIAN.dim, gap
    else:  # the ELBO is resolvably below the log-likelihood
        assert (log_p - value).mean() > 5 * math.sqrt(np.sum(stderr**2)) / len(value), (log_p - value, stderr)


def test_elbo_terms_and_batch_independence():
    process = P.VE()
    x = GAUSSIAN.sample(jax.random.key(9), 4)
    run = jax.jit(lambda x, key: elbo(GAUSSIAN.denoiser(process), x, key, num_times=8))
    bound = run(x, jax.random.key(0))
    np.testing.assert_allclose(bound.value, -(bound.reconstruction + bound.prior_kl + bound.diffusion), rtol=1e-6)
    # reconstruction term of the Gaussian decoder: D/2 log(2 pi e s0^2), s0 = sigma_min for VE
    np.testing.assert_allclose(bound.reconstruction, 0.5 * 2 * math.log(2 * math.pi * math.e * 0.01**2), rtol=1e-5)
    # prior KL of N(x, 50^2) from N(0, 50^2): |x|^2 / (2 50^2)
    np.testing.assert_allclose(bound.prior_kl, np.sum(np.asarray(x) ** 2, axis=1) / (2 * 50.0**2), rtol=1e-3)
    assert np.all(bound.diffusion > 0)
    np.testing.assert_allclose(run(x[:2], jax.random.key(0)).value, bound.value[:2], rtol=1e-6)  # per-example keys
    assert not np.allclose(run(x, jax.random.key(1)).value, bound.value)


# ------------------------------------------------------------------------------------------------
# Bits per dimension
# ------------------------------------------------------------------------------------------------


def test_uniform_density_has_exactly_eight_bits_per_dim():
    images = jax.random.randint(jax.random.key(0), (16, 4, 4, 3), 0, 256).astype(jnp.uint8)

    def uniform(x, key):  # the uniform density 2^-D on [-1, 1]^D
        return jnp.full(x.shape[:1], -math.prod(x.shape[1:]) * math.log(2.0))

    bpd = jax.jit(lambda images, key: bits_per_dim(uniform, images, key))(images, jax.random.key(1))
    np.testing.assert_allclose(bpd, 8.0, atol=1e-5)


def test_gaussian_bits_per_dim_match_the_exact_bin_probabilities():
    """Per-pixel N(m, s^2) on [-1, 1]: the dequantized estimate, averaged over the noise, equals
    -log2 of the exact probability of each 8-bit bin (Jensen's gap is ~1e-4 bits at s = 0.3)."""
    m, s = 0.1, 0.3
    images = jnp.clip(jnp.round((m + s * jax.random.normal(jax.random.key(0), (4096, 2, 2, 1)) + 1) * 128), 0, 255)
    images = images.astype(jnp.uint8)

    def gaussian_log_prob(x, key):
        return jnp.sum(jax.scipy.stats.norm.logpdf(x, m, s), axis=(1, 2, 3))

    bpd = jax.jit(lambda images, key: bits_per_dim(gaussian_log_prob, images, key))(images, jax.random.key(1))
    estimate = float(np.mean(bpd))
    k = np.asarray(images, np.float64)
    mass = norm.cdf((k + 1) / 128 - 1, m, s) - norm.cdf(k / 128 - 1, m, s)
    exact = np.mean(-np.log2(mass))
    assert abs(estimate - exact) < 2e-3, (estimate, exact)


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors before any tracing
# ------------------------------------------------------------------------------------------------


class CountingNetwork:
    """A 2-feature linear network that counts how often it is traced or called."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return x @ jnp.eye(2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"divergence": "trace"}, "unknown divergence 'trace'; allowed: \\['exact', 'hutchinson'\\]"),
        (
            {"divergence": "hutchinson", "probe": "sphere"},
            "unknown probe 'sphere'; allowed: \\['rademacher', 'gaussian'\\]",
        ),
        ({"divergence": "hutchinson", "num_probes": 0}, "num_probes must be an int >= 1, got 0"),
        ({"num_probes": 2.0}, "num_probes must be an int >= 1, got 2.0"),
        ({"rtol": 0.0}, "rtol must be a positive finite number, got 0.0"),
        ({"rtol": -1e-3}, "rtol must be a positive finite number, got -0.001"),
        ({"atol": float("nan")}, "atol must be a positive finite number, got nan"),
        ({"max_steps": 0}, "max_steps must be an int >= 1, got 0"),
        ({"t_max": 2.0}, "\\[0.001, 2.0\\] is outside VP's range \\[0.001, 1.0\\]"),
    ],
)
def test_bad_options_raise_before_tracing(kwargs, match):
    network = CountingNetwork()
    with pytest.raises(ValueError, match=match):
        log_likelihood(Denoiser(network, P.VP(), "eps"), jnp.zeros((4, 2)), jax.random.key(0), **kwargs)
    assert network.calls == 0


@pytest.mark.parametrize("fn", [log_likelihood, elbo])
def test_bad_data_shapes_are_named(fn):
    denoiser = Denoiser(CountingNetwork(), P.VP(), "eps")
    with pytest.raises(ValueError, match="the network cannot take x of shape \\(4, 3\\)"):
        fn(denoiser, jnp.zeros((4, 3)), jax.random.key(0))
    with pytest.raises(
        ValueError, match="x must be an array of shape \\(batch, ...\\) with at least 2 axes, got shape \\(4,\\)"
    ):
        fn(denoiser, jnp.zeros((4,)), jax.random.key(0))
    with pytest.raises(ValueError, match="x must be floating point, got dtype int32"):
        fn(denoiser, jnp.zeros((4, 2), jnp.int32), jax.random.key(0))
    with pytest.raises(ValueError, match="the network maps x of shape \\(4, 2\\) to \\(4, 1\\)"):
        fn(Denoiser(lambda x, t: x[:, :1], P.VP(), "eps"), jnp.zeros((4, 2)), jax.random.key(0))


def test_elbo_and_bits_per_dim_bad_input():
    network = CountingNetwork()
    with pytest.raises(ValueError, match="num_times must be an int >= 1, got 0"):
        elbo(Denoiser(network, P.VP(), "eps"), jnp.zeros((4, 2)), jax.random.key(0), num_times=0)
    assert network.calls == 0
    uniform = lambda x, key: jnp.zeros(x.shape[:1])  # noqa: E731
    with pytest.raises(
        ValueError, match="images must hold integers in \\[0, 255\\] \\(e.g. uint8\\), got dtype float32"
    ):
        bits_per_dim(uniform, jnp.zeros((4, 2, 2, 1)), jax.random.key(0))
    with pytest.raises(ValueError, match="images must be an array of shape \\(batch, ...\\)"):
        bits_per_dim(uniform, jnp.zeros((4,), jnp.uint8), jax.random.key(0))
    with pytest.raises(ValueError, match="log_prob_fn must return one log-density per example, shape \\(4,\\)"):
        bits_per_dim(lambda x, key: jnp.zeros(()), jnp.zeros((4, 2), jnp.uint8), jax.random.key(0))
    with pytest.raises(TypeError, match="got a LogLikelihood: return its .log_prob"):
        bits_per_dim(
            lambda x, key: log_likelihood(Denoiser(network, P.VP(), "eps"), x, key),
            jnp.zeros((4, 2), jnp.uint8),
            jax.random.key(0),
        )


def test_eps_network_at_alpha_zero_is_refused():
    with pytest.raises(ValueError, match="does not determine x0 at t_max=1.0 of FlowMatching"):
        log_likelihood(Denoiser(CountingNetwork(), P.FlowMatching(), "eps"), jnp.zeros((4, 2)), jax.random.key(0))
