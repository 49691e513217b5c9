#include "pipeline/train_common.h"

#include <algorithm>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include "core/errors.h"
#include "core/hash.h"
#include "core/weights.h"
#include "data/references.h"

namespace prefixcap::training {
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------
// output

std::string weights_hash(const torch::nn::Module& m) {
  Hasher h;
  for (const auto& [k, v] : module_tensors(m)) {
    h.update(k);
    at::Tensor t = v.to(at::kCPU).contiguous();
    h.update(t.data_ptr(), t.numel() * t.element_size());
  }
  return h.hex();
}

std::string now_iso() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  char buf[32];
  const int64_t t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", (long long)(t / 3600), (long long)(t / 60 % 60), (long long)(t % 60));
  else std::snprintf(buf, sizeof buf, "%lld:%02lld", (long long)(t / 60), (long long)(t % 60));
  return buf;
}


std::string bar(double fraction, int width) {
  fraction = std::clamp(fraction, 0.0, 1.0);
  const int full = static_cast<int>(fraction * width + 0.5);
  return "[" + std::string(full, '#') + std::string(width - full, '.') + "]";
}

void Progress::update(const std::string& line) {
  if (!tty_) return;
  std::fprintf(stderr, "\r\033[K%s", line.c_str());
  std::fflush(stderr);
  open_ = true;
}

void Progress::print(const std::string& line) {
  if (!lines_) return;
  if (open_) std::fprintf(stderr, "\r\033[K");
  open_ = false;
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

void Progress::done() {
  if (open_) std::fprintf(stderr, "\n");
  open_ = false;
}

void JsonLog::truncate_after(int64_t step) {
  if (!fs::exists(path_)) return;
  std::ifstream in(path_);
  std::string line, kept;
  while (std::getline(in, line)) {
    try {
      Json j = Json::parse(line);
      if (j.value("step", int64_t{0}) <= step) kept += line + "\n";
    } catch (const Json::exception&) {  // a line cut by a crash
    }
  }
  write_file_atomic(path_, kept);
}

void JsonLog::write(const Json& j) {
  std::ofstream out(path_, std::ios::app);
  out << json_dump(j) << "\n";
  out.flush();
  if (!out) throw FileError(path_, "cannot write the training log");
}

// ---------------------------------------------------------------------------------------
// data

namespace {
std::string finish_caption(std::string text, const std::string& caption_end) {
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
  while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front()))) text.erase(0, 1);
  if (caption_end == "period" && !text.empty() && text.back() != '.') text += ".";
  return text;
}

}  // namespace

std::vector<int64_t> caption_ids(const Gpt2Tokenizer& tok, const std::string& caption, const TrainConfig& c, bool lm_task) {
  std::vector<int64_t> ids = tok.encode(finish_caption(caption, c.caption_end));
  const bool eos = c.caption_end == "eos" || lm_task;
  const size_t limit = static_cast<size_t>(c.max_caption_tokens);
  if (ids.size() + (eos ? 1 : 0) > limit) ids.resize(limit - (eos ? 1 : 0));
  if (eos) ids.push_back(tok.eos_token_id());
  if (lm_task) ids.insert(ids.begin(), tok.eos_token_id());  // <|endoftext|> opens every text, as in GPT-2's training
  return ids;
}

std::vector<DatasetItem> load_split(const TrainConfig& c, const std::string& split, bool check) {
  std::vector<DatasetItem> items;
  if (c.dataset == "manifest") {
    fs::path p = split;
    if (p.is_relative() && !c.data_root.empty()) p = fs::path(c.data_root) / p;
    items = read_dataset("manifest", p.string(), "");
  } else {
    items = read_dataset(c.dataset, c.data_root, split);
  }
  if (items.empty()) throw ConfigError("split '" + split + "' of " + c.dataset + " dataset '" + c.data_root + "' has no items");
  if (!check) return items;
  auto problems = check_media(items);
  if (problems.empty()) return items;
  std::string msg = std::to_string(problems.size()) + " of " + std::to_string(items.size()) + " media files of split '" + split +
                    "' cannot be used:";
  for (size_t i = 0; i < problems.size() && i < 20; ++i) msg += "\n  " + problems[i].media + ": " + problems[i].reason;
  if (problems.size() > 20) msg += "\n  ... and " + std::to_string(problems.size() - 20) + " more";
  if (!c.skip_missing) throw ConfigError(msg + "\n(fix them, or pass --skip-missing to leave them out)");
  std::cerr << "warning: " << msg << "\nwarning: leaving them out (--skip-missing)\n";
  std::set<std::string> bad;
  for (const auto& p : problems) bad.insert(p.media);
  std::vector<DatasetItem> kept;
  for (auto& it : items)
    if (!bad.count(it.media)) kept.push_back(std::move(it));
  if (kept.empty()) throw ConfigError("split '" + split + "': no usable items left");
  return kept;
}

