#include "lm/decoding.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/types.h>

#include "lm/skinny_matmul.h"

namespace prefixcap {

int64_t Prompt::batch_size() const {
  if (prefix_embeds.defined()) return prefix_embeds.size(0);
  if (!kv_prefix.empty()) return kv_prefix[0].key.size(0);
  if (prompt_ids.defined()) return prompt_ids.size(0);
  return 0;
}

void validate(const DecodingOptions& o) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("decoding options: " + what); };
  if (o.beam_size < 1) bad("beam_size must be >= 1, got " + std::to_string(o.beam_size));
  if (o.max_tokens < 1) bad("max_tokens must be >= 1, got " + std::to_string(o.max_tokens));
  if (!(o.temperature > 0)) bad("temperature must be > 0, got " + std::to_string(o.temperature));
  if (o.top_k < 0) bad("top_k must be >= 0, got " + std::to_string(o.top_k));
  if (!(o.top_p > 0 && o.top_p <= 1)) bad("top_p must be in (0, 1], got " + std::to_string(o.top_p));
  if (o.num_return < 1) bad("num_return must be >= 1, got " + std::to_string(o.num_return));
  if (o.beam_size > 1 && o.sample) bad("sampling and beam search cannot be combined");
  if (o.beam_size > 1 && o.num_return > o.beam_size)
    bad("num_return (" + std::to_string(o.num_return) + ") exceeds beam_size (" + std::to_string(o.beam_size) + ")");
  if (o.beam_size == 1 && !o.sample && o.num_return > 1)
    bad("num_return > 1 needs beam search or sampling");
}

namespace {

// Runs the prompt through the LM once, filling `cache`; returns log-probabilities of the
// first caption token [B, V] (after temperature).
at::Tensor run_prompt(Gpt2ModelImpl& lm, const Prompt& prompt, KvCache& cache, double temperature) {
  if (!prompt.kv_prefix.empty()) cache = make_kv_prefix_cache(prompt.kv_prefix, prompt.kv_positions);
  Gpt2Input in;
  in.prefix_embeds = prompt.prefix_embeds;
  in.input_ids = prompt.prompt_ids;
  in.cache = &cache;
  in.logits = LogitsMode::Last;
  at::Tensor logits = lm.forward(in).logits.to(at::kFloat);
  return at::log_softmax(logits / temperature, -1);
}

// Logits of the next token after `last_tokens` [N] (float32, divided by the temperature).
at::Tensor step_logits(Gpt2ModelImpl& lm, KvCache& cache, const at::Tensor& last_tokens, double temperature) {
  Gpt2Input in;
  in.input_ids = last_tokens.unsqueeze(1);  // [N, 1]
  in.cache = &cache;
  in.logits = LogitsMode::Last;
  at::Tensor logits = lm.forward(in).logits.to(at::kFloat);
  return temperature == 1.0 ? logits : logits / temperature;
}

// The k most likely next tokens after `last_tokens` [N]: logits [N, k], ids [N, k] and the
// logsumexp [N, 1] of the logits (divided by the temperature). At temperature 1 the LM's fused
// decode step computes these without the [N, V] logits.
std::tuple<at::Tensor, at::Tensor, at::Tensor> step_topk(Gpt2ModelImpl& lm, KvCache& cache,
                                                         const at::Tensor& last_tokens, double temperature,
                                                         int64_t k) {
  if (temperature == 1.0) {
    Gpt2Input in;
    in.input_ids = last_tokens.unsqueeze(1);  // [N, 1]
    in.cache = &cache;
    in.logits = LogitsMode::Last;
    in.top_k = k;
    Gpt2Output out = lm.forward(in);
    return {out.top_values.to(at::kFloat), out.top_ids, out.logsumexp.to(at::kFloat)};
  }
  return topk_logsumexp(step_logits(lm, cache, last_tokens, temperature), k);
}

at::Tensor step(Gpt2ModelImpl& lm, KvCache& cache, const at::Tensor& last_tokens, double temperature) {
  return at::log_softmax(step_logits(lm, cache, last_tokens, temperature), -1);
}

}  // namespace

