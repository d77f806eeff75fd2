// Attention over the paged KV pool on tensor cores (prefill) and split across the context (decode).
// The same contract as tandem_llama_attention (llama.cu): query token t, head h attends over positions
// (p - window, p] of its sequence (all of 0..p without a window), K and V read from the pool through the
// sequence's block table, GQA maps q head h to kv head h / (numHeads / numKvHeads). Queries come from the
// fp32 qkv rows the QKV GEMM wrote (RoPE applied); the output is bf16 [token][numHeads * headDim].
//
//   tandem_flash_prefill_d{64,128}: flash attention (online softmax) for runs of a sequence's tokens. A CTA
//     takes up to 64 consecutive tokens of one sequence (a "tile": token start, count, sequence) and one q
//     head; 4 warps of 16 query rows each. Keys and values come 64 at a time into shared memory with
//     cp.async, two stages deep, and S = Q K^T and O += P V run as mma.sync m16n8k16 (bf16 in, fp32
//     accumulate). Grid: (tiles, numHeads); 128 threads; dynamic shared memory prefillSmemBytes(D).
//   tandem_flash_decode_d{64,128}: one query token per sequence (decode rows), GQA-aware (a CTA serves every
//     q head of one kv head, so K and V are read once per kv head) and split along the context
//     (flash-decoding), so a single long sequence still fills the GPU. Grid: (rows, numKvHeads, splits); 128
//     threads. With one split it writes the output; with several it writes each split's unnormalised
//     output, max and sum, which tandem_flash_decode_combine merges. Grid (rows, numHeads); 128 threads.
#include <cuda_bf16.h>
#include <stdint.h>

#include "pdl.cuh"

namespace tandem_attn {

typedef __nv_bfloat16 bf16;

constexpr int kRows = 64;     // query rows per prefill CTA (16 per warp)
constexpr int kKeys = 64;     // keys per tile, both kernels
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ size_t kvTile(int layer, int kv, int block, int numLayers, int numBlocks, int blockMajor) {
  return blockMajor ? ((size_t)block * numLayers + layer) * 2 + kv : ((size_t)layer * 2 + kv) * numBlocks + block;
}

__device__ __forceinline__ uint32_t smemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; with valid false the destination is zero-filled and src unread.
__device__ __forceinline__ void cpAsync16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smemAddr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrixX4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smemAddr(p)));
}
__device__ __forceinline__ void ldmatrixX4T(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smemAddr(p)));
}

// The same from a shared-memory address (smemAddr), for kernels that form addresses arithmetically (prefill3).
__device__ __forceinline__ void ldmatrixX4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrixX4T(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// c += a (16x16, row) . b (16x8, col); bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t packBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// A tile of kKeys rows x D bf16 in shared memory, rows of D / 8 16-byte chunks, chunk c of row r stored at
// c ^ (r & 7): the 8 rows an ldmatrix reads at one logical chunk land in 8 different bank groups.
template <int D>
__device__ __forceinline__ bf16* swizzled(bf16* tile, int row, int chunk) {
  return tile + row * D + ((chunk ^ (row & 7)) << 3);
}

// Loads keys j0 .. j0 + kKeys - 1 (K and V, kv head kvh) of a sequence into shared memory; keys outside
// [lo, hi] are zero-filled (never read: their block-table entries may be anything). Warp w loads rows
// 16w .. 16w + 15: lane i < 16 resolves row 16w + i through the block table once, and the warp copies each row
// with consecutive lanes on consecutive 16-byte chunks. Row r, chunk c goes to `dst(r, c)` in `ks` and `vs`.
template <int D, typename Dst>
__device__ __forceinline__ void loadKv(bf16* ks, bf16* vs, Dst dst, const bf16* pool, const int32_t* table, int j0,
                                       int lo, int hi, int kvh, int layer, int numLayers, int numBlocks,
                                       int blockSize, int blockMajor, int kvDim) {
  static_assert(kThreads / 32 * 16 == kKeys, "one warp per 16 rows");
  constexpr int kChunks = D / 8, kRowsPerPass = 32 / kChunks;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  long long offK = -1, offV = -1;  // element offsets into the pool; -1: not a key to load
  if (lane < 16) {
    const int j = j0 + warp * 16 + lane;
    if (j >= lo && j <= hi) {
      const int block = table[j / blockSize];
      const size_t tile = (size_t)blockSize * kvDim;
      const size_t off = (size_t)(j % blockSize) * kvDim + (size_t)kvh * D;
      offK = (long long)(kvTile(layer, 0, block, numLayers, numBlocks, blockMajor) * tile + off);
      offV = (long long)(kvTile(layer, 1, block, numLayers, numBlocks, blockMajor) * tile + off);
    }
  }
#pragma unroll
  for (int i = 0; i < 16 / kRowsPerPass; ++i) {
    const int rr = i * kRowsPerPass + lane / kChunks, c = lane % kChunks, r = warp * 16 + rr;
    const long long k = __shfl_sync(0xffffffffu, offK, rr), v = __shfl_sync(0xffffffffu, offV, rr);
    cpAsync16(dst(ks, r, c), pool + (k < 0 ? 0 : k + c * 8), k >= 0);
    cpAsync16(dst(vs, r, c), pool + (v < 0 ? 0 : v + c * 8), v >= 0);
  }
}

template <int D>
__device__ void flashPrefill(const float* qkv, const int32_t* positions, const int32_t* tiles,
                             const int32_t* blockTables, int maxBlocksPerSeq, const bf16* pool, int layer,
                             int numLayers, int numBlocks, int blockSize, int blockMajor, int numHeads,
                             int numKvHeads, int slidingWindow, float scale, bf16* out) {
  // Two stages, each K then V (kKeys x D bf16 each).
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* const stages = reinterpret_cast<bf16*>(smem);
  constexpr int kStage = 2 * kKeys * D;
  __shared__ int rowPos[kRows];

  // The host lists a sequence's tiles first to last; later tiles see more keys, so they start first.
  const int tileIndex = gridDim.x - 1 - blockIdx.x;
  const int tokenStart = tiles[tileIndex * 3], count = tiles[tileIndex * 3 + 1], seq = tiles[tileIndex * 3 + 2];
  const int h = blockIdx.y, kvh = h / (numHeads / numKvHeads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int kvDim = numKvHeads * D, qDim = numHeads * D, rowStride = qDim + 2 * kvDim;
  const int32_t* table = blockTables + (size_t)seq * maxBlocksPerSeq;

  if (threadIdx.x < kRows) rowPos[threadIdx.x] = threadIdx.x < count ? positions[tokenStart + threadIdx.x] : -1;
  __syncthreads();
  // Keys any row of the tile may see: [lo, hi].
  int hi = -1, minPos = 0x7fffffff;
  for (int r = 0; r < count; ++r) {
    hi = max(hi, rowPos[r]);
    minPos = min(minPos, rowPos[r]);
  }
  const int lo = slidingWindow > 0 ? max(0, minPos - slidingWindow + 1) : 0;
  const int tilesN = hi < lo ? 0 : (hi - lo) / kKeys + 1;

  // This warp's rows: 16 * warp + g and + 8. Their query fragments (A operand, bf16, unscaled) straight from
  // the fp32 qkv rows; rows past `count` are zero.
  const int r0 = warp * 16 + g, r1 = r0 + 8;
  const int p0 = rowPos[r0], p1 = rowPos[r1];
  const bool warpActive = warp * 16 < count;
  int warpMaxPos = max(p0, p1);
  for (int o = 16; o > 0; o >>= 1) warpMaxPos = max(warpMaxPos, __shfl_xor_sync(0xffffffffu, warpMaxPos, o));
  uint32_t qf[D / 16][4];
  {
    const float* q0 = qkv + (size_t)(tokenStart + r0) * rowStride + h * D;
    const float* q1 = qkv + (size_t)(tokenStart + r1) * rowStride + h * D;
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      const int c = k * 16 + 2 * tq;
      float2 a = r0 < count ? *reinterpret_cast<const float2*>(q0 + c) : make_float2(0.f, 0.f);
      float2 b = r1 < count ? *reinterpret_cast<const float2*>(q1 + c) : make_float2(0.f, 0.f);
      float2 a8 = r0 < count ? *reinterpret_cast<const float2*>(q0 + c + 8) : make_float2(0.f, 0.f);
      float2 b8 = r1 < count ? *reinterpret_cast<const float2*>(q1 + c + 8) : make_float2(0.f, 0.f);
      qf[k][0] = packBf16(a.x, a.y);
      qf[k][1] = packBf16(b.x, b.y);
      qf[k][2] = packBf16(a8.x, a8.y);
      qf[k][3] = packBf16(b8.x, b8.y);
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows r0, r1 (this thread's share of l)
  const float sl2 = scale * kLog2e;
  const int lo0 = slidingWindow > 0 ? p0 - slidingWindow + 1 : 0;
  const int lo1 = slidingWindow > 0 ? p1 - slidingWindow + 1 : 0;

  if (tilesN > 0)
    loadKv<D>(stages, stages + kKeys * D, swizzled<D>, pool, table, lo, lo, hi, kvh, layer, numLayers, numBlocks, blockSize, blockMajor,
              kvDim);
  cpAsyncCommit();
  for (int it = 0; it < tilesN; ++it) {
    const int j0 = lo + it * kKeys;
    if (it + 1 < tilesN) {
      bf16* next = stages + ((it + 1) & 1) * kStage;
      loadKv<D>(next, next + kKeys * D, swizzled<D>, pool, table, j0 + kKeys, lo, hi, kvh, layer, numLayers,
                numBlocks, blockSize, blockMajor, kvDim);
      cpAsyncCommit();
      cpAsyncWait<1>();
    } else {
      cpAsyncWait<0>();
    }
    __syncthreads();
    bf16* const ks = stages + (it & 1) * kStage;
    bf16* const vs = ks + kKeys * D;
    // Skip the math where none of this warp's rows sees any key of the tile (causal: the tile is past them).
    if (warpActive && j0 <= warpMaxPos) {
      float s[kKeys / 8][4];
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
#pragma unroll
        for (int n = 0; n < kKeys / 8; n += 2) {
          // Keys 8n .. 8n+15, dims 16k .. 16k+15: matrices (keys 8n.., dims 16k), (8n.., 16k+8),
          // (8n+8.., 16k), (8n+8.., 16k+8).
          const int key = n * 8 + (lane & 7) + ((lane >> 4) << 3);
          const int chunk = k * 2 + ((lane >> 3) & 1);
          uint32_t b0, b1, b2, b3;
          ldmatrixX4(b0, b1, b2, b3, swizzled<D>(ks, key, chunk));
          mma16816(s[n], qf[k], b0, b1);
          mma16816(s[n + 1], qf[k], b2, b3);
        }
      }
      // Mask, scale into log2 units, and the online softmax per row (a row's 64 scores live in the 4 threads
      // of a quad).
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = j0 + n * 8 + 2 * tq + e;
          s[n][e] = (j <= p0 && j >= lo0) ? s[n][e] * sl2 : -INFINITY;
          s[n][2 + e] = (j <= p1 && j >= lo1) ? s[n][2 + e] * sl2 : -INFINITY;
          mx0 = fmaxf(mx0, s[n][e]);
          mx1 = fmaxf(mx1, s[n][2 + e]);
        }
      }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
      // A row that has seen no key yet keeps max -inf: use 0 as its reference so that exp2 gives 0, not NaN.
      const float ref0 = n0 == -INFINITY ? 0.f : n0, ref1 = n1 == -INFINITY ? 0.f : n1;
      const float c0 = exp2f(m0 - ref0), c1 = exp2f(m1 - ref1);
      m0 = n0;
      m1 = n1;
      l0 *= c0;
      l1 *= c1;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][0] *= c0;
        o[n][1] *= c0;
        o[n][2] *= c1;
        o[n][3] *= c1;
      }
      uint32_t pf[kKeys / 16][4];
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
        const float a = exp2f(s[n][0] - ref0), b = exp2f(s[n][1] - ref0);
        const float c = exp2f(s[n][2] - ref1), d = exp2f(s[n][3] - ref1);
        l0 += a + b;
        l1 += c + d;
        // The C fragments of key tiles 2k and 2k+1 are the A fragment of keys 16k .. 16k+15.
        pf[n >> 1][(n & 1) * 2] = packBf16(a, b);
        pf[n >> 1][(n & 1) * 2 + 1] = packBf16(c, d);
      }
#pragma unroll
      for (int k = 0; k < kKeys / 16; ++k) {
#pragma unroll
        for (int n = 0; n < D / 8; n += 2) {
          // Keys 16k .. 16k+15, dims 8n .. 8n+15, transposed: matrices (keys 16k.., dims 8n), (16k+8.., 8n),
          // (16k.., 8n+8), (16k+8.., 8n+8).
          const int key = k * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          const int chunk = n + (lane >> 4);
          uint32_t b0, b1, b2, b3;
          ldmatrixX4T(b0, b1, b2, b3, swizzled<D>(vs, key, chunk));
          mma16816(o[n], pf[k], b0, b1);
          mma16816(o[n + 1], pf[k], b2, b3);
        }
      }
    }
    __syncthreads();  // this stage is consumed before the next iteration's load overwrites it
  }

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  bf16* out0 = out + (size_t)(tokenStart + r0) * qDim + h * D;
  bf16* out1 = out + (size_t)(tokenStart + r1) * qDim + h * D;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int c = n * 8 + 2 * tq;
    if (r0 < count)
      *reinterpret_cast<__nv_bfloat162*>(out0 + c) = __floats2bfloat162_rn(o[n][0] * inv0, o[n][1] * inv0);
    if (r1 < count)
      *reinterpret_cast<__nv_bfloat162*>(out1 + c) = __floats2bfloat162_rn(o[n][2] * inv1, o[n][3] * inv1);
  }
}

