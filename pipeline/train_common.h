// What the training files share (pipeline/train_*.cpp; not a public header): progress and log
// output, examples and batches, the Task a training loop runs, checkpoints, and the
// distributed context.
//
//   train_loop.cpp        the optimisation loop shared by both tasks; train()
//   train_caption.cpp     task caption: the captioner being trained, its feature cache, build_cache()
//   train_lm.cpp          task lm: a GPT-2-architecture language model
//   train_validation.cpp  validation of both tasks, sharded over the ranks
//   train_checkpoint.cpp  checkpoints: atomic writes, resume, every rank's random state
//   train_common.cpp      the helpers below
#pragma once

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/Tensor.h>

#include "core/json_config.h"
#include "core/tensor_map.h"
#include "data/datasets.h"
#include "lm/tokenizer.h"
#include "pipeline/captioner.h"
#include "pipeline/distributed.h"
#include "pipeline/trainer.h"

namespace torch::nn {
class Module;
}
namespace torch::optim {
class Optimizer;
}

namespace prefixcap::training {

// ---------------------------------------------------------------------------------------
// output

std::string weights_hash(const torch::nn::Module& m);
std::string now_iso();
std::string format_duration(double seconds);
std::string bar(double fraction, int width = 24);

// One line that rewrites itself on a terminal; plain lines otherwise. Silent when not
// `enabled_lines` (ranks other than 0 of a distributed run).
class Progress {
 public:
  explicit Progress(bool bar, bool enabled_lines = true) : tty_(bar && enabled_lines && ::isatty(2)), lines_(enabled_lines) {}
  bool tty() const { return tty_; }
  void update(const std::string& line);
  void print(const std::string& line);
  void done();

 private:
  bool tty_;
  bool lines_;
  bool open_ = false;
};

class JsonLog {
 public:
  explicit JsonLog(const std::string& path) : path_(path) {}
  // Keeps only records with step <= `step` (a resumed run rewrites what follows).
  void truncate_after(int64_t step);
  void write(const Json& j);

 private:
  std::string path_;
};

// ---------------------------------------------------------------------------------------
// data

struct Example {
  int64_t item;
  std::vector<int64_t> ids;
};

std::vector<int64_t> caption_ids(const Gpt2Tokenizer& tok, const std::string& caption, const TrainConfig& c, bool lm_task);
std::vector<DatasetItem> load_split(const TrainConfig& c, const std::string& split, bool check);
std::vector<Example> make_examples(const std::vector<DatasetItem>& items, const Gpt2Tokenizer& tok, const TrainConfig& c, bool lm_task);
// The non-blank lines of a text file.
std::vector<std::string> text_lines(const std::string& path);
// Stacks tensors, zero-padding every dimension to the largest.
at::Tensor stack_padded(const std::vector<at::Tensor>& ts);
void pad_ids(const std::vector<const std::vector<int64_t>*>& rows, at::Tensor* ids, at::Tensor* mask);

// Decoded media ready for the encoder.
struct Media {
  std::vector<float> wave;        // cnn14
  Captioner::VisualInput visual;  // clip
};

struct Batch {
  std::vector<int64_t> examples;  // empty: this rank has no share of the batch
  TensorMap features;             // from the cache (frozen encoder)
  std::vector<Media> media;       // raw inputs (the encoder trains)
  at::Tensor ids, mask;
};

// ---------------------------------------------------------------------------------------
// the distributed context: one process, or one rank of several

struct Dist {
  Communicator* comm = nullptr;  // null: a single process
  int rank = 0;
  int world = 1;
  bool main() const { return rank == 0; }
  bool active() const { return comm != nullptr; }
  // Sums doubles over the ranks (in place; nothing to do alone).
  void sum(std::vector<double>& values) const;
  // Every rank's string, in rank order ({mine} alone).
  std::vector<std::string> gather(const std::string& mine) const;
  void barrier() const;
  // Rank 0's values of these tensors on every rank (one broadcast per dtype).
  void broadcast_from_main(const std::vector<at::Tensor>& ts) const;
};

// Joins the process group when a launcher's variables say this is one rank of several (see
// pipeline/distributed.h) and fills `dist`; returns null (and leaves `dist` single) otherwise.
// With device "cuda", each rank takes its local GPU (cuda:LOCAL_RANK) in `c`.
std::unique_ptr<Communicator> connect(TrainConfig& c, Dist* dist);

// ---------------------------------------------------------------------------------------
// the loop

struct Task {
  int64_t num_examples = 0;
  std::function<void(int64_t epoch, Progress&)> begin_epoch;
  std::function<Batch(const std::vector<int64_t>& examples)> make_batch;  // runs on loader threads
  std::function<at::Tensor(const Batch&)> loss;                           // mean over the batch's counted tokens
  std::function<int64_t(const Batch&)> tokens;                            // the tokens loss() counts
  std::function<void(bool)> train_mode;
  std::function<std::vector<std::vector<at::Tensor>>()> param_groups;  // group 0 at lr, group 1 at encoder_lr
  std::function<std::vector<at::Tensor>()> buffers;                     // of the trained modules (BatchNorm statistics)
  std::function<TensorMap()> state;
  std::function<void(const TensorMap&, const std::string&)> load_state;
  std::function<Json(int64_t epoch, Progress&)> validate;  // every rank calls it; metrics on rank 0, {} elsewhere
  std::function<void(const std::string& dir)> save_output;
  std::string output_name;
};

TrainResult run_loop(const TrainConfig& c, Task& task, const TrainHooks& hooks, const Dist& dist);
TrainResult train_caption(const TrainConfig& c, const TrainHooks& hooks, const Dist& dist);  // train_caption.cpp
TrainResult train_lm(const TrainConfig& c, const TrainHooks& hooks, const Dist& dist);       // train_lm.cpp

// ---------------------------------------------------------------------------------------
// checkpoints

struct CheckpointState {
  int64_t step = 0, epoch = 0;
  int64_t batch = 0;    // global batches done in `epoch`
  int64_t example = 0;  // examples of the epoch's order consumed (batch * global batch size, unless the world size changed)
  double best = NAN;
  int64_t best_epoch = -1;
  double last_loss = 0;
  int64_t world_size = 1;
};

// The keys whose change makes a resumed run a different run.
Json run_identity(const TrainConfig& c);
// Writes OUT/checkpoints/step-N/ through a .partial folder renamed when complete, then
// OUT/checkpoints/latest; keeps the newest keep_checkpoints. Rank 0 only.
void save_checkpoint(const TrainConfig& c, const TensorMap& tensors, torch::optim::Optimizer& opt, const CheckpointState& s,
                     const std::function<void(const std::string&)>& fault_hook);
std::optional<std::string> latest_checkpoint(const TrainConfig& c);
// Reads a checkpoint (every rank), refusing one of a different run (naming what changed).
CheckpointState load_checkpoint(const TrainConfig& c, const std::string& dir, TensorMap* tensors, torch::optim::Optimizer& opt);

// ---------------------------------------------------------------------------------------
// validation (train_validation.cpp): every rank computes its share, rank 0 the metrics

class CaptionTask;
Json caption_validation(CaptionTask& t, const TrainConfig& c, const std::vector<DatasetItem>& val, const std::vector<Example>& val_examples,
                        Progress& progress, const Dist& dist);
// Token-weighted mean loss over `n` examples in batches of the config's batch size.
double sharded_loss(int64_t n, int64_t batch_size, const std::function<std::pair<double, int64_t>(int64_t lo, int64_t hi)>& sum_and_count,
                    const Dist& dist);

}  // namespace prefixcap::training
