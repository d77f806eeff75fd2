// The mixture-of-experts FFN of the GPU engine (issue 28; native/src/engine/cuda_moe.cpp drives these kernels,
// cuBLAS runs the router GEMM). Weights bf16, GEMM outputs and every reduction fp32, like llama.cu.
//
// One MoE layer over ntok tokens, P = ntok * topK (token, choice) pairs, pair p = t * topK + j:
//   route:    router logits [ntok, E] -> each token's topK experts and weights (softmax over all experts, the k
//             largest, ties to the lower expert, divided by their sum when the family renormalises); then each pair's
//             physical slot from the layer's routing table (expert e's replicas are slotList[slotStart[e] ..
//             slotStart[e + 1]), token t takes replica t mod replicas(e)): the rank's local slot when it holds that
//             slot, else -1 (another expert-parallel rank runs it); counts pairs per local slot (atomics into counts,
//             zeroed before the launch) and, into the layer's load counters, pairs per expert and pairs run here.
//             One rank without replicas: slot e holds expert e, every pair is local.
//   offsets:  one CTA: expert e's pairs are rows [offsets[e], offsets[e+1]) of the permuted buffers; its row tiles
//             of `tileRows` are tiles [tileStarts[e], tileStarts[e+1]) of the grouped GEMMs.
//   scatter:  each pair takes a row of its expert's range (an atomic cursor: the order within an expert is not
//             fixed, and need not be: a row's GEMM result does not depend on the rows beside it, and the combine
//             reads pairs by (token, choice)), and copies its token's normed hidden row there.
//   grouped GEMM (twice: gate_up, then down after llama.cu's tandem_llama_silu_mul): y[r, :] = x[r, :] . W_s^T for
//             the rows r of local slot s; tensor cores (WMMA bf16 16x16x16, fp32 accumulate). Every offset lives on
//             the device, so a decode step is captured in a CUDA graph with no host sync: the grid is sized for
//             the worst routing (ceil(P / tileRows) + min(E, P) row tiles) and surplus CTAs return at once.
//   combine:  out[t, :] = sum over token t's local pairs in ascending expert order of weight * y[row of the pair, :]
//             (the CPU engine's order, cpu_moe.cpp); pairs another rank runs add nothing (the ranks' outputs are
//             summed by the communicator after the layer).
//
// Shapes: hidden and the experts' intermediate size multiples of 16 (WMMA tiles; the host checks), at most
// kMaxExperts experts. "Experts" of the offsets and the grouped GEMMs are the rank's local slots. The permuted inputs of the grouped GEMMs have tileRows rows of padding past row P: a tile's
// last rows may read past its expert's rows (their results are never stored).
//
// Also here: Qwen3's per-head q/k RMSNorm (the attention of Qwen3-MoE, dense path), in place on the fp32 qkv rows
// before RoPE.
#include <cuda_bf16.h>
#include <mma.h>
#include <stdint.h>

