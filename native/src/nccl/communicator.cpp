#include "communicator.h"

#include <pthread.h>
#include <sys/prctl.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <optional>

#include "../addon_state.h"
#include "poll_backoff.h"

namespace tandem::nccl {
namespace {

// How long an abort waits for the communicator thread to leave an NCCL call before aborting anyway.
constexpr auto kAbortGrace = std::chrono::seconds(2);
// The watchdog's period: deadlines and NCCL's asynchronous error are checked this often.
constexpr auto kWatchInterval = std::chrono::milliseconds(1);
// Completion polling: spin (yielding) this long after an operation reaches the front of the stream,
// then sleep for 1/16 of the time waited so far, at most kMaxPollSleep (kMaxLongPollSleep once it has
// waited kLongWait: it is most likely waiting for a peer). A short operation is seen within
// microseconds; a long one costs at most ~6% of its time in extra latency, and little CPU.
constexpr auto kSpin = std::chrono::microseconds(50);
constexpr auto kMaxPollSleep = std::chrono::microseconds(50);
constexpr auto kLongWait = std::chrono::milliseconds(10);
constexpr auto kMaxLongPollSleep = std::chrono::microseconds(500);
// How long the receiving end of a handoff waits past the deadline that the making end enforces.
constexpr auto kHandoffGrace = std::chrono::seconds(5);

constexpr const char* kInitHint = "did every rank call init, with the same id and size?";
constexpr const char* kSplitHint = "did every rank of the parent call split, in the same order?";

struct CommFailure : std::exception {
  explicit CommFailure(Failure f) : failure(std::move(f)) {}
  const char* what() const noexcept override { return failure.message.c_str(); }
  Failure failure;
};

void* devicePointer(uint64_t address) { return reinterpret_cast<void*>(static_cast<uintptr_t>(address)); }

std::string cudaErrorCode(CUresult r) {
  return r == CUDA_ERROR_OUT_OF_MEMORY ? "TANDEM_OUT_OF_MEMORY" : "TANDEM_CUDA_ERROR";
}

}  // namespace

const char* opKindName(OpKind kind) {
  switch (kind) {
    case OpKind::AllReduce: return "allReduce";
    case OpKind::AllGather: return "allGather";
    case OpKind::ReduceScatter: return "reduceScatter";
    case OpKind::Broadcast: return "broadcast";
    case OpKind::Reduce: return "reduce";
    case OpKind::Send: return "send";
    case OpKind::Recv: return "recv";
    case OpKind::CopyToDevice: return "copy to device";
    case OpKind::CopyToHost: return "copy to host";
    case OpKind::Memset: return "fill";
  }
  return "operation";
}

const char* dtypeName(int dtype) {
  static const char* const names[] = {"int8",    "uint8",   "int32",    "uint32",     "int64",     "uint64",
                                      "float16", "float32", "float64",  "bfloat16",   "float8e4m3", "float8e5m2"};
  return dtype >= 0 && dtype < ncclNumTypes ? names[dtype] : "unknown-dtype";
}

const char* redopName(int redop) {
  static const char* const names[] = {"sum", "prod", "max", "min", "avg"};
  return redop >= 0 && redop < ncclNumOps ? names[redop] : "unknown-op";
}

size_t dtypeBytes(int dtype) {
  static const size_t bytes[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2, 1, 1};
  return dtype >= 0 && dtype < ncclNumTypes ? bytes[dtype] : 0;
}

// --------------------------------------------------------------------------------------------------
// Construction and descriptions

Communicator::Communicator(const NcclLibrary& nccl, const CudaDriver& cuda, CommOptions options, Settle settle)
    : nccl_(nccl), cuda_(cuda), options_(std::move(options)), settle_(std::move(settle)) {
  rank_ = options_.rank;
  size_ = options_.size;
  queue_ = std::make_unique<WorkQueue>("tandem-nccl" + std::to_string(options_.device));
  // Operations come in runs (a layer's collectives, a benchmark loop): the thread watches for the next
  // one for a while instead of paying a futex wake-up per operation on the latency path.
  {
    long spinUs = 50;
    if (const char* env = std::getenv("TANDEM_PROGRESS_SPIN_US")) spinUs = std::max(0L, std::strtol(env, nullptr, 10));
    queue_->setSpin(std::chrono::microseconds(spinUs));
  }
  progress_ = std::thread([this] { progressLoop(); });
}

Communicator::~Communicator() { close(); }

std::string Communicator::label() const {
  std::string out = "communicator '" + options_.name + "' (";
  int r = rank_.load(), n = size_.load();
  if (r >= 0 && n > 0) out += "rank " + std::to_string(r) + " of " + std::to_string(n) + ", ";
  return out + "GPU " + std::to_string(options_.device) + ")";
}

std::string Communicator::describe(const OpSummary& summary) {
  const Op& op = summary.first;
  std::string one = opKindName(op.kind);
  std::string n = std::to_string(op.count);
  switch (op.kind) {
    case OpKind::AllReduce:
      one += std::string(" (") + dtypeName(op.dtype) + " " + redopName(op.redop) + ", " + n + " elements)";
      break;
    case OpKind::AllGather:
      one += std::string(" (") + dtypeName(op.dtype) + ", " + n + " elements per rank)";
      break;
    case OpKind::ReduceScatter:
      one += std::string(" (") + dtypeName(op.dtype) + " " + redopName(op.redop) + ", " + n + " elements per rank)";
      break;
    case OpKind::Broadcast:
      one += std::string(" (") + dtypeName(op.dtype) + ", " + n + " elements, root " + std::to_string(op.peer) + ")";
      break;
    case OpKind::Reduce:
      one += std::string(" (") + dtypeName(op.dtype) + " " + redopName(op.redop) + ", " + n + " elements, root " +
             std::to_string(op.peer) + ")";
      break;
    case OpKind::Send:
      one += std::string(" (") + dtypeName(op.dtype) + ", " + n + " elements, to rank " + std::to_string(op.peer) + ")";
      break;
    case OpKind::Recv:
      one += std::string(" (") + dtypeName(op.dtype) + ", " + n + " elements, from rank " + std::to_string(op.peer) + ")";
      break;
    case OpKind::CopyToDevice:
    case OpKind::CopyToHost:
    case OpKind::Memset:
      one += " (" + n + " bytes)";
      break;
  }
  if (summary.label.empty()) return one;
  return summary.label + " (" + std::to_string(summary.count) + " operations, the first " + one + ")";
}

Failure Communicator::makeFailure(std::string code, std::string message, const std::string& operation,
                                  ncclResult_t result) const {
  Failure f;
  f.code = std::move(code);
  f.message = label() + ": " + message;
  f.detail = std::move(message);
  f.communicator = options_.name;
  f.operation = operation;
  if (result != ncclSuccess && resultName(result)) f.ncclResult = resultName(result);
  return f;
}

bool Communicator::aborted() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return aborted_;
}

