"""The exact answers the sampler suite (experiments/benchmarks/sampler_suite.py) measures against:
Gaussian data's posterior mean and closed-form probability-flow solution (diffjax/data/exact.py), and the
ideal denoiser of a point set, each checked against an independent computation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import processes as P
from diffjax.data.exact import EmpiricalData, GaussianData, power_law_gaussian, random_basis
from diffjax.denoisers import Denoiser
from diffjax.processes import DiscreteVP
from diffjax.samplers import Euler, Linspace

PROCESSES = {
    "vp": P.VP(),
    "cosine": P.CosineVP(),
    "edm": P.EDM(),
    "flow": P.FlowMatching(),
    "ddpm": P.VP.from_betas(np.linspace(1e-4, 0.02, 1000)),
}


@pytest.fixture(scope="module")
def gaussian():
    return power_law_gaussian(jax.random.key(0), 6, exponent=2.0, scale=0.8, mean_norm=0.7)


def test_random_basis_is_orthonormal_and_seeded():
    q = random_basis(jax.random.key(3), 5)
    np.testing.assert_allclose(q.T @ q, np.eye(5), atol=1e-12)
    np.testing.assert_array_equal(q, random_basis(jax.random.key(3), 5))
    assert not np.allclose(q, random_basis(jax.random.key(4), 5))


def test_gaussian_posterior_mean_is_bayes_rule_with_the_full_covariance(gaussian):
    """mu + a C (a^2 C + s^2 I)^-1 (x - a mu), C = U diag(v) U^T, per example (a, s) arrays."""
    mean, basis, var = (np.asarray(a, np.float64) for a in (gaussian.mean, gaussian.basis, gaussian.variances))
    cov = basis @ np.diag(var) @ basis.T
    x = np.asarray(jax.random.normal(jax.random.key(1), (3, 6)), np.float64)
    alpha, sigma = np.array([0.9, 0.5, 1.0]), np.array([0.3, 0.8, 2.0])
    want = np.stack(
        [
            mean + a * cov @ np.linalg.solve(a**2 * cov + s**2 * np.eye(6), xi - a * mean)
            for xi, a, s in zip(x, alpha, sigma)
        ]
    )
    got = gaussian.posterior_mean(jnp.asarray(x, jnp.float32), alpha, sigma)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def _rk4_flow(process, data, x, t_from, t_to, steps=400):
    """A converged numeric solve of the probability-flow ODE dx/dt = alpha' D + sigma' eps in the process's
    own time (RK4 on a grid uniform in log sigma/alpha, mapped back to t)."""
    lam = jnp.linspace(process.log_snr(t_from), process.log_snr(t_to), steps + 1)
    ts = process.t_from_log_snr(lam).at[0].set(t_from).at[-1].set(t_to)
    denoiser = data.denoiser(process)

    def velocity(x, t):
        return denoiser.velocity(x, jnp.full((x.shape[0],), t))

    def step(x, pair):
        t, s = pair
        h = s - t
        k1 = velocity(x, t)
        k2 = velocity(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = velocity(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = velocity(x + h * k3, s)
        return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), None

    x, _ = jax.lax.scan(step, x, (ts[:-1], ts[1:]))
    return x


@pytest.mark.parametrize(
    "name",
    ["vp", "edm", "flow", pytest.param("cosine", marks=pytest.mark.slow), pytest.param("ddpm", marks=pytest.mark.slow)],
)
def test_gaussian_flow_map_solves_the_probability_flow_ode(gaussian, name):
    """The closed form equals a converged RK4 solve of the ODE from an interior time down to a small one,
    under every process family (only (alpha, sigma) enter the closed form)."""
    process = PROCESSES[name]
    t_from = 0.8 * process.t_max if name != "edm" else 20.0
    t_to = 0.05 if name != "edm" else 0.05
    x = jax.random.normal(jax.random.key(2), (4, 6)) * process.sigma(t_from)
    numeric = _rk4_flow(process, gaussian, x, t_from, t_to)
    closed = gaussian.flow_map(
        x, process.alpha(t_from), process.sigma(t_from), process.alpha(t_to), process.sigma(t_to)
    )
    scale = float(jnp.sqrt(jnp.mean(closed**2)))
    assert float(jnp.max(jnp.abs(numeric - closed))) < 1e-4 * max(scale, 1.0), name


def test_gaussian_flow_map_transports_the_marginals(gaussian):
    """Pushing exact samples of p_t through the map gives p_s: the covariance is right (2 10^4 samples)."""
    a1, s1, a2, s2 = 0.3, 0.95, 0.98, 0.2
    x0 = gaussian.sample(jax.random.key(5), 20_000)
    xt = a1 * x0 + s1 * jax.random.normal(jax.random.key(6), x0.shape)
    xs = np.asarray(gaussian.flow_map(xt, a1, s1, a2, s2), np.float64)
    basis, var = np.asarray(gaussian.basis, np.float64), np.asarray(gaussian.variances, np.float64)
    want = basis @ np.diag(a2**2 * var + s2**2) @ basis.T
    np.testing.assert_allclose(np.cov(xs.T), want, atol=0.04 * np.max(np.abs(want)))
    np.testing.assert_allclose(xs.mean(0), a2 * np.asarray(gaussian.mean), atol=0.02)


def test_gaussian_data_refuses_a_basis_that_is_not_orthonormal():
    with pytest.raises(ValueError, match="orthonormal"):
        GaussianData.create(np.zeros(2), np.ones((2, 2)), np.ones(2))
    with pytest.raises(ValueError, match="variances must be positive"):
        GaussianData.create(np.zeros(2), np.eye(2), np.array([1.0, 0.0]))


@pytest.mark.parametrize(
    "chunk", [3, pytest.param(7, marks=pytest.mark.slow), pytest.param(100, marks=pytest.mark.slow)]
)
def test_ideal_denoiser_matches_brute_force(chunk):
    """Chunked running softmax (with padding when chunk does not divide N) equals the direct softmax over
    all 7 points, also at a noise level where one point dominates; nearest() equals a direct argmin."""
    points = np.asarray(jax.random.uniform(jax.random.key(7), (7, 2, 3), minval=-1, maxval=1), np.float64)
    data = EmpiricalData.create(points, chunk=chunk)
    flat = points.reshape(7, -1)
    x = np.asarray(jax.random.normal(jax.random.key(8), (5, 2, 3)), np.float64)
    alpha, sigma = np.array([1.0, 0.9, 0.5, 0.99, 0.2]), np.array([0.01, 0.3, 0.8, 0.1, 1.0])
    logits = -np.sum((x.reshape(5, 1, -1) - alpha[:, None, None] * flat[None]) ** 2, -1) / (2 * sigma[:, None] ** 2)
    w = np.exp(logits - logits.max(1, keepdims=True))
    want = (w / w.sum(1, keepdims=True)) @ flat
    got = data.posterior_mean(jnp.asarray(x, jnp.float32), alpha, sigma)
    np.testing.assert_allclose(np.asarray(got).reshape(5, -1), want, atol=2e-5)
    nearest = np.argmin(np.sum((x.reshape(5, 1, -1) - flat[None]) ** 2, -1), axis=1)
    np.testing.assert_array_equal(data.nearest(jnp.asarray(x, jnp.float32)), nearest)


@pytest.mark.slow  # compiles three solvers twice
@pytest.mark.parametrize(
    "solver_name, options, grid_name",
    [("gaussian_pc", (), "flow_time"), ("unipc", (), "logsnr"), ("dpm_solver++", (("order", 3),), "karras")],
)
def test_suite_driver_takes_the_steps_sample_takes(gaussian, solver_name, options, grid_name):
    """The suite runs a solver step by step (one compiled program per step); from the same start it gives
    what `sample()` gives with the whole loop compiled."""
    from diffjax.samplers import sample
    from experiments.benchmarks.sampler_suite import Method, run_method

    process = PROCESSES["ddpm"]
    method = Method(solver_name, options, grid_name)
    result = sample(
        gaussian.denoiser(process), jax.random.key(9), (8, 6), solver=method.solver(), grid=method.grid(),
        steps=method.solver().steps_for_nfe(6), return_trajectory=True,
    )  # fmt: skip
    z = result.trajectory[0] / process.sigma(process.t_max)
    x, nfe = run_method(process, gaussian, method, 6, z)
    assert nfe == result.nfe == 6
    np.testing.assert_allclose(x, result.samples, rtol=1e-5, atol=1e-5)


PEER_FIXTURES = Path(__file__).parent / "fixtures" / "peers"


@pytest.mark.parametrize("case", ["unipc_bh2_10", "dpm++2m_10"])
def test_linspace_grid_is_diffusers_default_timestep_spacing(case):
    """On diffusers' DDPM chain, `Linspace` with steps = NFE - 1 gives the timesteps diffusers' default
    ("linspace") spacing made for the committed fixture (999, 899, ..., 500, ..., 100: round half to even)."""
    fixture = np.load(PEER_FIXTURES / f"{case}.npz")
    process = DiscreteVP.from_betas(np.load(PEER_FIXTURES / "problem.npz")["betas"])
    times = np.asarray(fixture["times"], np.float64)
    ts = np.asarray(Linspace()(process, times.size - 1, process.t_min, process.t_max), np.float64)
    np.testing.assert_allclose(ts, times, rtol=0, atol=2e-7)  # the fixture's times: diffusers' alphas inverted
    # the formula: timesteps round(linspace(0, 999, steps + 2))[1:] reversed, at t = (k + 1) / 1000
    np.testing.assert_allclose(ts * 1000 - 1, [999, 899, 799, 699, 599, 500, 400, 300, 200, 100], atol=1e-3)


def test_linspace_grid_in_continuous_time_is_uniform_and_stops_one_spacing_above_t_min():
    process = P.VP()
    ts = np.asarray(Linspace()(process, 4, process.t_min, process.t_max), np.float64)
    want = process.t_min + np.array([5, 4, 3, 2, 1]) / 5 * (process.t_max - process.t_min)
    np.testing.assert_allclose(ts, want, rtol=1e-6)


def _label_of(solver) -> str:
    """The suite's label of a solver instance on its default grid: the non-default options by name."""
    from diffjax.samplers import GRIDS, SOLVERS

    name = next(n for n, cls in SOLVERS.items() if cls is type(solver))
    defaults = type(solver)()
    options = tuple(
        (f.name, getattr(solver, f.name))
        for f in dataclasses.fields(solver)
        if f.init and getattr(solver, f.name) != getattr(defaults, f.name)
    )
    grid = solver.default_grid
    grid_name = next(n for n, cls in GRIDS.items() if cls is type(grid))
    grid_options = tuple(
        (f.name, getattr(grid, f.name)) for f in dataclasses.fields(grid) if getattr(grid, f.name) != f.default
    )
    from experiments.benchmarks.sampler_suite import Method

    return Method(name, options, grid_name, grid_options).label