at::Tensor sampling_probabilities(const at::Tensor& logits, double temperature, int top_k, double top_p) {
  at::Tensor scores = logits.to(at::kFloat) / temperature;
  const float minus_inf = -std::numeric_limits<float>::infinity();
  if (top_k > 0 && top_k < scores.size(-1)) {
    at::Tensor kth = std::get<0>(scores.topk(top_k, -1)).select(-1, top_k - 1).unsqueeze(-1);
    scores = scores.masked_fill(scores < kth, minus_inf);
  }
  if (top_p < 1.0) {
    // A token goes when the tokens more likely than it already hold top_p of the mass: the
    // one that crosses top_p stays, and so does the most likely one (HF TopPLogitsWarper).
    auto sorted = scores.sort(-1, /*descending=*/true);
    at::Tensor sorted_probs = at::softmax(std::get<0>(sorted), -1);
    at::Tensor mass_before = sorted_probs.cumsum(-1) - sorted_probs;
    at::Tensor remove_sorted = mass_before >= top_p;
    remove_sorted.select(-1, 0).fill_(false);
    at::Tensor remove = at::zeros_like(remove_sorted).scatter(-1, std::get<1>(sorted), remove_sorted);
    scores = scores.masked_fill(remove, minus_inf);
  }
  return at::softmax(scores, -1);
}