// ---- decode -------------------------------------------------------------------------------------------------

constexpr int kMaxGroup = 16;
// A split's partial result: headDim unnormalised outputs, then its max and sum, padded to 16 bytes.
__host__ __device__ constexpr int partialStride(int headDim) { return headDim + 4; }

// HeadsFastest (decode1, decode3): the grid is (numKvHeads, rows, splits) instead of (rows, numKvHeads, splits), so
// the CTAs the scheduler starts together read the same tokens' K and V rows (every kv head of a token is one
// contiguous row of the pool's tile) instead of one kv head's 256-byte slice of many tokens.
template <int D, bool HeadsFastest = false>
__device__ void flashDecode(const float* qkv, const int32_t* positions, const int32_t* rows, const int32_t* tokenSeqs,
                            const int32_t* blockTables, int maxBlocksPerSeq, const bf16* pool, int layer,
                            int numLayers, int numBlocks, int blockSize, int blockMajor, int numHeads,
                            int numKvHeads, int slidingWindow, float scale, int keysPerSplit, float* partial,
                            bf16* out) {
  tandem_pdl::letDependentsLaunch();  // the o_proj GEMV after it streams its weights meanwhile (pdl.cuh)
  constexpr int kPad = 8;  // row padding (bf16): 16-byte reads of 8 consecutive rows hit distinct bank groups
  constexpr int kRowLen = D + kPad;
  constexpr int kSlotsPerHead = D / 4;  // a thread's output slot: 4 consecutive dims of one q head
  constexpr int kSlotsPerThread = kMaxGroup * kSlotsPerHead / kThreads;
  __shared__ __align__(16) bf16 ks[kKeys * kRowLen];
  __shared__ __align__(16) bf16 vs[kKeys * kRowLen];
  __shared__ float qs[kMaxGroup][D];
  __shared__ float ps[kMaxGroup][kKeys];
  __shared__ float mS[kMaxGroup], lS[kMaxGroup], corr[kMaxGroup];

  const int row = HeadsFastest ? blockIdx.y : blockIdx.x, kvh = HeadsFastest ? blockIdx.x : blockIdx.y;
  const int split = blockIdx.z, splits = gridDim.z;
  const int group = numHeads / numKvHeads;
  const int t = rows[row], p = positions[t];
  const int kvDim = numKvHeads * D, qDim = numHeads * D, rowStride = qDim + 2 * kvDim;
  const int32_t* table = blockTables + (size_t)tokenSeqs[t] * maxBlocksPerSeq;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float sl2 = scale * kLog2e;
  auto padded = [](bf16* base, int r, int c) { return base + r * kRowLen + c * 8; };

  // This split's keys: [lo, hi] (empty when the sequence is shorter than the split's start).
  const int start = slidingWindow > 0 ? max(0, p - slidingWindow + 1) : 0;
  const int lo = start + split * keysPerSplit, hi = min(p, lo + keysPerSplit - 1);

  for (int e = threadIdx.x; e < group * D; e += kThreads) {
    const int qh = e / D, d = e % D;
    qs[qh][d] = qkv[(size_t)t * rowStride + (size_t)(kvh * group + qh) * D + d] * sl2;
  }
  if (threadIdx.x < kMaxGroup) {
    mS[threadIdx.x] = -INFINITY;
    lS[threadIdx.x] = 0.f;
  }
  float acc[kSlotsPerThread][4];
#pragma unroll
  for (int i = 0; i < kSlotsPerThread; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  const int slots = group * kSlotsPerHead;

  for (int j0 = lo; j0 <= hi; j0 += kKeys) {
    __syncthreads();  // the previous chunk is consumed (and qs, mS, lS written, on the first pass)
    loadKv<D>(ks, vs, padded, pool, table, j0, lo, hi, kvh, layer, numLayers, numBlocks, blockSize, blockMajor,
              kvDim);
    cpAsyncCommit();
    cpAsyncWait<0>();
    __syncthreads();
    // Scores (log2 units): thread -> key threadIdx % 64 against q heads threadIdx / 64, + 2, ...
    {
      const int r = threadIdx.x % kKeys;
      const bf16* kr = ks + r * kRowLen;
      for (int qh = threadIdx.x / kKeys; qh < group; qh += kThreads / kKeys) {
        float sc = 0.f;
#pragma unroll 4
        for (int c = 0; c < D / 8; ++c) {
          const uint4 raw = *reinterpret_cast<const uint4*>(kr + c * 8);
          const __nv_bfloat162* k2 = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 kf = __bfloat1622float2(k2[i]);
            sc += qs[qh][c * 8 + 2 * i] * kf.x + qs[qh][c * 8 + 2 * i + 1] * kf.y;
          }
        }
        ps[qh][r] = j0 + r <= hi ? sc : -INFINITY;
      }
    }
    __syncthreads();
    // Online softmax per q head (warp w: heads w, w + 4, ...; a lane per two keys). Key j0 <= hi is in the
    // chunk, so the new max is finite.
    for (int qh = warp; qh < group; qh += kThreads / 32) {
      const float a = ps[qh][lane], b = ps[qh][lane + 32];
      float mx = fmaxf(a, b);
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float mOld = mS[qh], mNew = fmaxf(mOld, mx);
      const float pa = exp2f(a - mNew), pb = exp2f(b - mNew);
      ps[qh][lane] = pa;
      ps[qh][lane + 32] = pb;
      float sum = pa + pb;
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      __syncwarp();
      if (lane == 0) {
        const float c = exp2f(mOld - mNew);  // 0 on the first chunk (mOld = -inf)
        corr[qh] = c;
        lS[qh] = lS[qh] * c + sum;
        mS[qh] = mNew;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kSlotsPerThread; ++i) {
      const int slot = threadIdx.x + i * kThreads;
      if (slot < slots) {
        const int qh = slot / kSlotsPerHead, d = (slot % kSlotsPerHead) * 4;
        const float c = corr[qh];
        float a0 = acc[i][0] * c, a1 = acc[i][1] * c, a2 = acc[i][2] * c, a3 = acc[i][3] * c;
#pragma unroll 8
        for (int j = 0; j < kKeys; ++j) {
          const float pj = ps[qh][j];
          const uint2 raw = *reinterpret_cast<const uint2*>(vs + j * kRowLen + d);
          const __nv_bfloat162* v2 = reinterpret_cast<const __nv_bfloat162*>(&raw);
          const float2 x = __bfloat1622float2(v2[0]), y = __bfloat1622float2(v2[1]);
          a0 += pj * x.x;
          a1 += pj * x.y;
          a2 += pj * y.x;
          a3 += pj * y.y;
        }
        acc[i][0] = a0;
        acc[i][1] = a1;
        acc[i][2] = a2;
        acc[i][3] = a3;
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kSlotsPerThread; ++i) {
    const int slot = threadIdx.x + i * kThreads;
    if (slot >= slots) continue;
    const int qh = slot / kSlotsPerHead, d = (slot % kSlotsPerHead) * 4, h = kvh * group + qh;
    if (splits == 1) {
      const float inv = lS[qh] > 0.f ? 1.f / lS[qh] : 0.f;
      bf16* o = out + (size_t)t * qDim + (size_t)h * D + d;
      *reinterpret_cast<__nv_bfloat162*>(o) = __floats2bfloat162_rn(acc[i][0] * inv, acc[i][1] * inv);
      *reinterpret_cast<__nv_bfloat162*>(o + 2) = __floats2bfloat162_rn(acc[i][2] * inv, acc[i][3] * inv);
    } else {
      float* part = partial + ((size_t)(row * numHeads + h) * splits + split) * partialStride(D);
      *reinterpret_cast<float4*>(part + d) = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      if (d == 0) {
        part[D] = mS[qh];
        part[D + 1] = lS[qh];
      }
    }
  }
}

}  // namespace tandem_attn

// No `using namespace` here: every kernel file shares one translation unit (CMakeLists.txt's umbrella), and
// llama.cu has helpers of the same names.
#define TANDEM_FLASH_PREFILL(D)                                                                                     \
  extern "C" __global__ void __launch_bounds__(tandem_attn::kThreads) tandem_flash_prefill_d##D(                               \
      const float* qkv, const int32_t* positions, const int32_t* tiles, const int32_t* blockTables,                 \
      int maxBlocksPerSeq, const tandem_attn::bf16* pool, int layer, int numLayers, int numBlocks, int blockSize, int blockMajor, \
      int numHeads, int numKvHeads, int slidingWindow, float scale, tandem_attn::bf16* out) {                       \
    tandem_attn::flashPrefill<D>(qkv, positions, tiles, blockTables, maxBlocksPerSeq, pool, layer, numLayers, numBlocks,        \
                    blockSize, blockMajor, numHeads, numKvHeads, slidingWindow, scale, out);                        \
  }
TANDEM_FLASH_PREFILL(64)
TANDEM_FLASH_PREFILL(128)

#define TANDEM_FLASH_DECODE(D, NAME, HEADS_FASTEST)                                                                  \
  extern "C" __global__ void __launch_bounds__(tandem_attn::kThreads) NAME(                                        \
      const float* qkv, const int32_t* positions, const int32_t* rows, const int32_t* tokenSeqs,                    \
      const int32_t* blockTables, int maxBlocksPerSeq, const tandem_attn::bf16* pool, int layer, int numLayers,      \
      int numBlocks,                                                                                                \
      int blockSize, int blockMajor, int numHeads, int numKvHeads, int slidingWindow, float scale, int keysPerSplit, \
      float* partial, tandem_attn::bf16* out) {                                                                     \
    tandem_attn::flashDecode<D, HEADS_FASTEST>(qkv, positions, rows, tokenSeqs, blockTables, maxBlocksPerSeq, pool, layer, numLayers, numBlocks, \
                   blockSize, blockMajor, numHeads, numKvHeads, slidingWindow, scale, keysPerSplit, partial, out);   \
  }
TANDEM_FLASH_DECODE(64, tandem_flash_decode_d64, false)
TANDEM_FLASH_DECODE(128, tandem_flash_decode_d128, false)
TANDEM_FLASH_DECODE(64, tandem_flash_decode_h_d64, true)
TANDEM_FLASH_DECODE(128, tandem_flash_decode_h_d128, true)

// Merges the splits of tandem_flash_decode: out = sum_z acc_z 2^(m_z - M) / sum_z l_z 2^(m_z - M).
// Grid: (rows, numHeads); 128 threads.
extern "C" __global__ void __launch_bounds__(tandem_attn::kThreads)
    tandem_flash_decode_combine(const float* partial, const int32_t* rows, int numHeads, int headDim, int splits,
                                tandem_attn::bf16* out) {
  tandem_pdl::letDependentsLaunch();  // the o_proj GEMV after it streams its weights meanwhile (pdl.cuh)
  const int row = blockIdx.x, h = blockIdx.y;
  const int stride = tandem_attn::partialStride(headDim);
  const float* base = partial + (size_t)(row * numHeads + h) * splits * stride;
  float M = -INFINITY;
  for (int z = 0; z < splits; ++z) M = fmaxf(M, base[z * stride + headDim]);
  float L = 0.f;
  for (int z = 0; z < splits; ++z) {
    const float l = base[z * stride + headDim + 1];
    if (l > 0.f) L += l * exp2f(base[z * stride + headDim] - M);
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  tandem_attn::bf16* o = out + (size_t)rows[row] * numHeads * headDim + (size_t)h * headDim;
  for (int d = threadIdx.x; d < headDim; d += tandem_attn::kThreads) {
    float v = 0.f;
    for (int z = 0; z < splits; ++z) {
      const float* part = base + z * stride;
      if (part[headDim + 1] > 0.f) v += part[d] * exp2f(part[headDim] - M);
    }
    o[d] = __float2bfloat16(v * inv);
  }
}

// ---- second generation: 128-row prefill tiles, one-launch split decode ------------------------------------------
//
//   tandem_flash_prefill2_d{64,128}: as tandem_flash_prefill, with tiles of up to 128 tokens (8 warps of 16 query
//     rows; K and V read once per 128 queries instead of 64), kStages2 cp.async stages with one barrier per key
//     tile (the next tile is issued right after the barrier that retires the stage it overwrites), the softmax
//     scale folded into one FMA before exp2, and the causal/window mask applied only to tiles that cross a row's
//     limits. Grid: (numHeads, tiles): heads vary fastest, so the heaviest (last) tiles of every head start first.
//     256 threads; dynamic shared memory prefill2SmemBytes(D); one CTA per multiprocessor.
//   tandem_flash_prefill2w4_d{64,128}: the same with 4 warps (tiles of up to 64 tokens, 128 threads), two CTAs per
//     multiprocessor, so one CTA's softmax overlaps the other's matrix products.
//   tandem_flash_decode2_d{64,128}_g{1,2,4,8}: one query token per sequence, GQA group g, split along the context;
//     no shared-memory staging: each warp takes 8 (D 128) or 16 (D 64) keys at a time straight into registers
//     (16-byte loads, the next step's keys issued before the current ones are used), and the last CTA of a (row, kv head) to finish, counted
//     with an atomic per (row, kv head) that it resets, merges the splits: one launch. Grid: (rows, numKvHeads,
//     splits <= kMaxSplits2); 128 threads. `counters` (rows * numKvHeads ints) must be zero before the first
//     launch; every launch leaves them zero.
namespace tandem_attn {

// prefill2 comes with 8 warps (128 query rows per CTA, one CTA per multiprocessor: 222 registers) and with 4 (64
// rows, two CTAs per multiprocessor); the engine picks one (cuda_llama.cpp, kFlash2PrefillWarps).
constexpr int kWarps2 = 8;
constexpr int kRows2 = 16 * kWarps2;  // query rows per 8-warp prefill2 CTA
constexpr int kThreads2 = 32 * kWarps2;
constexpr int kStages2 = 3;
constexpr int kMaxSplits2 = 64;
// decode2 CTAs resident per multiprocessor, which caps registers at 168; group 8 needs more than that.
__host__ __device__ constexpr int decodeMinCtas2(int group) { return group >= 8 ? 1 : 3; }
constexpr int kDecodeKeysPerLane2 = 4;  // keys a lane holds per step in decode2 (K and V, 16 bytes each)
__host__ __device__ constexpr int prefill2SmemBytes(int headDim) { return kStages2 * 2 * kKeys * headDim * 2; }

// Keys j0 .. j0 + kKeys - 1 of K and V (kv head kvh) into one swizzled stage; keys outside [lo, hi] zero-filled.
// Warp w loads rows w * kKeys / kWarps2 ..: lane i < that count resolves one row through the block table.
template <int D, int W>
__device__ __forceinline__ void loadKv2(bf16* ks, bf16* vs, const bf16* pool, const int32_t* table, int j0, int lo,
                                        int hi, int kvh, int layer, int numLayers, int numBlocks, int blockSize,
                                        int blockMajor, int kvDim) {
  constexpr int kRowsPerWarp = kKeys / W, kChunks = D / 8, kRowsPerPass = 32 / kChunks;
  static_assert(kRowsPerWarp % kRowsPerPass == 0, "whole passes");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  long long offK = -1, offV = -1;
  if (lane < kRowsPerWarp) {
    const int j = j0 + warp * kRowsPerWarp + lane;
    if (j >= lo && j <= hi) {
      const int block = table[j / blockSize];
      const size_t tile = (size_t)blockSize * kvDim;
      const size_t off = (size_t)(j % blockSize) * kvDim + (size_t)kvh * D;
      offK = (long long)(kvTile(layer, 0, block, numLayers, numBlocks, blockMajor) * tile + off);
      offV = (long long)(kvTile(layer, 1, block, numLayers, numBlocks, blockMajor) * tile + off);
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp / kRowsPerPass; ++i) {
    const int rr = i * kRowsPerPass + lane / kChunks, c = lane % kChunks, r = warp * kRowsPerWarp + rr;
    const long long k = __shfl_sync(0xffffffffu, offK, rr), v = __shfl_sync(0xffffffffu, offV, rr);
    cpAsync16(swizzled<D>(ks, r, c), pool + (k < 0 ? 0 : k + c * 8), k >= 0);
    cpAsync16(swizzled<D>(vs, r, c), pool + (v < 0 ? 0 : v + c * 8), v >= 0);
  }
}

template <int D, int W>
__device__ void flashPrefill2(const float* qkv, const int32_t* positions, const int32_t* tiles,
                              const int32_t* blockTables, int maxBlocksPerSeq, const bf16* pool, int layer,
                              int numLayers, int numBlocks, int blockSize, int blockMajor, int numHeads,
                              int numKvHeads, int slidingWindow, float scale, bf16* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* const stages = reinterpret_cast<bf16*>(smem);
  constexpr int kStage = 2 * kKeys * D;
  constexpr int kRows = 16 * W;
  __shared__ int rowPos[kRows];

  const int tileIndex = gridDim.y - 1 - blockIdx.y;
  const int tokenStart = tiles[tileIndex * 3], count = tiles[tileIndex * 3 + 1], seq = tiles[tileIndex * 3 + 2];
  const int h = blockIdx.x, kvh = h / (numHeads / numKvHeads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int kvDim = numKvHeads * D, qDim = numHeads * D, rowStride = qDim + 2 * kvDim;
  const int32_t* table = blockTables + (size_t)seq * maxBlocksPerSeq;

  if (threadIdx.x < kRows) rowPos[threadIdx.x] = threadIdx.x < count ? positions[tokenStart + threadIdx.x] : -1;
  __syncthreads();
  int hi = -1, minPos = 0x7fffffff;
  for (int r = 0; r < count; ++r) {
    hi = max(hi, rowPos[r]);
    minPos = min(minPos, rowPos[r]);
  }
  const int lo = slidingWindow > 0 ? max(0, minPos - slidingWindow + 1) : 0;
  const int tilesN = hi < lo ? 0 : (hi - lo) / kKeys + 1;

  const int r0 = warp * 16 + g, r1 = r0 + 8;
  const int p0 = rowPos[r0], p1 = rowPos[r1];
  const bool warpActive = warp * 16 < count;
  // Over this warp's rows (padding rows have position -1, so a warp with padding masks every tile): the largest
  // position (tiles past it are skipped), the smallest (tiles wholly at or below it need no causal mask) and the
  // largest window start (tiles wholly at or above it need no window mask).
  int warpMaxPos = max(p0, p1), warpMinPos = min(p0, p1);
  for (int o = 16; o > 0; o >>= 1) {
    warpMaxPos = max(warpMaxPos, __shfl_xor_sync(0xffffffffu, warpMaxPos, o));
    warpMinPos = min(warpMinPos, __shfl_xor_sync(0xffffffffu, warpMinPos, o));
  }
  const int lo0 = slidingWindow > 0 ? p0 - slidingWindow + 1 : 0;
  const int lo1 = slidingWindow > 0 ? p1 - slidingWindow + 1 : 0;
  const int warpMaxLo = slidingWindow > 0 ? warpMaxPos - slidingWindow + 1 : 0;

  uint32_t qf[D / 16][4];
  {
    const float* q0 = qkv + (size_t)(tokenStart + r0) * rowStride + h * D;
    const float* q1 = qkv + (size_t)(tokenStart + r1) * rowStride + h * D;
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      const int c = k * 16 + 2 * tq;
      float2 a = r0 < count ? *reinterpret_cast<const float2*>(q0 + c) : make_float2(0.f, 0.f);
      float2 b = r1 < count ? *reinterpret_cast<const float2*>(q1 + c) : make_float2(0.f, 0.f);
      float2 a8 = r0 < count ? *reinterpret_cast<const float2*>(q0 + c + 8) : make_float2(0.f, 0.f);
      float2 b8 = r1 < count ? *reinterpret_cast<const float2*>(q1 + c + 8) : make_float2(0.f, 0.f);
      qf[k][0] = packBf16(a.x, a.y);
      qf[k][1] = packBf16(b.x, b.y);
      qf[k][2] = packBf16(a8.x, a8.y);
      qf[k][3] = packBf16(b8.x, b8.y);
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  // Row maxima in log2 units (scaled), this thread's share of the row sums.
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  const float sl2 = scale * kLog2e;

#pragma unroll
  for (int s = 0; s < kStages2 - 1; ++s) {
    if (s < tilesN) {
      bf16* st = stages + s * kStage;
      loadKv2<D, W>(st, st + kKeys * D, pool, table, lo + s * kKeys, lo, hi, kvh, layer, numLayers, numBlocks,
                 blockSize, blockMajor, kvDim);
    }
    cpAsyncCommit();  // one group per tile slot, empty or not: the wait below counts groups
  }
  for (int it = 0; it < tilesN; ++it) {
    const int j0 = lo + it * kKeys;
    cpAsyncWait<kStages2 - 2>();
    __syncthreads();  // tile `it` is visible to all; the stage tile it-1 used is free
    {
      const int nxt = it + kStages2 - 1;
      if (nxt < tilesN) {
        bf16* st = stages + (nxt % kStages2) * kStage;
        loadKv2<D, W>(st, st + kKeys * D, pool, table, lo + nxt * kKeys, lo, hi, kvh, layer, numLayers, numBlocks,
                   blockSize, blockMajor, kvDim);
      }
      cpAsyncCommit();
    }
    bf16* const ks = stages + (it % kStages2) * kStage;
    bf16* const vs = ks + kKeys * D;
    if (warpActive && j0 <= warpMaxPos) {
      float s[kKeys / 8][4];
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
#pragma unroll
        for (int n = 0; n < kKeys / 8; n += 2) {
          const int key = n * 8 + (lane & 7) + ((lane >> 4) << 3);
          const int chunk = k * 2 + ((lane >> 3) & 1);
          uint32_t b0, b1, b2, b3;
          ldmatrixX4(b0, b1, b2, b3, swizzled<D>(ks, key, chunk));
          mma16816(s[n], qf[k], b0, b1);
          mma16816(s[n + 1], qf[k], b2, b3);
        }
      }
      // Raw scores; the mask only where the tile crosses some row's causal limit or window start.
      const bool masked = j0 + kKeys - 1 > warpMinPos || j0 < warpMaxLo;
      if (masked) {
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = j0 + n * 8 + 2 * tq + e;
            if (!(j <= p0 && j >= lo0)) s[n][e] = -INFINITY;
            if (!(j <= p1 && j >= lo1)) s[n][2 + e] = -INFINITY;
          }
        }
      }
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
        mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
        mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
      }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      // scale > 0, so max(raw) * sl2 is the max of the scaled scores.
      const float n0 = fmaxf(m0, mx0 * sl2), n1 = fmaxf(m1, mx1 * sl2);
      const float ref0 = n0 == -INFINITY ? 0.f : n0, ref1 = n1 == -INFINITY ? 0.f : n1;
      const float c0 = exp2f(m0 - ref0), c1 = exp2f(m1 - ref1);
      m0 = n0;
      m1 = n1;
      l0 *= c0;
      l1 *= c1;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][0] *= c0;
        o[n][1] *= c0;
        o[n][2] *= c1;
        o[n][3] *= c1;
      }
      uint32_t pf[kKeys / 16][4];
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
        const float a = exp2f(fmaf(s[n][0], sl2, -ref0)), b = exp2f(fmaf(s[n][1], sl2, -ref0));
        const float c = exp2f(fmaf(s[n][2], sl2, -ref1)), d = exp2f(fmaf(s[n][3], sl2, -ref1));
        l0 += a + b;
        l1 += c + d;
        pf[n >> 1][(n & 1) * 2] = packBf16(a, b);
        pf[n >> 1][(n & 1) * 2 + 1] = packBf16(c, d);
      }
#pragma unroll
      for (int k = 0; k < kKeys / 16; ++k) {
#pragma unroll
        for (int n = 0; n < D / 8; n += 2) {
          const int key = k * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          const int chunk = n + (lane >> 4);
          uint32_t b0, b1, b2, b3;
          ldmatrixX4T(b0, b1, b2, b3, swizzled<D>(vs, key, chunk));
          mma16816(o[n], pf[k], b0, b1);
          mma16816(o[n + 1], pf[k], b2, b3);
        }
      }
    }
  }
  cpAsyncWait<0>();

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  bf16* out0 = out + (size_t)(tokenStart + r0) * qDim + h * D;
  bf16* out1 = out + (size_t)(tokenStart + r1) * qDim + h * D;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int c = n * 8 + 2 * tq;
    if (r0 < count)
      *reinterpret_cast<__nv_bfloat162*>(out0 + c) = __floats2bfloat162_rn(o[n][0] * inv0, o[n][1] * inv0);
    if (r1 < count)
      *reinterpret_cast<__nv_bfloat162*>(out1 + c) = __floats2bfloat162_rn(o[n][2] * inv1, o[n][3] * inv1);
  }
}

