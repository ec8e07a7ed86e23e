"""Faithfulness fixtures: diffusers' schedulers and our solvers on the same exact problem, grid and noise.

    python -m experiments.peers.make_fixtures            # needs the peers extra (CPU torch, diffusers)

For every case below (a diffusers setting, an NFE, and the diffjax solver with the options that
reproduce diffusers' convention), on a 3-component Gaussian mixture in 8-D with per-dimension stds
(closed-form posterior mean, stored), this writes tests/fixtures/peers/<case>.npz with

    times        our explicit grid: the times at which our DiscreteVP of the same chain has
                 diffusers' nodes (its final sigma = 0 node dropped: that step is our final denoising)
    x_start      the start state, our `sample()`'s prior draw at times[0] for key PRNGKey(seed)
    reference    diffusers' final samples from x_start (float64 run, module docstring of
                 diffusers_schedulers), with its nodes (grid_alphas, grid_sigmas) and the (alpha,
                 sigma) of each network call (call_alphas, call_sigmas)
    solver, solver_options (JSON), denoise_final, steps, nfe, setting

plus problem.npz (the mixture and the chain). It then runs our solvers on those fixtures (the same
code path as tests/test_faithfulness.py) and writes the per-case agreement to
experiments/results/faithfulness.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from diffjax.denoisers import Denoiser
from diffjax.samplers import DDIM, SOLVERS, Times, sample
from diffjax.validation import build_named
from experiments.benchmarks.common import markdown_table, write_results
from experiments.peers import diffusers_schedulers as peers

FIXTURES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests", "fixtures", "peers"
)
SEED = 0
BATCH = 32
DIM = 8

# case -> (diffusers setting, nfe, our solver name, its options, denoise_final)
CASES: dict[str, tuple[str, int, str, dict, bool]] = {
    "ddim_trailing_10": ("ddim_trailing", 10, "ddim", {}, True),
    "euler_10": ("euler", 10, "ddim", {}, True),
    "euler_karras_8": ("euler_karras", 8, "ddim", {}, True),
    "heun_9": ("heun", 9, "edm_heun", {}, True),
    "heun_karras_9": ("heun_karras", 9, "edm_heun", {}, True),
    "dpm++2m_10": ("dpm++2m", 10, "dpm_solver++", {"order": 2}, True),
    "dpm++2m_karras_8": ("dpm++2m_karras", 8, "dpm_solver++", {"order": 2}, True),
    "dpm++2m_lu_6": ("dpm++2m_lu", 6, "dpm_solver++", {"order": 2}, True),
    "dpm++3m_10": ("dpm++3m", 10, "dpm_solver++", {"order": 3, "quadratic_weight": "halved"}, True),
    "dpm++3m_karras_8": ("dpm++3m_karras", 8, "dpm_solver++", {"order": 3, "quadratic_weight": "halved"}, True),
    "unipc_bh2_10": ("unipc_bh2", 10, "unipc", {"order": 2, "variant": "bh2"}, True),
    "unipc_bh2_karras_8": ("unipc_bh2_karras", 8, "unipc", {"order": 2, "variant": "bh2"}, True),
    "unipc3_bh2_10": ("unipc3_bh2", 10, "unipc", {"order": 3, "variant": "bh2"}, True),
    "unipc_bh1_10": (
        "unipc_bh1",
        10,
        "unipc",
        {"order": 2, "variant": "bh1", "lower_order_final": "last_steps"},
        False,
    ),
    "deis_10": ("deis", 10, "deis", {"order": 2, "polynomial": "log_rho", "lower_order_final": "last_steps"}, False),
    "deis3_10": ("deis3", 10, "deis", {"order": 3, "polynomial": "log_rho", "lower_order_final": "last_steps"}, False),
}


def mixture(seed: int = SEED) -> dict[str, np.ndarray]:
    """3 components in 8-D: weights 0.5/0.3/0.2, means of norm ~2, per-dimension stds in [0.15, 1]."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((3, DIM)) * (2.0 / np.sqrt(DIM))
    stds = rng.uniform(0.15, 1.0, (3, DIM))
    return {"weights": np.array([0.5, 0.3, 0.2]), "means": means, "stds": stds}


