"""Metrics to stdout, a JSONL file and TensorBoard event files (via tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
import logging
import math
import os
import time

try:  # optional: without it only the JSONL file is written
    from tensorboardX import SummaryWriter
except ImportError:
    SummaryWriter = None

__all__ = ["MetricWriter"]

log = logging.getLogger("diffjax")


class MetricWriter:
    """Appends {"step": s, **metrics} lines to workdir/metrics.jsonl and scalars to
    workdir/tensorboard. Only the main process writes; other processes get a no-op writer."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if SummaryWriter is not None:
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        else:
            log.warning("tensorboardX is not installed; TensorBoard event files are not written")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _to_float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        if self._tb is not None:
            for name, value in clean.items():
                if isinstance(value, float) and math.isfinite(value):
                    self._tb.add_scalar(name, value, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _to_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
