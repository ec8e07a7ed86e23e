"""Forward processes: log-SNR round trips, SDE coefficients against closed forms, simulated
marginals, priors, and input validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffjax import processes as P

DDPM_BETAS = np.linspace(1e-4, 0.02, 1000)

ALL_PROCESSES = {
    "vp": P.VP(),
    "ddpm": P.VP.from_betas(DDPM_BETAS),
    "cosine": P.CosineVP(),
    "subvp": P.SubVP(),
    "ve": P.VE(),
    "edm": P.EDM(),
    "flow": P.FlowMatching(),
}


def interior_times(process, n=41):
    """Times strictly inside the range (the SDE may be singular at t_max where alpha = 0)."""
    lo, hi = process.t_min, process.t_max
    return jnp.asarray(lo + (hi - lo) * np.linspace(0.02, 0.98, n), jnp.float32)


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_log_snr_round_trip(name):
    process = ALL_PROCESSES[name]
    t = interior_times(process)
    lam = process.log_snr(t)
    assert np.all(np.diff(np.asarray(lam)) < 0), "log-SNR must decrease in t"
    t_back = process.t_from_log_snr(lam)
    np.testing.assert_allclose(t_back, t, rtol=2e-5, atol=2e-5 * (process.t_max - process.t_min))
    lam_back = process.log_snr(process.t_from_log_snr(lam))
    np.testing.assert_allclose(lam_back, lam, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_alpha_sigma_consistent_with_log_snr(name):
    process = ALL_PROCESSES[name]
    t = interior_times(process)
    alpha, sigma = process.alpha(t), process.sigma(t)
    assert np.all(np.asarray(sigma) > 0) and np.all(np.asarray(alpha) > 0)
    np.testing.assert_allclose(process.log_snr(t), 2 * np.log(alpha / sigma), rtol=1e-4, atol=1e-4)


def test_generic_bisection_inverse_matches_closed_form():
    """The base-class bisection (used by SubVP) agrees with VP's closed-form inverse."""
    vp = P.VP()
    lam = vp.log_snr(interior_times(vp))
    np.testing.assert_allclose(P.GaussianProcess.t_from_log_snr(vp, lam), vp.t_from_log_snr(lam), atol=1e-5)


