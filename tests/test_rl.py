"""04_rl_multiturn.py: rewards, returns, advantages and the loss checked by hand; token log-probs against
a per-sequence loop; the loss mask on a real rollout; KL before the first update; one update changes the
LoRA weights and nothing else; a killed run resumes to the weights of an uninterrupted one; two processes
stay in sync; 05's SMTPO rows."""
import importlib
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import common

rl = importlib.import_module("04_rl_multiturn")
evaluate = importlib.import_module("05_eval")
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["Alien", "Brazil", "Casablanca", "Dunkirk", "Eraserhead", "Fargo", "Gravity", "Hereditary", "Inception",
         "Jaws", "Krull", "Labyrinth", "Memento", "Nosferatu"]  # distinct enough for the fuzzy title match
ITEMS = [{"title": f"{name} ({2000 + i})", "genres": ["comedy" if i % 2 else "drama"],
          "directors": [f"Director {name}"], "stars": [f"Star {name}"]} for i, name in enumerate(NAMES)]
CANDIDATES = list(range(12))  # items 12 and 13 are not candidates
WEIGHTS = SimpleNamespace(w_format=1.0, w_recommend=1.0, w_preference=0.5)
RUN_PARTS = ("data", "retriever", "simulator", "recommender_sft")


def answer(ids, preference="comedy") -> str:
    return (f"Preference: {preference}\nRanking: ...\n<answer>\n"
            + "\n".join(f"{n}. {ITEMS[i]['title']}" for n, i in enumerate(ids, 1)) + "\n</answer>")


def reward(text: str, truth: list[int]) -> dict:
    parsed = common.parse_recommendation(text, common.TitleIndex(ITEMS), CANDIDATES)
    return rl.turn_reward({"parsed": parsed}, truth, ITEMS, WEIGHTS)


# ---- rewards, returns, advantages, loss ------------------------------------------------------------


def test_rewards_on_hand_made_answers():
    ten = [3, 0, 1, 2, 4, 5, 6, 7, 8, 9]
    first = reward(answer(ten, "comedy, Director Dunkirk"), [3])
    # Dunkirk (item 3) is a comedy by Director Dunkirk with Star Dunkirk: claimed {comedy, director dunkirk}
    # -> F1 = 2 * 2 / (2 + 3)
    assert first == pytest.approx({"format": 1.0, "recommend": 1.0, "preference": 0.8, "reward": 1 + 1 + 0.5 * 0.8})
    seventh = reward(answer(ten), [ten[6]])
    assert seventh["format"] == 1.0 and seventh["recommend"] == pytest.approx(1 / 3)  # 1 / log2(1 + 7)
    assert reward(answer(ten), [11])["recommend"] == 0.0  # a candidate the list leaves out
    no_tags = reward("Preference: comedy\n1. Dunkirk (2003)", [3])
    assert no_tags["format"] == 0.0 and no_tags["recommend"] == 0.0  # no list to read without tags
    duplicate = reward(answer([3, 3, 1, 2, 4, 5, 6, 7, 8, 9]), [3])
    assert duplicate["format"] == 0.0 and duplicate["recommend"] == 1.0  # listed first, but malformed
    outside = reward(answer([13, 0, 1, 2, 4, 5, 6, 7, 8, 9]), [13])
    assert outside["format"] == 0.0 and outside["recommend"] == 0.0  # not a candidate: no credit
    assert reward(answer(ten, "nothing specific yet"), [3])["preference"] == 0.0
    assert reward(answer(ten[:9]), [3])["format"] == 0.0  # nine titles


def test_returns_to_go_and_group_advantages_by_hand():
    assert rl.returns_to_go([1.0, 0.0, 2.0], 0.5) == pytest.approx([1.5, 1.0, 2.0])
    # four episodes; turn 1 returns 1, 0, 0, 0 -> mean 0.25, population std sqrt(3)/4;
    # turn 2 played by two episodes with 2 and 2 (zero variance), turn 3 by one (zero variance)
    adv, zero, total = rl.group_advantages([[1.0, 2.0, 5.0], [0.0, 2.0], [0.0], [0.0]])
    s = math.sqrt(3) / 4
    assert adv[0][0] == pytest.approx(0.75 / s) and adv[1][0] == pytest.approx(-0.25 / s)
    assert adv[0][1:] == [0.0, 0.0] and adv[1][1] == 0.0 and [len(a) for a in adv] == [3, 2, 1, 1]
    assert (zero, total) == (2, 3)


