"""Tests of 01_prep_data.py: tiny hand-made ReDial / INSPIRED files, every input error, the
download path (file:// URLs, no network), and full runs on the reference data."""
import hashlib
import importlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from common import DataError, read_jsonl

prep = importlib.import_module("01_prep_data")
REPO = Path(__file__).resolve().parents[1]
RES = "<http://dbpedia.org/resource/{}>"
ONT = "<http://dbpedia.org/ontology/{}>"


def write_lines(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def run_prep(raw: Path, run_dir: Path, dataset: str, *extra: str) -> dict:
    return prep.main(["--dataset", dataset, "--raw-dir", str(raw), "--run-dir", str(run_dir), *extra])


def outputs(run_dir: Path, name: str) -> list[dict]:
    return read_jsonl(run_dir / "data" / f"{name}.jsonl")


# ----------------------------------------------------------------------------- tiny ReDial

MOVIES = [("111", "Alpha  (2001)"), ("222", "Beta (2002)"), ("333", "Gamma (2003) "), ("444", "Delta (2004)")]


def redial_record(cid, messages, initiator_q=None, respondent_q=None):
    return {"conversationId": cid, "initiatorWorkerId": 1, "respondentWorkerId": 2, "movieMentions": {},
            "initiatorQuestions": initiator_q if initiator_q is not None else [],
            "respondentQuestions": respondent_q if respondent_q is not None else [],
            "messages": [{"senderWorkerId": sender, "text": text} for sender, text in messages]}


HAND_MADE = redial_record("d1", [
    (1, "Hi, I loved @111"), (1, "and @222 too"),             # two seeker messages -> one turn
    (2, "Then try @333 or @111"),                               # targets [2, 0], new [2]
    (1, "Seen @333 already"),
    (2, "How about @444?"),                                     # last turn: no seeker reply
], initiator_q={"111": {"liked": 1}, "333": {"liked": 0}, "444": {"liked": 1}})
RESPONDENT_ONLY = redial_record("d2", [(1, "Anything like @222?"), (2, "@444 is good")],
                                respondent_q={"222": {"liked": 1}, "444": {"liked": 2}})
TEST_DIALOGUE = redial_record("t1", [(1, "hello"), (2, "Watch @111")])


def make_redial(folder: Path, train=(HAND_MADE, RESPONDENT_ONLY), test=(TEST_DIALOGUE,)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    csv_text = "movieId,movieName,nbMentions\r\n" + "".join(f"{m},{t},1\r\n" for m, t in MOVIES)
    (folder / "movies_with_mentions.csv").write_bytes(csv_text.encode())
    (folder / "id2info.json").write_text(json.dumps({"111": {"genre": ["drama"], "director": ["A. Director"],
                                                             "writer": [], "star": ["S. Tar"], "plot": "A plot."}}))
    write_lines(folder / "train_data.jsonl", train)
    write_lines(folder / "test_data.jsonl", test)
    return folder


def test_redial_hand_made_dialogue(tmp_path):
    stats = run_prep(make_redial(tmp_path / "raw"), tmp_path / "run", "redial")
    items = outputs(tmp_path / "run", "items")
    assert [it["title"] for it in items] == ["Alpha (2001)", "Beta (2002)", "Gamma (2003)", "Delta (2004)"]
    assert items[0]["genres"] == ["drama"] and items[0]["stars"] == ["S. Tar"] and items[0]["plot"] == "A plot."
    assert items[1]["genres"] == [] and items[1]["plot"] == ""
    assert stats["catalogue_size"] == 4 and stats["items_with_metadata"] == 1

    dialogues = {d["dialog_id"]: d for s in prep.SPLITS for d in outputs(tmp_path / "run", f"dialogues_{s}")}
    d1 = dialogues["d1"]
    assert [t["role"] for t in d1["turns"]] == ["seeker", "recommender", "seeker", "recommender"]
    assert d1["turns"][0] == {"role": "seeker", "text": "Hi, I loved Alpha (2001) and Beta (2002) too", "items": [0, 1]}
    assert d1["liked"] == [0, 3]
    assert dialogues["d2"]["liked"] == [1]  # seeker's questionnaire empty -> respondent's

    samples = [s for split in prep.SPLITS for s in outputs(tmp_path / "run", f"samples_{split}")
               if s["dialog_id"] == "d1"]
    first, second = samples
    assert first["turn"] == 1
    assert first["context"] == [{"role": "seeker", "text": "Hi, I loved Alpha (2001) and Beta (2002) too"}]
    assert first["context_items"] == [0, 1] and first["targets"] == [2, 0] and first["new_targets"] == [2]
    assert first["seeker_reply"] == "Seen Gamma (2003) already"
    assert first["response"] == "Then try Gamma (2003) or Alpha (2001)" and first["liked"] == [0, 3]
    assert second["turn"] == 3 and second["context_items"] == [0, 1, 2]
    assert second["targets"] == second["new_targets"] == [3] and second["seeker_reply"] == ""


def test_redial_valid_carve_is_seeded_and_disjoint(tmp_path):
    train = [redial_record(f"d{k}", [(1, "hi"), (2, "try @111")]) for k in range(20)]
    raw = make_redial(tmp_path / "raw", train=train)
    ids = {}
    for seed in (0, 0, 1):
        run = tmp_path / f"run{len(ids)}"
        stats = run_prep(raw, run, "redial", "--seed", str(seed), "--valid-fraction", "0.2")
        ids[len(ids)] = [d["dialog_id"] for d in outputs(run, "dialogues_valid")]
        train_ids = {d["dialog_id"] for d in outputs(run, "dialogues_train")}
        assert stats["splits"]["valid"]["dialogues"] == 4 and not train_ids & set(ids[len(ids) - 1])
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_redial_empty_messages_are_counted(tmp_path):
    train = [HAND_MADE, redial_record("d3", [(1, "  "), (1, "hi"), (2, "@222")]), redial_record("d4", [])]
    stats = run_prep(make_redial(tmp_path / "raw", train=train), tmp_path / "run", "redial", "--valid-fraction", "0.01")
    dropped = {}
    for split in prep.SPLITS:
        for reason, n in stats["splits"][split]["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    assert dropped == {"empty_message": 1, "empty_dialogue": 1}


# ----------------------------------------------------------------------------- errors


def test_malformed_json_names_file_and_line(tmp_path):
    raw = make_redial(tmp_path / "raw")
    write_lines(raw / "test_data.jsonl", [TEST_DIALOGUE, '{"conversationId": "t2", '])
    with pytest.raises(DataError, match=r"test_data\.jsonl:2: malformed JSON"):
        run_prep(raw, tmp_path / "run", "redial")


def test_malformed_json_file_names_line(tmp_path):
    raw = make_redial(tmp_path / "raw")
    (raw / "id2info.json").write_text('{\n"111": {,\n}')
    with pytest.raises(DataError, match=r"id2info\.json:2: malformed JSON"):
        run_prep(raw, tmp_path / "run", "redial")


def test_missing_file_says_how_to_get_it(tmp_path):
    raw = make_redial(tmp_path / "raw")
    (raw / "id2info.json").unlink()
    with pytest.raises(DataError, match=r"id2info\.json: file not found.*--raw-dir"):
        run_prep(raw, tmp_path / "run", "redial")


def test_unknown_movie_id_names_file_and_line(tmp_path):
    bad = redial_record("d9", [(1, "hi"), (2, "try @999")])
    raw = make_redial(tmp_path / "raw", train=(HAND_MADE, RESPONDENT_ONLY, bad))
    with pytest.raises(DataError, match=r"train_data\.jsonl:3: movie @999 is not in movies_with_mentions\.csv"):
        run_prep(raw, tmp_path / "run", "redial")


def test_empty_split_is_an_error(tmp_path):
    raw = make_redial(tmp_path / "raw", test=[redial_record("t1", [(1, "hi"), (2, "no titles here")])])
    with pytest.raises(DataError, match="test split has no recommendation samples"):
        run_prep(raw, tmp_path / "run", "redial")
    write_lines(raw / "test_data.jsonl", [])
    with pytest.raises(DataError, match="test split has no dialogues"):
        run_prep(raw, tmp_path / "run", "redial")


def test_script_exits_with_one_line_message(tmp_path):
    raw = make_redial(tmp_path / "raw")
    (raw / "movies_with_mentions.csv").unlink()
    done = subprocess.run([sys.executable, "01_prep_data.py", "--dataset", "redial", "--raw-dir", str(raw),
                           "--run-dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: ") and "movies_with_mentions.csv" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- tiny INSPIRED

ENTITIES = ["Knives_Out", "Joker_(2019_film)", "Up_(2009_film)", "Heat_(1995_film)", "Daniel_Craig",
            "Mystery_film", "Some_Show_(TV_series)", "Rian_Johnson__PersonFunction__1"]


def turn(role, text, movies=(), links=()):
    return {"text": text, "role": role, "movie": list(movies), "entity_link": [], "entity_name": [],
            "movie_link": [RES.format(link) for link in links], "movie_name": []}


INSPIRED_DIALOGUE = [
    turn("RECOMMENDER", "Hi! What do you like?"),
    turn("SEEKER", "I liked Joker", ["Joker (2019)"], ["Joker_(2019_film)"]),
    turn("RECOMMENDER", "Try Knives Out", ["Knives Out (2019)"], ["Knives_Out"]),
    turn("RECOMMENDER", "or Some Show", ["Some Show"], ["Some_Show_(TV_series)"]),  # linked, not a catalogue item
    turn("SEEKER", "ok, I also saw Frozen", ["Frozen (2013)"], []),                  # named, never linked
    turn("RECOMMENDER", "Then Up &amp; Joker", ["Up (2009)", "Joker (2019)"], ["Up_(2009_film)", "Joker_(2019_film)"]),
    turn("SEEKER", "sure"),
]


def make_inspired(folder: Path, dialogue=INSPIRED_DIALOGUE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "entity2id.json").write_text(json.dumps({RES.format(e): i for i, e in enumerate(ENTITIES)}))
    (folder / "item_ids.json").write_text(json.dumps([0, 1, 2, 3]))
    (folder / "relation2id.json").write_text(json.dumps({ONT.format("starring"): 0, ONT.format("genre"): 1,
                                                         ONT.format("director"): 2, "self_loop": 3}))
    (folder / "dbpedia_subkg.json").write_text(json.dumps({"0": [[3, 0], [0, 4], [1, 5], [2, 7], [0, 4]]}))
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl"):
        write_lines(folder / name, [dialogue])
    (folder / "id2info.json").write_text(json.dumps(ID2INFO))
    return folder


# ReDial's metadata, which INSPIRED borrows by title and year: Knives Out keeps DBpedia's genre and
# director and takes the plot; Up takes everything; "Heat" has no year, so Heat (1995) matches nothing.
ID2INFO = {"1": {"name": "Knives Out (2019)", "genre": ["mystery"], "director": ["R. J."], "plot": "A detective."},
           "2": {"name": "Up (2009)", "genre": ["animation"], "star": ["Ed Asner"], "plot": "A house flies."},
           "3": {"name": "Heat", "genre": ["crime"], "plot": "Cops and robbers."}}


def test_inspired_hand_made_dialogue(tmp_path):
    stats = run_prep(make_inspired(tmp_path / "raw"), tmp_path / "run", "inspired")
    items = outputs(tmp_path / "run", "items")
    assert [it["title"] for it in items] == ["Knives Out (2019)", "Joker (2019)", "Up (2009)", "Heat (1995)"]
    assert items[0]["stars"] == ["Daniel Craig"] and items[0]["genres"] == ["Mystery film"]
    assert items[0]["directors"] == ["Rian Johnson"] and items[0]["plot"] == "A detective."
    assert items[2]["genres"] == ["animation"] and items[2]["stars"] == ["Ed Asner"] and items[2]["plot"]
    assert items[3]["genres"] == [] and items[3]["plot"] == "" and items[1]["plot"] == ""
    assert stats["items_with_metadata"] == 2

    (dialogue,) = outputs(tmp_path / "run", "dialogues_test")
    assert dialogue["dialog_id"] == "test-1"
    assert [t["role"] for t in dialogue["turns"]] == ["recommender", "seeker"] * 3
    assert dialogue["turns"][2] == {"role": "recommender", "text": "Try Knives Out or Some Show", "items": [0]}
    assert dialogue["turns"][4]["text"] == "Then Up & Joker"
    assert dialogue["liked"] == [1]  # the seeker's Joker; the recommender's last mention is Joker again
    first, second = outputs(tmp_path / "run", "samples_test")
    assert first["turn"] == 2 and first["context_items"] == [1] and first["targets"] == first["new_targets"] == [0]
    assert first["seeker_reply"] == "ok, I also saw Frozen" and len(first["context"]) == 2
    assert second["targets"] == [2, 1] and second["new_targets"] == [2] and second["seeker_reply"] == "sure"
    assert stats["splits"]["test"]["dropped"] == {"mention_not_in_catalogue": 1, "unlinked_mention": 1}


def test_inspired_reads_id2info_from_the_redial_folder_beside(tmp_path):
    raw = make_inspired(tmp_path / "data" / "inspired")
    (raw / "id2info.json").rename(tmp_path / "id2info.json")
    with pytest.raises(DataError, match=r"id2info\.json: file not found.*DIR/\.\./redial"):
        run_prep(raw, tmp_path / "run", "inspired")
    (tmp_path / "data" / "redial").mkdir()
    (tmp_path / "id2info.json").rename(tmp_path / "data" / "redial" / "id2info.json")
    run_prep(raw, tmp_path / "run", "inspired")
    assert outputs(tmp_path / "run", "items")[2]["plot"] == "A house flies."


def test_borrow_metadata_needs_the_year():
    items = [prep.item_row(0, "a", "Heat (1995)"), prep.item_row(1, "b", "The Heat (1995)"),
             prep.item_row(2, "c", "Heat"), prep.item_row(3, "d", "Twin (2001)")]
    info = {"1": {"name": "Heat (1995)", "genre": ["crime"]}, "2": {"name": "Heat", "genre": ["drama"]},
            "3": {"name": "Twin (2001)", "plot": "one"}, "4": {"name": "The Twin (2001)", "plot": "two"},
            "5": {"name": "Twin  (2001)", "plot": "three"}}
    assert prep.borrow_metadata(items, info) == 2
    # "The Heat (1995)" normalises like "Heat (1995)"; a yearless title and an ambiguous one take nothing
    assert [it["genres"] for it in items] == [["crime"], ["crime"], [], []] and items[3]["plot"] == ""
    # the same text wins over a title that only normalises alike (ReDial has both Holiday and The Holiday)
    twin = [prep.item_row(0, "a", "The Twin (2001)")]
    assert prep.borrow_metadata(twin, info) == 1 and twin[0]["plot"] == "two"


def test_inspired_liked_is_seeker_items_plus_last_recommendation():
    dialogue = [turn("SEEKER", "I liked Heat", ["Heat (1995)"], ["Heat_(1995_film)"]),
                turn("RECOMMENDER", "Knives Out?", ["Knives Out (2019)"], ["Knives_Out"]),
                turn("SEEKER", "Seen it. Loved Joker", ["Joker (2019)"], ["Joker_(2019_film)"]),
                turn("RECOMMENDER", "Then Up", ["Up (2009)"], ["Up_(2009_film)"]),
                turn("SEEKER", "Great, I'll watch Up")]
    link_index = {RES.format(e): (i if i < 4 else None) for i, e in enumerate(ENTITIES)}
    built = prep.inspired_dialogue(dialogue, "x", Path("f"), 1, link_index, prep.Counter())
    assert built["liked"] == [3, 1, 2]


def test_inspired_unknown_link_names_file_and_line(tmp_path):
    raw = make_inspired(tmp_path / "raw")
    bad = INSPIRED_DIALOGUE + [turn("RECOMMENDER", "Heat", ["Heat (1995)"], ["Not_An_Entity"])]
    write_lines(raw / "dev.jsonl", [INSPIRED_DIALOGUE, bad])
    with pytest.raises(DataError, match=r"dev\.jsonl:2: movie link .*Not_An_Entity.* is not in entity2id\.json"):
        run_prep(raw, tmp_path / "run", "inspired")


def test_names_from_dbpedia_uris():
    assert prep.name_from_uri(RES.format("Knives_Out")) == "Knives Out"
    assert prep.name_from_uri(RES.format("Addicted_(2014_film)")) == "Addicted (2014)"
    assert prep.name_from_uri(RES.format("Neighbors_(2014_American_film)")) == "Neighbors (2014)"
    assert prep.name_from_uri(RES.format("Hoffa_(film)")) == "Hoffa"
    assert prep.name_from_uri(RES.format("Chris_Evans_(actor)__PersonFunction__1")) == "Chris Evans"
    assert prep.name_from_uri(RES.format("Gael_Garc%C3%ADa_Bernal")) == "Gael García Bernal"


# ----------------------------------------------------------------------------- download


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_checks_sha256(tmp_path):
    src = tmp_path / "src.json"
    src.write_bytes(b'{"a": 1}\n')
    dest = tmp_path / "raw" / "a.json"
    assert prep.download(src.as_uri(), dest, sha(src.read_bytes())) == sha(src.read_bytes())
    assert dest.read_bytes() == src.read_bytes()

    bad = tmp_path / "raw" / "b.json"
    with pytest.raises(DataError, match=rf"expected {'0' * 64}, got {sha(src.read_bytes())}"):
        prep.download(src.as_uri(), bad, "0" * 64)
    assert not bad.exists() and not list(bad.parent.glob("*.part"))


def test_download_without_pin_prints_hash(tmp_path, capsys):
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello")
    prep.download(src.as_uri(), tmp_path / "out.txt")
    assert f"{sha(b'hello')} (not pinned)" in capsys.readouterr().out


def test_main_downloads_and_unzips_when_no_raw_dir(tmp_path, monkeypatch, capsys):
    local = make_redial(tmp_path / "local")
    archive = tmp_path / "redial_dataset.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("train_data.jsonl", "test_data.jsonl", "movies_with_mentions.csv"):
            z.write(local / name, f"redial_dataset/{name}")  # nested folder, as archives often are
    info = local / "id2info.json"
    monkeypatch.setitem(prep.SOURCES, "redial", {
        "train_data.jsonl": (f"{archive.as_uri()}#train_data.jsonl", None),
        "test_data.jsonl": (f"{archive.as_uri()}#test_data.jsonl", sha((local / "test_data.jsonl").read_bytes())),
        "movies_with_mentions.csv": (f"{archive.as_uri()}#movies_with_mentions.csv", None),
        "id2info.json": (info.as_uri(), sha(info.read_bytes())),
    })
    run = tmp_path / "run"
    stats = prep.main(["--dataset", "redial", "--run-dir", str(run)])
    out = capsys.readouterr().out
    assert "downloading redial" in out and "(not pinned)" in out and "(ok)" in out
    assert (run / "raw" / "redial_dataset.zip").exists()
    assert (run / "raw" / "movies_with_mentions.csv").read_bytes() == (local / "movies_with_mentions.csv").read_bytes()
    assert stats["catalogue_size"] == 4

    # A zip member with the wrong hash is rejected and leaves nothing behind.
    with pytest.raises(DataError, match="sha256 mismatch"):
        prep.extract_member(archive, "train_data.jsonl", tmp_path / "x.jsonl", "f" * 64)
    assert not (tmp_path / "x.jsonl").exists() and not list(tmp_path.glob("*.part"))


# ----------------------------------------------------------------------------- reference data


@pytest.fixture(scope="module", params=["redial", "inspired"])
def real_run(request, shared_data, tmp_path_factory):
    run = tmp_path_factory.mktemp(request.param)
    stats = run_prep(shared_data / request.param, run, request.param)
    return request.param, run, stats


def test_real_data(real_run):
    dataset, run, stats = real_run
    items = outputs(run, "items")
    assert len(items) == stats["catalogue_size"] == {"redial": 6924, "inspired": 1123}[dataset]
    assert [it["item_id"] for it in items] == list(range(len(items)))
    if dataset == "redial":
        assert stats["items_without_metadata"] == 341
    else:  # DBpedia alone gives 43 films a genre and none a plot
        assert sum(bool(it["genres"]) for it in items) == 640 and sum(bool(it["plot"]) for it in items) == 599
    for split in prep.SPLITS:
        samples = outputs(run, f"samples_{split}")
        assert samples and len(samples) == stats["splits"][split]["samples"]
        for s in samples:
            assert s["targets"] and all(0 <= i < len(items) for i in s["targets"] + s["context_items"] + s["liked"])
            assert set(s["new_targets"]) <= set(s["targets"]) and not set(s["new_targets"]) & set(s["context_items"])
    if dataset == "redial":
        assert stats["splits"]["test"]["dialogues"] == 1342


def test_real_outputs_load_with_datasets(real_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    _, run, stats = real_run
    for path in sorted((run / "data").glob("*.jsonl")):
        loaded = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path))
        assert len(loaded) == len(read_jsonl(path)), path.name
