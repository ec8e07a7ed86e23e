"""Sampler accuracy against exact answers: every solver x grid at 5, 10, 20 and 50 NFE.

The exact x0-denoiser of the 16-D mixture of 4 separated isotropic Gaussians (stds 0.05, 0.1, 0.25,
0.5; weights 0.1..0.4; `diffjax.data.toy.benchmark_mixture`) under the discrete DDPM chain (linear
betas 1e-4..0.02, 1000 steps, t_min = 1/1000). For each configuration: 100k samples, the mixture-
weight error (sum of |w_hat - w|, samples assigned to their most probable component) and the worst
relative error of a component's standard deviation. NFE counts every network evaluation including
the final denoising at t_min; a solver whose NFE per step does not divide NFE - 1 gets the largest
number of steps that stays within the budget (the table shows the NFE actually used).

    python experiments/benchmarks/sampler_accuracy.py               # full table (~20 min on 2 CPUs)
    python experiments/benchmarks/sampler_accuracy.py --quick       # 20k samples, NFE 10 only
    python experiments/benchmarks/sampler_accuracy.py --only "dpm++ 2M;ddim" --merge  # re-run rows

Prints a table; writes experiments/results/sampler_accuracy.json (device, versions, date, rows) and
experiments/results/sampler_accuracy.md (the commit-ready table).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import time

import jax
import numpy as np

from diffjax import processes as P
from diffjax.data.toy import benchmark_mixture
from diffjax.io import atomic_write_json, atomic_write_text
from diffjax.samplers import FEW_STEPS, default_solver, optimize_grid, sample
from diffjax.samplers import GRIDS as GRID_TABLE
from diffjax.samplers import SOLVERS as SOLVER_TABLE
from diffjax.validation import build_named

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")

# (label, solver name, options); the first row was the default of sample() at every NFE when the rows were
# computed (now: beyond 11 steps; gaussian_pc up to 11).
SOLVERS = [
    ("unipc bh2, order by step (default)", "unipc", {}),
    ("gaussian_pc", "gaussian_pc", {}),
    ("gaussian_pc order 1", "gaussian_pc", {"order": 1}),
    ("gaussian_pc, no corrector", "gaussian_pc", {"corrector": False}),
    ("unipc bh2, order by step, lower_order_final=last_steps", "unipc", {"lower_order_final": "last_steps"}),
    ("unipc-3 bh2", "unipc", {"order": 3}),
    ("unipc-2 bh2", "unipc", {"order": 2}),
    ("unipc-3 bh1", "unipc", {"order": 3, "variant": "bh1"}),
    ("dpm++ 2M", "dpm_solver++", {"order": 2}),
    ("dpm++ 2M, lower_order_final=last_steps", "dpm_solver++", {"order": 2, "lower_order_final": "last_steps"}),
    ("dpm++ 3M", "dpm_solver++", {"order": 3}),
    ("dpm-solver-3 (single-step)", "dpm_solver", {"order": 3}),
    ("dpm-solver-2 (single-step)", "dpm_solver", {"order": 2}),
    ("deis-3 (rhoAB)", "deis", {"order": 3, "polynomial": "rho"}),
    ("sa-solver 3/3 tau=0", "sa_solver", {"order": 3, "corrector_order": 3, "tau": 0.0}),
    ("ddim", "ddim", {}),
    ("euler (t)", "euler", {}),
    ("heun (t)", "heun", {}),
    ("edm heun", "edm_heun", {}),
    ("dpm++ 2M sde", "dpm_solver++_sde", {}),
    ("sa-solver 2/2 tau=1", "sa_solver", {}),
    ("edm stochastic", "edm_stochastic", {}),
    ("ancestral", "ancestral", {}),
    ("euler-maruyama", "euler_maruyama", {}),
    ("pc langevin snr=0.16", "pc", {}),
]
GRIDS = ["flow_time", "logsnr", "karras", "uniform", "quadratic"]
TUNED = (
    "unipc bh2, order by step (default)",
    "gaussian_pc",
    "dpm++ 2M",
)  # the solvers also run on benchmark-tuned grids


def make_solver(name, options):
    return build_named(SOLVER_TABLE, name, options, "solver")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "numpy", "optax"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def device() -> str:
    d = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    return f"{d.platform} ({d.device_kind}), {os.cpu_count()} cores, {cpu}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k samples, NFE 10 only, no optimized grids")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument(
        "--only",
        default=None,
        help="solver labels to run, separated by ';' (a subset of the rows; no files written unless --merge)",
    )
    parser.add_argument(
        "--merge", action="store_true", help="with --only: replace those rows in the saved .json and rebuild the .md"
    )
    parser.add_argument("--markdown-only", action="store_true", help="rebuild the .md from the saved .json")
    parser.add_argument(
        "--tuned-only", action="store_true", help="re-run only the 'optimized on benchmark' rows, in the saved .json"
    )
    args = parser.parse_args()
    if args.markdown_only:
        with open(os.path.join(RESULTS, "sampler_accuracy.json")) as f:
            meta = json.load(f)
        nfes = sorted({r["nfe_budget"] for r in meta["rows"] if r["name"] != "adaptive"})
        atomic_write_text(os.path.join(RESULTS, "sampler_accuracy.md"), markdown(meta["rows"], nfes, meta["samples"]))
        return
    n = args.samples or (20_000 if args.quick else 100_000)
    nfes = [10] if args.quick else [5, 10, 20, 50]

    ddpm = P.VP.from_betas(np.linspace(1e-4, 0.02, 1000))
    mixture = benchmark_mixture(16)
    denoiser = mixture.denoiser(ddpm)
    key = jax.random.key(0)
    rows = []

    def run(label, name, options, grid, grid_label, nfe):
        solver = make_solver(name, options)
        steps = 1 if name == "adaptive" else solver.steps_for_nfe(nfe)
        grid = build_named(GRID_TABLE, grid, {}, "grid") if isinstance(grid, str) else grid
        t0 = time.perf_counter()
        result = sample(denoiser, key, (n, 16), solver=solver, steps=steps, grid=grid)
        x, info = result.samples, {"nfe": result.nfe}
        weight_error, std_error = mixture.sample_errors(x)
        _, stds = mixture.sample_statistics(x)
        row = dict(
            solver=label,
            name=name,
            options=options,
            grid=grid_label,
            nfe_budget=nfe,
            nfe=int(info["nfe"]),
            steps=steps,
            weight_error=weight_error,
            std_error=std_error,
            component_std_errors=[float(v) for v in stds / mixture.rms_stds() - 1],
            seconds=time.perf_counter() - t0,
        )
        rows.append(row)
        print(
            f"{label:28s} {grid_label:22s} NFE {row['nfe']:3d}  weight {weight_error:.4f}  "
            f"std {std_error:7.2%}  ({row['seconds']:.1f}s)",
            flush=True,
        )

    selected = SOLVERS if args.only is None else [row for row in SOLVERS if row[0] in args.only.split(";")]
    if args.only is not None and len(selected) != len(args.only.split(";")):
        known = [row[0] for row in SOLVERS]
        raise SystemExit(f"--only {args.only!r}: each label must be one of {known} (separated by ';')")
    if not args.tuned_only:
        for nfe in nfes:
            for label, name, options in selected:
                for grid in GRIDS:
                    run(label, name, options, grid, grid, nfe)
        for tol in ([1e-3] if args.quick else [1e-2, 1e-3, 1e-4]) if args.only is None else []:
            run(f"adaptive dopri5 tol={tol:g}", "adaptive", {"rtol": tol, "atol": tol}, "logsnr", "(own steps)", 0)
    if not args.quick:
        # AYS-style grids tuned *on this benchmark* by optimize_grid (not data-agnostic: for reference)
        for nfe in nfes:
            for label, name, options in [row for row in selected if row[0] in TUNED]:
                solver = make_solver(name, options)
                steps = solver.steps_for_nfe(nfe)
                ts = optimize_grid(
                    denoiser, steps=steps, solver=solver, shape=(16,), key=jax.random.key(1), iterations=200
                )
                run(label, name, options, ts, "optimized on benchmark", nfe)

    if args.tuned_only:
        with open(os.path.join(RESULTS, "sampler_accuracy.json")) as f:
            saved = json.load(f)["rows"]
        rows = [r for r in saved if r["grid"] != "optimized on benchmark"] + rows
    if args.merge:
        with open(os.path.join(RESULTS, "sampler_accuracy.json")) as f:
            saved = json.load(f)["rows"]
        rerun = {label for label, _, _ in selected}
        rows = [r for r in saved if r["solver"] not in rerun] + rows
    table = markdown(rows, nfes, n)
    print(table)
    os.makedirs(RESULTS, exist_ok=True)
    meta = dict(
        what="sampler accuracy on the exact denoiser of the 16-D 4-component mixture, DDPM chain",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device(),
        versions=versions(),
        samples=n,
        default=" / ".join(
            f"{solver} on {solver.default_grid} ({when})"
            for solver, when in (
                (default_solver(FEW_STEPS), f"up to {FEW_STEPS} steps"),
                (default_solver(FEW_STEPS + 1), "beyond"),
            )
        ),
        rows=rows,
    )
    if not args.quick and (args.only is None or args.merge):
        atomic_write_json(os.path.join(RESULTS, "sampler_accuracy.json"), meta)
        atomic_write_text(os.path.join(RESULTS, "sampler_accuracy.md"), table)


NOTES = """
## The default and the targets

