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
#
# A .venv that already holds the build of this source is reused: when its stamp (.venv/clinkd-build.stamp,
# a hash of setup.py, pyproject.toml, clinkd/patch/_compat.py, csrc/, the Python and torch versions, the
# CLINKD_* build variables and the CUDA toolkit found) matches, only the requested extras' dependencies
# (from the installed package's metadata) are installed and nothing is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
stamp_file=.venv/clinkd-build.stamp

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch>=2.11" "setuptools>=77" wheel "pybind11>=2.12" ninja "numpy>=1.26"

build_stamp() {
  python - <<'PY'
import glob, hashlib, importlib.metadata as md, os, shutil, sys

h = hashlib.sha256()
files = ["setup.py", "pyproject.toml", "clinkd/patch/_compat.py"]
files += sorted(p for p in glob.glob("csrc/**", recursive=True) if os.path.isfile(p))
for path in files:
    with open(path, "rb") as f:
        h.update(path.encode() + b"\0" + f.read() + b"\0")
h.update(f"{os.getcwd()}\n{sys.version}\ntorch {md.version('torch')}\n".encode())
for key in ("CLINKD_FORCE_CUDA", "CLINKD_NO_CUDA", "CLINKD_CUDA_ARCHS", "CUDA_HOME", "CUDA_PATH"):
    h.update(f"{key}={os.environ.get(key, '')}\n".encode())
h.update(f"nvcc={shutil.which('nvcc')}\n".encode())
print(h.hexdigest())
PY
}

installed_here() {  # clinkd is installed in .venv from this tree, with its built extension
  python - <<'PY'
import importlib.metadata as md, json, os, sys

try:
    dist = md.distribution("clinkd")
except md.PackageNotFoundError:
    sys.exit(1)
origin = json.loads(dist.read_text("direct_url.json") or "{}")
editable = origin.get("dir_info", {}).get("editable", False)
sys.exit(0 if editable and origin.get("url") == "file://" + os.getcwd() else 1)
PY
}

stamp=$(build_stamp)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && ls clinkd_kernels/_C*.so >/dev/null 2>&1 \
    && installed_here; then
  echo "clinkd: .venv already holds the build of this source (stamp matches): installing only the extras' dependencies"
  if [ -n "$extras" ]; then
    requirements=$(mktemp)
    python - "$extras" > "$requirements" <<'PY'
import importlib.metadata as md, sys

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

wanted = [e.strip() for e in sys.argv[1].split(",") if e.strip()]
known = md.metadata("clinkd").get_all("Provides-Extra") or []
unknown = [e for e in wanted if e not in known]
if unknown:
    sys.exit(f"clinkd has no extra {', '.join(unknown)}; its extras: {', '.join(known)}")
for line in md.requires("clinkd") or []:
    requirement = Requirement(line)
    if requirement.marker is not None and any(requirement.marker.evaluate({"extra": e}) for e in wanted):
        requirement.marker = None
        print(requirement)
PY
    python -m pip install --quiet --no-build-isolation -r "$requirements"  # as the full install builds (deepspeed is an sdist)
    rm -f "$requirements"
  fi
else
  rm -f "$stamp_file"
  if [ -n "$extras" ]; then
    python -m pip install --no-build-isolation -e ".[$extras]"
  else
    python -m pip install --no-build-isolation -e .
  fi
  echo "$stamp" > "$stamp_file"
fi