std::string Communicator::abortReason() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return abortCause_;
}

std::string Communicator::abortCode() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return abortCode_;
}

std::string Communicator::abortedCode() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return abortCode_ == "TANDEM_DISPOSED" ? "TANDEM_DISPOSED" : "TANDEM_NCCL_ABORTED";
}

// --------------------------------------------------------------------------------------------------
// Init

void Communicator::setupContext() {
  if (context_) return;
  const CudaDriver& d = cuda_;
  CUresult r = d.cuDeviceGet(&cuDevice_, options_.device);
  if (r == CUDA_SUCCESS) r = d.cuDevicePrimaryCtxRetain(&context_, cuDevice_);
  if (r == CUDA_SUCCESS) r = d.cuCtxSetCurrent(context_);
  if (r == CUDA_SUCCESS) r = d.cuStreamCreate(&stream_, CU_STREAM_NON_BLOCKING);
  if (r != CUDA_SUCCESS) {
    throw CommFailure(makeFailure(cudaErrorCode(r),
                                  "could not open CUDA device " + std::to_string(options_.device) + ": " + d.describe(r),
                                  "init"));
  }
}

void Communicator::startFromId(const ncclUniqueId& id) {
  initDeadline_ = Clock::now() + std::chrono::milliseconds(options_.timeoutMs);
  auto self = shared_from_this();
  queue_->post([self, id] { self->initFromId(id); });
}

void Communicator::initFromId(ncclUniqueId id) {
  try {
    setupContext();
    ncclConfig_t config = makeConfig(/*blocking=*/false, options_.name.c_str());
    {
      std::lock_guard<std::timed_mutex> call(callMutex_);
      if (aborted()) {
        throw CommFailure(makeFailure("TANDEM_NCCL_ABORTED", "init was not run: the communicator was aborted (" +
                                                                 abortReason() + ")", "init"));
      }
      ncclComm_t comm = nullptr;
      ncclResult_t r = nccl_.ncclCommInitRankConfig(&comm, options_.size, id, options_.rank, &config);
      if (r != ncclSuccess && r != ncclInProgress) {
        std::string detail = nccl_.describe(r);
        if (comm) nccl_.ncclCommAbort(comm);
        throw CommFailure(makeFailure("TANDEM_NCCL_ERROR", "ncclCommInitRankConfig failed: " + detail, "init", r));
      }
      control_ = comm;
    }
    waitForControl("init", "init", initDeadline_, options_.timeoutMs, kInitHint);
    finishInit("init");
    reportInit(nullptr);
  } catch (const CommFailure& e) {
    reportInit(&e.failure);
  }
}

// Polls the non-blocking communicator until the call in progress on it (init or split) completes.
// On error or past the deadline, aborts this communicator and throws.
void Communicator::waitForControl(const char* what, const std::string& operation, Clock::time_point deadline,
                                  uint32_t timeoutMs, const char* hint) {
  PollBackoff backoff;
  for (;;) {
    ncclResult_t state = ncclInProgress;
    std::string detail;
    bool gone = false;
    {
      std::lock_guard<std::timed_mutex> call(callMutex_);
      ncclComm_t comm = control_.load();
      if (!comm) {
        gone = true;
      } else {
        ncclResult_t r = nccl_.ncclCommGetAsyncError(comm, &state);
        if (r != ncclSuccess) state = r;
        if (state != ncclSuccess && state != ncclInProgress) detail = nccl_.describe(state);
      }
    }
    if (gone) {
      throw CommFailure(makeFailure(abortedCode(),
                                    std::string(what) + " was interrupted: the communicator was aborted (" +
                                        abortReason() + ")",
                                    operation));
    }
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) {
      std::string cause = std::string(what) + " failed: " + detail;
      abortWith("TANDEM_NCCL_ERROR", cause, 0, state);
      throw CommFailure(makeFailure("TANDEM_NCCL_ERROR", cause, operation, state));
    }
    if (Clock::now() >= deadline) {
      std::string cause = std::string(what) + " did not complete within " + std::to_string(timeoutMs) + " ms (" +
                          hint + "); the communicator was aborted";
      abortWith("TANDEM_NCCL_TIMEOUT", cause);
      throw CommFailure(makeFailure("TANDEM_NCCL_TIMEOUT", cause, operation));
    }
    backoff.sleep();
  }
}

