#!/usr/bin/env python3
"""Seed corpora for the fuzz targets: small hand-made files of every format each parser reads,
plus the small files of ../shared/fixtures. Usage: make_seeds.py FIXTURES OUT_DIR
(OUT_DIR/<target>/ is filled; existing files are kept)."""
import io
import json
import os
import shutil
import struct
import sys
import wave
import zipfile

fixtures, out = sys.argv[1], sys.argv[2]


def put(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def copy_fixture(target, rel, limit=256 * 1024):
    p = os.path.join(fixtures, rel)
    if os.path.isfile(p) and os.path.getsize(p) <= limit:
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        shutil.copy(p, os.path.join(d, rel.replace("/", "_")))


def safetensors(header, data):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


# safetensors
put("fuzz_safetensors", "one.safetensors", safetensors({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16))
put("fuzz_safetensors", "two.safetensors", safetensors(
    {"__metadata__": {"format": "pt"}, "a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
     "b": {"dtype": "BF16", "shape": [3], "data_offsets": [8, 14]}, "c": {"dtype": "BOOL", "shape": [0], "data_offsets": [14, 14]}},
    b"\x01" * 14))

# pickles (protocol 2) of state dicts, as torch.save writes them
def unicode(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def tensor(key, dtype="FloatStorage", numel=4, offset=0, size=(4,), stride=(1,)):
    t = b"ctorch._utils\n_rebuild_tensor_v2\n((" + unicode("storage") + b"ctorch\n" + dtype.encode() + b"\n" + unicode(key) + \
        unicode("cpu") + b"K" + bytes([numel]) + b"tQK" + bytes([offset]) + b"("
    t += b"".join(b"K" + bytes([s]) for s in size) + b"t("
    t += b"".join(b"K" + bytes([s]) for s in stride) + b"t\x89ccollections\nOrderedDict\n)RtR"
    return t


state = b"\x80\x02ccollections\nOrderedDict\n)R(" + unicode("w") + tensor("0") + unicode("b") + tensor("0", size=(2,), offset=2) + b"u."
nested = b"\x80\x02}(" + unicode("model") + b"}(" + unicode("fc.weight") + tensor("0", size=(2, 2), stride=(2, 1)) + b"u" + \
    unicode("iteration") + b"K\x07u."
script = b"\x80\x02c__torch__.model\nNet\n)\x81}(" + unicode("fc") + b"c__torch__.model\nLinear\n)\x81}(" + unicode("weight") + \
    tensor("0") + unicode("training") + b"\x89ub" + b"ub."
for name, p in [("state.pkl", state), ("nested.pkl", nested)]:
    put("fuzz_pickle", name, b"\x00" + p)
put("fuzz_pickle", "script.pkl", b"\x01" + script)

# zip checkpoints (the layout torch.save writes: NAME/data.pkl, NAME/data/KEY, NAME/version)
def checkpoint(pkl, storage=b"\0" * 16, extra=()):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", storage)
        for n, d in extra:
            z.writestr("archive/" + n, d)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


put("fuzz_torch_checkpoint", "state.pt", checkpoint(state))
put("fuzz_torch_checkpoint", "script.pt", checkpoint(script, extra=[("constants.pkl", b"\x80\x02).")]))
# legacy torch.save: magic, protocol, sys_info, object, storage keys, then count + bytes
legacy = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19." + b"\x80\x02M\xe9\x03." + \
    b"\x80\x02}(" + unicode("little_endian") + b"\x88" + unicode("protocol_version") + b"M\xe9\x03u." + state + \
    b"\x80\x02](" + unicode("0") + b"e." + struct.pack("<Q", 4) + b"\0" * 16
put("fuzz_torch_checkpoint", "legacy.pth", legacy)
for rel in ["torch-legacy/mixed-legacy.pth", "torch-legacy/hostile-legacy.pth"]:
    copy_fixture("fuzz_torch_checkpoint", rel)

# JSON configs
for rel in ["gpt2-tiny/config.json", "cnn14-tiny/config.json", "clip-vit-tiny/config.json", "clip-vit-tiny/preprocessor_config.json",
            "clip-rn-tiny/config.json", "mel-frontend/config.json", "prefix-aac-tiny/config.json"]:
    copy_fixture("fuzz_json_configs", rel)
put("fuzz_json_configs", "mapper.json", json.dumps({"type": "prefix_aac", "input_dim": 8, "embed_dim": 8, "num_heads": 2,
                                                     "temporal_prefix_length": 3, "global_prefix_length": 2}).encode())
put("fuzz_json_configs", "captioner.json", json.dumps({"format": "prefixcap-captioner", "version": 1,
    "encoder": {"kind": "none"}, "mapper": {"config": {"type": "mlp", "input_dim": 4, "embed_dim": 8}, "weights": "m.safetensors"},
    "lm": {"path": "lm", "tokenizer": "lm"}, "prefix": {"normalize": True}, "decoding": {"beam_size": 2, "stop": ["."]}}).encode())
put("fuzz_json_configs", "train.json", json.dumps({"epochs": 3, "batch_size": 8, "lr": 1e-4, "mapper": {"type": "mlp"}}).encode())

# tokenizer text
for i, text in enumerate(["a dog barks while cars pass by.", "Rain falls on a tin roof!!  \n\tTabs and 'quotes' aren't 1,234.5",
                          "caf\u00e9 \u4e2d\u6587 \U0001F600 \u0301", "\xff\xfe broken \x80 bytes"]):
    put("fuzz_tokenizer", f"text{i}.txt", text.encode("utf-8", "surrogateescape") if i < 3 else text.encode("latin-1"))

# audio: tiny WAVs (16-bit stereo, float mono), the broken fixture files, a short FLAC
for rate, channels, width in [(16000, 1, 2), (44100, 2, 2), (8000, 1, 1)]:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(bytes((i * 7) % 256 for i in range(400 * channels * width)))
    put("fuzz_audio", f"pcm{rate}_{channels}_{width}.wav", buf.getvalue())
fmt = struct.pack("<HHIIHH", 3, 1, 8000, 32000, 4, 32)
body = b"WAVE" + b"fmt " + struct.pack("<I", 18) + fmt + b"\0\0" + b"fact" + struct.pack("<II", 4, 100) + \
    b"data" + struct.pack("<I", 400) + b"\0" * 400
put("fuzz_audio", "float.wav", b"RIFF" + struct.pack("<I", len(body)) + body)
for rel in ["audio-decode/broken/empty.wav", "audio-decode/broken/not_audio.wav", "audio-decode/broken/lying_data_size.wav",
            "audio-decode/broken/lying_fmt_size.wav"]:
    copy_fixture("fuzz_audio", rel)

# images: tiny PNG / JPEG / BMP / GIF / TIFF / PPM from Pillow when present, an SVG
try:
    from PIL import Image
    img = Image.new("RGB", (5, 3), (200, 30, 60))
    for fmt_name, ext in [("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp"), ("GIF", "gif"), ("TIFF", "tif"), ("PPM", "ppm"), ("WEBP", "webp")]:
        b = io.BytesIO()
        try:
            img.save(b, fmt_name)
            put("fuzz_image", "tiny." + ext, b.getvalue())
        except Exception:
            pass
    g = io.BytesIO()
    Image.new("L", (4, 4), 7).save(g, "PNG")
    put("fuzz_image", "gray.png", g.getvalue())
except ImportError:
    pass
put("fuzz_image", "tiny.ppm", b"P6\n2 1\n255\n" + bytes([255, 0, 0, 0, 255, 0]))
put("fuzz_image", "a.svg", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>\n')

# readers: references (Clotho csv, AudioCaps csv, COCO Karpathy and official json, JSONL), predictions
put("fuzz_readers", "clotho.csv", b"\x00file_name,caption_1,caption_2\nclip1.wav,\"A dog, barking.\",A dog barks\n")
put("fuzz_readers", "audiocaps.csv", b"\x00audiocap_id,youtube_id,start_time,caption\n1,abc,30,A dog barks\n")
put("fuzz_readers", "karpathy.json", b"\x04" + json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "A cat."}]}]}).encode())
put("fuzz_readers", "coco.json", b"\x00" + json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                                       "annotations": [{"image_id": 1, "caption": "A cat."}]}).encode())
put("fuzz_readers", "refs.jsonl", b"\x00" + b'{"media": "a.wav", "captions": ["a dog", "dogs bark"]}\n')
put("fuzz_readers", "preds.jsonl", b"\x01" + b'{"path": "a.wav", "caption": "a dog", "start": 0}\n{"path": "b.wav", "error": "x"}\n')
put("fuzz_readers", "preds.csv", b"\x01path,modality,start,end,caption,score\na.wav,audio,0,10,a dog,-0.5\n")
put("fuzz_readers", "manifest.jsonl", b"\x02" + b'{"media": "a.wav", "captions": ["a dog"]}\n')
