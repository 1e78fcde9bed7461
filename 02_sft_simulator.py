"""Stage 2: fine-tune the LLM user simulator (one LoRA adapter, three tasks mixed in one SFT run).

Reads   <run-dir>/data/            (01_prep_data.py): items, recommendation samples
Writes  <run-dir>/simulator/
          adapter_config.json, adapter_model.safetensors   the LoRA adapter (PEFT layout)
          simulator_config.json    the arguments, the task mix, how many examples each task had
          train_log.jsonl          step, loss, lr, seconds (and validation loss every --eval-every)
          quality.json             held-out quality of the tuned simulator and of the untuned base
          checkpoint/checkpoint.pt every --save-every steps; a rerun resumes from it

The simulator plays the seeker. It learns three tasks, each with its own instruction
(common.SIM_INSTRUCTIONS), from every training sample:
  feedback    dialogue so far + the recommender's turn (text and movies) -> the seeker's real reply;
  attributes  dialogue so far -> genres and people of the movies this seeker liked;
  target      dialogue so far -> the title(s) the seeker ends up accepting.
"Accepted" (ours, kept simple): the movies recommended anywhere in the dialogue that are also in
`liked`; when there is none, the movies recommended at this turn (`targets`). At inference the
simulator sees only the dialogue and the recommended list, never the target.
Training examples are drawn in an order derived from the seed and the step alone, so a run that
is killed (or stopped with --stop-after) and started again ends with the same weights.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

import common
from common import arg


@dataclass
class Args:
    dataset: str = arg("redial", "dataset whose run directory to use", choices=["redial", "inspired"])
    run_dir: str = arg("", "run directory (default: runs/<dataset>)")
    model: str = arg(common.DEFAULT_LLM, "base LLM: Hugging Face id, folder or .gguf ('tiny': random test model)")
    load_in_4bit: bool = arg(False, "load the base in nf4 4-bit and train LoRA on top (QLoRA)")
    task_mix: list = arg([1.0, 1.0, 1.0], "weights of the feedback, attributes and target tasks")
    lora_r: int = arg(16, "LoRA rank")
    lora_alpha: float = arg(32.0, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = arg(0.05, "dropout on the LoRA input")
    steps: int = arg(300, "optimizer steps")
    batch_size: int = arg(4, "examples per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    lr: float = arg(2e-4, "peak AdamW learning rate")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    warmup: float = arg(0.1, "fraction of the steps with a linear warm-up; then linear decay to 0")
    max_len: int = arg(512, "tokens per example (the dialogue is cut from the left)")
    max_turns: int = arg(8, "dialogue turns shown in a prompt (the latest)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (memory for time)")
    eval_every: int = arg(0, "validation loss every N steps (0 = never)")
    save_every: int = arg(50, "checkpoint every N steps")
    stop_after: int = arg(0, "stop with a checkpoint once this step is reached (rerun to resume); 0 = run all")
    quality_split: str = arg("test", "held-out split for quality.json", choices=["valid", "test"])
    max_eval_samples: int = arg(100, "samples of the held-out split for validation loss and quality")
    gen_batch_size: int = arg(8, "prompts per generation batch")
    max_train_samples: int = arg(0, "use only the first N training samples (smoke tests); 0 = all")
    seed: int = arg(0, "random seed")
    threads: int = arg(0, "torch CPU threads (0 = torch's default; 1 is fastest on small CPUs)")
    device: str = arg(str(common.default_device()), "torch device")


def load_base_model(args: Args):
    """(model, tokenizer); `--model tiny` is a small random Llama with SmolLM2's tokenizer (tests)."""
    if args.model != "tiny":
        return common.load_causal_lm(args.model, load_in_4bit=args.load_in_4bit, device=args.device)
    model, tok = common.tiny_causal_lm()
    model.to(args.device)
    if args.load_in_4bit:
        common.quantize_to_4bit(model)
    return model, tok


def accepted_items(samples: list[dict]) -> dict[str, list[int]]:
    """dialog_id -> the movies recommended in that dialogue that the seeker liked, in order."""
    recommended: dict[str, list[int]] = {}
    liked: dict[str, set[int]] = {}
    for s in sorted(samples, key=lambda s: (s["dialog_id"], s["turn"])):
        recommended.setdefault(s["dialog_id"], []).extend(s["targets"])
        liked[s["dialog_id"]] = set(s["liked"])
    return {d: [i for i in dict.fromkeys(ids) if i in liked[d]] for d, ids in recommended.items()}


def task_messages(task: str, sample: dict, items: list[dict], accepted: dict, max_turns: int) -> list[dict] | None:
    """The chat (instruction, prompt, answer) of one task for one sample; None when the sample has
    no answer for it (no seeker reply; no liked movie)."""
    if task == "feedback":
        if not sample["seeker_reply"].strip():
            return None
        return common.simulator_messages("feedback", sample["context"], items, sample["response"], sample["targets"],
                                         answer=sample["seeker_reply"], max_turns=max_turns)
    if task == "attributes":
        if not sample["liked"]:
            return None
        return common.simulator_messages("attributes", sample["context"], answer=common.attribute_answer(items, sample["liked"]),
                                         max_turns=max_turns)
    targets = accepted.get(sample["dialog_id"]) or sample["targets"]
    return common.simulator_messages("target", sample["context"], answer=common.target_answer(items, targets),
                                     max_turns=max_turns)


