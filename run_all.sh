#!/usr/bin/env bash
# The whole pipeline, stage after stage, on both datasets with the offline defaults.
#   bash run_all.sh [--raw-dir DIR] [--datasets "redial inspired"] [--limit N]
# --raw-dir DIR reads DIR/redial and DIR/inspired instead of downloading the public files.
# --limit N evaluates the first N test samples only.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
RAW=""; DATASETS="redial inspired"; LIMIT=0
while [ $# -gt 0 ]; do
  case "$1" in
    --raw-dir) RAW="$2"; shift 2 ;;
    --datasets) DATASETS="$2"; shift 2 ;;
    --limit) LIMIT="$2"; shift 2 ;;
    *) echo "unknown option $1 (see the header of run_all.sh)"; exit 2 ;;
  esac
done
for ds in $DATASETS; do
  echo "=== $ds"
  $PY 01_prep_data.py --dataset "$ds" ${RAW:+--raw-dir "$RAW/$ds"}
  $PY 03_sft_recommender.py --dataset "$ds"
  $PY 05_eval.py --dataset "$ds" --limit "$LIMIT"
done
