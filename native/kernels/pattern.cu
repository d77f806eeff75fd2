// Byte patterns for transfer tests, generated and checked on the GPU so that device-to-device transfers
// are verified where the data lives. Byte x of a pattern with `seed` is
//   ((x * 131) ^ (x >> 8) ^ (x >> 16) ^ seed) & 0xff      (x taken modulo 2^32)
// which test/helpers/pattern.ts computes identically on the host.
#include <cstdint>

__device__ __forceinline__ uint8_t tandem_pattern_byte(uint32_t x, uint32_t seed) {
  return static_cast<uint8_t>(((x * 131u) ^ (x >> 8) ^ (x >> 16) ^ seed) & 0xffu);
}

extern "C" __global__ void tandem_fill_pattern_u8(uint8_t* __restrict__ p, unsigned long long n, uint32_t seed,
                                                  unsigned long long base) {
  for (unsigned long long i = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    p[i] = tandem_pattern_byte(static_cast<uint32_t>(base + i), seed);
  }
}

// Adds the number of bytes that differ from the pattern to *mismatches.
extern "C" __global__ void tandem_check_pattern_u8(const uint8_t* __restrict__ p, unsigned long long n, uint32_t seed,
                                                   unsigned long long base, unsigned long long* mismatches) {
  unsigned long long bad = 0;
  for (unsigned long long i = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    bad += p[i] != tandem_pattern_byte(static_cast<uint32_t>(base + i), seed);
  }
  if (bad) atomicAdd(mismatches, bad);
}
