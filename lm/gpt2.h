// GPT-2 (Hugging Face GPT2LMHeadModel semantics) with prefix embeddings, deep key/value
// prefixes, padded-batch attention masks and a KV cache. Module names equal Hugging Face's
// checkpoint keys (wte, wpe, h.N.attn.c_attn, ...), so named_parameters() are the keys.
// ref: karpathy/nanoGPT model.py (3adf61e); huggingface/transformers modeling_gpt2.py.
#pragma once

#include <atomic>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include "core/json_config.h"
#include "core/tensor_map.h"
#include "lm/skinny_matmul.h"

namespace prefixcap {

struct Gpt2Config {
  int64_t vocab_size = 50257;          // tokens in the vocabulary
  int64_t n_positions = 1024;          // longest sequence (prefix + tokens)
  int64_t n_embd = 768;                // hidden width
  int64_t n_layer = 12;                // transformer blocks
  int64_t n_head = 12;                 // attention heads
  int64_t n_inner = 0;                 // MLP width; 0 = 4 * n_embd
  double layer_norm_epsilon = 1e-5;    // LayerNorm epsilon
  std::string activation_function = "gelu_new";  // gelu_new | gelu_pytorch_tanh | gelu | relu
  int64_t bos_token_id = 50256;        // <|endoftext|>
  int64_t eos_token_id = 50256;        // <|endoftext|>
  bool tie_word_embeddings = true;     // output head = wte (Hugging Face default)

  int64_t head_dim() const { return n_embd / n_head; }
  int64_t mlp_width() const { return n_inner > 0 ? n_inner : 4 * n_embd; }

  // From a Hugging Face config.json; checks every value it uses. `where` names the file.
  static Gpt2Config from_json(const Json& j, const std::string& where);
  static Gpt2Config from_file(const std::string& path);
  Json to_json() const;
};

// Keys and values of one layer in the per-head space after c_attn: [B, n_head, S, head_dim].
struct LayerKv {
  LayerKv() = default;
  LayerKv(at::Tensor k, at::Tensor v) : key(std::move(k)), value(std::move(v)) {}
  at::Tensor key;
  at::Tensor value;
  // Decoding appends in place: key/value are then views of these, which have room along dim 2
  // for the tokens to come (reallocated, larger, when full or when key no longer views them).
  // A copied cache shares them: decode from one copy only (select_rows gives a fresh one).
  at::Tensor key_storage, value_storage;
};

// Incremental-decoding state: every layer's keys/values so far, which of those keys are real
// (padding excluded), and the position id the next input gets.
struct KvCache {
  std::vector<LayerKv> layers;   // empty until the first forward (or a key/value prefix)
  at::Tensor key_mask;           // [B, S] bool, true = real key; undefined = all real
  int64_t next_position = 0;     // position id of the next input vector
  // Beam reordering without copying: sequence b's key/value at position s is in row
  // row_index[b, s] of the layers' tensors (each position is written once, by the row that
  // produced it, and never moved). [B, S] int64; undefined = row b holds sequence b.
  at::Tensor row_index;

