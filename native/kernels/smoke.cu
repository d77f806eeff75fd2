// Small kernels used by the GPU smoke test and by capability checks: they prove that the fatbin loads and
// runs on this device and that results come back intact.
#include <cstdint>

// y[i] = a * x[i] + y[i]
extern "C" __global__ void tandem_axpy_f32(float* __restrict__ y, const float* __restrict__ x, float a, uint32_t n) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    y[i] = fmaf(a, x[i], y[i]);
  }
}

// p[i] = seed * 2654435761 + i  (a pattern whose every word differs, to catch misplaced bytes)
extern "C" __global__ void tandem_pattern_u32(uint32_t* __restrict__ p, uint32_t seed, uint32_t n) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    p[i] = seed * 2654435761u + i;
  }
}
