"""Test set-up: 8 virtual CPU devices for the mesh tests, quick-to-compile XLA flags
(helpers.FAST_COMPILE_XLA_FLAGS), a persistent compilation cache for the
CLI / multi-process subprocesses, which compile the same programs again and again, and a cache
for this pytest process that lives as long as the run (DIFFJAX_TEST_IN_PROCESS_CACHE=0 turns it
off); the compiled programs are released during the run (see `_release_compiled_programs`)."""

import atexit
import gc
import os
import shutil
import tempfile

import pytest
from helpers import FAST_COMPILE_XLA_FLAGS

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffjax-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after the environment above)

if os.environ.get("DIFFJAX_TEST_IN_PROCESS_CACHE", "1") == "1":
    # A cache for this run only (removed at exit): tests that build the same program again (three
    # training runs in the resume test, the same tiny config across files) load it instead of
    # compiling; a fresh clone starts as cold as any other run.
    _RUN_CACHE = tempfile.mkdtemp(prefix="diffjax-test-run-cache-")
    atexit.register(shutil.rmtree, _RUN_CACHE, ignore_errors=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", _RUN_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
else:
    jax.config.update("jax_enable_compilation_cache", False)
# Start the CPU backend now, with the 8 devices above: a test that changes XLA_FLAGS for its
# subprocesses (the no_device_count fixture) must not decide this process's device count when it
# happens to run first (as it can in a pytest-xdist worker or a -k selection).
jax.devices()


@pytest.fixture
def no_device_count(monkeypatch):
    """Subprocesses get no CPU device count from the environment (the 8 above), so the command
    line's mesh.cpu_devices decides (the reliability harness's runs: 1; this process keeps its 8)."""
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_XLA_FLAGS)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)


MAX_MEMORY_MAPS = 20_000


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Free the compiled programs once the process holds many memory maps. XLA:CPU maps three
    regions per code module it loads, and the suite compiles thousands of programs (sample() run
    eagerly alone adds ~280 maps); kept alive they reach the kernel's limit (vm.max_map_count,
    65530 by default) and the next compilation segfaults."""
    yield
    if _memory_maps() > MAX_MEMORY_MAPS:
        jax.clear_caches()
        gc.collect()
