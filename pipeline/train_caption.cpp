// Task caption: the captioner being trained and its data (see caption_task.h), build_cache().
#include <chrono>
#include <cstring>
#include <iostream>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include "core/errors.h"
#include "core/hash.h"
#include "core/weights.h"
#include "encoders/feature_cuda.h"
#include "lm/loss.h"
#include "pipeline/audio_decode.h"
#include "pipeline/caption_task.h"
#include "pipeline/prefetch.h"

namespace prefixcap {
namespace training {
namespace fs = std::filesystem;

CaptionTask::CaptionTask(const TrainConfig& c) : c_(c) {
  at::manual_seed(static_cast<uint64_t>(c.seed));
  if (!c.init.empty()) {
    cap_ = Captioner::load(c.init);
  } else {
    load_parts();
  }
  cap_.normalize_prefix = c.normalize_prefix || (!c.init.empty() && cap_.normalize_prefix);
  if (cap_.encoder_kind_ == "none") throw ConfigError("the captioner to train needs an encoder (cnn14 or clip)");
  for (auto& p : cap_.mapper->parameters()) p.set_requires_grad(true);
  if (cap_.kv_head)
    for (auto& p : cap_.kv_head->parameters()) p.set_requires_grad(true);
  cap_.lm->freeze();
  cap_.lm->eval();
  if (c.train_lm_head) untie_head();
  if (c.lm_dtype == "bfloat16") {
    if (cap_.kv_head) throw ConfigError("lm_dtype bfloat16 is for prefix-embedding mappers, not kv_prefix ones");
    // A bfloat16 copy computes the loss; the float32 LM stays for captions and the bundle.
    train_lm_ = Gpt2Model(cap_.lm->config());
    train_lm_->load_weights(cap_.lm->hf_state_dict(), "bfloat16 copy of the LM");
    train_lm_->to(at::kBFloat16);
    train_lm_->freeze();
    train_lm_->eval();
  } else {
    train_lm_ = cap_.lm;
  }
  encoder_module().eval();
  for (auto& p : encoder_module().parameters()) p.set_requires_grad(false);
  cap_.decoding_.beam_size = static_cast<int>(c.beam_size);
  cap_.decoding_.max_tokens = static_cast<int>(c.max_tokens);
  cap_.stop_strings = c.caption_end == "eos" ? std::vector<std::string>{"<|endoftext|>"} : std::vector<std::string>{"."};
  cap_.decoding_.stop_token_ids = cap_.stop_ids(cap_.stop_strings);
  cap_.source = "prefixcap caption-train " + now_iso();
  const at::Device device = train_device(c);
  if (!device.is_cpu()) {
    cap_.to(device);
    if (train_lm_.ptr() != cap_.lm.ptr()) train_lm_->to(device);
  }
}

torch::nn::Module& CaptionTask::encoder_module() {
  if (cap_.cnn14) return *cap_.cnn14;
  return *cap_.clip;
}

std::vector<at::Tensor> CaptionTask::head_params() {
  std::vector<at::Tensor> ps = cap_.mapper->parameters();
  if (cap_.kv_head)
    for (auto& p : cap_.kv_head->parameters()) ps.push_back(p);
  if (c_.train_lm_head) ps.push_back(cap_.lm->lm_head->weight);
  return ps;
}

TensorMap CaptionTask::state() {
  TensorMap s = module_tensors(*cap_.mapper, "mapper.");
  if (cap_.kv_head) s.merge(module_tensors(*cap_.kv_head, "kv_head."));
  if (c_.train_lm_head) s.merge(module_tensors(*cap_.lm->lm_head, "lm_head."));
  if (c_.encoder_train_epochs > 0) s.merge(module_tensors(encoder_module(), "encoder."));
  return s;
}

void CaptionTask::load_state(const TensorMap& s, const std::string& source) {
  auto load = [&](torch::nn::Module& m, const std::string& prefix) {
    load_state_strict(m, tensors_under(s, prefix), {{}, {}, source + " (" + prefix + "*)", {}});
  };
  load(*cap_.mapper, "mapper.");
  if (cap_.kv_head) load(*cap_.kv_head, "kv_head.");
  if (c_.train_lm_head) load(*cap_.lm->lm_head, "lm_head.");
  if (c_.encoder_train_epochs > 0) load(encoder_module(), "encoder.");
}

void CaptionTask::set_epoch(int64_t epoch) {
  const bool was_training = encoder_trains_;
  encoder_trains_ = epoch < c_.encoder_train_epochs;
  for (auto& p : encoder_module().parameters()) p.set_requires_grad(encoder_trains_);
  encoder_module().train(encoder_trains_);
  if (encoder_trains_) {
    cache_.reset();  // its weights, hence its cache folder, change as it learns
  } else if (was_training) {
    // Frozen from here: drop its gradients, or AdamW would go on moving it (weight decay,
    // momentum) with zero gradients; decoded audio is no longer needed.
    for (auto& p : encoder_module().parameters()) p.mutable_grad().reset();
    std::lock_guard<std::mutex> lock(decoded_mutex_);
    decoded_.clear();
    decoded_bytes_ = 0;
  }
}

void CaptionTask::train_mode(bool on) {
  cap_.mapper->train(on);
  if (cap_.kv_head) cap_.kv_head->train(on);
  encoder_module().train(on && encoder_trains_);
}

Json CaptionTask::encoder_description() {
  Json d = {{"kind", cap_.encoder_kind_}};
  if (cap_.cnn14) {
    d["config"] = cap_.cnn14->config().to_json();
  } else {
    d["config"] = cap_.clip->config_json();
    const auto& p = cap_.clip_preprocess;
    d["preprocess"] = {{"shortest_edge", p.shortest_edge}, {"crop_size", p.crop_size}, {"mean", p.mean}, {"std", p.std}};
  }
  d["weights"] = weights_hash(encoder_module());
  return d;
}

FeatureCache& CaptionTask::cache() {
  if (!cache_) {
    Json d = encoder_description();
    const std::string dir = c_.cache_dir.empty() ? (fs::path(c_.out) / "cache").string() : c_.cache_dir;
    cache_ = std::make_unique<FeatureCache>(dir, hash_hex(json_dump(d)), d, cache_writer_);
  }
  return *cache_;
}

Media CaptionTask::decode(const std::string& path) {
  Media m;
  if (cap_.cnn14) {
    {
      std::lock_guard<std::mutex> lock(decoded_mutex_);
      if (auto it = decoded_.find(path); it != decoded_.end()) {
        m.wave = it->second;
        return m;
      }
    }
    const auto& cfg = cap_.cnn14->config();
    m.wave = fit_clip_length(decode_audio(path, {cap_.sample_rate()}).samples, cap_.sample_rate(), cfg.clip_seconds);
    if (encoder_trains_) {
      std::lock_guard<std::mutex> lock(decoded_mutex_);
      const size_t bytes = m.wave.size() * sizeof(float);
      if (decoded_bytes_ + bytes <= static_cast<size_t>(c_.decoded_cache_mb) << 20) {
        decoded_.emplace(path, m.wave);
        decoded_bytes_ += bytes;
      }
    }
  } else {
    m.visual = cap_.load_visual(path, detect_modality(path));
  }
  return m;
}

std::vector<TensorMap> CaptionTask::encode(const std::vector<Media>& media) {
  std::vector<TensorMap> out(media.size());
  if (cap_.cnn14) {
    size_t i = 0;
    while (i < media.size()) {
      size_t j = i + 1;
      while (j < media.size() && media[j].wave.size() == media[i].wave.size()) ++j;
      const int64_t n = static_cast<int64_t>(media[i].wave.size());
      if (n == 0) throw std::runtime_error("empty audio");
      at::Tensor w = at::empty({static_cast<int64_t>(j - i), n});
      for (size_t k = i; k < j; ++k) w[static_cast<int64_t>(k - i)].copy_(at::from_blob(const_cast<float*>(media[k].wave.data()), {n}));
      Cnn14Output y = cap_.cnn14->forward(w.to(cap_.device()));
      for (size_t k = i; k < j; ++k) {
        const int64_t r = static_cast<int64_t>(k - i);
        out[k] = {{"embedding", y.embedding[r]}, {"conv_block6", y.conv_block6[r]}, {"clipwise", y.clipwise_output[r]}};
      }
      i = j;
    }
  } else {
    std::vector<Captioner::VisualInput> inputs;
    for (const auto& m : media) inputs.push_back(m.visual);
    // encode_visual runs CLIP without gradients; the encoder-training path uses encode_images_grad
    MapperInput y = encoder_trains_ ? encode_images_grad(inputs) : cap_.encode_visual(inputs);
    for (size_t k = 0; k < media.size(); ++k)
      out[k] = {{"embedding", y.embedding[static_cast<int64_t>(k)]}, {"tokens", y.tokens[static_cast<int64_t>(k)]}};
  }
  return out;
}

MapperInput CaptionTask::to_mapper_input(const TensorMap& f) {
  MapperInput in;
  in.embedding = f.at("embedding");
  if (f.count("conv_block6")) {
    in.conv_block6 = f.at("conv_block6");
    in.clipwise = f.at("clipwise");
    in.tokens = in.conv_block6.mean(3).transpose(1, 2);
  } else {
    in.tokens = f.at("tokens");
  }
  return in;
}

TensorMap CaptionTask::collate(const std::vector<TensorMap>& rows) {
  TensorMap out;
  for (const auto& [k, v] : rows[0]) {
    std::vector<at::Tensor> ts;
    for (const auto& r : rows) ts.push_back(r.at(k));
    out[k] = stack_padded(ts);
  }
  return out;
}

MapperInput CaptionTask::features(const Batch& b) {
  if (!b.features.empty()) return to_mapper_input(b.features);
  return to_mapper_input(collate(encode(b.media)));
}

at::Tensor CaptionTask::loss(const Batch& b) {
  at::Tensor prefix = cap_.prefix(features(b));
  at::Tensor ids = b.ids.to(cap_.device()), mask = b.mask.to(cap_.device());
  if (!cap_.kv_head) return prefix_lm_loss(*train_lm_, prefix, ids, mask);
  // Deep key/value prefix: <|endoftext|> then the caption, after the per-layer prefix.
  KvCache cache = make_kv_prefix_cache(cap_.kv_head->forward(prefix));
  at::Tensor bos = at::full({ids.size(0), 1}, cap_.tokenizer->eos_token_id(), ids.options());
  Gpt2Input x;
  x.input_ids = at::cat({bos, ids}, 1);
  x.cache = &cache;
  return token_cross_entropy(cap_.lm->forward(x).logits.narrow(1, 0, ids.size(1)), ids, mask);
}

void CaptionTask::load_parts() {
  if (fs::path(c_.encoder).extension() == ".json" && fs::is_regular_file(c_.encoder)) {
    // A config without weights: a new CNN14, initialised from the seed, to train from scratch.
    Cnn14Config ec = Cnn14Config::from_file(c_.encoder);
    cap_.encoder_kind_ = "cnn14";
    cap_.cnn14 = Cnn14(ec);
    if (c_.encoder_train_epochs == 0)
      std::cerr << "warning: " << c_.encoder << " is a new, untrained encoder and encoder_train_epochs is 0: "
                << "the mapper will see random-projection features\n";
  } else {
    load_encoder_folder();
  }
  load_lm_and_mapper();
}

void CaptionTask::load_encoder_folder() {
  const std::string enc_cfg = (fs::path(c_.encoder) / "config.json").string();
  if (!fs::exists(enc_cfg)) throw FileError(enc_cfg, "missing (encoder must be a folder with config.json and weights)");
  const std::string model_type = json_get_or<std::string>(read_json_file(enc_cfg), "model_type", "", enc_cfg);
  if (model_type == "cnn14") {
    cap_.encoder_kind_ = "cnn14";
    cap_.cnn14 = load_cnn14(c_.encoder);
  } else {
    cap_.encoder_kind_ = "clip";
    cap_.clip = load_clip_image_encoder(c_.encoder);
    cap_.clip_preprocess = load_clip_preprocess(c_.encoder, *cap_.clip);
  }
}

void CaptionTask::load_lm_and_mapper() {
  cap_.lm = load_gpt2(c_.lm);
  cap_.tokenizer = std::make_shared<Gpt2Tokenizer>(Gpt2Tokenizer::from_folder(c_.lm));
  Json mj = c_.mapper;
  auto fill = [&](const char* key, int64_t v) {
    if (!mj.contains(key)) mj[key] = v;
  };
  fill("embed_dim", cap_.lm->config().n_embd);
  const std::string type = mj.value("type", "");
  if (cap_.cnn14) {
    const auto& e = cap_.cnn14->config();
    fill("input_dim", type == "mlp" || type == "transformer" ? e.embedding_dim : e.channels.back());
    fill("classes_num", e.classes_num);
  } else {
    fill("input_dim", type == "query_guided" ? cap_.clip->token_dim() : cap_.clip->embed_dim());
  }
  MapperConfig mc = MapperConfig::from_json(mj, "mapper config");
  cap_.mapper = make_mapper(mc);
  if (mc.kv_prefix) cap_.kv_head = KvPrefixHead(mc.embed_dim, cap_.lm->config());
  if (mc.embed_dim != cap_.lm->config().n_embd)
    throw ConfigError("mapper embed_dim " + std::to_string(mc.embed_dim) + " differs from the LM's n_embd " +
                      std::to_string(cap_.lm->config().n_embd));
}

void CaptionTask::untie_head() {
  if (cap_.lm->lm_head) {
    cap_.lm->lm_head->weight.set_requires_grad(true);
    return;
  }
  Gpt2Config cfg = cap_.lm->config();
  cfg.tie_word_embeddings = false;
  TensorMap w = cap_.lm->hf_state_dict();
  w["lm_head.weight"] = cap_.lm->wte->weight.detach().clone();
  Gpt2Model untied(cfg);
  untied->load_weights(w, "untied LM head");
  untied->freeze();
  untied->eval();
  untied->lm_head->weight.set_requires_grad(true);
  cap_.lm = untied;
}

MapperInput CaptionTask::encode_images_grad(const std::vector<Captioner::VisualInput>& inputs) {
  std::vector<const Image8*> images;
  for (const auto& in : inputs) {
    if (in.embedding.defined()) throw std::runtime_error("training the CLIP encoder on video is not supported; keep it frozen");
    images.push_back(&in.image);
  }
  ClipVisionOutput y = cap_.clip->forward(clip_pixel_batch(images, cap_.clip_preprocess, cap_.device()));
  MapperInput in;
  in.embedding = y.image_embeds;
  in.tokens = y.last_hidden_state;
  return in;
}

std::vector<at::Tensor> CaptionTask::encoder_params() { return encoder_module().parameters(); }

std::vector<at::Tensor> CaptionTask::trained_buffers() {
  // Only what training changes: BatchNorm's running statistics (not constant tables such as the
  // mapper's positional encoding, which every rank computes alike).
  std::vector<at::Tensor> out;
  auto add = [&](const torch::nn::Module& m) {
    for (const auto& item : m.named_buffers()) {
      const std::string& name = item.key();
      for (const char* suffix : {"running_mean", "running_var", "num_batches_tracked"})
        if (name.size() >= std::strlen(suffix) && name.compare(name.size() - std::strlen(suffix), std::string::npos, suffix) == 0)
          out.push_back(item.value());
    }
  };
  add(*cap_.mapper);
  if (cap_.kv_head) add(*cap_.kv_head);
  if (encoder_trains_) add(encoder_module());
  return out;
}

void CaptionTask::set_cache_writer(int writer) {
  cache_writer_ = writer;
  cache_.reset();
}

int64_t CaptionTask::tokens(const Batch& b) { return b.mask.defined() && b.mask.numel() ? b.mask.sum().item<int64_t>() : 0; }

int64_t fill_cache(CaptionTask& task, const std::vector<DatasetItem>& items, const TrainConfig& c, Progress& progress,
                   const std::string& what, const Dist& dist) {
  std::vector<size_t> missing;
  {
    FeatureCache& cache = task.cache();
    for (size_t i = 0; i < items.size(); ++i)
      if (!cache.contains(items[i].media)) missing.push_back(i);
  }
  if (dist.active()) {
    // Every rank must see the same cache, or their shares would not add up.
    std::string list;
    for (size_t i : missing) list += std::to_string(i) + ",";
    const auto seen = dist.gather(hash_hex(list));
    for (int r = 1; r < dist.world; ++r)
      if (seen[static_cast<size_t>(r)] != seen[0])
        throw ConfigError("rank " + std::to_string(r) + " sees another feature cache than rank 0 in " + task.cache().folder() +
                          ": the cache folder (--cache-dir, default OUT/cache) must be on a filesystem every rank shares");
  }
  if (missing.empty()) return 0;
  const Span mine = rank_span(static_cast<int64_t>(missing.size()), dist.rank, dist.world);
  progress.print("features: computing " + std::to_string(missing.size()) + " of " + std::to_string(items.size()) + " " + what +
                 " items into " + task.cache().folder() +
                 (dist.active() ? " (" + std::to_string(dist.world) + " ranks, each its share)" : ""));
  const auto t0 = std::chrono::steady_clock::now();
  const size_t n = static_cast<size_t>(mine.size());
  auto item_of = [&](size_t k) -> const DatasetItem& { return items[missing[static_cast<size_t>(mine.lo) + k]]; };
  OrderedPrefetcher<Media> loader(
      static_cast<int64_t>(n), [&](int64_t k) { return task.decode(item_of(static_cast<size_t>(k)).media); },
      static_cast<int>(c.workers), std::max<int64_t>(c.encode_batch * 2, 4));
  torch::NoGradGuard no_grad;
  FeatureCache& cache = task.cache();
  size_t done = 0;
  while (done < n) {
    std::vector<Media> media;
    std::vector<size_t> which;
    while (media.size() < static_cast<size_t>(c.encode_batch) && done + media.size() < n) {
      const size_t k = done + media.size();
      try {
        media.push_back(std::move(*loader.next()));
      } catch (const std::exception& e) {
        throw std::runtime_error(item_of(k).media + ": " + e.what());
      }
      which.push_back(k);
    }
    auto feats = task.encode(media);
    for (size_t k = 0; k < feats.size(); ++k) cache.put(item_of(which[k]).media, feats[k]);
    done += media.size();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    char line[200];
    std::snprintf(line, sizeof line, "features %s %zu/%zu  %.1f items/s  ETA %s", bar(double(done) / n).c_str(), done, n,
                  done / std::max(secs, 1e-9), format_duration((n - done) * secs / done).c_str());
    progress.update(line);
  }
  cache.flush();
  progress.done();
  if (dist.active()) {  // each rank wrote its own shards and index; rank 0 makes one index of them
    dist.barrier();
    if (dist.main()) FeatureCache::merge_indexes(cache.folder());
    dist.barrier();
    task.reload_cache();
  }
  return static_cast<int64_t>(n);
}

TrainResult train_caption(const TrainConfig& c, const TrainHooks& hooks, const Dist& dist) {
  Progress progress(c.progress, dist.main());
  auto train_items = load_split(c, c.train_split, true);
  std::vector<DatasetItem> val_items;
  if (!c.val_split.empty()) val_items = load_split(c, c.val_split, true);
  CaptionTask t(c);
  if (dist.active()) t.set_cache_writer(dist.rank);
  const auto examples = make_examples(train_items, *t.captioner().tokenizer, c, false);
  const auto val_examples = make_examples(val_items, *t.captioner().tokenizer, c, false);
  if (examples.empty()) throw ConfigError("the training split has no captions");
  progress.print("training on " + std::to_string(train_items.size()) + " items / " + std::to_string(examples.size()) +
                 " captions" + (val_items.empty() ? "" : ", validating on " + std::to_string(val_items.size()) + " items"));

  Task task;
  task.num_examples = static_cast<int64_t>(examples.size());
  task.output_name = "bundle";
  task.begin_epoch = [&](int64_t epoch, Progress& p) {
    t.set_epoch(epoch);
    if (t.encoder_trains()) {
      if (epoch == 0 || c.resume) p.print("epoch " + std::to_string(epoch + 1) + ": the encoder trains with the mapper");
      return;
    }
    fill_cache(t, train_items, c, p, "training", dist);
    if (!val_items.empty()) fill_cache(t, val_items, c, p, "validation", dist);
  };
  task.make_batch = [&](const std::vector<int64_t>& ex) {
    Batch b;
    b.examples = ex;
    std::vector<const std::vector<int64_t>*> rows;
    for (int64_t e : ex) rows.push_back(&examples[e].ids);
    pad_ids(rows, &b.ids, &b.mask);
    if (t.encoder_trains()) {
      for (int64_t e : ex) b.media.push_back(t.decode(train_items[examples[e].item].media));
    } else {
      std::vector<TensorMap> feats;
      for (int64_t e : ex) {
        const std::string& media = train_items[examples[e].item].media;
        auto f = t.cache().get(media);
        if (!f) throw std::runtime_error(media + ": features vanished from the cache (was it changed during training?)");
        feats.push_back(std::move(*f));
      }
      b.features = t.collate(feats);
    }
    return b;
  };
  task.loss = [&](const Batch& b) { return t.loss(b); };
  task.tokens = &CaptionTask::tokens;
  task.buffers = [&] { return t.trained_buffers(); };
  task.train_mode = [&](bool on) { t.train_mode(on); };
  task.param_groups = [&] {
    std::vector<std::vector<at::Tensor>> g = {t.head_params()};
    if (c.encoder_train_epochs > 0) g.push_back(t.encoder_params());
    return g;
  };
  task.state = [&] { return t.state(); };
  task.load_state = [&](const TensorMap& s, const std::string& src) { t.load_state(s, src); };
  if (!val_items.empty())
    task.validate = [&](int64_t, Progress& p) {  // begin_epoch cached the validation features
      return caption_validation(t, c, val_items, val_examples, p, dist);
    };
  task.save_output = [&](const std::string& dir) { t.captioner().save(dir); };
  return run_loop(c, task, hooks, dist);
}

}  // namespace training

int64_t build_cache(const TrainConfig& config) {
  config.validate();
  if (config.task != "caption") throw ConfigError("build-cache is for task caption");
  TrainConfig c = config;
  training::Dist dist;
  auto comm = training::connect(c, &dist);
  training::Progress progress(c.progress, dist.main());
  auto train_items = training::load_split(c, c.train_split, true);
  training::CaptionTask t(c);
  if (dist.active()) t.set_cache_writer(dist.rank);
  t.set_epoch(c.encoder_train_epochs);  // the frozen encoder
  int64_t n = training::fill_cache(t, train_items, c, progress, "training", dist);
  size_t total = train_items.size();
  if (!c.val_split.empty()) {
    auto val_items = training::load_split(c, c.val_split, true);
    n += training::fill_cache(t, val_items, c, progress, "validation", dist);
    total += val_items.size();
  }
  std::vector<double> computed = {static_cast<double>(n)};
  dist.sum(computed);
  const auto all = static_cast<size_t>(computed[0]);
  progress.print("feature cache " + t.cache().folder() + ": " + std::to_string(all) + " computed, " + std::to_string(total - all) +
                 " already there");
  return static_cast<int64_t>(total);
}

}  // namespace prefixcap
