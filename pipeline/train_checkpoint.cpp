// Checkpoints: written by rank 0 through a .partial folder (so a crash leaves the previous one
// intact), read by every rank on resume.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "core/errors.h"
#include "core/safetensors.h"
#include "core/weights.h"
#include "pipeline/train_common.h"

namespace prefixcap::training {
namespace fs = std::filesystem;

namespace {

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step-%08lld", static_cast<long long>(step));
  return buf;
}

}  // namespace

// The keys whose change makes a resumed run a different run.
Json run_identity(const TrainConfig& c) {
  Json j = c.to_json();
  // The dist_* options and the world size may change between runs: a resume with another
  // world size follows the rule in docs/training.md.
  // epochs and max_steps stay: they set the total step count that the lr schedule decays over.
  for (const char* k : {"out", "resume", "progress", "log_every", "workers", "prefetch", "num_threads", "device", "save_every_steps", "keep_checkpoints", "val_beam_size", "val_max_items", "sample_captions",
                        "beam_size", "max_tokens", "cache_dir", "encode_batch", "best_metric", "skip_missing", "decoded_cache_mb", "dist_backend", "dist_timeout", "dist_bucket_mb",
                        "dist_overlap"})
    j.erase(k);
  return j;
}

void save_checkpoint(const TrainConfig& c, const TensorMap& tensors, torch::optim::Optimizer& opt, const CheckpointState& s,
                     const std::function<void(const std::string&)>& fault_hook) {
  const fs::path dir = fs::path(c.out) / "checkpoints";
  fs::create_directories(dir);
  const std::string name = step_name(s.step);
  const fs::path tmp = dir / (name + ".partial");
  fs::remove_all(tmp);
  try {
    fs::create_directories(tmp);
    save_safetensors((tmp / "model.safetensors").string(), tensors, {{"format", "pt"}});
    if (fault_hook) fault_hook(tmp.string());
    {
      torch::serialize::OutputArchive archive;
      opt.save(archive);
      archive.save_to((tmp / "optimizer.pt").string());
    }
    Json st = {{"step", s.step},           {"epoch", s.epoch},         {"batch", s.batch},
               {"example", s.example},     {"world_size", s.world_size}, {"best_epoch", s.best_epoch},
               {"last_loss", s.last_loss}, {"run", run_identity(c)},   {"written", now_iso()}};
    st["best"] = std::isnan(s.best) ? Json(nullptr) : Json(s.best);
    write_json_file((tmp / "state.json").string(), st);
    fs::remove_all(dir / name);
    fs::rename(tmp, dir / name);
    write_file_atomic((dir / "latest").string(), name + "\n");
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
  // Keep the newest keep_checkpoints.
  std::vector<std::string> all;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step-", 0) == 0 && n.find('.') == std::string::npos) all.push_back(n);
  }
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + static_cast<size_t>(c.keep_checkpoints) < all.size(); ++i)
    if (all[i] != name) fs::remove_all(dir / all[i]);
}

std::optional<std::string> latest_checkpoint(const TrainConfig& c) {
  const fs::path dir = fs::path(c.out) / "checkpoints";
  std::ifstream in(dir / "latest");
  std::string name;
  if (!(in >> name)) return std::nullopt;
  if (!fs::exists(dir / name / "state.json"))
    throw FileError((dir / "latest").string(), "names checkpoint '" + name + "', which is missing");
  return (dir / name).string();
}

CheckpointState load_checkpoint(const TrainConfig& c, const std::string& dir_name, TensorMap* tensors, torch::optim::Optimizer& opt) {
  const fs::path dir = dir_name;
  const std::string state_path = (dir / "state.json").string();
  Json st = read_json_file(state_path);
  Json run = json_get<Json>(st, "run", state_path), now = run_identity(c);
  std::vector<std::string> changed;
  for (const auto& [k, v] : now.items())
    if (!run.contains(k) || run[k] != v) changed.push_back(k);
  if (!changed.empty()) {
    std::string msg = state_path + ": cannot resume, these options differ from the checkpoint's run:";
    for (const auto& k : changed) msg += " " + k + " (was " + (run.contains(k) ? json_dump(run[k]) : "unset") + ", now " + json_dump(now[k]) + ")";
    throw ConfigError(msg);
  }
  *tensors = load_weight_file((dir / "model.safetensors").string());
  torch::serialize::InputArchive archive;
  // The optimizer state onto the parameters' device (a run may resume on another device).
  c10::optional<torch::Device> device;  // c10::optional: std::optional in LibTorch 2.x, its own type in 1.13
  if (!opt.param_groups().empty() && !opt.param_groups()[0].params().empty())
    device = opt.param_groups()[0].params()[0].device();
  archive.load_from((dir / "optimizer.pt").string(), device);
  opt.load(archive);
  CheckpointState s;
  s.step = json_get<int64_t>(st, "step", state_path);
  s.epoch = json_get<int64_t>(st, "epoch", state_path);
  s.batch = json_get<int64_t>(st, "batch", state_path);
  // Checkpoints of one process before data parallelism: the examples consumed are whole batches.
  s.example = json_get_or<int64_t>(st, "example", s.batch * c.batch_size, state_path);
  s.world_size = json_get_or<int64_t>(st, "world_size", 1, state_path);
  s.best_epoch = json_get<int64_t>(st, "best_epoch", state_path);
  s.last_loss = json_get<double>(st, "last_loss", state_path);
  s.best = st["best"].is_null() ? NAN : st["best"].get<double>();
  return s;
}

}  // namespace prefixcap::training
