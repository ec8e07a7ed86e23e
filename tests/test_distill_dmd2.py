"""DMD's regression term and DMD2's GAN term (`dmd_loss` options) against closed forms on Gaussian
data: affine generators on exact teacher pairs, linear discriminators on Gaussians (logits Gaussian,
E softplus by Gauss-Hermite quadrature), and the stop-gradient separation of the parameter groups."""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import processes as P
from diffjax.data.exact import GaussianData
from diffjax.denoisers import Denoiser
from diffjax.distill import L2, PairsFromBatch, PairsFromTeacher, PseudoHuber, teacher_ode_pairs
from diffjax.distill.dmd import distribution_matching_gradient, dmd_loss
from diffjax.losses import denoising_loss
from diffjax.processes import per_example
from diffjax.samplers import DDIM, EulerMaruyama, Times

EDM = P.EDM()
T_MAX = float(EDM.t_max)
T_GAN = 0.5  # the fixed matching time of the GAN tests


MEAN, VARIANCES = np.array([0.3, -0.2]), np.array([0.64, 0.09])
BASIS = np.array([[math.cos(0.6), -math.sin(0.6)], [math.sin(0.6), math.cos(0.6)]])


@pytest.fixture(scope="module")
def gaussian():
    return GaussianData.create(MEAN, BASIS, VARIANCES)


@dataclasses.dataclass(frozen=True)
class FixedTime:
    """A time sampler that always gives T_GAN (so logits of a linear discriminator are Gaussian)."""

    def __call__(self, process, key, n, t_min, t_max):
        return jnp.full((n,), T_GAN), jnp.ones((n,))


def affine_generator(params, z, t):
    return z @ params["A"].T + params["c"]


def scaled_fake(params, x, t):
    return params["s"] * x


def linear_discriminator(params, x_t, t):
    return x_t @ params["w"] + params["b"]


def _flow_matrix():
    """(M, m) with the exact probability-flow map of the Gaussian from sigma_max to 0, z -> M z + m:
    M = B diag(sqrt(v / (v + sigma_max^2))) B^T, m = (I - M) mean (float64)."""
    M = BASIS @ np.diag(np.sqrt(VARIANCES / (VARIANCES + T_MAX**2))) @ BASIS.T
    return M, MEAN - M @ MEAN


def _prior_noise(n, seed):
    return T_MAX * np.random.default_rng(seed).standard_normal((n, 2))