// prefill3: the tile of prefill2 (up to 128 query rows, 64-key tiles, cp.async stages with one barrier per key
// tile, the mask only where a tile crosses a row's limits) with 4 warps of 32 query rows instead of 8 of 16. A
// warp's rows are two m16 row blocks (rows 32w .. 32w + 15 and 32w + 16 .. 32w + 31) whose MMAs share every K and
// V fragment loaded with ldmatrix: per MMA, half the shared-memory reads of K and V that prefill2 makes.
// Registers (__launch_bounds__(128, 2): at most 255, two CTAs per multiprocessor) hold O (2 x D / 2 floats) and
// the 64-key S tile (2 x 32). At head dim 64 the Q fragments of both row blocks (2 x 16) fit too, with 3 stages
// of K and V (48 KiB). At head dim 128 they (2 x 32) do not (255 registers and spills even with S formed 16 keys at
// a time), so Q waits in shared memory (32 KiB, swizzled as K) and each warp reloads its two A fragments per 16
// dims (2 ldmatrix beside the 4 of K and the 16 MMAs of each 16-dim step), with 2 stages of K and V (64 KiB): 97
// KiB per CTA keeps two CTAs per multiprocessor (228 KiB), so one CTA's softmax overlaps the other's matrix
// products, where 3 stages (129 KiB) would leave one CTA of 4 warps. ptxas (CUDA 13): 255 registers at head dim 128 (no spills on sm_90a,
// 24 bytes on sm_100a), 246 at 64; the order of the prologue below (K / V first, then the queries' loads, fully
// unrolled) is the one that spills least.
constexpr int kWarps3 = 4;
constexpr int kRows3 = 32 * kWarps3;  // query rows per prefill3 CTA: the tile of prefill2
constexpr int kThreads3 = 32 * kWarps3;
constexpr int kPrefillCtas3 = 2;  // CTAs per multiprocessor (__launch_bounds__): caps registers at 255
__host__ __device__ constexpr bool prefill3QInSmem(int headDim) { return headDim > 64; }
__host__ __device__ constexpr int prefill3Stages(int headDim) { return prefill3QInSmem(headDim) ? 2 : 3; }
constexpr int kSmemAlign3 = 1024;  // prefill3 aligns its dynamic shared memory up to this (see flashPrefill3)
__host__ __device__ constexpr int prefill3SmemBytes(int headDim) {
  return kSmemAlign3 + (prefill3QInSmem(headDim) ? kRows3 * headDim * 2 : 0) +
         prefill3Stages(headDim) * 2 * kKeys * headDim * 2;
}

