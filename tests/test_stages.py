"""Smoke runs of the stages on real data with tiny budgets (01 -> 03 retriever -> 05 single-shot rows).

INSPIRED keeps this fast (1,123 items to encode); the real sentence encoder is used."""
import importlib
import json
import math

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
    report = sft_recommender.main(run + retriever_only + ["--epochs", "2"])
    check_reported_recall(inspired_run, report)
    check_cross_fitting(inspired_run, report)
    check_baselines(run, inspired_run, report)

    # a second run reuses the cached encoder features; retraining the fused net drops its old folds
    features_mtime = (inspired_run / "retriever" / "features.pt").stat().st_mtime
    sft_recommender.main(run + retriever_only + ["--epochs", "1", "--variants", "fused", "--retriever-folds", "0"])
    assert (inspired_run / "retriever" / "features.pt").stat().st_mtime == features_mtime
    assert not (inspired_run / "retriever" / "fused" / "folds").exists()

    results = evaluate.main(run + ["--rows", *evaluate.SINGLE_SHOT_ROWS, "--bootstrap", "200"])
    assert list(results["rows"]) == ["popularity", "cooccurrence", "encoder-cosine", "cooccurrence+cosine",
                                     "retriever-semantic", "retriever-collab", "retriever-fused"]
    assert results["rows"]["cooccurrence+cosine"]["mix_weight"] in common.MIX_WEIGHTS
    for row in results["rows"].values():
        for k in (1, 10, 50):
            lo, hi = row["ci"]["new"][f"recall@{k}"]
            assert lo <= row["new"][f"recall@{k}"] <= hi
        assert row["new"]["recall@1"] <= row["new"]["recall@10"] <= row["new"]["recall@50"]
    table = (inspired_run / "eval" / "results.md").read_text()
    assert "retriever-fused" in table and f"single shot: {results['samples']} samples" in table
    assert results["samples"] == len(common.load_samples(common.RunPaths(inspired_run), "test"))
    check_merge(run, inspired_run, results)


def check_reported_recall(run_dir, report):
    """Each variant's reported recall, counted here label by label from the lists its saved net ranks (the
    cached encoder vectors of the same 120 samples): a report of another epoch's weights than the saved
    best, of the wrong split or of "all" targets, a cut at the wrong k or a miscounted label fails."""
    features = torch.load(run_dir / "retriever" / "features.pt", weights_only=False)["features"]
    held_out = {split: common.load_samples(common.RunPaths(run_dir), split)[:120] for split in ("valid", "test")}
    for variant in ("fused", "semantic", "collaborative"):
        assert (run_dir / "retriever" / variant / "retriever.pt").exists()
        rep = report["variants"][variant]
        assert 0 <= rep["best_epoch"] <= 2   # epoch 0: the untrained net (the fused one: the count mix)
        net = common.DualViewRetriever.load(run_dir / "retriever" / variant)
        for split, rows in held_out.items():
            assert len(features[split]) == len(rows)
            ranked = common.rank_items(net, features[split], [s["context_items"] for s in rows], 50)
            labels = [(r, t) for r, s in zip(ranked, rows) for t in s["new_targets"]]
            assert rep[split]["labels"]["new"] == len(labels) > 0
            for k in (20, 50):
                hits = sum(t in r[:k] for r, t in labels)
                assert rep[split]["new"][f"recall@{k}"] == hits / len(labels), (variant, split, k)
    log = [json.loads(line) for line in (run_dir / "retriever" / "train_log.jsonl").read_text().splitlines()]
    assert [row["variant"] for row in log] == [v for v in ("fused", "semantic", "collaborative")
                                               + tuple(f"fused/fold{f}" for f in range(5)) for _ in range(2)]
    assert all(row["loss"] > 0 for row in log)


def check_baselines(run, run_dir, report):
    """report.json's baseline rows on valid and test; --parts baselines recomputes them alone from the
    cached features and keeps the trained variants' rows."""
    baselines = report["baselines"]
    assert list(baselines["rows"]) == list(common.BASELINE_ROWS) and baselines["mix_weight"] in common.MIX_WEIGHTS
    for row in baselines["rows"].values():
        assert row["test"]["labels"] == report["variants"]["fused"]["test"]["labels"]
    again = sft_recommender.main(run + ["--parts", "baselines", "--max-samples", "120"])
    assert again["baselines"]["rows"] == baselines["rows"] and again["variants"] == report["variants"]
    assert common.read_json(run_dir / "retriever" / "report.json")["cross_fitting"] == report["cross_fitting"]


