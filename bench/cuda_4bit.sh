#!/usr/bin/env bash
# The GPU figures of the README, in one go, on a machine with no network: a Qwen2.5-1.5B-shaped model
# with random weights (bench/random_model.py; speed and memory do not depend on the values), then
#   1. one QLoRA SFT step as 02/03 take it (bench/lora_step.py), nf4 and, for comparison, the fp32 base;
#   2. one GRPO step of ours against TRL's GRPOTrainer on the nf4 model (bench/rl_step_vs_trl.py).
# Results are appended to $RESULTS/*.jsonl (default bench/results); logs go to $LOGS (default logs/cuda_4bit).
#
#   bash bench/cuda_4bit.sh                       # needs bitsandbytes and TRL: bash install.sh --bench
#   TOKENIZER=path/to/tokenizer SHAPE=qwen2.5-3b bash bench/cuda_4bit.sh
# On a GPU machine without the SmolLM2 package or a network (how the README's figures were taken):
# write a tokenizer folder here first (`python bench/random_model.py --shape tiny-qwen --out DIR`
# saves one beside its tiny weights), copy it over with wheels of bitsandbytes, trl, peft, datasets,
# dill and multiprocess unpacked on PYTHONPATH, and run with TOKENIZER=DIR PY=python3 there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-qwen2.5-1.5b}
MODEL=${MODEL:-/tmp/$SHAPE-random}
TOKENIZER=${TOKENIZER:-smollm2-135m-instruct}
LOGS=${LOGS:-logs/cuda_4bit}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$LOGS"
export TQDM_MININTERVAL=30 PYTHONUNBUFFERED=1

"$PY" -c "import torch, transformers, bitsandbytes, trl; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU',
'| transformers', transformers.__version__, '| bitsandbytes', bitsandbytes.__version__, '| trl', trl.__version__)"
[ -f "$MODEL/config.json" ] || "$PY" bench/random_model.py --shape "$SHAPE" --tokenizer "$TOKENIZER" --out "$MODEL" \
    2>&1 | tee "$LOGS/random_model.log"
"$PY" bench/lora_step.py --model "$MODEL" --load-in-4bit --device "$DEVICE" --label "$SHAPE random, nf4" --out "$RESULTS/lora_step.jsonl" \
    2>&1 | tee "$LOGS/lora_step_nf4.log"
"$PY" bench/rl_step_vs_trl.py --model "$MODEL" --load-in-4bit --device "$DEVICE" --prompts 4 --group-size 8 \
    --prompt-tokens 512 --completion-tokens 256 --micro-batch 8 --warmup 1 --repeats 2 --rounds 2 --label "$SHAPE random" \
    --out "$RESULTS/rl_step_vs_trl.jsonl" \
    2>&1 | tee "$LOGS/rl_step_vs_trl.log"
"$PY" bench/lora_step.py --model "$MODEL" --device "$DEVICE" --label "$SHAPE random, fp32 base" --out "$RESULTS/lora_step.jsonl" \
    2>&1 | tee "$LOGS/lora_step_fp32.log"