// The last step of every init: learn rank and size, then split the blocking communicator that runs
// the operations off the non-blocking one (color 0 for all, key = rank: same ranks, same order).
void Communicator::finishInit(const char* what) {
  ncclResult_t r = ncclSuccess;
  std::string detail;
  {
    std::lock_guard<std::timed_mutex> call(callMutex_);
    ncclComm_t comm = control_.load();
    if (!comm) {
      throw CommFailure(makeFailure("TANDEM_NCCL_ABORTED",
                                    std::string(what) + " was interrupted: the communicator was aborted (" +
                                        abortReason() + ")",
                                    "init"));
    }
    int rank = -1, size = -1;
    r = nccl_.ncclCommUserRank(comm, &rank);
    if (r == ncclSuccess) r = nccl_.ncclCommCount(comm, &size);
    if (r == ncclSuccess) {
      rank_ = rank;
      size_ = size;
      ncclConfig_t config = makeConfig(/*blocking=*/true, options_.name.c_str());
      opsSplitResult_ = nullptr;
      r = nccl_.ncclCommSplit(comm, 0, rank, &opsSplitResult_, &config);
    }
    if (r != ncclSuccess && r != ncclInProgress) detail = nccl_.describe(r);
  }
  if (r != ncclSuccess && r != ncclInProgress) {
    std::string cause = std::string(what) + " failed: ncclCommSplit: " + detail;
    abortWith("TANDEM_NCCL_ERROR", cause, 0, r);
    throw CommFailure(makeFailure("TANDEM_NCCL_ERROR", cause, "init", r));
  }
  waitForControl(what, "init", initDeadline_, options_.timeoutMs, kInitHint);
  {
    std::lock_guard<std::timed_mutex> call(callMutex_);
    ncclComm_t ops = __atomic_exchange_n(&opsSplitResult_, nullptr, __ATOMIC_ACQ_REL);
    if (ops && control_.load()) {
      ops_ = ops;
      ready_ = true;
      return;
    }
    if (ops) nccl_.ncclCommAbort(ops);
  }
  std::string cause = std::string(what) + " failed: the split that makes the operations communicator returned none";
  abortWith("TANDEM_NCCL_ERROR", cause);
  throw CommFailure(makeFailure("TANDEM_NCCL_ERROR", cause, "init"));
}

void Communicator::reportInit(const Failure* failure) {
  if (failure) {
    // Whatever init failed on, later operations must fail fast, naming why.
    abortWith(failure->code, "init failed: " + failure->detail);
    std::lock_guard<std::timed_mutex> call(callMutex_);
    // The aborts above joined NCCL's split thread, so a communicator it made is visible now.
    if (ncclComm_t orphan = __atomic_exchange_n(&opsSplitResult_, nullptr, __ATOMIC_ACQ_REL)) nccl_.ncclCommAbort(orphan);
  }
  settle_(0, failure);
}

void Communicator::startFromParent(const std::shared_ptr<Communicator>& parent, int color, int key) {
  initDeadline_ = Clock::now() + std::chrono::milliseconds(options_.timeoutMs);
  auto handoff = std::make_shared<ControlHandoff>();
  handoff->commName = options_.name;
  // The split runs on the parent's thread, in the order the caller asked for it relative to the
  // parent's other calls: every rank must split (and run collectives) in the same order.
  Clock::time_point deadline = initDeadline_;
  std::string childLabel = label();
  uint32_t timeoutMs = options_.timeoutMs;
  std::shared_ptr<Communicator> p = parent;
  if (!parent->queue_ || !parent->queue_->post([p, handoff, color, key, deadline, timeoutMs, childLabel] {
        splitControlFor(p, handoff, color, key, deadline, timeoutMs, childLabel);
      })) {
    std::lock_guard<std::mutex> lock(handoff->mutex);
    handoff->failure = std::make_unique<Failure>(
        makeFailure("TANDEM_DISPOSED", "split was not run: the parent communicator was disposed", "split"));
    handoff->done = true;
  }
  auto self = shared_from_this();
  queue_->post([self, handoff] { self->initFromHandoff(handoff); });
}

void Communicator::splitControlFor(const std::shared_ptr<Communicator>& parent, std::shared_ptr<ControlHandoff> handoff,
                                   int color, int key, Clock::time_point deadline, uint32_t timeoutMs,
                                   std::string childLabel) {
  const NcclLibrary& nccl = parent->nccl_;
  auto publish = [&](std::unique_ptr<Failure> failure) {
    std::lock_guard<std::mutex> lock(handoff->mutex);
    ncclComm_t made = __atomic_load_n(&handoff->comm, __ATOMIC_ACQUIRE);
    if (made && (failure || handoff->abandoned)) {
      nccl.ncclCommAbort(made);
      __atomic_store_n(&handoff->comm, nullptr, __ATOMIC_RELEASE);
    }
    handoff->failure = std::move(failure);
    handoff->done = true;
    handoff->cv.notify_all();
  };
  auto childFailure = [&](const std::string& code, const std::string& detail, ncclResult_t result) {
    auto f = std::make_unique<Failure>();
    f->code = code;
    f->message = childLabel + ": " + detail;
    f->communicator = handoff->commName;
    f->operation = "split";
    if (result != ncclSuccess && resultName(result)) f->ncclResult = resultName(result);
    return f;
  };
  {
    std::lock_guard<std::mutex> lock(handoff->mutex);
    if (handoff->abandoned) {
      handoff->done = true;
      return;
    }
  }
  ncclConfig_t config = makeConfig(/*blocking=*/false, handoff->commName.c_str());
  ncclResult_t r = ncclSuccess;
  std::string detail;
  bool parentGone = false;
  {
    std::lock_guard<std::timed_mutex> call(parent->callMutex_);
    ncclComm_t comm = parent->control_.load();
    if (!comm) {
      parentGone = true;
    } else {
      r = nccl.ncclCommSplit(comm, color, key, &handoff->comm, &config);
      if (r != ncclSuccess && r != ncclInProgress) detail = nccl.describe(r);
    }
  }
  if (parentGone) {
    publish(childFailure("TANDEM_NCCL_ABORTED",
                         "split was not run: the parent " + parent->label() + " was aborted (" + parent->abortReason() +
                             ")",
                         ncclSuccess));
    return;
  }
  if (r != ncclSuccess && r != ncclInProgress) {
    // The parent's state is unknown after a failed collective call: abort it.
    std::string cause = "split failed: " + detail;
    parent->abortWith("TANDEM_NCCL_ERROR", cause, 0, r);
    publish(childFailure("TANDEM_NCCL_ERROR", "split failed: " + parent->label() + ": ncclCommSplit: " + detail, r));
    return;
  }
  // Poll the parent (NCCL reports a non-blocking split's progress on it) against the split's deadline.
  try {
    parent->waitForControl("split", "split", deadline, timeoutMs, kSplitHint);
  } catch (const CommFailure& e) {
    publish(childFailure(e.failure.code, "split failed: " + e.failure.message, ncclSuccess));
    return;
  }
  publish(nullptr);
}

