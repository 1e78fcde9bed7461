"""Each multi-turn row minus sft+simulator (or --reference) on the same conversations, in R@1, R@10 and NDCG@10.

05_eval.py pairs every multi-turn row with sft+simulator in Recall@10 only. A recommender that
moves a target from rank 5 to rank 1 gains nothing there, so this tool pairs the rows in the
three headline metrics (05's GAIN_METRICS) at turns 1 and T, from what 05 already wrote: each row's
ranked lists at those turns (eval/results.json) and the samples they belong to, matched by dialogue
and turn through the reference row's eval/conversations_<row>.jsonl (05's draw, in its order). Nothing is played
again. The intervals are common.paired_gain's paired 95% bootstrap, with 05's --bootstrap and --seed,
so the R@10 columns equal 05's own table (checked here). Writes eval/paired_gains.md, or with
--reference ROW (e.g. retriever+simulator: does a recommender beat the retriever's own order?)
eval/paired_gains_vs_ROW.md.

    python tools/paired_gains.py --run-dir runs/inspired_reach24 [--reference retriever+simulator]
"""
import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

evaluate = importlib.import_module("05_eval")


def drawn_samples(run: common.RunPaths, split: str, reference: str) -> list[dict]:
    """The samples of 05's multi-turn draw, in the order of the rows' lists (every row played the same draw)."""
    by_key = {(s["dialog_id"], s["turn"]): s for s in common.load_samples(run, split)}
    path = run.root / "eval" / f"conversations_{reference}.jsonl"
    if not path.exists():
        raise SystemExit(f"error: {path} is missing; run 05_eval.py --run-dir {run.root} with the {reference} row")
    return [by_key[(c["dialog_id"], c["turn"])] for c in common.read_jsonl(path)]


def paired_gains(run_dir: str, reference_row: str = evaluate.REFERENCE_ROW) -> dict:
    """{"turns": T, "reference": row, "rows": {row: {metric: {"turn 1": paired_gain, "turn T": paired_gain}}}}
    for every multi-turn row with lists but the reference and sft-single-turn (turn 1 of sft+simulator),
    the rows 05's own pairing (compare_with_reference) covers."""
    run = common.RunPaths(run_dir)
    results = common.read_json(run.require("eval", "results.json") / "results.json")
    reference = results["multi_turn"].get(reference_row, {}).get("lists")
    if not reference:
        raise SystemExit(f"error: {run.root}/eval/results.json has no {reference_row} row with lists "
                         "(05 keeps them since 2026-11-27)")
    samples = drawn_samples(run, results["split"], reference_row)
    args = results["args"]
    out = {}
    for name, row in results["multi_turn"].items():
        if name in (reference_row, "sft-single-turn") or not row.get("lists"):
            continue
        out[name] = {metric: {turn: common.paired_gain(reference[turn], row["lists"][turn], samples, metric,
                                                       resamples=args["bootstrap"], seed=args["seed"])
                              for turn in reference} for metric in evaluate.GAIN_METRICS}
        same_pairing = {t: row["vs_reference"][t] for t in reference} if "vs_reference" in row else None
        if reference_row == evaluate.REFERENCE_ROW and same_pairing and out[name]["recall@10"] != same_pairing:
            raise SystemExit(f"error: {name}'s R@10 differs from 05's own pairing; the lists do not match "
                             f"conversations_{evaluate.REFERENCE_ROW}.jsonl")
    return {"turns": results["turns"], "reference": reference_row, "rows": out}


def markdown(gains: dict) -> str:
    T = gains["turns"]
    names = {"recall@1": "R@1", "recall@10": "R@10", "ndcg@10": "NDCG@10"}
    cols = [(m, t) for m in evaluate.GAIN_METRICS for t in ("turn 1", f"turn {T}")]
    head = "| system | " + " | ".join(f"Δ{names[m]} t{t.split()[1]}" for m, t in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    lines += [f"| {name} | " + " | ".join(evaluate.format_gain(g[m][t]) for m, t in cols) + " |"
              for name, g in gains["rows"].items()]
    return (f"Each row minus {gains['reference']} on the same conversations (new targets, paired 95% CI, "
            "samples better / worse):\n\n" + "\n".join(lines) + "\n")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="run directory whose eval/ 05_eval.py wrote")
    played_over_turns = [r for r in evaluate.MULTI_TURN_ROWS if r not in evaluate.SINGLE_TURN_ROWS]
    parser.add_argument("--reference", default=evaluate.REFERENCE_ROW, choices=played_over_turns,
                        help="the row the others are paired with (a row played over the turns: single-turn rows "
                             "write no conversations)")
    args = parser.parse_args(argv)
    text = markdown(paired_gains(args.run_dir, args.reference))
    name = "paired_gains.md" if args.reference == evaluate.REFERENCE_ROW else f"paired_gains_vs_{args.reference}.md"
    path = Path(args.run_dir) / "eval" / name
    common.atomic_write_bytes(path, text.encode())
    print(text + f"\nwrote {path}")
    return text


if __name__ == "__main__":
    main()
