#include "lm/gpt2.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <tuple>

#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/normalization.h>

#include "core/errors.h"
#include "core/weights.h"
#include "lm/short_attention.h"
#include "lm/skinny_matmul.h"

namespace prefixcap {

// ---------------------------------------------------------------------------------------
// config

Gpt2Config Gpt2Config::from_json(const Json& j, const std::string& where) {
  Gpt2Config c;
  c.vocab_size = json_get_or<int64_t>(j, "vocab_size", c.vocab_size, where);
  c.n_positions = json_get_or<int64_t>(j, "n_positions", c.n_positions, where);
  c.n_embd = json_get_or<int64_t>(j, "n_embd", c.n_embd, where);
  c.n_layer = json_get_or<int64_t>(j, "n_layer", c.n_layer, where);
  c.n_head = json_get_or<int64_t>(j, "n_head", c.n_head, where);
  c.n_inner = json_get_or<int64_t>(j, "n_inner", 0, where);
  c.layer_norm_epsilon = json_get_or<double>(j, "layer_norm_epsilon", c.layer_norm_epsilon, where);
  c.activation_function =
      json_get_or<std::string>(j, "activation_function", c.activation_function, where);
  c.bos_token_id = json_get_or<int64_t>(j, "bos_token_id", c.bos_token_id, where);
  c.eos_token_id = json_get_or<int64_t>(j, "eos_token_id", c.eos_token_id, where);
  c.tie_word_embeddings = json_get_or<bool>(j, "tie_word_embeddings", true, where);

  auto positive = [&](int64_t v, const char* key) {
    if (v <= 0) throw ConfigError(where + ": key '" + key + "' must be positive, got " + std::to_string(v));
  };
  positive(c.vocab_size, "vocab_size");
  positive(c.n_positions, "n_positions");
  positive(c.n_embd, "n_embd");
  positive(c.n_layer, "n_layer");
  positive(c.n_head, "n_head");
  if (c.n_embd % c.n_head != 0)
    throw ConfigError(where + ": n_embd (" + std::to_string(c.n_embd) +
                      ") is not a multiple of n_head (" + std::to_string(c.n_head) + ")");
  if (c.n_inner < 0) throw ConfigError(where + ": key 'n_inner' must not be negative");
  if (!(c.layer_norm_epsilon > 0)) throw ConfigError(where + ": key 'layer_norm_epsilon' must be positive");
  const std::vector<std::string> activations = {"gelu_new", "gelu_pytorch_tanh", "gelu", "relu"};
  if (std::find(activations.begin(), activations.end(), c.activation_function) == activations.end())
    throw ConfigError(where + ": activation_function '" + c.activation_function +
                      "' is not supported (gelu_new, gelu_pytorch_tanh, gelu, relu)");
  // Hugging Face options that change the arithmetic; refuse rather than silently differ.
  if (json_get_or<bool>(j, "scale_attn_by_inverse_layer_idx", false, where) ||
      json_get_or<bool>(j, "reorder_and_upcast_attn", false, where))
    throw ConfigError(where + ": scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported");
  if (!json_get_or<bool>(j, "scale_attn_weights", true, where))
    throw ConfigError(where + ": scale_attn_weights=false is not supported");
  return c;
}

Gpt2Config Gpt2Config::from_file(const std::string& path) {
  return from_json(read_json_file(path), path);
}

Json Gpt2Config::to_json() const {
  Json j;
  j["model_type"] = "gpt2";
  j["architectures"] = {"GPT2LMHeadModel"};
  j["vocab_size"] = vocab_size;
  j["n_positions"] = n_positions;
  j["n_ctx"] = n_positions;
  j["n_embd"] = n_embd;
  j["n_layer"] = n_layer;
  j["n_head"] = n_head;
  j["n_inner"] = n_inner > 0 ? Json(n_inner) : Json(nullptr);
  j["layer_norm_epsilon"] = layer_norm_epsilon;
  j["activation_function"] = activation_function;
  j["bos_token_id"] = bos_token_id;
  j["eos_token_id"] = eos_token_id;
  j["tie_word_embeddings"] = tie_word_embeddings;
  return j;
}

// ---------------------------------------------------------------------------------------
// KV cache

namespace {

// Whether `past` is the first past.size(2) positions of `storage` (see LayerKv).
bool views_storage(const at::Tensor& past, const at::Tensor& storage) {
  return storage.defined() && past.defined() && past.data_ptr() == storage.data_ptr() &&
         past.strides() == storage.strides() && past.size(0) == storage.size(0) && past.size(1) == storage.size(1) &&
         past.size(3) == storage.size(3) && past.size(2) <= storage.size(2);
}

// Rows `index` of a key or value tensor; when it views its storage, the storage's rows (one
// copy, the room to grow kept) instead of the view's (a copy now and another at the next append).
void select_kv_rows(at::Tensor& kv, at::Tensor& storage, const at::Tensor& index) {
  if (views_storage(kv, storage)) {
    storage = storage.index_select(0, index);
    kv = storage.narrow(2, 0, kv.size(2));
  } else {
    kv = kv.index_select(0, index);
    storage = at::Tensor();
  }
}

}  // namespace

void KvCache::materialize_rows() {
  if (!row_index.defined()) return;
  for (auto& layer : layers) {
    for (auto* kv : {&layer.key, &layer.value}) {
      const auto sizes = kv->sizes();  // [B, H, S, D]
      const at::Tensor index = row_index.view({sizes[0], 1, sizes[2], 1}).expand(sizes);
      *kv = kv->gather(0, index);
    }
    layer.key_storage = layer.value_storage = at::Tensor();
  }
  row_index = at::Tensor();
}

void KvCache::select_rows(const at::Tensor& index) {
  const int64_t B = batch_size(), N = index.size(0);
  const bool in_place = !layers.empty() && N >= B &&
                        std::all_of(layers.begin(), layers.end(), [](const LayerKv& l) {
                          return views_storage(l.key, l.key_storage) && views_storage(l.value, l.value_storage);
                        });
  if (in_place) {
    if (!row_index.defined()) row_index = at::arange(B, index.options()).unsqueeze(1).expand({B, length()});
    row_index = row_index.index_select(0, index);
    if (N > B) {
      // An expansion (a prompt's rows to its beams): the rows stay where they are, in storage
      // with room for N (row b writes sequence b's next positions), and the beams read the
      // prompt's keys from them, once per prompt rather than once per beam.
      for (auto& layer : layers)
        for (auto [kv, storage] : {std::pair{&layer.key, &layer.key_storage}, {&layer.value, &layer.value_storage}}) {
          auto sizes = storage->sizes().vec();
          sizes[0] = N;
          at::Tensor grown = at::empty(sizes, storage->options());
          grown.narrow(0, 0, B).copy_(*storage);
          *storage = grown;
          *kv = grown.narrow(2, 0, kv->size(2));
        }
    }
  } else {
    materialize_rows();
    for (auto& layer : layers) {
      select_kv_rows(layer.key, layer.key_storage, index);
      select_kv_rows(layer.value, layer.value_storage, index);
    }
  }
  if (key_mask.defined()) key_mask = key_mask.index_select(0, index);
}

KvCache make_kv_prefix_cache(const std::vector<LayerKv>& past, KvPrefixPositions positions) {
  KvCache cache;
  if (past.empty()) throw std::invalid_argument("key/value prefix has no layers");
  for (const auto& layer : past) {
    if (layer.key.dim() != 4 || layer.key.sizes() != layer.value.sizes())
      throw std::invalid_argument("key/value prefix: expected keys and values [B, n_head, P, head_dim], got " +
                                  shape_to_string(layer.key.sizes().vec()) + " and " +
                                  shape_to_string(layer.value.sizes().vec()));
    if (layer.key.sizes() != past[0].key.sizes())
      throw std::invalid_argument("key/value prefix: layers differ in shape");
  }
  cache.layers = past;
  cache.next_position = positions == KvPrefixPositions::AfterPrefix ? past[0].key.size(2) : 0;
  return cache;
}

std::vector<LayerKv> kv_prefix_from_prompt_embeddings(const at::Tensor& prompt_embeddings,
                                                      const Gpt2Config& config, int64_t batch) {
  const int64_t width = config.n_layer * 2 * config.n_embd;
  if (prompt_embeddings.dim() != 2 || prompt_embeddings.size(1) != width)
    throw std::invalid_argument("prompt_embeddings: expected [P, " + std::to_string(width) + "], got " +
                                shape_to_string(prompt_embeddings.sizes().vec()));
  const int64_t P = prompt_embeddings.size(0);
  // ref: peft/peft_model.py get_prompt: view(B, P, 2L, H, D).permute(2, 0, 3, 1, 4).split(2)
  at::Tensor x = prompt_embeddings.unsqueeze(0).expand({batch, P, width})
                     .reshape({batch, P, 2 * config.n_layer, config.n_head, config.head_dim()})
                     .permute({2, 0, 3, 1, 4});  // [2L, B, H, P, D]
  std::vector<LayerKv> out;
  for (int64_t l = 0; l < config.n_layer; ++l)
    out.push_back({x[2 * l].contiguous(), x[2 * l + 1].contiguous()});
  return out;
}

// ---------------------------------------------------------------------------------------
// modules

Conv1DImpl::Conv1DImpl(int64_t in_features, int64_t out_features) {
  weight = register_parameter("weight", at::empty({out_features, in_features}).normal_(0, 0.02));
  bias = register_parameter("bias", at::zeros({out_features}));
}

at::Tensor Conv1DImpl::forward(const at::Tensor& x) {
  auto out_shape = x.sizes().vec();
  out_shape.back() = packed.defined() ? packed.rows() : weight.size(0);
  at::Tensor rows = x.reshape({-1, x.size(-1)});
  if (packed.defined()) return packed_linear(rows, packed, bias).view(out_shape);
  if (skinny_applicable(rows, weight)) return skinny_matmul_nk(rows, weight, bias).view(out_shape);  // decoding
  return at::linear(rows, weight, bias).view(out_shape);
}

namespace {

// past [B, H, S, D] followed by new_kv [B, H, T, D] along dim 2. Inference writes into `storage`
// (room for 16 more positions each time it grows) instead of copying the whole past each step;
// with gradients, a plain cat.
// New storage holding `past` [B, H, S, D] with room for `T` more positions and 16 after them.
at::Tensor grown_storage(const at::Tensor& past, int64_t T, const at::TensorOptions& options) {
  const int64_t S = past.size(2);
  at::Tensor grown = at::empty({past.size(0), past.size(1), S + T + 16, past.size(3)}, options);
  grown.narrow(2, 0, S).copy_(past);
  return grown;
}

at::Tensor append_kv(const at::Tensor& past, at::Tensor& storage, const at::Tensor& new_kv) {
  if (c10::GradMode::is_enabled() && (past.requires_grad() || new_kv.requires_grad()))
    return at::cat({past, new_kv}, 2);
  const int64_t S = past.size(2), T = new_kv.size(2);
  if (!views_storage(past, storage) || storage.scalar_type() != new_kv.scalar_type() || storage.size(2) < S + T)
    storage = grown_storage(past, T, new_kv.options());
  storage.narrow(2, S, T).copy_(new_kv);
  return storage.narrow(2, 0, S + T);
}

// LayerNorm over the last dimension, for the few rows of a decode step: one pass per row
// instead of LibTorch's general kernel (whose fixed cost dominates at this size). Float32, no
// autograd; mean and variance accumulated in double.
bool few_rows_layer_norm_applicable(const at::Tensor& x, const torch::nn::LayerNorm& ln) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() &&
         x.numel() / x.size(-1) <= kMaxPackedFusedRows && ln->weight.defined() &&
         ln->weight.scalar_type() == at::kFloat && !(c10::GradMode::is_enabled() && (x.requires_grad() || ln->weight.requires_grad()));
}

// y = LayerNorm(x) over `rows` rows of C floats (weight g, bias b).
void layer_norm_rows(const float* xp, const float* g, const float* b, double eps, float* yp, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * C;
    double sum = 0, sq = 0;
    for (int64_t c = 0; c < C; ++c) sum += xr[c];
    const double mean = sum / double(C);
    for (int64_t c = 0; c < C; ++c) sq += (xr[c] - mean) * (xr[c] - mean);
    const float m = static_cast<float>(mean), inv = static_cast<float>(1.0 / std::sqrt(sq / double(C) + eps));
    float* yr = yp + r * C;
    for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - m) * inv * g[c] + b[c];
  }
}

