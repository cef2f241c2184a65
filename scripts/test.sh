#!/usr/bin/env bash
# Run the test suite (CPU, no network). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k merge`.
source "$(dirname "$0")/_bootstrap.sh"
cd "$ROOT"
exec "$PYTHON" -m pytest "$@"
