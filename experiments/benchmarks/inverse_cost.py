"""Run time and compiled memory of every posterior sampler at equal NFE, against plain sampling.

The network is the MNIST-sized `unet-small` preset (28 x 28 x 1, random weights: the cost does not depend
on training); the problem is noiseless 4x super-resolution. Every method runs `steps` steps with one network
evaluation each (DPS, PiGDM and TDS also back-propagate through the network, FK steering and TDS carry
`batch` particles). Time = median of `repeats` runs after compilation; memory = XLA's temporary buffer size
of the compiled program (`memory_analysis().temp_size_in_bytes`).

    python -m experiments.benchmarks.inverse_cost [--batch=4 --steps=10 --repeats=3]

writes experiments/results/inverse_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from tqdm import tqdm

from diffjax import processes as P
from diffjax.control import operators as O
from diffjax.control import particles as Pa
from diffjax.control import posterior as Po
from diffjax.denoisers import Denoiser
from diffjax.models import api as models
from diffjax.samplers import DDIM, sample
from experiments.benchmarks.common import environment, markdown_table, write_results


def measure(fn, key, repeats):
    compiled = jax.jit(fn).lower(key).compile()
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    jax.block_until_ready(compiled(key))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(key))
        times.append(time.perf_counter() - start)
    return statistics.median(times), temp


def main(batch: int, steps: int, repeats: int):
    model = models.create("unet-small", image_size=28, attn_resolutions=(7,))
    apply, params = models.functional(model)
    process = P.VP()
    denoiser = Denoiser(lambda x, t: apply(params, x, t), process, "eps")
    shape = (batch, 28, 28, 1)
    op = O.super_resolution(shape[1:], 4)
    truth = jax.random.uniform(jax.random.key(0), shape, minval=-1, maxval=1)
    obs = O.measure(op, jax.random.key(1), truth, 0.0)
    noisy = O.measure(op, jax.random.key(1), truth, 0.05)
    cases = [("plain DDIM(eta=1)", lambda k: sample(denoiser, k, shape, solver=DDIM(eta=1.0), steps=steps).samples)]
    for name, method in [
        ("DPS", Po.DPS()),
        ("PiGDM", Po.PiGDM(data_std=0.5)),
        ("DDNM", Po.DDNM()),
        ("replacement", Po.Replacement()),
        ("DDRM", Po.DDRM()),
        ("DiffPIR", Po.DiffPIR()),
        ("DAPS", Po.DAPS(data_std=0.5)),
        ("RED-diff", Po.RedDiff()),
    ]:
        cases.append((name, lambda k, m=method: Po.posterior_sample(denoiser, obs, k, m, steps=steps).samples))
    potential = Pa.measurement_log_potential(noisy, data_std=0.5, process=process)
    for name, twist in (("FK steering (SMC)", False), ("TDS", True)):
        cases.append((name, lambda k, tw=twist: Pa.smc(denoiser, k, shape, potential, steps=steps, twist=tw).samples))
    rows, payload = [], {"batch": batch, "steps": steps, "repeats": repeats, "runs": []}
    base = None
    for name, fn in tqdm(cases, desc="methods"):
        seconds, temp = measure(fn, jax.random.key(2), repeats)
        base = seconds if base is None else base
        mib = "" if temp is None else f"{temp / 2**20:.1f}"
        rows.append([name, f"{seconds:.3f}", f"{seconds / base:.2f}", mib])
        payload["runs"].append(dict(method=name, seconds=seconds, ratio=seconds / base, temp_bytes=temp))
        print(rows[-1])
    env = environment()
    md = [
        "# Posterior samplers: run time and memory at equal NFE",
        "",
        f"unet-small (28 x 28 x 1, random weights), batch {batch}, {steps} steps (one network evaluation each, plus "
        "the final denoising where a method uses it), noiseless 4x super-resolution (SMC/TDS: s = 0.05). "
        f"Median of {repeats} runs after compilation on {env['device']} ({env['cpu_count']} cores, shared with "
        f"other jobs: compare ratios, not seconds), {env['date']}. Memory: XLA's temporary buffers of the "
        "compiled program.",
        "",
        markdown_table(["method", "seconds", "ratio to plain", "temp MiB"], rows),
    ]
    write_results("inverse_cost", payload, "\n".join(md))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    main(args.batch, args.steps, args.repeats)
