"""Per-device memory of the train state (parameters + optimizer state + EMA) under FSDP.

For the largest bundled model (DiT-XL/2 on 32x32x4 latents by default) the full train step is
compiled for meshes (8/f data, f fsdp, 1 tensor), f = 1, 2, 4, 8, over 8 devices (CPU devices
work: nothing is executed), and the per-device bytes of the state are read from the compiled
step's memory analysis (argument bytes minus the batch's) and cross-checked against the sum of
the state's shard sizes. Target: at fsdp = 8, within 15 % of one eighth of the fsdp = 1 figure.

The step is the run's own (`build_run` on configs/dit_latents.py with synthetic latents described
instead of read: AdamW, EMA, label dropout), lowered with the run's shardings.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.benchmarks.fsdp_memory
"""

from __future__ import annotations

import argparse
import math
import os
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402

from configs import dit_latents  # noqa: E402
from diffjax import data as data_lib  # noqa: E402
from diffjax import models  # noqa: E402
from diffjax.training import sharding as shard_lib  # noqa: E402
from diffjax.training.config import model_overrides  # noqa: E402
from diffjax.training.run import build_run, make_jitted_train_step, sharded_target  # noqa: E402
from experiments.benchmarks.common import markdown_table, write_results  # noqa: E402


def shard_bytes(abstract, shardings) -> int:
    """Bytes of one device's shard of every leaf."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def measure(model_name: str, fsdp: int, batch: int, latent: int, channels: int) -> dict:
    devices = jax.devices()[:8]
    config = dit_latents.get_config()
    config.model.name = model_name
    config.model.overrides = model_overrides(model_name)
    config.data.image_size = latent
    config.train.batch_size = config.eval.batch_size = batch
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = len(devices) // fsdp, fsdp, 1
    shape = (latent, latent, channels)
    data_info = data_lib.DataInfo(shape, shape, {"train": 1_000_000}, dit_latents.NUM_CLASSES)
    run = build_run(config, data_info, shard_lib.create_mesh(config.mesh, devices))
    state = sharded_target(run)
    batch_args = {
        "image": jax.ShapeDtypeStruct((batch, *shape), jnp.float32, sharding=shard_lib.batch_sharding(run.mesh, 4)),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=shard_lib.batch_sharding(run.mesh, 1)),
    }
    step = make_jitted_train_step(run)
    start = time.perf_counter()
    compiled = step.lower(state, batch_args).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    batch_bytes = shard_bytes(batch_args, jax.tree.map(lambda a: a.sharding, batch_args))
    return {
        "model": model_name,
        "mesh": dict(run.mesh.shape),
        "params": models.param_count(run.spec.abstract_params),
        "state_bytes_compiled": int(memory.argument_size_in_bytes) - batch_bytes,
        "state_bytes_shards": shard_bytes(run.abstract_state, run.state_sharding),
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
        table.append(
            [
                f,
                row["mesh"]["data"],
                f"{row['state_bytes_compiled'] / 2**30:.3f}",
                f"{row['state_bytes_shards'] / 2**30:.3f}",
                f"{ratio:.3f}",
                f"{row['temp_bytes'] / 2**30:.2f}",
                row["compile_seconds"],
            ]
        )
        print(table[-1], flush=True)
    headers = [
        "fsdp",
        "data",
        "state GiB/device (compiled)",
        "state GiB/device (shards)",
        "ratio to unsharded/fsdp",
        "temp GiB/device",
        "compile s",
    ]
    text = (
        f"# FSDP memory: {args.model}, {rows[0]['params'] / 1e6:.1f}M parameters, train state = "
        f"params + AdamW (mu, nu) + EMA, f32, batch {args.batch} of {args.latent}x{args.latent}x"
        f"{args.channels}\n\n" + markdown_table(headers, table) + "\n\nTarget: ratio <= 1.15 at fsdp = 8.\n"
    )
    print(text)
    write_results("fsdp_memory", {"args": vars(args), "rows": rows}, text)


if __name__ == "__main__":
    main()
