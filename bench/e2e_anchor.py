"""The anchor of e2e_bench: one 10 s clip captioned the way Prefix-AAC's own inference code does
it (AAC_Prefix.generate_beam in minguinho26/Prefix_AAC_ICASSP2023), on PyTorch 2.x, with random
weights of the published shapes: CNN14 at 16 kHz (window 512, hop 320, 64 mels), the Prefix-AAC
mapping networks (15 temporal + 11 global prefix vectors, 2 + 2 transformer layers, 8 heads),
transformers' GPT2Model 124M and an untied language header over the GPT-2 vocabulary.

Its decoding, as upstream: beam 5, and every step runs GPT-2 over the whole sequence so far
(prefix + generated tokens, no key/value cache) and the language header over every position;
log(softmax), scores averaged by length, clips one at a time. Here every caption is exactly
--tokens long (no stop token), so both sides do the same number of steps.

Prints one JSON object: ms for the encoder, the mapper and the decoding of one clip, best of
--repeats, under torch.inference_mode(), float32.

--image: one 640x480 image captioned the way ClipCap's predict.py does it (rmokady/
CLIP_prefix_caption, ClipCaptionModel + generate_beam) with its COCO model's shapes: Pillow
bicubic resize of the shorter side to 224, centre crop, CLIP's normalisation, the CLIP ViT-B/32
image tower (transformers' CLIPVisionModelWithProjection: the same network as openai/CLIP's
encode_image), the MLP mapper (512 -> 3840 -> 7680, tanh) to 10 prefix vectors, and
GPT2LMHeadModel (header tied to the token embeddings) rerun over the whole sequence at every
step, as generate_beam does. The encoder's time includes the preprocessing.

    python bench/e2e_anchor.py --threads 2 [--image] [--tokens 15] [--repeats 2]
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from anchor_timing import best_time  # noqa: E402
from encoder_anchor import Cnn14, clip_preprocess  # noqa: E402
from train_bench import PrefixAac  # noqa: E402


def sinusoids(max_len, dim):
    """PyTorch-tutorial positional encoding [max_len, 1, dim] (what Prefix-AAC's pos_encoder holds)."""
    position = torch.arange(max_len, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(max_len, 1, dim)
    pe[:, 0, 0::2] = torch.sin(position * rate)
    pe[:, 0, 1::2] = torch.cos(position * rate)
    return pe


def beam_search_without_cache(gpt, header, prefix, beam, steps):
    """Upstream's algorithm for one clip: [1, P, 768] prefix -> [beam, steps] token ids."""
    sequence = prefix
    scores, tokens = None, None
    lengths = torch.ones(beam)
    vocab = header.out_features
    for _ in range(steps):
        hidden = gpt(inputs_embeds=sequence).last_hidden_state
        logp = header(hidden)[:, -1, :].softmax(-1).log()  # the header runs over every position, as upstream
        if scores is None:
            scores, next_tokens = logp.topk(beam, -1)
            sequence = sequence.expand(beam, *sequence.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            total = scores[:, None] + logp
            lengths += 1
            average, flat = (total / lengths[:, None]).view(-1).topk(beam, -1)
            source = torch.div(flat, vocab, rounding_mode="floor")
            next_tokens = (flat % vocab).unsqueeze(1)
            lengths = lengths[source]
            tokens = torch.cat((tokens[source], next_tokens), dim=1)
            sequence = sequence[source]
            scores = average * lengths
        sequence = torch.cat((sequence, gpt.wte(next_tokens.squeeze(1)).view(beam, 1, -1)), dim=1)
    return tokens


def image_main(args):
    import numpy as np
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                            num_attention_heads=12, image_size=224, patch_size=32,
                                                            projection_dim=512)).eval()
    prefix_length = 10
    clip_project = nn.Sequential(nn.Linear(512, 768 * prefix_length // 2), nn.Tanh(),
                                 nn.Linear(768 * prefix_length // 2, 768 * prefix_length)).eval()
    lm = GPT2LMHeadModel(GPT2Config()).eval()
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), "RGB")

    def encode():
        return vision(pixel_values=clip_preprocess(image)).image_embeds

    with torch.inference_mode():
        embedding = encode()
        prefix = clip_project(embedding).view(1, prefix_length, -1)
        beam_search_without_cache(lm.transformer, lm.lm_head, prefix, args.beam, 2)  # warm-up
        t_encoder = best_time(args.repeats, encode)
        t_mapper = best_time(args.repeats, lambda: clip_project(embedding).view(1, prefix_length, -1))
        t_decode = best_time(args.repeats,
                             lambda: beam_search_without_cache(lm.transformer, lm.lm_head, prefix, args.beam, args.tokens))
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "tokens": args.tokens, "beam": args.beam,
            "prefix_length": prefix_length, "encoder_ms": t_encoder * 1e3, "mapper_ms": t_mapper * 1e3,
            "decode_ms": t_decode * 1e3, "image_ms": (t_encoder + t_mapper + t_decode) * 1e3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=15)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--image", action="store_true", help="ClipCap's COCO model on one image")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.image:
        print(json.dumps(image_main(args)))
        return
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    encoder = Cnn14(sample_rate=16000, n_fft=512, hop=320, n_mels=64, fmax=8000).eval()
    mapper = PrefixAac(sinusoids(5000, 768)).eval()
    gpt = GPT2Model(GPT2Config()).eval()
    header = nn.Linear(768, 50257, bias=False).eval()
    clip = torch.randn(1, 160000) * 0.1

    with torch.inference_mode():
        conv, classes = encoder.features(clip)
        prefix = mapper(conv, classes)
        beam_search_without_cache(gpt, header, prefix, args.beam, 2)  # warm-up
        t_encoder = best_time(args.repeats, lambda: encoder.features(clip))
        t_mapper = best_time(args.repeats, lambda: mapper(conv, classes))
        t_decode = best_time(args.repeats, lambda: beam_search_without_cache(gpt, header, prefix, args.beam, args.tokens))
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "tokens": args.tokens,
                      "beam": args.beam, "prefix_length": int(prefix.shape[1]),
                      "encoder_ms": t_encoder * 1e3, "mapper_ms": t_mapper * 1e3, "decode_ms": t_decode * 1e3,
                      "clip_ms": (t_encoder + t_mapper + t_decode) * 1e3}))


if __name__ == "__main__":
    main()
