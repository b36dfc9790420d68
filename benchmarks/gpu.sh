#!/usr/bin/env bash
# GPU benchmarks (benchmarks/gpu.py): bash benchmarks/gpu.sh [--quick] [--device cuda|cpu] [--out DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu.py "$@"
