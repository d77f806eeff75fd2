#include "cpu_kernels.h"

#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TANDEM_X86_KERNELS 1
#include <immintrin.h>
#endif

namespace tandem::engine {
namespace {

// Each kernel computes an MR x NR tile of y (MR rows of x against NR rows of w) with MR * NR vector
// accumulators, loading each w vector once per MR rows of x and each x vector once per NR rows of w. The
// driver walks w in NR-row panels (one panel stays in cache while every row of x passes it) and x in MR-row
// blocks, with smaller tiles at the edges. MR and NR are chosen so that the accumulators, NR w vectors and
// one x vector fit in the register file.
//
// The driver is stamped out once per instruction set because a function's target attribute must cover
// every intrinsic inlined into it.
#define TANDEM_GEMM_DRIVER(NAME, TARGET, TILE, MRMAX, NRMAX)                                                  \
  template <int MR>                                                                                           \
  TARGET inline void NAME##Row(int nr, const float* x, size_t k, const float* w, const float* bias, float* y,  \
                               size_t ldy) {                                                                  \
    switch (nr) {                                                                                             \
      case 1: TILE<MR, 1>(x, k, w, bias, y, ldy); break;                                                     \
      case 2: if constexpr (NRMAX >= 2) TILE<MR, 2>(x, k, w, bias, y, ldy); break;                           \
      case 3: if constexpr (NRMAX >= 3) TILE<MR, 3>(x, k, w, bias, y, ldy); break;                           \
      default: if constexpr (NRMAX >= 4) TILE<MR, NRMAX>(x, k, w, bias, y, ldy); break;                      \
    }                                                                                                         \
  }                                                                                                           \
  TARGET void NAME(const float* x, size_t m, size_t k, const float* w, size_t n0, size_t n1, const float* bias, \
                   float* y, size_t ldy) {                                                                    \
    for (size_t j = n0; j < n1; j += NRMAX) {                                                                 \
      int nr = static_cast<int>(n1 - j < size_t(NRMAX) ? n1 - j : size_t(NRMAX));                            \
      const float* wj = w + j * k;                                                                            \
      const float* bj = bias ? bias + j : nullptr;                                                            \
      for (size_t i = 0; i < m; i += MRMAX) {                                                                 \
        int mr = static_cast<int>(m - i < size_t(MRMAX) ? m - i : size_t(MRMAX));                            \
        const float* xi = x + i * k;                                                                          \
        float* yij = y + i * ldy + j;                                                                         \
        switch (mr) {                                                                                         \
          case 1: NAME##Row<1>(nr, xi, k, wj, bj, yij, ldy); break;                                          \
          case 2: if constexpr (MRMAX >= 2) NAME##Row<2>(nr, xi, k, wj, bj, yij, ldy); break;                \
          case 3: if constexpr (MRMAX >= 3) NAME##Row<3>(nr, xi, k, wj, bj, yij, ldy); break;                \
          default: if constexpr (MRMAX >= 4) NAME##Row<MRMAX>(nr, xi, k, wj, bj, yij, ldy); break;           \
        }                                                                                                     \
      }                                                                                                       \
    }                                                                                                         \
  }

// ---- generic: GCC/Clang vector extensions, 4 lanes (SSE2 on x86-64, NEON on arm64) ----------------------

typedef float V4 __attribute__((vector_size(16)));

template <int MR, int NR>
inline __attribute__((always_inline)) void tileGeneric(const float* x, size_t k, const float* w, const float* bias,
                                                       float* y, size_t ldy) {
  V4 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = V4{0, 0, 0, 0};
  size_t kk = 0;
  for (; kk + 4 <= k; kk += 4) {
    V4 wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) std::memcpy(&wv[j], w + j * k + kk, sizeof(V4));
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      V4 xv;
      std::memcpy(&xv, x + i * k + kk, sizeof(V4));
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = (acc[i][j][0] + acc[i][j][1]) + (acc[i][j][2] + acc[i][j][3]);
      for (size_t t = kk; t < k; ++t) s += x[i * k + t] * w[j * k + t];
      y[i * ldy + j] = s + (bias ? bias[j] : 0.0f);
    }
}

#define TANDEM_NO_TARGET
TANDEM_GEMM_DRIVER(gemmGeneric, TANDEM_NO_TARGET, tileGeneric, 4, 4)