namespace tandem_moe {

typedef __nv_bfloat16 bf16;

constexpr int kMaxExperts = 1024;
constexpr int kMaxTopK = 32;
constexpr int kExpertsPerLane = kMaxExperts / 32;

__device__ __forceinline__ float warpSumF(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warpMaxF(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The grouped GEMM's tile: a CTA of WarpsM x WarpsN warps, each FragsM x FragsN 16x16 fragments.
template <int WarpsM, int WarpsN, int FragsM, int FragsN>
__device__ __forceinline__ void groupedGemm(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                            unsigned long long expertStride, float* __restrict__ y,
                                            const int32_t* __restrict__ offsets,
                                            const int32_t* __restrict__ tileStarts, int numExperts, int n, int k) {
  using namespace nvcuda;
  constexpr int kTileRows = WarpsM * FragsM * 16, kTileCols = WarpsN * FragsN * 16;
  __shared__ __align__(128) float staging[WarpsM * WarpsN][16 * 16];  // store_matrix_sync wants 32-byte alignment
  const int tile = blockIdx.y;
  if (tile >= tileStarts[numExperts]) return;
  // The expert whose tiles hold this one: the last e with tileStarts[e] <= tile (experts without rows have none).
  int lo = 0, hi = numExperts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tileStarts[mid] <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int e = lo;
  const int rowEnd = offsets[e + 1];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = warp / WarpsN, wn = warp % WarpsN;
  const int row0 = offsets[e] + (tile - tileStarts[e]) * kTileRows + wm * FragsM * 16;
  const int col0 = blockIdx.x * kTileCols + wn * FragsN * 16;
  if (row0 >= rowEnd || col0 >= n) return;  // warp-uniform; no block-wide barrier follows
  const bf16* we = w + static_cast<unsigned long long>(e) * expertStride;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FragsM][FragsN];
#pragma unroll
  for (int i = 0; i < FragsM; ++i)
#pragma unroll
    for (int j = 0; j < FragsN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  bool colOk[FragsN];
#pragma unroll
  for (int j = 0; j < FragsN; ++j) colOk[j] = col0 + j * 16 < n;

  // Unrolled so that several k steps' fragment loads are in flight at once (decode is bound by reading w).
#pragma unroll 4
  for (int k0 = 0; k0 < k; k0 += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a[FragsM];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b[FragsN];
#pragma unroll
    for (int i = 0; i < FragsM; ++i)
      wmma::load_matrix_sync(a[i], x + static_cast<size_t>(row0 + i * 16) * k + k0, k);
#pragma unroll
    for (int j = 0; j < FragsN; ++j)
      if (colOk[j]) wmma::load_matrix_sync(b[j], we + static_cast<size_t>(col0 + j * 16) * k + k0, k);
#pragma unroll
    for (int i = 0; i < FragsM; ++i)
#pragma unroll
      for (int j = 0; j < FragsN; ++j)
        if (colOk[j]) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
  }
  float* s = staging[warp];
#pragma unroll
  for (int i = 0; i < FragsM; ++i)
#pragma unroll
    for (int j = 0; j < FragsN; ++j) {
      if (!colOk[j]) continue;
      wmma::store_matrix_sync(s, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int idx = lane; idx < 256; idx += 32) {
        const int r = row0 + i * 16 + idx / 16;
        if (r < rowEnd) y[static_cast<size_t>(r) * n + col0 + j * 16 + idx % 16] = s[idx];
      }
      __syncwarp();
    }
}

}  // namespace tandem_moe

// Routing, one warp per token: logits [ntok, numExperts] fp32 -> topIds / topWeights [ntok, topK] (best first),
// pairSlot [ntok, topK] (the local slot in [0, numSlots), or -1), counts[local slot] += its pairs, load[e] += pairs
// routed to expert e and load[numExperts] += pairs run here (uint64 counters the host reads and zeroes between
// passes). slotStart [numExperts + 1] / slotList: the layer's routing table (device memory, so a captured decode
// graph sees a new one); firstSlot: this rank's first slot. Grid: ceil(ntok / 4); block: 128.
extern "C" __global__ void __launch_bounds__(128)
    tandem_moe_route(const float* __restrict__ logits, int ntok, int numExperts, int topK, int normTopk,
                     const int32_t* __restrict__ slotStart, const int32_t* __restrict__ slotList, int firstSlot,
                     int numSlots, int32_t* __restrict__ topIds, float* __restrict__ topWeights,
                     int32_t* __restrict__ pairSlot, int32_t* __restrict__ counts,
                     unsigned long long* __restrict__ load) {
  using namespace tandem_moe;
  const int t = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (t >= ntok) return;
  const float* row = logits + static_cast<size_t>(t) * numExperts;
  float p[kExpertsPerLane];
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kExpertsPerLane; ++i) {
    const int e = lane + 32 * i;
    p[i] = e < numExperts ? row[e] : -INFINITY;
    m = fmaxf(m, p[i]);
  }
  m = warpMaxF(m);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kExpertsPerLane; ++i) {
    const int e = lane + 32 * i;
    p[i] = e < numExperts ? expf(p[i] - m) : 0.0f;
    sum += p[i];
  }
  sum = warpSumF(sum);
  const float inv = 1.0f / sum;
#pragma unroll
  for (int i = 0; i < kExpertsPerLane; ++i) p[i] = lane + 32 * i < numExperts ? p[i] * inv : -1.0f;
  float kept = 0.0f, mine = 0.0f;
  int myId = 0;
  for (int j = 0; j < topK; ++j) {
    // This lane's best unchosen expert, then the warp's (the larger probability; on a tie the lower expert).
    float best = -1.0f;
    int bestE = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < kExpertsPerLane; ++i)
      if (p[i] > best) best = p[i], bestE = lane + 32 * i;
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int oe = __shfl_xor_sync(0xffffffffu, bestE, o);
      if (ov > best || (ov == best && oe < bestE)) best = ov, bestE = oe;
    }
    if ((bestE & 31) == lane) {
#pragma unroll
      for (int i = 0; i < kExpertsPerLane; ++i)
        if (lane + 32 * i == bestE) p[i] = -1.0f;
    }
    kept += best;
    if (lane == j) mine = best, myId = bestE;
  }
  if (lane < topK) {
    const size_t at = static_cast<size_t>(t) * topK + lane;
    topIds[at] = myId;
    topWeights[at] = normTopk ? mine / kept : mine;
    // Every expert has a replica (the host checks the table), so replicas >= 1.
    const int first = slotStart[myId], replicas = slotStart[myId + 1] - first;
    const int slot = slotList[first + t % replicas] - firstSlot;
    const int local = slot >= 0 && slot < numSlots ? slot : -1;
    pairSlot[at] = local;
    atomicAdd(&load[myId], 1ull);
    if (local >= 0) {
      atomicAdd(&counts[local], 1);
      atomicAdd(&load[numExperts], 1ull);
    }
  }
}

