#include "pipeline/captioner.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include <ATen/ATen.h>
#include <torch/types.h>

#include "core/errors.h"
#include "encoders/feature_cuda.h"
#include "core/safetensors.h"
#include "core/weights.h"
#include "pipeline/audio_decode.h"
#include "pipeline/video_decode.h"

namespace prefixcap {
namespace fs = std::filesystem;

const char* modality_name(Modality m) {
  switch (m) {
    case Modality::Audio: return "audio";
    case Modality::Image: return "image";
    case Modality::Video: return "video";
  }
  return "?";
}

Json caption_record(const std::string& path, Modality modality, const std::vector<Caption>& captions, double start_s,
                    double end_s) {
  Json j = {{"path", path}, {"modality", modality_name(modality)}, {"caption", captions.at(0).text}, {"score", captions[0].score}};
  if (start_s >= 0) {
    j["start"] = start_s;
    j["end"] = end_s;
  }
  Json alternatives = Json::array();
  for (size_t k = 1; k < captions.size(); ++k) alternatives.push_back({{"caption", captions[k].text}, {"score", captions[k].score}});
  j["alternatives"] = alternatives;
  return j;
}

Modality detect_modality(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path, "cannot open");
  unsigned char h[512] = {0};
  in.read(reinterpret_cast<char*>(h), sizeof h);
  const auto n = in.gcount();
  if (n == 0) throw FileError(path, "empty file");
  auto starts = [&](const char* sig, size_t len, size_t at = 0) { return size_t(n) >= at + len && std::memcmp(h + at, sig, len) == 0; };
  if (!image_format_of(h, static_cast<size_t>(n)).empty()) return Modality::Image;
  // Containers that may hold video: ask FFmpeg whether there is a video stream with frames.
  if (starts("ftyp", 4, 4) || starts("\x1A\x45\xDF\xA3", 4) || starts("RIFF", 4) || starts("OggS", 4)) {
    try {
      VideoInfo info;
      sample_video_frames(path, 1, &info);
      return Modality::Video;
    } catch (const FileError&) {
    }
  }
  return Modality::Audio;
}

// ---------------------------------------------------------------------------------------
// bundle

namespace {
std::string bundle_path(const fs::path& dir, const Json& j, const std::string& key, const std::string& where) {
  std::string rel = json_get<std::string>(j, key, where);
  fs::path p = fs::path(rel).is_absolute() ? fs::path(rel) : dir / rel;
  if (!fs::exists(p)) throw FileError(p.string(), "missing (named by " + where + " '" + key + "')");
  return p.string();
}

DecodingOptions decoding_from_json(const Json& j, const std::string& where, std::vector<std::string>* stops) {
  DecodingOptions d;
  d.beam_size = json_get_or<int>(j, "beam_size", 5, where);
  d.max_tokens = json_get_or<int>(j, "max_tokens", 20, where);
  d.temperature = json_get_or<double>(j, "temperature", 1.0, where);
  d.top_k = json_get_or<int>(j, "top_k", 0, where);
  d.top_p = json_get_or<double>(j, "top_p", 1.0, where);
  *stops = json_get_or<std::vector<std::string>>(j, "stop", {"."}, where);
  validate(d);
  return d;
}
}  // namespace

std::vector<int64_t> Captioner::stop_ids(const std::vector<std::string>& stops) const {
  std::vector<int64_t> ids;
  for (const auto& s : stops) {
    if (s == "<|endoftext|>") {
      ids.push_back(tokenizer->eos_token_id());
      continue;
    }
    auto enc = tokenizer->encode(s);
    if (enc.empty()) throw std::invalid_argument("stop string '" + s + "' encodes to no token");
    ids.push_back(enc[0]);  // ClipCap / Prefix-AAC: tokenizer.encode(stop)[0]
  }
  return ids;
}

