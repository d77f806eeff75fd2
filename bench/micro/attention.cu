// Paged attention kernels against each other and against a float64 reference on the CPU.
// First table: the engine's tandem_llama_attention / _tiled (llama.cu), the first flash kernels
// (tandem_flash_prefill / _decode + _combine), the second ones (tandem_flash_prefill2, tandem_flash_decode2:
// 128-row tiles, one-launch split decode) and the third prefill kernel (tandem_flash_prefill3: prefill2's tiles on
// 4 warps of 32 query rows, with decode2), on Llama-3.1-8B's attention shape (32 q heads, 8 kv heads, head dim
// 128, 16-token blocks scattered through the pool). Cases: one prompt of 512 / 3000 / 8192 tokens, a chunk of
// 1000 tokens behind 2000 cached ones, two prompts in one batch, a sliding window, prefill mixed with decodes.
// Each case: relative L2 error of each against the reference (sampled rows), every output element written, the
// new kernels against the first flash kernels over every element, the new kernels again after the timed
// repeats (decode2's split counters must have reset themselves), and the median time of 20 runs.
// Second table (decode): the three decode kernels (tandem_flash_decode + _combine, _decode2, _decode3) at batch
// 1 / 8 / 16 / 64 / 128 x context 512 / 3072 / 8192, GQA group 4 (32 q heads) and 8 (64 q heads), 8 kv heads,
// each with the split plan cuda_llama.cpp would give it, against the time to read the batch's K and V once at
// this run's copy rate (2 x the bytes of a 1 GiB device-to-device copy / its time, as bench:engine); plus ragged
// contexts with and without a sliding window. Each kernel is checked against the reference and against the first
// kernel, again after its timed repeats. Exit 1 on any failure.
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o attention attention.cu && ./attention
// (`--quick`: two prefill cases and the decode cases at context 512 only.)
#include "micro.h"

#include "../../native/kernels/attention.cu"
#include "../../native/kernels/llama.cu"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int D = 128, BS = 16, LAYERS = 2, LAYER = 1, BLOCK_MAJOR = 1;
// The attention shape: q heads and kv heads (the decode table sets them per GQA group), a qkv row's floats.
int H = 32, KVH = 8;
int qkvDim() { return (H + 2 * KVH) * D; }