def check_cross_fitting(run_dir, report):
    """5 copies of the fused retriever, each without one fold of the training dialogues; the retriever
    later stages use asks a training dialogue's fold, and the full net for the rest."""
    folds_dir = run_dir / "retriever" / "fused" / "folds"
    fold_of = json.loads((folds_dir / "folds.json").read_text())["dialogues"]
    paths = common.RunPaths(run_dir)
    assert set(fold_of) == {d["dialog_id"] for d in common.load_dialogues(paths, "train")}
    train = common.load_samples(paths, "train")[:120]
    labels = sum(len(s["new_targets"]) for s in train)
    per_fold = report["cross_fitting"]["per_fold"]
    for f, fold in enumerate(per_fold):   # a fold's net trained on every label outside its dialogues
        in_fold = sum(len(s["new_targets"]) for s in train if fold_of[s["dialog_id"]] == f)
        assert fold["training_labels"] == labels - in_fold
    assert sum(fold["training_labels"] for fold in per_fold) == 4 * labels
    assert labels == report["variants"]["fused"]["training_labels"]
    assert set(report["candidate_targets"]) == {"train, full retriever", "train, out of fold", "valid"}
    retriever = common.Retriever(run_dir / "retriever" / "fused")
    # each net's count features count exactly the training dialogues it trained on: none of its fold's
    dialogues = common.load_dialogues(paths, "train")
    for f, net in [(None, retriever.net), *enumerate(retriever.fold_nets)]:
        own = [d for d in dialogues if fold_of[d["dialog_id"]] != f]
        counted = common.CountBaselines.fit(own, net.item_sem.shape[0])
        assert torch.equal(net.popularity, counted.popularity), f
        assert torch.equal(net.counts_matrix().to_dense(), counted.cooccurrence), f
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


def check_merge(run, run_dir, results):
    """--merge keeps the earlier rows and replaces the rerun one, in table order; other settings are refused."""
    merged = evaluate.main(run + ["--rows", "popularity", "--bootstrap", "50", "--merge"])
    assert list(merged["rows"]) == evaluate.SINGLE_SHOT_ROWS
    assert merged["rows"]["retriever-fused"] == results["rows"]["retriever-fused"]
    assert merged["rows"]["popularity"]["ci"] != results["rows"]["popularity"]["ci"]  # 50 resamples, not 200
    assert len(merged["merged_args"]) == 1 and "retriever-fused" in (run_dir / "eval" / "results.md").read_text()
    with pytest.raises(SystemExit, match="other settings"):
        evaluate.main(run + ["--rows", "popularity", "--merge", "--turns", "3"])
    # a results.json from before a flag existed merges as if it had run with the flag's default
    path = run_dir / "eval" / "results.json"
    older = json.loads(path.read_text())
    del older["args"]["no_repeat_ngram"]
    path.write_text(json.dumps(older))
    assert list(evaluate.main(run + ["--rows", "popularity", "--bootstrap", "50", "--merge"])["rows"]) == \
        evaluate.SINGLE_SHOT_ROWS
    # ... but not one decoded under the answer constraint this code no longer has
    path.write_text(json.dumps({**older, "args": {**older["args"], "constrain_answer": True}}))
    with pytest.raises(SystemExit, match="constrain_answer"):
        evaluate.main(run + ["--rows", "popularity", "--bootstrap", "50", "--merge"])
    alone = evaluate.main(run + ["--rows", "popularity", "--bootstrap", "50"])
    assert list(alone["rows"]) == ["popularity"]
    # ... except where the default changed: before --stop-on-label, conversations stopped on the label
    older = json.loads(path.read_text())  # a file with --retriever-query but without --stop-on-label
    del older["args"]["stop_on_label"]
    older["args"].update(retriever_query="latest-feedback", recommender_turn="question")
    path.write_text(json.dumps(older))
    with pytest.raises(SystemExit, match="stop_on_label"):
        evaluate.main(run + ["--rows", "retriever-fused", "--bootstrap", "50", "--merge"])
    again = evaluate.main(run + ["--rows", "retriever-fused", "--bootstrap", "50", "--merge", "--stop-on-label"])
    assert list(again["rows"]) == ["popularity", "retriever-fused"]
    # rows of another conversation protocol (the whole dialogue read, a list sentence said) never merge
    older = json.loads(path.read_text())
    older["args"].update(retriever_query="whole-dialogue", recommender_turn="question")
    path.write_text(json.dumps(older))
    with pytest.raises(SystemExit, match="retriever_query"):
        evaluate.main(run + ["--rows", "popularity", "--bootstrap", "50", "--merge", "--stop-on-label"])


def test_paired_gain_by_hand():
    others = list(range(100, 110))  # ten items that are never targets
    samples = [{"new_targets": t, "targets": t} for t in ([5], [7, 8], [3], [])]
    before = [[5, *others], others, [3, *others], others]
    after = [[*others, 5], [7, 8, *others], [3, *others], others]
    # sample 0 loses its hit (5 falls to rank 11): -1; sample 1 gains two: +2; sample 2 keeps it: 0;
    # sample 3 has no label and does not count. (-1 + 2 + 0) / 4 labels = 0.25
    g = evaluate.paired_gain(before, after, samples, "recall@10", resamples=2000)
    assert g["gain"] == pytest.approx(0.25) and (g["up"], g["down"], g["samples"]) == (1, 1, 3)
    assert -1.0 <= g["ci"][0] <= 0.25 <= g["ci"][1] <= 1.0  # extremes: all draws sample 0 (-1/1), all sample 1 (2/2)
    # unchanged rankings: the paired interval is exactly 0, though recall's own interval is wide
    same = evaluate.paired_gain(before, before, samples, "recall@10")
    assert same == {"gain": 0.0, "ci": [0.0, 0.0], "up": 0, "down": 0, "samples": 3}
    assert common.score_rankings(before, samples, ks=(10,), bootstrap=200)["ci"]["new"]["recall@10"][1] > 0.5
    # NDCG@10: sample 1 gains 1 + 1/log2(3) = 1.6309, sample 0 loses 1 -> 0.6309 / 4
    assert evaluate.paired_gain(before, after, samples, "ndcg@10")["gain"] == pytest.approx(0.6309298 / 4)


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


