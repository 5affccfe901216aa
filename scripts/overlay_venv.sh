#!/usr/bin/env bash
# Make a virtual environment that adds packages on top of .venv without rebuilding clinkd.
#
#   bash scripts/overlay_venv.sh DIR REQUIREMENT [REQUIREMENT ...]
#   bash scripts/overlay_venv.sh .venv-tf/5.6.2 transformers==5.6.2
#
# DIR's own site-packages come first on sys.path, then .venv's (through a .pth that calls
# site.addsitedir, so .venv's own .pth files run too: the editable clinkd and its built extension,
# torch, the test tools). Whatever the requirements pin (a transformers, a framework and the versions of
# accelerate/peft/trl it wants) is installed into DIR and shadows .venv's copy; the rest is shared.
# Run scripts/install.sh first. An existing DIR is reused: only the requirements are installed again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -lt 2 ]; then
  echo "usage: bash scripts/overlay_venv.sh DIR REQUIREMENT [REQUIREMENT ...]" >&2
  exit 2
fi
dir=$1; shift
base=.venv/bin/python
if [ ! -x "$base" ]; then
  echo "overlay_venv.sh: $base not found; run bash scripts/install.sh test first" >&2
  exit 2
fi
base_site=$("$base" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
[ -x "$dir/bin/python" ] || "$base" -m venv --without-pip "$dir"
site=$("$dir/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$base_site')" > "$site/zz_clinkd_base.pth"
# .venv's pip installs into DIR when run by DIR's interpreter: no second pip to download.
"$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
