"""Stage 5: evaluate every system on the test split: single-shot rankers, then multi-turn conversations.

Reads   <run-dir>/data/                     (01_prep_data.py)       items, dialogues, test samples
        <run-dir>/retriever/                (03_sft_recommender.py) fused and single-view retrievers
        <run-dir>/simulator/                (02_sft_simulator.py)   the user simulator's adapter
        <run-dir>/simulator_feedback_only/  (02 with --task-mix 1 0 0) the simulator ablation
        <run-dir>/recommender_sft/          (03_sft_recommender.py) the SFT recommender's adapter
Writes  <run-dir>/eval/
          results.json          every metric of every row (by turn for multi-turn rows), 95% bootstrap CIs
          results.md            the same as Markdown tables
          recall_by_turn.png    Recall@10 (new targets) by turn for the multi-turn rows
          conversations_<row>.jsonl  every simulated conversation: lists, answers, simulator replies

Protocol (docs/design.md section 7): each recommendation sample is scored against its `new_targets`
(items not mentioned earlier in the dialogue: the headline) and against all its `targets`.
One label per target item (the CRS convention): a sample with two targets counts as two labels,
each with one relevant item, so NDCG@k's ideal DCG is 1 for each. Recall@k, NDCG@k and MRR@k each
look at the first k of the list only.
Confidence intervals resample samples (percentile bootstrap). Whether the turns help is the change
of each multi-turn row from turn 1 to turn T on the same conversations, with a paired bootstrap
interval (paired_gain): the two turns' own intervals overlap even when the change is clear.
Every other multi-turn row is also compared with sft+simulator, sample by sample, at turns 1 and T,
in R@1, R@10 and NDCG@10 (a target moved from rank 5 to rank 1 gains nothing in R@10): results.json
keeps each row's lists at those turns, so rows evaluated by separate --merge processes are paired too.

Single-shot rows, on the whole split:
  popularity          items ranked by how many training dialogues mention them
  cooccurrence        item j scored by the sum over the dialogue's mentioned items i of the training
                      dialogues that mention both i and j; popularity breaks ties
  encoder-cosine      the frozen sentence encoder's cosine between the dialogue and each item text
  cooccurrence+cosine the two z-scored over the catalogue and mixed, w * cooc + (1 - w) * cosine,
                      w in 0, 0.1, ..., 1 chosen on valid Recall@10 (results.json keeps it)
  retriever-semantic  the retriever with its semantic view only (ablation)
  retriever-collab    the retriever with its collaborative view only (ablation)
  retriever-fused     the dual-view retriever (cross-attention fusion): what the recommender re-ranks
Multi-turn rows, on --limit samples drawn (seeded) among those with a new target; T = --turns:
  retriever+simulator          the retriever's top 10 each turn; the simulator's feedback re-queries it
  base-zero-shot               the untuned LLM re-ranks the candidates, one turn
  sft-single-turn              the SFT recommender, one turn (= turn 1 of the next row)
  sft+simulator                the SFT recommender over T turns with the three-task simulator
  sft+simulator-feedback-only  the same with the simulator trained on the feedback task only
  smtpo                        the recommender after multi-turn RL (04), over T turns with the simulator
  smtpo-no-preference-reward   the same, RL without the preference reward (04 --w-preference 0)
By default every row whose inputs exist is evaluated (the others are named and skipped).
Each turn: the retriever recalls K candidates from the dialogue so far, the recommender ranks 10
(an answer that does not parse keeps its valid titles, then the retriever's order fills the list),
the simulator answers the top 3 as the seeker. Every conversation plays all T turns and every
turn's list is scored: nothing the recommender or the simulator sees depends on the label, so a
list can get worse as well as better. --stop-on-label is iEvaLM's label-using protocol instead: a
conversation ends once the recommender's own list ranks a true target first and keeps that list,
so R@1 can never fall over the turns and the gains of R@10 and NDCG lean upward; the table says
which protocol it used. The simulator's leakage rate is the share of its replies that name a true
target it was neither shown nor told.
With --simulator-knows-target, iEvaLM's protocol and an upper bound that uses the label, the simulator
is also told each target's genres, people and the start of its plot, never its title
(common.target_description); its rows are named "<row> (target-aware)", kept apart from the label-free
rows in their own table with R@10 at every turn, and merge beside them (--merge). A reply that names a
target it was not shown counts as leakage, as above. It tests whether the loop can use informative
feedback at all: the label-free simulator's replies may say nothing useful.
With --test-states reachable the draw is among the samples whose first-turn K candidates hold a
true target (the retriever's own first turn, no LLM): a table of conditional figures, where a row
can gain by ranking and feedback alone, since the retriever's misses are left out for every row alike.
With --test-states linked it is among the samples whose context mentions a catalogue item (iEvaLM's
ReDial subset keeps a context with a linked entity).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

import common
from common import arg

RETRIEVER_ROWS = {"retriever-semantic": "semantic", "retriever-collab": "collaborative", "retriever-fused": "fused"}
SINGLE_SHOT_ROWS = [*common.BASELINE_ROWS, *RETRIEVER_ROWS]  # the baselines: common.CountBaselines
# multi-turn row -> (recommender: "retriever", "base" or an adapter folder; simulator adapter folder)
MULTI_TURN_ROWS = {
    "retriever+simulator": ("retriever", "simulator"),
    "base-zero-shot": ("base", "simulator"),
    "sft-single-turn": ("recommender_sft", "simulator"),
    "sft+simulator": ("recommender_sft", "simulator"),
    "sft+simulator-feedback-only": ("recommender_sft", "simulator_feedback_only"),
    "smtpo": ("recommender_rl", "simulator"),
    "smtpo-no-preference-reward": ("recommender_rl_no_preference", "simulator"),
}
SINGLE_TURN_ROWS = ("base-zero-shot", "sft-single-turn")  # recommender rows without simulator turns
ALL_ROWS = SINGLE_SHOT_ROWS + list(MULTI_TURN_ROWS)
TURN_KS = (1, 5, 10)
GAIN_METRICS = ("recall@1", "recall@10", "ndcg@10")  # new targets, paired: turn 1 -> turn T, and row - reference
REFERENCE_ROW = "sft+simulator"  # the other multi-turn rows are also compared with it, sample by sample
TARGET_AWARE = " (target-aware)"  # the name suffix of the rows played with --simulator-knows-target


@dataclass
class Args:
    dataset: str = arg("redial", "dataset whose run directory to use", choices=["redial", "inspired"])
    run_dir: str = arg("", "run directory (default: runs/<dataset>)")
    split: str = arg("test", "split to evaluate", choices=["valid", "test"])
    rows: list = arg([], f"systems to evaluate, among {ALL_ROWS} (default: every row whose inputs exist)")
    limit: int = arg(100, "multi-turn rows: samples (seeded draw among those with a new target); 0 = all")
    test_states: str = arg("all", "multi-turn rows: test samples to draw from; reachable: a target among the "
                                  "retriever's first-turn K candidates (the rows then compare re-ranking and "
                                  "feedback, not recall); linked: a catalogue item mentioned in the context "
                                  "(iEvaLM's ReDial subset)", choices=list(common.START_STATES))
    turns: int = arg(5, "multi-turn rows: turns T per conversation")
    stop_on_label: bool = arg(False, "label-using (iEvaLM): end a conversation once the recommender's own list "
                                     "ranks a true target first; default: every conversation plays all T turns "
                                     "(label-free)")
    simulator_knows_target: bool = arg(False, "upper bound that uses the label (iEvaLM): the simulator is told "
                                              "each target's genres, people and plot, never its title; rows are "
                                              "named '<row> (target-aware)'")
    candidates: int = arg(20, "candidates K the retriever recalls each turn")
    show_top: int = arg(3, "movies of the list the simulator is shown (and answers)")
    model: str = arg("", "base LLM (default: the one recommender_sft/ was trained on)")
    load_in_4bit: bool = arg(False, "load the base in nf4 4-bit")
    max_new_tokens: int = arg(320, "generation budget of one recommender answer")
    no_repeat_ngram: int = arg(common.GREEDY_NO_REPEAT_NGRAM, "forbid a recommender answer to repeat one of its "
                                                              "own n-grams (greedy loop guard; 0 = off)")
    sim_max_new_tokens: int = arg(60, "generation budget of one simulator reply")
    gen_batch_size: int = arg(8, "prompts per generation batch")
    exclude_seen: bool = arg(True, "never rank items already mentioned in the dialogue")
    bootstrap: int = arg(1000, "bootstrap resamples for the 95% confidence intervals")
    seed: int = arg(0, "random seed (the --limit draw)")
    merge: bool = arg(False, "keep the rows of an existing eval/results.json written with the same settings "
                             "(MERGE_KEYS: split, limit, turns, candidates, seed, exclusion, decoding) and add (or "
                             "replace) this run's rows; lets rows be evaluated later or by processes side by side")
    threads: int = arg(0, "torch CPU threads (0 = torch's default; 1 when jobs share the cores, else all of them)")
    device: str = arg(str(common.default_device()), "torch device")


# ---- single-shot rows ---------------------------------------------------------------------------------------

def chosen_rows(run: common.RunPaths, rows: list[str]) -> list[str]:
    """--rows checked against ALL_ROWS; none given: every row whose inputs exist (available_rows)."""
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown:
        raise SystemExit(f"error: unknown --rows {unknown}; choose among {ALL_ROWS}")
    return rows or available_rows(run)


def row_retriever_files(row: str) -> list[str]:
    """What a row reads of 03's retriever/: the text baselines its encoder vectors (features.pt), the
    count baselines nothing, every other row a trained retriever."""
    if row in common.BASELINE_ROWS:
        return ["retriever/features.pt"] if row in common.TEXT_BASELINE_ROWS else []
    return [f"retriever/{RETRIEVER_ROWS.get(row, 'fused')}/retriever.pt"]


def available_rows(run: common.RunPaths) -> list[str]:
    """Every row whose stage outputs are in the run directory; says which are skipped and why."""
    rows, skipped = [], []
    for row in ALL_ROWS:
        needs = ["data/items.jsonl"] + row_retriever_files(row)
        needs += [f"{f}/adapter_config.json" for f in MULTI_TURN_ROWS.get(row, ()) if f not in ("retriever", "base")]
        missing = [f for f in needs if not (run.root / f).exists()]
        if missing:
            skipped.append(f"{row} (no {missing[0]}: {common.RunPaths.STAGE_OF[missing[0].split('/')[0]]})")
        else:
            rows.append(row)
    if skipped:
        print("[05] skipped rows: " + "; ".join(skipped))
    return rows


def baseline_rankings(run: common.RunPaths, rows: list[str], num_items: int, samples: list[dict], k: int,
                      args: Args) -> tuple[dict[str, list[list[int]]], dict]:
    """The common.BASELINE_ROWS among rows, counted on the training dialogues, the mix weight chosen
    on valid Recall@10 (new targets, seen items excluded as on --split):
    ({row: [samples][k] item ids}, {"mix_weight", "valid_new_recall@10_by_weight"} when mixed)."""
    rows = [r for r in common.BASELINE_ROWS if r in rows]
    if not rows:
        return {}, {}
    vectors = {}
    if any(r in common.TEXT_BASELINE_ROWS for r in rows):
        valid = common.load_samples(run, "valid")
        vectors = encoder_vectors(run, features_encoder(run), {"valid": valid, args.split: samples}, args.device,
                                  items=True)
    baselines = common.CountBaselines.fit(common.load_dialogues(run, "train"), num_items, vectors.get("items"))
    mix = {}
    if "cooccurrence+cosine" in rows:
        by_weight = baselines.fit_mix_weight(vectors["valid"], valid, args.exclude_seen)
        mix = {"mix_weight": baselines.mix_weight,
               f"valid_new_recall@{common.MIX_RECALL_K}_by_weight": {f"{w:.1f}": r for w, r in by_weight.items()}}
        print(f"[05] cooccurrence+cosine: co-occurrence weight {baselines.mix_weight}, chosen on valid")
    return baselines.rankings(rows, samples, k, vectors.get(args.split), args.exclude_seen), mix


def features_encoder(run: common.RunPaths) -> str:
    """The encoder 03's retriever/features.pt was written with (the default one when there is none)."""
    path = run.retriever / "features.pt"
    return torch.load(path, weights_only=False).get("encoder", common.DEFAULT_ENCODER) if path.exists() \
        else common.DEFAULT_ENCODER


