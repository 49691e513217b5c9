// Validation of both tasks, sharded: every rank takes a block of the validation examples (for
// the teacher-forced loss) and of the items (for captions); the sums and the captions meet on
// rank 0, which computes the metrics once.
#include <cstdio>
#include <filesystem>

#include <ATen/ATen.h>
#include <torch/types.h>

#include "metrics/evaluate.h"
#include "pipeline/caption_task.h"

namespace prefixcap::training {
namespace fs = std::filesystem;

double sharded_loss(int64_t n, int64_t batch_size, const std::function<std::pair<double, int64_t>(int64_t lo, int64_t hi)>& sum_and_count,
                    const Dist& dist) {
  const Span mine = rank_span(n, dist.rank, dist.world);
  std::vector<double> totals = {0, 0};
  for (int64_t lo = mine.lo; lo < mine.hi; lo += batch_size) {
    const auto [sum, count] = sum_and_count(lo, std::min(mine.hi, lo + batch_size));
    totals[0] += sum;
    totals[1] += static_cast<double>(count);
  }
  dist.sum(totals);
  return totals[1] > 0 ? totals[0] / totals[1] : NAN;
}

Json caption_validation(CaptionTask& t, const TrainConfig& c, const std::vector<DatasetItem>& val, const std::vector<Example>& val_examples,
                        Progress& progress, const Dist& dist) {
  torch::NoGradGuard no_grad;
  Captioner& cap = t.captioner();
  auto features_of = [&](const std::vector<size_t>& which) {
    std::vector<TensorMap> rows;
    if (!t.encoder_trains()) {
      for (size_t i : which) rows.push_back(*t.cache().get(val[i].media));
    } else {
      std::vector<Media> media;
      for (size_t i : which) media.push_back(t.decode(val[i].media));
      rows = t.encode(media);
    }
    return rows;
  };
  // teacher-forced loss over every validation caption
  const double loss = sharded_loss(
      static_cast<int64_t>(val_examples.size()), c.batch_size,
      [&](int64_t lo, int64_t hi) {
        std::vector<size_t> which;
        std::vector<const std::vector<int64_t>*> rows;
        for (int64_t k = lo; k < hi; ++k) {
          which.push_back(static_cast<size_t>(val_examples[static_cast<size_t>(k)].item));
          rows.push_back(&val_examples[static_cast<size_t>(k)].ids);
        }
        Batch b;
        b.features = t.collate(features_of(which));
        pad_ids(rows, &b.ids, &b.mask);
        const int64_t n = CaptionTask::tokens(b);
        return std::pair<double, int64_t>{t.loss(b).item<double>() * static_cast<double>(n), n};
      },
      dist);
  // captions: this rank's block of the items, then every rank's in item order on rank 0
  const size_t n_items = c.val_max_items > 0 ? std::min(val.size(), static_cast<size_t>(c.val_max_items)) : val.size();
  const Span mine = rank_span(static_cast<int64_t>(n_items), dist.rank, dist.world);
  DecodingOptions opts = cap.default_decoding();
  opts.beam_size = static_cast<int>(c.val_beam_size);
  opts.max_tokens = static_cast<int>(c.max_tokens);
  Json texts = Json::array();
  for (int64_t lo = mine.lo; lo < mine.hi; lo += c.encode_batch) {
    std::vector<size_t> which;
    for (int64_t i = lo; i < std::min(mine.hi, lo + c.encode_batch); ++i) which.push_back(static_cast<size_t>(i));
    auto caps = cap.caption(t.to_mapper_input(t.collate(features_of(which))), opts);
    for (size_t k = 0; k < which.size(); ++k) texts.push_back(caps[k][0].text);
    progress.update("validation captions " + bar(double(texts.size()) / std::max<int64_t>(mine.size(), 1)) + " " +
                    std::to_string(texts.size()) + "/" + std::to_string(mine.size()));
  }
  progress.done();
  const auto gathered = dist.gather(json_dump(texts));
  if (!dist.main()) return Json();
  std::vector<std::string> all;
  for (const auto& g : gathered)
    for (const auto& x : Json::parse(g)) all.push_back(x.get<std::string>());
  std::vector<CaptionItem> items;
  for (size_t i = 0; i < all.size(); ++i)
    if (!val[i].captions.empty())  // an item without references cannot be scored
      items.push_back({val[i].media, val[i].captions, all[i]});
  EvalReport report = items.empty() ? EvalReport{} : evaluate(items, EvalOptions{});
  Json m = {{"loss", loss}};
  for (const auto& [k, v] : report.corpus) m[k] = v;
  Json samples = Json::array();
  std::string shown;
  for (size_t i = 0; i < items.size() && i < static_cast<size_t>(c.sample_captions); ++i) {
    samples.push_back({{"media", fs::path(items[i].id).filename().string()}, {"caption", items[i].candidate},
                       {"reference", items[i].references.empty() ? "" : items[i].references[0]}});
    shown += "\n  " + fs::path(items[i].id).filename().string() + ": " + items[i].candidate + "   (ref: " +
             (items[i].references.empty() ? "" : items[i].references[0]) + ")";
  }
  m["samples"] = samples;
  char line[256];
  std::snprintf(line, sizeof line, "validation: loss %.4f  BLEU-4 %.4f  ROUGE-L %.4f  CIDEr-D %.4f", loss, m.value("Bleu_4", 0.0),
                m.value("ROUGE_L", 0.0), m.value("CIDEr", 0.0));
  progress.print(line + shown);
  return m;
}

}  // namespace prefixcap::training
