#!/usr/bin/env python3
"""The anchor of bench/fense_bench.cpp: aac-metrics' fense() (sentence-transformers + fense's
BERTFlatClassifier on transformers) on models of the published shapes, with random weights:
Sentence-BERT = paraphrase-TinyBERT-L6-v2's (hidden 768, 6 layers, 12 heads, 128 tokens, mean
pooling), echecker = bert-base-uncased's (hidden 768, 12 layers) with a 6-way head, in fense's
checkpoint format. Makes the models and the corpus in --dir, times fense() on it, prints JSON.
Run with .venv-ref's Python (scripts/setup.sh).
"""
import argparse
import json
import os
import random
import sys
import time

import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
from aac_metrics_functions import BERTFlatClassifier, fense  # noqa: E402
from sentence_transformers import SentenceTransformer, models  # noqa: E402
from tokenizers import BertWordPieceTokenizer  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizerFast  # noqa: E402

SUBJECTS = ["a dog", "a man", "a woman", "birds", "a car", "the wind", "rain", "a crowd", "a child", "water",
            "an engine", "a bell", "people", "a train", "thunder", "a baby", "footsteps", "music", "a door", "leaves"]
VERBS = ["barks", "speaks", "sings", "passes by", "blows", "falls", "cheers", "laughs", "flows", "runs",
         "rings", "talk", "approaches", "rumbles", "cries", "echo", "plays", "closes", "rustle", "hums"]
TAILS = ["in the distance", "loudly", "while cars pass", "on a rainy day", "near a busy road", "in a large room",
         "as birds chirp in the background", "and then stops", "repeatedly", "outside", "", "softly",
         "while people talk nearby", "over and over again", "in the wind"]


def caption(rng):
    parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(TAILS)]
    if rng.random() < 0.4:
        parts += ["while", rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(TAILS)]
    return " ".join(p for p in parts if p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--refs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    os.makedirs(args.dir, exist_ok=True)
    items = [{"candidate": caption(rng), "references": [caption(rng) for _ in range(args.refs)]}
             for _ in range(args.items)]
    with open(os.path.join(args.dir, "items.json"), "w") as f:
        json.dump(items, f)

    vocab = os.path.join(args.dir, "vocab.txt")
    trainer = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    trainer.train_from_iterator([caption(rng) for _ in range(5000)], vocab_size=30522, min_frequency=1)
    with open(vocab, "w", encoding="utf-8") as f:
        for token, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1]):
            f.write(token + "\n")
    vocab_size = sum(1 for _ in open(vocab, encoding="utf-8"))

    def bert(folder, layers):
        config = BertConfig(vocab_size=vocab_size, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12,
                            intermediate_size=3072, max_position_embeddings=512)
        BertModel(config).save_pretrained(folder)
        BertTokenizerFast(vocab, do_lower_case=True).save_pretrained(folder)

    bert(os.path.join(args.dir, "hf-sbert"), 6)
    transformer = models.Transformer(os.path.join(args.dir, "hf-sbert"), max_seq_length=128)
    SentenceTransformer(modules=[transformer, models.Pooling(768, pooling_mode="mean")], device="cpu").save(
        os.path.join(args.dir, "sbert"))
    echecker_bert = os.path.join(args.dir, "echecker-bert")
    bert(echecker_bert, 12)
    clf = BERTFlatClassifier(model_type=echecker_bert, num_classes=6)
    state = clf.state_dict()
    state["encoder.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    torch.save({"model_type": echecker_bert, "num_classes": 6, "state_dict": state},
               os.path.join(args.dir, "echecker.ckpt"))

    sbert = SentenceTransformer(os.path.join(args.dir, "sbert"), device="cpu")
    state = torch.load(os.path.join(args.dir, "echecker.ckpt"))
    echecker = BERTFlatClassifier(model_type=state["model_type"], num_classes=state["num_classes"])
    state["state_dict"].pop("encoder.embeddings.position_ids")
    echecker.load_state_dict(state["state_dict"])
    echecker.eval()
    tokenizer = AutoTokenizer.from_pretrained(echecker_bert)
    cands = [it["candidate"] for it in items]
    refs = [it["references"] for it in items]
    best, score = 1e300, None
    for _ in range(2):
        t0 = time.perf_counter()
        corpus, _ = fense(cands, refs, sbert_model=sbert, echecker=echecker, echecker_tokenizer=tokenizer, device="cpu")
        best = min(best, time.perf_counter() - t0)
        score = float(corpus["fense"])
    print(json.dumps({"seconds": best, "fense": score, "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
