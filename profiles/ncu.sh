#!/usr/bin/env bash
# Nsight Compute summaries of one kernel (or all) under profiles/<gpu>/: DRAM bytes beside each byte model.
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=$(PYTHONPATH=. python -c "from bench.measure.device import machine_info; print(machine_info().slug)")
PYTHONPATH=. python -m bench profile "${1:-all}" --tool ncu --shape "${2:-1}" --calls 3 --out "profiles/$gpu"