  int64_t length() const { return layers.empty() ? 0 : layers[0].key.size(2); }
  int64_t batch_size() const { return layers.empty() ? 0 : layers[0].key.size(0); }
  // Keeps rows `index` (int64 [N]) in that order: beam reordering and expansion. On a cache
  // that decoding appends in place, a reordering (N = batch size) only updates row_index, and an
  // expansion (N > batch size) also gives the storage N rows, the old ones kept where they are
  // (so beams share their prompt's keys and values instead of copying them).
  void select_rows(const at::Tensor& index);
  // Moves every sequence's keys/values into its own row (row_index undefined afterwards).
  void materialize_rows();
};

// Where token positions start after a deep key/value prefix of length P.
enum class KvPrefixPositions {
  AfterPrefix,  // P, P+1, ... (Hugging Face past_key_values / PEFT prefix tuning; default)
  FromZero,     // 0, 1, ... (the prefix slots take no positions)
};

// A KV cache that starts with a deep key/value prefix (Li & Liang). `past` holds one LayerKv
// per layer, each [B, n_head, P, head_dim].
KvCache make_kv_prefix_cache(const std::vector<LayerKv>& past,
                             KvPrefixPositions positions = KvPrefixPositions::AfterPrefix);

// PEFT's saved `prompt_embeddings` [P, n_layer * 2 * n_embd] as per-layer keys/values for
// batch size `batch`: flat index ((2*l + kv) * n_head + h) * head_dim + d.
std::vector<LayerKv> kv_prefix_from_prompt_embeddings(const at::Tensor& prompt_embeddings,
                                                      const Gpt2Config& config, int64_t batch);

enum class LogitsMode { All, Last, None };

struct Gpt2Input {
  at::Tensor input_ids;       // [B, T] int64 token ids (optional if prefix_embeds given)
  at::Tensor prefix_embeds;   // [B, P, n_embd] vectors placed before the tokens (optional)
  at::Tensor attention_mask;  // [B, P + T] 1 = real, 0 = padding (optional); keys at 0 are
                              // excluded for every query (HF semantics); cached keys keep theirs
  at::Tensor position_ids;    // [B, P + T] (optional; default continues from the cache)
  KvCache* cache = nullptr;   // read and extended when given
  LogitsMode logits = LogitsMode::All;
  // LogitsMode::Last: also the top_k largest logits of each sequence with their ids and its
  // logsumexp (Gpt2Output::top_*). The fused decode step then computes only these (without the
  // [B, V] logits: fused_rows_topk_logsumexp, lm/skinny_matmul.h); other steps compute the logits
  // and take them with topk_logsumexp.
  int64_t top_k = 0;
  bool output_hidden_states = false;
};

struct Gpt2Output {
  at::Tensor logits;                       // [B, P+T, V], or [B, V] for LogitsMode::Last
                                           // (undefined when a fused step gave top_* instead)
  at::Tensor top_values, top_ids, logsumexp;  // Gpt2Input::top_k: [B, k], [B, k] int64, [B, 1]
  at::Tensor last_hidden_state;            // [B, P+T, n_embd] after ln_f
  std::vector<at::Tensor> hidden_states;   // embeddings + each block's output (if asked)
};

// GPT-2's Conv1D. Checkpoints store its weight [in, out] (x @ weight); it is held here
// transposed, [out, in] like nn.Linear, so that decoding can stream each output's weights
// contiguously. The loader's mapping table transposes (see gpt2_checkpoint_to_module).
class Conv1DImpl : public torch::nn::Module {
 public:
  Conv1DImpl(int64_t in_features, int64_t out_features);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;  // [out, in]; emptied once packed
  at::Tensor bias;    // [out]
  PackedWeight packed;  // set by Gpt2ModelImpl::pack_weights: the weight in a compact type
};
TORCH_MODULE(Conv1D);

class Gpt2AttentionImpl : public torch::nn::Module {
 public:
  explicit Gpt2AttentionImpl(const Gpt2Config& config);
  // x [B, T, C]; attn_bias broadcastable to [B, H, T, S] (additive) or undefined; row_index as
  // in KvCache (decoding only).
  at::Tensor forward(const at::Tensor& x, LayerKv* cache, const at::Tensor& attn_bias,
                     const at::Tensor& row_index = {});
  Conv1D c_attn{nullptr}, c_proj{nullptr};

 private:
  int64_t n_head_, head_dim_;
};
TORCH_MODULE(Gpt2Attention);

class Gpt2MlpImpl : public torch::nn::Module {
 public:
  explicit Gpt2MlpImpl(const Gpt2Config& config);
  at::Tensor forward(const at::Tensor& x);
  Conv1D c_fc{nullptr}, c_proj{nullptr};