at::Tensor few_rows_layer_norm(const at::Tensor& x, const torch::nn::LayerNorm& ln) {
  const int64_t C = x.size(-1), rows = x.numel() / C;
  at::Tensor y = at::empty_like(x);
  layer_norm_rows(x.data_ptr<float>(), ln->weight.data_ptr<float>(), ln->bias.data_ptr<float>(), ln->options.eps(),
                  y.data_ptr<float>(), rows, C);
  return y;
}

at::Tensor layer_norm(torch::nn::LayerNorm ln, const at::Tensor& x) {
  return few_rows_layer_norm_applicable(x, ln) ? few_rows_layer_norm(x, ln) : ln(x);
}

}  // namespace

Gpt2AttentionImpl::Gpt2AttentionImpl(const Gpt2Config& config)
    : n_head_(config.n_head), head_dim_(config.head_dim()) {
  c_attn = register_module("c_attn", Conv1D(config.n_embd, 3 * config.n_embd));
  c_proj = register_module("c_proj", Conv1D(config.n_embd, config.n_embd));
}

at::Tensor Gpt2AttentionImpl::forward(const at::Tensor& x, LayerKv* cache, const at::Tensor& attn_bias,
                                      const at::Tensor& row_index) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  auto heads = [&](const at::Tensor& t) {  // [B, T, C] -> [B, H, T, D]
    return t.view({B, T, n_head_, head_dim_}).transpose(1, 2);
  };
  auto qkv = c_attn(x).split(C, /*dim=*/2);
  at::Tensor q = heads(qkv[0]), k = heads(qkv[1]), v = heads(qkv[2]);
  if (cache) {
    if (cache->key.defined()) {
      k = append_kv(cache->key, cache->key_storage, k);
      v = append_kv(cache->value, cache->value_storage, v);
    }
    cache->key = k;
    cache->value = v;
  }
  const double scale = 1.0 / std::sqrt(double(head_dim_));
  if (T == 1 && decode_attention_applicable(q, k, v))  // decoding
    return c_proj(decode_attention(q, k, v, attn_bias, scale, row_index).reshape({B, 1, C}));
  TORCH_CHECK(!row_index.defined(), "GPT-2 attention: a reordered KV cache (row_index) is for float32 decoding only");
  if (T == 1) {
    // One query per sequence (decoding): broadcast multiply + reduce. LibTorch's CPU bmm
    // loops over the B*H tiny products one by one and cost more than the weights here.
    at::Tensor scores = (q * k).sum(-1).mul_(scale);  // [B, H, S]
    if (attn_bias.defined()) scores = scores + attn_bias.squeeze(2);
    at::Tensor probs = at::softmax(scores, -1);
    at::Tensor y = (probs.unsqueeze(-1) * v).sum(2);   // [B, H, D]
    return c_proj(y.reshape({B, 1, C}));
  }
  // Training (gradients wanted): one pass per (batch, head) instead of B*H tiny BLAS calls each
  // way. Inference keeps the matmul path below.
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad()) &&
      short_attention_applicable(q, k))
    return c_proj(short_attention(q, k, v, attn_bias, scale).transpose(1, 2).reshape({B, T, C}));
  // [B, H, T, S]
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)).mul_(scale);
  if (attn_bias.defined()) scores = scores + attn_bias;
  at::Tensor probs = at::softmax(scores, -1);
  at::Tensor y = at::matmul(probs, v).transpose(1, 2).reshape({B, T, C});
  return c_proj(y);
}

