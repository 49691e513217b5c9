// Fixture kinds of the anchors' checkpoints: ClipCap (clipcap-tiny) and Prefix-AAC
// (prefix-aac-tiny): prefixes, teacher-forcing loss and gradients, decoded ids.
#include <filesystem>
#include <set>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include "core/safetensors.h"
#include "core/weights.h"
#include "encoders/clip_vision.h"
#include "encoders/image_preprocess.h"
#include "lm/loss.h"
#include "pipeline/audio_decode.h"
#include "pipeline/checkpoint_import.h"
#include "tests/fixture_runner.h"

namespace prefixcap::fixtures {
namespace fs = std::filesystem;

namespace {

std::string tokenizer_dir(const std::string& folder, const Json& model) {
  const Json& tok = model.at("tokenizer");
  std::string vocab = tok.at("vocab.json").get<std::string>();
  return (fs::path(folder) / vocab).parent_path().string();
}

void compare_entry(Checks& checks, const std::string& name, const Json& output, const at::Tensor& got,
                   const Golden& golden) {
  at::Tensor expected = golden.tensor(output.at("tensor").get<std::string>());
  auto compare = [&](const std::string& what, const at::Tensor& e) {
    if (output.value("exact", false)) {
      checks.exact(what, got, e);
      return;
    }
    double atol, rtol;
    tolerance_of(output, &atol, &rtol);
    checks.close(what, got, e.numel() == got.numel() ? e.reshape(got.sizes()) : e, atol, rtol);
  };
  compare(name, expected);
  if (output.contains("value")) {  // a literal copy of the value (scalars): checked as well
    const Json& v = output["value"];
    if (v.is_number()) compare(name + " (literal value)", at::tensor({v.get<double>()}, at::kDouble));
    else checks.require(false, name + ": unsupported literal value");
  }
}

// Beam (sorted ids [-1 padded], lengths, scores) and greedy (ids, lengths) of a prefix batch,
// with K and the length budget read from the golden shapes.
struct Decoded {
  at::Tensor beam_ids, beam_lengths, beam_scores, greedy_ids, greedy_lengths;
};

Decoded decode_rows(Captioner& c, const at::Tensor& prefix, int64_t beams, int64_t beam_len, int64_t greedy_len) {
  Decoded d;
  const int64_t B = prefix.size(0);
  Prompt prompt;
  prompt.prefix_embeds = prefix;
  if (beams > 0) {
    DecodingOptions o = c.default_decoding();
    o.beam_size = static_cast<int>(beams);
    o.num_return = static_cast<int>(beams);
    o.max_tokens = static_cast<int>(beam_len);
    auto out = generate(*c.lm, prompt, o);
    d.beam_ids = at::full({B, beams, beam_len}, -1, at::kLong);
    d.beam_lengths = at::zeros({B, beams}, at::kLong);
    d.beam_scores = at::zeros({B, beams}, at::kDouble);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < beams; ++k) {
        const auto& s = out[b][k];
        for (size_t t = 0; t < s.ids.size(); ++t) d.beam_ids[b][k][t] = s.ids[t];
        d.beam_lengths[b][k] = static_cast<int64_t>(s.ids.size());
        d.beam_scores[b][k] = s.score;
      }
  }
  if (greedy_len > 0) {
    DecodingOptions o = c.default_decoding();
    o.beam_size = 1;
    o.num_return = 1;
    o.max_tokens = static_cast<int>(greedy_len);
    auto out = generate(*c.lm, prompt, o);
    d.greedy_ids = at::full({B, greedy_len}, -1, at::kLong);
    d.greedy_lengths = at::zeros({B}, at::kLong);
    for (int64_t b = 0; b < B; ++b) {
      for (size_t t = 0; t < out[b][0].ids.size(); ++t) d.greedy_ids[b][t] = out[b][0].ids[t];
      d.greedy_lengths[b] = static_cast<int64_t>(out[b][0].ids.size());
    }
  }
  return d;
}

bool is_decoding_output(const std::string& key) {
  return key == "beam_sorted_ids" || key == "beam_sorted_lengths" || key == "beam_sorted_scores" || key == "greedy_ids" ||
         key == "greedy_lengths" || key == "values";
}

int64_t golden_dim(const Json& outputs, const char* key, int dim, const Golden& golden) {
  if (!outputs.contains(key)) return 0;
  const auto& e = golden.entry(outputs[key].at("tensor").get<std::string>());
  return e.shape.at(dim < 0 ? e.shape.size() + dim : dim);
}

void check_decoding(Checks& checks, Captioner& c, const at::Tensor& prefix, const Json& outputs, const Golden& golden) {
  Decoded d = decode_rows(c, prefix, golden_dim(outputs, "beam_sorted_ids", -2, golden),
                          golden_dim(outputs, "beam_sorted_ids", -1, golden), golden_dim(outputs, "greedy_ids", -1, golden));
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    const std::string& key = o.key();
    if (!is_decoding_output(key)) continue;  // the caller's own outputs
    if (key == "values") {
      // Literal copies of the ids: greedy and best beam per row, unpadded.
      for (auto v = o.value().begin(); v != o.value().end(); ++v) {
        const bool greedy = v.key() == "greedy";
        if (!greedy && v.key() != "beam_best") {
          checks.require(false, "unknown values entry '" + v.key() + "'");
          continue;
        }
        at::Tensor ids = greedy ? d.greedy_ids : d.beam_ids;
        at::Tensor lengths = greedy ? d.greedy_lengths : d.beam_lengths;
        checks.require(ids.defined() && static_cast<int64_t>(v.value().size()) == ids.size(0),
                       "values." + v.key() + ": row count differs");
        if (!ids.defined()) continue;
        for (int64_t b = 0; b < ids.size(0) && b < static_cast<int64_t>(v.value().size()); ++b) {
          at::Tensor row = greedy ? ids[b] : ids[b][0];
          const int64_t n = greedy ? lengths[b].item<int64_t>() : lengths[b][0].item<int64_t>();
          checks.exact("values." + v.key() + "[" + std::to_string(b) + "]", row.narrow(0, 0, n),
                       at::tensor(v.value()[b].get<std::vector<int64_t>>()));
        }
      }
      continue;
    }
    at::Tensor got;
    if (key == "beam_sorted_ids") got = d.beam_ids;
    else if (key == "beam_sorted_lengths") got = d.beam_lengths;
    else if (key == "beam_sorted_scores") got = d.beam_scores;
    else if (key == "greedy_ids") got = d.greedy_ids;
    else got = d.greedy_lengths;
    if (!got.defined()) {
      checks.require(false, key + ": its ids tensor (beam_sorted_ids / greedy_ids) is not among the outputs");
      continue;
    }
    at::Tensor expected = golden.tensor(o.value().at("tensor").get<std::string>());
    if (got.numel() != expected.numel()) {
      checks.exact(key, got, expected);  // reports the shapes
      continue;
    }
    compare_entry(checks, key, o.value(), got.reshape(expected.sizes()), golden);
  }
}

