"""tools/paired_gains.py on a hand-made 05 output whose paired gains are worked out by hand."""
import importlib.util
import math
from pathlib import Path

import pytest

import common

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("paired_gains", REPO / "tools" / "paired_gains.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def fake_run(tmp_path: Path, vs_reference: dict | None = None) -> Path:
    """Three test samples, one new target each (5, 7, 9), played by sft+simulator and smtpo.
    turn 1, target's rank (sft, smtpo): A 2 -> 1, B 1 -> 1, C 1 -> none; turn 2: all equal."""
    run = tmp_path / "run"
    samples = [{"dialog_id": d, "turn": 2, "new_targets": [t], "targets": [t]} for d, t in (("a", 5), ("b", 7), ("c", 9))]
    samples.insert(1, {"dialog_id": "other", "turn": 2, "new_targets": [3], "targets": [3]})  # not drawn
    common.write_jsonl(run / "data" / "samples_test.jsonl", samples)
    filler = list(range(20, 40))
    sft = {"turn 1": [[1, 5, *filler], [7, *filler], [9, *filler]], "turn 2": [[5, *filler]] * 3}
    rl = {"turn 1": [[5, 1, *filler], [7, *filler], [*filler[:10], 9]], "turn 2": [[5, *filler]] * 3}
    smtpo = {"lists": rl, **({"vs_reference": vs_reference} if vs_reference else {})}
    # base-zero-shot: one turn, its turn-2 list is its turn-1 list; 05 pairs it too. sft-single-turn is
    # sft+simulator's turn 1, never paired
    base_list = [[*filler[:10], 5], [7, *filler], [9, *filler]]
    base = {"lists": {"turn 1": base_list, "turn 2": list(base_list)}}
    single = {"lists": {"turn 1": sft["turn 1"], "turn 2": sft["turn 1"]}}
    # 05's draw order is c, a, b (not the file's): the lists, written above in a, b, c order, follow it
    order = [2, 0, 1]
    for row in (sft, rl, base["lists"]):
        for turn in row:
            row[turn][:] = [row[turn][i] for i in order]
    common.write_json(run / "eval" / "results.json", {
        "split": "test", "turns": 2, "args": {"bootstrap": 200, "seed": 0},
        "multi_turn": {"base-zero-shot": base, "sft-single-turn": single, "sft+simulator": {"lists": sft}, "smtpo": smtpo}})
    common.write_jsonl(run / "eval" / "conversations_sft+simulator.jsonl",
                       [{"dialog_id": d, "turn": 2} for d in ("c", "a", "b")])
    return run


def test_paired_gains_by_hand(tmp_path):
    run = fake_run(tmp_path)
    gains = tool.paired_gains(str(run))["rows"]["smtpo"]
    first = {m: gains[m]["turn 1"] for m in ("recall@1", "recall@10", "ndcg@10")}
    # R@1: A +1, C -1 over 3 labels; R@10: C -1; NDCG@10: A 1 - 1/log2(3), C -1
    assert first["recall@1"]["gain"] == 0.0 and (first["recall@1"]["up"], first["recall@1"]["down"]) == (1, 1)
    assert first["recall@10"]["gain"] == pytest.approx(-1 / 3) and first["recall@10"]["down"] == 1
    assert first["ndcg@10"]["gain"] == pytest.approx((1 - 1 / math.log2(3) - 1) / 3)
    assert all(gains[m]["turn 2"]["gain"] == 0.0 for m in gains)
    rows = tool.paired_gains(str(run))["rows"]
    assert list(rows) == ["base-zero-shot", "smtpo"]
    # base-zero-shot ranks A's target 11th where sft+simulator's turn 1 ranks it 2nd: R@10 -1 of 3 labels
    assert rows["base-zero-shot"]["recall@10"]["turn 1"]["gain"] == pytest.approx(-1 / 3)
    text = tool.main(["--run-dir", str(run)])
    assert "| smtpo | +0.000 [" in text and "(1 / 1) | +0.000 [+0.000, +0.000] (0 / 0) | -0.333 [" in text
    assert (run / "eval" / "paired_gains.md").read_text() == text


def test_a_row_whose_r10_differs_from_05s_pairing_is_refused(tmp_path):
    wrong = {t: {"gain": 0.5, "ci": [0, 1], "up": 1, "down": 0, "samples": 3} for t in ("turn 1", "turn 2")}
    with pytest.raises(SystemExit, match="differs from 05's own pairing"):
        tool.paired_gains(str(fake_run(tmp_path, wrong)))


def test_another_reference_row_pairs_the_others_with_it(tmp_path):
    run = fake_run(tmp_path)
    common.write_jsonl(run / "eval" / "conversations_smtpo.jsonl", [{"dialog_id": d, "turn": 2} for d in ("c", "a", "b")])
    gains = tool.paired_gains(str(run), "smtpo")
    assert gains["reference"] == "smtpo" and list(gains["rows"]) == ["base-zero-shot", "sft+simulator"]
    # the same pairs the other way round: every gain changes sign, up and down swap
    back = tool.paired_gains(str(run))["rows"]["smtpo"]
    for metric, by_turn in gains["rows"]["sft+simulator"].items():
        for turn, g in by_turn.items():
            assert g["gain"] == pytest.approx(-back[metric][turn]["gain"])
            assert (g["up"], g["down"]) == (back[metric][turn]["down"], back[metric][turn]["up"])
    text = tool.main(["--run-dir", str(run), "--reference", "smtpo"])
    assert text.startswith("Each row minus smtpo") and (run / "eval" / "paired_gains_vs_smtpo.md").exists()
    with pytest.raises(SystemExit):  # a single-turn row writes no conversation file to pair by
        tool.main(["--run-dir", str(run), "--reference", "sft-single-turn"])
