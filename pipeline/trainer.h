// Training with frozen encoders and a frozen GPT-2: the mapper (ClipCap, Prefix-AAC, ...)
// learns to write prefixes; optionally the LM head, and optionally the encoder for the first
// epochs (Prefix-AAC's schedule). Also plain causal-LM training of a GPT-2-architecture model
// (task "lm"), so that a small GPT-2 can be made where the real one cannot be downloaded.
//
// OUT/ after a run:
//   train_log.jsonl            one JSON object per logged step and per validation
//   checkpoints/step-N/        mapper/encoder/head weights, optimizer, state.json
//   checkpoints/latest         the name of the newest complete checkpoint
//   bundle/                    the final captioner bundle (task lm: lm/, a Hugging Face folder)
//   best/                      the bundle with the best validation metric
//   cache/ENCODER_HASH/        frozen-encoder features (unless cache_dir says elsewhere)
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <variant>
#include <vector>

#include <ATen/Tensor.h>
#include <c10/core/Device.h>

#include "core/json_config.h"
#include "lm/gpt2.h"

namespace prefixcap {

struct TrainConfig {
  std::string task = "caption";       // caption | lm
  // data
  std::string dataset = "manifest";   // clotho | audiocaps | coco | manifest
  std::string data_root;              // dataset folder (manifest: the folder split paths are relative to)
  std::string train_split = "train";  // split name (manifest: JSONL file)
  std::string val_split;              // "" = no validation
  std::string text;                   // task lm: a text file, one caption per line ("" = dataset captions)
  bool skip_missing = false;          // drop missing/unreadable media instead of stopping
  // models
  std::string init;                   // a captioner bundle to start from (its encoder, LM, mapper)
  std::string encoder;                // encoder folder (CNN14 or CLIP, config.json + weights), or a
                                      // CNN14 config .json file alone: a new CNN14 trained from scratch
  std::string lm;                     // GPT-2 folder (config.json, weights, vocab.json, merges.txt)
  std::string tokenizer;              // task lm: folder with vocab.json + merges.txt ("" = lm's)
  int64_t tokenizer_vocab = 0;        // task lm without a tokenizer: learn a BPE vocabulary this big
  Json mapper = Json::object();       // MapperConfig; dimensions left out come from the models
  Json lm_config = Json::object();    // task lm: Hugging Face GPT-2 config of a new model
  bool normalize_prefix = false;      // ClipCap: divide the embedding by its L2 norm
  std::string caption_end = "period"; // period (end every caption with '.') | eos | none
  int64_t max_caption_tokens = 30;    // longer captions are cut
  bool train_lm_head = false;         // also train the output head (unties it from wte)
  std::string lm_dtype = "float32";   // float32 | bfloat16: the frozen LM's compute type in training
  int64_t encoder_train_epochs = 0;   // train the encoder with the mapper for this many epochs
  // optimisation
  int64_t epochs = 10;
  int64_t max_steps = 0;              // stop after this many optimizer steps (0 = all epochs)
  int64_t batch_size = 32;
  int64_t grad_accum = 1;             // batches per optimizer step
  double lr = 2e-5;
  double encoder_lr = 0;              // 0 = lr
  double weight_decay = 0.01;
  int64_t warmup_steps = 0;
  std::string schedule = "cosine";    // cosine | linear | constant (after warm-up)
  double min_lr_ratio = 0;            // cosine/linear decay ends at lr * this
  double clip_grad_norm = 1.0;        // 0 = no clipping
  int64_t seed = 42;
  // checkpoints and logs
  std::string out;                    // output folder (required)
  bool resume = false;                // continue from OUT/checkpoints/latest
  int64_t save_every_steps = 0;       // 0 = at the end of each epoch only
  int64_t keep_checkpoints = 2;
  int64_t log_every = 10;
  bool progress = true;               // progress bar on a terminal
  // data pipeline
  std::string cache_dir;              // "" = OUT/cache
  int64_t workers = 2;                // loader threads (0 = load on the training thread)
  int64_t prefetch = 4;               // batches prepared ahead
  int64_t encode_batch = 16;          // items per encoder call when filling the cache
  int64_t decoded_cache_mb = 2048;    // decoded audio kept in memory while the encoder trains
  // validation
  std::string best_metric = "CIDEr";  // CIDEr | Bleu_4 | ... | loss
  int64_t val_beam_size = 1;
  int64_t val_max_items = 0;          // 0 = every validation item
  int64_t sample_captions = 3;        // printed and logged after each validation
  // decoding written into the bundle
  int64_t beam_size = 5;
  int64_t max_tokens = 20;
  int64_t num_threads = 0;            // 0 = all cores
  std::string device = "cpu";         // cpu | cuda | cuda:N: where the models and batches live
  std::string precision = "fp32";     // fp32 | bf16: bfloat16 autocast for the forward pass
  // data parallelism (when a launcher's variables say so: pipeline/distributed.h)
  std::string dist_backend = "auto";  // auto (gloo on cpu, nccl on cuda) | gloo | nccl
  int64_t dist_timeout = 600;         // seconds a rank waits for the others before failing
  int64_t dist_bucket_mb = 25;        // gradient all-reduce bucket size
  bool dist_overlap = true;           // start all-reduces during backward (false: after it)

  // Unknown keys and wrong types are refused, naming the key.
  static TrainConfig from_json(const Json& j, const std::string& where);
  Json to_json() const;
  void validate() const;  // throws ConfigError naming the bad value
};

// One entry per option: the name is the JSON key and (with '-' for '_') the command-line flag.
// The device a config's `device` names; throws ConfigError when it is malformed or, for CUDA,
// when this LibTorch has no CUDA device.
at::Device train_device(const TrainConfig& config);

struct TrainOption {
  std::string name;
  std::string help;
  std::variant<std::string*, int64_t*, double*, bool*, Json*> target;
};
std::vector<TrainOption> train_options(TrainConfig& c);
// Sets option `name` from its command-line text; throws ConfigError naming it.
void set_train_option(TrainConfig& c, const std::string& name, const std::string& text);
std::string train_option_value(const TrainOption& o);  // current value as text

// Learning rate at optimizer step `step` (0-based) of `total`.
double learning_rate(const TrainConfig& c, int64_t step, int64_t total);
// Visit order of n examples in `epoch`: a permutation fixed by (seed, epoch).
std::vector<int64_t> epoch_order(int64_t n, int64_t seed, int64_t epoch);

struct TrainHooks {
  // Called after every optimizer step with the step number (1-based) and its loss; may throw
  // (tests use this to stop a run as a crash would).
  std::function<void(int64_t step, double loss)> on_step;
  // Called while a checkpoint is being written (its temporary folder); may throw (tests use
  // this to fail a write half-way).
  std::function<void(const std::string& partial_dir)> on_checkpoint_write;
};

struct TrainResult {
  int64_t steps = 0;
  double last_loss = 0;
  std::string bundle;   // final bundle (task lm: the LM folder)
  std::string best;     // best bundle ("" without validation)
  Json best_metrics;
};

TrainResult train(const TrainConfig& config, const TrainHooks& hooks = {});
// Fills the feature cache for the train and validation splits and returns the number of
// items now cached; nothing is trained.
int64_t build_cache(const TrainConfig& config);

}  // namespace prefixcap
