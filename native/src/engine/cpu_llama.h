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
#include "cpu_parallel.h"
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

// One rank of the model: rank `groupRank` of the group of one pipeline stage (with a single rank, the whole model;
// the group's layout: ParallelConfig in cpu_parallel.h). It holds only its slice of the weights (heads / tp, its kv
// heads, intermediate / tp, its vocabulary rows, or all of them when tp is 1; of an MoE FFN the router, and its
// experts or its channels of every expert), reads and writes only its kv heads of its layers in the caller's pool,
// and meets the other ranks of its stage through `comm` (all-reduce after o_proj, down_proj and the MoE FFN and
// for the embedding; gather of the logits). CpuLlama drives the ranks.
class CpuLlamaRank {
 public:
  // Per micro-batch activations and the inputs every layer shares.
  struct Step {
    const ForwardInput* in = nullptr;
    std::vector<int> seqOf;               // sequence of each token
    std::vector<float> cosv, sinv;        // ntok x headDim / 2
    std::vector<float> x, xn, tmp;        // ntok x hidden (x: the residual stream)
    std::vector<float> qkv, attn;         // ntok x local (q + 2 kv), ntok x local q
    std::vector<float> gateUp, act;       // ntok x 2 local intermediate, ntok x local intermediate
    std::vector<float> moePairs;          // MoE: ntok x topK x hidden, each (token, choice)'s weighted output
    std::vector<int> moeChosen;           // MoE: ntok x topK experts
    const ExpertPlacement* placement = nullptr;  // MoE: the expert slots of this pass (fixed for its duration)
    const int64_t* routedBefore = nullptr;       // MoE: numLayers x numExperts pairs routed under it by earlier passes
  };

  // redundantExpertSlots: expert slots per rank beyond numExperts / ep (expert parallelism only).
  CpuLlamaRank(const LlamaConfig& config, const KvPoolView& pool, const ParallelConfig& parallel, int stage,
               int groupRank, unsigned threads, const GemmKernel& gemm, int redundantExpertSlots = 0);

  int stage() const { return stage_; }
  int groupRank() const { return groupRank_; }
  const TensorShard& shard() const { return shard_; }
  const IndexRange& layers() const { return layers_range_; }
  unsigned threads() const { return pool_threads_.threads(); }
  // Whether this rank holds the tensor `name` (its stage's layers; the embedding on stage 0, or on the last stage
  // when tied; the final norm and lm_head on the last stage).
  bool holds(const std::string& name) const { return slots_.count(name) > 0; }
  void setWeight(const std::string& name, const float* data, size_t count);
  std::vector<std::string> missingWeights() const;

  // Sizes the activations and computes RoPE tables for one micro-batch.
  void begin(const ForwardInput& in, Step& step) const;
  // Stage 0: the micro-batch's embeddings into step.x (vocabulary-parallel: rows of other ranks are summed in).
  void embed(Step& step, HostCommunicator& comm);
  // One decoder layer (global index) on step.x: attention block, then the feed-forward block.
  void layerStep(int layer, Step& step, HostCommunicator& comm);
  // Last stage: final norm and this rank's vocabulary rows of each sequence's last token; the tensor-parallel
  // rank 0 receives the whole nseq x vocabSize rows in `out` (others pass nullptr).
  void logits(Step& step, HostCommunicator& comm, float* out);
  void stopThreads() { pool_threads_.stop(); }
  // MoE models: tokens routed per (layer, expert) (numLayers x numExperts, layer-major) by this rank's layers since
  // the last call, and a reset. Only the group's rank 0 counts (every rank routes every token alike), so the sum
  // over the ranks counts each token once. Not during a forward().
  void takeExpertTokens(std::vector<int64_t>& into);
  // MoE models: (token, choice) pairs this rank's expert slots ran per layer since the last call, added to
  // into[layer * epRanks + groupRank] (epRanks: ep, or 1 with rank 0 counting when ep is 1), and a reset.
  void takeRankPairs(std::vector<int64_t>& into, int epRanks);
  CpuMoe* moe() { return moe_.get(); }

 private:
  struct Layer {
    std::vector<float> inputNorm, postAttentionNorm;
    std::vector<float> wqkv, bqkv;  // q, k, v of this rank stacked: [(heads + 2 kvHeads) * headDim, hidden]
    std::vector<float> wo, bo;      // [hidden, heads * headDim]: this rank's columns
    std::vector<float> wgateUp;     // gate and up stacked: [2 * intermediate, hidden]
    std::vector<float> wdown;       // [hidden, intermediate]: this rank's columns
    std::vector<float> qNorm, kNorm;  // [headDim] each, when config.qkNorm (replicated)
  };
  struct Slot {
    float* dest;
    size_t count;
    std::string shape;
    bool set = false;
  };

