"""One GRPO step of ours (04_rl_multiturn.py's mechanics) against TRL's GRPOTrainer, same task.

The task is single-turn and the same for both: `--prompts` prompts of `--prompt-tokens` tokens
(recommender-style text: an instruction and numbered candidates), `--group-size` sampled
completions each of exactly `--completion-tokens` tokens (EOS is suppressed until then, so both
sides generate and train on the same number of tokens), a reward that both call (the share of
distinct words in the completion, a cheap score that always varies within a group), LoRA of the
same rank on the same layers, the same micro-batch, KL coefficient, clipping, learning rate and
gradient checkpointing. One step = generate the whole group batch, score, one optimizer step.

Ours: common.generate + 04's group_advantages + 04's policy_update (reference = the adapter's
initial weights swapped in, as 04 swaps in the SFT adapter). TRL: GRPOTrainer with a peft
LoraConfig (reference = adapter disabled), per_device_train_batch_size = --micro-batch,
gradient_accumulation_steps = prompts x G / micro-batch, so one trainer step = one generation
batch and one optimizer step, as ours.

Each side runs in its own child process (so peak memory is its own): --warmup steps untimed,
then --repeats timed steps; the parent prints medians and the ratios ours / TRL and appends one
JSON line per side to --out. --rounds N runs the two sides alternately N times (a GPU machine's
speed drifts between runs): medians over every round's steps, and each round's ratio. Peak
memory: the child's max RSS on CPU, torch.cuda.max_memory_allocated on CUDA. TRL is a bench-only
dependency: `pip install -r bench/requirements.txt` (`bash install.sh --bench`).

    OMP_NUM_THREADS=1 python bench/rl_step_vs_trl.py --threads 1             # CPU, SmolLM2-135M
    python bench/rl_step_vs_trl.py --device cuda --model Qwen/Qwen2.5-1.5B-Instruct --load-in-4bit --rounds 2
"""
import dataclasses
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from common import arg  # noqa: E402


@dataclass
class Args:
    impl: str = arg("both", "ours, trl, or both (each in a child process, then the comparison)",
                    choices=["ours", "trl", "both"])
    model: str = arg(common.DEFAULT_LLM, "base LLM: Hugging Face id, folder or .gguf ('tiny': a random tiny model)")
    load_in_4bit: bool = arg(False, "nf4 base with double quantisation (bitsandbytes), LoRA on top")
    device: str = arg("cpu", "torch device")
    threads: int = arg(1, "torch CPU threads (0 = torch's default)")
    prompts: int = arg(2, "prompts per step")
    group_size: int = arg(4, "completions per prompt (G)")
    prompt_tokens: int = arg(256, "tokens per prompt")
    completion_tokens: int = arg(128, "tokens per completion (fixed: EOS suppressed until then)")
    micro_batch: int = arg(2, "sequences per forward/backward pass")
    lora_r: int = arg(16, "LoRA rank")
    lora_alpha: float = arg(32.0, "LoRA alpha")
    lr: float = arg(2e-5, "AdamW learning rate (constant)")
    kl_coef: float = arg(0.02, "beta of the k3 KL term (both sides score a reference when > 0)")
    clip_eps: float = arg(0.2, "PPO ratio clipping epsilon")
    gradient_checkpointing: bool = arg(True, "activation checkpointing in the policy's forward")
    warmup: int = arg(1, "untimed steps first")
    repeats: int = arg(3, "timed steps per child; the medians are reported")
    rounds: int = arg(1, "run ours and TRL alternately this many times, each in a fresh child: medians over every "
                         "round's timed steps, and each round's ratio (GPU step times drift between runs)")
    seed: int = arg(0, "random seed")
    label: str = arg("", "free text stored with the results")
    out: str = arg("bench/results/rl_step_vs_trl.jsonl", "results file (one JSON line per side, appended)")
    result_file: str = arg("", "(internal) where a child writes its measurements")


def make_prompts(tokenizer, n: int, length: int) -> list[str]:
    """n distinct chat prompts of exactly `length` tokens (raw strings: both sides tokenize them
    without adding special tokens)."""
    prompts = []
    for i in range(n):
        candidates = "\n".join(f"#{k + 1} Movie {i * 97 + k * 13} ({1950 + (i + k) % 70}): drama, comedy; "
                               f"director {k * 7 + i}; star {k * 11 + i}" for k in range(60))
        text = common.render_chat(tokenizer, [{"role": "user", "content":
                                  "Rank ten of these candidates for the seeker and explain.\n" + candidates}],
                                  add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-length:]
        prompts.append(tokenizer.decode(ids))
    return prompts


