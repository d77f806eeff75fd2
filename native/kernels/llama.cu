// The reference engine's GPU kernels (native/src/engine/cuda_llama.cpp drives them; cuBLAS does the GEMMs).
// Weights and the KV pool are bf16; the residual stream, GEMM outputs (but gate_up's, bf16 by default) and every
// reduction are fp32.
//
// The paged KV pool is lib/kv's: tiles of blockSize x numKvHeads x headDim (NHD) bf16 values, one per
// (block, layer, K-or-V). Block-major: tile index (block * numLayers + layer) * 2 + kv; layer-major:
// (layer * 2 + kv) * numBlocks + block.
#include <cuda_bf16.h>
#include <stdint.h>

#include "pdl.cuh"

// Channels per block of tandem_llama_silu_mul (the engine's kSiluMulChunk, cuda_llama.h, must be the same).
#define TANDEM_SILU_MUL_CHUNK 1024

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
// One row of it, a scalar element per thread per step: xr (+= dr where given), then o. Also add_rmsnorm2's path for
// a hidden size that is not a multiple of 4.
__device__ void addRmsNormRow(float* xr, const float* dr, const bf16* w, int hidden, float eps, bf16* o) {
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
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = __float2bfloat16(__bfloat162float(w[i]) * (xr[i] * scale));
}

extern "C" __global__ void tandem_llama_add_rmsnorm(float* x, const float* delta, const bf16* w, int hidden, float eps,
                                                    const int32_t* rows, bf16* out) {
  tandem_pdl::letDependentsLaunch();  // the GEMV after it streams its weights meanwhile (pdl.cuh)
  size_t s = rows ? (size_t)rows[blockIdx.x] : blockIdx.x;
  addRmsNormRow(x + s * hidden, delta ? delta + s * hidden : nullptr, w, hidden, eps,
                out + (size_t)blockIdx.x * hidden);
}

// y[r, :] += bias. Grid: rows.
extern "C" __global__ void tandem_llama_add_bias(float* y, const bf16* bias, int n) {
  float* row = y + (size_t)blockIdx.x * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] += __bfloat162float(bias[i]);
}

// RoPE on the q and k heads of each token's qkv row (transformers' rotate_half: the two halves of a head are
// the pair's coordinates), in place, then the token's K and V (bf16) into its slot of the pool.
// qkv row: numHeads q heads, numKvHeads k heads, numKvHeads v heads, headDim each. Grid: ntok.
// Token blockIdx.x; blockIdx.y < numHeads + numKvHeads rotates that head (and writes a k head into the pool),
// the last y copies v: launched as (tokens, numHeads + numKvHeads + 1) blocks, so a decode batch fills the GPU
// (one block per token took 19.5 us a layer at 64 tokens on an H100, ncu).
extern "C" __global__ void tandem_llama_rope_kv(float* qkv, const int32_t* positions, const int32_t* tokenBlocks,
                                                const float* invFreq, int numHeads, int numKvHeads, int headDim,
                                                bf16* pool, int layer, int numLayers, int numBlocks, int blockSize,
                                                int blockMajor) {
  const int t = blockIdx.x, h = blockIdx.y, half = headDim / 2;
  const int kvDim = numKvHeads * headDim, qDim = numHeads * headDim;
  float* row = qkv + (size_t)t * (qDim + 2 * kvDim);
  const int p = positions[t], block = tokenBlocks[t];
  const size_t tile = (size_t)blockSize * kvDim;
  if (h == numHeads + numKvHeads) {
    bf16* v = pool + kvTile(layer, 1, block, numLayers, numBlocks, blockMajor) * tile + (size_t)(p % blockSize) * kvDim;
    const float* vrow = row + qDim + kvDim;
    for (int i = threadIdx.x; i < kvDim; i += blockDim.x) v[i] = __float2bfloat16(vrow[i]);
    return;
  }
  bf16* k = pool + kvTile(layer, 0, block, numLayers, numBlocks, blockMajor) * tile + (size_t)(p % blockSize) * kvDim;
  float* head = row + h * headDim;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float angle = (float)p * invFreq[i];
    float c = cosf(angle), s = sinf(angle);
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
}

// ---- TANDEM_ELEMENTWISE=2: rope_kv and add_rmsnorm at the copy rate (opt-in until measured) -------------------
//
// Four bf16 (8 bytes) from four floats, each rounded to nearest even as __float2bfloat16 does.
__device__ __forceinline__ uint2 bf16x4(float a, float b, float c, float d) {
  uint2 v;
  __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&v);
  p[0] = __floats2bfloat162_rn(a, b);
  p[1] = __floats2bfloat162_rn(c, d);
  return v;
}

