"""tools/feedback_effect.py: what the simulated turns do to the retriever's query, counted by hand."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("feedback_effect", ROOT / "tools" / "feedback_effect.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def words(text):  # a tokenizer whose tokens are words, so the counts below can be done by hand
    return {"input_ids": text.split()}


def test_real_dialogue_share_reply_kinds_and_overlap_by_hand():
    samples = {("d1", 3): {"context": [{"role": "seeker", "text": "a b c d e f g h"}]}}  # "User: a ... h": 9 words
    others = [f"Film {k} (1990)" for k in range(9)]
    turns = [
        # 6 + 6 words fed to turn 2; the reply copies the recommender's sentence and names a title shown
        {"said": "I would recommend Xanadu (2001).", "reply": "I would recommend Xanadu (2001).",
         "list": ["Xanadu (2001)", *others]},
        # 6 + 6 more to turn 3; this reply answers, naming a title it was shown
        {"said": "I would recommend Yentl (2002).", "reply": "I loved Yentl (2002) and more",
         "list": ["Yentl (2002)", *others]},
        {"said": None, "reply": None, "list": ["Zelig (1983)", "Yentl (2002)", *others[:8]]},
    ]
    stopped = {"dialog_id": "d1", "turn": 3, "turns": turns[:1]}  # a target ranked first at turn 1
    rows = tool.turn_rows([{"dialog_id": "d1", "turn": 3, "turns": turns}, stopped], samples, words, max_length=20)
    first, second, third = rows
    assert (first["conversations"], first["real_share"], first["replies"]) == (2, 1.0, 0)
    # turn 2: 9 + 12 = 21 words, the window keeps 20, of which 20 - 12 = 8 are the real dialogue
    assert second["conversations"] == 1 and second["real_share"] == 8 / 20 and second["no_real_dialogue"] == 0
    assert (second["replies"], second["reply_names_shown"], second["reply_copies_recommender"]) == (1, 1, 1)
    assert second["overlap_with_turn_1"] == 9  # Xanadu left, Yentl came in
    # turn 3: 24 simulated words fill the 20-word window
    assert third["real_share"] == 0.0 and third["no_real_dialogue"] == 1
    assert (third["reply_names_shown"], third["reply_copies_recommender"]) == (1, 0)
    assert third["overlap_with_turn_1"] == 8
    assert "| 2 | 1 | 0.40 | 0 | 1 | 1 | 1 | 9.0 |" in tool.markdown(rows, "cmd")
    # with the latest reply only, turn 3 reads 9 + 7 words ("User: I loved Yentl (2002) and more"): all 9 real ones kept
    latest = tool.turn_rows([{"dialog_id": "d1", "turn": 3, "turns": turns}], samples, words, max_length=20,
                            query="latest-feedback")
    assert latest[2]["real_share"] == 9 / 16 and latest[2]["no_real_dialogue"] == 0
    # a sample at the start of its dialogue has no real turn, so it cannot lose one
    samples[("d2", 0)] = {"context": []}
    empty = tool.turn_rows([{"dialog_id": "d2", "turn": 0, "turns": turns}], samples, words, max_length=20)
    assert empty[1]["real_share"] == 0.0 and empty[1]["no_real_dialogue"] == 0