void Communicator::initFromHandoff(std::shared_ptr<ControlHandoff> handoff) {
  handoff_ = handoff;
  try {
    setupContext();
    ncclComm_t comm = nullptr;
    {
      std::unique_lock<std::mutex> lock(handoff->mutex);
      while (!handoff->done) {
        bool abortedNow = aborted();
        bool late = Clock::now() >= initDeadline_ + kHandoffGrace;
        if (abortedNow || late) {
          handoff->abandoned = true;
          if (abortedNow) {
            throw CommFailure(makeFailure(abortedCode(),
                                          "init was interrupted: the communicator was aborted (" + abortReason() + ")",
                                          "init"));
          }
          throw CommFailure(makeFailure("TANDEM_NCCL_TIMEOUT",
                                        "init did not complete within " + std::to_string(options_.timeoutMs) +
                                            " ms (the communicator it is made from is busy or stuck); the "
                                            "communicator was aborted",
                                        "init"));
        }
        handoff->cv.wait_for(lock, std::chrono::milliseconds(10));
      }
      if (handoff->failure) throw CommFailure(*handoff->failure);
      comm = __atomic_exchange_n(&handoff->comm, nullptr, __ATOMIC_ACQ_REL);
    }
    if (!comm) {
      // The split gave this rank no communicator (color NCCL_SPLIT_NOCOLOR).
      member_ = false;
      reportInit(nullptr);
      return;
    }
    {
      std::lock_guard<std::timed_mutex> call(callMutex_);
      if (aborted()) {
        nccl_.ncclCommAbort(comm);
        throw CommFailure(makeFailure("TANDEM_NCCL_ABORTED",
                                      "init was interrupted: the communicator was aborted (" + abortReason() + ")",
                                      "init"));
      }
      control_ = comm;
    }
    finishInit("init");
    reportInit(nullptr);
  } catch (const CommFailure& e) {
    reportInit(&e.failure);
  }
}

void Communicator::startGroup(const std::vector<std::shared_ptr<Communicator>>& comms) {
  if (comms.empty()) return;
  Clock::time_point deadline = Clock::now() + std::chrono::milliseconds(comms[0]->options_.timeoutMs);
  std::vector<std::shared_ptr<ControlHandoff>> handoffs;
  for (const auto& c : comms) {
    c->initDeadline_ = deadline;
    auto h = std::make_shared<ControlHandoff>();
    h->commName = c->options_.name;
    handoffs.push_back(h);
  }
  // The first communicator's thread makes every rank's non-blocking communicator inside one
  // ncclGroupStart/End (as ncclCommInitAll does), then each thread finishes its own init.
  comms[0]->queue_->post([comms, handoffs, deadline] { groupInit(comms, handoffs, deadline); });
  for (size_t i = 0; i < comms.size(); ++i) {
    auto c = comms[i];
    auto h = handoffs[i];
    c->queue_->post([c, h] { c->initFromHandoff(h); });
  }
}