def test_the_default_is_the_committed_suites_choice():
    """The library's default (default_solver on each solver's default grid, switched after FEW_STEPS steps)
    is the candidate the selection rule picks from the committed sampler-suite run
    (experiments/results/sampler_suite.json): change one, rerun the other."""
    from diffjax.samplers import FEW_STEPS, default_solver
    from experiments.benchmarks.common import RESULTS_DIR
    from experiments.benchmarks.sampler_selection import selection, with_switched_default

    with open(Path(RESULTS_DIR) / "sampler_suite.json") as f:
        payload = json.load(f)
    payload, switch = with_switched_default(payload)
    *_, (ranked, *_) = selection(payload)
    assert switch is not None and ranked[0] == switch.label
    assert (_label_of(default_solver(FEW_STEPS)), _label_of(default_solver(FEW_STEPS + 1))) == (switch.few, switch.many)
    assert switch.last_few_nfe == FEW_STEPS + 1  # NFE: the steps and the final denoising


def test_a_default_switches_once_where_the_per_nfe_choice_changes():
    """The switch follows the per-NFE choice: setting a wins at NFE 5 and 10, b at 20; at 12 they tie within
    5 % (a is kept), at 14 b wins, so a up to 12. No switch when one setting wins every selection NFE or the
    choice changes twice."""
    from experiments.benchmarks.sampler_selection import Switched, switched_candidate

    floors = {"g/ddpm": 1e-3, "m/ddpm": 1e-3}
    errors = {5: (0.1, 0.3), 10: (0.05, 0.1), 12: (0.0400, 0.0404), 14: (0.04, 0.02), 20: (0.02, 0.01)}

    def table_of(errors):
        return {(e, n): {"a": a, "b": b, "diffusers x": 0.5} for e in floors for n, (a, b) in errors.items()}

    def switch_of(errors, nfes):
        return switched_candidate(table_of(errors), ["a", "b"], sorted(floors), floors, nfes)

    switch = switch_of(errors, sorted(errors))
    assert switch == Switched("a", "b", 12)
    assert [switch.at(n) for n in (3, 12, 13, 50)] == ["a", "a", "b", "b"]
    assert switch_of(errors, [5, 10, 20]) == Switched("a", "b", 10)
    assert switch_of({**errors, 20: (0.01, 0.02)}, [5, 10, 20]) is None
    twice = {**errors, 10: (0.1, 0.05), 20: (0.01, 0.02)}
    assert switch_of(twice, [5, 10, 20]) is None