namespace {

at::Tensor is_stop(const at::Tensor& tokens, const std::vector<int64_t>& stop_ids) {
  at::Tensor out = at::zeros(tokens.sizes(), tokens.options().dtype(at::kBool));
  for (int64_t id : stop_ids) out = out | tokens.eq(id);
  return out;
}

// Greedy or sampled decoding; finished rows keep running (their tokens are discarded) until
// every row is done, so the batch stays rectangular.
std::vector<std::vector<DecodedSequence>> generate_single(Gpt2ModelImpl& lm, const Prompt& prompt,
                                                          const DecodingOptions& o) {
  const int64_t B = prompt.batch_size();
  const int64_t R = o.sample ? o.num_return : 1;  // samples per input
  KvCache cache;
  at::Tensor logp = run_prompt(lm, prompt, cache, o.temperature);  // [B, V]
  if (R > 1) {
    at::Tensor rows = at::arange(B, at::kLong).repeat_interleave(R).to(logp.device());
    cache.select_rows(rows);
    logp = logp.index_select(0, rows);
  }
  const int64_t N = B * R;
  at::Generator gen = at::detail::createCPUGenerator(o.seed);

  std::vector<DecodedSequence> seqs(N);
  std::vector<bool> done(N, false);
  int64_t remaining = N;
  for (int t = 0; t < o.max_tokens && remaining > 0; ++t) {
    at::Tensor next;
    if (!o.sample) {
      next = logp.argmax(-1);
    } else {
      // logp already carries the temperature
      at::Tensor probs = sampling_probabilities(logp.cpu(), /*temperature=*/1.0, o.top_k, o.top_p);
      next = at::multinomial(probs, 1, /*replacement=*/false, gen).squeeze(-1).to(logp.device());
    }
    at::Tensor chosen_logp = logp.gather(-1, next.unsqueeze(-1)).squeeze(-1).cpu();
    at::Tensor next_cpu = next.cpu();
    auto next_a = next_cpu.accessor<int64_t, 1>();
    auto lp_a = chosen_logp.accessor<float, 1>();
    for (int64_t i = 0; i < N; ++i) {
      if (done[i]) continue;
      seqs[i].ids.push_back(next_a[i]);
      seqs[i].score += lp_a[i];
      if (std::find(o.stop_token_ids.begin(), o.stop_token_ids.end(), next_a[i]) != o.stop_token_ids.end()) {
        done[i] = true;
        --remaining;
      }
    }
    if (remaining == 0 || t + 1 == o.max_tokens) break;
    logp = step(lm, cache, next, o.temperature);
  }
  std::vector<std::vector<DecodedSequence>> out(B);
  for (int64_t i = 0; i < N; ++i) {
    auto& s = seqs[i];
    if (!s.ids.empty()) s.score /= static_cast<double>(s.ids.size());
    out[i / R].push_back(std::move(s));
  }
  if (R > 1)
    for (auto& list : out)
      std::stable_sort(list.begin(), list.end(), [](const auto& a, const auto& b) { return a.score > b.score; });
  return out;
}

// ref: CLIP_prefix_caption predict.py generate_beam (1ad805a), batched over inputs:
// - step 1: top-K of the first token's log-probs start K beams;
// - later steps: a stopped beam can only be extended by token 0 at no cost; every other beam's
//   length grows by one; candidates are ranked by (score + logp) / length over all K*V;
// - final score = score / length; output sorted by it, descending.
std::vector<std::vector<DecodedSequence>> generate_beam(Gpt2ModelImpl& lm, const Prompt& prompt,
                                                        const DecodingOptions& o) {
  const int64_t B = prompt.batch_size();
  const int64_t K = o.beam_size;
  KvCache cache;
  at::Tensor logp = run_prompt(lm, prompt, cache, o.temperature);  // [B, V]
  const int64_t V = logp.size(-1);
  const auto device = logp.device();
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(device);

  auto first = logp.topk(K, -1);                                   // [B, K]
  at::Tensor scores = std::get<0>(first).to(at::kDouble);          // running sums
  at::Tensor tokens = std::get<1>(first).unsqueeze(-1);            // [B, K, steps]
  at::Tensor lengths = at::ones({B, K}, long_opts);
  at::Tensor stopped = is_stop(std::get<1>(first), o.stop_token_ids);
  cache.select_rows(at::arange(B, long_opts).repeat_interleave(K));  // every beam shares the prompt
  at::Tensor batch_base = (at::arange(B, long_opts) * K).unsqueeze(-1);  // [B, 1]

  // A beam's candidates are ranked by (score + logp) / length, which for one beam grows with
  // logp: the K best of all K*V are among each beam's K most likely tokens. So each step ranks
  // K*K candidates, not K*V (the same choice; only the log-softmax normaliser is needed in full).
  const int64_t C = std::min<int64_t>(K, V);  // candidates kept per beam
  at::Tensor stop_logp = at::full({C}, -std::numeric_limits<double>::infinity(), scores.options());
  stop_logp[0] = 0.0;  // a stopped beam: only token 0, at no cost
  const at::Tensor stop_ids = at::zeros({C}, long_opts);
  for (int t = 1; t < o.max_tokens; ++t) {
    if (stopped.all().item<bool>()) break;
    at::Tensor last = tokens.select(-1, tokens.size(-1) - 1).reshape({B * K});
    auto [top_values, top_ids, lse] = step_topk(lm, cache, last, o.temperature, C);  // [B*K, C]
    at::Tensor logp = (top_values - lse).to(at::kDouble).view({B, K, C});
    at::Tensor ids = top_ids.view({B, K, C});
    logp = at::where(stopped.unsqueeze(-1), stop_logp.view({1, 1, C}), logp);
    ids = at::where(stopped.unsqueeze(-1), stop_ids.view({1, 1, C}), ids);
    lengths = lengths + stopped.logical_not().to(at::kLong);
    at::Tensor candidates = (scores.unsqueeze(-1) + logp) / lengths.unsqueeze(-1).to(at::kDouble);
    auto best = candidates.view({B, K * C}).topk(K, -1);              // [B, K]
    at::Tensor values = std::get<0>(best);
    at::Tensor source = at::div(std::get<1>(best), C, "floor");
    at::Tensor next = ids.view({B, K * C}).gather(1, std::get<1>(best));
    lengths = lengths.gather(1, source);
    stopped = stopped.gather(1, source) | is_stop(next, o.stop_token_ids);
    tokens = at::cat({tokens.gather(1, source.unsqueeze(-1).expand({B, K, tokens.size(-1)})), next.unsqueeze(-1)}, -1);
    scores = values * lengths.to(at::kDouble);
    cache.select_rows((batch_base + source).reshape({B * K}));
  }

  at::Tensor final_scores = (scores / lengths.to(at::kDouble)).cpu();
  at::Tensor tokens_cpu = tokens.cpu(), lengths_cpu = lengths.cpu();
  std::vector<std::vector<DecodedSequence>> out(B);
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor order = final_scores[b].argsort(/*dim=*/0, /*descending=*/true);
    for (int64_t r = 0; r < o.num_return; ++r) {
      int64_t k = order[r].item<int64_t>();
      DecodedSequence s;
      int64_t len = lengths_cpu[b][k].item<int64_t>();
      for (int64_t i = 0; i < len; ++i) s.ids.push_back(tokens_cpu[b][k][i].item<int64_t>());
      s.score = final_scores[b][k].item<double>();
      out[b].push_back(std::move(s));
    }
  }
  return out;
}

}  // namespace

std::vector<std::vector<DecodedSequence>> generate(Gpt2ModelImpl& lm, const Prompt& prompt,
                                                   const DecodingOptions& options) {
  validate(options);
  if (prompt.batch_size() == 0) throw std::invalid_argument("generate: the prompt is empty");
  torch::NoGradGuard no_grad;
  return options.beam_size > 1 ? generate_beam(lm, prompt, options) : generate_single(lm, prompt, options);
}

}  // namespace prefixcap
