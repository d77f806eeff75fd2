// One NCCL communicator (one rank on one GPU) and the two threads that drive it.
//
// Threads. The communicator thread (a WorkQueue) has the GPU's primary context current; it runs init,
// enqueues every operation on the communicator's own stream, in submission order, and records an
// event after each. The progress thread polls those events in stream order and settles operations as
// they complete; it is also the watchdog: it enforces each operation's deadline and polls NCCL's
// asynchronous error, and on either it aborts the communicator and fails everything pending.
//
// Two NCCL communicators per rank. `control_` is created non-blocking (config.blocking = 0), so init
// and split return at once and can be timed out and aborted. NCCL runs every call on a non-blocking
// communicator in a fresh thread (ncclGroupEndInternal), far too slow for collectives, so operations
// go through `ops_`: a blocking communicator split from `control_` (same ranks, same order) as the
// last step of init. Splits asked for by the caller are taken from `control_`, so they can time out too.
//
// Locking. `callMutex_` serialises every NCCL call on this rank's handles (NCCL does not allow
// concurrent calls on one communicator) and guards the handles themselves. `mutex_` guards the
// bookkeeping (pending, in flight, abort state). `abortMutex_` serialises aborts. Never call
// abortWith() while holding callMutex_ or mutex_.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../cuda_driver.h"
#include "../work_queue.h"
#include "nccl_library.h"

namespace tandem::nccl {

using Clock = std::chrono::steady_clock;

// Operation kinds, as encoded by lib/collectives (keep the two in step).
enum class OpKind : uint32_t {
  AllReduce = 0,
  AllGather = 1,
  ReduceScatter = 2,
  Broadcast = 3,
  Reduce = 4,
  Send = 5,
  Recv = 6,
  CopyToDevice = 7,
  CopyToHost = 8,
  Memset = 9,
};
constexpr uint32_t kNcclOpKinds = 7;  // kinds below this are NCCL calls
constexpr uint32_t kOpKinds = 10;

struct Op {
  OpKind kind = OpKind::AllReduce;
  uint64_t send = 0;     // device address read
  uint64_t recv = 0;     // device address written
  uint64_t count = 0;    // elements for NCCL calls; bytes for copies and fills
  int dtype = 0;         // ncclDataType_t
  int redop = 0;         // ncclRedOp_t; the byte value for Memset
  int peer = 0;          // root of Broadcast/Reduce, peer of Send/Recv
  void* host = nullptr;  // CopyToDevice source, CopyToHost destination
};

const char* opKindName(OpKind kind);
const char* dtypeName(int dtype);
const char* redopName(int redop);
size_t dtypeBytes(int dtype);

// Why something failed. Becomes a JS error with `code`, `communicator`, `operation`, `ncclResult`.
struct Failure {
  std::string code;
  std::string message;  // "<communicator label>: <detail>"
  std::string detail;
  std::string communicator;
  std::string operation;
  std::string ncclResult;  // "ncclRemoteError"; empty when NCCL reported none
};

struct CommOptions {
  std::string name;
  int device = 0;
  int rank = -1;  // -1 until known (a split learns it at the end of init)
  int size = -1;
  uint32_t timeoutMs = 60000;  // init's timeout, and the default of operations
};

// How a communicator obtains its non-blocking NCCL communicator when another thread makes it: the
// parent's thread for a split, the first communicator's thread for a single-process group.
struct ControlHandoff {
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  bool abandoned = false;  // the receiver gave up waiting; the maker must destroy what it made
  ncclComm_t comm = nullptr;  // written by NCCL when a non-blocking split completes
  std::string commName;       // NCCL keeps the pointer for the communicator's lifetime
  std::unique_ptr<Failure> failure;
};

class Communicator : public std::enable_shared_from_this<Communicator> {
 public:
  // Called on addon threads (never the JS thread) exactly once per operation id, and once with id 0
  // when init finishes. `failure` is null on success.
  using Settle = std::function<void(uint64_t id, const Failure* failure)>;

  Communicator(const NcclLibrary& nccl, const CudaDriver& cuda, CommOptions options, Settle settle);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  // Exactly one of these starts init (JS thread). Init's deadline counts from here.
  void startFromId(const ncclUniqueId& id);
  void startFromParent(const std::shared_ptr<Communicator>& parent, int color, int key);
  static void startGroup(const std::vector<std::shared_ptr<Communicator>>& comms);

  // Queues a batch (one operation, or several run inside ncclGroupStart/End). Settles `id` through
  // Settle; never throws.
  // Work a caller adds around a batch's NCCL group, on the communicator's thread and stream (the
  // transfer backend's staging copies; `before` may fill in the operations' addresses, e.g. a staging
  // buffer it allocates). Returns CUDA_SUCCESS, or an error with `detail` set, which fails the batch and
  // aborts the communicator like a CUDA error of the group itself.
  using StreamHook = std::function<CUresult(CUstream stream, std::vector<Op>& ops, std::string& detail)>;
  void submit(uint64_t id, std::vector<Op> ops, uint32_t timeoutMs, std::string label,
              std::shared_ptr<void> hostOwner, StreamHook before = nullptr, StreamHook after = nullptr);

  // Communicator thread: device memory owned by this communicator (freed at dispose). Throw NativeError.
  uint64_t allocate(size_t bytes);
  void release(uint64_t address);
  // JS thread: whether [address, address + bytes) lies inside one allocation of this communicator.
  bool ownsRange(uint64_t address, size_t bytes);

