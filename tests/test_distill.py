"""Few-step objectives (diffjax.distill) against closed forms on Gaussian data.

The exact consistency function of Gaussian data is its probability-flow map to the boundary time
(`GaussianData.flow_map`); a raw network F* is solved from it through each parameterisation, so the
losses and tangents have exact answers: zero at F*, positive when F* is perturbed.
"""

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
from diffjax.distill import (
    L2,
    AdaptiveWeighting,
    AverageVelocity,
    AverageVelocityJump,
    ConsistencyFunction,
    ConsistencySampler,
    EasyDiscretisation,
    ImprovedDiscretisation,
    KarrasDiscretisation,
    PseudoHuber,
    TangentClipping,
    TangentNormalization,
    TrigFlow,
    TrigFlowConsistency,
    consistency_distillation_loss,
    consistency_grid,
    consistency_training_loss,
    meanflow_loss,
    meanflow_target,
    scm_loss,
    scm_tangent,
    shortcut_loss,
    update_target,
)
from diffjax.distill.dmd import distribution_matching_gradient, dmd_loss, score_identity_term, sid_loss
from diffjax.distill.draft import draft_loss
from diffjax.distill.progressive import progressive_distillation_loss, progressive_target, student_times
from diffjax.samplers import DDIM, Adaptive, Ancestral, Times, Uniform, sample
from diffjax.samplers.base import Solver
from diffjax.samplers.ddim import ddim_step

SD = 0.5
EDM = P.EDM()
TRIG = TrigFlow(sigma_data=SD)


@pytest.fixture(scope="module")
def gaussian():
    """2-D anisotropic Gaussian data in a rotated basis, with a mean."""
    angle = 0.6
    basis = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return GaussianData.create(np.array([0.3, -0.2]), basis, np.array([0.64, 0.09]))


def _scaled_edm_net(data: GaussianData):
    """F* of `ConsistencyFunction` on EDM for `data`, times params["scale"]: f = flow map to s_min."""
    s_min = EDM.t_min

    def apply(params, x_in, c_noise):
        s = jnp.exp(4.0 * c_noise)
        norm = jnp.sqrt(s**2 + SD**2)[:, None]
        x = x_in * norm
        c_skip = (SD**2 / ((s - s_min) ** 2 + SD**2))[:, None]
        c_out = (SD * (s - s_min))[:, None] / norm
        exact = data.flow_map(x, 1.0, s, 1.0, s_min)
        safe = jnp.where(c_out > 1e-6, c_out, 1.0)
        return params["scale"] * jnp.where(c_out > 1e-6, (exact - c_skip * x) / safe, 0.0)

    return apply


def _scaled_trigflow_net(data: GaussianData):
    """F* of `TrigFlowConsistency` for `data`, times params["scale"]: f* = flow map to t = 0."""

    def apply(params, x_scaled, t):
        x = SD * x_scaled
        exact = data.flow_map(x, jnp.cos(t), SD * jnp.sin(t), 1.0, 0.0)
        return params["scale"] * (jnp.cos(t)[:, None] * x - exact) / (SD * jnp.sin(t))[:, None]

    return apply


@dataclasses.dataclass(frozen=True)
class ExactFlowStep(Solver):
    """The exact probability-flow step of Gaussian data (a test-only 'solver')."""

    data: GaussianData = None

    def step(self, denoiser, x, state, t, t_next, key):
        p = denoiser.process
        return self.data.flow_map(x, p.alpha(t), p.sigma(t), p.alpha(t_next), p.sigma(t_next)), state


def _student(scale):
    return {"student": {"scale": jnp.float32(scale)}}


# ------------------------------------------------------------------------------------------------
# parameterisations
# ------------------------------------------------------------------------------------------------


