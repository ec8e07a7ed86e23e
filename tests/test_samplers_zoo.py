"""The sampler zoo: convergence orders of the deterministic solvers on a Gaussian with its exact
denoiser (fitted log-log slope, float64), exact marginals of the stochastic samplers, NFE
accounting, every solver with every process and prediction type, the adaptive solver, the
optimized grid, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CountingNetwork

from diffjax import processes as P
from diffjax.data.toy import gaussian
from diffjax.denoisers import PREDICTIONS, Denoiser, PathCoefficients, from_x0_eps
from diffjax.samplers import GRIDS, SOLVERS, DPMSolverPP, FlowTime, LogSNR, optimize_grid, sample
from diffjax.samplers.gaussian_pc import fitted_variance, gaussian_step
from diffjax.samplers.unipc import default_order
from diffjax.validation import build_named


def solver(name, **options):
    """The solver a config names: the one name -> object path of the config boundary."""
    return build_named(SOLVERS, name, options, "solver")


def grid(name, **options):
    return build_named(GRIDS, name, options, "grid")


GAUSSIAN = gaussian([0.3, -0.2], [0.5, 0.2])
ALL_PROCESSES = [
    P.VP(),
    P.VP.from_betas(np.linspace(1e-4, 0.02, 1000)),
    P.CosineVP(),
    P.SubVP(),
    P.VE(),
    P.EDM(),
    P.FlowMatching(),
]


def exact_ode_endpoint(process, g, x_start, t_start, t_end):
    """The probability-flow ODE of N(mu, s^2) maps x_t to alpha mu + sqrt(alpha^2 s^2 + sigma^2) z."""
    mu, s = g.means[0], g.stds[0]
    a0, s0 = process.alpha(t_start), process.sigma(t_start)
    a1, s1 = process.alpha(t_end), process.sigma(t_end)
    z = (x_start - a0 * mu) / jnp.sqrt(a0**2 * s**2 + s0**2)
    return a1 * mu + jnp.sqrt(a1**2 * s**2 + s1**2) * z


def fitted_order(process, name, grid_name, steps_list, t_max=None, **options):
    """-slope of log(global error) against log(steps), in float64. The global error is the largest
    deviation from the exact ODE solution over the grid times (the sup norm, which unlike the error
    at t_min alone does not profit from cancellations of errors of opposite sign)."""
    t_max = process.t_max if t_max is None else t_max
    with jax.enable_x64(True):
        errors = []
        for steps in steps_list:
            result = sample(
                GAUSSIAN.denoiser(process),
                jax.random.key(0),
                (16, 2),
                solver=solver(name, **options),
                steps=steps,
                grid=grid(grid_name),
                denoise_final=False,
                return_trajectory=True,
                t_max=t_max,
            )
            traj, ts = result.trajectory, result.ts[:, None, None]
            exact = exact_ode_endpoint(process, GAUSSIAN, traj[0], t_max, ts)
            errors.append(float(jnp.max(jnp.abs(traj - exact))))
        slope = np.polyfit(np.log(steps_list), np.log(errors), 1)[0]
    return -slope, errors


# (solver, options, designed order). UniPC's corrector raises the order of UniP-p to p + 1.
# The variants marked slow repeat a tested step (order 1 = DDIM, another prediction, order or variant
# of a tested solver) or need hundreds of steps (DEIS); `pytest -m slow` runs them.
SLOW = pytest.mark.slow
DETERMINISTIC = [
    pytest.param("dpm_solver", dict(order=1), 1, marks=SLOW),
    pytest.param("dpm_solver", dict(order=2), 2, marks=SLOW),
    ("dpm_solver", dict(order=3), 3),
    pytest.param("dpm_solver", dict(order=2, data_prediction=True), 2, marks=SLOW),
    pytest.param("dpm_solver", dict(order=3, data_prediction=True), 3, marks=SLOW),
    pytest.param("dpm_solver++", dict(order=1), 1, marks=SLOW),
    ("dpm_solver++", dict(order=2), 2),
    ("dpm_solver++", dict(order=3), 3),
    ("unipc", dict(order=1, variant="bh1"), 2),
    pytest.param("unipc", dict(order=2, variant="bh1"), 3, marks=SLOW),
    ("unipc", dict(order=2, variant="bh2"), 3),
    pytest.param("unipc", dict(order=3, variant="bh2"), 4, marks=SLOW),
    ("unipc", dict(order=2, variant="bh2", corrector=False), 2),
    pytest.param("unipc", dict(order=3, variant="bh1", corrector=False), 3, marks=SLOW),
    pytest.param("deis", dict(order=2), 2, marks=SLOW),
    ("deis", dict(order=3), 3),
    pytest.param("deis", dict(order=4), 4, marks=SLOW),
    ("edm_heun", dict(), 2),
    ("sa_solver", dict(order=3, corrector_order=0, tau=0.0), 3),
    pytest.param("sa_solver", dict(order=2, corrector_order=3, tau=0.0), 3, marks=SLOW),
]


def _case_id(case) -> str:
    solver, options, _ = case.values if hasattr(case, "values") else case
    return f"{solver}-{options}"


@pytest.mark.parametrize("solver, options, order", DETERMINISTIC, ids=[_case_id(c) for c in DETERMINISTIC])
def test_deterministic_solver_converges_at_its_order(solver, options, order):
    """VP process, log-SNR grid: the fitted slope of the global error against the number of steps
    is the designed order. DEIS interpolates in sigma/alpha, which spans 0.01..160 here, so it
    reaches its asymptotic regime only with more steps."""
    steps = [96, 128, 192, 256] if solver == "deis" else [16, 24, 32, 48]
    slope, errors = fitted_order(P.VP(), solver, "logsnr", steps, **options)
    assert order - 0.3 < slope < order + 0.5, (slope, errors)


@pytest.mark.slow
@pytest.mark.parametrize(
    "process, grid",
    [(P.EDM(), "karras"), (P.FlowMatching(), "logsnr"), (P.CosineVP(), "logsnr"), (P.SubVP(), "logsnr")],
    ids=["edm", "flow", "cosine", "subvp"],
)
@pytest.mark.parametrize(
    "solver, options, order",
    [
        ("dpm_solver++", dict(order=3), 3),
        ("unipc", dict(order=2, variant="bh1"), 3),
        ("dpm_solver", dict(order=2), 2),
        ("edm_heun", dict(), 2),
    ],
    ids=["dpm++3m", "unipc2", "dpm2", "edm_heun"],
)
def test_orders_hold_for_other_processes(process, grid, solver, options, order):
    """Where alpha(t_max) = 0 (flow, cosine) log-SNR is -inf at the start: the clipped log-SNR and
    the exact first-order part keep the order (EDM Heun starts with an Euler step there)."""
    slope, errors = fitted_order(process, solver, grid, [16, 24, 32, 48], **options)
    assert slope > order - 0.35, (slope, errors)


# ------------------------------------------------------------------------------------------------
# The Gaussian-exact predictor-corrector (the default)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, order",
    [
        (dict(), 2),
        pytest.param(dict(order=1), 2, marks=pytest.mark.slow),
        pytest.param(dict(corrector=False), 1, marks=pytest.mark.slow),
    ],
    ids=["default", "order1", "no-corrector"],
)
def test_gaussian_pc_converges_at_its_order(options, order):
    """On GAUSSIAN (stds 0.5 and 0.2, which no single fitted variance matches) the error falls at the
    designed order on the solver's own grid: 2 with the corrector; 1 without, because below
    sigma_data the predictor keeps the implied mean constant."""
    slope, errors = fitted_order(P.VP(), "gaussian_pc", "flow_time", [16, 24, 32, 48], **options)
    assert order - 0.3 < slope < order + 0.5, (slope, errors)


# the VP variants beyond VP itself (DDPM chain, cosine, sub-VP) run with -m slow
EXACTNESS_PROCESSES = [
    pytest.param(p, marks=pytest.mark.slow) if type(p).__name__ in ("DiscreteVP", "CosineVP", "SubVP") else p
    for p in ALL_PROCESSES
]


@pytest.mark.parametrize("process", EXACTNESS_PROCESSES, ids=lambda p: type(p).__name__)
def test_gaussian_pc_is_exact_for_isotropic_gaussian_data(process):
    """For data N(mu, s^2 I) the fit returns s^2 and the implied mean is mu, so from 2 steps on
    every state equals the exact ODE solution on every process, up to the float32 rounding of the
    grid's alpha and sigma (measured 2e-8..2e-7); DPM-Solver++(2M) at 5 steps is 0.12 off."""
    g = gaussian([0.3, -0.2], [0.4, 0.4])

    def worst_error(name, steps):
        result = sample(
            g.denoiser(process),
            jax.random.key(0),
            (64, 2),
            solver=solver(name),
            steps=steps,
            grid=FlowTime(),
            denoise_final=False,
            return_trajectory=True,
        )
        traj = result.trajectory
        exact = exact_ode_endpoint(process, g, traj[0], process.t_max, result.ts[:, None, None])
        return float(jnp.max(jnp.abs(traj - exact) / jnp.maximum(jnp.abs(exact), 1.0)))

    with jax.enable_x64(True):
        for steps in (2, 5):
            assert worst_error("gaussian_pc", steps) < 1e-6, steps
        assert worst_error("dpm_solver++", 5) > 1e-2