// tandem_llama_rope_kv's contract and results, bit for bit (the same cosf / sinf of the same float angle, the same
// expressions per pair), with fewer, wider accesses: a block takes one token and kRope2Heads of its q and k heads
// (the last block of the token also copies V), computes the token's cos / sin once per pair index into shared
// memory for all of them, and moves four pairs per thread in float4 loads and stores of qkv and 8-byte bf16 stores
// to the pool where headDim % 8 == 0 (rows, heads and halves then stay 16-byte aligned); one pair at a time
// otherwise. Grid: (tokens, ceil((numHeads + numKvHeads) / kRope2Heads)); block: kRope2Threads. headDim <= 2 *
// kRope2MaxHalf.
// bias (the q / k / v projection's, one qkv row of bf16; null: none) is added to each value as it is read, as
// tandem_llama_add_bias before it would (the same float sums): q and k heads come out biased and rotated, V's pool
// slot holds the bf16 of v + bias, and the row's v part stays as the GEMM wrote it (nothing reads it afterwards).
constexpr int kRope2Heads = 8;

// v += bias[0 .. 3] (bf16), as tandem_llama_add_bias adds one element.
__device__ __forceinline__ void addBias4(float4& v, const bf16* bias) {
  const uint2 raw = *reinterpret_cast<const uint2*>(bias);
  const float2 b01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 b23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  v.x += b01.x, v.y += b01.y, v.z += b23.x, v.w += b23.y;
}
constexpr int kRope2Threads = 128;
constexpr int kRope2MaxHalf = 256;

extern "C" __global__ void __launch_bounds__(kRope2Threads)
    tandem_llama_rope_kv2(float* qkv, const int32_t* positions, const int32_t* tokenBlocks, const float* invFreq,
                          int numHeads, int numKvHeads, int headDim, bf16* pool, int layer, int numLayers,
                          int numBlocks, int blockSize, int blockMajor, const bf16* bias) {
  __shared__ __align__(16) float ropeCos[kRope2MaxHalf];
  __shared__ __align__(16) float ropeSin[kRope2MaxHalf];
  const int t = blockIdx.x, half = headDim / 2;
  const int kvDim = numKvHeads * headDim, qDim = numHeads * headDim;
  const int h0 = blockIdx.y * kRope2Heads, heads = min(kRope2Heads, numHeads + numKvHeads - h0);
  float* row = qkv + (size_t)t * (qDim + 2 * kvDim);
  const int p = positions[t], block = tokenBlocks[t];
  const size_t tile = (size_t)blockSize * kvDim, slot = (size_t)(p % blockSize) * kvDim;
  bf16* k = pool + kvTile(layer, 0, block, numLayers, numBlocks, blockMajor) * tile + slot;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = (float)p * invFreq[i];
    ropeCos[i] = cosf(angle);
    ropeSin[i] = sinf(angle);
  }
  __syncthreads();
  if ((headDim & 7) == 0) {
    const int quads = half / 4;  // four pairs (i .. i + 3 and their partners i + half ..) per step
    for (int e = threadIdx.x; e < heads * quads; e += blockDim.x) {
      const int h = h0 + e / quads, i = 4 * (e % quads);
      float* head = row + h * headDim;
      float4 a = *reinterpret_cast<const float4*>(head + i), b = *reinterpret_cast<const float4*>(head + i + half);
      if (bias) addBias4(a, bias + h * headDim + i), addBias4(b, bias + h * headDim + i + half);
      const float4 c = *reinterpret_cast<const float4*>(ropeCos + i), s = *reinterpret_cast<const float4*>(ropeSin + i);
      float4 ra, rb;
      ra.x = a.x * c.x - b.x * s.x, rb.x = b.x * c.x + a.x * s.x;
      ra.y = a.y * c.y - b.y * s.y, rb.y = b.y * c.y + a.y * s.y;
      ra.z = a.z * c.z - b.z * s.z, rb.z = b.z * c.z + a.z * s.z;
      ra.w = a.w * c.w - b.w * s.w, rb.w = b.w * c.w + a.w * s.w;
      *reinterpret_cast<float4*>(head + i) = ra;
      *reinterpret_cast<float4*>(head + i + half) = rb;
      if (h >= numHeads) {
        bf16* kh = k + (h - numHeads) * headDim;
        *reinterpret_cast<uint2*>(kh + i) = bf16x4(ra.x, ra.y, ra.z, ra.w);
        *reinterpret_cast<uint2*>(kh + i + half) = bf16x4(rb.x, rb.y, rb.z, rb.w);
      }
    }
  } else {
    for (int e = threadIdx.x; e < heads * half; e += blockDim.x) {
      const int h = h0 + e / half, i = e % half;
      float* head = row + h * headDim;
      const float c = ropeCos[i], s = ropeSin[i];
      float a = head[i], b = head[i + half];
      if (bias) a += __bfloat162float(bias[h * headDim + i]), b += __bfloat162float(bias[h * headDim + i + half]);
      const float ra = a * c - b * s, rb = b * c + a * s;
      head[i] = ra;
      head[i + half] = rb;
      if (h >= numHeads) {
        const int off = (h - numHeads) * headDim;
        k[off + i] = __float2bfloat16(ra);
        k[off + i + half] = __float2bfloat16(rb);
      }
    }
  }
  if (blockIdx.y == gridDim.y - 1) {
    bf16* v = pool + kvTile(layer, 1, block, numLayers, numBlocks, blockMajor) * tile + slot;
    const float* vrow = row + qDim + kvDim;
    const bf16* vbias = bias ? bias + qDim + kvDim : nullptr;
    if ((headDim & 7) == 0) {
      for (int i = 4 * threadIdx.x; i < kvDim; i += 4 * blockDim.x) {
        float4 f = *reinterpret_cast<const float4*>(vrow + i);
        if (vbias) addBias4(f, vbias + i);
        *reinterpret_cast<uint2*>(v + i) = bf16x4(f.x, f.y, f.z, f.w);
      }
    } else {
      for (int i = threadIdx.x; i < kvDim; i += blockDim.x)
        v[i] = __float2bfloat16(vbias ? vrow[i] + __bfloat162float(vbias[i]) : vrow[i]);
    }
  }
}

