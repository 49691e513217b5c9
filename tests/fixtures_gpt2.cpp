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
at::Tensor input_tensor(const Json& inputs, const std::string& key, const Golden& golden) {
  if (!inputs.contains(key)) throw std::runtime_error("case has no input '" + key + "'");
  const Json& v = inputs[key];
  if (v.is_string()) return golden.tensor(v.get<std::string>());
  if (v.is_number_integer()) return at::tensor(v.get<int64_t>());
  if (v.is_number()) return at::tensor(v.get<double>());
  if (v.is_array()) return at::tensor(v.get<std::vector<int64_t>>());
  throw std::runtime_error("input '" + key + "' has an unsupported form");
}

// Compares `got` with every expected form an output entry gives: its golden "tensor" and its
// literal "value" (both when both are present). Exact for "exact": true and for integer data.
void compare_output(Checks& checks, const std::string& name, const Json& output, const at::Tensor& got,
                    const Golden& golden) {
  std::vector<std::pair<std::string, at::Tensor>> expected;
  if (output.contains("tensor")) expected.emplace_back(name, golden.tensor(output["tensor"].get<std::string>()));
  if (output.contains("value")) {
    const Json& v = output["value"];
    at::Tensor t;
    if (v.is_number_integer()) t = at::tensor({v.get<int64_t>()});
    else if (v.is_number()) t = at::tensor({v.get<double>()}, at::kDouble);
    else if (v.is_array() && !v.empty() && v[0].is_number_float()) t = at::tensor(v.get<std::vector<double>>(), at::kDouble);
    else if (v.is_array()) t = at::tensor(v.get<std::vector<int64_t>>());
    else throw std::runtime_error("output '" + name + "': unsupported literal value");
    expected.emplace_back(name + " (literal value)", t);
  }
  if (expected.empty()) throw std::runtime_error("output '" + name + "' has neither 'tensor' nor 'value'");
  for (const auto& [what, e] : expected) {
    if (output.value("exact", false) || !at::isFloatingType(e.scalar_type())) {
      checks.exact(what, got, e);
    } else {
      double atol, rtol;
      tolerance_of(output, &atol, &rtol);
      if (e.numel() != got.numel()) checks.close(what, got, e, atol, rtol);  // reports the shapes
      else checks.close(what, got, e.reshape(got.sizes()), atol, rtol);
    }
  }
}

// Golden tensors of case `name` that no output entry names: compared by their conventional
// names (`<case>.<tensor>`) so that nothing in golden.safetensors goes unchecked.
at::Tensor optional_golden(const Golden& golden, const std::string& name) {
  return golden.contains(name) ? golden.tensor(name) : at::Tensor();
}

std::vector<LayerKv> layers_from_stack(const at::Tensor& past) {  // [L, 2, B, H, P, D]
  if (past.dim() != 6 || past.size(1) != 2)
    throw std::runtime_error("past_key_values: expected [n_layer, 2, B, n_head, P, head_dim]");
  std::vector<LayerKv> layers;
  for (int64_t l = 0; l < past.size(0); ++l) layers.push_back({past[l][0].contiguous(), past[l][1].contiguous()});
  return layers;
}

std::string run_lm_case(Gpt2ModelImpl& lm, const std::string& case_name, const Json& c, const Golden& golden) {
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
    // The engine's sorted beams as tensors: ids padded with -1 to the length budget.
    const int64_t K = static_cast<int64_t>(result.size());
    at::Tensor sorted_ids = at::full({K, opt.max_tokens}, -1, at::kLong);
    at::Tensor sorted_lengths = at::zeros({K}, at::kLong);
    at::Tensor sorted_scores = at::zeros({K}, at::kDouble);
    for (int64_t k = 0; k < K; ++k) {
      const auto& ids = result[k].ids;
      for (size_t t = 0; t < ids.size() && static_cast<int64_t>(t) < opt.max_tokens; ++t) sorted_ids[k][t] = ids[t];
      sorted_lengths[k] = static_cast<int64_t>(ids.size());
      sorted_scores[k] = result[k].score;
    }
    for (auto it = outs.begin(); it != outs.end(); ++it) {
      const std::string& key = it.key();
      if (key == "ids" || key == "best_ids") {
        compare_output(checks, key, it.value(), at::tensor(result[0].ids), golden);
      } else if (key == "best_score") {
        compare_output(checks, key, it.value(), at::tensor({result[0].score}, at::kDouble), golden);
      } else if (key == "sorted_scores") {
        compare_output(checks, key, it.value(), sorted_scores, golden);
      } else if (key == "sorted_sequences") {
        const Json& expected = it.value().at("value");
        checks.require(expected.size() == result.size(), "sorted_sequences: " + std::to_string(result.size()) +
                                                             " sequences, expected " + std::to_string(expected.size()));
        for (size_t i = 0; i < expected.size() && i < result.size(); ++i)
          checks.exact("sequence " + std::to_string(i), at::tensor(result[i].ids),
                       at::tensor(expected[i].get<std::vector<int64_t>>()));
      } else if (key == "internal_state") {
        // Upstream's final beam state in its internal order (tokens, lengths, scores, order =
        // argsort of scores): reordered by `order` it must give our sorted beams. Names of the
        // form <case>.tokens / .lengths / .scores / .order.
        std::map<std::string, at::Tensor> state;
        for (const Json& n : it.value()) {
          const std::string tensor_name = n.get<std::string>();
          state[tensor_name.substr(tensor_name.rfind('.') + 1)] = golden.tensor(tensor_name);
        }
        for (const char* part : {"tokens", "lengths", "scores", "order"})
          if (!state.count(part)) checks.require(false, std::string("internal_state: no '") + part + "' tensor");
        if (!checks.failures.empty()) continue;
        at::Tensor order = state["order"].to(at::kLong);
        at::Tensor lengths = state["lengths"].to(at::kLong).index_select(0, order);
        checks.exact("internal_state lengths[order]", sorted_lengths, lengths);
        checks.close("internal_state scores[order]", sorted_scores, state["scores"].index_select(0, order), 1e-4, 1e-4);
        at::Tensor tokens = state["tokens"].to(at::kLong).index_select(0, order);
        for (int64_t k = 0; k < K && k < tokens.size(0); ++k) {
          const int64_t n = std::min<int64_t>(lengths[k].item<int64_t>(), tokens.size(1));
          checks.exact("internal_state tokens[order][" + std::to_string(k) + "]", at::tensor(result[k].ids),
                       tokens[k].narrow(0, 0, n));
        }
      } else {
        checks.require(false, "unknown output '" + key + "'");
      }
    }
    if (beam) {
      at::Tensor ids = optional_golden(golden, case_name + ".sorted_ids");
      if (ids.defined()) {
        at::Tensor got = sorted_ids;
        if (ids.size(-1) != got.size(-1)) got = at::constant_pad_nd(got, {0, ids.size(-1) - got.size(-1)}, -1);
        checks.exact("sorted_ids", got, ids);
      }
      at::Tensor lengths = optional_golden(golden, case_name + ".sorted_lengths");
      if (lengths.defined()) checks.exact("sorted_lengths", sorted_lengths, lengths);
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
  const Golden& golden = open_golden(report, folder, cases);
  if (model.at("weights").empty()) throw std::runtime_error("cases.json: model.weights lists no weight file");
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
      report.ran.insert(c.key());
      report.cases.push_back(
          run_case(weights_name + "/" + c.key(), [&] { return run_lm_case(*lm, c.key(), c.value(), golden); }));
    }
  }
  return report;
}

