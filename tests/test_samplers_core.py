"""The core samplers: accuracy on the exact Gaussian-mixture denoiser, convergence order on a
Gaussian, NFE accounting, grids, jit/vmap, and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CountingNetwork

from diffjax import processes as P
from diffjax.data.toy import benchmark_mixture, gaussian
from diffjax.denoisers import Denoiser
from diffjax.samplers import (
    DDIM,
    FEW_STEPS,
    GRIDS,
    SOLVERS,
    FlowTime,
    GaussianPC,
    Karras,
    LogSNR,
    SampleResult,
    UniPC,
    default_solver,
    sample,
)
from diffjax.validation import build_named


def solver(name, **options):
    """The solver a config names: the one name -> object path of the config boundary."""
    return build_named(SOLVERS, name, options, "solver")


def grid(name, **options):
    return build_named(GRIDS, name, options, "grid")


DDPM = P.VP.from_betas(np.linspace(1e-4, 0.02, 1000))
MIXTURE = benchmark_mixture(16)


@pytest.mark.parametrize(
    "solver_name, steps, grid_name, n",
    [
        pytest.param("ddim", 500, "logsnr", 100_000, marks=pytest.mark.slow),  # DDIM: also tests/test_faithfulness
        pytest.param("euler_maruyama", 500, "uniform", 50_000, marks=pytest.mark.slow),
        pytest.param("ancestral", 1000, "logsnr", 50_000, marks=pytest.mark.slow),  # also test_faithfulness
        ("heun", 50, "karras", 100_000),
    ],
)
def test_sampler_reproduces_the_mixture(solver_name, steps, grid_name, n):
    """The exact denoiser of the 16-D mixture (stds 0.05..0.5) under the discrete DDPM chain:
    mixture weights within 0.02 (sum of absolute errors), every component's std within 3 %."""
    x = sample(
        MIXTURE.denoiser(DDPM),
        jax.random.key(0),
        (n, 16),
        solver=solver(solver_name),
        steps=steps,
        grid=grid(grid_name),
    ).samples
    weight_error, std_error = MIXTURE.sample_errors(x)
    assert weight_error <= 0.02, (weight_error, MIXTURE.sample_statistics(x))
    assert std_error <= 0.03, (std_error, MIXTURE.sample_statistics(x))


def test_few_ddim_steps_are_measurably_wrong():
    """The accuracy check can fail: 5 DDIM steps leave the tight components far too wide."""
    x = sample(MIXTURE.denoiser(DDPM), jax.random.key(0), (20_000, 16), solver=DDIM(), steps=5).samples
    _, std_error = MIXTURE.sample_errors(x)
    assert std_error > 0.1


def exact_ode_endpoint(process, g, x_start, t_start, t_end):
    """The probability-flow ODE of N(mu, s^2) maps x_t to alpha mu + sqrt(alpha^2 s^2 + sigma^2) z."""
    mu, s = g.means[0], g.stds[0]
    a0, s0 = process.alpha(t_start), process.sigma(t_start)
    a1, s1 = process.alpha(t_end), process.sigma(t_end)
    z = (x_start - a0 * mu) / jnp.sqrt(a0**2 * s**2 + s0**2)
    return a1 * mu + jnp.sqrt(a1**2 * s**2 + s1**2) * z


@pytest.mark.parametrize(
    "process, grid_name",
    [(P.VP(), "uniform"), (P.EDM(), "karras"), (P.FlowMatching(), "uniform")],
    ids=["vp", "edm", "flow"],
)
@pytest.mark.parametrize("name, order", [("euler", 1), ("ddim", 1), ("heun", 2)])
def test_convergence_order_on_a_gaussian(process, grid_name, name, order):
    """Error at t_min against the exact ODE solution, fitted slope in log-log = -order."""
    with jax.enable_x64(True):
        g = gaussian([0.3, -0.2], [0.5, 0.2])
        steps_list = [16, 32, 64, 128]
        errors = []
        for steps in steps_list:
            result = sample(
                g.denoiser(process),
                jax.random.key(0),
                (64, 2),
                solver=solver(name),
                steps=steps,
                grid=grid(grid_name),
                denoise_final=False,
                return_trajectory=True,
            )
            x, traj = result.samples, result.trajectory
            exact = exact_ode_endpoint(process, g, traj[0], process.t_max, process.t_min)
            errors.append(float(jnp.max(jnp.abs(x - exact))))
        slope = np.polyfit(np.log(steps_list), np.log(errors), 1)[0]
    assert abs(-slope - order) < 0.2, (slope, errors)


