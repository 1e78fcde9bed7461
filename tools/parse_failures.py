"""Why recommender answers fail to parse: counts of each failure kind in 05's conversation files.

An answer is valid (common.parse_recommendation) when it has <answer>...</answer> and exactly 10
entries naming 10 distinct candidates. For every recommender turn of each
eval/conversations_<row>.jsonl this re-parses the stored answer against the turn's own candidates
and counts, per row with an LLM recommender: valid, no closed <answer> block, fewer or more than 10
entries, an entry that names no candidate, two entries naming the same candidate (an answer can have
several kinds; 03's PARSE_KINDS). Of the answers with no closed block, it counts those that used the
whole generation budget (--max-new-tokens of eval/results.json) when the file records each answer's
completion tokens (n/a for a file without them). Two more counts show whether the list comes
from the chain: answers whose Ranking line is the retriever's order (#1, #2, ..., #10), answers whose list names
exactly the candidates their own Ranking line gives, in its order, and answers whose first entry is
the Ranking line's first candidate; each row's note gives the Ranking line's most common first number
(the SFT targets put a true target first, which the prompt does not show: a model that guesses one
number there must then write that candidate's title first, the lookup that fails most).
Then, per row, the valid share of answers whose candidates include a title without a year and of
the others: a year closes a title, so an answer that copies a title without one must know where it
ends (with common.REC_PROMPT_VERSION 1's "Title: attributes" lines it often ran on into them).
Then how many catalogue titles have no year, and how many hold either version's separator.
Last, per row, how many conversations hold a true target among the turn's K candidates, by turn: no
re-ranking can find a target the retriever did not recall, so this is the ceiling of the row's hits.

    python tools/parse_failures.py --run-dir runs/inspired [--examples 3]

With --sft-report it reads 03's <run-dir>/recommender_sft/quality.json instead, whose tuned model's
invalid answers are kept whole (the first 30): each one's failure kinds, where a duplicate comes
from (the Ranking line repeats a candidate number, or the line is distinct and the list repeats
a title), and the candidate numbers of its Ranking line and of its list.

    python tools/parse_failures.py --run-dir runs/redial --sft-report
"""
import argparse
import importlib
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

rec = importlib.import_module("03_sft_recommender")

OUT_OF_TOKENS = "no closed <answer>: used the whole budget"
FIRST_ELSEWHERE = "a Ranking line, whose first candidate the list does not start with"
CHAIN = ("Ranking line #1 ... #10", "list follows its Ranking line", "1st entry is the Ranking line's 1st")
_RANKING = re.compile(r"^\s*Ranking:(.*)$", re.M)
_YEAR_LAST = re.compile(r"\(\d{4}\)\s*$")
YEARLESS = ("a candidate without a year", "every candidate with a year")


def ranking_numbers(text: str) -> list[int]:
    """The candidate numbers of an answer's Ranking line ("Ranking: #17, #1, ..." -> [17, 1, ...]); [] without one."""
    found = _RANKING.search(text)
    return [int(k) for k in re.findall(r"#(\d+)", found.group(1))] if found else []


def chain_kinds(numbers: list[int], parsed: dict, candidates: list[int], n: int = common.REC_TOP_N) -> list[str]:
    """The CHAIN counts an answer falls in: its Ranking line names candidates #1..#n in order;
    its list's entries are the candidates its Ranking line names, in that order; its list's first
    entry is the Ranking line's first candidate, or else FIRST_ELSEWHERE. numbers: its Ranking line's
    (ranking_numbers); none of these for an answer without one or with a number beyond the candidates."""
    if not numbers or not all(1 <= k <= len(candidates) for k in numbers):
        return []
    kinds = [CHAIN[0]] if numbers == list(range(1, n + 1)) else []
    if parsed["ids"] == [candidates[k - 1] for k in numbers]:
        kinds.append(CHAIN[1])
    kinds.append(CHAIN[2] if parsed["ids"][:1] == [candidates[numbers[0] - 1]] else FIRST_ELSEWHERE)
    return kinds


