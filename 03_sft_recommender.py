"""Stage 3: train the dual-view retriever, then the reasoning recommender (LoRA SFT) on its candidates.

Reads   <run-dir>/data/            (01_prep_data.py): items, dialogues, recommendation samples
Writes  <run-dir>/retriever/
          features.pt              frozen sentence-encoder vectors of items and dialogue contexts
          fused/retriever.pt       the dual-view retriever: the learned semantic view plus the count mix
                                   (co-occurrence and encoder cosine of its training dialogues, kept inside)
          fused/folds/             --retriever-folds N cross-fitted copies: fold<f>/retriever.pt trained
                                   without the training dialogues of fold f; folds.json {dialog_id: fold}
          semantic/, collaborative/  single-view ablations trained the same way
          report.json              Recall@K (K = candidate-set size) and more on valid and test; where
                                   the target sits in the K candidates of training samples (full retriever,
                                   out of fold) and of valid samples; "baselines": the same metrics of
                                   popularity, cooccurrence, encoder-cosine and cooccurrence+cosine
                                   (baseline_report; --parts baselines recomputes only these)
          train_log.jsonl          loss and validation recall per epoch and variant
        <run-dir>/recommender_sft/
          adapter_config.json, adapter_model.safetensors   the recommender's LoRA adapter (PEFT layout)
          recommender_config.json  arguments, prompt version, example counts, SFT answer lengths
          train_log.jsonl          step, loss, lr, seconds
          quality.json             on valid: format-parse rate (95% Wilson interval), why the other answers fail
                                   (parse_failure_kinds; the first 30 invalid answers whole, with their
                                   kinds and candidates), hit rates, tuned vs the
                                   untuned base (`--init-adapter DIR --steps 0` only writes DIR's report)
          checkpoint/checkpoint.pt every --save-every steps; the same command again resumes from it

Part 1, the retriever (docs/design.md section 5), keeps the recommender inside the item space:
its Recall@K at the candidate-set size bounds every later stage, since the LLM only re-ranks what
it recalls. Training is softmax cross-entropy over the whole catalogue, one term per new target
item of a training sample, with the items already mentioned in the dialogue masked out (they are
not new recommendations). The best epoch by validation Recall@10 is kept. The fused retriever adds
to its view score the cooccurrence+cosine mix below, counted on its own training dialogues, with
the view's weight chosen on valid Recall@10 beside the epoch (0, the mix alone, among them). A retriever ranks the
dialogues it trained on far better than new ones, so it also trains --retriever-folds copies,
each without one fold of the training dialogues: the SFT examples here and 04's training episodes
get a training dialogue's candidates from the copy that never saw it, as a test dialogue gets them.
Beside the trained variants the report holds what needs no training (common.CountBaselines):
popularity, item co-occurrence (sum over the mentioned items of their co-mention counts in
training dialogues; popularity breaks ties), the frozen encoder's cosine between the dialogue and
the item texts, and a z-scored mix of the last two whose weight is chosen on valid Recall@10.

Part 2, the recommender (docs/design.md section 5): the prompt is the dialogue's last 4 turns, the
seeker's latest feedback and the retriever's K numbered candidates with short attributes
(common.recommender_messages, the prompt 04 and 05 play); the target is a five-line reasoning
chain (Preference, Matching, Scores, Ranking, Explanation) and then `<answer>` with 10 numbered
candidate titles, built from metadata by reasoning_chain with the true target ranked first
(--cite-candidates: each title after its candidate number, "1. #4 Knives Out (2019)", which makes
writing it a copy of the prompt's candidate line). A training sample whose target the retriever
missed keeps its candidates and a chain without the target: putting the target in place of a
candidate taught the model to guess a target number the prompt gives no clue to (README design
row "SFT samples whose target the retriever missed").
"""
from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import common
from common import arg


@dataclass
class Args:
    dataset: str = arg("redial", "dataset whose run directory to use", choices=["redial", "inspired"])
    run_dir: str = arg("", "run directory (default: runs/<dataset>)")
    parts: list = arg(["retriever", "recommender"], "what to train: retriever (part 1) and/or recommender (part 2); "
                                                    "baselines: only recompute report.json's baseline rows (part 1 "
                                                    "computes them too) from the cached encoder features",
                      choices=["retriever", "baselines", "recommender"])
    # part 1: the dual-view retriever
    encoder: str = arg(common.DEFAULT_ENCODER, "frozen sentence encoder: Hugging Face id or folder")
    variants: list = arg(["fused", "semantic", "collaborative"],
                         "retrievers to train: fused and the single-view ablations (05's per-view rows read all three)")
    candidates: int = arg(20, "candidate-set size K handed to the recommender (Recall@K is reported)")
    dim: int = arg(128, "width of each view's vectors")
    epochs: int = arg(40, "maximum retriever training epochs (training stops earlier without a better valid Recall@K)")
    exclude_seen: bool = arg(True, "never recall items already mentioned in the dialogue")
    retriever_folds: int = arg(5, "cross-fitting: N more fused retrievers, each without 1/N of the training dialogues, "
                                  "recall the candidates of training samples (SFT, 04's episodes); 0 = the full "
                                  "retriever's, which trained on them")
    # part 2: the reasoning recommender's LoRA SFT
    model: str = arg(common.DEFAULT_LLM, "base LLM: Hugging Face id, folder or .gguf ('tiny': random test model)")
    load_in_4bit: bool = arg(False, "load the base in nf4 4-bit and train LoRA on top (QLoRA)")
    lora_r: int = arg(16, "LoRA rank (keep the simulator's: 04 and 05 swap both adapters on one base)")
    lora_alpha: float = arg(32.0, "LoRA alpha (scale alpha / r)")
    init_adapter: str = arg("", "start the LoRA from this adapter folder (e.g. an earlier recommender_sft/ whose "
                                "budget was too small) instead of zeros; '' = a fresh adapter")
    cite_candidates: bool = arg(False, "SFT answer lines give each title's candidate number: '1. #4 Knives Out (2019)'")
    steps: int = arg(150, "recommender SFT optimizer steps (0 with --init-adapter: only that adapter's quality report)")
    batch_size: int = arg(2, "recommender SFT examples per micro-batch")
    grad_accum: int = arg(2, "micro-batches per optimizer step")
    lr: float = arg(3e-4, "recommender SFT peak AdamW learning rate")
    max_len: int = arg(1280, "tokens per SFT example (the prompt is cut from the left beyond it)")
    gradient_checkpointing: bool = arg(True, "recompute activations in the backward pass (prompts of ~1,000 tokens: "
                                             "without it a batch of 4 took 15 GiB on CPU)")
    save_every: int = arg(25, "checkpoint every N steps")
    max_eval_samples: int = arg(40, "valid samples for validation loss and quality.json")
    gen_batch_size: int = arg(8, "prompts per generation batch")
    max_new_tokens: int = arg(320, "generation budget of one recommender answer")
    max_samples: int = arg(0, "use only the first N samples of each split (smoke tests); 0 = all")
    seed: int = arg(0, "random seed")
    threads: int = arg(0, "torch CPU threads (0 = torch's default; 1 when jobs share the cores, else all of them)")
    device: str = arg(str(common.default_device()), "torch device")