void Communicator::groupInit(const std::vector<std::shared_ptr<Communicator>>& comms,
                             const std::vector<std::shared_ptr<ControlHandoff>>& handoffs, Clock::time_point deadline) {
  const NcclLibrary& nccl = comms[0]->nccl_;
  const CudaDriver& cuda = comms[0]->cuda_;
  const int n = static_cast<int>(comms.size());
  std::vector<ncclComm_t> handles(n, nullptr);
  std::vector<CUdevice> devices(n, 0);
  std::vector<CUcontext> contexts(n, nullptr);
  std::vector<ncclConfig_t> configs;
  for (int i = 0; i < n; ++i) configs.push_back(makeConfig(/*blocking=*/false, handoffs[i]->commName.c_str()));

  std::string code, detail;
  ncclResult_t failedResult = ncclSuccess;
  auto failWith = [&](std::string c, std::string d, ncclResult_t r) {
    if (!code.empty()) return;
    code = std::move(c);
    detail = std::move(d);
    failedResult = r;
  };

  auto interrupted = [&]() {
    for (const auto& c : comms) {
      if (c->aborted()) {
        failWith(c->abortedCode(), "init was interrupted: the communicator was aborted (" + c->abortReason() + ")",
                 ncclSuccess);
        return true;
      }
    }
    return false;
  };
  (void)interrupted();
  ncclUniqueId id{};
  ncclResult_t r = code.empty() ? nccl.ncclGetUniqueId(&id) : ncclSuccess;
  if (r != ncclSuccess) failWith("TANDEM_NCCL_ERROR", "ncclGetUniqueId failed: " + nccl.describe(r), r);
  for (int i = 0; i < n && code.empty(); ++i) {
    CUresult cr = cuda.cuDeviceGet(&devices[i], comms[i]->options_.device);
    if (cr == CUDA_SUCCESS) cr = cuda.cuDevicePrimaryCtxRetain(&contexts[i], devices[i]);
    if (cr != CUDA_SUCCESS) {
      contexts[i] = nullptr;
      failWith(cudaErrorCode(cr), "could not open CUDA device " + std::to_string(comms[i]->options_.device) + ": " +
                                      cuda.describe(cr), ncclSuccess);
    }
  }
  if (code.empty()) {
    r = nccl.ncclGroupStart();
    if (r != ncclSuccess) {
      failWith("TANDEM_NCCL_ERROR", "ncclGroupStart failed: " + nccl.describe(r), r);
    } else {
      ncclResult_t first = ncclSuccess;
      for (int i = 0; i < n; ++i) {
        // NCCL takes the device from the calling thread's current context.
        cuda.cuCtxSetCurrent(contexts[i]);
        ncclResult_t ri = nccl.ncclCommInitRankConfig(&handles[i], n, id, i, &configs[i]);
        if (ri != ncclSuccess && ri != ncclInProgress && first == ncclSuccess) first = ri;
      }
      ncclResult_t end = nccl.ncclGroupEnd();
      if (first == ncclSuccess && end != ncclSuccess && end != ncclInProgress) first = end;
      if (first != ncclSuccess) failWith("TANDEM_NCCL_ERROR", "ncclCommInitRankConfig failed: " + nccl.describe(first), first);
      cuda.cuCtxSetCurrent(nullptr);
    }
  }
  PollBackoff backoff;
  while (code.empty()) {
    bool done = true;
    for (int i = 0; i < n && code.empty(); ++i) {
      if (!handles[i]) {
        failWith("TANDEM_NCCL_ERROR", "NCCL returned no communicator for GPU " + std::to_string(comms[i]->options_.device),
                 ncclSuccess);
        break;
      }
      ncclResult_t state = ncclInProgress;
      ncclResult_t q = nccl.ncclCommGetAsyncError(handles[i], &state);
      if (q != ncclSuccess) state = q;
      if (state == ncclInProgress) done = false;
      else if (state != ncclSuccess) failWith("TANDEM_NCCL_ERROR", "init failed: " + nccl.describe(state), state);
    }
    if (!code.empty() || done || interrupted()) break;
    if (Clock::now() >= deadline) {
      failWith("TANDEM_NCCL_TIMEOUT",
               "init of " + std::to_string(n) + " GPUs in one process did not complete within " +
                   std::to_string(comms[0]->options_.timeoutMs) + " ms",
               ncclSuccess);
      break;
    }
    backoff.sleep();
  }
  if (!code.empty()) {
    for (ncclComm_t& h : handles) {
      if (h) nccl.ncclCommAbort(h);
      h = nullptr;
    }
  }
  for (int i = 0; i < n; ++i) {
    if (contexts[i]) cuda.cuDevicePrimaryCtxRelease(devices[i]);
  }
  for (int i = 0; i < n; ++i) {
    std::lock_guard<std::mutex> lock(handoffs[i]->mutex);
    if (!code.empty()) {
      handoffs[i]->failure = std::make_unique<Failure>(comms[i]->makeFailure(code, detail, "init", failedResult));
    } else if (handoffs[i]->abandoned) {
      nccl.ncclCommAbort(handles[i]);
    } else {
      handoffs[i]->comm = handles[i];
    }
    handoffs[i]->done = true;
    handoffs[i]->cv.notify_all();
  }
}

// --------------------------------------------------------------------------------------------------
// Operations

void Communicator::submit(uint64_t id, std::vector<Op> ops, uint32_t timeoutMs, std::string label,
                          std::shared_ptr<void> hostOwner, StreamHook before, StreamHook after) {
  Pending pending;
  pending.timeoutMs = timeoutMs;
  pending.deadline = Clock::now() + std::chrono::milliseconds(timeoutMs);
  pending.summary.label = std::move(label);
  pending.summary.first = ops.front();
  pending.summary.count = ops.size();
  std::string cause, code;
  bool wasIdle = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (aborted_) {
      cause = abortCause_;
      code = abortCode_ == "TANDEM_DISPOSED" ? "TANDEM_DISPOSED" : "TANDEM_NCCL_ABORTED";  // abortedCode(), locked
    } else {
      wasIdle = pending_.empty();
      pending_.emplace(id, pending);
    }
  }
  if (!code.empty()) {
    std::string op = describe(pending.summary);
    Failure f = makeFailure(code, op + " was not run: the communicator was aborted (" + cause + ")", op);
    settle_(id, &f);
    return;
  }
  // The watchdog must see the deadline even before the operation reaches the stream.
  if (wasIdle) wake_.notify_one();
  auto batch = std::make_shared<Batch>();
  batch->id = id;
  batch->ops = std::move(ops);
  batch->hostOwner = std::move(hostOwner);
  batch->before = std::move(before);
  batch->after = std::move(after);
  auto self = shared_from_this();
  if (!queue_ || !queue_->post([self, batch] { self->runBatch(*batch); })) {
    fail(id, "TANDEM_DISPOSED", "was not run: the communicator was disposed");
  }
}

