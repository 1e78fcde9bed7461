"""Stage 2: fine-tune the LLM user simulator (one LoRA adapter, three tasks mixed in one SFT run).

Reads   <run-dir>/data/            (01_prep_data.py): items, recommendation samples
Writes  <run-dir>/simulator/ (or --out, e.g. simulator_feedback_only for `--task-mix 1 0 0`)
          adapter_config.json, adapter_model.safetensors   the LoRA adapter (PEFT layout)
          simulator_config.json    the arguments, the task mix, how many examples each task had
          train_log.jsonl          step, loss, lr, seconds (and validation loss every --eval-every)
          quality.json             held-out quality of the tuned simulator and of the untuned base: target hit
                                   rate, attribute F1, reply loss, replies that copy the recommender's turn
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

import time
from dataclasses import asdict, dataclass

import torch

import common
from common import arg


@dataclass
class Args:
    dataset: str = arg("redial", "dataset whose run directory to use", choices=["redial", "inspired"])
    run_dir: str = arg("", "run directory (default: runs/<dataset>)")
    out: str = arg("simulator", "output folder under the run directory (simulator_feedback_only: the ablation)")
    model: str = arg(common.DEFAULT_LLM, "base LLM: Hugging Face id, folder or .gguf ('tiny': random test model)")
    load_in_4bit: bool = arg(False, "load the base in nf4 4-bit and train LoRA on top (QLoRA)")
    task_mix: list = arg([1.0, 1.0, 1.0], "weights of the feedback, attributes and target tasks")
    lora_r: int = arg(16, "LoRA rank")
    lora_alpha: float = arg(32.0, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = arg(0.05, "dropout on the LoRA input")
    steps: int = arg(300, "optimizer steps (0 with --init-adapter: only that adapter's quality report)")
    init_adapter: str = arg("", "start the LoRA from this adapter folder (e.g. an earlier simulator/) instead of zeros")
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
    reply_tokens: int = arg(60, "quality report: generation budget of a feedback reply (05's --sim-max-new-tokens)")
    max_train_samples: int = arg(0, "use only the first N training samples (smoke tests); 0 = all")
    seed: int = arg(0, "random seed")
    threads: int = arg(0, "torch CPU threads (0 = torch's default; 1 when jobs share the cores, else all of them)")
    device: str = arg(str(common.default_device()), "torch device")


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


def simulator_quality(model, tok, samples: list[dict], items: list[dict], examples: dict, args: Args) -> dict:
    """Target-prediction hit rate and attribute F1 (greedy generation), reply loss (teacher forced),
    and how often a generated reply copies the recommender's turn (common.copies_turn)."""
    accepted = accepted_items(samples)
    titles = common.TitleIndex(items)
    target_prompts = [task_messages("target", s, items, accepted, args.max_turns)[:-1] for s in samples]
    outputs = common.generate(model, tok, target_prompts, max_new_tokens=48, batch_size=args.gen_batch_size,
                              progress="target prediction")
    hits = []
    for s, text in zip(samples, outputs):
        truth = set(accepted.get(s["dialog_id"]) or s["targets"])
        hits.append(any(titles.match(t) in truth for t in common.parse_titles(text)))
    with_liked = [s for s in samples if s["liked"]]
    attr_prompts = [task_messages("attributes", s, items, accepted, args.max_turns)[:-1] for s in with_liked]
    outputs_attr = common.generate(model, tok, attr_prompts, max_new_tokens=64, batch_size=args.gen_batch_size,
                                   progress="attribute alignment")
    f1 = [common.set_f1(common.parse_attributes(text), common.parse_attributes(common.attribute_answer(items, s["liked"])))
          for s, text in zip(with_liked, outputs_attr)]
    with_reply = [s for s in samples if s["seeker_reply"].strip()]
    reply_prompts = [task_messages("feedback", s, items, accepted, args.max_turns)[:-1] for s in with_reply]
    replies = common.generate(model, tok, reply_prompts, max_new_tokens=args.reply_tokens, batch_size=args.gen_batch_size,
                              progress="feedback replies")
    copies = [common.copies_turn(r, s["response"]) for s, r in zip(with_reply, replies)]
    return {
        "target_hit_rate": sum(hits) / max(len(hits), 1), "target_samples": len(hits),
        "reply_copy_rate": sum(copies) / max(len(copies), 1), "reply_copy_samples": len(copies),
        "attribute_f1": sum(f1) / max(len(f1), 1), "attribute_samples": len(f1),
        "reply_loss": common.mean_token_loss(model, examples["feedback"], tok.pad_token_id, args.batch_size, args.device),
        "reply_samples": len(examples["feedback"]),
        "examples": [{"target_output": o, "attribute_output": a, "reply": r}
                     for o, a, r in zip(outputs[:3], outputs_attr[:3], replies[:3])],
    }


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    args.run_dir = common.default_run_dir(args.dataset, args.run_dir)
    run = common.RunPaths(args.run_dir)
    out_dir = run.root / args.out
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps == 0 and not args.init_adapter:
        # 0 steps from zeros would write the untuned base as the simulator, over a trained adapter
        raise SystemExit("error: --steps 0 only reports on an earlier adapter: give it with --init-adapter DIR")
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
    model, tok = common.load_llm(args.model, args.load_in_4bit, args.device)
    common.add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    if args.init_adapter:
        common.load_lora(model, args.init_adapter)
        print(f"[02] LoRA initialised from {args.init_adapter}")
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)

    # 3. Three tasks per sample, each its own instruction; labels on the answer only.
    train_examples, skipped = build_examples(train_samples, items, tok, tasks, args)
    eval_examples, _ = build_examples(eval_samples, items, tok, list(common.SIM_TASKS), args)
    for t in tasks:
        print(f"[02] task {t}: {len(train_examples[t])} examples ({skipped[t]} samples skipped: no answer)")
        if not train_examples[t]:
            raise SystemExit(f"error: no training example for task {t}; give it weight 0 in --task-mix")

    # 4. SFT of the LoRA weights on the mixed, shuffled tasks (AdamW, linear warm-up and decay);
    #    resumes from out_dir/checkpoint/ when a checkpoint of the same settings is there.
    same_run = {k: getattr(args, k) for k in ("model", "task_mix", "lora_r", "lora_alpha", "batch_size", "grad_accum",
                                               "max_len", "max_turns", "max_train_samples", "seed", "steps", "lr",
                                               "init_adapter")}

    def validation_loss() -> dict:
        return {"eval_loss": {t: round(common.mean_token_loss(model, eval_examples[t], tok.pad_token_id,
                                                              args.batch_size, args.device), 5)
                              for t in common.SIM_TASKS if eval_examples[t]}}

    finished = common.train_lora_sft(model, tok.pad_token_id, train_examples, weights, args, out_dir, same_run,
                                     eval_fn=validation_loss, desc="simulator SFT")
    if not finished:
        print(f"[02] stopped at step {args.stop_after} of {args.steps}; rerun without --stop-after to resume")
        return {"stopped_at": args.stop_after}

    # 5. The adapter in PEFT layout, and the simulator's quality next to the untuned base model's.
    model.eval()
    common.save_lora(model, out_dir, {"base_model_name_or_path": args.model})
    print(f"[02] quality on {len(eval_samples)} {args.quality_split} samples (tuned, then base)")
    real = [common.copies_turn(s["seeker_reply"], s["response"]) for s in eval_samples if s["seeker_reply"].strip()]
    quality = {"split": args.quality_split, "samples": len(eval_samples),
               "real_seeker_copy_rate": sum(real) / max(len(real), 1),  # the data's own replies: the reference
               "tuned": simulator_quality(model, tok, eval_samples, items, eval_examples, args)}
    with common.lora_disabled(model):
        quality["base"] = simulator_quality(model, tok, eval_samples, items, eval_examples, args)
    common.write_json(out_dir / "quality.json", quality)
    config = {"args": asdict(args), "task_mix": weights, "train_examples": {t: len(e) for t, e in train_examples.items()},
              "skipped_samples": skipped, "seconds": round(time.time() - started, 1)}
    common.write_json(out_dir / "simulator_config.json", config)
    for name in ("tuned", "base"):
        q = quality[name]
        print(f"[02] {name:5s}: target hit {q['target_hit_rate']:.3f}  attribute F1 {q['attribute_f1']:.3f}  "
              f"reply loss {q['reply_loss']:.3f}  replies copying the recommender {q['reply_copy_rate']:.2f} "
              f"(real seekers {quality['real_seeker_copy_rate']:.2f})")
    print(f"[02] wrote {out_dir}/ in {config['seconds']} s")
    return {"quality": quality, "config": config}


if __name__ == "__main__":
    main()
