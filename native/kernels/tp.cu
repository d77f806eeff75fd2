// Tensor parallelism's kernels (issue 25; native/src/engine/cuda_llama_tp.h): the local communicator's sum and
// gather (ranks on one device read each other's buffers), and the vocabulary-parallel embedding.
#include <cuda_bf16.h>
#include <stdint.h>

namespace tandem_tp {

constexpr int kMaxRanks = 8;  // LocalTpGroup::kMaxRanks
// The ranks' inputs, by value (cuda_llama_tp.cpp's TpSources).
struct Sources {
  const float* p[kMaxRanks];
};

}  // namespace tandem_tp

// out[i] = src[0][i] + src[1][i] + ... + src[n-1][i], left to right in rank order: every rank that runs it gets
// the same bits.
extern "C" __global__ void tandem_tp_sum_f32(float* out, unsigned long long count, int n, tandem_tp::Sources src) {
  for (unsigned long long i = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    float v = src.p[0][i];
    for (int s = 1; s < n; ++s) v += src.p[s][i];
    out[i] = v;
  }
}

// out[r, col0 + c] = in[r, c] for c < cols; out rows are outCols wide. Grid: rows.
extern "C" __global__ void tandem_tp_copy_columns_f32(float* out, int outCols, int col0, const float* in, int rows,
                                                      int cols) {
  const size_t r = blockIdx.x;
  const float* from = in + r * cols;
  float* to = out + r * outCols + col0;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) to[c] = from[c];
}

// The vocabulary-parallel embedding: x[t] = table[tokens[t] - vocabStart] (fp32) when this rank holds the token's
// row (vocabStart <= id < vocabStart + vocabRows), else zeros; the all-reduce that follows sums the one non-zero
// row. Grid: tokens.
extern "C" __global__ void tandem_tp_embed_vocab_shard(const __nv_bfloat16* table, const int32_t* tokens, int hidden,
                                                       int vocabStart, int vocabRows, float* x) {
  const int id = tokens[blockIdx.x] - vocabStart;
  float* out = x + (size_t)blockIdx.x * hidden;
  if (id < 0 || id >= vocabRows) {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = 0.0f;
    return;
  }
  const __nv_bfloat16* row = table + (size_t)id * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = __bfloat162float(row[i]);
}