// tandem_llama_add_rmsnorm's contract (output row r on residual row rows ? rows[r] : r, x += delta in place when
// delta is given, out = w * x / rms) in float4 loads and stores of x and delta and 8-byte bf16 loads and stores of
// w and out where hidden % 4 == 0, one element at a time otherwise. x comes out bit for bit as there; the sum of
// squares adds in another order, so out may differ in its last bf16 place. A thread keeps its first
// kNorm2Vecs float4s of the row in registers for the second pass (all of it up to hidden 4 * blockDim: Llama 8B's
// 4096) and reads any others again: two blocks of 1024 threads fit a multiprocessor at 32 registers, which two
// kept float4s already overflow into local memory (ptxas, sm_90a). Grid: output rows; block: normThreads(hidden)
// (hidden / 4 up to 1024, cuda_llama.cpp), so a decode row is one pass of one float4 per thread.
constexpr int kNorm2Vecs = 1;

// w * (x * scale) of four elements, rounded to bf16 (the expression of tandem_llama_add_rmsnorm).
__device__ __forceinline__ uint2 normQuad(float4 v, uint2 w4, float scale) {
  const float2 w01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w4.x));
  const float2 w23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w4.y));
  return bf16x4(w01.x * (v.x * scale), w01.y * (v.y * scale), w23.x * (v.z * scale), w23.y * (v.w * scale));
}

// Four residual values x4[i] (+= d4[i], written back, where there is a delta).
__device__ __forceinline__ float4 addQuad(float4* x4, const float4* d4, int i) {
  float4 v = x4[i];
  if (d4) {
    const float4 d = d4[i];
    v.x += d.x, v.y += d.y, v.z += d.z, v.w += d.w;
    x4[i] = v;
  }
  return v;
}

