#include "pipeline/checkpoint_import.h"

#include <filesystem>
#include <set>

#include <ATen/ATen.h>

#include "core/errors.h"
#include "core/weights.h"

namespace prefixcap {

namespace {

// Tensors whose key starts with `prefix`, with the prefix removed.
TensorMap take_prefix(const TensorMap& all, const std::string& prefix) {
  TensorMap out;
  for (const auto& [k, v] : all)
    if (k.rfind(prefix, 0) == 0) out[k.substr(prefix.size())] = v;
  return out;
}

const at::Tensor& need(const TensorMap& m, const std::string& key, const std::string& source) {
  auto it = m.find(key);
  if (it == m.end()) throw FileError(source, "tensor '" + key + "' is missing");
  return it->second;
}

int64_t count_layers(const TensorMap& m, const std::string& prefix) {
  std::set<std::string> ids;
  for (const auto& [k, v] : m)
    if (k.rfind(prefix, 0) == 0) ids.insert(k.substr(prefix.size(), k.find('.', prefix.size()) - prefix.size()));
  return static_cast<int64_t>(ids.size());
}

// GPT-2 config: from a file if given, else from the tensors (n_head by the standard widths).
Gpt2Config lm_config(const TensorMap& lm, const std::string& config_path, const Json* inline_config,
                     const std::string& source) {
  Gpt2Config c;
  if (!config_path.empty()) c = Gpt2Config::from_file(config_path);
  else if (inline_config) c = Gpt2Config::from_json(*inline_config, source + " (gpt2 config)");
  const at::Tensor& wte = need(lm, lm.count("transformer.wte.weight") ? "transformer.wte.weight" : "wte.weight", source);
  const at::Tensor& wpe = need(lm, lm.count("transformer.wpe.weight") ? "transformer.wpe.weight" : "wpe.weight", source);
  c.vocab_size = wte.size(0);
  c.n_embd = wte.size(1);
  c.n_positions = wpe.size(0);
  c.n_layer = std::max(count_layers(lm, "transformer.h."), count_layers(lm, "h."));
  if (config_path.empty() && !inline_config) {
    const std::map<int64_t, int64_t> heads = {{768, 12}, {1024, 16}, {1280, 20}, {1600, 25}};
    auto it = heads.find(c.n_embd);
    if (it == heads.end())
      throw ConfigError(source + ": GPT-2 width " + std::to_string(c.n_embd) +
                        " is not a standard size; pass the model's config.json (--gpt2-config)");
    c.n_head = it->second;
  }
  if (c.n_embd % c.n_head != 0) throw ConfigError(source + ": n_embd is not a multiple of n_head");
  return c;
}

void finish(Captioner& c, const ImportOptions& options, const std::string& source) {
  if (options.tokenizer_dir.empty()) throw std::invalid_argument("import: a tokenizer folder (vocab.json, merges.txt) is required");
  c.tokenizer = std::make_shared<Gpt2Tokenizer>(Gpt2Tokenizer::from_folder(options.tokenizer_dir));
  c.decoding_.stop_token_ids = c.stop_ids(c.stop_strings);
  c.source = source;
  c.mapper->eval();
  for (auto& p : c.mapper->parameters()) p.set_requires_grad(false);
}

}  // namespace

// ref: Prefix_AAC_ICASSP2023 AAC_Prefix/AAC_Prefix.py (get_model_in_table, AAC_Prefix, module-level
// num_head = 8) and the Cnn14(sample_rate=16000, window_size=512, hop_size=320, mel_bins=64,
// fmin=50, fmax=14000, classes_num=527) it builds. What the weights hold (widths, layer counts,
// prefix lengths, vocabulary) is read from them; the rest is the published constructor's.
Json prefix_aac_preset(const std::string& name, const TensorMap& weights, const std::string& source) {
  if (name != "audiocaps" && name != "clotho")
    throw ConfigError("unknown Prefix-AAC preset '" + name + "' (audiocaps: 10 s clips, ReLU after the mapping "
                      "networks' BatchNorm; clotho: 30 s clips, no ReLU)");
  auto rows = [&](const std::string& key, int dim = 0) { return need(weights, key, source).size(dim); };
  std::vector<int64_t> channels;
  for (int i = 1; i <= 6; ++i) channels.push_back(rows("audio_encoder.conv_block" + std::to_string(i) + ".conv1.weight"));
  Json encoder = {{"sample_rate", 16000}, {"window_size", 512}, {"hop_size", 320}, {"mel_bins", rows("audio_encoder.bn0.weight")},
                  {"fmin", 50}, {"fmax", 14000}, {"classes_num", rows("audio_encoder.fc_audioset.weight")},
                  {"channels", channels}, {"embedding_dim", rows("audio_encoder.fc1.weight")}};
  const std::string stft = "audio_encoder.spectrogram_extractor.stft.conv_real.weight";  // [n_fft/2+1, 1, n_fft]
  if (weights.count(stft)) encoder["window_size"] = rows(stft, 2);
  return {{"model_type", "prefix_aac"},
          {"audio_encoder", encoder},
          {"num_head", 8},
          {"Dataset", name == "clotho" ? "Clotho" : "AudioCaps"},
          {"decoding", {{"beam_size", 5}, {"entry_length", 67}, {"temperature", 1.0}, {"stop_token", "."}}}};
}

// ref: CLIP_prefix_caption train.py ClipCaptionModel / ClipCaptionPrefix, predict.py.
// Mapping table: gpt.X -> LM X (GPT2LMHeadModel names); clip_project.X -> mapper X.
Captioner import_clipcap(const std::string& checkpoint, const ImportOptions& options) {
  TensorMap all = load_weight_file(checkpoint);
  TensorMap gpt = take_prefix(all, "gpt."), mapper = take_prefix(all, "clip_project.");
  if (gpt.empty() || mapper.empty())
    throw FileError(checkpoint, "not a ClipCap checkpoint (expected gpt.* and clip_project.* tensors)");
  for (const auto& [k, v] : all)
    if (k.rfind("gpt.", 0) != 0 && k.rfind("clip_project.", 0) != 0)
      throw FileError(checkpoint, "unexpected tensor '" + k + "' in a ClipCap checkpoint");
  Captioner c;
  Gpt2Config lm = lm_config(gpt, options.gpt2_config, nullptr, checkpoint);
  c.lm = Gpt2Model(lm);
  c.lm->load_weights(gpt, checkpoint);
  c.lm->freeze();

  MapperConfig mc;
  mc.embed_dim = lm.n_embd;
  bool transformer = mapper.count("prefix_const") > 0;
  if (transformer) {
    mc.type = "transformer";
    mc.prefix_length = need(mapper, "prefix_const", checkpoint).size(0);
    const at::Tensor& linear = need(mapper, "linear.weight", checkpoint);
    mc.input_dim = linear.size(1);
    mc.clip_length = linear.size(0) / lm.n_embd;
    mc.num_layers = count_layers(mapper, "transformer.layers.");
    mc.num_heads = options.num_heads;
    mc.mlp_ratio = double(need(mapper, "transformer.layers.0.mlp.fc1.weight", checkpoint).size(0)) / lm.n_embd;
  } else {
    mc.type = "mlp";
    const at::Tensor& w0 = need(mapper, "model.0.weight", checkpoint);
    const at::Tensor& w2 = need(mapper, "model.2.weight", checkpoint);
    mc.input_dim = w0.size(1);
    if (w2.size(0) % lm.n_embd != 0)
      throw FileError(checkpoint, "clip_project.model.2.weight rows (" + std::to_string(w2.size(0)) +
                                      ") are not a multiple of the GPT-2 width " + std::to_string(lm.n_embd));
    mc.prefix_length = w2.size(0) / lm.n_embd;
  }
  c.mapper = make_mapper(mc);
  load_state_strict(*c.mapper, mapper, {{}, {}, checkpoint, {}});
  // ClipCap's own inference: predict.py (MLP) feeds raw embeddings, the transformer notebook
  // normalises them.
  c.normalize_prefix = options.normalize_prefix >= 0 ? options.normalize_prefix == 1 : transformer;
  c.decoding_.beam_size = 5;
  c.decoding_.max_tokens = 67;  // generate_beam's entry_length
  c.stop_strings = {"."};
  if (!options.clip_dir.empty()) {
    c.encoder_kind_ = "clip";
    c.clip = load_clip_image_encoder(options.clip_dir);
    c.clip_preprocess = load_clip_preprocess(options.clip_dir, *c.clip);
    if (c.clip->embed_dim() != mc.input_dim)
      throw ConfigError(options.clip_dir + ": this CLIP gives " + std::to_string(c.clip->embed_dim()) +
                        "-d image embeddings, the checkpoint's mapper takes " + std::to_string(mc.input_dim) +
                        "-d ones (ClipCap's transformer weights need RN50x4: 640-d; its MLP weights ViT-B/32: 512-d)");
  }
  finish(c, options, "ClipCap " + std::filesystem::path(checkpoint).filename().string());
  return c;
}

// ref: Prefix_AAC_ICASSP2023 AAC_Prefix/AAC_Prefix.py AAC_Prefix (2e6c6a1).
// Mapping table: audio_encoder.X -> CNN14 X (its melW is used: Cnn14_16k's filterbank);
// gpt.X -> LM X (GPT2Model names); language_header.weight -> LM lm_head.weight (untied);
// temporal_mappingnetwork.X / global_mappingnetwork.X -> mapper, same names.
Captioner import_prefix_aac(const std::string& checkpoint, const ImportOptions& options) {
  if (options.model_config.empty() == options.preset.empty())
    throw std::invalid_argument("import prefix-aac: give --preset audiocaps|clotho (the published models) or --config FILE, not both");
  TensorMap all = load_weight_file(checkpoint);
  const std::string where = options.model_config.empty() ? "preset '" + options.preset + "'" : options.model_config;
  Json cfg = options.model_config.empty() ? prefix_aac_preset(options.preset, all, checkpoint) : read_json_file(options.model_config);
  TensorMap audio = take_prefix(all, "audio_encoder."), gpt = take_prefix(all, "gpt.");
  TensorMap mapper;
  for (const char* branch : {"temporal_mappingnetwork.", "global_mappingnetwork."})
    for (const auto& [k, v] : take_prefix(all, branch)) mapper[branch + k] = v;
  if (audio.empty() || gpt.empty() || mapper.empty() || !all.count("language_header.weight"))
    throw FileError(checkpoint, "not a Prefix-AAC checkpoint (expected audio_encoder.*, gpt.*, *_mappingnetwork.*, language_header.weight)");

  Captioner c;
  // Audio encoder.
  Json enc = json_get<Json>(cfg, "audio_encoder", where);
  enc["model_type"] = "cnn14";
  Cnn14Config ec;
  {
    Json e = Json::object();
    for (const char* k : {"model_type", "sample_rate", "window_size", "hop_size", "mel_bins", "fmin", "fmax", "classes_num",
                          "channels", "embedding_dim"})
      if (enc.contains(k)) e[k] = enc[k];
    // The constructor's fmax (14000) lies above the 16 kHz Nyquist frequency; it is never used,
    // since the checkpoint's melW (fmax 8000) replaces the filterbank it would give.
    if (e.contains("fmax") && e.contains("sample_rate"))
      e["fmax"] = std::min(e["fmax"].get<double>(), e["sample_rate"].get<double>() / 2);
    ec = Cnn14Config::from_json(e, where + " audio_encoder");
  }
  ec.mel_from_checkpoint = true;
  ec.max_pool_frames = 46;
  const std::string dataset = json_get_or<std::string>(cfg, "Dataset", "AudioCaps", where);
  ec.clip_seconds = dataset == "Clotho" ? 30.0 : 10.0;  // the datasets' zero padding
  c.encoder_kind_ = "cnn14";
  c.cnn14 = Cnn14(ec);
  c.cnn14->load_weights(audio, checkpoint + " (audio_encoder)");
  c.cnn14->freeze();

  // LM with the untied language header.
  Json gcfg = json_get_or<Json>(cfg, "gpt2", Json::object(), where);
  Gpt2Config lm = lm_config(gpt, options.gpt2_config, gcfg.empty() ? nullptr : &gcfg, checkpoint);
  lm.tie_word_embeddings = false;
  gpt["lm_head.weight"] = need(all, "language_header.weight", checkpoint);
  c.lm = Gpt2Model(lm);
  c.lm->load_weights(gpt, checkpoint);
  c.lm->freeze();

  MapperConfig mc;
  mc.type = "prefix_aac";
  mc.embed_dim = lm.n_embd;
  mc.input_dim = need(mapper, "temporal_mappingnetwork.conv.weight", checkpoint).size(1);
  mc.temporal_prefix_length = need(mapper, "temporal_mappingnetwork.prefix_const", checkpoint).size(0);
  mc.global_prefix_length = need(mapper, "global_mappingnetwork.prefix_const", checkpoint).size(0);
  mc.prefix_length = mc.temporal_prefix_length + mc.global_prefix_length;
  mc.temporal_num_layers = count_layers(mapper, "temporal_mappingnetwork.transformer.layers.");
  mc.global_num_layers = count_layers(mapper, "global_mappingnetwork.transformer.layers.");
  mc.num_heads = json_get_or<int64_t>(cfg, "num_head", 8, where);
  mc.mlp_ratio = json_get_or<double>(cfg, "mlp_ratio", 2.0, where);
  // The MLP width is in the weights: they win over a config that says otherwise.
  const std::string fc1 = "temporal_mappingnetwork.transformer.layers.0.mlp.fc1.weight";
  if (mapper.count(fc1)) mc.mlp_ratio = static_cast<double>(mapper.at(fc1).size(0)) / static_cast<double>(mc.embed_dim);
  mc.classes_num = ec.classes_num;
  mc.relu_after_bn = json_get_or<bool>(cfg, "relu_after_bn", dataset != "Clotho", where);
  mc.max_positions = need(mapper, "temporal_mappingnetwork.pos_encoder.pe", checkpoint).size(0);
  c.mapper = make_mapper(mc);
  load_state_strict(*c.mapper, mapper, {{}, {}, checkpoint, {}});

  Json dec = json_get_or<Json>(cfg, "decoding", Json::object(), where);
  c.decoding_.beam_size = json_get_or<int>(dec, "beam_size", 5, where);
  c.decoding_.max_tokens = json_get_or<int>(dec, "entry_length", 67, where);
  c.decoding_.temperature = json_get_or<double>(dec, "temperature", 1.0, where);
  c.stop_strings = {json_get_or<std::string>(dec, "stop_token", ".", where)};
  c.normalize_prefix = false;
  finish(c, options, "Prefix-AAC " + std::filesystem::path(checkpoint).filename().string());
  return c;
}

}  // namespace prefixcap