def success_group(turns: int) -> list[list[float]]:
    """The returns of one group at the default weights (format 1, recommend 1, preference 0.5; every
    answer parses, claims no preference): the target first at turn 1 (success: the episode ends),
    second every turn, tenth every turn, never listed."""
    r_max = rl.max_turn_reward(WEIGHTS)
    second, tenth, never = 1 + 1 / math.log2(3), 1 + 1 / math.log2(11), 1.0
    played_on = [rl.returns_to_go([r] * turns, 0.9) for r in (second, tenth, never)]
    return [rl.returns_to_go([2.0], 0.9, turns, r_max)] + played_on


@pytest.mark.parametrize("turns", [2, 3, 5])
def test_success_is_absorbing_and_earns_the_highest_return_and_advantage(turns):
    returns = success_group(turns)
    # by hand: R_1 of the success = 2 + sum_{k=1..T-1} 0.9^k * 2.5 (r_max of the weights 1, 1, 0.5)
    assert returns[0] == pytest.approx([2 + sum(0.9 ** k * 2.5 for k in range(1, turns))])
    assert [len(r) for r in returns] == [1] + [turns] * 3  # the success played one turn
    first_turn = [r[0] for r in returns]
    assert first_turn[0] == max(first_turn) and first_turn.count(first_turn[0]) == 1
    adv, _, _ = rl.group_advantages(returns)
    assert adv[0][0] == max(a[0] for a in adv) and adv[0][0] > 0


def test_without_the_absorbing_credit_success_scored_lowest():
    """The defect the absorbing state fixes (T 3, the issue's table): without crediting the unplayed
    turns, success at turn 1 (R_1 2.00) had the group's lowest advantage, below never listing the target."""
    second, tenth = 1 + 1 / math.log2(3), 1 + 1 / math.log2(11)
    old = [rl.returns_to_go(r, 0.9) for r in ([2.0], [second] * 3, [tenth] * 3, [1.0] * 3)]
    assert [round(r[0], 2) for r in old] == [2.00, 4.42, 3.49, 2.71]
    adv, _, _ = rl.group_advantages(old)
    assert [a[0] for a in adv] == pytest.approx([-1.28, 1.40, 0.38, -0.50], abs=0.01)  # the table's, to its rounding
    # with the credit (horizon 3, r_max 2.5): 6.275, the group's highest
    assert rl.returns_to_go([2.0], 0.9, 3, 2.5) == pytest.approx([6.275])
    # an episode that played every turn gets no credit, whatever the horizon says
    assert rl.returns_to_go([1.0, 2.0, 3.0], 0.9, 3, 2.5) == rl.returns_to_go([1.0, 2.0, 3.0], 0.9)


def test_score_groups_credits_the_turns_a_success_did_not_play():
    """score_groups on hand-made episodes (T 3): one ends by success at turn 1, one plays all three
    turns with the target second; the success's turn-1 return carries r_max for turns 2 and 3."""
    ten = [3, 0, 1, 2, 4, 5, 6, 7, 8, 9]
    titles = common.TitleIndex(ITEMS)

    def turn(ids):
        return {"parsed": common.parse_recommendation(answer(ids, "nothing"), titles, CANDIDATES),
                "prompt_ids": [1], "completion_ids": [2], "candidates": CANDIDATES, "ranked": ids}

    sample = {"context": [], "new_targets": [3], "targets": [3]}
    success = common.Episode(sample, [], [3], turns=[turn(ten)], done=True)
    second = [0, 3, 1, 2, 4, 5, 6, 7, 8, 9]
    played = common.Episode(sample, [], [3], turns=[turn(second)] * 3)
    args = SimpleNamespace(**vars(WEIGHTS), gamma=0.9, turns=3)
    rows, raw = rl.score_groups([[success, played]], ITEMS, args)
    r2 = 1 + 1 / math.log2(3)
    assert raw["returns"] == pytest.approx([2 + 0.9 * 2.5 + 0.81 * 2.5, r2 * (1 + 0.9 + 0.81)])
    assert [r["advantage"] for r in rows] == pytest.approx([1.0, -1.0, 0.0, 0.0])  # two episodes at turn 1
    stats = rl.summarize([raw])
    assert stats["success_episodes"] == 1 and stats["success_advantage"] == pytest.approx(1.0)