extern "C" __global__ void __launch_bounds__(1024, 2)
    tandem_llama_add_rmsnorm2(float* x, const float* delta, const bf16* w, int hidden, float eps, const int32_t* rows,
                              bf16* out) {
  tandem_pdl::letDependentsLaunch();  // the GEMV after it streams its weights meanwhile (pdl.cuh)
  const size_t s = rows ? (size_t)rows[blockIdx.x] : blockIdx.x;
  float* xr = x + s * hidden;
  const float* dr = delta ? delta + s * hidden : nullptr;
  bf16* o = out + (size_t)blockIdx.x * hidden;
  if (hidden & 3) {
    addRmsNormRow(xr, dr, w, hidden, eps, o);
    return;
  }
  const int n4 = hidden / 4, stride = blockDim.x;
  float4* x4 = reinterpret_cast<float4*>(xr);
  const float4* d4 = reinterpret_cast<const float4*>(dr);
  float4 kept[kNorm2Vecs];
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < kNorm2Vecs; ++j) {
    const int i = threadIdx.x + j * stride;
    if (i < n4) {
      const float4 v = addQuad(x4, d4, i);
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      kept[j] = v;
    }
  }
  for (int i = threadIdx.x + kNorm2Vecs * stride; i < n4; i += stride) {
    const float4 v = addQuad(x4, d4, i);
    ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  const float scale = rsqrtf(blockSum(ss) / (float)hidden + eps);
  const uint2* w4 = reinterpret_cast<const uint2*>(w);
  uint2* o4 = reinterpret_cast<uint2*>(o);
#pragma unroll
  for (int j = 0; j < kNorm2Vecs; ++j) {
    const int i = threadIdx.x + j * stride;
    if (i < n4) o4[i] = normQuad(kept[j], w4[i], scale);
  }
  for (int i = threadIdx.x + kNorm2Vecs * stride; i < n4; i += stride) o4[i] = normQuad(x4[i], w4[i], scale);
}

// Paged attention for prefill chunks and decode alike: query token t, head h attends over positions
// (p - window, p] of its sequence (all of 0..p without a window), K and V read from the pool through the
// sequence's block table; GQA maps q head h to kv head h / (numHeads / numKvHeads).
// Each of the block's warps takes every nw-th key with an online softmax (running max, sum and weighted V per
// lane's dims); the warps are merged at the end. Grid: (ntok, numHeads); block: nw * 32 threads, nw <= 16 (the
// host uses 16 for decode-sized batches, where one query's keys are all the work, and 4 for large prefills).
// headDim <= 256.
constexpr int kAttnWarps = 16;
constexpr int kMaxDimsPerLane = 8;

extern "C" __global__ void __launch_bounds__(kAttnWarps * 32)
    tandem_llama_attention(const float* qkv, const int32_t* positions, const int32_t* tokenSeqs,
                           const int32_t* blockTables, int maxBlocksPerSeq, const bf16* pool, int layer,
                           int numLayers, int numBlocks, int blockSize, int blockMajor, int numHeads, int numKvHeads,
                           int headDim, int slidingWindow, float scale, bf16* out) {
  __shared__ float wm[kAttnWarps], wl[kAttnWarps];
  __shared__ float wacc[kAttnWarps][kMaxDimsPerLane * 32];
  const int t = blockIdx.x, h = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
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
  for (int j = start + warp; j <= p; j += nw) {
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
    for (int w = 0; w < nw; ++w) M = fmaxf(M, wm[w]);
    float L = 0.0f, f[kAttnWarps];
    for (int w = 0; w < nw; ++w) {
      f[w] = wl[w] > 0.0f ? expf(wm[w] - M) : 0.0f;
      L += wl[w] * f[w];
    }
    bf16* o = out + (size_t)t * qDim + h * headDim;
    for (int i = 0; i < dims; ++i) {
      int d = lane + 32 * i;
      if (d >= headDim) break;
      float v = 0.0f;
      for (int w = 0; w < nw; ++w) v += wacc[w][d] * f[w];
      o[d] = __float2bfloat16(v / L);
    }
  }
}

// Paged attention for prefill: the same contract as tandem_llama_attention, organised for long prompts. A
// block takes one query token and one KV head, with one warp per query head of that head's GQA group; keys
// and values come through shared memory 32 at a time (one load serves the whole group). In a tile each lane
// scores one key against the warp's query (a full dot product, no per-key reduction), the warp updates its
// online softmax once per tile, then each lane accumulates its dims of V. Grid: (ntok, numKvHeads); block:
// (numHeads / numKvHeads) * 32 threads. Needs headDim even and <= kTiledMaxDim, group <= kTiledMaxGroup.
constexpr int kTiledKeys = 32;
constexpr int kTiledMaxDim = 128;
constexpr int kTiledMaxGroup = 16;