def test_boundary_condition_is_exact_whatever_the_network():
    x = jax.random.normal(jax.random.key(0), (5, 3)) * 3.0
    wild = lambda x_in, c: 1e3 * jnp.sin(x_in * 7.0) + c[:, None]  # noqa: E731
    f = ConsistencyFunction(wild, EDM)
    np.testing.assert_array_equal(np.asarray(f(x, EDM.t_min)), np.asarray(x))
    vp = P.VP()
    f_vp = ConsistencyFunction(wild, vp)
    np.testing.assert_array_equal(np.asarray(f_vp(x, vp.t_min)), np.asarray(x / vp.alpha(vp.t_min)))
    assert not np.allclose(np.asarray(f(x, 0.5)), np.asarray(x))
    g = TrigFlowConsistency(wild, SD)
    np.testing.assert_array_equal(np.asarray(g(x, 0.0)), np.asarray(x))


def test_trigflow_is_the_path_it_claims():
    t = jnp.linspace(0.1, 1.5, 7)
    np.testing.assert_allclose(TRIG.alpha(t), np.cos(t), rtol=1e-6)
    np.testing.assert_allclose(TRIG.sigma(t), SD * np.sin(t), rtol=1e-6)
    np.testing.assert_allclose(TRIG.t_from_log_snr(TRIG.log_snr(t)), t, rtol=1e-5)
    dalpha, dsigma = TRIG.alpha_sigma_derivatives(t)
    np.testing.assert_allclose(dsigma, SD * np.cos(t), rtol=1e-5)
    with pytest.raises(ValueError, match="t_max"):
        TrigFlow(t_max=2.0)


# ------------------------------------------------------------------------------------------------
# consistency distillation and training
# ------------------------------------------------------------------------------------------------


def test_cd_loss_is_zero_at_the_exact_consistency_function(gaussian):
    x0 = gaussian.sample(jax.random.key(1), 512)
    loss = consistency_distillation_loss(
        _scaled_edm_net(gaussian),
        EDM,
        gaussian.denoiser(EDM),
        teacher_solver=ExactFlowStep(data=gaussian),
        schedule=KarrasDiscretisation(intervals=12),
        metric=L2(),
    )
    loss = jax.jit(loss)
    exact, aux = loss(_student(1.0), jax.random.key(2), x0)
    perturbed, _ = loss(_student(1.05), jax.random.key(2), x0)
    assert float(exact) < 1e-9 < 1e-6 < float(perturbed)  # both sides move with the scale: a small gap


@pytest.mark.slow
def test_cd_loss_with_a_ddim_teacher_shrinks_with_the_grid(gaussian):
    """A one-step DDIM teacher is not exact: at f* its CD loss is positive but shrinks with finer grids."""
    x0 = gaussian.sample(jax.random.key(1), 512)
    ddim_losses = []
    for intervals in (6, 24):
        ddim = consistency_distillation_loss(
            _scaled_edm_net(gaussian), EDM, gaussian.denoiser(EDM), schedule=KarrasDiscretisation(intervals)
        )
        ddim_losses.append(float(ddim(_student(1.0), jax.random.key(2), x0)[0]))
    assert ddim_losses[0] > 4 * ddim_losses[1] > 0


def test_ct_loss_is_zero_at_the_exact_consistency_function_of_a_point_mass():
    """CT pairs x_t = x0 + t z with x_r = x0 + r z (one z). Where the data are a point mass the ODE
    trajectories are these straight lines, so at f* the CT loss is zero for any t - r (with
    independent noise at x_r it would not be); perturbing f* makes it positive."""
    _check_ct_zero_for_a_point_mass(ImprovedDiscretisation(total_iterations=100, s0=4, s1=16))


@pytest.mark.slow
def test_ct_loss_is_zero_for_a_point_mass_with_the_ect_schedule():
    _check_ct_zero_for_a_point_mass(EasyDiscretisation(100))


def _check_ct_zero_for_a_point_mass(schedule):
    point = GaussianData.create(np.array([0.3, -0.2]), np.eye(2), np.array([1e-12, 1e-12]))
    x0 = point.sample(jax.random.key(3), 256)
    loss = jax.jit(consistency_training_loss(_scaled_edm_net(point), EDM, schedule=schedule, metric=L2()))
    batch = {"image": x0, "step": jnp.int32(150)}
    exact, _ = loss(_student(1.0), jax.random.key(4), batch)
    perturbed, _ = loss(_student(1.05), jax.random.key(4), batch)
    assert float(exact) < 1e-9 < 1e-5 < float(perturbed)