__host__ __device__ float bf16ToFloat(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
__host__ __device__ uint16_t floatToBf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// The KV pool's element i: a hash of i, uniform with variance 1, as bf16. Filled on the GPU (pools of several GB
// at batch 128 x 8192 keys) and recomputed on the host for the reference, so no host copy of the pool exists.
__host__ __device__ uint16_t poolBits(size_t i) {
  uint64_t z = i + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
  return floatToBf16((u * 2.f - 1.f) * 1.7320508f);
}
__global__ void fillPool(uint16_t* pool, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    pool[i] = poolBits(i);
}

struct Seq {
  int firstPos;  // position of the sequence's first token in this batch
  int count;     // tokens in this batch
};

struct Case {
  std::string name;
  std::vector<Seq> seqs;
  int window = 0;
};

struct Batch {
  int ntok = 0, nseq = 0, mb = 0, numBlocks = 0;
  std::vector<int32_t> positions, tokenSeqs, tables;
  std::vector<float> qkv;
  size_t poolElems = 0;  // the pool is poolBits(0 .. poolElems - 1)
};

size_t tileIndex(int layer, int kv, int block, int numBlocks) {
  return BLOCK_MAJOR ? ((size_t)block * LAYERS + layer) * 2 + kv : ((size_t)layer * 2 + kv) * numBlocks + block;
}

Batch makeBatch(const Case& c, std::mt19937& rng) {
  Batch b;
  b.nseq = static_cast<int>(c.seqs.size());
  for (const Seq& s : c.seqs) b.mb = std::max(b.mb, (s.firstPos + s.count + BS - 1) / BS);
  b.numBlocks = b.nseq * b.mb + 7;
  std::vector<int32_t> perm(b.numBlocks);
  for (int i = 0; i < b.numBlocks; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  b.tables.assign((size_t)b.nseq * b.mb, -1);  // entries past a sequence's length stay invalid
  int next = 0;
  for (int s = 0; s < b.nseq; ++s) {
    int blocks = (c.seqs[s].firstPos + c.seqs[s].count + BS - 1) / BS;
    for (int k = 0; k < blocks; ++k) b.tables[(size_t)s * b.mb + k] = perm[next++];
    for (int t = 0; t < c.seqs[s].count; ++t) {
      b.positions.push_back(c.seqs[s].firstPos + t);
      b.tokenSeqs.push_back(s);
    }
  }
  b.ntok = static_cast<int>(b.positions.size());
  std::normal_distribution<float> nd(0.f, 1.f);
  b.qkv.resize((size_t)b.ntok * qkvDim());
  for (float& v : b.qkv) v = nd(rng);
  b.poolElems = (size_t)b.numBlocks * LAYERS * 2 * BS * KVH * D;
  return b;
}

// Attention of token t, head h in float64 over the pool as stored (bf16) and q as given (fp32).
void reference(const Batch& b, int window, int t, int h, double* out) {
  const int kvh = h / (H / KVH), p = b.positions[t], seq = b.tokenSeqs[t];
  const int start = window > 0 ? std::max(0, p - window + 1) : 0;
  const double scale = 1.0 / std::sqrt((double)D);
  const float* q = &b.qkv[(size_t)t * qkvDim() + h * D];
  std::vector<double> s(p - start + 1);
  double mx = -1e300;
  const size_t tile = (size_t)BS * KVH * D;
  for (int j = start; j <= p; ++j) {
    int block = b.tables[(size_t)seq * b.mb + j / BS];
    const size_t k = tileIndex(LAYER, 0, block, b.numBlocks) * tile + (size_t)(j % BS) * KVH * D + kvh * D;
    double dot = 0;
    for (int d = 0; d < D; ++d) dot += (double)q[d] * bf16ToFloat(poolBits(k + d));
    s[j - start] = dot * scale;
    mx = std::max(mx, s[j - start]);
  }
  double sum = 0;
  for (double& v : s) sum += (v = std::exp(v - mx));
  for (int d = 0; d < D; ++d) out[d] = 0;
  for (int j = start; j <= p; ++j) {
    int block = b.tables[(size_t)seq * b.mb + j / BS];
    const size_t v = tileIndex(LAYER, 1, block, b.numBlocks) * tile + (size_t)(j % BS) * KVH * D + kvh * D;
    for (int d = 0; d < D; ++d) out[d] += s[j - start] / sum * bf16ToFloat(poolBits(v + d));
  }
}

struct Device {
  float* qkv;
  int32_t *positions, *tokenSeqs, *tables, *tiles, *rows;
  uint16_t *pool, *out;
  float *partial, *partial2;
  int* counters;  // decode2: one per (row, kv head), zero between launches
};

// The host's plan for the flash kernels (cuda_llama.cpp builds the same): prefill tiles of <= 64 tokens of
// one sequence; sequences of exactly one token in the batch are decode rows.
struct FlashPlan {
  std::vector<int32_t> tiles, rows;
  int splits = 1, keysPerSplit = 0;
};

FlashPlan plan(const Batch& b, const Case& c, int sms) {
  FlashPlan f;
  int t0 = 0, maxCtx = 0;
  for (int s = 0; s < b.nseq; ++s) {
    int n = c.seqs[s].count;
    if (n == 1) {
      f.rows.push_back(t0);
      maxCtx = std::max(maxCtx, b.mb * BS);
    } else {
      for (int a = 0; a < n; a += tandem_attn::kRows) {
        f.tiles.push_back(t0 + a);
        f.tiles.push_back(std::min(tandem_attn::kRows, n - a));
        f.tiles.push_back(s);
      }
    }
    t0 += n;
  }
  if (!f.rows.empty()) {
    int ctx = c.window > 0 ? std::min(c.window, maxCtx) : maxCtx;
    int chunks = (ctx + tandem_attn::kKeys - 1) / tandem_attn::kKeys;
    int ctas = static_cast<int>(f.rows.size()) * KVH;
    int want = std::max(1, (2 * sms + ctas - 1) / ctas);
    int splits = std::min(want, chunks);
    f.keysPerSplit = ((chunks + splits - 1) / splits) * tandem_attn::kKeys;
    f.splits = (ctx + f.keysPerSplit - 1) / f.keysPerSplit;
  }
  return f;
}

// The second kernels' plan (cuda_llama.cpp builds the same): prefill tiles of <= kRows2 tokens; decode splits
// of a multiple of 64 keys, enough for kDecode2CtasPerSm CTAs per multiprocessor, at most kMaxSplits2.
constexpr int kDecode2CtasPerSm = 3;
FlashPlan plan2(const Batch& b, const Case& c, int sms) {
  FlashPlan f;
  int t0 = 0, maxCtx = 0;
  for (int s = 0; s < b.nseq; ++s) {
    int n = c.seqs[s].count;
    if (n == 1) {
      f.rows.push_back(t0);
      maxCtx = std::max(maxCtx, b.mb * BS);
    } else {
      for (int a = 0; a < n; a += tandem_attn::kRows2) {
        f.tiles.push_back(t0 + a);
        f.tiles.push_back(std::min(tandem_attn::kRows2, n - a));
        f.tiles.push_back(s);
      }
    }
    t0 += n;
  }
  if (!f.rows.empty()) {
    int ctx = c.window > 0 ? std::min(c.window, maxCtx) : maxCtx;
    int chunks = (ctx + 63) / 64;
    int ctas = static_cast<int>(f.rows.size()) * KVH;
    int want = std::max(1, (kDecode2CtasPerSm * sms + ctas - 1) / ctas);
    int splits = std::min({want, chunks, tandem_attn::kMaxSplits2});
    f.keysPerSplit = ((chunks + splits - 1) / splits) * 64;
    f.splits = (ctx + f.keysPerSplit - 1) / f.keysPerSplit;
  }
  return f;
}

void runOld(const Batch& b, const Case& c, const Device& dv) {
  const float scale = 1.0f / std::sqrt((float)D);
  if (b.ntok > 256) {
    tandem_llama_attention_tiled<<<dim3(b.ntok, KVH), (H / KVH) * 32>>>(
        dv.qkv, dv.positions, dv.tokenSeqs, dv.tables, b.mb, (const bf16*)dv.pool, LAYER, LAYERS, b.numBlocks, BS,
        BLOCK_MAJOR, H, KVH, D, c.window, scale, (bf16*)dv.out);
  } else {
    tandem_llama_attention<<<dim3(b.ntok, H), 512>>>(dv.qkv, dv.positions, dv.tokenSeqs, dv.tables, b.mb,
                                                     (const bf16*)dv.pool, LAYER, LAYERS, b.numBlocks, BS, BLOCK_MAJOR,
                                                     H, KVH, D, c.window, scale, (bf16*)dv.out);
  }
}

void runFlash(const Batch& b, const Case& c, const Device& dv, const FlashPlan& f) {
  const float scale = 1.0f / std::sqrt((float)D);
  const int ntiles = static_cast<int>(f.tiles.size() / 3), nrows = static_cast<int>(f.rows.size());
  if (ntiles)
    tandem_flash_prefill_d128<<<dim3(ntiles, H), tandem_attn::kThreads, 2 * 2 * tandem_attn::kKeys * D * 2>>>(
        dv.qkv, dv.positions, dv.tiles, dv.tables, b.mb, (const bf16*)dv.pool, LAYER, LAYERS, b.numBlocks, BS,
        BLOCK_MAJOR, H, KVH, c.window, scale, (bf16*)dv.out);
  if (nrows) {
    tandem_flash_decode_d128<<<dim3(nrows, KVH, f.splits), tandem_attn::kThreads>>>(
        dv.qkv, dv.positions, dv.rows, dv.tokenSeqs, dv.tables, b.mb, (const bf16*)dv.pool, LAYER, LAYERS,
        b.numBlocks, BS, BLOCK_MAJOR, H, KVH, c.window, scale, f.keysPerSplit, dv.partial, (bf16*)dv.out);
    if (f.splits > 1)
      tandem_flash_decode_combine<<<dim3(nrows, H), tandem_attn::kThreads>>>(dv.partial, dv.rows, H, D, f.splits,
                                                                             (bf16*)dv.out);
  }
}

// The second kernels: prefill2 with 8 warps (tiles of 128, dv.tiles) or 4 (tiles of 64: `tiles4`, the first
// plan's), or prefill3 (warps 3 here: 4 warps of 32 rows, tiles of 128, dv.tiles); decode2.
void runFlash2(const Batch& b, const Case& c, const Device& dv, const FlashPlan& f, int warps,
               const int32_t* tiles4, int ntiles4) {
  const float scale = 1.0f / std::sqrt((float)D);
  const int ntiles = warps == 4 ? ntiles4 : static_cast<int>(f.tiles.size() / 3), nrows = static_cast<int>(f.rows.size());
  if (ntiles && warps == 3)
    tandem_flash_prefill3_d128<<<dim3(H, ntiles), tandem_attn::kThreads3, tandem_attn::prefill3SmemBytes(D)>>>(
        dv.qkv, dv.positions, dv.tiles, dv.tables, b.mb, (const bf16*)dv.pool, LAYER, LAYERS, b.numBlocks, BS,
        BLOCK_MAJOR, H, KVH, c.window, scale, (bf16*)dv.out);
  if (ntiles && warps == 8)
    tandem_flash_prefill2_d128<<<dim3(H, ntiles), 256, tandem_attn::prefill2SmemBytes(D)>>>(
        dv.qkv, dv.positions, dv.tiles, dv.tables, b.mb, (const bf16*)dv.pool, LAYER, LAYERS, b.numBlocks, BS,
        BLOCK_MAJOR, H, KVH, c.window, scale, (bf16*)dv.out);
  if (ntiles && warps == 4)
    tandem_flash_prefill2w4_d128<<<dim3(H, ntiles), 128, tandem_attn::prefill2SmemBytes(D)>>>(
        dv.qkv, dv.positions, tiles4, dv.tables, b.mb, (const bf16*)dv.pool, LAYER, LAYERS, b.numBlocks, BS,
        BLOCK_MAJOR, H, KVH, c.window, scale, (bf16*)dv.out);
  if (nrows)
    tandem_flash_decode2_d128_g4<<<dim3(nrows, KVH, f.splits), tandem_attn::kThreads>>>(
        dv.qkv, dv.positions, dv.rows, dv.tokenSeqs, dv.tables, b.mb, (const bf16*)dv.pool, LAYER, LAYERS,
        b.numBlocks, BS, BLOCK_MAJOR, H, KVH, c.window, scale, f.keysPerSplit, dv.partial2, dv.counters,
        (bf16*)dv.out);
}

// Relative L2 distance between two outputs over every element (NaN if either has one).
double distance(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    double x = bf16ToFloat(a[i]), y = bf16ToFloat(b[i]);
    num += (x - y) * (x - y);
    den += y * y;
  }
  return std::sqrt(num / den);
}

// Relative L2 error over sampled (token, head) rows; NaN if any output element was left unwritten.
double check(const Batch& b, const Case& c, const std::vector<uint16_t>& out, std::mt19937& rng, int samples = 48) {
  for (uint16_t v : out)
    if (v == 0xffff) return NAN;
  std::uniform_int_distribution<int> tok(0, b.ntok - 1), head(0, H - 1);
  double num = 0, den = 0;
  std::vector<double> ref(D);
  std::vector<int> ts = {0, b.ntok - 1};
  for (int i = 0; i < samples; ++i) ts.push_back(tok(rng));
  for (int t : ts) {
    int h = head(rng);
    reference(b, c.window, t, h, ref.data());
    for (int d = 0; d < D; ++d) {
      double got = bf16ToFloat(out[(size_t)t * H * D + h * D + d]);
      num += (got - ref[d]) * (got - ref[d]);
      den += ref[d] * ref[d];
    }
  }
  return std::sqrt(num / den);
}

template <typename F>
float medianMs(F&& fn, int reps = 20) {
  cudaEvent_t a, z;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&z));
  fn();
  CHECK(cudaDeviceSynchronize());
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a));
    fn();
    CHECK(cudaEventRecord(z));
    CHECK(cudaEventSynchronize(z));
    float m;
    CHECK(cudaEventElapsedTime(&m, a, z));
    ms.push_back(m);
  }
  CHECK(cudaGetLastError());
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// ---- decode table ----------------------------------------------------------------------------------------------