def test_fitted_variance_recovers_the_data_variance_and_clips():
    process = P.VP()
    g = gaussian([0.3, -0.2], [0.3, 0.3])
    x = jax.random.normal(jax.random.key(0), (8, 2))
    pairs = []
    for t in (0.5, 0.3):
        x0, eps = g.denoiser(process).predict(x, jnp.float32(t))
        pairs.append((x0, process.alpha(t) / process.sigma(t) * eps))
    (d1, b1), (d0, b0) = pairs
    np.testing.assert_allclose(fitted_variance(d1, b1, d0, b0, 1.0), np.full((8, 1), 0.09), rtol=1e-4)
    np.testing.assert_allclose(fitted_variance(d1, b1, d0, b0, 0.04), np.full((8, 1), 0.04))
    np.testing.assert_array_equal(fitted_variance(d1, b1, d1, b1, 1.0), np.zeros((8, 1)))


def test_gaussian_pc_gradients_are_finite_where_the_fitted_variance_is_zero():
    """optimize_grid differentiates through the solver; a fit clipped to 0 must not give NaN (it did
    through sqrt(s^2), and optimize_grid then returned its initial grid unchanged)."""
    x, mean, slope = jnp.ones((4, 2)), jnp.full((4, 2), 0.5), jnp.full((4, 2), 0.1)
    step = lambda s2, t: gaussian_step(P.VP(), x, t, 0.3, s2, mean, slope, 0.8).sum()  # noqa: E731
    grads = jax.grad(step, argnums=(0, 1))(jnp.zeros((4, 1)), 0.5)
    assert all(np.all(np.isfinite(g)) for g in grads), grads