def encoder_vectors(run: common.RunPaths, encoder: str, samples: dict[str, list[dict]], device: str,
                    items: bool = False) -> dict[str, torch.Tensor]:
    """Frozen-encoder vectors {split: [S, E]} of the dialogues of `samples` (and "items": [N, E]):
    03's retriever/features.pt when it was encoded by the same encoder from exactly the current
    data (same fingerprint), else encoded here."""
    names = [*samples, *(["items"] if items else [])]
    path = run.retriever / "features.pt"
    blob = torch.load(path, weights_only=False) if path.exists() else {}
    current = common.encoder_texts(common.load_items(run), {s: common.load_samples(run, s) for s in common.SPLITS})
    if blob.get("fingerprint") == common.texts_fingerprint(encoder, current) and \
            all(len(blob["features"][s]) == len(rows) for s, rows in samples.items()):
        print(f"[05] reusing the {', '.join(names)} vectors of {path}")
        return {name: blob["features"][name] for name in names}
    tokenizer, model = common.load_sentence_encoder(encoder, device)
    texts = common.encoder_texts(common.load_items(run), samples)
    return {name: common.encode_texts(texts[name], tokenizer, model, desc=f"encoding {name}") for name in names}


def retriever_rankings(run: common.RunPaths, variants: list[str], samples: list[dict], k: int,
                       args: Args) -> dict[str, list[list[int]]]:
    """Top-k of each retriever variant ({variant: [samples][k] item ids}); the dialogue texts are
    encoded once for all of them."""
    folder = run.require("retriever", f"{variants[0]}/retriever.pt")
    nets = {}
    for v in variants:
        run.require("retriever", f"{v}/retriever.pt")
        nets[v] = common.DualViewRetriever.load(folder / v).to(args.device)
    encoder_name = nets[variants[0]].extra.get("encoder", common.DEFAULT_ENCODER)
    ctx_sem = encoder_vectors(run, encoder_name, {args.split: samples}, args.device)[args.split]
    context_items = [s["context_items"] for s in samples]
    return {v: common.rank_items(net, ctx_sem, context_items, k, args.exclude_seen, device=args.device)
            for v, net in nets.items()}


