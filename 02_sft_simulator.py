"""Stage 2: fine-tune the LLM user simulator (one LoRA adapter, three tasks mixed in one SFT run).

Reads   <run-dir>/data/            (01_prep_data.py): items, training dialogues (popularity), samples of train,
                                   valid, and of test only with --quality-split test (a final table)
Writes  <run-dir>/simulator/ (or --out, e.g. simulator_feedback_only for `--task-mix 1 0 0`)
          adapter_config.json, adapter_model.safetensors   the LoRA adapter (PEFT layout)
          simulator_config.json    the arguments, the task mix, how many examples each task had
          train_log.jsonl          step, loss, lr, seconds (and eval_loss per task on valid every --eval-every)
          quality.json             held-out quality on --max-eval-samples samples of --quality-split drawn with
                                   --seed: split, samples, seed, guesses (3), real_seeker_copy_rate (the data's own
                                   replies), and for the tuned simulator ("tuned") and the untuned base ("base"):
            target_hit_rate, target_hit_ci, target_samples   share of samples with a true title among the model's
                                   first 3 distinct matched titles (all targets), its 95% Wilson interval, samples
            new_target_hit_rate, new_target_hit_ci, new_target_samples   the same on new targets: the true titles
                                   the target prompt does not name; samples without one are left out
            attribute_f1, attribute_f1_ci (95% bootstrap), attribute_samples; reply_loss, reply_samples;
            reply_copy_rate, reply_copy_samples   generated replies that copy the recommender's turn
                                   and, once, the label-free baselines (hit_rate, ci, samples, targets):
            baselines.copy_last_3  the last 3 distinct titles the prompt names, on all targets
            baselines.popular_3    the 3 most popular training items the prompt does not name, on new targets
          checkpoint/checkpoint.pt every --save-every steps; a rerun resumes from it

The simulator plays the seeker. It learns three tasks, each with its own instruction
(common.SIM_INSTRUCTIONS), from every training sample:
  feedback    dialogue so far + the recommender's turn (text and movies) -> the seeker's real reply;
  attributes  dialogue so far -> genres and people of the movies this seeker liked;
  target      dialogue so far -> the title(s) the seeker ends up accepting.
"Accepted" (ours, kept simple): the movies recommended anywhere in the dialogue that are also in
`liked`; when there is none, the movies recommended at this turn (`targets`).
What each task's prompt holds: "dialogue so far" is the last --max-turns turns before this turn, which
can already name accepted movies (recommended earlier, or named by the seeker); only the feedback
prompt adds the recommender's turn, whose movies are this turn's `targets`; no prompt holds the
seeker's reply of this turn.
So the target hit rate on all targets rewards copying titles from the prompt: the copy baseline
shows how far that goes, and the new-target rate counts only the true titles the prompt does not name.
Budget: the model and each baseline get 3 guesses per sample. On all targets these are the model's
first 3 distinct matched titles; on new targets, its first 3 distinct matched titles that the prompt
does not name, the same rule as the popularity baseline's (a title the prompt names cannot be a new
target, and the trained answer lists such titles first).
Training examples are drawn in an order derived from the seed and the step alone, so a run that
is killed and started again ends with the same weights.
"""
from __future__ import annotations

import itertools
import random
import re
import time
import unicodedata
from dataclasses import asdict, dataclass

import numpy as np
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
    steps: int = arg(300, "optimizer steps (0 with --init-adapter: only that adapter's quality report)")
    init_adapter: str = arg("", "start the LoRA from this adapter folder (e.g. an earlier simulator/) instead of zeros")
    batch_size: int = arg(4, "examples per micro-batch")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    lr: float = arg(2e-4, "peak AdamW learning rate")
    max_len: int = arg(512, "tokens per example (the dialogue is cut from the left)")
    max_turns: int = arg(8, "dialogue turns shown in a prompt (the latest)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (memory for time)")
    eval_every: int = arg(0, "validation loss every N steps (0 = never)")
    save_every: int = arg(50, "checkpoint every N steps")
    quality_split: str = arg("valid", "split of quality.json (test only for a final table)", choices=["valid", "test"])
    max_eval_samples: int = arg(100, "samples of valid (validation loss) and of the quality split, drawn with --seed")
    gen_batch_size: int = arg(8, "prompts per generation batch")
    reply_tokens: int = arg(60, "quality report: generation budget of a feedback reply (05's --sim-max-new-tokens)")
    max_train_samples: int = arg(0, "limit: use only the first N training samples (a quick run); 0 = all")
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


