"""tools/update_readme_results.py replaces only the datasets it finds and keeps the others."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("update_readme_results", ROOT / "tools" / "update_readme_results.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def test_new_dataset_block_replaces_its_own_and_keeps_the_others(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nProduced by `old` on 2026-01-01.\n\n#### inspired\n\nold inspired"
                      "\n\n#### redial\n\nold redial table\n<!-- results:end -->\n<!-- bench:start -->\n<!-- bench:end -->\n"
                      "<!-- lora_step:start -->\n<!-- lora_step:end -->\n")
    eval_dir = tmp_path / "runs" / "inspired" / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "results.json").write_text(json.dumps({"dataset": "inspired"}))
    (eval_dir / "results.md").write_text("| new inspired table |")
    rl = tmp_path / "runs" / "inspired" / "recommender_rl"
    rl.mkdir()
    step = {"reward": 1.0, "format": 1.0, "recommend": 0.0, "preference": 0.0, "return": 1.9, "hit@10": [0.0, 0.25],
            "kl": 0.0, "entropy": 1.0, "zero_variance_fraction": 0.5, "seconds_generating": 10, "seconds_training": 5}
    valid = {"reward": 0.3, "format": 0.3, "recommend": 0.0, "preference": 0.0, "hit@1": [0.0, 0.0],
             "hit@10": [0.1, 0.2], "episodes": 16, "parse_rate": 0.3}
    rows = [{"step": 0, "valid": valid, "seconds_validating": 9.0}] + [
        {"step": i + 1, **step, "reward": r} for i, r in enumerate([0.5, 0.7])]
    rows[-1]["valid"] = {**valid, "parse_rate": 0.6, "hit@10": [0.25, 0.5]}
    (rl / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    sft = tmp_path / "runs" / "inspired" / "recommender_sft"
    sft.mkdir()
    (sft / "train_log.jsonl").write_text("\n".join(json.dumps({"step": i + 1, "loss": loss, **(
        {"eval_loss": 0.25} if i == 9 else {})}) for i, loss in enumerate([1.0, 0.8] + [0.5] * 8)))
    sim = tmp_path / "runs" / "inspired" / "simulator"
    sim.mkdir()
    (sim / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "eval_loss": {"feedback": 3.2, "target": 1.5}}))
    side = tmp_path / "runs" / "inspired_side_run" / "eval"  # not runs/<dataset>/: ignored
    side.mkdir(parents=True)
    (side / "results.json").write_text(json.dumps({"dataset": "inspired"}))
    (side / "results.md").write_text("| side run table |")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--command", "new cmd"])
    text = readme.read_text()
    assert "side run table" not in text
    assert "old inspired" not in text and "| new inspired table |" in text and "Produced by `new cmd`" in text
    # the kept block carries the old common "Produced by" line
    redial = text[text.index("#### redial"):]
    assert "Produced by `old` on 2026-01-01." in redial and "old redial table" in redial
    assert "| `recommender_sft/` | 10 | 0.900, 0.500, 0.500, 0.500, 0.500 | 0.250 (10) |" in text
    assert "| `simulator/` | 1 | 3.000 | feedback 3.200 / target 1.500 (1) |" in text
    assert "| 2 | 0.700 |" in text and "first 1 steps 0.500, last 1 steps 0.700" in text
    # the validation curve: the SFT start (step 0), then each validated step
    assert "| 0 | 0.300 | 0.30 | 0.000 | 0.000 | 0.10, 0.20 |" in text
    assert "| 2 | 0.300 | 0.60 | 0.000 | 0.000 | 0.25, 0.50 |" in text


def test_bench_block_shows_the_latest_pair_per_device_and_the_cuda_history(tmp_path):
    settings = {"model": "m", "device": "cpu", "threads": 1, "prompts": 2, "group_size": 4, "prompt_tokens": 8,
                "completion_tokens": 4, "micro_batch": 2, "repeats": 3, "warmup": 1, "lora_r": 16, "kl_coef": 0.02,
                "gradient_checkpointing": True, "load_in_4bit": False}

    def side(impl, date, device, step, peak, label=""):
        return {"impl": impl, "date": date, "label": label, "machine": device.upper(),
                "settings": {**settings, "device": device, "load_in_4bit": device == "cuda"},
                "step_s": step, "generate_s": step / 2, "train_s": step / 2, "generated_tokens_per_s": 10.0,
                "peak_memory_gib": peak, **({"peak_memory_by_phase_gib": {"generate": peak, "train": 1.0}}
                                             if device == "cuda" else {})}

    rows = [side("ours", "d1", "cpu", 9.0, 3.0), side("trl", "d1", "cpu", 10.0, 4.0),
            side("ours", "d2", "cuda", 20.0, 7.5, "before"), side("trl", "d2", "cuda", 25.0, 5.0, "before"),
            side("ours", "d3", "cuda", 21.0, 5.3, "after"), side("trl", "d3", "cuda", 20.0, 5.0, "after"),
            side("ours", "d4", "cuda", 1.0, 1.0)]  # an unfinished pair (TRL side missing): left out
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    block = tool.bench_block(path)
    cpu_at, cuda_at = block.index("on d1 (CPU"), block.index("on d3 (CUDA; after)")
    assert cpu_at < cuda_at and "on d2 (" not in block and "d4" not in block
    assert "| ours / TRL | 0.90 |" in block and "| ours / TRL | 1.05 |" in block  # 9/10 on the CPU, 21/20 on CUDA
    assert "ours generate 5.30, train 1.00; TRL generate 5.00, train 1.00" in block
    assert "| d2 | before | 20.0 | 25.0 | 0.80 | 7.50 | 5.00 | 1.50 |" in block
    assert "| d3 | after | 21.0 | 20.0 | 1.05 | 5.30 | 5.00 | 1.06 |" in block


def test_bench_paragraph_of_several_rounds_gives_each_rounds_ratio():
    settings = {"model": "m", "device": "cuda", "threads": 1, "prompts": 4, "group_size": 8, "prompt_tokens": 512,
                "completion_tokens": 256, "micro_batch": 8, "repeats": 2, "rounds": 2, "warmup": 1, "lora_r": 16,
                "kl_coef": 0.02, "gradient_checkpointing": True, "load_in_4bit": True}

    def side(impl, steps, peaks):
        return {"impl": impl, "date": "d", "label": "", "machine": "GPU", "settings": settings, "step_s": 10.0,
                "generate_s": 8.0, "train_s": 2.0, "generated_tokens_per_s": 10.0, "peak_memory_gib": max(peaks),
                "rounds": [{"step_s": t, "generate_s": t - 2, "peak_memory_gib": p} for t, p in zip(steps, peaks)]}

    text = tool.bench_paragraph(side("ours", [8.0, 9.0], [4.5, 4.6]), side("trl", [10.0, 10.0], [5.0, 5.0]))
    assert "--repeats 2 --load-in-4bit --rounds 2`" in text
    assert "2 rounds, ours then TRL" in text and "medians of all 2 x 2 timed steps" in text
    assert "ours / TRL by round (step time, peak memory): 0.80, 0.90; 0.90, 0.92." in text


def test_lora_step_block_counts_base_parameters_in_old_and_new_lines(tmp_path):
    settings = {"model": "m", "grad_accum": 2, "batch_size": 2, "seq_len": 1280}
    common = {"date": "d", "device": "GPU", "label": "", "settings": settings, "lora_parameters": 18_000_000,
              "step_s": 1.04, "tokens_per_s": 4900.0, "weights_gib": 1.5, "peak_memory_gib": 6.65}
    path = tmp_path / "lora_step.jsonl"
    path.write_text(json.dumps({**common, "parameters": 1_018_000_000}) + "\n"  # old line: counted with LoRA
                    + json.dumps({**common, "base_parameters": 1_000_000_000}))
    lines = tool.lora_step_block(path).splitlines()
    assert lines[2] == lines[3] == "| d | GPU | m | 1000M | 2 x 2 x 1280 | 1.04 | 4900 | 1.50 | 6.65 |"


def test_rl_compare_block_sets_runs_side_by_side(tmp_path):
    def rl_run(name, temperature, formats):
        folder = tmp_path / name / "recommender_rl"
        folder.mkdir(parents=True)
        valid = {"reward": 0.3, "format": 0.3, "recommend": 0.01, "preference": 0.0, "hit@1": [0.0, 0.0],
                 "hit@10": [0.125, 0.25], "episodes": 16, "parse_rate": 0.3}
        rows = [{"step": 0, "valid": valid, "seconds_validating": 1.0}]
        rows += [{"step": i + 1, "format": f, "reward": f + 0.5} for i, f in enumerate(formats)]
        rows[-1]["valid"] = {**valid, "parse_rate": 0.75}
        (folder / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (folder / "rl_config.json").write_text(json.dumps({"args": {
            "temperature": temperature, "steps": len(formats), "prompts": 1, "group_size": 4, "turns": 2, "lr": 1e-4}}))
        return str(tmp_path / name)

    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n#### inspired\n\nkept\n<!-- results:end -->\n<!-- rl_compare:start -->\n"
                      "<!-- rl_compare:end -->\n<!-- bench:start -->\n<!-- bench:end -->\n<!-- lora_step:start -->\n<!-- lora_step:end -->\n")
    (tmp_path / "runs" / "inspired").mkdir(parents=True)
    (tmp_path / "runs" / "inspired" / "rollout_temperature.md").write_text("`cmd`\n\n| temperature |\n|---|\n| 0.7 |\n")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme),
               "--compare-rl", rl_run("hot", 1.0, [0.0, 0.5]), rl_run("cool", 0.7, [0.5, 1.0, 1.0, 0.5])])
    text = readme.read_text()
    assert "| `hot` | 1.0 | 2 x 1 x 4 x 2 | 0.0001 | 0.00 / 0.50 | 0.50 / 1.00 | 0 | 0.30 | 0.010 | 0.12, 0.25 |" in text
    assert "| | | | | | | 2 | 0.75 | 0.010 | 0.12, 0.25 |" in text
    assert "| `cool` | 0.7 | 4 x 1 x 4 x 2 | 0.0001 | 0.75 / 0.75 | 1.25 / 1.25 | 0 | 0.30 |" in text
    assert "kept" in text
    assert "Sampled first-turn answers of `inspired/recommender_sft/` by temperature: `cmd`\n\n| temperature |" in text


def test_sft_quality_block_lists_each_adapter_report(tmp_path):
    def sft_run(name, args, tuned, answer_tokens=None):
        folder = tmp_path / name / "recommender_sft"
        folder.mkdir(parents=True)
        base = {"samples": tuned["samples"], "parse_rate": 0.0, "answer_tag_rate": 0.0}
        quality = {"decoding": {"greedy": True, "max_new_tokens": 288, "no_repeat_ngram": 10},
                   "retriever_order": {"recall@10": 0.1}, "tuned": tuned, "base": base, "eval_loss": 0.2812}
        config = {"args": {"dataset": "inspired", "seed": 0, **args}}
        if answer_tokens:
            config["answer_tokens"] = answer_tokens
        (folder / "quality.json").write_text(json.dumps(quality))
        (folder / "recommender_config.json").write_text(json.dumps(config))
        return str(tmp_path / name)

    tuned = {"samples": 24, "parse_rate": 21 / 24, "answer_tag_rate": 1.0, "mean_completion_tokens": 198.4,
             "reranked": {"recall@10": 0.1}}
    old = sft_run("old", {"steps": 40}, tuned)  # no init_adapter, no interval, no answer lengths
    failures = {"no closed <answer>": 0, "fewer than 10": 0, "more than 10": 0, "names no candidate": 4, "duplicate": 7}
    report = sft_run("report", {"steps": 0, "init_adapter": "runs/x/recommender_sft"},
                     {**tuned, "samples": 100, "parse_rate": 0.9, "parse_rate_ci": [0.8256, 0.9448],
                      "parse_failures": failures},
                     {"median": 199, "p95": 222, "max": 258})
    cited = sft_run("cited", {"steps": 30, "init_adapter": "runs/x/recommender_sft", "cite_candidates": True},
                    {**tuned, "samples": 100, "parse_rate": 0.9, "parse_rate_ci": [0.8256, 0.9448]})
    oof = sft_run("oof", {"steps": 40}, tuned)
    config = json.loads((tmp_path / "oof" / "recommender_sft" / "recommender_config.json").read_text())
    config["train_candidates"] = "out of fold (5 cross-fitted retrievers)"
    (tmp_path / "oof" / "recommender_sft" / "recommender_config.json").write_text(json.dumps(config))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n#### inspired\n\nkept\n<!-- results:end -->\n<!-- sft_quality:start -->\n"
                      "<!-- sft_quality:end -->\n<!-- bench:start -->\n<!-- bench:end -->\n<!-- lora_step:start -->\n"
                      "<!-- lora_step:end -->\n")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--sft-quality", old, report, cited, oof])
    text = readme.read_text()
    # 21 of 24: the interval is recomputed from the count (by hand in test_common.test_wilson_interval_by_hand)
    assert ("| `old` | inspired | 40 steps, seed 0 | n/a | greedy, 288 tokens, no repeated 10-gram | 24 | "
            "0.88 [0.69, 0.96] | 1.00 | 198 | 0.00 | 0.100 / 0.100 | 0.281 |") in text
    assert ("| `report` | inspired | `runs/x/recommender_sft`, report only | 199 / 222 / 258 | greedy, 288 tokens, "
            "no repeated 10-gram | 100 | 0.90 [0.83, 0.94] (invalid: 4 names no candidate, 7 duplicate) |") in text
    assert "| `cited` | inspired | 30 steps from `runs/x/recommender_sft`, seed 0, titles cited by candidate number |" in text
    assert "| `oof` | inspired | 40 steps, seed 0, out-of-fold candidates |" in text
    assert "kept" in text

    # a later call keeps the rows of runs it does not name (their folders may be gone) and replaces a named one
    rows_before = text.split("<!-- sft_quality:start -->\n")[1].split("<!-- sft_quality:end -->")[0].splitlines()
    for name in ("old", "report", "cited"):
        shutil.rmtree(tmp_path / name)
    quality_path = tmp_path / "oof" / "recommender_sft" / "quality.json"
    quality = json.loads(quality_path.read_text())
    quality["tuned"] = {**quality["tuned"], "parse_rate": 1.0, "parse_rate_ci": [0.86, 1.0]}
    quality_path.write_text(json.dumps(quality))
    longer = sft_run("longer", {"steps": 260, "init_adapter": "runs/x/recommender_sft"}, tuned)
    plain = sft_run("plain", {"steps": 60, "init_adapter": "runs/oof/recommender_sft", "inject_target": False}, tuned)
    config_path = tmp_path / "plain" / "recommender_sft" / "recommender_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prompt_version": 2}))
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--sft-quality", oof, longer, plain])
    rows = readme.read_text().split("<!-- sft_quality:start -->\n")[1].split("<!-- sft_quality:end -->")[0].splitlines()
    assert rows[:5] == rows_before[:5]  # header, old, report, cited: unchanged and in place
    assert rows[5].startswith("| `oof` |") and "| 1.00 [0.86, 1.00] |" in rows[5] and rows[5] != rows_before[5]
    assert rows[6].startswith("| `longer` | inspired | 260 steps from `runs/x/recommender_sft`, seed 0 |")
    assert rows[7].startswith("| `plain` | inspired | 60 steps from `runs/oof/recommender_sft`, seed 0, no injected targets, "
                              "bar-separated candidate lines |")
    assert len(rows) == 8


def test_side_eval_block_copies_each_table_under_its_command(tmp_path):
    run_dir = tmp_path / "inspired_feedback"
    (run_dir / "eval").mkdir(parents=True)
    args = {f.name: f.default for f in tool.fields(tool.evaluate.Args)}
    args.update(dataset="inspired", run_dir=str(run_dir), rows=["retriever+simulator"], limit=192, threads=1,
                exclude_seen=False)
    results = {"args": args, "multi_turn": {"retriever+simulator": {"seconds": 1512.0}}}
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))
    (run_dir / "eval" / "results.md").write_text("| system |\n|---|\n| retriever+simulator |\n")
    (run_dir / "eval" / "feedback_effect_retriever+simulator.md").write_text("`python tools/feedback_effect.py`\n\n| turn |\n")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n#### inspired\n\nkept\n<!-- results:end -->\n<!-- side_eval:start -->\n"
                      "old\n<!-- side_eval:end -->\n<!-- bench:start -->\n<!-- bench:end -->\n<!-- lora_step:start -->\n"
                      "<!-- lora_step:end -->\n")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--side-eval", str(run_dir)])
    text = readme.read_text()
    # only the flags that differ from 05's defaults, booleans as --flag / --no-flag
    assert (f"`05_eval.py --dataset inspired --run-dir {run_dir} --rows retriever+simulator --limit 192 "
            "--no-exclude-seen --threads 1` (") in text
    assert "retriever+simulator 25.2 min):\n\n| system |\n|---|\n| retriever+simulator |" in text
    assert ("What the feedback did to the retriever's query (retriever+simulator), by `python tools/feedback_effect.py`"
            "\n\n| turn |") in text
    assert "old" not in text and "kept" in text
    (run_dir / "eval" / "paired_gains.md").write_text("Each row minus sft+simulator\n\n| system | ΔR@1 t1 |\n")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--side-eval", str(run_dir)])
    assert f"By `python tools/paired_gains.py --run-dir {run_dir}`: Each row minus sft+simulator\n\n| system | ΔR@1 t1 |" \
        in readme.read_text()
    (run_dir / "eval" / "paired_gains_vs_smtpo.md").write_text("Each row minus smtpo\n")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--side-eval", str(run_dir)])
    assert f"By `python tools/paired_gains.py --run-dir {run_dir} --reference smtpo`: Each row minus smtpo" in readme.read_text()
    (run_dir / "eval" / "paired_gains.md").unlink()
    (run_dir / "eval" / "paired_gains_vs_smtpo.md").unlink()
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--side-eval", str(run_dir)])
    text = readme.read_text()
    # --rl-eval, --final-eval, --reachable-eval and --cited-eval fill their own blocks the same way and leave the
    # side_eval block as it was
    side_block = lambda t: t.split("<!-- side_eval:start -->")[1].split("<!-- side_eval:end -->")[0]  # noqa: E731
    for flag, name in (("--rl-eval", "rl_eval"), ("--final-eval", "rl_final"), ("--reachable-eval", "rl_reachable_eval"),
                       ("--cited-eval", "rl_cited_eval")):
        readme.write_text(text.replace("<!-- bench:start -->", f"<!-- {name}:start -->\n<!-- {name}:end -->\n<!-- bench:start -->"))
        tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), flag, str(run_dir)])
        block = readme.read_text().split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]
        assert "retriever+simulator 25.2 min):\n\n| system |" in block
        assert side_block(readme.read_text()) == side_block(text)
    # rows merged from two 05 processes: both commands, the earlier first
    results["merged_args"] = [{**args, "rows": ["sft+simulator"], "threads": 2}]
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--side-eval", str(run_dir)])
    assert (f"`05_eval.py --dataset inspired --run-dir {run_dir} --rows sft+simulator --limit 192 --no-exclude-seen "
            f"--threads 2` then `05_eval.py --dataset inspired --run-dir {run_dir} --rows retriever+simulator "
            "--limit 192 --no-exclude-seen --threads 1` (") in readme.read_text()
    del args["retriever_query"], args["recommender_turn"]  # a results.json from before the flags: what it did then
    assert tool.eval_command(args).endswith("--threads 1 --retriever-query whole-dialogue --recommender-turn list")


def test_sim_quality_block_lists_each_simulator_report(tmp_path):
    def simulator(run, folder, args, tuned_extra, real=None):
        path = tmp_path / run / folder
        path.mkdir(parents=True)
        tuned = {"target_hit_rate": 0.52, "attribute_f1": 0.3259, "reply_loss": 2.9069, **tuned_extra}
        base = {"target_hit_rate": 0.06, "attribute_f1": 0.0126, "reply_loss": 3.3417, **tuned_extra}
        quality = {"split": "test", "samples": 100, "tuned": tuned, "base": base}
        if real is not None:
            quality["real_seeker_copy_rate"] = real
        (path / "quality.json").write_text(json.dumps(quality))
        (path / "simulator_config.json").write_text(json.dumps({"args": {
            "steps": 50, "batch_size": 4, "grad_accum": 1, "task_mix": [1.0, 1.0, 1.0], **args}}))
        return str(path)

    old = simulator("redial", "simulator", {}, {})  # written before replies were generated
    new = simulator("redial_simq", "simulator", {"steps": 0, "init_adapter": "runs/redial/simulator"},
                    {"reply_copy_rate": 0.8}, real=0.04)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n#### inspired\n\nkept\n<!-- results:end -->\n<!-- sim_quality:start -->\n"
                      "<!-- sim_quality:end -->\n<!-- bench:start -->\n<!-- bench:end -->\n<!-- lora_step:start -->\n"
                      "<!-- lora_step:end -->\n")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--sim-quality", old, new])
    text = readme.read_text()
    assert ("| `redial/simulator` | 50 steps of 4 x 1, task mix [1.0, 1.0, 1.0] | 100 test | 0.52 / 0.06 | "
            "0.326 / 0.013 | 2.907 / 3.342 | n/a |") in text
    assert "| `redial_simq/simulator` | `runs/redial/simulator`, report only | 100 test |" in text
    assert "| 0.80 / 0.80 / 0.04 |" in text
    # a later call for one folder keeps the other's row, though its folder is gone
    shutil.rmtree(tmp_path / "redial")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--sim-quality", new])
    assert readme.read_text() == text


def test_candidate_targets_block_lists_in_sample_out_of_fold_and_valid(tmp_path):
    run_dir = tmp_path / "inspired_oof"
    (run_dir / "retriever").mkdir(parents=True)
    where = {"train, full retriever": {"samples": 1805, "first": 0.42, "top10": 0.68, "candidates": 0.74},
             "train, out of fold": {"samples": 1805, "first": 0.021, "top10": 0.083, "candidates": 0.131},
             "valid": {"samples": 246, "first": 0.016, "top10": 0.1, "candidates": 0.16}}
    report = {"args": {"dataset": "inspired"}, "candidates": 20, "candidate_targets": where,
              "variants": {"fused": {"valid": {"new": {"recall@20": 0.2075}}}},
              "cross_fitting": {"folds": 2, "per_fold": [{"valid_new_recall@20": 0.18}, {"valid_new_recall@20": 0.1912}]}}
    (run_dir / "retriever" / "report.json").write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n#### inspired\n\nkept\n<!-- results:end -->\n<!-- candidate_targets:start -->\n"
                      "stale table\n<!-- candidate_targets:end -->\n<!-- bench:start -->\n<!-- bench:end -->\n"
                      "<!-- lora_step:start -->\n<!-- lora_step:end -->\n")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--candidate-targets", str(run_dir)])
    text = readme.read_text()
    assert "| `inspired_oof` | inspired | 1805 train | 20 | full retriever | 0.42 | 0.68 | 0.74 | 0.207 |" in text
    assert "| `inspired_oof` | inspired | 1805 train | 20 | out of fold | 0.02 | 0.08 | 0.13 | 0.180 to 0.191 (2 folds) |" in text
    assert "| `inspired_oof` | inspired | 246 valid | 20 | full retriever | 0.02 | 0.10 | 0.16 | 0.207 |" in text
    assert "stale table" not in text and "kept" in text
    # another run's three rows are appended; naming this run again replaces its three rows in place
    other = tmp_path / "inspired_other"
    shutil.copytree(run_dir, other)
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--candidate-targets", str(other)])
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--candidate-targets", str(run_dir)])
    rows = [line.split(" | ")[0] for line in readme.read_text().splitlines() if line.startswith("| `inspired_")]
    assert rows == ["| `inspired_oof`"] * 3 + ["| `inspired_other`"] * 3
    del report["candidate_targets"]
    (run_dir / "retriever" / "report.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="--parts retriever"):
        tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--candidate-targets", str(run_dir)])


def test_start_states_block_sets_all_against_reachable(tmp_path):
    def rl_run(name: str, rule: str, kept: int, in_candidates: float, hits: list[float], eval_states=None,
               out: str = "recommender_rl") -> Path:
        folder = tmp_path / name / out
        folder.mkdir(parents=True)
        config = {"args": {"steps": len(hits), "prompts": 1, "group_size": 4, "turns": 2, "lr": 1e-4, "w_preference": 0.5,
                           "temperature": 1.0}, "start_states": {"rule": rule, "kept": kept, "of": 1805}}
        if eval_states:  # 04 since 2026-11-27: the validation draw and the retriever's order on it
            config["eval_states"] = eval_states
        (folder / "rl_config.json").write_text(json.dumps(config))
        order = {"retriever_hit@10": [0.1, 0.2], "target_in_candidates": [1.0, 1.0]} if eval_states else {}
        valid = lambda h: {"valid": {"episodes": 16, "reward": 0.5, "parse_rate": 0.25 + h, "recommend": 0.0,  # noqa: E731
                                     "preference": 0.0, "hit@10": [0.12, h], **order}}
        rows = [{"step": 0, **valid(0.12)}]
        for step, hit in enumerate(hits, 1):
            rows.append({"step": step, "reward": 1.0 + hit, "format": 1.0, "recommend": hit / 2, "preference": 0.0,
                         "return": 1.5, "hit@10": [hit, hit], "target_in_candidates": [in_candidates, in_candidates],
                         "retriever_hit@10": [hit / 2, hit / 2],
                         "kl": 0.0, "entropy": 1.0, "zero_variance_fraction": 1 - in_candidates,
                         "seconds_generating": 100, "seconds_training": 20, **(valid(0.25) if step == len(hits) else {})})
        (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    every, reach = rl_run("rl_all", "all", 1805, 0.0, [0.0, 0.0]), rl_run("rl_reach", "reachable", 236, 1.0, [0.5, 0.75])
    long = rl_run("rl_long", "reachable", 230, 1.0, [0.0] * 4 + [0.5] * 4, {"rule": "reachable", "of": 200, "kept": 40,
                                                                           "drawn": 16})
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n#### inspired\n\nkept\n<!-- results:end -->\n<!-- rl_start_states:start -->\nstale\n"
                      "<!-- rl_start_states:end -->\n<!-- rl_reachable:start -->\nstale\n<!-- rl_reachable:end -->\n"
                      "<!-- bench:start -->\n<!-- bench:end -->\n<!-- lora_step:start -->\n<!-- lora_step:end -->\n")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--start-states-rl", str(every), str(reach),
               "--reachable-rl", str(long)])
    text = readme.read_text()
    assert ("| `rl_all` | all (1805 of 1805) | 2 x 1 x 4 x 2 | 0.00 | 0.000 | 1.00 | 0.00 / 0.00 | 0.00 / 0.00 | 1.00 / 1.00 "
            "| all (16) | 0.12 / 0.25 | 0.37 / 0.50 |") in text
    assert "| `rl_reach` | reachable (236 of 1805) | 2 x 1 x 4 x 2 | 1.00 | 0.312 | 0.00 | 0.50 / 0.75 | 0.25 / 0.38 | 1.50 / 1.75 |" in text
    assert "| 2 | 1.750 | 1.00 | 0.375 | 0.000 | 1.500 | 0.75, 0.75 | 0.38, 0.38 | 1.00, 1.00 | 0.0000 |" in text  # per-step
    # validated on reachable states: how many, and the retriever's own order beside the policy's hit@10
    assert ("| `rl_long` | reachable (230 of 1805) | 8 x 1 x 4 x 2 | 1.00 | 0.125 | 0.00 | 0.00 / 0.50 | 0.00 / 0.25 "
            "| 1.00 / 1.50 | reachable (16 of 40) | 0.12 / 0.25 (0.20 / 0.20) | 0.37 / 0.50 |") in text
    assert "| 1-2 | 1.000 | 1.00 | 0.000 | 0.00 | 0.00 | 1.00 |\n| 3-4 | 1.000 |" in text  # quarters of the run
    assert "| 7-8 | 1.500 | 1.00 | 0.250 | 0.50 | 0.25 | 1.00 |" in text
    assert "| 8 | 0.500 | 0.50 | 0.000 | 0.000 | 0.12, 0.25 | 0.10, 0.20 | 1.00, 1.00 |" in text  # validation table
    assert "stale" not in text
    # a run stopped early (04 writes rl_config.json at its start) shows how far it got
    config_path = long / "recommender_rl" / "rl_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "args": {**config["args"], "steps": 40}, "finished": False}))
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--reachable-rl", str(long)])
    assert "| `rl_long` | reachable (230 of 1805) | 8 (of 40) x 1 x 4 x 2 |" in readme.read_text()
    # an ablation's run directory that links the RL adapter of another run: only its own folder is listed
    ablation = rl_run("rl_final", "reachable", 230, 1.0, [0.25, 0.25], {"rule": "reachable", "of": 200, "kept": 40},
                      out="recommender_rl_no_preference")
    log_path = ablation / "recommender_rl_no_preference" / "train_log.jsonl"  # --no-eval-start: no step 0
    log_path.write_text("".join(line + "\n" for line in log_path.read_text().splitlines()[1:]))
    (ablation / "recommender_rl").symlink_to(long / "recommender_rl")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--reachable-rl", str(long), str(ablation)])
    block = readme.read_text().split("<!-- rl_reachable:start -->")[1].split("<!-- rl_reachable:end -->")[0]
    assert ("| `rl_final/recommender_rl_no_preference` | reachable (230 of 1805) | 2 x 1 x 4 x 2 | 1.00 | 0.125 | 0.00 | "
            "0.25 / 0.25 | 0.12 / 0.12 | 1.25 / 1.25 | reachable (16 of 40) | n/a / 0.25 (n/a / 0.20) | n/a / 0.50 |") in block
    assert "| `rl_final` |" not in block and block.count("`recommender_rl/` (") == 1  # rl_long's curves only
    # --cited-rl writes the same summary and curves into its own block, and leaves rl_reachable alone
    readme.write_text(readme.read_text() + "<!-- rl_cited:start -->\nstale\n<!-- rl_cited:end -->\n")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--cited-rl", str(long)])
    text = readme.read_text()
    assert text.split("<!-- rl_reachable:start -->")[1].split("<!-- rl_reachable:end -->")[0] == block
    cited = text.split("<!-- rl_cited:start -->")[1].split("<!-- rl_cited:end -->")[0]
    assert "| `rl_long` | reachable (230 of 1805) | 8 (of 40) x 1 x 4 x 2 |" in cited and "stale" not in cited
    assert "`rl_final/`, `recommender_rl_no_preference/` (1 prompt x G 4" in block
    # a run without greedy episodes (--eval-samples 0, no pool): its greedy columns say so
    log_path = reach / "recommender_rl" / "train_log.jsonl"
    log_path.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "valid"}) + "\n"
                                for line in log_path.read_text().splitlines()[1:]))
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--start-states-rl", str(reach)])
    assert "| 1.50 / 1.75 | none | n/a | n/a |" in readme.read_text()
    (reach / "recommender_rl" / "rl_config.json").unlink()
    with pytest.raises(SystemExit, match="did not run"):
        tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--start-states-rl", str(reach)])


def test_pool_block_takes_the_greedy_columns_from_the_training_pool(tmp_path):
    folder = tmp_path / "rl_pool" / "recommender_rl"
    folder.mkdir(parents=True)
    (folder / "rl_config.json").write_text(json.dumps({
        "args": {"steps": 2, "prompts": 1, "group_size": 8, "turns": 1, "lr": 1e-4, "w_preference": 0.5, "temperature": 1.0},
        "start_states": {"rule": "rerankable", "kept": 78, "of": 1805, "pool": 4},
        "eval_states": {"rule": "all", "of": 0, "kept": 0, "drawn": 0}}))

    def pool(hit: float) -> dict:  # 04's greedy episodes on the pool (--train-pool), no held-out ones
        return {"pool": {"episodes": 4, "reward": 1.0 + hit, "parse_rate": 1.0, "recommend": hit / 2, "preference": 0.0,
                         "hit@10": [hit], "retriever_hit@10": [0.0], "target_in_candidates": [1.0]}}

    rows = [{"step": 0, **pool(0.0)}] + [
        {"step": s, "reward": 1.0, "format": 1.0, "recommend": 0.1, "preference": 0.0, "return": 1.0, "hit@10": [h],
         "target_in_candidates": [1.0], "retriever_hit@10": [0.0], "kl": 0.0, "entropy": 1.0, "zero_variance_fraction": 0.5,
         "seconds_generating": 60, "seconds_training": 30, **pool(h)} for s, h in ((1, 0.25), (2, 0.5))]
    (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n#### inspired\n\nkept\n<!-- results:end -->\n<!-- rl_pool:start -->\nstale\n"
                      "<!-- rl_pool:end -->\n<!-- bench:start -->\n<!-- bench:end -->\n<!-- lora_step:start -->\n<!-- lora_step:end -->\n")
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--pool-rl", str(tmp_path / "rl_pool")])
    block = readme.read_text().split("<!-- rl_pool:start -->")[1].split("<!-- rl_pool:end -->")[0]
    # the summary's greedy columns: the pool's greedy episodes at step 0 (the SFT adapter) and after the last step
    assert ("| `rl_pool` | rerankable (78 of 1805; a pool of 4) | 2 x 1 x 8 x 1 | 1.00 | 0.100 | 0.50 | 0.25 / 0.50 | "
            "0.00 / 0.00 | 1.00 / 1.00 | none; the training pool (4) | 0.00 / 0.50 (0.00 / 0.00) | 1.00 / 1.00 |") in block
    assert "Greedy episodes (4 start states of the training pool; step 0 = the SFT adapter)" in block
    assert "| 2 | 1.500 | 1.00 | 0.250 | 0.000 | 0.50 | 0.00 | 1.00 |" in block
    assert "Greedy validation" not in block and "stale" not in block
    assert "(1 prompt x G 8 x T 1 per step, lr 0.0001, w_pref 0.5); training" in block  # w_fmt shown only when not 1
    config = json.loads((folder / "rl_config.json").read_text())
    (folder / "rl_config.json").write_text(json.dumps({**config, "args": {**config["args"], "w_format": 0.0}}))
    tool.main(["--runs", str(tmp_path / "runs"), "--readme", str(readme), "--pool-rl", str(tmp_path / "rl_pool")])
    assert "(1 prompt x G 8 x T 1 per step, lr 0.0001, w_pref 0.5, w_fmt 0.0); training" in readme.read_text()
