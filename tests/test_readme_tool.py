"""tools/update_readme_results.py replaces only the datasets it finds and keeps the others."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("update_readme_results", ROOT / "tools" / "update_readme_results.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def test_new_dataset_block_replaces_its_own_and_keeps_the_others(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nProduced by `old` on 2026-01-01.\n\n#### inspired\n\nold inspired"
                      "\n\n#### redial\n\nold redial table\n<!-- results:end -->\n<!-- bench:start -->\n<!-- bench:end -->\n")
    eval_dir = tmp_path / "runs" / "inspired" / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "results.json").write_text(json.dumps({"dataset": "inspired"}))
    (eval_dir / "results.md").write_text("| new inspired table |")
    rl = tmp_path / "runs" / "inspired" / "recommender_rl"
    rl.mkdir()
    step = {"reward": 1.0, "format": 1.0, "recommend": 0.0, "preference": 0.0, "return": 1.9, "hit@10": [0.0, 0.25],
            "kl": 0.0, "entropy": 1.0, "zero_variance_fraction": 0.5, "seconds_generating": 10, "seconds_training": 5}
    (rl / "train_log.jsonl").write_text("\n".join(json.dumps({"step": i + 1, **step, "reward": r})
                                                  for i, r in enumerate([0.5, 0.7])))
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
