"""Stage 5: evaluate every system on the test split and write the results table.

Reads   <run-dir>/data/       (01_prep_data.py)       items, dialogues, test samples
        <run-dir>/retriever/  (03_sft_recommender.py) fused and single-view retrievers
Writes  <run-dir>/eval/
          results.json        every metric of every row, with 95% bootstrap confidence intervals
          results.md          the Markdown table the README quotes

Protocol (DESIGN section 7): each recommendation sample is scored against its `new_targets`
(items not mentioned earlier in the dialogue: the headline) and against all its `targets`.
One label per target item; Recall@k, NDCG@k and MRR@k each look at the first k of the list only.
Confidence intervals resample samples (percentile bootstrap).

Rows so far:
  popularity          items ranked by how many training dialogues mention them
  retriever-semantic  the retriever with its semantic view only (ablation)
  retriever-collab    the retriever with its collaborative view only (ablation)
  retriever-fused     the dual-view retriever (cross-attention fusion): what the recommender re-ranks
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

import common
from common import arg

RETRIEVER_ROWS = {"retriever-semantic": "semantic", "retriever-collab": "collaborative", "retriever-fused": "fused"}
ALL_ROWS = ["popularity", *RETRIEVER_ROWS]


@dataclass
class Args:
    dataset: str = arg("redial", "dataset whose run directory to use", choices=["redial", "inspired"])
    run_dir: str = arg("", "run directory (default: runs/<dataset>)")
    split: str = arg("test", "split to evaluate", choices=["valid", "test"])
    rows: list = arg(ALL_ROWS, f"systems to evaluate, among {ALL_ROWS}")
    limit: int = arg(0, "evaluate the first N samples only; 0 = all")
    exclude_seen: bool = arg(True, "never rank items already mentioned in the dialogue")
    bootstrap: int = arg(1000, "bootstrap resamples for the 95% confidence intervals")
    seed: int = arg(0, "random seed")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "torch device")


def popularity_rankings(run: common.RunPaths, num_items: int, samples: list[dict], k: int, exclude_seen: bool) -> list[list[int]]:
    """The most-mentioned training items, minus those already in each dialogue."""
    counts = common.popularity_counts(common.load_dialogues(run, "train"), num_items)
    scores = counts.unsqueeze(0).expand(len(samples), -1)
    if exclude_seen:
        scores = common.mask_seen(scores, common.pad_item_lists([s["context_items"] for s in samples], max_len=10**6))
    return scores.topk(k, dim=1).indices.tolist()


def retriever_rankings(run: common.RunPaths, variants: list[str], samples: list[dict], k: int, args: Args) -> dict[str, list[list[int]]]:
    """Top-k of each retriever variant; the dialogue texts are encoded once for all of them."""
    folder = run.require("retriever", f"{variants[0]}/retriever.pt")
    nets = {}
    for v in variants:
        run.require("retriever", f"{v}/retriever.pt")
        nets[v] = common.DualViewRetriever.load(folder / v).to(args.device)
    encoder_name = nets[variants[0]].extra.get("encoder", common.DEFAULT_ENCODER)
    tokenizer, encoder = common.load_sentence_encoder(encoder_name, args.device)
    ctx_sem = common.encode_texts([common.dialogue_text(s["context"]) for s in samples], tokenizer, encoder,
                                  desc="encoding test dialogues")
    context_items = [s["context_items"] for s in samples]
    return {v: common.rank_items(net, ctx_sem, context_items, k, args.exclude_seen, device=args.device)
            for v, net in nets.items()}


def markdown_table(results: dict) -> str:
    """Rows x headline metrics on new targets (95% CI of Recall@10 beside it), then Recall@10/50 on all."""
    k_cols = [("recall@1", "R@1"), ("recall@10", "R@10"), ("recall@20", "R@20"), ("recall@50", "R@50"),
              ("ndcg@10", "NDCG@10"), ("mrr@10", "MRR@10")]
    head = "| system | " + " | ".join(f"{label} new" for _, label in k_cols) + " | R@10 new 95% CI | R@10 all | R@50 all |"
    lines = [head, "|" + "---|" * (len(k_cols) + 4)]
    for name, r in results["rows"].items():
        lo, hi = r["ci"]["new"]["recall@10"]
        cells = [f"{r['new'][m]:.3f}" for m, _ in k_cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | [{lo:.3f}, {hi:.3f}] | {r['all']['recall@10']:.3f} | {r['all']['recall@50']:.3f} |")
    meta = (f"{results['dataset']} {results['split']}: {results['samples']} samples, "
            f"{results['labels']['new']} new-target labels, {results['labels']['all']} target labels"
            + (f" (first {results['limit']} samples)" if results["limit"] else ""))
    return f"{meta}\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    args.run_dir = common.default_run_dir(args.dataset, args.run_dir)
    run = common.RunPaths(args.run_dir)
    common.set_seed(args.seed)
    unknown = [r for r in args.rows if r not in ALL_ROWS]
    if unknown:
        raise SystemExit(f"error: unknown --rows {unknown}; choose among {ALL_ROWS}")

    items = common.load_items(run)
    samples = common.load_samples(run, args.split)
    if args.limit:
        samples = samples[:args.limit]
    k = max(common.METRIC_KS)
    results = {"dataset": args.dataset, "split": args.split, "limit": args.limit, "samples": len(samples),
               "args": asdict(args), "rows": {}, "seconds": {}}

    rankings: dict[str, list[list[int]]] = {}
    if "popularity" in args.rows:
        rankings["popularity"] = popularity_rankings(run, len(items), samples, k, args.exclude_seen)
    variants = [RETRIEVER_ROWS[r] for r in args.rows if r in RETRIEVER_ROWS]
    if variants:
        started = time.time()
        by_variant = retriever_rankings(run, variants, samples, k, args)
        rankings.update({row: by_variant[v] for row, v in RETRIEVER_ROWS.items() if v in by_variant})
        results["seconds"]["retrievers"] = round(time.time() - started, 1)

    for row in args.rows:
        results["rows"][row] = common.score_rankings(rankings[row], samples, bootstrap=args.bootstrap, seed=args.seed)
    results["labels"] = results["rows"][args.rows[0]]["labels"] if args.rows else {"new": 0, "all": 0}

    out = run.root / "eval"
    common.write_json(out / "results.json", results)
    table = markdown_table(results)
    common.atomic_write_bytes(out / "results.md", table.encode())
    print(table)
    print(f"[05] wrote {out}/results.json and results.md")
    return results


if __name__ == "__main__":
    main()
