#!/usr/bin/env bash
# The patch equivalence suite (tests/patch: gap 1 = stock in loss, logits, every gradient and greedy
# tokens; gap 2 = stock fed mcg_rope_index's positions; the vision tower) on other transformers releases,
# each in a venv layered on .venv (scripts/overlay_venv.sh: clinkd is built once, only transformers and
# what it pins are added).
#
#   bash scripts/transformers_matrix.sh                 # the CI set: each layout's first and last release
#   bash scripts/transformers_matrix.sh --all           # the latest patch release of every supported minor
#   bash scripts/transformers_matrix.sh 5.6.2 5.25.0    # these
#
# Writes one line per release to stdout and a summary table to .venv-tf/matrix.md; exits non-zero if any
# release fails (every release is run first).
set -uo pipefail
cd "$(dirname "$0")/.."
ci_set=(5.0.0 5.2.0 5.3.0 5.5.4 5.6.0 5.12.1 5.16.1 5.17.0 5.23.0)  # the main suite runs the newest (.venv)
all_set=(5.0.0 5.1.0 5.2.0 5.3.0 5.4.0 5.5.4 5.6.2 5.7.0 5.8.1 5.9.0 5.10.4 5.11.0 5.12.1 5.13.1 5.14.1 5.15.1
         5.16.1 5.17.0 5.18.0 5.19.0 5.20.2 5.21.1 5.22.2 5.23.0 5.24.0 5.25.0)
if [ "$#" -eq 0 ]; then versions=("${ci_set[@]}")
elif [ "$1" = "--all" ]; then versions=("${all_set[@]}")
else versions=("$@")
fi
mkdir -p .venv-tf
summary=.venv-tf/matrix.md
printf '| transformers | result | seconds |\n|---|---|---|\n' > "$summary"
failed=0
for v in "${versions[@]}"; do
  start=$(date +%s)
  log=.venv-tf/$v.log
  # transformers imports the hub-kernels package whenever it is installed, and .venv's (a requirement of
  # the newest release) breaks older ones at import: the overlay gets the kernels release $v declares.
  if ! { bash scripts/overlay_venv.sh ".venv-tf/$v" "transformers==$v" \
         && kernels=$(".venv-tf/$v/bin/python" - <<'PY'
import importlib.metadata as md
print(next((r.split(";")[0].replace(" ", "") for r in md.requires("transformers") or [] if r.startswith("kernels")), ""))
PY
) && { [ -z "$kernels" ] || bash scripts/overlay_venv.sh ".venv-tf/$v" "$kernels"; }; } > "$log" 2>&1; then
    result="install failed"
  else
    .venv-tf/$v/bin/python -m pytest tests/patch -q -p no:cacheprovider >> "$log" 2>&1
    rc=$?
    result=$(tail -n 1 "$log" | sed 's/=//g; s/^ *//; s/ in [0-9.]*s.*//')
    [ "$rc" -eq 0 ] || result="FAILED: $result"
  fi
  seconds=$(( $(date +%s) - start ))
  case "$result" in *FAIL*|"install failed") failed=1; tail -n 30 "$log" ;; esac
  echo "transformers $v: $result (${seconds} s)"
  echo "| $v | $result | $seconds |" >> "$summary"
done
exit "$failed"
