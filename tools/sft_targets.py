"""What 03's SFT targets ask the recommender to write: counts over the metadata reasoning chains.

For each sample of a split that has a true target, this recalls its K candidates as 03 does (a
training dialogue's from the cross-fitted retriever that never saw it, retriever/fused/folds/), builds
the chain of 03's reasoning_chain and counts:
- chains that parse back into a valid list (common.parse_recommendation), and why the others do not;
- chains whose Ranking is the retriever's order with the true targets moved first (no reordering
  by the seeker's attributes), and chains with a true target among the candidates at all;
- how many candidates have a score above 0 (they share at least one preferred attribute): the
  Scores line writes the first 5 of them, so where more have one, the Ranking sorts candidates by
  scores the chain never writes out, a count the model has to make in its head;
- chains whose candidates hold two items with the same title and year (the parser reads both lines
  as one candidate: the chain's list then has a duplicate);
- what the chain teaches beyond putting the target first, which the prompt does not show: samples
  with a true target in the retriever's first 10, and in the first 10 of the chain's ranking built
  without targets (by the scores alone, ties in the retriever's order), the list of a model that
  follows the chain exactly but cannot guess the target; and the samples where each of the two holds
  one and the other does not. On valid or test samples this is the re-ranking's headroom over the
  retriever's own order that imitating the chains can give.

    python tools/sft_targets.py --run-dir runs/redial [--split train] [--max-samples 0]
"""
import argparse
import importlib
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

rec = importlib.import_module("03_sft_recommender")

SCORED_BINS = ((0, 0), (1, 5), (6, 10), (11, 15), (16, 10**6))


def chain_counts(items: list[dict], samples: list[dict], candidates: list[list[int]],
                 titles: common.TitleIndex) -> Counter:
    """The counts of the module docstring over (sample, its K candidates) pairs with a true target."""
    vocab = rec.AttributeVocab(items)
    counts = Counter()
    for s, cands in zip(samples, candidates):
        truth = common.sample_truth(s)
        if not truth:
            continue
        chain, ranked = rec.reasoning_chain(items, vocab, s["context"], cands, truth, s["liked"], s["context_items"])
        counts["chains"] += 1
        parsed = common.parse_recommendation(chain, titles, cands)
        counts.update(rec.parse_failure_kinds(parsed))
        first = [c for c in truth if c in cands]  # reasoning_chain ranks these first, in this order
        counts["a true target among the candidates"] += bool(first)
        retriever_order = (first + [c for c in cands if c not in first])[:len(ranked)]
        counts["Ranking = retriever order, targets first"] += ranked == retriever_order
        preference = rec.chain_preference(items, vocab, s["context"], s["liked"], s["context_items"])
        scored = sum(bool(m) for m in rec.preference_matches(items, preference, cands).values())
        low, high = next(b for b in SCORED_BINS if b[0] <= scored <= b[1])
        counts[f"scored {low}-{high}" if high < 10**6 else f"scored {low}+"] += 1
        distinct = {common.normalize_title(items[c]["title"]) for c in cands}
        counts["identical titles among the candidates"] += len(distinct) < len(cands)
        _, by_score = rec.reasoning_chain(items, vocab, s["context"], cands, [], s["liked"], s["context_items"])
        retriever_hit, score_hit = any(c in truth for c in cands[:10]), any(c in truth for c in by_score[:10])
        counts["a true target in the retriever's first 10"] += retriever_hit
        counts["a true target in the first 10 by scores alone"] += score_hit
        counts["by scores alone: a target the retriever's first 10 miss"] += score_hit and not retriever_hit
        counts["by scores alone: no target the retriever's first 10 hold"] += retriever_hit and not score_hit
    return counts


def main(argv=None) -> Counter:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="run directory with data/ (01) and retriever/ (03 part 1)")
    parser.add_argument("--split", default="train", choices=common.SPLITS, help="whose samples' chains to count")
    parser.add_argument("--candidates", type=int, default=20, help="candidate-set size K (03's --candidates)")
    parser.add_argument("--max-samples", type=int, default=0, help="only the first N samples (0 = all 03 encoded)")
    args = parser.parse_args(argv)
    run = common.RunPaths(args.run_dir)
    items = common.load_items(run)
    titles = rec.run_title_index(run, items)
    features = torch.load(run.require("retriever", "features.pt") / "features.pt", weights_only=False)["features"]
    samples = common.load_samples(run, args.split)[:len(features[args.split])]  # 03 encoded these (its --max-samples)
    if args.max_samples:
        samples = samples[:args.max_samples]
    net = common.DualViewRetriever.load(run.require("retriever", "fused/retriever.pt") / "fused")
    fold_of, fold_nets = common.load_fold_retrievers(run.retriever / "fused")
    candidates = common.rank_items_cross_fitted(net, fold_nets, [fold_of.get(s["dialog_id"]) for s in samples],
                                                features[args.split][:len(samples)],
                                                [s["context_items"] for s in samples], args.candidates)
    counts = chain_counts(items, samples, candidates, titles)
    n = max(counts["chains"], 1)
    print(f"{args.run_dir}, {args.split}: {counts['chains']} SFT chains over {args.candidates} candidates "
          f"({'out of fold' if fold_nets else 'the full retriever'})")
    order = (list(rec.PARSE_KINDS) + ["a true target among the candidates", "Ranking = retriever order, targets first"]
             + [f"scored {lo}-{hi}" if hi < 10**6 else f"scored {lo}+" for lo, hi in SCORED_BINS]
             + ["identical titles among the candidates", "a true target in the retriever's first 10",
                "a true target in the first 10 by scores alone",
                "by scores alone: a target the retriever's first 10 miss",
                "by scores alone: no target the retriever's first 10 hold"])
    print("| count | chains | share |\n|---|---|---|")
    for key in order:
        print(f"| {key} | {counts[key]} | {counts[key] / n:.1%} |")
    print("(scored a-b: chains where a to b of the candidates share a preferred attribute; the Scores line writes 5; "
          "by scores alone: the chain's ranking built without the targets, as a model that cannot guess them would)")
    return counts


if __name__ == "__main__":
    main()
