// Matrix kernels of the CPU model runner. One source, several instruction sets chosen at run time (the addon
// is built without -march flags, so prebuilds run on any x86-64 or arm64): AVX-512, AVX2+FMA, and a generic
// version that the compiler vectorises for the baseline (SSE2, NEON).
#pragma once

#include <cstddef>
#include <string>

namespace tandem::engine {

// y[i * ldy + j] = dot(x[i, :], w[j, :]) (+ bias[j]) for i < m and n0 <= j < n1. x is [m, k] and w [n, k],
// both row-major with row stride k; bias may be null. y points at element (0, 0).
using GemmFn = void (*)(const float* x, size_t m, size_t k, const float* w, size_t n0, size_t n1, const float* bias,
                        float* y, size_t ldy);

struct GemmKernel {
  std::string name;  // "avx512", "avx2", "generic"
  GemmFn fn;
};

// `request`: "auto" (the best this CPU runs), or one of the names above. Throws std::invalid_argument when
// the CPU cannot run the requested one or the name is unknown.
GemmKernel selectGemmKernel(const std::string& request);

// dot(a, b) over n floats (attention's inner loop).
float dot(const float* a, const float* b, size_t n);

}  // namespace tandem::engine
