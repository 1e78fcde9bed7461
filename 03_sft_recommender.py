"""Stage 3: train the dual-view retriever, then the reasoning recommender (LoRA SFT) on its candidates.

Reads   <run-dir>/data/            (01_prep_data.py): items, dialogues, recommendation samples
Writes  <run-dir>/retriever/
          features.pt              frozen sentence-encoder vectors of items and dialogue contexts
          fused/retriever.pt       the dual-view retriever (semantic + collaborative, cross-attention)
          fused/folds/             --retriever-folds N cross-fitted copies: fold<f>/retriever.pt trained
                                   without the training dialogues of fold f; folds.json {dialog_id: fold}
          semantic/, collaborative/  single-view ablations trained the same way
          report.json              Recall@K (K = candidate-set size) and more on valid and test; where
                                   the target sits in the K candidates of training samples (full retriever,
                                   out of fold) and of valid samples
          train_log.jsonl          loss and validation recall per epoch and variant
        <run-dir>/recommender_sft/
          adapter_config.json, adapter_model.safetensors   the recommender's LoRA adapter (PEFT layout)
          recommender_config.json  arguments, example counts (metadata chains, teacher chains kept), SFT answer lengths
          train_log.jsonl          step, loss, lr, seconds (validation loss every --eval-every)
          quality.json             on valid: format-parse rate (95% Wilson interval), why the other answers fail
                                   (common.parse_failure_kinds; the first 30 invalid answers whole, with their
                                   kinds and candidates), hit rates, tuned vs the
                                   untuned base (`--init-adapter DIR --steps 0` only writes DIR's report)
          checkpoint/checkpoint.pt every --save-every steps; the same command again resumes from it

Part 1, the retriever, keeps the recommender inside the item space: its Recall@K at the
candidate-set size bounds every later stage, since the LLM only re-ranks what it recalls.
Training is softmax cross-entropy over the whole catalogue, one term per new target item of a
training sample, with the items already mentioned in the dialogue masked out (they are not new
recommendations). The best epoch by validation Recall@K is kept. A retriever ranks the dialogues
it trained on far better than new ones, so it also trains --retriever-folds copies, each without
one fold of the training dialogues: the SFT examples here and 04's training episodes get a
training dialogue's candidates from the copy that never saw it, as a test dialogue gets them.

Part 2, the recommender (docs/design.md section 5): the prompt is the dialogue, the seeker's latest
feedback and the retriever's K numbered candidates with short attributes
(common.recommender_messages); the target is a five-line reasoning chain (Preference, Matching,
Scores, Ranking, Explanation) and then `<answer>` with 10 numbered candidate titles, built from
metadata by common.reasoning_chain with the true target ranked first (--cite-candidates: each
title after its candidate number, "1. #4 Knives Out (2019)", which makes writing it a copy of
the prompt's candidate line). A training sample whose target the retriever missed keeps its
candidates and a chain without the target (off by default: --inject-target puts the target in
place of a random candidate, so that every example ranks one first). Injected, the prompt never
shows which candidate is the target, so the model learns to guess a candidate number for the
first place and then to look up its title, which it gets wrong: on INSPIRED the 300-step
injected adapter parsed 92% of 100 valid answers, and 60 more steps without injection 99%
(in 05's simulated later turns not yet: README, Latest results). `--teacher MODEL` instead
distils chains from another LLM, keeping only those that parse and whose list holds the target
(the rest keep the metadata chain).
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common
from common import arg


@dataclass
class Args:
    dataset: str = arg("redial", "dataset whose run directory to use", choices=["redial", "inspired"])
    run_dir: str = arg("", "run directory (default: runs/<dataset>)")
    encoder: str = arg(common.DEFAULT_ENCODER, "frozen sentence encoder: Hugging Face id or folder")
    variants: list = arg(["fused", "semantic", "collaborative"], "retrievers to train: fused and/or single-view ablations")
    candidates: int = arg(20, "candidate-set size K handed to the recommender (Recall@K is reported)")
    dim: int = arg(128, "width of each view's vectors")
    heads: int = arg(4, "attention heads of the cross-attention fusion")
    dropout: float = arg(0.5, "dropout on tokens, attention and feed-forward (chosen on valid Recall@K)")
    epochs: int = arg(40, "maximum training epochs")
    patience: int = arg(6, "stop after this many epochs without a better validation Recall@K")
    retriever_batch_size: int = arg(256, "retriever training examples (sample, target) per step")
    retriever_lr: float = arg(1e-3, "retriever AdamW learning rate")
    retriever_weight_decay: float = arg(0.1, "retriever AdamW weight decay")
    train_on: str = arg("new", "targets that make training examples", choices=["new", "all"])
    exclude_seen: bool = arg(True, "never recall items already mentioned in the dialogue")
    retriever_folds: int = arg(5, "cross-fitting: N more fused retrievers, each without 1/N of the training dialogues, "
                                  "recall the candidates of training samples (SFT, 04's episodes); 0 = the full "
                                  "retriever's, which trained on them")
    max_samples: int = arg(0, "use only the first N samples of each split (smoke tests); 0 = all")
    encode_batch_size: int = arg(64, "sentence-encoder batch size")
    seed: int = arg(0, "random seed")
    parts: list = arg(["retriever", "recommender"], "what to train: retriever (part 1) and/or recommender (part 2)",
                      choices=["retriever", "recommender"])
    # part 2: the reasoning recommender's LoRA SFT
    model: str = arg(common.DEFAULT_LLM, "base LLM: Hugging Face id, folder or .gguf ('tiny': random test model)")
    load_in_4bit: bool = arg(False, "load the base in nf4 4-bit and train LoRA on top (QLoRA)")
    lora_r: int = arg(16, "LoRA rank (keep the simulator's: 04 and 05 swap both adapters on one base)")
    lora_alpha: float = arg(32.0, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = arg(0.05, "dropout on the LoRA input")
    init_adapter: str = arg("", "start the LoRA from this adapter folder (e.g. an earlier recommender_sft/ whose "
                                "budget was too small) instead of zeros; '' = a fresh adapter")
    inject_target: bool = arg(False, "training only: put a missed target in place of a random candidate "
                                     "(the model then guesses a hidden target: fewer valid answers)")
    cite_candidates: bool = arg(False, "SFT answer lines give each title's candidate number: '1. #4 Knives Out (2019)'")
    teacher: str = arg("", "distil reasoning chains from this LLM (kept when they parse and hit); '' = metadata chains")
    teacher_samples: int = arg(200, "training samples the teacher is asked about (generation is slow)")
    steps: int = arg(150, "recommender SFT optimizer steps (0 with --init-adapter: only that adapter's quality report)")
    batch_size: int = arg(2, "recommender SFT examples per micro-batch")
    grad_accum: int = arg(2, "micro-batches per optimizer step")
    lr: float = arg(3e-4, "recommender SFT peak AdamW learning rate")
    weight_decay: float = arg(0.0, "recommender SFT AdamW weight decay")
    warmup: float = arg(0.1, "fraction of the steps with a linear warm-up; then linear decay to 0")
    max_len: int = arg(1280, "tokens per SFT example (the prompt is cut from the left beyond it)")
    max_turns: int = arg(4, "dialogue turns shown in the recommender prompt (the latest)")
    gradient_checkpointing: bool = arg(True, "recompute activations in the backward pass (prompts of ~1,000 tokens: "
                                             "without it a batch of 4 took 15 GiB on CPU)")
    eval_every: int = arg(0, "validation loss every N steps (0 = never)")
    save_every: int = arg(25, "checkpoint every N steps")
    stop_after: int = arg(0, "stop with a checkpoint once this SFT step is reached (rerun to resume); 0 = run all")
    max_eval_samples: int = arg(40, "valid samples for validation loss and quality.json")
    gen_batch_size: int = arg(8, "prompts per generation batch")
    max_new_tokens: int = arg(320, "generation budget of one recommender answer")
    no_repeat_ngram: int = arg(common.GREEDY_NO_REPEAT_NGRAM, "quality report: forbid the answer to repeat one of "
                                                              "its own n-grams (greedy loop guard; 0 = off)")
    constrain_answer: bool = arg(False, "quality report: decode an opened <answer> block constrained to 10 distinct "
                                        "candidate titles (common.AnswerListConstraint); off = the model's own format")
    threads: int = arg(0, "torch CPU threads (0 = torch's default; 1 when jobs share the cores, else all of them)")
    device: str = arg(str(common.default_device()), "torch device")


def encode_features(args: Args, run: common.RunPaths, items: list[dict], samples: dict[str, list[dict]]) -> dict:
    """Frozen-encoder vectors of every item [N, E] and every sample's dialogue context [S, E],
    cached in retriever/features.pt and reused while the texts and the encoder are unchanged."""
    texts = common.encoder_texts(items, samples)
    fingerprint = common.texts_fingerprint(args.encoder, texts)
    cache = run.retriever / "features.pt"
    if cache.exists():
        blob = torch.load(cache, weights_only=False)
        if blob.get("fingerprint") == fingerprint:
            print(f"[03] reusing encoder features from {cache}")
            return blob["features"]
    tokenizer, encoder = common.load_sentence_encoder(args.encoder, args.device)
    features = {name: common.encode_texts(t, tokenizer, encoder, args.encode_batch_size, desc=f"encoding {name}")
                for name, t in texts.items()}
    blob = {"fingerprint": fingerprint, "encoder": args.encoder, "features": features}
    common.atomic_write(cache, lambda tmp: torch.save(blob, tmp))
    return features


def training_pairs(samples: list[dict], train_on: str) -> tuple[list[int], list[int]]:
    """One (sample index, target item) pair per training label."""
    key = "new_targets" if train_on == "new" else "targets"
    rows, targets = [], []
    for row, s in enumerate(samples):
        for t in s[key]:
            rows.append(row)
            targets.append(t)
    return rows, targets


def train_retriever(args: Args, variant: str, features: dict, samples: dict[str, list[dict]],
                    collab_init: torch.Tensor, log, held_out: set[str] = frozenset(),
                    name: str = "") -> tuple[common.DualViewRetriever, dict]:
    """Train one retriever variant, without the training samples of the dialogues in held_out (a
    cross-fitting fold); returns the best-by-validation model and its report (name: its log label)."""
    common.set_seed(args.seed)
    views = common.RETRIEVER_VIEWS if variant == "fused" else (variant,)
    net = common.DualViewRetriever(features["items"], collab_init, views, args.dim, args.heads, args.dropout).to(args.device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.retriever_lr, weight_decay=args.retriever_weight_decay)
    rows, targets = training_pairs(samples["train"], args.train_on)
    keep = [n for n, r in enumerate(rows) if samples["train"][r]["dialog_id"] not in held_out]
    rows, targets = [rows[n] for n in keep], [targets[n] for n in keep]
    if not rows:
        raise SystemExit(f"error: no training labels ({args.train_on} targets) in samples_train.jsonl"
                         + (f" outside fold {name}: use fewer --retriever-folds" if held_out else ""))
    ctx_sem = features["train"].to(args.device)
    ctx_items = common.pad_item_lists([s["context_items"] for s in samples["train"]]).to(args.device)
    rows_t, targets_t = torch.tensor(rows), torch.tensor(targets, device=args.device)
    k = args.candidates
    best_recall, best_state, best_epoch, stale = -1.0, None, 0, 0
    bar = tqdm(range(1, args.epochs + 1), desc=f"retriever[{name or variant}]")
    for epoch in bar:
        net.train()
        perm = torch.randperm(len(rows_t))
        total = 0.0
        for start in range(0, len(perm), args.retriever_batch_size):
            pick = perm[start:start + args.retriever_batch_size]
            r = rows_t[pick].to(args.device)
            scores = net(ctx_sem[r], ctx_items[r], exclude_seen=args.exclude_seen)   # [b, N]
            loss = F.cross_entropy(scores, targets_t[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(pick)
        ranked = common.rank_items(net, features["valid"], [s["context_items"] for s in samples["valid"]], k,
                                   args.exclude_seen, device=args.device)
        recall = common.score_rankings(ranked, samples["valid"], ks=(k,))["new"][f"recall@{k}"]
        log({"variant": name or variant, "epoch": epoch, "loss": total / len(perm), f"valid_new_recall@{k}": recall})
        bar.set_postfix(loss=f"{total / len(perm):.3f}", **{f"R@{k}": f"{recall:.3f}"})
        if recall > best_recall:
            best_recall, best_epoch, stale = recall, epoch, 0
            best_state = {n: t.detach().clone() for n, t in net.state_dict().items()}
        else:
            stale += 1
            if stale >= args.patience:
                break
    net.load_state_dict(best_state)
    report = {"views": list(views), "best_epoch": best_epoch, "training_labels": len(rows)}
    for split in ("valid", "test"):
        ranked = common.rank_items(net, features[split], [s["context_items"] for s in samples[split]],
                                   max(common.METRIC_KS), args.exclude_seen, device=args.device)
        report[split] = common.score_rankings(ranked, samples[split])
    return net.cpu(), report


def dialogue_items(dialogue: dict) -> list[int]:
    """Every item mentioned in a dialogue (the co-occurrence the collaborative view starts from)."""
    return [i for t in dialogue["turns"] for i in t["items"]]


def train_fold_retrievers(args: Args, run: common.RunPaths, features: dict, samples: dict[str, list[dict]],
                          train_dialogues: list[dict], log) -> dict:
    """Cross-fitting: --retriever-folds fused retrievers, the one of fold f trained (its
    co-occurrence start included) without the training dialogues of fold f, into
    retriever/fused/folds/fold<f>/; folds.json, written last, maps each training dialogue to its fold."""
    folder = run.retriever / "fused" / "folds"
    fold_of = common.dialogue_folds([d["dialog_id"] for d in train_dialogues], args.retriever_folds, args.seed)
    reports = []
    for fold in range(args.retriever_folds):
        held_out = {d for d, f in fold_of.items() if f == fold}
        item_sets = [dialogue_items(d) for d in train_dialogues if d["dialog_id"] not in held_out]
        collab_init = common.cooccurrence_embeddings(item_sets, len(features["items"]), args.dim, seed=args.seed)
        net, report = train_retriever(args, "fused", features, samples, collab_init, log, held_out, f"fused/fold{fold}")
        net.save(folder / f"fold{fold}", extra={"encoder": args.encoder, "variant": "fused", "fold": fold,
                                                "candidates": args.candidates, "exclude_seen": args.exclude_seen})
        reports.append({"held_out_dialogues": len(held_out), "training_labels": report["training_labels"],
                        "best_epoch": report["best_epoch"],
                        f"valid_new_recall@{args.candidates}": report["valid"]["new"][f"recall@{args.candidates}"]})
    common.write_json(folder / "folds.json", {"folds": args.retriever_folds, "seed": args.seed, "dialogues": fold_of})
    return {"folds": args.retriever_folds, "per_fold": reports}


def target_positions(ranked: list[list[int]], samples: list[dict]) -> dict:
    """Where a true target sits in each sample's K candidates (samples with a target):
    {"samples", "first": fraction ranked 1st, "top10": in the top 10, "candidates": among all K}."""
    ranks = [min((c.index(t) + 1 for t in common.sample_truth(s) if t in c), default=None)
             for c, s in zip(ranked, samples) if common.sample_truth(s)]
    n = max(len(ranks), 1)
    return {"samples": len(ranks), "first": sum(r == 1 for r in ranks if r) / n,
            "top10": sum(r <= common.REC_TOP_N for r in ranks if r) / n, "candidates": sum(r is not None for r in ranks) / n}


def recall_candidates(net: common.DualViewRetriever, folds: tuple[dict, list], ctx_sem: torch.Tensor,
                      rows: list[dict], args: Args) -> list[list[int]]:
    """The K candidates [len(rows)][K] of samples (ctx_sem: their encoded dialogues): a training
    dialogue's from its fold's retriever, folds = common.load_fold_retrievers(...) (({}, []): none);
    any other dialogue's from the full retriever `net`."""
    fold_of, fold_nets = folds
    return common.rank_items_cross_fitted(net, fold_nets, [fold_of.get(s["dialog_id"]) for s in rows],
                                          ctx_sem[:len(rows)], [s["context_items"] for s in rows], args.candidates,
                                          args.exclude_seen, device=args.device)


