"""Smoke runs of bench/rl_step_vs_trl.py on a tiny random model: our side always, TRL's when TRL is
installed (it is a bench-only dependency: bash install.sh --bench)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "rl_step_vs_trl.py"
TINY = ["--model", "tiny", "--prompt-tokens", "24", "--completion-tokens", "6", "--warmup", "1", "--repeats", "1",
        "--threads", "1"]


def run_side(impl: str, tmp_path: Path) -> dict:
    result = tmp_path / f"{impl}.json"
    subprocess.run([sys.executable, str(BENCH), "--impl", impl, "--result-file", str(result), *TINY], check=True,
                   cwd=ROOT)
    return json.loads(result.read_text())


def check_side(r: dict) -> None:
    # 2 prompts x G 4 completions of exactly 6 tokens: the fixed completion length held
    assert r["tokens_per_step"] == 2 * 4 * 6
    assert 0 < r["generate_s"] < r["step_s"]
    assert r["peak_memory_gib"] > 0


def test_our_rl_step_is_timed_on_fixed_length_completions(tmp_path):
    r = run_side("ours", tmp_path)
    check_side(r)
    assert r["steps"][0]["prompt_tokens"] == 24


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is bench-only: bash install.sh --bench")
def test_trl_side_and_comparison_table(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH), "--impl", "both", "--out", str(out), *TINY], check=True,
                          cwd=ROOT, capture_output=True, text=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["ours", "trl"]
    for r in rows:
        check_side(r)
    assert "| ours / TRL |" in proc.stdout


def test_random_model_and_the_nf4_lora_step_benchmark(tmp_path):
    """bench/random_model.py writes a loadable Qwen2-shaped folder; bench/lora_step.py runs the stages'
    SFT step on it with an nf4 base and counts the parameters as the unquantized model has them."""
    folder, out = tmp_path / "tiny-qwen", tmp_path / "lora_step.jsonl"
    subprocess.run([sys.executable, str(ROOT / "bench" / "random_model.py"), "--shape", "tiny-qwen", "--device", "cpu",
                    "--out", str(folder)], check=True, cwd=ROOT)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == 2
    subprocess.run([sys.executable, str(ROOT / "bench" / "lora_step.py"), "--model", str(folder), "--load-in-4bit",
                    "--device", "cpu", "--threads", "1", "--seq-len", "96", "--answer-tokens", "24", "--warmup", "1",
                    "--repeats", "1", "--out", str(out)], check=True, cwd=ROOT)
    r = json.loads(out.read_text())
    assert r["linear4bit_layers"] == 2 * 7  # q, k, v, o, gate, up, down in each layer
    # embeddings (tied) + 2 x (attention with q/k/v biases + MLP + 2 norms) + final norm, as the fp model has them
    h, i, v, kv = config["hidden_size"], config["intermediate_size"], config["vocab_size"], 2 * 16
    layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    assert r["base_parameters"] == v * h + 2 * layer + h
    assert r["step_s"] > 0 and r["peak_memory_gib"] > 0 and len(r["losses"]) == 2
    assert all(loss > 0 for loss in r["losses"])


def _bench_module():
    spec = importlib.util.spec_from_file_location("rl_step_vs_trl", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_merge_into_medians_over_all_steps_and_keep_each_rounds_ratio():
    bench = _bench_module()

    def child(impl, step_times, peak, phases):
        return {"impl": impl, "step_s": sorted(step_times)[len(step_times) // 2], "generate_s": 1.0,
                "peak_memory_gib": peak, "peak_memory_by_phase_gib": phases,
                "steps": [{"step_s": t, "generate_s": t - 1, "tokens": 32} for t in step_times]}

    ours = bench.merge_rounds([child("ours", [10, 11, 30], 5.0, {"generate": 5.0, "train": 4.0}),
                               child("ours", [12, 13, 14], 5.2, {"generate": 4.9, "train": 4.5})])
    trl = bench.merge_rounds([child("trl", [20, 21, 22], 5.0, {"generate": 5.0}),
                              child("trl", [12, 13, 14], 5.0, {"generate": 5.0})])
    # the median of all six timed steps (10, 11, 12 | 13, 14, 30: 12.5), not of the rounds' medians (11, 13: 12)
    assert ours["step_s"] == 12.5 and ours["generate_s"] == 11.5 and ours["train_s"] == 1.0
    assert ours["peak_memory_gib"] == 5.2 and ours["peak_memory_by_phase_gib"] == {"generate": 5.0, "train": 4.5}
    assert ours["generated_tokens_per_s"] == 32 / 11.5 and len(ours["steps"]) == 6
    assert [r["step_s"] for r in ours["rounds"]] == [11, 13]
    # round 1: 11 / 21 and 5.0 / 5.0; round 2: 13 / 13 and 5.2 / 5.0
    assert bench.round_ratios(ours, trl).endswith("0.52, 1.00; 1.00, 1.04")