  void registerSlot(const std::string& name, std::vector<float>& storage, size_t offset, size_t rows, size_t cols);
  float* kvTile(int layer, int kv, int block) const;
  void attentionBlock(const Layer& L, int layer, Step& step, HostCommunicator& comm);
  // The feed-forward block: step.x += down(silu(gate(xn)) * up(xn)) (dense SwiGLU) or the MoE FFN of cpu_moe.h,
  // each rank's partial output all-reduced over the stage group.
  void mlpBlock(const Layer& L, int layer, Step& step, HostCommunicator& comm);
  // The all-reduce of attention and dense partial sums: over the group when tp splits it, nothing when replicated.
  void tpAllReduce(HostCommunicator& comm, float* data, size_t n);
  void attention(const ForwardInput& in, int layer, const float* qkv, float* out, const std::vector<int>& seqOf);
  // y[m, n] = x[m, :] . w[n, :] (+ bias[n]) for m < rows; w is [n, k] row-major; parallel over n.
  void matmul(const float* x, size_t rows, size_t k, const float* w, const float* bias, size_t n, float* y);

  const LlamaConfig& config_;
  KvPoolView pool_;
  GemmKernel gemm_;
  int stage_, groupRank_, groupSize_;
  TensorShard shard_;
  IndexRange layers_range_;
  bool firstStage_, lastStage_, replicatedKv_;
  size_t qDim_, kvDim_, qkvDim_, inter_, kvStride_;  // local sizes; kvStride_: the pool's kv heads x headDim
  std::vector<float> invFreq_;  // headDim / 2 RoPE frequencies, scaling applied
  std::vector<float> embed_, finalNorm_, lmHead_;
  std::vector<Layer> layerWeights_;  // layers_range_.count layers
  std::map<std::string, Slot> slots_;
  std::vector<std::string> order_;  // checkpoint order, for missingWeights()
  ThreadPool pool_threads_;
  std::unique_ptr<CpuMoe> moe_;        // the FFN of this rank's layers when config.moe.numExperts > 0
  std::vector<int64_t> expertTokens_;  // numLayers x numExperts; counted by group rank 0 only
  std::vector<int64_t> rankPairs_;     // numLayers: pairs this rank's slots ran
  int epRank_;                         // this rank's index among the placement's ranks (0 when ep is 1)
};

// What applying an expert placement took: slots rewritten, how many of those copies came from another rank, bytes.
struct ExpertPlacementChange {
  int slotsCopied = 0;
  int crossRankCopies = 0;
  size_t bytes = 0;
};

// The CPU model runner: max(tp, ep) x pp ranks (issues 25, 28), each on its own native thread with its own compute
// threads, meeting through host collectives; tp = pp = ep = 1 is the single-rank model. A batch of several
// sequences is split into as many micro-batches as there are stages so that stages overlap.
class CpuLlama {
 public:
  // Throws BadInput when the config, the layout or the pool is inconsistent (pool too small, misaligned, tp not
  // dividing the heads, ...) or the CPU cannot run `kernel` ("auto", "avx512", "avx2", "generic"; see
  // cpu_kernels.h). `threads`: compute threads in all, split evenly between ranks (at least one each).
  // redundantExpertSlots: expert slots per EP rank beyond numExperts / ep (EPLB replicas; needs ep > 1). They start
  // as lib/moe's staticPlacement has them, filled from the experts' owners before the first pass.
  CpuLlama(const LlamaConfig& config, const KvPoolView& pool, unsigned threads, const std::string& kernel = "auto",
           const ParallelConfig& parallel = {}, int redundantExpertSlots = 0);
  ~CpuLlama();
  CpuLlama(const CpuLlama&) = delete;
  CpuLlama& operator=(const CpuLlama&) = delete;

  const LlamaConfig& config() const { return config_; }
  const KvPoolView& pool() const { return pool_; }
  const ParallelConfig& parallel() const { return parallel_; }
  unsigned threads() const;
  const std::string& kernelName() const { return gemm_.name; }

  // Copies rank `rank`'s slice of a tensor in by its Hugging Face name (rank = stage * group + group rank;
  // lib/engine/parallel.ts cuts the slices). Throws BadInput naming the tensor when that rank does not hold it or
  // `count` is not the slice's element count.
  void setWeight(const std::string& name, const float* data, size_t count, int rank = 0);
  // Names of the tensors not set yet, in checkpoint order ("name (rank r)" with several ranks).
  std::vector<std::string> missingWeights() const;

  // Throws BadInput (before anything is written) unless every index in `in` is in range and consistent.
  void validate(const ForwardInput& in) const;
  // Validates, writes the new tokens' K and V into the pool, and returns nseq x vocabSize logits (each
  // sequence's last new token). Throws Aborted if abort() is called meanwhile (the pool may then hold part
  // of this step's K and V). An exception in one rank releases the others (their barriers break) and is
  // rethrown here; the runner stays usable.
  std::vector<float> forward(const ForwardInput& in);

