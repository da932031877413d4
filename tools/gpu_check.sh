#!/usr/bin/env bash
# The prepared GPU check (tools/gpu_check.py): bash tools/gpu_check.sh OUTDIR [--cpu-dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
