"""tools/feedback_reach.py: attribute matching by hand, and a run on the tiny model."""
import importlib.util
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("feedback_reach", ROOT / "tools" / "feedback_reach.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_names_attribute_by_hand():
    item = {"title": "Knives Out (2019)", "genres": ["Mystery", "Comedy"], "directors": ["Rian Johnson"],
            "stars": ["Daniel Craig"]}
    assert tool.names_attribute("Something by rian johnson, please!", item)
    assert tool.names_attribute("A MYSTERY.", item)
    assert not tool.names_attribute("mysteryish comedic stuff with Craig", item)  # whole phrases only
    assert not tool.names_attribute("anything", {"title": "Nothing (2000)"})


def test_runs_on_the_tiny_model(inspired_tiny_adapters, tmp_path, make_run, monkeypatch):
    run = make_run(inspired_tiny_adapters, tmp_path / "run", ("data", "retriever", "simulator"))
    prompts = []
    real_generate = common.generate

    def recording(model, tokenizer, batch, **kwargs):
        prompts.extend(p[-1]["content"] for p in batch)
        return real_generate(model, tokenizer, batch, **kwargs)

    monkeypatch.setattr(common, "generate", recording)
    lines = tool.main(["--run-dir", str(run), "--limit", "3", "--threads", "1"])
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and "reply from" not in line]
    assert [r[0][2:] for r in rows] == list(tool.SOURCES)
    # the simulator answered twice (label-free, then told the target); the templated source needs no LLM
    assert len(prompts) == 6 and not any("The movie you are looking for" in p for p in prompts[:3])
    assert all("The movie you are looking for" in p for p in prompts[3:])
    for row in rows:  # the change is the difference of the two recalls (the same labels), each printed
        # to 3 decimals: 0.667 - 0.333 prints as +0.333, so rounding alone may part them by 0.0015
        assert float(row[4].split(" ")[0]) == pytest.approx(float(row[3]) - float(row[2]), abs=2e-3)
        assert row[2] == rows[0][2]  # the same first turn for every source
    assert (run / "feedback_reach.md").read_text().splitlines() == lines
