// Dummy weights generated in place on the GPU, bit for bit the values lib/engine/model/dummy.ts draws on the
// host (dummyTensorRows, then round to bf16): row r of a tensor is xoshiro128** seeded through splitmix32 with
// the keys (key0, key1, key2, r); each draw's top 24 bits u give the float32 nearest to (u / 2^24 - 0.5) * width,
// computed in double as JavaScript does, then bf16 rounded to nearest even as CudaLlama::setWeight rounds.
// One thread per row: the generator is sequential along a row, and a row is what the host seeds independently.
#include <cstdint>

namespace tandem_dummy {

__device__ __forceinline__ uint32_t rotl(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }

// splitmix32 as dummy.ts writes it: the state advances by the golden ratio, the output mixes the new state.
__device__ __forceinline__ uint32_t splitmixNext(uint32_t& s) {
  s += 0x9e3779b9u;
  uint32_t z = s;
  z = (z ^ (z >> 16)) * 0x21f0aafdu;
  z = (z ^ (z >> 15)) * 0x735a2d97u;
  return z ^ (z >> 15);
}

__device__ __forceinline__ uint16_t toBf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) return 0x7fc0;  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Row `row`'s generator: Xoshiro128's constructor (for each key, two splitmix steps whose outputs are discarded),
// then one bf16 value per next().
struct RowGenerator {
  uint32_t a, b, c, d;
  double width;
  __device__ __forceinline__ RowGenerator(uint32_t key0, uint32_t key1, uint32_t key2, uint32_t row, double w)
      : width(w) {
    uint32_t s = 0x2545f491u;
    const uint32_t keys[4] = {key0, key1, key2, row};
    for (int i = 0; i < 4; ++i) {
      s ^= keys[i];
      splitmixNext(s);
      splitmixNext(s);
    }
    a = splitmixNext(s);
    b = splitmixNext(s);
    c = splitmixNext(s);
    d = splitmixNext(s);
    if ((a | b | c | d) == 0) a = 1;
  }
  __device__ __forceinline__ uint16_t next() {
    uint32_t result = rotl(b * 5u, 7) * 9u;
    uint32_t t = b << 9;
    c ^= a;
    d ^= b;
    b ^= c;
    a ^= d;
    c ^= t;
    d = rotl(d, 11);
    // Explicit round-to-nearest operations: no contraction into an FMA, so the one double rounding matches JS.
    double v = __dmul_rn(__dadd_rn(static_cast<double>(result >> 8) * 0x1p-24, -0.5), width);
    return toBf16(__double2float_rn(v));
  }
};

}  // namespace tandem_dummy

// out: rows x cols bf16, row-major. Values as described above.
extern "C" __global__ void tandem_dummy_uniform_bf16(uint16_t* out, unsigned long long rows, unsigned long long cols,
                                                     unsigned int key0, unsigned int key1, unsigned int key2,
                                                     double width) {
  using namespace tandem_dummy;
  unsigned long long r = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  RowGenerator gen(key0, key1, key2, static_cast<uint32_t>(r), width);
  auto draw = [&]() -> uint16_t { return gen.next(); };
  uint16_t* row = out + r * cols;
  unsigned long long i = 0;
  // Eight values (16 bytes) per store where the row allows it: rows start 16-byte aligned when cols % 8 == 0.
  if (cols % 8 == 0 && (reinterpret_cast<uintptr_t>(out) & 15) == 0) {
    for (; i < cols; i += 8) {
      uint32_t w[4];
      for (int j = 0; j < 4; ++j) {
        uint32_t lo = draw();
        uint32_t hi = draw();
        w[j] = lo | (hi << 16);
      }
      *reinterpret_cast<uint4*>(row + i) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
  for (; i < cols; ++i) row[i] = draw();
}

// out[0, count) = value (bf16 bits): the norm weights of a dummy model (all ones).
extern "C" __global__ void tandem_dummy_fill_bf16(uint16_t* out, unsigned long long count, unsigned int value) {
  for (unsigned long long i = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<unsigned long long>(gridDim.x) * blockDim.x)
    out[i] = static_cast<uint16_t>(value);
}

// Tensor parallelism (issue 25): a rank's slice of the same tensor, out[i, j] = element (rowStart + i, colStart + j) of
// the whole tensor tandem_dummy_uniform_bf16 would generate with the same keys (rows x cols bf16, row-major). Row
// rowStart + i is that row's generator after colStart draws are skipped.
extern "C" __global__ void tandem_dummy_uniform_slice_bf16(uint16_t* out, unsigned long long rows,
                                                           unsigned long long cols, unsigned long long rowStart,
                                                           unsigned long long colStart, unsigned int key0,
                                                           unsigned int key1, unsigned int key2, double width) {
  using namespace tandem_dummy;
  unsigned long long r = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  RowGenerator gen(key0, key1, key2, static_cast<uint32_t>(rowStart + r), width);
  for (unsigned long long j = 0; j < colStart; ++j) gen.next();
  uint16_t* row = out + r * cols;
  for (unsigned long long j = 0; j < cols; ++j) row[j] = gen.next();
}
