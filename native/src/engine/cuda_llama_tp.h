// Tensor parallelism for CudaLlama (issue 25): what one rank holds of the model, and the communicator its layer
// step calls (Megatron-style: column-parallel QKV and gate/up, row-parallel o_proj and down_proj with an
// all-reduce after each, vocabulary-parallel embedding (all-reduce) and lm_head (all-gather of the logits)).
//
// The shard arithmetic is lib/engine/cuda-parallel.ts's (the same as lib/engine/parallel.ts's for the CPU ranks):
// rank r of tp holds q heads [r * H/tp, (r+1) * H/tp), kv heads [r * KVH/tp, ...) when tp divides KVH or else the
// one kv head floor(r * KVH / tp) (replicated; tp a multiple of KVH), intermediate channels [r * I/tp, ...) and
// vocabulary rows [r * ceil(V/tp), min(V, (r+1) * ceil(V/tp))).
//
// TpCommunicator is the seam: LocalTpCommunicator runs every rank on one CUDA device (one primary context), each
// rank on its own CudaDevice thread and stream, so TP 2 can be checked against TP 1 on one GPU. NcclTpCommunicator
// (cuda_llama_nccl.h) runs each rank on its own GPU, one NCCL communicator per rank, its collectives on the rank's
// stream.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../cuda_device.h"
#include "llama_common.h"

namespace tandem::engine {

// What tensor-parallel rank `rank` of `size` holds (half-open ranges: start, count).
struct TpShard {
  int rank = 0, size = 1;
  int headStart = 0, heads = 0;
  int kvHeadStart = 0, kvHeads = 0;
  int interStart = 0, inter = 0;
  int vocabStart = 0, vocabRows = 0;
};

// Throws BadInput unless `size` ranks fit the config (size >= 1, heads % size == 0, kv heads divisible by size or
// size a multiple of them, intermediate % size == 0) and 0 <= rank < size.
TpShard tpShardOf(const LlamaConfig& config, int size, int rank);

// Stream time of a rank's collectives, in ms, by kind (TpCommunicator::takeTime).
struct TpCollectiveTime {
  double allReduceMs = 0, gatherMs = 0;
};

// The collectives a rank's layer step calls, all on the rank's stream and in the same order on every rank.
// Device thread of the rank only.
class TpCommunicator {
 public:
  virtual ~TpCommunicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // True when the communicator runs its collectives even for one rank (an NCCL group of one: the NCCL path one GPU
  // can run), so that a one-rank runner takes the sharded step through it.
  virtual bool runsAlone() const { return false; }
  // Device thread: per-rank set-up (events, ...) once the rank's device is open.
  virtual void init(CudaDevice& device) = 0;
  // buf[0, count) fp32 (the residual stream's dtype) = its sum over the ranks, in place.
  virtual void allReduceSum(CUdeviceptr buf, size_t count, CUstream stream) = 0;
  // out[rows, sum of cols] fp32 = each rank's in[rows, cols[rank]] side by side in rank order (every rank gets
  // all of it). `cols` is the same list on every rank.
  virtual void allGatherColumns(CUdeviceptr in, size_t rows, const std::vector<int>& cols, CUdeviceptr out,
                                CUstream stream) = 0;
  // Breaks the group: every rank waiting in (or later entering) a collective throws Aborted. Any thread.
  virtual void abort(const std::string& why) = 0;
  // The stream time of this rank's collectives since the last call (CUDA events recorded around each, so the wait
  // for the other ranks' inputs is in it), and a reset. The first call turns the timing on and returns zeros: until
  // then nothing is recorded. Waits for the rank's stream to reach the last collective timed.
  virtual TpCollectiveTime takeTime() = 0;
  // Device thread of the rank, once, when the rank is released (its stream is idle).
  virtual void release() = 0;
};

// The stream time of a rank's collectives (TpCommunicator::takeTime), for every communicator: CUDA events recorded
// before and after each collective on the rank's stream, summed on the host when asked. Device thread of the rank.
class TpCollectiveTimer {
 public:
  void init(CudaDevice& device) { device_ = &device; }
  // Records a span's start when timing is on; the span's index, or SIZE_MAX.
  size_t begin(CUstream stream);
  // Records the span's end (nothing for SIZE_MAX). A span begun but never ended (its collective threw) is left out.
  void end(size_t span, bool gather, CUstream stream);
  // TpCommunicator::takeTime's contract: the first call turns the timing on and returns zeros.
  TpCollectiveTime take();
  // Destroys the events (the rank's stream is idle).
  void release();

