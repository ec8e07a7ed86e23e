"""Sampler overhead: wall time of a jitted `sample()` with N steps of a tiny MLP, divided by the time
of NFE single jitted calls of that MLP (a Python loop, what a hand-written sampler would pay). A
ratio near 1 means the solver's own arithmetic, the history it keeps and the loop cost nothing next
to the network; the target is <= 1.1. CPU; medians of repeats, because the machine is shared.

    python experiments/benchmarks/sampler_overhead.py [--steps 50] [--repeats 15]

Prints a table; writes experiments/results/sampler_overhead.json (device, versions, date, rows).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import processes as P
from diffjax.denoisers import Denoiser
from diffjax.io import atomic_write_json
from diffjax.samplers import SOLVERS, sample
from diffjax.validation import build_named
from experiments.benchmarks.sampler_accuracy import RESULTS, device, versions

CONFIGS = [
    ("gaussian_pc", "gaussian_pc", {}),
    ("unipc (default)", "unipc", {}),
    ("ddim", "ddim", {}),
    ("dpm_solver++ 3M", "dpm_solver++", {"order": 3}),
    ("dpm_solver-3", "dpm_solver", {"order": 3}),
    ("deis-3", "deis", {"order": 3, "polynomial": "rho"}),
    ("sa_solver", "sa_solver", {}),
    ("dpm_solver++_sde", "dpm_solver++_sde", {}),
    ("edm_heun", "edm_heun", {}),
    ("edm stochastic", "edm_stochastic", {}),
    ("pc langevin", "pc", {}),
]


def make_mlp(key, dim: int, width: int):
    """A tiny eps-network: x, t -> MLP([x, sin/cos(t)])."""
    k1, k2, k3 = jax.random.split(key, 3)
    params = (
        jax.random.normal(k1, (dim + 2, width)) / np.sqrt(dim + 2),
        jax.random.normal(k2, (width, width)) / np.sqrt(width),
        jax.random.normal(k3, (width, dim)) / np.sqrt(width) * 0.1,
    )

    def mlp(x, t):
        h = jnp.concatenate([x, jnp.sin(t)[:, None], jnp.cos(t)[:, None]], axis=1)
        h = jax.nn.silu(h @ params[0])
        h = jax.nn.silu(h @ params[1])
        return h @ params[2]

    return mlp


def median_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--nfe",
        type=int,
        default=None,
        help="instead of --steps: the most steps within this many evaluations, per solver",
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()

    process = P.VP.from_betas(np.linspace(1e-4, 0.02, 1000))
    mlp = make_mlp(jax.random.key(0), args.dim, args.width)
    denoiser = Denoiser(mlp, process, "eps")
    x = jax.random.normal(jax.random.key(1), (args.batch, args.dim))
    t = jnp.full((args.batch,), 0.5)
    mlp_jit = jax.jit(mlp)

    def one_call_loop(n):
        def go():
            y = x
            for _ in range(n):
                y = mlp_jit(y, t)
            y.block_until_ready()

        return go

    rows = []
    print(f"{'solver':20s} {'NFE':>5s} {'sample() ms':>12s} {'NFE x call ms':>14s} {'ratio':>7s}")
    for label, name, options in CONFIGS:
        solver = build_named(SOLVERS, name, options, "solver")
        steps = solver.steps_for_nfe(args.nfe, denoise_final=False) if args.nfe else args.steps
        nfe = solver.nfe(steps)
        run = jax.jit(
            lambda k, solver=solver, steps=steps: (
                sample(denoiser, k, (args.batch, args.dim), solver=solver, steps=steps, denoise_final=False).samples
            )
        )
        key = jax.random.key(2)
        # Interleave the two measurements so that load changes on the shared machine hit both.
        t_sample, t_calls = [], []
        for _ in range(3):
            t_sample.append(median_time(lambda: run(key).block_until_ready(), args.repeats))
            t_calls.append(median_time(one_call_loop(nfe), args.repeats))
        ts, tc = statistics.median(t_sample), statistics.median(t_calls)
        rows.append(
            dict(
                solver=label,
                name=name,
                options=options,
                steps=steps,
                nfe=nfe,
                sample_seconds=ts,
                calls_seconds=tc,
                ratio=ts / tc,
            )
        )
        print(f"{label:20s} {nfe:5d} {ts * 1e3:12.2f} {tc * 1e3:14.2f} {ts / tc:7.3f}", flush=True)

    os.makedirs(RESULTS, exist_ok=True)
    atomic_write_json(
        os.path.join(RESULTS, "sampler_overhead.json"),
        dict(
            what="jitted sample() wall time / (NFE x one jitted MLP call), tiny MLP, CPU",
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            device=device(),
            versions=versions(),
            load_average=os.getloadavg(),
            settings=dict(
                steps=args.steps,
                nfe=args.nfe,
                repeats=args.repeats,
                batch=args.batch,
                dim=args.dim,
                width=args.width,
                mlp="(dim+2) -> width -> width -> dim, silu",
            ),
            rows=rows,
        ),
    )


if __name__ == "__main__":
    main()