FixtureReport run_gpt2_tokenizer_fixture(const std::string& folder, const Json& cases) {
  FixtureReport report;
  report.kind = "gpt2-tokenizer";
  Gpt2Tokenizer tok((fs::path(folder) / cases.at("vocab").get<std::string>()).string(),
                    (fs::path(folder) / cases.at("merges").get<std::string>()).string());
  const Json& encode_cases = cases.at("cases");
  for (size_t i = 0; i < encode_cases.size(); ++i) {
    const Json& c = encode_cases[i];
    report.ran.insert(c.contains("name") ? c["name"].get<std::string>() : std::to_string(i));
    std::string name = "encode[" + std::to_string(c.value("index", static_cast<int>(i))) + "] " + c.value("category", "");
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
      if (c.contains("tokens")) {
        std::vector<std::string> got;
        for (int64_t id : ids) got.push_back(tok.token(id));
        checks.require(got == c["tokens"].get<std::vector<std::string>>(), "token strings differ");
      }
      if (c.value("decode_roundtrip", false)) checks.require(tok.decode(ids) == text, "decode(encode(text)) != text");
      return checks.result();
    }));
  }
  size_t decode_count = 0;
  if (cases.contains("decode_cases")) {
    for (const Json& c : cases["decode_cases"]) {
      const std::string id = c.value("name", std::to_string(decode_count));
      ++decode_count;
      report.ran.insert("decode:" + id);
      report.cases.push_back(run_case("decode " + id, [&] {
        Checks checks;
        std::string got = tok.decode(c.at("ids").get<std::vector<int64_t>>());
        checks.require(got == c.at("text").get<std::string>(), "decoded text differs");
        return checks.result().empty() ? std::string("text equal") : checks.result();
      }));
    }
  }
  // The declared counts must equal what is there and ran: a fixture that lost cases fails.
  if (cases.contains("counts")) {
    report.cases.push_back(run_case("counts", [&] {
      Checks checks;
      for (auto it = cases["counts"].begin(); it != cases["counts"].end(); ++it) {
        const int64_t declared = it.value().get<int64_t>();
        int64_t actual = -1;
        if (it.key() == "encode_cases") actual = static_cast<int64_t>(encode_cases.size());
        else if (it.key() == "decode_cases") actual = static_cast<int64_t>(decode_count);
        else if (it.key() == "js_disagreements") {
          // indices of encode cases where JavaScript ports disagree: they must be real cases
          const Json& indices = cases.at("js_disagreement_indices");
          actual = static_cast<int64_t>(indices.size());
          for (const Json& index : indices) {
            bool found = false;
            for (const Json& c : encode_cases) found = found || (c.contains("index") && c["index"] == index);
            checks.require(found, "js_disagreement_indices: no encode case with index " + index.dump());
          }
        } else {
          checks.require(false, "unknown count '" + it.key() + "'");
          continue;
        }
        checks.require(actual == declared, it.key() + ": " + std::to_string(actual) + " present, " +
                                               std::to_string(declared) + " declared");
      }
      return checks.result().empty() ? std::string("counts equal") : checks.result();
    }));
  }
  return report;
}

}  // namespace prefixcap::fixtures