  // Makes a running or later forward() throw Aborted on every rank. Callable from any thread.
  void abort() { aborted_.store(true); }
  // Joins the rank and worker threads. Call only when no forward() is running. Idempotent.
  void stopThreads();
  // MoE models: tokens routed to each expert (layer-major, numLayers x numExperts) by the forward passes since
  // the last call, counted once for the whole model however it is split, and a reset; empty for a dense model.
  // Callable from any thread.
  std::vector<int64_t> takeExpertTokens();
  // MoE models: (token, choice) pairs run by each expert-parallel rank's slots per layer (numLayers x ep, layer-major;
  // x 1 when ep is 1) since the last call, and a reset. Callable from any thread.
  std::vector<int64_t> takeRankTokens();

  // Expert parallelism with online balancing (EPLB, issue 28). The placement in force (per layer, slot -> expert
  // over the stage group's ep x slotsPerRank slots; every stage group uses the same one for its layers).
  ExpertPlacement expertPlacement() const;
  int expertSlotsPerRank() const { return slotsPerRank_; }
  // Checks a new table against the model (layers, slot count, expert range, every expert replicated) and that every
  // weight is set; throws BadInput naming the fault. Changes nothing.
  ExpertPlacement checkExpertPlacement(std::vector<std::vector<int32_t>> slotExpert) const;
  // Between passes (waits for one in progress, which keeps the old table): copies into every slot whose expert
  // changes that expert's weights from a slot holding it now (its own rank's when it has one, else another rank's:
  // ranks are threads of this process, so the transfer is a memcpy, staged so that slots can swap experts), then
  // switches the table. The next pass routes through it.
  ExpertPlacementChange applyExpertPlacement(const ExpertPlacement& placement);
  // Host time each rank (rank = stage * group + group rank) spent in its collectives since the last call, and a
  // reset; all zero with a single rank. Callable from any thread (between forward passes for whole passes).
  std::vector<CollectiveTime> takeCollectiveTime();
  // Test hook: the next forward() throws in rank `rank` just before layer `layer` (once).
  void failRankForTest(int rank, int layer) {
    failLayer_.store(layer);
    failRank_.store(rank);
  }

 private:
  // Runs the current job's micro-batches for one rank; records the first error and breaks the group on failure.
  void runRank(int rank);
  void rankLoop(int rank);
  void breakGroup();
  // Copies expert weights so that the slots hold `to` where they hold `from` now (-1: a slot never filled). Call
  // with passMutex_ held.
  ExpertPlacementChange moveExperts(const std::vector<std::vector<int32_t>>& from, const ExpertPlacement& to);
  // Fills the redundant slots of the initial placement from their experts' owners, once. passMutex_ held.
  void fillReplicas();

  LlamaConfig config_;
  KvPoolView pool_;
  ParallelConfig parallel_;
  GemmKernel gemm_;
  std::vector<std::unique_ptr<CpuLlamaRank>> ranks_;
  std::vector<std::unique_ptr<HostCommunicator>> comms_;       // one per stage
  std::vector<std::unique_ptr<ActivationChannel>> channels_;  // (stage s -> s + 1, group rank r) at s * group + r
  std::atomic<bool> aborted_{false};
  std::atomic<int> failRank_{-1}, failLayer_{-1};

  // The job every rank thread runs (ranks 1.., rank 0 on the forward thread).
  std::vector<std::thread> rankThreads_;
  std::mutex jobMutex_;
  std::condition_variable jobWake_, jobDone_;
  uint64_t jobGeneration_ = 0;
  int jobPending_ = 0;
  bool stopping_ = false;
  const std::vector<ForwardInput>* microBatches_ = nullptr;
  std::vector<size_t> microBatchFirstSeq_;
  float* logits_ = nullptr;
  std::exception_ptr error_;
  bool errorIsBreak_ = false;  // error_ is only a RankGroupBroken so far
  mutable std::mutex expertMutex_;
  std::vector<int64_t> expertTokens_;  // guarded by expertMutex_; the ranks' counts after each forward
  std::vector<int64_t> rankTokens_;    // guarded by expertMutex_; numLayers x placement ranks
  // One pass or one placement change at a time: a change never rewrites a slot a pass is reading.
  std::mutex passMutex_;
  int slotsPerRank_ = 0;
  std::shared_ptr<const ExpertPlacement> placement_;  // MoE models; replaced whole by applyExpertPlacement
  std::shared_ptr<const ExpertPlacement> activePlacement_;  // the running pass's, set under passMutex_
  // Pairs routed to each (layer, expert) by the passes completed under the placement in force (the replicas' round
  // robin carries over passes); advanced after a pass that succeeded, zeroed when the placement changes. passMutex_.
  std::vector<int64_t> routedSincePlacement_;
  bool replicasFilled_ = true;  // false until the redundant slots of the initial placement are filled
  bool expertsMoved_ = false;   // an expert slot was rewritten: expert weights can no longer be set by name
};

}  // namespace tandem::engine