def training_candidates(candidates: list[list[int]], samples: list[dict], inject: bool, seed: int) -> tuple[list[list[int]], int]:
    """Candidate lists for SFT; with `inject`, a sample whose target the retriever missed gets it
    in place of a random candidate (a random slot, so the position says nothing). -> (lists, injected)"""
    rng = random.Random(seed)
    out, injected = [], 0
    for cands, s in zip(candidates, samples):
        cands = list(cands)
        truth = common.sample_truth(s)
        if inject and truth and not set(truth) & set(cands):
            cands[rng.randrange(len(cands))] = truth[0]
            injected += 1
        out.append(cands)
    return out, injected


def teacher_chains(args: Args, samples: list[dict], candidates: list[list[int]], items: list[dict],
                   titles: common.TitleIndex) -> tuple[dict[int, str], dict]:
    """Ask --teacher for the first --teacher-samples training samples; keep (by sample index) the
    outputs that parse into a valid list holding a true target."""
    teacher, teacher_tok = common.load_llm(args.teacher, args.load_in_4bit, args.device)
    asked = list(range(min(args.teacher_samples, len(samples))))
    prompts = [common.recommender_messages(samples[i]["context"], items, candidates[i], max_turns=args.max_turns)
               for i in asked]
    outputs = common.generate(teacher, teacher_tok, prompts, max_new_tokens=args.max_new_tokens,
                              batch_size=args.gen_batch_size, progress="teacher chains")
    kept = {}
    for i, text in zip(asked, outputs):
        parsed = common.parse_recommendation(text, titles, candidates[i])
        if parsed["valid"] and set(parsed["ids"]) & set(common.sample_truth(samples[i])):
            kept[i] = text.strip()
    del teacher
    return kept, {"teacher": args.teacher, "asked": len(asked), "kept": len(kept)}


