#!/usr/bin/env bash
# Nsight Systems kernel summaries of one kernel (or all) under profiles/<gpu>/.
# The interpreter: $PYTHON, or python3 (on the lent GPU machines, python3 is the one that holds torch).
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=$(PYTHONPATH=. "${PYTHON:-python3}" -c "from bench.measure.device import machine_info; print(machine_info().slug)")
PYTHONPATH=. "${PYTHON:-python3}" -m bench profile "${1:-all}" --tool nsys --shape "${2:-1}" --calls 10 --out "profiles/$gpu"
