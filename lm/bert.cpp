#include "lm/bert.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <numeric>

#include <ATen/ATen.h>
#include <torch/nn/functional/normalization.h>
#include <torch/types.h>
#include <torch/utils.h>

#include "core/errors.h"
#include "core/weights.h"

namespace prefixcap {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------
// config

BertConfig BertConfig::from_json(const Json& j, const std::string& where) {
  BertConfig c;
  c.vocab_size = json_get_or<int64_t>(j, "vocab_size", c.vocab_size, where);
  c.hidden_size = json_get_or<int64_t>(j, "hidden_size", c.hidden_size, where);
  c.num_hidden_layers = json_get_or<int64_t>(j, "num_hidden_layers", c.num_hidden_layers, where);
  c.num_attention_heads = json_get_or<int64_t>(j, "num_attention_heads", c.num_attention_heads, where);
  c.intermediate_size = json_get_or<int64_t>(j, "intermediate_size", c.intermediate_size, where);
  c.hidden_act = json_get_or<std::string>(j, "hidden_act", c.hidden_act, where);
  c.max_position_embeddings = json_get_or<int64_t>(j, "max_position_embeddings", c.max_position_embeddings, where);
  c.type_vocab_size = json_get_or<int64_t>(j, "type_vocab_size", c.type_vocab_size, where);
  c.layer_norm_eps = json_get_or<double>(j, "layer_norm_eps", c.layer_norm_eps, where);

  for (const auto& [key, value] : {std::pair<const char*, int64_t>{"vocab_size", c.vocab_size},
                                   {"hidden_size", c.hidden_size},
                                   {"num_hidden_layers", c.num_hidden_layers},
                                   {"num_attention_heads", c.num_attention_heads},
                                   {"intermediate_size", c.intermediate_size},
                                   {"max_position_embeddings", c.max_position_embeddings},
                                   {"type_vocab_size", c.type_vocab_size}})
    if (value <= 0) throw ConfigError(where + ": key '" + key + "' must be positive, got " + std::to_string(value));
  if (c.hidden_size % c.num_attention_heads != 0)
    throw ConfigError(where + ": hidden_size (" + std::to_string(c.hidden_size) +
                      ") is not a multiple of num_attention_heads (" + std::to_string(c.num_attention_heads) + ")");
  if (!(c.layer_norm_eps > 0)) throw ConfigError(where + ": key 'layer_norm_eps' must be positive");
  const std::vector<std::string> activations = {"gelu", "gelu_new", "gelu_pytorch_tanh", "relu"};
  if (std::find(activations.begin(), activations.end(), c.hidden_act) == activations.end())
    throw ConfigError(where + ": hidden_act '" + c.hidden_act + "' is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu)");
  // Options that change the arithmetic: refuse rather than silently compute something else.
  const auto position_type = json_get_or<std::string>(j, "position_embedding_type", "absolute", where);
  if (position_type != "absolute")
    throw ConfigError(where + ": position_embedding_type '" + position_type + "' is not supported (absolute only)");
  if (json_get_or<bool>(j, "is_decoder", false, where) || json_get_or<bool>(j, "add_cross_attention", false, where))
    throw ConfigError(where + ": BERT as a decoder (is_decoder / add_cross_attention) is not supported");
  const auto model_type = json_get_or<std::string>(j, "model_type", "bert", where);
  if (model_type != "bert")
    throw ConfigError(where + ": model_type '" + model_type + "' is not BERT (only BertModel checkpoints load here)");
  return c;
}

BertConfig BertConfig::from_file(const std::string& path) { return from_json(read_json_file(path), path); }

// ---------------------------------------------------------------------------------------
// model

namespace {
// An empty module that only names a level of the checkpoint's key tree.
std::shared_ptr<torch::nn::Module> level(torch::nn::Module& parent, const std::string& name) {
  return parent.register_module(name, std::make_shared<torch::nn::Module>());
}

torch::nn::LayerNorm layer_norm(int64_t width, double eps) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({width}).eps(eps));
}
}  // namespace

