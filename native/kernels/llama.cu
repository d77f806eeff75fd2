// The reference engine's GPU kernels (native/src/engine/cuda_llama.cpp drives them; cuBLAS does the GEMMs).
// Weights and the KV pool are bf16; the residual stream, GEMM outputs and every reduction are fp32.
//
// The paged KV pool is lib/kv's: tiles of blockSize x numKvHeads x headDim (NHD) bf16 values, one per
// (block, layer, K-or-V). Block-major: tile index (block * numLayers + layer) * 2 + kv; layer-major:
// (layer * 2 + kv) * numBlocks + block.
#include <cuda_bf16.h>
#include <stdint.h>

namespace tandem_llama {

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float warpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float blockSum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warpSum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
    s = warpSum(s);
    if (lane == 0) total = s;
  }
  __syncthreads();
  float out = total;
  __syncthreads();  // partial and total may be reused by a later call
  return out;
}

__device__ __forceinline__ size_t kvTile(int layer, int kv, int block, int numLayers, int numBlocks, int blockMajor) {
  return blockMajor ? ((size_t)block * numLayers + layer) * 2 + kv : ((size_t)layer * 2 + kv) * numBlocks + block;
}

}  // namespace tandem_llama

using namespace tandem_llama;

// x[t, :] = table[tokens[t], :]. Grid: ntok.
extern "C" __global__ void tandem_llama_embed(const bf16* table, const int32_t* tokens, int hidden, float* x) {
  const bf16* row = table + (size_t)tokens[blockIdx.x] * hidden;
  float* out = x + (size_t)blockIdx.x * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = __bfloat162float(row[i]);
}

// Fused residual add + RMSNorm. Output row r works on residual row s = rows ? rows[r] : r:
//   if delta: x[s] += delta[s]
//   out[r] = w * (x[s] / sqrt(mean(x[s]^2) + eps))      (fp32, then rounded to bf16 for the next GEMM)
// Grid: output rows. rows lets the final norm take only each sequence's last token.
extern "C" __global__ void tandem_llama_add_rmsnorm(float* x, const float* delta, const bf16* w, int hidden, float eps,
                                                    const int32_t* rows, bf16* out) {
  size_t s = rows ? (size_t)rows[blockIdx.x] : blockIdx.x;
  float* xr = x + s * hidden;
  const float* dr = delta ? delta + s * hidden : nullptr;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = xr[i];
    if (dr) {
      v += dr[i];
      xr[i] = v;
    }
    ss += v * v;
  }
  float scale = rsqrtf(blockSum(ss) / (float)hidden + eps);
  bf16* o = out + (size_t)blockIdx.x * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = __float2bfloat16(__bfloat162float(w[i]) * (xr[i] * scale));
}

// y[r, :] += bias. Grid: rows.
extern "C" __global__ void tandem_llama_add_bias(float* y, const bf16* bias, int n) {
  float* row = y + (size_t)blockIdx.x * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] += __bfloat162float(bias[i]);
}

// RoPE on the q and k heads of each token's qkv row (transformers' rotate_half: the two halves of a head are
// the pair's coordinates), in place, then the token's K and V (bf16) into its slot of the pool.
// qkv row: numHeads q heads, numKvHeads k heads, numKvHeads v heads, headDim each. Grid: ntok.
extern "C" __global__ void tandem_llama_rope_kv(float* qkv, const int32_t* positions, const int32_t* tokenBlocks,
                                                const float* invFreq, int numHeads, int numKvHeads, int headDim,
                                                bf16* pool, int layer, int numLayers, int numBlocks, int blockSize,
                                                int blockMajor) {
  const int t = blockIdx.x, half = headDim / 2;
  const int kvDim = numKvHeads * headDim, qDim = numHeads * headDim;
  float* row = qkv + (size_t)t * (qDim + 2 * kvDim);
  const int p = positions[t], block = tokenBlocks[t];
  const size_t tile = (size_t)blockSize * kvDim;
  bf16* k = pool + kvTile(layer, 0, block, numLayers, numBlocks, blockMajor) * tile + (size_t)(p % blockSize) * kvDim;
  bf16* v = pool + kvTile(layer, 1, block, numLayers, numBlocks, blockMajor) * tile + (size_t)(p % blockSize) * kvDim;
  for (int idx = threadIdx.x; idx < (numHeads + numKvHeads) * half; idx += blockDim.x) {
    int h = idx / half, i = idx % half;
    float angle = (float)p * invFreq[i];
    float c = cosf(angle), s = sinf(angle);
    float* head = row + h * headDim;
    float a = head[i], b = head[i + half];
    float ra = a * c - b * s, rb = b * c + a * s;
    head[i] = ra;
    head[i + half] = rb;
    if (h >= numHeads) {
      int off = (h - numHeads) * headDim;
      k[off + i] = __float2bfloat16(ra);
      k[off + i + half] = __float2bfloat16(rb);
    }
  }
  const float* vrow = row + qDim + kvDim;
  for (int i = threadIdx.x; i < kvDim; i += blockDim.x) v[i] = __float2bfloat16(vrow[i]);
}

