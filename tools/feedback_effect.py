"""What the simulator's feedback does to the retriever's query, from 05's conversation files.

Over the turns of eval/conversations_<row>.jsonl, the retriever's semantic view encodes the
sample's real turns and, with 05's --retriever-query whole-dialogue (before 2026-11-26), each
simulated pair (the recommender's turn and the simulator's reply), or with latest-feedback only
the latest reply. The sentence encoder keeps only its last --max-length
tokens (common.encode_texts, truncated from the left), so simulated turns push the real dialogue out.
This counts, by turn:
- the share of the encoded window that is the real dialogue (mean), and how many queries hold
  none of it (of the samples that have real turns);
- of the simulator replies that fed the turn: how many name a title it was shown, and how many
  copy the recommender's own sentence instead of answering it (common.copies_turn);
- how many of the turn's top 10 were already in turn 1's top 10 (mean).

    python tools/feedback_effect.py --run-dir runs/inspired_feedback [--row retriever+simulator]
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

evaluate = importlib.import_module("05_eval")  # BEFORE_FLAG: the settings of files older than a flag


def turn_rows(conversations: list[dict], samples: dict, tokenizer, max_length: int,
              query: str = "whole-dialogue") -> list[dict]:
    """One summary per turn: real-dialogue share of the query window, reply kinds, list overlap.
    query: the conversations' --retriever-query (common.retriever_context)."""
    turns = max(len(c["turns"]) for c in conversations)
    rows = []
    for t in range(1, turns + 1):
        shares, none_left, replies, named, copied, overlap, n = [], 0, 0, 0, 0, [], 0
        for c in conversations:
            if len(c["turns"]) < t:
                continue  # the conversation stopped: a target was ranked first
            n += 1
            real = samples[c["dialog_id"], c["turn"]]["context"]
            played = [x for turn in c["turns"][:t - 1] for x in ({"role": "recommender", "text": turn["said"]},
                                                                   {"role": "seeker", "text": turn["reply"]})]
            simulated = common.retriever_context(real, real + played, query)[len(real):]  # what the query added
            whole = len(tokenizer(common.dialogue_text(real + simulated))["input_ids"])
            fed = len(tokenizer(common.dialogue_text(simulated))["input_ids"]) if simulated else 0
            kept_real = max(0, min(whole, max_length) - fed)  # the window keeps the last max_length tokens
            shares.append(kept_real / max(min(whole, max_length), 1))
            none_left += kept_real == 0 and bool(real)  # a sample at the dialogue's start has no real turn to lose
            if t > 1:
                last = c["turns"][t - 2]
                replies += 1
                named += any(common.names_title(last["reply"], title) for title in last["list"][:3])
                copied += common.copies_turn(last["reply"], last["said"])
            overlap.append(len(set(c["turns"][t - 1]["list"]) & set(c["turns"][0]["list"])))
        rows.append({"turn": t, "conversations": n, "real_share": sum(shares) / n, "no_real_dialogue": none_left,
                     "replies": replies, "reply_names_shown": named, "reply_copies_recommender": copied,
                     "overlap_with_turn_1": sum(overlap) / n})
    return rows


def markdown(rows: list[dict], command: str, query: str = "whole-dialogue") -> str:
    lines = [f"`{command}` (retriever query: {query})", "", "| turn | conversations | real dialogue's share of the encoded query | queries with "
             "none of it | replies feeding the turn | naming a title shown | copying the recommender's sentence | "
             "top 10 shared with turn 1 |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['turn']} | {r['conversations']} | {r['real_share']:.2f} | {r['no_real_dialogue']} | "
                     f"{r['replies'] or '-'} | {r['reply_names_shown'] if r['replies'] else '-'} | "
                     f"{r['reply_copies_recommender'] if r['replies'] else '-'} | {r['overlap_with_turn_1']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="run directory with eval/conversations_<row>.jsonl (05_eval.py)")
    parser.add_argument("--row", default="retriever+simulator", help="the multi-turn row whose conversations to read")
    parser.add_argument("--max-length", type=int, default=256, help="tokens the sentence encoder keeps (encode_texts)")
    args = parser.parse_args(argv)
    run = common.RunPaths(args.run_dir)
    path = run.root / "eval" / f"conversations_{args.row}.jsonl"
    if not path.exists():
        raise SystemExit(f"no {path}: run 05_eval.py --run-dir {args.run_dir} --rows {args.row}")
    results = common.read_json(run.root / "eval" / "results.json")
    samples = {(s["dialog_id"], s["turn"]): s for s in common.load_samples(run, results["split"])}
    from transformers import AutoTokenizer

    encoder = common.read_json(run.root / "retriever" / "report.json")["args"]["encoder"]  # what 03 built on
    tokenizer = AutoTokenizer.from_pretrained(common.resolve_encoder(encoder))
    # results.json written before --retriever-query existed: what those conversations did
    query = results["args"].get("retriever_query", evaluate.BEFORE_FLAG["retriever_query"])
    rows = turn_rows(common.read_jsonl(path), samples, tokenizer, args.max_length, query)
    table = markdown(rows, f"python tools/feedback_effect.py --run-dir {args.run_dir} --row {args.row}",
                     query)
    common.atomic_write_bytes(run.root / "eval" / f"feedback_effect_{args.row}.md", (table + "\n").encode())
    print(table)
    return rows


if __name__ == "__main__":
    main()