Gpt2MlpImpl::Gpt2MlpImpl(const Gpt2Config& config) : activation_(config.activation_function) {
  c_fc = register_module("c_fc", Conv1D(config.n_embd, config.mlp_width()));
  c_proj = register_module("c_proj", Conv1D(config.mlp_width(), config.n_embd));
}

at::Tensor Gpt2MlpImpl::forward(const at::Tensor& x) {
  at::Tensor hidden = c_fc(x);
  if (activation_ == "gelu_new" || activation_ == "gelu_pytorch_tanh")
    hidden = gelu_tanh(hidden);
  else if (activation_ == "gelu")
    hidden = at::gelu(hidden);
  else
    hidden = at::relu(hidden);
  return c_proj(hidden);
}

Gpt2BlockImpl::Gpt2BlockImpl(const Gpt2Config& config) {
  auto ln = [&] {
    return torch::nn::LayerNorm(
        torch::nn::LayerNormOptions({config.n_embd}).eps(config.layer_norm_epsilon));
  };
  ln_1 = register_module("ln_1", ln());
  attn = register_module("attn", Gpt2Attention(config));
  ln_2 = register_module("ln_2", ln());
  mlp = register_module("mlp", Gpt2Mlp(config));
}

at::Tensor Gpt2BlockImpl::forward(const at::Tensor& x, LayerKv* cache, const at::Tensor& attn_bias,
                                  const at::Tensor& row_index) {
  at::Tensor h = x + attn->forward(layer_norm(ln_1, x), cache, attn_bias, row_index);
  return h + mlp(layer_norm(ln_2, h));
}

