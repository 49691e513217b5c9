// Task lm: plain causal-LM training of a GPT-2-architecture model (to make a small GPT-2 where
// the real one cannot be downloaded).
#include <cmath>
#include <cstdio>
#include <filesystem>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include "core/errors.h"
#include "core/safetensors.h"
#include "core/weights.h"
#include "lm/tokenizer.h"
#include "lm/gpt2.h"
#include "lm/loss.h"
#include "pipeline/train_common.h"

namespace prefixcap::training {
namespace fs = std::filesystem;

TrainResult train_lm(const TrainConfig& c, const TrainHooks& hooks, const Dist& dist) {
  Progress progress(c.progress, dist.main());
  at::manual_seed(static_cast<uint64_t>(c.seed));
  std::vector<std::string> train_text, val_text;
  if (!c.text.empty()) {
    train_text = text_lines(c.text);
    if (!c.val_split.empty()) val_text = text_lines(c.val_split);
  } else {
    for (const auto& it : load_split(c, c.train_split, false)) train_text.insert(train_text.end(), it.captions.begin(), it.captions.end());
    if (!c.val_split.empty())
      for (const auto& it : load_split(c, c.val_split, false)) val_text.insert(val_text.end(), it.captions.begin(), it.captions.end());
  }
  std::string tok_dir = c.tokenizer.empty() ? c.lm : c.tokenizer;
  if (tok_dir.empty()) {  // learn one from the training text
    tok_dir = (fs::path(c.out) / "tokenizer").string();
    if (dist.main() && !fs::exists(fs::path(tok_dir) / "vocab.json")) {  // rank 0 learns it; the others read it
      progress.print("tokenizer: learning a " + std::to_string(c.tokenizer_vocab) + "-entry byte-level BPE vocabulary");
      train_bpe_tokenizer(train_text, c.tokenizer_vocab, tok_dir);
    }
    dist.barrier();
  }
  auto tok = std::make_shared<Gpt2Tokenizer>(Gpt2Tokenizer::from_folder(tok_dir));
  Gpt2Model lm{nullptr};
  if (!c.lm.empty()) {
    lm = load_gpt2(c.lm);
  } else {
    Json j = c.lm_config;
    if (!j.contains("vocab_size")) j["vocab_size"] = tok->vocab_size();
    if (!j.contains("model_type")) j["model_type"] = "gpt2";
    Gpt2Config cfg = Gpt2Config::from_json(j, "lm_config");
    if (cfg.vocab_size < tok->vocab_size())
      throw ConfigError("lm_config vocab_size " + std::to_string(cfg.vocab_size) + " is smaller than the tokenizer's " +
                        std::to_string(tok->vocab_size()));
    lm = Gpt2Model(cfg);
    lm->init_weights();
  }
  const at::Device device = train_device(c);
  lm->to(device);
  for (auto& p : lm->parameters()) p.set_requires_grad(true);
  const int64_t max_len = lm->config().n_positions;
  auto to_examples = [&](const std::vector<std::string>& lines) {
    std::vector<Example> out;
    for (const auto& l : lines) {
      Example e{0, caption_ids(*tok, l, c, true)};
      if (static_cast<int64_t>(e.ids.size()) > max_len) e.ids.resize(static_cast<size_t>(max_len));
      out.push_back(std::move(e));
    }
    return out;
  };
  const auto examples = to_examples(train_text), val_examples = to_examples(val_text);
  progress.print("language model: " + std::to_string(lm->config().n_layer) + " layers, n_embd " + std::to_string(lm->config().n_embd) +
                 ", training on " + std::to_string(examples.size()) + " texts");

  auto lm_loss = [&](const Batch& b) {
    const at::Tensor ids = b.ids.to(device), mask = b.mask.to(device);
    Gpt2Input x;
    x.input_ids = ids;
    x.logits = LogitsMode::None;
    const int64_t T = ids.size(1);
    at::Tensor hidden = lm->forward(x).last_hidden_state.narrow(1, 0, T - 1);
    return token_cross_entropy(lm->head(hidden), ids.narrow(1, 1, T - 1), mask.narrow(1, 1, T - 1));
  };
  auto batch_of = [&](const std::vector<Example>& ex, const std::vector<int64_t>& which) {
    Batch b;
    b.examples = which;
    std::vector<const std::vector<int64_t>*> rows;
    for (int64_t e : which) rows.push_back(&ex[e].ids);
    pad_ids(rows, &b.ids, &b.mask);
    return b;
  };
  auto save_lm = [&](const std::string& dir) {
    fs::create_directories(dir);
    write_json_file((fs::path(dir) / "config.json").string(), lm->config().to_json());
    save_safetensors((fs::path(dir) / "model.safetensors").string(), lm->hf_state_dict(), {{"format", "pt"}});
    tok->save(dir);
  };

  Task task;
  task.num_examples = static_cast<int64_t>(examples.size());
  task.output_name = "lm";
  task.begin_epoch = [](int64_t, Progress&) {};
  task.make_batch = [&](const std::vector<int64_t>& ex) { return batch_of(examples, ex); };
  task.loss = lm_loss;
  task.train_mode = [&](bool on) { lm->train(on); };
  task.param_groups = [&] { return std::vector<std::vector<at::Tensor>>{lm->parameters()}; };
  task.state = [&] { return module_tensors(*lm, "lm."); };
  task.load_state = [&](const TensorMap& s, const std::string& src) {
    load_state_strict(*lm, tensors_under(s, "lm."), {{}, {}, src + " (lm.*)", {}});
  };
  task.tokens = [](const Batch& b) { return b.mask.size(1) > 1 ? b.mask.narrow(1, 1, b.mask.size(1) - 1).sum().item<int64_t>() : int64_t{0}; };
  if (!val_examples.empty())
    task.validate = [&](int64_t, Progress& p) {
      torch::NoGradGuard no_grad;
      const double loss = sharded_loss(
          static_cast<int64_t>(val_examples.size()), c.batch_size,
          [&](int64_t lo, int64_t hi) {
            std::vector<int64_t> which;
            for (int64_t k = lo; k < hi; ++k) which.push_back(k);
            Batch b = batch_of(val_examples, which);
            const int64_t toks = task.tokens(b);
            return std::pair<double, int64_t>{lm_loss(b).item<double>() * static_cast<double>(toks), toks};
          },
          dist);
      if (!dist.main()) return Json();
      char line[128];
      std::snprintf(line, sizeof line, "validation: loss %.4f  perplexity %.2f", loss, std::exp(loss));
      p.print(line);
      return Json{{"loss", loss}, {"perplexity", std::exp(loss)}};
    };
  task.save_output = save_lm;
  TrainConfig lc = c;
  lc.best_metric = "loss";
  return run_loop(lc, task, hooks, dist);
}

}  // namespace prefixcap::training