def test_rows_are_paired_with_sft_in_r1_r10_and_ndcg10_by_hand():
    """Three samples, one new target each (5, 7, 9). The target's rank at turn 1 (sft+simulator -> smtpo):
    A 2 -> 1, B 1 -> 1, C 1 -> 11; at turn 2 all lists are equal."""
    subset = [{"new_targets": [t], "targets": [t]} for t in (5, 7, 9)]
    filler = list(range(20, 40))
    sft = {"turn 1": [[1, 5, *filler], [7, *filler], [9, *filler]], "turn 2": [[5, *filler]] * 3}
    rl = {"turn 1": [[5, 1, *filler], [7, *filler], [*filler[:10], 9]], "turn 2": [[5, *filler]] * 3}
    base = [[*filler[:10], 5], [7, *filler], [9, *filler]]  # one turn: its turn-2 list is its turn-1 list
    multi = {"base-zero-shot": {"lists": {"turn 1": base, "turn 2": base}},
             "sft-single-turn": {"lists": {"turn 1": sft["turn 1"], "turn 2": sft["turn 1"]}},
             "sft+simulator": {"lists": sft}, "smtpo": {"lists": rl}}
    evaluate.compare_with_reference(multi, subset, evaluate.Args(limit=3, bootstrap=200, rows=["smtpo"]))
    assert "vs_reference" not in multi["sft-single-turn"]  # sft+simulator's own turn 1
    vs = multi["smtpo"]["vs_reference"]
    assert set(vs) == {"reference", "turn 1", "turn 2", "recall@1", "ndcg@10"}
    # R@1: A +1, C -1 over 3 labels; R@10: C -1; NDCG@10: A 1 - 1/log2(3), C -1
    r1 = vs["recall@1"]["turn 1"]
    assert r1["gain"] == 0.0 and (r1["up"], r1["down"]) == (1, 1)
    assert vs["turn 1"]["gain"] == pytest.approx(-1 / 3) and vs["turn 1"]["down"] == 1
    assert vs["ndcg@10"]["turn 1"]["gain"] == pytest.approx((1 - 1 / math.log2(3) - 1) / 3)
    assert vs["turn 2"]["gain"] == vs["recall@1"]["turn 2"]["gain"] == vs["ndcg@10"]["turn 2"]["gain"] == 0.0
    # base-zero-shot ranks A's target 11th where sft+simulator's turn 1 ranks it 2nd: R@10 -1 of 3 labels
    assert multi["base-zero-shot"]["vs_reference"]["turn 1"]["gain"] == pytest.approx(-1 / 3)
    text = evaluate.paired_table({name: multi[name]["vs_reference"] for name in ("base-zero-shot", "smtpo")}, 2)
    assert "| system | ΔR@1 t1 | ΔR@1 t2 | ΔR@10 t1 | ΔR@10 t2 | ΔNDCG@10 t1 | ΔNDCG@10 t2 |" in text
    assert "| smtpo | +0.000 [" in text and "(1 / 1) | +0.000 [+0.000, +0.000] (0 / 0) | -0.333 [" in text
    # a row merged from a file that paired R@10 only: the other metrics read n/a
    older = {"reference": "sft+simulator", "turn 1": vs["turn 1"], "turn 2": vs["turn 2"]}
    assert evaluate.paired_table({"smtpo": older}, 2).splitlines()[-1].startswith("| smtpo | n/a | n/a | -0.333 [")


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


def test_count_rankings_exclude_items_already_in_the_dialogue(inspired_run):
    run = common.RunPaths(inspired_run)
    samples = [s for s in common.load_samples(run, "test") if s["context_items"]][:20]
    rankings, mix = evaluate.baseline_rankings(run, ["popularity", "cooccurrence"], len(common.load_items(run)),
                                               samples, 50, evaluate.Args())
    assert mix == {} and set(rankings) == {"popularity", "cooccurrence"}
    for ranked in rankings.values():
        for r, s in zip(ranked, samples):
            assert not set(r) & set(s["context_items"])
            assert len(set(r)) == 50
    counts = common.popularity_counts(common.load_dialogues(run, "train"), len(common.load_items(run)))
    ranked = rankings["popularity"]
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