Gpt2ModelImpl::Gpt2ModelImpl(const Gpt2Config& config) : config_(config) {
  wte = register_module("wte", torch::nn::Embedding(config.vocab_size, config.n_embd));
  wpe = register_module("wpe", torch::nn::Embedding(config.n_positions, config.n_embd));
  h = register_module("h", torch::nn::ModuleList());
  for (int64_t i = 0; i < config.n_layer; ++i) {
    blocks_.push_back(Gpt2Block(config));
    h->push_back(blocks_.back());
  }
  ln_f = register_module(
      "ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.n_embd}).eps(config.layer_norm_epsilon)));
  if (!config.tie_word_embeddings)
    lm_head = register_module(
        "lm_head", torch::nn::Linear(torch::nn::LinearOptions(config.n_embd, config.vocab_size).bias(false)));
}

at::Tensor Gpt2ModelImpl::embed_tokens(const at::Tensor& input_ids) {
  if (wte_packed_.defined()) return wte_packed_.lookup_rows(input_ids);
  return wte(input_ids);
}

at::Tensor Gpt2ModelImpl::head(const at::Tensor& hidden) {
  if (head_packed_.defined()) {
    auto shape = hidden.sizes().vec();
    shape.back() = head_packed_.rows();
    return packed_linear(hidden.reshape({-1, hidden.size(-1)}), head_packed_).view(shape);
  }
  const at::Tensor& w = lm_head ? lm_head->weight : wte->weight;  // [V, C]
  if (skinny_applicable(hidden, w)) return skinny_matmul_nk(hidden, w);  // decoding
  return at::matmul(hidden, w.t());
}

Gpt2Output Gpt2ModelImpl::forward(const Gpt2Input& input) {
  if (fused_decode_applicable(input)) return fused_decode_step(input);
  // Input vectors: prefix embeddings, then token embeddings. [B, N, C]
  std::vector<at::Tensor> parts;
  if (input.prefix_embeds.defined()) {
    TORCH_CHECK(input.prefix_embeds.dim() == 3 && input.prefix_embeds.size(2) == config_.n_embd,
                "prefix_embeds: expected [B, P, ", config_.n_embd, "], got ", input.prefix_embeds.sizes());
    parts.push_back(input.prefix_embeds.to(wte->weight.scalar_type()));  // a bfloat16 model computes in bfloat16
  }
  if (input.input_ids.defined()) {
    TORCH_CHECK(input.input_ids.dim() == 2, "input_ids: expected [B, T], got ", input.input_ids.sizes());
    if (input.input_ids.numel() > 0) {
      auto lo = input.input_ids.min().item<int64_t>(), hi = input.input_ids.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < config_.vocab_size, "input_ids: token id out of range [0, ",
                  config_.vocab_size, "): got ", lo < 0 ? lo : hi);
    }
    at::Tensor tok = embed_tokens(input.input_ids);
    if (!parts.empty()) tok = tok.to(parts[0].dtype());
    parts.push_back(tok);
  }
  TORCH_CHECK(!parts.empty(), "GPT-2 forward needs input_ids or prefix_embeds");
  if (parts.size() == 2)
    TORCH_CHECK(parts[0].size(0) == parts[1].size(0), "prefix_embeds and input_ids differ in batch size: ",
                parts[0].size(0), " vs ", parts[1].size(0));
  at::Tensor x = parts.size() == 1 ? parts[0] : at::cat(parts, 1);
  const int64_t B = x.size(0), N = x.size(1);

  KvCache* cache = input.cache;
  const int64_t past = cache ? cache->length() : 0;
  if (cache && past > 0)
    TORCH_CHECK(cache->batch_size() == B, "KV cache holds batch ", cache->batch_size(), ", input has ", B);
  if (cache && cache->layers.empty()) cache->layers.resize(config_.n_layer);
  TORCH_CHECK(!cache || static_cast<int64_t>(cache->layers.size()) == config_.n_layer,
              "KV cache has ", cache ? cache->layers.size() : 0, " layers, the model ", config_.n_layer);

  // Positions.
  at::Tensor position_ids = input.position_ids;
  const int64_t first_position = cache ? cache->next_position : 0;
  if (!position_ids.defined()) {
    position_ids = at::arange(first_position, first_position + N, at::TensorOptions().dtype(at::kLong).device(x.device()))
                       .unsqueeze(0);
  } else {
    TORCH_CHECK(position_ids.dim() == 2 && position_ids.size(1) == N, "position_ids: expected [B, ", N,
                "], got ", position_ids.sizes());
  }
  if (N > 0) {
    int64_t max_pos = position_ids.max().item<int64_t>();
    TORCH_CHECK(max_pos < config_.n_positions && position_ids.min().item<int64_t>() >= 0,
                "sequence too long: position ", max_pos, " >= n_positions ", config_.n_positions);
  }
  x = x + wpe(position_ids).to(x.dtype());

  // Key mask over all keys (cached + new): [B, past + N] bool, or undefined if all real.
  at::Tensor key_mask;
  bool any_padding = false;
  if (input.attention_mask.defined()) {
    TORCH_CHECK(input.attention_mask.dim() == 2 && input.attention_mask.size(0) == B &&
                    input.attention_mask.size(1) == N,
                "attention_mask: expected [", B, ", ", N, "], got ", input.attention_mask.sizes());
    at::Tensor new_mask = input.attention_mask.to(at::kBool);
    any_padding = !new_mask.all().item<bool>();
    if (any_padding || (cache && cache->key_mask.defined())) {
      at::Tensor old_mask = (cache && cache->key_mask.defined())
                                ? cache->key_mask
                                : at::ones({B, past}, new_mask.options());
      key_mask = at::cat({old_mask, new_mask}, 1);
    }
  } else if (cache && cache->key_mask.defined()) {
    key_mask = at::cat({cache->key_mask, at::ones({B, N}, cache->key_mask.options())}, 1);
  }
  if (cache) cache->key_mask = key_mask;

  // Additive attention bias [B or 1, 1, N, past + N]: causal among new inputs, masked keys out.
  at::Tensor attn_bias;
  if (N > 1 || key_mask.defined()) {
    auto opts = at::TensorOptions().dtype(at::kBool).device(x.device());
    at::Tensor allowed = at::ones({N, past + N}, opts).tril(past).unsqueeze(0);  // [1, N, S]
    if (key_mask.defined()) allowed = allowed & key_mask.unsqueeze(1);         // [B, N, S]
    // The dtype's most negative finite value (Hugging Face's finfo(dtype).min).
    const double lowest = x.scalar_type() == at::kDouble     ? std::numeric_limits<double>::lowest()
                          : x.scalar_type() == at::kBFloat16 ? -3.3895313892515355e38  // bfloat16 0xFF7F
                          : x.scalar_type() == at::kHalf     ? -65504.0
                                                             : double(std::numeric_limits<float>::lowest());
    attn_bias = at::zeros(allowed.sizes(), x.options()).masked_fill_(allowed.logical_not(), lowest).unsqueeze(1);
  }

  // A cache reordered by row_index: one decoded position per sequence extends it (each row's
  // new key/value goes to that row); anything else moves the sequences into their rows first.
  if (cache && cache->row_index.defined()) {
    const bool decoding = N == 1 && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                          !(at::GradMode::is_enabled() && x.requires_grad());
    if (decoding)
      cache->row_index = at::cat({cache->row_index, at::arange(B, cache->row_index.options()).unsqueeze(1)}, 1);
    else
      cache->materialize_rows();
  }
  const at::Tensor row_index = cache ? cache->row_index : at::Tensor();

  Gpt2Output out;
  if (input.output_hidden_states) out.hidden_states.push_back(x);
  for (int64_t i = 0; i < config_.n_layer; ++i) {
    x = blocks_[i]->forward(x, cache ? &cache->layers[i] : nullptr, attn_bias, row_index);
    if (input.output_hidden_states) out.hidden_states.push_back(x);
  }
  if (cache) cache->next_position = first_position + N;
  x = layer_norm(ln_f, x);
  out.last_hidden_state = x;
  if (input.logits == LogitsMode::All) out.logits = head(x);
  else if (input.logits == LogitsMode::Last) out.logits = head(x.select(1, N - 1));
  if (input.logits == LogitsMode::Last && input.top_k > 0)
    std::tie(out.top_values, out.top_ids, out.logsumexp) = topk_logsumexp(out.logits.to(at::kFloat), input.top_k);
  return out;
}

