// Fixture kinds of the core engine: the GPT-2 LM (forward, prefixes, loss, gradients,
// decoding) and the GPT-2 tokenizer.
#include <filesystem>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include "core/errors.h"
#include "core/safetensors.h"
#include "core/weights.h"
#include "lm/decoding.h"
#include "lm/gpt2.h"
#include "lm/loss.h"
#include "lm/tokenizer.h"
#include "tests/fixture_runner.h"

namespace prefixcap::fixtures {
namespace fs = std::filesystem;

namespace {

// An input of a case: a golden tensor name, or a literal number / list.
at::Tensor input_tensor(const Json& inputs, const std::string& key, const SafetensorsFile& golden) {
  if (!inputs.contains(key)) throw std::runtime_error("case has no input '" + key + "'");
  const Json& v = inputs[key];
  if (v.is_string()) return golden.tensor(v.get<std::string>());
  if (v.is_number_integer()) return at::tensor(v.get<int64_t>());
  if (v.is_number()) return at::tensor(v.get<double>());
  if (v.is_array()) return at::tensor(v.get<std::vector<int64_t>>());
  throw std::runtime_error("input '" + key + "' has an unsupported form");
}

// Expected value of an output entry: its golden tensor, or its literal "value".
at::Tensor expected_tensor(const Json& output, const SafetensorsFile& golden) {
  if (output.contains("tensor")) return golden.tensor(output["tensor"].get<std::string>());
  if (output.contains("value")) {
    const Json& v = output["value"];
    if (v.is_array() && !v.empty() && v[0].is_number_float()) return at::tensor(v.get<std::vector<double>>(), at::kDouble);
    return at::tensor(v.get<std::vector<int64_t>>());
  }
  throw std::runtime_error("output has neither 'tensor' nor 'value'");
}

void compare_output(Checks& checks, const std::string& name, const Json& output, const at::Tensor& got,
                    const SafetensorsFile& golden) {
  at::Tensor expected = expected_tensor(output, golden);
  if (output.value("exact", false) || !at::isFloatingType(expected.scalar_type())) {
    checks.exact(name, got, expected);
  } else {
    double atol, rtol;
    tolerance_of(output, &atol, &rtol);
    checks.close(name, got, expected.reshape(got.sizes()), atol, rtol);
  }
}

std::vector<LayerKv> layers_from_stack(const at::Tensor& past) {  // [L, 2, B, H, P, D]
  if (past.dim() != 6 || past.size(1) != 2)
    throw std::runtime_error("past_key_values: expected [n_layer, 2, B, n_head, P, head_dim]");
  std::vector<LayerKv> layers;
  for (int64_t l = 0; l < past.size(0); ++l) layers.push_back({past[l][0].contiguous(), past[l][1].contiguous()});
  return layers;
}

std::string run_lm_case(Gpt2ModelImpl& lm, const Json& c, const SafetensorsFile& golden) {
  const Json& in = c.at("inputs");
  const Json& outs = c.at("outputs");
  Checks checks;

  if (in.contains("past_key_values")) {
    // Deep key/value prefix; the case's position ids tell the convention.
    at::Tensor past = input_tensor(in, "past_key_values", golden).to(at::kFloat);
    const int64_t B = past.size(2), P = past.size(4);
    std::vector<LayerKv> layers = layers_from_stack(past);
    if (in.contains("prompt_embeddings")) {
      auto from_peft = kv_prefix_from_prompt_embeddings(input_tensor(in, "prompt_embeddings", golden), lm.config(), B);
      for (size_t l = 0; l < layers.size(); ++l) {
        checks.close("peft keys l" + std::to_string(l), from_peft[l].key, layers[l].key, 0, 0);
        checks.close("peft values l" + std::to_string(l), from_peft[l].value, layers[l].value, 0, 0);
      }
      layers = from_peft;
    }
    at::Tensor ids = input_tensor(in, "input_ids", golden);
    at::Tensor positions = input_tensor(in, "position_ids", golden);
    KvPrefixPositions convention;
    if (positions[0].item<int64_t>() == P) convention = KvPrefixPositions::AfterPrefix;
    else if (positions[0].item<int64_t>() == 0) convention = KvPrefixPositions::FromZero;
    else return "FAIL:position_ids start neither at 0 nor at the prefix length";
    KvCache cache = make_kv_prefix_cache(layers, convention);
    checks.exact("positions", at::arange(cache.next_position, cache.next_position + ids.size(1)), positions);
    Gpt2Input x;
    x.input_ids = ids;
    x.cache = &cache;
    Gpt2Output y = lm.forward(x);
    for (auto it = outs.begin(); it != outs.end(); ++it) {
      const std::string& key = it.key();
      if (key == "logits") compare_output(checks, key, it.value(), y.logits, golden);
      else if (key == "last_hidden_state") compare_output(checks, key, it.value(), y.last_hidden_state, golden);
      else if (key == "logits_last") compare_output(checks, key, it.value(), y.logits.select(1, -1), golden);
      else if (key == "argmax_ids") compare_output(checks, key, it.value(), y.logits.argmax(-1), golden);
      else checks.require(false, "unknown output '" + key + "'");
    }
    return checks.result();
  }

  if (in.contains("prefix") && (in.contains("beam_size") || in.contains("max_new_tokens"))) {
    Prompt prompt;
    prompt.prefix_embeds = input_tensor(in, "prefix", golden).to(at::kFloat);
    DecodingOptions opt;
    const bool beam = in.contains("beam_size");
    opt.beam_size = beam ? in["beam_size"].get<int>() : 1;
    opt.num_return = opt.beam_size;
    opt.max_tokens = beam ? in.value("entry_length", 20) : in["max_new_tokens"].get<int>();
    opt.stop_token_ids = {in.at("stop_token_id").get<int64_t>()};
    opt.temperature = in.value("temperature", 1.0);
    auto result = generate(lm, prompt, opt)[0];
    for (auto it = outs.begin(); it != outs.end(); ++it) {
      const std::string& key = it.key();
      if (key == "ids" || key == "best_ids") {
        compare_output(checks, key, it.value(), at::tensor(result[0].ids), golden);
      } else if (key == "best_score") {
        compare_output(checks, key, it.value(), at::tensor({result[0].score}, at::kDouble), golden);
      } else if (key == "sorted_scores") {
        std::vector<double> scores;
        for (const auto& s : result) scores.push_back(s.score);
        compare_output(checks, key, it.value(), at::tensor(scores, at::kDouble), golden);
      } else if (key == "sorted_sequences") {
        const Json& expected = it.value().at("value");
        checks.require(expected.size() == result.size(), "sorted_sequences: count differs");
        for (size_t i = 0; i < expected.size() && i < result.size(); ++i)
          checks.exact("sequence " + std::to_string(i), at::tensor(result[i].ids),
                       at::tensor(expected[i].get<std::vector<int64_t>>()));
      } else if (key == "internal_state") {
        // Beam order inside upstream's tensors depends on topk tie order; sorted outputs pin the result.
      } else {
        checks.require(false, "unknown output '" + key + "'");
      }
    }
    return checks.result();
  }

  if (in.contains("prefix") && in.contains("caption_ids")) {
    at::Tensor prefix = input_tensor(in, "prefix", golden).to(at::kFloat).clone().set_requires_grad(true);
    at::Tensor ids = input_tensor(in, "caption_ids", golden);
    Gpt2Input x;
    x.prefix_embeds = prefix;
    x.input_ids = ids;
    at::Tensor caption_mask;
    if (in.contains("attention_mask")) {
      x.attention_mask = input_tensor(in, "attention_mask", golden);
      caption_mask = x.attention_mask.narrow(1, prefix.size(1), ids.size(1));
    }
    Gpt2Output y = lm.forward(x);
    at::Tensor loss = prefix_caption_loss(y.logits, ids, caption_mask, prefix.size(1));
    at::Tensor grad = torch::autograd::grad({loss}, {prefix})[0];
    for (auto it = outs.begin(); it != outs.end(); ++it) {
      const std::string& key = it.key();
      if (key == "logits") {
        compare_output(checks, key, it.value(), y.logits, golden);
      } else if (key == "loss") {
        compare_output(checks, key, it.value(), loss.reshape({1}), golden);
      } else if (key == "grad_prefix") {
        compare_output(checks, key, it.value(), grad, golden);
      } else if (key == "logits_at_real_positions") {
        // "<golden tensor> where attention_mask==1": equal to another case's logits there.
        std::string spec = it.value().at("equal_to").get<std::string>();
        std::string tensor_name = spec.substr(0, spec.find(' '));
        at::Tensor mask = x.attention_mask.to(at::kBool);
        double atol, rtol;
        tolerance_of(it.value(), &atol, &rtol);
        checks.close(key, y.logits.index({mask}), golden.tensor(tensor_name).index({mask}), atol, rtol);
      } else {
        checks.require(false, "unknown output '" + key + "'");
      }
    }
    return checks.result();
  }

  if (in.contains("input_ids")) {
    Gpt2Input x;
    x.input_ids = input_tensor(in, "input_ids", golden);
    Gpt2Output y = lm.forward(x);
    for (auto it = outs.begin(); it != outs.end(); ++it) {
      if (it.key() == "logits") compare_output(checks, "logits", it.value(), y.logits, golden);
      else checks.require(false, "unknown output '" + it.key() + "'");
    }
    return checks.result();
  }
  return "FAIL:case inputs not recognised";
}

}  // namespace

FixtureReport run_gpt2_lm_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "gpt2-lm";
  const Json& model = cases.at("model");
  Gpt2Config config = Gpt2Config::from_file((fs::path(folder) / model.at("config").get<std::string>()).string());
  SafetensorsFile golden((fs::path(folder) / cases.at("golden").at("file").get<std::string>()).string());
  for (auto w = model.at("weights").begin(); w != model.at("weights").end(); ++w) {
    const std::string weights_name = w.key();
    const std::string path = (fs::path(folder) / weights_name).string();
    Gpt2Model lm{nullptr};
    CaseResult load = run_case(weights_name + "/load", [&] {
      lm = Gpt2Model(config);
      lm->load_weights(load_weight_file(path), path);
      lm->freeze();
      return std::string("strict load");
    });
    report.cases.push_back(load);
    if (!load.passed) continue;
    for (auto c = cases.at("cases").begin(); c != cases.at("cases").end(); ++c) {
      report.cases.push_back(run_case(weights_name + "/" + c.key(), [&] { return run_lm_case(*lm, c.value(), golden); }));
    }
  }
  return report;
}

