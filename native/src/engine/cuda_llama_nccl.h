// Tensor parallelism across GPUs (issue 25): the TpCommunicator of a runner group whose ranks each drive their own
// GPU from one process (one CudaDevice thread per rank), over NCCL (native/src/nccl's dlopened library; nothing is
// linked at build time).
//
// Communicators. One NcclTpGroup per runner group holds the NCCL unique id (ncclGetUniqueId, made when the group is
// made) and each rank's communicators. Each rank joins on its own device thread (TpCommunicator::init, when the
// rank's model initialises; the ranks' inits run concurrently): a non-blocking ncclCommInitRankConfig, polled until
// every rank joined, so that a rank that never comes (its own init failed, or the group was disposed) or a deadline
// ends it with an abort instead of a hang; then a blocking communicator split off it (same ranks, same order) runs
// the collectives, because NCCL runs every call on a non-blocking communicator in a fresh thread (as
// native/src/nccl/communicator.h does, and for the same reason).
//
// Collectives run on the rank's own stream, so the layer step's kernels and NCCL's are ordered by the stream alone:
// - allReduceSum: ncclAllReduce (fp32, sum) in place.
// - allGatherColumns: one ncclAllGather of every rank's [rows, cols[rank]] block, padded to the widest block, into a
//   staging buffer, then tandem_tp_copy_columns_f32 per rank lays the blocks side by side. Chosen over one
//   ncclBroadcast per rank inside a group: one collective whatever the rank count (NCCL's ring or tree all-gather
//   moves each block once per link), where broadcasts are `size` collectives; the padding is less than `size`
//   columns per row. The re-layout is needed either way: each rank's block is its rows, contiguous.
//
// Abort. NcclTpGroup::abort marks the group broken and calls ncclCommAbort on every rank's communicators (from the
// calling thread), which raises NCCL's abort flag: kernels waiting for a rank that will not come return, a blocking
// call waiting in a connection handshake returns, and a rank's next collective throws Aborted. A rank's call mutex
// keeps the abort from freeing a communicator while that rank enqueues on it (bounded by a grace period: a call
// stuck in a handshake is only freed by the abort itself).
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../nccl/nccl_library.h"
#include "cuda_llama_tp.h"

namespace tandem::engine {

class NcclTpGroup {
 public:
  // JS thread: `nccl` must be available. Makes the unique id (NCCL's bootstrap root runs in this process). Throws
  // BadInput for a size outside 1..LocalTpGroup::kMaxRanks, NativeError (TANDEM_NCCL_ERROR) when NCCL fails.
  // `initTimeoutMs` bounds each rank's join.
  NcclTpGroup(const nccl::NcclLibrary& nccl, int size, uint32_t initTimeoutMs);
  ~NcclTpGroup();
  NcclTpGroup(const NcclTpGroup&) = delete;
  NcclTpGroup& operator=(const NcclTpGroup&) = delete;
  int size() const { return size_; }
  const nccl::NcclLibrary& library() const { return nccl_; }
  // Any thread: breaks the group (see the file comment). Idempotent.
  void abort(const std::string& why);
  bool aborted() const;
  std::string abortReason() const;

 private:
  friend class NcclTpCommunicator;
  struct RankComms {
    std::timed_mutex call;  // held around every NCCL call on this rank's communicators
    nccl::ncclComm_t control = nullptr;  // non-blocking: init and the split
    nccl::ncclComm_t ops = nullptr;      // blocking: the collectives
    nccl::ncclComm_t split = nullptr;    // written by NCCL when the split that makes `ops` completes
  };
  // Aborts (if live) one rank's communicators and forgets them. Takes the rank's call mutex (bounded wait).
  void abortRank(int rank);

  const nccl::NcclLibrary& nccl_;
  const int size_;
  const uint32_t initTimeoutMs_;
  nccl::ncclUniqueId id_{};
  std::vector<std::unique_ptr<RankComms>> ranks_;
  mutable std::mutex mutex_;  // guards aborted_ and why_
  bool aborted_ = false;
  std::string why_;
  std::mutex abortMutex_;  // one abort at a time
};

// Rank `rank` of an NcclTpGroup, on its own GPU.
class NcclTpCommunicator : public TpCommunicator {
 public:
  NcclTpCommunicator(std::shared_ptr<NcclTpGroup> group, int rank);
  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }
  bool runsAlone() const override { return true; }
  // Joins the group (blocks until every rank joined, the group is aborted, or the init timeout). Throws Aborted
  // when the group was broken meanwhile, NativeError (TANDEM_NCCL_ERROR, TANDEM_NCCL_TIMEOUT) otherwise; the group
  // is aborted then, so that the other ranks stop waiting too.
  void init(CudaDevice& device) override;
  void allReduceSum(CUdeviceptr buf, size_t count, CUstream stream) override;
  void allGatherColumns(CUdeviceptr in, size_t rows, const std::vector<int>& cols, CUdeviceptr out,
                        CUstream stream) override;
  void abort(const std::string& why) override { group_->abort(why); }
  TpCollectiveTime takeTime() override { return timer_.take(); }
  void release() override;

 private:
  using Clock = std::chrono::steady_clock;
  // Polls this rank's non-blocking communicator until the call in progress on it (init, split) completes.
  void waitForControl(const char* what, Clock::time_point deadline);
  // Throws NativeError (TANDEM_NCCL_ERROR) for a failed NCCL call, aborting the group first.
  [[noreturn]] void failed(const std::string& what, nccl::ncclResult_t result);
  // The blocking communicator under the rank's call lock; throws Aborted once the group is broken.
  nccl::ncclComm_t opsLocked();
  // Grows `staging` to at least `bytes` (the rank's stream is synchronised before an old buffer goes).
  void ensure(std::shared_ptr<DeviceAllocation>& staging, size_t bytes, CUstream stream, const char* what);
  std::string label() const;

  std::shared_ptr<NcclTpGroup> group_;
  const int rank_;
  CudaDevice* device_ = nullptr;
  CUfunction copyColumns_ = nullptr;
  std::shared_ptr<DeviceAllocation> sendStaging_, gatherStaging_;
  TpCollectiveTimer timer_;
};

}  // namespace tandem::engine