The default of sample() depends on the steps (chosen by the worst case over the sampler suite of exact
problems, experiments/results/sampler_suite.md): `gaussian_pc` on its "flow_time" grid (uniform in
s/(s + 0.5), s = sigma/alpha) up to 11 steps, UniPC bh2 with the order by step on its "logsnr" grid
beyond (the "(default)" row, labelled when it was the default at every NFE). `gaussian_pc` meets this
benchmark's targets: 0.116 / 4.8 % at 5 NFE (target: std <= 25 %) and 0.0086 / 0.6 % at 10 NFE
(target: 0.015 / 5 %), where UniPC on the log-SNR grid reached 0.048 / 13.1 % at 10 NFE; at 20 and
50 NFE its std error is mostly the -1.9 % of the final posterior mean on the 0.05-std component. On a
trained MNIST model it had the lowest FID of the solvers compared, at 10 and 20 NFE and on each of
three sampling seeds (experiments/results/mnist_gaussian_pc.md). On the suite's steep-spectrum
Gaussians at 13 NFE and more, and on its image sets, it falls behind, which is why UniPC is the default
beyond 11 steps.

When the rows were computed (2026-11-22; row labels as of then), the multistep solvers (DPM-Solver++,
UniPC, DEIS) lowered their last ODE steps themselves (`lower_order_final="last_steps"`). Their
default is now diffusers' convention, "before_denoise" (experiments/results/lower_order_final.md),
which on this mixture is worse at 5 NFE (UniPC by step on karras: 0.553 / 183 % against 0.297 /
27.3 % above) and better on the suite's Gaussians. Re-run on 2026-12-06 after the API rework, 80
cells (UniPC by step and DPM++ 2M with lower_order_final="last_steps", DDIM and Heun, at every NFE
and grid) and 25 cells at 5 NFE (every gaussian_pc row and the single-step DPM-Solvers) equal the
table to the printed digits.

