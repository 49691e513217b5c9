"""The anchor of caption_bench's metrics: pycocoevalcap as its users run it (COCOEvalCap's
scorers: PTBTokenizer through Stanford CoreNLP's jar and Java, then Bleu(4), Rouge and Cider) on
the items caption_bench wrote, timed part by part. Run with .venv-ref's Python (pycocoevalcap
from PyPI). Prints one JSON object: seconds per part, and the corpus scores under prefixcap's
metric names, so that caption_bench can check both sides computed the same numbers.

    python bench/eval_anchor.py ITEMS.json     (a list of {"id", "references": [..], "candidate"})
"""
import contextlib
import io
import json
import sys
import time

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer


def main():
    with open(sys.argv[1]) as f:
        items = json.load(f)
    gts = {it["id"]: [{"caption": r} for r in it["references"]] for it in items}
    res = {it["id"]: [{"caption": it["candidate"]}] for it in items}
    out = {}
    t0 = time.perf_counter()
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    out["tokenize_s"] = time.perf_counter() - t0
    corpus = {}
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res)
    out["bleu_s"] = time.perf_counter() - t
    for n, score in enumerate(bleu, 1):
        corpus["Bleu_%d" % n] = score
    t = time.perf_counter()
    corpus["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["rouge_s"] = time.perf_counter() - t
    t = time.perf_counter()
    corpus["CIDEr"], _ = Cider().compute_score(gts, res)
    out["cider_s"] = time.perf_counter() - t
    out["total_s"] = time.perf_counter() - t0
    out["corpus"] = {k: float(v) for k, v in corpus.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