def closed_form_sde(name, process, t):
    """(f, g) written out by hand for each process."""
    t = np.asarray(t, np.float64)
    if name in ("vp", "subvp"):
        beta = process.beta_min + t * (process.beta_max - process.beta_min)
        if name == "vp":
            return -beta / 2, np.sqrt(beta)
        integral = 0.5 * (process.beta_max - process.beta_min) * t**2 + process.beta_min * t
        return -beta / 2, np.sqrt(beta * (1 - np.exp(-2 * integral)))
    if name == "ddpm":
        n = len(DDPM_BETAS)
        beta_cont = n * -np.log1p(-DDPM_BETAS[np.minimum((t * n).astype(int), n - 1)])
        return -beta_cont / 2, np.sqrt(beta_cont)
    if name == "cosine":
        s = process.s
        theta = (t + s) / (1 + s) * np.pi / 2
        f = -np.tan(theta) * np.pi / 2 / (1 + s)
        return f, np.sqrt(-2 * f)  # VP family: g^2 = -2 f
    if name == "ve":
        sigma = process.sigma_min * (process.sigma_max / process.sigma_min) ** t
        return 0 * t, sigma * np.sqrt(2 * np.log(process.sigma_max / process.sigma_min))
    if name == "edm":
        return 0 * t, np.sqrt(2 * t)
    if name == "flow":
        return -1 / (1 - t), np.sqrt(2 * t + 2 * t**2 / (1 - t))
    raise AssertionError(name)


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_sde_coefficients_match_closed_forms(name):
    process = ALL_PROCESSES[name]
    t = interior_times(process)
    if name == "ddpm":  # keep away from the knots, where f jumps
        n = len(DDPM_BETAS)
        t = jnp.asarray((np.floor(np.asarray(t) * n) + 0.5) / n, jnp.float32)
    f, g = process.sde(t)
    f_ref, g_ref = closed_form_sde(name, process, t)
    np.testing.assert_allclose(f, f_ref, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(g, g_ref, rtol=2e-3, atol=1e-5)


SIMULATION_RANGES = {
    "vp": (0.05, 0.6),
    "ddpm": (0.05, 0.6),
    "cosine": (0.05, 0.8),
    "subvp": (0.05, 0.6),
    "ve": (0.1, 0.7),
    "edm": (0.2, 3.0),
    "flow": (0.05, 0.8),
}


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_simulated_forward_sde_matches_marginal(name):
    """Euler-Maruyama on dx = f x dt + g dW from x_{t0} ~ N(alpha(t0) x0, sigma(t0)^2) reaches
    the marginal N(alpha(t1) x0, sigma(t1)^2) at t1."""
    process = ALL_PROCESSES[name]
    t0, t1 = SIMULATION_RANGES[name]
    n, steps, x0 = 40_000, 1_000, 1.5
    key_init, key_path = jax.random.split(jax.random.key(0))
    x = process.alpha(t0) * x0 + process.sigma(t0) * jax.random.normal(key_init, (n,))
    ts = jnp.linspace(t0, t1, steps + 1)

    def step(x, inputs):
        t, dt, key = inputs
        f, g = process.sde(t)
        return x + f * x * dt + g * jnp.sqrt(dt) * jax.random.normal(key, x.shape), None

    inputs = (ts[:-1], jnp.diff(ts), jax.random.split(key_path, steps))
    x, _ = jax.lax.scan(step, x, inputs)
    mean, std = float(jnp.mean(x)), float(jnp.std(x))
    want_mean, want_std = float(process.alpha(t1) * x0), float(process.sigma(t1))
    assert abs(mean - want_mean) < 5 * want_std / math.sqrt(n) + 0.01 * abs(want_mean)
    assert abs(std / want_std - 1) < 0.02


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_prior(name):
    process = ALL_PROCESSES[name]
    x = process.prior_sample(jax.random.key(1), (4000, 8))
    std = float(process.prior_std())
    assert abs(float(jnp.std(x)) / std - 1) < 0.02
    logp = process.prior_logp(x[:5])
    want = stats.norm(0, std).logpdf(np.asarray(x[:5], np.float64)).sum(axis=1)
    np.testing.assert_allclose(logp, want, rtol=1e-4)


def test_prior_logp_at_another_time_is_the_zero_mean_gaussian_of_sigma_t():
    process = P.FlowMatching()
    x = jax.random.normal(jax.random.key(3), (5, 2, 3))
    t = jnp.float32(0.7)
    want = stats.norm(0, float(process.sigma(t))).logpdf(np.asarray(x, np.float64)).sum(axis=(1, 2))
    np.testing.assert_allclose(process.prior_logp(x, t), want, rtol=1e-5)


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_perturb_is_the_path_and_marginal_sample_uses_it(name):
    process = ALL_PROCESSES[name]
    key = jax.random.key(4)
    x0 = jax.random.normal(jax.random.key(5), (6, 2, 2))
    t = jnp.linspace(process.t_min, process.t_max, 6)
    eps = jax.random.normal(key, x0.shape)
    want = process.alpha(t)[:, None, None] * x0 + process.sigma(t)[:, None, None] * eps
    np.testing.assert_allclose(process.perturb(x0, t, eps), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(process.marginal_sample(key, x0, t), process.perturb(x0, t, eps))


def test_per_example_reduces_every_non_batch_axis():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(P.per_example(jnp.sum, x), [66.0, 210.0])
    np.testing.assert_array_equal(P.per_example(jnp.max, x, keepdims=True), jnp.array([11.0, 23.0]).reshape(2, 1, 1))
    np.testing.assert_allclose(P.per_example(jnp.std, x), np.std(np.asarray(x).reshape(2, -1), axis=1), rtol=1e-6)


def test_prior_of_vp_family_is_near_standard_normal():
    for name in ("vp", "ddpm", "cosine", "flow"):
        assert abs(float(ALL_PROCESSES[name].prior_std()) - 1) < 1e-3, name


def test_ddpm_chain_knots_are_the_discrete_chain():
    process = ALL_PROCESSES["ddpm"]
    steps = np.arange(1, 1001)
    alpha_bar = np.cumprod(1 - DDPM_BETAS)
    np.testing.assert_allclose(process.alpha(steps / 1000) ** 2, alpha_bar, rtol=2e-5)
    assert process.num_steps == 1000 and process.t_min == pytest.approx(1e-3)


def test_processes_are_pytrees_usable_under_jit():
    ddpm = ALL_PROCESSES["ddpm"]
    assert len(jax.tree_util.tree_leaves(ddpm)) == 1
    assert jax.tree_util.tree_leaves(P.VP()) == []
    for process in (ddpm, P.VP(), P.EDM()):
        t = jnp.float32(0.5 * (process.t_min + process.t_max))
        np.testing.assert_allclose(jax.jit(lambda p, t: p.sigma(t))(process, t), process.sigma(t))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: P.VP(beta_min=-1.0), "beta_min"),
        (lambda: P.VP(beta_min=5.0, beta_max=1.0), "beta_max > beta_min"),
        (lambda: P.VP(t_min=0.0), "t_min > 0"),
        (lambda: P.VE(sigma_min=2.0, sigma_max=1.0), "sigma_max > sigma_min"),
        (lambda: P.EDM(sigma_min=0.0), "sigma_min"),
        (lambda: P.CosineVP(s=1.5), "offset s"),
        (lambda: P.FlowMatching(t_min=0.5, t_max=0.2), "t_min < t_max"),
        (lambda: P.VP.from_betas([0.1, 1.5]), r"\(0, 1\)"),
        (lambda: P.VP.from_betas([[0.1]]), "1-D"),
        (lambda: P.get_process("vpp"), r"unknown process 'vpp' \(did you mean 'vp'\?\); allowed: \["),
        (lambda: P.get_process("vp", sigma_max=3.0), r"unknown option 'sigma_max' for process 'vp'.*allowed"),
    ],
)
def test_bad_process_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_check_times():
    with pytest.raises(ValueError, match="outside"):
        P.VP().check_times(0.0, 1.0)
    with pytest.raises(ValueError, match="outside"):
        P.EDM().check_times(0.01, 100.0)
    P.EDM().check_times(0.01, 80.0)


def test_get_process_builds_ddpm_from_linear_betas():
    process = P.get_process("ddpm", beta_start=1e-4, beta_end=0.02, num_steps=1000)
    np.testing.assert_allclose(process.log_alpha_bar, ALL_PROCESSES["ddpm"].log_alpha_bar)
