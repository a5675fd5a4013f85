#!/usr/bin/env bash
# Nsight Systems kernel summaries of one kernel (or all) under profiles/<gpu>/.
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=$(PYTHONPATH=. python -c "from bench.measure.device import machine_info; print(machine_info().slug)")
PYTHONPATH=. python -m bench profile "${1:-all}" --tool nsys --shape "${2:-1}" --calls 10 --out "profiles/$gpu"
