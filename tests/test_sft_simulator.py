"""Tests of 02_sft_simulator.py on the prepared INSPIRED data with a tiny random Llama (`--model tiny`)
and of the simulator prompts (common.py section 8, the task answers here)."""
import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

import common

sim = importlib.import_module("02_sft_simulator")

TINY = ["--model", "tiny", "--max-len", "192", "--batch-size", "2", "--max-train-samples", "60",
        "--max-eval-samples", "6", "--gen-batch-size", "6", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inspired_data(inspired_prepared):
    return inspired_prepared


@pytest.fixture
def run_copy(make_run):
    """A fresh run directory sharing the prepared data (so each run has its own simulator/)."""
    return lambda base, tmp_path, name: make_run(base, tmp_path / name)


def test_missing_data_names_the_prep_script(tmp_path):
    with pytest.raises(SystemExit, match="01_prep_data.py"):
        sim.main(["--run-dir", str(tmp_path), "--model", "tiny"])


def test_prompt_helpers_round_trip():
    items = [{"title": "Knives Out (2019)", "genres": ["Mystery"], "directors": ["Rian Johnson"],
              "stars": ["Daniel Craig", "Chris Evans", "Ana de Armas"]},
             {"title": "Joker (2019)", "genres": [], "directors": ["Todd Phillips"], "stars": ["Joaquin Phoenix"]}]
    answer = sim.attribute_answer(items, [0, 1])
    assert answer == "Genres: Mystery; People: Rian Johnson, Daniel Craig, Chris Evans, Todd Phillips, Joaquin Phoenix"
    assert common.parse_attributes(answer) == {"mystery", "rian johnson", "daniel craig", "chris evans",
                                               "todd phillips", "joaquin phoenix"}
    assert common.parse_attributes("Genres: none; People: none") == set()
    assert sim.parse_titles("1. Knives Out (2019); Joker (2019)\n- Alien") == ["Knives Out (2019)", "Joker (2019)",
                                                                              "Alien"]
    assert common.set_f1({"a", "b"}, {"b", "c"}) == 0.5 and common.set_f1(set(), set()) == 1.0
    assert ("- Knives Out (2019): Mystery; dir. Rian Johnson; with Daniel Craig"
            in common.format_items_for_prompt(items, [0]))


def test_three_task_examples_from_one_sample_and_what_each_prompt_holds(inspired_data):
    run = common.RunPaths(inspired_data)
    items, samples = common.load_items(run), common.load_samples(run, "train")
    tok = common.load_tokenizer()
    accepted = sim.accepted_items(samples)
    s = next(x for x in samples if x["seeker_reply"] and x["liked"] and len(x["context"]) >= 2)
    answers = {}
    for task in common.SIM_TASKS:
        messages = sim.task_messages(task, s, items, accepted, max_turns=8)
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[0]["content"] == common.SIM_INSTRUCTIONS[task]
        assert s["context"][-1]["text"] in messages[1]["content"]
        ex = common.build_chat_example(tok, messages, max_len=2048)
        learned = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != common.IGNORE_INDEX]
        # labels cover exactly the answer and the end-of-turn marker, nothing of the prompt
        assert tok.decode(learned) == messages[2]["content"] + "<|im_end|>"
        prompt_len = len(ex["labels"]) - len(learned)
        assert ex["labels"][:prompt_len] == [common.IGNORE_INDEX] * prompt_len
        answers[task] = messages
    fb = answers["feedback"]
    assert fb[2]["content"] == s["seeker_reply"]
    assert s["response"] in fb[1]["content"]
    assert all(items[i]["title"] in fb[1]["content"] for i in s["targets"])
    assert answers["attributes"][2]["content"] == sim.attribute_answer(items, s["liked"])
    truth = accepted[s["dialog_id"]] or s["targets"]
    assert answers["target"][2]["content"] == "; ".join(items[i]["title"] for i in truth)
    # the target and attributes prompts are made of the dialogue before this turn alone (its last 8 turns): not the
    # recommender's turn, not the seeker's reply
    for task in ("attributes", "target"):
        assert answers[task][:2] == common.simulator_messages(task, s["context"], max_turns=8)
        assert s["response"] not in answers[task][1]["content"]
        assert s["seeker_reply"] not in answers[task][1]["content"]
    # the feedback prompt adds the recommender's turn, whose movies are this turn's targets; not the seeker's reply
    assert fb[:2] == common.simulator_messages("feedback", s["context"], items, s["response"], s["targets"],
                                               max_turns=8)
    assert all(common.names_title(fb[1]["content"], items[i]["title"]) for i in s["targets"])
    assert s["seeker_reply"] not in fb[1]["content"]
    # the dialogue before the turn can already name an accepted movie, which the target answer then lists: why the
    # quality report scores new targets apart
    prompt_names_truth = [any(common.names_title(sim.task_messages("target", x, items, accepted, 8)[1]["content"],
                                                 items[i]["title"]) for i in accepted[x["dialog_id"]] or x["targets"])
                          for x in samples[:200]]
    assert 0 < sum(prompt_names_truth) < len(prompt_names_truth)
    # a sample without a seeker reply gives no feedback example
    assert sim.task_messages("feedback", {**s, "seeker_reply": " "}, items, accepted, 8) is None


