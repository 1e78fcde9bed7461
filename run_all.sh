#!/usr/bin/env bash
# The whole pipeline, stage after stage, on both datasets with the offline defaults
# (SmolLM2-135M-Instruct, MiniLM, CPU). Budgets are flags; the defaults are the ones the
# README's measured results used.
#   bash run_all.sh [--raw-dir DIR] [--datasets "redial inspired"] [--jobs 1|2]
#                   [--sim-steps 50] [--rec-steps 40] [--rl-steps 6] [--limit 12] [--turns 5]
# --raw-dir DIR  read DIR/redial and DIR/inspired instead of downloading the public files
# --jobs 2       run the datasets side by side, one torch thread each (fastest on 2 cores);
#                each dataset's output then goes to runs/<dataset>/pipeline.log
# --rl-steps N   steps of 04's multi-turn GRPO, for SMTPO and for its no-preference-reward ablation
#                (CPU setting: 1 start state x G 4 episodes x T 2 turns per step, lr 1e-4, no activation
#                checkpointing: about 4-5 min a step on one core; 04's own defaults are larger)
# --limit N      multi-turn evaluation on N test samples (seeded draw; 0 = all)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
RAW=""; DATASETS="redial inspired"; JOBS=1; SIM_STEPS=50; REC_STEPS=40; RL_STEPS=6; LIMIT=12; TURNS=5
while [ $# -gt 0 ]; do
  case "$1" in
    --raw-dir) RAW="$2"; shift 2 ;;
    --datasets) DATASETS="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --sim-steps) SIM_STEPS="$2"; shift 2 ;;
    --rec-steps) REC_STEPS="$2"; shift 2 ;;
    --rl-steps) RL_STEPS="$2"; shift 2 ;;
    --limit) LIMIT="$2"; shift 2 ;;
    --turns) TURNS="$2"; shift 2 ;;
    *) echo "unknown option $1 (see the header of run_all.sh)"; exit 2 ;;
  esac
done
# the feedback-only simulator ablation sees as many feedback examples as the three-task one
# (a third of its batches), without the attribute and target tasks
FB_STEPS=$(( (SIM_STEPS + 2) / 3 ))

pipeline() {
  local ds=$1
  echo "=== $ds"
  $PY 01_prep_data.py --dataset "$ds" ${RAW:+--raw-dir "$RAW/$ds"}
  $PY 02_sft_simulator.py --dataset "$ds" --steps "$SIM_STEPS" --eval-every 50
  $PY 02_sft_simulator.py --dataset "$ds" --steps "$FB_STEPS" --task-mix 1 0 0 --out simulator_feedback_only
  $PY 03_sft_recommender.py --dataset "$ds" --steps "$REC_STEPS" --max-eval-samples 24 --eval-every "$REC_STEPS" --max-new-tokens 288
  local rl="--dataset $ds --steps $RL_STEPS --prompts 1 --group-size 4 --turns 2 --lr 1e-4 --no-gradient-checkpointing"
  $PY 04_rl_multiturn.py $rl
  $PY 04_rl_multiturn.py $rl --w-preference 0 --out recommender_rl_no_preference
  $PY 05_eval.py --dataset "$ds" --limit "$LIMIT" --turns "$TURNS" --max-new-tokens 288
}

if [ "$JOBS" -gt 1 ]; then
  export OMP_NUM_THREADS=1
  pids=()
  for ds in $DATASETS; do
    mkdir -p "runs/$ds"
    pipeline "$ds" > "runs/$ds/pipeline.log" 2>&1 &
    pids+=($!)
    echo "started $ds (log: runs/$ds/pipeline.log)"
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  exit $status
fi
for ds in $DATASETS; do pipeline "$ds"; done
