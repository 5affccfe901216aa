#!/usr/bin/env bash
# clinkd inside the frameworks users train with, each run by the framework's own entry point in a venv
# of its own (the frameworks pin other transformers/accelerate/peft/trl than clinkd's): for every folder
# integration/NAME with a requirements.txt, a venv .venv-integration/NAME is layered on .venv
# (scripts/overlay_venv.sh) with those pins, and pytest runs integration/NAME in it.
#
#   bash scripts/integration.sh              # every framework
#   bash scripts/integration.sh trl          # these
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -gt 0 ]; then names=("$@"); else names=(); for d in integration/*/requirements.txt; do names+=("$(basename "$(dirname "$d")")"); done; fi
failed=0
for name in "${names[@]}"; do
  start=$(date +%s)
  venv=.venv-integration/$name
  echo "== integration/$name"
  if ! bash scripts/overlay_venv.sh "$venv" -r "integration/$name/requirements.txt"; then
    echo "integration/$name: installing its requirements failed"; failed=1; continue
  fi
  "$venv/bin/python" -m pytest "integration/$name" -q -p no:cacheprovider || failed=1
  echo "integration/$name: $(( $(date +%s) - start )) s"
done
exit "$failed"
