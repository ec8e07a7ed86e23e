"""Inverse problems: measurement operators (adjoint, SVD, pseudo-inverse), the closed-form posterior of a
Gaussian mixture, posterior samplers against it where theory says they are exact, guidance by classifiers
and rewards, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CountingNetwork

from diffjax import processes as P
from diffjax.control import exact as E
from diffjax.control import operators as O
from diffjax.control import posterior as Po
from diffjax.control.guidance import classifier_guidance, reward_guidance
from diffjax.data.toy import GaussianMixture, gaussian
from diffjax.denoisers import Denoiser

OPERATORS = {
    "box": lambda: O.box_inpainting((6, 6, 1), 1, 2, 3, 2),
    "random_pixels": lambda: O.random_inpainting((4, 4, 3), 0.4, seed=1),
    "super_resolution": lambda: O.super_resolution((8, 4, 2), 2),
    "colorization": lambda: O.colorization((3, 4, 3)),
    "box_blur": lambda: O.box_blur((6, 5, 2), 3),
    "gaussian_blur": lambda: O.gaussian_blur((7, 6, 1), 1.2),
    "random_projection": lambda: O.random_projection((3, 4, 1), 7, seed=2),
    "dense_tall": lambda: O.DenseLinear.from_matrix(np.random.default_rng(0).normal(size=(9, 5))),
}


def _operator_views(op, x, y):
    """Everything the operator test compares, as one compiled program."""
    eye_in = jnp.reshape(jnp.eye(op.in_dim), (op.in_dim,) + op.in_shape)
    eye_out = jnp.reshape(jnp.eye(op.out_dim), (op.out_dim,) + op.out_shape)
    s = op.singular_values
    return dict(
        matrix=jnp.reshape(op.apply(eye_in), (op.in_dim, -1)).T,
        adjoint_matrix=jnp.reshape(op.adjoint(eye_out), (op.out_dim, -1)),
        ax_y=jnp.sum(op.apply(x) * y),
        x_aty=jnp.sum(x * op.adjoint(y)),
        rebuilt=jnp.reshape(op.u(s * op.vt(eye_in)), (op.in_dim, -1)).T,
        round_trip=op.v(op.vt(x)),
        s=s,
        pinv=jnp.reshape(op.pinv(y), (y.shape[0], -1)),
    )


@pytest.fixture(scope="module")
def operator_views():
    """name -> (operator, x, y, views) for every operator, all computed by one compiled program."""
    ops = {name: make() for name, make in OPERATORS.items()}
    rng = np.random.default_rng(0)
    xs = {name: rng.normal(size=(3,) + op.in_shape).astype(np.float32) for name, op in ops.items()}
    ys = {name: rng.normal(size=(3,) + op.out_shape).astype(np.float32) for name, op in ops.items()}
    views = jax.jit(lambda ops, xs, ys: {n: _operator_views(ops[n], xs[n], ys[n]) for n in ops})(ops, xs, ys)
    return {n: (ops[n], xs[n], ys[n], jax.tree.map(lambda a: np.asarray(a, np.float64), views[n])) for n in ops}


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operator_adjoint_svd_and_pseudo_inverse(name, operator_views):
    op, x, y, v = operator_views[name]
    a = v["matrix"]
    assert a.shape == (op.out_dim, op.in_dim)
    # <A x, y> = <x, A^T y>, and A^T is the matrix transpose
    np.testing.assert_allclose(v["ax_y"], v["x_aty"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v["adjoint_matrix"], a, atol=1e-6)
    # U diag(s) V^T reconstructs A (up to the singular values dropped below SINGULAR_RTOL), V is orthogonal,
    # the singular values are numpy's
    s_max = np.linalg.svd(a, compute_uv=False)[0]
    np.testing.assert_allclose(v["rebuilt"], a, atol=2e-6 + 2 * O.SINGULAR_RTOL * s_max)
    np.testing.assert_allclose(v["round_trip"], np.asarray(x), atol=2e-6)
    expected_s = np.linalg.svd(a, compute_uv=False)
    expected_s = np.where(expected_s > O.SINGULAR_RTOL * s_max, expected_s, 0.0)
    np.testing.assert_allclose(np.sort(v["s"])[::-1][: min(a.shape)], expected_s, atol=2e-6)
    # A^+ = numpy's pseudo-inverse with the same cut-off
    expected = np.asarray(y, np.float64).reshape(3, -1) @ np.linalg.pinv(a, rcond=O.SINGULAR_RTOL).T
    assert np.linalg.norm(v["pinv"] - expected) < 1e-3 * np.linalg.norm(expected)


def test_structured_operators_do_what_their_names_say():
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    grey, pooled, blurred = jax.jit(
        lambda x: (
            O.colorization((4, 4, 3)).apply(x),
            O.super_resolution((4, 4, 3), 2).apply(x),
            O.box_blur((4, 4, 3), 3).apply(x),
        )
    )(x)
    np.testing.assert_allclose(grey, x.mean(-1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(pooled, x.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)), atol=1e-6)
    np.testing.assert_allclose(blurred[:, 1, 1], x[:, :3, :3].mean(axis=(1, 2)), atol=1e-6)
    box = O.box_inpainting((4, 4, 3), 1, 1, 2, 2)
    assert box.out_shape == (16 * 3 - 4 * 3,)
    mask = np.asarray(box.mask)
    assert not mask[1, 1, 0] and mask[0, 0, 0] and mask.sum() == 16 * 3 - 4 * 3


def test_function_operator_adjoint_is_the_transpose():
    m = np.random.default_rng(3).normal(size=(3, 5)).astype(np.float32)
    op = O.FunctionOperator(lambda x: x @ m.T, (5,), (3,), is_linear=True)
    y = jax.random.normal(jax.random.key(0), (2, 3))
    np.testing.assert_allclose(op.adjoint(y), y @ m, rtol=1e-5, atol=1e-6)
    nonlinear = O.FunctionOperator(lambda x: jnp.tanh(x[:, :3]), (5,), (3,))
    with pytest.raises(ValueError, match="nonlinear operator has no adjoint"):
        nonlinear.adjoint(y)


# ------------------------------------------------------------------------------------------------
# The closed form itself
# ------------------------------------------------------------------------------------------------


def test_mixture_posterior_and_evidence_match_numerical_integration():
    prior = GaussianMixture.create([0.25, 0.75], [[-1.0], [1.5]], [0.4, 0.7])
    grid = np.linspace(-8, 8, 200_001)
    dx = grid[1] - grid[0]
    prior_density = sum(
        w / math.sqrt(2 * math.pi * sd**2) * np.exp(-0.5 * (grid - m) ** 2 / sd**2)
        for w, m, sd in [(0.25, -1.0, 0.4), (0.75, 1.5, 0.7)]
    )
    for a, y, s in [(2.0, 0.5, 0.3), (-0.7, 1.0, 1.0)]:
        post = E.mixture_posterior(prior, [[a]], [y], s)
        joint = prior_density * np.exp(-0.5 * (y - a * grid) ** 2 / s**2) / math.sqrt(2 * math.pi * s**2)
        evidence = joint.sum() * dx
        np.testing.assert_allclose(post.log_normalizer, math.log(evidence), atol=1e-4)
        density = joint / evidence
        mean = (density * grid).sum() * dx
        np.testing.assert_allclose(post.mean(), [mean], atol=1e-4)
        np.testing.assert_allclose(post.cov(), [[(density * (grid - mean) ** 2).sum() * dx]], rtol=1e-3)
    tilt = E.linear_tilt(prior, [0.8])
    tilted = prior_density * np.exp(0.8 * grid)
    np.testing.assert_allclose(tilt.log_normalizer, math.log(tilted.sum() * dx), atol=1e-4)
    np.testing.assert_allclose(tilt.mean(), [(tilted * grid).sum() / tilted.sum()], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Exactness where theory gives it: denoiser level (no sampling error)
# ------------------------------------------------------------------------------------------------

PROCESS = P.VP()


def _x0_pair(first: Denoiser, second: Denoiser, times=(0.2, 0.6), n=16, dim=4, spread=1.5):
    """Both denoisers' x0 at the same random points and times, as one compiled program."""
    x = spread * jax.random.normal(jax.random.key(0), (n, dim))
    ts = jnp.repeat(jnp.asarray(times, jnp.float32), n)
    xs = jnp.tile(x, (len(times), 1))
    pair = jax.jit(lambda xs, ts: (first.x0(xs, ts), second.x0(xs, ts)))(xs, ts)
    return tuple(np.asarray(a) for a in pair)