# The retriever's recipe, chosen on ReDial valid Recall@20 among 5 settings (README design row
# "retriever training"): the collaborative table overfits fast, hence the strong dropout and decay.
RETRIEVER_HEADS = 4           # attention heads of the cross-attention fusion
RETRIEVER_DROPOUT = 0.5       # on tokens, attention and feed-forward
RETRIEVER_LR = 1e-3           # AdamW
RETRIEVER_WEIGHT_DECAY = 0.1  # AdamW
RETRIEVER_BATCH_SIZE = 256    # (sample, target) training pairs per step
# The fused net's learned views, beside its counts: on valid R@10 (new targets) the semantic view plus
# the count mix reached ReDial 0.199 and INSPIRED 0.189, both views plus the mix 0.154 and 0.170 (the
# mix alone: 0.141, 0.170): co-occurrence counts already carry what the collaborative view learns.
FUSED_VIEWS = ("semantic",)
RETRIEVER_SELECT_K = 10      # the best epoch has the best valid Recall@10 on new targets (the headline metric)
RETRIEVER_PATIENCE = 10       # epochs without a better valid Recall@10 before training stops (INSPIRED's
                              # semantic view passed the count mix only after 8 epochs)
MAX_INVALID_EXAMPLES = 30     # invalid answers kept whole in quality.json (the untuned base fails them all)


# ---- part 1: the dual-view retriever ------------------------------------------------------------


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
    features = {name: common.encode_texts(t, tokenizer, encoder, desc=f"encoding {name}") for name, t in texts.items()}
    blob = {"fingerprint": fingerprint, "encoder": args.encoder, "features": features}
    common.atomic_write(cache, lambda tmp: torch.save(blob, tmp))
    return features


def dialogue_items(dialogue: dict) -> list[int]:
    """Every item mentioned in a dialogue (the co-occurrence the collaborative view starts from)."""
    return [i for t in dialogue["turns"] for i in t["items"]]


def cooccurrence_embeddings(item_sets: Sequence[Sequence[int]], num_items: int, dim: int,
                            seed: int = 0) -> torch.Tensor:
    """Collaborative item embeddings from co-occurrence: truncated SVD of the positive PMI matrix
    of items mentioned in the same training dialogue. Returns [num_items, dim] float32.

    Items never seen in training get small random vectors (fine-tuning can still move them)."""
    counts = torch.zeros(num_items, num_items)
    for items in item_sets:
        ids = torch.tensor(sorted(set(items)), dtype=torch.long)
        counts[ids.unsqueeze(1), ids.unsqueeze(0)] += 1.0
    # The diagonal keeps each item's own count (an item co-occurs with itself), which makes the
    # PPMI matrix close to positive semi-definite, so that its top components mean similarity.
    total = counts.sum().clamp(min=1)
    marginal = counts.sum(1, keepdim=True)
    pmi = torch.log((counts * total).clamp(min=1e-12) / (marginal * marginal.T).clamp(min=1e-12))
    ppmi = torch.where(counts > 0, pmi.clamp(min=0), torch.zeros(()))
    g = torch.Generator().manual_seed(seed)
    rank = min(dim, num_items - 1)
    u, s, v = torch.svd_lowrank(ppmi, q=rank, niter=4)
    # For a symmetric matrix, a component with v = -u has a negative eigenvalue: as a similarity
    # it would pull co-mentioned items apart, so it is dropped.
    positive = ((u * v).sum(0) > 0).float()
    emb = u * (s * positive).sqrt()
    emb = emb / emb.norm(dim=1).clamp(min=1e-6).mean()  # unit average norm: same scale as the semantic view
    unseen = marginal.squeeze(1) == 0
    emb[unseen] = 0.01 * torch.randn(int(unseen.sum()), rank, generator=g)
    if rank < dim:
        emb = torch.cat([emb, torch.zeros(num_items, dim - rank)], 1)
    return emb.float()


