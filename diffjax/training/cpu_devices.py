"""One JAX device per CPU core, for data-parallel runs on a CPU-only host.

XLA's CPU runtime runs most ops of a small convolutional network one after another, each on one
core: the `unet-small` train step kept 1.44 of 2 cores busy, where PyTorch keeps 1.99. Split into
one JAX device per core, with the batch sharded over the run's data axis, the shards run side by
side (experiments/results/cpu_devices.md). A program on one device still uses every core (the
devices share XLA's thread pool), so nothing else gets slower. Large matrix products already use
every core, and each device updates all the parameters: DiT-S/2 trained 1.09x faster split with
tcmalloc but 1.17x slower with glibc's malloc untuned (1.19x with it tuned), so the base config keeps
one device. The U-Net gains most with tcmalloc (1.19x; 1.07x with glibc's malloc tuned).

The split must happen before JAX starts its CPU backend; `jax.config.update("jax_num_cpu_devices",
n)` is how, and XLA_FLAGS=--xla_force_host_platform_device_count=n the older way.
"""

from __future__ import annotations

import os

import jax

from diffjax.training import cpu_malloc

__all__ = ["usable_cores", "cpu_device_count", "split_cpu_into_devices"]

_XLA_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_device_count(requested: int, batch_sizes, cores: int) -> int:
    """The devices to split the host into: `requested` when positive; for 0, the most devices, at
    most `cores`, that divide every batch size evenly."""
    if requested < 0:
        raise ValueError(f"cpu devices = {requested}: must be >= 0 (0 = one per core)")
    if requested:
        return requested
    return next(n for n in range(max(cores, 1), 0, -1) if all(size % n == 0 for size in batch_sizes))


def split_cpu_into_devices(count: int) -> str:
    """Make JAX's CPU backend `count` devices (`jax_num_cpu_devices`); returns what was done, in
    words (starting "split the CPU into" when it was). Left as is: a count of 1, a count already
    chosen ($XLA_FLAGS or jax_num_cpu_devices), and a process that may use an accelerator
    ($JAX_PLATFORMS naming another platform, or unset with an accelerator plugin installed).

    Call it before JAX computes anything: JAX raises RuntimeError once its backend has started."""
    if count == 1:
        return "one CPU device"
    if _XLA_DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices >= 0:
        return "CPU device count left as set (XLA_FLAGS or jax_num_cpu_devices)"
    accelerator = cpu_malloc.accelerator_possible()
    if accelerator:
        return f"{accelerator}: CPU left as one device (JAX_PLATFORMS=cpu splits it)"
    jax.config.update("jax_num_cpu_devices", count)
    return f"split the CPU into {count} devices, the batch sharded over them"
