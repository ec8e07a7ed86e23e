"""What `lower_order_final` costs: the multistep solvers with each convention on exact problems.

    python -m experiments.benchmarks.lower_order_final [--nfe 5 10 20] [--dim 64]

Problem: zero-mean Gaussian data in `dim` dimensions with eigenvalues (1 + k)^-2 in a random basis,
under the DDPM chain (DiscreteVP of diffusers' linear betas), the solvers' default grid (log-SNR),
`denoise_final=True`. The reference is the exact probability-flow solution from the same start state
to t_min followed by the same final denoising, both in closed form (each eigen-coordinate y_k of x_t
keeps y_k / sqrt(alpha^2 l_k + sigma^2)). Error: median over samples of ||x - exact|| / ||exact||.

"before_denoise" counts the final denoising as the last, first-order step (diffusers' convention);
"last_steps" lowers the last ODE steps themselves to ..., 2, 1 and then denoises (the former default).
Writes experiments/results/lower_order_final.{json,md}.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.denoisers import Denoiser
from diffjax.processes import DiscreteVP
from diffjax.samplers import DEIS, DPMSolverPP, UniPC, sample
from experiments.benchmarks.common import markdown_table, write_results

BATCH = 128
CONVENTIONS = ("before_denoise", "last_steps")
SOLVERS = {
    "DPM-Solver++ 2M": lambda lof: DPMSolverPP(order=2, lower_order_final=lof),
    "DPM-Solver++ 3M": lambda lof: DPMSolverPP(order=3, lower_order_final=lof),
    "UniPC (order by step), bh2": lambda lof: UniPC(lower_order_final=lof),
    "UniPC-2 bh2": lambda lof: UniPC(order=2, lower_order_final=lof),
    "DEIS-3": lambda lof: DEIS(order=3, lower_order_final=lof),
}


def gaussian_problem(dim: int, seed: int = 0):
    """(eigenvalues, orthonormal basis) of the covariance."""
    basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return (1.0 + np.arange(dim)) ** -2.0, basis


def exact_denoiser(process, eigenvalues, basis) -> Denoiser:
    lam = jnp.asarray(eigenvalues, jnp.float32)
    u = jnp.asarray(basis, jnp.float32)

    def fn(x, t):
        alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
        y = x @ u
        return (alpha * lam / (alpha**2 * lam + sigma**2) * y) @ u.T

    return Denoiser(fn, process, prediction="x0")


def exact_result(process, eigenvalues, basis, x_start, t_max, t_min) -> np.ndarray:
    """The exact PF-ODE solution from x_start at t_max to t_min, then the exact x0 prediction there."""

    def coefficients(t):
        return float(process.alpha(jnp.float32(t))), float(process.sigma(jnp.float32(t)))

    a0, s0 = coefficients(t_max)
    a1, s1 = coefficients(t_min)
    y = x_start @ basis
    y_end = y * np.sqrt(a1**2 * eigenvalues + s1**2) / np.sqrt(a0**2 * eigenvalues + s0**2)
    return (a1 * eigenvalues / (a1**2 * eigenvalues + s1**2) * y_end) @ basis.T


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nfe", type=int, nargs="*", default=[5, 10, 20])
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args(argv)
    process = DiscreteVP.from_betas(np.linspace(1e-4, 0.02, 1000, dtype=np.float32))
    eigenvalues, basis = gaussian_problem(args.dim)
    denoiser = exact_denoiser(process, eigenvalues, basis)
    rows, records = [], []
    for name, make in SOLVERS.items():
        for nfe in args.nfe:
            errors = {}
            for convention in CONVENTIONS:
                solver = make(convention)
                result = sample(
                    denoiser,
                    jax.random.PRNGKey(0),
                    (BATCH, args.dim),
                    solver=solver,
                    steps=solver.steps_for_nfe(nfe),
                    return_trajectory=True,
                )
                assert result.nfe == nfe, (name, nfe, result.nfe)
                x_start = np.asarray(result.trajectory[0], np.float64)
                ts = np.asarray(result.ts, np.float64)
                exact = exact_result(process, eigenvalues, basis, x_start, ts[0], ts[-1])
                samples = np.asarray(result.samples, np.float64)
                rel = np.linalg.norm(samples - exact, axis=-1) / np.linalg.norm(exact, axis=-1)
                errors[convention] = float(np.median(rel))
            records.append({"solver": name, "nfe": nfe, **errors})
            ratio = errors["last_steps"] / errors["before_denoise"]
            rows.append([name, nfe, f"{errors['before_denoise']:.4f}", f"{errors['last_steps']:.4f}", f"{ratio:.2f}"])
            print(rows[-1], flush=True)
    headers = ["solver", "NFE", '"before_denoise" (default)', '"last_steps" (former default)', "ratio"]
    table = markdown_table(headers, rows)
    markdown = (
        "# lower_order_final: the cost of each convention\n\n"
        f"Zero-mean Gaussian data, D={args.dim}, eigenvalues (1+k)^-2 in a random basis, DDPM chain, log-SNR grid, "
        f"{BATCH} samples; median relative error against the exact PF-ODE solution from the same start followed "
        "by the same final denoising. Made by `python -m experiments.benchmarks.lower_order_final`.\n\n"
        f"{table}\n"
    )
    write_results("lower_order_final", {"dim": args.dim, "batch": BATCH, "results": records}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
