"""Generated tokens per second of common.generate against HF `model.generate` and a roofline.

Every LLM stage spends most of its time decoding (04's rollouts, 05's conversations, the quality
reports of 02 and 03). This times greedy decoding of --batch-size prompts of --prompt-tokens
tokens for --completion-tokens new tokens (EOS is never sampled: every row runs to the budget), with
a LoRA adapter on the base as the stages decode (B random, so the adapter changes the outputs):
  ours       common.generate, the path of every stage
  hf         transformers' model.generate on the same inputs, same adapter
  roofline   the decode steps' memory traffic at the machine's bandwidth: each step reads every
             weight once, in the dtype ours decodes in, and the KV cache of every row;
             bandwidth = a large tensor copy, timed here
ours decodes in --decode-dtype (auto: 04's rollouts' choice, bf16 where the hardware has it,
04's decoding_dtype; float32: the greedy evaluation of 02, 03 and 05), hf in the model's dtype.
It reports whether both return the same tokens (and how many leading tokens each row shares), and
appends one JSON line per run to --out.

    python bench/generate.py                                   # SmolLM2-135M on this CPU
    python bench/generate.py --model /tmp/qwen2.5-1.5b-random --load-in-4bit --batch-size 32   # a GPU
"""
import importlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from common import arg  # noqa: E402

rl = importlib.import_module("04_rl_multiturn")  # decoding_dtype: the dtype 04's rollouts decode in


@dataclass
class Args:
    model: str = arg(common.DEFAULT_LLM, "base LLM: Hugging Face id, folder, .gguf, or tiny")
    load_in_4bit: bool = arg(False, "load the base in nf4 4-bit")
    prompt_tokens: int = arg(512, "tokens of each prompt")
    completion_tokens: int = arg(256, "new tokens of each completion")
    batch_size: int = arg(4, "prompts decoded together")
    distinct: int = arg(0, "distinct prompts among them, the rest copies, as in a GRPO group's first turn (0 = all)")
    decode_dtype: str = arg("auto", "dtype ours decodes in: auto (04's rollouts, 04's decoding_dtype), "
                                    "float32 or bfloat16", choices=["auto", "float32", "bfloat16"])
    lora_r: int = arg(16, "rank of the LoRA adapter on the base (0 = none)")
    repeats: int = arg(2, "timed runs of each path (the median is reported), after one untimed run")
    paths: list = arg(["ours", "hf"], "what to time, among ours and hf")
    threads: int = arg(0, "torch CPU threads (0 = torch's default)")
    device: str = arg(str(common.default_device()), "torch device")
    label: str = arg("", "free text stored with the result line")
    out: str = arg(str(ROOT / "bench" / "results" / "generate.jsonl"), "JSON lines file to append the result to")
    seed: int = arg(0, "random seed (prompts, adapter)")


def random_prompts(tok, count: int, length: int, seed: int) -> list[str]:
    """`count` texts of exactly `length` tokens each (ordinary vocabulary, no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    texts = []
    while len(texts) < count:
        ids = [i for i in torch.randint(0, len(tok), (length * 2,), generator=g).tolist() if i not in special]
        text = tok.decode(ids[:length])
        again = tok(text, add_special_tokens=False)["input_ids"]  # decoding and encoding may merge pieces
        if len(again) >= length:
            texts.append(tok.decode(again[:length]))
    return texts


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(device, gib: float = 1.0) -> float:
    """Bytes per second of a large copy (read + write), the best of 5."""
    n = int(gib * 2**30 / 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def decode_bytes(model, batch: int, context: int) -> float:
    """Bytes one decode step reads: every weight once (the embedding only its looked-up rows), and the
    K and V cache of `context` tokens for each row."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embedding)
    for b in model.buffers():
        weights += b.numel() * b.element_size()
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * context * batch * embedding.element_size()
    return weights + kv