extern "C" __global__ void __launch_bounds__(kTiledMaxGroup * 32)
    tandem_llama_attention_tiled(const float* qkv, const int32_t* positions, const int32_t* tokenSeqs,
                                 const int32_t* blockTables, int maxBlocksPerSeq, const bf16* pool, int layer,
                                 int numLayers, int numBlocks, int blockSize, int blockMajor, int numHeads,
                                 int numKvHeads, int headDim, int slidingWindow, float scale, bf16* out) {
  constexpr int kRow = kTiledMaxDim + 2;  // padded row (bf16): lane j's reads of row j fall in distinct banks
  __shared__ float qs[kTiledMaxGroup][kTiledMaxDim];
  __shared__ __align__(16) bf16 ks[kTiledKeys][kRow];
  __shared__ __align__(16) bf16 vs[kTiledKeys][kRow];
  const int t = blockIdx.x, g = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nthreads = blockDim.x;
  const int group = numHeads / numKvHeads, h = g * group + warp;
  const int kvDim = numKvHeads * headDim, qDim = numHeads * headDim, half = headDim / 2;
  const float* q = qkv + (size_t)t * (qDim + 2 * kvDim) + h * headDim;
  for (int d = lane; d < headDim; d += 32) qs[warp][d] = q[d] * scale;
  const int p = positions[t];
  const int start = slidingWindow > 0 ? max(0, p - slidingWindow + 1) : 0;
  const int32_t* table = blockTables + (size_t)tokenSeqs[t] * maxBlocksPerSeq;
  const size_t tile = (size_t)blockSize * kvDim;
  const int dims = (headDim + 31) / 32;
  float acc[kTiledMaxDim / 32];
#pragma unroll
  for (int i = 0; i < kTiledMaxDim / 32; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int j0 = start - start % kTiledKeys; j0 <= p; j0 += kTiledKeys) {
    __syncthreads();  // the previous tile is consumed (and qs written, on the first pass)
    // Load keys j0 .. j0+31 that this query may see; others get zero V (their weight is 0).
    for (int e = threadIdx.x; e < kTiledKeys * half; e += nthreads) {
      int j = e / half, d2 = e % half, key = j0 + j;
      __nv_bfloat162 kv2, vv2;
      if (key >= start && key <= p) {
        int block = table[key / blockSize];
        size_t off = (size_t)(key % blockSize) * kvDim + (size_t)g * headDim + 2 * d2;
        kv2 = *reinterpret_cast<const __nv_bfloat162*>(
            pool + kvTile(layer, 0, block, numLayers, numBlocks, blockMajor) * tile + off);
        vv2 = *reinterpret_cast<const __nv_bfloat162*>(
            pool + kvTile(layer, 1, block, numLayers, numBlocks, blockMajor) * tile + off);
      } else {
        kv2 = __floats2bfloat162_rn(0.0f, 0.0f);
        vv2 = kv2;
      }
      *reinterpret_cast<__nv_bfloat162*>(&ks[j][2 * d2]) = kv2;
      *reinterpret_cast<__nv_bfloat162*>(&vs[j][2 * d2]) = vv2;
    }
    __syncthreads();
    const int key = j0 + lane;
    const bool valid = key >= start && key <= p;
    float sc = 0.0f;
    for (int d2 = 0; d2 < half; ++d2) {
      float2 k2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&ks[lane][2 * d2]));
      sc += qs[warp][2 * d2] * k2.x + qs[warp][2 * d2 + 1] * k2.y;
    }
    sc = valid ? sc : -INFINITY;
    const float mNew = fmaxf(m, warpMax(sc));
    const float correction = expf(m - mNew);  // m = -inf on the first tile: 0, and acc, l are 0
    const float w = valid ? expf(sc - mNew) : 0.0f;
    l = l * correction + warpSum(w);
#pragma unroll
    for (int i = 0; i < kTiledMaxDim / 32; ++i) acc[i] *= correction;
    for (int j = 0; j < kTiledKeys; ++j) {
      const float wj = __shfl_sync(0xffffffffu, w, j);
#pragma unroll
      for (int i = 0; i < kTiledMaxDim / 32; ++i) {
        int d = lane + 32 * i;
        if (i < dims && d < headDim) acc[i] += wj * __bfloat162float(vs[j][d]);
      }
    }
    m = mNew;
  }
  bf16* o = out + (size_t)t * qDim + h * headDim;
#pragma unroll
  for (int i = 0; i < kTiledMaxDim / 32; ++i) {
    int d = lane + 32 * i;
    if (i < dims && d < headDim) o[d] = __float2bfloat16(acc[i] / l);
  }
}

