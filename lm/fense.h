// FENSE (Zhou et al., "Can audio captions be evaluated with image caption metrics?", ICASSP
// 2022) and the fluency penalty of SPIDEr-FL, computed as aac-metrics does (its fense, sbert_sim,
// fer and spider_fl functions):
//   sbert_sim_i = mean over item i's references r of cos(SBERT(candidate_i), SBERT(r))
//   error_i     = [echecker's error probability of candidate_i > error_threshold]
//   fense_i     = sbert_sim_i * (1 - penalty * error_i);   corpus values are means over items.
//   spider_fl_i = spider_i * (1 - penalty * error_i)
// Candidates and references are the raw captions (no PTB tokenization).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace prefixcap {

struct FenseOptions {
  double error_threshold = 0.9;  // an error probability above this counts as a fluency error
  double penalty = 0.9;          // score multiplied by (1 - penalty) when it does
  int64_t batch_size = 32;       // texts per BERT forward
};

struct FenseScores {
  std::vector<double> sbert_sim;   // per item (empty without a Sentence-BERT)
  std::vector<double> error_prob;  // per item (empty without a detector)
  std::vector<double> fer;         // per item: 1 = fluency error, 0 = none (empty without a detector)
  std::vector<double> fense;       // per item (empty without both models)
  double corpus_sbert_sim = 0, corpus_fer = 0, corpus_fense = 0;  // 0 where the per-item list is empty
};

// The FENSE models, loaded once (no LibTorch in this header: apps include it cheaply).
class FenseScorer {
 public:
  // sbert_folder: a sentence-transformers folder (paraphrase-TinyBERT-L6-v2 for FENSE); empty =
  // no Sentence-BERT (FER only). echecker: fense's .ckpt and the folder of its model_type
  // (config.json, vocab.txt); both empty = no fluency detector. At least one model is needed.
  // device: "cpu", "cuda" or "cuda:N", where both run. Throws FileError / ConfigError naming the
  // file at fault, std::invalid_argument for a bad combination or an unavailable device.
  FenseScorer(const std::string& sbert_folder, const std::string& echecker, const std::string& echecker_bert,
              const std::string& device = "cpu");
  ~FenseScorer();
  FenseScorer(FenseScorer&&) noexcept;
  FenseScorer& operator=(FenseScorer&&) noexcept;

  bool has_sbert() const;
  bool has_detector() const;
  // What the loaded models give: SBERT-sim with a Sentence-BERT, FER with a detector, FENSE with
  // both. Throws std::invalid_argument when the lists differ in length, are empty, or an item has
  // no reference.
  FenseScores score(const std::vector<std::string>& candidates, const std::vector<std::vector<std::string>>& references,
                    const FenseOptions& options = {}) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// [error_prob_i > threshold] as 1 or 0: the per-item fluency errors (FER's items).
std::vector<double> fluency_errors(const std::vector<double>& error_probs, double threshold = 0.9);

// score_i * (1 - penalty * [error_prob_i > threshold]): FENSE from sbert_sim, SPIDEr-FL from SPIDEr.
std::vector<double> fluency_penalized(const std::vector<double>& scores, const std::vector<double>& error_probs,
                                      double threshold = 0.9, double penalty = 0.9);

// The mean of a per-item list (a corpus score); 0 for an empty list.
double corpus_mean(const std::vector<double>& per_item);

}  // namespace prefixcap