# ------------------------------------------------------------------------------------------------
# Stochastic samplers: the exact marginal at many steps
# ------------------------------------------------------------------------------------------------

STOCHASTIC = [
    ("dpm_solver++_sde", dict(), 200),
    ("dpm_solver++_sde", dict(order=1, eta=0.5), 400),
    ("sa_solver", dict(order=2, corrector_order=2, tau=1.0), 200),
    ("sa_solver", dict(order=3, corrector_order=3, tau=0.5, tau_interval=(0.1, 10.0)), 200),
    ("edm_stochastic", dict(s_churn=40.0, s_min=0.05, s_max=50.0), 200),
    ("pc", dict(snr=0.1, n_corrector=1), 500),
]


@pytest.mark.parametrize("name, options, steps", STOCHASTIC, ids=[f"{s}-{o}" for s, o, _ in STOCHASTIC])
@pytest.mark.parametrize("process", [P.VP(), P.FlowMatching()], ids=["vp", "flow"])
def test_stochastic_sampler_reproduces_the_marginal(process, name, options, steps):
    """N(mu, diag(s^2)) with its exact denoiser: sample mean and std per coordinate within a few
    standard errors (n = 20000) plus the discretization error of `steps` steps."""
    g = gaussian([0.5, -1.0], [0.3, 0.8])
    x = sample(
        g.denoiser(process), jax.random.key(1), (20_000, 2), solver=solver(name, **options), steps=steps, grid=LogSNR()
    ).samples
    mean, std = np.asarray(jnp.mean(x, 0)), np.asarray(jnp.std(x, 0))
    np.testing.assert_allclose(mean, [0.5, -1.0], atol=0.02)
    np.testing.assert_allclose(std / np.array([0.3, 0.8]), 1.0, atol=0.03)