// ---------------------------------------------------------------------------------------
// The fused decode step: one token per sequence after a KV cache, on the CPU, without
// gradients. The same arithmetic as forward() above (the same kernels: packed_linear's and
// skinny_matmul_nk's products, decode_attention's heads, the few-row LayerNorm, gelu_tanh's
// kernel) on raw buffers, so that a step costs 5 parallel kernels per block and no tensor
// operations between them: forward() spends ~25 LibTorch calls per block on views, splits,
// cache writes and residual sums, about 2 ms a step for GPT-2 124M, a quarter of an int8 step.

namespace {

bool float_cpu_contiguous(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
}

bool conv_ready(const Conv1DImpl& c) {
  return (c.packed.defined() || float_cpu_contiguous(c.weight)) && float_cpu_contiguous(c.bias);
}

bool layer_norm_ready(const torch::nn::LayerNorm& ln) {
  return float_cpu_contiguous(ln->weight) && float_cpu_contiguous(ln->bias);
}

WeightRows conv_rows(const Conv1DImpl& c) { return c.packed.defined() ? weight_rows(c.packed) : weight_rows(c.weight); }

// A cache layer the step can append to in place: key/value view float32 CPU storage.
bool kv_ready(const LayerKv& l, int64_t B, int64_t S) {
  auto ready = [&](const at::Tensor& kv, const at::Tensor& storage) {
    return views_storage(kv, storage) && float_cpu_contiguous(storage) && kv.size(0) == B && kv.size(2) == S;
  };
  return ready(l.key, l.key_storage) && ready(l.value, l.value_storage);
}

// x += y over n floats, split over the threads when there are many (batches of clips x beams).
void add_residual(float* x, const float* y, int64_t n) {
  at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
    for (int64_t j = i0; j < i1; ++j) x[j] = x[j] + y[j];
  });
}

