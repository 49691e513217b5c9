// BERT encoders for FENSE (Zhou et al., ICASSP 2022): the Hugging Face BertModel (post-LN
// transformer; module names equal its checkpoint keys: embeddings.word_embeddings,
// encoder.layer.N.attention.self.query, ...), a Sentence-BERT sentence encoder over it (a
// sentence-transformers folder: Transformer + Pooling [+ Normalize]) and FENSE's fluency-error
// detector (BERTFlatClassifier: BertModel + dropout + Linear on the [CLS] state, sigmoid).
// ref: huggingface/transformers models/bert/modeling_bert.py (BertModel, eager attention);
//      UKPLab/sentence-transformers models/{Transformer,Pooling}.py; blmoistawinde/fense.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include "core/json_config.h"
#include "core/tensor_map.h"
#include "lm/wordpiece.h"

namespace prefixcap {

struct BertConfig {
  int64_t vocab_size = 30522;
  int64_t hidden_size = 768;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t intermediate_size = 3072;
  std::string hidden_act = "gelu";       // gelu (erf) | gelu_new | gelu_pytorch_tanh | relu
  int64_t max_position_embeddings = 512;
  int64_t type_vocab_size = 2;
  double layer_norm_eps = 1e-12;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }

  // From a Hugging Face config.json; checks every value it uses and refuses options that change
  // the arithmetic (relative position embeddings, a decoder). `where` names the file.
  static BertConfig from_json(const Json& j, const std::string& where);
  static BertConfig from_file(const std::string& path);
};

class BertLayerImpl : public torch::nn::Module {
 public:
  explicit BertLayerImpl(const BertConfig& config);
  // x [B, T, H]; key_bias [B, 1, 1, T] additive (0 or the dtype's lowest) or undefined.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& key_bias);

  // attention.self.{query,key,value}, attention.output.{dense,LayerNorm}, intermediate.dense,
  // output.{dense,LayerNorm}: registered under those nested names.
  torch::nn::Linear query{nullptr}, key{nullptr}, value{nullptr}, attention_dense{nullptr};
  torch::nn::LayerNorm attention_norm{nullptr};
  torch::nn::Linear intermediate_dense{nullptr}, output_dense{nullptr};
  torch::nn::LayerNorm output_norm{nullptr};

 private:
  int64_t heads_, head_dim_;
  std::string activation_;
};
TORCH_MODULE(BertLayer);

class BertModelImpl : public torch::nn::Module {
 public:
  explicit BertModelImpl(const BertConfig& config);

  // input_ids [B, T] int64; attention_mask [B, T] (1 = token, 0 = padding) or undefined (all
  // tokens); token types 0. Returns the last hidden state [B, T, H].
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& attention_mask = {});

  // Loads a BertModel state dict (see the mapping table in bert.cpp). Strict.
  void load_weights(const TensorMap& weights, const std::string& source);
  void freeze();
  const BertConfig& config() const { return config_; }

  // embeddings.{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}
  torch::nn::Embedding word_embeddings{nullptr}, position_embeddings{nullptr}, token_type_embeddings{nullptr};
  torch::nn::LayerNorm embeddings_norm{nullptr};
  torch::nn::ModuleList layers{nullptr};  // encoder.layer

 private:
  BertConfig config_;
  std::vector<BertLayer> blocks_;
};
TORCH_MODULE(BertModel);

// Token ids of several texts as one padded batch: ids [B, T] (padding 0) and mask [B, T].
struct BertBatch {
  at::Tensor input_ids;
  at::Tensor attention_mask;
};
BertBatch pad_batch(const std::vector<std::vector<int64_t>>& ids, int64_t pad_id);

// Sentence-BERT as sentence-transformers' SentenceTransformer.encode computes it: the texts
// stripped, tokenized (WordPiece, [CLS] ... [SEP], cut at max_seq_length), BERT, then pooling
// over the real tokens ([CLS] and [SEP] included). Loads a sentence-transformers folder
// (modules.json; the Transformer module's config.json, weights, vocab.txt, tokenizer_config.json,
// sentence_bert_config.json; 1_Pooling/config.json; an optional Normalize module) or a plain
// Hugging Face BERT folder, which gets mean pooling as sentence-transformers gives it.
class SentenceEncoder {
 public:
  enum class Pooling { Mean, Cls, Max, MeanSqrtLen };

  static SentenceEncoder load(const std::string& folder);

  // [N, H] float32 embeddings, row i for texts[i]; L2-normalised when `normalize` or when the
  // model ends with a Normalize module. Batches of `batch_size` texts of similar length.
  at::Tensor encode(const std::vector<std::string>& texts, bool normalize = false, int64_t batch_size = 32) const;

  const BertConfig& config() const { return model_->config(); }
  int64_t max_seq_length() const { return max_seq_length_; }
  // Runs the model on `device` (CUDA); embeddings still come back on the CPU.
  void to(const c10::Device& device) { model_->to(device); }
  Pooling pooling() const { return pooling_; }

 private:
  BertModel model_{nullptr};
  std::shared_ptr<WordPieceTokenizer> tokenizer_;
  int64_t max_seq_length_ = 512;
  bool lower_case_input_ = false;  // sentence_bert_config.json do_lower_case
  Pooling pooling_ = Pooling::Mean;
  bool normalize_ = false;
};

// FENSE's fluency-error detector ("echecker"): a fense .ckpt (torch.save of {"model_type",
// "num_classes", "state_dict"} with keys encoder.* and clf.*) and the folder of its model_type
// (bert-base-uncased for the published checkpoints: config.json and vocab.txt). Texts are
// preprocessed as fense does (re.sub(r"[^\w\s]", "", text).lower()), cut at 64 tokens.
class FluencyErrorDetector {
 public:
  static FluencyErrorDetector load(const std::string& checkpoint, const std::string& bert_folder);

  // Sigmoid outputs [N, num_classes] (float32); the last column is the probability of any error
  // (fense's class names: add_tail, repeat_event, repeat_adv, remove_conj, remove_verb, error).
  at::Tensor probabilities(const std::vector<std::string>& texts, int64_t batch_size = 32) const;
  // The last column of probabilities() as doubles.
  std::vector<double> error_probability(const std::vector<std::string>& texts, int64_t batch_size = 32) const;

  int64_t num_classes() const { return clf_->options.out_features(); }
  // Runs the model on `device` (CUDA); probabilities still come back on the CPU.
  void to(const c10::Device& device) {
    model_->to(device);
    clf_->to(device);
  }
  static constexpr int64_t kMaxLength = 64;

 private:
  BertModel model_{nullptr};
  torch::nn::Linear clf_{nullptr};
  std::shared_ptr<WordPieceTokenizer> tokenizer_;
};

}  // namespace prefixcap