def attribute_answer(items: list[dict], ids: list[int], max_genres: int = 6, max_people: int = 8) -> str:
    """'Genres: action, mystery; People: Rian Johnson, Daniel Craig' for the movies `ids`: their
    genres, then directors and the first two stars of each, de-duplicated in order."""
    genres, people = [], []
    for i in ids:
        genres += items[i].get("genres", [])
        people += items[i].get("directors", [])[:1] + items[i].get("stars", [])[:2]
    genres = list(dict.fromkeys(genres))[:max_genres]
    people = list(dict.fromkeys(people))[:max_people]
    return f"Genres: {', '.join(genres) or 'none'}; People: {', '.join(people) or 'none'}"


def target_answer(items: list[dict], ids: list[int]) -> str:
    """'Knives Out (2019); Joker (2019)': the titles of the movies `ids`."""
    return "; ".join(items[i]["title"] for i in ids)


def parse_titles(text: str) -> list[str]:
    """Titles in a target_answer-style string (separated by ';' or new lines, list bullets dropped)."""
    parts = (re.sub(r"^\s*(?:[-*]|\d+[.)])\s*", "", p).strip() for p in re.split(r"[;\n]", text))
    return [p for p in parts if p]


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
        return common.simulator_messages("attributes", sample["context"], max_turns=max_turns,
                                         answer=attribute_answer(items, sample["liked"]))
    targets = accepted.get(sample["dialog_id"]) or sample["targets"]
    return common.simulator_messages("target", sample["context"], answer=target_answer(items, targets),
                                     max_turns=max_turns)


def build_examples(samples: list[dict], items: list[dict], tok, tasks: list[str], args: Args,
                   accepted: dict | None = None) -> tuple[dict, dict]:
    """Tokenized examples per task (labels on the answer only) and the skipped count per task.
    accepted: accepted_items of the whole split when `samples` is a draw from it (default: of `samples`)."""
    accepted = accepted_items(samples) if accepted is None else accepted
    examples, skipped = {t: [] for t in tasks}, {t: 0 for t in tasks}
    for s in samples:
        for t in tasks:
            messages = task_messages(t, s, items, accepted, args.max_turns)
            if messages is None:
                skipped[t] += 1
            else:
                examples[t].append({**common.build_chat_example(tok, messages, args.max_len), "task": t})
    return examples, skipped


# ---- quality report ---------------------------------------------------------------------------------------------

GUESSES = 3  # titles scored per sample, for the model and for each baseline alike


def draw_held_out(samples: list[dict], limit: int, seed: int) -> list[dict]:
    """`limit` samples drawn at random with `seed` (all when limit is 0 or not smaller), kept in file order:
    the first N in file order would be the first dialogues only."""
    if not limit or limit >= len(samples):
        return samples
    return [samples[i] for i in sorted(random.Random(seed).sample(range(len(samples)), limit))]


