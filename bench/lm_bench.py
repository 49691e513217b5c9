"""The anchor of lm_bench: Hugging Face `generate` with its KV cache on GPT-2 124M (random
weights, the same shape), after a prefix of 26 vectors given as inputs_embeds, batch 1.

Prints one JSON object: per dtype (float32, bfloat16), the greedy decode step and the beam-5
step in ms (the prompt's time subtracted: the difference between `tokens` and 1 new tokens,
divided by tokens - 1), and the torch version and thread count it ran with.

    python bench/lm_bench.py --threads 2 --tokens 48 [--dtypes float32,bfloat16]
"""
import argparse
import json

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from anchor_timing import best_time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prefix", type=int, default=26)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPT2Config()  # the 124M shape
    base = GPT2LMHeadModel(config).eval()
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "prefix_length": args.prefix,
           "tokens": args.tokens}
    for name in args.dtypes.split(","):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
        model = base.to(dtype)
        prefix = (torch.randn(1, args.prefix, config.n_embd) * 0.1).to(dtype)
        mask = torch.ones(1, args.prefix, dtype=torch.long)

        def run(new_tokens, beams):
            # min_new_tokens: random weights may produce the end token; every run decodes exactly this many.
            model.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, num_beams=beams, do_sample=False, use_cache=True,
                           pad_token_id=config.eos_token_id)

        with torch.inference_mode():
            run(4, 1)  # warm-up
            greedy = (best_time(args.repeats, lambda: run(args.tokens, 1)) -
                      best_time(args.repeats, lambda: run(1, 1))) / (args.tokens - 1)
            beam = (best_time(2, lambda: run(args.tokens, 5)) - best_time(2, lambda: run(1, 5))) / (args.tokens - 1)
        out[name] = {"greedy_step_ms": greedy * 1e3, "greedy_tokens_per_s": 1.0 / greedy,
                     "beam5_step_ms": beam * 1e3, "beam5_step_over_greedy_step": beam / greedy}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
