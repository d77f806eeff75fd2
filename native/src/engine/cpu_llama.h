// The reference engine's CPU model: a Llama-family decoder (Llama 2/3.x with llama3 RoPE scaling, Qwen2 with
// q/k/v bias, Mistral's sliding window; Mixtral and Qwen3-MoE with the MoE FFN of cpu_moe.h), fp32 throughout,
// reading and writing a caller-owned paged KV pool.
// Pure C++ (no N-API): engine_wrap.cpp exposes it to JavaScript. The contract of forward() is ForwardBatch in
// lib/engine/runner.ts; the KV pool layout is lib/kv/pool.ts's, fp32 with head layout NHD.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_moe.h"
#include "llama_common.h"

namespace tandem::engine {

// Caller-owned fp32 KV memory: numBlocks blocks of blockSize tokens for every layer, K and V.
struct KvPoolView {
  float* base = nullptr;
  size_t bytes = 0;
  int numBlocks = 0;
  int blockSize = 0;
  KvLayout layout = KvLayout::BlockMajor;
};

// A fixed set of threads that run the parallel parts of one forward. The thread that calls parallelFor runs
// chunks too, so `threads` counts it: threads - 1 helpers are started.
class ThreadPool {
 public:
  explicit ThreadPool(unsigned threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Calls body(begin, end) over [0, count) in chunks of `grain`, spread over the pool and the caller; returns
  // when every chunk has run. Not reentrant: one caller at a time (forward() runs on one thread).
  void parallelFor(size_t count, size_t grain, const std::function<void(size_t, size_t)>& body);
  // Joins the helpers. Idempotent; parallelFor afterwards runs everything on the caller.
  void stop();
  unsigned threads() const { return static_cast<unsigned>(workers_.size()) + 1; }

 private:
  void workerLoop();
  void runChunks();

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  const std::function<void(size_t, size_t)>* body_ = nullptr;
  size_t count_ = 0, grain_ = 1;
  std::atomic<size_t> next_{0};
  unsigned busy_ = 0;  // helpers still inside the current job
  std::exception_ptr error_;
};

class CpuLlama {
 public:
  // Throws BadInput when the config or the pool is inconsistent (pool too small, misaligned, ...) or the CPU
  // cannot run `kernel` ("auto", "avx512", "avx2", "generic"; see cpu_kernels.h).
  CpuLlama(const LlamaConfig& config, const KvPoolView& pool, unsigned threads, const std::string& kernel = "auto");

  const LlamaConfig& config() const { return config_; }
  const KvPoolView& pool() const { return pool_; }
  unsigned threads() const { return pool_threads_.threads(); }
  const std::string& kernelName() const { return gemm_.name; }

  // Copies a tensor in by its Hugging Face name. Throws BadInput naming the tensor when the name is not one
  // this config has or `count` is not its element count.
  void setWeight(const std::string& name, const float* data, size_t count);
  // Names of the tensors not set yet, in checkpoint order.
  std::vector<std::string> missingWeights() const;

  // Throws BadInput (before anything is written) unless every index in `in` is in range and consistent.
  void validate(const ForwardInput& in) const;
  // Validates, writes the new tokens' K and V into the pool, and returns nseq x vocabSize logits (each
  // sequence's last new token). Throws Aborted if abort() is called meanwhile (the pool may then hold part
  // of this step's K and V).
  std::vector<float> forward(const ForwardInput& in);

  // MoE models: tokens routed to each expert (layer-major, numLayers x numExperts) by the forward passes since
  // the last call, and a reset; empty for a dense model. Callable from any thread.
  std::vector<int64_t> takeExpertTokens();

  // Makes a running or later forward() throw Aborted. Callable from any thread.
  void abort() { aborted_.store(true); }
  // Joins the worker threads. Call only when no forward() is running.
  void stopThreads() { pool_threads_.stop(); }

 private:
  struct Layer {
    std::vector<float> inputNorm, postAttentionNorm;
    std::vector<float> wqkv, bqkv;  // q, k, v projections stacked: [(heads + 2 kvHeads) * headDim, hidden]
    std::vector<float> wo, bo;      // [hidden, heads * headDim]
    std::vector<float> wgateUp;     // gate and up stacked: [2 * intermediate, hidden]
    std::vector<float> wdown;       // [hidden, intermediate]
    std::vector<float> qNorm, kNorm;  // [headDim] each, when config.qkNorm
  };
  struct Slot {
    float* dest;
    size_t count;
    std::string shape;
    bool set = false;
  };

  // rows == 0: a 1-D tensor of `cols` elements.
  void registerSlot(const std::string& name, std::vector<float>& storage, size_t offset, size_t rows, size_t cols);
  float* kvTile(int layer, int kv, int block) const;
  void attention(const ForwardInput& in, int layer, const float* qkv, float* out, const std::vector<int>& seqOf);
  // y[m, n] = x[m, :] . w[n, :] (+ bias[n]) for m < rows; w is [n, k] row-major; parallel over n.
  void matmul(const float* x, size_t rows, size_t k, const float* w, const float* bias, size_t n, float* y);

  LlamaConfig config_;
  KvPoolView pool_;
  GemmKernel gemm_;
  size_t qDim_, kvDim_, qkvDim_;
  std::vector<float> invFreq_;  // headDim / 2 RoPE frequencies, scaling applied
  std::vector<float> embed_, finalNorm_, lmHead_;
  std::vector<Layer> layers_;
  std::map<std::string, Slot> slots_;
  std::vector<std::string> order_;  // checkpoint order, for missingWeights()
  ThreadPool pool_threads_;
  std::atomic<bool> aborted_{false};
  std::unique_ptr<CpuMoe> moe_;  // the FFN of every layer when config.moe.numExperts > 0
  std::mutex expertMutex_;
  std::vector<int64_t> expertTokens_;  // guarded by expertMutex_
};

}  // namespace tandem::engine