FixtureReport run_gpt2_tokenizer_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "gpt2-tokenizer";
  Gpt2Tokenizer tok((fs::path(folder) / cases.at("vocab").get<std::string>()).string(),
                    (fs::path(folder) / cases.at("merges").get<std::string>()).string());
  for (const Json& c : cases.at("cases")) {
    std::string name = "encode[" + std::to_string(c.value("index", 0)) + "] " + c.value("category", "");
    report.cases.push_back(run_case(name, [&] {
      const std::string text = c.at("text").get<std::string>();
      Checks checks;
      if (c.contains("pretokens")) {
        auto got = tok.pretokenize(text);
        auto expected = c["pretokens"].get<std::vector<std::string>>();
        checks.require(got == expected, "pre-tokens differ (" + std::to_string(got.size()) + " vs " +
                                            std::to_string(expected.size()) + ")");
      }
      auto ids = tok.encode(text);
      checks.exact("ids", at::tensor(ids, at::kLong), at::tensor(c.at("ids").get<std::vector<int64_t>>(), at::kLong));
      if (c.value("decode_roundtrip", false)) checks.require(tok.decode(ids) == text, "decode(encode(text)) != text");
      return checks.result();
    }));
  }
  if (cases.contains("decode_cases")) {
    for (const Json& c : cases["decode_cases"]) {
      report.cases.push_back(run_case("decode " + c.value("name", std::string("?")), [&] {
        Checks checks;
        std::string got = tok.decode(c.at("ids").get<std::vector<int64_t>>());
        checks.require(got == c.at("text").get<std::string>(), "decoded text differs");
        return checks.result().empty() ? std::string("text equal") : checks.result();
      }));
    }
  }
  return report;
}

}  // namespace prefixcap::fixtures
