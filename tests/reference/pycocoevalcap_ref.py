#!/usr/bin/env python3
"""Reference values from pycocoevalcap itself (its Python wrappers around the official jars),
for tests/test_reference.cpp. Test helper only: never on the run-time path of prefixcap.

  pycocoevalcap_ref.py ptb IN.json OUT.json     IN: ["caption", ...]
      OUT: the same list through PTBTokenizer.tokenize (Stanford PTBTokenizer 3.4.1 jar,
      -preserveLines -lowerCase, then pycocoevalcap's punctuation removal)
  pycocoevalcap_ref.py meteor IN.json OUT.json  IN: [{"id", "references": [...], "candidate"}, ...]
      OUT: {"corpus": METEOR, "per_item": [...]} from Meteor().compute_score (meteor-1.5.jar)
  pycocoevalcap_ref.py jars                     prints the folder of each jar, one per line
  pycocoevalcap_ref.py wordpiece IN.json OUT.json  IN: {"vocab": vocab.txt to write, "captions": [...]}
      learns a WordPiece vocabulary from the captions (Hugging Face tokenizers), then OUT:
      {"tokens": [...], "ids": [...]} from transformers' BertTokenizer (the slow, Python one;
      lower-casing, accents stripped; ids with [CLS]/[SEP], truncated at 64 as FENSE does)
"""
import json
import os
import sys

from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer


def main():
    mode = sys.argv[1]
    if mode == "jars":
        import pycocoevalcap.meteor.meteor as meteor_module
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb_module
        print(os.path.join(os.path.dirname(meteor_module.__file__), "meteor-1.5.jar"))
        print(os.path.join(os.path.dirname(ptb_module.__file__), "stanford-corenlp-3.4.1.jar"))
        return
    with open(sys.argv[2], encoding="utf-8") as f:
        data = json.load(f)
    if mode == "ptb":
        captions = {i: [{"caption": s}] for i, s in enumerate(data)}
        out = PTBTokenizer().tokenize(captions)
        result = [out[i][0] for i in range(len(data))]
    elif mode == "wordpiece":
        from tokenizers import BertWordPieceTokenizer
        from transformers import BertTokenizer
        trainer = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
        trainer.train_from_iterator(data["captions"], vocab_size=600, min_frequency=1)
        vocab = trainer.get_vocab()
        with open(data["vocab"], "w", encoding="utf-8") as f:
            for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
                f.write(token + "\n")
        bert = BertTokenizer(data["vocab"], do_lower_case=True)
        result = {"tokens": [bert.tokenize(c) for c in data["captions"]],
                  "ids": [bert(c, truncation=True, max_length=64)["input_ids"] for c in data["captions"]]}
    elif mode == "meteor":
        gts = {it["id"]: it["references"] for it in data}
        res = {it["id"]: [it["candidate"]] for it in data}
        score, scores = Meteor().compute_score(gts, res)
        result = {"corpus": score, "per_item": [float(s) for s in scores]}
    else:
        raise SystemExit("unknown mode " + mode)
    with open(sys.argv[3], "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