def distinct_word_reward(completions: list[str], **_) -> list[float]:
    """Share of distinct words in each completion (TRL passes extra keyword columns)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(len(set(words)) / max(len(words), 1))
    return out


class PeakMemory:
    """Peak memory of the run, and on CUDA of each phase of a step: end(phase) books the peak since
    the previous end() to `phase` and resets CUDA's peak counter. overall() is the max over the whole
    run (what max_memory_allocated gives without resets); on a CPU the child's max RSS."""

    def __init__(self, device: str):
        self.cuda, self.phases = device.startswith("cuda"), {}

    def end(self, phase: str) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            self.phases[phase] = max(self.phases.get(phase, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            torch.cuda.reset_peak_memory_stats()

    def overall(self) -> float:
        import resource
        if not self.cuda:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        self.end("other")
        return max(self.phases.values())


def run_ours(args, model, tok, prompts, peaks: PeakMemory) -> list[dict]:
    import torch
    rl = importlib.import_module("04_rl_multiturn")
    common.add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=0.0)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    reference = common.get_lora_weights(model, device="cpu")  # in host memory, as 04's (read_lora) is
    optimizer = torch.optim.AdamW(common.lora_parameters(model), lr=args.lr, weight_decay=0.0)
    model.generation_config.min_new_tokens = args.completion_tokens  # fixed-length completions, as TRL's below
    update_args = SimpleNamespace(updates=1, micro_batch=args.micro_batch, kl_coef=args.kl_coef, clip_eps=args.clip_eps,
                                  temperature=1.0, max_grad_norm=1.0, device=args.device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    steps = []
    for step in range(args.warmup + args.repeats):
        batch = [prompts[(step * args.prompts + i) % len(prompts)] for i in range(args.prompts)]
        peaks.end("other")
        started = time.perf_counter()
        texts, prompt_ids, completion_ids = common.generate(
            model, tok, [p for p in batch for _ in range(args.group_size)], max_new_tokens=args.completion_tokens,
            temperature=1.0, batch_size=args.prompts * args.group_size, return_tokens=True)
        generated = time.perf_counter()
        peaks.end("generate")
        rewards = distinct_word_reward(texts)
        rows = []
        for g in range(args.prompts):
            span = range(g * args.group_size, (g + 1) * args.group_size)
            advantages, _, _ = rl.group_advantages([[rewards[i]] for i in span])
            rows += [{"prompt_ids": prompt_ids[i], "completion_ids": completion_ids[i], "advantage": a[0]}
                     for i, a in zip(span, advantages)]
        rl.policy_update(model, rows, reference, optimizer, pad_id, 1, update_args)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        done = time.perf_counter()
        peaks.end("train")
        steps.append({"step_s": done - started, "generate_s": generated - started,
                      "tokens": sum(map(len, completion_ids)), "prompt_tokens": statistics.mean(map(len, prompt_ids))})
    return steps


def run_trl(args, model, tok, prompts, peaks: PeakMemory) -> list[dict]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    steps, clock = [], {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            clock["start"], clock["generate"] = time.perf_counter(), 0.0

        def on_step_end(self, *_, **__):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            peaks.end("train")
            steps.append({"step_s": time.perf_counter() - clock["start"], "generate_s": clock["generate"]})

    per_step = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_bench_"), report_to="none", save_strategy="no", logging_steps=1,
        max_steps=args.warmup + args.repeats, seed=args.seed, use_cpu=args.device == "cpu", bf16=False,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=per_step // args.micro_batch,
        num_generations=args.group_size, max_completion_length=args.completion_tokens,
        generation_kwargs={"min_new_tokens": args.completion_tokens}, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=args.kl_coef, epsilon=args.clip_eps, num_iterations=1, loss_type="dapo",
        gradient_checkpointing=args.gradient_checkpointing, dataloader_num_workers=0, log_completions=False)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules=list(common.LORA_TARGETS), task_type="CAUSAL_LM")
    rows = args.prompts * (args.warmup + args.repeats)
    dataset = Dataset.from_dict({"prompt": [prompts[i % len(prompts)] for i in range(rows)]})
    trainer = GRPOTrainer(model=model, reward_funcs=distinct_word_reward, args=config, train_dataset=dataset,
                          processing_class=tok, peft_config=lora, callbacks=[StepTimer()])
    inner = trainer._generate_single_turn

    def timed_generate(*a, **kw):
        peaks.end("train")  # what ran since the last generation: scoring and the update
        started = time.perf_counter()
        out = inner(*a, **kw)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        clock["generate"] += time.perf_counter() - started
        peaks.end("generate")
        return out

    trainer._generate_single_turn = timed_generate
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    for s, length in zip(steps, lengths):
        s["tokens"] = length * per_step
    return steps


def child(args) -> None:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    common.set_seed(args.seed)
    model, tok = common.load_llm(args.model, load_in_4bit=args.load_in_4bit, device=args.device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    prompts = make_prompts(tok, 16, args.prompt_tokens)
    peaks = PeakMemory(args.device)
    steps = (run_ours if args.impl == "ours" else run_trl)(args, model, tok, prompts, peaks)
    timed = steps[args.warmup:]
    result = {"impl": args.impl, "step_s": statistics.median(s["step_s"] for s in timed),
              "generate_s": statistics.median(s["generate_s"] for s in timed),
              "tokens_per_step": statistics.median(s["tokens"] for s in timed),
              "peak_memory_gib": round(peaks.overall(), 3),
              "peak_memory_by_phase_gib": {k: round(v, 3) for k, v in peaks.phases.items()}, "steps": timed}
    result["train_s"] = result["step_s"] - result["generate_s"]
    result["generated_tokens_per_s"] = result["tokens_per_step"] / result["generate_s"]
    Path(args.result_file).write_text(json.dumps(result))


def machine_name(device: str) -> str:
    import torch
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPUs"
    return f"{os.uname().machine}, {os.cpu_count()} CPUs"


def merge_rounds(rounds: list[dict]) -> dict:
    """One side's child results of several rounds as one: medians over all timed steps, the highest
    peaks, and each round's own medians and peak under "rounds"."""
    steps = [s for r in rounds for s in r["steps"]]
    phases = {}
    for r in rounds:
        for k, v in r["peak_memory_by_phase_gib"].items():
            phases[k] = max(phases.get(k, 0.0), v)
    out = {"impl": rounds[0]["impl"], "step_s": statistics.median(s["step_s"] for s in steps),
           "generate_s": statistics.median(s["generate_s"] for s in steps),
           "tokens_per_step": statistics.median(s["tokens"] for s in steps),
           "peak_memory_gib": max(r["peak_memory_gib"] for r in rounds), "peak_memory_by_phase_gib": phases,
           "steps": steps, "rounds": [{k: r[k] for k in ("step_s", "generate_s", "peak_memory_gib")} for r in rounds]}
    out["train_s"] = out["step_s"] - out["generate_s"]
    out["generated_tokens_per_s"] = out["tokens_per_step"] / out["generate_s"]
    return out


def compare(args) -> None:
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("impl", "out", "result_file", "label")}
    runs = {"ours": [], "trl": []}
    for round_ in range(args.rounds):
        for impl in ("ours", "trl"):  # alternating, so a drift of the machine's speed hits both sides
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                result_file = f.name
            argv = [sys.executable, __file__, "--impl", impl, "--result-file", result_file]
            for k, v in settings.items():
                if k == "rounds":
                    continue
                flag = "--" + k.replace("_", "-")
                argv += ([flag] if v else ["--no-" + k.replace("_", "-")]) if isinstance(v, bool) else [flag, str(v)]
            print(f"[bench] round {round_ + 1}/{args.rounds}, {impl}: {' '.join(argv[1:])}", flush=True)
            subprocess.run(argv, check=True)
            runs[impl].append(json.loads(Path(result_file).read_text()))
            os.unlink(result_file)
    results = {impl: merge_rounds(r) for impl, r in runs.items()}
    stamp = time.strftime("%Y-%m-%d %H:%M")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for impl, r in results.items():
            f.write(json.dumps({"impl": impl, "label": args.label, "date": stamp, "settings": settings,
                                "machine": machine_name(args.device), **r}) + "\n")
    ours, trl = results["ours"], results["trl"]
    print(f"\n{args.prompts} prompts x G {args.group_size}, {args.prompt_tokens} + {args.completion_tokens} tokens, "
          f"{args.model}{' nf4' if args.load_in_4bit else ''} on {args.device}; medians of {args.rounds} x "
          f"{args.repeats} steps")
    print(comparison_table(ours, trl))
    if args.rounds > 1:
        print(round_ratios(ours, trl))
    if ours["peak_memory_by_phase_gib"]:
        print("peak memory by phase (GiB): " + "; ".join(
            f"{name} " + ", ".join(f"{k} {v:.2f}" for k, v in r["peak_memory_by_phase_gib"].items())
            for name, r in (("ours", ours), ("TRL", trl))))


def round_ratios(ours: dict, trl: dict) -> str:
    """Each round's ours / TRL for step time and peak memory, in order (a run of several --rounds)."""
    return "ours / TRL by round (step time, peak memory): " + "; ".join(
        f"{o['step_s'] / t['step_s']:.2f}, {o['peak_memory_gib'] / t['peak_memory_gib']:.2f}"
        for o, t in zip(ours["rounds"], trl["rounds"]))


def comparison_table(ours: dict, trl: dict) -> str:
    """Markdown table of two result lines (ours, TRL) and their ratios."""
    lines = ["| | seconds/step | generating | training | generated tokens/s | peak memory GiB |",
             "|---|---|---|---|---|---|"]
    for name, r in (("ours", ours), ("TRL GRPOTrainer", trl)):
        lines.append(f"| {name} | {r['step_s']:.1f} | {r['generate_s']:.1f} | {r['train_s']:.1f} | "
                     f"{r['generated_tokens_per_s']:.1f} | {r['peak_memory_gib']:.2f} |")
    keys = ("step_s", "generate_s", "train_s", "generated_tokens_per_s", "peak_memory_gib")
    ratio = {k: ours[k] / trl[k] for k in keys}
    lines.append(f"| ours / TRL | {ratio['step_s']:.2f} | {ratio['generate_s']:.2f} | {ratio['train_s']:.2f} | "
                 f"{ratio['generated_tokens_per_s']:.2f} | {ratio['peak_memory_gib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = common.parse_args(Args, argv)
    if args.impl == "both":
        compare(args)
    else:
        child(args)


if __name__ == "__main__":
    main()