template <int D>
__device__ void flashPrefill3(const float* qkv, const int32_t* positions, const int32_t* tiles,
                              const int32_t* blockTables, int maxBlocksPerSeq, const bf16* pool, int layer,
                              int numLayers, int numBlocks, int blockSize, int blockMajor, int numHeads,
                              int numKvHeads, int slidingWindow, float scale, bf16* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr bool kQSmem = prefill3QInSmem(D);
  constexpr int kStages = prefill3Stages(D), kStage = 2 * kKeys * D;
  static_assert(kStages >= 2, "the pipeline below waits for all but kStages - 2 groups");
  static_assert(kThreads3 >= kRows3, "one thread per row position");
  // From a kSmemAlign3 boundary: [Q: kRows3 rows, swizzled, where kQSmem] [stage 0: K, V] [stage 1: K, V] ...
  // Every tile then starts on that boundary and its rows are 2D bytes, so bits 4 .. 7 of an element's shared
  // address are its swizzled chunk (chunk ^ (row & 7)) and nothing else: the fragment a lane reads at another 16
  // dims is its base address XOR a constant, another 8 or 16 rows its base plus a constant (no address registers
  // per fragment: without this the head dim 128 kernel spills).
  const uint32_t smemBase = (smemAddr(smem) + (kSmemAlign3 - 1)) & ~uint32_t(kSmemAlign3 - 1);
  bf16* const qs = reinterpret_cast<bf16*>(smem + (smemBase - smemAddr(smem)));
  bf16* const stages = qs + (kQSmem ? kRows3 * D : 0);
  constexpr uint32_t kRowBytes = 2 * D, kStageBytes = 2 * kStage;
  static_assert(kStageBytes % kSmemAlign3 == 0 && (kRows3 * kRowBytes) % kSmemAlign3 == 0, "tiles on boundaries");
  __shared__ int rowPos[kRows3];

  const int tileIndex = gridDim.y - 1 - blockIdx.y;
  const int tokenStart = tiles[tileIndex * 3], count = tiles[tileIndex * 3 + 1], seq = tiles[tileIndex * 3 + 2];
  const int h = blockIdx.x, kvh = h / (numHeads / numKvHeads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int kvDim = numKvHeads * D, qDim = numHeads * D, rowStride = qDim + 2 * kvDim;
  const int32_t* table = blockTables + (size_t)seq * maxBlocksPerSeq;

  if (threadIdx.x < kRows3) rowPos[threadIdx.x] = threadIdx.x < count ? positions[tokenStart + threadIdx.x] : -1;
  __syncthreads();
  int hi = -1, minPos = 0x7fffffff;
  for (int r = 0; r < count; ++r) {
    hi = max(hi, rowPos[r]);
    minPos = min(minPos, rowPos[r]);
  }
  const int lo = slidingWindow > 0 ? max(0, minPos - slidingWindow + 1) : 0;
  const int tilesN = hi < lo ? 0 : (hi - lo) / kKeys + 1;

  // This thread's rows: row(i) = 32 * warp + 8 * i + g, i = 0..3. Row block b (an m16 A / C fragment) holds rows
  // row(2b) (fragment row g: C elements 0, 1) and row(2b + 1) (fragment row g + 8: C elements 2, 3).
  const int row0 = warp * 32 + g;
  int pos[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) pos[i] = rowPos[row0 + 8 * i];
  const bool warpActive = warp * 32 < count;
  // Over this warp's 32 rows (padding rows have position -1, so a warp with padding masks every tile): the largest
  // position (tiles past it are skipped), the smallest (tiles wholly at or below it need no causal mask) and the
  // largest window start (tiles wholly at or above it need no window mask).
  int warpMaxPos = max(max(pos[0], pos[1]), max(pos[2], pos[3]));
  int warpMinPos = min(min(pos[0], pos[1]), min(pos[2], pos[3]));
  for (int o = 16; o > 0; o >>= 1) {
    warpMaxPos = max(warpMaxPos, __shfl_xor_sync(0xffffffffu, warpMaxPos, o));
    warpMinPos = min(warpMinPos, __shfl_xor_sync(0xffffffffu, warpMinPos, o));
  }
  const int warpMaxLo = slidingWindow > 0 ? warpMaxPos - slidingWindow + 1 : 0;

  // This lane's ldmatrix base addresses (x = lane & 7 is its row within each 8x8 matrix, and every row below is x
  // plus a multiple of 8, so row & 7 = x):
  //   Q (A operand, row block 0): rows 32w + x + 8 * bit3, chunk 2k + bit4, stored at 2k ^ (bit4 ^ x);
  //   K (B operand): keys x + 8 * bit4, chunk 2k + bit3, stored at 2k ^ (bit3 ^ x);
  //   V (B operand, transposed): keys x + 8 * bit3, chunk n + bit4 (n even), stored at n ^ (bit4 ^ x).
  // A fragment: (base ^ (even chunk << 4)) + rows * kRowBytes; the stage adds a multiple of kStageBytes.
  const int x = lane & 7, bit3 = (lane >> 3) & 1, bit4 = lane >> 4;
  const uint32_t stage0 = smemBase + (kQSmem ? kRows3 * kRowBytes : 0);
  const uint32_t qAddr = smemBase + (warp * 32 + x + 8 * bit3) * kRowBytes + ((bit4 ^ x) << 4);
  const uint32_t kAddr = stage0 + (x + 8 * bit4) * kRowBytes + ((bit3 ^ x) << 4);
  const uint32_t vAddr = stage0 + (kKeys + x + 8 * bit3) * kRowBytes + ((bit4 ^ x) << 4);

  // The first K / V tiles start on their way (cp.async) before the queries' loads below, which wait.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tilesN) {
      bf16* st = stages + s * kStage;
      loadKv2<D, kWarps3>(st, st + kKeys * D, pool, table, lo + s * kKeys, lo, hi, kvh, layer, numLayers, numBlocks,
                          blockSize, blockMajor, kvDim);
    }
    cpAsyncCommit();  // one group per tile slot, empty or not: the wait below counts groups
  }
  // Queries (bf16, unscaled; rows past `count` zero): at head dim 128 in shared memory (rows of D / 8 16-byte
  // chunks, swizzled as K; the first barrier of the key loop publishes them), read as A fragments per 16 dims;
  // at 64 the A fragments of both row blocks, held in registers for the whole tile.
  uint32_t qf[2][kQSmem ? 1 : D / 16][4];
  if constexpr (kQSmem) {
    constexpr int kChunks = D / 8;
#pragma unroll
    for (int e = threadIdx.x; e < kRows3 * kChunks; e += kThreads3) {
      const int r = e / kChunks, c = e % kChunks;
      uint4 packed = make_uint4(0u, 0u, 0u, 0u);
      if (r < count) {
        const float4* src =
            reinterpret_cast<const float4*>(qkv + (size_t)(tokenStart + r) * rowStride + h * D + c * 8);
        const float4 lo4 = src[0], hi4 = src[1];
        packed = make_uint4(packBf16(lo4.x, lo4.y), packBf16(lo4.z, lo4.w), packBf16(hi4.x, hi4.y),
                            packBf16(hi4.z, hi4.w));
      }
      *reinterpret_cast<uint4*>(swizzled<D>(qs, r, c)) = packed;
    }
  } else {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int ra = row0 + 16 * b, rb = ra + 8;
      const float* qa = qkv + (size_t)(tokenStart + ra) * rowStride + h * D;
      const float* qb = qkv + (size_t)(tokenStart + rb) * rowStride + h * D;
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
        const int c = k * 16 + 2 * tq;
        float2 a = ra < count ? *reinterpret_cast<const float2*>(qa + c) : make_float2(0.f, 0.f);
        float2 z = rb < count ? *reinterpret_cast<const float2*>(qb + c) : make_float2(0.f, 0.f);
        float2 a8 = ra < count ? *reinterpret_cast<const float2*>(qa + c + 8) : make_float2(0.f, 0.f);
        float2 z8 = rb < count ? *reinterpret_cast<const float2*>(qb + c + 8) : make_float2(0.f, 0.f);
        qf[b][k][0] = packBf16(a.x, a.y);
        qf[b][k][1] = packBf16(z.x, z.y);
        qf[b][k][2] = packBf16(a8.x, a8.y);
        qf[b][k][3] = packBf16(z8.x, z8.y);
      }
    }
  }

  float o[2][D / 8][4];
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[b][n][0] = o[b][n][1] = o[b][n][2] = o[b][n][3] = 0.f;
  // Per row i: the running max in log2 units (scaled) and this thread's share of the row sum.
  float m[4], l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
  }
  const float sl2 = scale * kLog2e;

  for (int it = 0; it < tilesN; ++it) {
    const int j0 = lo + it * kKeys;
    cpAsyncWait<kStages - 2>();
    __syncthreads();  // tile `it` (and Q) visible to all; the stage tile it-1 used is free
    {
      const int nxt = it + kStages - 1;
      if (nxt < tilesN) {
        bf16* st = stages + (nxt % kStages) * kStage;
        loadKv2<D, kWarps3>(st, st + kKeys * D, pool, table, lo + nxt * kKeys, lo, hi, kvh, layer, numLayers,
                            numBlocks, blockSize, blockMajor, kvDim);
      }
      cpAsyncCommit();
    }
    // Skip the math where none of this warp's rows sees any key of the tile (causal: the tile is past them).
    if (!warpActive || j0 > warpMaxPos) continue;
    const uint32_t stageOff = (it % kStages) * kStageBytes;
    float s[2][kKeys / 8][4];
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) s[b][n][0] = s[b][n][1] = s[b][n][2] = s[b][n][3] = 0.f;
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      const int kq = kQSmem ? 0 : k;  // this k's Q fragments in qf
      if constexpr (kQSmem) {
        // Row block b, dims 16k .. 16k+15: matrices (rows 0-7, dims 16k), (rows 8-15, 16k), (rows 0-7, 16k+8),
        // (rows 8-15, 16k+8), which are A fragment registers 0 .. 3.
#pragma unroll
        for (int b = 0; b < 2; ++b)
          ldmatrixX4(qf[b][0][0], qf[b][0][1], qf[b][0][2], qf[b][0][3], (qAddr ^ (k << 5)) + b * 16 * kRowBytes);
      }