BertLayerImpl::BertLayerImpl(const BertConfig& c)
    : heads_(c.num_attention_heads), head_dim_(c.head_dim()), activation_(c.hidden_act) {
  auto attention = level(*this, "attention");
  auto self = level(*attention, "self");
  query = self->register_module("query", torch::nn::Linear(c.hidden_size, c.hidden_size));
  key = self->register_module("key", torch::nn::Linear(c.hidden_size, c.hidden_size));
  value = self->register_module("value", torch::nn::Linear(c.hidden_size, c.hidden_size));
  auto attention_output = level(*attention, "output");
  attention_dense = attention_output->register_module("dense", torch::nn::Linear(c.hidden_size, c.hidden_size));
  attention_norm = attention_output->register_module("LayerNorm", layer_norm(c.hidden_size, c.layer_norm_eps));
  auto intermediate = level(*this, "intermediate");
  intermediate_dense = intermediate->register_module("dense", torch::nn::Linear(c.hidden_size, c.intermediate_size));
  auto output = level(*this, "output");
  output_dense = output->register_module("dense", torch::nn::Linear(c.intermediate_size, c.hidden_size));
  output_norm = output->register_module("LayerNorm", layer_norm(c.hidden_size, c.layer_norm_eps));
}

at::Tensor BertLayerImpl::forward(const at::Tensor& x, const at::Tensor& key_bias) {
  const int64_t B = x.size(0), T = x.size(1);
  auto heads = [&](const at::Tensor& t) { return t.view({B, T, heads_, head_dim_}).transpose(1, 2); };
  at::Tensor q = heads(query(x)), k = heads(key(x)), v = heads(value(x));
  // Eager BertSelfAttention: scores divided by sqrt(head_dim) after the product.
  at::Tensor scores = at::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(head_dim_));
  if (key_bias.defined()) scores = scores + key_bias;
  at::Tensor context = at::matmul(at::softmax(scores, -1), v).transpose(1, 2).reshape({B, T, heads_ * head_dim_});
  at::Tensor attended = attention_norm(attention_dense(context) + x);
  at::Tensor hidden = intermediate_dense(attended);
  if (activation_ == "gelu") hidden = at::gelu(hidden);
  else if (activation_ == "relu") hidden = at::relu(hidden);
  else hidden = at::gelu(hidden, "tanh");
  return output_norm(output_dense(hidden) + attended);
}

BertModelImpl::BertModelImpl(const BertConfig& c) : config_(c) {
  auto embeddings = level(*this, "embeddings");
  word_embeddings = embeddings->register_module("word_embeddings", torch::nn::Embedding(c.vocab_size, c.hidden_size));
  position_embeddings =
      embeddings->register_module("position_embeddings", torch::nn::Embedding(c.max_position_embeddings, c.hidden_size));
  token_type_embeddings =
      embeddings->register_module("token_type_embeddings", torch::nn::Embedding(c.type_vocab_size, c.hidden_size));
  embeddings_norm = embeddings->register_module("LayerNorm", layer_norm(c.hidden_size, c.layer_norm_eps));
  auto encoder = level(*this, "encoder");
  layers = encoder->register_module("layer", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    blocks_.emplace_back(c);
    layers->push_back(blocks_.back());
  }
}

at::Tensor BertModelImpl::forward(const at::Tensor& input_ids, const at::Tensor& attention_mask) {
  TORCH_CHECK(input_ids.dim() == 2, "BertModel: input_ids must be [B, T], got ", input_ids.sizes());
  const int64_t T = input_ids.size(1);
  if (T > config_.max_position_embeddings)
    throw std::invalid_argument("BertModel: " + std::to_string(T) + " tokens exceed max_position_embeddings (" +
                                std::to_string(config_.max_position_embeddings) + ")");
  at::Tensor positions = at::arange(T, input_ids.options());
  at::Tensor x = word_embeddings(input_ids) + token_type_embeddings->weight[0] + position_embeddings(positions);
  x = embeddings_norm(x);
  at::Tensor key_bias;
  if (attention_mask.defined()) {
    // Hugging Face's extended mask: (1 - mask) * lowest, broadcast over heads and queries.
    const double lowest = static_cast<double>(std::numeric_limits<float>::lowest());
    key_bias = (1.0 - attention_mask.to(x.scalar_type())).mul(lowest).view({x.size(0), 1, 1, T});
  }
  for (auto& block : blocks_) x = block(x, key_bias);
  return x;
}

