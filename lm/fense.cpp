#include "lm/fense.h"

#include <numeric>
#include <stdexcept>

#include <optional>

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include "lm/bert.h"

namespace prefixcap {

namespace {
double mean(const std::vector<double>& v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}
}  // namespace

std::vector<double> fluency_penalized(const std::vector<double>& scores, const std::vector<double>& error_probs,
                                      double threshold, double penalty) {
  if (scores.size() != error_probs.size())
    throw std::invalid_argument("fluency penalty: " + std::to_string(scores.size()) + " scores but " +
                                std::to_string(error_probs.size()) + " error probabilities");
  std::vector<double> out(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) out[i] = scores[i] * (1.0 - penalty * (error_probs[i] > threshold ? 1.0 : 0.0));
  return out;
}

struct FenseScorer::Impl {
  SentenceEncoder sbert;
  std::optional<FluencyErrorDetector> detector;
};

FenseScorer::FenseScorer(const std::string& sbert_folder, const std::string& echecker, const std::string& echecker_bert)
    : impl_(std::make_unique<Impl>(Impl{SentenceEncoder::load(sbert_folder), std::nullopt})) {
  if (echecker.empty() != echecker_bert.empty())
    throw std::invalid_argument("the fluency-error detector needs both its checkpoint and its BERT folder");
  if (!echecker.empty()) impl_->detector = FluencyErrorDetector::load(echecker, echecker_bert);
}
FenseScorer::~FenseScorer() = default;
FenseScorer::FenseScorer(FenseScorer&&) noexcept = default;
FenseScorer& FenseScorer::operator=(FenseScorer&&) noexcept = default;

bool FenseScorer::has_detector() const { return impl_->detector.has_value(); }

namespace {
c10::Device checked_device(const std::string& name) {
  const c10::Device device(name);  // throws on a malformed name
  if (device.is_cuda() && !at::hasCUDA())
    throw std::invalid_argument("device " + name + ": no CUDA device is available to this LibTorch build");
  return device;
}
}  // namespace

void FenseScorer::to_device(const std::string& name) {
  const c10::Device device = checked_device(name);
  impl_->sbert.to(device);
  if (impl_->detector) impl_->detector->to(device);
}

FenseScores FenseScorer::score(const std::vector<std::string>& candidates,
                               const std::vector<std::vector<std::string>>& references, const FenseOptions& options) const {
  const SentenceEncoder& sbert = impl_->sbert;
  const FluencyErrorDetector* detector = impl_->detector ? &*impl_->detector : nullptr;
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
  // Embeddings in float32 as sentence-transformers returns them; each item's cosines averaged.
  const at::Tensor cand = sbert.encode(candidates, /*normalize=*/true, options.batch_size);
  const at::Tensor refs = sbert.encode(flat, /*normalize=*/true, options.batch_size);
  FenseScores out;
  out.sbert_sim.resize(candidates.size());
  for (size_t i = 0; i < candidates.size(); ++i) {
    const at::Tensor sims = at::matmul(refs.slice(0, first[i], first[i + 1]), cand[static_cast<int64_t>(i)]);
    out.sbert_sim[i] = sims.mean().item<double>();
  }
  out.corpus_sbert_sim = mean(out.sbert_sim);
  if (detector) {
    out.error_prob = detector->error_probability(candidates, options.batch_size);
    std::vector<double> errors(out.error_prob.size());
    for (size_t i = 0; i < errors.size(); ++i) errors[i] = out.error_prob[i] > options.error_threshold ? 1.0 : 0.0;
    out.corpus_fer = mean(errors);
    out.fense = fluency_penalized(out.sbert_sim, out.error_prob, options.error_threshold, options.penalty);
    out.corpus_fense = mean(out.fense);
  }
  return out;
}

std::vector<double> fluency_error_probability(const std::string& echecker, const std::string& echecker_bert,
                                              const std::vector<std::string>& texts, const FenseOptions& options) {
  FluencyErrorDetector detector = FluencyErrorDetector::load(echecker, echecker_bert);
  detector.to(checked_device(options.device));
  return detector.error_probability(texts, options.batch_size);
}

}  // namespace prefixcap
