#!/usr/bin/env bash
# The prepared accelerator check (experiments/device_check.py) with a hard wall-clock stop at 8 minutes.
# Every item is time-guarded inside the script; this is the outer belt. The table is rewritten after
# every item, so a stop keeps what was measured. Arguments pass through (e.g. --dry-run --out-dir /tmp/dc).
#   PYTHON=.venv/bin/python experiments/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout --signal=TERM --kill-after=10 470 "${PYTHON:-python}" -m experiments.device_check "$@"
