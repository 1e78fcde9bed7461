"""Unit tests of common.py's metrics, title matching, arguments, run paths and retriever."""
import importlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from common import arg  # noqa: E402

rec = importlib.import_module("03_sft_recommender")  # the retriever's training pieces only 03 uses


# ---------------------------------------------------------------- metrics

def test_target_at_rank_7_each_k_looks_at_its_own_slice():
    ranked = [10, 11, 12, 13, 14, 15, 99, 16, 17, 18]  # target 99 at rank 7
    m = common.label_metrics(ranked, 99, ks=(1, 5, 10, 50))
    assert m["recall@1"] == 0 and m["recall@5"] == 0
    assert m["recall@10"] == 1 and m["recall@50"] == 1
    assert m["ndcg@5"] == 0 and m["mrr@5"] == 0
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(8))  # = 1/3
    assert m["mrr@10"] == pytest.approx(1 / 7)


def test_target_at_rank_1_and_missing():
    assert common.label_metrics([5, 6], 5, ks=(1,)) == {"recall@1": 1.0, "ndcg@1": 1.0, "mrr@1": 1.0}
    assert common.label_metrics([5, 6], 7, ks=(10,)) == {"recall@10": 0.0, "ndcg@10": 0.0, "mrr@10": 0.0}


def test_one_label_per_target_item():
    acc = common.MetricAccumulator(ks=(1, 10))
    acc.add([1, 2, 3], [1, 3])   # two labels: rank 1 and rank 3
    acc.add([4, 5, 6], [9])      # one label, a miss
    acc.add([7], [])             # no label: ignored
    r = acc.result()
    assert acc.labels == 3
    assert r["recall@1"] == pytest.approx(1 / 3)
    assert r["recall@10"] == pytest.approx(2 / 3)
    assert r["mrr@10"] == pytest.approx((1 + 1 / 3) / 3)
    assert r["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 3)


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_samples():
    small, large = common.MetricAccumulator(ks=(1,)), common.MetricAccumulator(ks=(1,))
    for i in range(40):
        small.add([0], [0 if i % 4 == 0 else 1])
    for i in range(400):
        large.add([0], [0 if i % 4 == 0 else 1])
    lo, hi = small.confidence_intervals()["recall@1"]
    assert lo <= 0.25 <= hi
    lo2, hi2 = large.confidence_intervals()["recall@1"]
    assert (hi2 - lo2) < (hi - lo)


def test_wilson_interval_by_hand():
    # 21 of 24: p = 0.875, z^2 / n = 0.16007; centre (0.875 + 0.08003) / 1.16007 = 0.82325,
    # half-width 1.96 * sqrt(0.875 * 0.125 / 24 + 3.8416 / 2304) / 1.16007 = 0.13330
    low, high = common.wilson_interval(21, 24)
    assert low == pytest.approx(0.68995, abs=1e-4) and high == pytest.approx(0.95655, abs=1e-4)
    assert common.wilson_interval(0, 10)[0] == 0.0 and common.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert common.wilson_interval(10, 10)[0] < 1.0  # all n valid still leaves room below
    assert common.wilson_interval(0, 0) == [0.0, 1.0]



def test_copies_turn_counts_the_recommenders_words_in_a_reply():
    said = "I would recommend Knives Out (2019), Joker (2019) or Get Out (2017)."
    assert common.copies_turn("I would recommend Joker (2019)", said)  # 5 of 5 words
    assert common.copies_turn("No, I would recommend Joker (2019).", said)  # 5 of 6 = 0.83
    assert not common.copies_turn("I would recommend John Wick (2014)", said)  # 3 of 6
    assert not common.copies_turn("Yes, I have seen Joker, it was great", "Have you seen Joker (2019)?")  # 3 of 8
    assert not common.copies_turn("", said)


# ---------------------------------------------------------------- titles

def test_title_matching_year_articles_fuzzy_and_candidates():
    items = [{"title": "The Matrix (1999)"}, {"title": "Matrix (2021)"}, {"title": "Amélie (2001)"},
             {"title": "Star Wars: Episode IV – A New Hope (1977)"}]
    index = common.TitleIndex(items, popularity=[5, 1, 1, 1])
    assert index.match("the matrix (1999)") == 0
    assert index.match("Matrix (2021)") == 1
    assert index.match("The Matrix") == 0           # no year: the more popular one
    assert index.match("Amelie") == 2               # accents
    assert index.match("Star Wars Episode IV A New Hope") == 3
    assert index.match("Star Wars Episode IV A New Hop") == 3   # fuzzy
    assert index.match("Completely Different Film") is None
    assert index.match("The Matrix", candidates=[1, 2]) == 1     # restricted to candidates


# ---------------------------------------------------------------- arguments and run paths

@dataclass
class _Args:
    name: str = arg("x", "a name", choices=["x", "y"])
    steps: int = arg(3, "steps")
    lr: float = arg(1e-3, "learning rate")
    flag: bool = arg(True, "a switch")
    rows: list = arg(["a", "b"], "rows")


def test_parse_args_types_bools_lists_and_choices():
    a = common.parse_args(_Args, ["--name", "y", "--steps", "7", "--lr", "0.5", "--no-flag", "--rows", "c"])
    assert (a.name, a.steps, a.lr, a.flag, a.rows) == ("y", 7, 0.5, False, ["c"])
    assert common.parse_args(_Args, []).rows == ["a", "b"]
    with pytest.raises(SystemExit):
        common.parse_args(_Args, ["--name", "z"])


def test_missing_stage_names_the_script_to_run(tmp_path):
    run = common.RunPaths(tmp_path)
    with pytest.raises(SystemExit, match="01_prep_data.py"):
        run.require("data", "items.jsonl")
    with pytest.raises(SystemExit, match="03_sft_recommender.py"):
        run.require("retriever", "fused/retriever.pt")


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(common.DataError, match=r"x.jsonl:2"):
        common.read_jsonl(p)


def test_write_json_puts_number_lists_on_one_line_and_reads_back(tmp_path):
    obj = {"lists": {"turn 1": [[3, 1, 2], [7, 5]]}, "ci": [-0.125, 2e-05], "titles": ["A, [1,\n2]", "B"],
           "mixed": [1, None], "empty": []}
    common.write_json(tmp_path / "r.json", obj)
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == obj
    assert "[3, 1, 2]" in text and "[-0.125, 2e-05]" in text and '"mixed": [\n' in text


# ---------------------------------------------------------------- retriever

def test_cooccurrence_embeddings_put_co_mentioned_items_together():
    sets = [[0, 1]] * 20 + [[2, 3]] * 20 + [[0, 1, 4]] * 3
    emb = rec.cooccurrence_embeddings(sets, 8, dim=4)
    cos = F.cosine_similarity
    assert cos(emb[0], emb[1], dim=0) > cos(emb[0], emb[2], dim=0)
    assert emb.shape == (8, 4)


@pytest.mark.parametrize("views", [("semantic",), ("collaborative",), ("semantic", "collaborative")])
def test_retriever_shapes_masking_and_padding(views):
    torch.manual_seed(0)
    net = common.DualViewRetriever(torch.randn(30, 12), torch.randn(30, 8), views, dim=8, heads=2, dropout=0.0).eval()
    items = common.pad_item_lists([[1, 2], [], [5]])
    assert items.tolist() == [[1, 2], [-1, -1], [5, -1]]
    scores = net(torch.randn(3, 12), items, exclude_seen=True)
    assert scores.shape == (3, 30)
    assert torch.isinf(scores[0, [1, 2]]).all() and torch.isinf(scores[2, 5])
    assert torch.isfinite(scores[1]).all()
    # padding must not change a row's scores
    alone = net(torch.randn(1, 12).copy_(torch.zeros(1, 12)), common.pad_item_lists([[5]]))
    padded = net(torch.zeros(1, 12), torch.tensor([[5, -1, -1]]))
    assert torch.allclose(alone, padded, atol=1e-5)


def test_dialogue_folds_split_dialogues_evenly_and_reproducibly():
    ids = [f"train-{i}" for i in range(23)] * 3           # several samples per dialogue
    folds = rec.dialogue_folds(ids, 5, seed=1)
    assert set(folds) == set(ids) and set(folds.values()) == set(range(5))
    sizes = sorted(list(folds.values()).count(f) for f in range(5))
    assert sizes == [4, 4, 5, 5, 5]
    assert rec.dialogue_folds(list(reversed(ids)), 5, seed=1) == folds   # order of the ids does not matter
    assert rec.dialogue_folds(ids, 5, seed=2) != folds


def test_cross_fitted_ranking_routes_each_dialogue_to_its_fold_and_the_retriever_finds_them(tmp_path):
    """Rows of fold f are ranked by fold f's net, rows of no fold (held-out dialogues) by the full
    net; load_fold_retrievers reads the layout 03 writes (test_stages runs 03 and common.Retriever)."""
    torch.manual_seed(0)
    def make():
        return common.DualViewRetriever(torch.randn(30, 12), torch.randn(30, 8), dim=8, heads=2, dropout=0.0).eval()
    full, fold_nets = make(), [make(), make()]
    ctx, items = torch.randn(5, 12), [[1], [], [2, 3], [], [4]]
    folds = [0, None, 1, 0, None]
    ranked = common.rank_items_cross_fitted(full, fold_nets, folds, ctx, items, k=6)
    for i, f in enumerate(folds):
        net = full if f is None else fold_nets[f]
        assert ranked[i] == common.rank_items(net, ctx[i:i + 1], [items[i]], k=6)[0]
    assert ranked != common.rank_items(full, ctx, items, k=6)             # the folds did rank their rows
    assert common.rank_items_cross_fitted(full, [], [None] * 5, ctx, items, k=6) == \
        common.rank_items(full, ctx, items, k=6)

    assert common.load_fold_retrievers(tmp_path / "fused") == ({}, [])   # a retriever without folds
    full.save(tmp_path / "fused")
    for f, net in enumerate(fold_nets):
        net.save(tmp_path / "fused" / "folds" / f"fold{f}")
    common.write_json(tmp_path / "fused" / "folds" / "folds.json",
                      {"folds": 2, "dialogues": {"train-1": 0, "train-2": 1}})
    fold_of, loaded = common.load_fold_retrievers(tmp_path / "fused")
    assert fold_of == {"train-1": 0, "train-2": 1} and len(loaded) == 2
    assert common.rank_items(loaded[1], ctx, items, k=6) == common.rank_items(fold_nets[1], ctx, items, k=6)


def test_fused_retriever_uses_both_views_on_held_out_dialogues(tmp_path):
    """Half the dialogues describe their target in text (only the semantic view can use that);
    the other half mention item 2j whose target is 2j+1, a pair known only from co-occurrence
    (only the collaborative view can use that: those pairs never appear as training labels).
    On held-out dialogues the fused retriever must beat each single view. It also saves/loads."""
    torch.manual_seed(0)
    n_items, sem_dim = 32, 16
    item_sem = F.normalize(torch.randn(n_items, sem_dim), dim=-1)
    collab_init = rec.cooccurrence_embeddings([[2 * j, 2 * j + 1] for j in range(n_items // 2)] * 5, n_items, 32)

    def make(count, pairs):
        ctx, ctx_items, targets = [], [], []
        for i in range(count):
            if i % 2 == 0:   # the text describes the target
                t = int(torch.randint(0, n_items, ()))
                ctx.append(item_sem[t] + 0.05 * torch.randn(sem_dim)); ctx_items.append([])
            else:            # a mentioned item whose co-occurring partner is the target
                j = pairs[int(torch.randint(0, len(pairs), ()))]
                t = 2 * j + 1
                ctx.append(0.05 * torch.randn(sem_dim)); ctx_items.append([2 * j])
            targets.append(t)
        return torch.stack(ctx), common.pad_item_lists(ctx_items), torch.tensor(targets)

    train = make(800, list(range(0, 8)))        # pairs 0..7 seen as labels
    test = make(400, list(range(8, 16)))        # pairs 8..15 only in co-occurrence
    top5 = {}
    for views in [("semantic",), ("collaborative",), ("semantic", "collaborative")]:
        torch.manual_seed(0)
        net = common.DualViewRetriever(item_sem, collab_init, views, dim=32, heads=2, dropout=0.0)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
        for _ in range(200):
            loss = F.cross_entropy(net(*train[:2], exclude_seen=True), train[2])
            opt.zero_grad(); loss.backward(); opt.step()
        net.eval()
        with torch.no_grad():
            hits = net(*test[:2], exclude_seen=True).topk(5, dim=1).indices == test[2].unsqueeze(1)
        top5[views] = hits.any(1).float().mean().item()
        last = net
    fused = top5[("semantic", "collaborative")]
    print(top5)
    assert fused > top5[("semantic",)] + 0.15, top5
    assert fused > top5[("collaborative",)] + 0.15, top5
    last.save(tmp_path / "r", extra={"encoder": "x"})
    loaded = common.DualViewRetriever.load(tmp_path / "r")
    assert loaded.extra["encoder"] == "x"
    assert torch.allclose(loaded(*test[:2]), last(*test[:2]))


# ---------------------------------------------------------------- baselines without training

def hand_dialogues():
    """Training dialogues over 5 items: item 1 with 2 twice, 0 with 1 and 2 once, 2 with 3 once.
    popularity (dialogues mentioning each item) = [1, 2, 3, 1, 0]."""
    turns = [[[0, 1], [2]], [[1], [2, 1]], [[2], [3]]]
    return [{"turns": [{"items": items} for items in d]} for d in turns]


def test_cooccurrence_counts_and_scores_by_hand():
    counts = common.cooccurrence_counts(hand_dialogues(), 5)
    assert counts.tolist() == [[0, 1, 1, 0, 0],
                               [1, 0, 2, 0, 0],
                               [1, 2, 0, 1, 0],
                               [0, 0, 1, 0, 0],
                               [0, 0, 0, 0, 0]]
    popularity = common.popularity_counts(hand_dialogues(), 5)
    assert popularity.tolist() == [1, 2, 3, 1, 0]
    # context [1, 3]: item j scores counts[1, j] + counts[3, j], plus popularity / (3 + 1) for ties;
    # an empty context is ranked by popularity alone, equal popularity by item id (0 before 3)
    scores = common.cooccurrence_scores(counts, [[1, 3], [], [3, 3]], popularity)
    assert torch.allclose(scores[0], torch.tensor([1 + 1 / 4, 0 + 2 / 4, 3 + 3 / 4, 0 + 1 / 4, 0.0]))
    assert common.rank_scores(scores, [[], [], []], 5)[:2] == [[2, 0, 1, 3, 4], [2, 1, 0, 3, 4]]
    assert torch.allclose(scores[2], torch.tensor([0.25, 0.5, 1.75, 0.25, 0.0]))  # a repeated item counts once


def test_every_baseline_row_excludes_the_items_already_mentioned():
    baselines = common.CountBaselines.fit(hand_dialogues(), 5, F.normalize(torch.randn(5, 4), dim=-1))
    baselines.mix_weight = 0.5
    samples = [{"context_items": [1, 3]}, {"context_items": []}, {"context_items": [2]}]
    ranked = baselines.rankings(common.BASELINE_ROWS, samples, 5, torch.randn(3, 4))
    assert set(ranked) == set(common.BASELINE_ROWS)
    for row, lists in ranked.items():
        assert (lists[0] == [2, 0, 4]) if row == "cooccurrence" else (set(lists[0]) == {0, 2, 4}), row
        assert sorted(lists[1]) == [0, 1, 2, 3, 4] and 2 not in lists[2] and len(lists[2]) == 4, row
    assert ranked["popularity"][1] == [2, 1, 0, 3, 4]
    many = list(range(40))   # more mentioned items than pad_item_lists keeps by default: all masked
    assert common.rank_scores(torch.arange(42.0).unsqueeze(0), [many], 3) == [[41, 40]]


def counted_net(dialogues, mix_weight=0.3, seed=0):
    """A fused retriever over 5 items with the count features of `dialogues`."""
    torch.manual_seed(seed)
    baselines = common.CountBaselines.fit(dialogues, 5, F.normalize(torch.randn(5, 4), dim=-1))
    baselines.mix_weight = mix_weight
    net = common.DualViewRetriever(baselines.item_sem, torch.randn(5, 8), dim=8, heads=2, dropout=0.0,
                                   counts=(baselines.cooccurrence, baselines.popularity), mix_weight=mix_weight)
    return net.eval(), baselines


def test_fused_net_with_counts_is_the_count_mix_at_view_weight_0_and_its_views_then_add():
    net, baselines = counted_net(hand_dialogues())
    samples = [{"context_items": c} for c in ([1, 3], [], [2], [0, 1], [4])]
    context, ctx_sem = [s["context_items"] for s in samples], torch.randn(5, 4)
    mix = baselines.scores("cooccurrence+cosine", context, ctx_sem)
    scores = net(ctx_sem, common.pad_item_lists(context))
    assert float(net.view_weight) == 0 and torch.allclose(scores, mix, atol=1e-5)
    ranked = common.rank_items(net, ctx_sem, context, 5)        # mentioned items last, at -inf
    mixed = baselines.rankings(["cooccurrence+cosine"], samples, 5, ctx_sem)["cooccurrence+cosine"]
    assert [r[:len(m)] for r, m in zip(ranked, mixed)] == mixed
    net.view_weight.fill_(2.0)       # a * z(view scores) on top of the mix
    views = common.zscore_rows(net.view_scores(ctx_sem, common.pad_item_lists(context)))
    assert torch.allclose(net(ctx_sem, common.pad_item_lists(context)), mix + 2 * views, atol=1e-5)


def test_counted_retriever_saves_and_loads_and_an_older_file_is_refused(tmp_path):
    net, _ = counted_net(hand_dialogues())
    net.view_weight.fill_(0.7)
    net.save(tmp_path / "r")
    loaded = common.DualViewRetriever.load(tmp_path / "r")
    ctx_sem, context = torch.randn(3, 4), common.pad_item_lists([[1, 3], [], [2]])
    assert torch.equal(loaded(ctx_sem, context), net(ctx_sem, context))
    assert torch.equal(loaded.counts_matrix().to_dense(), common.cooccurrence_counts(hand_dialogues(), 5))
    blob = torch.load(tmp_path / "r" / "retriever.pt", weights_only=False)
    del blob["config"]["format"]                                    # as 03 wrote it before count features
    torch.save(blob, tmp_path / "r" / "retriever.pt")
    with pytest.raises(SystemExit, match=r"older 03_sft_recommender.py .* --parts retriever"):
        common.DualViewRetriever.load(tmp_path / "r")


def test_zscore_rows_by_hand():
    z = common.zscore_rows(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]))
    std = math.sqrt(1.25)    # population std of 1, 2, 3, 4 around 2.5
    assert torch.allclose(z[0], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / std)
    assert z[1].tolist() == [0.0] * 4     # a constant row carries no preference
    assert common.mix_zscored(z, 2 * z, 0.25).allclose(1.75 * z)


def mix_case(target_leads_on: str):
    """30 items; the sample mentions item 0 and wants item 1; items 2-11 are 10 decoys. On the view
    target_leads_on the target leads the decoys by a hair, on the other view it trails them far
    behind: so only the mix that reads one view alone (w = 1: co-occurrence, w = 0: cosine) ranks
    the target in the top 10; every other w puts the 10 decoys above it."""
    counts, unit = torch.zeros(30, 30), torch.tensor([1.0, 0.0])
    item_sem = torch.tensor([-1.0, 0.0]).repeat(30, 1)                     # cosine -1 with the dialogue
    decoy_angle = torch.tensor([0.99, math.sqrt(1 - 0.99 ** 2)])           # cosine 0.99
    if target_leads_on == "cooccurrence":
        counts[0, 1], counts[0, 2:12] = 41, 40
        item_sem[2:12] = unit                                               # decoys: cosine 1
    else:
        counts[0, 2:12] = 1
        item_sem[1], item_sem[2:12] = unit, decoy_angle
    baselines = common.CountBaselines(torch.zeros(30), counts, item_sem)
    return baselines, [{"context_items": [0], "new_targets": [1], "targets": [1]}], unit.unsqueeze(0)


@pytest.mark.parametrize("view, best", [("cooccurrence", 1.0), ("cosine", 0.0)])
def test_mix_weight_is_the_one_that_wins_on_valid(view, best):
    baselines, valid, ctx_sem = mix_case(view)
    recall = baselines.fit_mix_weight(ctx_sem, valid)
    assert list(recall) == list(common.MIX_WEIGHTS) and baselines.mix_weight == best
    assert recall[best] == 1.0 and sum(recall.values()) == 1.0, recall
    assert 1 in baselines.rankings(["cooccurrence+cosine"], valid, 10, ctx_sem)["cooccurrence+cosine"][0]


def test_score_rankings_separates_new_and_all_targets():
    samples = [{"new_targets": [3], "targets": [3, 1]},   # 1 was mentioned before: not new
               {"new_targets": [], "targets": [2]}]       # no new target: no "new" label
    ranked = [[1, 9, 3], [2, 8, 7]]
    r = common.score_rankings(ranked, samples, ks=(1, 3), bootstrap=50)
    assert r["labels"] == {"new": 1, "all": 3}
    assert r["new"]["recall@1"] == 0 and r["new"]["recall@3"] == 1
    assert r["all"]["recall@1"] == pytest.approx(2 / 3) and r["all"]["recall@3"] == 1
    assert set(r["ci"]) == {"new", "all"}
    assert "ci" not in common.score_rankings(ranked, samples, ks=(1,))
