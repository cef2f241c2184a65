#!/usr/bin/env bash
# The main job, offline. Extra arguments go to the example, e.g. `bash scripts/demo.sh --classes truck`.
source "$(dirname "$0")/_bootstrap.sh"
cd "$ROOT"
exec "$PYTHON" scripts/quickstart.py "$@"