def test_selection_floors_errors_and_breaks_ties_by_the_next_worst_ratio():
    """Errors below an entry's floor (reference gap, 1e-3, image resolution) are ties; among worst ratios
    within 5 %, the next-worst decides."""
    from experiments.benchmarks.sampler_selection import error_floors, minimax, ratio

    references = [
        {"entry": "img/ddpm", "reference_gap": 1e-8, "one_sample_error": 0.05},
        {"entry": "gauss/ddpm", "reference_gap": 0.0},
        {"entry": "mix/ddpm", "reference_gap": 2e-3},
    ]
    floors = error_floors(references)
    assert floors == {"img/ddpm": 0.05, "gauss/ddpm": 1e-3, "mix/ddpm": 2e-3}
    assert ratio(0.04, 1e-7, floors["img/ddpm"]) == 1.0  # one sample's resolution: a tie
    assert ratio(0.2, 1e-7, floors["img/ddpm"]) == pytest.approx(4.0)
    assert ratio(1e-4, 1e-6, floors["gauss/ddpm"]) == 1.0
    # a: worst 4.0, next 3.0; b: worst 4.1 (a tie with a), next 1.0; c: worst 6
    errors = {
        ("img/ddpm", 5): {"a": 0.2, "b": 0.205, "c": 0.3, "diffusers x": 1e-7},
        ("gauss/ddpm", 5): {"a": 3e-3, "b": 1e-3, "c": 1e-3, "diffusers x": 0.5},
        ("mix/ddpm", 5): {"a": 0.01, "b": 0.01, "c": 0.01, "diffusers x": 0.01},
    }
    classes = {"img/ddpm": "images", "gauss/ddpm": "gaussian", "mix/ddpm": "mixture"}
    ranked, worst, *_ = minimax(errors, classes, ["a", "b", "c"], floors)
    assert worst["a"][0] == pytest.approx(4.0) and worst["b"][0] == pytest.approx(4.1)
    assert ranked == ["b", "a", "c"]