// act[t, i] = silu(gate) * up, gate and up from the fused gate_up GEMM output [ntok, 2 * inter]. Grid: ntok.
// Row blockIdx.x, channels [blockIdx.y * kSiluMulChunk, +kSiluMulChunk): launched as (rows, ceil(inter / chunk))
// blocks of 256 threads (siluMulGrid), so that a decode batch of 64 rows still fills the GPU (one block per row
// left it latency-bound: 48 us a layer at 64 x 14336 on an H100, ncu).
extern "C" __global__ void tandem_llama_silu_mul(const float* gateUp, int inter, bf16* act) {
  const float* g = gateUp + (size_t)blockIdx.x * 2 * inter;
  const float* u = g + inter;
  bf16* a = act + (size_t)blockIdx.x * inter;
  const int end = min(inter, (int)(blockIdx.y + 1) * TANDEM_SILU_MUL_CHUNK);
  for (int i = (int)blockIdx.y * TANDEM_SILU_MUL_CHUNK + threadIdx.x; i < end; i += blockDim.x) {
    float x = g[i];
    a[i] = __float2bfloat16(x / (1.0f + expf(-x)) * u[i]);
  }
}

// As tandem_llama_silu_mul, from a bf16 gate_up (the dense FFN's cuBLAS GEMM writes bf16 by default,
// TANDEM_GATEUP_BF16: half the bytes through HBM of the fp32 one, and the rounding transformers does too); same
// grid. Four channels per thread in one 8-byte load each of gate and up where the row allows it (inter a multiple
// of 4: rows and halves stay 8-byte aligned), one at a time otherwise. silu in fp32 of the rounded gate, then one
// rounding of the product.
extern "C" __global__ void tandem_llama_silu_mul_bf16(const bf16* gateUp, int inter, bf16* act) {
  const bf16* g = gateUp + (size_t)blockIdx.x * 2 * inter;
  const bf16* u = g + inter;
  bf16* a = act + (size_t)blockIdx.x * inter;
  const int begin = (int)blockIdx.y * TANDEM_SILU_MUL_CHUNK;
  const int end = min(inter, begin + TANDEM_SILU_MUL_CHUNK);
  if ((inter & 3) == 0) {
    for (int i = begin + 4 * (int)threadIdx.x; i < end; i += 4 * (int)blockDim.x) {
      const uint2 gv = *reinterpret_cast<const uint2*>(g + i), uv = *reinterpret_cast<const uint2*>(u + i);
      const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&gv);
      const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&uv);
      uint2 out;
      __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&out);
      for (int j = 0; j < 2; ++j) {
        const float2 x = __bfloat1622float2(g2[j]), y = __bfloat1622float2(u2[j]);
        o2[j] = __floats2bfloat162_rn(x.x / (1.0f + expf(-x.x)) * y.x, x.y / (1.0f + expf(-x.y)) * y.y);
      }
      *reinterpret_cast<uint2*>(a + i) = out;
    }
    return;
  }
  for (int i = begin + (int)threadIdx.x; i < end; i += blockDim.x) {
    const float x = __bfloat162float(g[i]);
    a[i] = __float2bfloat16(x / (1.0f + expf(-x)) * __bfloat162float(u[i]));
  }
}

// ---- Sampling support: candidates, sums and the plain draw over rows of fp32 logits (nseq x V) ----------
//
// lib/engine/sampler.ts defines sampling; these kernels give it what it needs without copying whole rows of
// logits to the host: the row's best tokens in order (larger logit first, ties to the lower id), the sums
// of exp((logit - max) / T) and exp(logit - max), and the draw by inverse CDF in vocabulary order for the
// plain temperature case (the uniform comes from the host, so a seed gives the same draw as on the CPU).
// NaN logits count as -inf.

namespace tandem_sample {

constexpr int kChunk = 8192;     // logits per block in the first pass (32 KiB of shared memory)
constexpr int kMerge = 4096;     // candidates the second pass can merge (chunks x n)
constexpr int kThreads = 512;    // both kernels
constexpr int kFlagLse = 1, kFlagExpSum = 2, kFlagPlain = 4, kFlagTopP = 8;

// a ranks before b. id < 0 is "no candidate" and ranks last.
__device__ __forceinline__ bool before(float av, int ai, float bv, int bi) {
  if (ai < 0) return false;
  if (bi < 0) return true;
  return av > bv || (av == bv && ai < bi);
}

// The best (v, id) over the block; every thread gets it. blockDim.x == kThreads.
__device__ void blockBest(float& v, int& id) {
  __shared__ float sv[33];
  __shared__ int si[33];
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_down_sync(0xffffffffu, v, o);
    int oi = __shfl_down_sync(0xffffffffu, id, o);
    if (before(ov, oi, v, id)) v = ov, id = oi;
  }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sv[warp] = v, si[warp] = id;
  __syncthreads();
  if (warp == 0) {
    v = lane < (int)(blockDim.x >> 5) ? sv[lane] : -INFINITY;
    id = lane < (int)(blockDim.x >> 5) ? si[lane] : -1;
    for (int o = 16; o > 0; o >>= 1) {
      float ov = __shfl_down_sync(0xffffffffu, v, o);
      int oi = __shfl_down_sync(0xffffffffu, id, o);
      if (before(ov, oi, v, id)) v = ov, id = oi;
    }
    if (lane == 0) sv[32] = v, si[32] = id;
  }
  __syncthreads();
  v = sv[32];
  id = si[32];
  __syncthreads();
}

