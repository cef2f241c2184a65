# Sourced by scripts/demo.sh and scripts/test.sh: make sure the virtual environment holds the project, its test tools
# and versions of its dependencies within the ranges setup.cfg declares (a venv made before a range changed is
# brought back into range). The venv is $HF_CLIP_FORGET_VENV if set (CI uses a fresh one), else .venv.
# torch is installed first and pinned: an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HF_CLIP_FORGET_VENV:-$ROOT/.venv}"
PYTHON="$VENV/bin/python"

# Exit status 1 (and the offending requirements on stderr) when an installed version is outside setup.cfg's ranges.
_requirements_met() {
    "$PYTHON" - "$ROOT/setup.cfg" <<'PY'
import configparser
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement


config = configparser.ConfigParser()
config.read(sys.argv[1])
lines = config["options"]["install_requires"].splitlines() + config["options.extras_require"]["test"].splitlines()
unmet = []
for line in lines:
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    requirement = Requirement(line)
    if requirement.marker is not None and not requirement.marker.evaluate():
        continue
    try:
        installed = version(requirement.name)
    except PackageNotFoundError:
        unmet.append(f"{requirement} (not installed)")
        continue
    if not requirement.specifier.contains(installed, prereleases=True):
        unmet.append(f"{requirement} (installed: {installed})")
if unmet:
    print("Outside the ranges of setup.cfg: " + "; ".join(unmet), file=sys.stderr)
    sys.exit(1)
PY
}

if ! "$PYTHON" -c "import hf_clip_forget, pytest" >/dev/null 2>&1; then
    echo "Setting up $VENV (torch==2.13.0 CPU, then hf_clip_forget[test]) ..." >&2
    python3 -m venv "$VENV"
    "$PYTHON" -m pip install -q --upgrade pip
    "$PYTHON" -m pip install -q torch==2.13.0
    "$PYTHON" -m pip install -q -e "$ROOT[test]"
elif ! _requirements_met; then
    echo "Re-installing hf_clip_forget[test] into $VENV to bring its dependencies into range ..." >&2
    "$PYTHON" -m pip install -q -e "$ROOT[test]"
    _requirements_met
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