// One teacher-forcing step: loss (ignore_index 0, as train.py), per-token NLL, mapper grads.
void check_training(Checks& checks, Captioner& c, const MapperInput& input, const at::Tensor& ids, const at::Tensor& mask,
                    const Json& outputs, const Golden& golden, const std::string& grad_prefix) {
  for (auto& p : c.mapper->parameters()) {
    p.set_requires_grad(true);
    p.mutable_grad() = at::Tensor();
  }
  at::Tensor prefix = c.prefix(input);
  Gpt2Input x;
  x.prefix_embeds = prefix;
  x.input_ids = ids;
  x.attention_mask = mask;
  at::Tensor logits = c.lm->forward(x).logits;
  const int64_t P = prefix.size(1);
  at::Tensor loss = prefix_caption_loss(logits, ids, ids.ne(0), P);
  loss.backward();
  auto params = c.mapper->named_parameters();
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    const std::string& key = o.key();
    if (key == "loss") compare_entry(checks, key, o.value(), loss.detach().reshape({1}), golden);
    else if (key == "token_nll") compare_entry(checks, key, o.value(), prefix_caption_token_nll(logits, ids, P).detach(), golden);
    else if (key == "logits") compare_entry(checks, key, o.value(), logits.narrow(1, P - 1, ids.size(1)).detach(), golden);
    else if (key.rfind("grad.", 0) == 0) {
      std::string name = key.substr(5);
      if (name.rfind(grad_prefix, 0) == 0) name = name.substr(grad_prefix.size());
      const at::Tensor* p = params.find(name);
      if (!p) {
        checks.require(false, "no mapper parameter '" + name + "'");
        continue;
      }
      compare_entry(checks, key, o.value(), p->grad(), golden);
    } else {
      checks.require(false, "unknown output '" + key + "'");
    }
  }
  for (auto& p : c.mapper->parameters()) p.set_requires_grad(false);
}

}  // namespace