def test_target_scores_by_hand():
    """Four samples scored by hand: the model's first 3 distinct matched titles against all targets and, among the
    titles the prompt does not name, against new targets; the last 3 titles the prompt names (all targets); the 3
    most popular items the prompt does not name (new targets)."""
    items = [{"title": t} for t in ("Knives Out (2019)", "Joker (2019)", "Parasite (2019)", "Up (2009)",
                                    "Inception (2010)", "Titanic (1997)", "Casablanca (1942)")]
    prompts = ["Seeker: I loved Knives Out and Joker (2019), what's up with you?\nRecommender: Have you seen Parasite?",
               "Seeker: Titanic (1997) is my favourite.\nRecommender: Up (2009)? Or Knives Out? Joker (2019)?",
               "Seeker: I want something scary.",
               "Recommender: Try Inception (2010)."]
    # 'Joker' and 'Up' count only with their year (under 6 letters), so A names 0, 1, 2 but not 3
    mentions = sim.TitleMentions(items)
    assert [mentions.latest_first(p) for p in prompts] == [[2, 1, 0], [1, 0, 3, 5], [], [4]]
    truths = [[1, 4], [5], [6], [2]]  # new targets: A [4], B none (Titanic is named), C [6], D [2]
    matched = [[1, None, 0, 2, 4],  # all: 1, 0, 2 -> hit; new: 4 (1, 0, 2 are named) -> hit
               [5],                 # all: hit; no new target: left out
               [0, 0, 1, 4, 6],     # all and new: 0, 1, 4 -> miss (6 is the 4th distinct guess)
               [4, 2]]              # all: 4, 2 -> hit; new: 2 (4 is named) -> hit
    assert sim.model_target_scores(prompts, matched, truths, items) == {
        "target_hit_rate": 3 / 4, "target_hit_ci": common.wilson_interval(3, 4), "target_samples": 4,
        "new_target_hit_rate": 2 / 3, "new_target_hit_ci": common.wilson_interval(2, 3), "new_target_samples": 3}
    # copy: A 2, 1, 0 -> hit; B 1, 0, 3 -> miss; C nothing; D 4 -> miss.
    # popular (order 5 6 0 3 2 1 4), unnamed: A 5, 6, 3 -> miss; C 5, 6, 0 -> hit; D 5, 6, 0 -> miss
    assert sim.target_baselines(prompts, truths, items, popular=[5, 6, 0, 3, 2, 1, 4]) == {
        "copy_last_3": {"targets": "all", "hit_rate": 1 / 4, "ci": common.wilson_interval(1, 4), "samples": 4},
        "popular_3": {"targets": "new", "hit_rate": 1 / 3, "ci": common.wilson_interval(1, 3), "samples": 3}}


def test_title_mentions_agree_with_names_title_on_real_prompts(inspired_data):
    run = common.RunPaths(inspired_data)
    items, samples = common.load_items(run), common.load_samples(run, "valid")
    prompts, _ = sim.target_task(samples[:25], items, sim.accepted_items(samples), max_turns=8)
    mentions = sim.TitleMentions(items)
    for prompt in (m[1]["content"] for m in prompts):
        assert set(mentions.latest_first(prompt)) == {i for i, it in enumerate(items)
                                                     if common.names_title(prompt, it["title"])}