// One CTA of one thread's work (numExperts <= kMaxExperts): offsets[0..E] (exclusive prefix of counts), tileStarts
// [0..E] (the prefix of ceil(counts[e] / tileRows)), and cursor[e] = offsets[e] for the scatter.
extern "C" __global__ void tandem_moe_offsets(const int32_t* __restrict__ counts, int numExperts, int tileRows,
                                              int32_t* __restrict__ offsets, int32_t* __restrict__ tileStarts,
                                              int32_t* __restrict__ cursor) {
  if (threadIdx.x != 0) return;
  int rows = 0, tiles = 0;
  for (int e = 0; e < numExperts; ++e) {
    offsets[e] = rows;
    tileStarts[e] = tiles;
    cursor[e] = rows;
    rows += counts[e];
    tiles += (counts[e] + tileRows - 1) / tileRows;
  }
  offsets[numExperts] = rows;
  tileStarts[numExperts] = tiles;
}

// Pair p (one CTA each) takes the next row of its local slot's range: pairRow[p] = that row, and xPerm[row, :] =
// xn[p / topK, :]; a pair another rank runs (pairSlot -1) gets row -1. Grid: P; block: 128.
extern "C" __global__ void tandem_moe_scatter(const int32_t* __restrict__ pairSlot, int topK,
                                              const tandem_moe::bf16* __restrict__ xn, int hidden,
                                              int32_t* __restrict__ cursor, int32_t* __restrict__ pairRow,
                                              tandem_moe::bf16* __restrict__ xPerm) {
  __shared__ int row;
  const int p = blockIdx.x;
  if (threadIdx.x == 0) {
    const int slot = pairSlot[p];
    row = slot < 0 ? -1 : atomicAdd(&cursor[slot], 1);
    pairRow[p] = row;
  }
  __syncthreads();
  if (row < 0) return;
  const tandem_moe::bf16* from = xn + static_cast<size_t>(p / topK) * hidden;
  tandem_moe::bf16* to = xPerm + static_cast<size_t>(row) * hidden;
  if ((hidden & 7) == 0) {  // 16-byte vectors (rows are 16-byte aligned: hidden is a multiple of 8)
    const uint4* f = reinterpret_cast<const uint4*>(from);
    uint4* o = reinterpret_cast<uint4*>(to);
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) o[i] = f[i];
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) to[i] = from[i];
  }
}