// The one mapping table between BERT checkpoint names and ours (module names are the keys):
//   bert.X                         -> X     (BertFor* checkpoints save the encoder under "bert.")
//   *.LayerNorm.gamma / .beta      -> *.LayerNorm.weight / .bias  (checkpoints converted from TF)
//   embeddings.position_ids, embeddings.token_type_ids -> ignored (index buffers, recomputed)
//   pooler.*, cls.*                -> ignored (the pooler and the pre-training heads; FENSE uses
//                                     token states only)
void BertModelImpl::load_weights(const TensorMap& weights, const std::string& source) {
  TensorMap renamed;
  for (const auto& [key, tensor] : weights) {
    std::string name = key.rfind("bert.", 0) == 0 ? key.substr(5) : key;
    for (const auto& [legacy, current] : {std::pair<std::string, std::string>{".LayerNorm.gamma", ".LayerNorm.weight"},
                                          {".LayerNorm.beta", ".LayerNorm.bias"}})
      if (name.size() > legacy.size() && name.compare(name.size() - legacy.size(), legacy.size(), legacy) == 0)
        name = name.substr(0, name.size() - legacy.size()) + current;
    if (renamed.count(name)) throw FileError(source, "tensor '" + key + "' appears twice (under two of its names)");
    renamed[name] = tensor;
  }
  StrictLoadOptions options;
  options.source = source;
  options.ignorable = {"embeddings.position_ids", "embeddings.token_type_ids", "pooler.*", "cls.*"};
  load_state_strict(*this, renamed, options);
}

void BertModelImpl::freeze() {
  for (auto& p : parameters()) p.set_requires_grad(false);
  eval();
}

BertBatch pad_batch(const std::vector<std::vector<int64_t>>& ids, int64_t pad_id) {
  size_t T = 0;
  for (const auto& row : ids) T = std::max(T, row.size());
  const auto B = static_cast<int64_t>(ids.size());
  BertBatch batch{at::full({B, static_cast<int64_t>(T)}, pad_id, at::kLong), at::zeros({B, static_cast<int64_t>(T)}, at::kLong)};
  auto id = batch.input_ids.accessor<int64_t, 2>();
  auto mask = batch.attention_mask.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b)
    for (size_t t = 0; t < ids[b].size(); ++t) {
      id[b][static_cast<int64_t>(t)] = ids[b][t];
      mask[b][static_cast<int64_t>(t)] = 1;
    }
  return batch;
}

namespace {

// Runs `fn` over batches of at most `batch_size` texts of similar token length (longest first,
// as sentence-transformers orders them), writing each batch's rows back in input order.
template <typename Fn>
at::Tensor run_sorted_batches(const std::vector<std::vector<int64_t>>& ids, int64_t batch_size, int64_t width,
                              const c10::Device& device, Fn fn) {
  if (batch_size <= 0) throw std::invalid_argument("batch size must be positive, got " + std::to_string(batch_size));
  std::vector<size_t> order(ids.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ids[a].size() > ids[b].size(); });
  at::Tensor out = at::empty({static_cast<int64_t>(ids.size()), width}, at::kFloat);
  torch::NoGradGuard no_grad;
  for (size_t start = 0; start < order.size(); start += static_cast<size_t>(batch_size)) {
    const size_t end = std::min(order.size(), start + static_cast<size_t>(batch_size));
    std::vector<std::vector<int64_t>> rows;
    for (size_t i = start; i < end; ++i) rows.push_back(ids[order[i]]);
    BertBatch batch = pad_batch(rows, 0);
    batch.input_ids = batch.input_ids.to(device);
    batch.attention_mask = batch.attention_mask.to(device);
    at::Tensor result = fn(batch).to(at::kCPU);
    std::vector<int64_t> index(order.begin() + static_cast<std::ptrdiff_t>(start), order.begin() + static_cast<std::ptrdiff_t>(end));
    out.index_copy_(0, at::tensor(index, at::kLong), result.to(at::kFloat));
  }
  return out;
}

