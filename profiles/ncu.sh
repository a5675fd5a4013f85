#!/usr/bin/env bash
# Nsight Compute summaries of one kernel (or all) under profiles/<gpu>/: DRAM bytes beside each byte model.
# The interpreter: $PYTHON, or python3 (on the lent GPU machines, python3 is the one that holds torch).
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=$(PYTHONPATH=. "${PYTHON:-python3}" -c "from bench.measure.device import machine_info; print(machine_info().slug)")
PYTHONPATH=. "${PYTHON:-python3}" -m bench profile "${1:-all}" --tool ncu --shape "${2:-1}" --calls 3 --out "profiles/$gpu"
