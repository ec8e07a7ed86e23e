"""Host memory allocation for runs on the CPU.

XLA's CPU runtime allocates a program's buffers on every call. Under glibc's default malloc, blocks
that large come from per-thread arenas or from mmap, and go back to the kernel when freed, so each
call page-faults all its memory in again (time spent in the kernel). `tune_cpu_malloc` keeps freed
memory in one arena instead; a preloaded tcmalloc (LD_PRELOAD) does the same and more
(experiments/results/cpu_malloc.md). Neither changes a number computed, only the time and the
resident memory: free space at the top of the heap goes back to the system only beyond 2 GiB, and
free holes below the top stay with the process.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform

__all__ = ["tune_cpu_malloc", "preloaded_allocator", "accelerator_plugin", "accelerator_possible", "cpu_only_platforms"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_SETTINGS = (  # (name, mallopt parameter, value)
    ("M_ARENA_MAX", _M_ARENA_MAX, 1),  # one arena: the runtime's threads reuse what another freed
    ("M_MMAP_MAX", _M_MMAP_MAX, 0),  # large blocks from the heap, not mmap (which returns them on free)
    ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, 2**31 - 1),  # trim the heap's top only beyond 2 GiB free
    ("M_TOP_PAD", _M_TOP_PAD, 64 << 20),  # grow the heap 64 MiB at a time
)
ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
# JAX plugins whose presence means the run is (probably) not on the CPU
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin", "libtpu")


def preloaded_allocator() -> str | None:
    """The allocator named in LD_PRELOAD (tcmalloc, jemalloc, mimalloc), or None."""
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in ALLOCATORS if name in preload), None)


def accelerator_plugin() -> str | None:
    """The first installed JAX accelerator plugin of ACCELERATOR_PLUGINS, or None."""
    return next((name for name in ACCELERATOR_PLUGINS if importlib.util.find_spec(name) is not None), None)


def cpu_only_platforms() -> bool | None:
    """True when $JAX_PLATFORMS names only the CPU, False when it names another platform, None when
    it is unset."""
    platforms = {p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()}
    return None if not platforms else platforms == {"cpu"}


def accelerator_possible() -> str | None:
    """Why this process may use an accelerator, in words ($JAX_PLATFORMS naming another platform, or
    unset with an accelerator plugin installed), or None when it computes on the CPU only."""
    cpu_only = cpu_only_platforms()
    if cpu_only is False:
        return f"JAX_PLATFORMS={os.environ['JAX_PLATFORMS']}"
    plugin = None if cpu_only else accelerator_plugin()
    return f"{plugin} installed" if plugin else None


def tune_cpu_malloc(force: bool = False) -> str:
    """Set glibc's malloc to keep freed memory in one arena (mallopt), for a process that computes
    on the CPU; returns what was done, in words (starting "glibc malloc tuned" when it was).
    Left as is: another allocator preloaded, a non-glibc C library, and, unless `force`, a process
    that may use an accelerator ($JAX_PLATFORMS naming another platform, or unset with an
    accelerator plugin installed), whose host threads feeding the device would contend for the one
    arena.

    Process-wide, and fully effective only before JAX starts its CPU backend (threads that have
    allocated keep their arenas): call it first thing in a program's main."""
    allocator = preloaded_allocator()
    if allocator:
        return f"{allocator} preloaded: malloc left as is"
    if platform.libc_ver()[0] != "glibc":
        return "not glibc: malloc left as is"
    accelerator = None if force else accelerator_possible()
    if accelerator:
        return f"{accelerator}: malloc left as is (JAX_PLATFORMS=cpu tunes it)"
    libc = ctypes.CDLL("libc.so.6")
    refused = [name for name, option, value in _SETTINGS if libc.mallopt(option, value) != 1]
    if refused:
        return f"glibc mallopt refused {', '.join(refused)}: malloc partly tuned"
    return "glibc malloc tuned: one arena, no mmap, heap trimmed only beyond 2 GiB free"