def test_held_out_draw_is_seeded_and_in_file_order():
    samples = [{"n": i} for i in range(40)]
    drawn = sim.draw_held_out(samples, 6, seed=0)
    assert len(drawn) == 6 and drawn == sorted(drawn, key=lambda x: x["n"]) and drawn != samples[:6]
    assert drawn == sim.draw_held_out(samples, 6, seed=0) != sim.draw_held_out(samples, 6, seed=1)
    assert sim.draw_held_out(samples, 0, 0) == samples == sim.draw_held_out(samples, 40, 0)


def test_smoke_run_writes_adapter_log_and_quality(inspired_data, tmp_path, run_copy):
    run_dir = run_copy(inspired_data, tmp_path, "smoke")
    out = sim.main(["--run-dir", str(run_dir), "--steps", "3", "--eval-every", "3", "--save-every", "2"] + TINY)
    folder = run_dir / "simulator"
    for f in ("adapter_config.json", "adapter_model.safetensors", "simulator_config.json", "train_log.jsonl",
              "quality.json", "checkpoint/checkpoint.pt"):
        assert (folder / f).exists(), f
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 and r["seconds"] >= 0 for r in log)
    assert set(log[-1]["eval_loss"]) == set(common.SIM_TASKS)
    quality = json.loads((folder / "quality.json").read_text())
    # the report is on a seeded draw of valid, and new targets are the true titles its target prompts do not name
    run = common.RunPaths(run_dir)
    items, valid = common.load_items(run), common.load_samples(run, "valid")
    drawn = sim.draw_held_out(valid, 6, seed=0)
    accepted = sim.accepted_items(valid)  # of the whole split
    prompts, truths = sim.target_task(drawn, items, accepted, max_turns=8)
    with_new = sum(any(not common.names_title(m[1]["content"], items[i]["title"]) for i in t)
                   for m, t in zip(prompts, truths))
    assert (quality["split"], quality["samples"], quality["seed"], quality["guesses"]) == ("valid", 6, 0, 3)
    for name in ("tuned", "base"):
        q = quality[name]
        assert (q["target_samples"], q["new_target_samples"]) == (6, with_new)
        for rate, n, ci in ((q["target_hit_rate"], 6, q["target_hit_ci"]),
                            (q["new_target_hit_rate"], with_new, q["new_target_hit_ci"])):
            assert ci == common.wilson_interval(round(rate * n), n)
        assert q["attribute_samples"] == sum(1 for s in drawn if s["liked"]) and q["reply_loss"] > 0
        assert q["attribute_f1_ci"][0] <= q["attribute_f1"] <= q["attribute_f1_ci"][1]
        assert q["reply_copy_samples"] == sum(1 for s in drawn if s["seeker_reply"].strip())
        assert "reply" in q["examples"][0]
    assert quality["baselines"]["copy_last_3"]["samples"] == 6
    assert quality["baselines"]["popular_3"]["samples"] == with_new
    # the data's own replies are the reference: counted on the same held-out samples
    held_out = [s for s in drawn if s["seeker_reply"].strip()]
    assert quality["real_seeker_copy_rate"] == pytest.approx(
        sum(common.copies_turn(s["seeker_reply"], s["response"]) for s in held_out) / len(held_out))
    assert quality["tuned"]["reply_loss"] != quality["base"]["reply_loss"]  # the adapter changed something
    config = json.loads((folder / "simulator_config.json").read_text())
    assert config["task_mix"] == {"feedback": 1.0, "attributes": 1.0, "target": 1.0}
    assert all(n > 0 for n in config["train_examples"].values())
    # the adapter loads into a fresh tiny model in PEFT layout
    model, _ = common.tiny_causal_lm()
    assert common.load_lora(model, folder)["r"] == 16
    assert out["quality"] == quality

    # --steps 0 --init-adapter: only that adapter's quality report, the adapter itself unchanged
    report = sim.main(["--run-dir", str(run_dir), "--steps", "0", "--init-adapter", str(folder), "--out", "report"]
                      + TINY)
    assert load_file(run_dir / "report" / "adapter_model.safetensors").keys() == load_file(
        folder / "adapter_model.safetensors").keys()
    assert all(torch.equal(load_file(run_dir / "report" / "adapter_model.safetensors")[k], v)
               for k, v in load_file(folder / "adapter_model.safetensors").items())
    assert report["quality"]["tuned"]["reply_loss"] == pytest.approx(quality["tuned"]["reply_loss"], rel=1e-4)
    assert (run_dir / "report" / "train_log.jsonl").read_text() == ""
    with pytest.raises(SystemExit, match="--init-adapter"):
        sim.main(["--run-dir", str(run_dir), "--steps", "0"] + TINY)