void Communicator::runBatch(Batch& batch) {
  if (!ready_) {
    fail(batch.id, "TANDEM_NCCL_ABORTED", "was not run: the communicator is not initialised");
    return;
  }
  CUevent event = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (pending_.find(batch.id) == pending_.end()) return;  // settled already: the communicator was aborted
    if (!eventPool_.empty()) {
      event = eventPool_.back();
      eventPool_.pop_back();
    }
  }
  if (!event) {
    CUresult cr = cuda_.cuEventCreate(&event, CU_EVENT_DISABLE_TIMING);
    if (cr != CUDA_SUCCESS) {
      fail(batch.id, cudaErrorCode(cr), "failed: cuEventCreate: " + cuda_.describe(cr));
      return;
    }
  }
  const Op& first = batch.ops.front();
  ncclResult_t nr = ncclSuccess;
  CUresult cr = CUDA_SUCCESS;
  std::string detail;
  bool gone = false;
  if (static_cast<uint32_t>(first.kind) < kNcclOpKinds) {
    std::lock_guard<std::timed_mutex> call(callMutex_);
    ncclComm_t comm = ops_.load();
    if (!comm) {
      gone = true;
    } else {
      if (batch.before) cr = batch.before(stream_, batch.ops, detail);
      const bool group = batch.ops.size() > 1 && cr == CUDA_SUCCESS;
      bool grouped = false;
      if (cr != CUDA_SUCCESS) nr = ncclSuccess;  // nothing of the group was issued
      else if (group) {
        nr = nccl_.ncclGroupStart();
        grouped = nr == ncclSuccess;
      }
      for (const Op& op : batch.ops) {
        if (nr != ncclSuccess || cr != CUDA_SUCCESS) break;
        void* send = devicePointer(op.send);
        void* recv = devicePointer(op.recv);
        switch (op.kind) {
          case OpKind::AllReduce:
            nr = nccl_.ncclAllReduce(send, recv, op.count, op.dtype, op.redop, comm, stream_);
            break;
          case OpKind::AllGather:
            nr = nccl_.ncclAllGather(send, recv, op.count, op.dtype, comm, stream_);
            break;
          case OpKind::ReduceScatter:
            nr = nccl_.ncclReduceScatter(send, recv, op.count, op.dtype, op.redop, comm, stream_);
            break;
          case OpKind::Broadcast:
            nr = nccl_.ncclBroadcast(send, recv, op.count, op.dtype, op.peer, comm, stream_);
            break;
          case OpKind::Reduce:
            nr = nccl_.ncclReduce(send, recv, op.count, op.dtype, op.redop, op.peer, comm, stream_);
            break;
          case OpKind::Send:
            nr = nccl_.ncclSend(send, op.count, op.dtype, op.peer, comm, stream_);
            break;
          case OpKind::Recv:
            nr = nccl_.ncclRecv(recv, op.count, op.dtype, op.peer, comm, stream_);
            break;
          default:
            nr = ncclInvalidUsage;  // the wrapper never mixes copies into NCCL batches
            break;
        }
      }
      if (grouped) {
        ncclResult_t end = nccl_.ncclGroupEnd();
        if (nr == ncclSuccess) nr = end;
      }
      if (nr == ncclSuccess && cr == CUDA_SUCCESS && batch.after) cr = batch.after(stream_, batch.ops, detail);
      if (nr != ncclSuccess) detail = nccl_.describe(nr);
      else if (cr == CUDA_SUCCESS) cr = cuda_.cuEventRecord(event, stream_);
    }
  } else {
    // Copies and fills touch no NCCL handle. From pageable host memory they return once the bytes
    // have left (or, to the host, arrived in) that memory, so the keep-alive can go right after.
    switch (first.kind) {
      case OpKind::CopyToDevice:
        cr = cuda_.cuMemcpyHtoDAsync(first.recv, first.host, first.count, stream_);
        break;
      case OpKind::CopyToHost:
        cr = cuda_.cuMemcpyDtoHAsync(first.host, first.send, first.count, stream_);
        break;
      default:
        cr = cuda_.cuMemsetD8Async(first.recv, static_cast<unsigned char>(first.redop), first.count, stream_);
        break;
    }
    if (cr == CUDA_SUCCESS) cr = cuda_.cuEventRecord(event, stream_);
    else detail = cuda_.describe(cr);
  }
  batch.hostOwner.reset();

  if (!gone && nr == ncclSuccess && cr == CUDA_SUCCESS) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (pending_.find(batch.id) == pending_.end()) {
      retiredEvents_.push_back(event);  // aborted while it was being enqueued
      return;
    }
    inflight_.push_back({batch.id, event});
    wake_.notify_one();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // An event whose record failed is in an unknown state; keep it away from the pool.
    (nr == ncclSuccess && cr == CUDA_SUCCESS ? eventPool_ : retiredEvents_).push_back(event);
  }
  if (gone) {
    fail(batch.id, abortedCode(), "was not run: the communicator was aborted (" + abortReason() + ")");
    return;
  }
  std::string what;
  std::string code;
  bool fatal = true;
  if (nr != ncclSuccess) {
    code = "TANDEM_NCCL_ERROR";
    what = "failed: " + detail;
    // Argument errors leave the communicator as it was; anything else leaves it in an unknown state.
    fatal = nr != ncclInvalidArgument && nr != ncclInvalidUsage;
  } else {
    code = cudaErrorCode(cr);
    what = "failed: " + (detail.empty() ? cuda_.describe(cr) : detail);
  }
  OpSummary summary;
  summary.first = first;
  summary.count = batch.ops.size();
  std::string op = describe(summary);
  fail(batch.id, code, what, nr);
  if (fatal) abortWith(code, op + " " + what, 0, nr);
}

void Communicator::complete(uint64_t id) {
  bool found = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    found = pending_.erase(id) > 0;
    if (pending_.empty()) drained_.notify_all();
  }
  if (found) settle_(id, nullptr);
}

void Communicator::fail(uint64_t id, const std::string& code, const std::string& what, ncclResult_t result) {
  Pending pending;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = pending_.find(id);
    if (it == pending_.end()) return;
    pending = std::move(it->second);
    pending_.erase(it);
    if (pending_.empty()) drained_.notify_all();
  }
  std::string op = describe(pending.summary);
  Failure f = makeFailure(code, op + " " + what, op, result);
  settle_(id, &f);
}