MU = np.array([0.5, -0.3, 0.2, 0.0])
C = 0.8
PRIOR = gaussian(MU, C)
MASK = np.array([True, False, True, False])


def _diagonal_inpainting_posterior(y, s):
    """x | y for the isotropic Gaussian prior observed on MASK with noise s: diagonal, so a toy Gaussian."""
    post_mean, post_std = MU.copy(), np.full(4, C)
    gain = C**2 / (C**2 + s**2)
    post_mean[MASK] = MU[MASK] + gain * (np.asarray(y) - MU[MASK])
    post_std[MASK] = math.sqrt(C**2 * s**2 / (C**2 + s**2))
    return gaussian(post_mean, post_std)


@pytest.mark.parametrize("process, prediction", [(P.VP(), "eps"), (P.FlowMatching(t_max=0.999), "v"), (P.EDM(), "x0")])
def test_pigdm_is_the_exact_posterior_denoiser_for_gaussian_data(process, prediction):
    """For x0 ~ N(mu, c^2 I), x0 | x_t is Gaussian with variance r_t^2, so PiGDM's likelihood score is
    exact: the guided x0 equals the exact posterior denoiser E[x0 | x_t, y], for every process."""
    op = O.Inpainting.from_mask(MASK)
    y, s = jnp.array([[1.0, -0.4]]), 0.3
    obs = O.Observation(op, y, s)
    net = PRIOR.denoiser(process)
    d = Denoiser(lambda x, t: net.view(prediction, x, t), process, prediction)
    guided = Po.PiGDM(data_std=C).guide(d, obs)
    exact = _diagonal_inpainting_posterior(np.asarray(y[0]), s).denoiser(process)
    np.testing.assert_allclose(*_x0_pair(guided, exact), rtol=2e-3, atol=2e-3)
    wrong = Po.PiGDM(data_std=2 * C).guide(PRIOR.denoiser(process), obs)  # the wrong data std is not exact
    assert np.max(np.abs(np.subtract(*_x0_pair(wrong, exact)))) > 0.02


