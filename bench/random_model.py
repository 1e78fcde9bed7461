"""Write a model folder with random weights in a named architecture's shape, for timing and memory.

A GPU machine without network cannot download Qwen2.5-1.5B, but step time and memory depend on the
shapes, not on the values. This writes config.json + model.safetensors (bf16, the initializer's
random values) + a tokenizer into --out, which every stage and benchmark then takes as `--model`.
The tokenizer is SmolLM2's (ChatML, like Qwen's) by default: it only makes ids below 49,152, while
the embedding keeps the shape's full vocabulary, so the LM head costs what the real one does.

    python bench/random_model.py --shape qwen2.5-1.5b --out /tmp/qwen2.5-1.5b-random
    python bench/random_model.py --shape tiny-qwen --out /tmp/tiny-qwen     # seconds, for tests
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from common import arg  # noqa: E402

# Qwen2.5's published configs (config.json of the Hub repos), fields that set the compute.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    # the same architecture at toy size (tests): vocabulary = the tokenizer's
    "tiny-qwen": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=0, tie_word_embeddings=True),
}


@dataclass
class Args:
    shape: str = arg("qwen2.5-1.5b", "architecture whose shape to copy", choices=sorted(SHAPES))
    out: str = arg("", "folder to write (config.json, model.safetensors, tokenizer files)")
    tokenizer: str = arg(common.DEFAULT_LLM, "tokenizer to save beside the weights: Hugging Face id, folder or .gguf")
    device: str = arg("", "where to initialise the weights ('' = cuda when available, else cpu)")
    seed: int = arg(0, "random seed of the initializer")


def build_random_model(shape: str, tokenizer, device: str | torch.device = "cpu", seed: int = 0):
    """A Qwen2ForCausalLM of SHAPES[shape] with the initializer's random bf16 weights on `device`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = dict(SHAPES[shape])
    fields["vocab_size"] = fields["vocab_size"] or len(tokenizer)
    config = Qwen2Config(**fields, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def main(argv=None) -> None:
    args = common.parse_args(Args, argv)
    if not args.out:
        raise SystemExit("error: --out FOLDER is required")
    started = time.perf_counter()
    tok = common.load_tokenizer(args.tokenizer)
    model = build_random_model(args.shape, tok, args.device or common.default_device(), args.seed)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {args.shape} with random weights, {params / 1e6:.1f}M parameters, "
          f"in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
