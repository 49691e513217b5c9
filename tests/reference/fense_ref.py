#!/usr/bin/env python3
"""Golden data for FENSE and SPIDEr-FL (tests/test_fense.cpp), from the reference code itself:
transformers' BertModel, sentence-transformers' SentenceTransformer and aac-metrics' fense, fer,
sbert_sim and spider_fl functions (with fense's BERTFlatClassifier), all on tiny random models
this script makes. Test helper only: never on the run-time path of prefixcap.

  fense_ref.py IN.json OUT.json
    IN: {"dir": folder to write the models into, "seed": int,
         "vocab_captions": [...]            captions to learn a WordPiece vocabulary from,
         "items": [{"candidate", "references": [...]}, ...],
         "spider": [one SPIDEr score per item]  (SPIDEr-FL's input),
         "texts": [...]}                    texts for the embedding / probability comparisons
    writes DIR/vocab.txt, DIR/sbert (mean pooling), DIR/sbert-cls-normalize (CLS pooling and a
    Normalize module), DIR/sbert-max (max pooling): sentence-transformers folders saved by
    SentenceTransformer.save; DIR/echecker.ckpt (fense's format: {"model_type", "num_classes",
    "state_dict"} with encoder.embeddings.position_ids as the published checkpoints have it) and
    DIR/echecker-bert (the model_type folder: config.json, vocab.txt, tokenizer files), and
    DIR/echecker-legacy.ckpt (the same in torch.save's legacy, non-zip format).
    OUT: {"embeddings": {name: [[...]]}, "probs": [[6 floats] per text], "preprocess": [...],
          "fense": {"sbert_sim": [...], "error_prob": [...], "fer": [...], "fense": [...],
                    "corpus": {"sbert_sim", "fer", "fense"}},
          "spider_fl": {"per_item": [...], "corpus": float}}
"""
import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aac_metrics_functions import BERTFlatClassifier, _spider_fl_from_outputs, fense, fer, fer_module  # noqa: E402
from sentence_transformers import SentenceTransformer, models  # noqa: E402
from tokenizers import BertWordPieceTokenizer  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizerFast  # noqa: E402