#ifdef TANDEM_X86_KERNELS

// ---- AVX2 + FMA: 8 lanes, 16 ymm registers: 3 x 4 tile = 12 accumulators + 4 w vectors ------------------

#define TANDEM_AVX2 __attribute__((target("avx2,fma")))

TANDEM_AVX2 inline __attribute__((always_inline)) float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MR, int NR>
TANDEM_AVX2 inline __attribute__((always_inline)) void tileAvx2(const float* x, size_t k, const float* w,
                                                                const float* bias, float* y, size_t ldy) {
  __m256 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  size_t kk = 0;
  for (; kk + 8 <= k; kk += 8) {
    __m256 wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * k + kk);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      __m256 xv = _mm256_loadu_ps(x + i * k + kk);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum256(acc[i][j]);
      for (size_t t = kk; t < k; ++t) s += x[i * k + t] * w[j * k + t];
      y[i * ldy + j] = s + (bias ? bias[j] : 0.0f);
    }
}

TANDEM_GEMM_DRIVER(gemmAvx2, TANDEM_AVX2, tileAvx2, 3, 4)

TANDEM_AVX2 float dotAvx2(const float* a, const float* b, size_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum256(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---- AVX-512: 16 lanes, 32 zmm registers: 4 x 4 tile; the k remainder is a masked load, no scalar tail ---

#define TANDEM_AVX512 __attribute__((target("avx512f,fma")))

// (Not _mm512_reduce_add_ps: GCC 12 warns about the undefined vector inside it.)
TANDEM_AVX512 inline __attribute__((always_inline)) float hsum512(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float s = 0;
  for (int i = 0; i < 16; i += 4) s += (lanes[i] + lanes[i + 1]) + (lanes[i + 2] + lanes[i + 3]);
  return s;
}

template <int MR, int NR>
TANDEM_AVX512 inline __attribute__((always_inline)) void tileAvx512(const float* x, size_t k, const float* w,
                                                                    const float* bias, float* y, size_t ldy) {
  __m512 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  size_t kk = 0;
  for (; kk + 16 <= k; kk += 16) {
    __m512 wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_ps(w + j * k + kk);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      __m512 xv = _mm512_loadu_ps(x + i * k + kk);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (kk < k) {
    __mmask16 mask = static_cast<__mmask16>((1u << (k - kk)) - 1);
    __m512 wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * k + kk);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * k + kk);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + j] = hsum512(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

TANDEM_GEMM_DRIVER(gemmAvx512, TANDEM_AVX512, tileAvx512, 4, 4)

bool cpuHasAvx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool cpuHasAvx512() { return __builtin_cpu_supports("avx512f") && cpuHasAvx2(); }

#endif  // TANDEM_X86_KERNELS

float dotGeneric(const float* a, const float* b, size_t n) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

using DotFn = float (*)(const float*, const float*, size_t);

DotFn pickDot() {
#ifdef TANDEM_X86_KERNELS
  if (cpuHasAvx2()) return dotAvx2;
#endif
  return dotGeneric;
}

const DotFn bestDot = pickDot();

}  // namespace

GemmKernel selectGemmKernel(const std::string& request) {
#ifdef TANDEM_X86_KERNELS
  bool avx512 = cpuHasAvx512(), avx2 = cpuHasAvx2();
#else
  bool avx512 = false, avx2 = false;
#endif
  if (request == "auto") {
    if (avx512) return selectGemmKernel("avx512");
    if (avx2) return selectGemmKernel("avx2");
    return selectGemmKernel("generic");
  }
  if (request == "generic") return {"generic", gemmGeneric};
#ifdef TANDEM_X86_KERNELS
  if (request == "avx512" && avx512) return {"avx512", gemmAvx512};
  if (request == "avx2" && avx2) return {"avx2", gemmAvx2};
#endif
  if (request == "avx512" || request == "avx2")
    throw std::invalid_argument("kernel '" + request + "' is not supported by this CPU");
  throw std::invalid_argument("unknown kernel '" + request + "' (expected auto, avx512, avx2 or generic)");
}

float dot(const float* a, const float* b, size_t n) { return bestDot(a, b, n); }

}  // namespace tandem::engine