// Stacks tensors, zero-padding every dimension to the largest.
at::Tensor stack_padded(const std::vector<at::Tensor>& ts) {
  bool same = true;
  for (const auto& t : ts) same = same && t.sizes() == ts[0].sizes();
  if (same) return at::stack(ts);
  std::vector<int64_t> shape = ts[0].sizes().vec();
  for (const auto& t : ts)
    for (size_t d = 0; d < shape.size(); ++d) shape[d] = std::max(shape[d], t.size(static_cast<int64_t>(d)));
  std::vector<int64_t> full = {static_cast<int64_t>(ts.size())};
  full.insert(full.end(), shape.begin(), shape.end());
  at::Tensor out = at::zeros(full, ts[0].options());
  for (size_t i = 0; i < ts.size(); ++i) {
    at::Tensor dst = out[static_cast<int64_t>(i)];
    for (int64_t d = 0; d < ts[i].dim(); ++d) dst = dst.narrow(d, 0, ts[i].size(d));
    dst.copy_(ts[i]);
  }
  return out;
}

void pad_ids(const std::vector<const std::vector<int64_t>*>& rows, at::Tensor* ids, at::Tensor* mask) {
  size_t longest = 0;
  for (auto* r : rows) longest = std::max(longest, r->size());
  *ids = at::zeros({static_cast<int64_t>(rows.size()), static_cast<int64_t>(longest)}, at::kLong);
  *mask = at::zeros_like(*ids);
  auto a = ids->accessor<int64_t, 2>();
  auto m = mask->accessor<int64_t, 2>();
  for (size_t i = 0; i < rows.size(); ++i)
    for (size_t t = 0; t < rows[i]->size(); ++t) {
      a[i][t] = (*rows[i])[t];
      m[i][t] = 1;
    }
}

std::vector<Example> make_examples(const std::vector<DatasetItem>& items, const Gpt2Tokenizer& tok, const TrainConfig& c, bool lm_task) {
  std::vector<Example> out;
  for (size_t i = 0; i < items.size(); ++i)
    for (const auto& cap : items[i].captions)
      if (cap.find_first_not_of(" \t\r\n") != std::string::npos)
        out.push_back({static_cast<int64_t>(i), caption_ids(tok, cap, c, lm_task)});
  return out;
}

// The non-blank lines of a text file (data/'s line reader: CRLF handled).
std::vector<std::string> text_lines(const std::string& path) {
  if (!fs::is_regular_file(path)) throw FileError(path, "cannot open");
  std::vector<std::string> out;
  for (auto& line : read_text_lines(path))
    if (line.find_first_not_of(" \t") != std::string::npos) out.push_back(std::move(line));
  if (out.empty()) throw FileError(path, "has no text");
  return out;
}

// ---------------------------------------------------------------------------------------
// distributed

void Dist::sum(std::vector<double>& values) const {
  if (!comm || values.empty()) return;
  at::Tensor t = at::from_blob(values.data(), {static_cast<int64_t>(values.size())}, at::kDouble).clone();
  comm->allreduce_sum(t);
  std::copy(t.data_ptr<double>(), t.data_ptr<double>() + values.size(), values.begin());
}

std::vector<std::string> Dist::gather(const std::string& mine) const {
  if (!comm) return {mine};
  return comm->allgather_bytes(mine);
}

void Dist::barrier() const {
  if (comm) comm->barrier();
}

void Dist::broadcast_from_main(const std::vector<at::Tensor>& ts) const {
  if (!comm || ts.empty()) return;
  // One flat tensor per dtype (BatchNorm has float statistics and an int64 counter).
  std::map<at::ScalarType, std::vector<at::Tensor>> by_type;
  for (const auto& t : ts) by_type[t.scalar_type()].push_back(t);
  for (auto& [type, group] : by_type) {
    std::vector<at::Tensor> flat;
    for (const auto& t : group) flat.push_back(t.detach().reshape({-1}));
    std::vector<at::Tensor> one = {at::cat(flat)};
    comm->broadcast(one, 0);
    int64_t offset = 0;
    at::NoGradGuard no_grad;
    for (auto& t : group) {
      t.detach().copy_(one[0].narrow(0, offset, t.numel()).view(t.sizes()));
      offset += t.numel();
    }
  }
}

}  // namespace prefixcap::training
