"""Seconds and peak memory of one LoRA SFT step, as 02 and 03 take it (common.train_lora_sft).

The examples are recommender-shaped chats of `--seq-len` tokens (a prompt with a numbered candidate
list and an answer of `--answer-tokens` learned tokens), built with common.build_chat_example, so the
loss mask, collation, LoRA, gradient checkpointing and optimizer are the stages' own. The defaults
are 03's: micro-batch 2, 2 micro-batches per step, 1,280-token examples, LoRA r 16 on every
projection, gradient checkpointing on. --warmup steps are untimed, then --repeats steps; the
median step time and the peak memory (torch.cuda.max_memory_allocated on CUDA, max RSS on a CPU)
are printed and appended as one JSON line to --out.

    python bench/lora_step.py --model tiny --load-in-4bit --device cpu         # the nf4 path on a CPU
    python bench/random_model.py --shape qwen2.5-1.5b --out /tmp/q15
    python bench/lora_step.py --model /tmp/q15 --load-in-4bit --device cuda    # QLoRA at 1.5B on a GPU
"""
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from common import arg  # noqa: E402
from rl_step_vs_trl import PeakMemory, machine_name  # noqa: E402  (bench/ is the script's folder)


@dataclass
class Args:
    model: str = arg(common.DEFAULT_LLM, "base LLM: Hugging Face id, folder or .gguf ('tiny': a random tiny model)")
    load_in_4bit: bool = arg(False, "nf4 base with double quantisation (bitsandbytes), LoRA on top")
    device: str = arg("", "torch device ('' = cuda when available, else cpu)")
    threads: int = arg(0, "torch CPU threads (0 = torch's default)")
    seq_len: int = arg(1280, "tokens per example (03's --max-len)")
    answer_tokens: int = arg(320, "learned (assistant) tokens per example, about a reasoning chain + answer")
    batch_size: int = arg(2, "examples per micro-batch (03's --batch-size)")
    grad_accum: int = arg(2, "micro-batches per optimizer step (03's --grad-accum)")
    lora_r: int = arg(16, "LoRA rank")
    lora_alpha: float = arg(32.0, "LoRA alpha")
    gradient_checkpointing: bool = arg(True, "recompute activations in the backward pass")
    warmup: int = arg(1, "untimed steps first")
    repeats: int = arg(3, "timed steps; the median is reported")
    seed: int = arg(0, "random seed")
    label: str = arg("", "free text stored with the result")
    out: str = arg("bench/results/lora_step.jsonl", "results file (one JSON line per run, appended)")


def synthetic_examples(tokenizer, n: int, seq_len: int, answer_tokens: int) -> list[dict]:
    """n build_chat_example outputs of exactly seq_len tokens, answer_tokens of them learned."""
    examples = []
    for i in range(n):
        candidates = "\n".join(f"#{k + 1} Movie {i * 97 + k * 13} ({1950 + (i + k) % 70}): drama; director {k + i}"
                               for k in range(400))
        answer = " ".join(f"Film {i * 31 + k} fits the seeker's taste for drama." for k in range(answer_tokens))
        answer = tokenizer.decode(tokenizer(answer, add_special_tokens=False)["input_ids"][:answer_tokens - 1])
        messages = [{"role": "user", "content": "Rank ten candidates for the seeker.\n" + candidates},
                    {"role": "assistant", "content": answer}]
        example = common.build_chat_example(tokenizer, messages, max_len=seq_len)
        if len(example["input_ids"]) != seq_len:
            raise SystemExit(f"error: could not build a {seq_len}-token example (got {len(example['input_ids'])})")
        examples.append(example)
    return examples


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the model as its shape has them (an nf4 weight stores two per byte, so numel()
    of a Linear4bit's weight is not its count)."""
    count, seen = 0, set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied embeddings count once
                continue
            seen.add(id(p))
            is_nf4 = name == "weight" and type(module).__name__ == "Linear4bit"
            count += module.in_features * module.out_features if is_nf4 else p.numel()
    return count


def main(argv=None) -> None:
    args = common.parse_args(Args, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else common.default_device()
    common.set_seed(args.seed)
    started = time.perf_counter()
    model, tok = common.load_llm(args.model, load_in_4bit=args.load_in_4bit, device=device)
    loaded_s = time.perf_counter() - started
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    parameters = count_parameters(model)  # the base's, before LoRA
    common.add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=0.05)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    steps = args.warmup + args.repeats
    examples = synthetic_examples(tok, steps * args.batch_size * args.grad_accum, args.seq_len, args.answer_tokens)
    sft = SimpleNamespace(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=1e-4,
                          save_every=10**9, eval_every=0, seed=args.seed, device=device)
    with tempfile.TemporaryDirectory() as out_dir:
        # the real loop; its per-step "seconds" covers batching, forward, backward and optimizer step
        common.train_lora_sft(model, tok.pad_token_id, {"sft": examples}, {"sft": 1.0}, sft, out_dir,
                              same_run={}, desc="LoRA SFT step")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        log = common.read_jsonl(Path(out_dir) / "train_log.jsonl")
    step_s = statistics.median(row["seconds"] for row in log[args.warmup:])
    tokens = args.seq_len * args.batch_size * args.grad_accum
    n_4bit = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    result = {"label": args.label, "date": time.strftime("%Y-%m-%d %H:%M"), "settings": asdict(args),
              "device": machine_name(str(device)),
              "base_parameters": parameters, "linear4bit_layers": n_4bit,
              "lora_parameters": sum(p.numel() for p in common.lora_parameters(model)),
              "load_s": round(loaded_s, 1), "weights_gib": round(weights_gib, 3), "step_s": round(step_s, 3),
              "tokens_per_s": round(tokens / step_s, 1), "peak_memory_gib": round(PeakMemory(str(device)).overall(), 3),
              "losses": [row["loss"] for row in log]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"{args.model}{' nf4' if args.load_in_4bit else ''} on {result['device']}: "
          f"{parameters / 1e6:.0f}M parameters ({n_4bit} Linear4bit layers), "
          f"LoRA {result['lora_parameters'] / 1e6:.1f}M; step of {args.grad_accum} x {args.batch_size} x "
          f"{args.seq_len} tokens: {step_s:.2f} s (median of {args.repeats}), {result['tokens_per_s']:.0f} tokens/s, "
          f"peak memory {result['peak_memory_gib']:.2f} GiB (weights after loading {weights_gib:.2f} GiB); "
          f"losses {result['losses']}")


if __name__ == "__main__":
    main()
