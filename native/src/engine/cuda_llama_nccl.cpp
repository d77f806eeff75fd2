#include "cuda_llama_nccl.h"

#include <algorithm>
#include <thread>

#include "../nccl/poll_backoff.h"

namespace tandem::engine {

using nccl::ncclComm_t;
using nccl::ncclResult_t;
using nccl::PollBackoff;

namespace {

constexpr unsigned kThreads = 256;
// How long an abort waits for a rank's NCCL call in progress before it aborts under it (a call stuck in a
// connection handshake returns only once ncclCommAbort raises the abort flag).
constexpr auto kAbortGrace = std::chrono::seconds(2);

void* pointer(CUdeviceptr p) { return reinterpret_cast<void*>(static_cast<uintptr_t>(p)); }

}  // namespace

NcclTpGroup::NcclTpGroup(const nccl::NcclLibrary& library, int size, uint32_t initTimeoutMs)
    : nccl_(library), size_(size), initTimeoutMs_(initTimeoutMs) {
  if (size < 1 || size > LocalTpGroup::kMaxRanks)
    throw BadInput("an NCCL tensor-parallel group holds 1.." + std::to_string(LocalTpGroup::kMaxRanks) +
                   " ranks (got " + std::to_string(size) + ")");
  if (!nccl_.available) throw NativeError("TANDEM_NCCL_UNAVAILABLE", "NCCL unavailable: " + nccl_.reason);
  ncclResult_t r = nccl_.ncclGetUniqueId(&id_);
  if (r != nccl::ncclSuccess)
    throw NativeError("TANDEM_NCCL_ERROR", "tensor-parallel group: ncclGetUniqueId failed: " + nccl_.describe(r));
  for (int i = 0; i < size; ++i) ranks_.push_back(std::make_unique<RankComms>());
}

NcclTpGroup::~NcclTpGroup() {
  // Every rank released (or never joined) by now; whatever is left is aborted, never destroyed collectively.
  for (int r = 0; r < size_; ++r) abortRank(r);
}

bool NcclTpGroup::aborted() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return aborted_;
}

std::string NcclTpGroup::abortReason() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return why_;
}

void NcclTpGroup::abort(const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (aborted_) return;
    aborted_ = true;
    why_ = "the tensor-parallel group was stopped: " + why;
  }
  std::lock_guard<std::mutex> serial(abortMutex_);
  for (int r = 0; r < size_; ++r) abortRank(r);
}

void NcclTpGroup::abortRank(int rank) {
  RankComms& c = *ranks_[rank];
  std::unique_lock<std::timed_mutex> call(c.call, std::defer_lock);
  (void)call.try_lock_for(kAbortGrace);
  ncclComm_t ops = __atomic_exchange_n(&c.ops, nullptr, __ATOMIC_ACQ_REL);
  ncclComm_t control = __atomic_exchange_n(&c.control, nullptr, __ATOMIC_ACQ_REL);
  if (ops) nccl_.ncclCommAbort(ops);
  if (control) nccl_.ncclCommAbort(control);
  // Aborting the parent joined NCCL's thread of a split in progress, so a communicator it made is visible now.
  if (ncclComm_t orphan = __atomic_exchange_n(&c.split, nullptr, __ATOMIC_ACQ_REL)) nccl_.ncclCommAbort(orphan);
}

NcclTpCommunicator::NcclTpCommunicator(std::shared_ptr<NcclTpGroup> group, int rank)
    : group_(std::move(group)), rank_(rank) {
  if (rank < 0 || rank >= group_->size())
    throw BadInput("tensor parallel rank " + std::to_string(rank) + " is not one of 0.." +
                   std::to_string(group_->size() - 1));
}

std::string NcclTpCommunicator::label() const {
  return "tensor-parallel rank " + std::to_string(rank_) + " of " + std::to_string(group_->size()) +
         (device_ ? " (GPU " + std::to_string(device_->ordinal()) + ")" : "");
}

void NcclTpCommunicator::failed(const std::string& what, ncclResult_t result) {
  std::string message = label() + ": " + what + " failed: " + group_->library().describe(result);
  group_->abort(message);
  throw NativeError("TANDEM_NCCL_ERROR", message);
}