// --------------------------------------------------------------------------------------------------
// Progress and watchdog

void Communicator::progressLoop() {
  pthread_setname_np(pthread_self(), "tandem-ncclwd");
  // Polling sleeps are tens of microseconds; the default 50 us timer slack would double them.
  prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
  bool contextCurrent = false;
  uint64_t frontId = 0;
  Clock::time_point frontSince{};
  Clock::time_point lastWatch = Clock::now();
  // Since when operations have been pending with none on the stream yet (null: not in that state).
  std::optional<Clock::time_point> queuedSince;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    if (pending_.empty() || !inflight_.empty()) queuedSince.reset();
    if (!abortRequests_.empty()) {
      AbortRequest request = std::move(abortRequests_.front());
      abortRequests_.pop_front();
      lock.unlock();
      abortWith("TANDEM_NCCL_ABORTED",
                "abort() was called" + (request.reason.empty() ? std::string() : ": " + request.reason));
      if (request.done) request.done();
      lock.lock();
      continue;
    }
    if (stopping_) break;
    if (inflight_.empty()) {
      if (pending_.empty()) {
        wake_.wait(lock);
        continue;
      }
      if (!queuedSince) queuedSince = Clock::now();
      if (Clock::now() - *queuedSince < kSpin) {
        // An operation was just submitted and reaches the stream within microseconds: stay awake for
        // it rather than pay a wake-up on the latency path.
        lock.unlock();
        std::this_thread::yield();
        lock.lock();
      } else {
        // Operations are queued but not yet on the stream (the thread is busy): keep their deadlines.
        wake_.wait_for(lock, kWatchInterval);
      }
    } else {
      InFlight front = inflight_.front();
      if (!contextCurrent) {
        cuda_.cuCtxSetCurrent(context_);
        contextCurrent = true;
      }
      lock.unlock();
      CUresult r = cuda_.cuEventQuery(front.event);
      lock.lock();
      bool stillFront = !inflight_.empty() && inflight_.front().id == front.id;
      if (r == CUDA_SUCCESS) {
        if (stillFront) {
          inflight_.pop_front();
          eventPool_.push_back(front.event);
          lock.unlock();
          complete(front.id);
          lock.lock();
        }
        continue;
      }
      if (r != CUDA_ERROR_NOT_READY && stillFront) {
        lock.unlock();
        // A failure on the communicator's stream is the communicator's failure (a peer that died mid-copy
        // can leave one behind): report it as such, naming the communicator and the operation.
        abortWith("TANDEM_NCCL_ERROR", "CUDA reported an error on the communicator's stream: " + cuda_.describe(r));
        lock.lock();
        continue;
      }
      Clock::time_point now = Clock::now();
      if (front.id != frontId) {
        frontId = front.id;
        frontSince = now;
      }
      auto waited = now - frontSince;
      lock.unlock();
      if (waited < kSpin) {
        std::this_thread::yield();
      } else {
        Clock::duration cap = waited < kLongWait ? Clock::duration(kMaxPollSleep) : Clock::duration(kMaxLongPollSleep);
        std::this_thread::sleep_for(std::min<Clock::duration>(waited / 16, cap));
      }
      lock.lock();
    }
    Clock::time_point now = Clock::now();
    if (now - lastWatch >= kWatchInterval) {
      lastWatch = now;
      watch(lock, now);
    }
  }
}

void Communicator::watch(std::unique_lock<std::mutex>& lock, Clock::time_point now) {
  // Deadlines. Ids grow with submission, but timeouts differ per operation: check them all.
  uint64_t expired = 0;
  const Pending* late = nullptr;
  for (const auto& [id, p] : pending_) {
    if (p.deadline <= now && (!late || p.deadline < late->deadline)) {
      expired = id;
      late = &p;
    }
  }
  if (late) {
    std::string cause = describe(late->summary) + " did not complete within " + std::to_string(late->timeoutMs) +
                        " ms; the communicator was aborted (did a rank die, or did the ranks not call the same "
                        "operations in the same order?)";
    lock.unlock();
    abortWith("TANDEM_NCCL_TIMEOUT", cause, expired);
    lock.lock();
    return;
  }
  if (inflight_.empty() || !ready_) return;
  // NCCL's asynchronous error (a network or remote failure noticed by its proxy thread).
  lock.unlock();
  ncclResult_t state = ncclSuccess;
  std::string detail;
  {
    std::unique_lock<std::timed_mutex> call(callMutex_, std::try_to_lock);
    ncclComm_t comm = ops_.load();
    if (call.owns_lock() && comm) {
      ncclResult_t r = nccl_.ncclCommGetAsyncError(comm, &state);
      if (r != ncclSuccess) state = r;
      if (state != ncclSuccess && state != ncclInProgress) detail = nccl_.describe(state);
    }
  }
  if (state != ncclSuccess && state != ncclInProgress) {
    abortWith("TANDEM_NCCL_ERROR", "NCCL reported an asynchronous error: " + detail + "; the communicator was aborted",
              0, state);
  }
  lock.lock();
}

void Communicator::requestAbort(std::string reason, std::function<void()> done) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    abortRequests_.push_back({std::move(reason), std::move(done)});
  }
  wake_.notify_all();
}

