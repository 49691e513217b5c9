#include "lm/short_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include "lm/skinny_matmul.h"

namespace prefixcap {

namespace {

// All loops below are axpy-shaped (the innermost index runs over contiguous memory), so the
// compiler vectorises them without reassociating sums.
struct Dims {
  int64_t B, H, T, S, D;
};

// y[0..n) += a * x[0..n): restrict-qualified so that it vectorises.
inline void axpy(int64_t n, float a, const float* __restrict__ x, float* __restrict__ y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Forward for one (b, h): P = softmax(q k^T * scale + bias), y = P v.
void forward_head(const float* q, const float* k, const float* v, const float* bias, float scale, const Dims& d,
                  float* p, float* y, std::vector<float>& kt) {
  for (int64_t s = 0; s < d.S; ++s)
    for (int64_t j = 0; j < d.D; ++j) kt[j * d.S + s] = k[s * d.D + j];  // k^T [D, S]
  for (int64_t t = 0; t < d.T; ++t) {
    float* row = p + t * d.S;
    for (int64_t s = 0; s < d.S; ++s) row[s] = 0.f;
    for (int64_t j = 0; j < d.D; ++j) axpy(d.S, q[t * d.D + j] * scale, kt.data() + j * d.S, row);
    if (bias)
      for (int64_t s = 0; s < d.S; ++s) row[s] += bias[t * d.S + s];
    float mx = row[0];
    for (int64_t s = 1; s < d.S; ++s) mx = std::max(mx, row[s]);
    float sum = 0.f;
    for (int64_t s = 0; s < d.S; ++s) {
      row[s] = std::exp(row[s] - mx);
      sum += row[s];
    }
    const float inv = 1.f / sum;
    for (int64_t s = 0; s < d.S; ++s) row[s] *= inv;
    float* out = y + t * d.D;
    for (int64_t j = 0; j < d.D; ++j) out[j] = 0.f;
    for (int64_t s = 0; s < d.S; ++s) axpy(d.D, row[s], v + s * d.D, out);
  }
}

// Backward for one (b, h), from P and dy.
void backward_head(const float* q, const float* k, const float* v, const float* p, const float* dy, float scale,
                   const Dims& d, float* dq, float* dk, float* dv, std::vector<float>& vt, std::vector<float>& ds) {
  for (int64_t s = 0; s < d.S; ++s)
    for (int64_t j = 0; j < d.D; ++j) vt[j * d.S + s] = v[s * d.D + j];
  for (int64_t i = 0; i < d.S * d.D; ++i) dk[i] = dv[i] = 0.f;
  for (int64_t t = 0; t < d.T; ++t) {
    const float* prow = p + t * d.S;
    const float* g = dy + t * d.D;
    float* dsr = ds.data();
    // dP[t, :] = dy[t, :] v^T
    for (int64_t s = 0; s < d.S; ++s) dsr[s] = 0.f;
    for (int64_t j = 0; j < d.D; ++j) axpy(d.S, g[j], vt.data() + j * d.S, dsr);
    // softmax backward: dS = P * (dP - sum(P * dP))
    float dot = 0.f;
    for (int64_t s = 0; s < d.S; ++s) dot += prow[s] * dsr[s];
    for (int64_t s = 0; s < d.S; ++s) dsr[s] = prow[s] * (dsr[s] - dot) * scale;
    // dv[s, :] += P[t, s] dy[t, :];  dq[t, :] = sum_s dS[t, s] k[s, :];  dk[s, :] += dS[t, s] q[t, :]
    float* dqr = dq + t * d.D;
    for (int64_t j = 0; j < d.D; ++j) dqr[j] = 0.f;
    const float* qr = q + t * d.D;
    for (int64_t s = 0; s < d.S; ++s) {
      axpy(d.D, prow[s], g, dv + s * d.D);
      axpy(d.D, dsr[s], k + s * d.D, dqr);
      axpy(d.D, dsr[s], qr, dk + s * d.D);
    }
  }
}

class ShortAttention : public torch::autograd::Function<ShortAttention> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q_in, const at::Tensor& k_in,
                            const at::Tensor& v_in, const at::Tensor& bias_in, double scale) {
    at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
    const Dims d{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
    at::Tensor bias;
    if (bias_in.defined()) bias = bias_in.to(at::kFloat).expand({d.B, 1, d.T, d.S}).contiguous();
    at::Tensor p = at::empty({d.B, d.H, d.T, d.S}, q.options());
    at::Tensor y = at::empty({d.B, d.H, d.T, d.D}, q.options());
    const float* qp = q.data_ptr<float>();
    const float* kp = k.data_ptr<float>();
    const float* vp = v.data_ptr<float>();
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    float* pp = p.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> kt(static_cast<size_t>(d.D * d.S));
      for (int64_t bh = begin; bh < end; ++bh)
        forward_head(qp + bh * d.T * d.D, kp + bh * d.S * d.D, vp + bh * d.S * d.D, bp ? bp + (bh / d.H) * d.T * d.S : nullptr,
                     static_cast<float>(scale), d, pp + bh * d.T * d.S, yp + bh * d.T * d.D, kt);
    });
    ctx->save_for_backward({q, k, v, p});
    ctx->saved_data["scale"] = scale;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &p = saved[3];
    const double scale = ctx->saved_data["scale"].toDouble();
    at::Tensor dy = grads[0].contiguous();
    const Dims d{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
    at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(), *pp = p.data_ptr<float>(),
                *gp = dy.data_ptr<float>();
    float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
    at::parallel_for(0, d.B * d.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> vt(static_cast<size_t>(d.D * d.S)), ds(static_cast<size_t>(d.S));
      for (int64_t bh = begin; bh < end; ++bh)
        backward_head(qp + bh * d.T * d.D, kp + bh * d.S * d.D, vp + bh * d.S * d.D, pp + bh * d.T * d.S, gp + bh * d.T * d.D,
                      static_cast<float>(scale), d, dqp + bh * d.T * d.D, dkp + bh * d.S * d.D, dvp + bh * d.S * d.D, vt, ds);
    });
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

bool short_attention_applicable(const at::Tensor& q, const at::Tensor& k) {
  return q.device().is_cpu() && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && q.dim() == 4 &&
         k.size(2) <= 512 && q.size(2) <= 512 && q.size(3) <= 256;
}

at::Tensor short_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                           double scale) {
  return ShortAttention::apply(q, k, v, bias, scale);
}

bool decode_attention_applicable(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  auto ok = [](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 && t.stride(3) == 1 &&
           !(c10::GradMode::is_enabled() && t.requires_grad());
  };
  return ok(q) && ok(k) && ok(v) && q.size(2) == 1 && k.sizes() == v.sizes() && k.size(0) == q.size(0) &&
         k.size(1) == q.size(1) && k.size(3) == q.size(3) && k.size(2) > 0;
}

void decode_attention_heads(const DecodeAttentionArgs& a, int64_t bh0, int64_t bh1, std::vector<float>& p) {
  p.resize(static_cast<size_t>(a.S));
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t b = bh / a.H, h = bh % a.H;
    const int64_t* row = a.row_index ? a.row_index + b * a.S : nullptr;
    if (row)  // checked here, in the pass that reads them, rather than by two reductions per call
      for (int64_t s = 0; s < a.S; ++s)
        TORCH_CHECK(row[s] >= 0 && row[s] < a.B, "decode_attention: row_index ", row[s], " out of range [0, ", a.B, ")");
    if (attention_head_avx512(a, b, h, p.data())) continue;
    const float* qr = a.q + b * a.q_stride_b + h * a.q_stride_h;
    const float* br = a.bias ? a.bias + (a.bias_rows == 1 ? 0 : b) * a.S : nullptr;
    auto key = [&](int64_t s) { return a.k + (row ? row[s] : b) * a.k_stride_b + h * a.k_stride_h + s * a.k_stride_s; };
    auto value = [&](int64_t s) { return a.v + (row ? row[s] : b) * a.v_stride_b + h * a.v_stride_h + s * a.v_stride_s; };
    const int64_t D = a.D;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < a.S; ++s) {
      const float* kr = key(s);
      float acc[16] = {0};
      int64_t j = 0;
      for (; j + 16 <= D; j += 16)
        for (int l = 0; l < 16; ++l) acc[l] += qr[j + l] * kr[j + l];
      float dot = 0.f;
      for (; j < D; ++j) dot += qr[j] * kr[j];
      for (int l = 0; l < 16; ++l) dot += acc[l];
      p[s] = dot * a.scale + (br ? br[s] : 0.f);
      mx = std::max(mx, p[s]);
    }
    float sum = 0.f;
    for (int64_t s = 0; s < a.S; ++s) {
      p[s] = std::exp(p[s] - mx);
      sum += p[s];
    }
    const float inv = 1.f / sum;
    float* out = a.y + bh * D;
    for (int64_t j = 0; j < D; ++j) out[j] = 0.f;
    for (int64_t s = 0; s < a.S; ++s) axpy(D, p[s] * inv, value(s), out);
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias_in,
                            double scale_in, const at::Tensor& row_index_in) {
  TORCH_CHECK(decode_attention_applicable(q, k, v), "decode_attention: unsupported inputs q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), S = k.size(2), D = q.size(3);
  at::Tensor bias;
  if (bias_in.defined()) {
    bias = bias_in.to(at::kFloat).reshape({-1, S}).contiguous();
    TORCH_CHECK(bias.size(0) == 1 || bias.size(0) == B, "decode_attention: bias ", bias_in.sizes(), " for batch ", B);
  }
  at::Tensor rows;
  if (row_index_in.defined()) {
    rows = row_index_in.to(at::kLong).contiguous();
    TORCH_CHECK(rows.dim() == 2 && rows.size(0) == B && rows.size(1) == S, "decode_attention: row_index ",
                rows.sizes(), " for batch ", B, " and ", S, " keys");
  }
  at::Tensor y = at::empty({B, H, D}, q.options());
  DecodeAttentionArgs a;
  a.q = q.data_ptr<float>();
  a.q_stride_b = q.stride(0);
  a.q_stride_h = q.stride(1);
  a.k = k.data_ptr<float>();
  a.k_stride_b = k.stride(0);
  a.k_stride_h = k.stride(1);
  a.k_stride_s = k.stride(2);
  a.v = v.data_ptr<float>();
  a.v_stride_b = v.stride(0);
  a.v_stride_h = v.stride(1);
  a.v_stride_s = v.stride(2);
  a.row_index = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  a.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  a.bias_rows = bias.defined() ? bias.size(0) : 0;
  a.B = B;
  a.H = H;
  a.S = S;
  a.D = D;
  a.scale = static_cast<float>(scale_in);
  a.y = y.data_ptr<float>();
  at::parallel_for(0, B * H, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> p;
    decode_attention_heads(a, begin, end, p);
  });
  return y;
}

}  // namespace prefixcap
