"""Test set-up: 8 virtual CPU devices for the mesh tests, and a persistent compilation cache for
the CLI / multi-process subprocesses, which compile the same programs again and again.

The pytest process itself does not use the cache: with it, XLA's CPU compiler crashed twice
(segmentation fault) in the sampler tests, once reading and once writing an entry."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "diffjax-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_enable_compilation_cache", False)
