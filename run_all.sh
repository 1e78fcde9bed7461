#!/usr/bin/env bash
# The whole pipeline, stage after stage, on both datasets with the offline defaults
# (SmolLM2-135M-Instruct, MiniLM, CPU).
#   bash run_all.sh [--budget quick|course|cpu] [--raw-dir DIR] [--datasets "redial inspired"] [--jobs 1|2]
#                   [--sim-steps N] [--rec-steps N] [--rl-steps N] [--limit N] [--turns T]
# --budget quick (default) a few steps of every stage on small held-out sets, in runs/quick/<dataset>:
#                it checks, in minutes, that every stage runs and hands its outputs to the next; its
#                numbers mean nothing
# --budget course  what a course runs on a 2-core laptop in under an hour for both datasets (--jobs 2),
#                in runs/course/<dataset>: the retrievers trained on every sample and scored on the whole
#                test split, a few steps of each LLM stage, 05's LLM rows on 12 conversations of 3 turns
#                with 95% CIs, without the two ablations (feedback-only simulator, no preference reward);
#                at this budget the LLM rows keep the retriever's order (README, results)
# --budget cpu   the CPU setting of docs/findings.md's longer runs (hours per dataset on one core):
#                02 50 steps, 03 40 steps, 04 6 steps of 1 start state x G 4 x T 2, 05 --limit 12, T 5;
#                in runs/<dataset>, the stages' default run directory
# --raw-dir DIR  read DIR/redial and DIR/inspired instead of downloading the public files
# --jobs 2       run the datasets side by side, one torch thread each (fastest on 2 cores);
#                each dataset's output then goes to <run directory>/pipeline.log
# --rl-steps N   steps of 04's multi-turn GRPO, for SMTPO and for its no-preference-reward ablation
#                (lr 1e-4, no activation checkpointing: about 4-5 min a step on one core at G 4 x T 2,
#                plus about 7 min for each greedy validation of 16 start states, of the SFT start and at
#                the end; 04's own defaults are larger)
# --limit N      multi-turn evaluation on N test samples (seeded draw; 0 = all)
# The step and sample flags override the budget's values; give them after --budget.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
RAW=""; DATASETS="redial inspired"; JOBS=1
budget() {
  # *_EVAL: held-out samples of 02's and 03's quality reports and of 04's validation; SAMPLES: 03's cap on
  # the samples of each split (0 = all; the retriever trains on them); GROUP: 04's episodes per start state;
  # ABLATIONS: 1 trains the feedback-only simulator and the no-preference-reward policy that 05 compares;
  # GEN: the recommender's answer budget in tokens (a model after 2 SFT steps never ends one: in the quick
  # check every answer runs to the limit, and generation is most of 04's and 05's time).
  # Each budget has its own run directories, so a quick check never meets the checkpoints of a longer run.
  case "$1" in
    quick) SIM_STEPS=2; REC_STEPS=2; RL_STEPS=1; LIMIT=2; TURNS=2
           SIM_EVAL=4; REC_EVAL=4; RL_EVAL=2; SAMPLES=300; GROUP=2; GEN=128; ABLATIONS=1; RUNS=runs/quick ;;
    course) SIM_STEPS=12; REC_STEPS=6; RL_STEPS=2; LIMIT=12; TURNS=3
           SIM_EVAL=8; REC_EVAL=8; RL_EVAL=0; SAMPLES=0; GROUP=4; GEN=224; ABLATIONS=0; RUNS=runs/course ;;
    cpu)   SIM_STEPS=50; REC_STEPS=40; RL_STEPS=6; LIMIT=12; TURNS=5
           SIM_EVAL=100; REC_EVAL=24; RL_EVAL=16; SAMPLES=0; GROUP=4; GEN=288; ABLATIONS=1; RUNS=runs ;;
    *) echo "unknown budget $1 (quick, course or cpu)"; exit 2 ;;
  esac
}
budget quick
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) budget "$2"; shift 2 ;;
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
  local on="--dataset $ds --run-dir $RUNS/$ds"
  echo "=== $ds -> $RUNS/$ds"
  $PY 01_prep_data.py $on ${RAW:+--raw-dir "$RAW/$ds"}
  $PY 02_sft_simulator.py $on --steps "$SIM_STEPS" --eval-every 50 --max-eval-samples "$SIM_EVAL"
  [ "$ABLATIONS" = 1 ] && $PY 02_sft_simulator.py $on --steps "$FB_STEPS" --task-mix 1 0 0 \
    --out simulator_feedback_only --max-eval-samples "$SIM_EVAL"
  $PY 03_sft_recommender.py $on --steps "$REC_STEPS" --max-eval-samples "$REC_EVAL" \
    --max-new-tokens "$GEN" --max-samples "$SAMPLES"
  local rl="$on --steps $RL_STEPS --prompts 1 --group-size $GROUP --turns 2 --lr 1e-4 --no-gradient-checkpointing \
    --max-new-tokens $GEN"
  $PY 04_rl_multiturn.py $rl --eval-samples "$RL_EVAL"
  [ "$ABLATIONS" = 1 ] && $PY 04_rl_multiturn.py $rl --eval-samples "$RL_EVAL" --w-preference 0 \
    --out recommender_rl_no_preference
  $PY 05_eval.py $on --limit "$LIMIT" --turns "$TURNS" --max-new-tokens "$GEN"
}

if [ "$JOBS" -gt 1 ]; then
  export OMP_NUM_THREADS=1
  pids=()
  for ds in $DATASETS; do
    mkdir -p "$RUNS/$ds"
    pipeline "$ds" > "$RUNS/$ds/pipeline.log" 2>&1 &
    pids+=($!)
    echo "started $ds (log: $RUNS/$ds/pipeline.log)"
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  exit $status
fi
for ds in $DATASETS; do pipeline "$ds"; done