DUPLICATE_ORIGINS = ("no Ranking line", "the Ranking line repeats a number",
                     "a distinct Ranking line, the list repeats a title")


def duplicate_origin(numbers: list[int], parsed: dict) -> str | None:
    """Where an answer's duplicate comes from (one of DUPLICATE_ORIGINS); None for an answer without one.
    numbers: its Ranking line's (ranking_numbers)."""
    if "duplicate" not in rec.parse_failure_kinds(parsed):
        return None
    if not numbers:
        return DUPLICATE_ORIGINS[0]
    return DUPLICATE_ORIGINS[1] if len(set(numbers)) < len(numbers) else DUPLICATE_ORIGINS[2]


def sft_report(run: common.RunPaths, titles: common.TitleIndex) -> None:
    """The tuned model's invalid answers kept in 03's quality.json: counts, then one line each."""
    path = run.require("recommender_sft", "quality.json") / "quality.json"
    tuned = common.read_json(path)["tuned"]
    kept = tuned.get("invalid_examples")
    if kept is None:
        raise SystemExit(f"error: {path} keeps no invalid answers (03 wrote it before it kept them): rerun "
                         "03_sft_recommender.py --steps 0 --init-adapter on its adapter for a new report")
    counts, lines = Counter(), []
    for e in kept:
        parsed = common.parse_recommendation(e["text"], titles, e["candidates"])
        numbers = ranking_numbers(e["text"])
        origin = duplicate_origin(numbers, parsed)
        counts.update(rec.parse_failure_kinds(parsed) + ([origin] if origin else []))
        listed = ["#%d" % (e["candidates"].index(i) + 1) if i is not None else "?" for i in parsed["ids"]]
        lines.append(f"- sample {e['sample']}: {', '.join(e['kinds'])}" + (f" ({origin})" if origin else "")
                     + f"; Ranking {', '.join(f'#{k}' for k in numbers) or '-'}; list {', '.join(listed) or '-'}")
    valid = round(tuned["parse_rate"] * tuned["samples"])
    print(f"{path}: {valid} of {tuned['samples']} answers valid; {len(kept)} invalid ones kept")
    columns = rec.PARSE_KINDS[1:] + DUPLICATE_ORIGINS
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    print("| " + " | ".join(str(counts[k]) for k in columns) + " |")
    print("\nEach invalid answer (? = an entry that names no candidate):\n" + "\n".join(lines))


