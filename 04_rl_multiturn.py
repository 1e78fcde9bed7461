"""Stage 4: multi-turn reinforcement learning of the recommender (GRPO with fine-grained rewards).

Reads   <run-dir>/data/             (01_prep_data.py)       items, training and validation samples
        <run-dir>/retriever/        (03_sft_recommender.py) the fused retriever (K candidates per turn)
        <run-dir>/simulator/        (02_sft_simulator.py)   the user simulator's adapter (frozen)
        <run-dir>/recommender_sft/  (03_sft_recommender.py) the SFT adapter: the policy's start and the reference
Writes  <run-dir>/recommender_rl/ (or --out, e.g. recommender_rl_no_preference with --w-preference 0)
          adapter_config.json, adapter_model.safetensors   the policy's LoRA adapter (PEFT layout)
          rl_config.json         (written at the start, completed at the end: "finished", seconds)
                                 the arguments, the base model, the world size, where training candidates
                                 come from (out of fold: 03's cross-fitted retrievers), the start states
                                 kept (--start-states) and the validation states drawn, seconds
          train_log.jsonl        one row per step (reward terms, return, hit@1/@10 by turn, the share of
                                 episodes with a target among the turn's candidates and in the retriever's
                                 own top 10 of them (the hit@10 without re-ranking), episodes ended by
                                 success and their success turn's mean advantage, KL, entropy,
                                 zero-variance groups, tokens, seconds generating vs training; validation),
                                 and a row of step 0 with the SFT start's validation
          checkpoint/checkpoint.pt  every --save-every steps and at the end; a rerun resumes from it

One base LLM carries three adapters, swapped in place (common.lora_swapped, no second model copy):
the policy (trainable, initialised from the SFT adapter), the reference (the frozen SFT adapter,
for the KL term) and the simulator (frozen). One step (docs/design.md section 6):
 1. Draw --prompts training samples (start states), from (seed, step) alone; with
    --start-states reachable only among those whose true target the retriever recalls in the
    first turn's K candidates (the policy can then earn the recommend reward by ranking it).
 2. Play G = --group-size episodes from each: up to T = --turns turns of retriever (K candidates
    from the dialogue so far) -> policy (sampled at --temperature) -> simulator (greedy reply to
    the top 3). An episode ends at T, or by success at turn n < T: the answer's own list (its
    parsed titles, not the retriever's filler) ranks a true target first.
 3. Reward every recommender turn: r_t = w_fmt * format + w_rec * recommend + w_pref * preference
      format      1 when the answer parses: both <answer> tags, 10 distinct titles, all candidates
      recommend   1 / log2(1 + rank) of the best-placed true target in the answer's own list, else 0
      preference  F1 of the attributes on the Preference line against the true targets' attributes
    Each term lies in [0, 1], so a turn earns at most r_max = w_fmt + w_rec + w_pref.
 4. Return-to-go with success as an absorbing state. An episode that succeeded at turn n < T is
    credited r_max for each turn it did not play:
      R_t = sum_{k=t..n} gamma^(k - t) r_k  +  [success at n] * sum_{k=n+1..T} gamma^(k - t) r_max
    Any continuation from turn n earns R_n' <= r_n' + sum_{k=n+1..T} gamma^(k - n) r_max, so ending
    by success is never worth less than playing on from the same turn reward; without the credit a
    success at turn 1 forfeits the later turns' format reward and scores below never listing the
    target (returns_to_go's docstring works it by hand). Advantage A_t = (R_t - mean) / std over the
    group's episodes that played turn t; 0 when fewer than two did or all are equal (a zero-variance
    group teaches nothing and is counted in the log).
 5. Token-level loss over the recommender's generated tokens only (the prompt, which holds the
    dialogue and the simulator's replies, is masked):
      L = (1 / N) * sum_tokens [ -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) + beta * k3 ]
      rho = pi(x_t) / pi_old(x_t),  k3 = pi_ref / pi - log(pi_ref / pi) - 1  (>= 0, 0 at pi = pi_ref)
    N = the generated tokens of the whole batch (of all processes). --updates passes over the
    batch (PPO-style; the first is on-policy, rho = 1); --clip-eps 0 disables clipping,
    --kl-coef 0 the KL term. With the default --updates 1 every pass is on-policy: rho = 1
    exactly, clipping never acts, and the loss is REINFORCE with the group baseline plus the KL term.
Validation decodes greedily with 05's loop guard (common.GREEDY_NO_REPEAT_NGRAM), so its lists are
05's; rollouts sample the full distribution at --temperature without it, so their log-probs are the
policy's own.
Multi-process: under torchrun (or accelerate launch) each process plays its own --prompts start
states; the gradients are summed over processes after each divided its loss by the global N, so
the update is the token mean over every process's tokens and all copies stay identical. Process 0
writes the log, checkpoints and the adapter.
Every step reseeds from (seed, step, rank), so a run that is killed and started again ends with the
same weights.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

import common
from common import arg

# The conversation 05 evaluates (its defaults), fixed so that RL trains in it: the simulator is shown the
# list's top 3 and replies in at most 60 tokens; the retriever never recalls an item the dialogue names.
ENVIRONMENT = {"show_top": 3, "sim_max_new_tokens": 60, "exclude_seen": True}
MAX_GRAD_NORM = 1.0  # the gradient's global norm is clipped at 1 before every optimizer step

# the settings a checkpoint must share with the run that resumes it
SAME_RUN = ("model", "load_in_4bit", "prompts", "group_size", "turns", "candidates", "temperature", "max_new_tokens",
            "w_format", "w_recommend", "w_preference", "gamma", "lr", "updates", "clip_eps", "kl_coef", "seed",
            "steps", "start_states")


@dataclass
class Args:
    dataset: str = arg("redial", "dataset whose run directory to use", choices=["redial", "inspired"])
    run_dir: str = arg("", "run directory (default: runs/<dataset>)")
    out: str = arg("recommender_rl", "output folder in the run directory (recommender_rl_no_preference: ablation)")
    model: str = arg("", "base LLM (default: the one recommender_sft/ was trained on)")
    load_in_4bit: bool = arg(False, "load the base in nf4 4-bit (QLoRA): the policy trains on the 4-bit base")
    steps: int = arg(20, "RL steps (a batch of episodes, --updates optimizer steps each); 0 = validate the SFT start")
    prompts: int = arg(2, "start states (training samples) per step and process")
    group_size: int = arg(4, "episodes G per start state; advantages are normalised within the group")
    turns: int = arg(3, "turns T per episode")
    candidates: int = arg(20, "candidates K the retriever recalls each turn")
    temperature: float = arg(1.0, "sampling temperature of the policy during rollouts (> 0)")
    max_new_tokens: int = arg(288, "generation budget of one recommender answer")
    gen_batch_size: int = arg(8, "prompts per generation batch (memory)")
    w_format: float = arg(1.0, "reward weight of format (the answer parses into 10 distinct candidates)")
    w_recommend: float = arg(1.0, "reward weight of recommend (1/log2(1+rank) of a true target)")
    w_preference: float = arg(0.5, "reward weight of preference (F1 of claimed vs target attributes); 0 = ablation")
    gamma: float = arg(0.9, "discount of the return-to-go over turns")
    lr: float = arg(2e-5, "AdamW learning rate (constant)")
    updates: int = arg(1, "optimizer steps per batch of episodes (PPO-style; at 1 the ratio is 1: clipping never acts)")
    clip_eps: float = arg(0.2, "PPO ratio clipping epsilon (0 = no clipping)")
    kl_coef: float = arg(0.02, "weight beta of the k3 KL estimate to the SFT reference (0 = no KL term)")
    micro_batch: int = arg(2, "recommender turns per forward/backward pass (memory)")
    gradient_checkpointing: bool = arg(True, "recompute activations in the backward pass (less memory, slower)")
    start_states: str = arg("all", "training and validation samples to start from: all with a target; reachable: a "
                                   "target among the first turn's K candidates; linked: a catalogue item in the "
                                   "context", choices=list(common.START_STATES))
    eval_every: int = arg(0, "greedy validation every N steps (0 = none); the SFT start and the end always are")
    eval_samples: int = arg(16, "validation start states (seeded draw among samples with a new target; 0 = none)")
    save_every: int = arg(5, "checkpoint every N steps (a killed run resumes from the last one)")
    seed: int = arg(0, "random seed")
    threads: int = arg(0, "torch CPU threads (0 = torch's default; 1 when jobs share the cores, else all of them)")
    device: str = arg(str(common.default_device()), "torch device (cuda:<local rank> under torchrun)")


# ---- rewards, returns, advantages, loss (each checkable by hand) ---------------------------------


def turn_reward(turn: dict, truth: list[int], items: list[dict], args) -> dict[str, float]:
    """The fine-grained reward of one recommender turn (Conversation.recommend's dict; its
    "parsed" is common.parse_recommendation's reading of the answer).
    -> {format, recommend, preference, reward}; reward = the weighted sum with args.w_*."""
    parsed = turn["parsed"]
    fmt = 1.0 if parsed["valid"] else 0.0
    # the answer's own list, as Conversation.recommend's own_rank, which decides success
    rank = common.best_rank(parsed["ids"][:common.REC_TOP_N], truth)
    recommend = 1.0 / math.log2(1 + rank) if rank else 0.0
    target_attributes = {a.lower() for t in truth for a in common.item_attributes(items[t])}
    claimed = parsed["preference"]
    preference = common.set_f1(claimed, target_attributes) if claimed and target_attributes else 0.0
    reward = args.w_format * fmt + args.w_recommend * recommend + args.w_preference * preference
    return {"format": fmt, "recommend": recommend, "preference": preference, "reward": reward}


def max_turn_reward(args) -> float:
    """r_max: each reward term lies in [0, 1], so a turn earns at most the sum of the weights."""
    return args.w_format + args.w_recommend + args.w_preference


def returns_to_go(rewards: list[float], gamma: float, horizon: int | None = None,
                  absorbing_reward: float = 0.0) -> list[float]:
    """[r_1 .. r_n] -> [R_1 .. R_n], R_t = r_t + gamma * R_{t+1}, where an episode that ended by
    success at turn n sits in an absorbing state worth `absorbing_reward` (r_max) on each of the
    horizon - n turns it did not play: R_n = r_n + sum_{k=1..horizon-n} gamma^k r_max.
    By hand (gamma 0.9, T 3, r_max 2.5): success at turn 1 with r_1 = 2 -> R_1 = 2 + 0.9 * 2.5 +
    0.81 * 2.5 = 6.275, above the 4.42 of the target second on all three turns (r = 1.631 each);
    without the credit (horizon None) it was 2.0, below even 2.71 for never listing the target."""
    played = len(rewards)
    padded = list(rewards) + [absorbing_reward] * max((horizon or played) - played, 0)
    out, running = [], 0.0
    for r in reversed(padded):
        running = r + gamma * running
        out.append(running)
    return out[::-1][:played]


def group_advantages(returns: list[list[float]], eps: float = 1e-6) -> tuple[list[list[float]], int, int]:
    """Normalise the returns of one group (its G episodes) turn by turn.
    returns: G lists of R_t (an episode that ended early has fewer) -> (advantages in the same
    shape, groups with zero variance, groups): a (group, turn) whose episodes number fewer than two
    or all have the same return gives advantage 0 (population std)."""
    adv = [[0.0] * len(r) for r in returns]
    zero, total = 0, 0
    for t in range(max(map(len, returns), default=0)):
        played = [g for g, r in enumerate(returns) if len(r) > t]
        values = torch.tensor([returns[g][t] for g in played], dtype=torch.float64)
        total += 1
        std = values.std(unbiased=False).item() if len(played) > 1 else 0.0
        if std < eps:
            zero += 1
            continue
        for g, v in zip(played, ((values - values.mean()) / std).tolist()):
            adv[g][t] = v
    return adv, zero, total


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, n_tokens: int, clip_eps: float,
                kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped policy-gradient loss plus beta * k3, summed over masked tokens and divided by n_tokens.
    logp, old_logp, ref_logp, mask: [B, L] (generated tokens: mask 1); advantages: [B].
    -> (loss: scalar, k3: [B, L] detached, 0 off the mask). On-policy (old = logp, detached) the
    gradient is -A * d logp / n_tokens per token."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    pg = -ratio * a
    if clip_eps > 0:
        pg = torch.maximum(pg, -ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    k3 = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        k3 = torch.exp(d) - d - 1
    per_token = pg + kl_coef * k3 if ref_logp is not None else pg
    return (per_token * mask).sum() / max(n_tokens, 1), (k3 * mask).detach()


# ---- token log-probs of the completions (policy, old policy, reference) ------------------------------


def left_padded(rows: list[tuple[list[int], list[int]]],
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, completion ids) pairs -> input_ids, attention_mask [B, T] left padded (every row
    ends with its completion, as generate made it), completion mask [B, L] over the last L = longest
    completion positions: 1 on each row's own completion tokens, so prompt (dialogue and simulator
    replies) and padding are 0."""
    T = max(len(p) + len(c) for p, c in rows)
    L = max(len(c) for _, c in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    completion = torch.zeros((len(rows), L))
    for b, (p, c) in enumerate(rows):
        seq = p + c
        ids[b, T - len(seq):] = torch.tensor(seq)
        attn[b, T - len(seq):] = 1
        completion[b, L - len(c):] = 1
    return ids, attn, completion


def _chunk_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool):
    """logits [c, n, V] (any dtype), targets [c, n] -> (log p of the targets [c, n] fp32, entropy
    [c, n] without gradient, or None). log-softmax is taken as logit - logsumexp, and the entropy as
    logsumexp - sum p * logit, each with one [c, n, V] fp32 temporary."""
    lg = logits.float()
    if temperature != 1.0:
        lg = lg / temperature
    norm = lg.logsumexp(-1)
    picked = lg.gather(-1, targets[..., None]).squeeze(-1)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = norm - (lg - norm[..., None]).exp_().mul_(lg).sum(-1)
    return picked - norm, ent


def _head_chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                         entropy: bool):
    """hidden [c, n, H] -> _chunk_logprobs of head(hidden)."""
    return _chunk_logprobs(head(hidden), targets, temperature, entropy)


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0, chunk_rows: int = 1, last: int = 0, entropy: bool = False):
    """log p(x_t | x_<t) for t = 1..T-1, in fp32.

    input_ids, attention_mask: [B, T], left or right padded -> [B, T-1], entry t-1 for x_t;
    0 where x_t is padding or the row's first real token (no context to score it against).
    temperature: score under logits / temperature (the distribution sampling used).
    last: score only the last `last` tokens of every row -> [B, last] (a left-padded batch of
    prompt + completion, where completions end every row).
    entropy: also return the policy's entropy at those positions, same shape, without gradient.

    Memory: the logits are never held for the whole batch. The decoder's hidden states [B, n, H]
    go through the LM head `chunk_rows` rows at a time, and with gradients on, each chunk's
    logits are recomputed in the backward pass (activation checkpointing) instead of stored: the
    peak is one chunk's [chunk, n, V] logits, their fp32 copy and gradient, not [B, n, V] of each.
    At Qwen's 152k vocabulary, 8 rows of 256 scored tokens are 1.25 GB of fp32 logits and as much
    again for their gradient; one row is 0.16 GB. Models whose head scales or caps its logits
    (common._SCALED_HEAD_FIELDS) score the model's own logits instead, with the same row chunks.
    """
    n = last or input_ids.shape[1] - 1
    head = common._plain_lm_head(model)
    states = common._scoring_states(model, head, input_ids, attention_mask,
                                    common.position_ids_from_mask(attention_mask),
                                    keep_last=n + 1)[:, -n - 1:-1]  # [B, n, H or V]: x_t's context
    targets = input_ids[:, -n:].to(states.device)
    out, ent = [], []
    for s in range(0, states.shape[0], chunk_rows):
        rows, tgt = states[s:s + chunk_rows], targets[s:s + chunk_rows]
        if head is None:
            lp, h = _chunk_logprobs(rows, tgt, temperature, entropy)
        elif torch.is_grad_enabled():
            lp, h = torch.utils.checkpoint.checkpoint(_head_chunk_logprobs, head, rows, tgt, temperature, entropy,
                                                      use_reentrant=False)
        else:
            lp, h = _head_chunk_logprobs(head, rows, tgt, temperature, entropy)
        out.append(lp)
        ent.append(h)
    # a score needs a real token and a real context: a left-padded row's first token has neither
    valid = (attention_mask[:, -n:] * attention_mask[:, -n - 1:-1]).to(states.device)
    lp = torch.cat(out) * valid
    return (lp, torch.cat(ent) * valid) if entropy else lp


