"""One JAX device per CPU core, for data-parallel runs on a CPU-only host.

XLA's CPU runtime runs most ops of a small convolutional network one after another, each on one
core, so the `unet-small` train step leaves part of a 2-core machine idle. Split into one JAX device
per core, with the batch sharded over the run's data axis, the shards run side by side
(experiments/results/cpu_devices.md). A program on one device still uses every core (the devices
share XLA's thread pool), so nothing else gets slower.

Measured on 2 cores only (experiments/results/cpu_devices*.md), with tcmalloc: the U-Net step is
1.24x faster split at batch 32 (1.07x with glibc's malloc tuned instead); across batch sizes,
1.17x at 16 examples per device, 1.02x at 8, 0.94x at 4 and 0.76x at 2, hence MIN_BATCH_PER_DEVICE.
Large matrix products already use every core, and each device updates all the parameters: DiT-S/2
trained 1.07x faster split with tcmalloc but 1.17x slower with glibc's malloc untuned (1.19x with
it tuned), so the base config keeps one device.

The split must happen before JAX starts its CPU backend; `jax.config.update("jax_num_cpu_devices",
n)` is how, and XLA_FLAGS=--xla_force_host_platform_device_count=n the older way.
"""

from __future__ import annotations

import math
import os

import jax

from diffjax.training import cpu_malloc

__all__ = ["MIN_BATCH_PER_DEVICE", "usable_cores", "cpu_device_count", "split_cpu_into_devices"]

MIN_BATCH_PER_DEVICE = 16  # training examples per device from which the split paid clearly (2 cores)
_XLA_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"
_CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # "<quota> <period>" or "max <period>"
_CGROUP_V1_QUOTA = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _cgroup_cpu_limit() -> float | None:
    """The CPUs a cgroup quota allows this process (docker --cpus, Kubernetes limits), or None."""
    try:
        quota, period = _read(_CGROUP_V2_CPU_MAX).split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota, period = (int(_read(path)) for path in _CGROUP_V1_QUOTA)
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, cpusets), at most its cgroup's
    CPU quota rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit))) if limit else cores


def cpu_device_count(requested: int, train_batch: int, eval_batch: int, mesh_axes, cores: int) -> int:
    """The devices to split the host into. `requested` > 0: that many. 0: for a mesh whose sizes
    are all fixed (`mesh_axes` = (data, fsdp, tensor), -1 = the remaining devices), their product;
    for the pure data-parallel mesh (-1, 1, 1), the most devices, at most `cores`, that divide both
    batch sizes and leave at least MIN_BATCH_PER_DEVICE training examples on each; otherwise 1."""
    if requested < 0:
        raise ValueError(f"cpu devices = {requested}: must be >= 0 (0 = chosen from the cores, batch and mesh)")
    if requested:
        return requested
    if -1 not in mesh_axes:
        return math.prod(mesh_axes)
    if tuple(mesh_axes) != (-1, 1, 1):
        return 1
    return next(
        n
        for n in range(max(cores, 1), 0, -1)
        if n == 1 or (train_batch % n == 0 and eval_batch % n == 0 and train_batch // n >= MIN_BATCH_PER_DEVICE)
    )


def split_cpu_into_devices(count: int) -> str:
    """Make JAX's CPU backend `count` devices (`jax_num_cpu_devices`); returns what was done, in
    words (starting "split the CPU into" when it was). Left as is: a count of 1, a count already
    chosen ($XLA_FLAGS or jax_num_cpu_devices), and a process that may use an accelerator
    ($JAX_PLATFORMS naming another platform, or unset with an accelerator plugin installed).

    Call it before JAX computes anything: JAX raises RuntimeError once its backend has started.
    Afterwards, wait for each multi-device result before the next call (the trainer reads a value
    every step): JAX 0.10.2's CPU runtime can deadlock with several collective programs in flight."""
    if count == 1:
        return "one CPU device"
    if _XLA_DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices >= 0:
        return "CPU device count left as set (XLA_FLAGS or jax_num_cpu_devices)"
    accelerator = cpu_malloc.accelerator_possible()
    if accelerator:
        return f"{accelerator}: CPU left as one device (JAX_PLATFORMS=cpu splits it)"
    jax.config.update("jax_num_cpu_devices", count)
    return f"split the CPU into {count} devices, the batch sharded over them"
