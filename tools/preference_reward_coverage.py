"""How often can 04's preference reward be non-zero? Scores the SFT reasoning chain's own
Preference line (common.reasoning_chain: attributes the dialogue shows, never the hidden target's)
against the targets' attributes with 04_rl_multiturn.turn_reward itself, on training samples.

    python tools/preference_reward_coverage.py --run-dir runs/inspired [--samples 600]
"""
import argparse
import importlib
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

rl = importlib.import_module("04_rl_multiturn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="a run directory with data/ (01_prep_data.py)")
    parser.add_argument("--samples", type=int, default=600, help="first N training samples (0 = all)")
    args = parser.parse_args()
    run = common.RunPaths(args.run_dir)
    items = common.load_items(run)
    train = common.load_samples(run, "train")
    train = train[:args.samples] if args.samples else train
    vocab, titles = common.AttributeVocab(items), common.TitleIndex(items)
    weights = argparse.Namespace(w_format=0.0, w_recommend=0.0, w_preference=1.0)
    f1s, empty = [], 0
    for s in train:
        truth = common.sample_truth(s)
        # the Preference line does not depend on the candidates: any 20 with the target among them
        candidates = truth[:1] + list(itertools.islice((i for i in range(len(items)) if i not in truth), 19))
        chain, _ = common.reasoning_chain(items, vocab, s["context"], candidates, truth, s["liked"], s["context_items"])
        parsed = common.parse_recommendation(chain, titles, candidates)
        empty += not parsed["preference"]
        f1s.append(rl.turn_reward({"parsed": parsed}, truth, items, weights)["preference"])
    print(f"{args.run_dir}: {len(f1s)} training samples; Preference line empty in {empty}; "
          f"F1 with the targets' attributes > 0 in {sum(f > 0 for f in f1s)} ({sum(f > 0 for f in f1s) / len(f1s):.1%}), "
          f"mean F1 {statistics.mean(f1s):.3f}")


if __name__ == "__main__":
    main()
