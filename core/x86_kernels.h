// What the hand-written CPU kernels (core/int8_gemm.cpp, lm/skinny_matmul.cpp) share: whether the
// x86 intrinsics are available, how a plain C++ kernel is built for several instruction sets, the
// target of the VNNI and AMX kernels, the one VNNI instruction they use and the AMX tile shape.
// Included by kernel sources only (and linear_bench, for its AMX peak probe).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PREFIXCAP_X86_KERNELS 1
#include <immintrin.h>

#include <cstdint>
#endif

// Built twice (AVX2+FMA and the x86-64 baseline); the loader picks one for the processor.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define PREFIXCAP_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define PREFIXCAP_CLONES
#endif

#if PREFIXCAP_X86_KERNELS
#define PREFIXCAP_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl,fma")))
// The AMX kernels (tile loads, tdpbusd / tdpbsud) with the VNNI target's AVX-512 for their epilogues.
#define PREFIXCAP_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vnni,avx512vl,fma")))

namespace prefixcap::x86 {

// acc += the 16 sums of four products u8 x s8 (vpdpbusd), in place: through the intrinsic GCC 12
// copies each accumulator to a second register and to the stack on every use (a tile's 20-24
// accumulators then leave the registers; seen in the disassembly).
PREFIXCAP_VNNI inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// The AMX tile configuration (palette 1) with the eight tiles at 16 rows x 64 bytes, the shape
// every AMX kernel here uses; loaded on the calling thread.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
PREFIXCAP_AMX inline void load_full_tiles() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}

}  // namespace prefixcap::x86
#endif
