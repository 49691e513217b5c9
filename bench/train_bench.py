"""The Python anchor of train_bench: the Prefix-AAC training step as a plain PyTorch loop.

Run by `train_bench --python` with the PyPI wheel's PyTorch 2.x in .venv-torch (any PyTorch with
numpy works). It reads the weights and batches train_bench wrote (safetensors, read here with
numpy), builds the same modules (Prefix-AAC's mapping networks, GPT-2 as in nanoGPT / Hugging
Face), and times two steps, each from the same starting weights:
  caption  the work prefixcap's step does: GPT-2's output head only over the positions that
           predict caption tokens, cross-entropy (pads ignored), backward, clipping, AdamW;
  full     the step the reference training scripts run: logits over every prefix + caption
           position, then the same loss on the caption part.
Prints one JSON object with one entry per step kind.
"""
import argparse
import json
import math
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    dtypes = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        arr = np.frombuffer(data[b:end], dtype=dtypes[e["dtype"]]).reshape(e["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q = self.to_queries(x).view(b, n, h, d).transpose(1, 2)
        kv = self.to_keys_values(x).view(b, n, 2, h, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) * d ** -0.5, dim=-1)
        return self.project((att @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, dim, heads, ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim, heads, layers, ratio=2.0):
        super().__init__()
        self.layers = nn.ModuleList([Layer(dim, heads, ratio) for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class PosEncoder(nn.Module):
    def __init__(self, pe):
        super().__init__()
        self.register_buffer("pe", pe)


class Temporal(nn.Module):
    def __init__(self, cin, dim, length, pe):
        super().__init__()
        self.prefix_const = nn.Parameter(torch.zeros(length, dim))
        self.transformer = Transformer(dim, 8, 2)
        self.conv = nn.Conv2d(cin, dim, (1, 2))
        self.bn_conv = nn.BatchNorm2d(dim)
        self.pos_encoder = PosEncoder(pe)

    def forward(self, x):
        x = F.relu(self.bn_conv(self.conv(x))).squeeze(3).permute(0, 2, 1)
        t = x.shape[1]
        x = x + self.pos_encoder.pe[:t].squeeze(1).unsqueeze(0)
        x = torch.cat([x, self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)], 1)
        return self.transformer(x)[:, t:]


class Global(nn.Module):
    def __init__(self, classes, dim, length):
        super().__init__()
        self.kernel = math.ceil(classes / length)
        self.padded = self.kernel * length
        self.prefix_const = nn.Parameter(torch.zeros(length, dim))
        self.transformer = Transformer(dim, 8, 2)
        self.conv = nn.Conv2d(1, dim, (1, self.kernel), stride=(1, self.kernel))
        self.bn_conv = nn.BatchNorm2d(dim)

    def forward(self, p):
        x = F.pad(p, (0, self.padded - p.shape[1])).view(p.shape[0], 1, 1, self.padded)
        x = F.relu(self.bn_conv(self.conv(x))).squeeze(2).permute(0, 2, 1)
        n = x.shape[1]
        x = torch.cat([x, self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)], 1)
        return self.transformer(x)[:, n:]


class PrefixAac(nn.Module):
    def __init__(self, pe):
        super().__init__()
        self.temporal_mappingnetwork = Temporal(2048, 768, 15, pe)
        self.global_mappingnetwork = Global(527, 768, 11)

    def forward(self, conv_block6, clipwise):
        return torch.cat([self.temporal_mappingnetwork(conv_block6), self.global_mappingnetwork(clipwise)], 1)


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.h)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
        x = x + self.c_proj((att @ v).transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt2(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.wte = nn.Embedding.from_pretrained(w["wte.weight"], freeze=True)
        self.wpe = nn.Embedding.from_pretrained(w["wpe.weight"], freeze=True)
        n_layer = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("h."))
        d = w["wte.weight"].shape[1]
        self.h = nn.ModuleList([Block(d, 12) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        with torch.no_grad():
            for i, blk in enumerate(self.h):
                p = f"h.{i}."
                blk.ln_1.weight.copy_(w[p + "ln_1.weight"]); blk.ln_1.bias.copy_(w[p + "ln_1.bias"])
                blk.ln_2.weight.copy_(w[p + "ln_2.weight"]); blk.ln_2.bias.copy_(w[p + "ln_2.bias"])
                blk.c_attn.weight.copy_(w[p + "attn.c_attn.weight"].t()); blk.c_attn.bias.copy_(w[p + "attn.c_attn.bias"])
                blk.c_proj.weight.copy_(w[p + "attn.c_proj.weight"].t()); blk.c_proj.bias.copy_(w[p + "attn.c_proj.bias"])
                blk.c_fc.weight.copy_(w[p + "mlp.c_fc.weight"].t()); blk.c_fc.bias.copy_(w[p + "mlp.c_fc.bias"])
                blk.mlp_proj.weight.copy_(w[p + "mlp.c_proj.weight"].t()); blk.mlp_proj.bias.copy_(w[p + "mlp.c_proj.bias"])
            self.ln_f.weight.copy_(w["ln_f.weight"]); self.ln_f.bias.copy_(w["ln_f.bias"])
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, embeds, first=0, last=None):
        """Logits of positions first..last-1 (the output head over those positions only)."""
        t = embeds.shape[1]
        x = embeds + self.wpe(torch.arange(t))
        for blk in self.h:
            x = blk(x)
        return self.ln_f(x[:, first:last]) @ self.wte.weight.t()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", default="caption,full")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    w = read_safetensors(a.dir + "/weights.safetensors")
    batches = read_safetensors(a.dir + "/batches.safetensors")
    mapper_w = {k[len("mapper."):]: v for k, v in w.items() if k.startswith("mapper.")}
    lm = Gpt2({k[len("lm."):]: v for k, v in w.items() if k.startswith("lm.")}).eval()
    import resource
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for head in a.heads.split(","):
        mapper = PrefixAac(mapper_w["temporal_mappingnetwork.pos_encoder.pe"])
        missing = mapper.load_state_dict(mapper_w, strict=False)
        assert not missing.missing_keys and not missing.unexpected_keys, missing
        mapper.train()
        params = list(mapper.parameters())
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)

        def step(s):
            conv, cls = batches[f"{s}.conv_block6"], batches[f"{s}.clipwise"]
            ids, mask = batches[f"{s}.ids"], batches[f"{s}.mask"]
            prefix = mapper(conv, cls)
            P = prefix.shape[1]
            embeds = torch.cat([prefix, lm.wte(ids)], 1)
            if head == "caption":  # positions P-1 .. P+T-2 predict the T caption tokens
                logits = lm(embeds, P - 1, -1)
            else:
                logits = lm(embeds)[:, P - 1:-1]
            target = ids.masked_fill(mask == 0, -100)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return loss.item()

        first = step(0)
        step(1)
        secs, best = 0.0, float("inf")
        for s in range(2, a.steps + 2):
            t0 = time.perf_counter()
            step(s)
            dt = time.perf_counter() - t0
            secs += dt
            best = min(best, dt)
        out[head] = {"ms_per_step": 1000 * secs / a.steps, "samples_per_s": a.steps * a.batch / secs,
                     "ms_best_step": 1000 * best, "first_loss": first}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(json.dumps(out))


if __name__ == "__main__":
    main()
