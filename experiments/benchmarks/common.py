"""Shared by the benchmarks: the environment record, tables, and writing results."""

from __future__ import annotations

import datetime
import glob
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import flax
import jax
import numpy

from diffjax.io import atomic_write_json, atomic_write_text

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TCMALLOC = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4")  # the Makefile's


def tcmalloc_path() -> str | None:
    """The tcmalloc library `make run` preloads, where the system has it (else None)."""
    return next((path for pattern in TCMALLOC for path in sorted(glob.glob(pattern))), None)


def cpu_process_environment(**variables: str) -> dict:
    """os.environ for a fresh JAX process on the CPU: without an inherited CPU device count
    (XLA_FLAGS, JAX_NUM_CPU_DEVICES), JAX_PLATFORMS=cpu, and `variables`."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    return {**env, "JAX_PLATFORMS": "cpu", **variables}


def run_cpu_worker(module: str, arguments: list[str], devices: int) -> dict:
    """Run `python -m module *arguments` in a fresh CPU process (tcmalloc preloaded where the system
    has it) and return the JSON object on its last output line, which must report `device_count` =
    `devices`."""
    preload = tcmalloc_path()
    env = cpu_process_environment(**({"LD_PRELOAD": preload} if preload else {}))
    command = [sys.executable, "-m", module, *arguments]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    reply = json.loads(out.stdout.strip().splitlines()[-1])
    if reply["device_count"] != devices:
        raise RuntimeError(f"asked for {devices} devices, the worker had {reply['device_count']}")
    return reply


def environment() -> dict:
    """Device, versions and date: stored with every result."""
    devices = jax.devices()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{devices[0].platform}:{devices[0].device_kind}",
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else jax.__version__,
            "flax": flax.__version__,
            "numpy": numpy.__version__,
        },
    }


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, markdown: str | None = None, directory: str = RESULTS_DIR) -> str:
    """Write <directory>/<name>.json (with the environment) and, if given, <directory>/<name>.md,
    atomically (default directory: experiments/results); returns the JSON path."""
    os.makedirs(directory, exist_ok=True)
    payload = {"environment": environment(), **payload}
    path = os.path.join(directory, f"{name}.json")
    atomic_write_json(path, payload)
    if markdown is not None:
        atomic_write_text(os.path.join(directory, f"{name}.md"), markdown.rstrip() + "\n")
    return path


def slug(text: str) -> str:
    """A file-name-safe lower-case form of `text` (e.g. a device kind)."""
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def package_versions(*names: str) -> dict:
    """Installed versions of the given distributions (None where not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def relative_error(x, ref) -> float:
    """RMS(x - ref) / RMS(ref - mean ref): the sampler suite's error of samples x against reference samples
    ref from the same noise (batch on the first axis)."""
    x, ref = numpy.asarray(x, numpy.float64), numpy.asarray(ref, numpy.float64)
    spread = numpy.sqrt(numpy.mean((ref - ref.mean(0)) ** 2))
    return float(numpy.sqrt(numpy.mean((x - ref) ** 2)) / spread)


def mean_stderr(values) -> tuple[float, float]:
    """Mean and standard error of the mean (nan for a single value), e.g. of FIDs over seeds."""
    values = numpy.asarray(values, numpy.float64)
    stderr = values.std(ddof=1) / numpy.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(stderr)
