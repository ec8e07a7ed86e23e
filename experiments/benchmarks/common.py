"""Shared by the benchmarks: the environment record, tables, and writing results."""

from __future__ import annotations

import datetime
import os
import platform

import flax
import jax
import numpy

from diffjax.io import atomic_write_json, atomic_write_text

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")


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


def write_results(name: str, payload: dict, markdown: str | None = None) -> str:
    """Write results/<name>.json (with the environment) and, if given, results/<name>.md,
    atomically; returns the JSON path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    payload = {"environment": environment(), **payload}
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    atomic_write_json(path, payload)
    if markdown is not None:
        atomic_write_text(os.path.join(RESULTS_DIR, f"{name}.md"), markdown.rstrip() + "\n")
    return path