  // Asks the progress thread to abort; `done` runs (on that thread) once NCCL has been told.
  void requestAbort(std::string reason, std::function<void()> done);
  // Communicator thread: waits for pending operations to settle (each bounded by its deadline),
  // destroys the NCCL communicators and frees the stream, events and allocations.
  void shutdownOnThread();
  // JS thread: aborts whatever is still live and joins both threads. Idempotent.
  void close();

  WorkQueue* queue() { return closed_ ? nullptr : queue_.get(); }
  const CommOptions& options() const { return options_; }
  int rank() const { return rank_.load(); }
  int size() const { return size_.load(); }
  bool member() const { return member_.load(); }
  bool aborted() const;
  std::string abortReason() const;
  // The code for an operation refused because the communicator was aborted (or disposed).
  std::string abortedCode() const;
  // The code of what aborted it ("TANDEM_NCCL_TIMEOUT", "TANDEM_DISPOSED", ...); empty while live.
  std::string abortCode() const;
  // "communicator 'tp' (rank 0 of 2, GPU 0)"
  std::string label() const;

 private:
  struct OpSummary {
    std::string label;  // set for batches ("allToAll", "group")
    Op first;
    size_t count = 0;
  };
  struct Pending {
    Clock::time_point deadline;
    uint32_t timeoutMs = 0;
    OpSummary summary;
  };
  struct InFlight {
    uint64_t id;
    CUevent event;
  };
  struct Batch {
    uint64_t id;
    std::vector<Op> ops;
    std::shared_ptr<void> hostOwner;
    StreamHook before, after;
  };

  static std::string describe(const OpSummary& summary);
  Failure makeFailure(std::string code, std::string message, const std::string& operation,
                      ncclResult_t result = ncclSuccess) const;

  // Init steps (communicator thread). They throw CommFailure.
  void setupContext();
  void initFromId(ncclUniqueId id);
  void initFromHandoff(std::shared_ptr<ControlHandoff> handoff);
  void finishInit(const char* what);  // splits ops_ off control_, then marks ready
  void waitForControl(const char* what, const std::string& operation, Clock::time_point deadline,
                      uint32_t timeoutMs, const char* hint);
  static void splitControlFor(const std::shared_ptr<Communicator>& parent, std::shared_ptr<ControlHandoff> handoff,
                              int color, int key, Clock::time_point deadline, uint32_t timeoutMs,
                              std::string childLabel);
  static void groupInit(const std::vector<std::shared_ptr<Communicator>>& comms,
                        const std::vector<std::shared_ptr<ControlHandoff>>& handoffs, Clock::time_point deadline);
  void reportInit(const Failure* failure);

  void runBatch(Batch& batch);
  void complete(uint64_t id);
  void fail(uint64_t id, const std::string& code, const std::string& what, ncclResult_t result = ncclSuccess);

  void progressLoop();
  void watch(std::unique_lock<std::mutex>& lock, Clock::time_point now);
  // Marks the communicator aborted, fails everything pending (the operation `causeId`, if any, with
  // `cause` itself) and aborts the NCCL communicators. Any thread but the JS thread (close() excepted).
  void abortWith(const std::string& code, const std::string& cause, uint64_t causeId = 0,
                 ncclResult_t result = ncclSuccess);
  void releaseResources();  // communicator thread
  void stopProgress();      // asks the progress thread to finish and joins it; any thread, idempotent

  const NcclLibrary& nccl_;
  const CudaDriver& cuda_;
  CommOptions options_;
  Settle settle_;
  Clock::time_point initDeadline_{};

  std::unique_ptr<WorkQueue> queue_;
  std::thread progress_;
  std::mutex progressJoinMutex_;  // dispose (communicator thread) and close (JS thread) may both join
  bool closed_ = false;  // JS thread

  // Set on the communicator thread during init; read by the progress thread after init.
  CUdevice cuDevice_ = 0;
  CUcontext context_ = nullptr;
  CUstream stream_ = nullptr;
  std::atomic<int> rank_{-1};
  std::atomic<int> size_{-1};
  std::atomic<bool> member_{true};
  std::atomic<bool> ready_{false};

  std::timed_mutex callMutex_;
  std::atomic<ncclComm_t> control_{nullptr};
  std::atomic<ncclComm_t> ops_{nullptr};
  ncclComm_t opsSplitResult_ = nullptr;  // written by NCCL when the ops split completes
  // Kept for its commName, which NCCL references for the communicator's lifetime.
  std::shared_ptr<ControlHandoff> handoff_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;     // progress thread: work, abort requests, stop
  std::condition_variable drained_;  // pending_ became empty
  std::map<uint64_t, Pending> pending_;
  std::deque<InFlight> inflight_;
  std::vector<CUevent> eventPool_;
  std::vector<CUevent> retiredEvents_;  // were in flight at abort; destroyed with the stream
  struct AbortRequest {
    std::string reason;
    std::function<void()> done;
  };
  std::deque<AbortRequest> abortRequests_;
  bool aborted_ = false;
  std::string abortCode_, abortCause_;
  bool stopping_ = false;

  std::mutex abortMutex_;

  std::mutex allocationsMutex_;
  std::map<uint64_t, size_t> allocations_;
};

}  // namespace tandem::nccl