void NcclTpCommunicator::waitForControl(const char* what, Clock::time_point deadline) {
  const nccl::NcclLibrary& n = group_->library();
  NcclTpGroup::RankComms& c = *group_->ranks_[rank_];
  PollBackoff backoff;
  for (;;) {
    ncclResult_t state = nccl::ncclInProgress;
    {
      std::lock_guard<std::timed_mutex> call(c.call);
      ncclComm_t control = __atomic_load_n(&c.control, __ATOMIC_ACQUIRE);
      if (!control) throw Aborted(group_->abortReason());
      ncclResult_t r = n.ncclCommGetAsyncError(control, &state);
      if (r != nccl::ncclSuccess) state = r;
    }
    if (state == nccl::ncclSuccess) return;
    if (state != nccl::ncclInProgress) failed(what, state);
    if (Clock::now() >= deadline) {
      std::string message = label() + ": " + what + " did not complete within " +
                            std::to_string(group_->initTimeoutMs_) +
                            " ms (did every rank of the group start? NCCL_DEBUG=INFO says what it waits for)";
      group_->abort(message);
      throw NativeError("TANDEM_NCCL_TIMEOUT", message);
    }
    backoff.sleep();
  }
}

void NcclTpCommunicator::init(CudaDevice& device) {
  device_ = &device;
  timer_.init(device);
  copyColumns_ = device.function("tandem_tp_copy_columns_f32");
  const nccl::NcclLibrary& n = group_->library();
  NcclTpGroup::RankComms& c = *group_->ranks_[rank_];
  const Clock::time_point deadline = Clock::now() + std::chrono::milliseconds(group_->initTimeoutMs_);
  ncclResult_t r;
  {
    std::lock_guard<std::timed_mutex> call(c.call);
    if (group_->aborted()) throw Aborted(group_->abortReason());
    // NCCL takes the GPU from the calling thread's current context: the device thread's is the rank's GPU.
    nccl::ncclConfig_t config = nccl::makeConfig(/*blocking=*/false, nullptr);
    ncclComm_t comm = nullptr;
    r = n.ncclCommInitRankConfig(&comm, group_->size(), group_->id_, rank_, &config);
    if (r != nccl::ncclSuccess && r != nccl::ncclInProgress) {
      if (comm) n.ncclCommAbort(comm);
    } else {
      __atomic_store_n(&c.control, comm, __ATOMIC_RELEASE);
    }
  }
  if (r != nccl::ncclSuccess && r != nccl::ncclInProgress) failed("ncclCommInitRankConfig", r);
  waitForControl("joining the NCCL communicator", deadline);
  {
    std::lock_guard<std::timed_mutex> call(c.call);
    ncclComm_t control = __atomic_load_n(&c.control, __ATOMIC_ACQUIRE);
    if (!control) throw Aborted(group_->abortReason());
    nccl::ncclConfig_t config = nccl::makeConfig(/*blocking=*/true, nullptr);
    // Color 0 for every rank, key = rank: the same ranks in the same order. NCCL writes c.split when the split
    // completes, on its own thread (the parent is non-blocking); an abort of the parent joins that thread.
    c.split = nullptr;
    r = n.ncclCommSplit(control, 0, rank_, &c.split, &config);
  }
  if (r != nccl::ncclSuccess && r != nccl::ncclInProgress) failed("ncclCommSplit", r);
  waitForControl("splitting the collectives' communicator", deadline);
  ncclComm_t ops;
  {
    std::lock_guard<std::timed_mutex> call(c.call);
    ops = __atomic_exchange_n(&c.split, nullptr, __ATOMIC_ACQ_REL);
  }
  if (ops) {
    // The child's own state too (a failed child init shows there); only this thread knows `ops` until it is
    // published, so the group's abort is looked for here.
    ncclResult_t state = nccl::ncclInProgress;
    PollBackoff backoff;
    for (;;) {
      if (n.ncclCommGetAsyncError(ops, &state) != nccl::ncclSuccess) state = nccl::ncclInternalError;
      if (state != nccl::ncclInProgress || group_->aborted() || Clock::now() >= deadline) break;
      backoff.sleep();
    }
    std::lock_guard<std::timed_mutex> call(c.call);
    if (state == nccl::ncclSuccess && __atomic_load_n(&c.control, __ATOMIC_ACQUIRE)) {
      __atomic_store_n(&c.ops, ops, __ATOMIC_RELEASE);
      return;
    }
    n.ncclCommAbort(ops);
    r = state;
  }
  if (group_->aborted()) throw Aborted(group_->abortReason());
  if (r != nccl::ncclSuccess && r != nccl::ncclInProgress) failed("the split's communicator", r);
  std::string message = label() + ": the split that makes the collectives' communicator gave none, or did not finish "
                        "within " + std::to_string(group_->initTimeoutMs_) + " ms";
  group_->abort(message);
  throw NativeError("TANDEM_NCCL_ERROR", message);
}

ncclComm_t NcclTpCommunicator::opsLocked() {
  ncclComm_t ops = __atomic_load_n(&group_->ranks_[rank_]->ops, __ATOMIC_ACQUIRE);
  if (!ops) throw Aborted(group_->aborted() ? group_->abortReason() : "the tensor-parallel rank has not joined its group");
  return ops;
}

