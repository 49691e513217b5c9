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
  std::string device = "cpu";    // where fluency_error_probability runs the detector
};

struct FenseScores {
  std::vector<double> sbert_sim;   // per item
  std::vector<double> error_prob;  // per item (empty without a detector)
  std::vector<double> fense;       // per item (empty without a detector)
  double corpus_sbert_sim = 0, corpus_fer = 0, corpus_fense = 0;  // fer, fense: 0 without a detector
};

// The FENSE models, loaded once (no LibTorch in this header: apps include it cheaply).
class FenseScorer {
 public:
  // sbert_folder: a sentence-transformers folder (paraphrase-TinyBERT-L6-v2 for FENSE).
  // echecker: fense's .ckpt and the folder of its model_type (config.json, vocab.txt); both
  // empty = no fluency detector (only the Sentence-BERT similarity is computed). Throws
  // FileError / ConfigError naming the file at fault.
  explicit FenseScorer(const std::string& sbert_folder, const std::string& echecker = "",
                       const std::string& echecker_bert = "");
  ~FenseScorer();
  FenseScorer(FenseScorer&&) noexcept;
  FenseScorer& operator=(FenseScorer&&) noexcept;

  bool has_detector() const;
  // Runs both models on this device ("cpu", "cuda", "cuda:N"); throws when it is not available.
  void to_device(const std::string& device);
  // Throws std::invalid_argument when the lists differ in length, are empty, or an item has no
  // reference.
  FenseScores score(const std::vector<std::string>& candidates, const std::vector<std::vector<std::string>>& references,
                    const FenseOptions& options = {}) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The fluency-error detector alone (FER and SPIDEr-FL need no Sentence-BERT): the error
// probability of each text.
std::vector<double> fluency_error_probability(const std::string& echecker, const std::string& echecker_bert,
                                              const std::vector<std::string>& texts, const FenseOptions& options = {});

// score_i * (1 - penalty * [error_prob_i > threshold]): FENSE from sbert_sim, SPIDEr-FL from SPIDEr.
std::vector<double> fluency_penalized(const std::vector<double>& scores, const std::vector<double>& error_probs,
                                      double threshold = 0.9, double penalty = 0.9);

}  // namespace prefixcap
