"""diffjax.training.cpu_malloc: when glibc's malloc is tuned, and that the tuning takes effect."""

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from diffjax.training import cpu_malloc

MODULE = Path(cpu_malloc.__file__)

# A fresh interpreter that loads only this module (not the diffjax package), optionally tunes malloc,
# allocates 256 MiB and prints how many more blocks glibc then serves by mmap (mallinfo2().hblks).
PROBE = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("cpu_malloc", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
if sys.argv[2] == "tune":
    print(module.tune_cpu_malloc(force=True))
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblks
block = libc.malloc(256 << 20)
print("new mmapped blocks", libc.mallinfo2().hblks - before)
libc.free(ctypes.c_void_p(block))
"""


def _has_mallinfo2() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 (glibc >= 2.33)
    except (OSError, AttributeError):
        return False
    return True


glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not _has_mallinfo2(), reason="glibc's mallopt and mallinfo2"
)


def _probe(mode: str) -> list[str]:
    env = {"PATH": "/usr/bin:/bin"}  # no LD_PRELOAD
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(MODULE), mode], capture_output=True, text=True, env=env, check=True
    )
    return out.stdout.strip().splitlines()


@glibc_only
def test_tuned_malloc_serves_large_blocks_from_the_heap():
    assert _probe("plain")[-1] == "new mmapped blocks 1"  # glibc's default: a 256 MiB block is mmapped
    lines = _probe("tune")
    assert lines[0] == "glibc malloc tuned: one arena, no mmap, heap trimmed only beyond 2 GiB free"
    assert lines[-1] == "new mmapped blocks 0"


def test_malloc_is_left_alone_under_another_allocator_or_where_an_accelerator_may_run(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    assert cpu_malloc.preloaded_allocator() == "tcmalloc"
    assert cpu_malloc.tune_cpu_malloc() == "tcmalloc preloaded: malloc left as is"
    monkeypatch.setenv("LD_PRELOAD", "")
    assert cpu_malloc.preloaded_allocator() is None
    monkeypatch.setattr(cpu_malloc, "ACCELERATOR_PLUGINS", ("json",))  # any importable module stands in
    assert cpu_malloc.accelerator_plugin() == "json"
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert cpu_malloc.cpu_only_platforms() is None
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert cpu_malloc.cpu_only_platforms() is False
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cpu_malloc.cpu_only_platforms() is True
    if platform.libc_ver()[0] == "glibc":
        monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
        assert cpu_malloc.tune_cpu_malloc() == "JAX_PLATFORMS=cuda,cpu: malloc left as is (JAX_PLATFORMS=cpu tunes it)"
        monkeypatch.delenv("JAX_PLATFORMS")
        assert cpu_malloc.tune_cpu_malloc().startswith("json installed: malloc left as is")
