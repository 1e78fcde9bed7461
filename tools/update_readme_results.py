"""Copy the latest results tables (runs/<dataset>/eval/results.md) into README.md, between the
markers <!-- results:start --> and <!-- results:end -->, with the command that produced them.

    python tools/update_readme_results.py [--runs runs] [--command "bash run_all.sh ..."]
"""
import argparse
import datetime
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs", help="folder holding one run directory per dataset")
    parser.add_argument("--command", default="bash run_all.sh", help="the command that produced the runs")
    args = parser.parse_args()
    blocks = []
    for results in sorted((ROOT / args.runs).glob("*/eval/results.json")):
        meta = json.loads(results.read_text())
        table = (results.parent / "results.md").read_text().strip()
        retriever_report = results.parents[1] / "retriever" / "report.json"
        extra = ""
        if retriever_report.exists():
            rep = json.loads(retriever_report.read_text())
            k = rep["candidates"]
            extra = "\n\nRetriever Recall@{k} (the candidate set the recommender re-ranks), new targets: ".format(k=k) + ", ".join(
                f"{v} valid {r['valid']['new'][f'recall@{k}']:.3f} / test {r['test']['new'][f'recall@{k}']:.3f}"
                for v, r in rep["variants"].items())
        blocks.append(f"#### {meta['dataset']}\n\n{table}{extra}")
    if not blocks:
        raise SystemExit(f"no {args.runs}/*/eval/results.json found: run 05_eval.py first")
    stamp = datetime.date.today().isoformat()
    body = f"Produced by `{args.command}` on {stamp}; tables copied by `tools/update_readme_results.py`.\n\n" + "\n\n".join(blocks)
    readme = ROOT / "README.md"
    text = readme.read_text()
    pattern = re.compile(r"(<!-- results:start -->\n).*?(\n<!-- results:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit("README.md has no <!-- results:start --> / <!-- results:end --> markers")
    readme.write_text(pattern.sub(lambda m: m.group(1) + body + m.group(2), text))
    print(f"updated {readme} with {len(blocks)} result table(s)")


if __name__ == "__main__":
    main()