namespace {

// The image -> CLIP embedding link of clipcap-tiny's chain: the CLIP fixture it names
// (model.clip.fixture), its preprocessing of image `image_name`, its OpenAI-named weights.
at::Tensor clip_fixture_embedding(const std::string& clip_folder, const std::string& image_name) {
  Json clip_cases = read_json_file((fs::path(clip_folder) / "cases.json").string());
  const Json& model = clip_cases.at("model");
  ClipVisionConfig config = ClipVisionConfig::from_file((fs::path(clip_folder) / first_word(model.at("config").get<std::string>())).string());
  ClipPreprocessConfig pconfig;
  if (model.contains("preprocessor_config")) {
    const std::string p = (fs::path(clip_folder) / model["preprocessor_config"].get<std::string>()).string();
    pconfig = ClipPreprocessConfig::from_json(read_json_file(p), p);
  }
  std::string image_file;
  for (const Json& img : clip_cases.at("cases").at("preprocess").at("images"))
    if (img.at("name") == image_name) image_file = img.at("file").get<std::string>();
  if (image_file.empty()) throw std::runtime_error("CLIP fixture has no image '" + image_name + "'");
  // ClipCap encodes with openai/CLIP: the OpenAI-named weights when the fixture has them.
  std::string weights;
  for (auto w = model.at("weights").begin(); w != model.at("weights").end(); ++w)
    if (weights.empty() || w.key().find("openai") != std::string::npos) weights = w.key();
  ClipVisionTransformer vit(config);
  const std::string weights_path = (fs::path(clip_folder) / weights).string();
  vit->load_weights(load_weight_file(weights_path), weights_path);
  vit->freeze();
  ImageDecodeOptions decode;
  decode.apply_exif_orientation = false;  // PIL.Image.open, as the reference
  Image8 image = decode_image((fs::path(clip_folder) / image_file).string(), decode);
  torch::NoGradGuard no_grad;
  return vit->forward(clip_normalize(clip_crop_u8(image, pconfig), pconfig).unsqueeze(0)).image_embeds;
}

}  // namespace

