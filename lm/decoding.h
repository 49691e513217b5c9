// Caption decoding from a prompt (prefix embeddings and/or a deep key/value prefix), batched
// over inputs and beams, with the KV cache: the prompt is run once, never recomputed.
#pragma once

#include <cstdint>
#include <vector>

#include "lm/gpt2.h"

namespace prefixcap {

struct DecodingOptions {
  int beam_size = 1;                    // > 1: beam search (ClipCap generate_beam semantics)
  int max_tokens = 20;                  // most tokens generated per caption (stop token included)
  std::vector<int64_t> stop_token_ids = {50256};  // a caption ends after producing one of these
  bool sample = false;                  // beam_size 1 only: sample instead of taking the argmax
  double temperature = 1.0;             // logits are divided by this (> 0) before softmax
  int top_k = 0;                        // sampling: keep the k most likely tokens (0 = all)
  double top_p = 1.0;                   // sampling: keep the smallest set with this much mass
  uint64_t seed = 0;                    // sampling: random seed (same seed, same captions)
  int num_return = 1;                   // captions per input (k-best; <= beam_size for beams)
};

// Everything the LM reads before the caption: [B, P, n_embd] prefix embeddings (ClipCap,
// Prefix-AAC), a per-layer key/value prefix (Li & Liang), or both; optionally prompt tokens.
struct Prompt {
  at::Tensor prefix_embeds;                  // [B, P, n_embd] or undefined
  std::vector<LayerKv> kv_prefix;            // n_layer x [B, n_head, P', head_dim], or empty
  KvPrefixPositions kv_positions = KvPrefixPositions::AfterPrefix;
  at::Tensor prompt_ids;                     // [B, T0] tokens after the prefix, or undefined
  int64_t batch_size() const;
};

struct DecodedSequence {
  std::vector<int64_t> ids;   // generated ids, the stop token included when one was produced
  double score = 0;           // mean log-probability per generated token
};

// One list of captions (best first) per input.
std::vector<std::vector<DecodedSequence>> generate(Gpt2ModelImpl& lm, const Prompt& prompt,
                                                   const DecodingOptions& options);

// The distribution sampling draws from, per row of logits [N, V]: softmax(logits / temperature)
// restricted to the top_k most likely tokens (0 = all), then to the smallest set of the most
// likely tokens whose mass reaches top_p (the token that crosses top_p is kept, as Hugging
// Face's TopPLogitsWarper does; the most likely token always is), renormalised. [N, V] float.
at::Tensor sampling_probabilities(const at::Tensor& logits, double temperature, int top_k, double top_p);

// Checks the options; throws std::invalid_argument naming the bad field.
void validate(const DecodingOptions& options);

}  // namespace prefixcap
