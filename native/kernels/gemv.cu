// Skinny GEMM for decode ("GEMV"): y[m, n] = x[m, k] . w[n, k]^T with x and w bf16 row-major, y fp32, for a
// small batch m (1..kMaxM). Decode is bound by reading w once; cuBLAS at m <= 8 leaves much of the memory
// bandwidth unused. native/src/engine/cuda_llama.cpp picks this kernel for m up to its crossover
// (kGemvMaxBatch there, TANDEM_GEMV) and cuBLAS above; bench/micro/gemv.cu measures both against a copy.
//
// One CTA (kThreads threads) computes `Rows` consecutive outputs of every batch row: all its threads split
// k (CTA-level split-K, so that n = 4096 still gives 1024..2048 CTAs to spread over 132 SMs); each thread
// streams 16-byte vectors of the CTA's weight rows, `Unroll` vectors per row in flight before the first use,
// with loads that do not allocate in L1 (x, read by every CTA, stays there) and reuses each x vector across
// the CTA's rows. fp32 accumulation; warp-shuffle then shared-memory reduction. The grid strides over row
// groups, so any grid size is correct (the host launches ceil(n / Rows)).
//
// The SwiGLU form (tandem_gemv_swiglu_m<M>) takes the fused gate_up weights w[2 inter, k] (gate rows, then up
// rows) and writes act[m, inter] = bf16(silu(gate) * up), as llama.cu's tandem_llama_silu_mul does from the
// GEMM's fp32 output: each CTA computes matching gate and up rows, so the fp32 gate_up never reaches memory and
// the separate launch goes away.
//
// Programmatic dependent launch (Hopper; the engine opts in with TANDEM_GEMV_PDL=1): launched with programmatic
// stream serialization, a CTA may start while the previous kernel still runs. It then issues its first weight
// loads (weights are constant) and waits (griddepcontrol.wait) before it reads x or writes anything. Launched
// normally, the wait returns at once. Each CTA also lets the next kernel launch early
// (griddepcontrol.launch_dependents), which matters only when that one was launched the same way.
//
// Shapes: k a multiple of 8 with 16-byte aligned x and w takes the vector path; any other k (or alignment)
// takes the scalar path, slower but exact. n need not be a multiple of Rows.
#include <cuda_bf16.h>
#include <stdint.h>

#include "pdl.cuh"

namespace tandem_gemv {

typedef __nv_bfloat16 bf16;

constexpr int kThreads = 128;  // threads per CTA of the extern "C" entry points: launch exactly this many
constexpr int kUnroll = 4;     // 16-byte weight loads per row in flight per thread
constexpr int kMaxM = 16;      // largest batch with an entry point (tandem_gemv_m1 .. tandem_gemv_m16)

// Weight rows per CTA for batch m: more rows reuse each x vector more (x traffic from L1 is m / rows times
// the weight bytes) at the cost of registers. cuda_llama.cpp mirrors this to size the grid.
__host__ __device__ constexpr int rowsFor(int m) { return m <= 2 ? 2 : 4; }
static_assert(kMaxM * rowsFor(kMaxM) <= kThreads, "the final reduction uses one thread per output");

// 16 bytes of weights, read once: not kept in L1. volatile keeps the loads in program order, ahead of
// waitForInputs() and of their first use.
__device__ __forceinline__ uint4 loadStreaming(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// 16 bytes of x: an ordinary (coherent) load, cached in L1, where every CTA of the SM finds it again. Not the
// non-coherent path (ld.global.nc): under programmatic dependent launch the previous kernel writes x during
// this kernel's lifetime. volatile keeps it after waitForInputs().
__device__ __forceinline__ uint4 loadInput(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

using tandem_pdl::letDependentsLaunch;
using tandem_pdl::waitForInputs;

// Eight bf16 (one 16-byte vector) to fp32, in order.
__device__ __forceinline__ void unpack(const uint4& v, float* f) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(u[i] << 16);
    f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ float warpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The whole kernel for batch M, ROWS weight rows per CTA, THREADS threads per CTA, UNROLL loads per row in
// flight. The micro benchmark instantiates other geometries to compare; the engine's are the entry points below.
// Plain: out is y (fp32, m x n). SWIGLU: n is inter, w has 2 n rows, out is act (bf16, m x n); the CTA's first
// ROWS / 2 rows are gate rows, the others the matching up rows.
template <int M, int ROWS, int THREADS, int UNROLL, bool SWIGLU = false>
__device__ __forceinline__ void gemv(const bf16* x, const bf16* __restrict__ w, void* __restrict__ out, int n,
                                     int k) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "THREADS must be whole warps");
  static_assert(M * ROWS <= THREADS, "the final reduction uses one thread per output");
  static_assert(!SWIGLU || ROWS % 2 == 0, "SwiGLU pairs gate and up rows");
  constexpr int kWarps = THREADS / 32;
  constexpr int kOutputs = SWIGLU ? ROWS / 2 : ROWS;  // outputs per batch row and row group
  __shared__ float partial[kWarps][M * ROWS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool vectors = (k & 7) == 0 && ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w)) & 15) == 0;
  const int kv = vectors ? k >> 3 : 0;  // 16-byte vectors per row; the scalar loop does elements [8 kv, k)
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  letDependentsLaunch();
  bool waited = false;  // x is read and out written only after waitForInputs()

  for (int row0 = blockIdx.x * kOutputs; row0 < n; row0 += gridDim.x * kOutputs) {
    float acc[M][ROWS];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[m][r] = 0.0f;
    size_t rowOffset[ROWS];  // outputs past n read row n - 1 (valid memory) and are not written
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int o = r % kOutputs, up = r / kOutputs;  // SwiGLU: up rows follow the inter gate rows
      rowOffset[r] = ((size_t)up * n + min(row0 + o, n - 1)) * k;
    }

    for (int v0 = tid; v0 < kv; v0 += THREADS * UNROLL) {
      uint4 wv[UNROLL][ROWS];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int v = v0 + u * THREADS;
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
          wv[u][r] = v < kv ? loadStreaming(reinterpret_cast<const uint4*>(w + rowOffset[r]) + v) : make_uint4(0, 0, 0, 0);
      }
      if (!waited) {
        waitForInputs();
        waited = true;
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int v = v0 + u * THREADS;
        if (v < kv) {
          float wf[ROWS][8];
#pragma unroll
          for (int r = 0; r < ROWS; ++r) unpack(wv[u][r], wf[r]);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            float xf[8];
            unpack(loadInput(xv + (size_t)m * kv + v), xf);
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[m][r] = fmaf(wf[r][e], xf[e], acc[m][r]);
          }
        }
      }
    }
    if (!waited) {  // no vector work for this thread
      waitForInputs();
      waited = true;
    }
    for (int e = kv * 8 + tid; e < k; e += THREADS) {
      float wf[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) wf[r] = __bfloat162float(w[rowOffset[r] + e]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float xf = __bfloat162float(x[(size_t)m * k + e]);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[m][r] = fmaf(wf[r], xf, acc[m][r]);
      }
    }

