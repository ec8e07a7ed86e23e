"""Compile time a user feels, and what JAX's persistent compilation cache saves across processes.

Each measurement runs in a fresh process (a child of this script), three times:
  no cache   the cache switched off (what every run paid before the CLI turned it on);
  cold       the cache on, in an empty directory (the first run: compiles and writes);
  warm       the same directory again (every later run: reads the compiled programs back).
Per item the child records the first call (trace + compile + run) and the second call (run only);
"compile" = first - second. Items: the train step of configs/default.py (unet-small, batch 32) and
of DiT-S/2 on 32x32x4 latents (batch 8), and the first `sample()` of the default config's network
(batch 64, 20 steps) with each solver below, jitted with the parameters as an argument, as the CLI
and `load_run` do. "process to first step" is the wall time from starting the child to the end of
its first train step (imports, building, compiling). CPU; the machine may be shared, so read the
cold/warm ratio, which is measured in the same conditions.

    python -m experiments.benchmarks.compile_time [--solvers gaussian_pc,unipc,...] [--name compile_time]
    python -m experiments.benchmarks.compile_time --no-dit --solvers gaussian_pc,dpm_solver++ --modes cold,warm

(`--modes cold,warm` leaves out the no-cache process: a cold run compiles everything the same way and
also writes the cache, so it is the "before" at slightly more than the no-cache cost.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

START = time.time()

import jax  # noqa: E402  (START first: the child's start-up includes importing jax)
import numpy as np  # noqa: E402

import configs.default  # noqa: E402
from diffjax import models  # noqa: E402
from diffjax import processes as P  # noqa: E402
from diffjax.data import dataset_info  # noqa: E402
from diffjax.denoisers import Denoiser  # noqa: E402
from diffjax.samplers import SOLVERS, sample  # noqa: E402
from diffjax.training.from_config import mesh_from_config  # noqa: E402
from diffjax.training.run import build_run, enable_compilation_cache, init_state, make_jitted_train_step  # noqa: E402
from diffjax.validation import build_named  # noqa: E402
from experiments.benchmarks.common import markdown_table, write_results  # noqa: E402
from experiments.benchmarks.train_step import benchmark_config, synthetic_data_info  # noqa: E402

DEFAULT_SOLVERS = ("gaussian_pc", "unipc", "dpm_solver++", "ddim", "heun", "euler_maruyama")
MODES = ("no cache", "cold", "warm")


def first_and_second(fn, *args) -> tuple[float, float]:
    """Seconds of the first call (compile + run) and of the second (run) of fn(*args)."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def default_config_run():
    config = configs.default.get_config()
    return config, build_run(config, dataset_info(config.data), mesh_from_config(config))


def dit_run():
    config = benchmark_config("DiT-S/2", 8, "float32", "none", True)
    return config, build_run(config, synthetic_data_info("DiT-S/2"), mesh_from_config(config))


def train_step_times(make_run, batch: int) -> dict:
    config, run = make_run()
    step = make_jitted_train_step(run)
    state = init_state(run)
    rng = np.random.default_rng(0)
    data = {
        "image": rng.standard_normal((batch, *run.image_shape), dtype=np.float32),
        "label": rng.integers(0, max(run.spec.num_classes, 1), batch, dtype=np.int32),
    }
    times = []
    for _ in range(2):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "second_s": times[1], "process_to_first_step_s": None}


def sample_times(solver_name: str, batch: int = 64, steps: int = 20) -> dict:
    model = models.create("unet-small", num_res_blocks=1)
    apply, params = models.functional(model)
    solver = build_named(SOLVERS, solver_name, {}, "solver")
    process = P.EDM()
    shape = (batch, 16, 16, 1)

    def draw(params, key):
        denoiser = Denoiser(lambda x, t: apply(params, x, t), process, "eps")
        return sample(denoiser, key, shape, solver=solver, steps=steps).samples

    first, second = first_and_second(jax.jit(draw), params, jax.random.key(0))
    return {"first_s": first, "second_s": second}


def child(solvers: list[str], cache_dir: str | None, dit: bool) -> dict:
    if cache_dir:
        enable_compilation_cache(cache_dir)
    else:
        jax.config.update("jax_enable_compilation_cache", False)
    out = {}
    row = train_step_times(default_config_run, 32)
    row["process_to_first_step_s"] = time.time() - START
    out["train step: default config (unet-small, batch 32)"] = row
    if dit:
        out["train step: DiT-S/2 32x32x4 (batch 8)"] = train_step_times(dit_run, 8)
    for name in solvers:
        out[f"sample(): {name}, unet-small, 20 steps, batch 64"] = sample_times(name)
    return out


def run_child(solvers: list[str], cache_dir: str | None, dit: bool) -> dict:
    command = [sys.executable, "-m", "experiments.benchmarks.compile_time", "--child", "--solvers", ",".join(solvers)]
    command += [] if dit else ["--no-dit"]
    command += ["--cache-dir", cache_dir] if cache_dir else []
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    done = subprocess.run(command, cwd=root, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(rows: dict) -> str:
    """One row per item: compile seconds per mode, warm / the first mode, and the run time."""
    modes = list(rows)
    first, last = modes[0], modes[-1]
    headers = ["item"] + [f"compile s ({mode})" for mode in modes] + [f"{last} / {first}", "run s"]
    table = []
    for item in rows[first]:
        compile_s = {mode: rows[mode][item]["first_s"] - rows[mode][item]["second_s"] for mode in modes}
        table.append(
            [item]
            + [f"{compile_s[mode]:.2f}" for mode in modes]
            + [f"{compile_s[last] / compile_s[first]:.2f}", f"{rows[first][item]['second_s']:.3f}"]
        )
    item = next(iter(rows[first]))
    startup = {mode: rows[mode][item]["process_to_first_step_s"] for mode in modes}
    table.append(
        ["process start to the end of the first train step (default config)"]
        + [f"{startup[mode]:.1f}" for mode in modes]
        + [f"{startup[last] / startup[first]:.2f}", "-"]
    )
    return markdown_table(headers, table)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solvers", default=",".join(DEFAULT_SOLVERS))
    parser.add_argument("--name", default="compile_time", help="results/<name>.{json,md}")
    parser.add_argument("--no-dit", action="store_true", help="leave out the DiT-S/2 train step")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="which of 'no cache', 'cold', 'warm' to run (cold before warm)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    solvers = [s for s in args.solvers.split(",") if s]
    unknown = sorted(set(solvers) - set(SOLVERS))
    if unknown:
        raise SystemExit(f"unknown solvers {unknown}; choose from {sorted(SOLVERS)}")
    if args.child:
        print(json.dumps(child(solvers, args.cache_dir, not args.no_dit)))
        return
    modes = [m for m in MODES if m in args.modes.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for mode in modes:
            rows[mode] = run_child(solvers, None if mode == "no cache" else cache_dir, not args.no_dit)
            print(mode, json.dumps(rows[mode], indent=1), flush=True)
    markdown = (
        "# Compile time per model and solver, without and with the persistent compilation cache\n\n"
        "Each column is a fresh process; compile = first call - second call. CPU, shared machine.\n\n" + render(rows)
    )
    print(markdown)
    print("wrote", write_results(args.name, {"solvers": solvers, "rows": rows}, markdown))


if __name__ == "__main__":
    main()
