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

}  // namespace prefixcap
