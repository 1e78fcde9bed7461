"""Smoke runs of the stages on real data with tiny budgets (01 -> 03 retriever -> 05 single-shot rows).

INSPIRED keeps this fast (1,123 items to encode); the real sentence encoder is used."""
import importlib
import json

import pytest
import torch

import common

prep = importlib.import_module("01_prep_data")
sft_recommender = importlib.import_module("03_sft_recommender")
evaluate = importlib.import_module("05_eval")


@pytest.fixture(scope="module")
def inspired_run(tmp_path_factory, shared_data):
    run_dir = tmp_path_factory.mktemp("inspired_run")
    prep.main(["--dataset", "inspired", "--raw-dir", str(shared_data / "inspired"), "--run-dir", str(run_dir)])
    return run_dir


def test_stages_stop_at_once_when_their_input_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="01_prep_data.py"):
        sft_recommender.main(["--run-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="01_prep_data.py"):
        evaluate.main(["--run-dir", str(tmp_path)])


def test_one_retriever_fold_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="--retriever-folds 1: give 0"):
        sft_recommender.main(["--run-dir", str(tmp_path), "--retriever-folds", "1"])


def test_retriever_then_eval_smoke(inspired_run):
    run = ["--dataset", "inspired", "--run-dir", str(inspired_run)]
    with pytest.raises(SystemExit, match="03_sft_recommender.py"):
        evaluate.main(run + ["--rows", "retriever-fused"])

    retriever_only = ["--parts", "retriever", "--max-samples", "120", "--dim", "32"]
    report = sft_recommender.main(run + retriever_only + ["--epochs", "2", "--retriever-batch-size", "64"])
    # each variant's reported recall, counted here label by label from the lists its saved net ranks (the
    # cached encoder vectors of the same 120 samples): a report of another epoch's weights than the saved
    # best, of the wrong split or of "all" targets, a cut at the wrong k or a miscounted label fails
    features = torch.load(inspired_run / "retriever" / "features.pt", weights_only=False)["features"]
    held_out = {split: common.load_samples(common.RunPaths(inspired_run), split)[:120] for split in ("valid", "test")}
    for variant in ("fused", "semantic", "collaborative"):
        assert (inspired_run / "retriever" / variant / "retriever.pt").exists()
        rep = report["variants"][variant]
        assert 1 <= rep["best_epoch"] <= 2
        net = common.DualViewRetriever.load(inspired_run / "retriever" / variant)
        for split, rows in held_out.items():
            assert len(features[split]) == len(rows)
            ranked = common.rank_items(net, features[split], [s["context_items"] for s in rows], 50)
            labels = [(r, t) for r, s in zip(ranked, rows) for t in s["new_targets"]]
            assert rep[split]["labels"]["new"] == len(labels) > 0
            for k in (20, 50):
                hits = sum(t in r[:k] for r, t in labels)
                assert rep[split]["new"][f"recall@{k}"] == hits / len(labels), (variant, split, k)
    log = [json.loads(line) for line in (inspired_run / "retriever" / "train_log.jsonl").read_text().splitlines()]
    assert [row["variant"] for row in log] == [v for v in ("fused", "semantic", "collaborative")
                                               + tuple(f"fused/fold{f}" for f in range(5)) for _ in range(2)]
    assert all(row["loss"] > 0 for row in log)

    # cross-fitting: 5 copies of the fused retriever, each without one fold of the training dialogues
    folds_dir = inspired_run / "retriever" / "fused" / "folds"
    fold_of = json.loads((folds_dir / "folds.json").read_text())["dialogues"]
    paths = common.RunPaths(inspired_run)
    assert set(fold_of) == {d["dialog_id"] for d in common.load_dialogues(paths, "train")}
    train = common.load_samples(paths, "train")[:120]
    labels = sum(len(s["new_targets"]) for s in train)
    per_fold = report["cross_fitting"]["per_fold"]
    for f, fold in enumerate(per_fold):   # a fold's net trained on every label outside its dialogues
        assert fold["training_labels"] == labels - sum(len(s["new_targets"]) for s in train if fold_of[s["dialog_id"]] == f)
    assert sum(fold["training_labels"] for fold in per_fold) == 4 * labels == 4 * report["variants"]["fused"]["training_labels"]
    assert set(report["candidate_targets"]) == {"train, full retriever", "train, out of fold", "valid"}
    # the retriever later stages use asks a training dialogue's fold, and the full net for the rest
    retriever = common.Retriever(inspired_run / "retriever" / "fused")
    some = train[:6] + common.load_samples(paths, "valid")[:2]
    ids = [s["dialog_id"] for s in some]
    contexts, items = [s["context"] for s in some], [s["context_items"] for s in some]
    encoded = common.encode_texts([common.dialogue_text(c) for c in contexts], retriever.tokenizer, retriever.encoder,
                                  progress=False)
    found = retriever.search(contexts, items, 20, dialog_ids=ids)
    for i, d in enumerate(ids):
        net = retriever.fold_nets[fold_of[d]] if d in fold_of else retriever.net
        assert found[i] == common.rank_items(net, encoded[i:i + 1], [items[i]], 20)[0], d
    assert retriever.search(contexts, items, 20) == common.rank_items(retriever.net, encoded, items, 20)

    # a second run reuses the cached encoder features; retraining the fused net drops its old folds
    features_mtime = (inspired_run / "retriever" / "features.pt").stat().st_mtime
    sft_recommender.main(run + retriever_only + ["--epochs", "1", "--variants", "fused", "--retriever-folds", "0"])
    assert (inspired_run / "retriever" / "features.pt").stat().st_mtime == features_mtime
    assert not folds_dir.exists()

    results = evaluate.main(run + ["--rows", *evaluate.SINGLE_SHOT_ROWS, "--bootstrap", "200"])
    assert set(results["rows"]) == {"popularity", "retriever-semantic", "retriever-collab", "retriever-fused"}
    for row in results["rows"].values():
        for k in (1, 10, 50):
            lo, hi = row["ci"]["new"][f"recall@{k}"]
            assert lo <= row["new"][f"recall@{k}"] <= hi
        assert row["new"]["recall@1"] <= row["new"]["recall@10"] <= row["new"]["recall@50"]
    table = (inspired_run / "eval" / "results.md").read_text()
    assert "retriever-fused" in table and f"single shot: {results['samples']} samples" in table
    assert results["samples"] == len(common.load_samples(common.RunPaths(inspired_run), "test"))

    # --merge keeps the earlier rows and replaces the rerun one, in table order; other settings are refused
    merged = evaluate.main(run + ["--rows", "popularity", "--bootstrap", "50", "--merge"])
    assert list(merged["rows"]) == evaluate.SINGLE_SHOT_ROWS
    assert merged["rows"]["retriever-fused"] == results["rows"]["retriever-fused"]
    assert merged["rows"]["popularity"]["ci"] != results["rows"]["popularity"]["ci"]  # 50 resamples, not 200
    assert len(merged["merged_args"]) == 1 and "retriever-fused" in (inspired_run / "eval" / "results.md").read_text()
    with pytest.raises(SystemExit, match="other settings"):
        evaluate.main(run + ["--rows", "popularity", "--merge", "--turns", "3"])
    # a results.json from before a flag existed merges as if it had run with the flag's default
    path = inspired_run / "eval" / "results.json"
    older = json.loads(path.read_text())
    del older["args"]["constrain_answer"]
    path.write_text(json.dumps(older))
    assert list(evaluate.main(run + ["--rows", "popularity", "--bootstrap", "50", "--merge"])["rows"]) == \
        evaluate.SINGLE_SHOT_ROWS
    alone = evaluate.main(run + ["--rows", "popularity", "--bootstrap", "50"])
    assert list(alone["rows"]) == ["popularity"]
    # ... except where the default changed: before --stop-on-label, conversations stopped on the label
    older = json.loads(path.read_text())  # a file of 2026-11-26 to -12-04: before --stop-on-label, after --retriever-query
    del older["args"]["stop_on_label"]
    older["args"].update(retriever_query="latest-feedback", recommender_turn="question")
    path.write_text(json.dumps(older))
    with pytest.raises(SystemExit, match="stop_on_label"):
        evaluate.main(run + ["--rows", "retriever-fused", "--bootstrap", "50", "--merge"])
    again = evaluate.main(run + ["--rows", "retriever-fused", "--bootstrap", "50", "--merge", "--stop-on-label"])
    assert list(again["rows"]) == ["popularity", "retriever-fused"]
    # rows of the protocol before 2026-12-04's flags were removed (whole dialogue, a list sentence) never merge
    older = json.loads(path.read_text())
    older["args"].update(retriever_query="whole-dialogue", recommender_turn="question")
    path.write_text(json.dumps(older))
    with pytest.raises(SystemExit, match="retriever_query"):
        evaluate.main(run + ["--rows", "popularity", "--bootstrap", "50", "--merge", "--stop-on-label"])


def test_rows_are_paired_with_sft_by_their_kept_lists():
    """compare_with_reference on hand-made rows: 2 samples of one new target each (items 5 and 6)."""
    subset = [{"new_targets": [5]}, {"new_targets": [6]}]
    args = evaluate.Args(limit=2, bootstrap=20, rows=["smtpo"])
    sft = {"lists": {"turn 1": [[5], [1]], "turn 5": [[1], [1]]}}
    rl = {"lists": {"turn 1": [[5], [6]], "turn 5": [[5], [6]]}}  # finds sample 2's target, keeps sample 1's
    older = {"vs_reference": {"reference": "sft+simulator"}}  # a row of a file written before the lists
    multi = {"sft+simulator": sft, "smtpo": rl, "smtpo-no-preference-reward": older}
    evaluate.compare_with_reference(multi, subset, args)
    assert rl["vs_reference"]["turn 1"]["gain"] == 0.5 and rl["vs_reference"]["turn 1"]["up"] == 1
    assert rl["vs_reference"]["turn 5"]["gain"] == 1.0 and rl["vs_reference"]["turn 5"]["up"] == 2
    assert "vs_reference" not in sft and older["vs_reference"] == {"reference": "sft+simulator"}
    # sft+simulator played again: the older row's comparison was with episodes the file no longer holds
    evaluate.compare_with_reference(multi, subset, evaluate.Args(limit=2, bootstrap=20, rows=["sft+simulator"]))
    assert "vs_reference" not in older and rl["vs_reference"]["turn 5"]["gain"] == 1.0
    with pytest.raises(SystemExit, match="another draw"):
        evaluate.compare_with_reference(multi, subset[:1], args)


def test_merge_refuses_rows_of_recommenders_that_read_other_prompts(tmp_path):
    from dataclasses import asdict

    now = {"dataset": "inspired", "args": asdict(evaluate.Args(dataset="inspired")),
           "prompt_version": common.REC_PROMPT_VERSION, "rows": {}, "multi_turn": {"smtpo": {}}, "seconds": {}}
    earlier = {**now, "multi_turn": {"sft+simulator": {}}}
    common.write_json(tmp_path / "results.json", earlier)
    assert set(evaluate.merge_earlier(now, tmp_path / "results.json")["multi_turn"]) == {"sft+simulator", "smtpo"}
    del earlier["prompt_version"]  # a file written before the field: version 1's candidate lines
    common.write_json(tmp_path / "results.json", earlier)
    with pytest.raises(SystemExit, match="prompt_version"):
        evaluate.merge_earlier(now, tmp_path / "results.json")


def test_popularity_ranking_excludes_items_already_in_the_dialogue(inspired_run):
    run = common.RunPaths(inspired_run)
    samples = [s for s in common.load_samples(run, "test") if s["context_items"]][:20]
    ranked = evaluate.popularity_rankings(run, len(common.load_items(run)), samples, 50, exclude_seen=True)
    for r, s in zip(ranked, samples):
        assert not set(r) & set(s["context_items"])
        assert len(set(r)) == 50
    counts = common.popularity_counts(common.load_dialogues(run, "train"), len(common.load_items(run)))
    assert counts[ranked[0][0]] >= counts[ranked[0][-1]]


@pytest.mark.parametrize("script", ["01_prep_data", "02_sft_simulator", "03_sft_recommender", "04_rl_multiturn",
                                    "05_eval"])
def test_every_stage_prints_its_help(script, capsys):
    # help texts go through argparse's %-formatting: a bare '95%' in a help string crashed --help
    with pytest.raises(SystemExit) as done:
        importlib.import_module(script).main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--dataset" in out and "--seed" in out