def randomize(module, generator, scale=0.3):
    """Weights far from BERT's N(0, 0.02) init, so that attention, LayerNorm affine terms and
    biases all matter in the comparison."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=generator))


def make_bert(folder, vocab, seed, hidden, layers, heads, act):
    config = BertConfig(vocab_size=sum(1 for _ in open(vocab, encoding="utf-8")), hidden_size=hidden,
                        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                        hidden_act=act, max_position_embeddings=80, type_vocab_size=2)
    model = BertModel(config)
    randomize(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(folder)
    BertTokenizerFast(vocab, do_lower_case=True).save_pretrained(folder)
    return model


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        data = json.load(f)
    out_dir, seed = data["dir"], data["seed"]
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)

    vocab = os.path.join(out_dir, "vocab.txt")
    trainer = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    trainer.train_from_iterator(data["vocab_captions"], vocab_size=500, min_frequency=1)
    with open(vocab, "w", encoding="utf-8") as f:
        for token, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1]):
            f.write(token + "\n")

    # Sentence-BERT: a tiny random BERT (hidden 32, 2 layers, 4 heads, erf GELU), cut at 24 tokens.
    hf = os.path.join(out_dir, "hf-sbert")
    make_bert(hf, vocab, seed + 1, 32, 2, 4, "gelu")
    sberts = {}
    for name, mode, normalize in (("sbert", "mean", False), ("sbert-cls-normalize", "cls", True), ("sbert-max", "max", False)):
        transformer = models.Transformer(hf, max_seq_length=24)
        modules = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode=mode)]
        if normalize:
            modules.append(models.Normalize())
        model = SentenceTransformer(modules=modules, device="cpu")
        model.save(os.path.join(out_dir, name))
        sberts[name] = SentenceTransformer(os.path.join(out_dir, name), device="cpu")  # as a user loads it

    # The fluency-error detector in fense's checkpoint format (hidden 48, 3 layers, 2 heads).
    echecker_bert = os.path.join(out_dir, "echecker-bert")
    make_bert(echecker_bert, vocab, seed + 2, 48, 3, 2, "gelu")
    clf = BERTFlatClassifier(model_type=echecker_bert, num_classes=6)
    generator = torch.Generator().manual_seed(seed + 3)
    randomize(clf, generator)
    # Spread the "error" logits of the candidates around logit(0.9), so that about half of them
    # count as fluency errors and the penalty is exercised.
    clf.eval()
    candidates = [it["candidate"] for it in data["items"]]
    with torch.no_grad():
        batch = getattr(fer_module, "__infer_preprocess")(AutoTokenizer.from_pretrained(echecker_bert), candidates,
                                                          max_len=64, device="cpu", dtype=torch.long)
        clf.clf.bias.zero_()
        z = clf(**batch)[:, -1]
        scale = 3.0 / float(z.std())
        clf.clf.weight[-1].mul_(scale)
        clf.clf.bias[-1] = 2.1972246 + 0.25 - float((z * scale).median())  # the median item off the threshold
    state = clf.state_dict()
    state["encoder.embeddings.position_ids"] = torch.arange(80).unsqueeze(0)
    torch.save({"model_type": echecker_bert, "num_classes": 6, "state_dict": state},
               os.path.join(out_dir, "echecker.ckpt"))
    # The same checkpoint in the legacy (pre-1.6, non-zip) torch.save format.
    torch.save({"model_type": echecker_bert, "num_classes": 6, "state_dict": state},
               os.path.join(out_dir, "echecker-legacy.ckpt"), _use_new_zipfile_serialization=False)
    # Loaded back as aac-metrics loads the published checkpoints.
    saved = torch.load(os.path.join(out_dir, "echecker.ckpt"))
    echecker = BERTFlatClassifier(model_type=saved["model_type"], num_classes=saved["num_classes"])
    saved["state_dict"].pop("encoder.embeddings.position_ids")
    echecker.load_state_dict(saved["state_dict"])
    echecker.eval()
    tokenizer = AutoTokenizer.from_pretrained(echecker_bert)

    texts = data["texts"]
    result = {"embeddings": {name: model.encode(texts, convert_to_numpy=True).tolist() for name, model in sberts.items()}}
    probs = fer(texts, return_all_scores=True, echecker=echecker, echecker_tokenizer=tokenizer, device="cpu",
                return_probs=True)[1]
    names = ("add_tail", "repeat_event", "repeat_adv", "remove_conj", "remove_verb", "error")
    columns = [probs[f"fluency_error.{n}_prob"].tolist() for n in names]
    result["probs"] = [list(row) for row in zip(*columns)]
    result["preprocess"] = getattr(fer_module, "__text_preprocess")(texts)

    mult_references = [it["references"] for it in data["items"]]
    corpus, sents = fense(candidates, mult_references, sbert_model=sberts["sbert"], echecker=echecker,
                          echecker_tokenizer=tokenizer, device="cpu", return_probs=True)
    result["fense"] = {"sbert_sim": sents["sbert_sim"].tolist(), "fer": sents["fer"].tolist(),
                       "error_prob": sents["fluency_error.error_prob"].tolist(), "fense": sents["fense"].tolist(),
                       "corpus": {k: float(corpus[k]) for k in ("sbert_sim", "fer", "fense")}}
    fer_outs = fer(candidates, return_all_scores=True, echecker=echecker, echecker_tokenizer=tokenizer, device="cpu")
    spider = torch.tensor(data["spider"], dtype=torch.float64)
    fl_corpus, fl_sents = _spider_fl_from_outputs(({"spider": spider.mean()}, {"spider": spider}), fer_outs, 0.9)
    result["spider_fl"] = {"per_item": fl_sents["spider_fl"].tolist(), "corpus": float(fl_corpus["spider_fl"])}
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