def test_ct_schedules():
    key = jax.random.key(0)
    t, r, w = ImprovedDiscretisation(total_iterations=800, s0=10, s1=80)(EDM, key, 4096, jnp.int32(0))
    assert np.all(np.asarray(t) > np.asarray(r)) and np.all(np.asarray(r) >= EDM.t_min)
    np.testing.assert_allclose(w, 1.0 / (t - r), rtol=1e-4)
    schedule = ImprovedDiscretisation(total_iterations=800, s0=10, s1=80)
    assert [int(schedule.intervals(k)) for k in (0, 199, 200, 400, 799)] == [10, 10, 20, 40, 80]
    # all noise-level pairs lie on the Karras grid of N(k) intervals
    levels = np.asarray(EDM.t_min ** (1 / 7) + np.arange(11) / 10 * (80 ** (1 / 7) - EDM.t_min ** (1 / 7))) ** 7
    assert np.allclose(np.min(np.abs(np.asarray(t)[:, None] - levels[None]), axis=1), 0, atol=1e-3 * levels[-1])
    easy = EasyDiscretisation(stage_iterations=100)
    t0, r0, _ = easy(EDM, key, 1000, jnp.int32(0))
    np.testing.assert_allclose(r0, EDM.t_min)  # stage 0: diffusion training, r at the boundary
    t3, r3, _ = easy(EDM, key, 1000, jnp.int32(300))
    np.testing.assert_allclose(t3, t0)
    ratio = (np.asarray(t3) - np.asarray(r3)) / np.asarray(t3)
    expected = (1 + 8 * (1 / (1 + np.exp(np.asarray(t3))))) / 8
    inside = np.asarray(r3) > EDM.t_min
    np.testing.assert_allclose(ratio[inside], expected[inside], rtol=1e-4)


def test_metrics_and_target_update():
    a, b = jnp.zeros((2, 4)), jnp.full((2, 4), 0.5)
    np.testing.assert_allclose(L2()(a, b), 0.25)
    np.testing.assert_allclose(PseudoHuber(c=0.1)(a, b), math.sqrt(0.25 + 0.01) - 0.1, rtol=1e-6)
    params = {"student": {"w": jnp.ones(3)}, "target": {"w": jnp.zeros(3)}}
    np.testing.assert_allclose(update_target(params, 0.9)["target"]["w"], 0.1)


def test_consistency_losses_refuse_bad_input(gaussian):
    net = _scaled_edm_net(gaussian)
    with pytest.raises(TypeError, match="schedule"):
        consistency_training_loss(net, EDM, schedule="ict")
    with pytest.raises(ValueError, match="deterministic one-step"):
        consistency_distillation_loss(net, EDM, gaussian.denoiser(EDM), teacher_solver=Ancestral())
    with pytest.raises(ValueError, match="process"):
        consistency_distillation_loss(net, EDM, gaussian.denoiser(P.VE()))
    loss = consistency_training_loss(net, EDM)
    with pytest.raises(ValueError, match="'step'"):
        loss(_student(1.0), jax.random.key(0), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="'student'"):
        consistency_training_loss(net, EDM, schedule=KarrasDiscretisation())(
            {"scale": 1.0}, jax.random.key(0), jnp.zeros((4, 2))
        )


def test_consistency_sampler_with_the_exact_function_draws_the_data(gaussian):
    cm = ConsistencyFunction(lambda x, c: _scaled_edm_net(gaussian)({"scale": 1.0}, x, c), EDM).denoiser()
    cov = np.asarray(gaussian.basis @ jnp.diag(gaussian.variances) @ gaussian.basis.T)
    for intermediate in ((), (1.0,)):
        steps = len(intermediate) + 1
        result = sample(
            cm,
            jax.random.key(5),
            (40000, 2),
            solver=ConsistencySampler(),
            steps=steps,
            grid=consistency_grid(EDM, intermediate),
            denoise_final=False,
        )
        assert result.nfe == steps
        x = np.asarray(result.samples)
        np.testing.assert_allclose(x.mean(0), gaussian.mean, atol=0.02)
        np.testing.assert_allclose(np.cov(x.T), cov, atol=0.02)