def test_policy_loss_gradient_and_clipping_by_hand():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, k3 = rl.policy_loss(logp, logp.detach(), logp.detach(), adv, mask, n_tokens=5, clip_eps=0.2, kl_coef=0.1)
    loss.backward()
    # on-policy: loss = -sum(A * mask) / N, gradient -A / N on each generated token; k3 = 0 at pi = pi_ref
    assert loss.item() == pytest.approx(-(2 * 2 - 1 * 3) / 5)
    assert torch.allclose(logp.grad, torch.tensor([[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]]))
    assert torch.equal(k3, torch.zeros_like(k3))
    # a ratio of 2 with A > 0 is clipped at 1.2 (no gradient); A < 0 keeps the unclipped -2 * A
    new = torch.log(torch.tensor([[2.0], [2.0]])).requires_grad_()
    loss, _ = rl.policy_loss(new, torch.zeros(2, 1), None, torch.tensor([1.0, -1.0]), torch.ones(2, 1), 2, 0.2, 0.0)
    assert loss.item() == pytest.approx((-1.2 + 2.0) / 2)
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[1, 0] == pytest.approx(2.0 / 2)  # d(2 * e^x)/dx / N at x = log 2
    # k3 of a policy below the reference: pi_ref / pi - log(pi_ref / pi) - 1
    _, k3 = rl.policy_loss(torch.tensor([[-2.0]]), torch.tensor([[-2.0]]), torch.tensor([[-1.0]]), torch.tensor([0.0]),
                           torch.ones(1, 1), 1, 0.0, 1.0)
    assert k3.item() == pytest.approx(math.e - 1 - 1)


# ---- token log-probs of a left-padded batch (a tiny random model with SmolLM2's tokenizer) ------------

CHATS = [[{"role": "user", "content": "I like horror films from the eighties."}], [{"role": "user", "content": "hi"}],
         [{"role": "user", "content": "a much longer question about many many movies " * 3}]]


@pytest.fixture(scope="module")
def tiny_lm():
    """(tokenizer, a tiny random Llama, the CHATS as token ids of different lengths)."""
    tok = common.load_tokenizer(common.DEFAULT_LLM)
    model, _ = common.tiny_causal_lm(tok, seed=0)
    seqs = [tok(common.render_chat(tok, c, True), add_special_tokens=False)["input_ids"] for c in CHATS]
    return tok, model, seqs


def test_token_logprobs_match_a_per_sequence_loop(tiny_lm):
    tok, model, seqs = tiny_lm
    ids, mask, _ = rl.left_padded([(s, []) for s in seqs], tok.pad_token_id)
    lp = rl.token_logprobs(model, ids, mask, chunk_rows=2)
    assert lp.shape == (len(seqs), ids.shape[1] - 1) and lp.dtype == torch.float32
    T = ids.shape[1]
    for b, s in enumerate(seqs):  # each sequence alone, unpadded
        with torch.no_grad():
            logits = model(torch.tensor([s])).logits[0].float()
            hf_loss = model(torch.tensor([s]), labels=torch.tensor([s])).loss
        manual = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(s[1:])[:, None]).squeeze(-1)
        assert torch.allclose(lp[b, T - len(s):], manual, atol=1e-5)
        assert (lp[b, :T - len(s)] == 0).all()  # padding and the first real token score 0
        assert torch.allclose(-lp[b, T - len(s):].mean(), hf_loss, atol=1e-5)