def build_examples(samples: list[dict], items: list[dict], tok, tasks: list[str], args: Args) -> tuple[dict, dict]:
    """Tokenized examples per task (labels on the answer only) and the skipped count per task."""
    accepted = accepted_items(samples)
    examples, skipped = {t: [] for t in tasks}, {t: 0 for t in tasks}
    for s in samples:
        for t in tasks:
            messages = task_messages(t, s, items, accepted, args.max_turns)
            if messages is None:
                skipped[t] += 1
            else:
                examples[t].append({**common.build_chat_example(tok, messages, args.max_len), "task": t})
    return examples, skipped


def epoch_order(pools: dict[str, list], weights: dict[str, float], seed: int, epoch: int) -> list[tuple[str, int]]:
    """One epoch of (task, example index): task t gets a share weights[t] / sum of the epoch's
    length (the sum of the pools), drawn without repetition as far as its pool allows; shuffled.
    A pure function of (seed, epoch), so any step's batch can be recomputed on resume."""
    rng = random.Random(seed * 100_003 + epoch)
    total, wsum = sum(len(p) for p in pools.values()), sum(weights.values())
    order = []
    for t, pool in pools.items():
        count = round(weights[t] / wsum * total)
        perm = []
        while len(perm) < count:
            perm += rng.sample(range(len(pool)), len(pool))
        order += [(t, i) for i in perm[:count]]
    rng.shuffle(order)
    return order


