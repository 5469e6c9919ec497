#!/usr/bin/env bash
# The GPU check of the JAX backend, in one run on a machine with one NVIDIA GPU; see benchmarks/gpu_check.py
# (its options: --allow-cpu, --quick, --python, --wheels, --data, --download) and docs/gpu.md.
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