fs::path weights_in(const fs::path& folder) {
  for (const char* name : {"model.safetensors", "pytorch_model.bin"})
    if (fs::exists(folder / name)) return folder / name;
  throw FileError(folder.string(), "no model.safetensors or pytorch_model.bin in the BERT folder");
}

// vocab.txt with tokenizer_config.json's do_lower_case (default true, as BertTokenizer's).
std::shared_ptr<WordPieceTokenizer> bert_tokenizer(const fs::path& folder) {
  bool lower_case = true;
  const fs::path config_path = folder / "tokenizer_config.json";
  if (fs::exists(config_path)) {
    const Json j = read_json_file(config_path.string());
    lower_case = json_get_or<bool>(j, "do_lower_case", true, config_path.string());
    if (j.contains("strip_accents") && !j.at("strip_accents").is_null() &&
        json_get<bool>(j, "strip_accents", config_path.string()) != lower_case)
      throw ConfigError(config_path.string() + ": strip_accents differing from do_lower_case is not supported");
    if (!json_get_or<bool>(j, "tokenize_chinese_chars", true, config_path.string()))
      throw ConfigError(config_path.string() + ": tokenize_chinese_chars=false is not supported");
    const auto cls = json_get_or<std::string>(j, "tokenizer_class", "BertTokenizer", config_path.string());
    if (cls != "BertTokenizer" && cls != "BertTokenizerFast")
      throw ConfigError(config_path.string() + ": tokenizer_class '" + cls + "' is not BERT's WordPiece tokenizer");
  }
  const fs::path vocab = folder / "vocab.txt";
  if (!fs::exists(vocab)) throw FileError(vocab.string(), "missing (the BERT tokenizer's vocabulary)");
  return std::make_shared<WordPieceTokenizer>(WordPieceTokenizer::from_vocab(vocab.string(), lower_case));
}