#pragma unroll
      for (int n = 0; n < kKeys / 8; n += 2) {
        // Keys 8n .. 8n+15, dims 16k .. 16k+15: matrices (keys 8n.., dims 16k), (8n.., 16k+8), (8n+8.., 16k),
        // (8n+8.., 16k+8); both row blocks multiply the same fragments.
        uint32_t b0, b1, b2, b3;
        ldmatrixX4(b0, b1, b2, b3, ((kAddr + stageOff) ^ (k << 5)) + n * 8 * kRowBytes);
        mma16816(s[0][n], qf[0][kq], b0, b1);
        mma16816(s[0][n + 1], qf[0][kq], b2, b3);
        mma16816(s[1][n], qf[1][kq], b0, b1);
        mma16816(s[1][n + 1], qf[1][kq], b2, b3);
      }
    }
    // Raw scores; the mask only where the tile crosses some row's causal limit or window start.
    const bool masked = j0 + kKeys - 1 > warpMinPos || j0 < warpMaxLo;
    if (masked) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int b = i >> 1, e0 = (i & 1) * 2;  // row i: row block b, C elements e0 and e0 + 1
        const int p = pos[i], rowLo = slidingWindow > 0 ? p - slidingWindow + 1 : 0;
#pragma unroll
        for (int n = 0; n < kKeys / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = j0 + n * 8 + 2 * tq + e;
            if (!(j <= p && j >= rowLo)) s[b][n][e0 + e] = -INFINITY;
          }
        }
      }
    }
    // Online softmax, each of the 4 rows on its own (a row's 64 scores live in the 4 threads of a quad).
    float ref[4], c[4];
    bool rescale = false;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int b = i >> 1, e0 = (i & 1) * 2;
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) mx = fmaxf(mx, fmaxf(s[b][n][e0], s[b][n][e0 + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // scale > 0, so max(raw) * sl2 is the max of the scaled scores.
      const float nm = fmaxf(m[i], mx * sl2);
      // A row that has seen no key yet keeps max -inf: 0 as its reference, so that exp2 gives 0, not NaN.
      ref[i] = nm == -INFINITY ? 0.f : nm;
      c[i] = exp2f(m[i] - ref[i]);
      rescale |= c[i] != 1.f;
      m[i] = nm;
    }
    // O and l scale by c = 2^(old max - new max): skipped where c is 1 for every row of the warp (a tile that
    // raised no row's max, as most do once a row has seen its first keys).
    if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
      for (int i = 0; i < 4; ++i) l[i] *= c[i];
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          o[b][n][0] *= c[2 * b];
          o[b][n][1] *= c[2 * b];
          o[b][n][2] *= c[2 * b + 1];
          o[b][n][3] *= c[2 * b + 1];
        }
    }
    // P = 2^(s * sl2 - ref) in bf16: the C fragments of key columns 2k and 2k + 1 (8 keys each) are the A fragment
    // of keys 16k .. 16k + 15.
    uint32_t pf[2][kKeys / 16][4];
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const float refA = ref[2 * b], refB = ref[2 * b + 1];
#pragma unroll
      for (int n = 0; n < kKeys / 8; ++n) {
        const float pa0 = exp2f(fmaf(s[b][n][0], sl2, -refA)), pa1 = exp2f(fmaf(s[b][n][1], sl2, -refA));
        const float pb0 = exp2f(fmaf(s[b][n][2], sl2, -refB)), pb1 = exp2f(fmaf(s[b][n][3], sl2, -refB));
        l[2 * b] += pa0 + pa1;
        l[2 * b + 1] += pb0 + pb1;
        pf[b][n >> 1][(n & 1) * 2] = packBf16(pa0, pa1);
        pf[b][n >> 1][(n & 1) * 2 + 1] = packBf16(pb0, pb1);
      }
    }
