// linear_bench: one linear layer of GPT-2 124M's decoding (the shapes a step multiplies) through
// packed_linear per weight type, beside at::linear on the float32 weight in the same run, at the
// row counts decoding meets: 1 (greedy), 5 (a beam), 16, 80 (16 beams of 5) and 320 (64 clips
// x beam 5); int8-dynamic quantises the activations too (W8A8: VNNI, and AMX tiles from 16 rows
// where the processor has AMX-INT8); LibTorch's bfloat16 at::linear beside them. Prints JSON:
// microseconds per call and the ratio to float32 at::linear, the integer products' multiply-adds
// per second (`*_gmacs`); with AMX, the machine's AMX int8 peak measured in the same run
// (`amx_int8_peak_gmacs`) and the integer products also with AMX turned off (`*_vnni_us`).
//   build/bench/linear_bench [--threads N] [--rows 1,5,16,80,320]
#include <cstdio>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "bench/bench_util.h"
#include "core/int8_gemm.h"
#include "core/threads.h"
#include "core/x86_kernels.h"
#include "lm/skinny_matmul.h"

using namespace prefixcap;
using namespace prefixcap::bench;

namespace {
#if PREFIXCAP_X86_KERNELS
// The AMX int8 peak of one core: tdpbusd on tiles already loaded (no memory traffic), four
// independent sums. Multiply-adds per second. Call only where cpu_has_amx_int8().
PREFIXCAP_AMX double amx_int8_peak_one_core(int64_t repeats) {
  x86::load_full_tiles();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  const double t0 = now_seconds();
  for (int64_t i = 0; i < repeats; ++i) {
    _tile_dpbusd(0, 4, 5);
    _tile_dpbusd(1, 4, 5);
    _tile_dpbusd(2, 4, 5);
    _tile_dpbusd(3, 4, 5);
  }
  const double t = now_seconds() - t0;
  _tile_release();
  return repeats * 4.0 * 16 * 16 * 64 / t;
}
#endif
}  // namespace

int main(int argc, char** argv) {
  prefixcap::select_blas_kernels(argv);  // before anything else: may re-execute (core/threads.h)
  ThreadOptions threads;
  std::vector<int64_t> rows = {1, 5, 16, 80, 320};
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "--threads" && i + 1 < argc) threads.num_threads = std::stoi(argv[++i]);
      else if (a == "--rows" && i + 1 < argc) {
        rows.clear();
        for (const std::string& r : split_list(argv[++i])) rows.push_back(std::stoll(r));
      } else {
        std::fprintf(stderr, "usage: linear_bench [--threads N] [--rows 1,5,16,80,320]\n");
        return a == "--help" ? 0 : 1;
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "linear_bench: %s\n", e.what());
    return 1;
  }
  ThreadSetup setup = configure_threads(threads);
  torch::NoGradGuard no_grad;
  nlohmann::json out;
  out["benchmark"] = "linear_bench";
  out["cpu"] = cpu_model_name();
  out["threads"] = setup.num_threads;
  out["int8_kernel"] = int8_gemm_isa_name(int8_gemm_isa());
#if PREFIXCAP_X86_KERNELS
  if (cpu_has_amx_int8()) {
    // the machine's integer peak with AMX, every thread at once, to set the products against
    std::vector<double> per_thread(static_cast<size_t>(at::get_num_threads()), 0.0);
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) per_thread[t] = amx_int8_peak_one_core(20000000);
    });
    double total = 0;
    for (double p : per_thread) total += p;
    out["amx_int8_peak_gmacs"] = total / 1e9;
  }
#endif
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  // GPT-2 124M: attention in (c_attn), MLP up (c_fc), MLP down (c_proj), the 50257-row header.
  const std::vector<Shape> shapes = {{"c_attn", 2304, 768}, {"mlp_c_fc", 3072, 768}, {"mlp_c_proj", 768, 3072},
                                     {"header", 50257, 768}};
  torch::manual_seed(0);
  for (const Shape& s : shapes) {
    const at::Tensor w = at::randn({s.n, s.k}) * 0.02, b = at::randn({s.n}) * 0.02;
    const PackedWeight bf16 = pack_weight(w, WeightDtype::BFloat16), int8 = pack_weight(w, WeightDtype::Int8),
                       dynamic = pack_weight(w, WeightDtype::Int8Dynamic);
    for (int64_t m : rows) {
      const at::Tensor x = at::randn({m, s.k});
      const int repeats = s.n > 10000 ? 5 : 20;
      at::linear(x, w, b);
      const double t_ref = best_time(repeats, [&] { at::linear(x, w, b); });
      nlohmann::json r;
      r["float32_at_linear_us"] = t_ref * 1e6;
      for (const auto* p : {&bf16, &int8, &dynamic}) {
        const std::string name = weight_dtype_name(p->dtype);
        packed_linear(x, *p, b);
        const double t = best_time(repeats, [&] { packed_linear(x, *p, b); });
        r[name + "_us"] = t * 1e6;
        r[name + "_speedup_over_float32"] = t_ref / t;
      }
      // the encoders' int8 product (core/int8_gemm.h): the same quantisation, a layout for many rows
      const Int8Matrix encoder = pack_int8_matrix(w, b);
      int8_linear(x, encoder);
      const double t_enc = best_time(repeats, [&] { int8_linear(x, encoder); });
      r["int8_gemm_us"] = t_enc * 1e6;
      r["int8_gemm_speedup_over_float32"] = t_ref / t_enc;
      const double macs = double(m) * s.n * s.k;  // multiply-adds per product, for the peak above
      r["int8_gemm_gmacs"] = macs / t_enc / 1e9;
      r["int8-dynamic_gmacs"] = macs / r["int8-dynamic_us"].get<double>() * 1e-3;
      // LibTorch's own bfloat16 product (oneDNN; AMX-BF16 where LibTorch 2.x finds it)
      const at::Tensor wb = w.to(at::kBFloat16), xb = x.to(at::kBFloat16), bb = b.to(at::kBFloat16);
      at::linear(xb, wb, bb);
      const double t_bf16 = best_time(repeats, [&] { at::linear(xb, wb, bb); });
      r["bfloat16_at_linear_us"] = t_bf16 * 1e6;
      r["bfloat16_at_linear_speedup_over_float32"] = t_ref / t_bf16;
      if (int8_gemm_isa() == Int8GemmIsa::Amx) {
        // the same two integer products with AMX turned off (the VNNI kernels; the same bits)
        force_int8_gemm_isa(Int8GemmIsa::Vnni);
        const double t_dyn = best_time(repeats, [&] { packed_linear(x, dynamic, b); });
        const double t_enc_vnni = best_time(repeats, [&] { int8_linear(x, encoder); });
        force_int8_gemm_isa(Int8GemmIsa::Amx);
        r["int8-dynamic_vnni_us"] = t_dyn * 1e6;
        r["int8_gemm_vnni_us"] = t_enc_vnni * 1e6;
      }
      out["shapes"][s.name][std::to_string(m)] = r;
    }
  }
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