def test_token_logprobs_of_greedy_completions_are_the_rows_maxima(tiny_lm):
    """The RL path: left-padded prompt + generated completion. Under greedy decoding every completion
    token is the argmax, so it has its position's highest log-prob."""
    tok, model, _ = tiny_lm
    _, prompt_ids, completion_ids = common.generate(model, tok, CHATS, max_new_tokens=6, return_tokens=True)
    ids, mask, completion = rl.left_padded(list(zip(prompt_ids, completion_ids)), tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=common.position_ids_from_mask(mask)).logits
    best = torch.log_softmax(logits[:, :-1].float(), -1).max(-1).values[:, -completion.shape[1]:]
    lp = rl.token_logprobs(model, ids, mask, last=completion.shape[1])
    assert completion.sum() > 0 and torch.allclose(lp * completion, best * completion, atol=1e-5)


def test_token_logprobs_entropy_row_chunks_and_recomputed_head(tiny_lm, monkeypatch):
    """The entropy (logsumexp - sum p * logit, in place) is the categorical entropy of the same logits;
    scoring 1 or 2 rows at a time through the recomputed (checkpointed) LM head, or through the
    model's own logits (the path of a scaled head), gives the same log-probs and LoRA gradients."""
    tok, _, seqs = tiny_lm
    model, _ = common.tiny_causal_lm(tok, seed=0)  # its own copy: LoRA is added to it
    common.add_lora(model, r=4, alpha=8, dropout=0.0)
    for _, m in common.lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)  # non-zero, so the LoRA gradients depend on every row
    ids, mask, _ = rl.left_padded([(s, []) for s in seqs], tok.pad_token_id)

    def score(chunk):
        model.zero_grad(set_to_none=True)
        lp, ent = rl.token_logprobs(model, ids, mask, temperature=0.7, chunk_rows=chunk, last=5, entropy=True)
        lp.sum().backward()
        return lp.detach(), ent, [p.grad.clone() for p in common.lora_parameters(model)]

    results = [score(1), score(2)]
    monkeypatch.setattr(common, "_plain_lm_head", lambda model: None)
    results.append(score(2))
    lp1, ent1, g1 = results[0]
    for lp, ent, g in results[1:]:
        assert torch.allclose(lp1, lp, atol=1e-5) and torch.allclose(ent1, ent, atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g))
    assert any(g.abs().sum() > 0 for g in g1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=common.position_ids_from_mask(mask)).logits
    expected = torch.distributions.Categorical(logits=logits[:, -6:-1].float() / 0.7).entropy()
    assert ent1.shape == (len(seqs), 5) and (ent1 > 0).all()
    assert torch.allclose(ent1, expected, atol=1e-4)


# ---- on a rollout with the tiny model, real data, retriever and simulator ----------------------------


def rl_args(run_dir: Path, **overrides) -> list[str]:
    flags = {"steps": 2, "prompts": 2, "group_size": 2, "turns": 2, "max_new_tokens": 12, "micro_batch": 3,
             "eval_samples": 2, "save_every": 1, "lr": 1e-2, "kl_coef": 0.1, **overrides}
    return (["--dataset", "inspired", "--run-dir", str(run_dir), "--model", "tiny", "--threads", "1"]
            + [x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v))])


# a reward that differs between sampled answers of the tiny model (its real rewards are all 0,
# which would leave every advantage, and so every gradient, at 0); shared with the torchrun driver
varied_reward = importlib.import_module("rl_varied_reward").varied_reward


@pytest.fixture(scope="module")
def rollout(inspired_tiny_adapters):
    """A conversation with the tiny policy, simulator and retriever, and one step's rollout."""
    run = common.RunPaths(inspired_tiny_adapters)
    args = common.parse_args(rl.Args, rl_args(inspired_tiny_adapters))
    items = common.load_items(run)
    conversation, reference, _ = rl.load_environment(run, items, args)  # the policy starts as the SFT adapter
    train = [s for s in common.load_samples(run, "train")[:60] if common.sample_truth(s)]
    torch.manual_seed(0)
    groups = rl.rollout(conversation, train[:2], common.get_lora_weights(conversation.model), args)
    return SimpleNamespace(conversation=conversation, reference=reference, groups=groups, args=args, items=items)