// The read rate (GB/s) the decode table's bytes' times use: 2 x the bytes of a 1 GiB device-to-device copy over
// its median time (a copy reads and writes every byte once), as bench:engine's bound.
double readGBps() {
  const size_t bytes = size_t(1) << 30;
  void *a, *z;
  CHECK(cudaMalloc(&a, bytes));
  CHECK(cudaMalloc(&z, bytes));
  CHECK(cudaMemset(a, 1, bytes));
  const float ms = medianMs([&] { CHECK(cudaMemcpyAsync(z, a, bytes, cudaMemcpyDeviceToDevice)); }, 10);
  CHECK(cudaFree(a));
  CHECK(cudaFree(z));
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

// Variants of decode3 that the engine does not build, timed beside it: 2 stages at 3 CTAs per multiprocessor
// (kernel 4 here) and 4 stages at 1 (kernel 5).
template <int G, int S, int kCtas>
__global__ void __launch_bounds__(tandem_attn::kThreads, kCtas)
    decode3Variant(const float* qkv, const int32_t* positions, const int32_t* rows, const int32_t* tokenSeqs,
                   const int32_t* blockTables, int maxBlocksPerSeq, const bf16* pool, int layer, int numLayers,
                   int numBlocks, int blockSize, int blockMajor, int numHeads, int numKvHeads, int slidingWindow,
                   float scale, int keysPerSplit, float* partial, int* counters, bf16* out) {
  tandem_attn::flashDecode3<D, G, false, S>(qkv, positions, rows, tokenSeqs, blockTables, maxBlocksPerSeq, pool, layer,
                                     numLayers, numBlocks, blockSize, blockMajor, numHeads, numKvHeads, slidingWindow,
                                     scale, keysPerSplit, partial, counters, out);
}
constexpr int kDecodeKernels = 5;
const char* const kDecodeNames[kDecodeKernels] = {"d1", "d2", "d3", "d3s2", "d3s4"};
int decode3Ctas(int kernel) { return kernel == 3 ? tandem_attn::kDecodeCtas3 : kernel == 4 ? 3 : 1; }
int decode3Stages(int kernel) { return kernel == 3 ? tandem_attn::kDecodeStages3 : kernel == 4 ? 2 : 4; }

// cuda_llama.cpp's split plan for each decode kernel (rows sequences, kv heads KVH, context ctx keys):
// 1: enough for 2 CTAs per multiprocessor; 2: 3 per multiprocessor, at most kMaxSplits2; 3 (and its variants):
// the fewest splits that minimise waves x (tiles per split + 2), a wave being the kernel's resident CTAs on every
// multiprocessor, at most kMaxSplits2 (cuda_llama.cpp, flash3DecodeSplits).
FlashPlan decodePlan(int kernel, int rows, int ctx, int sms) {
  FlashPlan f;
  for (int r = 0; r < rows; ++r) f.rows.push_back(r);
  const int chunks = (ctx + 63) / 64, ctas = rows * KVH;
  int want;
  if (kernel >= 3) {
    const int slots = decode3Ctas(kernel) * sms;
    long long bestCost = -1;
    want = 1;
    for (int s = 1; s <= std::min(chunks, tandem_attn::kMaxSplits2); ++s) {
      const long long cost = (((long long)ctas * s + slots - 1) / slots) * ((chunks + s - 1) / s + 2);
      if (bestCost < 0 || cost < bestCost) want = s, bestCost = cost;
    }
  } else {
    want = std::max(1, ((kernel == 2 ? kDecode2CtasPerSm : 2) * sms + ctas - 1) / ctas);
    if (kernel == 2) want = std::min(want, tandem_attn::kMaxSplits2);
  }
  const int splits = std::max(1, std::min(want, chunks));
  f.keysPerSplit = (chunks + splits - 1) / splits * 64;
  f.splits = (ctx + f.keysPerSplit - 1) / f.keysPerSplit;
  return f;
}

void runDecode(int kernel, int group, const Batch& b, const Case& c, const Device& dv, const FlashPlan& f) {
  const float scale = 1.0f / std::sqrt((float)D);
  const int nrows = static_cast<int>(f.rows.size());
  const dim3 grid(nrows, KVH, f.splits);
  const bf16* pool = (const bf16*)dv.pool;
  if (kernel == 1) {
    tandem_flash_decode_d128<<<grid, tandem_attn::kThreads>>>(dv.qkv, dv.positions, dv.rows, dv.tokenSeqs, dv.tables,
                                                              b.mb, pool, LAYER, LAYERS, b.numBlocks, BS, BLOCK_MAJOR,
                                                              H, KVH, c.window, scale, f.keysPerSplit, dv.partial,
                                                              (bf16*)dv.out);
    if (f.splits > 1)
      tandem_flash_decode_combine<<<dim3(nrows, H), tandem_attn::kThreads>>>(dv.partial, dv.rows, H, D, f.splits,
                                                                             (bf16*)dv.out);
    return;
  }
  auto k2 = group == 4 ? tandem_flash_decode2_d128_g4 : tandem_flash_decode2_d128_g8;
  auto k3 = kernel == 3 ? (group == 4 ? tandem_flash_decode3_d128_g4 : tandem_flash_decode3_d128_g8)
            : kernel == 4 ? (group == 4 ? decode3Variant<4, 2, 3> : decode3Variant<8, 2, 3>)
                          : (group == 4 ? decode3Variant<4, 4, 1> : decode3Variant<8, 4, 1>);
  if (kernel == 2)
    k2<<<grid, tandem_attn::kThreads>>>(dv.qkv, dv.positions, dv.rows, dv.tokenSeqs, dv.tables, b.mb, pool, LAYER,
                                        LAYERS, b.numBlocks, BS, BLOCK_MAJOR, H, KVH, c.window, scale, f.keysPerSplit,
                                        dv.partial, dv.counters, (bf16*)dv.out);
  else
    k3<<<grid, tandem_attn::kThreads, tandem_attn::decode3SmemBytes(D, decode3Stages(kernel))>>>(
        dv.qkv, dv.positions, dv.rows, dv.tokenSeqs, dv.tables, b.mb, pool, LAYER, LAYERS, b.numBlocks, BS,
        BLOCK_MAJOR, H, KVH, c.window, scale, f.keysPerSplit, dv.partial, dv.counters, (bf16*)dv.out);
}

// One decode case through the three kernels; prints a row, returns false on a failed check.
bool decodeCase(const Case& c, int group, int sms, double gbps, std::mt19937& rng) {
  Batch b = makeBatch(c, rng);
  double kvBytes = 0;  // K and V of every key each row attends to, read once
  for (int t = 0; t < b.ntok; ++t) {
    const int p = b.positions[t];
    kvBytes += (double)(c.window > 0 ? std::min(p + 1, c.window) : p + 1) * KVH * D * 2 * 2;
  }
  const int ctx = c.window > 0 ? std::min(c.window, b.mb * BS) : b.mb * BS;
  FlashPlan plans[kDecodeKernels];
  for (int k = 1; k <= kDecodeKernels; ++k) plans[k - 1] = decodePlan(k, b.ntok, ctx, sms);
  size_t partialFloats = 1;
  for (const FlashPlan& f : plans) partialFloats = std::max(partialFloats, f.rows.size() * H * f.splits * tandem_attn::partialStride(D));
  Device dv{};
  CHECK(cudaMalloc(&dv.qkv, b.qkv.size() * 4));
  CHECK(cudaMalloc(&dv.positions, b.ntok * 4));
  CHECK(cudaMalloc(&dv.tokenSeqs, b.ntok * 4));
  CHECK(cudaMalloc(&dv.tables, b.tables.size() * 4));
  CHECK(cudaMalloc(&dv.rows, b.ntok * 4));
  CHECK(cudaMalloc(&dv.pool, b.poolElems * 2));
  CHECK(cudaMalloc(&dv.out, (size_t)b.ntok * H * D * 2));
  CHECK(cudaMalloc(&dv.partial, partialFloats * 4));
  CHECK(cudaMalloc(&dv.counters, (size_t)b.ntok * KVH * 4));
  CHECK(cudaMemset(dv.counters, 0, (size_t)b.ntok * KVH * 4));
  CHECK(cudaMemcpy(dv.qkv, b.qkv.data(), b.qkv.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dv.positions, b.positions.data(), b.ntok * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dv.tokenSeqs, b.tokenSeqs.data(), b.ntok * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dv.tables, b.tables.data(), b.tables.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dv.rows, plans[0].rows.data(), b.ntok * 4, cudaMemcpyHostToDevice));  // every token is a row
  fillPool<<<4 * sms, 256>>>(dv.pool, b.poolElems);
  CHECK(cudaGetLastError());

  std::vector<uint16_t> out((size_t)b.ntok * H * D), first;
  auto once = [&](int kernel) {
    CHECK(cudaMemset(dv.out, 0xff, out.size() * 2));  // NaN everywhere: unwritten outputs show
    runDecode(kernel, group, b, c, dv, plans[kernel - 1]);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(out.data(), dv.out, out.size() * 2, cudaMemcpyDeviceToHost));
    return check(b, c, out, rng, 16);
  };
  double err[kDecodeKernels], vsFirst[kDecodeKernels] = {}, again[kDecodeKernels];
  float us[kDecodeKernels];
  for (int k = 1; k <= kDecodeKernels; ++k) {
    err[k - 1] = once(k);
    if (k == 1) first = out;
    else vsFirst[k - 1] = distance(out, first);
    us[k - 1] = 1e3f * medianMs([&] { runDecode(k, group, b, c, dv, plans[k - 1]); });
    again[k - 1] = once(k);  // decode2 / decode3: the split counters reset themselves
  }
  const double boundUs = kvBytes / (gbps * 1e9) * 1e6;
  double worst = 0;
  for (int k = 0; k < kDecodeKernels; ++k) worst = std::max({worst, err[k], again[k]});
  std::printf("%-24s %2d %7.1f %7.1f", c.name.c_str(), group, kvBytes / 1e6, boundUs);
  for (int k = 0; k < kDecodeKernels; ++k) std::printf(" %7.1f %3.0f%%", us[k], 100 * boundUs / us[k]);
  std::printf(" %5.2fx %8.2e ", std::min(us[0], us[1]) / us[2], worst);
  for (int k = 0; k < kDecodeKernels; ++k) std::printf("%s%d", k ? "/" : " ", plans[k].splits);
  std::printf("\n");
  bool ok = true;
  for (int k = 0; k < kDecodeKernels; ++k)
    if (!(err[k] < 2e-2) || !(again[k] < 2e-2) || !(vsFirst[k] < 2e-2)) {
      std::printf("  FAILED: %s err %.3e, again %.3e, vs d1 %.3e\n", kDecodeNames[k], err[k], again[k], vsFirst[k]);
      ok = false;
    }
  for (void* p : {(void*)dv.qkv, (void*)dv.positions, (void*)dv.tokenSeqs, (void*)dv.tables, (void*)dv.rows,
                  (void*)dv.pool, (void*)dv.out, (void*)dv.partial, (void*)dv.counters})
    CHECK(cudaFree(p));
  return ok;
}