class TitleMentions:
    """The catalogue titles a text names, latest mention first, by the rule of common.names_title (the title
    without its year as whole words when it has 6 letters or more, with its year otherwise): word n-grams are
    looked up in a table: 70 times faster than names_title per catalogue title (0.1 s against 8 s on INSPIRED's
    246 valid prompts), to which it gives the same sets there."""

    def __init__(self, items: list[dict]):
        self.forms: dict[tuple[str, ...], list[int]] = {}
        for i, item in enumerate(items):
            bare = common.normalize_title(item["title"], keep_year=False)
            forms = {common.normalize_title(item["title"])} | ({bare} if len(bare.replace(" ", "")) >= 6 else set())
            for form in filter(None, forms):
                self.forms.setdefault(tuple(form.split()), []).append(i)
        self.longest = max(map(len, self.forms), default=0)

    def latest_first(self, text: str) -> list[int]:
        # the text is cut into words as names_title does it, so both agree on what a text names
        words = re.sub(r"[^a-z0-9]+", " ", unicodedata.normalize("NFKD", text).lower()).split()
        last_end = {}
        for end in range(1, len(words) + 1):
            for n in range(1, min(self.longest, end) + 1):
                for i in self.forms.get(tuple(words[end - n:end]), ()):
                    last_end[i] = end
        return sorted(last_end, key=lambda i: -last_end[i])


def first_distinct(ids, n: int = GUESSES) -> list[int]:
    """The first n distinct item ids, unmatched titles (None) dropped."""
    return list(dict.fromkeys(i for i in ids if i is not None))[:n]


def hit_rate(guesses: list[list[int]], truths: list[list[int]]) -> dict:
    """Share of samples with a true item among its guesses, and its 95% Wilson interval; samples without
    a true item are left out (and not counted in `samples`)."""
    hits = [bool(set(g) & set(t)) for g, t in zip(guesses, truths) if t]
    return {"hit_rate": sum(hits) / max(len(hits), 1), "ci": common.wilson_interval(sum(hits), len(hits)),
            "samples": len(hits)}


def not_named(ids, prompt: str, items: list[dict]) -> list[int]:
    """The ids whose title the prompt does not name (common.names_title), in order."""
    return [i for i in ids if i is not None and not common.names_title(prompt, items[i]["title"])]


def model_target_scores(prompts: list[str], matched: list[list[int | None]], truths: list[list[int]],
                        items: list[dict]) -> dict:
    """The model's target hit rates. matched: the catalogue ids of its answer's titles in order (None: no
    match). All targets: its first GUESSES distinct ids; new targets (true titles the prompt does not name):
    its first GUESSES distinct ids the prompt does not name, the popularity baseline's rule."""
    all_targets = hit_rate([first_distinct(m) for m in matched], truths)
    new = hit_rate([first_distinct(not_named(m, p, items)) for p, m in zip(prompts, matched)],
                   [not_named(t, p, items) for p, t in zip(prompts, truths)])
    return {"target_hit_rate": all_targets["hit_rate"], "target_hit_ci": all_targets["ci"],
            "target_samples": all_targets["samples"],
            "new_target_hit_rate": new["hit_rate"], "new_target_hit_ci": new["ci"],
            "new_target_samples": new["samples"]}


def target_baselines(prompts: list[str], truths: list[list[int]], items: list[dict], popular: list[int]) -> dict:
    """Label-free guesses of GUESSES titles: the last distinct titles the prompt names, on all targets; the
    most popular training items (`popular`, most first) the prompt does not name, on new targets (where
    copying scores 0 by construction)."""
    mentions = TitleMentions(items)
    copy = hit_rate([mentions.latest_first(p)[:GUESSES] for p in prompts], truths)
    popular_new = []
    for p in prompts:
        unnamed = (i for i in popular if not common.names_title(p, items[i]["title"]))
        popular_new.append(list(itertools.islice(unnamed, GUESSES)))
    popularity = hit_rate(popular_new, [not_named(t, p, items) for p, t in zip(prompts, truths)])
    return {"copy_last_3": {"targets": "all", **copy}, "popular_3": {"targets": "new", **popularity}}


def target_task(samples: list[dict], items: list[dict], accepted: dict, max_turns: int) -> tuple[list, list]:
    """The target task's prompts (chat messages without the answer) and true item ids per sample."""
    prompts = [task_messages("target", s, items, accepted, max_turns)[:-1] for s in samples]
    return prompts, [accepted.get(s["dialog_id"]) or s["targets"] for s in samples]


