// Corpus evaluation as the captioning papers report it: pycocoevalcap tokenization of
// references and candidates, BLEU-1..4, ROUGE-L, CIDEr-D natively, METEOR 1.5 and SPICE
// through the official jars when the user has them, SPIDEr = (CIDEr-D + SPICE) / 2.
// A metric that did not run is listed in `missing` with the reason, never reported as 0.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "metrics/metrics.h"

namespace prefixcap {

struct EvalOptions {
  bool tokenize = true;        // pycocoevalcap PTB tokenization + punctuation removal
  std::string meteor_jar;      // meteor-1.5.jar (with its data/ folder next to it); "" = not run
  std::string spice_jar;       // spice-1.0.jar (with lib/); "" = not run
  std::string ptb_jar;         // stanford-corenlp-3.4.1.jar: tokenize with it, exactly as pycocoevalcap
                               // does; "" = the native tokenizer (coco_tokenize; docs/evaluation.md
                               // says where it differs)
  std::string java = "java";   // the Java to run the jars with
  int threads = 0;             // native tokenization and BLEU / ROUGE-L / CIDEr-D run on up to this
                               // many threads (0 = every core); the scores do not depend on it
};

struct EvalReport {
  std::vector<std::string> ids;                          // item order of per_item
  std::map<std::string, double> corpus;                  // metric -> score
  std::map<std::string, std::vector<double>> per_item;   // metric -> one score per item
  std::map<std::string, std::string> missing;            // metric -> why it did not run
  std::vector<std::string> warnings;
};

// `items` hold raw (untokenized) captions unless options.tokenize is false.
EvalReport evaluate(const std::vector<CaptionItem>& items, const EvalOptions& options);

// pycocoevalcap's PTBTokenizer.tokenize through the jar: `java -cp JAR
// edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase FILE`, one caption per line
// (newlines inside a caption become spaces), then its punctuation tokens removed. Throws when
// Java or the jar fails.
std::vector<std::string> coco_tokenize_with_jar(const std::vector<std::string>& captions, const std::string& jar,
                                                const std::string& java = "java");

// "17.0.15" style version of `java -version`, or "" when Java cannot be run.
std::string java_version(const std::string& java);

}  // namespace prefixcap