def single_shot_rows(run: common.RunPaths, items: list[dict], samples: list[dict], args: Args) -> tuple[dict, dict]:
    """The baselines and the retriever variants ranked once on the whole split and scored at every
    k of common.METRIC_KS. -> ({row: score_rankings, the mix's row also with its mix_weight},
    {"retrievers": seconds} when one ran)"""
    k = max(common.METRIC_KS)
    rankings, mix = baseline_rankings(run, args.rows, len(items), samples, k, args)
    seconds = {}
    variants = [RETRIEVER_ROWS[r] for r in args.rows if r in RETRIEVER_ROWS]
    if variants:
        started = time.time()
        by_variant = retriever_rankings(run, variants, samples, k, args)
        rankings.update({row: by_variant[v] for row, v in RETRIEVER_ROWS.items() if v in by_variant})
        seconds["retrievers"] = round(time.time() - started, 1)
    rows = {row: common.score_rankings(rankings[row], samples, bootstrap=args.bootstrap, seed=args.seed)
            for row in args.rows if row in SINGLE_SHOT_ROWS}
    if mix:
        rows["cooccurrence+cosine"].update(mix)
    return rows, seconds


# ---- multi-turn rows ----------------------------------------------------------------------------------------

def test_subset(conversation: common.Conversation, samples: list[dict], args: Args) -> tuple[list[dict], dict]:
    """The multi-turn draw: --limit samples with a new target, seeded, among those --test-states
    keeps (the rule needs the retriever's first turn, so `conversation`). -> (subset, {rule, kept, of})"""
    pool = [s for s in samples if s["new_targets"]]
    kept = common.keep_states(conversation, pool, args.test_states)
    states = {"rule": args.test_states, "kept": len(kept), "of": len(pool)}
    return common.draw_samples(kept, args.limit, args.seed), states