def _toy_network(params, x, t, labels=None):
    """A stand-in for a trained EDM network: F(x, c_noise) with a little nonlinearity in both."""
    del labels
    return jnp.tanh(params["w"] * x + params["b"] * jnp.log(t)[:, None, None, None] / 4)


def test_a_trained_network_in_the_suites_convention_is_its_edm_denoiser_of_the_rescaled_state():
    """TrainedNetwork.posterior_mean(x, alpha, sigma) = D(x / alpha, sigma / alpha) on flattened images, per
    sample (the suite's solvers pass alpha and sigma per sample); one Euler step under EDM through the suite's
    driver is D at sigma_max, the step, and the final denoising."""
    from diffjax.denoisers import EDMPreconditioned
    from experiments.benchmarks.sampler_suite import integrate, make_process
    from experiments.benchmarks.trained_problems import TrainedNetwork

    process = P.EDM()

    def to_denoiser(net):
        return Denoiser(net, process, EDMPreconditioned(0.5))

    params = {"w": jnp.float32(0.7), "b": jnp.float32(0.3)}
    data = TrainedNetwork(params, None, to_denoiser, _toy_network, (3, 2, 1))
    denoiser = to_denoiser(lambda x, t: _toy_network(params, x, t))
    assert data.dim == 6
    x = jax.random.normal(jax.random.key(1), (4, 6))
    alpha, sigma = jnp.array([0.6, 0.8, 0.1, 1.0]), jnp.array([0.8, 0.6, 0.995, 0.01])
    expected = denoiser.x0(x.reshape(4, 3, 2, 1) / alpha[:, None, None, None], sigma / alpha).reshape(4, 6)
    np.testing.assert_allclose(data.posterior_mean(x, alpha, sigma), expected, rtol=1e-5, atol=1e-6)
    scalar = denoiser.x0(x.reshape(4, 3, 2, 1) / 0.6, 0.8 / 0.6).reshape(4, 6)
    np.testing.assert_allclose(data.posterior_mean(x, 0.6, 0.8), scalar, rtol=1e-5, atol=1e-6)

    process = make_process("edm")
    t_max, t_min = process.t_max, process.t_min
    z = jax.random.normal(jax.random.key(2), (4, 6))
    x_max = t_max * z.reshape(4, 3, 2, 1)
    d_max = denoiser.x0(x_max, t_max)
    x_min = d_max + t_min / t_max * (x_max - d_max)
    final = denoiser.x0(x_min, t_min).reshape(4, 6)
    ts = np.array([t_max, t_min], np.float32)
    solver = Euler().prepare(process, 1, t_min, t_max)
    # (the state at sigma_max = 80 carries float32 rounding of ~1e-5, which two orders of arithmetic differ by)
    np.testing.assert_allclose(integrate(process, data, solver, ts, z), final, rtol=1e-4, atol=5e-5)