Captioner Captioner::load(const std::string& bundle_dir) {
  const fs::path dir(bundle_dir);
  const std::string json_path = (dir / "captioner.json").string();
  if (!fs::exists(json_path)) throw FileError(json_path, "missing: not a captioner bundle");
  Json j = read_json_file(json_path);
  if (json_get_or<std::string>(j, "format", "", json_path) != "prefixcap-captioner")
    throw FileError(json_path, "not a prefixcap captioner (\"format\" is not \"prefixcap-captioner\")");
  const int64_t version = json_get<int64_t>(j, "version", json_path);
  if (version != 1)
    throw FileError(json_path, "bundle version " + std::to_string(version) +
                                   " is not one this prefixcap reads (1); it was written by another prefixcap version");
  Captioner c;
  c.source = json_get_or<std::string>(j, "source", "", json_path);
  const Json& enc = j.contains("encoder") ? j["encoder"] : Json::object();
  c.encoder_kind_ = json_get_or<std::string>(enc, "kind", "none", json_path + " encoder");
  if (c.encoder_kind_ == "cnn14") {
    c.cnn14 = load_cnn14(bundle_path(dir, enc, "path", json_path + " encoder"));
  } else if (c.encoder_kind_ == "clip") {
    std::string path = bundle_path(dir, enc, "path", json_path + " encoder");
    c.clip = load_clip_image_encoder(path);
    c.clip_preprocess = load_clip_preprocess(path, *c.clip);
  } else if (c.encoder_kind_ != "none") {
    throw ConfigError(json_path + ": unknown encoder kind '" + c.encoder_kind_ + "' (cnn14, clip, none)");
  }
  const Json& lm = json_get<Json>(j, "lm", json_path);
  const std::string lm_dir = bundle_path(dir, lm, "path", json_path + " lm");
  c.lm = load_gpt2(lm_dir);
  c.tokenizer = std::make_shared<Gpt2Tokenizer>(Gpt2Tokenizer::from_folder(
      lm.contains("tokenizer") ? bundle_path(dir, lm, "tokenizer", json_path + " lm") : lm_dir));
  const Json& mj = json_get<Json>(j, "mapper", json_path);
  MapperConfig mc = MapperConfig::from_json(json_get<Json>(mj, "config", json_path + " mapper"), json_path + " mapper.config");
  c.mapper = make_mapper(mc);
  const std::string weights = bundle_path(dir, mj, "weights", json_path + " mapper");
  TensorMap mapper_weights = load_weight_file(weights);
  if (mc.kv_prefix) {
    c.kv_head = KvPrefixHead(mc.embed_dim, c.lm->config());
    TensorMap head = tensors_under(mapper_weights, "kv_head.");
    for (const auto& [k, v] : head) mapper_weights.erase("kv_head." + k);
    load_state_strict(*c.kv_head, head, {{}, {}, weights, {}});
    c.kv_head->eval();
  }
  load_state_strict(*c.mapper, mapper_weights, {{}, {}, weights, {}});
  c.mapper->eval();
  for (auto& p : c.mapper->parameters()) p.set_requires_grad(false);
  if (mc.embed_dim != c.lm->config().n_embd)
    throw ConfigError(json_path + ": mapper embed_dim " + std::to_string(mc.embed_dim) + " differs from the LM's n_embd " +
                      std::to_string(c.lm->config().n_embd));
  c.normalize_prefix = json_get_or<bool>(j.value("prefix", Json::object()), "normalize", false, json_path + " prefix");
  c.decoding_ = decoding_from_json(j.value("decoding", Json::object()), json_path + " decoding", &c.stop_strings);
  c.decoding_.stop_token_ids = c.stop_ids(c.stop_strings);
  return c;
}

