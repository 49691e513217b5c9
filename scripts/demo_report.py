#!/usr/bin/python3
"""Helpers of scripts/demo.sh (standard library only).

  demo_report.py baselines --train train.jsonl --test test.jsonl --out DIR [--seed S]
      writes DIR/most_frequent.jsonl and DIR/random.jsonl in caption's jsonl format: the most
      frequent training caption for every test clip, and a random training caption per clip.
  demo_report.py table NAME=caption-eval.json ...
      prints one markdown table of BLEU-1..4, ROUGE-L and CIDEr-D, a row per NAME.
  demo_report.py show --predictions P --test test.jsonl [-n N]
      prints captions next to their references.
"""
import argparse
import collections
import json
import os
import random
import sys


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def baselines(a):
    train, test = read_jsonl(a.train), read_jsonl(a.test)
    captions = [c for it in train for c in it["captions"]]
    counts = collections.Counter(captions)
    top = max(sorted(counts), key=lambda c: counts[c])  # ties: alphabetical first
    rng = random.Random(a.seed)
    os.makedirs(a.out, exist_ok=True)
    base = os.path.dirname(os.path.abspath(a.test))
    for name, pick in (("most_frequent", lambda: top), ("random", lambda: rng.choice(captions))):
        with open(os.path.join(a.out, f"{name}.jsonl"), "w") as f:
            for it in test:
                f.write(json.dumps({"path": os.path.join(base, it["media"]), "caption": pick()}) + "\n")
    print(f"baselines: most frequent training caption = \"{top}\"")


def table(a):
    names = {k: k for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D")}
    rows = []
    for spec in a.results:
        label, path = spec.split("=", 1)
        with open(path) as f:
            j = json.load(f)
        scores = j["scores"]
        rows.append((label, [scores.get(k) for k in names], j.get("items")))
    print("| system | " + " | ".join(names.values()) + " |")
    print("| --- |" + " ---: |" * len(names))
    for label, vals, _ in rows:
        print(f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    print(f"\n{rows[0][2]} held-out test clips; references: the three captions of each clip's category.")


def show(a):
    refs = {os.path.splitext(os.path.basename(it["media"]))[0]: it for it in read_jsonl(a.test)}
    preds = [p for p in read_jsonl(a.predictions)
             if "caption" in p and os.path.splitext(os.path.basename(p.get("path", "")))[0] in refs]
    step = max(1, len(preds) // max(1, a.n))  # evenly spread over the test set, not hand-picked
    for p in preds[::step][: a.n]:
        it = refs[os.path.splitext(os.path.basename(p["path"]))[0]]
        print(f"  {os.path.basename(it['media'])}\n      prefixcap: {p['caption']}\n      reference: {it['captions'][0]}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("baselines")
    b.add_argument("--train", required=True)
    b.add_argument("--test", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("table")
    t.add_argument("results", nargs="+")
    s = sub.add_parser("show")
    s.add_argument("--predictions", required=True)
    s.add_argument("--test", required=True)
    s.add_argument("-n", type=int, default=6)
    a = ap.parse_args()
    try:
        {"baselines": baselines, "table": table, "show": show}[a.cmd](a)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"demo_report: {e}")


if __name__ == "__main__":
    main()