#pragma unroll
    for (int k = 0; k < kKeys / 16; ++k) {
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        // Keys 16k .. 16k+15, dims 8n .. 8n+15, transposed: matrices (keys 16k.., dims 8n), (16k+8.., 8n),
        // (16k.., 8n+8), (16k+8.., 8n+8); both row blocks multiply the same fragments.
        uint32_t b0, b1, b2, b3;
        ldmatrixX4T(b0, b1, b2, b3, ((vAddr + stageOff) ^ (n << 4)) + k * 16 * kRowBytes);
        mma16816(o[0][n], pf[0][k], b0, b1);
        mma16816(o[0][n + 1], pf[0][k], b2, b3);
        mma16816(o[1][n], pf[1][k], b0, b1);
        mma16816(o[1][n + 1], pf[1][k], b2, b3);
      }
    }
  }
  cpAsyncWait<0>();

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int b = i >> 1, e0 = (i & 1) * 2, r = row0 + 8 * i;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    bf16* dst = out + (size_t)(tokenStart + r) * qDim + h * D;
    if (r < count) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<__nv_bfloat162*>(dst + n * 8 + 2 * tq) =
            __floats2bfloat162_rn(o[b][n][e0] * inv, o[b][n][e0 + 1] * inv);
    }
  }
}