def test_rollout_groups_and_loss_mask_cover_recommender_tokens_only(rollout):
    groups, tok = rollout.groups, rollout.conversation.tok
    assert len(groups) == 2 and all(len(g) == 2 for g in groups)
    assert all(e.sample is g[0].sample for g in groups for e in g)  # a group shares its start state
    rows, raw = rl.score_groups(groups, rollout.items, rollout.args)
    assert len(rows) == len(raw["terms"]) == sum(len(e.turns) for g in groups for e in g)
    second = [(e, e.turns[1]) for g in groups for e in g if len(e.turns) > 1]
    assert second, "no episode reached turn 2 (tiny model ranked a target first every time?)"
    pairs = [(t["prompt_ids"], t["completion_ids"]) for g in groups for e in g for t in e.turns]
    ids, attn, mask = rl.left_padded(pairs, tok.pad_token_id)
    L = mask.shape[1]
    for b, (p, c) in enumerate(pairs):
        picked = ids[b, -L:][mask[b].bool()].tolist()
        assert picked == c  # exactly the generated tokens, in order
    # the simulator's reply reaches the next turn's prompt, which the mask leaves out
    e, turn2 = second[0]
    reply = e.turns[0]["reply"]
    assert reply in tok.decode(turn2["prompt_ids"]) and reply not in tok.decode(turn2["completion_ids"])
    # token_logprobs(last=L) over the mask equals the completion's score taken from the whole sequence's
    model = rollout.conversation.model
    with torch.no_grad():
        lp = rl.token_logprobs(model, ids, attn, last=L)
        whole = rl.token_logprobs(model, ids, attn)  # [B, T-1]: entry t-1 scores x_t
    assert torch.allclose((lp * mask).sum(-1), (whole[:, -L:] * mask).sum(-1), atol=1e-4)


def test_kl_is_zero_before_the_first_update_and_one_update_changes_only_lora(rollout):
    model, args = rollout.conversation.model, rollout.args
    reference = rollout.reference
    common.set_lora_weights(model, reference)
    rows, _ = rl.score_groups(rollout.groups, rollout.items, args)
    for n, r in enumerate(rows):  # advantages of both signs so that the step has a gradient
        r["advantage"] = 1.0 if n % 2 else -1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = set(common.lora_state_dict(model))
    optimizer = torch.optim.AdamW(common.lora_parameters(model), lr=1e-2)
    pad_id = rollout.conversation.tok.pad_token_id
    stats = rl.policy_update(model, [dict(r) for r in rows], reference, optimizer, pad_id, 1, args)
    assert stats["kl"] == 0.0 and stats["entropy"] > 0 and stats["trained_turns"] == len(rows)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= lora  # LoRA moved, nothing else did
    assert not any(torch.equal(before[k], after[k]) for k in lora if k.endswith("lora_B.weight"))
    second = rl.policy_update(model, [dict(r) for r in rows], reference, optimizer, pad_id, 1, args)
    assert second["kl"] > 0  # the policy has left the reference
    common.set_lora_weights(model, reference)