void Captioner::save(const std::string& bundle_dir) const {
  const fs::path dir(bundle_dir);
  const TensorMap lm_state = lm->hf_state_dict();  // throws for a packed LM, before anything is written
  fs::create_directories(dir / "lm");
  Json j = {{"format", "prefixcap-captioner"}, {"version", 1}};
  if (!source.empty()) j["source"] = source;
  // LM + tokenizer
  write_json_file((dir / "lm" / "config.json").string(), lm->config().to_json());
  save_safetensors((dir / "lm" / "model.safetensors").string(), lm_state, {{"format", "pt"}});
  if (!tokenizer) throw std::invalid_argument("captioner has no tokenizer");
  tokenizer->save((dir / "lm").string());
  j["lm"] = {{"path", "lm"}, {"tokenizer", "lm"}};
  // Encoder
  if (encoder_kind_ == "cnn14") {
    fs::create_directories(dir / "encoder");
    write_json_file((dir / "encoder" / "config.json").string(), cnn14->config().to_json());
    TensorMap state = module_tensors(*cnn14, "", "front_end.");
    if (cnn14->config().mel_from_checkpoint)
      state["logmel_extractor.melW"] = cnn14->front_end->named_buffers()["mel_basis"].detach();
    save_safetensors((dir / "encoder" / "model.safetensors").string(), state, {{"format", "pt"}});
    j["encoder"] = {{"kind", "cnn14"}, {"path", "encoder"}};
  } else if (encoder_kind_ == "clip") {
    fs::create_directories(dir / "encoder");
    write_json_file((dir / "encoder" / "config.json").string(), clip->config_json());
    write_json_file((dir / "encoder" / "preprocessor_config.json").string(),
                    {{"size", clip_preprocess.shortest_edge}, {"crop_size", clip_preprocess.crop_size},
                     {"image_mean", clip_preprocess.mean}, {"image_std", clip_preprocess.std}, {"resample", 3}});
    save_safetensors((dir / "encoder" / "model.safetensors").string(), module_tensors(*clip), {{"format", "pt"}});
    j["encoder"] = {{"kind", "clip"}, {"path", "encoder"}};
  } else {
    j["encoder"] = {{"kind", "none"}};
  }
  // Mapper
  TensorMap mapper_state = module_tensors(*mapper);
  if (kv_head) mapper_state.merge(module_tensors(*kv_head, "kv_head."));
  save_safetensors((dir / "mapper.safetensors").string(), mapper_state, {{"format", "pt"}});
  j["mapper"] = {{"config", mapper->config().to_json()}, {"weights", "mapper.safetensors"}};
  j["prefix"] = {{"normalize", normalize_prefix}};
  j["decoding"] = {{"beam_size", decoding_.beam_size}, {"max_tokens", decoding_.max_tokens},
                   {"temperature", decoding_.temperature}, {"stop", stop_strings}};
  write_json_file((dir / "captioner.json").string(), j);
}

void Captioner::set_lm_dtype(WeightDtype dtype) {
  lm->pack_weights(dtype);  // refuses an LM that is not float32 on the CPU
}

void Captioner::set_encoder_dtype(WeightDtype dtype) {
  if (clip) return clip->set_compute_dtype(dtype);
  if (cnn14) return cnn14->set_compute_dtype(dtype);
  if (dtype != WeightDtype::Float32)
    throw std::invalid_argument(std::string("--encoder-dtype ") + weight_dtype_name(dtype) + ": the " + encoder_kind_ +
                                " encoder computes in float32 only");
}

void Captioner::to(const at::Device& device) {
  if (lm && lm->weight_dtype() != WeightDtype::Float32 && !device.is_cpu())
    throw std::invalid_argument(std::string("the LM is packed as ") + weight_dtype_name(lm->weight_dtype()) +
                                " for CPU decoding (--lm-dtype); it cannot move to " + device.str());
  const WeightDtype encoder_dtype =
      clip ? clip->compute_dtype() : cnn14 ? cnn14->compute_dtype() : WeightDtype::Float32;
  if (encoder_dtype != WeightDtype::Float32 && !device.is_cpu())
    throw std::invalid_argument(std::string("the encoder computes in ") + weight_dtype_name(encoder_dtype) +
                                " on the CPU (--encoder-dtype); it cannot move to " + device.str());
  if (cnn14) cnn14->to(device);
  if (clip) clip->to(device);
  if (mapper) mapper->to(device);
  if (kv_head) kv_head->to(device);
  if (lm) lm->to(device);
  device_ = device;
}

