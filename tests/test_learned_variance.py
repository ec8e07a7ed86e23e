"""Learned variances (improved DDPM): the posterior, the interpolated variance, the VLB term against
closed forms, the hybrid loss's stop-gradient, and the ancestral sampler that uses v."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import integrate, stats

from diffjax import models
from diffjax.denoisers import (
    Denoiser,
    LearnedVarianceDenoiser,
    gaussian_posterior,
    interpolated_log_variance,
)
from diffjax.losses import discretized_gaussian_log_likelihood, gaussian_kl, hybrid_loss, vlb_term
from diffjax.models.pretrained import ddpm_betas
from diffjax.processes import VP, DiscreteVP
from diffjax.samplers import Ancestral, LearnedVarianceAncestral, respaced_times, sample

N = 1000
BETAS = ddpm_betas("linear", N)
ALPHA_BAR = np.cumprod(1 - BETAS)  # alpha_bar_i at t = i / N, i = 1..N
CHAIN = DiscreteVP.from_betas(BETAS)


def _ddpm_posterior(i, x_t, x0):
    """Ho et al. 2020 eq. 7 for step i -> i - 1 (i >= 2), float64."""
    ab, ab_prev, beta = ALPHA_BAR[i - 1], ALPHA_BAR[i - 2], BETAS[i - 1]
    mean = beta * np.sqrt(ab_prev) / (1 - ab) * x0 + (1 - ab_prev) * np.sqrt(1 - beta) / (1 - ab) * x_t
    return mean, beta * (1 - ab_prev) / (1 - ab), beta


@pytest.mark.parametrize("i", [2, 37, 500, 1000])
def test_posterior_is_ddpm_eq_7(i):
    x_t, x0 = np.array([[0.3, -1.2]]), np.array([[0.9, 0.1]])
    t, s = jnp.array([i / N]), jnp.array([(i - 1) / N])
    mean, log_min, log_max = gaussian_posterior(CHAIN, jnp.asarray(x_t), jnp.asarray(x0), t, s)
    want_mean, var_tilde, beta = _ddpm_posterior(i, x_t, x0)
    np.testing.assert_allclose(mean, want_mean, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(np.exp(log_min), [var_tilde], rtol=2e-3)
    np.testing.assert_allclose(np.exp(log_max), [beta], rtol=2e-3)
    lv = interpolated_log_variance(jnp.array([[-1.0, 1.0]]), log_min, log_max)
    np.testing.assert_allclose(lv, [[log_min[0], log_max[0]]], rtol=1e-6)


def test_gaussian_kl_against_quadrature():
    m1, lv1, m2, lv2 = 0.4, np.log(0.3), -0.2, np.log(0.8)
    p, q = stats.norm(m1, np.exp(lv1 / 2)), stats.norm(m2, np.exp(lv2 / 2))
    want, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -20, 20)
    np.testing.assert_allclose(gaussian_kl(m1, lv1, m2, lv2), want, rtol=1e-5)


@pytest.mark.parametrize(
    "x, mean, std",
    [(-1.0, -0.9, 0.1), (1.0, 0.95, 0.05), (0.2, 0.21, 0.01), (0.5, -0.8, 0.02), (-0.5, 0.9, 0.03)],
)
def test_discretized_decoder_is_the_bin_probability(x, mean, std):
    """log of the N(mean, std^2) mass of x's bin (edges open at -1 and 1), also far in the tail."""
    half = 1 / 255
    lo = -np.inf if x <= -1 + half else x - half
    hi = np.inf if x >= 1 - half else x + half
    d = stats.norm(mean, std)
    if hi == np.inf:
        want = d.logsf(lo)
    elif lo == -np.inf:
        want = d.logcdf(hi)
    elif lo > mean:  # upper tail: difference of survival functions
        want = d.logsf(lo) + np.log1p(-np.exp(d.logsf(hi) - d.logsf(lo)))
    else:
        want = d.logcdf(hi) + np.log1p(-np.exp(d.logcdf(lo) - d.logcdf(hi)))
    got = discretized_gaussian_log_likelihood(jnp.float32(x), jnp.float32(mean), jnp.float32(2 * np.log(std)))
    assert np.isfinite(got)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_vlb_term_is_the_kl_and_the_decoder():
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(np.round(rng.uniform(-1, 1, (2, 3)) * 127.5) / 127.5, jnp.float32)
    x0_hat = x0 + 0.05 * jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    x_t = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    v = jnp.asarray(rng.uniform(-1, 1, (2, 3)), jnp.float32)
    i = np.array([40, 1])  # a KL step and the decoder step
    got = jax.jit(vlb_term)(CHAIN, x0, x_t, jnp.asarray(i / N), jnp.asarray((i - 1) / N), x0_hat, v)
    # step 40: KL(q || p) from eq. 7 with p's variance exp(f log beta + (1 - f) log beta_tilde)
    mean_q, var_tilde, beta = _ddpm_posterior(40, np.asarray(x_t[0], np.float64), np.asarray(x0[0], np.float64))
    mean_p, _, _ = _ddpm_posterior(40, np.asarray(x_t[0], np.float64), np.asarray(x0_hat[0], np.float64))
    f = (np.asarray(v[0], np.float64) + 1) / 2
    var_p = np.exp(f * np.log(beta) + (1 - f) * np.log(var_tilde))
    kl = 0.5 * (np.log(var_p / var_tilde) + (var_tilde + (mean_q - mean_p) ** 2) / var_p - 1)
    np.testing.assert_allclose(got[0], kl.mean() / np.log(2), rtol=5e-3)
    # step 1: -log p(x0 | x_1), variance between beta_1 and beta_tilde of step 2 (guided-diffusion's clip)
    _, var_tilde_2, _ = _ddpm_posterior(2, 0.0, 0.0)
    f = (np.asarray(v[1], np.float64) + 1) / 2
    std = np.sqrt(np.exp(f * np.log(BETAS[0]) + (1 - f) * np.log(var_tilde_2)))
    lp = []
    for x, m, sd in zip(np.asarray(x0[1], np.float64), np.asarray(x0_hat[1], np.float64), std):
        d, h = stats.norm(m, sd), 1 / 255
        lo, hi = (-np.inf if x < -0.999 else x - h), (np.inf if x > 0.999 else x + h)
        lp.append(np.log(d.cdf(hi) - d.cdf(lo)))
    np.testing.assert_allclose(got[1], -np.mean(lp) / np.log(2), rtol=2e-3)


