"""Timing of the LLM mechanics on the real SmolLM2-135M GGUF (not a test).
python bench/llm_mechanics.py [threads]"""
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as L  # noqa: E402


def step_time(model, batch, n=3):
    model.train()
    opt = torch.optim.AdamW(L.lora_parameters(model), lr=1e-4)
    times = []
    for _ in range(n + 1):  # first step is warm-up
        t = time.perf_counter()
        loss = L.causal_lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    model.eval()
    return sum(times[1:]) / n, loss.item()


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
    torch.set_num_threads(threads)
    print(f"threads {threads}")
    t = time.perf_counter()
    model, tok = L.load_causal_lm(L.DEFAULT_LLM, device="cpu")
    print(f"load {time.perf_counter() - t:.1f} s, params {sum(p.numel() for p in model.parameters()):,}")
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)  # refused while config.quantization_config is still there
        print("save_pretrained ok:", sorted(os.listdir(d)))
    torch.manual_seed(0)
    ids = torch.randint(0, len(tok), (4, 256))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        ref = model(ids[:1, :64]).logits
    names = L.add_lora(model)
    print(f"lora layers {len(names)}, trainable {sum(p.numel() for p in L.lora_parameters(model)):,}")
    s, loss = step_time(model, batch)
    print(f"fp32 LoRA step (4x256): {s:.2f} s, loss {loss:.2f}")
    t = time.perf_counter()
    texts = L.generate(model, tok, [[{"role": "user", "content": "Recommend a sci-fi movie."}]] * 4, max_new_tokens=32)
    print(f"generate 4x32 greedy: {time.perf_counter() - t:.2f} s: {texts[0]!r}")

    model, tok = L.load_causal_lm(L.DEFAULT_LLM, device="cpu")
    t = time.perf_counter()
    L.quantize_to_4bit(model, torch.float32)
    print(f"quantize_to_4bit {time.perf_counter() - t:.1f} s")
    with torch.no_grad():
        q = model(ids[:1, :64]).logits
    print(f"nf4 vs fp32 logits: rel err {((q - ref).norm() / ref.norm()).item():.3f}, "
          f"top-1 agreement {(q.argmax(-1) == ref.argmax(-1)).float().mean().item():.2f}")
    L.add_lora(model)
    s, loss = step_time(model, batch)
    print(f"nf4 LoRA step (4x256): {s:.2f} s, loss {loss:.2f}")


if __name__ == "__main__":
    main()
