"""tools/parse_failures.py classifies every recommender answer of 05's conversation files."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("parse_failures", ROOT / "tools" / "parse_failures.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def answer(lines, closed=True):
    return "Preference: comedy\n<answer>\n" + "\n".join(f"{k + 1}. {t}" for k, t in enumerate(lines)) + (
        "\n</answer>" if closed else "")


def twelve_film_run(tmp_path):
    """A run directory whose catalogue is 12 films, with an empty eval/. -> (run dir, titles)"""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "eval").mkdir()
    titles = [f"Film {k} ({2000 + k})" for k in range(12)]
    rows = [json.dumps({"item_id": i, "title": t}) for i, t in enumerate(titles)]
    (run / "data" / "items.jsonl").write_text("\n".join(rows))
    (run / "data" / "dialogues_train.jsonl").write_text("")
    return run, titles


def test_each_failure_kind_is_counted(tmp_path, capsys):
    run, titles = twelve_film_run(tmp_path)
    ten = titles[:10]
    turns = [answer(ten), answer(ten[:9]), answer(ten + titles[10:11]), answer(ten[:9] + ["Unknown Movie (1990)"]),
             answer(ten[:9] + ten[:1]), answer(ten, closed=False), ""]
    conv = {"dialog_id": "d1", "turns": [{"candidates": titles, "answer": a} for a in turns]}
    (run / "eval" / "conversations_sft.jsonl").write_text(json.dumps(conv))
    (run / "eval" / "conversations_retriever.jsonl").write_text(json.dumps({"dialog_id": "d1", "turns": [
        {"candidates": titles, "answer": ""}]}))
    tool.main(["--run-dir", str(run)])
    out = capsys.readouterr().out
    # 6 LLM answers (the empty one is a retriever turn): one of each kind
    assert "| sft | 6 | 1 (17%) | 1 (17%) | 1 (17%) | 1 (17%) | 1 (17%) | 1 (17%) |" in out
    assert "| retriever |" not in out
    assert out.splitlines()[2].endswith("| n/a |")  # no recorded lengths: the budget column cannot be counted


def test_unclosed_answers_at_the_token_budget_are_counted(tmp_path, capsys):
    run, titles = twelve_film_run(tmp_path)
    (run / "eval" / "results.json").write_text(json.dumps({"args": {"max_new_tokens": 20}}))
    turns = [{"candidates": titles, "answer": answer(titles[:10]), "completion_tokens": 12},
             {"candidates": titles, "answer": answer(titles[:10], closed=False), "completion_tokens": 20},  # cut off
             {"candidates": titles, "answer": answer(titles[:10], closed=False), "completion_tokens": 9}]  # stopped
    (run / "eval" / "conversations_smtpo.jsonl").write_text(json.dumps({"dialog_id": "d1", "turns": turns}))
    tool.main(["--run-dir", str(run)])
    out = capsys.readouterr().out
    assert "used the whole budget (20 tokens) |" in out.splitlines()[0]
    assert "| smtpo | 3 | 1 (33%) | 2 (67%) |" in out and out.splitlines()[2].endswith("| 1 of 2 |")


def test_lists_are_checked_against_their_own_ranking_line(tmp_path, capsys):
    run, titles = twelve_film_run(tmp_path)
    chain = lambda order: "Ranking: " + ", ".join(f"#{k}" for k in order) + "\n"  # noqa: E731
    in_order, swapped = list(range(1, 11)), [2, 1] + list(range(3, 11))
    turns = [chain(in_order) + answer(titles[:10]),  # retriever order, followed
             chain(in_order) + answer([titles[1], titles[0]] + titles[2:10]),  # retriever order, not followed
             chain(swapped) + answer([titles[1], titles[0]] + titles[2:10]),  # its own order, followed
             chain([2, 1, 3, 4, 5, 6, 7, 8, 9, 14]) + answer(titles[:10]),  # a number beyond the 12 candidates
             answer(titles[:10])]  # no Ranking line
    (run / "eval" / "conversations_sft.jsonl").write_text(json.dumps(
        {"dialog_id": "d1", "turns": [{"candidates": titles, "answer": a} for a in turns]}))
    tool.main(["--run-dir", str(run)])
    out = capsys.readouterr().out
    row = out.splitlines()[2].split(" | ")
    assert row[1] == "5" and row[2] == "5 (100%)"  # all valid
    assert row[2 + len(tool.rec.PARSE_KINDS):5 + len(tool.rec.PARSE_KINDS)] == ["2 (40%)", "2 (40%)", "2 (40%)"]
    # the second answer starts with #2 where its Ranking line puts #1 first (the fourth is not checkable)
    assert "#1 in 2 of 5 answers; the list starts with another candidate in 1, 0 of them invalid" in out


def test_a_list_that_does_not_start_with_its_ranking_lines_first_is_counted_when_invalid(tmp_path, capsys):
    run, titles = twelve_film_run(tmp_path)
    promoted = "Ranking: #12, #1, #2, #3, #4, #5, #6, #7, #8, #9\n"
    turns = [promoted + answer(titles[11:12] + titles[:9]),  # #12's title first: valid and consistent
             promoted + answer(titles[3:4] + titles[:9]),  # another title first, then a duplicate: invalid
             promoted + answer(titles[9:10] + titles[:9])]  # another title first, still ten distinct: valid
    (run / "eval" / "conversations_sft.jsonl").write_text(json.dumps(
        {"dialog_id": "d1", "turns": [{"candidates": titles, "answer": a} for a in turns]}))
    tool.main(["--run-dir", str(run)])
    out = capsys.readouterr().out
    assert "- sft: #12 in 3 of 3 answers; the list starts with another candidate in 2, 1 of them invalid" in out


def test_conversations_whose_candidates_hold_a_target_are_counted_by_turn(tmp_path, capsys):
    run, titles = twelve_film_run(tmp_path)
    # turn 1 recalls only films 0-9, turn 2 all 12: a target (film 11) becomes reachable at turn 2
    turns = [{"candidates": titles[:10], "answer": answer(titles[:10])},
             {"candidates": titles, "answer": answer(titles[:10])}]
    convs = [{"dialog_id": "d1", "truth": [titles[11]], "turns": turns},
             {"dialog_id": "d2", "truth": [titles[0]], "turns": turns},
             {"dialog_id": "d3", "truth": ["Not In The Catalogue (1950)"], "turns": turns}]
    (run / "eval" / "conversations_sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    tool.main(["--run-dir", str(run)])
    out = capsys.readouterr().out
    assert out.endswith("(the ceiling of R@K):\n- sft: 1, 2 of 3\n")


def test_valid_answers_are_split_by_candidates_without_a_year(tmp_path, capsys):
    run, titles = twelve_film_run(tmp_path)
    (run / "data" / "items.jsonl").write_text("\n".join(json.dumps({"item_id": i, "title": t})
                                                        for i, t in enumerate(titles + ["Thor"])))
    yearless = ["Thor"] + titles[1:10]
    # with "Thor" among the candidates: one valid answer, one that ran on past the title; without: one valid
    turns = [{"candidates": yearless, "answer": answer(yearless)},
             {"candidates": yearless, "answer": answer(["Thor: action; dir. X"] + yearless[1:])},
             {"candidates": titles[:10], "answer": answer(titles[:10])}]
    (run / "eval" / "conversations_sft.jsonl").write_text(json.dumps({"dialog_id": "d1", "turns": turns}))
    tool.main(["--run-dir", str(run)])
    out = capsys.readouterr().out
    assert "- sft: a candidate without a year, 1 of 2; every candidate with a year, 1 of 1" in out
    assert "The catalogue: 13 titles, 1 without a year, 0 holding ': ', 0 holding ' | '" in out


def test_sft_report_tells_a_repeated_ranking_number_from_a_repeated_copy(tmp_path, capsys):
    run, titles = twelve_film_run(tmp_path)
    ranking = lambda order: "Ranking: " + ", ".join(f"#{k}" for k in order) + "\n"  # noqa: E731
    repeats_number = ranking([1, 2, 3, 4, 5, 6, 7, 8, 9, 1]) + answer(titles[:9] + titles[:1])
    repeats_copy = ranking(list(range(1, 11))) + answer(titles[:8] + [titles[1], titles[9]])
    no_candidate = ranking(list(range(1, 11))) + answer(titles[:9] + ["Unknown Movie (1990)"])
    failures = [(["duplicate"], repeats_number), (["duplicate"], repeats_copy), (["names no candidate"], no_candidate)]
    kept = [{"sample": k, "kinds": kinds, "candidates": list(range(12)), "text": text}
            for k, (kinds, text) in enumerate(failures)]
    (run / "recommender_sft").mkdir()
    (run / "recommender_sft" / "quality.json").write_text(json.dumps(
        {"tuned": {"samples": 10, "parse_rate": 0.7, "invalid_examples": kept}}))
    tool.main(["--run-dir", str(run), "--sft-report"])
    out = capsys.readouterr().out
    assert "7 of 10 answers valid; 3 invalid ones kept" in out
    # no closed, fewer, more, names no candidate, duplicate | no Ranking line, repeats a number, repeats a title
    assert "| 0 | 0 | 0 | 1 | 2 | 0 | 1 | 1 |" in out
    assert "- sample 1: duplicate (a distinct Ranking line, the list repeats a title); Ranking #1, #2, #3, #4, #5, " \
           "#6, #7, #8, #9, #10; list #1, #2, #3, #4, #5, #6, #7, #8, #2, #10" in out
    assert "list #1, #2, #3, #4, #5, #6, #7, #8, #9, ?" in out
    (run / "recommender_sft" / "quality.json").write_text(json.dumps({"tuned": {"samples": 10, "parse_rate": 0.7}}))
    with pytest.raises(SystemExit, match="keeps no invalid answers"):
        tool.main(["--run-dir", str(run), "--sft-report"])