 private:
  struct Span {
    CUevent start = nullptr, end = nullptr;
    bool gather = false;
    bool ended = false;
  };
  // Spans kept before they are summed on the host (a sync of the stream) even without take().
  static constexpr size_t kMaxSpans = 4096;
  // Sums the spans recorded so far (waiting for the last) into folded_, and reuses their events.
  void fold();

  CudaDevice* device_ = nullptr;
  bool timing_ = false;
  std::vector<Span> spans_;
  size_t usedSpans_ = 0;
  TpCollectiveTime folded_;
};

// The state the ranks of one LocalTpCommunicator group share: a host barrier, each rank's published buffer and
// its two events. Created once per group (lib/engine/cuda.ts: one CudaTpGroup per runner group).
class LocalTpGroup {
 public:
  static constexpr int kMaxRanks = 8;
  explicit LocalTpGroup(int size);
  int size() const { return size_; }

 private:
  friend class LocalTpCommunicator;
  // Blocks until every rank arrived (the call after all `size` ranks arrive returns in all); throws Aborted once the
  // group is broken.
  void arrive();
  void abort(const std::string& why);

  const int size_;
  std::mutex mutex_;
  std::condition_variable changed_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool aborted_ = false;
  std::string why_;
  // Per rank: the buffer it offers to the others in the collective under way, and its events (created by the rank
  // on its thread; destroyed by the last rank to release, when no rank can wait on them any more).
  std::vector<CUdeviceptr> published_;
  std::vector<CUevent> ready_, done_;
  std::vector<bool> released_;
  int releasedCount_ = 0;
};

// A rank of a LocalTpGroup. Every collective: the rank records `ready` after producing its input and publishes its
// address; barrier; it waits (on its stream) for every other rank's `ready`, then reads all inputs in rank order
// (so every rank computes the same bits) into its own buffer, records `done`; barrier; waits for every other
// rank's `done` (nobody overwrites an input another rank still reads) and copies the result into place. The two
// barriers also order the event records against the other ranks' waits (a wait uses the event's latest record).
class LocalTpCommunicator : public TpCommunicator {
 public:
  LocalTpCommunicator(std::shared_ptr<LocalTpGroup> group, int rank);
  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }
  void init(CudaDevice& device) override;
  void allReduceSum(CUdeviceptr buf, size_t count, CUstream stream) override;
  void allGatherColumns(CUdeviceptr in, size_t rows, const std::vector<int>& cols, CUdeviceptr out,
                        CUstream stream) override;
  void abort(const std::string& why) override { group_->abort(why); }
  TpCollectiveTime takeTime() override;
  void release() override;

 private:
  // Publishes `buf` and records ready; barrier; waits for the others' ready.
  void exchange(CUdeviceptr buf, CUstream stream);
  // Records done; barrier; waits for the others' done.
  void finish(CUstream stream);
  void ensureAccumulator(size_t bytes, CUstream stream);

  std::shared_ptr<LocalTpGroup> group_;
  const int rank_;
  CudaDevice* device_ = nullptr;
  CUfunction sum_ = nullptr, copyColumns_ = nullptr;
  std::shared_ptr<DeviceAllocation> accumulator_;  // this rank's sum before it goes in place
  TpCollectiveTimer timer_;
};

}  // namespace tandem::engine
