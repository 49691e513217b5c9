"""The anchor of mapper_bench: forward + backward of the upstream mapping networks at batch 32 on
PyTorch 2.x (the PyPI wheel in .venv-torch), with random weights and inputs of the same shapes as
mapper_bench's, the same loss (mean of the squared prefix), training mode, best of --repeats:

  clipcap_mlp          ClipCap's MLP (clip_project): 512 -> 3840 -> 7680, tanh; 10 x 768
  clipcap_transformer  ClipCap's TransformerMapper: linear 640 -> 40 x 768, 40 learned constants,
                       8 layers of 8 heads (bias-free queries/keys/values, ReLU MLP of ratio 2);
                       the last 40 outputs
  prefix_aac           Prefix-AAC's temporal (CNN14 conv block 6 [2048, 15, 2] -> 15) and global
                       (527 class probabilities -> 11) mapping networks, 2 layers each

The query-guided mapper is prefixcap's own: it has no upstream to compare with.
Prints one JSON object: {"mappers": {name: {"forward_backward_ms": ..}}}.

    python bench/mapper_anchor.py --threads 2 [--batch 32] [--repeats 3]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from anchor_timing import best_time  # noqa: E402
from e2e_anchor import sinusoids  # noqa: E402
from train_bench import PrefixAac, Transformer  # noqa: E402


class ClipCapTransformerMapper(nn.Module):
    def __init__(self, dim_clip, dim, prefix_length, clip_length, layers):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(dim, 8, layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim))

    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        return self.transformer(torch.cat((x, prefix), dim=1))[:, self.clip_length:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch
    cases = {
        "clipcap_mlp": (nn.Sequential(nn.Linear(512, 3840), nn.Tanh(), nn.Linear(3840, 7680)),
                        (torch.randn(b, 512),)),
        "clipcap_transformer": (ClipCapTransformerMapper(640, 768, 40, 40, 8), (torch.randn(b, 640),)),
        "prefix_aac": (PrefixAac(sinusoids(5000, 768)), (torch.rand(b, 2048, 15, 2), torch.rand(b, 527))),
    }
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": b, "mappers": {}}
    for name, (mapper, inputs) in cases.items():
        mapper.train()

        def step():
            mapper.zero_grad()
            mapper(*inputs).square().mean().backward()

        step()
        params = sum(p.numel() for p in mapper.parameters())
        out["mappers"][name] = {"forward_backward_ms": best_time(args.repeats, step) * 1e3, "parameters": params}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