Why polynomial solvers need more steps here: along a trajectory the x0-prediction of a Gaussian
component of std s is, in lam = log(alpha/sigma), a sigmoid ~ 1/sqrt(1 + e^{-2 (lam + log s)}) with
complex singularities at -log(s) +- i pi/2. A polynomial in lam through the solver's nodes follows
it only within about pi/2 of such a point, whatever the order. The components change at lam = 0.7
.. 3.0, while 9 steps over the DDPM chain's range [-5.06, 4.61] are h = 1.07 apart. No standard
solver x grid above meets the target, nor did grids tuned on this benchmark for UniPC-2, UniPC-3 or
DPM-Solver++(3M) (Nelder-Mead over 9-step log-SNR grids: best 0.017 / 5.5 %).

What gaussian_pc does instead: for data N(m, s^2 I) the ODE's solution is known in closed form, and
m = x0 - s^2 (alpha/sigma) eps. Per sample it fits s^2 to its last two evaluations and steps
exactly for that Gaussian, so once a sample has chosen a component it follows that component's
width whatever the step size. Both parts matter. On the log-SNR grid gaussian_pc reaches the std
target (3.5 %) but not the weight target (0.050). On the flow grid the polynomial solvers reach the
weight target (UniPC 0.014) but not the std target (29.6 %). The flow grid puts its steps where
the mixture's weights are decided, s near sigma_data, and few where s << sigma_data; there the fit
integrates exactly. Without the corrector the solver is first order below sigma_data, as its row
shows.

The rows "optimized on benchmark" use `optimize_grid` (squared error against a 256-step reference,
which weighs mode assignment over component widths). They show what a grid fitted to the model
can add: gaussian_pc reaches 0.0018 / 0.8 % at 10 NFE, while UniPC's weights become exact but its
std error stays at 37 %.
"""


def markdown(rows, nfes, n) -> str:
    lines = [
        "# Sampler accuracy: 16-D 4-component mixture, DDPM chain (1000 linear betas)",
        "",
        f"Exact x0-denoiser, {n} samples; each cell is `weight error / worst std error` "
        "(sum |w_hat - w|; max_k |s_hat_k/s_k - 1|) at the NFE budget of the column (NFE includes the",
        "final denoising at t_min, which alone costs -1.9 % on the 0.05-std component). Issue targets for",
        "the default: 10 NFE <= 0.015 / 5 %, 5 NFE std <= 25 %. Written by",
        "experiments/benchmarks/sampler_accuracy.py.",
        "",
        "| solver | grid | " + " | ".join(f"NFE {v}" for v in nfes) + " |",
        "|---|---|" + "---|" * len(nfes),
    ]
    keys = []
    for r in rows:
        if r["name"] == "adaptive":
            continue
        k = (r["solver"], r["grid"])
        if k not in keys:
            keys.append(k)
    for solver, grid in keys:
        cells = []
        for nfe in nfes:
            match = [r for r in rows if (r["solver"], r["grid"]) == (solver, grid) and r["nfe_budget"] == nfe]
            if match:
                r = match[0]
                note = "" if r["nfe"] == nfe else f" ({r['nfe']})"
                cells.append(f"{r['weight_error']:.3f} / {r['std_error']:.1%}{note}")
            else:
                cells.append("-")
        lines.append(f"| {solver} | {grid} | " + " | ".join(cells) + " |")
    adaptive = [r for r in rows if r["name"] == "adaptive"]
    if adaptive:
        lines += ["", "Adaptive Dormand-Prince 5(4) (rtol = atol = tol), NFE as reported by `SampleResult.nfe`:", ""]
        lines += [f"- {r['solver']}: NFE {r['nfe']}, {r['weight_error']:.4f} / {r['std_error']:.2%}" for r in adaptive]
    return "\n".join(lines) + "\n" + NOTES


if __name__ == "__main__":
    main()
