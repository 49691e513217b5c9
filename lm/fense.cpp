#include "lm/fense.h"

#include <numeric>
#include <optional>
#include <stdexcept>

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include "lm/bert.h"

namespace prefixcap {

double corpus_mean(const std::vector<double>& v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

std::vector<double> fluency_errors(const std::vector<double>& error_probs, double threshold) {
  std::vector<double> out(error_probs.size());
  for (size_t i = 0; i < error_probs.size(); ++i) out[i] = error_probs[i] > threshold ? 1.0 : 0.0;
  return out;
}

std::vector<double> fluency_penalized(const std::vector<double>& scores, const std::vector<double>& error_probs,
                                      double threshold, double penalty) {
  if (scores.size() != error_probs.size())
    throw std::invalid_argument("fluency penalty: " + std::to_string(scores.size()) + " scores but " +
                                std::to_string(error_probs.size()) + " error probabilities");
  const std::vector<double> errors = fluency_errors(error_probs, threshold);
  std::vector<double> out(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) out[i] = scores[i] * (1.0 - penalty * errors[i]);
  return out;
}

namespace {
c10::Device checked_device(const std::string& name) {
  const c10::Device device(name);  // throws on a malformed name
  if (device.is_cuda() && !at::hasCUDA())
    throw std::invalid_argument("device " + name + ": no CUDA device is available to this LibTorch build");
  return device;
}
}  // namespace

struct FenseScorer::Impl {
  std::optional<SentenceEncoder> sbert;
  std::optional<FluencyErrorDetector> detector;
};

FenseScorer::FenseScorer(const std::string& sbert_folder, const std::string& echecker, const std::string& echecker_bert,
                         const std::string& device_name)
    : impl_(std::make_unique<Impl>()) {
  if (echecker.empty() != echecker_bert.empty())
    throw std::invalid_argument("the fluency-error detector needs both its checkpoint and its BERT folder");
  if (sbert_folder.empty() && echecker.empty())
    throw std::invalid_argument("FENSE: neither a Sentence-BERT nor a fluency-error detector given");
  const c10::Device device = checked_device(device_name);
  if (!sbert_folder.empty()) {
    impl_->sbert = SentenceEncoder::load(sbert_folder);
    impl_->sbert->to(device);
  }
  if (!echecker.empty()) {
    impl_->detector = FluencyErrorDetector::load(echecker, echecker_bert);
    impl_->detector->to(device);
  }
}
FenseScorer::~FenseScorer() = default;
FenseScorer::FenseScorer(FenseScorer&&) noexcept = default;
FenseScorer& FenseScorer::operator=(FenseScorer&&) noexcept = default;

bool FenseScorer::has_sbert() const { return impl_->sbert.has_value(); }
bool FenseScorer::has_detector() const { return impl_->detector.has_value(); }

FenseScores FenseScorer::score(const std::vector<std::string>& candidates,
                               const std::vector<std::vector<std::string>>& references, const FenseOptions& options) const {
  if (candidates.empty()) throw std::invalid_argument("FENSE: no candidates");
  if (candidates.size() != references.size())
    throw std::invalid_argument("FENSE: " + std::to_string(candidates.size()) + " candidates but " +
                                std::to_string(references.size()) + " reference lists");
  std::vector<std::string> flat;
  std::vector<int64_t> first = {0};
  for (size_t i = 0; i < references.size(); ++i) {
    if (references[i].empty()) throw std::invalid_argument("FENSE: item " + std::to_string(i) + " has no reference");
    flat.insert(flat.end(), references[i].begin(), references[i].end());
    first.push_back(static_cast<int64_t>(flat.size()));
  }
  FenseScores out;
  if (impl_->sbert) {
    // Embeddings in float32 as sentence-transformers returns them; each item's cosines averaged.
    const at::Tensor cand = impl_->sbert->encode(candidates, /*normalize=*/true, options.batch_size);
    const at::Tensor refs = impl_->sbert->encode(flat, /*normalize=*/true, options.batch_size);
    out.sbert_sim.resize(candidates.size());
    for (size_t i = 0; i < candidates.size(); ++i) {
      const at::Tensor sims = at::matmul(refs.slice(0, first[i], first[i + 1]), cand[static_cast<int64_t>(i)]);
      out.sbert_sim[i] = sims.mean().item<double>();
    }
  }
  if (impl_->detector) {
    out.error_prob = impl_->detector->error_probability(candidates, options.batch_size);
    out.fer = fluency_errors(out.error_prob, options.error_threshold);
  }
  if (impl_->sbert && impl_->detector)
    out.fense = fluency_penalized(out.sbert_sim, out.error_prob, options.error_threshold, options.penalty);
  out.corpus_sbert_sim = corpus_mean(out.sbert_sim);
  out.corpus_fer = corpus_mean(out.fer);
  out.corpus_fense = corpus_mean(out.fense);
  return out;
}

}  // namespace prefixcap
