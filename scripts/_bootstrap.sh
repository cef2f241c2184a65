# Sourced by scripts/demo.sh and scripts/test.sh: make sure .venv holds the project and its test tools.
# torch is installed first and pinned: an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="$ROOT/.venv/bin/python"
if ! "$PYTHON" -c "import hf_clip_forget, pytest" >/dev/null 2>&1; then
    echo "Setting up $ROOT/.venv (torch==2.13.0 CPU, then hf_clip_forget[test]) ..." >&2
    python3 -m venv "$ROOT/.venv"
    "$PYTHON" -m pip install -q --upgrade pip
    "$PYTHON" -m pip install -q torch==2.13.0
    "$PYTHON" -m pip install -q -e "$ROOT[test]"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