def test_ddim_with_eta_one_is_ancestral_sampling():
    denoiser = MIXTURE.denoiser(DDPM)
    key = jax.random.key(3)
    a = sample(denoiser, key, (256, 16), solver=DDIM(eta=1.0), steps=20).samples
    b = sample(denoiser, key, (256, 16), solver=solver("ancestral"), steps=20).samples
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name, steps, denoise_final, nfe",
    [("ddim", 10, True, 11), ("ddim", 10, False, 10), ("heun", 10, True, 21), ("euler_maruyama", 7, True, 8)],
)
def test_reported_nfe_counts_network_calls(name, steps, denoise_final, nfe):
    calls = []
    exact = MIXTURE.denoiser(DDPM)

    def counting_fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return exact.fn(x, t)

    denoiser = Denoiser(counting_fn, DDPM, "x0")
    result = sample(
        denoiser,
        jax.random.key(0),
        (8, 16),
        solver=solver(name),
        steps=steps,
        denoise_final=denoise_final,
    )
    jax.effects_barrier()
    assert result.nfe == nfe == len(calls)
    assert result.ts.shape == (steps + 1,)
    assert solver(name).steps_for_nfe(nfe, denoise_final) == steps


def test_trajectory_jit_and_vmap():
    denoiser = MIXTURE.denoiser(DDPM)
    ddim = DDIM()  # the subject is the plumbing; the cheapest solver to compile
    run = jax.jit(
        lambda key: sample(denoiser, key, (32, 16), solver=ddim, steps=8, denoise_final=False, return_trajectory=True)
    )
    result = run(jax.random.key(0))
    assert isinstance(result, SampleResult)
    x, traj = result.samples, result.trajectory
    assert traj.shape == (9, 32, 16)
    np.testing.assert_allclose(traj[-1], x)
    assert abs(float(jnp.std(traj[0])) - 1.0) < 0.1  # the prior

    keys = jax.random.split(jax.random.key(1), 3)
    batched = jax.vmap(lambda k: sample(denoiser, k, (32, 16), solver=ddim, steps=8).samples)(keys)
    one = sample(denoiser, keys[1], (32, 16), solver=ddim, steps=8).samples
    np.testing.assert_allclose(batched[1], one, rtol=1e-5, atol=1e-5)


def test_image_shaped_samples():
    """Any trailing shape works: the 16-D mixture sampled as 4x4x1 images."""
    image_denoiser = Denoiser(
        lambda x, t: jnp.reshape(MIXTURE.denoiser(DDPM).fn(jnp.reshape(x, (x.shape[0], 16)), t), x.shape),
        DDPM,
        "x0",
    )
    x = sample(image_denoiser, jax.random.key(0), (8, 4, 4, 1), steps=10).samples
    assert x.shape == (8, 4, 4, 1)


@pytest.mark.parametrize("name", sorted(GRIDS))
@pytest.mark.parametrize("process", [DDPM, P.EDM(), P.FlowMatching(), P.VE()], ids=["ddpm", "edm", "flow", "ve"])
def test_grids_are_decreasing_with_exact_end_points(name, process):
    ts = np.asarray(grid(name)(process, 12, process.t_min, process.t_max))
    assert ts.shape == (13,)
    assert np.all(np.diff(ts) < 0), ts
    assert ts[0] == pytest.approx(process.t_max)
    if GRIDS[name].ends_at_t_min:
        assert ts[-1] == pytest.approx(process.t_min)
    else:  # Linspace: one spacing above t_min
        assert ts[-1] > process.t_min and ts[-2] > ts[-1]


def test_log_snr_and_karras_grid_spacing():
    process = P.VP()
    ts = LogSNR()(process, 10, process.t_min, process.t_max)
    lam = np.asarray(process.log_snr(ts))
    np.testing.assert_allclose(np.diff(lam), np.full(10, np.diff(lam).mean()), rtol=1e-3)

    edm = P.EDM()
    ts = np.asarray(Karras(rho=7.0)(edm, 10, edm.t_min, edm.t_max))
    np.testing.assert_allclose(np.diff(ts ** (1 / 7)), np.full(10, np.diff(ts ** (1 / 7)).mean()), rtol=1e-3)


