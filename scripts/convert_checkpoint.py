#!/usr/bin/env python3
"""Convert a PyTorch checkpoint (any torch.save format, including legacy non-zip pickles such
as the official PANNs .pth files) into a safetensors file that prefixcap reads.

    python3 scripts/convert_checkpoint.py IN.pth OUT.safetensors [--key model]

Needs Python 3 with torch (Debian: apt-get install python3-torch). Nested dicts are flattened
with '.' (as prefixcap's own checkpoint reader does); --key keeps only one sub-dict (e.g.
'model' for PANNs) and drops its prefix. Non-tensor entries are skipped and listed.
Only run this on checkpoints you trust: torch.load of a legacy pickle can execute code.
"""
import argparse
import json
import os
import struct
import sys

DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def flatten(value, prefix, out, skipped):
    import torch
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, dict):
        for key, item in value.items():
            flatten(item, f"{prefix}.{key}" if prefix else str(key), out, skipped)
    else:
        skipped.append(prefix or "<root>")


def write_safetensors(path, tensors, metadata):
    import torch
    header = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dtype = DTYPES.get(str(t.dtype).replace("torch.", ""))
        if dtype is None:
            raise SystemExit(f"tensor '{name}': dtype {t.dtype} cannot be stored in safetensors")
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - (8 + len(text)) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--key", help="keep only this top-level entry (e.g. 'model') and drop its prefix")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        raise SystemExit("convert_checkpoint.py needs torch: apt-get install python3-torch")
    obj = torch.load(args.input, map_location="cpu")
    if args.key:
        if not isinstance(obj, dict) or args.key not in obj:
            raise SystemExit(f"{args.input}: no top-level entry '{args.key}'")
        obj = obj[args.key]
    tensors, skipped = {}, []
    flatten(obj, "", tensors, skipped)
    if not tensors:
        raise SystemExit(f"{args.input}: no tensors found")
    write_safetensors(args.output, tensors, {"format": "pt", "source": os.path.basename(args.input)})
    print(f"wrote {len(tensors)} tensors to {args.output}")
    if skipped:
        print(f"skipped non-tensor entries: {', '.join(skipped[:10])}" + (" ..." if len(skipped) > 10 else ""),
              file=sys.stderr)


if __name__ == "__main__":
    main()