def test_stochastic_samplers_use_fresh_noise_per_step():
    """Different keys give different samples; the same key the same samples."""
    g = gaussian([0.0], [1.0])
    for name in ("dpm_solver++_sde", "sa_solver", "edm_stochastic", "pc"):
        a = sample(g.denoiser(P.VP()), jax.random.key(0), (64, 1), solver=solver(name), steps=8).samples
        b = sample(g.denoiser(P.VP()), jax.random.key(0), (64, 1), solver=solver(name), steps=8).samples
        c = sample(g.denoiser(P.VP()), jax.random.key(1), (64, 1), solver=solver(name), steps=8).samples
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, c), name


@pytest.mark.slow  # ~27 s; the default's accuracy: test_sampler_suite, test_faithfulness
def test_unipc_default_order_follows_the_step_size():
    """UniPC's default order is 3 unless two mean log-SNR steps exceed pi/2 (9 steps of the DDPM
    chain: h = 1.07, order 2; 19 steps: h = 0.51, order 3), and UniPC without an order runs the one it
    picks."""
    ddpm = P.VP.from_betas(np.linspace(1e-4, 0.02, 1000))
    t_min, t_max = ddpm.resolve_times(None, None)
    assert [default_order(ddpm, steps, t_min, t_max) for steps in (4, 9, 12, 13, 19, 49)] == [2, 2, 2, 3, 3, 3]
    denoiser = gaussian(np.zeros(16), 0.3).denoiser(ddpm)

    def draw(steps, **options):
        return np.asarray(
            sample(denoiser, jax.random.key(0), (64, 16), steps=steps, solver=solver("unipc", **options)).samples
        )

    for steps, picked, other in ((9, 2, 3), (19, 3, 2)):
        default = draw(steps)
        np.testing.assert_array_equal(default, draw(steps, order=picked))
        assert not np.array_equal(default, draw(steps, order=other))


