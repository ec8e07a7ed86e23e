"""DRaFT-K memory: XLA's compiled memory of one gradient of `diffjax.distill.draft_loss` through the
last K of N sampler steps, with and without rematerialising each step, on the small U-Net.

    python -m experiments.benchmarks.draft_memory              # unet-small, 16x16x3, batch 8, N = 16
    python -m experiments.benchmarks.draft_memory --ks 1,2,4   # fewer K

`temp` is what XLA allocates beyond the inputs and outputs of the jitted gradient (the activations
the backward pass keeps); the ratio is against K = 1 with remat, measured in the same run. Prints a
table and writes experiments/results/draft_memory_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from diffjax import models
from diffjax.distill import draft_loss
from diffjax.processes import VP
from diffjax.samplers import DDIM
from experiments.benchmarks.common import markdown_table, slug, write_results


def measure(apply, params, shape, steps: int, grad_steps: int, remat: bool) -> dict:
    loss_fn = draft_loss(
        apply,
        VP(),
        lambda x0: -jnp.mean(x0**2, axis=(1, 2, 3)),
        solver=DDIM(),
        steps=steps,
        grad_steps=grad_steps,
        remat=remat,
    )
    grad = jax.jit(jax.grad(lambda p, key, batch: loss_fn({"student": p}, key, batch)[0]))
    start = time.perf_counter()
    compiled = grad.lower(params, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    seconds = time.perf_counter() - start
    return {
        "grad_steps": grad_steps,
        "remat": remat,
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        "compile_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet-small")
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--ks", default="1,2,4,8,16")
    args = parser.parse_args()

    model = nnx.eval_shape(lambda: models.create(args.model, image_size=args.image_size, in_channels=3))
    net, params = models.functional(model)
    shape = (args.batch, args.image_size, args.image_size, 3)
    ks = [int(k) for k in args.ks.split(",")]
    rows = [measure(net, params, shape, args.steps, k, remat) for k in tqdm(ks) for remat in (True, False)]
    base = next(r["temp_bytes"] for r in rows if r["grad_steps"] == ks[0] and r["remat"])
    table = [
        [r["grad_steps"], r["remat"], f"{r['temp_bytes'] / 2**20:.1f}", f"{r['temp_bytes'] / base:.2f}"] for r in rows
    ]
    device = jax.devices()[0].device_kind
    text = (
        f"# DRaFT-K memory: {args.model}, batch {args.batch} of {args.image_size}x{args.image_size}x3, "
        f"N = {args.steps} DDIM steps, one gradient, {device}\n\n"
        + markdown_table(["K", "remat", "temp MiB", f"ratio to K={ks[0]} remat"], table)
        + "\n"
    )
    print(text)
    write_results(f"draft_memory_{slug(device)}", {"settings": vars(args), "rows": rows}, text)


if __name__ == "__main__":
    main()