def test_feedback_only_mix_builds_feedback_examples_only(inspired_data, tmp_path, run_copy, monkeypatch):
    built = []
    original = sim.task_messages
    monkeypatch.setattr(sim, "task_messages", lambda task, *a, **k: built.append(task) or original(task, *a, **k))
    no_quality = {"target_hit_rate": 0, "target_hit_ci": [0, 1], "target_samples": 0, "new_target_hit_rate": 0,
                  "new_target_hit_ci": [0, 1], "new_target_samples": 0, "attribute_f1": 0, "attribute_f1_ci": [0, 0],
                  "reply_loss": 1, "reply_copy_rate": 0}
    monkeypatch.setattr(sim, "simulator_quality", lambda *a, **k: no_quality)
    run_dir = run_copy(inspired_data, tmp_path, "feedback_only")
    built.clear()
    out = sim.main(["--run-dir", str(run_dir), "--steps", "1", "--task-mix", "1", "0", "0"] + TINY)
    assert out["config"]["train_examples"] == {"feedback": out["config"]["train_examples"]["feedback"]}
    assert out["config"]["task_mix"] == {"feedback": 1.0}
    train_calls = built[:60]  # the first 60 calls build the 60 training samples' examples
    assert set(train_calls) == {"feedback"}


def test_epoch_order_respects_the_mix_and_is_a_function_of_seed_and_epoch():
    pools = {"feedback": [None] * 10, "attributes": [None] * 10, "target": [None] * 10}
    order = common.epoch_order(pools, {"feedback": 2.0, "attributes": 1.0, "target": 1.0}, seed=0, epoch=0)
    tasks = [t for t, _ in order]
    # shares 2:1:1 of an epoch as long as the pools (30): 15, 7.5 -> 8, 7.5 -> 8 examples
    assert (tasks.count("feedback"), tasks.count("attributes"), tasks.count("target")) == (15, 8, 8)
    assert {i for t, i in order if t == "feedback"} == set(range(10))  # every example before any repeats
    assert order == common.epoch_order(pools, {"feedback": 2.0, "attributes": 1.0, "target": 1.0}, 0, 0)
    assert order != common.epoch_order(pools, {"feedback": 2.0, "attributes": 1.0, "target": 1.0}, 0, 1)


def test_killed_run_resumes_to_identical_weights(inspired_data, tmp_path, run_copy, monkeypatch):
    """Killed in step 4, after its log row and before its checkpoint: the same command again resumes
    from step 2's checkpoint, drops the rows of steps 3 and 4 it logged, and ends with the weights of an
    uninterrupted run."""
    args = ["--steps", "4", "--save-every", "2", "--grad-accum", "2", "--max-eval-samples", "2"] + TINY
    whole = run_copy(inspired_data, tmp_path, "whole")
    sim.main(["--run-dir", str(whole)] + args)
    split = run_copy(inspired_data, tmp_path, "split")
    save, saved = common.save_checkpoint, []

    class Killed(Exception):
        pass

    def killed_at_the_second_checkpoint(*a, **k):
        if saved:
            raise Killed
        saved.append(save(*a, **k))

    monkeypatch.setattr(common, "save_checkpoint", killed_at_the_second_checkpoint)
    with pytest.raises(Killed):
        sim.main(["--run-dir", str(split)] + args)
    monkeypatch.setattr(common, "save_checkpoint", save)
    assert not (split / "simulator" / "adapter_model.safetensors").exists()
    logged = [json.loads(line)["step"] for line in (split / "simulator" / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]
    sim.main(["--run-dir", str(split)] + args)  # the same command again: resumes at step 2
    _, a = common.read_lora(whole / "simulator")
    _, b = common.read_lora(split / "simulator")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line)["step"] for line in (split / "simulator" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    # a rerun with other settings refuses the checkpoint instead of mixing two runs
    with pytest.raises(SystemExit, match="other settings"):
        sim.main(["--run-dir", str(split)] + args + ["--lr", "1e-3"])