def play_pairs(conversation: common.Conversation, weights: dict, subset: list[dict], rows: list[str],
               args: Args) -> tuple[dict, dict]:
    """Each (recommender, simulator) pair of `rows` plays the subset once, over T turns unless all its
    rows are single-turn (sft-single-turn reads turn 1 of sft+simulator). -> ({pair: episodes}, {pair: s})"""
    pairs = {}
    for row in rows:
        turns = 1 if row in SINGLE_TURN_ROWS else args.turns
        pairs[MULTI_TURN_ROWS[row]] = max(pairs.get(MULTI_TURN_ROWS[row], 1), turns)
    played, seconds = {}, {}
    for (recommender, simulator), turns in pairs.items():
        started = time.time()
        conversation.simulator_weights = weights[simulator]
        rec_weights = {"retriever": "retriever", "base": None}[recommender] \
            if recommender in ("retriever", "base") else weights[recommender]
        played[recommender, simulator] = conversation.play(common.start_episodes(subset), turns, rec_weights,
                                                           progress=f"{recommender} + {simulator}",
                                                           stop_on_success=args.stop_on_label)
        seconds[recommender, simulator] = round(time.time() - started, 1)
    return played, seconds


def multi_turn_rows(run: common.RunPaths, items: list[dict], samples: list[dict], args: Args,
                    out) -> tuple[dict, dict, list[dict]]:
    """The multi-turn rows of --rows on one seeded draw; writes conversations_<row>.jsonl of each row
    played over the turns. -> ({row: score_episodes + lists}, multi_turn_meta, the draw)"""
    rows = [r for r in args.rows if r in MULTI_TURN_ROWS]
    folders = sorted({f for r in rows for f in MULTI_TURN_ROWS[r] if f not in ("retriever", "base")})
    conversation, weights = common.load_conversation(run, folders, items, args)
    subset, test_states = test_subset(conversation, samples, args)
    if args.test_states != "all":
        print(f"[05] test states: {test_states['kept']} of {test_states['of']} ({args.test_states}), "
              f"{len(subset)} drawn")
    if not subset:
        raise SystemExit(f"error: no {args.split} sample passes --test-states {args.test_states} with "
                         f"{args.candidates} candidates; use --test-states all, or more --candidates")
    played, seconds = play_pairs(conversation, weights, subset, rows, args)
    multi_turn = {}
    for row in rows:
        key, name = MULTI_TURN_ROWS[row], row + (TARGET_AWARE if args.simulator_knows_target else "")
        episodes, single = played[key], row in SINGLE_TURN_ROWS
        r = {"recommender": key[0], "simulator": key[1],
             **score_episodes(episodes, 1 if single else args.turns, args), "seconds": seconds[key],
             # item ids per sample after turns 1 and T: what pairs this row with another one later
             "lists": {f"turn {t}": [e.ranking_at(t) for e in episodes] for t in sorted({1, args.turns})}}
        if single:  # no later turns: turn T = turn 1
            r["turns"] = [dict(r["turns"][0], turn=t) for t in range(1, args.turns + 1)]
        else:
            common.write_jsonl(out / f"conversations_{name.replace(TARGET_AWARE, '-target-aware')}.jsonl",
                               [conversation_log(e, items) for e in episodes])
        multi_turn[name] = r
        print(f"[05] {name}: R@10 new turn 1 {r['turns'][0]['new']['recall@10']:.3f}, "
              f"turn {args.turns} {r['turns'][-1]['new']['recall@10']:.3f} ({r['seconds']} s)")
    first = next(iter(multi_turn.values()))
    meta = {"samples": len(subset), "labels": first["turns"][0]["labels"]["new"], "candidates": args.candidates,
            "test_states": test_states}
    return multi_turn, meta, subset