def training_pairs(samples: list[dict]) -> tuple[list[int], list[int]]:
    """One (sample index, new target item) pair per training label."""
    rows, targets = [], []
    for row, s in enumerate(samples):
        for t in s["new_targets"]:
            rows.append(row)
            targets.append(t)
    return rows, targets


def count_start(args: Args, features: dict, valid: list[dict], counted: list[dict]) -> tuple[tuple, float]:
    """The fused net's count inputs, counted on the training dialogues `counted` only (a fold's own):
    ((cooccurrence [N, N], popularity [N]), the mix weight of the cooccurrence+cosine baseline chosen
    on valid Recall@10 with these counts, which the net starts from)."""
    baselines = common.CountBaselines.fit(counted, len(features["items"]), features["items"])
    baselines.fit_mix_weight(features["valid"], valid, args.exclude_seen)
    return (baselines.cooccurrence, baselines.popularity), baselines.mix_weight


def train_retriever(args: Args, variant: str, features: dict, samples: dict[str, list[dict]],
                    collab_init: torch.Tensor, train_dialogues: list[dict], log, held_out: set[str] = frozenset(),
                    name: str = "") -> tuple[common.DualViewRetriever, dict]:
    """Train one retriever variant, without the training samples and dialogues of the dialogues in
    held_out (a cross-fitting fold); returns the best-by-validation model and its report (name: its
    log label). features: "items" [N, E] and one [S, E] per split; collab_init [N, dim]; the fused
    net counts the train_dialogues outside held_out (count_start)."""
    common.set_seed(args.seed)
    views = FUSED_VIEWS if variant == "fused" else (variant,)
    counted = [d for d in train_dialogues if d["dialog_id"] not in held_out]
    counts, mix_weight = count_start(args, features, samples["valid"], counted) if variant == "fused" else (None, 0.5)
    net = common.DualViewRetriever(features["items"], collab_init, views, args.dim, RETRIEVER_HEADS,
                                   RETRIEVER_DROPOUT, counts, mix_weight).to(args.device)
    opt = torch.optim.AdamW(net.parameters(), lr=RETRIEVER_LR, weight_decay=RETRIEVER_WEIGHT_DECAY)
    rows, targets = training_pairs(samples["train"])
    keep = [n for n, r in enumerate(rows) if samples["train"][r]["dialog_id"] not in held_out]
    rows, targets = [rows[n] for n in keep], [targets[n] for n in keep]
    if not rows:
        raise SystemExit("error: no training labels (new targets) in samples_train.jsonl"
                         + (f" outside fold {name}: use fewer --retriever-folds" if held_out else ""))
    ctx_sem = features["train"].to(args.device)
    ctx_items = common.pad_item_lists([s["context_items"] for s in samples["train"]]).to(args.device)
    rows_t, targets_t = torch.tensor(rows), torch.tensor(targets, device=args.device)
    k = RETRIEVER_SELECT_K

    def valid_recall() -> float:
        """Valid Recall@k; with counts, of the best view weight a (set on the net; ties: the smaller a)."""
        by_weight = {}
        for a in common.VIEW_WEIGHTS if counts else (None,):
            if a is not None:
                net.view_weight.fill_(a)
            ranked = common.rank_items(net, features["valid"], [s["context_items"] for s in samples["valid"]], k,
                                       args.exclude_seen, device=args.device)
            by_weight[a] = common.score_rankings(ranked, samples["valid"], ks=(k,))["new"][f"recall@{k}"]
        best = max(by_weight, key=lambda a: by_weight[a])  # max keeps the first of equals
        if best is not None:
            net.view_weight.fill_(best)
        return by_weight[best]

    # epoch 0 is a candidate too: the fused net's a = 0 there is the count mix, so it starts no worse
    best_recall, best_epoch, stale = valid_recall(), 0, 0
    best_state = {n: t.detach().clone() for n, t in net.state_dict().items()}
    bar = tqdm(range(1, args.epochs + 1), desc=f"retriever[{name or variant}]")
    for epoch in bar:
        net.train()
        perm = torch.randperm(len(rows_t))
        total = 0.0
        for start in range(0, len(perm), RETRIEVER_BATCH_SIZE):
            pick = perm[start:start + RETRIEVER_BATCH_SIZE]
            r = rows_t[pick].to(args.device)
            scores = net.view_scores(ctx_sem[r], ctx_items[r])                                   # [b, N]
            if args.exclude_seen:
                scores = common.mask_seen(scores, ctx_items[r])
            loss = F.cross_entropy(scores, targets_t[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(pick)
        recall = valid_recall()
        log({"variant": name or variant, "epoch": epoch, "loss": total / len(perm), f"valid_new_recall@{k}": recall})
        bar.set_postfix(loss=f"{total / len(perm):.3f}", **{f"R@{k}": f"{recall:.3f}"})
        if recall > best_recall:
            best_recall, best_epoch, stale = recall, epoch, 0
            best_state = {n: t.detach().clone() for n, t in net.state_dict().items()}
        else:
            stale += 1
            if stale >= RETRIEVER_PATIENCE:
                break
    net.load_state_dict(best_state)
    report = {"views": list(views), "best_epoch": best_epoch, "training_labels": len(rows)}
    if counts:
        report.update(mix_weight=mix_weight, view_weight=float(net.view_weight))
    for split in ("valid", "test"):
        ranked = common.rank_items(net, features[split], [s["context_items"] for s in samples[split]],
                                   max(common.METRIC_KS), args.exclude_seen, device=args.device)
        report[split] = common.score_rankings(ranked, samples[split])
    return net.cpu(), report


def dialogue_folds(dialog_ids: Sequence[str], folds: int, seed: int = 0) -> dict[str, int]:
    """Cross-fitting folds of the training dialogues: {dialog_id: fold in [0, folds)}, a seeded
    shuffle dealt round-robin, so fold sizes differ by at most one. Folds split dialogues, not
    samples: the samples of one dialogue share its text and its targets."""
    ids = sorted(set(dialog_ids))
    random.Random(seed).shuffle(ids)
    return {d: n % folds for n, d in enumerate(ids)}


def train_fold_retrievers(args: Args, run: common.RunPaths, features: dict, samples: dict[str, list[dict]],
                          train_dialogues: list[dict], log) -> dict:
    """Cross-fitting: --retriever-folds fused retrievers, the one of fold f trained (its
    co-occurrence start included) without the training dialogues of fold f, into
    retriever/fused/folds/fold<f>/; folds.json, written last, maps each training dialogue to its fold."""
    folder = run.retriever / "fused" / "folds"
    fold_of = dialogue_folds([d["dialog_id"] for d in train_dialogues], args.retriever_folds, args.seed)
    reports = []
    for fold in range(args.retriever_folds):
        held_out = {d for d, f in fold_of.items() if f == fold}
        item_sets = [dialogue_items(d) for d in train_dialogues if d["dialog_id"] not in held_out]
        collab_init = cooccurrence_embeddings(item_sets, len(features["items"]), args.dim, seed=args.seed)
        net, report = train_retriever(args, "fused", features, samples, collab_init, train_dialogues, log, held_out,
                                      f"fused/fold{fold}")
        net.save(folder / f"fold{fold}", extra={"encoder": args.encoder, "variant": "fused", "fold": fold,
                                                "candidates": args.candidates, "exclude_seen": args.exclude_seen})
        reports.append({"held_out_dialogues": len(held_out), "training_labels": report["training_labels"],
                        "best_epoch": report["best_epoch"],
                        f"valid_new_recall@{args.candidates}": report["valid"]["new"][f"recall@{args.candidates}"]})
    common.write_json(folder / "folds.json", {"folds": args.retriever_folds, "seed": args.seed, "dialogues": fold_of})
    return {"folds": args.retriever_folds, "per_fold": reports}


def train_retrievers(args: Args, run: common.RunPaths, features: dict, samples: dict[str, list[dict]],
                     train_dialogues: list[dict], report: dict) -> None:
    """Steps 3-4: each of --variants from its co-occurrence start, then the fused retriever's
    cross-fitted copies; saved under retriever/, their reports added to `report`."""
    item_sets = [dialogue_items(d) for d in train_dialogues]
    collab_init = cooccurrence_embeddings(item_sets, len(features["items"]), args.dim, seed=args.seed)
    if "fused" in args.variants:  # any earlier folds belong to an older fused net
        shutil.rmtree(run.retriever / "fused" / "folds", ignore_errors=True)
    log_path = run.retriever / "train_log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        def log(row: dict) -> None:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

        k = args.candidates
        for variant in args.variants:
            net, variant_report = train_retriever(args, variant, features, samples, collab_init, train_dialogues, log)
            net.save(run.retriever / variant, extra={"encoder": args.encoder, "variant": variant,
                                                     "candidates": k, "exclude_seen": args.exclude_seen})
            report["variants"][variant] = variant_report
            test = variant_report["test"]
            print(f"[03] retriever[{variant}] test Recall@{k} new={test['new'][f'recall@{k}']:.3f} "
                  f"all={test['all'][f'recall@{k}']:.3f} (best epoch {variant_report['best_epoch']})")
        if args.retriever_folds and "fused" in args.variants:
            report["cross_fitting"] = train_fold_retrievers(args, run, features, samples, train_dialogues, log)


def recall_candidates(net: common.DualViewRetriever, folds: tuple[dict, list], ctx_sem: torch.Tensor,
                      rows: list[dict], args: Args) -> list[list[int]]:
    """The K candidates [len(rows)][K] of samples (ctx_sem [>= len(rows), E]: their encoded dialogues):
    a training dialogue's from its fold's retriever, folds = common.load_fold_retrievers(...)
    (({}, []): none); any other dialogue's from the full retriever `net`."""
    fold_of, fold_nets = folds
    return common.rank_items_cross_fitted(net, fold_nets, [fold_of.get(s["dialog_id"]) for s in rows],
                                          ctx_sem[:len(rows)], [s["context_items"] for s in rows], args.candidates,
                                          args.exclude_seen, device=args.device)


def target_positions(ranked: list[list[int]], samples: list[dict]) -> dict:
    """Where a true target sits in each sample's K candidates (samples with a target):
    {"samples", "first": fraction ranked 1st, "top10": in the top 10, "candidates": among all K}."""
    ranks = [min((c.index(t) + 1 for t in common.sample_truth(s) if t in c), default=None)
             for c, s in zip(ranked, samples) if common.sample_truth(s)]
    n = max(len(ranks), 1)
    return {"samples": len(ranks), "first": sum(r == 1 for r in ranks if r) / n,
            "top10": sum(r <= common.REC_TOP_N for r in ranks if r) / n,
            "candidates": sum(r is not None for r in ranks) / n}


def candidate_targets(args: Args, run: common.RunPaths, features: dict, samples: dict[str, list[dict]]) -> dict:
    """Step 5: where the target sits among the K candidates: training samples ranked by the fused
    retriever that trained on them, then out of fold, against valid samples."""
    fused = common.DualViewRetriever.load(run.retriever / "fused").to(args.device)
    folds = common.load_fold_retrievers(run.retriever / "fused", args.device)
    positions = {"train, full retriever": target_positions(
        recall_candidates(fused, ({}, []), features["train"], samples["train"], args), samples["train"])}
    if folds[1]:
        positions["train, out of fold"] = target_positions(
            recall_candidates(fused, folds, features["train"], samples["train"], args), samples["train"])
    positions["valid"] = target_positions(
        recall_candidates(fused, folds, features["valid"], samples["valid"], args), samples["valid"])
    for where, p in positions.items():
        print(f"[03] target among the {args.candidates} candidates, {where}: first {p['first']:.2f}, "
              f"top 10 {p['top10']:.2f}, anywhere {p['candidates']:.2f} ({p['samples']} samples)")
    return positions


def baseline_report(args: Args, features: dict, samples: dict[str, list[dict]], train_dialogues: list[dict]) -> dict:
    """Step 5b: the rows a trained retriever must beat (common.CountBaselines: popularity, co-occurrence,
    frozen-encoder cosine and their z-scored mix), counted on the training dialogues, the mix weight
    chosen on valid Recall@10. features: "items" [N, E] and one [S, E] per split.
    -> {"mix_weight", "rows": {row: {split: score_rankings}}, "valid_new_recall@10_by_weight": {w: recall},
        "seconds"}"""
    started = time.time()
    baselines = common.CountBaselines.fit(train_dialogues, len(features["items"]), features["items"])
    by_weight = baselines.fit_mix_weight(features["valid"], samples["valid"], args.exclude_seen)
    report = {"mix_weight": baselines.mix_weight, "rows": {},
              f"valid_new_recall@{common.MIX_RECALL_K}_by_weight": {f"{w:.1f}": r for w, r in by_weight.items()}}
    for split in ("valid", "test"):
        ranked = baselines.rankings(common.BASELINE_ROWS, samples[split], max(common.METRIC_KS), features[split],
                                    args.exclude_seen)
        for row, lists in ranked.items():
            report["rows"].setdefault(row, {})[split] = common.score_rankings(lists, samples[split])
    report["seconds"] = round(time.time() - started, 1)
    return report


def recall_table(report: dict, split: str = "test") -> str:
    """report.json's baselines and retriever variants on one split: Recall@10, 20, 50 on new targets."""
    rows = {**report.get("baselines", {}).get("rows", {}),
            **{f"retriever-{v}": r for v, r in report.get("variants", {}).items()}}
    lines = [f"{split + ', new targets':<26}" + "".join(f"{f'R@{k}':>7}" for k in (10, 20, 50))]
    for name, r in rows.items():
        lines.append(f"  {name:<24}" + "".join(f"{r[split]['new'][f'recall@{k}']:>7.3f}" for k in (10, 20, 50)))
    return "\n".join(lines)


# ---- part 2: the reasoning chain the recommender learns -----------------------------------------

# words a seeker uses for a genre that do not contain its name
GENRE_SYNONYMS = {"comedy": ["comedies", "funny", "hilarious"], "horror": ["scary", "frightening"],
                  "romance": ["romantic", "rom com", "romcom", "love story"], "sci-fi": ["science fiction", "sci fi"],
                  "animation": ["animated", "cartoon"], "documentary": ["documentaries"],
                  "family": ["kids", "children"], "thriller": ["suspense", "thrillers"],
                  "mystery": ["mysteries", "whodunit"], "war": ["war movie"], "biography": ["biopic"],
                  "drama": ["dramas", "dramatic"], "action": ["action"]}


class AttributeVocab:
    """Finds the attributes a seeker states in free text: catalogue genres (with GENRE_SYNONYMS) and
    people (directors, stars) named in full."""

    def __init__(self, items: Sequence[dict]):
        self.genre_words: dict[str, str] = {}
        for it in items:
            for g in it.get("genres", []):
                name = g.lower()
                head = re.sub(r" (film|fiction|movie)s?$", "", name)
                for w in {name, head, head + "s", *GENRE_SYNONYMS.get(name, [])}:
                    self.genre_words.setdefault(w, name)
        self.people = {p.lower(): p for it in items for p in it.get("directors", [])[:1] + it.get("stars", [])[:3]
                       if len(p.split()) >= 2}
        self._genre_re = (re.compile(r"\b(" + "|".join(sorted(map(re.escape, self.genre_words), key=len, reverse=True))
                                     + r")\b") if self.genre_words else None)

    def stated(self, text: str) -> list[str]:
        """Attributes named in `text`, in order of appearance (genres lower-cased, people as in the catalogue)."""
        low = " ".join(text.lower().split())
        found: list[tuple[int, str]] = []
        if self._genre_re is not None:
            found += [(m.start(), self.genre_words[m.group(1)]) for m in self._genre_re.finditer(low)]
        words = re.findall(r"[a-z0-9'.-]+", low)
        for n in (2, 3):
            for i in range(len(words) - n + 1):
                name = " ".join(words[i:i + n])
                if name in self.people:
                    found.append((low.find(name), self.people[name]))
        return list(dict.fromkeys(a for _, a in sorted(found)))


def chain_preference(items: Sequence[dict], vocab: AttributeVocab, context: Sequence[dict], liked: Sequence[int] = (),
                     context_items: Sequence[int] = (), max_preferences: int = 3) -> list[str]:
    """The Preference line of reasoning_chain: attributes the seeker states, then those of liked
    movies already in the dialogue, at most max_preferences, first mention first."""
    seeker_text = " ".join(t["text"] for t in context if t["role"] == "seeker")
    mentioned = set(context_items)
    preference = vocab.stated(seeker_text)
    for i in [i for i in liked if i in mentioned]:
        preference += common.item_attributes(items[i])
    return list(dict.fromkeys(preference))[:max_preferences]


def preference_matches(items: Sequence[dict], preference: Sequence[str],
                       candidate_ids: Sequence[int]) -> dict[int, list[str]]:
    """{candidate id: its attributes among `preference` (case-insensitive)}; a candidate's score in
    reasoning_chain is the length of its list."""
    wanted = {p.lower() for p in preference}
    return {c: [a for a in common.item_attributes(items[c]) if a.lower() in wanted] for c in candidate_ids}


def reasoning_chain(items: Sequence[dict], vocab: AttributeVocab, context: Sequence[dict], candidate_ids: Sequence[int],
                    targets: Sequence[int], liked: Sequence[int] = (), context_items: Sequence[int] = (),
                    max_preferences: int = 3, cite_candidates: bool = False) -> tuple[str, list[int]]:
    """The SFT target built from metadata (docs/design.md section 5) and the ranking it encodes.

    Preference: attributes the seeker states, then those of liked movies already in the dialogue
    (at most max_preferences). Only what the prompt shows goes there: a Preference line that
    named the hidden target's attributes taught the model to invent names, and greedy decoding
    then looped on them. Scores: how many preferred attributes each candidate has. Ranking:
    targets among the candidates first, then by score, ties in the retriever's order.
    cite_candidates: each answer line also gives the candidate's number ("1. #4 Knives Out (2019)"),
    so that writing the title is a copy of the prompt's line "4. Knives Out (2019) | ..." rather
    than a lookup of the Ranking line's fourth candidate, which a small model gets wrong.
    -> (text ending in <answer>1. title ... 10. title</answer>, ranked ids)"""
    preference = chain_preference(items, vocab, context, liked, context_items, max_preferences)
    matched = preference_matches(items, preference, candidate_ids)
    number = {c: n for n, c in enumerate(candidate_ids, 1)}
    first = [c for c in targets if c in number]
    rest = sorted((c for c in candidate_ids if c not in first), key=lambda c: (-len(matched[c]), number[c]))
    ranked = (first + rest)[:common.REC_TOP_N]
    scored = [c for c in ranked if matched[c]]
    lines = [
        "Preference: " + (", ".join(preference) if preference else "nothing specific yet"),
        "Matching: " + ("; ".join(f"#{number[c]} {', '.join(matched[c])}" for c in scored[:3])
                        or "no candidate matches"),
        "Scores: " + (", ".join(f"#{number[c]}={len(matched[c])}" for c in scored[:5])
                      + ("; others lower" if scored else "all 0")),
        "Ranking: " + ", ".join(f"#{number[c]}" for c in ranked),
        f"Explanation: #{number[ranked[0]]} fits best"
        + (f", with {' and '.join(matched[ranked[0]][:2])}." if matched[ranked[0]] else " among the candidates."),
    ]
    cite = {c: f"#{number[c]} " if cite_candidates else "" for c in ranked}
    answer = "\n".join(f"{n}. {cite[c]}{items[c]['title']}" for n, c in enumerate(ranked, 1))
    return "\n".join(lines) + f"\n<answer>\n{answer}\n</answer>", ranked


PARSE_KINDS = ("valid", "no closed <answer>", "fewer than 10", "more than 10", "names no candidate", "duplicate")


def parse_failure_kinds(parsed: dict, n: int = common.REC_TOP_N) -> list[str]:
    """The PARSE_KINDS an output of common.parse_recommendation falls in (["valid"] when it is; an
    invalid answer can fall in several)."""
    if parsed["valid"]:
        return ["valid"]
    if not parsed["has_answer"]:
        return ["no closed <answer>"]
    kinds = []
    if len(parsed["entries"]) < n:
        kinds.append("fewer than 10")
    if len(parsed["entries"]) > n:
        kinds.append("more than 10")
    if None in parsed["ids"]:
        kinds.append("names no candidate")
    named = [i for i in parsed["ids"] if i is not None]
    if len(set(named)) < len(named):
        kinds.append("duplicate")
    return kinds


def run_title_index(run: common.RunPaths, items: Sequence[dict]) -> common.TitleIndex:
    """The run's title matcher, ties broken by how many training dialogues mention each item."""
    return common.TitleIndex(items, common.popularity_counts(common.load_dialogues(run, "train"), len(items)).tolist())


# ---- part 2: SFT and its quality report ---------------------------------------------------------


def sft_candidates(args: Args, run: common.RunPaths, net: common.DualViewRetriever, features: dict,
                   rows: dict[str, list[dict]]) -> tuple[dict[str, list[list[int]]], str]:
    """Step 6: the fused retriever's top-K for every sample of `rows` (train, held-out valid); a
    training sample's from the cross-fitted copy that never saw its dialogue, as a test sample's
    would be. -> ({split: [len(rows[split])][K]}, where the training candidates come from)"""
    folds = common.load_fold_retrievers(run.retriever / "fused", args.device)
    candidates = {split: recall_candidates(net, folds, features[split], r, args) for split, r in rows.items()}
    if not folds[1]:
        print(f"[03] warning: {run.retriever / 'fused' / 'folds'} is missing (--retriever-folds 0): training samples "
              "get candidates from the retriever that trained on them, which ranks their targets far higher than a "
              "test sample's. Rerun `--parts retriever` to cross-fit it.")
        return candidates, "the full retriever (in sample)"
    return candidates, f"out of fold ({len(folds[1])} cross-fitted retrievers)"


def sft_examples(args: Args, tok, items: list[dict], rows: list[dict], candidates: list[list[int]]) -> list[dict]:
    """Step 7: one chat example (common.build_chat_example: input_ids [T], labels [T] set only on the
    answer) per sample with a true target: its prompt and the metadata chain that ranks the target first."""
    vocab = AttributeVocab(items)
    examples = []
    for s, cands in zip(rows, candidates):
        if not common.sample_truth(s):
            continue
        chain, _ = reasoning_chain(items, vocab, s["context"], cands, common.sample_truth(s), s["liked"],
                                   s["context_items"], cite_candidates=args.cite_candidates)
        messages = common.recommender_messages(s["context"], items, cands, answer=chain)
        examples.append(common.build_chat_example(tok, messages, args.max_len))
    return examples


def answer_lengths(examples: list[dict]) -> dict:
    """Tokens of each SFT answer the model learns to write (labels not IGNORE_INDEX: the chain, the
    list and the end-of-turn marker). Generation needs a --max-new-tokens of at least these, or a
    model that writes its answers as trained is cut before `</answer>`. -> {median, p95, max}"""
    lengths = sorted(sum(label != common.IGNORE_INDEX for label in e["labels"]) for e in examples)
    if not lengths:
        return {"median": 0, "p95": 0, "max": 0}
    return {"median": lengths[len(lengths) // 2], "p95": lengths[int(0.95 * (len(lengths) - 1))], "max": lengths[-1]}


def fine_tune(args: Args, model, tok, examples: list[dict], out_dir) -> None:
    """Step 8: LoRA SFT on `examples`, resumable from out_dir/checkpoint/ (common.train_lora_sft)."""
    common.add_sft_lora(model, args, "03")
    same_run = {key: getattr(args, key) for key in ("model", "lora_r", "lora_alpha", "batch_size", "grad_accum",
                                                    "max_len", "max_samples", "seed", "steps", "lr", "candidates",
                                                    "cite_candidates")}
    if args.init_adapter:
        same_run["init_adapter"] = args.init_adapter
    schedule = SimpleNamespace(**asdict(args), eval_every=0)  # 03's quality report comes once, at the end
    common.train_lora_sft(model, tok.pad_token_id, {"recommend": examples}, {"recommend": 1.0}, schedule, out_dir,
                          same_run, desc="recommender SFT")


def recommender_quality(model, tok, samples: list[dict], candidates: list[list[int]], items: list[dict],
                        titles: common.TitleIndex, args: Args, name: str) -> dict:
    """Greedy answers on held-out samples (the retriever's candidates) with 05's default decoding:
    how many parse into 10 distinct candidate titles, and the hit rates of the re-ranked lists."""
    answers = common.recommend_with_llm(model, tok, items, titles, [s["context"] for s in samples], candidates,
                                        args.max_new_tokens, batch_size=args.gen_batch_size,
                                        no_repeat_ngram=common.GREEDY_NO_REPEAT_NGRAM, progress=f"quality ({name})")
    n = max(len(answers), 1)
    valid = sum(a["parsed"]["valid"] for a in answers)
    invalid = [{"sample": i, "kinds": parse_failure_kinds(a["parsed"]), "candidates": list(c), "text": a["text"]}
               for i, (a, c) in enumerate(zip(answers, candidates)) if not a["parsed"]["valid"]]
    return {
        "samples": len(answers),
        "parse_rate": valid / n,
        "parse_rate_ci": common.wilson_interval(valid, len(answers)),
        "parse_failures": {kind: sum(kind in parse_failure_kinds(a["parsed"]) for a in answers)
                           for kind in PARSE_KINDS[1:]},  # why the others fail (several kinds may apply)
        "answer_tag_rate": sum(a["parsed"]["has_answer"] for a in answers) / n,
        "mean_candidate_titles": sum(len({i for i in a["parsed"]["ids"] if i is not None}) for a in answers) / n,
        "mean_completion_tokens": sum(len(a["completion_ids"]) for a in answers) / n,
        "reranked": common.score_rankings([a["ranked"] for a in answers], samples, ks=(1, 5, 10))["new"],
        "examples": [a["text"] for a in answers[:3]],
        # each failure whole, with the candidates it was read against: where a duplicate starts
        # (the Ranking line or the copy of its titles) can then be read without generating again
        "invalid_examples": invalid[:MAX_INVALID_EXAMPLES],
    }


def quality_report(args: Args, model, tok, items: list[dict], titles: common.TitleIndex, held_out: list[dict],
                   candidates: list[list[int]], eval_examples: list[dict]) -> dict:
    """Step 9: the tuned adapter's answers on held-out samples next to the untuned base model's,
    the retriever's own order, and the validation loss of the SFT examples of those samples."""
    retriever_order = [c[:common.REC_TOP_N] for c in candidates]
    quality = {"split": "valid", "candidates": args.candidates,
               "decoding": {"greedy": True, "max_new_tokens": args.max_new_tokens,
                            "no_repeat_ngram": common.GREEDY_NO_REPEAT_NGRAM},
               "retriever_order": common.score_rankings(retriever_order, held_out, ks=(1, 5, 10))["new"],
               "tuned": recommender_quality(model, tok, held_out, candidates, items, titles, args, "tuned")}
    with common.lora_disabled(model):
        quality["base"] = recommender_quality(model, tok, held_out, candidates, items, titles, args, "base")
    quality["eval_loss"] = round(common.mean_token_loss(model, eval_examples, tok.pad_token_id, args.batch_size,
                                                        args.device), 5)
    for name in ("tuned", "base"):
        q, order = quality[name], quality["retriever_order"]
        low, high = q["parse_rate_ci"]
        print(f"[03] {name:5s}: parse rate {q['parse_rate']:.3f} [{low:.2f}, {high:.2f}]  "
              f"R@1 {q['reranked']['recall@1']:.3f}  R@10 {q['reranked']['recall@10']:.3f}  "
              f"(retriever order: R@1 {order['recall@1']:.3f})")
    return quality


def train_recommender(args: Args, run: common.RunPaths, items: list[dict], samples: dict[str, list[dict]],
                      net: common.DualViewRetriever, features: dict) -> dict:
    """Part 2: LoRA SFT of the reasoning recommender on the retriever's candidates (steps 6-9)."""
    out_dir = run.recommender_sft
    titles = run_title_index(run, items)
    train, held_out = samples["train"], samples["valid"][:args.max_eval_samples]
    candidates, source = sft_candidates(args, run, net, features, {"train": train, "valid": held_out})
    model, tok = common.load_llm(args.model, args.load_in_4bit, args.device)
    examples = sft_examples(args, tok, items, train, candidates["train"])
    eval_examples = sft_examples(args, tok, items, held_out, candidates["valid"])
    truncated = sum(e["truncated"] for e in examples)
    print(f"[03] recommender SFT: {len(examples)} examples ({truncated} truncated to {args.max_len} tokens)")
    lengths = answer_lengths(examples)
    print(f"[03] SFT answers: median {lengths['median']}, 95th percentile {lengths['p95']}, "
          f"max {lengths['max']} tokens")
    if lengths["p95"] > args.max_new_tokens:
        print(f"[03] warning: --max-new-tokens {args.max_new_tokens} cuts more than 5% of the SFT answers before "
              f"</answer>; the quality report's parse rate then measures the budget, not the model")

    fine_tune(args, model, tok, examples, out_dir)
    common.save_lora(model, out_dir, {"base_model_name_or_path": args.model})
    print(f"[03] quality on {len(held_out)} valid samples (tuned, then base)")
    quality = quality_report(args, model, tok, items, titles, held_out, candidates["valid"], eval_examples)
    common.write_json(out_dir / "quality.json", quality)
    config = {"args": asdict(args), "prompt_version": common.REC_PROMPT_VERSION, "train_candidates": source,
              "examples": len(examples), "truncated": truncated, "answer_tokens": lengths}
    common.write_json(out_dir / "recommender_config.json", config)
    return {"quality": quality, "config": config}


# ---- the stage ----------------------------------------------------------------------------------


def check_args(args: Args) -> None:
    """Refuse, before any work, settings that would overwrite a trained adapter or cannot cross-fit."""
    if "recommender" in args.parts and args.steps == 0 and not args.init_adapter:
        # 0 steps from zeros would write the untuned base as recommender_sft/, over a trained adapter
        raise SystemExit("error: --steps 0 only reports on an earlier adapter: give it with --init-adapter DIR")
    if "recommender" in args.parts and args.steps == 0:
        # a report on prompts the adapter never saw, and a copy that would claim this code's version
        common.require_prompt_version(args.init_adapter)
    if args.retriever_folds == 1 or args.retriever_folds < 0:
        # one fold would leave its retriever no training dialogue at all
        raise SystemExit(f"error: --retriever-folds {args.retriever_folds}: give 0 (no cross-fitting) or at least 2")


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    check_args(args)
    args.run_dir = common.default_run_dir(args.dataset, args.run_dir)
    run = common.RunPaths(args.run_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.set_seed(args.seed)
    started = time.time()

    # 1. Prepared data: the catalogue and the recommendation samples of each split.
    items = common.load_items(run)
    samples = {split: common.load_samples(run, split) for split in common.SPLITS}
    if args.max_samples:
        samples = {split: rows[:args.max_samples] for split, rows in samples.items()}
    print(f"[03] {len(items)} items; samples " + ", ".join(f"{s}={len(r)}" for s, r in samples.items()))

    # 2. Semantic view: frozen encoder vectors of item texts and dialogue texts.
    features = encode_features(args, run, items, samples)
    report = {"args": asdict(args), "candidates": args.candidates, "num_items": len(items), "variants": {}}
    if "retriever" in args.parts:
        # 3. Collaborative view: item embeddings initialised from co-occurrence in training dialogues.
        # 4. Train the fused retriever and the single-view ablations, keep the best epoch of each;
        #    then the fused retriever's cross-fitted copies.
        train_retrievers(args, run, features, samples, common.load_dialogues(run, "train"), report)
        if "fused" in args.variants:
            # 5. Where the target sits among the K candidates, in sample, out of fold and on valid.
            report["candidate_targets"] = candidate_targets(args, run, features, samples)
    elif "baselines" in args.parts and (run.retriever / "report.json").exists():
        report = common.read_json(run.retriever / "report.json")  # keep the trained variants' rows
    if "retriever" in args.parts or "baselines" in args.parts:
        # 5b. Baselines counted on the training dialogues and the frozen encoder alone, beside the variants.
        report["baselines"] = baseline_report(args, features, samples, common.load_dialogues(run, "train"))
        if "retriever" in args.parts:
            report["seconds"] = round(time.time() - started, 1)
        common.write_json(run.retriever / "report.json", report)
        print(f"[03] baselines: co-occurrence weight {report['baselines']['mix_weight']} in the mix (valid)\n"
              + recall_table(report) + f"\n[03] wrote {run.retriever}/report.json after {time.time() - started:.1f} s")

    if "recommender" in args.parts:
        # 6-9. The reasoning recommender, fine-tuned on the fused retriever's candidates.
        net = common.DualViewRetriever.load(run.require("retriever", "fused/retriever.pt") / "fused").to(args.device)
        report["recommender"] = train_recommender(args, run, items, samples, net, features)
        print(f"[03] wrote {run.recommender_sft}/ in {round(time.time() - started, 1)} s")
    return report


if __name__ == "__main__":
    main()