int Captioner::sample_rate() const {
  return encoder_kind_ == "cnn14" ? static_cast<int>(cnn14->config().front_end.sample_rate) : 0;
}

// ---------------------------------------------------------------------------------------
// captioning

MapperInput Captioner::mapper_input(const MapperInput& features) const {
  MapperInput in = features;
  for (at::Tensor* t : {&in.embedding, &in.tokens, &in.token_mask, &in.conv_block6, &in.clipwise, &in.context})
    if (t->defined()) *t = t->to(device_);
  if (normalize_prefix && in.embedding.defined()) in.embedding = in.embedding / in.embedding.norm(2, -1, /*keepdim=*/true);
  return in;
}

at::Tensor Captioner::prefix(const MapperInput& features) { return mapper->forward(mapper_input(features)); }

MapperInput Captioner::encode_waveforms(const std::vector<std::vector<float>>& waveforms) {
  if (encoder_kind_ != "cnn14") throw std::invalid_argument("this captioner has no audio encoder (encoder kind " + encoder_kind_ + ")");
  const auto& cfg = cnn14->config();
  std::vector<std::vector<float>> fitted;
  size_t longest = 0;
  for (const auto& w : waveforms) {
    fitted.push_back(fit_clip_length(w, static_cast<int>(cfg.front_end.sample_rate), cfg.clip_seconds));
    longest = std::max(longest, fitted.back().size());
  }
  at::Tensor batch = at::zeros({static_cast<int64_t>(fitted.size()), static_cast<int64_t>(longest)});
  for (size_t i = 0; i < fitted.size(); ++i)
    if (!fitted[i].empty())
      batch[i].narrow(0, 0, fitted[i].size()).copy_(at::from_blob(fitted[i].data(), {static_cast<int64_t>(fitted[i].size())}));
  torch::NoGradGuard no_grad;
  Cnn14Output out = cnn14->forward(batch.to(device_));
  MapperInput in;
  in.embedding = out.embedding;
  in.tokens = out.temporal_features;
  in.conv_block6 = out.conv_block6;
  in.clipwise = out.clipwise_output;
  return in;
}

MapperInput Captioner::encode_images(const std::vector<Image8>& images) {
  if (encoder_kind_ != "clip") throw std::invalid_argument("this captioner has no image encoder (encoder kind " + encoder_kind_ + ")");
  std::vector<const Image8*> batch;
  for (const auto& img : images) batch.push_back(&img);
  torch::NoGradGuard no_grad;
  ClipVisionOutput out = clip->forward(clip_pixel_batch(batch, clip_preprocess, device_));
  MapperInput in;
  in.embedding = out.image_embeds;
  in.tokens = out.last_hidden_state;
  return in;
}

Captioner::VisualInput Captioner::load_visual(const std::string& path, Modality modality, int video_frames) {
  if (encoder_kind_ != "clip") throw std::invalid_argument("this captioner has no image encoder (encoder kind " + encoder_kind_ + ")");
  VisualInput in;
  switch (modality) {
    case Modality::Image:
      in.image = decode_image(path);
      break;
    case Modality::Video:
      in = visual_from_frames(sample_video_frames(path, video_frames));
      break;
    case Modality::Audio:
      throw FileError(path, "is audio; this captioner is for images and video");
  }
  return in;
}

Captioner::VisualInput Captioner::visual_from_frames(const std::vector<VideoFrame>& frames) {
  if (encoder_kind_ != "clip") throw std::invalid_argument("this captioner has no image encoder (encoder kind " + encoder_kind_ + ")");
  torch::NoGradGuard no_grad;
  VideoFeatures v = encode_video_frames(frames, *clip, clip_preprocess);
  VisualInput in;
  in.embedding = v.mean_embed;
  in.tokens = v.frame_tokens.mean(0);
  return in;
}