// 8 bf16 (16 bytes) to floats.
__device__ __forceinline__ void unpack8(const uint4& raw, float* f) {
  const __nv_bfloat162* v = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(v[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// The end of a split decode CTA (decode2, decode3): warp w's partial result for q head g of the kv head is in
// wm[w][g] (max, log2 units; -inf for a warp that saw no key), wl[w][g] (sum) and wo[w][g][..] (unnormalised
// output), visible to every thread. Merges the warps; with one split writes the output, with several writes
// this split's partial and, in the last CTA of the (row, kv head) to get here (an atomic on `counters`, which
// it resets), merges every split: out = sum_z acc_z 2^(m_z - M) / sum_z l_z 2^(m_z - M).
template <int D, int G, int kWarps>
__device__ __forceinline__ void finishSplit(const float (*wm)[G], const float (*wl)[G], const float (*wo)[G][D],
                                            float* cl, float (*wz)[kMaxSplits2], int& last, int row, int kvh,
                                            int split, int splits, int t, int numHeads, int numKvHeads,
                                            float* partial, int* counters, bf16* out) {
  constexpr int kStride = partialStride(D);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, qDim = numHeads * D;
  // The CTA's result per (head, 4 dims): warps merged.
  for (int e = threadIdx.x; e < G * D / 4; e += 32 * kWarps) {
    const int g = e / (D / 4), d = (e % (D / 4)) * 4;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, wm[w][g]);
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    float L = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float c = wm[w][g] == -INFINITY ? 0.f : exp2f(wm[w][g] - M);
      const float4 x = *reinterpret_cast<const float4*>(&wo[w][g][d]);
      v.x += c * x.x, v.y += c * x.y, v.z += c * x.z, v.w += c * x.w;
      L += c * wl[w][g];
    }
    const int h = kvh * G + g;
    if (splits == 1) {
      const float inv = L > 0.f ? 1.f / L : 0.f;
      bf16* o = out + (size_t)t * qDim + (size_t)h * D + d;
      *reinterpret_cast<__nv_bfloat162*>(o) = __floats2bfloat162_rn(v.x * inv, v.y * inv);
      *reinterpret_cast<__nv_bfloat162*>(o + 2) = __floats2bfloat162_rn(v.z * inv, v.w * inv);
    } else {
      float* part = partial + ((size_t)(row * numHeads + h) * splits + split) * kStride;
      *reinterpret_cast<float4*>(part + d) = v;
      if (d == 0) {
        part[D] = M;  // -inf with L = 0 for a split past the sequence's end
        part[D + 1] = L;
      }
    }
  }
  if (splits == 1) return;

  // The last CTA of this (row, kv head) merges every split: out = sum_z acc_z 2^(m_z - M) / sum_z l_z 2^(m_z - M).
  __threadfence();  // this CTA's partial is visible device-wide before it is counted
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[row * numKvHeads + kvh], 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float* base0 = partial + (size_t)(row * numHeads + kvh * G) * splits * kStride;
  for (int g = warp; g < G; g += kWarps) {
    const float* hb = base0 + (size_t)g * splits * kStride;
    float M = -INFINITY;
    for (int z = lane; z < splits; z += 32) M = fmaxf(M, __ldcg(hb + z * kStride + D));
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    float L = 0.f;
    for (int z = lane; z < splits; z += 32) {
      const float mz = __ldcg(hb + z * kStride + D), lz = __ldcg(hb + z * kStride + D + 1);
      const float w = lz > 0.f ? exp2f(mz - M) : 0.f;
      wz[g][z] = w;
      L += w * lz;
    }
    for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
    if (lane == 0) cl[g] = L;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < G * D / 4; e += 32 * kWarps) {
    const int g = e / (D / 4), d = (e % (D / 4)) * 4;
    const float* hb = base0 + (size_t)g * splits * kStride + d;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 16
    for (int z = 0; z < splits; ++z) {
      const float w = wz[g][z];
      const float4 x = __ldcg(reinterpret_cast<const float4*>(hb + z * kStride));
      v.x += w * x.x, v.y += w * x.y, v.z += w * x.z, v.w += w * x.w;
    }
    const float inv = cl[g] > 0.f ? 1.f / cl[g] : 0.f;
    bf16* o = out + (size_t)t * qDim + (size_t)(kvh * G + g) * D + d;
    *reinterpret_cast<__nv_bfloat162*>(o) = __floats2bfloat162_rn(v.x * inv, v.y * inv);
    *reinterpret_cast<__nv_bfloat162*>(o + 2) = __floats2bfloat162_rn(v.z * inv, v.w * inv);
  }
  if (threadIdx.x == 0) counters[row * numKvHeads + kvh] = 0;  // ready for the next launch
}

template <int D, int G>
__device__ void flashDecode2(const float* qkv, const int32_t* positions, const int32_t* rows,
                             const int32_t* tokenSeqs, const int32_t* blockTables, int maxBlocksPerSeq,
                             const bf16* pool, int layer, int numLayers, int numBlocks, int blockSize, int blockMajor,
                             int numHeads, int numKvHeads, int slidingWindow, float scale, int keysPerSplit,
                             float* partial, int* counters, bf16* out) {
  tandem_pdl::letDependentsLaunch();  // the o_proj GEMV after it streams its weights meanwhile (pdl.cuh)
  // A key row is D / 8 lanes of 16 bytes; a warp step covers kSlots keys side by side, kPerLane steps deep.
  constexpr int kLanesPerKey = D / 8, kSlots = 32 / kLanesPerKey, kPerLane = kDecodeKeysPerLane2;
  constexpr int kWarpKeys = kSlots * kPerLane;  // keys per warp step: 8 (D 128) or 16 (D 64)
  constexpr int kWarps = kThreads / 32;
  __shared__ float wm[kWarps][G], wl[kWarps][G];
  __shared__ __align__(16) float wo[kWarps][G][D];
  __shared__ float cl[G];
  __shared__ float wz[G][kMaxSplits2];
  __shared__ int last;

  const int row = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
  const int t = rows[row], p = positions[t];
  const int kvDim = numKvHeads * D, qDim = numHeads * D, rowStride = qDim + 2 * kvDim;
  const int32_t* table = blockTables + (size_t)tokenSeqs[t] * maxBlocksPerSeq;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int dc = lane % kLanesPerKey, slot = lane / kLanesPerKey;  // dims 8dc .. 8dc + 7 of key `slot` of a step
  const float sl2 = scale * kLog2e;
  const int start = slidingWindow > 0 ? max(0, p - slidingWindow + 1) : 0;
  const int lo = start + split * keysPerSplit, hi = min(p, lo + keysPerSplit - 1);

  float q[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float* qp = qkv + (size_t)t * rowStride + (size_t)(kvh * G + g) * D + dc * 8;
    const float4 a = *reinterpret_cast<const float4*>(qp), b = *reinterpret_cast<const float4*>(qp + 4);
    q[g][0] = a.x * sl2, q[g][1] = a.y * sl2, q[g][2] = a.z * sl2, q[g][3] = a.w * sl2;
    q[g][4] = b.x * sl2, q[g][5] = b.y * sl2, q[g][6] = b.z * sl2, q[g][7] = b.w * sl2;
  }
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }

  // Warp w's steps cover keys lo + c * kStep + w * kWarpKeys .. (c = 0, 1, ...): every warp gets a share of a
  // short split.
  const size_t tileElems = (size_t)blockSize * kvDim;
  auto load = [&](int base, uint4* kr, uint4* vr) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int j = base + i * kSlots + slot;
      if (j <= hi) {
        const int block = table[j / blockSize];
        const size_t off = (size_t)(j % blockSize) * kvDim + (size_t)kvh * D + dc * 8;
        kr[i] = __ldg(reinterpret_cast<const uint4*>(pool + kvTile(layer, 0, block, numLayers, numBlocks, blockMajor) * tileElems + off));
        vr[i] = __ldg(reinterpret_cast<const uint4*>(pool + kvTile(layer, 1, block, numLayers, numBlocks, blockMajor) * tileElems + off));
      } else {
        kr[i] = make_uint4(0, 0, 0, 0);
        vr[i] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  constexpr int kStep = kWarps * kWarpKeys;
  int base = lo + warp * kWarpKeys;
  uint4 kc[kPerLane], vc[kPerLane];
  if (base <= hi) load(base, kc, vc);
  for (; base <= hi; base += kStep) {
    uint4 kn[kPerLane], vn[kPerLane];
    const bool more = base + kStep <= hi;
    if (more) load(base + kStep, kn, vn);
    float s[kPerLane][G];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      float kf[8];
      unpack8(kc[i], kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(q[g][e], kf[e], d);
        s[i][g] = d;
      }
    }
#pragma unroll
    for (int o = 1; o < kLanesPerKey; o <<= 1)
#pragma unroll
      for (int i = 0; i < kPerLane; ++i)
#pragma unroll
        for (int g = 0; g < G; ++g) s[i][g] += __shfl_xor_sync(0xffffffffu, s[i][g], o);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (base + i * kSlots + slot > hi)
#pragma unroll
        for (int g = 0; g < G; ++g) s[i][g] = -INFINITY;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = s[0][g];
#pragma unroll
      for (int i = 1; i < kPerLane; ++i) mx = fmaxf(mx, s[i][g]);
#pragma unroll
      for (int o = kLanesPerKey; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float mNew = fmaxf(m[g], mx);  // finite: key `base` <= hi is in this step
      const float c = exp2f(m[g] - mNew);
      m[g] = mNew;
      l[g] *= c;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= c;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        s[i][g] = exp2f(s[i][g] - mNew);
        l[g] += s[i][g];
      }
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      float vf[8];
      unpack8(vc[i], vf);
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(s[i][g], vf[e], acc[g][e]);
    }
    if (more) {
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        kc[i] = kn[i];
        vc[i] = vn[i];
      }
    }
  }
  // The warp's sums over its key slots: lanes of slot 0 hold the warp's result for dims 8dc ..
#pragma unroll
  for (int o = kLanesPerKey; o < 32; o <<= 1)
#pragma unroll
    for (int g = 0; g < G; ++g) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
    }
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      *reinterpret_cast<float4*>(&wo[warp][g][dc * 8]) = make_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
      *reinterpret_cast<float4*>(&wo[warp][g][dc * 8 + 4]) = make_float4(acc[g][4], acc[g][5], acc[g][6], acc[g][7]);
      if (dc == 0) {
        wm[warp][g] = m[g];  // -inf for a warp that saw no key (then its l and acc are 0)
        wl[warp][g] = l[g];
      }
    }
  }
  __syncthreads();
  finishSplit<D, G, kWarps>(wm, wl, wo, cl, wz, last, row, kvh, split, splits, t, numHeads, numKvHeads, partial,
                            counters, out);
}

// ---- third decode kernel: the GQA group on tensor cores ------------------------------------------------------------
//
//   tandem_flash_decode3_d{64,128}_g{4,8}: one query token per sequence, GQA group g, split along the context, for
//     batches that fill the GPU on their own. A CTA serves one (row, kv head, split): the group's g query heads are
//     the M dimension of mma.sync m16n8k16 (rows g .. 15 zero), so S = Q K^T and O += P V run on tensor cores
//     and K and V are read once per kv head. Keys come kKeys at a time into kDecodeStages3 swizzled cp.async
//     stages shared by the CTA (one barrier per key tile, as prefill2); warp w takes keys 16w .. 16w + 15 of
//     each tile and keeps its own online softmax, merged across warps and splits as decode2 does (finishSplit:
//     the last CTA of a (row, kv head) merges the splits, one launch). Grid: (rows, numKvHeads, splits <=
//     kMaxSplits2); 128 threads; dynamic shared memory decode3SmemBytes(D); kDecodeCtas3 CTAs per
//     multiprocessor. `counters` as decode2's.
// The engine's stages and CTAs per multiprocessor (the shared memory's limit: 96 KiB a CTA at head dim 128);
// bench/micro/attention.cu also times 2 stages at 3 CTAs and 4 stages at 1.
constexpr int kDecodeStages3 = 3;
constexpr int kDecodeCtas3 = 2;
__host__ __device__ constexpr int decode3SmemBytes(int headDim, int stages = kDecodeStages3) {
  return stages * 2 * kKeys * headDim * 2;
}