def mixture_x0(params: dict, x: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
    """E[x0 | x_t = x] for the diagonal Gaussian mixture, float64."""
    w, mu, std = params["weights"], params["means"], params["stds"]
    var = alpha**2 * std**2 + sigma**2  # (K, D)
    diff = x[:, None, :] - alpha * mu[None]  # (B, K, D)
    logp = np.log(w)[None] - 0.5 * np.sum(diff**2 / var + np.log(2 * np.pi * var), axis=-1)
    resp = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))  # (B, K)
    means = mu[None] + (alpha * std**2 / var)[None] * diff
    return np.einsum("bk,bkd->bd", resp, means)


def jax_mixture_x0(params: dict, process):
    """The same posterior mean as a diffjax x0-network fn(x, t), float32, at our process's alpha(t)."""
    w, mu, std = (jnp.asarray(params[k], jnp.float32) for k in ("weights", "means", "stds"))

    def fn(x, t):
        alpha, sigma = process.alpha(t)[:, None, None], process.sigma(t)[:, None, None]
        var = alpha**2 * std**2 + sigma**2
        diff = x[:, None, :] - alpha * mu[None]
        logp = jnp.log(w)[None] - 0.5 * jnp.sum(diff**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)
        resp = jax.nn.softmax(logp, axis=1)
        return jnp.einsum("bk,bkd->bd", resp, mu[None] + alpha * std**2 / var * diff)

    return fn


def our_grid(process, result: peers.PeerResult) -> tuple[np.ndarray, bool]:
    """Our explicit grid for diffusers' nodes, and whether diffusers ends with a step into sigma = 0."""
    to_zero = bool(result.grid_sigmas[-1] == 0.0)
    alphas = result.grid_alphas[:-1] if to_zero else result.grid_alphas
    times = np.clip(peers.our_times(process, alphas), process.t_min, process.t_max)
    return times, to_zero


def start_state(denoiser, times) -> np.ndarray:
    """Our sample()'s prior draw at times[0] for PRNGKey(SEED) (the trajectory's first state)."""
    result = sample(
        denoiser,
        jax.random.PRNGKey(SEED),
        (BATCH, DIM),
        solver=DDIM(),
        steps=1,
        grid=Times((float(times[0]), float(times[-1]))),
        denoise_final=False,
        return_trajectory=True,
    )
    return np.asarray(result.trajectory[0], np.float64)


def run_ours(fixture: dict, denoiser) -> tuple[np.ndarray, np.ndarray, int]:
    """Our solver on the fixture's grid and key: (samples, start state, nfe)."""
    solver = build_named(SOLVERS, str(fixture["solver"]), json.loads(str(fixture["solver_options"])), "solver")
    times = np.asarray(fixture["times"], np.float64)
    result = sample(
        denoiser,
        jax.random.PRNGKey(int(fixture["seed"])),
        fixture["reference"].shape,
        solver=solver,
        steps=times.size - 1,
        grid=Times(tuple(times.tolist())),
        denoise_final=bool(fixture["denoise_final"]),
        return_trajectory=True,
    )
    return np.asarray(result.samples, np.float64), np.asarray(result.trajectory[0], np.float64), result.nfe