void Communicator::abortWith(const std::string& code, const std::string& cause, uint64_t causeId,
                             ncclResult_t result) {
  std::lock_guard<std::mutex> serial(abortMutex_);
  std::map<uint64_t, Pending> victims;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!aborted_) {
      aborted_ = true;
      abortCode_ = code;
      abortCause_ = cause;
      victims.swap(pending_);
      for (const InFlight& f : inflight_) retiredEvents_.push_back(f.event);
      inflight_.clear();
    }
  }
  drained_.notify_all();
  wake_.notify_all();
  for (const auto& [id, p] : victims) {
    std::string op = describe(p.summary);
    std::string detail;
    if (id == causeId) detail = cause;
    else if (code == "TANDEM_NCCL_TIMEOUT") detail = op + " was pending when the communicator was aborted: " + cause;
    else detail = op + " failed: " + cause;
    Failure f = makeFailure(code, detail, op, result);
    settle_(id, &f);
  }
  if (!ops_.load() && !control_.load()) return;
  // Normally the communicator thread is between calls and the lock is free at once. If it is stuck
  // inside a blocking NCCL call (a connection handshake with a rank that is gone), only the abort flag
  // that ncclCommAbort raises gets it out, so after a grace period abort without the lock.
  std::unique_lock<std::timed_mutex> call(callMutex_, std::defer_lock);
  (void)call.try_lock_for(kAbortGrace);
  ncclComm_t ops = ops_.exchange(nullptr);
  ncclComm_t control = control_.exchange(nullptr);
  if (ops) nccl_.ncclCommAbort(ops);
  if (control) nccl_.ncclCommAbort(control);
}

// --------------------------------------------------------------------------------------------------
// Memory

uint64_t Communicator::allocate(size_t bytes) {
  if (!context_ || !ready_) {
    throw NativeError(abortedCode(), label() + ": alloc was not run: the communicator is not initialised (" +
                                         abortReason() + ")");
  }
  CUdeviceptr ptr = 0;
  CUresult r = cuda_.cuMemAlloc(&ptr, bytes);
  if (r != CUDA_SUCCESS) {
    throw NativeError(cudaErrorCode(r),
                      label() + ": cuMemAlloc of " + std::to_string(bytes) + " bytes failed: " + cuda_.describe(r));
  }
  std::lock_guard<std::mutex> lock(allocationsMutex_);
  allocations_[ptr] = bytes;
  return ptr;
}

void Communicator::release(uint64_t address) {
  {
    std::lock_guard<std::mutex> lock(allocationsMutex_);
    auto it = allocations_.find(address);
    if (it == allocations_.end()) return;  // freed already (twice is harmless)
    allocations_.erase(it);
  }
  // Operations on this communicator's stream may still read or write the memory. (A failed
  // synchronize means a broken context; the free is still worth trying.)
  (void)cuda_.cuStreamSynchronize(stream_);
  CUresult r = cuda_.cuMemFree(address);
  if (r != CUDA_SUCCESS) throw NativeError(cudaErrorCode(r), label() + ": cuMemFree failed: " + cuda_.describe(r));
}

bool Communicator::ownsRange(uint64_t address, size_t bytes) {
  std::lock_guard<std::mutex> lock(allocationsMutex_);
  auto it = allocations_.upper_bound(address);
  if (it == allocations_.begin()) return false;
  --it;
  return address >= it->first && address - it->first <= it->second && bytes <= it->second - (address - it->first);
}

// --------------------------------------------------------------------------------------------------
// Shutdown

void Communicator::shutdownOnThread() {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    drained_.wait(lock, [this] { return pending_.empty(); });
  }
  {
    std::lock_guard<std::timed_mutex> call(callMutex_);
    ncclComm_t ops = ops_.exchange(nullptr);
    ncclComm_t control = control_.exchange(nullptr);
    // Nothing is pending, so destroy returns once NCCL has released its resources; one that fails
    // leaves an unknown state behind, which abort cleans up.
    if (ops && nccl_.ncclCommDestroy(ops) != ncclSuccess) nccl_.ncclCommAbort(ops);
    if (control && nccl_.ncclCommDestroy(control) != ncclSuccess) nccl_.ncclCommAbort(control);
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!aborted_) {
      aborted_ = true;
      abortCode_ = "TANDEM_DISPOSED";
      abortCause_ = "the communicator was disposed";
    }
  }
  // The progress thread must not be polling an event while the stream and events go away.
  stopProgress();
  releaseResources();
}

void Communicator::stopProgress() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  std::lock_guard<std::mutex> join(progressJoinMutex_);
  if (progress_.joinable()) progress_.join();
}

void Communicator::releaseResources() {
  if (!context_) return;
  const CudaDriver& d = cuda_;
  d.cuCtxSetCurrent(context_);
  if (stream_) d.cuStreamSynchronize(stream_);
  {
    std::lock_guard<std::mutex> lock(allocationsMutex_);
    for (const auto& [ptr, bytes] : allocations_) d.cuMemFree(ptr);
    allocations_.clear();
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (CUevent e : eventPool_) d.cuEventDestroy(e);
    for (CUevent e : retiredEvents_) d.cuEventDestroy(e);
    for (const InFlight& f : inflight_) d.cuEventDestroy(f.event);
    eventPool_.clear();
    retiredEvents_.clear();
    inflight_.clear();
  }
  if (stream_) d.cuStreamDestroy(stream_);
  stream_ = nullptr;
  d.cuCtxSetCurrent(nullptr);
  d.cuDevicePrimaryCtxRelease(cuDevice_);
  context_ = nullptr;
}

void Communicator::close() {
  if (closed_) return;
  closed_ = true;
  // Fails whatever is still pending and aborts the NCCL communicators if dispose() did not destroy them.
  abortWith("TANDEM_DISPOSED", "the communicator was disposed");
  stopProgress();
  if (queue_) {
    auto* self = this;
    queue_->post([self] { self->releaseResources(); });
    queue_->stop();  // runs what is queued (each fails fast now), then the release
    queue_.reset();
  }
}

}  // namespace tandem::nccl