# ------------------------------------------------------------------------------------------------
# NFE accounting, every process, every prediction
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, steps, nfe",
    [
        ("dpm_solver", dict(order=3), 4, 12),
        ("dpm_solver", dict(order=2), 5, 10),
        ("dpm_solver++", dict(order=3), 7, 7),
        ("dpm_solver++_sde", dict(), 7, 7),
        ("unipc", dict(order=3), 7, 7),
        ("gaussian_pc", dict(), 7, 7),
        ("sa_solver", dict(), 7, 7),
        ("deis", dict(order=3), 7, 7),
        ("edm_heun", dict(), 5, 10),
        ("edm_stochastic", dict(), 5, 10),
        ("pc", dict(n_corrector=2), 4, 12),
    ],
)
@pytest.mark.parametrize("process", [P.VP(), P.FlowMatching()], ids=["vp", "flow"])
def test_reported_nfe_counts_network_calls(process, name, options, steps, nfe):
    """SampleResult.nfe (without the final denoising) equals the number of network calls; on flow
    matching EDM's samplers start with an Euler step (alpha(t_max) = 0), one call fewer."""
    calls = []
    exact = GAUSSIAN.denoiser(process)

    def counting_fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return exact.fn(x, t)

    result = sample(
        Denoiser(counting_fn, process, "x0"),
        jax.random.key(0),
        (4, 2),
        solver=solver(name, **options),
        steps=steps,
        denoise_final=False,
    )
    jax.effects_barrier()
    expected = nfe - (1 if name.startswith("edm") and isinstance(process, P.FlowMatching) else 0)
    assert result.nfe == expected == len(calls)
    if not isinstance(process, P.FlowMatching):
        assert solver(name, **options).steps_for_nfe(nfe, denoise_final=False) == steps


def _as_prediction(denoiser, prediction):
    """The exact denoiser re-expressed as a network that predicts `prediction`."""

    def fn(x, t):
        x0, eps = denoiser.predict(x, t)
        return from_x0_eps(x0, eps, prediction, PathCoefficients.at(denoiser.process, t, x))

    return Denoiser(fn, denoiser.process, prediction)


# learned_variance on a plain Denoiser is the ancestral sampler (tests/test_learned_variance.py shows
# it equal to Ancestral), so its sweep repeats ancestral's; VP, SubVP, VE and CosineVP (covered for
# every solver by DiscreteVP, EDM and FlowMatching, whose start is singular as CosineVP's, and
# elsewhere in the suite) run in the slow set too.
SWEEP_SLOW_PROCESSES = (P.VP, P.SubVP, P.VE, P.CosineVP)


def _sweep_case(name, index):
    process = ALL_PROCESSES[index]
    slow = name == "learned_variance" or type(process) in SWEEP_SLOW_PROCESSES
    case_id = f"{name}-{type(process).__name__}"
    return (
        pytest.param(name, index, marks=pytest.mark.slow, id=case_id) if slow else pytest.param(name, index, id=case_id)
    )


@pytest.mark.parametrize(
    "name, process_index", [_sweep_case(n, i) for n in sorted(SOLVERS) for i in range(len(ALL_PROCESSES))]
)
def test_every_solver_works_with_every_process_and_prediction(name, process_index):
    """Each solver with each process (and the five prediction types, cycled) reproduces the mean
    and the spread of a Gaussian to within a coarse tolerance (40 steps; 200 for first-order ones)."""
    g = gaussian([0.5, -0.5], [0.3, 0.3])
    steps = 200 if name in ("ddim", "ancestral", "learned_variance", "euler", "euler_maruyama", "pc") else 40
    process = ALL_PROCESSES[process_index]
    prediction = PREDICTIONS[(process_index + sorted(SOLVERS).index(name)) % len(PREDICTIONS)]
    t_max = None
    singular_start = isinstance(process, (P.CosineVP, P.FlowMatching))  # alpha(t_max) = 0
    if singular_start and (name == "euler_maruyama" or prediction not in ("x0", "v")):
        t_max = 0.999  # the reverse SDE, and eps/score/flow views, are singular at alpha = 0
    denoiser = _as_prediction(g.denoiser(process), prediction)
    x = np.asarray(
        sample(denoiser, jax.random.key(0), (2000, 2), solver=solver(name), steps=steps, t_max=t_max).samples
    )
    assert np.all(np.isfinite(x)), (process, prediction)
    np.testing.assert_allclose(x.mean(0), [0.5, -0.5], atol=0.05, err_msg=f"{process} {prediction}")
    np.testing.assert_allclose(x.std(0), [0.3, 0.3], atol=0.05, err_msg=f"{process} {prediction}")