def _softplus_moments(mean, var, sign, nodes=80):
    """E and Var of softplus(sign * N(mean, var)) by Gauss-Hermite quadrature (exact to ~1e-12 here)."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    values = np.logaddexp(0.0, sign * (mean + math.sqrt(var) * x))
    w = w / w.sum()
    first = float(np.sum(w * values))
    return first, float(np.sum(w * values**2)) - first**2


def _sigmoid_mean(mean, var, nodes=80):
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    return float(np.sum(w / w.sum() / (1.0 + np.exp(-(mean + math.sqrt(var) * x)))))


# ------------------------------------------------------------------------------------------------
# off by default
# ------------------------------------------------------------------------------------------------


def test_dmd_loss_without_the_options_is_plain_dmd(gaussian):
    """Default dmd_loss == a hand-written DMD loss (same key splits) and == the options configured
    at weight 0, bit for bit: the regression and GAN terms are off and draw no randomness."""
    teacher = gaussian.denoiser(EDM)
    params = {
        "generator": {"A": jnp.array([[0.01, 0.002], [0.0, 0.008]]), "c": jnp.array([0.1, -0.1])},
        "fake": {"s": jnp.float32(0.9)},
    }
    batch = {"image": np.random.default_rng(1).standard_normal((64, 2)).astype(np.float32)}
    key = jax.random.key(2)
    fake_denoising = denoising_loss(scaled_fake, EDM, prediction="x0", t_min=EDM.t_min, t_max=EDM.t_max)

    def reference(params, key, batch):
        shape = batch["image"].shape
        key_z, key_t, key_eps, key_fake = jax.random.split(key, 4)
        x = affine_generator(params["generator"], EDM.prior_sample(key_z, shape), None)
        t = EDM.t_min + jax.random.uniform(key_t, (shape[0],)) * (EDM.t_max - EDM.t_min)
        eps = jax.random.normal(key_eps, shape, x.dtype)
        fake_params = jax.lax.stop_gradient(params["fake"])
        fake_den = Denoiser(lambda u, s: scaled_fake(fake_params, u, s), EDM, "x0")
        x_sg = jax.lax.stop_gradient(x)
        grad = jax.lax.stop_gradient(distribution_matching_gradient(teacher, fake_den, x_sg, t, eps))
        generator_loss = jnp.mean(0.5 * per_example(jnp.mean, (x - (x_sg - grad)) ** 2))
        fake_loss, _ = fake_denoising(params["fake"], key_fake, x_sg)
        return generator_loss + 1.0 * fake_loss

    plain = dmd_loss(affine_generator, scaled_fake, EDM, teacher)
    configured_off = dmd_loss(
        affine_generator,
        scaled_fake,
        EDM,
        teacher,
        regression_weight=0.0,
        regression_pairs=PairsFromBatch(),
        gan_weight=0.0,
        discriminator_fn=linear_discriminator,
    )
    assert sorted(jax.eval_shape(plain, params, key, batch)[1]) == ["fake_loss", "generator_loss", "gradient_norm"]

    def all_three(p):
        return [
            jax.value_and_grad(lambda q, f=f: f(q, key, batch)[0])(p)
            for f in (plain, configured_off, lambda q, k, b: (reference(q, k, b), None))
        ]

    (loss, grads), (off_loss, off_grads), (ref_loss, ref_grads) = jax.jit(all_three)(params)
    for other, other_grads in ((ref_loss, ref_grads), (off_loss, off_grads)):
        np.testing.assert_array_equal(np.asarray(loss), np.asarray(other))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------
# regression term
# ------------------------------------------------------------------------------------------------


def test_regression_term_of_an_affine_generator_is_the_closed_form(gaussian):
    """Pairs (z, M z + m) of the exact teacher's ODE map, generator A z + c: the regression loss is
    mean |(A - M) z + c - m|^2 / D on the batch, its gradient (2 / nD) sum r z^T, and its expectation
    (sigma_max^2 |A - M|_F^2 + |c - m|^2) / D; the term adds regression_weight times it to the loss."""
    M, m = _flow_matrix()
    n = 20000
    z64 = _prior_noise(n, 3)
    y64 = z64 @ M.T + m
    z, y = z64.astype(np.float32), y64.astype(np.float32)
    A, c = M + np.array([[0.01, 0.02], [0.0, 0.01]]), m + np.array([0.1, -0.2])
    params = {"generator": {"A": jnp.asarray(A, jnp.float32), "c": jnp.asarray(c, jnp.float32)}, "fake": {"s": 1.0}}
    batch = {"image": np.zeros((16, 2), np.float32), "noise": z, "teacher_sample": y}
    teacher = gaussian.denoiser(EDM)
    make = lambda w: dmd_loss(  # noqa: E731
        affine_generator, scaled_fake, EDM, teacher, regression_weight=w, regression_pairs=PairsFromBatch()
    )
    key = jax.random.key(4)
    outputs = lambda p: make(0.5)(p, key, batch)  # noqa: E731
    (total, aux), grads = jax.jit(lambda p: (outputs(p), jax.grad(lambda q: outputs(q)[1]["regression_loss"])(p)))(
        params
    )
    value = aux["regression_loss"]

    z64, y64 = z.astype(np.float64), y.astype(np.float64)
    residual = z64 @ A.T + c - y64
    np.testing.assert_allclose(float(value), np.mean(residual**2), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["generator"]["A"]), 2 * residual.T @ z64 / (n * 2), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(grads["generator"]["c"]), 2 * residual.mean(0) / 2, rtol=1e-3)
    assert float(np.max(np.abs(grads["fake"]["s"]))) == 0.0

    per = np.mean(residual**2, axis=1)
    expected = (T_MAX**2 * np.sum((A - M) ** 2) + np.sum((c - m) ** 2)) / 2
    assert abs(per.mean() - expected) < 4 * per.std() / math.sqrt(n), (per.mean(), expected)

    without = aux["generator_loss"] + aux["fake_loss"]
    np.testing.assert_allclose(float(total - without), 0.5 * float(value), rtol=1e-4)


def test_regression_gradient_is_zero_at_the_teachers_ode_map(gaussian):
    """Generator mean + g (Phi(z) - mean), Phi the teacher's ODE map: no regression gradient at g = 1,
    pairs read from the batch (Phi the exact flow map) or drawn on the fly (Phi one DDIM step and the
    final denoising, written out here), and a gradient that shrinks g at g = 1.3. The pseudo-Huber
    metric is zero there too."""
    teacher = gaussian.denoiser(EDM)
    t_min = float(EDM.t_min)

    def ddim_map(z):
        x0 = teacher.x0(z, jnp.full((z.shape[0],), T_MAX))
        x1 = x0 + (t_min / T_MAX) * (z - x0)
        return teacher.x0(x1, jnp.full((z.shape[0],), t_min))

    def exact_map(z):
        return gaussian.flow_map(z, 1.0, T_MAX, 1.0, 0.0)

    z = _prior_noise(512, 5).astype(np.float32)
    batch = {"image": np.zeros((512, 2), np.float32), "noise": z, "teacher_sample": jax.jit(exact_map)(z)}
    on_the_fly = PairsFromTeacher(solver=DDIM(), steps=1)
    cases = (
        (exact_map, PairsFromBatch(), L2()),
        (ddim_map, on_the_fly, L2()),
        (exact_map, PairsFromBatch(), PseudoHuber(0.03)),
    )
    losses = []
    for phi, pairs, metric in cases:

        def generator(params, z, t, phi=phi):
            return gaussian.mean + params["g"] * (phi(z) - gaussian.mean)

        losses.append(
            dmd_loss(
                generator,
                scaled_fake,
                EDM,
                teacher,
                regression_weight=1.0,
                regression_pairs=pairs,
                regression_metric=metric,
            )
        )

    def gradients(g):
        params = {"generator": {"g": g}, "fake": {"s": 1.0}}
        return [
            jax.grad(lambda p, f=f: f(p, jax.random.key(6), batch)[1]["regression_loss"])(params)["generator"]["g"]
            for f in losses
        ]

    per_case = np.asarray(jax.jit(jax.vmap(gradients))(jnp.array([1.0, 1.3])))  # (case, g)
    for case, (a, w) in zip(cases, per_case, strict=True):
        assert abs(a) < 1e-5 * w, (case[1:], a, w)

    z_drawn, y_drawn = teacher_ode_pairs(teacher, jax.random.key(7), (256, 2), solver=DDIM(), steps=1)
    np.testing.assert_allclose(float(np.std(np.asarray(z_drawn))), T_MAX, rtol=0.1)
    np.testing.assert_allclose(np.asarray(y_drawn), np.asarray(jax.jit(ddim_map)(z_drawn)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# GAN term
# ------------------------------------------------------------------------------------------------


MU_G, S_G, MU_R, S_R = np.array([0.4, -0.3]), 0.7, np.array([-0.2, 0.5]), 0.4
N_GAN = 40000


@pytest.fixture(scope="module")
def gan_problem(gaussian):
    """Generator N(mu_g, s_g^2 I) (x = mu_g + s_g z / sigma_max), real data N(mu_r, s_r^2 I), linear D
    at the fixed time T_GAN. `evaluate(params, discriminator)`: the derivatives of the total loss and
    of every aux entry (one compilation per discriminator name)."""
    real = (MU_R + S_R * np.random.default_rng(8).standard_normal((N_GAN, 2))).astype(np.float32)
    compiled = {}

    def generator(params, z, t):
        return params["mu"] + S_G * z / T_MAX

    def evaluate(params, discriminator="discriminator"):
        if discriminator not in compiled:
            loss = dmd_loss(
                generator,
                scaled_fake,
                EDM,
                gaussian.denoiser(EDM),
                time_sampler=FixedTime(),
                gan_weight=0.1,
                discriminator_fn=linear_discriminator,
                discriminator_weight=0.5,
                discriminator=discriminator,
            )

            def outputs(p):
                total, aux = loss(p, jax.random.key(9), {"image": real})
                return {"loss": total, **aux}

            compiled[discriminator] = jax.jit(lambda p: (outputs(p), jax.jacrev(outputs)(p)))
        return compiled[discriminator](params)

    return evaluate


def _gan_params(w, b, discriminator="discriminator"):
    params = {"generator": {"mu": jnp.asarray(MU_G, jnp.float32)}, "fake": {"s": jnp.float32(1.0)}}
    head = {"w": jnp.asarray(w, jnp.float32), "b": jnp.float32(b)}
    params[discriminator] = {**params.get(discriminator, {}), **head}
    return params


def test_gan_losses_and_generator_gradient_equal_the_gaussian_expectations(gan_problem):
    """Linear D(x_t) = w.x_t + b at t = 0.5: its logits are N(w.mu + b, |w|^2 (s^2 + t^2)) for real
    and fake, so E softplus(-D(fake)), E softplus(-D(real)) + E softplus(D(fake)) and the generator's
    gradient in mu, -w E sigmoid(-D(fake)), have quadrature values (checked within 4 standard errors)."""
    n, w, b = N_GAN, np.array([0.8, -0.5]), 0.2
    aux, grads = gan_problem(_gan_params(w, b))
    ww = float(w @ w)
    m_fake, v_fake = float(w @ MU_G + b), ww * (S_G**2 + T_GAN**2)
    m_real, v_real = float(w @ MU_R + b), ww * (S_R**2 + T_GAN**2)
    gen_mean, gen_var = _softplus_moments(m_fake, v_fake, -1.0)
    assert abs(float(aux["gan_loss"]) - gen_mean) < 4 * math.sqrt(gen_var / n), (float(aux["gan_loss"]), gen_mean)
    real_mean, real_var = _softplus_moments(m_real, v_real, -1.0)
    fake_mean, fake_var = _softplus_moments(m_fake, v_fake, 1.0)
    disc = float(aux["discriminator_loss"])
    assert abs(disc - real_mean - fake_mean) < 4 * math.sqrt((real_var + fake_var) / n), (disc, real_mean + fake_mean)
    total = aux["generator_loss"] + aux["fake_loss"] + 0.1 * aux["gan_loss"] + 0.5 * aux["discriminator_loss"]
    np.testing.assert_allclose(float(aux["loss"]), float(total), rtol=1e-6)

    expected_grad = -w * _sigmoid_mean(-m_fake, v_fake)
    grad_mu = np.asarray(grads["gan_loss"]["generator"]["mu"])
    np.testing.assert_allclose(grad_mu, expected_grad, atol=4 * 0.5 * float(np.max(np.abs(w))) / math.sqrt(n))
    assert float(grad_mu @ w) < 0  # a step against the gradient moves the fakes to where D says "real"


def test_discriminator_gradient_separates_real_from_fake(gan_problem):
    """At w = 0, b = 0 the total loss's gradient in D is discriminator_weight * 0.5 (mean x_t^fake -
    mean x_t^real) in w (expectation 0.5 (mu_g - mu_r)) and exactly 0 in b; one step against it makes
    the mean logit of real data exceed that of the fakes."""
    _, grads = gan_problem(_gan_params(np.zeros(2), 0.0))
    grads = grads["loss"]["discriminator"]
    se = 0.5 * 0.5 * math.sqrt((S_G**2 + S_R**2 + 2 * T_GAN**2) / N_GAN)
    np.testing.assert_allclose(np.asarray(grads["w"]), 0.5 * 0.5 * (MU_G - MU_R), atol=4 * se)
    assert float(grads["b"]) == 0.0
    w_new = -1.0 * np.asarray(grads["w"])
    assert float(w_new @ MU_R) - float(w_new @ MU_G) > 0.1


@pytest.mark.parametrize("shared", [False, True], ids=["own-params", "shared-with-fake"])
def test_gan_gradients_stay_in_their_parameter_group(gan_problem, shared):
    """The generator's GAN term reaches no discriminator (or fake) parameter and the discriminator's
    term no generator parameter: exact zeros; each reaches its own. With discriminator="fake" the
    discriminator's parameters are the fake network's entry (DMD2's shared trunk)."""
    name = "fake" if shared else "discriminator"
    _, grads = gan_problem(_gan_params(np.array([0.8, -0.5]), 0.2, name), name)
    g_gan, g_disc = grads["gan_loss"], grads["discriminator_loss"]
    for leaf in jax.tree.leaves(g_gan[name]) + ([] if shared else jax.tree.leaves(g_gan["fake"])):
        assert float(np.max(np.abs(leaf))) == 0.0
    for leaf in jax.tree.leaves(g_disc["generator"]):
        assert float(np.max(np.abs(leaf))) == 0.0
    assert float(np.max(np.abs(g_gan["generator"]["mu"]))) > 1e-3
    assert float(np.max(np.abs(g_disc[name]["w"]))) > 1e-3


# ------------------------------------------------------------------------------------------------
# bad options
# ------------------------------------------------------------------------------------------------


def test_bad_options_are_refused_naming_the_value(gaussian):
    teacher = gaussian.denoiser(EDM)
    make = lambda **kw: dmd_loss(affine_generator, scaled_fake, EDM, teacher, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"regression_weight must be >= 0 .*-0\.5"):
        make(regression_weight=-0.5, regression_pairs=PairsFromBatch())
    with pytest.raises(ValueError, match=r"gan_weight must be >= 0 .*-1\.0"):
        make(gan_weight=-1.0, discriminator_fn=linear_discriminator)
    with pytest.raises(ValueError, match="discriminator_weight must be a finite number"):
        make(discriminator_weight=float("nan"))
    with pytest.raises(ValueError, match=r"gan_weight=0\.1 needs discriminator_fn"):
        make(gan_weight=0.1)
    with pytest.raises(ValueError, match=r"regression_weight=0\.25 needs regression_pairs"):
        make(regression_weight=0.25)
    with pytest.raises(TypeError, match="metric must be an object"):
        make(regression_weight=0.25, regression_pairs=PairsFromBatch(), regression_metric="l2")
    with pytest.raises(ValueError, match="is stochastic"):
        PairsFromTeacher(solver=EulerMaruyama())
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        PairsFromTeacher(steps=0)
    with pytest.raises(TypeError, match="grid must be a Grid"):
        PairsFromTeacher(grid=Times((80.0, 1.0, 0.002)))
    with pytest.raises(ValueError, match="must differ"):
        PairsFromBatch(noise_key="x", sample_key="x")

    params = {
        "generator": {"A": np.eye(2, dtype=np.float32), "c": np.zeros(2, np.float32)},
        "fake": {"s": 1.0},
        "discriminator": {"w": 1.0},
    }
    key = jax.random.key(0)
    regression = make(regression_weight=0.25, regression_pairs=PairsFromBatch())
    with pytest.raises(ValueError, match=r"no entries \['noise', 'teacher_sample'\]"):
        jax.jit(regression)(params, key, {"image": np.zeros((4, 2), np.float32)})
    with pytest.raises(ValueError, match=r"must both have shape \(pairs, \*\(2,\)\)"):
        jax.jit(regression)(
            params,
            key,
            {"image": np.zeros((4, 2), np.float32), "noise": np.zeros((4, 3), np.float32), "teacher_sample": 0.0},
        )
    gan = make(gan_weight=0.1, discriminator_fn=lambda p, x, t: p["w"] * x)  # (batch, 2): not one logit each
    with pytest.raises(ValueError, match=r"GAN term \(gan_weight=0\.1\) needs real data.*'image'"):
        jax.jit(gan)(params, key, {"images": np.zeros((4, 2), np.float32)})
    with pytest.raises(ValueError, match=r"one logit per example, shape \(4,\), got \(4, 2\)"):
        jax.jit(gan)(params, key, {"image": np.zeros((4, 2), np.float32)})


@pytest.mark.slow
def test_regression_term_keeps_every_mixture_component():
    """experiments/distill_mixture.py's dmd+reg run at a small budget (1500 steps): the one-step
    generator samples every component of the 4-D mixture (a finite worst std error; plain DMD drops
    one there) and puts the weights within 0.2 (1.2 is a collapse onto one component)."""
    from experiments.distill_mixture import mixture_4d, run_dmd  # slow only: keeps collection light

    args = argparse.Namespace(
        iterations=1500, batch=256, lr=1e-3, ema=0.995, samples=5000, seed=0, regression_weight=0.25
    )
    samples, info = run_dmd("dmd+reg", args, 0)
    weight_error, std_error = mixture_4d().sample_errors(samples[1])
    assert weight_error < 0.2 and math.isfinite(std_error), (weight_error, std_error, info)