def test_the_reference_is_swapped_in_once_per_update_and_scores_every_micro_batch(rollout, monkeypatch):
    model, args = rollout.conversation.model, rollout.args
    reference, pad_id = rollout.reference, rollout.conversation.tok.pad_token_id
    rows, _ = rl.score_groups(rollout.groups, rollout.items, args)
    for n, r in enumerate(rows):
        r["advantage"] = 1.0 if n % 2 else -1.0
    assert len(rows) > args.micro_batch  # several micro-batches
    policy = {k: v + 0.01 for k, v in reference.items()}  # a policy that has left the reference
    common.set_lora_weights(model, policy)
    swaps, swapped = [], common.lora_swapped
    monkeypatch.setattr(common, "lora_swapped", lambda m, w: swaps.append(w) or swapped(m, w))
    batch = [dict(r) for r in rows]
    rl.policy_update(model, batch, reference, torch.optim.SGD(common.lora_parameters(model), lr=0.0), pad_id, 1, args)
    assert len(swaps) == 1 and swaps[0] is reference
    # the policy's weights are back after the swap (lr 0: the step leaves them), and every row's
    # reference log-probs are the reference adapter's own
    assert all(torch.equal(w, policy[k]) for k, w in common.get_lora_weights(model).items())
    common.set_lora_weights(model, reference)
    with torch.no_grad():
        for r in batch:
            ids, attn, mask = rl.left_padded([(r["prompt_ids"], r["completion_ids"])], pad_id)
            own = rl.token_logprobs(model, ids, attn, args.temperature, last=mask.shape[1])[0]
            assert torch.allclose(r["ref_logp"][-len(r["completion_ids"]):], own, atol=1e-5)
    common.set_lora_weights(model, reference)


def test_killed_rl_run_resumes_to_identical_weights(inspired_tiny_adapters, tmp_path, make_run, monkeypatch):
    monkeypatch.setattr(rl, "turn_reward", varied_reward)
    whole = make_run(inspired_tiny_adapters, tmp_path / "whole", RUN_PARTS)
    result = rl.main(rl_args(whole, updates=2))
    resumed = make_run(inspired_tiny_adapters, tmp_path / "resumed", RUN_PARTS)
    # killed in step 2, after its log row and before its checkpoint: the rerun resumes from step 1's
    # checkpoint and drops the row of step 2 that it logged
    save, saved = common.save_checkpoint, []

    class Killed(Exception):
        pass

    def killed_at_the_second_checkpoint(*a, **k):
        if saved:
            raise Killed
        saved.append(save(*a, **k))

    monkeypatch.setattr(common, "save_checkpoint", killed_at_the_second_checkpoint)
    with pytest.raises(Killed):
        rl.main(rl_args(resumed, updates=2))
    monkeypatch.setattr(common, "save_checkpoint", save)
    assert [r["step"] for r in common.read_jsonl(resumed / "recommender_rl" / "train_log.jsonl")] == [0, 1, 2]
    stopped = common.read_json(resumed / "recommender_rl" / "rl_config.json")  # the settings are there from the start
    assert stopped["finished"] is False and stopped["args"]["steps"] == 2 and "seconds" not in stopped
    assert stopped["prompt_version"] == common.REC_PROMPT_VERSION  # 05 plays the RL adapter only on these prompts
    rl.main(rl_args(resumed, updates=2))
    assert common.read_json(resumed / "recommender_rl" / "rl_config.json")["finished"] is True
    a = load_file(whole / "recommender_rl" / "adapter_model.safetensors")
    b = load_file(resumed / "recommender_rl" / "adapter_model.safetensors")
    sft = load_file(whole / "recommender_sft" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], sft[k]) for k in a)  # RL moved the policy off the SFT adapter
    log = result["log"]
    # step 0: the SFT start's validation; the killed run resumes without redoing it
    assert [r["step"] for r in log] == [0, 1, 2] and log[1]["kl"] == 0.0
    assert [r["step"] for r in common.read_jsonl(resumed / "recommender_rl" / "train_log.jsonl")] == [0, 1, 2]
    assert set(log[0]) == {"step", "valid", "seconds_validating"} and log[0]["valid"]["episodes"] == 2
    for key in ("reward", "format", "recommend", "preference", "return", "hit@1", "hit@10", "kl", "entropy",
                "zero_variance_fraction", "tokens_generated", "seconds_generating", "seconds_training"):
        assert key in log[-1]
    assert len(log[-1]["hit@10"]) == 2 and "valid" in log[-1] and log[-1]["episodes"] == 4