def answer_lengths(examples: list[dict]) -> dict:
    """Tokens of each SFT answer the model learns to write (labels not IGNORE_INDEX: the chain, the
    list and the end-of-turn marker). Generation needs a --max-new-tokens of at least these, or a
    model that writes its answers as trained is cut before `</answer>`. -> {median, p95, max}"""
    lengths = sorted(sum(label != common.IGNORE_INDEX for label in e["labels"]) for e in examples)
    if not lengths:
        return {"median": 0, "p95": 0, "max": 0}
    return {"median": lengths[len(lengths) // 2], "p95": lengths[int(0.95 * (len(lengths) - 1))], "max": lengths[-1]}


MAX_INVALID_EXAMPLES = 30  # invalid answers kept whole in quality.json (the untuned base fails them all)


def recommender_quality(model, tok, samples: list[dict], candidates: list[list[int]], items: list[dict],
                        titles: common.TitleIndex, args: Args, name: str) -> dict:
    """Greedy answers on held-out samples (the retriever's candidates, nothing injected): how many
    parse into 10 distinct candidate titles, and the hit rates of the re-ranked lists."""
    answers = common.recommend_with_llm(model, tok, items, titles, [s["context"] for s in samples], candidates,
                                        args.max_new_tokens, batch_size=args.gen_batch_size, max_turns=args.max_turns,
                                        no_repeat_ngram=args.no_repeat_ngram, constrain_answer=args.constrain_answer,
                                        progress=f"quality ({name})")
    n = max(len(answers), 1)
    valid = sum(a["parsed"]["valid"] for a in answers)
    invalid = [{"sample": i, "kinds": common.parse_failure_kinds(a["parsed"]), "candidates": list(c), "text": a["text"]}
               for i, (a, c) in enumerate(zip(answers, candidates)) if not a["parsed"]["valid"]]
    return {
        "samples": len(answers),
        "parse_rate": valid / n,
        "parse_rate_ci": common.wilson_interval(valid, len(answers)),
        "parse_failures": {kind: sum(kind in common.parse_failure_kinds(a["parsed"]) for a in answers)
                           for kind in common.PARSE_KINDS[1:]},  # why the others fail (several kinds may apply)
        "answer_tag_rate": sum(a["parsed"]["has_answer"] for a in answers) / n,
        "mean_candidate_titles": sum(len({i for i in a["parsed"]["ids"] if i is not None}) for a in answers) / n,
        "mean_completion_tokens": sum(len(a["completion_ids"]) for a in answers) / n,
        "reranked": common.score_rankings([a["ranked"] for a in answers], samples, ks=(1, 5, 10))["new"],
        "examples": [a["text"] for a in answers[:3]],
        # each failure whole, with the candidates it was read against: where a duplicate starts
        # (the Ranking line or the copy of its titles) can then be read without generating again
        "invalid_examples": invalid[:MAX_INVALID_EXAMPLES],
    }


def train_recommender(args: Args, run: common.RunPaths, items: list[dict], samples: dict[str, list[dict]],
                      net: common.DualViewRetriever, features: dict) -> dict:
    """Part 2: LoRA SFT of the reasoning recommender on the retriever's candidates."""
    out_dir = run.recommender_sft
    k = args.candidates
    titles = common.run_title_index(run, items)
    vocab = common.AttributeVocab(items)
    train, held_out = samples["train"], samples["valid"][:args.max_eval_samples]

    # 6. Candidates: the fused retriever's top-K for every training and held-out sample; a training
    #    sample's from the cross-fitted copy that never saw its dialogue, as a test sample's would be.
    folds = common.load_fold_retrievers(run.retriever / "fused", args.device)
    candidates = {split: recall_candidates(net, folds, features[split], rows, args)
                  for split, rows in (("train", train), ("valid", held_out))}
    source = f"out of fold ({len(folds[1])} cross-fitted retrievers)" if folds[1] else "the full retriever (in sample)"
    if not folds[1]:
        print(f"[03] warning: {run.retriever / 'fused' / 'folds'} is missing (--retriever-folds 0, or a retriever from "
              "before 2026-11-26): training samples get candidates from the retriever that trained on them, which "
              "ranks their targets far higher than a test sample's. Rerun `--parts retriever` to cross-fit it.")
    train_cands, injected = training_candidates(candidates["train"], train, args.inject_target, args.seed)

    # 7. SFT targets: metadata reasoning chains (true target first), or teacher chains that hit.
    chains = {}
    teacher_report = None
    if args.teacher:
        chains, teacher_report = teacher_chains(args, train, train_cands, items, titles)
        print(f"[03] teacher {args.teacher}: kept {teacher_report['kept']} of {teacher_report['asked']} chains")
    model, tok = common.load_llm(args.model, args.load_in_4bit, args.device)

    def example(s: dict, cands: list[int], chain: str | None) -> dict:
        if chain is None:
            chain, _ = common.reasoning_chain(items, vocab, s["context"], cands, common.sample_truth(s), s["liked"],
                                              s["context_items"], cite_candidates=args.cite_candidates)
        messages = common.recommender_messages(s["context"], items, cands, answer=chain, max_turns=args.max_turns)
        return common.build_chat_example(tok, messages, args.max_len)

    pools = {"recommend": [example(s, c, chains.get(i)) for i, (s, c) in enumerate(zip(train, train_cands))
                           if common.sample_truth(s)]}
    eval_examples = [example(s, c, None) for s, c in zip(held_out, candidates["valid"]) if common.sample_truth(s)]
    truncated = sum(e["truncated"] for e in pools["recommend"])
    print(f"[03] recommender SFT: {len(pools['recommend'])} examples ({injected} with an injected target, "
          f"{len(chains)} teacher chains, {truncated} truncated to {args.max_len} tokens)")
    lengths = answer_lengths(pools["recommend"])
    print(f"[03] SFT answers: median {lengths['median']}, 95th percentile {lengths['p95']}, max {lengths['max']} tokens")
    if lengths["p95"] > args.max_new_tokens:
        print(f"[03] warning: --max-new-tokens {args.max_new_tokens} cuts more than 5% of the SFT answers before "
              f"</answer>; the quality report's parse rate then measures the budget, not the model")

    # 8. LoRA SFT, resumable from recommender_sft/checkpoint/.
    common.add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    if args.init_adapter:
        # continuing an SFT with a new step budget: a checkpoint cannot (its schedule is tied to --steps)
        common.load_lora(model, args.init_adapter)
        print(f"[03] LoRA initialised from {args.init_adapter}")
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    same_run = {k_: getattr(args, k_) for k_ in ("model", "lora_r", "lora_alpha", "batch_size", "grad_accum", "max_len",
                                                 "max_turns", "max_samples", "seed", "steps", "lr", "teacher",
                                                 "inject_target", "candidates")}
    if args.init_adapter:
        same_run["init_adapter"] = args.init_adapter

    def validation_loss() -> dict:
        return {"eval_loss": round(common.mean_token_loss(model, eval_examples, tok.pad_token_id, args.batch_size,
                                                          args.device), 5)}

    if not common.train_lora_sft(model, tok.pad_token_id, pools, {"recommend": 1.0}, args, out_dir, same_run,
                                 eval_fn=validation_loss, desc="recommender SFT"):
        print(f"[03] stopped at step {args.stop_after} of {args.steps}; rerun without --stop-after to resume")
        return {"stopped_at": args.stop_after}

    # 9. The adapter, and its answers on held-out samples next to the untuned base model's.
    common.save_lora(model, out_dir, {"base_model_name_or_path": args.model})
    print(f"[03] quality on {len(held_out)} valid samples (tuned, then base)")
    retriever_order = [c[:common.REC_TOP_N] for c in candidates["valid"]]
    quality = {"split": "valid", "candidates": k, "decoding": {"greedy": True, "max_new_tokens": args.max_new_tokens,
                                                                "no_repeat_ngram": args.no_repeat_ngram,
                                                                "constrain_answer": args.constrain_answer},
               "retriever_order": common.score_rankings(retriever_order, held_out, ks=(1, 5, 10))["new"],
               "tuned": recommender_quality(model, tok, held_out, candidates["valid"], items, titles, args, "tuned")}
    with common.lora_disabled(model):
        quality["base"] = recommender_quality(model, tok, held_out, candidates["valid"], items, titles, args, "base")
    # the same weights' validation loss when the last training step logged it (minutes on a CPU), else now
    log = common.read_jsonl(out_dir / "train_log.jsonl") if (out_dir / "train_log.jsonl").exists() else []
    last = log[-1] if log else {}
    quality["eval_loss"] = last["eval_loss"] if last.get("step") == args.steps and "eval_loss" in last \
        else validation_loss()["eval_loss"]
    common.write_json(out_dir / "quality.json", quality)
    config = {"args": asdict(args), "prompt_version": common.REC_PROMPT_VERSION, "train_candidates": source,
              "examples": len(pools["recommend"]), "injected_targets": injected,
              "truncated": truncated, "answer_tokens": lengths, "teacher": teacher_report}
    common.write_json(out_dir / "recommender_config.json", config)
    for name in ("tuned", "base"):
        q = quality[name]
        low, high = q["parse_rate_ci"]
        print(f"[03] {name:5s}: parse rate {q['parse_rate']:.3f} [{low:.2f}, {high:.2f}]  R@1 {q['reranked']['recall@1']:.3f}  "
              f"R@10 {q['reranked']['recall@10']:.3f}  (retriever order: R@1 {quality['retriever_order']['recall@1']:.3f})")
    return {"quality": quality, "config": config}


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    if "recommender" in args.parts and args.steps == 0 and not args.init_adapter:
        # 0 steps from zeros would write the untuned base as recommender_sft/, over a trained adapter
        raise SystemExit("error: --steps 0 only reports on an earlier adapter: give it with --init-adapter DIR")
    if "recommender" in args.parts and args.steps == 0:
        # a report on prompts the adapter never saw, and a copy that would claim this code's version
        common.require_prompt_version(args.init_adapter)
    if args.retriever_folds == 1 or args.retriever_folds < 0:
        # one fold would leave its retriever no training dialogue at all
        raise SystemExit(f"error: --retriever-folds {args.retriever_folds}: give 0 (no cross-fitting) or at least 2")
    args.run_dir = common.default_run_dir(args.dataset, args.run_dir)
    run = common.RunPaths(args.run_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.set_seed(args.seed)
    started = time.time()

    # 1. Prepared data: the catalogue and the recommendation samples of each split.
    items = common.load_items(run)
    samples = {split: common.load_samples(run, split) for split in common.SPLITS}
    train_dialogues = common.load_dialogues(run, "train")
    if args.max_samples:
        samples = {split: rows[:args.max_samples] for split, rows in samples.items()}
    print(f"[03] {len(items)} items; samples " + ", ".join(f"{s}={len(r)}" for s, r in samples.items()))

    # 2. Semantic view: frozen encoder vectors of item texts and dialogue texts.
    features = encode_features(args, run, items, samples)
    report = {"args": asdict(args), "candidates": args.candidates, "num_items": len(items), "variants": {}}
    if "retriever" in args.parts:
        # 3. Collaborative view: item embeddings initialised from co-occurrence in training dialogues.
        item_sets = [dialogue_items(d) for d in train_dialogues]
        collab_init = common.cooccurrence_embeddings(item_sets, len(items), args.dim, seed=args.seed)

        # 4. Train the fused retriever and the single-view ablations, keep the best epoch of each;
        #    then the fused retriever's cross-fitted copies (any earlier ones belong to an older net).
        if "fused" in args.variants:
            shutil.rmtree(run.retriever / "fused" / "folds", ignore_errors=True)
        log_path = run.retriever / "train_log.jsonl"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w")

        def log(row: dict) -> None:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

        for variant in args.variants:
            net, variant_report = train_retriever(args, variant, features, samples, collab_init, log)
            net.save(run.retriever / variant, extra={"encoder": args.encoder, "variant": variant,
                                                     "candidates": args.candidates, "exclude_seen": args.exclude_seen})
            report["variants"][variant] = variant_report
            k = args.candidates
            print(f"[03] retriever[{variant}] test Recall@{k} new={variant_report['test']['new'][f'recall@{k}']:.3f} "
                  f"all={variant_report['test']['all'][f'recall@{k}']:.3f} (best epoch {variant_report['best_epoch']})")
        if args.retriever_folds and "fused" in args.variants:
            report["cross_fitting"] = train_fold_retrievers(args, run, features, samples, train_dialogues, log)
        log_file.close()
        if "fused" in args.variants:
            # 5. Where the target sits among the K candidates: training samples ranked by the retriever
            #    that trained on them, then out of fold, against valid samples.
            fused = common.DualViewRetriever.load(run.retriever / "fused").to(args.device)
            folds = common.load_fold_retrievers(run.retriever / "fused", args.device)
            positions = {"train, full retriever": target_positions(
                recall_candidates(fused, ({}, []), features["train"], samples["train"], args), samples["train"])}
            if folds[1]:
                positions["train, out of fold"] = target_positions(
                    recall_candidates(fused, folds, features["train"], samples["train"], args), samples["train"])
            positions["valid"] = target_positions(
                recall_candidates(fused, folds, features["valid"], samples["valid"], args), samples["valid"])
            report["candidate_targets"] = positions
            for where, p in positions.items():
                print(f"[03] target among the {args.candidates} candidates, {where}: first {p['first']:.2f}, "
                      f"top 10 {p['top10']:.2f}, anywhere {p['candidates']:.2f} ({p['samples']} samples)")
        report["seconds"] = round(time.time() - started, 1)
        common.write_json(run.retriever / "report.json", report)
        print(f"[03] wrote {run.retriever}/ in {report['seconds']} s")

    if "recommender" in args.parts:
        # 6-9. The reasoning recommender, fine-tuned on the fused retriever's candidates.
        net = common.DualViewRetriever.load(run.require("retriever", "fused/retriever.pt") / "fused").to(args.device)
        report["recommender"] = train_recommender(args, run, items, samples, net, features)
        print(f"[03] wrote {run.recommender_sft}/ in {round(time.time() - started, 1)} s")
    return report


if __name__ == "__main__":
    main()