void NcclTpCommunicator::ensure(std::shared_ptr<DeviceAllocation>& staging, size_t bytes, CUstream stream,
                                const char* what) {
  if (staging && staging->bytes >= bytes) return;
  // Only this rank's stream touches its staging buffers: once that is idle the old one can go.
  device_->check(device_->driver().cuStreamSynchronize(stream), "cuStreamSynchronize (tensor parallel)");
  if (staging) device_->freeAllocation(*staging);
  staging.reset();
  staging = device_->allocate(bytes + bytes / 4, what);
}

void NcclTpCommunicator::allReduceSum(CUdeviceptr buf, size_t count, CUstream stream) {
  if (!device_) throw NativeError("TANDEM_INTERNAL", "the tensor-parallel communicator was not initialised");
  if (count == 0) return;
  const size_t span = timer_.begin(stream);
  ncclResult_t r;
  {
    std::lock_guard<std::timed_mutex> call(group_->ranks_[rank_]->call);
    r = group_->library().ncclAllReduce(pointer(buf), pointer(buf), count, nccl::ncclFloat32, nccl::ncclSum,
                                        opsLocked(), stream);
  }
  if (r != nccl::ncclSuccess) failed("ncclAllReduce of " + std::to_string(count) + " floats", r);
  timer_.end(span, false, stream);
}

void NcclTpCommunicator::allGatherColumns(CUdeviceptr in, size_t rows, const std::vector<int>& cols, CUdeviceptr out,
                                          CUstream stream) {
  if (!device_) throw NativeError("TANDEM_INTERNAL", "the tensor-parallel communicator was not initialised");
  const int size = group_->size();
  if (static_cast<int>(cols.size()) != size)
    throw BadInput("allGatherColumns: " + std::to_string(cols.size()) + " column counts for " + std::to_string(size) +
                   " ranks");
  if (rows == 0) return;
  int outCols = 0, widest = 0;
  for (int c : cols) {
    outCols += c;
    widest = std::max(widest, c);
  }
  if (widest == 0) return;
  // Every rank sends rows x widest floats (ncclAllGather's counts are equal): its block, then padding nobody reads.
  const size_t block = rows * static_cast<size_t>(widest);
  const CudaDriver& d = device_->driver();
  const size_t span = timer_.begin(stream);
  CUdeviceptr send = in;
  if (cols[rank_] < widest) {
    ensure(sendStaging_, block * 4, stream, "cuMemAlloc (tensor-parallel gather)");
    send = sendStaging_->ptr;
    if (cols[rank_] > 0)
      device_->check(d.cuMemcpyDtoDAsync(send, in, rows * cols[rank_] * 4, stream),
                     "cuMemcpyDtoDAsync (tensor-parallel gather)");
  }
  ensure(gatherStaging_, block * size * 4, stream, "cuMemAlloc (tensor-parallel gather)");
  const CUdeviceptr gathered = gatherStaging_->ptr;
  ncclResult_t r;
  {
    std::lock_guard<std::timed_mutex> call(group_->ranks_[rank_]->call);
    r = group_->library().ncclAllGather(pointer(send), pointer(gathered), block, nccl::ncclFloat32, opsLocked(),
                                        stream);
  }
  if (r != nccl::ncclSuccess) failed("ncclAllGather of " + std::to_string(block) + " floats per rank", r);
  // Rank s's block, [rows, cols[s]] contiguous at gathered + s * block, goes to out's columns [col0, col0 + cols[s]).
  int col0 = 0;
  for (int s = 0; s < size; ++s) {
    CUdeviceptr src = gathered + s * block * 4;
    int n = cols[s], rowCount = static_cast<int>(rows);
    if (n > 0) {
      void* params[] = {&out, &outCols, &col0, &src, &rowCount, &n};
      device_->check(d.cuLaunchKernel(copyColumns_, static_cast<unsigned>(rows), 1, 1, kThreads, 1, 1, 0, stream,
                                      params, nullptr),
                     "cuLaunchKernel (tensor-parallel gather)");
    }
    col0 += n;
  }
  timer_.end(span, true, stream);
}

void NcclTpCommunicator::release() {
  for (auto* staging : {&sendStaging_, &gatherStaging_}) {
    if (*staging && device_) {
      try {
        device_->freeAllocation(**staging);
      } catch (const std::exception&) {
        // the device frees what it still tracks when it closes
      }
    }
    staging->reset();
  }
  timer_.release();
  // The rank's stream is idle: its communicators go with an abort, which (unlike ncclCommDestroy) waits for no
  // other rank.
  group_->abortRank(rank_);
}

}  // namespace tandem::engine