# ------------------------------------------------------------------------------------------------
# sCM
# ------------------------------------------------------------------------------------------------


def test_scm_tangent_is_cos_t_times_the_total_derivative():
    key_w, key_x, key_v = jax.random.split(jax.random.key(6), 3)
    w = jax.random.normal(key_w, (3, 3))

    def net(x_scaled, t):
        return jnp.tanh(x_scaled @ w + jnp.sin(3 * t)[:, None]) * (1 + t[:, None] ** 2)

    x = jax.random.normal(key_x, (4, 3))
    v = jax.random.normal(key_v, (4, 3))
    t = jnp.array([0.2, 0.7, 1.0, 1.4])
    _, g = scm_tangent(net, x, t, v, SD)
    f = TrigFlowConsistency(net, SD)
    h = 1e-3
    fd = (f(x + h * v, t + h) - f(x - h * v, t - h)) / (2 * h)
    np.testing.assert_allclose(g, jnp.cos(t)[:, None] * fd, atol=2e-3, rtol=2e-3)


def test_scm_tangent_and_gradient_vanish_at_the_exact_consistency_function(gaussian):
    apply = _scaled_trigflow_net(gaussian)
    teacher = gaussian.denoiser(TRIG)
    x = gaussian.sample(jax.random.key(7), 256) * 1.0
    t = jnp.linspace(0.05, 1.5, 256)
    x_t = TRIG.perturb(x, t, jax.random.normal(jax.random.key(8), x.shape))
    dxdt = teacher.velocity(x_t, t)
    _, g_exact = scm_tangent(lambda u, s: apply({"scale": 1.0}, u, s), x_t, t, dxdt, SD)
    _, g_off = scm_tangent(lambda u, s: apply({"scale": 1.1}, u, s), x_t, t, dxdt, SD)
    assert float(jnp.max(jnp.abs(g_exact))) < 1e-4
    assert float(jnp.mean(jnp.abs(g_off))) > 1e-2
    loss = scm_loss(apply, TRIG, teacher=teacher, weighting=None)
    grad_fn = jax.jit(jax.grad(lambda p: loss(p, jax.random.key(9), x)[0]))
    grad = lambda s: grad_fn(_student(s))["student"]["scale"]  # noqa: E731
    assert abs(float(grad(1.0))) < 1e-5
    assert abs(float(grad(1.1))) > 1e-3


def test_scm_options():
    g = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(TangentNormalization(c=0.1)(g), [[3 / 5.1, 4 / 5.1], [0, 0]], rtol=1e-6)
    np.testing.assert_allclose(TangentClipping(1.0)(g), [[1, 1], [0, 0]])
    weighting = AdaptiveWeighting(features=4)
    params = weighting.init()
    np.testing.assert_array_equal(weighting.weight(params, jnp.array([0.1, 1.0])), 0.0)
    with pytest.raises(TypeError, match="TrigFlow"):
        scm_loss(lambda p, x, t: x, EDM)
    loss = scm_loss(lambda p, x, t: x * p["a"], TRIG, weighting=None, tangent_warmup=10)
    with pytest.raises(ValueError, match="warm-up"):
        loss({"student": {"a": 1.0}}, jax.random.key(0), jnp.zeros((2, 2)))


# ------------------------------------------------------------------------------------------------
# progressive distillation
# ------------------------------------------------------------------------------------------------