// Room in `storage` for position `S` (append_kv's growth).
void ensure_room(const at::Tensor& past, at::Tensor& storage, int64_t S) {
  if (storage.size(2) <= S) storage = grown_storage(past, 1, storage.options());
}

}  // namespace

bool Gpt2ModelImpl::fused_decode_applicable(const Gpt2Input& in) const {
  if (!fused_decoding_ || !in.cache || in.prefix_embeds.defined() || in.attention_mask.defined() ||
      in.position_ids.defined() || in.output_hidden_states || at::GradMode::is_enabled())
    return false;
  const at::Tensor& ids = in.input_ids;
  if (!ids.defined() || ids.dim() != 2 || ids.size(1) != 1 || ids.scalar_type() != at::kLong || !ids.device().is_cpu())
    return false;
  const int64_t B = ids.size(0);
  if (B < 1 || B > fused_rows_limit(weight_dtype_)) return false;
  const KvCache& cache = *in.cache;
  const int64_t S = cache.length();
  if (static_cast<int64_t>(cache.layers.size()) != config_.n_layer || S == 0 || cache.key_mask.defined() ||
      cache.next_position < 0 || cache.next_position >= config_.n_positions)
    return false;
  if (cache.row_index.defined() &&
      !(cache.row_index.dim() == 2 && cache.row_index.size(0) == B && cache.row_index.size(1) == S &&
        cache.row_index.scalar_type() == at::kLong && cache.row_index.device().is_cpu()))
    return false;
  // Token ids out of range: forward() reports them.
  const at::Tensor flat = ids.contiguous();
  const int64_t* id = flat.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    if (id[b] < 0 || id[b] >= config_.vocab_size) return false;
  if (!(wte_packed_.defined() || float_cpu_contiguous(wte->weight)) || !float_cpu_contiguous(wpe->weight) ||
      !layer_norm_ready(ln_f))
    return false;
  if (!head_packed_.defined() && !float_cpu_contiguous(lm_head ? lm_head->weight : wte->weight)) return false;
  for (int64_t i = 0; i < config_.n_layer; ++i) {
    const Gpt2BlockImpl& block = *blocks_[i];
    if (!layer_norm_ready(block.ln_1) || !layer_norm_ready(block.ln_2) || !conv_ready(*block.attn->c_attn) ||
        !conv_ready(*block.attn->c_proj) || !conv_ready(*block.mlp->c_fc) || !conv_ready(*block.mlp->c_proj) ||
        !kv_ready(cache.layers[i], B, S))
      return false;
  }
  return true;
}

