"""Does feedback that describes the target reach the retriever? The positive control of 05
(--simulator-knows-target) separates a simulator that says nothing useful from a query path that
cannot carry what it says: here one reply follows the retriever's first turn, from three sources,
and the retriever (05's retriever+simulator row) recalls again from the dialogue with that reply.

    python tools/feedback_reach.py --run-dir runs/course/redial [--limit 40] [--threads 1]

Sources: the simulator label-free (05's default), the simulator told the target (05's
--simulator-knows-target prompt), and a templated reply that states the description itself
("No. I want a movie like this: <common.target_description>"), which needs no LLM and shows what
the query path does with feedback that surely holds the target's attributes.
Prints and writes to <run-dir>/feedback_reach.md, per source: replies naming one of the target's
attributes (genre, director, star), R@10 (new targets) after turn 1 and after the reply, the paired
change with its 95% CI.
"""
import argparse
import copy
import importlib
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

evaluate = importlib.import_module("05_eval")
SOURCES = ("simulator, label-free", "simulator told the target", "templated description")


def names_attribute(text: str, item: dict) -> bool:
    """Whether a reply names one of the item's genres, directors or stars (whole words, any case)."""
    words = " " + re.sub(r"[^a-z0-9]+", " ", text.lower()) + " "
    phrases = item.get("genres", [])[:3] + item.get("directors", [])[:1] + item.get("stars", [])[:3]
    return any(f" {p} " in words for p in (re.sub(r"[^a-z0-9]+", " ", x.lower()).strip() for x in phrases) if p)


def templated_reply(conversation: common.Conversation, episodes: list[common.Episode]) -> None:
    """Conversation.reply's effect with a reply that states the targets' descriptions."""
    for e in episodes:
        said = conversation.recommender_says(e.turns[-1])
        reply = "No. I want a movie like this: " + " / ".join(
            common.target_description(conversation.items[t]) for t in e.truth)
        e.turns[-1].update(said=said, reply=reply)
        e.context += [{"role": "recommender", "text": said}, {"role": "seeker", "text": reply}]


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", required=True, help="run directory with retriever/ (03) and simulator/ (02)")
    parser.add_argument("--limit", type=int, default=40, help="test samples with a new target (05's seeded draw)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (05's --seed)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--device", default=str(common.default_device()), help="torch device")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = common.RunPaths(args.run_dir)
    items = common.load_items(run)
    defaults = common.parse_args(evaluate.Args, ["--run-dir", args.run_dir, "--device", args.device])
    conversation, weights = common.load_conversation(run, ["simulator"], items, defaults)
    conversation.simulator_weights = weights["simulator"]
    samples = common.draw_samples(common.load_samples(run, "test"), args.limit, args.seed)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"`python tools/feedback_reach.py {command}`: {len(samples)} test samples, one reply after the "
             "retriever's first turn", "", "| reply from | replies naming a target attribute | R@10 turn 1 | "
             "R@10 after the reply | change [paired 95% CI] (samples up / down) |", "|---|---|---|---|---|"]
    first_turn = conversation.play(common.start_episodes(samples), 1, "retriever")  # the same for every source
    for source in SOURCES:
        episodes = copy.deepcopy(first_turn)
        if source == "templated description":
            templated_reply(conversation, episodes)
        else:
            conversation.simulator_knows_target = source == "simulator told the target"
            conversation.reply(episodes)
        conversation.recommend(episodes, "retriever")
        named = sum(any(names_attribute(e.turns[0]["reply"], items[t]) for t in e.truth) for e in episodes)
        first, second = [e.ranking_at(1) for e in episodes], [e.ranking_at(2) for e in episodes]
        gain = evaluate.paired_gain(first, second, samples, seed=args.seed)
        recall = [common.score_rankings(lists, samples, ks=(10,), bootstrap=0)["new"]["recall@10"]
                  for lists in (first, second)]
        lines.append(f"| {source} | {named} of {len(episodes)} | {recall[0]:.3f} | {recall[1]:.3f} | "
                     f"{evaluate.format_gain(gain)} |")
        print(lines[-1], flush=True)
    conversation.simulator_knows_target = False
    common.atomic_write_bytes(run.root / "feedback_reach.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
