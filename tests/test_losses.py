"""Denoising losses: stationary at the exact denoiser, time-sampler densities, unbiased ELBO
weighting, training a tiny MLP, options as objects (validation, user-defined ones), array batches,
shape and data diagnostics, and input validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax import losses
from diffjax import processes as P
from diffjax.data.toy import sample_toy_2d
from diffjax.denoisers import (
    PRECONDITIONED,
    PREDICTIONS,
    Denoiser,
    EDMPreconditioned,
    EDMPreconditioning,
    PathCoefficients,
    from_x0_eps,
)
from diffjax.losses import (
    SNR,
    Constant,
    EDMWeighting,
    LikelihoodWeighting,
    LogitNormal,
    LogNormal,
    MinSNR,
    Sigmoid,
    UniformLogSNR,
    UniformTime,
)
from diffjax.validation import build_named

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
    if isinstance(prediction, EDMPreconditioned):

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


EDM_RAW = EDMPreconditioned(sigma_data=SIGMA_DATA)

CASES = [
    # (process, prediction, target, weighting, time sampler)
    ("vp", "eps", None, Constant(), UniformTime()),
    ("vp", "x0", None, Constant(), UniformTime()),
    ("cosine", "v", None, Constant(), UniformTime()),
    ("vp", "score", None, Constant(), UniformTime()),
    ("flow", "velocity", None, Constant(), LogitNormal()),
    ("edm", EDM_RAW, None, Constant(), LogNormal()),
    ("vp", "eps", "x0", SNR(), UniformTime()),
    ("cosine", "v", None, MinSNR(), UniformTime()),
    ("vp", "x0", "eps", EDMWeighting(sigma_data=SIGMA_DATA), LogNormal()),
    ("vp", "eps", None, LikelihoodWeighting(), UniformLogSNR()),
    ("ddpm", "eps", None, Sigmoid(), UniformLogSNR()),
    ("flow", "x0", "velocity", Constant(), UniformTime()),
    ("ve", "eps", EDM_RAW, Constant(), UniformTime()),
]


def case_id(value):
    if isinstance(value, str) or value is None:
        return str(value)
    return type(value).__name__


PROCESSES = {
    "vp": P.VP(),
    "ddpm": P.VP.from_betas(np.linspace(1e-4, 0.02, 1000)),
    "cosine": P.CosineVP(),
    "ve": P.VE(),
    "edm": P.EDM(),
    "flow": P.FlowMatching(),
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(case_id(v) for v in c))
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
    "name, sampler",
    [
        ("vp", UniformTime()),
        ("vp", UniformTime(antithetic=True)),
        ("flow", LogitNormal(mean=0.3, std=0.8)),
        ("vp", UniformLogSNR()),
        ("cosine", UniformLogSNR()),
        ("edm", LogNormal()),
    ],
    ids=repr,
)
def test_time_sampler_densities_integrate_correctly(name, sampler):
    """E_p[1/p(t)] = t_max - t_min for a density p on [t_min, t_max], and E_p[h(t)/p(t)] is the
    integral of h: checks the reported densities, not just the draws."""
    process = PROCESSES[name]
    t, density = sampler(process, jax.random.key(0), 400_000, process.t_min, process.t_max)
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
        loss_fn = jax.jit(losses.denoising_loss(net, process, weighting=LikelihoodWeighting(), time_sampler=sampler))
        values = []
        for i in range(40):
            key_data, key_loss = jax.random.split(jax.random.key(i))
            x0 = TRUE_MEAN + jnp.exp(TRUE_LOG_STD) * jax.random.normal(key_data, (8192, 4))
            values.append(float(loss_fn(params, key_loss, {"image": x0})[0]))
        return np.mean(values), np.std(values, ddof=1) / np.sqrt(len(values))

    (m_u, se_u), (m_i, se_i) = estimate(UniformTime()), estimate(UniformLogSNR())
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
    return [(jax.random.normal(k, s) / np.sqrt(s[0]), jnp.zeros(s[1])) for k, s in zip(keys, sizes)]


@pytest.mark.parametrize(
    "name, prediction, weighting, sampler",
    [
        ("vp", "eps", Constant(), UniformTime()),
        pytest.param("cosine", "v", MinSNR(), UniformTime(), marks=pytest.mark.slow),
        pytest.param("flow", "velocity", Constant(), LogitNormal(), marks=pytest.mark.slow),
        ("edm", EDMPreconditioned(), Constant(), LogNormal()),
    ],
    ids=["vp-eps", "cosine-v-min_snr", "flow-velocity", "edm-preconditioned"],
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
    "kwargs, error, match",
    [
        ({"prediction": "noise"}, ValueError, "unknown prediction"),
        ({"prediction": "edm"}, ValueError, "is now spelled EDMPreconditioned"),
        ({"prediction": "flow"}, ValueError, "is now spelled 'velocity'"),
        ({"target": "velocity2"}, ValueError, "unknown target"),
        (
            {"weighting": "min_snr"},
            TypeError,
            r"weighting must be an object such as MinSNR\(gamma=5.0\) \(the config name 'min_snr' is MinSNR\(\)\)",
        ),
        ({"weighting": 3.0}, TypeError, "weighting must be an object"),
        ({"time_sampler": "beta"}, TypeError, "time_sampler must be an object"),
        ({"t_min": 0.0}, ValueError, "outside"),
    ],
)
def test_bad_loss_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        losses.denoising_loss(lambda p, x, t: x, PROCESSES["vp"], **kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MinSNR(gamma=-1.0), "MinSNR gamma must be a positive finite number, got -1.0"),
        (lambda: MinSNR(gamma=float("nan")), "MinSNR gamma must be a positive finite number"),
        (lambda: Sigmoid(bias=float("inf")), "Sigmoid bias must be a finite number"),
        (lambda: EDMWeighting(sigma_data=0.0), "EDMWeighting sigma_data must be a positive"),
        (lambda: LogNormal(std=0.0), "LogNormal std must be a positive"),
        (lambda: LogNormal(mean="a"), "LogNormal mean must be a finite number"),
        (lambda: LogitNormal(std=-2.0), "LogitNormal std must be a positive"),
        (lambda: UniformTime(antithetic=1), "UniformTime antithetic must be True or False, got 1"),
        (lambda: EDMPreconditioned(sigma_data=-0.5), "sigma_data must be a positive"),
    ],
)
def test_options_validate_on_construction(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_options_are_frozen_hashable_and_built_from_config_names():
    """The name tables resolve config names with the dataclass defaults, and refuse unknown names
    and options naming the nearest allowed one."""
    assert build_named(losses.WEIGHTINGS, "min_snr", {}, "loss.weighting") == MinSNR(gamma=5.0)
    assert build_named(losses.WEIGHTINGS, "min_snr", {"gamma": 1.0}, "loss.weighting") == MinSNR(gamma=1.0)
    assert build_named(losses.TIME_SAMPLERS, "lognormal", None, "loss.time_sampler") == LogNormal(-1.2, 1.2)
    assert build_named(losses.WEIGHTINGS, "edm_weighting", {"sigma_data": 1.0}, "w") == EDMWeighting(1.0)
    assert hash(MinSNR()) == hash(MinSNR(5.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        MinSNR().gamma = 1.0
    with pytest.raises(ValueError, match="unknown loss.weighting 'min_snrr' \\(did you mean 'min_snr'\\?\\)"):
        build_named(losses.WEIGHTINGS, "min_snrr", {}, "loss.weighting")
    with pytest.raises(ValueError, match="unknown option 'gama' for loss.weighting 'min_snr' \\(did you mean 'gamma'"):
        build_named(losses.WEIGHTINGS, "min_snr", {"gama": 1.0}, "loss.weighting")
    with pytest.raises(ValueError, match="unknown loss.weighting 'edm'"):  # renamed: one name, one meaning
        build_named(losses.WEIGHTINGS, "edm", {}, "loss.weighting")


def test_former_config_names_map_to_current_ones():
    current = {
        "prediction": set(PREDICTIONS) | set(PRECONDITIONED),
        "target": set(PREDICTIONS) | set(PRECONDITIONED),
        "weighting": set(losses.WEIGHTINGS),
        "time_sampler": set(losses.TIME_SAMPLERS),
    }
    for key, renames in losses.FORMER_NAMES.items():
        for old, new in renames.items():
            assert new in current[key] and old not in current[key], (key, old, new)


@dataclasses.dataclass(frozen=True)
class X0Squared:
    """A user-defined weighting: w = (1 + SNR) on the x0-MSE, declared in x0-space."""

    space = "x0"

    def __call__(self, process, t, density):
        return 1.0 + jnp.exp(process.log_snr(t))


@dataclasses.dataclass(frozen=True)
class FixedTimes:
    """A user-defined time sampler: every example at time `t` (density 1)."""

    t: float = 0.5

    def __call__(self, process, key, n, t_min, t_max):
        return jnp.full((n,), self.t), jnp.ones((n,))


def test_user_defined_weighting_and_time_sampler():
    """Own weighting and time sampler objects plug in by the protocol: the loss equals the hand-computed
    weighted MSE, whatever the target (the weight is converted from its declared space)."""
    process = PROCESSES["vp"]
    params = (TRUE_MEAN + 0.2, TRUE_LOG_STD)
    x0 = TRUE_MEAN + jnp.exp(TRUE_LOG_STD) * jax.random.normal(jax.random.key(0), (64, 4))
    key = jax.random.key(1)
    t = jnp.full((64,), 0.5)
    alpha, sigma = process.alpha(0.5), process.sigma(0.5)
    eps = jax.random.normal(jax.random.split(key, 3)[1], x0.shape)
    x_t = alpha * x0 + sigma * eps
    x0_hat = gaussian_posterior_mean(params, x_t, alpha * jnp.ones(64), sigma * jnp.ones(64))
    want = float(jnp.mean((1.0 + alpha**2 / sigma**2) * jnp.mean((x0_hat - x0) ** 2, axis=1)))
    for target in ("x0", "eps", "v"):
        loss_fn = losses.denoising_loss(
            exact_network(process, "x0"),
            process,
            prediction="x0",
            target=target,
            weighting=X0Squared(),
            time_sampler=FixedTimes(0.5),
        )
        loss, _ = loss_fn(params, key, x0)
        np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    np.testing.assert_allclose(
        losses.loss_weight(X0Squared(), "x0", process, t, jnp.ones(64)), 1 + alpha**2 / sigma**2, rtol=1e-5
    )


def test_array_batch_equals_dict_batch():
    """A raw array is x0 itself (2-D toy data needs no {"image": ...} wrapping)."""
    loss_fn = losses.denoising_loss(mlp_apply, PROCESSES["vp"])
    params = mlp_init(jax.random.key(0))
    data = sample_toy_2d("moons", jax.random.key(1), 128)
    key = jax.random.key(2)
    loss_array, aux = loss_fn(params, key, data)
    loss_dict, _ = loss_fn(params, key, {"image": data})
    assert float(loss_array) == float(loss_dict) and np.isfinite(float(loss_array))
    assert float(aux["nonfinite_data"]) == 0.0


def test_batch_errors_name_the_problem():
    loss_fn = losses.denoising_loss(mlp_apply, PROCESSES["vp"])
    params = mlp_init(jax.random.key(0))
    data = jnp.zeros((8, 2))
    with pytest.raises(ValueError, match="the batch has no entry 'image'.*its entries: \\['x'\\]"):
        loss_fn(params, jax.random.key(0), {"x": data})
    with pytest.raises(ValueError, match="with at least 2 axes, got shape \\(8,\\)"):
        loss_fn(params, jax.random.key(0), jnp.zeros((8,)))
    conditional = losses.denoising_loss(lambda p, x, t, label: x, PROCESSES["vp"], cond_keys=("label",))
    with pytest.raises(ValueError, match="cond_keys \\['label'\\] need a dict batch"):
        conditional({}, jax.random.key(0), data)


@pytest.mark.parametrize("prediction", ["eps", EDMPreconditioned()], ids=["eps", "edm_preconditioned"])
def test_network_output_shape_mismatch_raises_before_compiling(prediction):
    """A network returning (B, 1) for (B, 2) data is refused instead of broadcast in the loss."""
    process = PROCESSES["edm"]
    loss_fn = losses.denoising_loss(lambda p, x, t: x[:, :1], process, prediction=prediction)
    with pytest.raises(ValueError, match=r"shape \(16, 2\) to shape \(16, 1\)"):
        jax.jit(loss_fn)({}, jax.random.key(0), jnp.zeros((16, 2)))


def test_nonfinite_data_is_reported_in_aux():
    loss_fn = jax.jit(losses.denoising_loss(mlp_apply, PROCESSES["vp"]))
    params = mlp_init(jax.random.key(0))
    data = sample_toy_2d("moons", jax.random.key(1), 8).at[3, 1].set(jnp.nan).at[5, 0].set(jnp.inf)
    loss, aux = loss_fn(params, jax.random.key(2), data)
    assert np.isnan(float(loss))
    assert float(aux["nonfinite_data"]) == 2 / 8


def test_edm_spelling_is_the_same_for_loss_and_denoiser():
    """prediction=EDMPreconditioned(sd) in the loss and in the Denoiser: the denoiser is the
    preconditioned x0-predictor, exact for the exact raw network."""
    process = PROCESSES["edm"]
    raw = exact_network(process, EDM_RAW)
    params = (TRUE_MEAN, TRUE_LOG_STD)
    denoiser = Denoiser(lambda x, c_noise: raw(params, x, c_noise), process, EDM_RAW)
    by_hand = Denoiser(EDMPreconditioning(lambda x, c: raw(params, x, c), process, SIGMA_DATA), process, "x0")
    x = jax.random.normal(jax.random.key(0), (32, 4)) * 2.0
    t = jnp.linspace(0.1, 10.0, 32)
    want = gaussian_posterior_mean(params, x, jnp.ones(32), t)
    np.testing.assert_allclose(denoiser.x0(x, t), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(denoiser.x0(x, t), by_hand.x0(x, t), rtol=1e-6)
    assert denoiser.prediction == "x0" and isinstance(denoiser.fn, EDMPreconditioning)


def test_declared_raw_edm_network_is_not_used_as_another_prediction():
    """A network tagged as a raw EDM network cannot be trained or sampled as an x0/eps predictor,
    and an already preconditioned one is not preconditioned twice."""
    process = PROCESSES["edm"]

    def raw(params, x, c_noise):
        return x

    raw.prediction = EDM_RAW
    with pytest.raises(ValueError, match="declares prediction EDMPreconditioned.*given prediction 'x0'"):
        losses.denoising_loss(raw, process, prediction="x0")
    losses.denoising_loss(raw, process, prediction=EDM_RAW)  # the declared one is fine
    with pytest.raises(
        ValueError, match="declares prediction 'x0' but was given prediction EDMPreconditioned.*already preconditioned"
    ):
        Denoiser(EDMPreconditioning(lambda x, c: x, process), process, EDM_RAW)


def test_uncertainty_weighting_is_l_over_exp_u_plus_u():
    """With a constant log-variance c the loss is exp(-c) * (the plain loss) + c, and its gradient in
    c vanishes at c = log(plain loss) (EDM2's Eq. 21 per example, averaged)."""
    process = PROCESSES["vp"]
    apply = lambda p, x, t: mlp_apply(p["net"], x, t)  # noqa: E731
    plain = losses.denoising_loss(apply, process, weighting=MinSNR())
    weighted = losses.denoising_loss(
        apply, process, weighting=MinSNR(), uncertainty=lambda p, t: jnp.full(t.shape, p["u"])
    )
    net = mlp_init(jax.random.key(0))
    data, key = sample_toy_2d("moons", jax.random.key(1), 256), jax.random.key(2)
    base, _ = plain({"net": net}, key, data)
    for c in (-1.0, 0.0, 0.7):
        value, aux = weighted({"net": net, "u": jnp.asarray(c)}, key, data)
        np.testing.assert_allclose(value, np.exp(-c) * base + c, rtol=1e-5)
        assert float(aux["log_variance"]) == pytest.approx(c)
    grad = jax.grad(lambda u: weighted({"net": net, "u": u}, key, data)[0])(jnp.log(base))
    assert abs(float(grad)) < 1e-5
    wrong = losses.denoising_loss(apply, process, uncertainty=lambda p, t: jnp.zeros(()))
    with pytest.raises(ValueError, match="one log-variance per example"):
        wrong({"net": net}, key, data)
    with pytest.raises(TypeError, match="uncertainty must be None or a function"):
        losses.denoising_loss(apply, process, uncertainty=0.5)