BertModel load_bert_folder(const fs::path& folder) {
  const fs::path config_path = folder / "config.json";
  if (!fs::exists(config_path)) throw FileError(config_path.string(), "missing (BERT config.json)");
  BertModel model(BertConfig::from_file(config_path.string()));
  const fs::path weights = weights_in(folder);
  model->load_weights(load_weight_file(weights.string()), weights.string());
  model->freeze();
  return model;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Sentence-BERT

SentenceEncoder SentenceEncoder::load(const std::string& folder_arg) {
  const fs::path folder(folder_arg);
  if (!fs::is_directory(folder)) throw FileError(folder_arg, "not a folder (a sentence-transformers model folder)");
  fs::path transformer = folder, pooling_folder;
  bool normalize = false;
  const fs::path modules_path = folder / "modules.json";
  if (fs::exists(modules_path)) {
    const Json modules = read_json_file(modules_path.string());
    if (!modules.is_array()) throw FileError(modules_path.string(), "expected a list of modules");
    bool have_transformer = false;
    for (const Json& m : modules) {
      const auto type = json_get<std::string>(m, "type", modules_path.string());
      const auto path = json_get_or<std::string>(m, "path", "", modules_path.string());
      if (type == "sentence_transformers.models.Transformer" && !have_transformer) {
        transformer = folder / path;
        have_transformer = true;
      } else if (type == "sentence_transformers.models.Pooling" && have_transformer && pooling_folder.empty()) {
        pooling_folder = folder / path;
      } else if (type == "sentence_transformers.models.Normalize" && !pooling_folder.empty()) {
        normalize = true;
      } else {
        throw FileError(modules_path.string(), "module '" + type + "' (at this place in the list) is not supported: "
                                               "Transformer, Pooling, then optionally Normalize");
      }
    }
    if (!have_transformer || pooling_folder.empty())
      throw FileError(modules_path.string(), "needs a Transformer module followed by a Pooling module");
  }

  SentenceEncoder e;
  e.model_ = load_bert_folder(transformer);
  e.tokenizer_ = bert_tokenizer(transformer);
  e.normalize_ = normalize;
  // Longest input: sentence_bert_config.json, else the tokenizer's model_max_length capped by the
  // position table (what sentence-transformers does).
  e.max_seq_length_ = e.model_->config().max_position_embeddings;
  const fs::path st_config = transformer / "sentence_bert_config.json";
  const fs::path tok_config = transformer / "tokenizer_config.json";
  if (fs::exists(st_config)) {
    const Json j = read_json_file(st_config.string());
    e.max_seq_length_ = json_get_or<int64_t>(j, "max_seq_length", e.max_seq_length_, st_config.string());
    e.lower_case_input_ = json_get_or<bool>(j, "do_lower_case", false, st_config.string());
  } else if (fs::exists(tok_config)) {
    const Json j = read_json_file(tok_config.string());
    if (j.contains("model_max_length") && j.at("model_max_length").is_number() &&
        j.at("model_max_length").get<double>() < static_cast<double>(e.max_seq_length_))
      e.max_seq_length_ = json_get<int64_t>(j, "model_max_length", tok_config.string());
  }
  if (e.max_seq_length_ < 2 || e.max_seq_length_ > e.model_->config().max_position_embeddings)
    throw ConfigError(st_config.string() + ": max_seq_length " + std::to_string(e.max_seq_length_) +
                      " must be in [2, max_position_embeddings = " +
                      std::to_string(e.model_->config().max_position_embeddings) + "]");

  if (!pooling_folder.empty()) {
    const fs::path p = pooling_folder / "config.json";
    const Json j = read_json_file(p.string());
    const std::vector<std::pair<std::string, Pooling>> modes = {{"pooling_mode_mean_tokens", Pooling::Mean},
                                                                {"pooling_mode_cls_token", Pooling::Cls},
                                                                {"pooling_mode_max_tokens", Pooling::Max},
                                                                {"pooling_mode_mean_sqrt_len_tokens", Pooling::MeanSqrtLen}};
    int chosen = 0;
    for (const auto& [key, mode] : modes)
      if (json_get_or<bool>(j, key, false, p.string())) {
        e.pooling_ = mode;
        ++chosen;
      }
    for (const char* key : {"pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"})
      if (json_get_or<bool>(j, key, false, p.string()))
        throw ConfigError(p.string() + ": " + key + " is not supported (mean, cls, max, mean_sqrt_len)");
    if (chosen != 1)
      throw ConfigError(p.string() + ": exactly one pooling mode must be on (mean, cls, max or mean_sqrt_len), got " +
                        std::to_string(chosen));
    const auto width = json_get_or<int64_t>(j, "word_embedding_dimension", e.model_->config().hidden_size, p.string());
    if (width != e.model_->config().hidden_size)
      throw ConfigError(p.string() + ": word_embedding_dimension " + std::to_string(width) + " differs from the model's " +
                        std::to_string(e.model_->config().hidden_size));
  }
  return e;
}

namespace {
std::string strip(const std::string& s) {  // Python's str.strip() for the ASCII whitespace captions hold
  const char* ws = " \t\n\r\f\v";
  const size_t a = s.find_first_not_of(ws);
  if (a == std::string::npos) return "";
  return s.substr(a, s.find_last_not_of(ws) - a + 1);
}
}  // namespace

at::Tensor SentenceEncoder::encode(const std::vector<std::string>& texts, bool normalize, int64_t batch_size) const {
  std::vector<std::vector<int64_t>> ids;
  ids.reserve(texts.size());
  for (const auto& text : texts) {
    std::string t = strip(text);
    if (lower_case_input_) t = lowercase_utf8(t);
    ids.push_back(tokenizer_->encode(t, static_cast<size_t>(max_seq_length_)));
  }
  const Pooling pooling = pooling_;
  BertModel model = model_;
  const c10::Device device = model_->word_embeddings->weight.device();
  at::Tensor out = run_sorted_batches(ids, batch_size, model_->config().hidden_size, device, [&](const BertBatch& batch) {
    at::Tensor states = model->forward(batch.input_ids, batch.attention_mask);  // [B, T, H]
    at::Tensor mask = batch.attention_mask.unsqueeze(-1).to(states.scalar_type());
    switch (pooling) {
      case Pooling::Cls:
        return states.select(1, 0);
      case Pooling::Max:
        return states.masked_fill(mask == 0, -1e9).amax(1);
      case Pooling::MeanSqrtLen:
        return (states * mask).sum(1) / mask.sum(1).sqrt();
      case Pooling::Mean:
      default:
        return (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9);
    }
  });
  if (normalize || normalize_)
    out = torch::nn::functional::normalize(out, torch::nn::functional::NormalizeFuncOptions().p(2).dim(1));
  return out;
}

// ---------------------------------------------------------------------------------------
// fluency-error detector

FluencyErrorDetector FluencyErrorDetector::load(const std::string& checkpoint, const std::string& bert_folder) {
  const fs::path folder(bert_folder);
  if (!fs::is_directory(folder))
    throw FileError(bert_folder, "not a folder (the echecker's BERT: config.json and vocab.txt of its model_type, "
                                 "bert-base-uncased for the published checkpoints)");
  const fs::path config_path = folder / "config.json";
  if (!fs::exists(config_path)) throw FileError(config_path.string(), "missing (BERT config.json)");
  FluencyErrorDetector d;
  d.model_ = BertModel(BertConfig::from_file(config_path.string()));
  d.tokenizer_ = bert_tokenizer(folder);

  TensorMap all = load_weight_file(checkpoint);
  // fense's checkpoints nest the weights under "state_dict"; a bare state dict is taken as is.
  TensorMap weights = tensors_under(all, "state_dict.");
  if (weights.empty()) weights = all;
  TensorMap encoder = tensors_under(weights, "encoder.");
  TensorMap clf = tensors_under(weights, "clf.");
  for (const auto& [key, tensor] : weights)
    if (key.rfind("encoder.", 0) != 0 && key.rfind("clf.", 0) != 0)
      throw FileError(checkpoint, "tensor '" + key + "' is neither encoder.* nor clf.* (not a fense echecker checkpoint?)");
  if (encoder.empty() || !clf.count("weight") || !clf.count("bias"))
    throw FileError(checkpoint, "not a fense echecker checkpoint: expected encoder.* and clf.weight/clf.bias tensors");
  const at::Tensor& w = clf.at("weight");
  if (w.dim() != 2 || w.size(1) != d.model_->config().hidden_size)
    throw FileError(checkpoint, "clf.weight has shape " + shape_to_string(w.sizes().vec()) + ", expected [classes, " +
                                    std::to_string(d.model_->config().hidden_size) + "] for " + config_path.string());
  d.model_->load_weights(encoder, checkpoint);
  d.model_->freeze();
  d.clf_ = torch::nn::Linear(w.size(1), w.size(0));
  StrictLoadOptions options;
  options.source = checkpoint;
  load_state_strict(*d.clf_, clf, options);
  for (auto& p : d.clf_->parameters()) p.set_requires_grad(false);
  return d;
}

at::Tensor FluencyErrorDetector::probabilities(const std::vector<std::string>& texts, int64_t batch_size) const {
  std::vector<std::vector<int64_t>> ids;
  ids.reserve(texts.size());
  for (const auto& text : texts) ids.push_back(tokenizer_->encode(remove_non_word_lower(text), kMaxLength));
  BertModel model = model_;
  torch::nn::Linear clf = clf_;
  // fense pads every text to 64 tokens; padding is masked out of attention, so batches padded
  // to their own longest text give the same [CLS] state (within float rounding).
  const c10::Device device = model_->word_embeddings->weight.device();
  return run_sorted_batches(ids, batch_size, num_classes(), device, [&](const BertBatch& batch) {
    at::Tensor states = model->forward(batch.input_ids, batch.attention_mask);
    return at::sigmoid(clf(states.select(1, 0)));
  });
}

std::vector<double> FluencyErrorDetector::error_probability(const std::vector<std::string>& texts, int64_t batch_size) const {
  at::Tensor p = probabilities(texts, batch_size).select(1, num_classes() - 1).to(at::kDouble).contiguous();
  return std::vector<double>(p.data_ptr<double>(), p.data_ptr<double>() + p.numel());
}

}  // namespace prefixcap
