"""Stage 01: turn the raw ReDial or INSPIRED files into the prepared data all later stages read.

Reads the raw files of one dataset from --raw-dir, or, without it, downloads them from the public
sources in SOURCES into <run-dir>/raw/ (sha256-checked where the hash is known).
Writes <run-dir>/data/:
  items.jsonl                         the catalogue: item_id 0..N-1, title, genres, people, plot
  dialogues_{train,valid,test}.jsonl  dialogues as seeker/recommender turns, mentions rendered as titles
  samples_{train,valid,test}.jsonl    one sample per recommender turn that mentions a catalogue item
  stats.json                          sizes, label counts, and every dropped record by reason

Choices the papers leave open:
- Consecutive messages by one speaker are merged into one turn (texts joined with a space).
- ReDial: catalogue = movies_with_mentions.csv, metadata from iEvaLM-CRS's id2info.json, liked =
  the seeker's questionnaire (the respondent's when the seeker's is empty); validation = a seeded
  random fraction of the training dialogues.
- INSPIRED: catalogue = item_ids.json, attributes from the DBpedia sub-graph, and those it lacks (it
  has few genres and no plots) from ReDial's id2info.json by title and year; titles from the
  dialogues' "Title (Year)" strings (else from the DBpedia URI); splits train/dev/test. INSPIRED has
  no questionnaire, so liked = the items the seeker mentions plus the last item the recommender
  mentions: in INSPIRED's protocol that is the recommendation the seeker ends up accepting.
"""
from __future__ import annotations

import csv
import hashlib
import html
import os
import random
import re
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from common import DataError, RunPaths, arg, default_run_dir, parse_args, set_seed, write_json, write_jsonl
import common

SPLITS = common.SPLITS

# File name -> (public URL, sha256). "ZIP#member" means: download ZIP, extract member. A None hash is
# not pinned: ReDial's public train split is the full 10,006 dialogues, our reference copy is partial.
REDIAL_ZIP = "https://raw.githubusercontent.com/ReDialData/website/data/redial_dataset.zip"
UNICRS = "https://raw.githubusercontent.com/wxl1999/UniCRS/main/data/inspired"
ZERO_SHOT_CRS = "https://raw.githubusercontent.com/AaronHeee/LLMs-as-Zero-Shot-Conversational-RecSys/main/data/inspired"
SOURCES = {
    "redial": {
        "train_data.jsonl": (f"{REDIAL_ZIP}#train_data.jsonl", None),
        "test_data.jsonl": (f"{REDIAL_ZIP}#test_data.jsonl",
                            "d7781750787d104ac005e829cc7e6277d25b14644a223b0c2445aaaded6b19ac"),
        "movies_with_mentions.csv": (f"{REDIAL_ZIP}#movies_with_mentions.csv",
                                     "0d408daa474ac95b959a739a261dddd997dd800f5ea585da15a434a26187dbb0"),
        "id2info.json": ("https://raw.githubusercontent.com/RUCAIBox/iEvaLM-CRS/main/data/redial/id2info.json",
                         "7bdfe9a9c7f1b4d59aa9a5aeba0029071fd5a7232b61c8257212a335ffe424f7"),
    },
    "inspired": {
        "train.jsonl": (f"{UNICRS}/train.jsonl", "f185878d61f4cf95036711612befbec2e587b42fcb7bf855fba3af08016e7743"),
        "dev.jsonl": (f"{UNICRS}/dev.jsonl", "8cde8cf7f55d4f2a71f1c7c8e4b921ca9caaee615999fd3728c7bea214b01839"),
        "test.jsonl": (f"{UNICRS}/test.jsonl", "d1ab79e33858224983de938f6401a18fab7bd99bb4580512fbe804459539f593"),
        "entity2id.json": (f"{ZERO_SHOT_CRS}/entity2id.json",
                           "6ea0f59be9da55a78e2b48eff35928bf62a7232d143eb905d350ed38268583d2"),
        "item_ids.json": (f"{ZERO_SHOT_CRS}/item_ids.json",
                          "6e300dc6b89ab483f1474ee550e94709cdbcd09354928546fa32dc3b48fe12c1"),
        "dbpedia_subkg.json": (f"{UNICRS}/dbpedia_subkg.json",
                               "33245f36bdded33368a7988fe340dd3cb4bc0d8156a6afee56226741cb647a19"),
        "relation2id.json": (f"{UNICRS}/relation2id.json",
                             "6a36fdf987d0597e8346c6d9a0e6333b6d3aea67cfe03bebce0114a0deaabda1"),
    },
}
# INSPIRED's DBpedia sub-graph gives 43 of its 1,123 films a genre and none a plot: its films borrow the
# attributes they lack from ReDial's id2info.json, matched by title and year.
SOURCES["inspired"]["id2info.json"] = SOURCES["redial"]["id2info.json"]
INSPIRED_SPLIT_FILES = {"train": "train.jsonl", "valid": "dev.jsonl", "test": "test.jsonl"}
MISSING_FIX = "pass --raw-dir DIR with the raw files, or leave --raw-dir out to download them"