def test_progressive_target_is_two_teacher_steps_in_one(gaussian):
    teacher = gaussian.denoiser(TRIG)
    x0 = gaussian.sample(jax.random.key(10), 64)
    t, t_mid, s = jnp.full((64,), 1.2), jnp.full((64,), 0.8), jnp.full((64,), 0.3)
    x_t = TRIG.perturb(x0, t, jax.random.normal(jax.random.key(11), x0.shape))
    solver = DDIM()
    x_mid, _ = solver.step(teacher, x_t, None, t, t_mid, None)
    x_s, _ = solver.step(teacher, x_mid, None, t_mid, s, None)
    target = progressive_target(TRIG, x_t, x_s, t, s)
    eps = (x_t - TRIG.alpha(1.2) * target) / TRIG.sigma(1.2)
    np.testing.assert_allclose(ddim_step(TRIG, target, eps, s), x_s, atol=1e-5)
    one_step, _ = solver.step(teacher, x_t, None, t, s, None)
    assert float(jnp.max(jnp.abs(one_step - x_s))) > 1e-3  # two teacher steps differ from one


def test_progressive_loss_is_zero_for_a_point_mass_teacher():
    """DDIM is exact for a point mass mu (x0-prediction mu everywhere): the target is mu itself."""
    mu = jnp.array([0.4, -0.7])
    teacher = Denoiser(lambda x, t: jnp.broadcast_to(mu, x.shape), TRIG, "x0")
    times = (1.5, 1.0, 0.6, 0.3, 0.05)
    assert student_times(times) == (1.5, 0.6, 0.05)
    for target in ("x0", "v"):
        loss = progressive_distillation_loss(
            lambda p, x, t: jnp.broadcast_to(mu + p["shift"], x.shape),
            TRIG,
            teacher,
            times,
            prediction="x0",
            target=target,
        )
        loss = jax.jit(loss)
        exact, _ = loss({"student": {"shift": 0.0}}, jax.random.key(0), jnp.zeros((128, 2)) + mu)
        off, _ = loss({"student": {"shift": 0.05}}, jax.random.key(0), jnp.zeros((128, 2)) + mu)
        assert float(exact) < 1e-8 < 1e-4 < float(off)
    with pytest.raises(ValueError, match="2N \\+ 1"):
        progressive_distillation_loss(lambda p, x, t: x, TRIG, teacher, (1.5, 1.0, 0.5, 0.1))


@pytest.mark.slow
def test_progressive_distillation_of_an_exact_teacher_reaches_the_mixture():
    """experiments/distill_mixture.py's PD run at a small budget: 1- and 2-step students of the exact
    4-D mixture teacher put the mixture weights within 0.25 (sum of errors; 0 is exact, 1.2 is a
    collapse onto the heaviest component)."""
    from experiments.distill_mixture import mixture_4d, run_pd  # slow only: keeps collection light

    args = argparse.Namespace(iterations=1200, batch=256, lr=1e-3, ema=0.995, samples=5000, seed=0)
    samples, info = run_pd(args, 0)
    for nfe in (1, 2):
        weight_error, _ = mixture_4d().sample_errors(samples[nfe])
        assert weight_error < 0.25, (nfe, weight_error, info)


# ------------------------------------------------------------------------------------------------
# MeanFlow and shortcut models
# ------------------------------------------------------------------------------------------------

FM = P.FlowMatching()


def _scaled_average_velocity(data: GaussianData, process):
    """The exact average velocity of `data`, times params["scale"]: (x - flow(x, t -> r)) / (t - r),
    and the exact velocity where r = t."""
    velocity = data.denoiser(process).velocity

    def apply(params, x, t, r):
        gap = (t - r)[:, None]
        moved = data.flow_map(x, process.alpha(t), process.sigma(t), process.alpha(r), process.sigma(r))
        average = (x - moved) / jnp.where(gap > 0, gap, 1.0)
        return params["scale"] * jnp.where(gap > 0, average, velocity(x, t))

    return apply