FixtureReport run_clipcap_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "clipcap";
  const Json& model = cases.at("model");
  const Golden& golden = open_golden(report, folder, cases);
  ImportOptions options;
  options.tokenizer_dir = tokenizer_dir(folder, model);
  if (fs::exists(fs::path(options.tokenizer_dir) / "config.json"))
    options.gpt2_config = (fs::path(options.tokenizer_dir) / "config.json").string();
  const Json& all = cases.at("cases");
  if (model.at("checkpoints").empty()) throw std::runtime_error("cases.json: model.checkpoints lists no checkpoint");

  // A case belongs to the checkpoint whose mapping type ends its name ("decode_mlp"); the one
  // case with only CLIP embeddings in and their normalisation out belongs to all of them.
  auto is_embedding_case = [](const Json& c) {
    return c.at("inputs").size() == 1 && c["inputs"].contains("clip_embeds") && c.at("outputs").size() == 1 &&
           c["outputs"].contains("clip_embeds_normalized");
  };
  bool first_checkpoint = true;
  for (auto ck = model.at("checkpoints").begin(); ck != model.at("checkpoints").end(); ++ck) {
    const std::string file = ck.key();
    const Json& args = model.at("constructor_args").at(file);
    const std::string kind = args.at("mapping_type").get<std::string>();
    std::shared_ptr<Captioner> cap;
    CaseResult load = run_case(file + "/import", [&] {
      cap = std::make_shared<Captioner>(import_clipcap((fs::path(folder) / file).string(), options));
      Checks checks;
      checks.require(cap->mapper->config().type.find(kind) != std::string::npos,
                     "imported a " + cap->mapper->config().type + " mapper, the checkpoint is " + kind);
      if (args.contains("default_normalize_prefix"))
        checks.require(cap->normalize_prefix == args["default_normalize_prefix"].get<bool>(),
                       "prefix normalisation default differs from ClipCap's inference code");
      return checks.result().empty() ? "imported: " + cap->mapper->config().type + " mapper, normalize " +
                                           (cap->normalize_prefix ? "yes" : "no")
                                     : checks.result();
    });
    report.cases.push_back(load);
    if (!load.passed) continue;
    for (auto c = all.begin(); c != all.end(); ++c) {
      const std::string& name = c.key();
      const Json& in = c.value().at("inputs");
      const Json& outs = c.value().at("outputs");
      const bool for_this = name.size() > kind.size() + 1 &&
                            name.compare(name.size() - kind.size() - 1, kind.size() + 1, "_" + kind) == 0;
      const bool embedding_case = is_embedding_case(c.value());
      if (!for_this && !embedding_case) continue;  // another checkpoint's (or nobody's: run_fixture reports it)
      if (embedding_case && !first_checkpoint) continue;
      report.ran.insert(name);
      report.cases.push_back(run_case(file + "/" + name, [&]() -> std::string {
        Checks checks;
        if (embedding_case) {
          torch::NoGradGuard no_grad;
          // ClipCap's normalize_prefix, as the captioner applies it before its mapper.
          MapperInput input;
          input.embedding = golden.tensor(in.at("clip_embeds").get<std::string>()).to(at::kFloat);
          const bool normalize = cap->normalize_prefix;
          cap->normalize_prefix = true;
          at::Tensor normalized = cap->mapper_input(input).embedding;
          cap->normalize_prefix = normalize;
          compare_entry(checks, "clip_embeds_normalized", outs.at("clip_embeds_normalized"), normalized, golden);
          // The chain's first link: the named image through the CLIP fixture gives row 0.
          if (model.contains("clip") && model["clip"].contains("fixture")) {
            for (const auto& e : std::vector<std::string>{"astronaut_image_embeds"}) {
              if (!golden.contains(e)) continue;
              at::Tensor got = clip_fixture_embedding((fs::path(folder) / model["clip"]["fixture"].get<std::string>()).string(),
                                                      e.substr(0, e.find('_')));
              checks.close("astronaut.png -> CLIP image_embeds", got, golden.tensor(e), 1e-4, 0);
              checks.close("clip_embeds row 0 = float32(image_embeds)", input.embedding.narrow(0, 0, 1),
                           golden.tensor(e).to(at::kFloat), 0, 0);
            }
          }
          return checks.result();
        }
        if (in.contains("caption_ids")) {
          MapperInput input;
          input.embedding = golden.tensor(in.at("prefix_input").get<std::string>()).to(at::kFloat);
          // prefix_input is already what ClipCap feeds (normalised or not): no second normalisation.
          bool normalize = cap->normalize_prefix;
          cap->normalize_prefix = false;
          check_training(checks, *cap, input, golden.tensor(in.at("caption_ids").get<std::string>()),
                         golden.tensor(in.at("mask").get<std::string>()), outs, golden, "clip_project.");
          cap->normalize_prefix = normalize;
          return checks.result();
        }
        torch::NoGradGuard no_grad;
        if (in.contains("prefix")) {
          for (auto o = outs.begin(); o != outs.end(); ++o)
            checks.require(is_decoding_output(o.key()), "unknown output '" + o.key() + "'");
          check_decoding(checks, *cap, golden.tensor(in.at("prefix").get<std::string>()).to(at::kFloat), outs, golden);
          return checks.result();
        }
        // Mapper outputs, through Captioner::prefix: raw embeddings with normalisation off,
        // and raw embeddings with it on (which must equal the mapper on the golden normalised ones).
        const at::Tensor raw = golden.tensor(in.at("clip_embeds").get<std::string>()).to(at::kFloat);
        const at::Tensor normalized_in = golden.tensor(in.at("clip_embeds_normalized").get<std::string>()).to(at::kFloat);
        const bool normalize = cap->normalize_prefix;
        for (auto o = outs.begin(); o != outs.end(); ++o) {
          MapperInput input;
          if (o.key() == "prefix_raw") {
            cap->normalize_prefix = false;
            input.embedding = raw;
            compare_entry(checks, o.key(), o.value(), cap->prefix(input), golden);
          } else if (o.key() == "prefix_normalized") {
            cap->normalize_prefix = true;
            input.embedding = raw;
            compare_entry(checks, o.key() + " (normalised by the captioner)", o.value(), cap->prefix(input), golden);
            cap->normalize_prefix = false;
            input.embedding = normalized_in;
            compare_entry(checks, o.key(), o.value(), cap->prefix(input), golden);
          } else {
            checks.require(false, "unknown output '" + o.key() + "'");
          }
        }
        cap->normalize_prefix = normalize;
        return checks.result();
      }));
    }
    first_checkpoint = false;
  }
  return report;
}