def test_flow_grid_is_uniform_in_the_rectified_flow_time():
    """tau = s/(s + sigma_data), s = sigma/alpha, is evenly spaced; tau = 1 where alpha = 0."""
    for process in (DDPM, P.EDM(), P.FlowMatching()):
        ts = FlowTime(sigma_data=0.5)(process, 10, process.t_min, process.t_max)
        tau = 1.0 / (1.0 + 0.5 * np.exp(0.5 * np.asarray(process.log_snr(ts), np.float64)))  # s/(s + 0.5)
        np.testing.assert_allclose(np.diff(tau), np.full(10, np.diff(tau).mean()), rtol=2e-3, err_msg=str(process))
    flow = P.FlowMatching()
    ts = np.asarray(FlowTime(sigma_data=1.0)(flow, 4, flow.t_min, flow.t_max))
    # with sigma_data = 1, tau is flow matching's own t: the grid is uniform in t
    np.testing.assert_allclose(ts, np.linspace(flow.t_max, flow.t_min, 5), rtol=1e-4)
    with pytest.raises(
        ValueError, match="FlowTime grid option sigma_data=-1.0 is not allowed; sigma_data must be a finite number > 0"
    ):
        FlowTime(sigma_data=-1.0)
    with pytest.raises(ValueError, match="Karras grid option rho=0.0 is not allowed"):
        Karras(rho=0.0)


def test_explicit_grid():
    denoiser = MIXTURE.denoiser(DDPM)
    ts = np.linspace(1.0, 0.001, 6)
    x = sample(denoiser, jax.random.key(0), (8, 16), steps=5, grid=ts).samples
    assert x.shape == (8, 16)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(denoiser, jax.random.key(0), (8, 16), steps=5, grid=ts[::-1])
    with pytest.raises(ValueError, match="steps \\+ 1"):
        sample(denoiser, jax.random.key(0), (8, 16), steps=4, grid=ts)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps must be an int >= 1, got 0"),
        ({"steps": -3}, "steps must be an int >= 1"),
        ({"steps": 2.5}, "steps must be an int >= 1"),
        ({"t_min": 0.0}, "outside"),
        ({"t_max": 2.0}, "outside"),
        ({"shape": (0, 16)}, "positive ints"),
        ({"shape": 16}, "tuple"),
        ({"grid": [1.0, 0.5, 0.7]}, "strictly decreasing"),
        ({"grid": [0.9, 0.5], "t_max": 1.0}, "t_max=1.0 disagrees with the explicit grid"),
    ],
)
def test_bad_input_raises_before_tracing(kwargs, match):
    network = CountingNetwork()
    denoiser = Denoiser(network, DDPM, "eps")
    shape = kwargs.pop("shape", (4, 16))
    steps = kwargs.pop("steps", len(kwargs["grid"]) - 1 if "grid" in kwargs else 50)
    with pytest.raises(ValueError, match=match):
        sample(denoiser, jax.random.key(0), shape, steps=steps, **kwargs)
    assert network.calls == 0


@pytest.mark.parametrize(
    "table, what, name, options, error, match",
    [
        (SOLVERS, "solver", "dpm++9", {}, ValueError, "unknown solver 'dpm\\+\\+9'.*allowed"),
        (GRIDS, "grid", "cosine", {}, ValueError, "unknown grid 'cosine'.*allowed"),
        (GRIDS, "grid", "flow", {}, ValueError, "unknown grid 'flow' \\(did you mean 'flow_time'\\?\\)"),
        (SOLVERS, "solver", "edm", {}, ValueError, "unknown solver 'edm'"),
        (SOLVERS, "solver", "heun", {"eta": 0.5}, ValueError, "unknown option 'eta' for solver 'heun'"),
        (
            SOLVERS,
            "solver",
            "ddim",
            {"eta": 2.0},
            ValueError,
            "DDIM option eta=2.0 is not allowed; eta must be a number in \\[0, 1\\]",
        ),
        (SOLVERS, "solver", "ddim", {"eta": "big"}, TypeError, "option eta of solver 'ddim' must be of type float"),
        (GRIDS, "grid", "karras", {"rho": -7.0}, ValueError, "Karras grid option rho=-7.0 is not allowed"),
    ],
)
def test_config_names_resolve_to_validated_objects(table, what, name, options, error, match):
    """The config boundary: a name and an options dict become a solver or grid object, or a message
    naming the bad name, option or value and what is allowed."""
    with pytest.raises(error, match=match):
        build_named(table, name, options, what)


def test_solver_and_grid_must_be_objects():
    denoiser = Denoiser(CountingNetwork(), DDPM, "eps")
    with pytest.raises(TypeError, match="solver must be a Solver instance.*build_named\\(SOLVERS"):
        sample(denoiser, jax.random.key(0), (4, 16), solver="ddim")
    with pytest.raises(TypeError, match="grid must be a Grid instance.*build_named\\(GRIDS"):
        sample(denoiser, jax.random.key(0), (4, 16), grid="logsnr")
    assert solver("unipc", order=2, variant="bh1") == UniPC(order=2, variant="bh1")
    assert grid("karras") == Karras(rho=7.0)


