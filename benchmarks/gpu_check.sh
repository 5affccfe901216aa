#!/usr/bin/env bash
# The one prepared GPU run (docs/benchmarks.md): build against the device's torch, then steps in order
# of value, each with a time budget, each writing its log (and JSON) to $OUT as soon as it ends, so a
# run cut off by the machine's time limit still returns everything before the cut.
#
#   bash benchmarks/gpu_check.sh             # the full run: at most 480 s of step budgets, the build included
#   bash benchmarks/gpu_check.sh --quick     # a second call: at most 180 s
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: checks the script and its budgets without a GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(pwd)/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
MODE=full
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --quick) MODE=quick ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--quick | --dry-run]" >&2; exit 2 ;;
esac
FULL_BUDGET=480
QUICK_BUDGET=180

# name | budget (s) | in --quick | command (runs with $PY, $OUT set; its output goes to $OUT/<name>.log)
STEPS=(
  "build|120|yes|build_extension"
  "correctness|60|no|\$PY -m pytest tests/attention tests/loss/test_gpu.py tests/topk -m gpu -q -x --junitxml=\$OUT/correctness.xml"
  "correctness-quick|40|yes-only|\$PY -m pytest tests/attention tests/loss/test_gpu.py -m gpu -q -x --junitxml=\$OUT/correctness-quick.xml"
  "kernels|120|no|CLINKD_BENCH_DEVICES=cuda CLINKD_BENCH_ATTN_S=2048 \$PY -m pytest benchmarks/bench_attention.py benchmarks/bench_loss.py benchmarks/bench_topk.py --benchmark-only -q -k 'not 2B' --benchmark-json=\$OUT/bench-kernels.json --benchmark-columns=min,median,rounds"
  "kernels-quick|20|yes-only|CLINKD_BENCH_DEVICES=cuda CLINKD_BENCH_ATTN_S=2048 \$PY -m pytest benchmarks/bench_attention.py --benchmark-only -q -k '7B and contiguous and (clinkd- or rope+sdpa)' --benchmark-json=\$OUT/bench-kernels-quick.json --benchmark-columns=min,median,rounds"
  "train-step|60|no|CLINKD_BENCH_DEVICES=cuda \$PY -m pytest benchmarks/bench_train_step.py --benchmark-only -q --benchmark-json=\$OUT/bench-train-step.json --benchmark-columns=min,median,rounds"
  "vision|40|no|CLINKD_BENCH_DEVICES=cuda \$PY -m pytest benchmarks/bench_vision.py --benchmark-only -q -k '4x1024px' --benchmark-json=\$OUT/bench-vision.json --benchmark-columns=min,median,rounds"
  "gpu-tests|60|no|\$PY -m pytest tests/ -m gpu -q --ignore=tests/attention --ignore=tests/topk --ignore=tests/loss/test_gpu.py --junitxml=\$OUT/gpu-tests.xml"
  "sanitizer|20|no|compute-sanitizer --tool memcheck --error-exitcode 9 \$PY -c 'import torch, clinkd_kernels as ck; x = torch.randn(37, 5003, device=\"cuda\", dtype=torch.bfloat16); [ck.topk_pseudo_labels(x, k, temperature=0.7, backend=\"cuda\") for k in (1, 64, 1024)]; torch.cuda.synchronize(); print(\"sanitizer run done\")'"
)

build_extension() {
  nvidia-smi -L || return 1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git log -1 --format='commit %H %s' 2>/dev/null || true
  local cap
  if "$PY" -c "import clinkd_kernels._C as c, sys; sys.exit(not c.has_cuda())" 2>/dev/null \
      && [ "$(git rev-parse HEAD 2>/dev/null)" = "$(cat .gpu_build_commit 2>/dev/null)" ]; then
    echo "extension already built with CUDA at this commit (a second call on a warm machine)"
  else
    cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    MAX_JOBS=16 CLINKD_FORCE_CUDA=1 CLINKD_CUDA_ARCHS="$cap" "$PY" -m pip install --no-build-isolation --no-deps -q -e . \
      || return 1
    git rev-parse HEAD > .gpu_build_commit 2>/dev/null || true
  fi
  if ls .whl/*.whl >/dev/null 2>&1; then  # benchmark peers carried as wheels (benchmarks/peer_wheels.sh)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl/*.whl
  fi
  "$PY" -m clinkd_kernels.info > "$OUT/info.md" && cat "$OUT/info.md"
}

field() { echo "$1" | cut -d'|' -f"$2"; }
in_mode() {  # whether a step runs in MODE (yes: both, no: full only, yes-only: quick only)
  local q; q=$(field "$1" 3)
  [ "$MODE" = quick ] && [ "$q" != no ] && return 0
  [ "$MODE" != quick ] && [ "$q" != yes-only ] && return 0
  return 1
}

if [ "$MODE" = dry ]; then
  PY="${PYTHON:-.venv/bin/python}"
  bash -n "$0" || exit 1
  for mode in full quick; do  # the budgets of each mode fit the device time one call gets
    MODE=$mode total=0
    for s in "${STEPS[@]}"; do
      if in_mode "$s"; then total=$((total + $(field "$s" 2))); fi
    done
    limit=$([ $mode = full ] && echo $FULL_BUDGET || echo $QUICK_BUDGET)
    [ "$total" -le "$limit" ] || { echo "the $mode run's step budgets sum to $total s > $limit s"; exit 1; }
    echo "$mode run: step budgets sum to $total s (limit $limit s)"
  done
  MODE=dry
  for s in "${STEPS[@]}"; do  # every benchmark or test step leaves its own file in $OUT
    cmd=$(field "$s" 4)
    case "$cmd" in
      *pytest*) [[ "$cmd" == *'$OUT/'* ]] || { echo "step $(field "$s" 1) writes nothing to \$OUT"; exit 1; } ;;
    esac
  done
  "$PY" -m pytest tests/ -m gpu --collect-only -q >/dev/null || { echo "GPU test collection failed"; exit 1; }
  "$PY" -m pytest benchmarks/ --collect-only -q >/dev/null || { echo "benchmark collection failed"; exit 1; }
  command -v compute-sanitizer >/dev/null || echo "(compute-sanitizer not on PATH here; the GPU machine has it)"
  "$PY" - <<'PYEOF' || exit 1
import json, os, subprocess, sys, tempfile
# A minimal pytest-benchmark JSON through the renderer, as the results step does it.
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

status=0
export PY OUT
render() {  # the table of every JSON so far: rewritten after each step, so a cut-off run still has one
  local jsons; jsons=$(ls "$OUT"/bench-*.json 2>/dev/null || true)
  [ -n "$jsons" ] && "$PY" -m benchmarks.render $jsons --out "$OUT/results.md" >/dev/null 2>&1
}
for s in "${STEPS[@]}"; do
  in_mode "$s" || continue
  name=$(field "$s" 1) budget=$(field "$s" 2) cmd=$(field "$s" 4)
  echo; echo "=== $name (budget ${budget} s, $(date +%T))"
  start=$SECONDS
  if [ "$cmd" = build_extension ]; then
    timeout "$budget" bash -c "$(declare -f build_extension); build_extension" > "$OUT/$name.log" 2>&1
  else
    timeout "$budget" bash -c "$cmd" > "$OUT/$name.log" 2>&1
  fi
  rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee "$OUT/$name.status"
  tail -15 "$OUT/$name.log"
  if [ $rc != 0 ]; then
    status=1
    [ "$name" = build ] && { echo "BUILD FAILED"; exit 1; }
  fi
  render
done
[ -f "$OUT/results.md" ] && cat "$OUT/results.md"
exit $status