def bootstrap_ci(values: list[float], seed: int, resamples: int = 1000) -> list[float]:
    """95% percentile bootstrap interval of a mean."""
    if not values:
        return [0.0, 0.0]
    means = np.asarray(values)[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def simulator_quality(model, tok, samples: list[dict], items: list[dict], accepted: dict, examples: dict,
                      titles: common.TitleIndex, args: Args) -> dict:
    """Target hit rates (all and new targets, model_target_scores) and attribute F1 (greedy generation),
    reply loss (teacher forced), and how often a generated reply copies the recommender's turn
    (common.copies_turn). accepted: accepted_items of the whole split."""
    target_prompts, truths = target_task(samples, items, accepted, args.max_turns)
    outputs = common.generate(model, tok, target_prompts, max_new_tokens=48, batch_size=args.gen_batch_size,
                              progress="target prediction")
    matched = [[titles.match(t) for t in parse_titles(text)] for text in outputs]
    targets = model_target_scores([m[1]["content"] for m in target_prompts], matched, truths, items)
    with_liked = [s for s in samples if s["liked"]]
    attr_prompts = [task_messages("attributes", s, items, accepted, args.max_turns)[:-1] for s in with_liked]
    outputs_attr = common.generate(model, tok, attr_prompts, max_new_tokens=64, batch_size=args.gen_batch_size,
                                   progress="attribute alignment")
    f1 = [common.set_f1(common.parse_attributes(text),
                        common.parse_attributes(attribute_answer(items, s["liked"])))
          for s, text in zip(with_liked, outputs_attr)]
    with_reply = [s for s in samples if s["seeker_reply"].strip()]
    reply_prompts = [task_messages("feedback", s, items, accepted, args.max_turns)[:-1] for s in with_reply]
    replies = common.generate(model, tok, reply_prompts, max_new_tokens=args.reply_tokens,
                              batch_size=args.gen_batch_size, progress="feedback replies")
    copies = [common.copies_turn(r, s["response"]) for s, r in zip(with_reply, replies)]
    return {
        **targets,
        "attribute_f1": sum(f1) / max(len(f1), 1), "attribute_f1_ci": bootstrap_ci(f1, args.seed),
        "attribute_samples": len(f1),
        "reply_loss": common.mean_token_loss(model, examples["feedback"], tok.pad_token_id, args.batch_size,
                                             args.device),
        "reply_samples": len(examples["feedback"]),
        "reply_copy_rate": sum(copies) / max(len(copies), 1), "reply_copy_samples": len(copies),
        "examples": [{"target_output": o, "attribute_output": a, "reply": r}
                     for o, a, r in zip(outputs[:3], outputs_attr[:3], replies[:3])],
    }


def quality_report(model, tok, run: common.RunPaths, items: list[dict], args: Args) -> dict:
    """quality.json: the tuned simulator and the untuned base on a seeded draw of --quality-split, beside the
    data's own seekers' copy rate and the label-free target baselines (module docstring)."""
    split = common.load_samples(run, args.quality_split)
    samples = draw_held_out(split, args.max_eval_samples, args.seed)
    accepted = accepted_items(split)  # the whole split's: a dialogue's later turns may not be in the draw
    examples, _ = build_examples(samples, items, tok, ["feedback"], args, accepted)
    popularity = common.popularity_counts(common.load_dialogues(run, "train"), len(items)).tolist()
    titles = common.TitleIndex(items, popularity)  # ties between equal titles go to the more popular item
    popular = sorted(range(len(items)), key=lambda i: -popularity[i])
    prompts, truths = target_task(samples, items, accepted, args.max_turns)
    print(f"[02] quality on {len(samples)} {args.quality_split} samples drawn with seed {args.seed} (tuned, then base)")
    real = [common.copies_turn(s["seeker_reply"], s["response"]) for s in samples if s["seeker_reply"].strip()]
    quality = {"split": args.quality_split, "samples": len(samples), "seed": args.seed, "guesses": GUESSES,
               "real_seeker_copy_rate": sum(real) / max(len(real), 1),  # the data's own replies: the reference
               "baselines": target_baselines([m[1]["content"] for m in prompts], truths, items, popular),
               "tuned": simulator_quality(model, tok, samples, items, accepted, examples, titles, args)}
    with common.lora_disabled(model):
        quality["base"] = simulator_quality(model, tok, samples, items, accepted, examples, titles, args)
    return quality


def interval(ci: list[float]) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def print_quality(quality: dict) -> None:
    split = quality["split"]
    for name in ("tuned", "base"):
        q = quality[name]
        print(f"[02] {name:5s} on {split}: target hit {q['target_hit_rate']:.3f} {interval(q['target_hit_ci'])} "
              f"(all targets, {q['target_samples']} samples), {q['new_target_hit_rate']:.3f} "
              f"{interval(q['new_target_hit_ci'])} (new targets, {q['new_target_samples']} samples)  "
              f"attribute F1 {q['attribute_f1']:.3f} {interval(q['attribute_f1_ci'])}  "
              f"reply loss {q['reply_loss']:.3f}  replies copying the recommender {q['reply_copy_rate']:.2f} "
              f"(real seekers {quality['real_seeker_copy_rate']:.2f})")
    copy, popular = quality["baselines"]["copy_last_3"], quality["baselines"]["popular_3"]
    print(f"[02] baselines on {split}: last 3 titles of the prompt {copy['hit_rate']:.3f} {interval(copy['ci'])} "
          f"(all targets); 3 most popular not in the prompt {popular['hit_rate']:.3f} {interval(popular['ci'])} "
          f"(new targets)")


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

    # 1. Prepared data: the catalogue and the samples (training; a seeded draw of valid for the validation loss).
    items = common.load_items(run)
    train_samples = common.load_samples(run, "train")[:args.max_train_samples or None]
    valid_split = common.load_samples(run, "valid")
    valid_samples = draw_held_out(valid_split, args.max_eval_samples, args.seed)
    print(f"[02] {len(items)} items; {len(train_samples)} training samples; tasks {weights}")

    # 2. The base LLM with a fresh LoRA adapter.
    model, tok = common.load_llm(args.model, args.load_in_4bit, args.device)
    common.add_sft_lora(model, args, "02")

    # 3. Three tasks per sample, each its own instruction; labels on the answer only.
    train_examples, skipped = build_examples(train_samples, items, tok, tasks, args)
    valid_examples, _ = build_examples(valid_samples, items, tok, list(common.SIM_TASKS), args,
                                       accepted_items(valid_split))
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
        return {"eval_loss": {t: round(common.mean_token_loss(model, valid_examples[t], tok.pad_token_id,
                                                              args.batch_size, args.device), 5)
                              for t in common.SIM_TASKS if valid_examples[t]}}

    common.train_lora_sft(model, tok.pad_token_id, train_examples, weights, args, out_dir, same_run,
                          eval_fn=validation_loss, desc="simulator SFT")

    # 5. The adapter in PEFT layout, and the simulator's quality next to the untuned base model's.
    model.eval()
    common.save_lora(model, out_dir, {"base_model_name_or_path": args.model})
    quality = quality_report(model, tok, run, items, args)
    common.write_json(out_dir / "quality.json", quality)
    config = {"args": asdict(args), "task_mix": weights,
              "train_examples": {t: len(e) for t, e in train_examples.items()},
              "skipped_samples": skipped, "seconds": round(time.time() - started, 1)}
    common.write_json(out_dir / "simulator_config.json", config)
    print_quality(quality)
    print(f"[02] wrote {out_dir}/ in {config['seconds']} s")
    return {"quality": quality, "config": config}


if __name__ == "__main__":
    main()
