"""What the gradient all-reduce costs on a split CPU: the same number of floats takes longer to
all-reduce in more arrays (XLA's CPU runtime appears to meet the other devices once per operand).
Times a psum over --devices CPU devices of the `unet-small` parameter count split into 1, 10, 100
and as many arrays as the train step of cpu_vs_torch (batch 32) all-reduces, and counts the operands
of that step's all-reduces in its compiled program.

    python -m experiments.benchmarks.cpu_all_reduce [--devices 2] [--rounds 5]

Every call is waited for before the next (several in flight can deadlock XLA's CPU runtime). Reports
the median ms per call over rounds and the cost per extra operand.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.benchmarks.common import markdown_table, write_results
from experiments.benchmarks.cpu_step_profile import hlo_computations

BATCH = 32  # the train step's, as in cpu_vs_torch
_SHAPE = re.compile(r"\b[a-z]+\d*\[[\d,]*\]")
_ALL_REDUCE_OPS = ("all-reduce", "all-reduce-start")


def all_reduce_operands(hlo_text: str) -> list[int]:
    """The operand count of every all-reduce in an HLO module's text: the arrays in its result's
    shape (a tuple for several operands)."""
    instructions = [i for computation in hlo_computations(hlo_text).values() for i in computation]
    return [len(_SHAPE.findall(shape)) for _, shape, opcode, _ in instructions if opcode in _ALL_REDUCE_OPS]


def train_step_all_reduces() -> tuple[int, list[int]]:
    """(parameter count, operands of each all-reduce) of the cpu_vs_torch `unet-small` train step."""
    from experiments.benchmarks.cpu_step_profile import build_step

    step, state, data = build_step(BATCH)
    count = sum(x.size for x in jax.tree.leaves(state.params))
    return count, all_reduce_operands(step.lower(state, data).compile().as_text())


def psum_ms(total: int, arrays: int, devices: int, rounds: int, calls: int = 20) -> list[float]:
    """ms per call, one value per round, of a psum over the devices of `total` floats in `arrays`
    arrays of equal size."""
    mesh = jax.make_mesh((devices,), ("data",))
    sizes = [total // arrays + (i < total % arrays) for i in range(arrays)]
    xs = [jax.device_put(jnp.ones((devices, n)), NamedSharding(mesh, P("data"))) for n in sizes]
    psum = jax.jit(
        jax.shard_map(lambda vs: [jax.lax.psum(v, "data") for v in vs], mesh=mesh, in_specs=P("data"), out_specs=P())
    )
    jax.block_until_ready(psum(xs))
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(psum(xs))
        per_round.append((time.perf_counter() - start) / calls * 1e3)
    return per_round


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--name", default="cpu_all_reduce")
    args = parser.parse_args(argv)
    if args.devices < 2:
        raise SystemExit(f"--devices {args.devices}: must be at least 2 (an all-reduce over one device is a copy)")
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: must be at least 1")
    jax.config.update("jax_num_cpu_devices", args.devices)  # before JAX computes anything
    jax.config.update("jax_platforms", "cpu")
    params, operands = train_step_all_reduces()
    counts = sorted({1, 10, 100, *operands})
    times = {k: statistics.median(psum_ms(params, k, args.devices, args.rounds)) for k in counts}
    most = max(counts)
    extra = times[most] - times[1]  # what the step's arrays cost beyond one array of the same floats
    per_operand = extra / (most - 1)
    rows = [[k, f"{params / k:,.0f}", f"{times[k]:.2f}"] for k in counts]
    markdown = "\n\n".join(
        [
            f"# A psum of {params:,} floats (the unet-small parameter count) over {args.devices} CPU devices",
            f"The unet-small train step (batch {BATCH}, split over {args.devices} devices) all-reduces "
            f"{sum(operands)} arrays in {len(operands)} all-reduce op(s) ({operands} operands). "
            f"In {most} arrays the psum takes {extra:.1f} ms longer than in one, "
            f"{per_operand * 1e3:.0f} us per extra array.",
            markdown_table(["arrays", "floats per array", "ms per psum (median)"], rows),
        ]
    )
    print(markdown)
    payload = {"devices": args.devices, "rounds": args.rounds, "parameters": params, "step_operands": operands}
    payload["ms_per_psum"] = {str(k): v for k, v in times.items()}
    payload["ms_per_extra_operand"] = per_operand
    payload["ms_beyond_one_array"] = extra
    print("wrote", write_results(args.name, payload, markdown))


if __name__ == "__main__":
    main()