FixtureReport run_prefix_aac_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "prefix-aac";
  const Json& model = cases.at("model");
  const Golden& golden = open_golden(report, folder, cases);
  ImportOptions options;
  options.tokenizer_dir = tokenizer_dir(folder, model);
  options.model_config = (fs::path(folder) / model.at("config").get<std::string>()).string();
  for (auto w = model.at("weights").begin(); w != model.at("weights").end(); ++w) {
    const std::string file = w.key();
    std::shared_ptr<Captioner> cap;
    CaseResult load = run_case(file + "/import", [&] {
      cap = std::make_shared<Captioner>(import_prefix_aac((fs::path(folder) / file).string(), options));
      return std::string("imported");
    });
    report.cases.push_back(load);
    if (!load.passed) continue;
    const Json& all = cases.at("cases");
    auto run_one = [&](const std::string& name, const Json& c) {
      report.ran.insert(name);
      report.cases.push_back(run_case(file + "/" + name, [&]() -> std::string {
        Checks checks;
        const Json& in = c.at("inputs");
        const Json& outs = c.at("outputs");
        static const std::set<std::string> kKnownOutputs = {
            "logmel", "audio_feature", "clipwise_output", "temporal_prefix", "global_prefix", "prefix", "prefix_clotho_variant",
            "logits", "loss", "beam_sorted_ids", "beam_sorted_lengths", "beam_sorted_scores", "greedy_ids", "greedy_lengths", "values"};
        for (auto o = outs.begin(); o != outs.end(); ++o)
          checks.require(kKnownOutputs.count(o.key()) > 0, "unknown output '" + o.key() + "'");
        for (auto i = in.begin(); i != in.end(); ++i)
          checks.require(i.key() == "waveform" || i.key() == "num_samples_padded" || i.key() == "caption",
                         "unknown input '" + i.key() + "'");
        const Json& wave_in = in.at("waveform");
        at::Tensor wave = golden.tensor(wave_in.at("tensor").get<std::string>());
        if (wave_in.contains("file")) {
          std::string wav = wave_in["file"].get<std::string>();
          wav = wav.substr(0, wav.find(' '));
          Waveform decoded = decode_audio((fs::path(folder) / wav).string(), {0});
          checks.close("decoded " + wav, at::from_blob(decoded.samples.data(), {1, static_cast<int64_t>(decoded.samples.size())}, at::kFloat),
                       wave, 0, 0);
        }
        const int64_t padded = golden.tensor(in.at("num_samples_padded").get<std::string>()).item<int64_t>();
        at::Tensor batch = at::constant_pad_nd(wave, {0, padded - wave.size(-1)});
        MapperInput features;
        Cnn14Output enc;
        {
          torch::NoGradGuard no_grad;
          enc = cap->cnn14->forward(batch);
          features.conv_block6 = enc.conv_block6;
          features.clipwise = enc.clipwise_output;
          features.embedding = enc.embedding;
        }
        at::Tensor prefix;
        {
          torch::NoGradGuard no_grad;
          prefix = cap->prefix(features);
          auto* mapper = dynamic_cast<PrefixAacMapperImpl*>(cap->mapper.get());
          for (auto o = outs.begin(); o != outs.end(); ++o) {
            const std::string& key = o.key();
            if (key == "logmel") compare_entry(checks, key, o.value(), enc.logmel, golden);
            else if (key == "audio_feature") compare_entry(checks, key, o.value(), enc.conv_block6, golden);
            else if (key == "clipwise_output") compare_entry(checks, key, o.value(), enc.clipwise_output, golden);
            else if (key == "temporal_prefix") compare_entry(checks, key, o.value(), mapper->temporal_mappingnetwork(enc.conv_block6), golden);
            else if (key == "global_prefix") compare_entry(checks, key, o.value(), mapper->global_mappingnetwork(enc.clipwise_output), golden);
            else if (key == "prefix") compare_entry(checks, key, o.value(), prefix, golden);
            else if (key == "prefix_clotho_variant") {
              MapperConfig clotho = cap->mapper->config();
              clotho.relu_after_bn = !clotho.relu_after_bn;
              auto variant = make_mapper(clotho);
              TensorMap state;
              for (const auto& p : cap->mapper->named_parameters()) state[p.key()] = p.value();
              for (const auto& b : cap->mapper->named_buffers()) state[b.key()] = b.value();
              load_state_strict(*variant, state, {{}, {}, file, {}});
              variant->eval();
              compare_entry(checks, key, o.value(), variant->forward(features), golden);
            }
          }
          if (outs.contains("beam_sorted_ids") || outs.contains("greedy_ids")) check_decoding(checks, *cap, prefix, outs, golden);
        }
        if (in.contains("caption")) {
          const Json& caption = in["caption"];
          at::Tensor ids = golden.tensor(caption.at("tensor").get<std::string>());
          at::Tensor mask = golden.tensor(caption.at("mask").get<std::string>());
          // The literal token ids (the tokenizer's output before padding) are the tensor's head.
          if (caption.contains("ids")) {
            auto literal = caption["ids"].get<std::vector<int64_t>>();
            checks.require(static_cast<int64_t>(literal.size()) <= ids.size(-1), "caption.ids longer than its tensor");
            if (static_cast<int64_t>(literal.size()) <= ids.size(-1))
              checks.exact("caption ids", ids.reshape({-1}).narrow(0, 0, static_cast<int64_t>(literal.size())), at::tensor(literal));
            if (caption.contains("preprocessed"))
              checks.exact("tokenized caption", at::tensor(cap->tokenizer->encode(caption["preprocessed"].get<std::string>())),
                           at::tensor(literal));
          }
          Json train_outs = Json::object();
          for (const char* k : {"logits", "loss"})
            if (outs.contains(k)) train_outs[k] = outs[k];
          check_training(checks, *cap, features, ids, mask, train_outs, golden, "");
        }
        return checks.result();
      }));
    };
    if (all.is_object())
      for (auto c = all.begin(); c != all.end(); ++c) run_one(c.key(), c.value());
    else
      for (const Json& c : all) run_one(c.at("name").get<std::string>(), c);
  }
  return report;
}

}  // namespace prefixcap::fixtures