def count_file(path: Path, titles: common.TitleIndex, id_of: dict[str, int], examples: int,
               budget: int | None) -> tuple[Counter, int, list, Counter, Counter]:
    """Counts of PARSE_KINDS (03's) and CHAIN (and OUT_OF_TOKENS; "unmeasured" for unclosed answers of
    unknown length; "conversations", the file's lines), LLM turns, failed answers described, the Ranking
    lines' first numbers, and per turn index (0-based) the conversations whose candidates hold a true target."""
    counts, turns, shown, first_numbers, reachable = Counter(), 0, [], Counter(), Counter()
    for line_no, conv in common.numbered_jsonl(path):
        counts["conversations"] += 1
        for t, turn in enumerate(conv["turns"]):
            reachable[t] += any(title in turn["candidates"] for title in conv.get("truth", []))
            if not turn["answer"]:  # a row without an LLM recommender (the retriever's list)
                continue
            try:
                candidates = [id_of[t] for t in turn["candidates"]]
            except KeyError as e:
                raise SystemExit(f"{path}:{line_no}: candidate {e} is not in the run's items.jsonl; "
                                 "was this file written from another run directory?")
            parsed = common.parse_recommendation(turn["answer"], titles, candidates)
            kinds = rec.parse_failure_kinds(parsed)
            numbers = ranking_numbers(turn["answer"])
            chain = chain_kinds(numbers, parsed, candidates)
            counts.update(kinds + chain)
            yearless = YEARLESS[all(_YEAR_LAST.search(title) for title in turn["candidates"])]
            counts[yearless] += 1
            counts[yearless + ", valid"] += "valid" in kinds
            first_numbers.update(numbers[:1])
            counts[FIRST_ELSEWHERE + ", invalid"] += FIRST_ELSEWHERE in chain and "valid" not in kinds
            if "no closed <answer>" in kinds:
                if budget is None or "completion_tokens" not in turn:
                    counts["unmeasured"] += 1
                else:
                    counts[OUT_OF_TOKENS] += turn["completion_tokens"] >= budget
            turns += 1
            if "valid" not in kinds and len(shown) < examples:
                bad = [e for e, i in zip(parsed["entries"], parsed["ids"]) if i is None]
                shown.append(f"{conv['dialog_id']}: {', '.join(kinds)}; {len(parsed['entries'])} entries"
                             + (f"; unmatched {bad[:3]}" if bad else ""))
    return counts, turns, shown, first_numbers, reachable


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="run directory whose eval/conversations_*.jsonl to read")
    parser.add_argument("--examples", type=int, default=2, help="failed answers to describe per row")
    parser.add_argument("--sft-report", action="store_true",
                        help="read the invalid answers of 03's recommender_sft/quality.json instead of 05's files")
    args = parser.parse_args(argv)
    run = common.RunPaths(args.run_dir)
    items = common.load_items(run)
    titles = rec.run_title_index(run, items)
    if args.sft_report:
        return sft_report(run, titles)
    id_of = {it["title"]: i for i, it in enumerate(items)}
    files = sorted(run.require("eval").glob("conversations_*.jsonl"))
    if not files:
        raise SystemExit(f"error: no {run.eval}/conversations_*.jsonl: run 05_eval.py --run-dir {args.run_dir} first")
    results = run.eval / "results.json"
    budget = common.read_json(results)["args"].get("max_new_tokens") if results.exists() else None
    columns = rec.PARSE_KINDS + CHAIN
    print("| row | turns | " + " | ".join(columns) + f" | {OUT_OF_TOKENS}{f' ({budget} tokens)' if budget else ''} |"
          "\n|---|---|" + "---|" * (len(columns) + 1))
    notes, firsts, ceilings, years = [], [], [], []
    for path in files:
        counts, turns, shown, first_numbers, reachable = count_file(path, titles, id_of, args.examples, budget)
        row = path.stem[len("conversations_"):]
        by_turn = ", ".join(str(reachable[t]) for t in sorted(reachable))
        ceilings.append(f"- {row}: {by_turn} of {counts['conversations']}")
        if not turns:
            continue
        out_of_tokens = "n/a" if counts["unmeasured"] else f"{counts[OUT_OF_TOKENS]} of {counts['no closed <answer>']}"
        print(f"| {row} | {turns} | " + " | ".join(f"{counts[k]} ({counts[k] / max(turns, 1):.0%})" for k in columns)
              + f" | {out_of_tokens} |")
        notes += [f"- {row}: {s}" for s in shown]
        years.append(f"- {row}: " + "; ".join(f"{k}, {counts[k + ', valid']} of {counts[k]}" for k in YEARLESS))
        if first_numbers:
            (k, times), = first_numbers.most_common(1)
            firsts.append(f"- {row}: #{k} in {times} of {turns} answers; the list starts with another candidate "
                          f"in {counts[FIRST_ELSEWHERE]}, {counts[FIRST_ELSEWHERE + ', invalid']} of them invalid")
    if firsts:
        print("\nThe Ranking line's most common first number:\n" + "\n".join(firsts))
    if notes:
        print("\nFailed answers (first of each row):\n" + "\n".join(notes))
    if years:
        print("\nValid answers when the candidates include a title without a year, and when not:\n" + "\n".join(years))
    names = [it["title"] for it in items]
    print(f"\nThe catalogue: {len(names)} titles, {sum(not _YEAR_LAST.search(t) for t in names)} without a year, "
          f"{sum(': ' in t for t in names)} holding ': ', {sum(' | ' in t for t in names)} holding ' | ' "
          "(the separators of the candidate lines of prompt versions 1 and 2)")
    print("\nConversations whose K candidates hold a true target, by turn (the ceiling of R@K):\n"
          + "\n".join(ceilings))


if __name__ == "__main__":
    main()