# ------------------------------------------------------------------------------------------------
# Adaptive solver, optimized grid
# ------------------------------------------------------------------------------------------------


def test_adaptive_solver_meets_its_tolerance_and_reports_nfe():
    with jax.enable_x64(True):
        process = P.VP()
        errors, nfes = [], []
        for tol in (1e-3, 1e-5, 1e-7):
            result = sample(
                GAUSSIAN.denoiser(process),
                jax.random.key(0),
                (32, 2),
                solver=solver("adaptive", rtol=tol, atol=tol),
                steps=4,
                denoise_final=False,
                return_trajectory=True,
            )
            x, traj = result.samples, result.trajectory
            exact = exact_ode_endpoint(process, GAUSSIAN, traj[0], process.t_max, process.t_min)
            errors.append(float(jnp.max(jnp.abs(x - exact))))
            nfes.append(int(result.nfe))
            assert traj.shape == (5, 32, 2)  # the grid times are checkpoints
        assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4, errors
        assert nfes[0] < nfes[1] < nfes[2], nfes
        assert all((n - 1) % 6 == 0 for n in nfes), nfes  # 6 evaluations per attempt + 1 to start


@pytest.mark.slow  # ~30 s: optimises a grid against a reference solve
def test_optimize_grid_reduces_the_error_and_returns_a_usable_grid():
    from diffjax.data.toy import GaussianMixture

    process = P.VP()
    mixture = GaussianMixture.create([0.3, 0.7], [[1.0, -1.0], [-0.5, 0.5]], [0.1, 0.3])
    denoiser = mixture.denoiser(process)
    key = jax.random.key(3)
    ts, history = optimize_grid(
        denoiser,
        steps=5,
        solver=DPMSolverPP(),
        shape=(2,),
        key=key,
        num_samples=512,
        iterations=60,
        reference_steps=200,
        return_history=True,
    )
    assert isinstance(ts, list) and len(ts) == 6 and all(isinstance(t, float) for t in ts)
    assert ts[0] == process.t_max and ts[-1] == process.t_min and all(a > b for a, b in zip(ts, ts[1:]))
    assert min(history) < 0.7 * history[0], history
    x = sample(denoiser, jax.random.key(0), (16, 2), solver=DPMSolverPP(), steps=5, grid=ts).samples
    assert x.shape == (16, 2)
    # a data sample works as the target too (its empirical distribution's exact denoiser)
    data = mixture.sample(jax.random.key(1), 256)
    ts_data = optimize_grid(data, process, steps=3, iterations=5, num_samples=64, reference_steps=50)
    assert len(ts_data) == 4


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors before any tracing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("dpm_solver++", {"order": 4}, "DPMSolverPP option order=4 is not allowed; order must be one of \\[1, 2, 3\\]"),
        ("dpm_solver", {"order": 0}, "DPMSolver option order=0 is not allowed; order must be one of \\[1, 2, 3\\]"),
        ("unipc", {"order": 4}, "UniPC option order=4 is not allowed"),
        (
            "unipc",
            {"variant": "bh3"},
            "UniPC option variant='bh3' is not allowed; variant must be one of \\['bh1', 'bh2'\\]",
        ),
        ("deis", {"order": 5}, "DEIS option order=5 is not allowed; order must be one of \\[1, 2, 3, 4\\]"),
        ("dpm_solver++_sde", {"order": 3}, "order=3 is not allowed; order must be one of \\[1, 2\\]"),
        ("dpm_solver++_sde", {"eta": 2.0}, "eta must be a number in \\[0, 1\\]"),
        ("sa_solver", {"corrector_order": 5}, "SASolver option corrector_order=5"),
        ("sa_solver", {"tau": -1.0}, "SASolver option tau=-1.0 is not allowed; tau must be a finite number >= 0"),
        ("sa_solver", {"tau_interval": (2.0, 1.0)}, "tau_interval must be None or \\(lo, hi\\)"),
        (
            "edm_stochastic",
            {"s_churn": -1.0},
            "EDMStochastic option s_churn=-1.0 is not allowed; s_churn must be a finite number >= 0",
        ),
        ("edm_stochastic", {"s_max": 0.01}, "s_max must be a number >= s_min = 0.05"),
        ("pc", {"n_corrector": -1}, "LangevinPC option n_corrector=-1 is not allowed; n_corrector must be an int >= 0"),
        ("adaptive", {"rtol": 0.0}, "Adaptive option rtol=0.0 is not allowed; rtol must be a finite number > 0"),
        ("unipc", {"beta": 1.0}, "unknown option 'beta' for solver 'unipc'"),
        ("gaussian_pc", {"order": 3}, "GaussianPC option order=3 is not allowed; order must be one of \\[1, 2\\]"),
        (
            "gaussian_pc",
            {"max_std": 0.0},
            "GaussianPC option max_std=0.0 is not allowed; max_std must be a finite number > 0",
        ),
    ],
)
def test_bad_solver_options_raise_on_construction(name, options, match):
    with pytest.raises(ValueError, match=match):
        solver(name, **options)


