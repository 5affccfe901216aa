#!/usr/bin/env bash
# Set up a virtual environment in .venv and install clinkd into it, compiled against its torch.
#
#   bash scripts/install.sh            # the kernels (clinkd_kernels: torch, triton, numpy)
#   bash scripts/install.sh hf         # and the model layer (clinkd: transformers, accelerate, ...)
#   bash scripts/install.sh test       # the model layer and the test/benchmark tools
#   bash scripts/install.sh demo       # the model layer and what the demo needs (pycocoevalcap, pydicom, matplotlib)
#   bash scripts/install.sh demo,test  # several extras
#
# torch is installed first, together with what the build needs (setuptools, wheel, pybind11, ninja,
# numpy), and the extension is then built with --no-build-isolation, so it is compiled against exactly
# that torch (an isolated build would fetch a second torch of several GB).
# CLINKD_FORCE_CUDA=1 makes a failed CUDA build fatal; CLINKD_NO_CUDA=1 skips it (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch>=2.11" "setuptools>=77" wheel "pybind11>=2.12" ninja "numpy>=1.26"
if [ -n "$extras" ]; then
  python -m pip install --no-build-isolation -e ".[$extras]"
else
  python -m pip install --no-build-isolation -e .
fi
