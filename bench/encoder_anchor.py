"""The anchor of audio_bench and image_bench: the same encoders in PyTorch 2.x (the PyPI wheel in
.venv-torch), random weights of the real shapes, at the settings a user would pick today.

  cnn14: PANNs CNN14 on 10 s clips at 32 kHz (log-mel through torch.stft + a mel matrix, then
         bn0, six conv blocks, the global pooling and fc1), batch 1 and batch 8, ms per clip.
  vit:   CLIP ViT-B/32 (transformers' CLIPVisionModelWithProjection), images/s at batch 1 and 16.
Each under torch.inference_mode(), in three settings: float32 eager (NCHW), float32 with
channels-last (CNN14 only) and bfloat16 autocast (channels-last for CNN14); the ViT also with
PyTorch's dynamic int8 quantisation of its linear layers (quantize_dynamic, per-channel weights),
the same kind of arithmetic as prefixcap's --encoder-dtype int8-dynamic.

  logmel:     CNN14's front end alone (torch.stft, power, mel matrix, 10 log10: what PANNs'
              torchlibrosa layers compute) on 60 s at 32 kHz, as a multiple of real time.
  preprocess: openai/CLIP's preprocessing as ClipCap runs it (Pillow: decode the JPEG given with
              --jpeg, bicubic resize of the shorter side to 224, centre crop, to a normalised
              float tensor), images/s.
  decode:     the files given with --audio (FLAC, MP3...) decoded and resampled to 32 kHz mono as
              PANNs' and Prefix-AAC's data preparation does it: librosa.load(path, sr=32000,
              mono=True), librosa's default resampler (soxr "HQ"), and again with soxr "VHQ" (the
              quality prefixcap uses), as multiples of real time; with --dump DIR each file's
              VHQ waveform is also written to DIR/<file name>.f32 (raw float32) for the caller to
              compare with its own decoding.
Prints one JSON object.

    python bench/encoder_anchor.py --threads 2 [--models cnn14,vit,logmel,preprocess,decode] [--jpeg PATH]
        [--audio PATH,PATH] [--dump DIR] [--repeats 3]
"""
import argparse
import json
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from anchor_timing import best_time


def mel_matrix(sample_rate, n_fft, n_mels, fmin, fmax):
    """Slaney-style triangular filters [n_fft/2+1, n_mels] (speed only: the values do not matter)."""
    def hz_to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)
    mels = torch.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower = (bins[:, None] - hz[None, :-2]) / (hz[1:-1] - hz[:-2])[None, :]
    upper = (hz[None, 2:] - bins[:, None]) / (hz[2:] - hz[1:-1])[None, :]
    return torch.clamp(torch.minimum(lower, upper), min=0.0)


class ConvBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x, pool):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool) if pool > 1 else x


class Cnn14(nn.Module):
    def __init__(self, sample_rate=32000, n_fft=1024, hop=320, n_mels=64, fmax=14000):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft))
        self.register_buffer("mel", mel_matrix(sample_rate, n_fft, n_mels, 50, fmax))
        self.bn0 = nn.BatchNorm2d(n_mels)
        widths = [1, 64, 128, 256, 512, 1024, 2048]
        self.blocks = nn.ModuleList(ConvBlock(widths[i], widths[i + 1]) for i in range(6))
        self.fc1 = nn.Linear(2048, 2048)
        self.fc_audioset = nn.Linear(2048, 527)

    def features(self, wave):
        """What Prefix-AAC's mapper reads: conv_block6 [B, 2048, T', F'] and the class probabilities."""
        x = self.conv_blocks(wave)
        t = x.mean(3)
        embedding = F.relu(self.fc1(t.max(2).values + t.mean(2)))
        return x, torch.sigmoid(self.fc_audioset(embedding))

    def conv_blocks(self, wave):
        spec = torch.stft(wave, self.n_fft, self.hop, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True).abs().pow(2)
        logmel = 10.0 * torch.log10(torch.clamp(spec.transpose(1, 2) @ self.mel, min=1e-10))
        x = self.bn0(logmel[:, None].transpose(1, 3)).transpose(1, 3)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for i, block in enumerate(self.blocks):
            x = block(x, 2 if i < 5 else 1)
        return x

    def forward(self, wave):
        spec = torch.stft(wave, self.n_fft, self.hop, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True).abs().pow(2)            # [B, F, T]
        logmel = 10.0 * torch.log10(torch.clamp(spec.transpose(1, 2) @ self.mel, min=1e-10))  # [B, T, M]
        x = logmel[:, None]                                             # [B, 1, T, M]
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for i, block in enumerate(self.blocks):
            x = block(x, 2 if i < 5 else 1)
        x = x.mean(3)
        x = x.max(2).values + x.mean(2)
        return F.relu(self.fc1(x))

    channels_last = False