__device__ double blockSumD(double v) {
  __shared__ double partial[32];
  __shared__ double total;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double s = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) total = s;
  }
  __syncthreads();
  double out = total;
  __syncthreads();
  return out;
}

// Selects the n best of vals[0 .. len) (ids ids[i], or base + i when ids is null) into outV/outI, best first;
// entries past the last candidate get id -1. Taken entries are overwritten with NaN in vals.
__device__ void selectBest(float* vals, const int* ids, int base, int len, int n, float* outV, int* outI) {
  float bv = -INFINITY;
  int bi = -1;
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    float x = vals[i];
    int id = ids ? ids[i] : base + i;
    if (x == x && before(x, id, bv, bi)) bv = x, bi = id;
  }
  for (int k = 0; k < n; ++k) {
    float v = bv;
    int id = bi;
    blockBest(v, id);
    if (threadIdx.x == 0) outV[k] = v, outI[k] = id;
    if (id < 0) {
      for (int j = k + 1 + threadIdx.x; j < n; j += blockDim.x) outV[j] = -INFINITY, outI[j] = -1;
      return;
    }
    if (bi == id) {  // this thread held the winner: take it out and find its next best
      bv = -INFINITY;
      bi = -1;
      for (int i = threadIdx.x; i < len; i += blockDim.x) {
        int cid = ids ? ids[i] : base + i;
        if (cid == id) vals[i] = NAN;
        float x = vals[i];
        if (x == x && before(x, cid, bv, bi)) bv = x, bi = cid;
      }
    }
  }
}

}  // namespace tandem_sample

// Pass 1: the rowN[row] best logits of each kChunk-wide chunk of each row. Grid: nseq x chunks; kThreads.
// cand: nseq x chunks x maxN (values and ids). Rows with rowN <= 0 are skipped.
extern "C" __global__ void __launch_bounds__(tandem_sample::kThreads)
    tandem_sample_chunk_top(const float* logits, int V, const int32_t* rowN, int maxN, float* candV, int32_t* candI) {
  using namespace tandem_sample;
  __shared__ float vals[kChunk];
  int row = blockIdx.x, chunk = blockIdx.y, n = rowN[row];
  if (n <= 0) return;
  int start = chunk * kChunk, len = min(kChunk, V - start);
  const float* r = logits + (size_t)row * V + start;
  for (int i = threadIdx.x; i < len; i += blockDim.x) {
    float x = r[i];
    vals[i] = x == x ? x : -INFINITY;
  }
  __syncthreads();
  size_t at = ((size_t)row * gridDim.y + chunk) * maxN;
  selectBest(vals, nullptr, start, len, n, candV + at, candI + at);
}

