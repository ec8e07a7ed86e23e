"""Training-step cost of the few-step objectives that differentiate a network in forward mode (sCM's
tangent, MeanFlow's target, both by `jax.jvp` through the whole network, attention included)
against plain denoising training of the same network, in the same run.

    python -m experiments.benchmarks.few_step_cost                   # small DiT, 16x16x4, batch 8
    python -m experiments.benchmarks.few_step_cost --attention pallas_gpu   # on a GPU: the JVP kernels

Each row is one jitted value-and-gradient of the loss: the median time of `--repeats` calls after a
warm-up, its ratio to denoising's, and XLA's compiled temporary memory (`temp`: what the program
allocates beyond its inputs and outputs) and its ratio. MeanFlow's u(x, t, r) is the DiT with t
embedded and t - r as one more input channel. Writes experiments/results/few_step_cost_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from diffjax import models
from diffjax.distill import AdaptiveWeighting, TrigFlow, meanflow_loss, scm_loss
from diffjax.losses import denoising_loss
from diffjax.processes import VP, FlowMatching
from experiments.benchmarks.common import markdown_table, slug, write_results


def dit(args, extra_channels: int = 0):
    overrides = dict(
        image_size=args.image_size,
        in_channels=args.channels + extra_channels,
        depth=args.depth,
        hidden_size=args.hidden,
        num_heads=args.heads,
        attention_impl=args.attention,
        attention_interpret=args.interpret,
    )
    model = models.create("DiT-S/2", **overrides)
    return models.functional(model)


def losses(args) -> dict:
    """name -> (loss_fn(params, key, batch), params)."""
    apply, params = dit(args)
    apply_mf, params_mf = dit(args, extra_channels=1)
    c = args.channels

    def average_velocity(p, x, t, r):
        lag = jnp.broadcast_to((t - r)[:, None, None, None], x.shape[:-1] + (1,))
        return apply_mf(p, jnp.concatenate([x, lag], axis=-1), t)[..., :c]

    weighting = AdaptiveWeighting()
    return {
        "denoising (eps, VP)": (denoising_loss(apply, VP()), params),
        "sCM training (TrigFlow)": (
            scm_loss(apply, TrigFlow(), weighting=weighting),
            {"student": params, "weighting": weighting.init(jax.random.key(1))},
        ),
        "MeanFlow (flow matching)": (meanflow_loss(average_velocity, FlowMatching()), {"student": params_mf}),
    }


def measure(loss_fn, params, batch, repeats: int) -> dict:
    step = jax.jit(jax.value_and_grad(lambda p, key: loss_fn(p, key, batch)[0]))
    key = jax.random.key(0)
    compiled = step.lower(params, key).compile()
    jax.block_until_ready(compiled(params, key))
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, jax.random.key(i)))
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--attention", default=None, help="attention_impl of the DiT (None: the platform's best)")
    parser.add_argument(
        "--interpret", action="store_true", help="the Pallas kernel of --attention in interpret mode (CPU smoke runs)"
    )
    args = parser.parse_args()

    batch = jax.random.normal(jax.random.key(2), (args.batch, args.image_size, args.image_size, args.channels))
    rows = []
    for name, (loss_fn, params) in tqdm(losses(args).items()):
        rows.append({"objective": name, **measure(loss_fn, params, batch, args.repeats)})
    base = rows[0]
    table = [
        [
            r["objective"],
            f"{r['seconds'] * 1e3:.1f}",
            f"{r['seconds'] / base['seconds']:.2f}",
            f"{r['temp_bytes'] / 2**20:.1f}",
            f"{r['temp_bytes'] / base['temp_bytes']:.2f}",
        ]
        for r in rows
    ]
    device = jax.devices()[0].device_kind
    text = (
        f"# Few-step objectives: cost of one training step against denoising, {device}\n\n"
        f"DiT (patch 2, depth {args.depth}, width {args.hidden}, {args.heads} heads, attention "
        f"{args.attention or 'default'}), batch {args.batch} of {args.image_size}x{args.image_size}x{args.channels}; "
        f"median of {args.repeats} value-and-gradient calls.\n\n"
        + markdown_table(["objective", "ms / step", "time ratio", "temp MiB", "memory ratio"], table)
        + "\n"
    )
    print(text)
    write_results(f"few_step_cost_{slug(device)}", {"settings": vars(args), "rows": rows}, text)


if __name__ == "__main__":
    main()