@dataclass
class Args:
    dataset: str = arg("redial", "which dataset to prepare", choices=["redial", "inspired"])
    raw_dir: str = arg("", "folder with the raw files; empty = download them into <run-dir>/raw/")
    run_dir: str = arg("", "run directory; empty = runs/<dataset>/")
    valid_fraction: float = arg(0.1, "ReDial only: fraction of training dialogues held out for validation")
    seed: int = arg(0, "seed of the train/valid carve")


# ----------------------------------------------------------------------------- raw files


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_and_place(tmp: str, dest: Path, sha256: str | None) -> str:
    """Move a finished temporary file to dest if its hash is the pinned one; else delete it."""
    got = sha256_of(Path(tmp))
    if sha256 is not None and got != sha256:
        os.unlink(tmp)
        raise DataError(dest, None, f"sha256 mismatch: expected {sha256}, got {got}",
                        "the public file changed or the download was corrupted")
    os.replace(tmp, dest)
    print(f"  {dest.name}: sha256 {got}" + (" (ok)" if sha256 else " (not pinned)"))
    return got


def download(url: str, dest: str | os.PathLike, sha256: str | None = None) -> str:
    """Download url to dest through a temporary file (so a broken download never looks finished);
    return the file's sha256, raising DataError if it differs from the pinned one."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, os.fdopen(fd, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return _check_and_place(tmp, dest, sha256)


def extract_member(zip_path: Path, name: str, dest: Path, sha256: str | None = None) -> str:
    """Extract the member of zip_path whose base name is `name` (archives often nest a folder)."""
    with zipfile.ZipFile(zip_path) as archive:
        members = [m for m in archive.namelist() if Path(m).name == name and not m.startswith("__MACOSX")]
        if not members:
            raise DataError(zip_path, None, f"no {name} inside the archive")
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        with archive.open(members[0]) as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out)
    return _check_and_place(tmp, dest, sha256)


def fetch_raw(dataset: str, raw_dir: Path) -> Path:
    """Download (once) every raw file of `dataset` listed in SOURCES into raw_dir."""
    print(f"downloading {dataset} from its public sources into {raw_dir} (pass --raw-dir to use local files)")
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, (url, sha256) in SOURCES[dataset].items():
        dest = raw_dir / name
        if dest.exists() and (sha256 is None or sha256_of(dest) == sha256):
            continue
        if "#" in url:
            archive_url, member = url.split("#", 1)
            archive = raw_dir / Path(urllib.parse.urlparse(archive_url).path).name
            if not archive.exists():
                download(archive_url, archive)
            extract_member(archive, member, dest, sha256)
        else:
            download(url, dest, sha256)
    return raw_dir


def raw_file(raw_dir: Path, name: str) -> Path:
    """raw_dir/name; ReDial's id2info.json, which INSPIRED borrows, may also sit in the ReDial folder beside it."""
    path = raw_dir / name
    if not path.is_file() and name == "id2info.json" and (raw_dir.parent / "redial" / name).is_file():
        return raw_dir.parent / "redial" / name
    return path


