"""tools/rollout_temperature.py: the group statistics by hand, and a run on the tiny model."""
import importlib.util
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


def test_runs_on_the_tiny_model(inspired_tiny_adapters, tmp_path, make_run, capsys):
    run = make_run(inspired_tiny_adapters, tmp_path / "run", ("data", "retriever", "recommender_sft"))
    tool.main(["--run-dir", str(run), "--temperatures", "1.0", "0.5", "--start-states", "2", "--group-size", "2",
               "--max-new-tokens", "4", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1.0 |") or line.startswith("| 0.5 |")]
    # a 4-token answer never parses: no valid answer, no group with mixed format
    assert len(rows) == 2 and all(r.split(" | ")[1:3] == ["0 of 4", "0 of 2"] for r in rows)
    written = (run / "rollout_temperature.md").read_text()
    assert written.startswith("`python tools/rollout_temperature.py --run-dir") and all(r in written for r in rows)