def paired_gain(before: list[list[int]], after: list[list[int]], samples: list[dict], metric: str = "recall@10",
                key: str = "new_targets", resamples: int = 1000, seed: int = 0) -> dict:
    """How much a label metric changes from one ranking of each sample to another (turn 1 -> turn T
    of the same conversations, or a row against REFERENCE_ROW), with a paired 95% percentile bootstrap:
    a resample draws samples and keeps each sample's two rankings together, so the interval is that of
    the change itself, far narrower than the two metrics' own intervals when most samples do not move.

    before, after: one ranked item-id list per sample. Each sample adds its labels' metric sums, as
    in common.MetricAccumulator: gain = (sum after - sum before) / labels.
    -> {"gain": float, "ci": [lo, hi], "up": samples whose sum rose, "down": ... fell, "samples": n}"""
    k = int(metric.split("@")[1])
    diffs, counts = [], []
    for b, a, s in zip(before, after, samples):
        if not s[key]:
            continue
        diffs.append(sum(common.label_metrics(a, t, (k,))[metric] - common.label_metrics(b, t, (k,))[metric]
                         for t in s[key]))
        counts.append(len(s[key]))
    diff, count = np.asarray(diffs, dtype=np.float64), np.asarray(counts, dtype=np.float64)  # [samples]
    out = {"gain": float(diff.sum() / max(count.sum(), 1)), "ci": [0.0, 0.0], "up": int((diff > 1e-12).sum()),
           "down": int((diff < -1e-12).sum()), "samples": len(diffs)}
    if len(diffs) and resamples:
        idx = np.random.default_rng(seed).integers(0, len(diffs), size=(resamples, len(diffs)))  # [resamples, n]
        boot = diff[idx].sum(1) / count[idx].sum(1)
        out["ci"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    return out


def score_episodes(episodes: list[common.Episode], turns: int, args: Args) -> dict:
    """Metrics of the lists after each turn, parse and success rates by turn, simulator leakage."""
    samples = [e.sample for e in episodes]
    by_turn = [{"turn": t, **common.score_rankings([e.ranking_at(t) for e in episodes], samples, ks=TURN_KS,
                                                   bootstrap=args.bootstrap, seed=args.seed)}
               for t in range(1, turns + 1)]
    played = [[e.turns[t - 1] for e in episodes if len(e.turns) >= t] for t in range(1, turns + 1)]
    replies = [turn for e in episodes for turn in e.turns if "reply" in turn]
    # did the turns help? the paired change from turn 1 to turn T on the same conversations
    first, last = [e.ranking_at(1) for e in episodes], [e.ranking_at(turns) for e in episodes]
    gain = {m: paired_gain(first, last, samples, m, resamples=args.bootstrap, seed=args.seed)
            for m in GAIN_METRICS} if turns > 1 else None
    return {
        "samples": len(episodes), "turns": by_turn, "gain_first_to_last": gain,
        "parse_rate_by_turn": [sum(x["parsed"]["valid"] for x in p) / len(p) if p else None for p in played],
        "success_by_turn": [sum(e.ranking_at(t)[0] in e.truth for e in episodes) / len(episodes)
                            for t in range(1, turns + 1)],
        "mean_turns_played": sum(len(e.turns) for e in episodes) / len(episodes),
        "simulator_replies": len(replies),
        "reply_names_target_rate": sum(r["names_target"] for r in replies) / len(replies) if replies else None,
        "leakage_rate": sum(r["leaks"] for r in replies) / len(replies) if replies else None,
        # a reply that repeats the recommender's turn tells the retriever nothing new (common.copies_turn)
        "reply_copy_rate": sum(r["copies"] for r in replies) / len(replies) if replies else None,
    }


def conversation_log(e: common.Episode, items: list[dict]) -> dict:
    """A readable record of one episode for conversations_<row>.jsonl."""
    return {"dialog_id": e.sample["dialog_id"], "turn": e.sample["turn"],
            "truth": [items[i]["title"] for i in e.truth],
            "turns": [{"candidates": [items[i]["title"] for i in t["candidates"]], "answer": t["text"],
                       "valid": t["parsed"]["valid"], "list": [items[i]["title"] for i in t["ranked"]],
                       "rank_of_target": t["rank"], "said": t.get("said"), "reply": t.get("reply"),
                       "copies": t.get("copies"), "leaks": t.get("leaks"),
                       "completion_tokens": len(t["completion_ids"])} for t in e.turns]}


# ---- rows of earlier processes, paired comparisons --------------------------------------------------------

# the settings two evaluations must share for their rows to sit in one table
MERGE_KEYS = ("split", "limit", "test_states", "turns", "stop_on_label", "candidates", "seed", "exclude_seen",
              "max_new_tokens", "no_repeat_ngram")
# what a results.json written before a flag existed ran with, where that is not the flag's default
BEFORE_FLAG = {"stop_on_label": True}
# the conversation protocol this code plays: the retriever reads the real turns and the latest feedback,
# and the recommender's turn is said as a question (docs/findings.md); older files record otherwise
PROTOCOL = ("latest-feedback", "question")


def merge_earlier(results: dict, path) -> dict:
    """results plus the rows of the results.json at `path` that this run did not evaluate, rows in
    ALL_ROWS order. Read at write time, so a process that finishes later keeps an earlier one's rows."""
    earlier = common.read_json(path)
    # a file written before a flag existed ran with that flag's default
    defaults = {**{f.name: f.default for f in fields(Args)}, **BEFORE_FLAG}
    then = {k: earlier["args"].get(k, defaults[k]) for k in MERGE_KEYS}
    differ = {k: (then[k], results["args"][k]) for k in MERGE_KEYS if then[k] != results["args"][k]}
    # a file with the retriever_query and recommender_turn flags, or older than stop_on_label, may have
    # read the whole dialogue or said a list sentence (absent keys: the defaults of their time)
    old = earlier["args"]
    protocol = (old.get("retriever_query", "whole-dialogue"), old.get("recommender_turn", "list"))
    if ("retriever_query" in old or "stop_on_label" not in old) and protocol != PROTOCOL:
        differ["retriever_query, recommender_turn"] = (protocol, PROTOCOL)
    if old.get("constrain_answer"):  # decoded by a constraint this code no longer has
        differ["constrain_answer"] = (True, False)
    if earlier.get("prompt_version", 1) != results["prompt_version"]:  # rows of recommenders that read other prompts
        differ["prompt_version"] = (earlier.get("prompt_version", 1), results["prompt_version"])
    if earlier["dataset"] != results["dataset"] or differ:
        raise SystemExit(f"error: {path} was written with other settings {differ or earlier['dataset']} "
                         "(earlier, now); drop --merge to overwrite it, or use another --run-dir")
    merged = dict(results)
    for key in ("rows", "multi_turn", "seconds"):
        both = {**earlier.get(key, {}), **results[key]}
        merged[key] = {name: both[name] for name in sorted(both, key=row_order)}
    for key in ("labels", "multi_turn_meta"):
        if not results.get(key) and earlier.get(key):
            merged[key] = earlier[key]
    merged["merged_args"] = earlier.get("merged_args", []) + [earlier["args"]]
    return merged


def row_order(name: str) -> tuple[bool, int]:
    """Where a row sits in the tables: ALL_ROWS order, the target-aware rows after the label-free ones."""
    base = name.removesuffix(TARGET_AWARE)
    return name != base, ALL_ROWS.index(base) if base in ALL_ROWS else -1


def compare_with_reference(multi_turn: dict, subset: list[dict], args: Args) -> None:
    """Add to each multi-turn row (but REFERENCE_ROW and sft-single-turn, its turn 1) its paired
    change against REFERENCE_ROW at turns 1 and T, sample by sample: row["vs_reference"] =
    {"reference": REFERENCE_ROW, "turn t": R@10 paired_gain, "recall@1" and "ndcg@10": {"turn t": ...}}.
    Needs both rows' "lists"; a row of a merged file without them keeps the comparison it had, unless
    this process played REFERENCE_ROW again (args.rows): then it has none.
    subset: the --limit draw both rows played, in their order (the same draw: merge_earlier checked
    that split, limit, test_states and seed agree)."""
    reference = multi_turn.get(REFERENCE_ROW, {}).get("lists")
    for name, row in multi_turn.items():
        if name in (REFERENCE_ROW, "sft-single-turn") or name.endswith(TARGET_AWARE):  # another protocol
            continue
        if not (reference and row.get("lists")):
            if REFERENCE_ROW in args.rows:  # compared with episodes this file no longer holds
                row.pop("vs_reference", None)
            continue
        if any(len(v) != len(subset) for v in (*reference.values(), *row["lists"].values())):
            raise SystemExit(f"error: {name} and {REFERENCE_ROW} hold lists of another draw than --limit "
                             f"{args.limit} ({len(subset)} samples); evaluate both rows again without --merge")
        gains = {m: {turn: paired_gain(reference[turn], row["lists"][turn], subset, m, resamples=args.bootstrap,
                                       seed=args.seed) for turn in reference} for m in GAIN_METRICS}
        row["vs_reference"] = {"reference": REFERENCE_ROW, **gains.pop("recall@10"), **gains}


# ---- results.md and the plot ------------------------------------------------------------------------------

def format_gain(g: dict | None) -> str:
    """A paired_gain as '+0.004 [-0.013, +0.021] (3 / 2)'; None (single turn, or an older file): n/a."""
    return "n/a" if g is None else f"{g['gain']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}] ({g['up']} / {g['down']})"


def single_shot_table(results: dict) -> str:
    """Single-shot rows x headline metrics (new targets), R@10's 95% CI, and two metrics on all targets."""
    k_cols = [("recall@1", "R@1"), ("recall@10", "R@10"), ("recall@20", "R@20"), ("recall@50", "R@50"),
              ("ndcg@10", "NDCG@10"), ("mrr@10", "MRR@10")]
    lines = ["| system | " + " | ".join(f"{label} new" for _, label in k_cols)
             + " | R@10 new 95% CI | R@10 all | R@50 all |", "|" + "---|" * (len(k_cols) + 4)]
    for name, r in results["rows"].items():
        lo, hi = r["ci"]["new"]["recall@10"]
        cells = [f"{r['new'][m]:.3f}" for m, _ in k_cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | [{lo:.3f}, {hi:.3f}] | "
                     f"{r['all']['recall@10']:.3f} | {r['all']['recall@50']:.3f} |")
    mixed = [f"{name}: w = {r['mix_weight']} on co-occurrence, chosen on valid R@10"
             for name, r in results["rows"].items() if "mix_weight" in r]
    return (f"{results['dataset']} {results['split']}, single shot: {results['samples']} samples, "
            f"{results['labels']['new']} new-target labels, {results['labels']['all']} target labels\n\n"
            + "\n".join(lines + ([""] + mixed if mixed else [])))


def multi_turn_table(results: dict) -> str:
    """Multi-turn rows at turn 1 and turn T with the paired change between them; then each row
    against REFERENCE_ROW in GAIN_METRICS at turns 1 and T."""
    T = results["turns"]
    head = (f"| system | R@1 t1 | R@10 t1 [95% CI] | NDCG@10 t1 | R@1 t{T} | R@10 t{T} [95% CI] | NDCG@10 t{T} | "
            f"ΔR@10 t1→t{T} [paired 95% CI] (samples up / down) | parse rate t1 | leakage |")
    lines = [head, "|" + "---|" * 10]

    def cell(turn: dict, metric: str, ci: bool = False) -> str:
        v = f"{turn['new'][metric]:.3f}"
        return v + (" [{:.3f}, {:.3f}]".format(*turn["ci"]["new"][metric]) if ci else "")

    for name, r in results["multi_turn"].items():
        if name.endswith(TARGET_AWARE):
            continue
        first, last = r["turns"][0], r["turns"][-1]
        parse = "n/a" if r["recommender"] == "retriever" else f"{r['parse_rate_by_turn'][0]:.2f}"
        leak = "n/a" if r["leakage_rate"] is None else f"{r['leakage_rate']:.3f}"
        gain = format_gain((r.get("gain_first_to_last") or {}).get("recall@10"))
        lines.append(f"| {name} | {cell(first, 'recall@1')} | {cell(first, 'recall@10', True)} | "
                     f"{cell(first, 'ndcg@10')} | {cell(last, 'recall@1')} | {cell(last, 'recall@10', True)} | "
                     f"{cell(last, 'ndcg@10')} | {gain} | {parse} | {leak} |")
    paired = {name: r["vs_reference"] for name, r in results["multi_turn"].items() if r.get("vs_reference")}
    if paired:
        lines.append(paired_table(paired, T))
    mt = results["multi_turn_meta"]
    protocol = ("stopped on the label (--stop-on-label, iEvaLM)" if results["args"].get("stop_on_label")
                else "label-free, all T turns played")
    return (f"{results['dataset']} {results['split']}, multi-turn (T = {T}, K = {mt['candidates']} candidates, "
            f"{protocol}): "
            f"{mt['samples']} samples with a new target ({mt['labels']} labels), "
            + test_states_phrase(mt.get("test_states"))
            + ("all of them; " if not results["limit"] else f"a seeded draw of --limit {results['limit']}; ")
            + "single-turn rows repeat turn 1 in the turn-T columns\n\n" + "\n".join(lines))


def target_aware_table(results: dict) -> str:
    """The --simulator-knows-target rows: R@10 (new targets) after each turn, the paired change from
    turn 1 to T, the simulator's leakage."""
    rows = {name: r for name, r in results["multi_turn"].items() if name.endswith(TARGET_AWARE)}
    T = results["turns"]
    lines = ["| system | " + " | ".join(f"R@10 t{t}" for t in range(1, T + 1))
             + f" | ΔR@10 t1→t{T} [paired 95% CI] (samples up / down) | leakage |", "|" + "---|" * (T + 3)]
    for name, r in rows.items():
        gain = format_gain((r.get("gain_first_to_last") or {}).get("recall@10"))
        leak = "n/a" if r["leakage_rate"] is None else f"{r['leakage_rate']:.3f} ({r['simulator_replies']} replies)"
        lines.append(f"| {name} | " + " | ".join(f"{x['new']['recall@10']:.3f}" for x in r["turns"])
                     + f" | {gain} | {leak} |")
    return (f"Upper bound that uses the label (--simulator-knows-target, iEvaLM's protocol), on the same "
            f"{results['multi_turn_meta']['samples']} samples: the simulator is told each target's genres, people "
            "and plot, never its title; leakage: the share of its replies that name a target it was neither shown "
            "nor told\n\n" + "\n".join(lines))


def paired_table(paired: dict, T: int) -> str:
    """Each row's vs_reference (compare_with_reference) in GAIN_METRICS at turns 1 and T; a metric a
    merged row of an older file lacks reads n/a."""
    names = {"recall@1": "R@1", "recall@10": "R@10", "ndcg@10": "NDCG@10"}
    cols = [(m, t) for m in GAIN_METRICS for t in (1, T)]
    lines = ["| system | " + " | ".join(f"Δ{names[m]} t{t}" for m, t in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, v in paired.items():
        by_metric = {m: v if m == "recall@10" else v.get(m, {}) for m in GAIN_METRICS}
        lines.append(f"| {name} | " + " | ".join(format_gain(by_metric[m].get(f"turn {t}")) for m, t in cols) + " |")
    return ("\nEach row minus " + REFERENCE_ROW + " on the same samples (new targets, paired 95% CI, samples "
            "better / worse):\n\n" + "\n".join(lines))


def test_states_phrase(states: dict | None) -> str:
    """How the multi-turn draw was restricted (--test-states), for the table's heading; '' for all."""
    if not states or states["rule"] == "all":
        return ""
    kept = {"reachable": "whose first-turn candidates hold a target", "linked": "whose context mentions an item"}
    return f"among the {states['kept']} of {states['of']} {kept[states['rule']]} (--test-states {states['rule']}): "


def plot_recall_by_turn(results: dict, path) -> None:
    """Recall@10 (new targets) by turn, one line per multi-turn row, 95% CI as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in results["multi_turn"].items():
        if name.removesuffix(TARGET_AWARE) in SINGLE_TURN_ROWS:
            continue
        turns = [x["turn"] for x in r["turns"]]
        ax.plot(turns, [x["new"]["recall@10"] for x in r["turns"]], marker="o", label=name,
                linestyle="--" if name.endswith(TARGET_AWARE) else "-")
        ax.fill_between(turns, [x["ci"]["new"]["recall@10"][0] for x in r["turns"]],
                        [x["ci"]["new"]["recall@10"][1] for x in r["turns"]], alpha=0.12)
    ax.set_xlabel("turn")
    ax.set_ylabel("Recall@10 (new targets)")
    ax.set_xticks(range(1, results["turns"] + 1))
    ax.set_title(f"{results['dataset']} {results['split']}: {results['multi_turn_meta']['samples']} samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)


def write_results(results: dict, out) -> None:
    """results.json, results.md (the tables) and, with multi-turn rows, recall_by_turn.png."""
    common.write_json(out / "results.json", results)
    label_free = [name for name in results["multi_turn"] if not name.endswith(TARGET_AWARE)]
    tables = ([single_shot_table(results)] if results["rows"] else []) \
        + ([multi_turn_table(results)] if label_free else []) \
        + ([target_aware_table(results)] if len(label_free) < len(results["multi_turn"]) else [])
    table = "\n\n".join(tables) + "\n"
    common.atomic_write_bytes(out / "results.md", table.encode())
    if results["multi_turn"]:
        plot_recall_by_turn(results, out / "recall_by_turn.png")
    print(table)
    print(f"[05] wrote {out}/results.json, results.md" + (", recall_by_turn.png" if results["multi_turn"] else ""))


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    args.run_dir = common.default_run_dir(args.dataset, args.run_dir)
    run = common.RunPaths(args.run_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.set_seed(args.seed)
    args.rows = chosen_rows(run, args.rows)
    items = common.load_items(run)
    samples = common.load_samples(run, args.split)
    out = run.root / "eval"
    results = {"dataset": args.dataset, "split": args.split, "limit": args.limit, "samples": len(samples),
               "turns": args.turns, "args": asdict(args), "prompt_version": common.REC_PROMPT_VERSION,
               "rows": {}, "multi_turn": {}, "seconds": {}}

    # 1. Single-shot rankers on the whole split.
    results["rows"], results["seconds"] = single_shot_rows(run, items, samples, args)
    results["labels"] = next(iter(results["rows"].values()))["labels"] if results["rows"] else {}

    # 2. Multi-turn conversations with the simulator on a seeded draw of samples with a new target.
    subset = None
    if any(r in MULTI_TURN_ROWS for r in args.rows):
        results["multi_turn"], results["multi_turn_meta"], subset = multi_turn_rows(run, items, samples, args, out)

    # 3. The rows of earlier processes (--merge); then RL, the ablations, the retriever against the SFT
    #    recommender on the same samples (a process without multi-turn rows keeps its merged comparisons).
    if args.merge and (out / "results.json").exists():
        results = merge_earlier(results, out / "results.json")
    if subset is not None:
        compare_with_reference(results["multi_turn"], subset, args)

    # 4. results.json, results.md, recall_by_turn.png.
    write_results(results, out)
    return results


if __name__ == "__main__":
    main()