def require_files(raw_dir: Path, dataset: str) -> None:
    for name in SOURCES[dataset]:
        if not raw_file(raw_dir, name).is_file():
            fix = MISSING_FIX + (" (INSPIRED reads ReDial's id2info.json from DIR or DIR/../redial)"
                                 if dataset == "inspired" and name == "id2info.json" else "")
            raise DataError(raw_dir / name, None, "file not found", fix)


def read_json(path: Path):
    return common.read_json(path, MISSING_FIX)


def numbered_jsonl(path: Path) -> list[tuple[int, object]]:
    return common.numbered_jsonl(path, MISSING_FIX)


# ----------------------------------------------------------------------------- shared shaping


def clean_text(text: str) -> str:
    return " ".join(html.unescape(text).split())


def unique(ids) -> list[int]:
    return list(dict.fromkeys(ids))


def names(value) -> list[str]:
    """Metadata sources give a list, a bare string or null; items always carry a list."""
    return unique([value] if isinstance(value, str) else [v for v in (value or []) if v])


def item_row(item_id, source_id, title, genres=(), directors=(), writers=(), stars=(), plot="") -> dict:
    return {"item_id": item_id, "source_id": str(source_id), "title": title, "genres": names(genres),
            "directors": names(directors), "writers": names(writers), "stars": names(stars), "plot": plot or ""}


def merge_turns(messages: list[tuple[str, str, list[int]]]) -> list[dict]:
    """One turn per run of messages by the same speaker, so turns alternate seeker/recommender."""
    turns: list[dict] = []
    for role, text, items in messages:
        if turns and turns[-1]["role"] == role:
            turns[-1]["text"] = f"{turns[-1]['text']} {text}".strip()
            turns[-1]["items"] = unique(turns[-1]["items"] + items)
        else:
            turns.append({"role": role, "text": text, "items": unique(items)})
    return turns


def recommendation_samples(dialogue: dict) -> list[dict]:
    """One sample per recommender turn naming a catalogue item; `new_targets` leaves out items
    already mentioned, because repeating the context inflates recall."""
    turns, samples, seen = dialogue["turns"], [], {}
    for k, turn in enumerate(turns):
        if turn["role"] == "recommender" and turn["items"]:
            targets = unique(turn["items"])
            next_turn = turns[k + 1] if k + 1 < len(turns) else None
            samples.append({
                "dialog_id": dialogue["dialog_id"], "turn": k,
                "context": [{"role": t["role"], "text": t["text"]} for t in turns[:k]],
                "context_items": list(seen), "targets": targets,
                "new_targets": [i for i in targets if i not in seen],
                "seeker_reply": next_turn["text"] if next_turn and next_turn["role"] == "seeker" else "",
                "response": turn["text"], "liked": dialogue["liked"],
            })
        seen.update(dict.fromkeys(turn["items"]))
    return samples


# ----------------------------------------------------------------------------- ReDial

MENTION = re.compile(r"@(\d+)")
HAS_YEAR = re.compile(r"\(\d{4}\)")
ID2INFO_FIELDS = {"genre": "genres", "director": "directors", "writer": "writers", "star": "stars", "plot": "plot"}


