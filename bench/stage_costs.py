"""Wall time and peak memory of pipeline stages on this machine: runs each command given after
`--` as a child process and appends one JSON line per command to --out.

    python bench/stage_costs.py --label "03 redial" --out bench/results/stage_costs.jsonl -- \
        python 03_sft_recommender.py --dataset redial --parts recommender

Peak memory is the child's maximum resident set size (ru_maxrss from os.wait4, so it covers the
whole process, model weights and activations included); on a GPU the stages print their own
torch.cuda.max_memory_allocated. Prints the table of every line in --out at the end.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def run(command: list[str]) -> dict:
    started = time.time()
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - started
    rc = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"command": " ".join(command), "returncode": rc, "wall_s": round(wall, 1),
            "peak_rss_gib": round(usage.ru_maxrss * scale / 2**30, 2),
            "cpu_user_s": round(usage.ru_utime, 1)}


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: stage_costs.py [--label L] [--out FILE] -- COMMAND ...")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="", help="name of the measured stage in the table")
    parser.add_argument("--out", default="bench/results/stage_costs.jsonl", help="JSON-lines file to append to")
    args = parser.parse_args(argv[:cut])
    row = {"label": args.label, **run(argv[cut + 1:]), "threads": os.environ.get("OMP_NUM_THREADS", "default"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    print("\n| stage | wall (min) | peak RSS (GiB) | exit |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['wall_s'] / 60:.1f} | {r['peak_rss_gib']:.2f} | {r['returncode']} |")
    sys.exit(row["returncode"])


if __name__ == "__main__":
    main()
