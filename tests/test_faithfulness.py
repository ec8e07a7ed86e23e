"""Faithfulness to diffusers 0.42.1 (issue 17, item 3): our solvers, run through `sample()` on diffusers'
grid from the same start state with the exact denoiser of a Gaussian mixture, reproduce diffusers'
final samples to float32 precision. The fixtures (tests/fixtures/peers/, made by
`python -m experiments.peers.make_fixtures` with the peers extra) hold diffusers' results; no torch here.

Each fixture names the diffjax solver and the options that reproduce diffusers' convention; the
second group of tests shows that those options matter: the other convention misses by far more
than the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.denoisers import Denoiser
from diffjax.processes import DiscreteVP
from diffjax.samplers import SOLVERS, Karras, LogSNR, Times, sample
from diffjax.validation import build_named

FIXTURES = Path(__file__).parent / "fixtures" / "peers"
# float32 sampling against a float64 reference: the measured worst case is a few 1e-6
# (experiments/results/faithfulness.md); 2e-5 leaves room for other CPUs' rounding.
TOLERANCE = 2e-5

# one per solver in the default run (each case compiles one sampling program); the other grids,
# orders and variants in the slow set
DEFAULT_CASES = ["ddim_trailing_10", "heun_9", "dpm++3m_10", "unipc_bh2_10", "deis_10"]
SLOW_CASES = [
    "euler_10",
    "euler_karras_8",
    "heun_karras_9",
    "dpm++2m_10",
    "dpm++2m_karras_8",
    "dpm++2m_lu_6",
    "dpm++3m_karras_8",
    "unipc_bh2_karras_8",
    "unipc3_bh2_10",
    "unipc_bh1_10",
    "deis3_10",
]


def mixture_x0_network(problem, process):
    """E[x0 | x_t] of the diagonal Gaussian mixture, as an x0-network fn(x, t) at our alpha(t), sigma(t)."""
    w, mu, std = (jnp.asarray(problem[k], jnp.float32) for k in ("weights", "means", "stds"))

    def fn(x, t):
        alpha, sigma = process.alpha(t)[:, None, None], process.sigma(t)[:, None, None]
        var = alpha**2 * std**2 + sigma**2  # (B, K, D)
        diff = x[:, None, :] - alpha * mu[None]
        log_weights = jnp.log(w) - 0.5 * jnp.sum(diff**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)
        posterior = jax.nn.softmax(log_weights, axis=1)
        return jnp.einsum("bk,bkd->bd", posterior, mu[None] + alpha * std**2 / var * diff)

    return fn


@pytest.fixture(scope="module")
def denoiser():
    problem = np.load(FIXTURES / "problem.npz")
    process = DiscreteVP.from_betas(problem["betas"])
    return Denoiser(mixture_x0_network(problem, process), process, prediction="x0")


def load(case: str) -> dict:
    with np.load(FIXTURES / f"{case}.npz") as data:
        return {k: data[k] for k in data.files}


def run(denoiser, fixture: dict, **option_changes):
    options = {**json.loads(str(fixture["solver_options"])), **option_changes}
    solver = build_named(SOLVERS, str(fixture["solver"]), options, "solver")
    times = tuple(float(t) for t in fixture["times"])
    return sample(
        denoiser,
        jax.random.PRNGKey(int(fixture["seed"])),
        fixture["reference"].shape,
        solver=solver,
        steps=len(times) - 1,
        grid=Times(times),
        denoise_final=bool(fixture["denoise_final"]),
        return_trajectory=True,
    )


def relative_difference(samples, reference) -> np.ndarray:
    """Per sample ||samples - reference|| / ||reference||."""
    samples = np.asarray(samples, np.float64)
    return np.linalg.norm(samples - reference, axis=-1) / np.linalg.norm(reference, axis=-1)


def check_case(denoiser, case: str) -> None:
    fixture = load(case)
    # the grid: our process has diffusers' alphas at the fixture's times
    nodes = fixture["grid_alphas"][: len(fixture["times"])]
    alphas = np.asarray(denoiser.process.alpha(jnp.asarray(fixture["times"], jnp.float32)), np.float64)
    np.testing.assert_allclose(alphas, nodes, rtol=2e-6, err_msg=f"{case}: our times do not give diffusers' grid")

    result = run(denoiser, fixture)
    np.testing.assert_allclose(
        np.asarray(result.trajectory[0]),
        fixture["x_start"],
        rtol=1e-6,
        err_msg=f"{case}: sample()'s prior draw changed since the fixture was made; regenerate it "
        "(python -m experiments.peers.make_fixtures)",
    )
    assert result.nfe == int(fixture["nfe"]), f"{case}: {result.nfe} network calls, diffusers made {fixture['nfe']}"
    rel = relative_difference(result.samples, fixture["reference"])
    assert rel.max() <= TOLERANCE, f"{case}: max relative difference {rel.max():.2e} > {TOLERANCE}"


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_our_solver_reproduces_diffusers(denoiser, case):
    check_case(denoiser, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES)
def test_our_solver_reproduces_diffusers_on_more_grids_and_orders(denoiser, case):
    check_case(denoiser, case)


# (case, the other convention): the option that reproduces diffusers is necessary
OTHER_CONVENTIONS = [
    ("dpm++3m_10", dict(quadratic_weight="exact")),
    ("dpm++3m_10", dict(lower_order_final="last_steps")),
    pytest.param("deis_10", dict(polynomial="rho"), marks=pytest.mark.slow),
    pytest.param("unipc_bh1_10", dict(variant="bh2"), marks=pytest.mark.slow),
    pytest.param("unipc3_bh2_10", dict(lower_order_final="none"), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case, change", OTHER_CONVENTIONS)
def test_the_other_convention_misses(denoiser, case, change):
    fixture = load(case)
    rel = relative_difference(run(denoiser, fixture, **change).samples, fixture["reference"])
    assert np.median(rel) > 20 * TOLERANCE, f"{case} with {change}: median relative difference {np.median(rel):.2e}"


@pytest.mark.parametrize("case, grid", [("dpm++2m_karras_8", Karras()), ("dpm++2m_lu_6", LogSNR())])
def test_our_named_grids_are_diffusers_karras_sigmas_and_lu_lambdas(denoiser, case, grid):
    """Karras(rho=7) and LogSNR() over the process's whole range, with N - 1 steps, are the N nonzero
    nodes of diffusers' use_karras_sigmas / use_lu_lambdas (which then append sigma = 0). Tolerance:
    diffusers' small noise levels inherit the float32 rounding of its alphas_cumprod, which
    1 - alphas_cumprod magnifies near alpha = 1 (worst at sigma_min); ours come from log1p of the
    betas."""
    fixture = load(case)
    process = denoiser.process
    nodes = fixture["grid_sigmas"][:-1] / fixture["grid_alphas"][:-1]  # noise levels sigma/alpha
    ts = grid(process, nodes.size - 1, process.t_min, process.t_max)  # float32 throughout
    ours = np.asarray(process.sigma(ts), np.float64) / np.asarray(process.alpha(ts), np.float64)
    np.testing.assert_allclose(ours, nodes, rtol=2e-4)


def test_fixtures_are_all_checked():
    names = {p.stem for p in FIXTURES.glob("*.npz")} - {"problem"}
    assert names == set(DEFAULT_CASES) | set(SLOW_CASES)
