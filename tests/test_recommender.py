"""Tests of the reasoning recommender (03_sft_recommender.py part 2, common.py section 9) and of
the multi-turn protocol (common.py section 10, 05_eval.py's conversation rows), with a tiny
random Llama (`--model tiny`) on prepared INSPIRED data."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common

sim = importlib.import_module("02_sft_simulator")
rec = importlib.import_module("03_sft_recommender")
evaluate = importlib.import_module("05_eval")

ITEMS = [
    {"title": "Liar Liar (1997)", "genres": ["comedy"], "directors": ["Tom Shadyac"], "stars": ["Jim Carrey"]},
    {"title": "The Exorcist (1973)", "genres": ["horror"], "directors": ["William Friedkin"],
     "stars": ["Ellen Burstyn"]},
    {"title": "The Mask (1994)", "genres": ["comedy", "fantasy"], "directors": ["Chuck Russell"],
     "stars": ["Jim Carrey"]},
    {"title": "Heat (1995)", "genres": ["crime"], "directors": ["Michael Mann"], "stars": ["Al Pacino"]},
] + [{"title": f"Filler Movie {i} (2000)", "genres": ["drama"], "directors": [], "stars": []} for i in range(16)]
CANDIDATES = list(range(20))
TINY_LLM = ["--model", "tiny", "--threads", "1"]


def rec_tiny(**overrides) -> list[str]:
    """03 part 2 on a tiny model with tiny budgets; keyword arguments override the flags."""
    flags = {"parts": "recommender", "max_samples": 40, "batch_size": 2, "max_len": 1280, "max_eval_samples": 4,
             "max_new_tokens": 24, "gen_batch_size": 4, **overrides}
    return TINY_LLM + [x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def run_copy(make_run):
    """A fresh run directory over the shared data and retriever."""
    return lambda base, tmp_path, name: make_run(base, tmp_path / name, ("data", "retriever"))


# ---- prompt, chain, parsing ---------------------------------------------------------------


def test_attribute_vocab_finds_stated_genres_and_people():
    vocab = rec.AttributeVocab(ITEMS)
    assert vocab.stated("Something funny with jim carrey, or a scary one") == ["comedy", "Jim Carrey", "horror"]
    assert vocab.stated("no preference") == []


def test_reasoning_chain_puts_the_target_first_and_parses_back():
    vocab, titles = rec.AttributeVocab(ITEMS), common.TitleIndex(ITEMS)
    context = [{"role": "seeker", "text": "I want something funny"}]
    chain, ranked = rec.reasoning_chain(ITEMS, vocab, context, CANDIDATES, targets=[3], liked=[3, 2],
                                           context_items=[2])
    # preference: stated comedy, then the liked Mask's comedy / fantasy / Chuck Russell (3 at most; the
    # hidden target's crime / Michael Mann stay out). Target (Heat) first; The Mask matches all three,
    # Liar Liar comedy only; the dramas match nothing
    assert ranked[0] == 3 and len(ranked) == 10 and len(set(ranked)) == 10
    assert ranked[1:3] == [2, 0]
    lines = chain.splitlines()
    assert [ln.split(":")[0] for ln in lines[:5]] == ["Preference", "Matching", "Scores", "Ranking", "Explanation"]
    assert lines[0] == "Preference: comedy, fantasy, Chuck Russell"
    assert lines[3] == "Ranking: " + ", ".join(f"#{CANDIDATES.index(c) + 1}" for c in ranked)
    parsed = common.parse_recommendation(chain, titles, CANDIDATES)
    assert parsed["valid"] and parsed["ids"] == ranked
    assert parsed["preference"] == {"comedy", "fantasy", "chuck russell"}
    assert common.fill_ranking(parsed["ids"], CANDIDATES) == ranked


def test_cited_chain_gives_each_title_its_candidate_number_and_parses_back():
    vocab, titles = rec.AttributeVocab(ITEMS), common.TitleIndex(ITEMS)
    context = [{"role": "seeker", "text": "I want something funny"}]
    candidates = [5, 3, 0, 2] + [i for i in range(20) if i not in (5, 3, 0, 2)]  # Heat is candidate #2
    plain, ranked = rec.reasoning_chain(ITEMS, vocab, context, candidates, targets=[3])
    cited, cited_ranked = rec.reasoning_chain(ITEMS, vocab, context, candidates, targets=[3], cite_candidates=True)
    assert cited_ranked == ranked and cited.split("<answer>")[0] == plain.split("<answer>")[0]
    answer = cited.split("<answer>\n")[1].splitlines()
    assert answer[0] == "1. #2 Heat (1995)" and answer[1] == "2. #3 Liar Liar (1997)"
    for line, item in zip(answer, ranked):
        assert line.split(" ", 2)[1] == f"#{candidates.index(item) + 1}"
    parsed = common.parse_recommendation(cited, titles, candidates)
    assert parsed["valid"] and parsed["ids"] == ranked
    # the title decides when the cited number disagrees; a title that starts with "#9" still matches
    odd = ITEMS + [{"title": "#9 Lives (2016)", "genres": [], "directors": [], "stars": []}]
    lines = ["#1 Heat (1995)", "#9 Lives (2016)"] + [f"#{k} {odd[i]['title']}" for k, i in enumerate(range(4, 12), 3)]
    parsed = common.parse_recommendation(numbered(lines), common.TitleIndex(odd), list(range(21)))
    assert parsed["valid"] and parsed["ids"][:3] == [3, 20, 4]


def numbered(titles):
    return "<answer>\n" + "\n".join(f"{n}. {t}" for n, t in enumerate(titles, 1)) + "\n</answer>"


@pytest.mark.parametrize("text, why", [
    ("Preference: comedy\n1. Liar Liar (1997)", "no answer tags"),
    (numbered([ITEMS[i]["title"] for i in range(9)]), "nine titles"),
    (numbered([ITEMS[0]["title"]] * 2 + [ITEMS[i]["title"] for i in range(2, 10)]), "a duplicate"),
    (numbered(["Titanic (1997)"] + [ITEMS[i]["title"] for i in range(1, 10)]), "a title outside the candidates"),
    (numbered([ITEMS[i]["title"] for i in range(10)])[:-len("</answer>")], "no closing tag"),
])
def test_malformed_answers_are_not_valid(text, why):
    parsed = common.parse_recommendation(text, common.TitleIndex(ITEMS), CANDIDATES)
    assert not parsed["valid"], why


def test_parse_accepts_loose_titles_and_fill_keeps_the_model_order():
    titles = common.TitleIndex(ITEMS)
    text = numbered(["the mask", "Liar Liar"] + [ITEMS[i]["title"] for i in (1, 3, 4, 5, 6, 7, 8, 9)])
    parsed = common.parse_recommendation(text, titles, CANDIDATES)
    assert parsed["valid"] and parsed["ids"][:2] == [2, 0]
    # a broken answer keeps its usable titles in order, the retriever's order fills the rest
    broken = common.parse_recommendation("<answer>\n1. Heat (1995)\n2. Heat (1995)\n3. Titanic\n", titles, CANDIDATES)
    assert not broken["valid"] and broken["ids"] == [3, 3, None]
    assert common.fill_ranking(broken["ids"], CANDIDATES) == [3, 0, 1, 2, 4, 5, 6, 7, 8, 9]


def test_candidate_lines_end_each_title_where_no_title_goes_on():
    # "Thor" has no year and "Thor: Ragnarok" has a colon: with "title: attributes" lines an answer
    # that copied "Thor" could not tell where the title ended
    items = [{"title": "Thor", "genres": ["action", "adventure", "fantasy"], "directors": ["Kenneth Branagh"],
              "stars": ["Chris Hemsworth", "Natalie Portman"]},
             {"title": "Thor: Ragnarok (2017)", "genres": ["action"], "directors": [], "stars": []},
             {"title": "Heat (1995)"}]
    lines = common.format_candidates(items, [0, 1, 2]).splitlines()
    assert lines == ["1. Thor | action, adventure | dir. Kenneth Branagh | with Chris Hemsworth",
                     "2. Thor: Ragnarok (2017) | action", "3. Heat (1995)"]
    assert [line.split(". ", 1)[1].split(" | ")[0] for line in lines] == [it["title"] for it in items]
    prompt = common.recommender_messages([{"role": "seeker", "text": "hi"}], items, [0, 1, 2])[1]["content"]
    assert "\n".join(lines) in prompt


def test_recommender_adapters_trained_on_other_prompts_are_refused(tmp_path):
    def folder(name, config_file, config):
        (tmp_path / name).mkdir()
        (tmp_path / name / config_file).write_text(json.dumps(config))
        return tmp_path / name

    sft_now = folder("sft_now", "recommender_config.json", {"prompt_version": common.REC_PROMPT_VERSION})
    rl_now = folder("rl_now", "rl_config.json", {"prompt_version": common.REC_PROMPT_VERSION})
    simulator = folder("simulator", "simulator_config.json", {})
    for ok in (sft_now, rl_now, simulator):
        common.require_prompt_version(ok)
    assert common.recommender_prompt_version(simulator) is None
    for old in (folder("sft_old", "recommender_config.json", {"args": {}}), folder("rl_old", "rl_config.json", {})):
        assert common.recommender_prompt_version(old) == 1
        with pytest.raises(SystemExit, match="version 1.*03_sft_recommender.py"):
            common.require_prompt_version(old)


def test_names_title_needs_whole_words_and_years_for_short_titles():
    assert common.names_title("I loved the mask, so funny", "The Mask (1994)") is False  # 4 letters: needs the year
    assert common.names_title("I loved The Mask (1994)!", "The Mask (1994)")
    assert common.names_title("maybe liar liar?", "Liar Liar (1997)")
    assert not common.names_title("a liar like him", "Liar Liar (1997)")


def test_recommender_example_learns_exactly_the_chain(inspired_with_retriever):
    """Real tokenizer and data: the labels cover the chain and <|im_end|>; the instruction survives."""
    run = common.RunPaths(inspired_with_retriever)
    items, samples = common.load_items(run), common.load_samples(run, "train")
    tok = common.load_tokenizer()
    vocab = rec.AttributeVocab(items)
    longest = 0
    for s in samples[:40]:
        cands = list(range(20))
        chain, _ = rec.reasoning_chain(items, vocab, s["context"], cands, s["new_targets"] or s["targets"],
                                          s["liked"], s["context_items"])
        ex = common.build_chat_example(tok, common.recommender_messages(s["context"], items, cands, answer=chain), 1280)
        learned = [i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != common.IGNORE_INDEX]
        assert tok.decode(learned) == chain + "<|im_end|>"
        assert not ex["truncated"]
        longest = max(longest, len(ex["input_ids"]))
    assert longest < 1280


def test_answer_lengths_count_the_learned_tokens_only():
    ignore = common.IGNORE_INDEX
    examples = [{"labels": [ignore] * 7 + [1] * n} for n in range(1, 101)]  # answers of 1..100 tokens
    assert rec.answer_lengths(examples) == {"median": 51, "p95": 95, "max": 100}
    assert rec.answer_lengths([]) == {"median": 0, "p95": 0, "max": 0}


# ---- 03 part 2: SFT, resume ---------------------------------------------------------------------


def test_recommender_sft_smoke_writes_adapter_and_quality(inspired_with_retriever, tmp_path, run_copy, monkeypatch):
    run_dir = run_copy(inspired_with_retriever, tmp_path, "smoke")
    validations = []
    loss = common.mean_token_loss
    monkeypatch.setattr(common, "mean_token_loss", lambda *a, **k: validations.append(1) or loss(*a, **k))
    # The tiny model's 24-token answers never parse, so a parse rate of 0 would pass whatever 03 counted:
    # answer 1 is swapped for a valid list of its first 10 candidates and answer 2 for one of 9 (both tags,
    # does not parse); the model's tokens stay. The report must then say 1 valid of 4, samples 0, 2, 3 invalid.
    real_recommend = common.recommend_with_llm

    def one_valid(model, tok, items, titles, contexts, candidates, *a, **k):
        answers = real_recommend(model, tok, items, titles, contexts, candidates, *a, **k)
        for i, n in ((1, 10), (2, 9)):
            lines = "\n".join(f"{m}. {items[x]['title']}" for m, x in enumerate(candidates[i][:n], 1))
            parsed = common.parse_recommendation(f"<answer>\n{lines}\n</answer>", titles, candidates[i])
            answers[i] = {**answers[i], "text": f"<answer>\n{lines}\n</answer>", "parsed": parsed,
                          "ranked": common.fill_ranking(parsed["ids"], candidates[i])}
        return answers

    monkeypatch.setattr(common, "recommend_with_llm", one_valid)
    out = rec.main(["--dataset", "inspired", "--run-dir", str(run_dir)] + rec_tiny(steps=3))
    folder = run_dir / "recommender_sft"
    for f in ("adapter_config.json", "adapter_model.safetensors", "recommender_config.json", "train_log.jsonl",
              "quality.json", "checkpoint/checkpoint.pt"):
        assert (folder / f).exists(), f
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    quality = out["recommender"]["quality"]
    # the validation loss of the held-out examples, computed once, on the tuned weights
    assert quality["eval_loss"] > 0 and len(validations) == 1
    titles = rec.run_title_index(common.RunPaths(run_dir), common.load_items(common.RunPaths(run_dir)))
    for name in ("tuned", "base"):
        q = quality[name]
        assert q["samples"] == 4 and q["mean_completion_tokens"] > 0
        kept = q["invalid_examples"]  # every invalid answer (fewer than 30 here), whole and re-parsable
        # the swapped answers: 1 valid of 4 (an answer with tags that does not parse is not counted), the
        # rate and its interval from those counts, each kept failure under its own sample's index
        assert [e["sample"] for e in kept] == [0, 2, 3] and kept[1]["kinds"] == ["fewer than 10"]
        assert q["parse_rate"] == (q["samples"] - len(kept)) / q["samples"] == 1 / 4
        assert q["parse_rate_ci"] == common.wilson_interval(1, 4)
        invalid = len(kept)  # each invalid answer falls in one kind or more
        assert set(q["parse_failures"]) == set(rec.PARSE_KINDS[1:])
        assert sum(q["parse_failures"].values()) >= invalid
        assert q["parse_failures"]["no closed <answer>"] == round(q["samples"] * (1 - q["answer_tag_rate"]))
        assert all(e["kinds"] and "valid" not in e["kinds"] for e in kept)
        for e in kept:
            parsed = common.parse_recommendation(e["text"], titles, e["candidates"])
            assert not parsed["valid"] and rec.parse_failure_kinds(parsed) == e["kinds"]
            assert len(e["candidates"]) == 20
    config = json.loads((folder / "recommender_config.json").read_text())
    assert config["examples"] > 0
    assert config["prompt_version"] == common.REC_PROMPT_VERSION  # what 04 and 05 check before playing it
    assert config["train_candidates"] == "out of fold (5 cross-fitted retrievers)"   # 03's default --retriever-folds
    lengths = config["answer_tokens"]  # five reasoning lines and ten titles: far more than 50 tokens
    assert 50 < lengths["median"] <= lengths["p95"] <= lengths["max"]
    model, _ = common.tiny_causal_lm()
    assert common.load_lora(model, folder)["r"] == 16


def test_killed_recommender_sft_resumes_to_identical_weights(inspired_with_retriever, tmp_path, run_copy):
    """SIGKILL the real script right after its first checkpoint; the same command again resumes and
    ends with the weights of an uninterrupted run."""
    args = ["--dataset", "inspired"] + rec_tiny(steps=8, save_every=2, max_eval_samples=1, max_new_tokens=4)
    whole = run_copy(inspired_with_retriever, tmp_path, "whole")
    rec.main(["--run-dir", str(whole)] + args)
    killed = run_copy(inspired_with_retriever, tmp_path, "killed")
    cmd = [sys.executable, str(common.Path(rec.__file__)), "--run-dir", str(killed)] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "recommender_sft" / "checkpoint" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "recommender_sft" / "adapter_model.safetensors").exists(), "the run ended before the kill"
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 2 <= step < 8
    rec.main(["--run-dir", str(killed)] + args)
    _, a = common.read_lora(whole / "recommender_sft")
    _, b = common.read_lora(killed / "recommender_sft")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_path = killed / "recommender_sft" / "train_log.jsonl"
    log = [json.loads(line)["step"] for line in log_path.read_text().splitlines()]
    assert log == list(range(1, 9))


def test_init_adapter_continues_from_an_earlier_adapter(inspired_with_retriever, tmp_path, run_copy):
    """--init-adapter starts the LoRA from a trained adapter, not from zeros: with lr 0 the new
    adapter is the old one, bit for bit (a fresh one would have B = 0)."""
    tiny = rec_tiny(max_eval_samples=1, max_new_tokens=4)
    first = run_copy(inspired_with_retriever, tmp_path, "first")
    rec.main(["--dataset", "inspired", "--run-dir", str(first), "--steps", "2", "--lr", "0.01"] + tiny)
    _, trained = common.read_lora(first / "recommender_sft")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in trained.items())
    again = run_copy(inspired_with_retriever, tmp_path, "again")
    rec.main(["--dataset", "inspired", "--run-dir", str(again), "--steps", "1", "--lr", "0",
              "--init-adapter", str(first / "recommender_sft")] + tiny)
    _, continued = common.read_lora(again / "recommender_sft")
    assert continued.keys() == trained.keys() and all(torch.equal(continued[k], trained[k]) for k in trained)
    # --steps 0: no training step, only the earlier adapter's quality report
    report_only = run_copy(inspired_with_retriever, tmp_path, "report_only")
    rec.main(["--dataset", "inspired", "--run-dir", str(report_only), "--steps", "0",
              "--init-adapter", str(first / "recommender_sft")] + tiny)
    _, same = common.read_lora(report_only / "recommender_sft")
    assert all(torch.equal(same[k], trained[k]) for k in trained)
    assert (report_only / "recommender_sft" / "train_log.jsonl").read_text() == ""
    quality = json.loads((report_only / "recommender_sft" / "quality.json").read_text())
    # the report is on the earlier adapter: its answers are those the first run's report gave (greedy, same
    # weights and samples), unlike the untuned base's; its rate and interval are counts of those answers
    earlier = json.loads((first / "recommender_sft" / "quality.json").read_text())
    tuned = quality["tuned"]
    assert tuned == earlier["tuned"] and tuned["examples"] != quality["base"]["examples"]
    valid = tuned["samples"] - len(tuned["invalid_examples"])  # every invalid answer is kept (fewer than 30)
    assert tuned["samples"] == 1 and tuned["parse_rate"] == valid / tuned["samples"]
    assert tuned["parse_rate_ci"] == common.wilson_interval(valid, tuned["samples"])
    with pytest.raises(SystemExit, match="--init-adapter"):  # without an adapter, 0 steps would write the base
        rec.main(["--dataset", "inspired", "--run-dir", str(report_only), "--steps", "0"] + tiny)
    assert all(torch.equal(common.read_lora(report_only / "recommender_sft")[1][k], trained[k]) for k in trained)
    # an adapter trained on older prompts gets no report on this code's prompts (04 and 05 refuse it too)
    config_path = first / "recommender_sft" / "recommender_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "prompt_version"}))
    with pytest.raises(SystemExit, match="version 1"):
        rec.main(["--dataset", "inspired", "--run-dir", str(tmp_path / "old_report"), "--steps", "0",
                  "--init-adapter", str(first / "recommender_sft")] + tiny)


# ---- multi-turn protocol -------------------------------------------------------------------------


class FixedRetriever:
    """Returns the same candidates for every dialogue; records what it was asked."""

    def __init__(self, candidates):
        self.candidates, self.calls, self.texts, self.dialog_ids = candidates, [], [], []

    def search(self, contexts, context_items, k, exclude_seen=True, dialog_ids=None):
        self.calls.append([len(c) for c in contexts])
        self.dialog_ids.append(dialog_ids)
        self.texts.append([[t["text"] for t in c] for c in contexts])
        return [list(self.candidates[:k]) for _ in contexts]


def test_conversation_stops_on_success_only_when_asked_and_feeds_replies_back():
    model, tok = common.tiny_causal_lm()
    common.add_lora(model, r=4, alpha=8)
    sample = {"dialog_id": "d", "turn": 1, "context": [{"role": "seeker", "text": "something funny"}],
              "context_items": [], "new_targets": [0], "targets": [0]}
    miss = {**sample, "dialog_id": "e", "new_targets": [19], "targets": [19]}
    retriever = FixedRetriever(list(range(20)))
    conv = common.Conversation(model, tok, ITEMS, retriever, simulator_weights=common.get_lora_weights(model),
                               sim_max_new_tokens=6, batch_size=2)
    # label-free (the default): every conversation plays all its turns, success or not
    label_free = conv.play(common.start_episodes([sample, miss]), turns=3, weights="retriever")
    assert [len(e.turns) for e in label_free] == [3, 3] and not any(e.done for e in label_free)
    assert [t["own_rank"] for t in label_free[0].turns] == [1, 1, 1]
    retriever.calls, retriever.dialog_ids, retriever.texts = [], [], []
    episodes = conv.play(common.start_episodes([sample, miss]), turns=3, weights="retriever", stop_on_success=True)
    hit, missed = episodes
    assert hit.done and len(hit.turns) == 1 and hit.turns[0]["rank"] == 1   # Liar Liar is the retriever's first
    assert not missed.done and len(missed.turns) == 3 and missed.turns[0]["rank"] is None  # item 19 is 20th
    # the simulator answered turns 1 and 2 (not the last); each answer joined the dialogue
    assert [("reply" in t) for t in missed.turns] == [True, True, False]
    assert len(missed.context) == 1 + 2 * 2 and missed.context[1]["role"] == "recommender"
    assert missed.context[1]["text"].startswith(
        "Have you seen Liar Liar (1997)? You might also like The Exorcist (1973) or ")
    # the retriever read the real dialogue + the simulator's latest reply; finished conversations dropped
    assert retriever.calls == [[1, 1], [2], [2]]
    # each turn names the data dialogue it continues: the retriever picks that dialogue's fold by it
    assert retriever.dialog_ids == [["d", "e"], ["e"], ["e"]]
    assert retriever.texts[2] == [["something funny", missed.turns[1]["reply"]]]
    assert hit.ranking_at(3) == hit.turns[0]["ranked"]  # a finished conversation keeps its list
    assert sample["context"] == [{"role": "seeker", "text": "something funny"}]  # the sample is not modified


def test_eval_loop_prompts_do_not_depend_on_the_label(inspired_tiny_adapters, monkeypatch):
    """05's loop (label-free): every prompt the recommender and the simulator get is the same whatever
    the true targets are, and a simulator prompt names a true target only when it was shown the movie or
    the dialogue had named it."""
    run = common.RunPaths(inspired_tiny_adapters)
    args = common.parse_args(evaluate.Args, ["--dataset", "inspired", "--run-dir", str(run.root), "--model", "tiny",
                                             "--max-new-tokens", "12", "--sim-max-new-tokens", "6"])
    items = common.load_items(run)
    conversation, weights = common.load_conversation(run, ["recommender_sft", "simulator"], items, args)
    conversation.simulator_weights = weights["simulator"]
    samples = [s for s in common.load_samples(run, "test") if s["new_targets"]][:3]
    prompts = []
    real_generate = common.generate

    def recording(model, tokenizer, batch, **kwargs):
        prompts.extend(common.render_chat(tokenizer, p, add_generation_prompt=True) for p in batch)
        return real_generate(model, tokenizer, batch, **kwargs)

    monkeypatch.setattr(common, "generate", recording)
    played = conversation.play(common.start_episodes(samples), 3, weights["recommender_sft"])
    with_truth = list(prompts)
    # the same conversations with other targets: items none of them mentions
    others = [i for i in range(len(items)) if all(i not in s["context_items"] + s["targets"] for s in samples)][:3]
    relabelled = [{**s, "new_targets": [o], "targets": [o]} for s, o in zip(samples, others)]
    prompts.clear()
    conversation.play(common.start_episodes(relabelled), 3, weights["recommender_sft"])
    assert len(with_truth) == 3 * 3 + 3 * 2 and prompts == with_truth  # 3 recommender turns, 2 replies each
    for e in played:
        for turn in e.turns[:-1]:
            simulator_prompt = next(p for p in with_truth if turn["said"] in p)
            for t in e.truth:
                named_before = any(common.names_title(x["text"], items[t]["title"]) for x in e.sample["context"])
                if t not in turn["shown"] and not named_before:
                    assert not common.names_title(simulator_prompt, items[t]["title"])


def test_eval_multi_turn_rows_smoke(inspired_tiny_adapters, tmp_path, make_run):
    run_dir = make_run(inspired_tiny_adapters, tmp_path / "eval",
                       ("data", "retriever", "simulator", "simulator_feedback_only", "recommender_sft"))
    rows = [r for r in evaluate.MULTI_TURN_ROWS if not r.startswith("smtpo")]  # 04's rows: tests/test_rl.py
    settings = ["--dataset", "inspired", "--run-dir", str(run_dir), "--limit", "3", "--turns", "2",
                "--max-new-tokens", "16", "--sim-max-new-tokens", "6", "--bootstrap", "50", "--threads", "1"]
    # the simulator ablation in a second --merge process: still paired with sft+simulator, by the kept lists
    evaluate.main(settings + ["--rows", "retriever-fused", *rows[:-1]])
    assert rows[-1] == "sft+simulator-feedback-only"
    results = evaluate.main(settings + ["--rows", rows[-1], "--merge"])
    assert set(results["multi_turn"]) == set(rows)
    for name, r in results["multi_turn"].items():
        assert r["samples"] == 3 and [t["turn"] for t in r["turns"]] == [1, 2]
        for t in r["turns"]:
            lo, hi = t["ci"]["new"]["recall@10"]
            assert lo <= t["new"]["recall@10"] <= hi
        if name not in evaluate.SINGLE_TURN_ROWS:  # the rates are the shares of the replies the log keeps
            log = common.read_jsonl(run_dir / "eval" / f"conversations_{name}.jsonl")
            replies = [t for c in log for t in c["turns"] if t["reply"] is not None]
            assert r["simulator_replies"] == len(replies) == 3  # label-free: all 3 conversations reach turn 2
            assert r["leakage_rate"] == sum(t["leaks"] for t in replies) / 3
            assert r["reply_copy_rate"] == sum(t["copies"] for t in replies) / 3
            assert [len(c["turns"]) for c in log] == [2, 2, 2]
        gain = r["gain_first_to_last"]
        if name in evaluate.SINGLE_TURN_ROWS:
            assert gain is None
        else:  # the paired change is the difference of the two turns' recall (same labels)
            for m in evaluate.GAIN_METRICS:
                assert gain[m]["gain"] == pytest.approx(r["turns"][-1]["new"][m] - r["turns"][0]["new"][m])
                assert gain[m]["ci"][0] <= gain[m]["gain"] <= gain[m]["ci"][1] and gain[m]["samples"] == 3
    single, multi = results["multi_turn"]["sft-single-turn"], results["multi_turn"]["sft+simulator"]
    # each row against sft+simulator on the same samples: the paired difference of their recall
    ablation = results["multi_turn"]["sft+simulator-feedback-only"]
    for t, turn in ((1, 0), (2, 1)):
        vs = ablation["vs_reference"][f"turn {t}"]
        assert vs["gain"] == pytest.approx(ablation["turns"][turn]["new"]["recall@10"]
                                           - multi["turns"][turn]["new"]["recall@10"])
        assert vs["samples"] == 3 and len(ablation["lists"][f"turn {t}"]) == 3
    assert "vs_reference" not in multi and "vs_reference" not in single
    assert single["turns"][0]["new"] == multi["turns"][0]["new"] == single["turns"][1]["new"]
    eval_dir = run_dir / "eval"
    png = (eval_dir / "recall_by_turn.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    convs = [json.loads(line) for line in (eval_dir / "conversations_sft+simulator.jsonl").read_text().splitlines()]
    assert len(convs) == 3 and all(1 <= len(c["turns"]) <= 2 for c in convs)
    # every answer's length is recorded (tools/parse_failures.py: did it use the whole budget?)
    assert all(0 < t["completion_tokens"] <= 16 for c in convs for t in c["turns"])
    table = (eval_dir / "results.md").read_text()
    assert "multi-turn (T = 2" in table and "sft+simulator-feedback-only" in table
    by_turn, paired = table.split("Each row minus")
    cells = {line.split(" | ")[0][2:]: line.split(" | ") for line in by_turn.splitlines() if line.startswith("| ")}
    gain_column = cells["system"].index("ΔR@10 t1→t2 [paired 95% CI] (samples up / down)")
    assert cells["sft-single-turn"][gain_column] == "n/a" and cells["sft+simulator"][gain_column].endswith(")")
    assert paired.startswith(" sft+simulator on the same samples") and "| retriever+simulator | " in paired


def test_eval_refuses_a_recommender_trained_on_older_prompts(inspired_tiny_adapters, tmp_path, make_run):
    import shutil

    run_dir = make_run(inspired_tiny_adapters, tmp_path / "eval", ("data", "retriever", "simulator"))
    shutil.copytree(inspired_tiny_adapters / "recommender_sft", run_dir / "recommender_sft")
    config_path = run_dir / "recommender_sft" / "recommender_config.json"
    config = json.loads(config_path.read_text())
    del config["prompt_version"]  # as 03 wrote it before the field existed
    config_path.write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="recommender_sft was trained on recommender prompts of version 1"):
        evaluate.main(["--dataset", "inspired", "--run-dir", str(run_dir), "--rows", "sft+simulator", "--limit", "2",
                       "--turns", "1", "--threads", "1"])


def test_cite_candidates_reaches_the_sft_targets(inspired_with_retriever, tmp_path, run_copy):
    """03 --cite-candidates writes "#k " before each of the ten answer titles of every SFT target:
    the same examples (same seed) get a few tokens longer per line."""
    tiny = rec_tiny(max_eval_samples=1, max_new_tokens=4)
    lengths = {}
    for cite in ("--no-cite-candidates", "--cite-candidates"):
        run_dir = run_copy(inspired_with_retriever, tmp_path, cite.strip("-"))
        rec.main(["--dataset", "inspired", "--run-dir", str(run_dir), "--steps", "1", "--lr", "0", cite] + tiny)
        config = json.loads((run_dir / "recommender_sft" / "recommender_config.json").read_text())
        assert config["args"]["cite_candidates"] == (cite == "--cite-candidates")
        lengths[cite] = config["answer_tokens"]
    plain, cited = lengths["--no-cite-candidates"], lengths["--cite-candidates"]
    assert cited["median"] >= plain["median"] + 10 * 2 and cited["max"] > plain["max"]  # "#k " is 2+ tokens a line