// Paged attention for prefill chunks and decode alike: query token t, head h attends over positions
// (p - window, p] of its sequence (all of 0..p without a window), K and V read from the pool through the
// sequence's block table; GQA maps q head h to kv head h / (numHeads / numKvHeads).
// Each warp takes every kWarps-th key with an online softmax (running max, sum and weighted V per lane's
// dims); the warps are merged at the end. Grid: (ntok, numHeads); block: kWarps * 32. headDim <= 256.
constexpr int kAttnWarps = 4;
constexpr int kMaxDimsPerLane = 8;

extern "C" __global__ void __launch_bounds__(kAttnWarps * 32)
    tandem_llama_attention(const float* qkv, const int32_t* positions, const int32_t* tokenSeqs,
                           const int32_t* blockTables, int maxBlocksPerSeq, const bf16* pool, int layer,
                           int numLayers, int numBlocks, int blockSize, int blockMajor, int numHeads, int numKvHeads,
                           int headDim, int slidingWindow, float scale, bf16* out) {
  __shared__ float wm[kAttnWarps], wl[kAttnWarps];
  __shared__ float wacc[kAttnWarps][kMaxDimsPerLane * 32];
  const int t = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kvDim = numKvHeads * headDim, qDim = numHeads * headDim;
  const int kvh = h / (numHeads / numKvHeads);
  const int dims = (headDim + 31) / 32;
  const float* q = qkv + (size_t)t * (qDim + 2 * kvDim) + h * headDim;
  float qv[kMaxDimsPerLane], acc[kMaxDimsPerLane];
#pragma unroll
  for (int j = 0; j < kMaxDimsPerLane; ++j) {
    int d = lane + 32 * j;
    qv[j] = (j < dims && d < headDim) ? q[d] * scale : 0.0f;
    acc[j] = 0.0f;
  }
  const int p = positions[t];
  const int start = slidingWindow > 0 ? max(0, p - slidingWindow + 1) : 0;
  const int32_t* table = blockTables + (size_t)tokenSeqs[t] * maxBlocksPerSeq;
  const size_t tile = (size_t)blockSize * kvDim;
  float m = -INFINITY, l = 0.0f;
  for (int j = start + warp; j <= p; j += kAttnWarps) {
    int block = table[j / blockSize];
    size_t off = (size_t)(j % blockSize) * kvDim + (size_t)kvh * headDim;
    const bf16* kr = pool + kvTile(layer, 0, block, numLayers, numBlocks, blockMajor) * tile + off;
    const bf16* vr = pool + kvTile(layer, 1, block, numLayers, numBlocks, blockMajor) * tile + off;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxDimsPerLane; ++i) {
      int d = lane + 32 * i;
      if (i < dims && d < headDim) s += qv[i] * __bfloat162float(kr[d]);
    }
    s = warpSum(s);
    float mNew = fmaxf(m, s);
    float correction = expf(m - mNew), weight = expf(s - mNew);
    l = l * correction + weight;
#pragma unroll
    for (int i = 0; i < kMaxDimsPerLane; ++i) {
      int d = lane + 32 * i;
      if (i < dims && d < headDim) acc[i] = acc[i] * correction + weight * __bfloat162float(vr[d]);
    }
    m = mNew;
  }
  if (lane == 0) {
    wm[warp] = m;
    wl[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kMaxDimsPerLane; ++i) wacc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  if (warp == 0) {
    float M = -INFINITY;
    for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, wm[w]);
    float L = 0.0f, f[kAttnWarps];
    for (int w = 0; w < kAttnWarps; ++w) {
      f[w] = wl[w] > 0.0f ? expf(wm[w] - M) : 0.0f;
      L += wl[w] * f[w];
    }
    bf16* o = out + (size_t)t * qDim + h * headDim;
    for (int i = 0; i < dims; ++i) {
      int d = lane + 32 * i;
      if (d >= headDim) break;
      float v = 0.0f;
      for (int w = 0; w < kAttnWarps; ++w) v += wacc[w][d] * f[w];
      o[d] = __float2bfloat16(v / L);
    }
  }
}

// act[t, i] = silu(gate) * up, gate and up from the fused gate_up GEMM output [ntok, 2 * inter]. Grid: ntok.
extern "C" __global__ void tandem_llama_silu_mul(const float* gateUp, int inter, bf16* act) {
  const float* g = gateUp + (size_t)blockIdx.x * 2 * inter;
  const float* u = g + inter;
  bf16* a = act + (size_t)blockIdx.x * inter;
  for (int i = threadIdx.x; i < inter; i += blockDim.x) {
    float x = g[i];
    a[i] = __float2bfloat16(x / (1.0f + expf(-x)) * u[i]);
  }
}
