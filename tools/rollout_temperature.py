"""Does 04's format reward carry a signal at a given sampling temperature? Samples G first-turn
answers of the SFT recommender per training start state, as 04's rollouts do (no loop guard, no
constraint), and scores them with 04_rl_multiturn.turn_reward itself.

A group teaches format only when some of its G answers parse and some do not; if no sampled
answer parses, the format term is 0 everywhere and RL cannot learn it.

    python tools/rollout_temperature.py --run-dir runs/inspired --temperatures 1.0 0.7 0.5 \
        [--start-states 8] [--group-size 4] [--max-new-tokens 288] [--threads 1]

Prints, per temperature: valid answers, groups with mixed format, groups whose reward varies
(not zero-variance), mean recommend term, mean completion tokens, seconds; and writes that table,
with the command, to <run-dir>/rollout_temperature.md.
"""
import argparse
import importlib
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

rl = importlib.import_module("04_rl_multiturn")


def group_stats(rewards: list[dict], group_size: int) -> dict:
    """turn_reward dicts of consecutive groups of `group_size` answers -> {valid: answers that parse,
    mixed: groups where some parse and some do not, varied: groups whose reward is not all equal
    (04 trains only on those), groups, recommend: mean recommend term}."""
    groups = [rewards[g:g + group_size] for g in range(0, len(rewards), group_size)]
    return {"valid": int(sum(r["format"] for r in rewards)),
            "mixed": sum(len({r["format"] for r in g}) > 1 for g in groups),
            "varied": sum(len({round(r["reward"], 9) for r in g}) > 1 for g in groups),
            "groups": len(groups), "recommend": statistics.mean(r["recommend"] for r in rewards)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True,
                        help="run directory with recommender_sft/ and retriever/ (03_sft_recommender.py)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7, 0.5],
                        help="temperatures to sample at")
    parser.add_argument("--start-states", type=int, default=8, help="training start states (seeded draw)")
    parser.add_argument("--group-size", type=int, default=4, help="answers G per start state")
    parser.add_argument("--max-new-tokens", type=int, default=288,
                        help="generation budget of one answer (04's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw and of the sampling")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default=str(common.default_device()), help="torch device")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    run = common.RunPaths(args.run_dir)
    items = common.load_items(run)
    defaults = common.parse_args(rl.Args, ["--run-dir", args.run_dir])  # 04's defaults: candidates, weights, ...
    defaults.max_new_tokens, defaults.device, defaults.model = args.max_new_tokens, args.device, ""
    conversation, weights = common.load_conversation(run, ["recommender_sft"], items, rl.environment(defaults))
    train = [s for s in common.load_samples(run, "train") if common.sample_truth(s)]
    starts = [train[i] for i in random.Random(args.seed).sample(range(len(train)), args.start_states)]
    lines = [f"`python tools/rollout_temperature.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
             f"{len(starts)} training start states x G {args.group_size}, first turn, {args.max_new_tokens} tokens, "
             f"weights format {defaults.w_format} recommend {defaults.w_recommend} preference {defaults.w_preference}",
             "", "| temperature | valid answers | groups with mixed format | groups with varied reward "
             "| mean recommend | mean tokens | seconds |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for temperature in args.temperatures:
        common.set_seed(args.seed)
        started = time.time()
        episodes = common.start_episodes(starts, args.group_size)
        conversation.recommend(episodes, weights["recommender_sft"], temperature=temperature)
        rewards = [rl.turn_reward(e.turns[0], e.truth, items, defaults) for e in episodes]
        stats = group_stats(rewards, args.group_size)
        tokens = statistics.mean(len(e.turns[0]["completion_ids"]) for e in episodes)
        lines.append(f"| {temperature} | {stats['valid']} of {len(rewards)} | {stats['mixed']} of {stats['groups']} "
                     f"| {stats['varied']} of {stats['groups']} | {stats['recommend']:.3f} | {tokens:.0f} "
                     f"| {time.time() - started:.0f} |")
        print(lines[-1], flush=True)
    common.atomic_write_bytes(run.root / "rollout_temperature.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