def test_meanflow_target_is_a_fixed_point_at_the_exact_average_velocity(gaussian):
    apply = _scaled_average_velocity(gaussian, FM)
    x0 = gaussian.sample(jax.random.key(12), 256)
    t = jnp.linspace(0.2, 0.99, 256)
    r = t * jnp.linspace(0.0, 0.9, 256)
    x_t = FM.perturb(x0, t, jax.random.normal(jax.random.key(13), x0.shape))
    v = gaussian.denoiser(FM).velocity(x_t, t)
    u, target = meanflow_target(lambda x, s, q: apply({"scale": 1.0}, x, s, q), x_t, t, r, v)
    np.testing.assert_allclose(target, u, atol=2e-4)
    u_off, target_off = meanflow_target(lambda x, s, q: apply({"scale": 1.1}, x, s, q), x_t, t, r, v)
    assert float(jnp.mean(jnp.abs(target_off - u_off))) > 1e-2
    loss = jax.jit(meanflow_loss(apply, FM, teacher=gaussian.denoiser(FM), equal_fraction=0.0, power=0.0))
    assert (
        float(loss(_student(1.0), jax.random.key(14), x0)[0])
        < 1e-7
        < 1e-3
        < float(loss(_student(1.1), jax.random.key(14), x0)[0])
    )


def test_shortcut_loss_is_zero_at_the_exact_average_velocity(gaussian):
    apply = _scaled_average_velocity(gaussian, FM)
    x0 = gaussian.sample(jax.random.key(15), 256)
    loss = jax.jit(shortcut_loss(apply, FM, teacher=gaussian.denoiser(FM)))
    exact, aux = loss(_student(1.0), jax.random.key(16), x0)
    assert float(aux["consistency_mse"]) < 1e-9 and float(aux["flow_mse"]) < 1e-9
    _, aux_off = loss(_student(1.1), jax.random.key(16), x0)
    assert float(aux_off["consistency_mse"]) > 1e-4 and float(aux_off["flow_mse"]) > 1e-4


def test_average_velocity_jumps_draw_the_data(gaussian):
    model = AverageVelocity(lambda x, t, r: _scaled_average_velocity(gaussian, FM)({"scale": 1.0}, x, t, r))
    cov = np.asarray(gaussian.basis @ jnp.diag(gaussian.variances) @ gaussian.basis.T)
    result = sample(
        model.denoiser(FM),
        jax.random.key(17),
        (40000, 2),
        solver=AverageVelocityJump(),
        steps=1,
        grid=Times((FM.t_max, FM.t_min)),
        denoise_final=False,
    )
    x = np.asarray(result.samples)
    np.testing.assert_allclose(x.mean(0), gaussian.mean, atol=0.02)
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.02)
    with pytest.raises(TypeError, match="AverageVelocity"):
        sample(
            gaussian.denoiser(FM), jax.random.key(0), (4, 2), solver=AverageVelocityJump(), steps=1, denoise_final=False
        )


# ------------------------------------------------------------------------------------------------
# distribution matching
# ------------------------------------------------------------------------------------------------


def _scaled_gaussian(data: GaussianData, scale: float) -> GaussianData:
    return GaussianData(data.mean, data.basis, data.variances * scale**2)


def test_distribution_matching_gradient_points_back_to_the_data(gaussian):
    """With exact denoisers: zero when the generator's distribution is the data's; a too-wide
    generator (std x 1.3) is pulled in, a too-narrow one (x 0.7) pushed out."""
    real = gaussian.denoiser(EDM)
    t = jnp.full((20000,), 0.5)
    eps = jax.random.normal(jax.random.key(18), (20000, 2))
    for scale, sign in ((1.0, 0.0), (1.3, 1.0), (0.7, -1.0)):
        fake_data = _scaled_gaussian(gaussian, scale)
        x = fake_data.sample(jax.random.key(19), 20000)
        grad = distribution_matching_gradient(real, fake_data.denoiser(EDM), x, t, eps)
        outward = float(jnp.mean(jnp.sum(grad * (x - gaussian.mean), axis=1)))
        if sign == 0.0:
            assert float(jnp.max(jnp.abs(grad))) < 1e-5
        else:
            assert outward * sign > 0.05, (scale, outward)