@torch.no_grad()
def mean_token_loss(model, examples: list[dict], pad_id: int, batch_size: int, device) -> float:
    """Mean next-token cross-entropy over all answer tokens of `examples`."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in common.collate_right_padded(examples[s:s + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != common.IGNORE_INDEX).sum())
        total += common.causal_lm_loss(model, batch).item() * n
        tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


def simulator_quality(model, tok, samples: list[dict], items: list[dict], examples: dict, args: Args) -> dict:
    """Target-prediction hit rate and attribute F1 (greedy generation), reply loss (teacher forced)."""
    accepted = accepted_items(samples)
    titles = common.TitleIndex(items)
    target_prompts = [task_messages("target", s, items, accepted, args.max_turns)[:-1] for s in samples]
    outputs = common.generate(model, tok, target_prompts, max_new_tokens=48, batch_size=args.gen_batch_size)
    hits = []
    for s, text in zip(samples, outputs):
        truth = set(accepted.get(s["dialog_id"]) or s["targets"])
        hits.append(any(titles.match(t) in truth for t in common.parse_titles(text)))
    with_liked = [s for s in samples if s["liked"]]
    attr_prompts = [task_messages("attributes", s, items, accepted, args.max_turns)[:-1] for s in with_liked]
    outputs_attr = common.generate(model, tok, attr_prompts, max_new_tokens=64, batch_size=args.gen_batch_size)
    f1 = [common.set_f1(common.parse_attributes(text), common.parse_attributes(common.attribute_answer(items, s["liked"])))
          for s, text in zip(with_liked, outputs_attr)]
    return {
        "target_hit_rate": sum(hits) / max(len(hits), 1), "target_samples": len(hits),
        "attribute_f1": sum(f1) / max(len(f1), 1), "attribute_samples": len(f1),
        "reply_loss": mean_token_loss(model, examples["feedback"], tok.pad_token_id, args.batch_size, args.device),
        "reply_samples": len(examples["feedback"]),
        "examples": [{"target_output": o, "attribute_output": a} for o, a in zip(outputs[:3], outputs_attr[:3])],
    }


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    args.run_dir = common.default_run_dir(args.dataset, args.run_dir)
    run = common.RunPaths(args.run_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.task_mix) != 3 or min(args.task_mix) < 0 or sum(args.task_mix) <= 0:
        raise SystemExit("error: --task-mix takes three non-negative weights (feedback attributes target), not all 0")
    weights = {t: w for t, w in zip(common.SIM_TASKS, args.task_mix) if w > 0}
    tasks = list(weights)
    common.set_seed(args.seed)
    started = time.time()

    # 1. Prepared data: the catalogue and the samples (training; held-out for quality).
    items = common.load_items(run)
    train_samples = common.load_samples(run, "train")[:args.max_train_samples or None]
    eval_samples = common.load_samples(run, args.quality_split)[:args.max_eval_samples]
    print(f"[02] {len(items)} items; {len(train_samples)} training samples; tasks {weights}")

    # 2. The base LLM with a fresh LoRA adapter.
    model, tok = load_base_model(args)
    common.add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)

    # 3. Three tasks per sample, each its own instruction; labels on the answer only.
    train_examples, skipped = build_examples(train_samples, items, tok, tasks, args)
    eval_examples, _ = build_examples(eval_samples, items, tok, list(common.SIM_TASKS), args)
    for t in tasks:
        print(f"[02] task {t}: {len(train_examples[t])} examples ({skipped[t]} samples skipped: no answer)")
        if not train_examples[t]:
            raise SystemExit(f"error: no training example for task {t}; give it weight 0 in --task-mix")

    # 4. AdamW over the LoRA weights, linear warm-up and decay; resume from a checkpoint if any.
    optimizer = torch.optim.AdamW(common.lora_parameters(model), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, round(args.warmup * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / max(1, args.steps - warmup))))
    ckpt_dir = run.simulator / "checkpoint"
    same_run = {k: getattr(args, k) for k in ("model", "task_mix", "lora_r", "lora_alpha", "batch_size", "grad_accum",
                                               "max_len", "max_turns", "max_train_samples", "seed", "steps", "lr")}
    step, log_rows = 0, []
    if (ckpt_dir / "checkpoint.pt").exists():
        step, extra = common.load_checkpoint(ckpt_dir, model, optimizer, scheduler)
        if extra.get("same_run") != same_run:
            raise SystemExit(f"error: {ckpt_dir} was written with other settings {extra.get('same_run')}; "
                             "rerun with those, or delete the checkpoint folder to start over")
        log_rows = extra["log"]
        print(f"[02] resuming from {ckpt_dir} at step {step}")
    log_path = run.simulator / "train_log.jsonl"
    common.write_jsonl(log_path, log_rows)  # drops rows logged after the checkpoint we resume from

    def log(row: dict) -> None:
        log_rows.append(row)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    # 5. SFT: each step takes the next batch_size * grad_accum examples of the mixed, shuffled order.
    per_step = args.batch_size * args.grad_accum
    epochs: dict[int, list] = {}
    epoch_len = len(epoch_order(train_examples, weights, args.seed, 0))
    end = min(args.steps, args.stop_after) if args.stop_after else args.steps
    model.train()
    bar = tqdm(range(step, end), desc="simulator SFT", initial=step, total=end)
    for step in bar:
        t0 = time.time()
        picks = []
        for p in range(step * per_step, (step + 1) * per_step):
            e = p // epoch_len
            if e not in epochs:
                epochs = {e: epoch_order(train_examples, weights, args.seed, e)}
            picks.append(epochs[e][p % epoch_len])
        total = 0.0
        for m in range(args.grad_accum):
            chunk = [train_examples[t][i] for t, i in picks[m * args.batch_size:(m + 1) * args.batch_size]]
            batch = {k: v.to(args.device) for k, v in common.collate_right_padded(chunk, tok.pad_token_id).items()}
            loss = common.causal_lm_loss(model, batch) / args.grad_accum
            loss.backward()
            total += loss.item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": round(total, 5), "lr": lr, "seconds": round(time.time() - t0, 3)}
        if args.eval_every and (step + 1) % args.eval_every == 0:
            row["eval_loss"] = {t: round(mean_token_loss(model, eval_examples[t], tok.pad_token_id, args.batch_size,
                                                         args.device), 5) for t in common.SIM_TASKS if eval_examples[t]}
        log(row)
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.1e}")
        if (step + 1) % args.save_every == 0 or step + 1 == end:
            common.save_checkpoint(ckpt_dir, step + 1, common.lora_state_dict(model), optimizer, scheduler,
                                   extra={"same_run": same_run, "log": log_rows})
    if args.stop_after and args.stop_after < args.steps:
        print(f"[02] stopped at step {end} of {args.steps}; rerun without --stop-after to resume")
        return {"stopped_at": end}

    # 6. The adapter in PEFT layout, and the simulator's quality next to the untuned base model's.
    model.eval()
    common.save_lora(model, run.simulator, {"base_model_name_or_path": args.model})
    print(f"[02] quality on {len(eval_samples)} {args.quality_split} samples (tuned, then base)")
    quality = {"split": args.quality_split, "samples": len(eval_samples),
               "tuned": simulator_quality(model, tok, eval_samples, items, eval_examples, args)}
    with common.lora_disabled(model):
        quality["base"] = simulator_quality(model, tok, eval_samples, items, eval_examples, args)
    common.write_json(run.simulator / "quality.json", quality)
    config = {"args": asdict(args), "task_mix": weights, "train_examples": {t: len(e) for t, e in train_examples.items()},
              "skipped_samples": skipped, "seconds": round(time.time() - started, 1)}
    common.write_json(run.simulator / "simulator_config.json", config)
    for name in ("tuned", "base"):
        q = quality[name]
        print(f"[02] {name:5s}: target hit {q['target_hit_rate']:.3f}  attribute F1 {q['attribute_f1']:.3f}  "
              f"reply loss {q['reply_loss']:.3f}")
    print(f"[02] wrote {run.simulator}/ in {config['seconds']} s")
    return {"quality": quality, "config": config}


if __name__ == "__main__":
    main()