def decode_dtype(args: Args, device) -> torch.dtype:
    return rl.decoding_dtype(device) if args.decode_dtype == "auto" else getattr(torch, args.decode_dtype)


def time_path(path: str, model, tok, prompts: list[str], args: Args) -> tuple[float, list[list[int]]]:
    """Seconds of one greedy decode of every prompt, and the completion ids."""
    device = next(model.parameters()).device
    sync(device)
    t = time.perf_counter()
    if path == "ours":
        _, _, completions = common.generate(model, tok, prompts, max_new_tokens=args.completion_tokens,
                                            batch_size=args.batch_size, return_tokens=True,
                                            dtype=decode_dtype(args, device))
    else:
        enc = tok(prompts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, max_new_tokens=args.completion_tokens, do_sample=False, temperature=None,
                             top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
        completions = out[:, enc["input_ids"].shape[1]:].tolist()
    sync(device)
    return time.perf_counter() - t, completions


def main(argv=None) -> dict:
    args = common.parse_args(Args, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.set_seed(args.seed)
    model, tok = common.load_llm(args.model, args.load_in_4bit, args.device)
    if args.lora_r:
        common.add_lora(model, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
        for _, m in common.lora_modules(model):  # a trained adapter: B != 0
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    model.eval()
    # EOS never wins, so every row decodes the whole budget in both paths
    never = torch.tensor(sorted({tok.eos_token_id, *common._eos_ids(model, tok)} - {None}))
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, out: out.index_fill_(-1, never.to(out.device), float("-inf")))
    distinct = random_prompts(tok, args.distinct or args.batch_size, args.prompt_tokens, args.seed)
    prompts = [distinct[i * len(distinct) // args.batch_size] for i in range(args.batch_size)]
    device = next(model.parameters()).device
    result = {"label": args.label, "args": asdict(args), "device": str(device),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    generated = args.batch_size * args.completion_tokens
    outputs = {}
    for path in args.paths:
        time_path(path, model, tok, prompts, args)  # untimed: allocator, kernels, caches
        runs = [time_path(path, model, tok, prompts, args) for _ in range(args.repeats)]
        seconds = statistics.median(s for s, _ in runs)
        outputs[path] = runs[0][1]
        assert all(len(c) == args.completion_tokens for c in outputs[path]), "a row stopped early"
        result[path] = {"seconds": round(seconds, 3), "tokens_per_s": round(generated / seconds, 1)}
        print(f"{path:8s} {seconds:8.2f} s  {generated / seconds:9.1f} generated tokens/s")
    hook.remove()
    if "ours" in outputs and "hf" in outputs:
        result["same_tokens"] = outputs["ours"] == outputs["hf"]
        # bf16 decoding drifts from fp32: how many leading tokens each row shares with hf
        shared = [next((i for i, (a, b) in enumerate(zip(o, h)) if a != b), len(o))
                  for o, h in zip(outputs["ours"], outputs["hf"])]
        result["shared_prefix_tokens"] = shared
        print(f"ours and hf return the same tokens: {result['same_tokens']} (shared prefix per row: {shared})")
    bandwidth = memory_bandwidth(device)
    mean_context = args.prompt_tokens + args.completion_tokens / 2
    dtype = decode_dtype(args, device)
    with common.decoding_weights(model, dtype):  # the bytes ours reads: its dtype, the adapter folded in
        step_bytes = decode_bytes(model, args.batch_size, int(mean_context))
    roofline = args.batch_size * bandwidth / step_bytes
    result["decode_dtype"] = str(dtype)
    result["roofline"] = {"bandwidth_gb_s": round(bandwidth / 1e9, 1),
                          "bytes_per_step_mb": round(step_bytes / 1e6, 1), "tokens_per_s": round(roofline, 1)}
    print(f"roofline {roofline:9.1f} generated tokens/s "
          f"({step_bytes / 1e6:.0f} MB a step at {bandwidth / 1e9:.1f} GB/s)")
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