Gpt2Output Gpt2ModelImpl::fused_decode_step(const Gpt2Input& in) {
  KvCache& cache = *in.cache;
  const int64_t B = in.input_ids.size(0), C = config_.n_embd, H = config_.n_head, D = config_.head_dim();
  const int64_t F = config_.mlp_width(), V = config_.vocab_size, S = cache.length(), position = cache.next_position;
  const at::Tensor ids = in.input_ids.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  if (cache.row_index.defined())  // as forward(): the new position of sequence b is written by row b
    cache.row_index = at::cat({cache.row_index, at::arange(B, cache.row_index.options()).unsqueeze(1)}, 1).contiguous();
  const int64_t* row_index = cache.row_index.defined() ? cache.row_index.data_ptr<int64_t>() : nullptr;

  // Working rows, kept by the calling thread from step to step (a batch of clips x beams needs
  // megabytes; allocated afresh each step, they were page faults every step). Each is written
  // before it is read. (Local references: lambdas on worker threads must see these, not their own.)
  thread_local std::vector<float> buffers[6];
  std::vector<float>&x = buffers[0], &a = buffers[1], &qkv = buffers[2], &att = buffers[3], &out = buffers[4],
                     &hidden = buffers[5];
  x.resize(B * C);
  a.resize(B * C);
  qkv.resize(B * 3 * C);
  att.resize(B * C);
  out.resize(B * C);
  hidden.resize(B * F);
  // Token embedding + position embedding.
  const WeightRows embedding = wte_packed_.defined() ? weight_rows(wte_packed_) : weight_rows(wte->weight);
  const float* wpe_row = wpe->weight.data_ptr<float>() + position * C;
  for (int64_t b = 0; b < B; ++b) {
    float* xb = x.data() + b * C;
    weight_row(embedding, id[b], xb);
    for (int64_t c = 0; c < C; ++c) xb[c] = xb[c] + wpe_row[c];
  }
  auto norm = [&](const torch::nn::LayerNorm& ln, const float* src, float* dst) {
    // rows split over the threads in batches of clips x beams (int8-dynamic: hundreds of rows)
    at::parallel_for(0, B, 16, [&](int64_t r0, int64_t r1) {
      layer_norm_rows(src + r0 * C, ln->weight.data_ptr<float>(), ln->bias.data_ptr<float>(), ln->options.eps(),
                      dst + r0 * C, r1 - r0, C);
    });
  };
  const std::string& activation = config_.activation_function;
  const bool tanh_gelu = activation == "gelu_new" || activation == "gelu_pytorch_tanh", erf_gelu = activation == "gelu";
  const std::function<void(int64_t, int64_t)> activate = [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < B; ++m) {
      float* h = hidden.data() + m * F;
      if (tanh_gelu) {
        gelu_tanh_in_place(h + n0, n1 - n0);
      } else if (erf_gelu) {
        for (int64_t n = n0; n < n1; ++n) h[n] = 0.5f * h[n] * (1.0f + std::erf(h[n] * float(M_SQRT1_2)));
      } else {
        for (int64_t n = n0; n < n1; ++n) h[n] = std::max(h[n], 0.0f);
      }
    }
  };
  const float scale = static_cast<float>(1.0 / std::sqrt(double(D)));
  for (int64_t i = 0; i < config_.n_layer; ++i) {
    Gpt2BlockImpl& block = *blocks_[i];
    const Conv1DImpl &c_attn = *block.attn->c_attn, &attn_proj = *block.attn->c_proj;
    const Conv1DImpl &c_fc = *block.mlp->c_fc, &mlp_proj = *block.mlp->c_proj;
    // Attention: LayerNorm, q/k/v, the new key and value into the cache, the heads, c_proj.
    norm(block.ln_1, x.data(), a.data());
    fused_rows_product(a.data(), conv_rows(c_attn), c_attn.bias.data_ptr<float>(), qkv.data(), B);
    LayerKv& layer = cache.layers[i];
    ensure_room(layer.key, layer.key_storage, S);
    ensure_room(layer.value, layer.value_storage, S);
    const int64_t room = layer.key_storage.size(2);
    float* keys = layer.key_storage.data_ptr<float>();
    float* values = layer.value_storage.data_ptr<float>();
    at::parallel_for(0, B, 32, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const float* k = qkv.data() + b * 3 * C + C + h * D;
          std::copy(k, k + D, keys + ((b * H + h) * room + S) * D);
          std::copy(k + C, k + C + D, values + ((b * H + h) * room + S) * D);
        }
    });
    layer.key = layer.key_storage.narrow(2, 0, S + 1);
    layer.value = layer.value_storage.narrow(2, 0, S + 1);
    DecodeAttentionArgs args;
    args.q = qkv.data();
    args.q_stride_b = 3 * C;
    args.q_stride_h = D;
    args.k = keys;
    args.v = values;
    args.k_stride_b = args.v_stride_b = H * room * D;
    args.k_stride_h = args.v_stride_h = room * D;
    args.k_stride_s = args.v_stride_s = D;
    args.row_index = row_index;
    args.B = B;
    args.H = H;
    args.S = S + 1;
    args.D = D;
    args.scale = scale;
    args.y = att.data();
    at::parallel_for(0, B * H, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      decode_attention_heads(args, begin, end, scratch);
    });
    fused_rows_product(att.data(), conv_rows(attn_proj), attn_proj.bias.data_ptr<float>(), out.data(), B);
    add_residual(x.data(), out.data(), B * C);
    // MLP: LayerNorm, c_fc with the activation on each block of outputs, c_proj.
    norm(block.ln_2, x.data(), a.data());
    fused_rows_product(a.data(), conv_rows(c_fc), c_fc.bias.data_ptr<float>(), hidden.data(), B, activate);
    fused_rows_product(hidden.data(), conv_rows(mlp_proj), mlp_proj.bias.data_ptr<float>(), out.data(), B);
    add_residual(x.data(), out.data(), B * C);
  }
  cache.next_position = position + 1;
  fused_steps_.fetch_add(1, std::memory_order_relaxed);

  Gpt2Output result;
  result.last_hidden_state = at::empty({B, 1, C}, wpe->weight.options());
  float* last = result.last_hidden_state.data_ptr<float>();
  norm(ln_f, x.data(), last);
  const WeightRows header = head_packed_.defined() ? weight_rows(head_packed_)
                                                   : weight_rows(lm_head ? lm_head->weight : wte->weight);
  if (in.logits == LogitsMode::Last && in.top_k > 0) {
    // the k best tokens and the normaliser without the [B, V] logits
    const int64_t k = in.top_k;  // (more than V: fused_rows_topk_logsumexp throws, as topk_logsumexp does)
    result.top_values = at::empty({B, k}, wpe->weight.options());
    result.top_ids = at::empty({B, k}, wpe->weight.options().dtype(at::kLong));
    result.logsumexp = at::empty({B, 1}, wpe->weight.options());
    fused_rows_topk_logsumexp(last, header, B, k, result.top_values.data_ptr<float>(),
                              result.top_ids.data_ptr<int64_t>(), result.logsumexp.data_ptr<float>());
  } else if (in.logits != LogitsMode::None) {
    at::Tensor logits = at::empty({B, V}, wpe->weight.options());
    fused_rows_product(last, header, nullptr, logits.data_ptr<float>(), B);
    result.logits = in.logits == LogitsMode::Last ? logits : logits.view({B, 1, V});
  }
  return result;
}

// The one mapping table between checkpoint names/layouts and ours:
//   transformer.X              -> X             (GPT2LMHeadModel saves under "transformer.")
//   lm_head.weight             -> ignored when tied (it equals wte.weight), kept otherwise
//   h.N.attn.bias, masked_bias -> ignored (causal-mask buffers, recomputed here)
//   h.N.{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}.weight: Conv1D [in, out] -> [out, in]
namespace {
const std::vector<std::string> kConv1dWeights = {"h.*.attn.c_attn.weight", "h.*.attn.c_proj.weight",
                                                 "h.*.mlp.c_fc.weight", "h.*.mlp.c_proj.weight"};
bool is_conv1d_weight(const std::string& name) {
  for (const auto& pattern : kConv1dWeights)
    if (glob_match(pattern, name)) return true;
  return false;
}
}  // namespace

