"""Copy measured tables into README.md; nothing in those blocks is typed by hand.

Between <!-- results:start --> and <!-- results:end -->: one block per dataset with
runs/<dataset>/eval/results.md, the retriever's Recall@K, the SFT loss curves of 02 and 03 and, where 04 ran, the RL curves
(per step of recommender_rl*/train_log.jsonl). Only the datasets found under --runs are replaced;
the other datasets' blocks stay as they were, each with its own "Produced by" line.
Between <!-- bench:start --> and <!-- bench:end -->: the latest ours-vs-TRL pair on a CPU and on
CUDA of bench/results/rl_step_vs_trl.jsonl (bench/rl_step_vs_trl.py), and every CUDA pair in order.
Between <!-- lora_step:start --> and <!-- lora_step:end -->: bench/results/lora_step.jsonl
(bench/lora_step.py).
Between <!-- rl_compare:start --> and <!-- rl_compare:end -->, with --compare-rl DIR...: the RL
runs of those run directories side by side (settings, sampled training turns, greedy validation),
then each runs/<dataset>/rollout_temperature.md (tools/rollout_temperature.py) found.
Between <!-- sft_quality:start --> and <!-- sft_quality:end -->, with --sft-quality DIR...: the
quality report of each DIR/recommender_sft/ (03's quality.json and recommender_config.json), one row each;
rows of run directories not named stay as written before (a DIR named again replaces its row).
Between <!-- sim_quality:start --> and <!-- sim_quality:end -->, with --sim-quality FOLDER...: 02's quality
report of each simulator folder, tuned against the base, one row each (rows of folders not named stay).
Between <!-- side_eval:start --> and <!-- side_eval:end -->, with --side-eval DIR...: each DIR/eval/results.md
(05_eval.py in a side run directory, e.g. one row on more samples) under the command that wrote it, and
the DIR/eval/feedback_effect_<row>.md that tools/feedback_effect.py and the DIR/eval/paired_gains.md that
tools/paired_gains.py wrote there.
Between <!-- rl_eval:start --> and <!-- rl_eval:end -->, with --rl-eval DIR...: the same, for side runs
that set SMTPO against SFT on the same test conversations; between <!-- rl_final:start --> and
<!-- rl_final:end -->, with --final-eval DIR...: the same, for the latest adapters (the 300-step SFT
adapter, the RL adapters trained from it); between <!-- rl_reachable_eval:start --> and
<!-- rl_reachable_eval:end -->, with --reachable-eval DIR...: the same, for 05 runs drawn with
--test-states reachable; between <!-- rl_cited_eval:start --> and <!-- rl_cited_eval:end -->, with
--cited-eval DIR...: the same, for adapters of 03 --cite-candidates and the RL runs from them.
Between <!-- candidate_targets:start --> and <!-- candidate_targets:end -->, with --candidate-targets DIR...:
where the target sits among the K candidates of training samples (in sample and out of fold) and of valid
samples, from each DIR/retriever/report.json (03's cross-fitting); rows of run directories not named stay.
Between <!-- rl_start_states:start --> and <!-- rl_start_states:end -->, with --start-states-rl DIR...:
04 runs from every training state against only the states whose target the first turn's candidates
hold (--start-states), a summary row each and then their per-step curves (and their means over
quarters of the run); the same for --reachable-rl DIR... between <!-- rl_reachable:start --> and
<!-- rl_reachable:end --> (runs that also validate on reachable states, --eval-states), and for
--pool-rl DIR... between <!-- rl_pool:start --> and <!-- rl_pool:end --> (runs on a fixed pool of
start states, --train-pool, whose greedy episodes on the pool are the curve), and for --cited-rl DIR...
between <!-- rl_cited:start --> and <!-- rl_cited:end --> (runs from an SFT adapter trained with
03's --cite-candidates).

    python tools/update_readme_results.py [--runs runs] [--datasets inspired] [--command "..."]
                                          [--compare-rl runs/a runs/b] [--sft-quality runs/a runs/b]
                                          [--side-eval runs/a runs/b] [--sim-quality runs/a/simulator]
                                          [--rl-eval runs/a] [--final-eval runs/a] [--reachable-eval runs/a]
                                          [--cited-eval runs/a]
                                          [--candidate-targets runs/a]
                                          [--start-states-rl runs/a runs/b] [--reachable-rl runs/a]
                                          [--pool-rl runs/a] [--cited-rl runs/a]
"""
import argparse
import datetime
import importlib.util
import json
import re
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402  (the parse rate's interval is computed in one place)

RL_FOLDERS = ("recommender_rl", "recommender_rl_no_preference")
SFT_FOLDERS = ("simulator", "simulator_feedback_only", "recommender_sft")
_spec = importlib.util.spec_from_file_location("rl_step_vs_trl", ROOT / "bench" / "rl_step_vs_trl.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # its comparison_table: the benchmark's table is formatted in one place
evaluate = importlib.import_module("05_eval")  # its Args: a results.json's command is given by the flags it changed


def train_log(run_dir: Path, folder: str) -> list[dict]:
    """The rows of run_dir/folder/train_log.jsonl; [] when the stage has not run."""
    log = run_dir / folder / "train_log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def eval_loss_text(loss: float | dict) -> str:
    """03 logs one validation loss, 02 one per task ({feedback, attributes, target})."""
    if isinstance(loss, dict):
        return " / ".join(f"{task} {value:.3f}" for task, value in loss.items())
    return f"{loss:.3f}"


def sft_curve_table(run_dir: Path, chunks: int = 5) -> str:
    """The SFT loss curves of 02 and 03 (their train_log.jsonl): mean training loss over each fifth
    of the run, and every validation loss with its step."""
    lines = []
    for folder in SFT_FOLDERS:
        rows = train_log(run_dir, folder)
        if not rows:
            continue
        n = min(chunks, len(rows))
        bounds = [round(i * len(rows) / n) for i in range(n + 1)]
        means = [sum(r["loss"] for r in rows[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]
        evals = ", ".join(f"{eval_loss_text(r['eval_loss'])} ({r['step']})" for r in rows if "eval_loss" in r) or "-"
        lines.append(f"| `{folder}/` | {rows[-1]['step']} | {', '.join(f'{m:.3f}' for m in means)} | {evals} |")
    if not lines:
        return ""
    return "\n".join([f"| model | steps | mean training loss, by {chunks} equal parts of the run | validation loss (step) |",
                      "|---|---|---|---|"] + lines)


def by_turn(values: list[float]) -> str:
    """[0.125, 0.25] -> "0.12, 0.25" (hit@10 by turn in every RL table)."""
    return ", ".join(f"{v:.2f}" for v in values)


def rl_curve_table(run_dir: Path, chunks: int = 4) -> str:
    """Per-step training statistics of each RL run in `run_dir` (sampled episodes, so noisy), their
    means over `chunks` equal parts of the run, and the greedy validations."""
    parts = []
    for folder in RL_FOLDERS:
        if (run_dir / folder).is_symlink():  # another run directory's adapter: its own curves are there
            continue
        logged = train_log(run_dir, folder)
        rows = [r for r in logged if r["step"] > 0]  # step 0: the SFT start's validation only
        if not rows:
            continue
        config = json.loads((run_dir / folder / "rl_config.json").read_text())["args"] if (
            run_dir / folder / "rl_config.json").exists() else {}
        head = (f"`{folder}/` ({config.get('prompts', '?')} prompt x G {config.get('group_size', '?')} x "
                f"T {config.get('turns', '?')} per step, lr {config.get('lr', '?')}, w_pref {config.get('w_preference', '?')}"
                + (f", w_fmt {config['w_format']}" if config.get("w_format", 1.0) != 1.0 else "") + "); "
                f"training episodes (sampled at temperature {config.get('temperature', '?')}):")
        recall = all("retriever_hit@10" in r for r in rows)  # logged since 2026-11-26
        lines = ["| step | reward | format | recommend | preference | return | hit@10 by turn | "
                 + ("retriever's own top 10 by turn | target among the K by turn | " if recall else "")
                 + "KL | entropy | zero-var groups | s gen / train |", "|" + "---|" * (11 + 2 * recall)]
        for r in rows:
            hits = by_turn(r["hit@10"]) + (f" | {by_turn(r['retriever_hit@10'])} | {by_turn(r['target_in_candidates'])}"
                                           if recall else "")
            lines.append(f"| {r['step']} | {r['reward']:.3f} | {r['format']:.2f} | {r['recommend']:.3f} | "
                         f"{r['preference']:.3f} | {r['return']:.3f} | {hits} | {r['kl']:.4f} | {r['entropy']:.2f} | "
                         f"{r['zero_variance_fraction']:.2f} | {r['seconds_generating']:.0f} / {r['seconds_training']:.0f} |")
        half = len(rows) // 2
        if half:
            first = sum(r["reward"] for r in rows[:half]) / half
            second = sum(r["reward"] for r in rows[half:]) / (len(rows) - half)
            lines.append(f"\nMean reward, first {half} steps {first:.3f}, last {len(rows) - half} steps {second:.3f}.")
        if recall and len(rows) >= 2 * chunks:  # one start state a step is noisy: means over parts of the run
            lines += [f"\nThe same steps in {chunks} equal parts (means; hit@10 at turn T = {len(rows[0]['hit@10'])}):\n",
                      "| steps | reward | format | recommend | hit@10 | retriever's own top 10 | target among the K |",
                      "|" + "---|" * 7]
            bounds = [round(i * len(rows) / chunks) for i in range(chunks + 1)]
            for a, b in zip(bounds, bounds[1:]):
                mean = lambda key: sum(key(r) for r in rows[a:b]) / (b - a)  # noqa: E731
                lines.append(f"| {rows[a]['step']}-{rows[b - 1]['step']} | {mean(lambda r: r['reward']):.3f} | "
                             f"{mean(lambda r: r['format']):.2f} | {mean(lambda r: r['recommend']):.3f} | "
                             f"{mean(lambda r: r['hit@10'][-1]):.2f} | {mean(lambda r: r['retriever_hit@10'][-1]):.2f} | "
                             f"{mean(lambda r: r['target_in_candidates'][-1]):.2f} |")
        # greedy episodes: held-out states ("valid"), and the training pool itself ("pool", --train-pool)
        for key, what in (("valid", "held-out start states"), ("pool", "start states of the training pool")):
            validated = [r for r in logged if key in r]
            if not validated:
                continue
            order = all("retriever_hit@10" in r[key] for r in validated)  # logged since 2026-11-26
            lines += [f"\nGreedy {'validation' if key == 'valid' else 'episodes'} ({validated[-1][key]['episodes']} "
                      f"{what}; step 0 = the SFT adapter):\n",
                      "| after step | reward | parse rate | recommend | preference | hit@10 by turn |"
                      + (" retriever's own top 10 by turn | target among the K by turn |" if order else ""),
                      "|" + "---|" * (6 + 2 * order)]
            lines += [f"| {r['step']} | {r[key]['reward']:.3f} | {r[key]['parse_rate']:.2f} | "
                      f"{r[key]['recommend']:.3f} | {r[key]['preference']:.3f} | {by_turn(r[key]['hit@10'])} |"
                      + (f" {by_turn(r[key]['retriever_hit@10'])} | {by_turn(r[key]['target_in_candidates'])} |"
                         if order else "") for r in validated]
        parts.append(head + "\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def rl_compare_table(run_dirs: list[Path]) -> str:
    """One row per greedy validation of each run's recommender_rl/ (step 0 = the SFT start), with the
    run's settings and its sampled training turns (mean format and reward over each half of the steps)."""
    lines = ["| run | temperature | steps x start states x G x T | lr | sampled turns valid, 1st / 2nd half | "
             "mean reward, 1st / 2nd half | validated after step | parse rate | recommend | hit@10 by turn |",
             "|" + "---|" * 10]
    for run_dir in run_dirs:
        logged = train_log(run_dir, "recommender_rl")
        if not logged:
            raise SystemExit(f"--compare-rl: no {run_dir}/recommender_rl/train_log.jsonl")
        config_path = run_dir / "recommender_rl" / "rl_config.json"
        c = json.loads(config_path.read_text())["args"] if config_path.exists() else {}
        trained = [r for r in logged if r["step"] > 0]
        half = max(len(trained) // 2, 1)

        def halves(key: str) -> str:
            parts = [trained[:half], trained[half:]]
            return " / ".join(f"{sum(r[key] for r in p) / len(p):.2f}" for p in parts if p)

        settings = (f"| `{run_dir.name}` | {c.get('temperature', '?')} | {c.get('steps', len(trained))} x "
                    f"{c.get('prompts', '?')} x {c.get('group_size', '?')} x {c.get('turns', '?')} | {c.get('lr', '?')} | "
                    f"{halves('format')} | {halves('reward')} |")
        for n, r in enumerate(r for r in logged if "valid" in r):
            v = r["valid"]
            lines.append((settings if n == 0 else "| | | | | | |") + f" {r['step']} | {v['parse_rate']:.2f} | "
                         f"{v['recommend']:.3f} | {by_turn(v['hit@10'])} |")
    return "\n".join(lines)


def own_rl_folders(run_dir: Path) -> list[str]:
    """The RL_FOLDERS that 04 wrote in run_dir itself: a folder linked from another run directory
    (e.g. the RL adapter beside its ablation) is listed under that run."""
    return [f for f in RL_FOLDERS if (run_dir / f / "rl_config.json").exists() and not (run_dir / f).is_symlink()]


def start_states_block(run_dirs: list[Path]) -> str:
    """04 runs that differ in --start-states: one summary row per RL folder (recommender_rl, and the
    ablation's as `run/recommender_rl_no_preference`; means over the training steps, sampled
    episodes), then each run directory's per-step curves (rl_curve_table)."""
    lines = ["| run | start states (kept of all) | steps x start states x G x T | target among the K at turn 1 | "
             "recommend | zero-var groups | training hit@10 at turn T, 1st / 2nd half | the retriever's own order's, "
             "1st / 2nd half | reward, 1st / 2nd half | validation states (drawn of kept) | greedy validation hit@10 at "
             "turn T, SFT start / last (the retriever's own order's) | parse rate, SFT start / last |", "|" + "---|" * 12]
    curves = []
    for run_dir in run_dirs:
        folders = own_rl_folders(run_dir)
        if not folders:
            raise SystemExit(f"no {run_dir}/recommender_rl*/rl_config.json (04_rl_multiturn.py did not run there)")
        curves.append(f"`{run_dir.name}/`, " + rl_curve_table(run_dir))  # every folder of the run directory
        for folder in folders:
            config = json.loads((run_dir / folder / "rl_config.json").read_text())
            c, states = config["args"], config.get("start_states", {"rule": "all", "kept": "?", "of": "?"})
            logged = train_log(run_dir, folder)
            trained = [r for r in logged if r["step"] > 0]
            half = max(len(trained) // 2, 1)
            mean = lambda rows, key: sum(key(r) for r in rows) / len(rows)  # noqa: E731
            halves = lambda key: " / ".join(f"{mean(p, key):.2f}" for p in (trained[:half], trained[half:]) if p)  # noqa: E731
            # 04 writes rl_config.json at the start since 2026-11-27: a run stopped early shows how far it got
            steps = c["steps"] if config.get("finished", True) else f"{trained[-1]['step'] if trained else 0} (of {c['steps']})"
            # the greedy columns: held-out states, or the training pool's own when none were drawn (--train-pool)
            greedy = "valid" if any("valid" in r for r in logged) or not any("pool" in r for r in logged) else "pool"
            valid = [r[greedy] for r in logged if greedy in r]
            held_out = config.get("eval_states", {"rule": "all"})  # --eval-states, since 2026-11-27
            drawn = f"{held_out['rule']} ({valid[-1]['episodes'] if valid else 0}" + (
                f" of {held_out['kept']})" if "kept" in held_out else ")")
            if greedy == "pool":
                drawn = f"none; the training pool ({valid[-1]['episodes']})"
            elif not valid:  # --eval-samples 0: no greedy episodes at all
                drawn = "none"
            # the SFT start is validated as step 0 unless 04 ran with --no-eval-start
            start = next((r[greedy] for r in logged if r["step"] == 0 and greedy in r), None)
            at_start = lambda key: "n/a" if start is None else f"{key(start):.2f}"  # noqa: E731
            order = f" ({at_start(lambda v: v['retriever_hit@10'][-1])} / {valid[-1]['retriever_hit@10'][-1]:.2f})" if valid and all(
                "retriever_hit@10" in v for v in [valid[-1]] + ([start] if start else [])) else ""
            name = run_dir.name if folder == "recommender_rl" else f"{run_dir.name}/{folder}"
            lines.append(
                f"| `{name}` | {states['rule']} ({states['kept']} of {states['of']}"
                + (f"; a pool of {states['pool']}" if states.get("pool") else "") + f") | {steps} x {c['prompts']} x "
                f"{c['group_size']} x {c['turns']} | {mean(trained, lambda r: r['target_in_candidates'][0]):.2f} | "
                f"{mean(trained, lambda r: r['recommend']):.3f} | {mean(trained, lambda r: r['zero_variance_fraction']):.2f} | "
                f"{halves(lambda r: r['hit@10'][-1])} | {halves(lambda r: r['retriever_hit@10'][-1])} | "
                f"{halves(lambda r: r['reward'])} | {drawn} | "
                + (f"{at_start(lambda v: v['hit@10'][-1])} / {valid[-1]['hit@10'][-1]:.2f}{order} | "
                   f"{at_start(lambda v: v['parse_rate'])} / {valid[-1]['parse_rate']:.2f} |" if valid else "n/a | n/a |"))
    return "\n".join(lines) + "\n\n" + "\n\n".join(curves)


def sft_quality_table(run_dirs: list[Path]) -> str:
    """One row per run directory: its recommender_sft/ adapter, how it was trained, and 03's greedy
    answers on valid (parse rate with its 95% Wilson interval and, where counted, why the other
    answers fail; next to the untuned base model's)."""
    lines = ["| run | dataset | adapter | SFT answer tokens, median / p95 / max | decoding | valid samples | "
             "parse rate [95% CI] | `<answer>` block closed | mean answer tokens | base parse rate | "
             "R@10 re-ranked / retriever order | validation loss |", "|" + "---|" * 12]
    for run_dir in run_dirs:
        folder = run_dir / "recommender_sft"
        if not (folder / "quality.json").exists():
            raise SystemExit(f"--sft-quality: no {folder}/quality.json (run 03_sft_recommender.py)")
        q = json.loads((folder / "quality.json").read_text())
        config = json.loads((folder / "recommender_config.json").read_text())
        a, tuned = config["args"], q["tuned"]
        if a.get("init_adapter"):  # older runs did not have the flag
            adapter = (f"`{a['init_adapter']}`, report only" if a["steps"] == 0
                       else f"{a['steps']} steps from `{a['init_adapter']}`, seed {a['seed']}")
        else:
            adapter = f"{a['steps']} steps, seed {a['seed']}"
        if a.get("cite_candidates") and a["steps"]:
            adapter += ", titles cited by candidate number"
        if config.get("train_candidates", "").startswith("out of fold") and a["steps"]:  # 03 since 2026-11-26
            adapter += ", out-of-fold candidates"
        if a.get("inject_target") is False and a["steps"]:  # the default since 2026-11-27; earlier runs injected
            adapter += ", no injected targets"
        if config.get("prompt_version", 1) >= 2 and a["steps"]:  # common.REC_PROMPT_VERSION, since 2026-11-27
            adapter += ", bar-separated candidate lines"
        lengths = config.get("answer_tokens")  # older runs did not record them
        lengths = f"{lengths['median']} / {lengths['p95']} / {lengths['max']}" if lengths else "n/a"
        d = q["decoding"]
        decoding = f"greedy, {d['max_new_tokens']} tokens" + (
            f", no repeated {d['no_repeat_ngram']}-gram" if d.get("no_repeat_ngram") else "") + (
            ", constrained list" if d.get("constrain_answer") else "")
        # older reports have no interval: the count of valid answers gives it back
        low, high = tuned.get("parse_rate_ci") or common.wilson_interval(round(tuned["parse_rate"] * tuned["samples"]),
                                                                         tuned["samples"])
        # why the others fail, where 03 counted it (since 2026-11-27; an answer may fail in several ways)
        failed = ", ".join(f"{n} {kind}" for kind, n in tuned.get("parse_failures", {}).items() if n)
        lines.append(f"| `{run_dir.name}` | {a['dataset']} | {adapter} | {lengths} | {decoding} | {tuned['samples']} | "
                     f"{tuned['parse_rate']:.2f} [{low:.2f}, {high:.2f}]{f' (invalid: {failed})' if failed else ''} | "
                     f"{tuned['answer_tag_rate']:.2f} | "
                     f"{tuned['mean_completion_tokens']:.0f} | {q['base']['parse_rate']:.2f} | "
                     f"{tuned['reranked']['recall@10']:.3f} / {q['retriever_order']['recall@10']:.3f} | "
                     f"{q['eval_loss']:.3f} |")
    return "\n".join(lines)


def candidate_targets_table(run_dirs: list[Path]) -> str:
    """Per run directory: where a true target sits among the retriever's K candidates of training
    samples (ranked by the retriever that trained on them, then out of fold) and of valid samples,
    with the cross-fitted retrievers' validation Recall@K beside the full one's."""
    lines = ["| run | dataset | samples | K | candidates from | target ranked 1st | in the top 10 | among the K | "
             "valid Recall@K of the retriever(s) |", "|" + "---|" * 9]
    for run_dir in run_dirs:
        path = run_dir / "retriever" / "report.json"
        report = json.loads(path.read_text()) if path.exists() else {}
        if "candidate_targets" not in report:
            raise SystemExit(f"--candidate-targets: no candidate_targets in {path} (run 03_sft_recommender.py "
                             f"--parts retriever --run-dir {run_dir})")
        k = report["candidates"]
        full = report["variants"]["fused"]["valid"]["new"][f"recall@{k}"]
        folds = [f[f"valid_new_recall@{k}"] for f in report.get("cross_fitting", {}).get("per_fold", [])]
        recall = {"train, full retriever": f"{full:.3f}", "valid": f"{full:.3f}",
                  "train, out of fold": f"{min(folds):.3f} to {max(folds):.3f} ({len(folds)} folds)" if folds else ""}
        for where, p in report["candidate_targets"].items():
            split, source = where.split(", ") if ", " in where else (where, "full retriever")
            lines.append(f"| `{run_dir.name}` | {report['args']['dataset']} | {p['samples']} {split} | {k} | {source} | "
                         f"{p['first']:.2f} | {p['top10']:.2f} | {p['candidates']:.2f} | {recall[where]} |")
    return "\n".join(lines)


def sim_quality_table(folders: list[Path]) -> str:
    """One row per simulator folder: 02's quality report, tuned against the untuned base."""
    lines = ["| simulator | adapter | held-out samples | target hit rate, tuned / base | attribute F1, tuned / base | "
             "reply loss, tuned / base | replies copying the recommender's turn, tuned / base / real seekers |",
             "|" + "---|" * 7]
    for folder in folders:
        if not (folder / "quality.json").exists():
            raise SystemExit(f"--sim-quality: no {folder}/quality.json (run 02_sft_simulator.py)")
        q = json.loads((folder / "quality.json").read_text())
        a = json.loads((folder / "simulator_config.json").read_text())["args"]
        adapter = (f"`{a['init_adapter']}`, report only" if a.get("init_adapter") and a["steps"] == 0
                   else f"{a['steps']} steps of {a['batch_size']} x {a['grad_accum']}, task mix {a['task_mix']}")
        t, b = q["tuned"], q["base"]
        copies = (f"{t['reply_copy_rate']:.2f} / {b['reply_copy_rate']:.2f} / {q['real_seeker_copy_rate']:.2f}"
                  if "reply_copy_rate" in t else "n/a")  # reports before 2026-11-26 did not count them
        lines.append(f"| `{folder.parent.name}/{folder.name}` | {adapter} | {q['samples']} {q['split']} | "
                     f"{t['target_hit_rate']:.2f} / {b['target_hit_rate']:.2f} | {t['attribute_f1']:.3f} / "
                     f"{b['attribute_f1']:.3f} | {t['reply_loss']:.3f} / {b['reply_loss']:.3f} | {copies} |")
    return "\n".join(lines)


def eval_command(args: dict) -> str:
    """The 05_eval.py command line that wrote a results.json: its flags that differ from 05's defaults."""
    defaults = {f.name: f.default for f in fields(evaluate.Args)}
    flags = []
    # a flag added later, whose default differs from what older runs did, is written out for them
    for name, value in {**args, **{k: v for k, v in evaluate.BEFORE_FLAG.items() if k not in args}}.items():
        if name in defaults and name != "dataset" and value == defaults[name]:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list):
            flags.append(" ".join([flag, *map(str, value)]))
        else:
            flags.append(f"{flag} {value}")
    return "05_eval.py " + " ".join(flags)


def side_eval_block(run_dirs: list[Path]) -> str:
    """Each run directory's eval/results.md under the 05 commands that wrote it (one per `--merge` process,
    earliest first), with its seconds per row."""
    parts = []
    for run_dir in run_dirs:
        path = run_dir / "eval" / "results.json"
        if not path.exists():
            raise SystemExit(f"--side-eval: no {path} (run 05_eval.py --run-dir {run_dir})")
        results = json.loads(path.read_text())
        seconds = ", ".join(f"{name} {r['seconds'] / 60:.1f} min" for name, r in results["multi_turn"].items())
        stamp = datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()
        commands = " then ".join(f"`{eval_command(a)}`" for a in results.get("merged_args", []) + [results["args"]])
        parts.append(f"{commands} ({stamp}; {seconds or 'single-shot rows only'}):\n\n"
                     + (path.parent / "results.md").read_text().strip())
        parts += [f"What the feedback did to the retriever's query ({p.stem.split('_', 2)[2]}), by "
                  + p.read_text().strip() for p in sorted(path.parent.glob("feedback_effect_*.md"))]
        for gains in sorted(path.parent.glob("paired_gains*.md")):
            reference = gains.stem.partition("_vs_")[2]
            parts.append(f"By `python tools/paired_gains.py --run-dir {run_dir}"
                         + (f" --reference {reference}" if reference else "") + "`: " + gains.read_text().strip())
    return "\n\n".join(parts)


def dataset_block(results: Path, command: str, stamp: str) -> tuple[str, str]:
    meta = json.loads(results.read_text())
    run_dir = results.parents[1]
    table = (results.parent / "results.md").read_text().strip()
    extra = ""
    retriever_report = run_dir / "retriever" / "report.json"
    if retriever_report.exists():
        rep = json.loads(retriever_report.read_text())
        k = rep["candidates"]
        extra = f"\n\nRetriever Recall@{k} (the candidate set the recommender re-ranks), new targets: " + ", ".join(
            f"{v} valid {r['valid']['new'][f'recall@{k}']:.3f} / test {r['test']['new'][f'recall@{k}']:.3f}"
            for v, r in rep["variants"].items())
    sft = sft_curve_table(run_dir)
    if sft:
        extra += f"\n\nSFT loss curves ({meta['dataset']}, `02_sft_simulator.py` and `03_sft_recommender.py`):\n\n{sft}"
    curves = rl_curve_table(run_dir)
    if curves:
        extra += f"\n\nRL training curves ({meta['dataset']}, `04_rl_multiturn.py`):\n\n{curves}"
    return meta["dataset"], f"#### {meta['dataset']}\n\nProduced by `{command}` on {stamp}.\n\n{table}{extra}"


def bench_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """The (ours, TRL) pairs of rl_step_vs_trl.jsonl, in file order (each run appends ours, then TRL)."""
    return [(a, b) for a, b in zip(rows, rows[1:]) if a["impl"] == "ours" and b["impl"] == "trl"
            and a["date"] == b["date"] and a["settings"] == b["settings"]]


def bench_paragraph(ours: dict, trl: dict) -> str:
    s = ours["settings"]
    out = ["`python bench/rl_step_vs_trl.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in s.items() if k in ("model", "device", "threads", "prompts", "group_size",
                                                                  "prompt_tokens", "completion_tokens", "micro_batch",
                                                                  "repeats")) + (" --load-in-4bit" if s["load_in_4bit"] else "")
           + (f" --rounds {s['rounds']}" if s.get("rounds", 1) > 1 else "") + "`"
           f" on {ours['date']} ({ours['machine']}{'; ' + ours['label'] if ours.get('label') else ''}): "
           f"{s['prompts']} prompts x G {s['group_size']}, {s['prompt_tokens']} prompt + {s['completion_tokens']} "
           f"completion tokens, LoRA r {s['lora_r']}, micro-batch {s['micro_batch']}, KL {s['kl_coef']}, "
           f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}{', nf4' if s['load_in_4bit'] else ''}; "
           + (f"{s['rounds']} rounds, ours then TRL, each side in a fresh process per round; medians of all "
              f"{s['rounds']} x {s['repeats']} timed steps" if s.get("rounds", 1) > 1 else f"medians of {s['repeats']} steps")
           + f" after {s['warmup']} warm-up step(s) per process.", "", bench.comparison_table(ours, trl)]
    if ours.get("rounds") and len(ours["rounds"]) > 1:
        out += ["", bench.round_ratios(ours, trl) + "."]
    if ours.get("peak_memory_by_phase_gib"):
        out += ["", "Peak GPU memory by phase (GiB; generate = `generate` with its KV cache, train = scoring, "
                "backward and optimizer step, other = the rest: loading the model, and for TRL the end of the run): " + "; ".join(
                    f"{name} " + ", ".join(f"{k} {v:.2f}" for k, v in r["peak_memory_by_phase_gib"].items())
                    for name, r in (("ours", ours), ("TRL", trl))) + "."]
    return "\n".join(out)


def bench_block(path: Path = ROOT / "bench" / "results" / "rl_step_vs_trl.jsonl") -> str | None:
    """The latest pair on a CPU and on CUDA, then every CUDA pair in order (the code changed between them)."""
    if not path.exists():
        return None
    pairs = bench_pairs([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    latest = {}
    for ours, trl in pairs:
        latest["cuda" if ours["settings"]["device"].startswith("cuda") else "cpu"] = (ours, trl)
    if not latest:
        return None
    parts = [bench_paragraph(*latest[d]) for d in ("cpu", "cuda") if d in latest]
    cuda = [(o, t) for o, t in pairs if o["settings"]["device"].startswith("cuda")]
    if len(cuda) > 1:
        rows = ["| date | label | ours s/step | TRL s/step | ratio | ours peak GiB | TRL peak GiB | ratio |",
                "|---|---|---|---|---|---|---|---|"]
        rows += [f"| {o['date']} | {o.get('label', '')} | {o['step_s']:.1f} | {t['step_s']:.1f} | "
                 f"{o['step_s'] / t['step_s']:.2f} | {o['peak_memory_gib']:.2f} | {t['peak_memory_gib']:.2f} | "
                 f"{o['peak_memory_gib'] / t['peak_memory_gib']:.2f} |" for o, t in cuda]
        parts.append("Every CUDA run in `bench/results/rl_step_vs_trl.jsonl`, in order:\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


def lora_step_block(path: Path = ROOT / "bench" / "results" / "lora_step.jsonl") -> str | None:
    """Every line of bench/results/lora_step.jsonl (bench/lora_step.py) as a table row."""
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = ["| date | device | model | base parameters | step (micro-batches x rows x tokens) | seconds/step | tokens/s | "
           "weights GiB | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["settings"]
        # the first lines (2026-11-26) counted after LoRA was added, as "parameters"
        base = r["base_parameters"] if "base_parameters" in r else r["parameters"] - r["lora_parameters"]
        weights = "n/a" if r["weights_gib"] != r["weights_gib"] else f"{r['weights_gib']:.2f}"  # NaN on a CPU
        out.append(f"| {r['date']} | {r['device']} | {r['label'] or s['model']} | {base / 1e6:.0f}M | "
                   f"{s['grad_accum']} x {s['batch_size']} x {s['seq_len']} | {r['step_s']:.2f} | "
                   f"{r['tokens_per_s']:.0f} | {weights} | {r['peak_memory_gib']:.2f} |")
    return "\n".join(out)


def block_pattern(name: str) -> re.Pattern:
    """Block `name` of the README: group 1 its start marker, group 2 its body (may be empty), group 3 its end marker."""
    return re.compile(rf"(<!-- {name}:start -->\n)(.*?\n)?(<!-- {name}:end -->)", re.S)


def merge_rows(text: str, name: str, table: str) -> str:
    """The table of block `name` with `table`'s rows merged in by their first cell (the run): the rows
    of a run in `table` replace that run's rows in the block, in place, or are appended; rows of runs
    not in `table` stay as the tool wrote them earlier, so a block keeps the figures of run directories
    since deleted. A run may have several rows (candidate_targets: one per split)."""
    found = block_pattern(name).search(text)
    old_rows = [line for line in ((found.group(2) or "") if found else "").splitlines()[2:] if line.startswith("| ")]
    header, new_rows = table.split("\n")[:2], table.split("\n")[2:]
    run = lambda row: row.split(" | ")[0]  # noqa: E731
    new_by_run: dict[str, list[str]] = {}
    for row in new_rows:
        new_by_run.setdefault(run(row), []).append(row)
    rows, placed = [], set()
    for row in old_rows:
        if run(row) not in new_by_run:
            rows.append(row)
        elif run(row) not in placed:  # the run's first old row: all its new rows go here
            rows += new_by_run[run(row)]
            placed.add(run(row))
    rows += [r for name, group in new_by_run.items() if name not in placed for r in group]
    return "\n".join(header + rows)


def replace_between(text: str, name: str, body: str) -> str:
    pattern = block_pattern(name)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:start --> / <!-- {name}:end --> markers")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=str(ROOT / "runs"), help="folder holding one run directory per dataset")
    parser.add_argument("--datasets", nargs="*", default=None, help="only these datasets (default: all found)")
    parser.add_argument("--command", default="bash run_all.sh", help="the command that produced the runs")
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="the file to update")
    parser.add_argument("--compare-rl", nargs="*", default=None,
                        help="run directories whose recommender_rl/ to set side by side in the rl_compare block")
    parser.add_argument("--sft-quality", nargs="*", default=None,
                        help="run directories whose recommender_sft/quality.json to list in the sft_quality block "
                             "(rows of other runs already there are kept)")
    parser.add_argument("--sim-quality", nargs="*", default=None,
                        help="simulator folders (e.g. runs/inspired/simulator) whose quality.json to list in the sim_quality block "
                             "(rows of other folders already there are kept)")
    parser.add_argument("--side-eval", nargs="*", default=None,
                        help="run directories whose eval/results.md (05_eval.py) to copy into the side_eval block")
    parser.add_argument("--rl-eval", nargs="*", default=None,
                        help="run directories whose eval/results.md (05_eval.py, SMTPO against SFT) to copy into the rl_eval block")
    parser.add_argument("--final-eval", nargs="*", default=None,
                        help="run directories whose eval/results.md (05_eval.py, the latest adapters) to copy into the rl_final block")
    parser.add_argument("--reachable-eval", nargs="*", default=None,
                        help="run directories whose eval/results.md (05_eval.py --test-states reachable) to copy into "
                             "the rl_reachable_eval block")
    parser.add_argument("--cited-eval", nargs="*", default=None,
                        help="run directories whose eval/results.md (05_eval.py with adapters of 03 --cite-candidates) to "
                             "copy into the rl_cited_eval block")
    parser.add_argument("--candidate-targets", nargs="*", default=None,
                        help="run directories whose retriever/report.json to list in the candidate_targets block "
                             "(rows of other runs already there are kept)")
    parser.add_argument("--start-states-rl", nargs="*", default=None,
                        help="run directories whose recommender_rl/ (04 with --start-states all or reachable) to set "
                             "side by side in the rl_start_states block")
    parser.add_argument("--reachable-rl", nargs="*", default=None,
                        help="run directories whose recommender_rl/ (04 with --start-states and --eval-states reachable) "
                             "to list, with their curves, in the rl_reachable block")
    parser.add_argument("--pool-rl", nargs="*", default=None,
                        help="run directories whose recommender_rl/ (04 with --train-pool) to list, with their curves "
                             "and the pool's greedy episodes, in the rl_pool block")
    parser.add_argument("--cited-rl", nargs="*", default=None,
                        help="run directories whose recommender_rl/ (04 from an SFT adapter of 03 --cite-candidates) to "
                             "list, with their curves, in the rl_cited block")
    args = parser.parse_args(argv)
    # only runs/<dataset>/: a side run directory (e.g. runs/inspired_sft100) must not replace its dataset's block
    found = [p for p in sorted(Path(args.runs).glob("*/eval/results.json"))
             if p.parents[1].name == json.loads(p.read_text())["dataset"]]
    # the date 05 wrote the results, not today's: re-running the tool must not re-date old runs
    new = dict(dataset_block(p, args.command, datetime.date.fromtimestamp(p.stat().st_mtime).isoformat()) for p in found
               if args.datasets is None or p.parents[1].name in args.datasets)
    readme = Path(args.readme)
    text = readme.read_text()
    current = re.search(r"<!-- results:start -->\n(.*?)\n<!-- results:end -->", text, re.S)
    old_body = current.group(1) if current else ""
    # the blocks already there: a common "Produced by" line (older layout) goes into each kept block
    header, *old_blocks = re.split(r"(?m)^(?=#### )", old_body)
    blocks = {}
    for b in old_blocks:
        name = b.split("\n", 1)[0][5:].strip()
        if "Produced by" not in b and header.strip():
            b = b.replace("\n\n", "\n\n" + header.strip() + "\n\n", 1)
        blocks[name] = b.strip()
    blocks.update(new)
    if not blocks:
        raise SystemExit(f"no {args.runs}/*/eval/results.json found: run 05_eval.py first")
    text = replace_between(text, "results", "\n\n".join(blocks[k] for k in sorted(blocks)))
    bench_table, lora_table = bench_block(), lora_step_block()
    if bench_table:
        text = replace_between(text, "bench", bench_table)
    if lora_table:
        text = replace_between(text, "lora_step", lora_table)
    if args.compare_rl:
        sweeps = [f"Sampled first-turn answers of `{p.parent.name}/recommender_sft/` by temperature: "
                  + p.read_text().strip() for p in sorted(Path(args.runs).glob("*/rollout_temperature.md"))]
        text = replace_between(text, "rl_compare", "\n\n".join(
            [rl_compare_table([Path(d) for d in args.compare_rl])] + sweeps))
    if args.sft_quality:
        text = replace_between(text, "sft_quality", merge_rows(
            text, "sft_quality", sft_quality_table([Path(d) for d in args.sft_quality])))
    if args.sim_quality:
        text = replace_between(text, "sim_quality", merge_rows(
            text, "sim_quality", sim_quality_table([Path(d) for d in args.sim_quality])))
    if args.side_eval:
        text = replace_between(text, "side_eval", side_eval_block([Path(d) for d in args.side_eval]))
    for dirs, block in ((args.rl_eval, "rl_eval"), (args.final_eval, "rl_final"), (args.reachable_eval, "rl_reachable_eval"),
                        (args.cited_eval, "rl_cited_eval")):
        if dirs:
            text = replace_between(text, block, side_eval_block([Path(d) for d in dirs]))
    if args.candidate_targets:
        text = replace_between(text, "candidate_targets", merge_rows(
            text, "candidate_targets", candidate_targets_table([Path(d) for d in args.candidate_targets])))
    for dirs, block in ((args.start_states_rl, "rl_start_states"), (args.reachable_rl, "rl_reachable"),
                        (args.pool_rl, "rl_pool"), (args.cited_rl, "rl_cited")):
        if dirs:
            text = replace_between(text, block, start_states_block([Path(d) for d in dirs]))
    readme.write_text(text)
    print(f"updated {readme}: results of {sorted(new)} (kept {sorted(set(blocks) - set(new))})"
          + (", benchmark table" if bench_table else "") + (", LoRA step table" if lora_table else ""))


if __name__ == "__main__":
    main()
