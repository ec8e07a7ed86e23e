"""diffjax.training.cpu_devices and mesh.cpu_devices: how many devices the CPU is split into, when it
is left alone, and that the command line's split takes effect before JAX starts."""

import os
import subprocess
import sys

import pytest
from helpers import FAST_COMPILE_XLA_FLAGS

from diffjax.training import cpu_devices, cpu_malloc
from diffjax.training.config import ConfigError, base_config, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "requested, sizes, cores, expected",
    [
        (0, (32, 256), 2, 2),  # one per core
        (0, (32, 256), 3, 2),  # 3 does not divide 32: the most that divide every batch
        (0, (32, 96), 16, 16),
        (0, (30, 256), 8, 2),
        (0, (7, 256), 4, 1),
        (0, (32,), 1, 1),
        (3, (32, 256), 2, 3),  # asked for: as asked (the mesh then names a batch it cannot split)
    ],
)
def test_device_count(requested, sizes, cores, expected):
    assert cpu_devices.cpu_device_count(requested, sizes, cores) == expected


def test_negative_device_count_is_refused():
    with pytest.raises(ValueError, match="-1.*>= 0"):
        cpu_devices.cpu_device_count(-1, (32,), 2)
    config = base_config()
    config.mesh.cpu_devices = -1
    with pytest.raises(ConfigError, match="mesh.cpu_devices.*-1"):
        validate_config(config)


def test_left_alone_when_the_count_is_set_or_an_accelerator_may_run(monkeypatch):
    # every case returns before touching JAX's config (this process's backend has started)
    assert cpu_devices.split_cpu_into_devices(1) == "one CPU device"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert "left as set" in cpu_devices.split_cpu_into_devices(2)
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_XLA_FLAGS)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert cpu_devices.split_cpu_into_devices(2).startswith("JAX_PLATFORMS=cuda: CPU left as one device")
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(cpu_malloc, "accelerator_plugin", lambda: "jax_cuda13_plugin")
    assert cpu_devices.split_cpu_into_devices(2).startswith("jax_cuda13_plugin installed")


# A fresh interpreter: the command line's set-up for configs/default.py on a host of 2 cores (its
# cpu_devices is 0), then the devices JAX has, or JAX's error when the backend had started.
PROBE = """
import sys, jax
from experiments import main
from diffjax.training.config import load_config_file
main.FLAGS(["main"])
config = load_config_file("configs/default.py")
import diffjax.training.cpu_devices as cpu_devices
cpu_devices.usable_cores = lambda: 2
if sys.argv[1] == "late":
    jax.devices()
print(main._setup_cpu_devices(config))
print(jax.device_count())
"""


def _probe(when: str, xla_flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", PROBE, when], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )


def test_command_line_splits_the_cpu_before_jax_starts():
    out = _probe("early", FAST_COMPILE_XLA_FLAGS)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["split the CPU into 2 devices, the batch sharded over them", "2"]
    out = _probe("early", f"--xla_force_host_platform_device_count=3 {FAST_COMPILE_XLA_FLAGS}")
    assert out.stdout.split("\n")[:2] == ["CPU device count left as set (XLA_FLAGS or jax_num_cpu_devices)", "3"]
    out = _probe("late", FAST_COMPILE_XLA_FLAGS)
    assert out.returncode != 0 and "before backends are initialized" in out.stderr