// Pass 2, one block per row: merges the chunks' candidates into the row's n best (outV/outI: nseq x maxN),
// then by flags: lse (log-sum-exp of the raw logits), expSum (sum of exp((l - max) * invT)), plain (the
// inverse-CDF draw in vocabulary order at u), topP (flags the row when its n candidates may not reach
// topP of expSum, so that the host copies the whole row).
// outInts: nseq x 4 (best id, drawn id, needs the whole row, 0); outD: nseq x 4 (max, expSum, lse, drawn logit).
extern "C" __global__ void __launch_bounds__(tandem_sample::kThreads)
    tandem_sample_finish(const float* logits, int V, int chunks, int maxN, const float* candV, const int32_t* candI,
                         const int32_t* rowN, const int32_t* rowFlags, const double* rowInvT, const double* rowTopP,
                         const double* rowU, float* outV, int32_t* outI, int32_t* outInts, double* outD) {
  using namespace tandem_sample;
  __shared__ float mv[kMerge];
  __shared__ int mi[kMerge];
  __shared__ double partial[kThreads];
  __shared__ double prefix[kThreads + 1];
  __shared__ int drawn;
  int row = blockIdx.x, n = rowN[row], flags = rowFlags[row];
  float* topV = outV + (size_t)row * maxN;
  int32_t* topI = outI + (size_t)row * maxN;
  for (int j = max(n, 0) + threadIdx.x; j < maxN; j += blockDim.x) topV[j] = -INFINITY, topI[j] = -1;
  if (n <= 0) {  // not sampled this step
    if (threadIdx.x < 4) outInts[(size_t)row * 4 + threadIdx.x] = threadIdx.x < 2 ? -1 : 0;
    if (threadIdx.x < 4) outD[(size_t)row * 4 + threadIdx.x] = 0;
    return;
  }
  int m = chunks * n;
  for (int i = threadIdx.x; i < m; i += blockDim.x) {
    size_t at = ((size_t)row * chunks + i / n) * maxN + i % n;
    mv[i] = candI[at] < 0 ? NAN : candV[at];
    mi[i] = candI[at];
  }
  __syncthreads();
  selectBest(mv, mi, 0, m, n, topV, topI);
  __syncthreads();
  const float* r = logits + (size_t)row * V;
  const double mx = topV[0];
  const int best = topI[0];
  double invT = rowInvT[row], lse = 0, expSum = 0, drawnLogit = 0;
  int drawnId = best, needFull = 0;
  const bool finite = mx > -INFINITY;
  if ((flags & kFlagLse) && finite) {
    double s = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      float x = r[i];
      if (x == x) s += exp((double)x - mx);
    }
    lse = mx + log(blockSumD(s));
  }
  if ((flags & (kFlagExpSum | kFlagPlain | kFlagTopP)) && finite) {
    // Contiguous ranges per thread, so that the draw below walks the vocabulary in order.
    int per = (V + blockDim.x - 1) / blockDim.x, lo = min(V, (int)threadIdx.x * per), hi = min(V, lo + per);
    double s = 0;
    for (int i = lo; i < hi; ++i) {
      float x = r[i];
      if (x == x) s += exp(((double)x - mx) * invT);
    }
    partial[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      double acc = 0;
      for (int t = 0; t < (int)blockDim.x; ++t) prefix[t] = acc, acc += partial[t];
      prefix[blockDim.x] = acc;
      drawn = -1;
    }
    __syncthreads();
    expSum = prefix[blockDim.x];
    if (flags & kFlagPlain) {
      double target = rowU[row] * expSum;
      if (s > 0 && prefix[threadIdx.x] <= target && target < prefix[threadIdx.x] + s) {
        double acc = prefix[threadIdx.x];
        int last = -1, pick = -1;
        for (int i = lo; i < hi; ++i) {
          float x = r[i];
          double w = x == x ? exp(((double)x - mx) * invT) : 0.0;
          if (w > 0) last = i;
          acc += w;
          if (acc > target) {
            pick = i;
            break;
          }
        }
        drawn = pick >= 0 ? pick : last;
      }
      __syncthreads();
      if (drawn < 0) {  // rounding put the target past the total: the last token with weight, as the host does
        __shared__ int lastWeighted;
        if (threadIdx.x == 0) lastWeighted = -1;
        __syncthreads();
        int last = -1;
        for (int i = lo; i < hi; ++i) {
          float x = r[i];
          if (x == x && exp(((double)x - mx) * invT) > 0) last = i;
        }
        if (last >= 0) atomicMax(&lastWeighted, last);
        __syncthreads();
        if (threadIdx.x == 0) drawn = lastWeighted < 0 ? best : lastWeighted;
        __syncthreads();
      }
      drawnId = drawn;
      drawnLogit = r[drawnId];
    }
    if ((flags & kFlagTopP) && threadIdx.x == 0) {
      // The host keeps the shortest prefix of the candidates whose weight reaches topP x expSum; when the n
      // candidates do not clearly reach it, it needs the whole row.
      double cum = 0;
      for (int k = 0; k < n && topI[k] >= 0; ++k) cum += exp(((double)topV[k] - mx) * invT);
      needFull = cum < rowTopP[row] * expSum * (1.0 + 1e-9) ? 1 : 0;
    }
  }
  if (threadIdx.x == 0) {
    int32_t* oi = outInts + (size_t)row * 4;
    oi[0] = best;
    oi[1] = drawnId;
    oi[2] = needFull;
    oi[3] = 0;
    double* od = outD + (size_t)row * 4;
    od[0] = mx;
    od[1] = expSum;
    od[2] = lse;
    od[3] = drawnLogit;
  }
}