def test_zero_steps_only_validate_the_sft_start(inspired_tiny_adapters, tmp_path, make_run):
    run_dir = make_run(inspired_tiny_adapters, tmp_path / "start", RUN_PARTS)
    log = rl.main(rl_args(run_dir, steps=0))["log"]
    assert [r["step"] for r in log] == [0] and log[0]["valid"]["episodes"] == 2
    a = load_file(run_dir / "recommender_rl" / "adapter_model.safetensors")
    sft = load_file(run_dir / "recommender_sft" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], sft[k]) for k in a)  # no step, no change


def test_two_processes_average_gradients_and_stay_in_sync(inspired_tiny_adapters, tmp_path, make_run):
    run_dir = make_run(inspired_tiny_adapters, tmp_path / "ddp", RUN_PARTS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # accelerate 1.15: `--cpu --num_processes 2` starts ONE process; `--multi_gpu` starts two (torchrun
    # underneath) also on a CPU machine, where 04 then averages over gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(REPO / "tests" / "rl_varied_reward.py")] + rl_args(run_dir, steps=1, eval_samples=0)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    config = common.read_json(run_dir / "recommender_rl" / "rl_config.json")
    assert config["world_size"] == 2 and config["processes_in_sync"] is True
    assert config["train_candidates"] == "out of fold (5 cross-fitted retrievers)"
    log = common.read_jsonl(run_dir / "recommender_rl" / "train_log.jsonl")
    assert log[0]["episodes"] == 2 * 2 * 2  # processes x start states x G, all in the log
    a = load_file(run_dir / "recommender_rl" / "adapter_model.safetensors")
    sft = load_file(run_dir / "recommender_sft" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], sft[k]) for k in a)


def test_eval_smtpo_rows(inspired_tiny_adapters, tmp_path, make_run, monkeypatch):
    monkeypatch.setattr(rl, "turn_reward", varied_reward)
    run_dir = make_run(inspired_tiny_adapters, tmp_path / "eval", RUN_PARTS)
    rl.main(rl_args(run_dir, steps=1, eval_samples=0))
    rl.main(rl_args(run_dir, steps=1, eval_samples=0, w_preference=0, out="recommender_rl_no_preference"))
    results = evaluate.main(["--dataset", "inspired", "--run-dir", str(run_dir), "--limit", "2", "--turns", "2",
                             "--max-new-tokens", "8", "--sim-max-new-tokens", "4", "--bootstrap", "20",
                             "--threads", "1"])
    # default rows: everything whose inputs exist (no simulator_feedback_only/ here)
    assert {"smtpo", "smtpo-no-preference-reward", "sft+simulator"} <= set(results["multi_turn"])
    assert "sft+simulator-feedback-only" not in results["multi_turn"]
    assert results["multi_turn"]["smtpo"]["recommender"] == "recommender_rl"

    # --test-states reachable: only conversations whose first-turn candidates hold a true target
    eval_args = ["--dataset", "inspired", "--run-dir", str(run_dir), "--limit", "3", "--turns", "2", "--candidates",
                 "200", "--max-new-tokens", "8", "--sim-max-new-tokens", "4", "--bootstrap", "20", "--threads", "1"]
    reachable = evaluate.main(eval_args + ["--rows", "sft+simulator", "smtpo", "--test-states", "reachable"])
    states = reachable["multi_turn_meta"]["test_states"]
    assert states["rule"] == "reachable" and 3 <= states["kept"] < states["of"]
    assert reachable["multi_turn_meta"]["samples"] == 3 and "vs_reference" in reachable["multi_turn"]["smtpo"]
    conversations = common.read_jsonl(run_dir / "eval" / "conversations_smtpo.jsonl")
    assert len(conversations) == 3
    assert all(set(c["truth"]) & set(c["turns"][0]["candidates"]) for c in conversations)
    assert f"among the {states['kept']} of {states['of']} whose first-turn candidates hold a target" in \
        (run_dir / "eval" / "results.md").read_text()
    with pytest.raises(SystemExit, match="test_states"):  # rows of another draw never share a table
        evaluate.main(eval_args + ["--rows", "sft+simulator", "--merge"])