# ---- processes -------------------------------------------------------------------------------------


def init_distributed(args) -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun / accelerate launch (gloo on
    CPU, nccl on CUDA, where each process takes the GPU of its local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_sum(values: list[float], world: int) -> list[float]:
    """Sum a few numbers over processes (identity with one process)."""
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather(obj, world: int) -> list:
    """Every process's `obj` (a list of one with one process)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def in_sync(model, world: int) -> bool:
    """Every process applied the same summed gradients: the copies of the LoRA weights must be equal."""
    if world == 1:
        return True
    checksum = torch.tensor([sum(p.double().sum().item() for p in common.lora_parameters(model))], dtype=torch.float64)
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


# ---- setup: the conversation, start states, resuming -------------------------------------------------


def environment(args) -> SimpleNamespace:
    """args and the fixed ENVIRONMENT together, as common.load_conversation reads them."""
    return SimpleNamespace(**asdict(args), **ENVIRONMENT)


def load_environment(run: common.RunPaths, items: list[dict], args,
                     main_process: bool = True) -> tuple[common.Conversation, dict, str]:
    """One base carrying the policy (live, set to the SFT adapter), the reference (the SFT adapter's
    frozen weights) and the simulator (frozen), with the retriever, in a Conversation.
    -> (conversation, reference weights, where a training dialogue's candidates come from)."""
    conversation, weights = common.load_conversation(run, ["recommender_sft", "simulator"], items, environment(args))
    conversation.simulator_weights = weights["simulator"]
    common.set_lora_weights(conversation.model, weights["recommender_sft"])
    # a training dialogue's candidates come from the 03 retriever fold that never saw it, or its
    # targets would be ranked first far more often than a test dialogue's (docs/design.md section 5)
    folds = len(conversation.retriever.fold_nets)
    if main_process and not folds:
        print(f"[04] warning: {run.retriever / 'fused' / 'folds'} is missing: training episodes get candidates from "
              "the retriever that trained on them. Rerun `03_sft_recommender.py --parts retriever` to cross-fit it.")
    source = f"out of fold ({folds} cross-fitted retrievers)" if folds else "the full retriever (in sample)"
    return conversation, weights["recommender_sft"], source


def start_states(conversation: common.Conversation, run: common.RunPaths, world: int,
                 args) -> tuple[list[dict], list[dict], dict]:
    """Training start states (samples with a true target) and --eval-samples validation states (a seeded
    draw among valid samples with a new target), both kept by the --start-states rule: with reachable,
    only states whose first-turn candidates hold a target. Out of fold, most training states hold none
    (docs/design.md section 5), and a group of those can differ in format and preference only; on
    reachable validation states hit@10 against the retriever's own order measures the re-ranking alone.
    -> (train, held_out, {"start_states": {rule, of, kept}, "eval_states": {rule, of, kept, drawn}})"""
    train = [s for s in common.load_samples(run, "train") if common.sample_truth(s)]
    valid = [s for s in common.load_samples(run, "valid") if s["new_targets"]] if args.eval_samples else []
    kept = common.keep_states(conversation, train, args.start_states)
    if len(kept) < args.prompts * world:
        raise SystemExit(f"error: only {len(kept)} training states pass --start-states {args.start_states} with "
                         f"{args.candidates} candidates; use --start-states all or more --candidates")
    valid_kept = common.keep_states(conversation, valid, args.start_states) if valid else valid
    held_out = common.draw_samples(valid_kept, args.eval_samples, args.seed)
    return kept, held_out, {"start_states": {"rule": args.start_states, "of": len(train), "kept": len(kept)},
                            "eval_states": {"rule": args.start_states, "of": len(valid), "kept": len(valid_kept),
                                            "drawn": len(held_out)}}


def resume(out_dir, model, optimizer, same_run: dict, main_process: bool) -> tuple[int, list[dict]]:
    """(step, log rows) of out_dir/checkpoint/ when a checkpoint of the same settings is there, else (0, []).
    Process 0 rewrites train_log.jsonl with those rows: rows logged after the checkpoint are dropped."""
    ckpt_dir, step, rows = out_dir / "checkpoint", 0, []
    if (ckpt_dir / "checkpoint.pt").exists():
        step, extra = common.load_checkpoint(ckpt_dir, model, optimizer)
        if extra.get("same_run") != same_run:
            raise SystemExit(f"error: {ckpt_dir} was written with other settings {extra.get('same_run')}; "
                             "rerun with those, or delete the checkpoint folder to start over")
        rows = extra["log"]
        if main_process:
            print(f"[04] resuming from {ckpt_dir} at step {step}")
    if main_process:
        common.write_jsonl(out_dir / "train_log.jsonl", rows)
    return step, rows


def append_log(out_dir, rows: list[dict], row: dict) -> None:
    """One row more in train_log.jsonl and in `rows` (which the checkpoint carries)."""
    rows.append(row)
    with open(out_dir / "train_log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


# ---- one step: rollout, scores, update ----------------------------------------------------------------


def draw_samples(train: list[dict], step: int, rank: int, world: int, args) -> list[dict]:
    """This process's --prompts start states of `step`, from (seed, step) alone; reseeds torch and random
    from (seed, step, rank), so a resumed run samples what an uninterrupted one does."""
    common.set_seed(args.seed * 1_000_003 + step * 1_009 + rank)
    draw = random.Random(args.seed * 1_000_003 + step).sample(range(len(train)), args.prompts * world)
    return [train[i] for i in draw[rank::world]]


def decoding_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype the sampled rollouts decode in: bf16 where the device multiplies it natively (CUDA,
    or a CPU with AVX512-BF16 or AMX), else None (the model's own). A decode step is bound by the
    bytes it streams, and a bf16 step streams half of an fp32 one (bench/generate.py). Training and
    the RL log-probs stay in the model's dtype; the sampling policy differs from it by a small
    per-token KL (docs/findings.md: bf16 decoding)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def rollout(conversation: common.Conversation, samples: list[dict], policy: dict, args) -> list[list[common.Episode]]:
    """G episodes per start state with the policy sampling -> one group (list of G episodes) per sample."""
    # bf16 where the hardware has it: rollouts decode twice as fast, the update stays in fp32
    episodes = conversation.play(common.start_episodes(samples, args.group_size), args.turns, policy,
                                 temperature=args.temperature, stop_on_success=True,
                                 dtype=decoding_dtype(conversation.model.device))
    return [episodes[i:i + args.group_size] for i in range(0, len(episodes), args.group_size)]


def score_groups(groups: list[list[common.Episode]], items: list[dict], args) -> tuple[list[dict], dict]:
    """Rewards, returns and advantages of every recommender turn.
    -> (one training row {prompt_ids, completion_ids, advantage} per turn,
        raw statistics of this process's episodes, merged over processes by summarize)"""
    rows = []
    raw = {"terms": [], "returns": [], "hits": [], "success_advantages": [], "zero_variance_groups": 0, "groups": 0}
    for group in groups:
        rewards = [[turn_reward(t, e.truth, items, args) for t in e.turns] for e in group]
        # an episode that ended by success is credited r_max for the turns it did not play
        returns = [returns_to_go([r["reward"] for r in rs], args.gamma, args.turns if e.done else None,
                                 max_turn_reward(args)) for e, rs in zip(group, rewards)]
        adv, zero, total = group_advantages(returns)
        raw["zero_variance_groups"] += zero
        raw["groups"] += total
        for e, rs, rets, advs in zip(group, rewards, returns, adv):
            raw["terms"] += rs
            raw["returns"].append(rets[0])
            raw["hits"].append(episode_hits(e, args.turns))
            if e.done:  # the advantage of the turn that ranked the target first: it should be high
                raw["success_advantages"].append(advs[-1])
            for t, a in zip(e.turns, advs):
                rows.append({"prompt_ids": t["prompt_ids"], "completion_ids": t["completion_ids"], "advantage": a})
    raw["tokens_generated"] = sum(len(r["completion_ids"]) for r in rows)
    return rows, raw


def episode_hits(e: common.Episode, turns: int) -> list[tuple[bool, bool, bool, bool]]:
    """(a true target at rank 1, one in the top 10, one among the K candidates, one in the
    candidates' first 10) after each turn, on the scored list (parsed titles, then the retriever's
    order; a finished episode keeps its list). The third is the ceiling of the second; the fourth
    is the hit@10 of the retriever's own order on the same turn, what re-ranking is measured against."""
    out = []
    for t in range(1, turns + 1):
        ranked, candidates = e.ranking_at(t), e.turns[min(t, len(e.turns)) - 1]["candidates"]
        out.append((ranked[0] in e.truth, any(i in e.truth for i in ranked[:10]),
                    any(i in e.truth for i in candidates), any(i in e.truth for i in candidates[:10])))
    return out


def summarize(raws: list[dict]) -> dict:
    """Step statistics from the raw statistics of every process: mean reward and each term per
    turn played, mean return R_1 per episode, hit@1, hit@10, target_in_candidates (the
    retriever's recall of K) and retriever_hit@10 (its own order's) by turn, zero-variance groups,
    episodes ended by success and the mean advantage of their success turn."""
    terms = [t for r in raws for t in r["terms"]]
    hits = [h for r in raws for h in r["hits"]]
    returns = [x for r in raws for x in r["returns"]]
    out = {k: sum(t[k] for t in terms) / len(terms) for k in ("reward", "format", "recommend", "preference")}
    out["return"] = sum(returns) / len(returns) if returns else None
    for i, name in enumerate(("hit@1", "hit@10", "target_in_candidates", "retriever_hit@10")):  # episode_hits' order
        out[name] = [sum(h[t][i] for h in hits) / len(hits) for t in range(len(hits[0]))]
    for k in ("zero_variance_groups", "groups", "tokens_generated"):
        out[k] = sum(r[k] for r in raws)
    out["zero_variance_fraction"] = out["zero_variance_groups"] / max(out["groups"], 1)
    successes = [a for r in raws for a in r.get("success_advantages", [])]
    out["success_episodes"] = len(successes)
    out["success_advantage"] = sum(successes) / len(successes) if successes else None
    out["turns_played"], out["episodes"] = len(terms), len(hits)
    return out


def micro_batches(rows: list[dict], pad_id: int, args) -> tuple[list[list[dict]], list[list[torch.Tensor]]]:
    """The rows a pass trains on in --micro-batch chunks, and each chunk's [ids, attn, completion mask]
    (left_padded, on args.device). With no KL term, rows with advantage 0 have no gradient and are left out."""
    active = [r for r in rows if r["completion_ids"] and (args.kl_coef > 0 or r["advantage"] != 0)]
    chunks = [active[s:s + args.micro_batch] for s in range(0, len(active), args.micro_batch)]
    return chunks, [[t.to(args.device) for t in left_padded([(r["prompt_ids"], r["completion_ids"]) for r in chunk],
                                                             pad_id)] for chunk in chunks]


def score_reference(model, reference: dict, chunks: list[list[dict]], batches: list, args) -> None:
    """row["ref_logp"] [L] of every row: the reference's log-probs, all micro-batches under one swap of its
    adapter (it is fixed, and each swap copies the adapters between devices)."""
    with torch.no_grad(), common.lora_swapped(model, reference):
        for chunk, (ids, attn, mask) in zip(chunks, batches):
            for r, lp in zip(chunk, token_logprobs(model, ids, attn, args.temperature, last=mask.shape[1])):
                r["ref_logp"] = lp


def policy_update(model, rows: list[dict], reference: dict | None, optimizer, pad_id: int, world: int,
                  args) -> dict:
    """--updates optimizer steps on one batch of recommender turns; returns KL, entropy, ratio stats.
    The first pass is on-policy: its log-probs (before any step) are pi_old for the later passes."""
    n_tokens = int(all_sum([sum(len(r["completion_ids"]) for r in rows)], world)[0])
    chunks, batches = micro_batches(rows, pad_id, args)
    params = common.lora_parameters(model)
    sums = {"kl": 0.0, "entropy": 0.0, "clipped": 0.0, "tokens": 0.0, "loss": 0.0}
    model.train()
    if args.kl_coef > 0 and chunks:
        score_reference(model, reference, chunks, batches, args)
    for update in range(args.updates):
        for chunk, (ids, attn, mask) in zip(chunks, batches):
            adv = torch.tensor([r["advantage"] for r in chunk], device=args.device)
            ref_logp = torch.stack([r["ref_logp"] for r in chunk]) if args.kl_coef > 0 else None
            logp, entropy = token_logprobs(model, ids, attn, args.temperature, last=mask.shape[1], entropy=True)
            if update == 0:
                for r, lp in zip(chunk, logp.detach()):
                    r["old_logp"] = lp
            old = torch.stack([r["old_logp"] for r in chunk])
            loss, k3 = policy_loss(logp, old, ref_logp, adv, mask, n_tokens, args.clip_eps, args.kl_coef)
            loss.backward()
            if update == 0:
                sums["kl"] += k3.sum().item()
                sums["entropy"] += (entropy * mask).sum().item()
                sums["tokens"] += mask.sum().item()
            ratio = torch.exp(logp.detach() - old)
            sums["clipped"] += (((ratio - 1).abs() > args.clip_eps) * mask).sum().item() if args.clip_eps > 0 else 0.0
            sums["loss"] += loss.item()
        if world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)  # the norm before clipping
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    kl, ent, clipped, tokens, loss = all_sum([sums[k] for k in ("kl", "entropy", "clipped", "tokens", "loss")], world)
    return {"kl": kl / max(tokens, 1), "entropy": ent / max(tokens, 1), "loss": loss / args.updates,
            "clipped_fraction": clipped / max(tokens * args.updates, 1), "grad_norm": float(grad_norm),
            "trained_turns": sum(map(len, chunks))}


def validate(conversation: common.Conversation, samples: list[dict], policy: dict, items: list[dict], args) -> dict:
    """Greedy episodes of the current policy on held-out start states, ended by success as in
    training, decoded as 05 decodes (greedy, its loop guard): reward terms, hit@1/@10 by turn
    (summarize), the parse rate and the seconds taken."""
    started = time.time()
    episodes = conversation.play(common.start_episodes(samples), args.turns, policy, progress="validation",
                                 stop_on_success=True)
    stats = summarize([{"terms": [turn_reward(t, e.truth, items, args) for e in episodes for t in e.turns],
                        "returns": [], "hits": [episode_hits(e, args.turns) for e in episodes],
                        "zero_variance_groups": 0, "groups": 0, "tokens_generated": 0}])
    keep = ("reward", "format", "recommend", "preference", "hit@1", "hit@10", "target_in_candidates",
            "retriever_hit@10", "episodes")
    return {"valid": {k: stats[k] for k in keep} | {"parse_rate": stats["format"]},
            "seconds_validating": round(time.time() - started, 2)}


def finish(model, out_dir, config: dict, log_rows: list[dict], world: int, main_process: bool,
           started: float, args) -> dict:
    """Process 0 writes the policy's adapter (PEFT layout) and completes rl_config.json; -> the run's result."""
    synced = in_sync(model, world)
    result = {"steps_done": args.steps, "world_size": world, "in_sync": synced}
    if main_process:
        common.save_lora(model, out_dir, {"base_model_name_or_path": config["base_model"]})
        config.update(finished=True, processes_in_sync=synced, seconds=round(time.time() - started, 1))
        common.write_json(out_dir / "rl_config.json", config)
        trained = [r for r in log_rows if r["step"] > 0]
        summary = ""
        if trained:  # none with --steps 0: only the SFT start is validated (and written back as the adapter)
            first, final = trained[0], trained[-1]
            summary = (f"reward {first['reward']:.3f} -> {final['reward']:.3f}, hit@10 at turn {args.turns} "
                       f"{first['hit@10'][-1]:.3f} -> {final['hit@10'][-1]:.3f}; ")
        print(f"[04] {summary}wrote {out_dir}/ in {config['seconds']} s")
        result["log"] = log_rows
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    args.run_dir = common.default_run_dir(args.dataset, args.run_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.temperature <= 0:
        raise SystemExit("error: --temperature must be > 0: the policy gradient needs sampled episodes")
    if min(args.w_format, args.w_recommend, args.w_preference) < 0:
        raise SystemExit("error: the reward weights --w-format, --w-recommend, --w-preference must be >= 0 "
                         "(r_max, the absorbing success's credit, is their sum)")
    rank, world = init_distributed(args)
    main_process, started = rank == 0, time.time()
    run = common.RunPaths(args.run_dir)
    out_dir = run.root / args.out

    # 1. One base, three adapters (policy from the SFT adapter, frozen reference, frozen simulator), the
    #    retriever, and the start states: training samples with a target, held-out validation ones.
    items = common.load_items(run)
    conversation, reference, train_candidates = load_environment(run, items, args, main_process)
    model = conversation.model
    if args.gradient_checkpointing:
        common.enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(common.lora_parameters(model), lr=args.lr, weight_decay=0.0)
    train, held_out, states = start_states(conversation, run, world, args)
    if main_process:
        print(f"[04] {len(items)} items; start states: {len(train)} ({args.start_states}); validation: "
              f"{len(held_out)}; {world} process(es) x {args.prompts} x G={args.group_size} x T={args.turns} turns")

    # 2. Resume from out_dir/checkpoint/ when a checkpoint of the same settings is there. The settings
    #    go to rl_config.json now, so a run killed early still says what it was.
    same_run = {k: getattr(args, k) for k in SAME_RUN} | {"world_size": world}
    step, log_rows = resume(out_dir, model, optimizer, same_run, main_process)
    config = {"args": asdict(args), "prompt_version": common.REC_PROMPT_VERSION, "base_model": conversation.base_model,
              "world_size": world, "train_candidates": train_candidates, **states, "finished": False}
    if main_process:
        common.write_json(out_dir / "rl_config.json", config)

    # 3. Where the curves start: the SFT adapter's greedy validation, as step 0.
    if main_process and held_out and not log_rows:
        append_log(out_dir, log_rows, {"step": 0, **validate(conversation, held_out, reference, items, args)})

    # 4. The loop: rollouts with the simulator in the loop -> rewards -> returns-to-go (success absorbing)
    #    -> group-normalised advantages -> clipped token loss + beta * k3 -> AdamW step.
    bar = tqdm(range(step, args.steps), desc="RL", initial=step, total=args.steps, disable=not main_process)
    for step in bar:
        samples = draw_samples(train, step, rank, world, args)
        t0 = time.time()
        groups = rollout(conversation, samples, common.get_lora_weights(model, device="cpu"), args)
        rows, raw = score_groups(groups, items, args)
        t1 = time.time()
        update = policy_update(model, rows, reference, optimizer, conversation.tok.pad_token_id, world, args)
        t2 = time.time()
        row = {"step": step + 1, **summarize(gather(raw, world)), **update,
               "seconds_generating": round(t1 - t0, 2), "seconds_training": round(t2 - t1, 2)}
        last = step + 1 == args.steps
        if main_process:
            if held_out and (last or (args.eval_every and (step + 1) % args.eval_every == 0)):
                row.update(validate(conversation, held_out, common.get_lora_weights(model, device="cpu"), items, args))
            append_log(out_dir, log_rows, row)
            bar.set_postfix(reward=f"{row['reward']:.3f}", hit10=f"{row['hit@10'][-1]:.2f}", kl=f"{row['kl']:.4f}")
            if (step + 1) % args.save_every == 0 or last:
                common.save_checkpoint(out_dir / "checkpoint", step + 1, common.lora_state_dict(model), optimizer,
                                       extra={"same_run": same_run, "log": log_rows})
        if world > 1:
            dist.barrier()

    # 5. The policy's adapter in PEFT layout.
    return finish(model, out_dir, config, log_rows, world, main_process, started, args)


if __name__ == "__main__":
    main()
