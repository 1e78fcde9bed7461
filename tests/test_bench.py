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