@pytest.mark.parametrize("make_loss", [dmd_loss, sid_loss], ids=["dmd", "sid"])
def test_fake_score_losses_are_stationary_at_the_data(gaussian, make_loss):
    """Generator z -> mean + g (exact one-step flow map - mean), fake = the exact denoiser of its
    distribution: no generator gradient at g = 1; at g = 1.3 the gradient shrinks g."""

    def generator(params, z, t):
        x = gaussian.flow_map(z, 1.0, t, 1.0, 0.0)
        return gaussian.mean + params["g"] * (x - gaussian.mean)

    def fake(params, x, t):
        return _scaled_gaussian(gaussian, params["g"]).posterior_mean(x, 1.0, t)

    loss = make_loss(generator, fake, EDM, gaussian.denoiser(EDM), t_min=0.05, t_max=5.0)
    grad = jax.jit(jax.grad(lambda p: loss(p, jax.random.key(20), jnp.zeros((8192, 2)))[0]))
    at_data = grad({"generator": {"g": 1.0}, "fake": {"g": 1.0}})
    wide = grad({"generator": {"g": 1.3}, "fake": {"g": 1.3}})
    assert abs(float(at_data["generator"]["g"])) < 1e-6
    assert float(wide["generator"]["g"]) > 1e-2
    with pytest.raises(TypeError, match="fake_fn must be callable"):
        make_loss(generator, None, EDM, gaussian.denoiser(EDM))


def test_score_identity_with_the_exact_fake_denoiser(gaussian):
    """E[D_fake(x_t) - x | x_t] = 0 for the exact denoiser of x's distribution, so SiD's term has
    expectation (1 - alpha) E mean_dims (D_real - D_fake)^2 (checked within 4 standard errors)."""
    n, t = 200_000, jnp.full((200_000,), 0.8)
    real, fake_data = gaussian.denoiser(EDM), _scaled_gaussian(gaussian, 1.4)
    x = fake_data.sample(jax.random.key(21), n)
    x_t = EDM.perturb(x, t, jax.random.normal(jax.random.key(22), x.shape))
    d_real, d_fake = real.x0(x_t, t), fake_data.denoiser(EDM).x0(x_t, t)
    for alpha in (0.0, 1.2):
        term = np.asarray(score_identity_term(d_real, d_fake, x, alpha), np.float64)
        fisher = np.asarray(jnp.mean((d_real - d_fake) ** 2, axis=1), np.float64)
        diff = term - (1.0 - alpha) * fisher
        assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(n), (alpha, diff.mean(), fisher.mean())
        assert fisher.mean() > 10 * diff.std() / np.sqrt(n)  # the identity is not trivially 0 = 0


def test_sid_alpha_is_checked(gaussian):
    with pytest.raises(ValueError, match="alpha"):
        sid_loss(lambda p, z, t: z, lambda p, x, t: x, EDM, gaussian.denoiser(EDM), alpha=float("nan"))


@pytest.mark.slow
def test_scm_distillation_of_an_exact_teacher_reaches_the_mixture_weights():
    """experiments/distill_mixture.py's sCD run at a small budget: the one-step student puts the
    mixture weights within 0.2 (1.2 is the collapse onto one component that sCM showed at Adam 1e-3)."""
    from experiments.distill_mixture import mixture_4d, run_scm  # slow only: keeps collection light

    args = argparse.Namespace(iterations=2000, batch=256, lr=1e-3, ema=0.995, samples=5000, seed=0)
    samples, info = run_scm("scd", args, 0)
    weight_error, _ = mixture_4d().sample_errors(samples[1])
    assert weight_error < 0.2, (weight_error, info)


# --------------------------------------------------------------------------------------------------
# DRaFT: reward fine-tuning through the sampler
# --------------------------------------------------------------------------------------------------


def _draft_setup(grad_steps, steps=6):
    """Data N(mu, I) under VP, its exact x0-denoiser with mu the parameter, reward -||x0 - c||^2."""
    process, c = P.VP(), 1.5

    def apply_fn(params, x, t):
        coef_a, coef_s = process.alpha(t)[:, None], process.sigma(t)[:, None]
        return params["mu"] + coef_a * (x - coef_a * params["mu"]) / (coef_a**2 + coef_s**2)

    def reward(x0):
        return -jnp.sum((x0 - c) ** 2, axis=-1)

    loss_fn = draft_loss(
        apply_fn, process, reward, prediction="x0", solver=DDIM(), steps=steps, grad_steps=grad_steps, grid=Uniform()
    )
    return process, c, apply_fn, reward, loss_fn