template <int D, int G, bool HeadsFastest = false, int S = kDecodeStages3>
__device__ void flashDecode3(const float* qkv, const int32_t* positions, const int32_t* rows,
                             const int32_t* tokenSeqs, const int32_t* blockTables, int maxBlocksPerSeq,
                             const bf16* pool, int layer, int numLayers, int numBlocks, int blockSize, int blockMajor,
                             int numHeads, int numKvHeads, int slidingWindow, float scale, int keysPerSplit,
                             float* partial, int* counters, bf16* out) {
  tandem_pdl::letDependentsLaunch();  // the o_proj GEMV after it streams its weights meanwhile (pdl.cuh)
  static_assert(S >= 2, "a stage loads while another is read");
  static_assert(G <= 8, "query heads g .. 15 of the A operand are zero: rows 8 .. 15 never hold a head");
  constexpr int kWarps = kThreads / 32;
  static_assert(kWarps * 16 == kKeys, "a warp per 16 keys of a tile");
  constexpr int kStage = 2 * kKeys * D;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* const stages = reinterpret_cast<bf16*>(smem);
  __shared__ float wm[kWarps][G], wl[kWarps][G];
  __shared__ float cl[G];
  __shared__ float wz[G][kMaxSplits2];
  __shared__ int last;

  const int row = HeadsFastest ? blockIdx.y : blockIdx.x, kvh = HeadsFastest ? blockIdx.x : blockIdx.y;
  const int split = blockIdx.z, splits = gridDim.z;
  const int t = rows[row], p = positions[t];
  const int kvDim = numKvHeads * D, qDim = numHeads * D, rowStride = qDim + 2 * kvDim;
  const int32_t* table = blockTables + (size_t)tokenSeqs[t] * maxBlocksPerSeq;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const float sl2 = scale * kLog2e;
  const int start = slidingWindow > 0 ? max(0, p - slidingWindow + 1) : 0;
  const int lo = start + split * keysPerSplit, hi = min(p, lo + keysPerSplit - 1);
  const int tilesN = hi < lo ? 0 : (hi - lo) / kKeys + 1;

  // Query fragments (A operand, bf16, unscaled): row g is q head kvh * G + g for g < G; rows G .. 15 are zero
  // (A registers 1 and 3 hold rows g + 8: always zero).
  uint32_t qf[D / 16][2];
  {
    const float* q = qkv + (size_t)t * rowStride + (size_t)(kvh * G + g) * D;
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      const int c = k * 16 + 2 * tq;
      const float2 a = g < G ? *reinterpret_cast<const float2*>(q + c) : make_float2(0.f, 0.f);
      const float2 a8 = g < G ? *reinterpret_cast<const float2*>(q + c + 8) : make_float2(0.f, 0.f);
      qf[k][0] = packBf16(a.x, a.y);
      qf[k][1] = packBf16(a8.x, a8.y);
    }
  }
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, l0 = 0.f;  // row g (this thread's share of l)

  // Stages 0 .. S - 2 issued up front (empty groups past the last tile keep the wait count uniform).
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < tilesN) {
      bf16* st = stages + s * kStage;
      loadKv2<D, kWarps>(st, st + kKeys * D, pool, table, lo + s * kKeys, lo, hi, kvh, layer, numLayers, numBlocks,
                         blockSize, blockMajor, kvDim);
    }
    cpAsyncCommit();
  }
  for (int it = 0; it < tilesN; ++it) {
    cpAsyncWait<S - 2>();
    __syncthreads();  // tile `it` is in for every warp, and the stage tile it - 1 used is free
    {
      const int nxt = it + S - 1;
      if (nxt < tilesN) {
        bf16* st = stages + (nxt % S) * kStage;
        loadKv2<D, kWarps>(st, st + kKeys * D, pool, table, lo + nxt * kKeys, lo, hi, kvh, layer, numLayers,
                           numBlocks, blockSize, blockMajor, kvDim);
      }
      cpAsyncCommit();
    }
    const bf16* const ks = stages + (it % S) * kStage;
    const bf16* const vs = ks + kKeys * D;
    const int j0 = lo + it * kKeys + warp * 16;  // this warp's first key
    if (j0 > hi) continue;                       // the last tile may end before this warp's keys
    // S (row g; keys j0 + 8n + 2tq, + 1): rows 8 .. 15 of the product are zero and not kept.
    float s[2][4];
    s[0][0] = s[0][1] = s[0][2] = s[0][3] = s[1][0] = s[1][1] = s[1][2] = s[1][3] = 0.f;
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      const int key = warp * 16 + (lane & 7) + ((lane >> 4) << 3);
      const int chunk = k * 2 + ((lane >> 3) & 1);
      uint32_t b0, b1, b2, b3;
      ldmatrixX4(b0, b1, b2, b3, swizzled<D>(const_cast<bf16*>(ks), key, chunk));
      const uint32_t a[4] = {qf[k][0], 0u, qf[k][1], 0u};
      mma16816(s[0], a, b0, b1);
      mma16816(s[1], a, b2, b3);
    }
    float mx = -INFINITY;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = j0 + n * 8 + 2 * tq + e;
        s[n][e] = j <= hi ? s[n][e] * sl2 : -INFINITY;
        mx = fmaxf(mx, s[n][e]);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mNew = fmaxf(m0, mx);  // finite: key j0 <= hi is one of this warp's
    const float c0 = exp2f(m0 - mNew);  // 0 on the warp's first tile (m0 = -inf)
    m0 = mNew;
    l0 *= c0;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= c0;
      o[n][1] *= c0;
    }
    const float p00 = exp2f(s[0][0] - mNew), p01 = exp2f(s[0][1] - mNew);
    const float p10 = exp2f(s[1][0] - mNew), p11 = exp2f(s[1][1] - mNew);
    l0 += p00 + p01 + p10 + p11;
    // The C fragments of keys j0 .. j0 + 7 and j0 + 8 .. j0 + 15 are the A fragment of the 16 keys.
    const uint32_t pf[4] = {packBf16(p00, p01), 0u, packBf16(p10, p11), 0u};
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      const int key = warp * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
      const int chunk = n + (lane >> 4);
      uint32_t b0, b1, b2, b3;
      ldmatrixX4T(b0, b1, b2, b3, swizzled<D>(const_cast<bf16*>(vs), key, chunk));
      mma16816(o[n], pf, b0, b1);
      mma16816(o[n + 1], pf, b2, b3);
    }
  }
  cpAsyncWait<0>();
  __syncthreads();  // every warp is done with the stages: they hold the warps' outputs from here

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  float(*wo)[G][D] = reinterpret_cast<float(*)[G][D]>(smem);
  if (g < G) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(&wo[warp][g][n * 8 + 2 * tq]) = make_float2(o[n][0], o[n][1]);
    if (tq == 0) {
      wm[warp][g] = m0;  // -inf for a warp that saw no key (then its l and o are 0)
      wl[warp][g] = l0;
    }
  }
  __syncthreads();
  finishSplit<D, G, kWarps>(wm, wl, wo, cl, wz, last, row, kvh, split, splits, t, numHeads, numKvHeads, partial,
                            counters, out);
}

}  // namespace tandem_attn

#define TANDEM_FLASH_PREFILL2(D, W, NAME, MIN_CTAS)                                                                 \
  extern "C" __global__ void __launch_bounds__(32 * W, MIN_CTAS) NAME(                                             \
      const float* qkv, const int32_t* positions, const int32_t* tiles, const int32_t* blockTables,                 \
      int maxBlocksPerSeq, const tandem_attn::bf16* pool, int layer, int numLayers, int numBlocks, int blockSize,   \
      int blockMajor, int numHeads, int numKvHeads, int slidingWindow, float scale, tandem_attn::bf16* out) {       \
    tandem_attn::flashPrefill2<D, W>(qkv, positions, tiles, blockTables, maxBlocksPerSeq, pool, layer, numLayers,     \
                                  numBlocks, blockSize, blockMajor, numHeads, numKvHeads, slidingWindow, scale, out); \
  }
TANDEM_FLASH_PREFILL2(64, 8, tandem_flash_prefill2_d64, 1)
TANDEM_FLASH_PREFILL2(128, 8, tandem_flash_prefill2_d128, 1)
TANDEM_FLASH_PREFILL2(64, 4, tandem_flash_prefill2w4_d64, 2)
TANDEM_FLASH_PREFILL2(128, 4, tandem_flash_prefill2w4_d128, 2)

#define TANDEM_FLASH_PREFILL3(D)                                                                                    \
  extern "C" __global__ void __launch_bounds__(tandem_attn::kThreads3, tandem_attn::kPrefillCtas3)                  \
      tandem_flash_prefill3_d##D(const float* qkv, const int32_t* positions, const int32_t* tiles,                  \
                                 const int32_t* blockTables, int maxBlocksPerSeq, const tandem_attn::bf16* pool,    \
                                 int layer, int numLayers, int numBlocks, int blockSize, int blockMajor,            \
                                 int numHeads, int numKvHeads, int slidingWindow, float scale,                      \
                                 tandem_attn::bf16* out) {                                                          \
    tandem_attn::flashPrefill3<D>(qkv, positions, tiles, blockTables, maxBlocksPerSeq, pool, layer, numLayers,     \
                                  numBlocks, blockSize, blockMajor, numHeads, numKvHeads, slidingWindow, scale,    \
                                  out);                                                                            \
  }
TANDEM_FLASH_PREFILL3(64)
TANDEM_FLASH_PREFILL3(128)

#define TANDEM_FLASH_DECODE2(D, G)                                                                                  \
  extern "C" __global__ void __launch_bounds__(tandem_attn::kThreads, tandem_attn::decodeMinCtas2(G)) tandem_flash_decode2_d##D##_g##G(            \
      const float* qkv, const int32_t* positions, const int32_t* rows, const int32_t* tokenSeqs,                    \
      const int32_t* blockTables, int maxBlocksPerSeq, const tandem_attn::bf16* pool, int layer, int numLayers,     \
      int numBlocks, int blockSize, int blockMajor, int numHeads, int numKvHeads, int slidingWindow, float scale,   \
      int keysPerSplit, float* partial, int* counters, tandem_attn::bf16* out) {                                    \
    tandem_attn::flashDecode2<D, G>(qkv, positions, rows, tokenSeqs, blockTables, maxBlocksPerSeq, pool, layer,    \
                                    numLayers, numBlocks, blockSize, blockMajor, numHeads, numKvHeads,             \
                                    slidingWindow, scale, keysPerSplit, partial, counters, out);                   \
  }
TANDEM_FLASH_DECODE2(64, 1)
TANDEM_FLASH_DECODE2(64, 2)
TANDEM_FLASH_DECODE2(64, 4)
TANDEM_FLASH_DECODE2(64, 8)
TANDEM_FLASH_DECODE2(128, 1)
TANDEM_FLASH_DECODE2(128, 2)
TANDEM_FLASH_DECODE2(128, 4)
TANDEM_FLASH_DECODE2(128, 8)

#define TANDEM_FLASH_DECODE3(D, G, NAME, HEADS_FASTEST)                                                             \
  extern "C" __global__ void __launch_bounds__(tandem_attn::kThreads, tandem_attn::kDecodeCtas3)                     \
      NAME(                                                                                                         \
          const float* qkv, const int32_t* positions, const int32_t* rows, const int32_t* tokenSeqs,                \
          const int32_t* blockTables, int maxBlocksPerSeq, const tandem_attn::bf16* pool, int layer, int numLayers, \
          int numBlocks, int blockSize, int blockMajor, int numHeads, int numKvHeads, int slidingWindow,            \
          float scale, int keysPerSplit, float* partial, int* counters, tandem_attn::bf16* out) {                   \
    tandem_attn::flashDecode3<D, G, HEADS_FASTEST>(qkv, positions, rows, tokenSeqs, blockTables, maxBlocksPerSeq, pool, layer,    \
                                    numLayers, numBlocks, blockSize, blockMajor, numHeads, numKvHeads,             \
                                    slidingWindow, scale, keysPerSplit, partial, counters, out);                   \
  }
TANDEM_FLASH_DECODE3(64, 4, tandem_flash_decode3_d64_g4, false)
TANDEM_FLASH_DECODE3(64, 8, tandem_flash_decode3_d64_g8, false)
TANDEM_FLASH_DECODE3(128, 4, tandem_flash_decode3_d128_g4, false)
TANDEM_FLASH_DECODE3(128, 8, tandem_flash_decode3_d128_g8, false)
TANDEM_FLASH_DECODE3(64, 4, tandem_flash_decode3_h_d64_g4, true)
TANDEM_FLASH_DECODE3(64, 8, tandem_flash_decode3_h_d64_g8, true)
TANDEM_FLASH_DECODE3(128, 4, tandem_flash_decode3_h_d128_g4, true)
TANDEM_FLASH_DECODE3(128, 8, tandem_flash_decode3_h_d128_g8, true)
