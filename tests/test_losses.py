"""Denoising losses: stationary at the exact denoiser, time-sampler densities, unbiased ELBO
weighting, training a tiny MLP, and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax import losses
from diffjax import processes as P
from diffjax.data.toy import sample_toy_2d

TRUE_MEAN = jnp.array([0.4, -0.3, 0.1, 0.0])
TRUE_LOG_STD = jnp.log(jnp.array([0.5, 0.3, 0.8, 0.4]))
SIGMA_DATA = 0.5


def gaussian_posterior_mean(params, x, alpha, sigma):
    """E[x0 | x] for x0 ~ N(mean, diag(std^2)) with (mean, log std) = params."""
    mean, log_std = params
    var = jnp.exp(2 * log_std)
    a, s = alpha[:, None], sigma[:, None]
    return mean + a * var / (a**2 * var + s**2) * (x - a * mean)


def exact_network(process, prediction):
    """A network of the given prediction type that is exact when params are the true ones."""
    from diffjax.denoisers import PathCoefficients, from_x0_eps

    if prediction == "edm":

        def raw(params, x_in, c_noise):
            s = jnp.exp(4.0 * c_noise)
            x_scaled = x_in * jnp.sqrt(s**2 + SIGMA_DATA**2)[:, None]
            d = gaussian_posterior_mean(params, x_scaled, jnp.ones_like(s), s)
            c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
            c_out = s * SIGMA_DATA / jnp.sqrt(s**2 + SIGMA_DATA**2)
            return (d - c_skip[:, None] * x_scaled) / c_out[:, None]

        return raw

    def net(params, x, t):
        c = PathCoefficients.at(process, t, x)
        alpha, sigma = process.alpha(t), process.sigma(t)
        x0 = gaussian_posterior_mean(params, x, alpha, sigma)
        return from_x0_eps(x0, (x - c.alpha * x0) / c.sigma, prediction, c)

    return net


def mean_gradient(loss_fn, params, n_batches=24, batch_size=4096, seed=0):
    """Mean and standard error of the loss gradient over independent batches."""
    grad_fn = jax.jit(jax.grad(lambda p, k, b: loss_fn(p, k, b)[0]))
    grads = []
    for i in range(n_batches):
        key_data, key_loss = jax.random.split(jax.random.key(seed * 1000 + i))
        x0 = TRUE_MEAN + jnp.exp(TRUE_LOG_STD) * jax.random.normal(key_data, (batch_size, 4))
        g = grad_fn(params, key_loss, {"image": x0})
        grads.append(np.concatenate([np.ravel(g[0]), np.ravel(g[1])]))
    grads = np.stack(grads)
    return grads.mean(0), grads.std(0, ddof=1) / np.sqrt(n_batches)


CASES = [
    # (process, prediction, target, weighting, time sampler)
    ("vp", "eps", None, "uniform", "uniform"),
    ("vp", "x0", None, "uniform", "uniform"),
    ("cosine", "v", None, "uniform", "uniform"),
    ("vp", "score", None, "uniform", "uniform"),
    ("flow", "flow", None, "uniform", "logit_normal"),
    ("edm", "edm", None, "uniform", "lognormal"),
    ("vp", "eps", "x0", "snr", "uniform"),
    ("cosine", "v", None, "min_snr", "uniform"),
    ("vp", "x0", "eps", "edm", "lognormal"),
    ("vp", "eps", None, "likelihood", "importance"),
    ("ddpm", "eps", None, "sigmoid", "importance"),
    ("flow", "x0", "flow", "uniform", "uniform"),
    ("ve", "eps", "edm", "uniform", "uniform"),
]

PROCESSES = {
    "vp": P.VP(),
    "ddpm": P.VP.from_betas(np.linspace(1e-4, 0.02, 1000)),
    "cosine": P.CosineVP(),
    "ve": P.VE(),
    "edm": P.EDM(),
    "flow": P.FlowMatching(),
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_gradient_is_zero_in_mean_at_exact_denoiser(case):
    """At the true parameters the expected gradient vanishes (every weighting is minimised by
    the posterior mean); 0.3 away from them it is many standard errors from zero."""
    name, prediction, target, weighting, sampler = case
    process = PROCESSES[name]
    loss_fn = losses.denoising_loss(
        exact_network(process, prediction),
        process,
        prediction=prediction,
        target=target,
        weighting=weighting,
        time_sampler=sampler,
        sigma_data=SIGMA_DATA,
    )
    true = (TRUE_MEAN, TRUE_LOG_STD)
    mean, se = mean_gradient(loss_fn, true)
    assert np.all(np.abs(mean) < 4.5 * se + 1e-7), (mean, se)

    shifted = (TRUE_MEAN + 0.3, TRUE_LOG_STD)
    mean_s, se_s = mean_gradient(loss_fn, shifted, n_batches=8, seed=1)
    # Along the shift, the loss must rise: the gradient's projection on it is far above zero.
    projection, projection_se = mean_s[:4].sum(), np.sqrt(np.sum(se_s[:4] ** 2))
    assert projection > 6 * projection_se, (mean_s, se_s)


@pytest.mark.parametrize(
    "name, sampler, options",
    [
        ("vp", "uniform", {}),
        ("vp", "uniform", {"antithetic": True}),
        ("flow", "logit_normal", {"mean": 0.3, "std": 0.8}),
        ("vp", "importance", {}),
        ("cosine", "importance", {}),
        ("edm", "lognormal", {}),
    ],
)
def test_time_sampler_densities_integrate_correctly(name, sampler, options):
    """E_p[1/p(t)] = t_max - t_min for a density p on [t_min, t_max], and E_p[h(t)/p(t)] is the
    integral of h: checks the reported densities, not just the draws."""
    process = PROCESSES[name]
    t, density = losses.sample_times(
        sampler, process, jax.random.key(0), 400_000, process.t_min, process.t_max, **options
    )
    assert float(t.min()) >= process.t_min - 1e-6 and float(t.max()) <= process.t_max + 1e-6
    span = process.t_max - process.t_min
    h = lambda t: jnp.sin(jnp.pi * (t - process.t_min) / span) ** 2  # noqa: E731
    est = np.asarray(h(t) / density, np.float64)
    want = span / 2
    assert abs(est.mean() - want) < 5 * est.std() / np.sqrt(est.size) + 1e-3 * want


def test_likelihood_weighting_is_unbiased_across_samplers():
    """The likelihood-weighted loss estimates one integral whatever the time sampler: uniform
    and importance sampling agree on an imperfect network."""
    process = PROCESSES["vp"]
    net = exact_network(process, "eps")
    params = (TRUE_MEAN + 0.2, TRUE_LOG_STD - 0.1)

    def estimate(sampler):
        loss_fn = jax.jit(
            losses.denoising_loss(net, process, weighting="likelihood", time_sampler=sampler)
        )
        values = []
        for i in range(40):
            key_data, key_loss = jax.random.split(jax.random.key(i))
            x0 = TRUE_MEAN + jnp.exp(TRUE_LOG_STD) * jax.random.normal(key_data, (8192, 4))
            values.append(float(loss_fn(params, key_loss, {"image": x0})[0]))
        return np.mean(values), np.std(values, ddof=1) / np.sqrt(len(values))

    (m_u, se_u), (m_i, se_i) = estimate("uniform"), estimate("importance")
    assert abs(m_u - m_i) < 4 * np.hypot(se_u, se_i), (m_u, se_u, m_i, se_i)
    assert se_i < se_u  # importance sampling is the lower-variance estimator


def mlp_apply(params, x, t):
    h = jnp.concatenate([x, jnp.sin(t[:, None] * jnp.arange(1, 5)), jnp.cos(t[:, None] * jnp.arange(1, 5))], 1)
    for w, b in params[:-1]:
        h = jax.nn.silu(h @ w + b)
    w, b = params[-1]
    return h @ w + b


def mlp_init(key, width=64):
    sizes = [(10, width), (width, width), (width, 2)]
    keys = jax.random.split(key, len(sizes))
    return [
        (jax.random.normal(k, s) / np.sqrt(s[0]), jnp.zeros(s[1])) for k, s in zip(keys, sizes)
    ]


@pytest.mark.parametrize(
    "name, prediction, weighting, sampler",
    [
        ("vp", "eps", "uniform", "uniform"),
        ("cosine", "v", "min_snr", "uniform"),
        ("flow", "flow", "uniform", "logit_normal"),
        ("edm", "edm", "uniform", "lognormal"),
    ],
)
def test_loss_decreases_training_a_tiny_mlp_on_2d_data(name, prediction, weighting, sampler):
    process = PROCESSES[name]
    loss_fn = losses.denoising_loss(
        mlp_apply, process, prediction=prediction, weighting=weighting, time_sampler=sampler
    )
    optimizer = optax.adam(3e-3)
    params = mlp_init(jax.random.key(0))
    state = optimizer.init(params)

    @jax.jit
    def train_step(params, state, key):
        key_data, key_loss = jax.random.split(key)
        batch = {"image": sample_toy_2d("moons", key_data, 512)}
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, key_loss, batch)[0])(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    eval_keys = jax.random.split(jax.random.key(99), 16)
    eval_batch = {"image": sample_toy_2d("moons", jax.random.key(7), 4096)}
    evaluate = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: loss_fn(p, k, eval_batch)[0])(eval_keys)))
    before = float(evaluate(params))
    for key in jax.random.split(jax.random.key(1), 400):
        params, state, _ = train_step(params, state, key)
    after = float(evaluate(params))
    # Fixed evaluation keys: the comparison has no noise. (EDM's F-loss is ~1 at any optimum.)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prediction": "noise"}, "unknown prediction"),
        ({"target": "velocity"}, "unknown target"),
        ({"weighting": "p2"}, "unknown weighting"),
        ({"time_sampler": "beta"}, "unknown time sampler"),
        ({"weighting": "min_snr", "weighting_options": {"gamma": -1.0}}, "gamma must be positive"),
        ({"weighting": "snr", "weighting_options": {"gamma": 5.0}}, "unknown option"),
        ({"time_sampler": "lognormal", "time_sampler_options": {"sd": 1.0}}, "unknown option"),
        ({"sigma_data": 0.0}, "sigma_data"),
        ({"t_min": 0.0}, "outside"),
    ],
)
def test_bad_loss_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        losses.denoising_loss(lambda p, x, t: x, PROCESSES["vp"], **kwargs)