@pytest.mark.parametrize("grad_steps", [1, 3, 6])
def test_draft_gradient_is_the_truncated_chain_rule(grad_steps):
    """On Gaussian data every DDIM step is affine, x_{i+1} = a_i x_i + b_i mu with
    a_i = alpha_s alpha_t + sigma_s sigma_t and b_i = alpha_s - a_i alpha_t, and the final
    denoising x0 = a_f x + b_f mu; DRaFT-K's gradient keeps the b_i of the last K steps only."""
    steps = 6
    process, c, apply_fn, reward, loss_fn = _draft_setup(grad_steps, steps)
    params = {"student": {"mu": jnp.full((3,), 0.2)}}
    batch = jnp.zeros((64, 3))
    key = jax.random.key(3)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key, batch)

    ts = np.asarray(Uniform()(process, steps, *process.resolve_times(None, None)), np.float64)
    alpha = np.asarray(process.alpha(jnp.asarray(ts)), np.float64)
    sigma = np.asarray(process.sigma(jnp.asarray(ts)), np.float64)
    a = alpha[1:] * alpha[:-1] + sigma[1:] * sigma[:-1]
    b = alpha[1:] - a * alpha[:-1]
    norm = alpha[-1] ** 2 + sigma[-1] ** 2
    a_f, b_f = alpha[-1] / norm, 1.0 - alpha[-1] ** 2 / norm
    later = np.array([np.prod(a[i + 1 :]) for i in range(steps)])
    g = b_f + a_f * np.sum((b * later)[steps - grad_steps :])

    den = Denoiser(lambda x, t: apply_fn(params["student"], x, t), process, "x0")
    x0 = sample(den, key, batch.shape, solver=DDIM(), steps=steps, grid=Uniform()).samples
    np.testing.assert_allclose(float(loss), -float(jnp.mean(reward(x0))), rtol=1e-5)
    np.testing.assert_allclose(float(aux["reward"]), float(jnp.mean(reward(x0))), rtol=1e-5)
    want = np.mean(2.0 * (np.asarray(x0, np.float64) - c) * g, axis=0)
    np.testing.assert_allclose(np.asarray(grads["student"]["mu"]), want, rtol=1e-4)


def test_draft_fine_tuning_moves_the_samples_to_the_reward():
    *_, loss_fn = _draft_setup(grad_steps=2)
    params = {"student": {"mu": jnp.zeros((3,))}}
    grad = jax.jit(jax.grad(lambda p, k: loss_fn(p, k, jnp.zeros((128, 3)))[0]))
    for i in range(40):
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grad(params, jax.random.key(i)))
    # the optimum puts the mean of x0 (= A mu for the fixed noise) at c = 1.5; mu moves most of the way
    assert np.all(np.asarray(params["student"]["mu"]) > 1.0)


def test_draft_bad_inputs_are_named():
    process = P.VP()
    net = lambda p, x, t: x  # noqa: E731
    reward = lambda x: jnp.sum(x, axis=-1)  # noqa: E731
    with pytest.raises(ValueError, match="grad_steps=5 exceeds steps=4"):
        draft_loss(net, process, reward, steps=4, grad_steps=5)
    with pytest.raises(ValueError, match="grad_steps"):
        draft_loss(net, process, reward, grad_steps=0)
    with pytest.raises(ValueError, match="fixed-step Solver"):
        draft_loss(net, process, reward, solver=Adaptive())
    with pytest.raises(TypeError, match="reward must be callable"):
        draft_loss(net, process, 3.0)
    loss_fn = draft_loss(net, process, lambda x: x, prediction="x0", steps=2)
    with pytest.raises(ValueError, match="one value per example"):
        loss_fn({"student": {}}, jax.random.key(0), jnp.zeros((4, 2)))