void Gpt2ModelImpl::load_weights(const TensorMap& weights, const std::string& source) {
  TensorMap renamed;
  for (const auto& [key, tensor] : weights) {
    std::string name = key.rfind("transformer.", 0) == 0 ? key.substr(12) : key;
    if (renamed.count(name))
      throw FileError(source, "tensor '" + key + "' appears twice (with and without 'transformer.')");
    renamed[name] = tensor;
  }
  StrictLoadOptions options;
  options.source = source;
  options.ignorable = {"h.*.attn.bias", "h.*.attn.masked_bias"};
  if (config_.tie_word_embeddings) options.ignorable.push_back("lm_head.weight");
  options.transposed = kConv1dWeights;
  load_state_strict(*this, renamed, options);
}

TensorMap Gpt2ModelImpl::hf_state_dict() const {
  if (weight_dtype_ != WeightDtype::Float32)
    throw std::logic_error(std::string("GPT-2: the weights are packed as ") + weight_dtype_name(weight_dtype_) +
                           " for inference and can no longer be saved");
  TensorMap out;
  for (const auto& item : named_parameters()) {
    at::Tensor t = item.value().detach();
    out[item.key()] = is_conv1d_weight(item.key()) ? t.t().contiguous() : t;
  }
  return out;
}

void Gpt2ModelImpl::freeze() {
  for (auto& p : parameters()) p.set_requires_grad(false);
  eval();
}

namespace {

// The four weight matrices of a block, which pack_weights packs.
std::vector<Conv1DImpl*> block_matrices(Gpt2Block block) {  // a holder: copied, not the module
  return {block->attn->c_attn.get(), block->attn->c_proj.get(), block->mlp->c_fc.get(), block->mlp->c_proj.get()};
}

}  // namespace

void Gpt2ModelImpl::pack_weights(WeightDtype dtype) {
  if (dtype == WeightDtype::Float32) return;
  if (weight_dtype_ != WeightDtype::Float32)
    throw std::logic_error(std::string("GPT-2: the weights are already packed as ") + weight_dtype_name(weight_dtype_));
  if (wte->weight.scalar_type() != at::kFloat || !wte->weight.device().is_cpu())
    throw std::invalid_argument(std::string("GPT-2: --lm-dtype ") + weight_dtype_name(dtype) +
                                " packs a float32 model on the CPU; this one is " +
                                c10::toString(wte->weight.scalar_type()) + " on " + wte->weight.device().str());
  torch::NoGradGuard no_grad;
  auto pack = [&](at::Tensor& weight) {
    PackedWeight p = pack_weight(weight, dtype);
    weight.set_data(at::empty({0}, weight.options()));  // the float32 copy is released
    return p;
  };
  for (const auto& block : blocks_)
    for (Conv1DImpl* conv : block_matrices(block)) conv->packed = pack(conv->weight);
  wte_packed_ = pack(wte->weight);
  head_packed_ = lm_head ? pack(lm_head->weight) : wte_packed_;
  weight_dtype_ = dtype;
}

double Gpt2ModelImpl::decode_weight_bytes() const {
  double bytes = 0;
  for (const auto& item : named_parameters()) {
    if (item.key() == "wpe.weight") continue;
    bytes += double(item.value().numel()) * item.value().element_size();
  }
  for (const auto& block : blocks_)
    for (const Conv1DImpl* conv : block_matrices(block)) bytes += double(conv->packed.bytes());
  bytes += double(wte_packed_.bytes());
  if (lm_head) bytes += double(head_packed_.bytes());
  return bytes + double(config_.n_embd) * 4;  // one row of wpe
}

Gpt2Model load_gpt2(const std::string& path) {
  namespace fs = std::filesystem;
  fs::path folder = fs::is_directory(path) ? fs::path(path) : fs::path(path).parent_path();
  fs::path config_path = folder / "config.json";
  if (!fs::exists(config_path)) throw FileError(config_path.string(), "missing (GPT-2 config.json)");
  Gpt2Config config = Gpt2Config::from_file(config_path.string());
  fs::path weights_path;
  if (fs::is_directory(path)) {
    for (const char* name : {"model.safetensors", "pytorch_model.bin"})
      if (fs::exists(folder / name)) {
        weights_path = folder / name;
        break;
      }
    if (weights_path.empty())
      throw FileError(path, "no model.safetensors or pytorch_model.bin in the GPT-2 folder");
  } else {
    weights_path = path;
  }
  Gpt2Model model(config);
  model->load_weights(load_weight_file(weights_path.string()), weights_path.string());
  model->freeze();
  return model;
}

void Gpt2ModelImpl::init_weights() {
  torch::NoGradGuard no_grad;
  const double std_proj = 0.02 / std::sqrt(2.0 * static_cast<double>(config_.n_layer));
  auto ends_with = [](const std::string& s, const std::string& tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
  };
  for (auto& p : named_parameters()) {
    const std::string& k = p.key();
    at::Tensor v = p.value();
    if (k.find("ln_") != std::string::npos) v.fill_(ends_with(k, "weight") ? 1.0 : 0.0);
    else if (ends_with(k, "bias")) v.zero_();
    else if (ends_with(k, "c_proj.weight")) v.normal_(0, std_proj);
    else v.normal_(0, 0.02);
  }
}

}  // namespace prefixcap
