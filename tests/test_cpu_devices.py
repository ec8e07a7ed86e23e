"""diffjax.training.cpu_devices and mesh.cpu_devices: how many devices the CPU is split into, when it
is left alone, and that the command line's split takes effect before JAX starts. (The command line
training and sampling on a split CPU: test_training.py's test_cli_*split* and sample tests.)"""

import os
import subprocess
import sys

import pytest
from helpers import FAST_COMPILE_XLA_FLAGS

from diffjax.training import cpu_devices, cpu_malloc
from diffjax.training.config import ConfigError, base_config, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_PARALLEL = (-1, 1, 1)


@pytest.mark.parametrize(
    "requested, train_batch, eval_batch, mesh_axes, cores, expected",
    [
        (0, 32, 256, DATA_PARALLEL, 2, 2),  # one per core
        (0, 32, 256, DATA_PARALLEL, 3, 2),  # 3 does not divide 32
        (0, 32, 256, DATA_PARALLEL, 64, 2),  # at least 16 training examples per device
        (0, 128, 256, DATA_PARALLEL, 16, 8),
        (0, 30, 256, DATA_PARALLEL, 8, 1),  # 2 divides 30, but 15 examples per device are too few
        (0, 32, 100, DATA_PARALLEL, 2, 2),
        (0, 32, 99, DATA_PARALLEL, 2, 1),  # the eval batch must split too
        (0, 32, 256, DATA_PARALLEL, 1, 1),
        (0, 32, 256, (1, 1, 1), 8, 1),  # a fully sized mesh names its devices
        (0, 32, 256, (2, 2, 1), 2, 4),
        (0, 32, 256, (-1, 2, 1), 8, 1),  # other meshes: left at one
        (3, 32, 256, DATA_PARALLEL, 2, 3),  # asked for: as asked (the mesh then says what does not fit)
    ],
)
def test_device_count(requested, train_batch, eval_batch, mesh_axes, cores, expected):
    assert cpu_devices.cpu_device_count(requested, train_batch, eval_batch, mesh_axes, cores) == expected


def test_bad_device_counts_are_refused():
    with pytest.raises(ValueError, match="-1.*>= 0"):
        cpu_devices.cpu_device_count(-1, 32, 256, DATA_PARALLEL, 2)
    config = base_config()  # (ConfigDict itself refuses values that are not ints)
    config.mesh.cpu_devices = -1
    with pytest.raises(ConfigError, match="mesh.cpu_devices = -1"):
        validate_config(config)
    config = base_config()
    config.mesh.cpu_devices = 0
    validate_config(config)


def test_usable_cores_respect_a_cgroup_quota(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(cpu_devices, "_CGROUP_V2_CPU_MAX", str(cpu_max))
    monkeypatch.setattr(cpu_devices.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    cpu_max.write_text("150000 100000\n")  # docker --cpus=1.5
    assert cpu_devices.usable_cores() == 2
    cpu_max.write_text("max 100000\n")
    assert cpu_devices.usable_cores() == 64


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


# A fresh interpreter runs the command line's main() on configs/default.py (mesh.cpu_devices 0) on a
# host of 2 cores, with training replaced by a report of the devices JAX has; "late" starts JAX first.
PROBE = """
import sys, jax
import diffjax.training
import diffjax.training.cpu_devices as cpu_devices
from experiments import main
cpu_devices.usable_cores = lambda: 2
diffjax.training.train = lambda config, workdir: {"devices": jax.device_count()}
if sys.argv[1] == "late":
    jax.devices()
main.main(main._parse_flags(["main", "--config=configs/default.py", "--workdir=" + sys.argv[2]]))
"""


def _probe(tmp_path, when: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    environment.update({"XLA_FLAGS": FAST_COMPILE_XLA_FLAGS, "JAX_PLATFORMS": "cpu", **env})
    return subprocess.run(
        [sys.executable, "-c", PROBE, when, str(tmp_path)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        timeout=120,
    )


def test_command_line_splits_the_cpu_before_jax_starts(tmp_path):
    out = _probe(tmp_path, "early")
    assert out.returncode == 0, out.stderr
    assert "split the CPU into 2 devices, the batch sharded over them" in out.stdout
    assert '"devices": 2' in out.stdout
    out = _probe(tmp_path, "early", XLA_FLAGS=f"--xla_force_host_platform_device_count=3 {FAST_COMPILE_XLA_FLAGS}")
    assert "CPU device count left as set" in out.stdout and '"devices": 3' in out.stdout
    out = _probe(tmp_path, "early", JAX_NUM_CPU_DEVICES="3")
    assert "CPU device count left as set" in out.stdout and '"devices": 3' in out.stdout
    out = _probe(tmp_path, "late")
    assert out.returncode != 0 and "before backends are initialized" in out.stderr
