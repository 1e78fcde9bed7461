"""tools/sft_targets.py counts what 03's metadata reasoning chains ask the recommender to write."""
import importlib.util
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("sft_targets", ROOT / "tools" / "sft_targets.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

# films 0-3 are comedies, 4-11 dramas; 10 and 11 share a title and a year, as some catalogue entries do
ITEMS = [{"title": f"Film {k} ({2000 + k})", "genres": ["comedy" if k < 4 else "drama"], "directors": [], "stars": []}
         for k in range(10)] + [{"title": "Twin (2010)", "genres": ["drama"], "directors": [], "stars": []}] * 2


def sample(text, targets):
    return {"context": [{"role": "seeker", "text": text}], "targets": targets, "new_targets": targets,
            "liked": [], "context_items": []}


def test_chains_are_counted_by_how_their_ranking_is_made():
    titles = common.TitleIndex(ITEMS)
    samples = [sample("something with comedy please", [6]),  # comedies jump ahead of the retriever's order
               sample("hi there", [6]),  # no preference: the retriever's order with the target moved first
               sample("hi there", [1]),  # the twins are both in the top 10: the chain's list repeats a title
               sample("hi there", []),  # no target: no chain
               sample("hi there", [8, 5])]  # two targets go first in the sample's order, then the retriever's
    candidates = [[4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 10, 11], list(range(12)), [10, 11] + list(range(10)), list(range(12)),
                  list(range(12))]
    counts = tool.chain_counts(ITEMS, samples, candidates, titles)
    assert counts["chains"] == 4 and counts["valid"] == 3 and counts["duplicate"] == 1
    assert counts["Ranking = retriever order, targets first"] == 3 and counts["a true target among the candidates"] == 4
    assert counts["scored 1-5"] == 1 and counts["scored 0-0"] == 3  # the four comedies share the stated genre
    assert counts["identical titles among the candidates"] == 4


def test_the_ranking_by_scores_alone_is_set_against_the_retrievers_first_10():
    titles = common.TitleIndex(ITEMS)
    # comedies 0-3 share the stated genre: by scores alone they move ahead of the retriever's places 9-12
    cands = [4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 3]  # retriever's first 10: 4..11, 0, 1; by scores: 0..3, 4..9
    samples = [sample("a comedy please", [2]),  # only the scores' first 10 hold it
               sample("a comedy please", [11]),  # only the retriever's
               sample("a comedy please", [5]),  # both
               sample("hi there", [3])]  # no preference: the scores' ranking is the retriever's order, neither
    counts = tool.chain_counts(ITEMS, samples, [cands] * 4, titles)
    assert counts["a true target in the retriever's first 10"] == 2
    assert counts["a true target in the first 10 by scores alone"] == 2
    assert counts["by scores alone: a target the retriever's first 10 miss"] == 1
    assert counts["by scores alone: no target the retriever's first 10 hold"] == 1


def test_counts_on_a_real_run(inspired_with_retriever, capsys):
    counts = tool.main(["--run-dir", str(inspired_with_retriever), "--max-samples", "30"])
    out = capsys.readouterr().out
    assert "SFT chains over 20 candidates (out of fold)" in out
    assert 0 < counts["chains"] <= 30
    assert sum(counts[k] for k in counts if k.startswith("scored")) == counts["chains"]  # every chain in one bin
    # a chain's list can only repeat a title when two candidates share one
    assert counts["valid"] >= counts["chains"] - counts["identical titles among the candidates"]
    assert f"| valid | {counts['valid']} |" in out
    # the two first-10 counts differ exactly by the samples only one of them holds
    assert (counts["a true target in the first 10 by scores alone"]
            - counts["a true target in the retriever's first 10"]
            == counts["by scores alone: a target the retriever's first 10 miss"]
            - counts["by scores alone: no target the retriever's first 10 hold"])
    with pytest.raises(SystemExit):
        tool.main(["--run-dir", str(inspired_with_retriever), "--split", "nope"])
