"""When splitting the CPU into devices pays: the `unet-small` train step of cpu_vs_torch (eps-MSE,
AdamW, EMA, float32) at several batch sizes, on one JAX device and on the CPU split into
--devices devices (`jax_num_cpu_devices`, what mesh.cpu_devices sets), the batch sharded over them.

    python -m experiments.benchmarks.cpu_devices_batch [--batches 4,8,16,32] [--devices 2] [--rounds 3]

Each measurement is a fresh process (tcmalloc preloaded where the system has it, as `make run`
does) that compiles the step and times --steps steps; the rounds interleave every (batch, devices)
pair so that a shared machine loads them alike. Reports the median ms per step, and the per-round
speed-up of the split over one device (median, min-max). This is where
diffjax.training.cpu_devices.MIN_BATCH_PER_DEVICE comes from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from experiments.benchmarks.common import markdown_table, run_cpu_worker, write_results
from experiments.benchmarks.cpu_step_profile import build_step


def worker(batch: int, devices: int, steps: int) -> None:
    """Print the median seconds of `steps` train steps at `batch` on `devices` CPU devices."""
    jax.config.update("jax_num_cpu_devices", devices)  # before JAX computes anything
    step, state, data = build_step(batch)
    for _ in range(3):
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": float(np.median(times)), "device_count": jax.device_count()}))


def measure(batch: int, devices: int, steps: int) -> float:
    arguments = ["--worker", str(batch), str(devices), f"--steps={steps}"]
    return run_cpu_worker("experiments.benchmarks.cpu_devices_batch", arguments, devices)["seconds"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="4,8,16,32")
    parser.add_argument("--devices", type=int, default=2, help="the split's device count")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--name", default="cpu_devices_batch")
    parser.add_argument("--note", default="", help="a line above the table")
    parser.add_argument("--worker", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.steps)
        return
    batches = [int(b) for b in args.batches.split(",") if b]
    bad = [b for b in batches if b <= 0 or b % args.devices]
    if bad or args.devices < 2 or args.rounds < 1 or args.steps < 1:
        raise SystemExit(
            f"--batches {args.batches} --devices {args.devices} --rounds {args.rounds} --steps {args.steps}: "
            f"every batch must be a positive multiple of --devices (>= 2); rounds and steps >= 1"
        )
    seconds = {(b, d): [] for b in batches for d in (1, args.devices)}
    for r in range(args.rounds):
        for key in seconds:
            seconds[key].append(measure(*key, args.steps))
        print(f"round {r}: " + ", ".join(f"batch {b} x{d}: {v[-1] * 1e3:.1f} ms" for (b, d), v in seconds.items()))
    rows, results = [], []
    for b in batches:
        one, split = seconds[(b, 1)], seconds[(b, args.devices)]
        speedups = [o / s for o, s in zip(one, split)]
        result = {"batch": b, "per_device": b // args.devices, "one_device_s": one, "split_s": split}
        results.append(result)
        rows.append(
            [
                b,
                b // args.devices,
                f"{statistics.median(one) * 1e3:.1f}",
                f"{statistics.median(split) * 1e3:.1f}",
                f"{statistics.median(speedups):.2f} ({min(speedups):.2f}-{max(speedups):.2f})",
            ]
        )
    headers = ["batch", "examples per device", "one device ms/step", f"{args.devices} devices ms/step"]
    headers += ["split speed-up: median (min-max)"]
    title = f"# The unet-small train step on one CPU device and split into {args.devices} ({args.rounds} rounds)"
    markdown = "\n\n".join(x for x in (title, args.note, markdown_table(headers, rows)) if x)
    print(markdown)
    payload = {"devices": args.devices, "rounds": args.rounds, "steps": args.steps, "results": results}
    print("wrote", write_results(args.name, payload, markdown))


if __name__ == "__main__":
    main()