@pytest.mark.slow  # ~30 s: trains a two-step run
def test_a_trained_run_is_a_suite_problem_under_ddpm_and_edm_at_the_selection_nfes(tmp_path):
    from test_training import tiny_config

    from diffjax.training import train
    from diffjax.training.load import load_run
    from experiments.benchmarks.sampler_suite import entries, entry_nfes
    from experiments.benchmarks.trained_problems import trained_problem

    workdir = str(tmp_path / "run")
    config = tiny_config(num_steps=2)
    config.model.class_conditional = True  # as the MNIST run of the committed suite
    train(config, workdir)
    problem = trained_problem(workdir, batch=12)
    loaded = load_run(workdir)
    assert problem.kind == "trained" and problem.name == f"trained_digits8_{loaded.config.model.name}"
    assert problem.dim == 8 * 8 * 1
    x = jax.random.normal(jax.random.key(1), (12, problem.dim))
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])  # the run's own sampler's labels
    np.testing.assert_array_equal(problem.data.labels, labels)
    denoiser = loaded.denoiser_for(labels=jnp.asarray(labels))
    expected = denoiser.x0(x.reshape(12, 8, 8, 1) / 0.6, 0.8 / 0.6).reshape(12, -1)
    np.testing.assert_allclose(problem.data.posterior_mean(x, 0.6, 0.8), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels are for 12"):
        problem.data.posterior_mean(x[:4], 0.6, 0.8)
    assert [process for _, process in entries([problem], full=False)] == ["ddpm", "edm"]
    assert entry_nfes(problem, (3, 5, 8, 10, 20, 50)) == [5, 10, 20]


def test_resuming_refuses_an_entry_stored_from_another_run_or_batch():
    from experiments.benchmarks.exact_problems import Problem
    from experiments.benchmarks.sampler_suite import check_same_origin

    stored = {"entry": "trained_mnist28_unet-small/ddpm", "batch": 64, "origin": "/runs/a at step 1500"}
    check_same_origin(stored, Problem("trained_mnist28_unet-small", "trained", None, 64, "/runs/a at step 1500"))
    for origin, batch in [("/runs/a at step 3000", 64), ("/runs/b at step 1500", 64), ("/runs/a at step 1500", 32)]:
        with pytest.raises(ValueError, match="--resume: entry 'trained_mnist28_unet-small/ddpm'"):
            check_same_origin(stored, Problem("trained_mnist28_unet-small", "trained", None, batch, origin))
    check_same_origin({"entry": "mnist1000/ddpm", "batch": 200}, Problem("mnist1000", "images", None, 200))


def test_resuming_with_more_nfes_checks_the_recomputed_reference_and_the_nfes():
    """--resume --nfes adds NFEs to stored entries: the run's settings and each recomputed reference must be
    the stored ones (a reference's N vs 2N-step gap is its fingerprint), and --nfes takes integers >= 2."""
    from experiments.benchmarks.sampler_suite import (
        Method,
        check_same_reference,
        check_same_settings,
        parse_nfes,
    )

    check_same_reference({"entry": "mnist1000/ddpm", "reference_gap": 4.64e-8}, 4.6401e-8)
    check_same_reference({"entry": "gauss256_p1/ddpm", "reference_gap": 0.0}, 0.0)
    with pytest.raises(ValueError, match="--resume: entry 'mnist1000/ddpm''s reference gap is now 5e-08"):
        check_same_reference({"entry": "mnist1000/ddpm", "reference_gap": 4.64e-8}, 5e-8)

    methods = [Method("unipc"), Method("ddim")]
    done = {"full": False, "methods": [m.label for m in methods], "reference_steps": [200, 400], "peer_versions": {}}
    check_same_settings(done, False, methods, 200, peers=False)
    with pytest.raises(ValueError, match=r"the stored run differs in methods, diffusers \(stored"):
        check_same_settings(done, False, methods[:1], 200, peers=True)

    def error(message):
        raise ValueError(message)

    assert parse_nfes("14,11,12,11", error) == [11, 12, 14]
    for bad in ("", "1,5", "5,ten"):
        with pytest.raises(ValueError, match="--nfes=.*integers of at least 2"):
            parse_nfes(bad, error)