MapperInput Captioner::encode_visual(const std::vector<VisualInput>& inputs) {
  std::vector<Image8> images;
  for (const auto& in : inputs)
    if (!in.embedding.defined()) images.push_back(in.image);
  MapperInput encoded;
  if (!images.empty()) encoded = encode_images(images);
  std::vector<at::Tensor> embeds, tokens;
  int64_t next_image = 0;
  for (const auto& in : inputs) {
    if (in.embedding.defined()) {
      embeds.push_back(in.embedding.to(device_));
      tokens.push_back(in.tokens.to(device_));
    } else {
      embeds.push_back(encoded.embedding[next_image]);
      tokens.push_back(encoded.tokens[next_image]);
      ++next_image;
    }
  }
  MapperInput out;
  out.embedding = at::stack(embeds);
  out.tokens = at::stack(tokens);
  return out;
}

std::vector<std::vector<Caption>> Captioner::caption(const MapperInput& features, const DecodingOptions& options) {
  torch::NoGradGuard no_grad;
  at::Tensor p = prefix(features);
  Prompt prompt;
  if (kv_head) prompt.kv_prefix = kv_head->forward(p);
  else prompt.prefix_embeds = p;
  auto decoded = generate(*lm, prompt, options);
  std::vector<std::vector<Caption>> out;
  for (const auto& list : decoded) {
    std::vector<Caption> captions;
    for (const auto& s : list) {
      std::vector<int64_t> text_ids;
      for (int64_t id : s.ids)
        if (id != tokenizer->eos_token_id()) text_ids.push_back(id);
      captions.push_back({tokenizer->decode(text_ids), s.ids, s.score});
    }
    out.push_back(std::move(captions));
  }
  return out;
}

size_t Captioner::fitted_length(size_t samples) const {
  if (encoder_kind_ != "cnn14") return samples;
  const auto& cfg = cnn14->config();
  if (cfg.clip_seconds <= 0) return samples;
  return static_cast<size_t>(std::llround(cfg.clip_seconds * cfg.front_end.sample_rate));  // as fit_clip_length
}

std::vector<std::vector<Caption>> Captioner::caption_waveforms(const std::vector<std::vector<float>>& waveforms,
                                                                const DecodingOptions& options) {
  if (encoder_kind_ != "cnn14") throw std::invalid_argument("this captioner has no audio encoder (encoder kind " + encoder_kind_ + ")");
  std::map<size_t, std::vector<size_t>> by_length;  // fitted length -> input rows, in order
  for (size_t i = 0; i < waveforms.size(); ++i) by_length[fitted_length(waveforms[i].size())].push_back(i);
  std::vector<std::vector<Caption>> out(waveforms.size());
  for (const auto& [length, rows] : by_length) {
    std::vector<std::vector<float>> group;
    for (size_t i : rows) group.push_back(waveforms[i]);
    auto captions = caption(encode_waveforms(group), options);
    for (size_t k = 0; k < rows.size(); ++k) out[rows[k]] = std::move(captions[k]);
  }
  return out;
}

std::vector<std::vector<Caption>> Captioner::caption_files(const std::vector<std::string>& paths, const DecodingOptions& options) {
  if (paths.empty()) return {};
  if (encoder_kind_ == "cnn14") {
    std::vector<std::vector<float>> waves;
    for (const auto& p : paths) waves.push_back(decode_audio(p, {sample_rate()}).samples);
    return caption_waveforms(waves, options);
  }
  if (encoder_kind_ == "clip") {
    std::vector<VisualInput> inputs;
    for (const auto& p : paths) inputs.push_back(load_visual(p, detect_modality(p)));
    return caption(encode_visual(inputs), options);  // prefix() moves the features to the device
  }
  throw std::invalid_argument("this captioner has no encoder: it captions features only");
}

}  // namespace prefixcap
