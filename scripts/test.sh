#!/usr/bin/env bash
# Install quantact with its test extras (torch as the local CPU wheel when no torch is
# installed, so no CUDA packages are downloaded) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[test]"
exec $PY -m pytest -q -n "${PYTEST_WORKERS:-auto}" "$@"