// The grouped GEMM, two tile shapes: `decode` 16 x 64 tiles (few rows per expert: one fragment row, four warps
// across the columns), `prefill` 64 x 64 (2 x 2 warps of 2 x 2 fragments). y[r, :] = x[r, :] . w_e[:, :]^T for
// the rows r of expert e; w_e = w + e * expertStride, [n, k] row-major; x [rows + tile padding, k] bf16, y [rows, n]
// fp32. Grid: (ceil(n / 64), row tiles upper bound); block: 128.
extern "C" __global__ void __launch_bounds__(128)
    tandem_moe_gemm_decode(const tandem_moe::bf16* x, const tandem_moe::bf16* w, unsigned long long expertStride,
                           float* y, const int32_t* offsets, const int32_t* tileStarts, int numExperts, int n, int k) {
  tandem_moe::groupedGemm<1, 4, 1, 1>(x, w, expertStride, y, offsets, tileStarts, numExperts, n, k);
}

extern "C" __global__ void __launch_bounds__(128)
    tandem_moe_gemm_prefill(const tandem_moe::bf16* x, const tandem_moe::bf16* w, unsigned long long expertStride,
                            float* y, const int32_t* offsets, const int32_t* tileStarts, int numExperts, int n, int k) {
  tandem_moe::groupedGemm<2, 2, 2, 2>(x, w, expertStride, y, offsets, tileStarts, numExperts, n, k);
}

// out[t, :] = sum over token t's pairs run here (pairRow >= 0), in ascending expert order, of topWeights[pair] *
// y[pairRow[pair], :]. Grid: ntok; block: 256.
extern "C" __global__ void tandem_moe_combine(const float* __restrict__ y, const int32_t* __restrict__ pairRow,
                                              const int32_t* __restrict__ topIds, const float* __restrict__ topWeights,
                                              int topK, int hidden, float* __restrict__ out) {
  using namespace tandem_moe;
  __shared__ int rows[kMaxTopK];
  __shared__ float weights[kMaxTopK];
  const size_t t = blockIdx.x;
  if (threadIdx.x == 0) {
    // Selection by expert index (topK is small); experts of one token are distinct.
    int last = -1;
    for (int j = 0; j < topK; ++j) {
      int pick = -1, pickE = 0x7fffffff;
      for (int i = 0; i < topK; ++i) {
        const int e = topIds[t * topK + i];
        if (e > last && e < pickE) pickE = e, pick = i;
      }
      last = pickE;
      rows[j] = pairRow[t * topK + pick];
      weights[j] = topWeights[t * topK + pick];
    }
  }
  __syncthreads();
  float* o = out + t * hidden;
  for (int d = threadIdx.x; d < hidden; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < topK; ++j)
      if (rows[j] >= 0) acc += weights[j] * y[static_cast<size_t>(rows[j]) * hidden + d];
    o[d] = acc;
  }
}

// Qwen3's q/k norm: each q head and k head of a token's fp32 qkv row (numHeads q heads, numKvHeads k heads, then v)
// RMS-normalised over headDim and scaled by qNorm / kNorm (bf16 [headDim]), in place. Grid: (ntok, numHeads +
// numKvHeads); block: 32.
extern "C" __global__ void tandem_qk_rmsnorm(float* qkv, const tandem_moe::bf16* qNorm, const tandem_moe::bf16* kNorm,
                                             int numHeads, int numKvHeads, int headDim, float eps) {
  using namespace tandem_moe;
  const int head = blockIdx.y;
  float* x = qkv + static_cast<size_t>(blockIdx.x) * (numHeads + 2 * numKvHeads) * headDim +
             static_cast<size_t>(head) * headDim;
  const bf16* w = head < numHeads ? qNorm : kNorm;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < headDim; i += 32) ss += x[i] * x[i];
  const float scale = rsqrtf(warpSumF(ss) / static_cast<float>(headDim) + eps);
  for (int i = threadIdx.x; i < headDim; i += 32) x[i] = __bfloat162float(w[i]) * (x[i] * scale);
}