def test_the_table_heading_names_the_rule_of_the_draw():
    assert evaluate.test_states_phrase({"rule": "all", "kept": 9, "of": 9}) == ""
    assert evaluate.test_states_phrase({"rule": "reachable", "kept": 3, "of": 9}) == \
        "among the 3 of 9 whose first-turn candidates hold a target (--test-states reachable): "
    assert evaluate.test_states_phrase({"rule": "linked", "kept": 7, "of": 9}) == \
        "among the 7 of 9 whose context mentions an item (--test-states linked): "


def test_reachable_start_states_are_those_whose_first_turn_candidates_hold_a_target(rollout):
    conversation, samples = rollout.conversation, [s for s in common.load_samples(
        common.RunPaths(rollout.args.run_dir), "train")[:60] if common.sample_truth(s)]
    k = conversation.k
    try:
        conversation.k = 200  # the tiny retriever recalls few targets in 20 of ~1.7k items: both kinds are needed
        reachable = common.keep_states(conversation, samples, "reachable")
        # what an episode's first turn really holds (the retriever's own list, no LLM)
        episodes = conversation.play(common.start_episodes(samples), 1, "retriever")
    finally:
        conversation.k = k
    held = [any(t in e.truth for t in e.turns[0]["candidates"]) for e in episodes]
    assert 0 < sum(held) < len(held)  # both kinds, so the rule has something to tell apart
    assert reachable == [s for s, h in zip(samples, held) if h]
    assert common.keep_states(conversation, samples, "all") == samples
    linked = common.keep_states(conversation, samples, "linked")  # iEvaLM's subset: an item in the context
    assert 0 < len(linked) < len(samples) and linked == [s for s in samples if s["context_items"]]
    stats = rl.summarize([{"terms": [{"reward": 0, "format": 0, "recommend": 0, "preference": 0}], "returns": [],
                           "hits": [rl.episode_hits(e, 2) for e in episodes], "zero_variance_groups": 0, "groups": 0,
                           "tokens_generated": 0}])
    assert stats["target_in_candidates"] == [sum(held) / len(held)] * 2  # a one-turn episode keeps its candidates
    # weights "retriever": the list is the candidates' first 10, so re-ranking adds nothing
    top10 = [any(t in e.truth for t in e.turns[0]["candidates"][:10]) for e in episodes]
    assert stats["retriever_hit@10"] == stats["hit@10"] == [sum(top10) / len(top10)] * 2
    assert sum(top10) < sum(held)  # with K = 200, the first 10 miss targets the candidates hold


def test_reachable_start_states_run(inspired_tiny_adapters, tmp_path, make_run, monkeypatch):
    run_dir = make_run(inspired_tiny_adapters, tmp_path / "reachable", RUN_PARTS)
    load_samples = common.load_samples

    def first_60_training_samples(run, split):  # keep the retriever's pass over the training samples short
        return load_samples(run, split)[:60 if split == "train" else None]

    monkeypatch.setattr(common, "load_samples", first_60_training_samples)
    log = rl.main(rl_args(run_dir, steps=1, eval_samples=3, candidates=200, start_states="reachable"))["log"]
    config = common.read_json(run_dir / "recommender_rl" / "rl_config.json")
    states, held_out = config["start_states"], config["eval_states"]
    assert states["rule"] == "reachable" and 0 < states["kept"] < states["of"]
    assert log[-1]["target_in_candidates"][0] == 1.0  # every drawn state's first turn holds a target
    # validation by the same rule: drawn among the valid samples whose first turn holds a target
    assert held_out["rule"] == "reachable" and held_out["drawn"] == min(3, held_out["kept"]) > 0
    assert held_out["kept"] < held_out["of"]
    assert [r["step"] for r in log] == [0, 1]  # the SFT start's validation, then the step's
    assert all(r["valid"]["target_in_candidates"][0] == 1.0 and r["valid"]["episodes"] == held_out["drawn"]
               for r in log)
