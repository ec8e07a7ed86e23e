"""What the gradient all-reduce costs on a split CPU: the same number of floats takes longer to
all-reduce in more arrays (XLA's CPU runtime appears to meet the other devices once per operand).
Times a psum over --devices CPU devices of the `unet-small` parameter count split into 1, 10, 100
and as many arrays as the train step of cpu_vs_torch (batch 32) all-reduces, and counts the operands
of that step's all-reduces in its compiled program.

Then a way to one operand that keeps the loss global: a toy network (20 3x3 convolutions with
biases, 40 parameter arrays) trained on a batch sharded over the devices, its noise drawn in the
global view. The gradient of the whole loss under the partitioner is compared with the same loss
whose network alone runs under `shard_map`, its raveled parameters cast to varying once (so their
gradient is one psum; `diffjax.training.sharding.network_with_one_gradient_all_reduce`, what the
trainer does on a split CPU): all-reduce operands, ms per gradient, and the largest gradient
difference.

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

from diffjax.training.sharding import network_with_one_gradient_all_reduce
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
    return ms_per_call(psum, xs, rounds=rounds, calls=calls)


def ms_per_call(fn, *args, rounds: int, calls: int) -> list[float]:
    """ms per call of fn(*args), one value per round of `calls` calls, each waited for; after one
    call that compiles."""
    jax.block_until_ready(fn(*args))
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
        per_round.append((time.perf_counter() - start) / calls * 1e3)
    return per_round


def _toy_network(params, x, t, y=None, *, key=None):
    """Convolutions with biases and SiLU, in the models' apply signature (t, y and key unused)."""
    for i in range(len(params) // 2):
        h = jax.lax.conv_general_dilated(x, params[f"k{i}"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.silu(h + params[f"b{i}"])
    return x


def toy_gradients(devices: int, rounds: int, layers: int = 20, calls: int = 10) -> list[dict]:
    """Operands, ms (median over rounds) and largest gradient difference from the partitioner's,
    for the toy's gradient computed both ways."""
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((devices,), ("data",), axis_types=auto, devices=jax.devices()[:devices])
    keys = jax.random.split(jax.random.key(0), layers + 2)
    params = {f"k{i}": 0.1 * jax.random.normal(keys[i], (3, 3, 16, 16)) for i in range(layers)}
    params.update({f"b{i}": jnp.zeros((16,)) for i in range(layers)})
    params = jax.device_put(params, NamedSharding(mesh, P()))
    x = jax.device_put(jax.random.normal(keys[-1], (16 * devices, 16, 16, 16)), NamedSharding(mesh, P("data")))

    def loss(network):
        def of(params, x):
            noise = jax.random.normal(keys[-2], x.shape)  # drawn for the whole batch, as a diffusion loss does
            return jnp.mean((network(params, x + noise, 0.0) - noise) ** 2)

        return of

    one_pcast = network_with_one_gradient_all_reduce(_toy_network, mesh)
    ways = {"partitioner": _toy_network, "network under shard_map, one pcast": one_pcast}
    grads, rows = {}, []
    for name, network in ways.items():
        gradient = jax.jit(jax.grad(loss(network)))
        grads[name] = gradient(params, x)
        per_round = ms_per_call(gradient, params, x, rounds=rounds, calls=calls)
        difference = max(float(jnp.max(jnp.abs(grads[name][k] - grads["partitioner"][k]))) for k in params)
        operands = all_reduce_operands(gradient.lower(params, x).compile().as_text())
        rows.append(
            {"way": name, "operands": operands, "ms": statistics.median(per_round), "max_difference": difference}
        )
    return rows


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
    toy = toy_gradients(args.devices, args.rounds)
    markdown = "\n\n".join(
        [
            f"# A psum of {params:,} floats (the unet-small parameter count) over {args.devices} CPU devices",
            f"The unet-small train step (batch {BATCH}, split over {args.devices} devices) all-reduces "
            f"{sum(operands)} arrays in {len(operands)} all-reduce op(s) ({operands} operands). "
            f"In {most} arrays the psum takes {extra:.1f} ms longer than in one, "
            f"{per_operand * 1e3:.0f} us per extra array.",
            markdown_table(["arrays", "floats per array", "ms per psum (median)"], rows),
            "A toy network (20 convolutions, 40 parameter arrays), its gradient two ways:",
            markdown_table(
                ["way", "all-reduce operands", "ms per gradient (median)", "largest difference from the partitioner's"],
                [[r["way"], r["operands"], f"{r['ms']:.1f}", f"{r['max_difference']:.1e}"] for r in toy],
            ),
        ]
    )
    print(markdown)
    payload = {"devices": args.devices, "rounds": args.rounds, "parameters": params, "step_operands": operands}
    payload["ms_per_psum"] = {str(k): v for k, v in times.items()}
    payload["ms_per_extra_operand"] = per_operand
    payload["ms_beyond_one_array"] = extra
    payload["toy_gradients"] = toy
    print("wrote", write_results(args.name, payload, markdown))


if __name__ == "__main__":
    main()