def test_ddnm_is_the_noiseless_posterior_denoiser_for_inpainting_a_diagonal_gaussian():
    op = O.Inpainting.from_mask(MASK)
    y = jnp.array([[1.0, -0.4]])
    guided = Po.DDNM().guide(PRIOR.denoiser(PROCESS), O.Observation(op, y, 0.0))
    exact = _diagonal_inpainting_posterior(np.asarray(y[0]), 1e-4).denoiser(PROCESS)
    np.testing.assert_allclose(*_x0_pair(guided, exact, times=(0.4,)), atol=1e-4)


def test_classifier_guidance_with_the_exact_classifier_gives_the_class_denoiser():
    """grad log p_t(x) + grad log p_t(k | x) = grad log p_t(x | k): with the mixture's exact noisy
    classifier, classifier guidance (scale 1) is component k's exact denoiser."""
    mixture = GaussianMixture.create([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [[0.3, 0.5], [0.4, 0.3]])
    process = PROCESS

    def log_prob_class_1(x, t):
        a, s = process.alpha(t), process.sigma(t)
        log_joint = mixture._component_log_probs(x, a, s)[0]
        return log_joint[:, 1] - jax.nn.logsumexp(log_joint, axis=1)

    guided = classifier_guidance(mixture.denoiser(process), log_prob_class_1, 1.0)
    target = mixture.component(1).denoiser(process)
    np.testing.assert_allclose(*_x0_pair(guided, target, (0.1, 0.5, 0.9), dim=2, spread=1.0), rtol=1e-3, atol=1e-4)
    unguided = _x0_pair(mixture.denoiser(process), target, (0.5,), dim=2, spread=1.0)
    assert np.max(np.abs(np.subtract(*unguided))) > 0.1


def test_reward_guidance_of_a_linear_reward_is_the_tilted_gaussian_denoiser():
    """p exp(lambda b^T x) for N(mu, c^2 I) is N(mu + lambda c^2 b, c^2 I), and for Gaussian data the
    reward gradient through the denoiser is its exact score shift."""
    b, lam = np.array([1.0, -2.0, 0.5, 0.0]), 0.7
    guided = reward_guidance(PRIOR.denoiser(PROCESS), lambda x0: x0 @ jnp.asarray(b, jnp.float32), lam)
    target = gaussian(MU + lam * C**2 * b, C).denoiser(PROCESS)
    np.testing.assert_allclose(*_x0_pair(guided, target, (0.2, 0.7)), rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Exactness on samples
# ------------------------------------------------------------------------------------------------


def _gaussian_problem(noise):
    op = O.random_projection((4,), 2, seed=0)
    obs = O.Observation(op, jnp.array([[0.9, -0.6]]), noise)
    return obs, E.mixture_posterior(PRIOR, np.asarray(O.dense_matrix(op)), [0.9, -0.6], noise)


def _errors(method, obs, n=6000, steps=200, **kw):
    result = Po.posterior_sample(
        PRIOR.denoiser(PROCESS), obs, jax.random.key(3), method, num_samples=n, steps=steps, **kw
    )
    return result


@pytest.mark.slow  # the default run checks PiGDM's exactness at the denoiser level
def test_pigdm_samples_the_exact_gaussian_posterior_of_a_random_projection():
    obs, post = _gaussian_problem(0.3)
    x = _errors(Po.PiGDM(data_std=C), obs).samples
    err = E.mixture_fit_errors(post, x)
    assert err["mean"] < 0.06 and err["cov"] < 0.08, err
    prior_err = E.mixture_fit_errors(post, PRIOR.sample(jax.random.key(4), 6000))
    assert prior_err["mean"] > 0.3 and prior_err["cov"] > 0.3, prior_err  # the check can tell


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, noise",
    [(Po.DDNM(), 0.0), (Po.Replacement(), 0.0), (Po.DAPS(data_std=C), 0.0), (Po.DAPS(data_std=C), 0.3)],
)
def test_exact_methods_sample_the_gaussian_posterior(method, noise):
    """DDNM and replacement (noiseless) and DAPS with the exact x0 | x_t variance are exact for isotropic
    Gaussian data."""
    obs, post = _gaussian_problem(noise)
    x = _errors(method, obs).samples
    err = E.mixture_fit_errors(post, x)
    assert err["mean"] < 0.06 and err["cov"] < 0.08, err


@pytest.mark.slow
@pytest.mark.parametrize("method", [Po.DPS(), Po.DDRM(), Po.DiffPIR(), Po.RedDiff()])
def test_approximate_methods_run_and_fit_the_measurement(method):
    """No exactness is claimed (see experiments/results/inverse_gmm.md); the samples are finite and
    explain the measurement better than prior samples do."""
    obs, _ = _gaussian_problem(0.1)
    x = _errors(method, obs, n=512, steps=50).samples
    assert np.all(np.isfinite(np.asarray(x)))
    res = float(jnp.mean(jnp.sum(obs.residual(x) ** 2, -1)))
    prior_res = float(jnp.mean(jnp.sum(obs.residual(PRIOR.sample(jax.random.key(5), 512)) ** 2, -1)))
    assert res < 0.5 * prior_res, (res, prior_res)


@pytest.mark.slow
@pytest.mark.parametrize("method", [Po.DPS(), Po.RedDiff()])
def test_gradient_methods_accept_a_nonlinear_operator(method):
    """DPS and RED-diff need only A's gradient: with y = tanh(x_1 + x_2) they reduce the residual."""
    op = O.FunctionOperator(lambda x: jnp.tanh(x[:, :1] + x[:, 1:2]), (4,), (1,))
    obs = O.Observation(op, jnp.array([[0.6]]), 0.05)
    x = _errors(method, obs, n=512, steps=50).samples
    res = float(jnp.mean(obs.residual(x) ** 2))
    prior_res = float(jnp.mean(obs.residual(PRIOR.sample(jax.random.key(5), 512)) ** 2))
    assert np.all(np.isfinite(np.asarray(x))) and res < 0.5 * prior_res, (res, prior_res)


# ------------------------------------------------------------------------------------------------
# Bad input, refused before anything is traced
# ------------------------------------------------------------------------------------------------


def _counting_denoiser():
    net = CountingNetwork()
    return net, Denoiser(net, PROCESS, "eps")


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda: O.Observation(O.random_projection((4,), 2), jnp.zeros((1, 3)), 0.1),
            ValueError,
            "per-example shape \\(2,\\)",
        ),
        (
            lambda: O.Observation(O.random_projection((4,), 2), jnp.zeros((1, 2)), -0.1),
            ValueError,
            "noise_std must be >= 0",
        ),
        (
            lambda: O.measure(O.colorization((4, 4, 3)), jax.random.key(0), jnp.zeros((2, 4, 4, 1))),
            ValueError,
            "in_shape|per-example shape \\(4, 4, 3\\)",
        ),
        (lambda: O.super_resolution((6, 6, 1), 4), ValueError, "factor 4 must divide the image size 6 x 6"),
        (lambda: O.box_inpainting((4, 4, 1), 3, 0, 2, 2), ValueError, "leaves the image"),
        (lambda: O.random_inpainting((4, 4, 1), 1.5), ValueError, "fraction_observed must lie in"),
        (lambda: O.gaussian_blur((4, 4, 1), -1.0), ValueError, "std must be a positive"),
        (lambda: O.DenseLinear.from_matrix(np.ones((2, 5)), (2, 2)), ValueError, "5 columns"),
        (lambda: O.FunctionOperator(lambda x: x[:, :2], (4,), (3,)), ValueError, "not to the declared"),
        (lambda: Po.DDRM(eta=1.5), ValueError, "eta=1.5"),
        (lambda: Po.PiGDM(data_std=0.0), ValueError, "data_std"),
    ],
)
def test_bad_operator_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "method, obs, kwargs, match",
    [
        (Po.DDNM(), O.Observation(O.random_projection((4,), 2), jnp.zeros((1, 2)), 0.1), {}, "noiseless"),
        (
            Po.PiGDM(),
            O.Observation(O.FunctionOperator(lambda x: x[:, :2] ** 2, (4,), (2,)), jnp.zeros((1, 2)), 0.1),
            {},
            "singular value decomposition",
        ),
        (
            Po.PiGDM(),
            O.Observation(O.random_projection((4,), 2), jnp.zeros((3, 2)), 0.1),
            dict(num_samples=5),
            "num_samples=5",
        ),
        (
            Po.DPS(normalize=False),
            O.Observation(O.random_projection((4,), 2), jnp.zeros((1, 2)), 0.0),
            {},
            "noise_std > 0",
        ),
        (
            Po.DDRM(),
            O.Observation(O.random_projection((4,), 2), jnp.zeros((1, 2)), 0.1),
            dict(solver=Po.DDIM()),
            "pass solver=None",
        ),
    ],
)
def test_bad_posterior_input_is_refused_before_the_network_runs(method, obs, kwargs, match):
    net, d = _counting_denoiser()
    with pytest.raises(ValueError, match=match):
        Po.posterior_sample(d, obs, jax.random.key(0), method, **kwargs)
    assert net.calls == 0
