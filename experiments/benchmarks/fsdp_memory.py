"""Per-device memory of the train state (parameters + optimizer state + EMA) under FSDP.

For the largest bundled model (DiT-XL/2 on 32x32x4 latents by default) the full train step is
compiled for meshes (8/f data, f fsdp, 1 tensor), f = 1, 2, 4, 8, over 8 devices (CPU devices
work: nothing is executed), and the per-device bytes of the state are read from the compiled
step's memory analysis (argument bytes minus the batch's) and cross-checked against the sum of
the state's shard sizes. Target: at fsdp = 8, within 15 % of one eighth of the fsdp = 1 figure.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/benchmarks/fsdp_memory.py
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from diffjax import VP, denoising_loss, models  # noqa: E402
from diffjax.training import sharding as shard_lib  # noqa: E402
from diffjax.training.state import create_train_state, make_train_step  # noqa: E402
from experiments.benchmarks.common import markdown_table, write_results  # noqa: E402


def shard_bytes(abstract, shardings) -> int:
    """Bytes of one device's shard of every leaf."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def measure(model_name: str, fsdp: int, batch: int, latent: int, channels: int) -> dict:
    devices = jax.devices()[:8]
    mesh = shard_lib.create_mesh({"data": len(devices) // fsdp, "fsdp": fsdp, "tensor": 1}, devices)
    rules = shard_lib.make_rules()
    config = models.get_config(model_name, image_size=latent, in_channels=channels, num_classes=1000)
    abstract_model = nnx.eval_shape(lambda: models.build(config))
    apply, abstract_params = models.functional(abstract_model)
    loss_fn = denoising_loss(apply, VP(), prediction="eps", cond_keys={"y": "label"})
    optimizer = optax.adamw(1e-4)
    abstract_state = jax.eval_shape(lambda p: create_train_state(p, optimizer, 0), abstract_params)
    params_sharding = shard_lib.param_shardings(
        abstract_params, models.logical_partition_specs(abstract_model), mesh, rules
    )
    state_sharding = shard_lib.state_shardings(abstract_state, params_sharding, optimizer, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sharding)
    batch_args = {
        "image": jax.ShapeDtypeStruct((batch, latent, latent, channels), jnp.float32,
                                      sharding=shard_lib.batch_sharding(mesh, 4)),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=shard_lib.batch_sharding(mesh, 1)),
    }
    step = jax.jit(shard_lib.traced_under_mesh(make_train_step(loss_fn, optimizer, 0.999), mesh, rules),
                   out_shardings=(state_sharding, None), donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch_args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    batch_bytes = shard_bytes(batch_args, jax.tree.map(lambda a: a.sharding, batch_args))
    return {
        "model": model_name,
        "mesh": dict(mesh.shape),
        "params": models.param_count(abstract_params),
        "state_bytes_compiled": int(memory.argument_size_in_bytes) - batch_bytes,
        "state_bytes_shards": shard_bytes(abstract_state, state_sharding),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "compile_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--fsdp", default="1,2,4,8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    args = parser.parse_args()

    rows = [measure(args.model, int(f), args.batch, args.latent, args.channels) for f in args.fsdp.split(",")]
    unsharded = rows[0]["state_bytes_compiled"] if rows[0]["mesh"]["fsdp"] == 1 else None
    table = []
    for row in rows:
        f = row["mesh"]["fsdp"]
        ratio = row["state_bytes_compiled"] / (unsharded / f) if unsharded else float("nan")
        row["ratio_to_ideal"] = round(ratio, 4)
        table.append([f, row["mesh"]["data"], f"{row['state_bytes_compiled'] / 2**30:.3f}",
                      f"{row['state_bytes_shards'] / 2**30:.3f}", f"{ratio:.3f}", f"{row['temp_bytes'] / 2**30:.2f}",
                      row["compile_seconds"]])
        print(table[-1], flush=True)
    headers = ["fsdp", "data", "state GiB/device (compiled)", "state GiB/device (shards)",
               "ratio to unsharded/fsdp", "temp GiB/device", "compile s"]
    text = (f"# FSDP memory: {args.model}, {rows[0]['params'] / 1e6:.1f}M parameters, train state = "
            f"params + AdamW (mu, nu) + EMA, f32, batch {args.batch} of {args.latent}x{args.latent}x"
            f"{args.channels}\n\n" + markdown_table(headers, table) + "\n\nTarget: ratio <= 1.15 at fsdp = 8.\n")
    print(text)
    write_results("fsdp_memory", {"args": vars(args), "rows": rows}, text)


if __name__ == "__main__":
    main()