def relative_differences(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per sample: ||ours - reference|| / ||reference||."""
    return np.linalg.norm(ours - reference, axis=-1) / np.linalg.norm(reference, axis=-1)


def make_case(case: str, params: dict, process, denoiser) -> dict:
    setting, nfe, solver, options, denoise_final = CASES[case]
    x0_fn = lambda x, a, s: mixture_x0(params, x, a, s)  # noqa: E731
    probe = peers.run_setting(setting, x0_fn, np.zeros((1, DIM)), nfe)  # the grid only
    times, to_zero = our_grid(process, probe)
    if to_zero != denoise_final:
        raise RuntimeError(
            f"{case}: diffusers ends at sigma {probe.grid_sigmas[-1]}, but denoise_final={denoise_final}"
        )
    x_start = start_state(denoiser, times)
    result = peers.run_setting(setting, x0_fn, x_start / probe.initial_std, nfe)
    return {
        "setting": np.array(setting),
        "solver": np.array(solver),
        "solver_options": np.array(json.dumps(options, sort_keys=True)),
        "denoise_final": np.array(denoise_final),
        "seed": np.array(SEED),
        "nfe": np.array(result.nfe),
        "times": times,
        "x_start": x_start,
        "reference": result.samples,
        "grid_alphas": result.grid_alphas,
        "grid_sigmas": result.grid_sigmas,
        "call_alphas": result.alphas,
        "call_sigmas": result.sigmas,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), help=f"subset of {list(CASES)}")
    args = parser.parse_args(argv)
    os.makedirs(FIXTURES, exist_ok=True)
    params = mixture()
    betas = peers.default_betas()
    process = peers.our_process(betas)
    np.savez(os.path.join(FIXTURES, "problem.npz"), betas=betas, **params)
    denoiser = Denoiser(jax_mixture_x0(params, process), process, prediction="x0")
    rows, records = [], {}
    for case in args.cases:
        fixture = make_case(case, params, process, denoiser)
        np.savez(os.path.join(FIXTURES, f"{case}.npz"), **fixture)
        ours, start, nfe = run_ours(fixture, denoiser)
        if not np.array_equal(start, fixture["x_start"]):
            raise RuntimeError(f"{case}: our start state differs from the one the fixture was made from")
        if nfe != int(fixture["nfe"]):
            raise RuntimeError(f"{case}: our run took {nfe} network calls, diffusers {int(fixture['nfe'])}")
        rel = relative_differences(ours, fixture["reference"])
        spread = relative_differences(fixture["reference"], np.zeros_like(ours) + fixture["reference"].mean(0))
        records[case] = {
            "setting": CASES[case][0],
            "nfe": nfe,
            "solver": CASES[case][2],
            "options": CASES[case][3],
            "denoise_final": CASES[case][4],
            "max_rel_diff": float(rel.max()),
            "median_rel_diff": float(np.median(rel)),
            "sample_spread": float(np.median(spread)),
        }
        options = ", ".join(f"{k}={v!r}" for k, v in CASES[case][3].items())
        rows.append(
            [f"`{CASES[case][0]}`", nfe, f"`{CASES[case][2]}`({options})", f"{rel.max():.1e}", f"{np.median(rel):.1e}"]
        )
        print(f"{case:22s} nfe={nfe:2d} max {rel.max():.2e} median {np.median(rel):.2e}", flush=True)
    table = markdown_table(
        ["diffusers setting", "NFE", "diffjax solver (options)", "max rel. diff", "median rel. diff"], rows
    )
    markdown = (
        "# Faithfulness to diffusers 0.42.1\n\n"
        "Our solvers on diffusers' grid (mapped onto our DiscreteVP of the same 1000-step linear chain),"
        " from the same start state, on a 3-component 8-D Gaussian mixture with per-dimension stds and its"
        f" closed-form denoiser; {BATCH} samples. Relative difference per sample ||ours - diffusers|| /"
        " ||diffusers||; ours runs in float32, diffusers in float64 on its float32 grid.\n"
        "Made by `python -m experiments.peers.make_fixtures`; checked by tests/test_faithfulness.py.\n\n"
        f"{table}\n"
    )
    import diffusers  # the peers extra
    import torch

    versions = {"diffusers": diffusers.__version__, "torch": torch.__version__}
    path = write_results("faithfulness", {"peers": versions, "cases": records, "batch": BATCH, "dim": DIM}, markdown)
    print(markdown)
    print(f"wrote {path} and {len(args.cases)} fixtures under {FIXTURES}")


if __name__ == "__main__":
    main()
