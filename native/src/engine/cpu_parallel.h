// Tensor and pipeline parallelism for the CPU reference engine (issue 25): the layout arithmetic (the same as
// lib/engine/parallel.ts, which checks layouts and cuts the weight slices) and the host collectives that ranks
// running as threads of one process use in place of NCCL: a barrier that can be broken, an all-reduce with a
// fixed summation order (so results do not depend on thread timing), a gather of vocabulary-parallel logits,
// and the channel that hands activations from one pipeline stage to the next.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "llama_common.h"

namespace tandem::engine {

// The ranks of one pipeline stage form one group of max(tp, ep) ranks (lib/engine/parallel.ts has the same rules):
// attention, the dense FFN, the embedding and lm_head are tensor-parallel over the group when tp equals its size,
// or replicated on every rank of it when tp is 1; the MoE FFN is tensor-parallel over the group (each expert's
// gate/up rows and down columns split, every rank holding every expert) when ep is 1, or expert-parallel over the
// same group (rank i holds experts [i * E / ep, (i + 1) * E / ep) whole) when ep is its size: the Megatron / vLLM
// convention of EP ranks being the TP ranks. Either way the MoE output is summed over the group in rank order.
struct ParallelConfig {
  int tp = 1;  // tensor parallel ranks per stage (attention, dense FFN, vocabulary)
  int pp = 1;  // pipeline stages
  int ep = 1;  // expert parallel ranks per stage (MoE models)
  int group() const { return tp > ep ? tp : ep; }
  int ranks() const { return group() * pp; }
};

// [start, start + count)
struct IndexRange {
  int start = 0;
  int count = 0;
};

// What tensor-parallel rank `rank` of `size` holds (lib/engine/parallel.ts's TensorShard).
struct TensorShard {
  int rank = 0, size = 1;
  IndexRange heads, kvHeads, intermediate, vocab;
  bool writesKv = true;  // false for a replica of a kv head that a lower rank writes
};

// Throws BadInput unless the layout fits the model (lib/engine/parallel.ts checks the same first, with a typed
// error; this is the native layer's own guard).
void checkParallelConfig(const LlamaConfig& config, const ParallelConfig& parallel);
TensorShard tensorShard(const LlamaConfig& config, int size, int rank);
// The MoE part of rank `groupRank` of a stage group: the experts it holds and the channels of each, and its
// channels of the shared expert (Qwen2-MoE): split over the group when ep is 1, all of them on every rank when ep > 1.
struct ExpertShard {
  IndexRange experts;       // whole experts [start, start + count)
  IndexRange intermediate;  // moe intermediate channels of each held expert
  IndexRange shared;        // shared expert channels (count 0 without one)
};
ExpertShard expertShard(const LlamaConfig& config, const ParallelConfig& parallel, int groupRank);
// Layers of each stage: as even as possible, earlier stages taking the extra layer.
std::vector<IndexRange> stageLayers(int numLayers, int pp);

// A peer rank failed (or the forward was aborted) while this rank waited for it. Internal: the runner group
// reports the first rank's own error instead.
struct RankGroupBroken : std::runtime_error {
  RankGroupBroken() : std::runtime_error("a peer rank failed") {}
};

// A reusable barrier for `count` threads that can be broken: every waiter, and every later arrival, throws
// RankGroupBroken until reset(). Breaking is how one rank's failure releases the others instead of deadlocking.
class BreakableBarrier {
 public:
  explicit BreakableBarrier(int count) : count_(count) {}
  void arriveAndWait();
  void breakAll();
  // Only while no thread is inside arriveAndWait (the group has joined every rank).
  void reset();

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int waiting_ = 0;
  uint64_t generation_ = 0;
  bool broken_ = false;
};

// Host time one rank spent inside collectives since the last take (bench:engine's "collective share"): waiting for
// its peers plus its own summing and copying, nanoseconds of steady_clock around each call.
struct CollectiveTime {
  int64_t allReduceNs = 0;  // allReduceSum (attention, dense FFN, MoE FFN, vocabulary-parallel embedding)
  int64_t gatherNs = 0;     // gatherColumns (vocabulary-parallel logits)
  int64_t barrierNs = 0;    // barrier() (replicated kv heads: the writer before the readers)
  int64_t handoverNs = 0;   // ActivationChannel::receive (waiting for the previous pipeline stage)
};

// One rank's running sums: written by that rank's thread only, read and reset from any thread (relaxed: a take
// between forward passes sees every sum; one during a pass may split a pass between two takes).
struct CollectiveClock {
  std::atomic<int64_t> allReduceNs{0}, gatherNs{0}, barrierNs{0}, handoverNs{0};
  using Clock = std::chrono::steady_clock;
  static int64_t since(Clock::time_point t0) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
  }
  // Adds this clock's sums to `into` and zeroes them.
  void takeInto(CollectiveTime& into);
};

// Collectives among the tensor-parallel ranks of one pipeline stage. Every rank of the group calls each
// operation in the same order. Buffers are exchanged by pointer: a rank's buffer must stay valid until the
// operation returns on every rank, which the operations' closing barrier guarantees.
class HostCommunicator {
 public:
  explicit HostCommunicator(int size);
  int size() const { return size_; }

  // data[i] = sum over ranks 0..size-1, in rank order, of each rank's data[i] (every rank gets the same bits).
  // Each rank sums a 1/size slice of the elements (a reduce-scatter), then gathers the others' slices.
  void allReduceSum(int rank, float* data, size_t n);
  // Rank `root` receives out[row * totalCols + offset_r + c] = part_r[row * cols_r + c] for every rank r, its
  // parts laid side by side in rank order (vocabulary-parallel logits); other ranks pass out = nullptr.
  void gatherColumns(int rank, int root, const float* part, size_t rows, size_t cols, float* out, size_t totalCols);
  // Every rank of the group meets here; the wait counts as group rank `rank`'s barrierNs.
  void barrier(int rank);
  void breakAll() { barrier_.breakAll(); }
  void reset() { barrier_.reset(); }
  // Group rank `rank`'s time in the operations above since the last take, added to `into`; then zeroed.
  void takeTime(int rank, CollectiveTime& into) { clocks_[rank].takeInto(into); }

 private:
  int size_;
  BreakableBarrier barrier_;
  std::vector<CollectiveClock> clocks_;  // one per group rank
  std::vector<float*> buffers_;
  std::vector<const float*> parts_;
  std::vector<size_t> partCols_;
  std::vector<std::vector<float>> reduced_;  // rank r's reduced slice
};

// Activations of one micro-batch after a stage: handed from rank (s, r) to rank (s + 1, r). FIFO: stages take
// micro-batches in the same order.
class ActivationChannel {
 public:
  void send(std::vector<float> hidden);
  // Throws RankGroupBroken once closed. The time spent inside counts as the receiving rank's handoverNs.
  std::vector<float> receive();
  void close();
  // Only while no thread is inside receive (the group has joined every rank).
  void reset();
  // The receiving rank's wait since the last take, added to `into.handoverNs`; then zeroed.
  void takeTime(CollectiveTime& into) { clock_.takeInto(into); }

 private:
  CollectiveClock clock_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::vector<float>> queue_;
  bool closed_ = false;
};

}  // namespace tandem::engine