def bench_cnn14(repeats):
    torch.manual_seed(0)
    model = Cnn14().eval()
    one, eight = torch.randn(1, 320000) * 0.1, torch.randn(8, 320000) * 0.1
    settings = {}
    for name, channels_last, autocast in [("float32_eager", False, False), ("float32_channels_last", True, False),
                                          ("bfloat16_autocast_channels_last", True, True)]:
        model.channels_last = channels_last
        m = model.to(memory_format=torch.channels_last) if channels_last else model.to(memory_format=torch.contiguous_format)

        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return m(x)

        with torch.inference_mode():
            run(one)
            t1 = best_time(repeats, lambda: run(one))
            t8 = best_time(max(1, repeats - 1), lambda: run(eight))
        settings[name] = {"ms_per_clip_batch1": t1 * 1e3, "ms_per_clip_batch8": t8 * 1e3 / 8}
    return settings


def bench_logmel(repeats):
    model = Cnn14().eval()
    minute = torch.randn(1, 60 * 32000) * 0.1

    def front_end():
        spec = torch.stft(minute, model.n_fft, model.hop, window=model.window, center=True, pad_mode="reflect",
                          return_complex=True).abs().pow(2)
        return 10.0 * torch.log10(torch.clamp(spec.transpose(1, 2) @ model.mel, min=1e-10))

    with torch.inference_mode():
        front_end()
        return {"x_realtime": 60.0 / best_time(repeats + 2, front_end)}


def clip_preprocess(image, size=224):
    """openai/CLIP's _transform on a PIL image: [1, 3, size, size] float32."""
    import numpy as np
    from PIL import Image
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    return ((x - mean) / std)[None]


def bench_preprocess(jpeg, repeats):
    import io
    from PIL import Image
    with open(jpeg, "rb") as f:
        data = f.read()
    n = 40

    def run():
        for _ in range(n):
            clip_preprocess(Image.open(io.BytesIO(data)))

    run()
    return {"images_per_s": n / best_time(repeats, run)}


def bench_vit(repeats):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, projection_dim=512, hidden_act="quick_gelu")
    model = CLIPVisionModelWithProjection(config).eval()
    one, sixteen = torch.randn(1, 3, 224, 224), torch.randn(16, 3, 224, 224)
    settings = {}
    for name, autocast in [("float32_eager", False), ("bfloat16_autocast", True)]:
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return model(pixel_values=x).image_embeds

        with torch.inference_mode():
            run(one)
            t1 = best_time(repeats + 2, lambda: run(one))
            t16 = best_time(repeats, lambda: run(sixteen))
        settings[name] = {"images_per_s_batch1": 1.0 / t1, "images_per_s_batch16": 16.0 / t16}
    # PyTorch's own W8A8 for the same layers: dynamic quantisation of every nn.Linear (int8
    # weights per output channel, activations quantised at run time; fbgemm/x86 kernels).
    try:
        from torch.ao.quantization import quantize_dynamic, per_channel_dynamic_qconfig
        import warnings
        with warnings.catch_warnings():  # its deprecation notices
            warnings.simplefilter("ignore")
            q = quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        with torch.inference_mode():
            q(pixel_values=one)
            t1 = best_time(repeats + 2, lambda: q(pixel_values=one))
            t16 = best_time(repeats, lambda: q(pixel_values=sixteen))
        settings["int8_dynamic_quantized"] = {"images_per_s_batch1": 1.0 / t1, "images_per_s_batch16": 16.0 / t16,
                                              "engine": torch.backends.quantized.engine}
    except Exception as e:  # a PyTorch without quantized kernels: reported, not hidden
        settings["int8_dynamic_quantized_error"] = repr(e)
    return settings


def bench_decode(paths, dump, repeats):
    import os
    import librosa
    out = {"librosa": librosa.__version__}
    for path in paths:
        name = os.path.basename(path)
        d = {"duration_s": librosa.get_duration(path=path)}
        for res_type in ["soxr_hq", "soxr_vhq"]:
            def run():
                return librosa.load(path, sr=32000, mono=True, res_type=res_type)[0]

            wave = run()
            d[res_type + "_x_realtime"] = d["duration_s"] / best_time(repeats, run)
        if dump:
            wave.astype("float32").tofile(os.path.join(dump, name + ".f32"))
        out[name] = d
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="cnn14,vit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jpeg", help="the JPEG for --models preprocess")
    ap.add_argument("--audio", help="comma-separated audio files for --models decode")
    ap.add_argument("--dump", help="--models decode: write each file's 32 kHz waveform to DIR/<name>.f32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    models = args.models.split(",")
    if "cnn14" in models:
        out["cnn14"] = bench_cnn14(args.repeats)
    if "vit" in models:
        out["vit"] = bench_vit(args.repeats)
    if "logmel" in models:
        out["logmel"] = bench_logmel(args.repeats)
    if "preprocess" in models:
        if not args.jpeg:
            sys.exit("encoder_anchor.py: --models preprocess needs --jpeg PATH")
        out["preprocess"] = bench_preprocess(args.jpeg, args.repeats)
    if "decode" in models:
        if not args.audio:
            sys.exit("encoder_anchor.py: --models decode needs --audio PATH[,PATH]")
        out["decode"] = bench_decode(args.audio.split(","), args.dump, args.repeats)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
