"""tools/rollout_temperature.py: the group statistics by hand, and a run on the tiny model."""
import importlib.util
import inspect
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("rollout_temperature", ROOT / "tools" / "rollout_temperature.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reward(fmt, recommend):
    return {"format": fmt, "recommend": recommend, "preference": 0.0, "reward": fmt + recommend}


def test_group_stats_by_hand():
    rewards = [reward(1, 1.0), reward(0, 0.0),    # mixed format, varied reward
               reward(0, 0.0), reward(0, 0.0),    # nothing to learn
               reward(0, 0.5), reward(0, 0.0)]    # format all 0, reward varies through recommend
    assert tool.group_stats(rewards, 2) == {"valid": 1, "mixed": 1, "varied": 2, "groups": 3, "recommend": 0.25}


# Answers swapped in by test_runs_on_the_tiny_model, per temperature and answer index (G 2: groups (0, 1) and
# (2, 3)): ("valid", r) a list of 10 candidates with the target at rank r, ("nine", r) the same with 9 titles
# (has both tags, does not parse), None the tiny model's own 4-token answer (never parses, names nothing).
SWAPPED = {1.0: [("valid", 1), None, ("valid", 2), ("valid", 2)],
           0.5: [None, ("nine", 1), ("valid", 1), ("valid", 3)]}
# the rows those answers give, by hand: valid answers, groups with mixed format, groups with varied reward,
# mean recommend (1/log2(1 + r) of a parsed list; 0 for an answer that does not parse, even though its
# filled list starts with the target, and for the model's answers)
EXPECTED = {1.0: ["3 of 4", "1 of 2", "1 of 2", f"{(1 + 2 / math.log2(3)) / 4:.3f}"],   # group 2: same lists
            0.5: ["2 of 4", "0 of 2", "2 of 2", f"{(0 + 1 + 1 + 0.5) / 4:.3f}"]}       # varied by recommend only


def test_runs_on_the_tiny_model(inspired_tiny_adapters, tmp_path, make_run, capsys, monkeypatch):
    """The printed and written rows against counts worked out by hand. The tiny model's 4-token answers never
    parse, so every count would be 0 whatever the tool counted: a wrapper of common.recommend_with_llm keeps
    the model's tokens but swaps in the SWAPPED answers, and makes each start state's true target the
    retriever's first candidate. The rows then depend on which answers parse, on where the target sits and
    on how answers are grouped: a tool that groups answers of different start states together, counts an
    answer with tags as valid, credits an invalid answer with the retriever's order, samples at another
    temperature or prints a column of another run fails here."""
    common = tool.common
    real_recommend, real_start = common.recommend_with_llm, common.start_episodes
    played, temperatures = [], []

    def start(*a, **k):
        played.append(real_start(*a, **k))
        return played[-1]

    def recommend(*a, **k):
        call = inspect.signature(real_recommend).bind(*a, **k).arguments
        temperatures.append(call["temperature"])
        answers = real_recommend(*a, **k)
        items, titles = call["items"], call["titles"]
        for i, (episode, c) in enumerate(zip(played[-1], call["candidates"])):
            episode.truth = [c[0]]   # read by 04's turn_reward and by Conversation.recommend's own_rank
            if SWAPPED[call["temperature"]][i] is None:
                continue
            kind, rank = SWAPPED[call["temperature"]][i]
            listed = c[1:rank] + [c[0]] + c[rank:10 if kind == "valid" else 9]
            lines = "\n".join(f"{n}. {items[x]['title']}" for n, x in enumerate(listed, 1))
            text = f"<answer>\n{lines}\n</answer>"
            parsed = common.parse_recommendation(text, titles, c)
            answers[i] = {**answers[i], "text": text, "parsed": parsed, "ranked": common.fill_ranking(parsed["ids"], c)}
        return answers

    monkeypatch.setattr(common, "start_episodes", start)
    monkeypatch.setattr(common, "recommend_with_llm", recommend)
    run = make_run(inspired_tiny_adapters, tmp_path / "run", ("data", "retriever", "recommender_sft"))
    tool.main(["--run-dir", str(run), "--temperatures", "1.0", "0.5", "--start-states", "2", "--group-size", "2",
               "--max-new-tokens", "4", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1.0 |", "| 0.5 |"))]
    assert temperatures == [1.0, 0.5] and len(played) == 2 and len(rows) == 2
    for temperature, episodes, row in zip((1.0, 0.5), played, rows):
        # the swaps did what SWAPPED says: G 2 consecutive copies of each start state, the same candidates
        assert episodes[0].sample is episodes[1].sample is not episodes[2].sample is episodes[3].sample
        assert episodes[0].turns[0]["candidates"] == episodes[1].turns[0]["candidates"]
        assert [e.turns[0]["parsed"]["valid"] for e in episodes] == [s is not None and s[0] == "valid"
                                                                     for s in SWAPPED[temperature]]
        tokens = sum(len(e.turns[0]["completion_ids"]) for e in episodes) / 4   # the model's, kept by the swap
        assert row.split(" | ")[:6] == [f"| {temperature}"] + EXPECTED[temperature] + [f"{tokens:.0f}"]
    written = (run / "rollout_temperature.md").read_text()
    assert written.startswith("`python tools/rollout_temperature.py --run-dir") and all(r in written for r in rows)
