#include "lm/loss.h"

#include <ATen/ATen.h>

#include "lm/gpt2.h"

namespace prefixcap {

at::Tensor prefix_caption_loss(const at::Tensor& logits, const at::Tensor& caption_ids,
                               const at::Tensor& caption_mask, int64_t prefix_length) {
  TORCH_CHECK(logits.dim() == 3 && caption_ids.dim() == 2, "prefix_caption_loss: expected logits [B, P+T, V] and ids [B, T]");
  const int64_t B = caption_ids.size(0), T = caption_ids.size(1);
  TORCH_CHECK(logits.size(0) == B && logits.size(1) == prefix_length + T,
              "prefix_caption_loss: logits ", logits.sizes(), " do not fit prefix ", prefix_length, " + ids ", caption_ids.sizes());
  TORCH_CHECK(prefix_length >= 1, "prefix_caption_loss: the prefix must be at least one vector long");
  at::Tensor nll = prefix_caption_token_nll(logits, caption_ids, prefix_length);  // [B, T]
  if (!caption_mask.defined()) return nll.mean();
  at::Tensor mask = caption_mask.to(nll.dtype());
  return (nll * mask).sum() / mask.sum().clamp_min(1);
}

at::Tensor prefix_caption_token_nll(const at::Tensor& logits, const at::Tensor& caption_ids, int64_t prefix_length) {
  const int64_t T = caption_ids.size(1);
  at::Tensor predicting = logits.narrow(1, prefix_length - 1, T);  // [B, T, V]
  return -at::log_softmax(predicting, -1).gather(-1, caption_ids.unsqueeze(-1)).squeeze(-1);
}

at::Tensor token_cross_entropy(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& mask) {
  at::Tensor target = mask.defined() ? targets.masked_fill(mask.eq(0), -100) : targets;
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}).to(at::kFloat), target.reshape({-1}), {},
                                at::Reduction::Mean, -100);
}

at::Tensor prefix_lm_loss(Gpt2ModelImpl& lm, const at::Tensor& prefix, const at::Tensor& ids, const at::Tensor& mask) {
  const int64_t P = prefix.size(1), T = ids.size(1);
  if (P < 1) throw std::invalid_argument("prefix_lm_loss: the prefix must have at least one vector");
  Gpt2Input x;
  x.prefix_embeds = prefix;
  x.input_ids = ids;
  x.logits = LogitsMode::None;
  at::Tensor hidden = lm.forward(x).last_hidden_state.narrow(1, P - 1, T);
  return token_cross_entropy(lm.head(hidden), ids, mask);
}

}  // namespace prefixcap