@pytest.mark.parametrize(
    "grid_value, error, match",
    [("optimized", TypeError, "grid must be a Grid instance"), ([1.0, 0.5], ValueError, "steps \\+ 1")],
)
def test_bad_grid_raises_before_tracing(grid_value, error, match):
    network = CountingNetwork()
    denoiser = Denoiser(network, P.VP(), "eps")
    with pytest.raises(error, match=match):
        sample(denoiser, jax.random.key(0), (4, 2), steps=4, grid=grid_value)
    assert network.calls == 0


@pytest.mark.parametrize("prediction", ["eps", "score"])
def test_eps_network_at_alpha_zero_is_refused(prediction):
    network = CountingNetwork()
    with pytest.raises(ValueError, match=f"a '{prediction}'-prediction network does not determine x0 at t_max=1.0"):
        sample(Denoiser(network, P.FlowMatching(), prediction), jax.random.key(0), (4, 2), steps=4)
    assert network.calls == 0
    sample(Denoiser(network, P.FlowMatching(), prediction), jax.random.key(0), (4, 2), steps=4, t_max=0.999)


def test_adaptive_nfe_is_not_static():
    with pytest.raises(ValueError, match="known only after the run"):
        SOLVERS["adaptive"]().nfe(10)


# ------------------------------------------------------------------------------------------------
# gaussian_pc on its flow grid (the former default) on the benchmark
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nfe, max_weight_error, max_std_error",
    [(5, None, 0.25), (10, 0.015, 0.05), (20, 0.005, 0.02)],
)
def test_gaussian_pc_on_the_benchmark_mixture(nfe, max_weight_error, max_std_error):
    """gaussian_pc on its flow grid (the default up to 11 steps; the sampler suite chose it at few NFE), on
    the 16-D mixture under the 1000-step DDPM chain with 100k samples, against the issue's
    targets: std error <= 25 % at 5 NFE; weight error <= 0.015 and std error <= 5 % at 10 NFE
    (experiments/results/sampler_accuracy.md). 20 NFE: near-exact (the remaining std error is mostly
    the final posterior mean's -1.9 % on the 0.05-std component)."""
    from diffjax.data.toy import benchmark_mixture

    mixture = benchmark_mixture(16)
    ddpm = P.VP.from_betas(np.linspace(1e-4, 0.02, 1000))
    solver = SOLVERS["gaussian_pc"]()
    result = sample(mixture.denoiser(ddpm), jax.random.key(0), (100_000, 16), solver=solver, steps=nfe - 1)
    x = result.samples
    assert result.nfe == nfe
    weight_error, std_error = mixture.sample_errors(x)
    assert std_error <= max_std_error, (weight_error, std_error)
    if max_weight_error is not None:
        assert weight_error <= max_weight_error, (weight_error, std_error)