def _toy_net(params, x, t):
    """eps = a x, v = tanh(b) everywhere: 2C channels."""
    return jnp.concatenate([params["a"] * x, jnp.tanh(params["b"]) * jnp.ones_like(x)], -1)


@pytest.mark.slow
def test_hybrid_loss_trains_the_mean_by_mse_and_the_variance_by_the_bound():
    params = {"a": jnp.float32(0.3), "b": jnp.float32(0.2)}
    batch = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (16, 4, 4, 1)), jnp.float32)
    key = jax.random.key(0)
    full, mse_only = hybrid_loss(_toy_net, CHAIN), hybrid_loss(_toy_net, CHAIN, vlb_weight=0.0)

    @jax.jit
    def run(p):
        (loss, aux), g_full = jax.value_and_grad(lambda q: full(q, key, batch), has_aux=True)(p)
        return loss, aux, g_full, jax.grad(lambda q: mse_only(q, key, batch)[0])(p)

    loss, aux, g_full, g_mse = run(params)
    np.testing.assert_allclose(g_full["a"], g_mse["a"], rtol=1e-6)  # stop-gradient: the bound leaves eps alone
    assert float(g_mse["b"]) == 0.0 and abs(float(g_full["b"])) > 0.0
    np.testing.assert_allclose(loss, aux["mse"] + aux["vlb"], rtol=1e-6)
    with pytest.raises(TypeError, match="DiscreteVP"):
        hybrid_loss(_toy_net, VP())
    with pytest.raises(ValueError, match="2C channels"):
        hybrid_loss(lambda p, x, t: x, CHAIN)(params, key, batch)


def _gaussian_eps(scale, v_value):
    """The exact eps of N(0, scale^2 I) data under CHAIN, with a constant v."""

    def fn(x, t):
        a, s = CHAIN.alpha(t)[:, None], CHAIN.sigma(t)[:, None]
        eps = s * x / (a**2 * scale**2 + s**2)
        return jnp.concatenate([eps, jnp.full_like(x, v_value)], -1)

    return fn


def test_with_the_posterior_variance_it_is_the_fixed_variance_ancestral_sampler():
    grid = respaced_times(N, 12)
    key, shape = jax.random.key(3), (256, 2)
    lv = LearnedVarianceDenoiser(_gaussian_eps(0.7, -1.0), CHAIN, "eps")
    plain = Denoiser(lambda x, t: _gaussian_eps(0.7, -1.0)(x, t)[..., :2], CHAIN, "eps")
    a = sample(lv, key, shape, solver=LearnedVarianceAncestral(), steps=11, grid=grid).samples
    b = sample(plain, key, shape, solver=Ancestral(), steps=11, grid=grid).samples
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # a plain Denoiser has no v: the solver takes the posterior variance, i.e. it is Ancestral
    c = sample(plain, key, shape, solver=LearnedVarianceAncestral(), steps=11, grid=grid).samples
    np.testing.assert_allclose(c, b, rtol=1e-4, atol=1e-5)


def test_one_step_has_the_interpolated_variance():
    x = jnp.zeros((20000, 1))
    t, s = 0.5, 0.5 - 1 / N * 20
    den = LearnedVarianceDenoiser(_gaussian_eps(1.0, 0.0), CHAIN, "eps")
    step = jax.jit(lambda x, key: LearnedVarianceAncestral().step(den, x, None, jnp.float32(t), jnp.float32(s), key)[0])
    x_next = step(x, jax.random.key(5))
    _, log_min, log_max = gaussian_posterior(CHAIN, x, x, jnp.array([t]), jnp.array([s]))
    want = float(jnp.exp(0.5 * (log_min[0] + log_max[0])))  # v = 0: the geometric mean
    assert abs(float(jnp.var(x_next)) / want - 1) < 0.05  # 20000 draws: std error of a variance ~ 1 %


def test_respaced_times_are_guided_diffusions():
    # space_timesteps(10, [4]): stride 3 -> steps {0, 3, 6, 9}
    np.testing.assert_allclose(respaced_times(10, 4), np.array([10, 7, 4, 1]) / 10)
    dit = np.round(respaced_times(1000, 250) * 1000 - 1).astype(int)
    assert len(dit) == 250 and dit[0] == 999 and dit[-1] == 0 and list(dit[:3]) == [999, 995, 991]
    with pytest.raises(ValueError, match="count"):
        respaced_times(10, 11)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("DiT-S/2", dict(image_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=3)),
        pytest.param(
            "ADM-cifar10",
            dict(
                image_size=8, model_channels=16, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=8
            ),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "DDPM++-cifar10",
            dict(image_size=8, nf=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_learn_sigma_doubles_the_output_channels(name, overrides):
    abstract = nnx.eval_shape(lambda: models.create(name, learn_sigma=True, **overrides))
    apply, params = models.functional(abstract)
    c = models.get_config(name, **overrides).in_channels
    out = jax.eval_shape(apply, params, jnp.zeros((2, 8, 8, c)), jnp.zeros((2,)))
    assert out.shape == (2, 8, 8, 2 * c)
