// Teacher-forced caption loss after a prefix (ClipCap train.py, Prefix-AAC): the logit at
// position P+t-1 predicts caption token t; padding (mask 0) neither counts nor contributes.
#pragma once

#include <ATen/Tensor.h>

namespace prefixcap {

// logits [B, P+T, V]; caption_ids [B, T]; caption_mask [B, T] (1 = real) or undefined (all
// real); prefix_length P. Returns the mean cross-entropy over real caption tokens (scalar).
at::Tensor prefix_caption_loss(const at::Tensor& logits, const at::Tensor& caption_ids,
                               const at::Tensor& caption_mask, int64_t prefix_length);

// -log p(caption token t) for every (b, t): [B, T] (counted or not).
at::Tensor prefix_caption_token_nll(const at::Tensor& logits, const at::Tensor& caption_ids, int64_t prefix_length);

// Mean cross-entropy of `targets` [B, T] under `logits` [B, T, V] (computed in float32) over the
// positions where `mask` [B, T] is 1 (every position when undefined).
at::Tensor token_cross_entropy(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& mask);

class Gpt2ModelImpl;

// The same loss as prefix_caption_loss, running `lm` on the prefix [B, P, n_embd] (P >= 1) and
// caption ids [B, T], with vocabulary logits computed only where a caption token is predicted
// (training: the reference computes them at every prefix position too). Captions must be
// right-padded: causal attention then keeps every real token off the pads.
at::Tensor prefix_lm_loss(Gpt2ModelImpl& lm, const at::Tensor& prefix, const at::Tensor& ids, const at::Tensor& mask);

}  // namespace prefixcap
