// Captioning metrics, computed natively with the numbers of the COCO caption evaluation code
// (pycocoevalcap): its tokenization (Stanford PTBTokenizer -preserveLines -lowerCase, then its
// punctuation list removed), BLEU-1..4, ROUGE-L and CIDEr-D, corpus-level and per item.
// ref: salaniz/pycocoevalcap (ad63453) bleu/bleu_scorer.py, rouge/rouge.py, cider/cider_scorer.py,
// tokenizer/ptbtokenizer.py; stanfordnlp/CoreNLP v3.4.1 PTBLexer.flex.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace prefixcap {

struct CaptionItem {
  std::string id;
  std::vector<std::string> references;  // already tokenized: words separated by spaces
  std::string candidate;
};

// The PTB tokenizer's output tokens for one raw caption (lower-cased, quotes as `` and '',
// brackets as -lrb-/-rrb-, contractions split: "won't" -> "wo n't").
std::vector<std::string> ptb_tokenize(const std::string& raw);
// pycocoevalcap's PTBTokenizer.tokenize for one caption: the tokens above minus its
// PUNCTUATIONS, joined by single spaces.
std::string coco_tokenize(const std::string& raw);
// pycocoevalcap's post-processing of one line the PTB tokenizer printed:
// ' '.join(w for w in line.rstrip().split(' ') if w not in PUNCTUATIONS). coco_tokenize applies it
// to the native tokens, coco_tokenize_with_jar (evaluate.h) to the jar's output.
std::string coco_tokenize_ptb_line(const std::string& line);

struct MetricResult {
  std::map<std::string, double> corpus;                 // "Bleu_1".."Bleu_4", "ROUGE_L", "CIDEr"
  std::map<std::string, std::vector<double>> per_item;  // same keys, one value per item
};

// pycocoevalcap Bleu(4): effective reference length "closest", smoothing constants included.
MetricResult bleu(const std::vector<CaptionItem>& items, int max_n = 4);
// pycocoevalcap Rouge: LCS-based F-measure, beta 1.2; corpus = mean of items.
MetricResult rouge_l(const std::vector<CaptionItem>& items);
// pycocoevalcap Cider (CIDEr-D): n = 1..4, sigma 6, document frequencies from the references
// of exactly these items; corpus = mean of items.
MetricResult cider_d(const std::vector<CaptionItem>& items);

}  // namespace prefixcap