 private:
  std::string activation_;
};
TORCH_MODULE(Gpt2Mlp);

class Gpt2BlockImpl : public torch::nn::Module {
 public:
  explicit Gpt2BlockImpl(const Gpt2Config& config);
  at::Tensor forward(const at::Tensor& x, LayerKv* cache, const at::Tensor& attn_bias,
                     const at::Tensor& row_index = {});
  torch::nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  Gpt2Attention attn{nullptr};
  Gpt2Mlp mlp{nullptr};
};
TORCH_MODULE(Gpt2Block);

class Gpt2ModelImpl : public torch::nn::Module {
 public:
  explicit Gpt2ModelImpl(const Gpt2Config& config);

  Gpt2Output forward(const Gpt2Input& input);
  // Token embeddings wte[ids]: [B, T] -> [B, T, n_embd].
  at::Tensor embed_tokens(const at::Tensor& input_ids);
  // ln_f output -> logits with the (tied or separate) output head.
  at::Tensor head(const at::Tensor& hidden);

  // Loads a state dict with any supported naming (see the mapping table in gpt2.cpp).
  void load_weights(const TensorMap& weights, const std::string& source);
  // The state dict in Hugging Face layout (keys without "transformer.", Conv1D [in, out]).
  TensorMap hf_state_dict() const;
  // No parameter requires grad; gradients still flow to prefix inputs.
  void freeze();
  // Inference in less memory (`--lm-dtype`): the four matrices of every block and the token
  // embedding / output head are kept as bfloat16, or int8 with one scale per output row (see
  // PackedWeight), and their float32 copies are released; activations, LayerNorms, biases and
  // position embeddings stay float32 (Int8Dynamic: the rows multiplied by those matrices are
  // quantised to int8 for each product). Float32 leaves the model as it is. CPU float32 models
  // only, once; afterwards the model cannot be saved, moved to another device or trained.
  void pack_weights(WeightDtype dtype);
  WeightDtype weight_dtype() const { return weight_dtype_; }
  // Bytes of weights a decode step reads (all but the position embeddings).
  double decode_weight_bytes() const;
  // GPT-2's initialisation for a model trained from scratch: weights N(0, 0.02), the residual
  // projections (c_proj) N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorms 1 / 0.
  void init_weights();

  const Gpt2Config& config() const { return config_; }
  // forward() of one token per sequence after a KV cache (decoding), float32 CPU, no gradients,
  // no padding mask, at most kMaxPackedFusedRows sequences (kMaxSkinnyRows unpacked) runs as one
  // fused step: the same arithmetic, without the ~25 tensor operations per block between the
  // kernels (gpt2.cpp). On by default; off: every step through the general path (tests, lm_bench).
  void set_fused_decoding(bool on) { fused_decoding_ = on; }
  bool fused_decoding() const { return fused_decoding_; }
  int64_t fused_steps_taken() const { return fused_steps_.load(); }  // how many forward() calls took it

  torch::nn::Embedding wte{nullptr}, wpe{nullptr};
  torch::nn::ModuleList h{nullptr};
  torch::nn::LayerNorm ln_f{nullptr};
  torch::nn::Linear lm_head{nullptr};  // only when untied: weight [V, n_embd], no bias

 private:
  Gpt2Config config_;
  std::vector<Gpt2Block> blocks_;
  WeightDtype weight_dtype_ = WeightDtype::Float32;
  PackedWeight wte_packed_, head_packed_;  // the same tensors when tied
  bool fused_decoding_ = true;
  std::atomic<int64_t> fused_steps_{0};  // (forward() may run on several threads at once)
  bool fused_decode_applicable(const Gpt2Input& input) const;
  Gpt2Output fused_decode_step(const Gpt2Input& input);
};
TORCH_MODULE(Gpt2Model);

// Loads config.json + weights from a Hugging Face GPT-2 folder (model.safetensors, else
// pytorch_model.bin), or from an explicit weight file next to a config.json. Frozen, eval mode.
Gpt2Model load_gpt2(const std::string& path);

}  // namespace prefixcap
