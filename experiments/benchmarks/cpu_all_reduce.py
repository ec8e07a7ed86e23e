"""What the gradient all-reduce costs on a split CPU: XLA's CPU runtime reduces an all-reduce of
several arrays one operand at a time, so the same number of floats costs more in more arrays. Times
a psum over --devices CPU devices of the `unet-small` parameter count split into 1, 10, 100 and as
many arrays as the train step of cpu_vs_torch all-reduces, and counts the operands of that step's
all-reduces in its compiled program.

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

_ALL_REDUCE = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*) all-reduce(?:-start)?\(")
_SHAPE = re.compile(r"\b[a-z]+\d*\[[\d,]*\]")


def all_reduce_operands(hlo_text: str) -> list[int]:
    """The operand count of every all-reduce in an HLO module's text: the arrays in its result's
    shape (a tuple for several operands)."""
    return [len(_SHAPE.findall(m.group(1))) for m in map(_ALL_REDUCE.match, hlo_text.splitlines()) if m]


def train_step_all_reduces() -> tuple[int, list[int]]:
    """(parameter count, operands of each all-reduce) of the cpu_vs_torch `unet-small` train step."""
    from experiments.benchmarks.cpu_step_profile import build_step

    step, state, data = build_step()
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
    if args.devices < 2 or args.rounds < 1:
        raise SystemExit(f"--devices {args.devices} must be at least 2 and --rounds {args.rounds} at least 1")
    jax.config.update("jax_num_cpu_devices", args.devices)  # before JAX computes anything
    jax.config.update("jax_platforms", "cpu")
    params, operands = train_step_all_reduces()
    counts = sorted({1, 10, 100, *operands})
    times = {k: statistics.median(psum_ms(params, k, args.devices, args.rounds)) for k in counts}
    per_operand = (times[max(counts)] - times[1]) / (max(counts) - 1)
    rows = [[k, f"{params / k:,.0f}", f"{times[k]:.2f}"] for k in counts]
    markdown = "\n\n".join(
        [
            f"# A psum of {params:,} floats (the unet-small parameter count) over {args.devices} CPU devices",
            f"The unet-small train step (batch 32, split over {args.devices} devices) all-reduces "
            f"{sum(operands)} arrays in {len(operands)} all-reduce op(s) ({operands} operands). "
            f"Each extra operand costs {per_operand * 1e3:.0f} us here: about "
            f"{per_operand * sum(operands):.1f} ms per train step.",
            markdown_table(["arrays", "floats per array", "ms per psum (median)"], rows),
        ]
    )
    print(markdown)
    payload = {"devices": args.devices, "rounds": args.rounds, "parameters": params, "step_operands": operands}
    payload["ms_per_psum"] = {str(k): v for k, v in times.items()}
    payload["ms_per_extra_operand"] = per_operand
    print("wrote", write_results(args.name, payload, markdown))


if __name__ == "__main__":
    main()
