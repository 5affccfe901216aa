#!/usr/bin/env bash
# The one prepared GPU run (docs/benchmarks.md): build against the device's
# torch, GPU tests (bf16 correctness of every kernel, compute-sanitizer on the CUDA top-k), GPU
# benchmarks with peers side by side, JSON to $OUT, and a markdown table printed last.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: checks the script's pieces without a GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(pwd)/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

if [ "$DRY" = 1 ]; then
  PY="${PYTHON:-.venv/bin/python}"
  step "dry run: syntax, collection, renderer"
  bash -n "$0" || exit 1
  "$PY" -m pytest tests/ -m gpu --collect-only -q >/dev/null || { echo "GPU test collection failed"; exit 1; }
  "$PY" -m pytest benchmarks/ --collect-only -q >/dev/null || { echo "benchmark collection failed"; exit 1; }
  command -v compute-sanitizer >/dev/null || echo "(compute-sanitizer not on PATH here; the GPU machine has it)"
  "$PY" - <<'PYEOF' || exit 1
import json, os, subprocess, sys, tempfile
# A minimal pytest-benchmark JSON through the renderer, as the last step would do it.
data = {"machine_info": {"node": "dry-run"}, "commit_info": {"id": "0" * 40}, "benchmarks": [
    {"name": n, "group": "g", "stats": {"median": t}, "extra_info": {"impl": n, "floor_s": 0.5}}
    for n, t in (("clinkd", 1.0), ("torch", 2.0))]}
path = os.path.join(tempfile.mkdtemp(), "b.json")
json.dump(data, open(path, "w"))
out = subprocess.run([sys.executable, "-m", "benchmarks.render", path], capture_output=True, text=True, check=True).stdout
assert "| g | 1 s | torch | 2 s | 2.00× | 500 ms | 2.0× | — | — |" in out, out
print("renderer ok")
PYEOF
  echo "dry run ok"
  exit 0
fi

step "device and versions"
nvidia-smi -L
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
git log -1 --format='commit %H %s' 2>/dev/null || true

step "build the extension against this torch (sm_90 only, to save time)"
CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if ! CLINKD_FORCE_CUDA=1 CLINKD_CUDA_ARCHS="$CAP" "$PY" -m pip install --no-build-isolation --no-deps -q -e . \
    > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
"$PY" -m clinkd_kernels.info | tee "$OUT/info.md" || status=1

if ls .whl/*.whl >/dev/null 2>&1; then
  step "benchmark peers carried as wheels (benchmarks/peer_wheels.sh)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl/*.whl \
    && export PYTHONPATH="/tmp/peers${PYTHONPATH:+:$PYTHONPATH}" && ls /tmp/peers
fi

step "GPU tests"
timeout 240 "$PY" -m pytest tests/ -m gpu -q -x --junitxml="$OUT/gpu-tests.xml" 2>&1 | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "compute-sanitizer on the CUDA top-k"
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -c "
import torch, clinkd_kernels as ck
x = torch.randn(37, 5003, device='cuda', dtype=torch.bfloat16)
for k in (1, 64, 1024):
    ck.topk_pseudo_labels(x, k, temperature=0.7, backend='cuda')
torch.cuda.synchronize(); print('sanitizer run done')" 2>&1 | tail -5
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "GPU benchmarks: kernels"
CLINKD_BENCH_DEVICES=cuda timeout 200 "$PY" -m pytest benchmarks/ --ignore=benchmarks/bench_train_step.py \
  --ignore=benchmarks/bench_vision.py --benchmark-only -q --benchmark-json="$OUT/bench-gpu.json" --benchmark-columns=min,median,rounds 2>&1 | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "GPU benchmark: the Qwen2-VL-7B vision tower, 4 images of 1024px and 16 of 448px"
CLINKD_BENCH_DEVICES=cuda timeout 120 "$PY" -m pytest benchmarks/bench_vision.py --benchmark-only -q \
  --benchmark-json="$OUT/bench-gpu-vision.json" --benchmark-columns=min,median,rounds 2>&1 | tail -10
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "GPU benchmark: ClinKD training step, 2B student / 7B teacher"
CLINKD_BENCH_DEVICES=cuda timeout 150 "$PY" -m pytest benchmarks/bench_train_step.py --benchmark-only -q \
  --benchmark-json="$OUT/bench-gpu-train-step.json" --benchmark-columns=min,median,rounds 2>&1 | tail -10
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "results"
jsons=$(ls "$OUT"/bench-gpu*.json 2>/dev/null || true)
if [ -n "$jsons" ]; then
  "$PY" -m benchmarks.render $jsons --out "$OUT/results.md" && cat "$OUT/results.md"
fi
exit $status
