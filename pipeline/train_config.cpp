// TrainConfig: one option table for the JSON config file and the command line.
#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>

#include <ATen/Context.h>

#include "core/errors.h"
#include "encoders/feature_cuda.h"
#include "pipeline/trainer.h"

namespace prefixcap {

std::vector<TrainOption> train_options(TrainConfig& c) {
  return {
      {"task", "caption: train a mapper; lm: train a GPT-2-architecture language model on text", &c.task},
      {"dataset", "dataset layout: clotho | audiocaps | coco | manifest", &c.dataset},
      {"data_root", "dataset folder (manifest: the folder split paths are relative to)", &c.data_root},
      {"train_split", "training split (clotho: development; manifest: a JSONL file)", &c.train_split},
      {"val_split", "validation split (\"\" = none; task lm with --text: a text file)", &c.val_split},
      {"text", "task lm: text file with one caption per line (\"\" = the dataset's captions)", &c.text},
      {"skip_missing", "leave out missing or unreadable media instead of stopping", &c.skip_missing},
      {"init", "captioner bundle to start from (encoder, LM and mapper)", &c.init},
      {"encoder", "encoder folder: CNN14 or CLIP (config.json + weights); a CNN14 config.json file alone = a new CNN14", &c.encoder},
      {"lm", "GPT-2 folder (config.json, weights, vocab.json, merges.txt)", &c.lm},
      {"tokenizer", "task lm: folder with vocab.json + merges.txt (\"\" = the lm folder's)", &c.tokenizer},
      {"tokenizer_vocab", "task lm without tokenizer: learn a byte-level BPE vocabulary of this size from the text", &c.tokenizer_vocab},
      {"mapper", "mapper config, JSON text or a .json file ({\"type\": \"prefix_aac\", ...})", &c.mapper},
      {"lm_config", "task lm: config of a new model, JSON text or a .json file ({\"n_layer\": 4, ...})", &c.lm_config},
      {"normalize_prefix", "divide the encoder embedding by its L2 norm (ClipCap --normalize_prefix)", &c.normalize_prefix},
      {"caption_end", "how captions end: period (add '.' if missing) | eos (append <|endoftext|>) | none", &c.caption_end},
      {"max_caption_tokens", "captions are cut to this many tokens", &c.max_caption_tokens},
      {"train_lm_head", "also train GPT-2's output head (untied from the token embeddings)", &c.train_lm_head},
      {"device", "where to train: cpu | cuda | cuda:N (models, features and batches on that device)", &c.device},
      {"precision", "fp32 | bf16: bfloat16 autocast for the forward pass (weights, gradients and optimizer stay fp32; CPUs with bf16 units, GPUs)", &c.precision},
      {"dist_backend", "distributed runs: auto (gloo on cpu, nccl on cuda) | gloo | nccl", &c.dist_backend},
      {"dist_timeout", "distributed runs: seconds a rank waits for the others before it stops with an error", &c.dist_timeout},
      {"dist_bucket_mb", "distributed runs: MB of gradients per all-reduce bucket", &c.dist_bucket_mb},
      {"dist_overlap", "distributed runs: start each bucket's all-reduce during backward (false: after backward)", &c.dist_overlap},
      {"lm_dtype", "compute type of the frozen LM while training: float32 | bfloat16 (faster on CPUs with bf16 units; the bundle keeps float32)", &c.lm_dtype},
      {"encoder_train_epochs", "train the encoder with the mapper for this many epochs, then freeze it", &c.encoder_train_epochs},
      {"epochs", "training epochs (one epoch = every caption once)", &c.epochs},
      {"max_steps", "stop after this many optimizer steps (0 = run all epochs)", &c.max_steps},
      {"batch_size", "captions per batch", &c.batch_size},
      {"grad_accum", "batches per optimizer step (gradient accumulation)", &c.grad_accum},
      {"lr", "peak learning rate (AdamW)", &c.lr},
      {"encoder_lr", "learning rate of the encoder while it trains (0 = lr)", &c.encoder_lr},
      {"weight_decay", "AdamW weight decay", &c.weight_decay},
      {"warmup_steps", "linear warm-up steps", &c.warmup_steps},
      {"schedule", "after warm-up: cosine | linear | constant", &c.schedule},
      {"min_lr_ratio", "decay ends at lr * this", &c.min_lr_ratio},
      {"clip_grad_norm", "gradient clipping by global L2 norm (0 = off)", &c.clip_grad_norm},
      {"seed", "seed for initialisation and data order", &c.seed},
      {"out", "output folder (checkpoints, logs, bundles)", &c.out},
      {"resume", "continue from OUT/checkpoints/latest", &c.resume},
      {"save_every_steps", "also checkpoint every N optimizer steps (0 = each epoch only)", &c.save_every_steps},
      {"keep_checkpoints", "checkpoints kept (older ones are deleted)", &c.keep_checkpoints},
      {"log_every", "log the training loss every N steps", &c.log_every},
      {"progress", "progress bar when stderr is a terminal", &c.progress},
      {"cache_dir", "feature cache folder (\"\" = OUT/cache)", &c.cache_dir},
      {"workers", "data loader threads (0 = load on the training thread)", &c.workers},
      {"prefetch", "batches prepared ahead", &c.prefetch},
      {"encode_batch", "items per encoder call when filling the cache", &c.encode_batch},
      {"decoded_cache_mb", "MB of decoded audio kept in memory while the encoder trains (later epochs skip decoding)", &c.decoded_cache_mb},
      {"best_metric", "validation metric that picks the best bundle: CIDEr | Bleu_1..4 | ROUGE_L | loss", &c.best_metric},
      {"val_beam_size", "beam size of validation captions (1 = greedy)", &c.val_beam_size},
      {"val_max_items", "validation items captioned (0 = all)", &c.val_max_items},
      {"sample_captions", "validation captions printed and logged", &c.sample_captions},
      {"beam_size", "beam size written into the bundle", &c.beam_size},
      {"max_tokens", "longest caption written into the bundle's decoding", &c.max_tokens},
      {"num_threads", "compute threads (0 = all cores)", &c.num_threads},
  };
}

namespace {

Json json_or_file(const std::string& text, const std::string& name) {
  std::string t = text;
  t.erase(0, t.find_first_not_of(" \t\n"));
  if (!t.empty() && t[0] == '{') {
    try {
      return Json::parse(t);
    } catch (const Json::exception& e) {
      throw ConfigError("option " + name + ": invalid JSON: " + e.what());
    }
  }
  return read_json_file(text);
}

void set_from_json(const TrainOption& o, const Json& v, const std::string& where) {
  const std::string key = where + ": key '" + o.name + "'";
  if (auto* s = std::get_if<std::string*>(&o.target)) {
    if (!v.is_string()) throw ConfigError(key + " must be a string");
    **s = v.get<std::string>();
  } else if (auto* i = std::get_if<int64_t*>(&o.target)) {
    if (!v.is_number_integer() || !detail::json_integer(v, *i)) throw ConfigError(key + " must be an integer (64-bit)");
  } else if (auto* d = std::get_if<double*>(&o.target)) {
    if (!v.is_number()) throw ConfigError(key + " must be a number");
    **d = v.get<double>();
  } else if (auto* b = std::get_if<bool*>(&o.target)) {
    if (!v.is_boolean()) throw ConfigError(key + " must be true or false");
    **b = v.get<bool>();
  } else if (auto* j = std::get_if<Json*>(&o.target)) {
    if (v.is_string()) **j = json_or_file(v.get<std::string>(), o.name);
    else if (v.is_object()) **j = v;
    else throw ConfigError(key + " must be an object (or a .json file name)");
  }
}

// The whole text as a number (std::sto* accept "8x" as 8; this does not).
template <typename T, typename Parse, typename Bad>
T parse_whole(const std::string& text, Parse parse, Bad bad, const char* what) {
  size_t used = 0;
  T value{};
  try {
    value = parse(text, &used);
  } catch (const std::exception&) {
    throw bad(what);
  }
  if (used != text.size()) throw bad(what);
  return value;
}

}  // namespace

TrainConfig TrainConfig::from_json(const Json& j, const std::string& where) {
  if (!j.is_object()) throw ConfigError(where + ": expected a JSON object");
  TrainConfig c;
  auto options = train_options(c);
  for (const auto& item : j.items()) {
    const std::string key = item.key();  // (a structured binding cannot be captured in C++17)
    auto it = std::find_if(options.begin(), options.end(), [&](const TrainOption& o) { return o.name == key; });
    if (it == options.end()) throw ConfigError(where + ": unknown key '" + key + "'");
    set_from_json(*it, item.value(), where);
  }
  return c;
}

Json TrainConfig::to_json() const {
  TrainConfig copy = *this;
  Json j = Json::object();
  for (const auto& o : train_options(copy)) {
    std::visit([&](auto* p) { j[o.name] = *p; }, o.target);
  }
  return j;
}

void set_train_option(TrainConfig& c, const std::string& name, const std::string& text) {
  auto options = train_options(c);
  auto it = std::find_if(options.begin(), options.end(), [&](const TrainOption& o) { return o.name == name; });
  if (it == options.end()) throw ConfigError("unknown option '" + name + "'");
  std::string flag = "--" + name;
  std::replace(flag.begin(), flag.end(), '_', '-');
  auto bad = [&](const char* what) { return ConfigError("option " + flag + ": '" + text + "' is not " + what); };
  if (auto* s = std::get_if<std::string*>(&it->target)) {
    **s = text;
  } else if (auto* i = std::get_if<int64_t*>(&it->target)) {
    **i = parse_whole<int64_t>(text, [](const std::string& t, size_t* used) { return std::stoll(t, used); }, bad, "an integer");
  } else if (auto* d = std::get_if<double*>(&it->target)) {
    **d = parse_whole<double>(text, [](const std::string& t, size_t* used) { return std::stod(t, used); }, bad, "a number");
  } else if (auto* b = std::get_if<bool*>(&it->target)) {
    if (text == "true" || text == "1" || text.empty()) **b = true;
    else if (text == "false" || text == "0") **b = false;
    else throw bad("true or false");
  } else if (auto* j = std::get_if<Json*>(&it->target)) {
    **j = json_or_file(text, flag);
  }
}

std::string train_option_value(const TrainOption& o) {
  std::ostringstream s;
  if (auto* p = std::get_if<std::string*>(&o.target)) return **p;
  if (auto* p = std::get_if<int64_t*>(&o.target)) return std::to_string(**p);
  if (auto* p = std::get_if<double*>(&o.target)) {
    s << **p;
    return s.str();
  }
  if (auto* p = std::get_if<bool*>(&o.target)) return **p ? "true" : "false";
  return std::get<Json*>(o.target)->dump();
}

void TrainConfig::validate() const {
  auto require = [](bool ok, const std::string& msg) {
    if (!ok) throw ConfigError(msg);
  };
  require(task == "caption" || task == "lm", "task must be caption or lm, not '" + task + "'");
  require(std::set<std::string>{"clotho", "audiocaps", "coco", "manifest"}.count(dataset) > 0,
          "dataset must be clotho, audiocaps, coco or manifest, not '" + dataset + "'");
  require(!out.empty(), "out (the output folder) is required");
  require(caption_end == "period" || caption_end == "eos" || caption_end == "none",
          "caption_end must be period, eos or none, not '" + caption_end + "'");
  require(lm_dtype == "float32" || lm_dtype == "bfloat16", "lm_dtype must be float32 or bfloat16, not '" + lm_dtype + "'");
  require(lm_dtype == "float32" || !train_lm_head, "train_lm_head needs lm_dtype float32");
  require(device == "cpu" || device == "cuda" || (device.rfind("cuda:", 0) == 0 && device.size() > 5 &&
                                                    device.find_first_not_of("0123456789", 5) == std::string::npos),
          "device must be cpu, cuda or cuda:N, not '" + device + "'");
  require(precision == "fp32" || precision == "bf16", "precision must be fp32 or bf16, not '" + precision + "'");
  require(dist_backend == "auto" || dist_backend == "gloo" || dist_backend == "nccl",
          "dist_backend must be auto, gloo or nccl, not '" + dist_backend + "'");
  require(schedule == "cosine" || schedule == "linear" || schedule == "constant",
          "schedule must be cosine, linear or constant, not '" + schedule + "'");
  require(std::set<std::string>{"CIDEr", "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "loss"}.count(best_metric) > 0,
          "best_metric must be CIDEr, Bleu_1..Bleu_4, ROUGE_L or loss, not '" + best_metric + "'");
  for (auto [v, name, lo] : {std::tuple{epochs, "epochs", 1}, {batch_size, "batch_size", 1}, {grad_accum, "grad_accum", 1},
                             {max_caption_tokens, "max_caption_tokens", 1}, {max_steps, "max_steps", 0},
                             {warmup_steps, "warmup_steps", 0}, {save_every_steps, "save_every_steps", 0},
                             {keep_checkpoints, "keep_checkpoints", 1}, {log_every, "log_every", 1}, {workers, "workers", 0},
                             {prefetch, "prefetch", 1}, {encode_batch, "encode_batch", 1}, {decoded_cache_mb, "decoded_cache_mb", 0}, {val_beam_size, "val_beam_size", 1},
                             {val_max_items, "val_max_items", 0}, {sample_captions, "sample_captions", 0},
                             {beam_size, "beam_size", 1}, {max_tokens, "max_tokens", 1}, {num_threads, "num_threads", 0},
                             {encoder_train_epochs, "encoder_train_epochs", 0}, {dist_timeout, "dist_timeout", 1},
                             {dist_bucket_mb, "dist_bucket_mb", 1}})
    require(v >= lo, std::string(name) + " must be >= " + std::to_string(lo) + ", not " + std::to_string(v));
  for (auto [v, name] : {std::pair{lr, "lr"}, {encoder_lr, "encoder_lr"}, {weight_decay, "weight_decay"},
                         {min_lr_ratio, "min_lr_ratio"}, {clip_grad_norm, "clip_grad_norm"}})
    require(std::isfinite(v) && v >= 0, std::string(name) + " must be a finite number >= 0");
  require(lr > 0, "lr must be > 0");
  require(min_lr_ratio <= 1, "min_lr_ratio must be <= 1");
  if (task == "caption") {
    require(!init.empty() || (!encoder.empty() && !lm.empty()), "task caption needs init (a bundle) or both encoder and lm");
    require(!init.empty() || !mapper.empty(), "task caption needs a mapper config (or init)");
  } else {
    require(!lm.empty() || !lm_config.empty(), "task lm needs lm (a model to continue) or lm_config (a new model)");
    require(!lm.empty() || !tokenizer.empty() || tokenizer_vocab > 0,
            "task lm with a new model needs tokenizer (vocab.json + merges.txt) or tokenizer_vocab (learn one)");
    require(tokenizer_vocab == 0 || tokenizer_vocab >= 257, "tokenizer_vocab must be 0 or >= 257");
    require(!text.empty() || !data_root.empty() || dataset == "manifest", "task lm needs text or a dataset");
  }
}

double learning_rate(const TrainConfig& c, int64_t step, int64_t total) {
  if (c.warmup_steps > 0 && step < c.warmup_steps) return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  if (c.schedule == "constant") return c.lr;
  const double span = static_cast<double>(std::max<int64_t>(1, total - c.warmup_steps));
  const double t = std::min(1.0, static_cast<double>(step - c.warmup_steps) / span);
  const double floor = c.lr * c.min_lr_ratio;
  if (c.schedule == "linear") return floor + (c.lr - floor) * (1.0 - t);
  return floor + (c.lr - floor) * 0.5 * (1.0 + std::cos(M_PI * t));
}

std::vector<int64_t> epoch_order(int64_t n, int64_t seed, int64_t epoch) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  // splitmix64 stream from (seed, epoch): the same order on every platform and library.
  uint64_t state = static_cast<uint64_t>(seed) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(epoch) * 0xD1B54A32D192ED03ull + 1;
  auto next = [&] {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  };
  for (int64_t i = n - 1; i > 0; --i) std::swap(order[i], order[next() % static_cast<uint64_t>(i + 1)]);
  return order;
}

}  // namespace prefixcap

namespace prefixcap {

at::Device train_device(const TrainConfig& c) {
  c.validate();
  if (c.device == "cpu") return at::kCPU;
  if (!at::hasCUDA())
    throw ConfigError("device " + c.device + ": no CUDA device is available to this LibTorch build" +
                      std::string(feature_kernels_compiled() ? "" : " (built without CUDA)"));
  return at::Device(c.device);
}

}  // namespace prefixcap