bool decodeTable(int sms, bool quick, std::mt19937& rng) {
  for (auto k : {tandem_flash_decode3_d128_g4, tandem_flash_decode3_d128_g8})
    CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, tandem_attn::decode3SmemBytes(D)));
  // All shared memory, no L1 (as the engine sets it): room for every variant's CTAs per multiprocessor.
  for (auto k : {tandem_flash_decode3_d128_g4, tandem_flash_decode3_d128_g8, decode3Variant<4, 2, 3>,
                 decode3Variant<8, 2, 3>, decode3Variant<4, 4, 1>, decode3Variant<8, 4, 1>})
    CHECK(cudaFuncSetAttribute(k, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
  for (auto k : {decode3Variant<4, 2, 3>, decode3Variant<8, 2, 3>})
    CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, tandem_attn::decode3SmemBytes(D, 2)));
  for (auto k : {decode3Variant<4, 4, 1>, decode3Variant<8, 4, 1>})
    CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, tandem_attn::decode3SmemBytes(D, 4)));
  const double gbps = readGBps();
  std::printf("\ndecode, 8 kv heads, head dim 128, one layer; bound: K and V read once at %.0f GB/s (2 x copy).\n"
              "d1 = tandem_flash_decode + _combine, d2 = _decode2, d3 = _decode3 (engine: 3 stages, 2 CTAs/SM), d3s2 /\n"
              "d3s4: decode3 with 2 stages at 3 CTAs/SM / 4 stages at 1; us = median of 20, %% = bound / time; d3 x = best\n"
              "of d1, d2 over d3; err = worst relative L2 error of any kernel against the float64 reference\n", gbps);
  std::printf("%-24s %2s %7s %7s", "case", "G", "KV MB", "bound");
  for (const char* n : kDecodeNames) std::printf(" %7s %4s", n, "%");
  std::printf(" %6s %8s  %s\n", "d3 x", "err", "splits");
  bool ok = true;
  for (int group : {4, 8}) {
    H = KVH * group;
    for (int batch : {1, 8, 16, 64, 128})
      for (int ctx : {512, 3072, 8192}) {
        if (quick && ctx != 512) continue;
        Case c{"b" + std::to_string(batch) + " ctx " + std::to_string(ctx), {}};
        for (int i = 0; i < batch; ++i) c.seqs.push_back({ctx - 1 - (i % 7), 1});
        ok = decodeCase(c, group, sms, gbps, rng) && ok;
      }
    // Ragged contexts (1 .. ~3000 keys), without and with a sliding window.
    for (int window : {0, 700})
      for (int batch : {16, 64}) {
        Case c{"b" + std::to_string(batch) + " ragged" + (window ? " window 700" : ""), {}, window};
        for (int i = 0; i < batch; ++i) c.seqs.push_back({(i * 997 + 13) % 3000, 1});
        ok = decodeCase(c, group, sms, gbps, rng) && ok;
      }
  }
  H = 32;
  std::printf(ok ? "all decode kernels within 2e-2 of the float64 reference and of d1\n"
                 : "DECODE ERROR above tolerance\n");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  CHECK(cudaFuncSetAttribute(tandem_flash_prefill_d128, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             2 * 2 * tandem_attn::kKeys * D * 2));
  CHECK(cudaFuncSetAttribute(tandem_flash_prefill2_d128, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             tandem_attn::prefill2SmemBytes(D)));
  CHECK(cudaFuncSetAttribute(tandem_flash_prefill2w4_d128, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             tandem_attn::prefill2SmemBytes(D)));
  // As the engine sets it: room for two CTAs per multiprocessor, all shared memory.
  CHECK(cudaFuncSetAttribute(tandem_flash_prefill3_d128, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             tandem_attn::prefill3SmemBytes(D)));
  CHECK(cudaFuncSetAttribute(tandem_flash_prefill3_d128, cudaFuncAttributePreferredSharedMemoryCarveout,
                             cudaSharedmemCarveoutMaxShared));
  std::printf("%s, %d SMs; shape H=%d KVH=%d D=%d, block %d\n", prop.name, sms, H, KVH, D, BS);
  std::vector<Case> cases = {
      {"prefill 512", {{0, 512}}},
      {"prefill 3000", {{0, 3000}}},
      {"prefill 8192", {{0, 8192}}},
      {"chunk 1000 after 2000", {{2000, 1000}}},
      {"two prompts 700 + 37", {{0, 700}, {0, 37}}},
      {"prefill 3000 window 700", {{0, 3000}}, 700},
      {"prefill 100 + 3 decodes", {{0, 100}, {543, 1}, {3031, 1}, {17, 1}}},
  };
  cases.push_back({"decode b4 ctx 3032 window 1000", {{3031, 1}, {3000, 1}, {500, 1}, {2, 1}}, 1000});
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  if (quick) cases.resize(2);

  std::mt19937 rng(1234);
  // new: prefill2 (8 warps, 128-row tiles) + decode2, the engine's default; new4: prefill2w4 (4 warps) + decode2;
  // new3: prefill3 (4 warps of 32 rows, 128-row tiles) + decode2 (TANDEM_ATTENTION=prefill3). new x: flash over
  // new; new3 x: new over new3.
  std::printf("%-32s %8s %8s %8s %8s %8s %9s %9s %9s %9s %9s %9s %8s %8s %8s %8s %8s %8s\n", "case", "old ms",
              "flash ms", "new ms", "new4 ms", "new3 ms", "old err", "flash err", "new err", "new4 err", "new3 err",
              "new-flash", "flash TF", "new TF", "new4 TF", "new3 TF", "new x", "new3 x");
  bool ok = true;
  for (const Case& c : cases) {
    Batch b = makeBatch(c, rng);
    FlashPlan f = plan(b, c, sms), f2 = plan2(b, c, sms);
    Device dv;
    CHECK(cudaMalloc(&dv.qkv, b.qkv.size() * 4));
    CHECK(cudaMalloc(&dv.positions, b.ntok * 4));
    CHECK(cudaMalloc(&dv.tokenSeqs, b.ntok * 4));
    CHECK(cudaMalloc(&dv.tables, b.tables.size() * 4));
    CHECK(cudaMalloc(&dv.tiles, std::max<size_t>(1, f.tiles.size() + f2.tiles.size()) * 4));
    CHECK(cudaMalloc(&dv.rows, std::max<size_t>(1, f.rows.size() + f2.rows.size()) * 4));
    CHECK(cudaMalloc(&dv.pool, b.poolElems * 2));
    CHECK(cudaMalloc(&dv.out, (size_t)b.ntok * H * D * 2));
    CHECK(cudaMalloc(&dv.partial, std::max<size_t>(1, f.rows.size() * H * f.splits * tandem_attn::partialStride(D)) * 4));
    CHECK(cudaMalloc(&dv.partial2, std::max<size_t>(1, f2.rows.size() * H * f2.splits * tandem_attn::partialStride(D)) * 4));
    CHECK(cudaMalloc(&dv.counters, std::max<size_t>(1, f2.rows.size() * KVH) * 4));
    CHECK(cudaMemset(dv.counters, 0, std::max<size_t>(1, f2.rows.size() * KVH) * 4));
    // The tiles and rows of both plans: the first plan's at the front of dv.tiles / dv.rows, the second's after.
    CHECK(cudaMemcpy(dv.qkv, b.qkv.data(), b.qkv.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dv.positions, b.positions.data(), b.ntok * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dv.tokenSeqs, b.tokenSeqs.data(), b.ntok * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dv.tables, b.tables.data(), b.tables.size() * 4, cudaMemcpyHostToDevice));
    if (!f.tiles.empty()) CHECK(cudaMemcpy(dv.tiles, f.tiles.data(), f.tiles.size() * 4, cudaMemcpyHostToDevice));
    if (!f.rows.empty()) CHECK(cudaMemcpy(dv.rows, f.rows.data(), f.rows.size() * 4, cudaMemcpyHostToDevice));
    fillPool<<<4 * sms, 256>>>(dv.pool, b.poolElems);
    if (!f2.tiles.empty())
      CHECK(cudaMemcpy(dv.tiles + f.tiles.size(), f2.tiles.data(), f2.tiles.size() * 4, cudaMemcpyHostToDevice));
    if (!f2.rows.empty())
      CHECK(cudaMemcpy(dv.rows + f.rows.size(), f2.rows.data(), f2.rows.size() * 4, cudaMemcpyHostToDevice));
    Device dv2 = dv;
    dv2.tiles = dv.tiles + f.tiles.size();
    dv2.rows = dv.rows + f.rows.size();
    std::vector<uint16_t> out((size_t)b.ntok * H * D), outFlash, outNew;
    auto run = [&](int which) {
      if (which == 0) runOld(b, c, dv);
      else if (which == 1) runFlash(b, c, dv, f);
      else runFlash2(b, c, dv2, f2, which == 2 ? 8 : which == 3 ? 4 : 3, dv.tiles, static_cast<int>(f.tiles.size() / 3));
    };
    auto once = [&](int which) {
      CHECK(cudaMemset(dv.out, 0xff, out.size() * 2));  // NaN everywhere: unwritten outputs show
      run(which);
      CHECK(cudaGetLastError());
      CHECK(cudaDeviceSynchronize());
      CHECK(cudaMemcpy(out.data(), dv.out, out.size() * 2, cudaMemcpyDeviceToHost));
      return check(b, c, out, rng);
    };
    double err[5];
    std::vector<uint16_t> outNew4, outNew3;
    for (int which = 0; which < 5; ++which) {
      err[which] = once(which);
      if (which == 1) outFlash = out;
      if (which == 2) outNew = out;
      if (which == 3) outNew4 = out;
      if (which == 4) outNew3 = out;
    }
    const double newVsFlash = distance(outNew, outFlash), new4VsFlash = distance(outNew4, outFlash);
    const double new3VsFlash = distance(outNew3, outFlash);
    float tOld = medianMs([&] { run(0); });
    float tFlash = medianMs([&] { run(1); });
    float tNew = medianMs([&] { run(2); });
    float tNew4 = medianMs([&] { run(3); });
    float tNew3 = medianMs([&] { run(4); });
    // Again after 21 more launches each: decode2's counters must have reset themselves.
    const double errAgain = once(2), errAgain2 = once(3), errAgain3 = once(4);
    double keys = 0;  // (query, key) pairs per head
    for (int t = 0; t < b.ntok; ++t) {
      int p = b.positions[t];
      keys += c.window > 0 ? std::min(p + 1, c.window) : p + 1;
    }
    const double flops = 4.0 * D * keys * H;
    std::printf("%-32s %8.3f %8.3f %8.3f %8.3f %8.3f %9.2e %9.2e %9.2e %9.2e %9.2e %9.2e %8.1f %8.1f %8.1f %8.1f %7.2fx "
                "%7.2fx  (splits %d / %d)\n",
                c.name.c_str(), tOld, tFlash, tNew, tNew4, tNew3, err[0], err[1], err[2], err[3], err[4],
                std::max({newVsFlash, new4VsFlash, new3VsFlash}), flops / (tFlash * 1e-3) / 1e12,
                flops / (tNew * 1e-3) / 1e12, flops / (tNew4 * 1e-3) / 1e12, flops / (tNew3 * 1e-3) / 1e12,
                tFlash / tNew, tNew / tNew3, f.splits, f2.splits);
    if (!(err[1] < 2e-2) || !(err[2] < 2e-2) || !(err[3] < 2e-2) || !(err[4] < 2e-2) || !(errAgain < 2e-2) ||
        !(errAgain2 < 2e-2) || !(errAgain3 < 2e-2) || !(newVsFlash < 2e-2) || !(new4VsFlash < 2e-2) ||
        !(new3VsFlash < 2e-2)) {
      std::printf("  FAILED: flash err %.3e, new err %.3e, new4 err %.3e, new3 err %.3e (again %.3e / %.3e / %.3e), "
                  "new / new4 / new3 vs flash %.3e / %.3e / %.3e\n",
                  err[1], err[2], err[3], err[4], errAgain, errAgain2, errAgain3, newVsFlash, new4VsFlash, new3VsFlash);
      ok = false;
    }
    for (void* p : {(void*)dv.qkv, (void*)dv.positions, (void*)dv.tokenSeqs, (void*)dv.tables, (void*)dv.tiles,
                    (void*)dv.rows, (void*)dv.pool, (void*)dv.out, (void*)dv.partial, (void*)dv.partial2,
                    (void*)dv.counters})
      CHECK(cudaFree(p));
  }
  std::printf(ok ? "all flash and new (new, new4, new3) outputs within 2e-2 of the float64 reference and of each other\n"
                 : "FLASH ERROR above tolerance\n");
  const bool decodeOk = decodeTable(sms, quick, rng);
  return ok && decodeOk ? 0 : 1;
}
