"""Stage 3: train the dual-view retriever that recalls the recommender's candidates.

Reads   <run-dir>/data/            (01_prep_data.py): items, dialogues, recommendation samples
Writes  <run-dir>/retriever/
          features.pt              frozen sentence-encoder vectors of items and dialogue contexts
          fused/retriever.pt       the dual-view retriever (semantic + collaborative, cross-attention)
          semantic/, collaborative/  single-view ablations trained the same way
          report.json              Recall@K (K = candidate-set size) and more on valid and test
          train_log.jsonl          loss and validation recall per epoch and variant

The retriever keeps the recommender inside the item space: its Recall@K at the candidate-set
size bounds every later stage, since the LLM only re-ranks what it recalls. Training is softmax
cross-entropy over the whole catalogue, one term per new target item of a training sample, with
the items already mentioned in the dialogue masked out (they are not new recommendations). The
best epoch by validation Recall@K is kept.

(The recommender SFT that also belongs to this stage, DESIGN section 5, is built on top of this
retriever in the next milestone.)
"""
from __future__ import annotations

import hashlib
import json
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
    batch_size: int = arg(256, "training examples (sample, target) per step")
    lr: float = arg(1e-3, "AdamW learning rate")
    weight_decay: float = arg(0.1, "AdamW weight decay")
    train_on: str = arg("new", "targets that make training examples", choices=["new", "all"])
    exclude_seen: bool = arg(True, "never recall items already mentioned in the dialogue")
    max_samples: int = arg(0, "use only the first N samples of each split (smoke tests); 0 = all")
    encode_batch_size: int = arg(64, "sentence-encoder batch size")
    seed: int = arg(0, "random seed")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "torch device")


def encode_features(args: Args, run: common.RunPaths, items: list[dict], samples: dict[str, list[dict]]) -> dict:
    """Frozen-encoder vectors of every item [N, E] and every sample's dialogue context [S, E],
    cached in retriever/features.pt and reused while the texts and the encoder are unchanged."""
    texts = {"items": [common.item_text(it) for it in items]}
    texts.update({split: [common.dialogue_text(s["context"]) for s in rows] for split, rows in samples.items()})
    fingerprint = hashlib.sha1(json.dumps([args.encoder, texts], sort_keys=True).encode()).hexdigest()
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
                    collab_init: torch.Tensor, log) -> tuple[common.DualViewRetriever, dict]:
    """Train one retriever variant; returns the best-by-validation model and its report."""
    common.set_seed(args.seed)
    views = common.RETRIEVER_VIEWS if variant == "fused" else (variant,)
    net = common.DualViewRetriever(features["items"], collab_init, views, args.dim, args.heads, args.dropout).to(args.device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rows, targets = training_pairs(samples["train"], args.train_on)
    if not rows:
        raise SystemExit(f"error: no training labels ({args.train_on} targets) in samples_train.jsonl")
    ctx_sem = features["train"].to(args.device)
    ctx_items = common.pad_item_lists([s["context_items"] for s in samples["train"]]).to(args.device)
    rows_t, targets_t = torch.tensor(rows), torch.tensor(targets, device=args.device)
    k = args.candidates
    best_recall, best_state, best_epoch, stale = -1.0, None, 0, 0
    bar = tqdm(range(1, args.epochs + 1), desc=f"retriever[{variant}]")
    for epoch in bar:
        net.train()
        perm = torch.randperm(len(rows_t))
        total = 0.0
        for start in range(0, len(perm), args.batch_size):
            pick = perm[start:start + args.batch_size]
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
        log({"variant": variant, "epoch": epoch, "loss": total / len(perm), f"valid_new_recall@{k}": recall})
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


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    args.run_dir = common.default_run_dir(args.dataset, args.run_dir)
    run = common.RunPaths(args.run_dir)
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

    # 3. Collaborative view: item embeddings initialised from co-occurrence in training dialogues.
    item_sets = [[i for t in d["turns"] for i in t["items"]] for d in train_dialogues]
    collab_init = common.cooccurrence_embeddings(item_sets, len(items), args.dim, seed=args.seed)

    # 4. Train the fused retriever and the single-view ablations, keep the best epoch of each.
    log_path = run.retriever / "train_log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "w")

    def log(row: dict) -> None:
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()

    report = {"args": asdict(args), "candidates": args.candidates, "num_items": len(items), "variants": {}}
    for variant in args.variants:
        net, variant_report = train_retriever(args, variant, features, samples, collab_init, log)
        net.save(run.retriever / variant, extra={"encoder": args.encoder, "variant": variant, "candidates": args.candidates,
                                                 "exclude_seen": args.exclude_seen})
        report["variants"][variant] = variant_report
        k = args.candidates
        print(f"[03] retriever[{variant}] test Recall@{k} new={variant_report['test']['new'][f'recall@{k}']:.3f} "
              f"all={variant_report['test']['all'][f'recall@{k}']:.3f} (best epoch {variant_report['best_epoch']})")
    log_file.close()
    report["seconds"] = round(time.time() - started, 1)
    common.write_json(run.retriever / "report.json", report)
    print(f"[03] wrote {run.retriever}/ in {report['seconds']} s")
    return report


if __name__ == "__main__":
    main()
