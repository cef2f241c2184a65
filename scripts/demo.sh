#!/usr/bin/env bash
# The main job, offline: `hf-clip-forget demo` on the embedded default model. Extra arguments go to it,
# e.g. `bash scripts/demo.sh --classes horse,guitar`.
source "$(dirname "$0")/_bootstrap.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/hf-clip-forget" demo "$@"