def test_repeated_eager_calls_do_not_retrace():
    """An eager sample() compiles once per (network, solver, grid, shape, steps, range): the
    network's Python body (counted) runs on the first call only; a new key, a new process array
    or a new Denoiser around the same network reuse the program; other steps trace again."""
    network = CountingNetwork()
    denoiser = Denoiser(network, DDPM, "x0")
    first = sample(denoiser, jax.random.key(0), (4, 16), solver=UniPC(), steps=6)
    traced = network.calls
    assert traced > 0
    again = sample(Denoiser(network, DDPM, "x0"), jax.random.key(0), (4, 16), solver=UniPC(), steps=6)
    np.testing.assert_array_equal(first.samples, again.samples)
    sample(denoiser, jax.random.key(1), (4, 16), solver=UniPC(), steps=6)
    other_chain = P.VP.from_betas(np.linspace(2e-4, 0.02, 1000))  # same structure, other arrays
    sample(Denoiser(network, other_chain, "x0"), jax.random.key(1), (4, 16), solver=UniPC(), steps=6)
    assert network.calls == traced
    sample(denoiser, jax.random.key(0), (4, 16), solver=UniPC(), steps=7)
    assert network.calls > traced


def test_solvers_validate_their_options_on_construction():
    with pytest.raises(
        ValueError, match="GaussianPC option max_std=-1 is not allowed; max_std must be a finite number > 0"
    ):
        GaussianPC(max_std=-1)
    with pytest.raises(
        ValueError, match="UniPC option order=4 is not allowed; order must be one of \\[None, 1, 2, 3\\]"
    ):
        UniPC(order=4)


def test_truncated_explicit_grid_starts_from_its_first_time():
    """A Karras grid that starts at sigma 12.4 < t_max = 80 of EDM: the prior is drawn at sigma 12.4
    (drawn at 80, the weight error was 1.20), and the exact mixture denoiser's samples have the
    right weights and widths."""
    edm = P.EDM()
    ts = np.asarray(Karras()(edm, 18, edm.t_min, 12.4), np.float64)
    result = sample(
        MIXTURE.denoiser(edm),
        jax.random.key(0),
        (20_000, 16),
        solver=solver("dpm_solver++"),
        steps=18,
        grid=ts,
        return_trajectory=True,
    )
    assert float(result.ts[0]) == pytest.approx(12.4)
    start_std = float(jnp.std(result.trajectory[0]))
    assert abs(start_std / 12.4 - 1) < 0.02, start_std  # the prior N(0, 12.4^2 I), not N(0, 80^2 I)
    weight_error, std_error = MIXTURE.sample_errors(result.samples)
    assert weight_error <= 0.05, (weight_error, std_error)
    assert std_error <= 0.05, (weight_error, std_error)


def test_network_output_shape_mismatch_is_reported():
    denoiser = Denoiser(lambda x, t: x[:, :8], DDPM, "eps")
    with pytest.raises(ValueError, match="maps inputs of shape \\(4, 16\\) to \\(4, 8\\)"):
        sample(denoiser, jax.random.key(0), (4, 16))


def test_euler_maruyama_refuses_singular_start():
    denoiser = gaussian([0.0], [1.0]).denoiser(P.FlowMatching())
    with pytest.raises(ValueError, match="singular at t_max"):
        sample(denoiser, jax.random.key(0), (4, 1), solver=solver("euler_maruyama"))
    x = sample(denoiser, jax.random.key(0), (4, 1), solver=solver("euler_maruyama"), t_max=0.999).samples
    assert np.all(np.isfinite(np.asarray(x)))


@pytest.mark.parametrize("steps", [FEW_STEPS, FEW_STEPS + 1])
def test_the_default_solver_depends_on_the_steps(steps):
    """Without a solver, sample() runs GaussianPC on its flow-time grid up to FEW_STEPS steps and UniPC on
    its log-SNR grid beyond: the same samples as those settings named explicitly, and not the other's."""
    denoiser = MIXTURE.denoiser(DDPM)
    key, shape = jax.random.key(3), (64, 16)
    default = sample(denoiser, key, shape, steps=steps).samples
    few = sample(denoiser, key, shape, solver=GaussianPC(), grid=FlowTime(), steps=steps).samples
    many = sample(denoiser, key, shape, solver=UniPC(), grid=LogSNR(), steps=steps).samples
    chosen, other = (few, many) if steps <= FEW_STEPS else (many, few)
    np.testing.assert_array_equal(default, chosen)
    assert float(jnp.max(jnp.abs(default - other))) > 1e-3
    assert type(default_solver(steps)) is (GaussianPC if steps <= FEW_STEPS else UniPC)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        default_solver(0)
