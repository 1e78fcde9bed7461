"""05 --simulator-knows-target: the positive control of the multi-turn loop (iEvaLM's protocol). The
simulator is told each target's attributes, never its title; its rows are kept apart as an upper bound."""
import importlib

import pytest

import common

evaluate = importlib.import_module("05_eval")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

KNIVES_OUT = {"title": "Knives Out (2019)", "genres": ["Mystery", "Comedy"], "directors": ["Rian Johnson"],
              "stars": ["Daniel Craig", "Chris Evans"],
              "plot": "A detective investigates a death. Knives Out turns the whodunit inside out; KNIVES OUT (2019) "
                      "keeps knives outside the story."}


def test_target_description_gives_attributes_and_never_the_title():
    text = common.target_description(KNIVES_OUT)
    assert text.startswith("Mystery, Comedy; dir. Rian Johnson; with Daniel Craig, Chris Evans; plot: A detective")
    assert not common.names_title(text, KNIVES_OUT["title"])
    assert text.count("this movie") == 2 and "knives outside" in text  # whole words only, any case, with its year
    long_plot = {"title": "Up (2009)", "plot": " ".join(["word"] * 50) + " Up (2009) ends"}
    assert common.target_description(long_plot) == "plot: " + " ".join(["word"] * 40) + " ..."
    assert common.redact_title("Upside down, Up, up (2009)!", "Up (2009)") == "Upside down, this movie, this movie!"
    assert common.target_description({"title": "Nothing (2000)"}) == "(nothing is known of it)"


def test_only_a_target_aware_feedback_prompt_describes_the_target():
    items = [KNIVES_OUT, {"title": "Clue (1985)", "genres": ["Comedy"]}]
    context = [{"role": "seeker", "text": "I want a fun mystery"}]
    plain = common.simulator_messages("feedback", context, items, "Have you seen Clue (1985)?", [1])
    told = common.simulator_messages("feedback", context, items, "Have you seen Clue (1985)?", [1], target_ids=[0])
    assert "looking for" not in plain[1]["content"] and plain[0] == told[0]
    before, after = told[1]["content"].split("The movie you are looking for")
    assert plain[1]["content"].startswith(before.rstrip())
    assert "- " + common.target_description(KNIVES_OUT) in after and after.endswith("Your reply as the seeker:")
    assert not common.names_title(told[1]["content"], KNIVES_OUT["title"])


def test_target_aware_rows_are_told_the_target_and_kept_apart(inspired_tiny_adapters, tmp_path, make_run,
                                                               monkeypatch):
    run_dir = make_run(inspired_tiny_adapters, tmp_path / "eval", ("data", "retriever", "simulator", "recommender_sft"))
    items = common.load_items(common.RunPaths(run_dir))
    settings = ["--dataset", "inspired", "--run-dir", str(run_dir), "--limit", "3", "--turns", "3",
                "--max-new-tokens", "12", "--sim-max-new-tokens", "6", "--bootstrap", "50", "--threads", "1",
                "--rows", "retriever+simulator", "sft+simulator"]
    label_free = evaluate.main(settings)
    prompts = []
    real_generate = common.generate

    def recording(model, tokenizer, batch, **kwargs):
        prompts.extend(p[-1]["content"] for p in batch if "Your reply as the seeker" in p[-1]["content"])
        return real_generate(model, tokenizer, batch, **kwargs)

    monkeypatch.setattr(common, "generate", recording)
    results = evaluate.main(settings + ["--simulator-knows-target", "--merge"])
    aware = [name + evaluate.TARGET_AWARE for name in ("retriever+simulator", "sft+simulator")]
    assert list(results["multi_turn"]) == ["retriever+simulator", "sft+simulator", *aware]
    assert results["multi_turn"]["sft+simulator"] == label_free["multi_turn"]["sft+simulator"]  # kept by --merge
    assert "vs_reference" not in results["multi_turn"][aware[0]]  # another protocol: not paired with sft+simulator
    # every simulator prompt describes the conversation's targets (3 conversations x 2 replies x 2 rows)
    assert len(prompts) == 12
    titles = {item["title"] for item in items}
    for name in aware:
        stem = name.replace(evaluate.TARGET_AWARE, "-target-aware")
        log = common.read_jsonl(run_dir / "eval" / f"conversations_{stem}.jsonl")
        for conversation in log:
            truth = [i for i, item in enumerate(items) if item["title"] in conversation["truth"]]
            assert truth and set(conversation["truth"]) <= titles
            descriptions = ["- " + common.target_description(items[t]) for t in truth]
            for turn in conversation["turns"][:-1]:
                assert any(turn["said"] in p and all(d in p for d in descriptions) for p in prompts)
            for p in prompts:  # what the simulator is told of a target never names it
                told = p.split("The movie you are looking for")[1]
                assert not any(common.names_title(told, items[t]["title"]) for t in truth)
        row = results["multi_turn"][name]
        replies = [t for c in log for t in c["turns"] if t["reply"] is not None]
        assert row["leakage_rate"] == sum(t["leaks"] for t in replies) / len(replies)
    table = (run_dir / "eval" / "results.md").read_text()
    label_free_table, upper_bound = table.split("Upper bound that uses the label")
    assert "target-aware" not in label_free_table and "| sft+simulator | " in label_free_table
    header = next(line for line in upper_bound.splitlines() if line.startswith("| system"))
    assert header.startswith("| system | R@10 t1 | R@10 t2 | R@10 t3 | ΔR@10 t1→t3")
    lines = {line.split(" | ")[0][2:]: line.split(" | ") for line in upper_bound.splitlines() if line.startswith("| ")}
    for name in aware:
        r = results["multi_turn"][name]
        assert lines[name][1:4] == [f"{t['new']['recall@10']:.3f}" for t in r["turns"]]
