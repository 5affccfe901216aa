#!/usr/bin/env bash
# Fetch the pure-Python benchmark peers as wheels into .whl/ (git-ignored), for a GPU machine that
# cannot download: gpu_check.sh installs whatever .whl/ holds before it benchmarks.
#
#   bash benchmarks/peer_wheels.sh          # Liger-Kernel (distillation loss), Cut Cross-Entropy (CE)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
rm -rf .whl && mkdir -p .whl
# Pure-Python wheels (py3-none-any): torch and triton, their only requirements, are on the GPU machine.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d .whl "liger-kernel>=0.5" cut-cross-entropy
ls -l .whl