#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float s = warpSum(acc[m][r]);
        if (lane == 0) partial[warp][m * ROWS + r] = s;
      }
    __syncthreads();
    if (tid < M * ROWS) {
      const int m = tid / ROWS, r = tid % ROWS;
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < kWarps; ++i) s += partial[i][tid];
      if (!SWIGLU && row0 + r < n) static_cast<float*>(out)[(size_t)m * n + row0 + r] = s;
      if (SWIGLU) partial[0][tid] = s;  // only this thread reads column tid
    }
    if (SWIGLU) {
      __syncthreads();
      if (tid < M * kOutputs) {
        const int m = tid / kOutputs, o = tid % kOutputs;
        const float g = partial[0][m * ROWS + o], u = partial[0][m * ROWS + kOutputs + o];
        if (row0 + o < n)
          static_cast<bf16*>(out)[(size_t)m * n + row0 + o] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
      }
    }
    __syncthreads();  // partial is reused by the next row group
  }
}

}  // namespace tandem_gemv

// tandem_gemv_m<M>(x, w, y, n, k): block tandem_gemv::kThreads, grid ceil(n / rowsFor(M)).
// tandem_gemv_swiglu_m<M>(x, w, act, inter, k): block tandem_gemv::kThreads, grid ceil(inter / (rowsFor(M) / 2)).
// Any grid is correct (the CTAs stride over row groups); these give each CTA one group.
#define TANDEM_GEMV_ENTRY(M)                                                                                         \
  extern "C" __global__ void __launch_bounds__(tandem_gemv::kThreads)                                               \
      tandem_gemv_m##M(const __nv_bfloat16* x, const __nv_bfloat16* __restrict__ w,                                 \
                       float* __restrict__ y, int n, int k) {                                                       \
    tandem_gemv::gemv<M, tandem_gemv::rowsFor(M), tandem_gemv::kThreads, tandem_gemv::kUnroll>(x, w, y, n, k);      \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(tandem_gemv::kThreads)                                               \
      tandem_gemv_swiglu_m##M(const __nv_bfloat16* x, const __nv_bfloat16* __restrict__ w,                          \
                              __nv_bfloat16* __restrict__ act, int inter, int k) {                                  \
    tandem_gemv::gemv<M, tandem_gemv::rowsFor(M), tandem_gemv::kThreads, tandem_gemv::kUnroll, true>(x, w, act,      \
                                                                                                    inter, k);      \
  }
TANDEM_GEMV_ENTRY(1)
TANDEM_GEMV_ENTRY(2)
TANDEM_GEMV_ENTRY(3)
TANDEM_GEMV_ENTRY(4)
TANDEM_GEMV_ENTRY(5)
TANDEM_GEMV_ENTRY(6)
TANDEM_GEMV_ENTRY(7)
TANDEM_GEMV_ENTRY(8)
TANDEM_GEMV_ENTRY(9)
TANDEM_GEMV_ENTRY(10)
TANDEM_GEMV_ENTRY(11)
TANDEM_GEMV_ENTRY(12)
TANDEM_GEMV_ENTRY(13)
TANDEM_GEMV_ENTRY(14)
TANDEM_GEMV_ENTRY(15)
TANDEM_GEMV_ENTRY(16)
#undef TANDEM_GEMV_ENTRY