def redial_catalogue(raw: Path) -> tuple[list[dict], dict[str, int], int]:
    """Every movie of movies_with_mentions.csv, in file order, with id2info.json metadata."""
    path, titles = raw / "movies_with_mentions.csv", {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        if next(reader, [])[:2] != ["movieId", "movieName"]:
            raise DataError(path, 1, "expected the header movieId,movieName,nbMentions")
        for row in reader:
            if len(row) < 2 or not row[0].strip().isdigit():
                raise DataError(path, reader.line_num, f"expected movieId,movieName, got {row!r}")
            titles[row[0].strip()] = " ".join(row[1].split())
    info = read_json(raw / "id2info.json")
    items = [item_row(i, movie_id, title, *(info.get(movie_id, {}).get(f) for f in ID2INFO_FIELDS))
             for i, (movie_id, title) in enumerate(titles.items())]
    return items, {movie_id: i for i, movie_id in enumerate(titles)}, sum(movie_id in info for movie_id in titles)


def redial_splits(raw: Path, valid_fraction: float, seed: int) -> dict[str, tuple[Path, list]]:
    """Official test split; validation carved from train by dialogue with a seeded shuffle."""
    train_path, test_path = raw / "train_data.jsonl", raw / "test_data.jsonl"
    train = numbered_jsonl(train_path)
    # At least one validation dialogue when any are asked for, and at least one left to train on.
    n_valid = max(round(len(train) * valid_fraction), 1 if valid_fraction > 0 else 0)
    n_valid = min(n_valid, max(len(train) - 1, 0))
    held_out = set(random.Random(seed).sample(range(len(train)), n_valid))
    return {"train": (train_path, [r for k, r in enumerate(train) if k not in held_out]),
            "valid": (train_path, [r for k, r in enumerate(train) if k in held_out]),
            "test": (test_path, numbered_jsonl(test_path))}


def redial_liked(record: dict, movie_to_item: dict[str, int], drops: Counter) -> list[int]:
    answers = record.get("initiatorQuestions")
    if not (isinstance(answers, dict) and answers):
        answers = record.get("respondentQuestions")
    liked = []
    for movie_id, answer in (answers.items() if isinstance(answers, dict) else []):
        if isinstance(answer, dict) and answer.get("liked") == 1:
            if movie_id in movie_to_item:
                liked.append(movie_to_item[movie_id])
            else:
                drops["liked_not_in_catalogue"] += 1
    return unique(liked)


def redial_dialogue(record: dict, path: Path, lineno: int, movie_to_item: dict[str, int],
                    items: list[dict], drops: Counter) -> dict | None:
    roles = {record["initiatorWorkerId"]: "seeker", record["respondentWorkerId"]: "recommender"}
    messages = []
    for message in record["messages"]:
        if message["senderWorkerId"] not in roles:
            raise DataError(path, lineno, f"sender {message['senderWorkerId']} is neither initiator nor respondent")
        mentioned = []

        def render(match: re.Match) -> str:
            if match.group(1) not in movie_to_item:
                raise DataError(path, lineno, f"movie @{match.group(1)} is not in movies_with_mentions.csv")
            mentioned.append(movie_to_item[match.group(1)])
            return items[mentioned[-1]]["title"]

        text = MENTION.sub(render, clean_text(message["text"]))
        if not text:
            drops["empty_message"] += 1
            continue
        messages.append((roles[message["senderWorkerId"]], text, mentioned))
    if not messages:
        drops["empty_dialogue"] += 1
        return None
    return {"dialog_id": str(record["conversationId"]), "turns": merge_turns(messages),
            "liked": redial_liked(record, movie_to_item, drops)}


# ----------------------------------------------------------------------------- INSPIRED

INSPIRED_ROLES = {"SEEKER": "seeker", "RECOMMENDER": "recommender"}
TITLE_WITH_YEAR = re.compile(r"^\S.* \(\d{4}\)$")
DBPEDIA_FIELDS = {"genre": "genres", "director": "directors", "writer": "writers", "starring": "stars"}


def name_from_uri(uri: str) -> str:
    """<http://dbpedia.org/resource/X_(2014_film)> -> "X (2014)"; "X_(film)" or "Y_(actor)" -> "X" / "Y"."""
    name = urllib.parse.unquote(uri.strip("<>").rsplit("/", 1)[-1])
    name = re.sub(r"__PersonFunction__\d+$", "", name).replace("_", " ")
    year = re.search(r"\s\((\d{4})\b[^)]*\)$", name)
    if year:
        return f"{name[:year.start()].strip()} ({year.group(1)})"
    return re.sub(r"\s\([^)]*\)$", "", name).strip()


def inspired_splits(raw: Path) -> dict[str, tuple[Path, list]]:
    return {split: (raw / name, numbered_jsonl(raw / name)) for split, name in INSPIRED_SPLIT_FILES.items()}


def inspired_catalogue(raw: Path, splits: dict) -> tuple[list[dict], dict[str, int | None], int]:
    """Items = item_ids.json (file order); title = the dialogues' most frequent "Title (Year)"
    paired with the link, else one derived from the URI; attributes from the DBpedia sub-graph
    (few films there carry dbo:genre), the rest borrowed from ReDial's id2info.json. The returned link
    index maps every known DBpedia link to its item id, or to None when it is not a catalogue item."""
    entity2id, kg = read_json(raw / "entity2id.json"), read_json(raw / "dbpedia_subkg.json")
    uri_of = {eid: uri for uri, eid in entity2id.items()}
    field_of = {rid: DBPEDIA_FIELDS[name] for uri, rid in read_json(raw / "relation2id.json").items()
                if (name := uri.strip("<>").rsplit("/", 1)[-1]) in DBPEDIA_FIELDS}
    titles_seen: dict[str, Counter] = {}
    for _, records in splits.values():
        for _, dialogue in records:
            for turn in dialogue if isinstance(dialogue, list) else []:
                if isinstance(turn, dict) and len(turn.get("movie") or []) == len(turn.get("movie_link") or []):
                    for title, link in zip(turn["movie"], turn["movie_link"]):
                        if TITLE_WITH_YEAR.match(title.strip()):  # skips broken ones like "Amber ()"
                            titles_seen.setdefault(link, Counter())[" ".join(title.split())] += 1
    items, link_index = [], dict.fromkeys(entity2id)
    for i, eid in enumerate(read_json(raw / "item_ids.json")):
        if eid not in uri_of:
            raise DataError(raw / "item_ids.json", None, f"item entity {eid} is not in entity2id.json")
        uri = uri_of[eid]
        attributes = {field: [] for field in DBPEDIA_FIELDS.values()}
        for relation, tail in kg.get(str(eid), []):
            if relation in field_of and tail in uri_of:
                attributes[field_of[relation]].append(name_from_uri(uri_of[tail]))
        title = titles_seen[uri].most_common(1)[0][0] if uri in titles_seen else name_from_uri(uri)
        items.append(item_row(i, uri, title, **attributes))
        link_index[uri] = i
    borrowed = borrow_metadata(items, read_json(raw_file(raw, "id2info.json")))
    print(f"inspired: {borrowed} films took attributes DBpedia lacks from ReDial's id2info.json (by title and year)")
    with_metadata = sum(any(item[field] for field in ID2INFO_FIELDS.values()) for item in items)
    return items, link_index, with_metadata


def borrow_metadata(items: list[dict], info: dict) -> int:
    """Fill each item's empty attribute fields from the id2info.json entry of the same title and year:
    the same text (case and spacing aside) first, else the same normalised title ("The Matrix (1999)" =
    "Matrix (1999)"). A title without a year, or one two entries share, matches nothing. Returns how
    many items took any attribute."""
    exact: dict[str, dict | None] = {}
    normalised: dict[str, dict | None] = {}
    for entry in info.values():
        name = entry.get("name") or ""
        if HAS_YEAR.search(name):
            for index, key in ((exact, " ".join(name.lower().split())), (normalised, common.normalize_title(name))):
                index[key] = entry if key not in index else None  # shared by two entries: ambiguous
    borrowed = 0
    for item in items:
        if not HAS_YEAR.search(item["title"]):
            continue
        entry = (exact.get(" ".join(item["title"].lower().split()))
                 or normalised.get(common.normalize_title(item["title"])))
        if entry is None:
            continue
        filled = item_row(0, "", "", *(entry.get(f) for f in ID2INFO_FIELDS))
        taken = [field for field in ID2INFO_FIELDS.values() if not item[field] and filled[field]]
        for field in taken:
            item[field] = filled[field]
        borrowed += bool(taken)
    return borrowed


def inspired_dialogue(turns: list, dialog_id: str, path: Path, lineno: int,
                      link_index: dict[str, int | None], drops: Counter) -> dict | None:
    messages = []
    for turn in turns:
        if turn["role"] not in INSPIRED_ROLES:
            raise DataError(path, lineno, f"unknown role {turn['role']!r} (expected SEEKER or RECOMMENDER)")
        mentioned = []
        for link in turn["movie_link"]:
            if link not in link_index:
                raise DataError(path, lineno, f"movie link {link} is not in entity2id.json")
            if link_index[link] is not None:
                mentioned.append(link_index[link])
            else:
                drops["mention_not_in_catalogue"] += 1
        drops["unlinked_mention"] += max(0, len(turn["movie"]) - len(turn["movie_link"]))
        text = clean_text(turn["text"])
        if not text and not mentioned:
            drops["empty_message"] += 1
            continue
        messages.append((INSPIRED_ROLES[turn["role"]], text, mentioned))
    if not messages:
        drops["empty_dialogue"] += 1
        return None
    turns = merge_turns(messages)
    seeker_items = [i for t in turns if t["role"] == "seeker" for i in t["items"]]
    recommended = [i for t in turns if t["role"] == "recommender" for i in t["items"]]
    return {"dialog_id": dialog_id, "turns": turns, "liked": unique(seeker_items + recommended[-1:])}


# ----------------------------------------------------------------------------- stats and main


def split_stats(dialogues: list[dict], samples: list[dict], drops: Counter) -> dict:
    return {
        "dialogues": len(dialogues),
        "turns": sum(len(d["turns"]) for d in dialogues),
        "samples": len(samples),
        "samples_with_new_target": sum(bool(s["new_targets"]) for s in samples),
        "target_labels": sum(len(s["targets"]) for s in samples),
        "new_target_labels": sum(len(s["new_targets"]) for s in samples),
        "dropped": dict(sorted(drops.items())),
    }


def main(argv=None) -> dict:
    args = parse_args(Args, argv)
    set_seed(args.seed)
    run = RunPaths(default_run_dir(args.dataset, args.run_dir))

    # 1. Raw files: local copies, or the public ones downloaded into the run directory.
    raw = Path(args.raw_dir) if args.raw_dir else fetch_raw(args.dataset, run.root / "raw")
    require_files(raw, args.dataset)

    # 2. Catalogue and raw dialogue records of each split.
    if args.dataset == "redial":
        items, mention_index, with_metadata = redial_catalogue(raw)
        splits = redial_splits(raw, args.valid_fraction, args.seed)
    else:
        splits = inspired_splits(raw)
        items, mention_index, with_metadata = inspired_catalogue(raw, splits)

    # 3. Dialogues as merged seeker/recommender turns; 4. one sample per recommending turn.
    dialogues, samples, stats = {}, {}, {}
    for split in SPLITS:
        path, records = splits[split]
        drops, dialogues[split] = Counter(), []
        for lineno, record in records:
            try:
                if args.dataset == "redial":
                    dialogue = redial_dialogue(record, path, lineno, mention_index, items, drops)
                else:
                    dialogue = inspired_dialogue(record, f"{path.stem}-{lineno}", path, lineno, mention_index, drops)
            except (KeyError, TypeError, AttributeError) as e:
                raise DataError(path, lineno, f"unexpected record layout ({type(e).__name__}: {e})") from None
            if dialogue is not None:
                dialogues[split].append(dialogue)
        samples[split] = [s for d in dialogues[split] for s in recommendation_samples(d)]
        if not dialogues[split] or not samples[split]:
            what = "dialogues" if not dialogues[split] else "recommendation samples"
            raise DataError(path, None, f"the {split} split has no {what}", "check the raw file or --valid-fraction")
        stats[split] = split_stats(dialogues[split], samples[split], drops)

    # 5. Write the prepared data and its statistics.
    out = run.data
    write_jsonl(out / "items.jsonl", items)
    for split in SPLITS:
        write_jsonl(out / f"dialogues_{split}.jsonl", dialogues[split])
        write_jsonl(out / f"samples_{split}.jsonl", samples[split])
    summary = {"dataset": args.dataset, "catalogue_size": len(items), "items_with_metadata": with_metadata,
               "items_without_metadata": len(items) - with_metadata, "splits": stats,
               "seed": args.seed, "valid_fraction": args.valid_fraction if args.dataset == "redial" else None,
               "raw_dir": str(raw.resolve())}
    write_json(out / "stats.json", summary)

    print(f"{args.dataset}: {len(items)} items ({with_metadata} with metadata) -> {out}")
    for split in SPLITS:
        s = stats[split]
        print(f"  {split:5s} {s['dialogues']:6d} dialogues {s['samples']:6d} samples "
              f"({s['samples_with_new_target']} with a new target)  dropped {s['dropped'] or 'nothing'}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
