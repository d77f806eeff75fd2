#include "cuda_ipc.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "../agent.h"
#include "../connection.h"

namespace tandem::transfer {

namespace {

// How the copies are issued. The first posts try each applicable strategy, timed with CUDA events; later
// posts use the fastest (written by the progress thread; read by JS as copyStrategy).
//   kernel: the chunk-copy kernel over a table uploaded once per plan (SMs);
//   copy engine: one cuMemcpyAsync per piece;
//   batch: cuMemcpyBatchAsync in growing sub-batches (copy engines, no per-copy stream bookkeeping).
enum Strategy : int { kUndecided = -1, kKernel = 0, kCopyEngine = 1, kBatch = 2 };
constexpr int kStrategies = 3;
constexpr int kTrials = 2;  // per strategy; the first touch of a peer mapping inflates one

// Plans settled on the copy engines with at most this many pieces are issued on the caller's thread when
// they can be (postOnCaller): each copy costs that thread a few microseconds to submit. (A plan settled
// on the kernel is one launch, whatever its pieces.)
constexpr size_t kDirectMaxPieces = 8;

struct CudaIpcPlan final : BackendPlanState {
  std::atomic<int> strategy{kUndecided};
  unsigned candidates = 0;  // bit per strategy, fixed at the first post
  int trialsIssued[kStrategies] = {0, 0, 0};
  int trialsDone[kStrategies] = {0, 0, 0};
  float trialMs[kStrategies] = {-1, -1, -1};  // fastest trial of each strategy
  // batch: the copies' endpoints in this process, resolved at the first batched post of a peer epoch.
  struct Batch {
    uint64_t epoch = 0;
    std::vector<CUdeviceptr> dsts, srcs;
    std::vector<size_t> sizes;
  };
  std::unique_ptr<Batch> batch;
  // Plans whose strategy is settled on the copy engines (few pieces) or on the kernel: the copies or the
  // launch as the progress thread last issued them, for the caller's thread to issue again itself
  // (postOnCaller). Guarded by the peer's mutex.
  struct Direct {
    uint64_t epoch = 0;  // CudaIpcPeer::epoch when resolved
    CUcontext context = nullptr;
    CUstream stream = nullptr;
    struct Copy {
      CUdeviceptr dst, src;
      uint64_t bytes;
    };
    std::vector<Copy> copies;
    // The kernel strategy: one launch over the plan's chunk table (which lives as long as the plan).
    CUfunction kernel = nullptr;
    unsigned blocks = 0;
    CUdeviceptr table = 0;
    unsigned count = 0;
  };
  std::unique_ptr<Direct> direct;
  const char* copyStrategy() const override {
    switch (strategy.load()) {
      case kKernel: return "kernel";
      case kCopyEngine: return "copy-engine";
      case kBatch: return "batch";
      default: return "undecided";
    }
  }
};

struct CudaIpcPeer final : BackendPeerState {
  CUstream stream = nullptr;  // per-peer stream (set on the progress thread, under the peer's mutex)
  int streamDevice = -1;
  // Changes (under the peer's mutex) whenever the stream or the opened regions go, so that a plan's
  // resolved copies (CudaIpcPlan::Direct) stop being used on the caller's thread.
  uint64_t epoch = 0;
  // Posts queued for the progress thread and not yet issued to the stream: while there are any, posts
  // cannot be issued on the caller's thread without overtaking them.
  std::atomic<int> queuedIssues{0};
  // The peer's notification ring registered with CUDA (progress thread, once), so that the stream itself
  // commits a WRITE's notification after the copy. ringOnDevice is its mapping's device address (0: not
  // usable); set under the peer's mutex, read there by the caller's thread.
  bool ringRegisterTried = false;
  int ringRegisteredOn = -1;
  CUdeviceptr ringOnDevice = 0;
  // The peer's device regions opened in this process (progress thread).
  struct Opened {
    CUdeviceptr address = 0;  // the region's start in this process
    CUdeviceptr handleBase = 0;  // what cuIpcOpenMemHandle returned (0: same process, nothing to close)
    int device = -1;
  };
  // Keyed by identity only (never dereferenced: a region can be dropped before its entry goes).
  std::unordered_map<const RemoteRegion*, Opened> opened;
};

}  // namespace

CudaIpcBackend::CudaIpcBackend(Agent& agent) : TransferBackend(agent), cuda_(agent.cuda().driver()) {
  // TANDEM_CUDA_BATCH=0: plans never use batched copies. TANDEM_CUDA_COPY=kernel|engine|batch: plans use that
  // strategy wherever it can run, without trials.
  if (const char* env = std::getenv("TANDEM_CUDA_BATCH")) copyBatchOn_ = std::strcmp(env, "0") != 0;
  if (const char* env = std::getenv("TANDEM_CUDA_COPY")) {
    std::string v = env;
    forcedCopy_ = v == "kernel" ? kKernel : v == "engine" ? kCopyEngine : v == "batch" ? kBatch : -1;
  }
  // TANDEM_DIRECT_POSTS=0: every post goes through the progress thread (see postOnCaller).
  if (const char* env = std::getenv("TANDEM_DIRECT_POSTS")) directPostsOn_ = std::strcmp(env, "0") != 0;
  // TANDEM_STREAM_COMMIT=0: the host commits notifications to polling targets once the copy is seen done,
  // instead of the stream right after the copy (see streamCommit).
  if (const char* env = std::getenv("TANDEM_STREAM_COMMIT")) streamCommitOn_ = std::strcmp(env, "0") != 0;
}

std::string CudaIpcBackend::unavailableReason() const {
  return agent_.cuda().available() ? std::string() : "CUDA unavailable: " + agent_.cuda().reason();
}

void CudaIpcBackend::checkPlan(const PlanShape& shape) const {
  if (!agent_.cuda().available()) Agent::unavailable(id(), "CUDA unavailable: " + agent_.cuda().reason());
  if (!shape.peer.sameHost) Agent::unavailable(id(), "peer '" + shape.peerName + "' is on another host (CUDA IPC needs one host)");
  if (!(shape.peer.d.backends & bit())) Agent::unavailable(id(), "peer '" + shape.peerName + "' has no CUDA");
  if (!shape.localDevice && !shape.remoteDevice) Agent::unavailable(id(), "neither side is device memory; use shm");
  for (const auto& r : shape.remotes) {
    const auto& d = r->d;
    if (d.kind == MemKind::Device && !d.hasIpcHandle) {
      Agent::unavailable(id(), "remote region " + std::to_string(d.id) + " has no CUDA IPC handle");
    }
    if (d.kind == MemKind::Host) {
      Agent::unavailable(id(), "remote region " + std::to_string(d.id) + " is plain host memory; register shared or pinned memory");
    }
  }
}

std::unique_ptr<BackendPlanState> CudaIpcBackend::preparePlan(Plan&) { return std::make_unique<CudaIpcPlan>(); }

std::unique_ptr<BackendPeerState> CudaIpcBackend::openPeer(Peer&) { return std::make_unique<CudaIpcPeer>(); }

// Until the progress thread has issued a post, later ones for the peer must queue behind it.
void CudaIpcBackend::queued(Plan& plan) {
  plan.peer->state<CudaIpcPeer>(Backend::CudaIpc).queuedIssues.fetch_add(1, std::memory_order_acq_rel);
}
void CudaIpcBackend::dequeued(Plan& plan) {
  plan.peer->state<CudaIpcPeer>(Backend::CudaIpc).queuedIssues.fetch_sub(1, std::memory_order_acq_rel);
}

void CudaIpcBackend::releasePeer(Peer& peer) {
  CudaIpcPeer& cs = peer.state<CudaIpcPeer>(Backend::CudaIpc);
  const bool otherProcess = peer.d.pid != static_cast<uint32_t>(getpid());
  const bool cuda = agent_.cuda().available() && agent_.cuda().hasContexts();
  CUstream stream = nullptr;
  {
    std::lock_guard<std::mutex> lock(peer.mutex);  // no more copies issued on the caller's thread
    ++cs.epoch;
    std::swap(stream, cs.stream);
  }
  // Work already issued to the peer reads or writes its memory through these mappings: let it finish.
  if (stream && cuda) {
    agent_.cuda().setDevice(cs.streamDevice);
    cuda_->cuStreamSynchronize(stream);
    cuda_->cuStreamDestroy(stream);
  }
  // No stream of ours writes into the peer's ring any more (the stream is gone, the epoch stops direct posts).
  if (cs.ringRegisteredOn >= 0 && cuda && peer.ring) {
    int device;
    {
      std::lock_guard<std::mutex> lock(peer.mutex);
      cs.ringOnDevice = 0;
      device = cs.ringRegisteredOn;
      cs.ringRegisteredOn = -1;
    }
    agent_.cuda().setDevice(device);
    cuda_->cuMemHostUnregister(peer.ring->mapping());
  }
  for (auto& [region, o] : cs.opened) {
    if (o.handleBase && o.device >= 0 && otherProcess && cuda) {
      agent_.cuda().setDevice(o.device);
      cuda_->cuIpcCloseMemHandle(o.handleBase);
    }
  }
  cs.opened.clear();
}

void CudaIpcBackend::releaseRegion(Peer& peer, RemoteRegion& region) {
  CudaIpcPeer& cs = peer.state<CudaIpcPeer>(Backend::CudaIpc);
  const bool cuda = agent_.cuda().available() && agent_.cuda().hasContexts();
  {
    std::lock_guard<std::mutex> lock(peer.mutex);
    ++cs.epoch;  // resolved copies (and batches) naming it are resolved again, without it
  }
  // Work already issued through its mapping or IPC handle finishes first.
  if (cs.stream && cuda) {
    agent_.cuda().setDevice(cs.streamDevice);
    cuda_->cuStreamSynchronize(cs.stream);
  }
  auto it = cs.opened.find(&region);
  if (it == cs.opened.end()) return;
  if (it->second.handleBase && it->second.device >= 0 && peer.d.pid != static_cast<uint32_t>(getpid()) && cuda) {
    agent_.cuda().setDevice(it->second.device);
    cuda_->cuIpcCloseMemHandle(it->second.handleBase);
  }
  cs.opened.erase(it);
}

CUdeviceptr CudaIpcBackend::openRemote(Peer& peer, RemoteRegion& r, int device) {
  CudaIpcPeer::Opened& o = peer.state<CudaIpcPeer>(Backend::CudaIpc).opened[&r];
  if (o.address) return o.address;
  if (peer.d.pid == static_cast<uint32_t>(getpid())) {
    o.address = r.d.address;  // same process: unified addressing already reaches it
    o.device = device;
    return o.address;
  }
  CUipcMemHandle handle{};
  std::memcpy(handle.reserved, r.d.ipcHandle, sizeof(handle.reserved));
  CUdeviceptr base = 0;
  CUresult res = cuda_->cuIpcOpenMemHandle(&base, handle, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
  if (res != CUDA_SUCCESS) {
    throw AgentError{"TANDEM_CUDA_ERROR", "cannot open CUDA IPC handle of region " + std::to_string(r.d.id) + " of peer '" +
                                              peer.d.name + "': " + cuda_->describe(res)};
  }
  o.address = base + r.d.ipcOffset;
  o.handleBase = base;
  o.device = device;
  return o.address;
}

void CudaIpcBackend::sweepChunkTables(bool all) {
  for (auto it = chunkTables_.begin(); it != chunkTables_.end();) {
    if (all || it->second.plan.expired()) {
      agent_.cuda().setDevice(it->second.device);
      cuda_->cuMemFree(it->second.table);
      it = chunkTables_.erase(it);
    } else {
      ++it;
    }
  }
}

void CudaIpcBackend::post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) {
  std::string error;
  if (!agent_.waitConnected(plan->peer, error)) return agent_.fail(token, agent_.unreachableCode(*plan->peer), error);
  Peer& peer = *plan->peer;
  CudaIpcPeer& cs = peer.state<CudaIpcPeer>(Backend::CudaIpc);
  CudaIpcPlan& cp = plan->stateAs<CudaIpcPlan>();
  agent_.cuda().setDevice(plan->localDevice);
  if (!cs.stream || cs.streamDevice != plan->localDevice) {
    CUstream old = nullptr;
    {
      std::lock_guard<std::mutex> lock(peer.mutex);
      ++cs.epoch;
      std::swap(old, cs.stream);
    }
    if (old) {
      agent_.cuda().setDevice(cs.streamDevice);
      cuda_->cuStreamSynchronize(old);
      cuda_->cuStreamDestroy(old);
      agent_.cuda().setDevice(plan->localDevice);
    }
    CUstream stream = nullptr;
    agent_.cuda().check(cuda_->cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
    std::lock_guard<std::mutex> lock(peer.mutex);
    cs.stream = stream;
    cs.streamDevice = plan->localDevice;
  }
  // Few pieces: the copy engines (one async copy each). Many pieces: one launch of the chunk-copy
  // kernel over a table uploaded once per plan. Large pieces: batched copy-engine copies. All run on the
  // peer's stream, in post order.
  // (One piece stays on the copy engines: the kernel over 1 MiB or 256 KiB in chunks for every SM was
  // slower back to back, 8.9 against 6.0 us per 1 MiB at 32 in flight: bench/micro/depth.ts, 2 x H200.)
  constexpr size_t kKernelMinPieces = 2;
  constexpr size_t kCopyEngineMaxPieces = 1024;  // beyond this, per-copy submission cost dominates
  constexpr uint64_t kChunkBytes = 128 << 10;
  int use = cp.strategy;
  bool timed = false;
  CudaState::DeviceKernels* kernels = nullptr;
  if (use == kUndecided || use == kKernel) {
    kernels = plan->pieces.size() >= kKernelMinPieces ? &agent_.cuda().kernelsFor(plan->localDevice) : nullptr;
  }
  if (use == kUndecided) {
    if (!cp.candidates) {
      // A batch costs the host 0.55 - 0.93 us per copy (H200, driver 580), so it keeps the copy engines busy
      // only where a piece takes longer than that on the link: 256 KiB and up, on average.
      // (bench/micro/ce_scatter.cu, GPU0 -> GPU1: 256 x 2 MiB in calls of 2, 8, 32 and the rest 99.5% of one
      // contiguous copy; 4096 x 64 KiB 118 GB/s, bound by the host.) Device memory on both sides only: that
      // is what was measured, and host pointers have their own rules in a batch.
      constexpr uint64_t kBatchMinAverageBytes = 256 << 10;
      unsigned c = 0;
      // The kernel only between device memory: a kernel on the plan's device faulted
      // (CUDA_ERROR_ILLEGAL_ADDRESS, which ends the context) on pinned host memory registered by an agent on
      // GPU 1 (test/gpu/02, 2026-11-23), and a peer's host memory is only mapped, never registered. The copy
      // engines move host memory.
      if (kernels && kernels->copyChunks && plan->deviceToDevice) c |= 1u << kKernel;
      if (plan->pieces.size() <= kCopyEngineMaxPieces) c |= 1u << kCopyEngine;
      const bool batchable =
          cuda_->cuMemcpyBatchAsync && copyBatchOn_ && plan->deviceToDevice && !plan->pieces.empty();
      if (batchable && plan->pieces.size() >= 2 && plan->bytes / plan->pieces.size() >= kBatchMinAverageBytes) {
        c |= 1u << kBatch;
      }
      // TANDEM_CUDA_COPY names one strategy: used wherever it can run (tests, and A/B measurements).
      if (forcedCopy_ == kBatch && batchable) c = 1u << kBatch;
      if (forcedCopy_ >= 0 && (c & (1u << forcedCopy_))) c = 1u << forcedCopy_;
      cp.candidates = c ? c : 1u << kCopyEngine;
    }
    const unsigned c = cp.candidates;
    if ((c & (c - 1)) == 0) {
      use = cp.strategy = __builtin_ctz(c);
    } else {
      // Take turns, timed, until each candidate has run kTrials times; later posts use the fastest.
      for (int k = 0; k < kStrategies; ++k) {
        if (!(c & (1u << k))) continue;
        if (use == kUndecided || cp.trialsIssued[k] < cp.trialsIssued[use]) use = k;
      }
      ++cp.trialsIssued[use];
      timed = true;
    }
  }
  agent_.cuda().setDevice(plan->localDevice);
  // Where piece p's bytes go from and to, in this process's address space.
  // Each remote region is resolved (opened or mapped) once per post, when a piece first names it.
  std::vector<CUdeviceptr> remoteBase(plan->remotes.size(), 0);
  auto endpoints = [&](const Piece& p) {
    CUdeviceptr& base = remoteBase[p.remoteRegion];
    if (!base) {
      RemoteRegion& rr = *plan->remotes[p.remoteRegion];
      base = rr.d.kind == MemKind::Device ? openRemote(peer, rr, plan->localDevice)
                                          : reinterpret_cast<CUdeviceptr>(agent_.mapRemote(peer, rr));
    }
    CUdeviceptr remote = base + p.remoteOff;
    CUdeviceptr local = p.local;
    return plan->op == Op::Write ? std::pair{local, remote} : std::pair{remote, local};  // (src, dst)
  };
  // The kernel's chunk table is built and uploaded once per plan, before any timing starts.
  std::map<uint64_t, ChunkTable>::iterator table = chunkTables_.end();
  if (use == kKernel) {
    table = chunkTables_.find(plan->id);
    if (table == chunkTables_.end()) {
      sweepChunkTables(false);
      std::vector<unsigned long long> entries;  // (src, dst, bytes) triples
      for (const auto& p : plan->pieces) {
        auto [src, dst] = endpoints(p);
        for (uint64_t off = 0; off < p.length; off += kChunkBytes) {
          entries.push_back(src + off);
          entries.push_back(dst + off);
          entries.push_back(std::min(kChunkBytes, p.length - off));
        }
      }
      ChunkTable t;
      t.plan = plan;
      t.device = plan->localDevice;
      t.count = static_cast<unsigned>(entries.size() / 3);
      agent_.cuda().setDevice(plan->localDevice);
      agent_.cuda().check(cuda_->cuMemAlloc(&t.table, entries.size() * sizeof(unsigned long long)), "cuMemAlloc (chunk table)");
      CUresult up = cuda_->cuMemcpyHtoDAsync(t.table, entries.data(), entries.size() * sizeof(unsigned long long), cs.stream);
      if (up == CUDA_SUCCESS) up = cuda_->cuStreamSynchronize(cs.stream);
      if (up != CUDA_SUCCESS) {
        cuda_->cuMemFree(t.table);
        agent_.cuda().check(up, "upload of the chunk table");
      }
      table = chunkTables_.emplace(plan->id, t).first;
    }
  }
  // Once the strategy is settled, what this post issued is kept for the caller's thread to issue again
  // (postOnCaller). Only this thread writes `direct` and the epoch; the caller reads them under the peer's
  // mutex.
  const bool resolveDirect = !timed && (!cp.direct || cp.direct->epoch != cs.epoch);
  auto publishDirect = [&](std::unique_ptr<CudaIpcPlan::Direct> direct) {
    direct->context = agent_.cuda().context(plan->localDevice);
    direct->stream = cs.stream;
    std::lock_guard<std::mutex> lock(peer.mutex);
    direct->epoch = cs.epoch;
    cp.direct = std::move(direct);
  };
  CUevent startEvent = nullptr;
  if (timed) {
    agent_.cuda().check(cuda_->cuEventCreate(&startEvent, 0), "cuEventCreate");
    agent_.cuda().check(cuda_->cuEventRecord(startEvent, cs.stream), "cuEventRecord");
  }
  if (use == kKernel) {
    // Four blocks per SM, except within one GPU for plenty of chunks of 32 KiB and more: one
    // (bench/micro/peer_copy_mix.cu, 16384 x 64 KiB: 92.8% of a device-to-device copy against 91.0%;
    // bench:transfer: 4096 x 64 KiB 1870 -> 1943 GB/s). Smaller or fewer chunks need the four (16 KiB
    // pieces fell from 1832 to 1393 GB/s with one).
    const unsigned sms = static_cast<unsigned>(std::max(1, kernels->multiprocessors));
    const unsigned count = table->second.count;
    const int perSm = plan->sameDevice && count >= 8 * sms && plan->bytes / count >= (32u << 10) ? 1 : 4;
    unsigned blocks = std::min<unsigned>(count, sms * perSm);
    void* args[] = {&table->second.table, &table->second.count};
    agent_.cuda().check(cuda_->cuLaunchKernel(kernels->copyChunks, blocks, 1, 1, 512, 1, 1, 0, cs.stream, args, nullptr),
              "launch of tandem_copy_chunks");
    if (resolveDirect) {  // one launch, however many pieces
      auto direct = std::make_unique<CudaIpcPlan::Direct>();
      direct->kernel = kernels->copyChunks;
      direct->blocks = blocks;
      direct->table = table->second.table;
      direct->count = table->second.count;
      publishDirect(std::move(direct));
    }
  } else if (use == kBatch) {
    // Calls of 2, 8, 32, 128... copies: the copy engines start once the first two are submitted, and each
    // call keeps them busy while the host submits the next (0.55 - 0.93 us of host time per copy; a 2 MiB
    // piece takes 5.3 us on NVLink). Each call also costs the GPU 3-4 us (bench/micro/ce_scatter.cu: 128 x
    // 2 MiB in calls of 4, 8, 16 copies: 88.5, 93.0, 95.7% of one contiguous copy; 256 x 2 MiB in calls
    // growing by four: 99.5%), hence few, growing calls.
    if (!cp.batch || cp.batch->epoch != cs.epoch) {
      auto b = std::make_unique<CudaIpcPlan::Batch>();
      b->epoch = cs.epoch;
      for (const auto& p : plan->pieces) {
        auto [src, dst] = endpoints(p);
        b->srcs.push_back(src);
        b->dsts.push_back(dst);
        b->sizes.push_back(p.length);
      }
      cp.batch = std::move(b);
    }
    CudaIpcPlan::Batch& b = *cp.batch;
    CUmemcpyAttributes attr{};
    attr.srcAccessOrder = CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
    size_t attrIndex = 0;
    size_t step = 2;
    for (size_t i = 0; i < b.sizes.size(); i += step, step *= 4) {
      // The last call takes what would leave too few for another.
      if (b.sizes.size() - i <= step * 4) step = b.sizes.size() - i;
      size_t failed = SIZE_MAX;
      CUresult r = cuda_->cuMemcpyBatchAsync(&b.dsts[i], &b.srcs[i], &b.sizes[i], step, &attr, &attrIndex, 1, &failed,
                                             cs.stream);
      if (r != CUDA_SUCCESS) {
        // Copies already submitted still run; the caller's stream bookkeeping below is skipped (throw),
        // so wait for them before the failure is reported.
        cuda_->cuStreamSynchronize(cs.stream);
        const std::string what = "cuMemcpyBatchAsync (copy " + std::to_string(i + (failed == SIZE_MAX ? 0 : failed)) + ")";
        agent_.cuda().check(r, what.c_str());
      }
    }
  } else {
    const bool resolve = resolveDirect && plan->pieces.size() <= kDirectMaxPieces;  // few pieces only
    std::vector<CudaIpcPlan::Direct::Copy> copies;
    for (const auto& p : plan->pieces) {
      auto [src, dst] = endpoints(p);
      agent_.cuda().check(cuda_->cuMemcpyAsync(dst, src, p.length, cs.stream), "cuMemcpyAsync");
      if (resolve) copies.push_back({dst, src, p.length});
    }
    if (resolve) {
      auto direct = std::make_unique<CudaIpcPlan::Direct>();
      direct->copies = std::move(copies);
      publishDirect(std::move(direct));
    }
  }
  // Completion: an event the progress thread polls between jobs (a host callback costs tens of
  // microseconds more before anyone hears of it).
  CUevent event = nullptr;
  if (timed) {
    agent_.cuda().check(cuda_->cuEventCreate(&event, 0), "cuEventCreate");
  } else {
    event = agent_.cuda().takeEvent(plan->localDevice);
    if (!event) agent_.cuda().check(cuda_->cuEventCreate(&event, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
  }
  // The notification: numbered now, and committed by the stream after the copies when it is in the ring.
  // (The ring is registered at the peer's first post, with a notification or not, so that posts issued
  // by the caller's thread find it.)
  const CUdeviceptr ringDevice = peer.numbered ? ringOnDevice(peer) : 0;
  Notice notice = reserveNotice(peer, std::move(notif));
  if (ringDevice && !streamCommit(peer, notice, cs.stream, ringDevice)) {
    std::lock_guard<std::mutex> lock(peer.mutex);
    cs.ringOnDevice = 0;  // the host commits this peer's notifications from now on
  }
  CUresult rec = cuda_->cuEventRecord(event, cs.stream);
  if (rec != CUDA_SUCCESS) {
    cuda_->cuEventDestroy(event);
    std::string ignored;
    settleNotice(plan->peer, notice, false, ignored);
    agent_.cuda().check(rec, "cuEventRecord");
  }
  agent_.cuda().watch(CudaState::Inflight{event, plan->localDevice, startEvent, done(plan, token, use, std::move(notice))});
}

std::function<void(CUresult, float)> CudaIpcBackend::done(const std::shared_ptr<Plan>& plan, uint64_t token, int use,
                                                          Notice notice) {
  return [this, token, plan, use, notice = std::move(notice)](CUresult result, float ms) mutable {
    CudaIpcPlan& cp = plan->stateAs<CudaIpcPlan>();
    if (ms >= 0 && cp.strategy == kUndecided) {
      if (cp.trialMs[use] < 0 || ms < cp.trialMs[use]) cp.trialMs[use] = ms;
      ++cp.trialsDone[use];
      bool done = true;
      int best = -1;
      for (int k = 0; k < kStrategies; ++k) {
        if (!(cp.candidates & (1u << k))) continue;
        if (cp.trialsDone[k] < kTrials) done = false;
        if (best < 0 || cp.trialMs[k] < cp.trialMs[best]) best = k;
      }
      if (done) cp.strategy = best;
    }
    const auto& peer = plan->peer;
    std::string err;
    if (result != CUDA_SUCCESS) {
      settleNotice(peer, notice, false, err);
      return agent_.fail(token, "TANDEM_CUDA_ERROR", "cuda-ipc copy failed: " + cuda_->describe(result));
    }
    {
      std::unique_lock<std::mutex> lock(peer->mutex);
      if (peer->dead) {
        std::string reason = peer->deadReason;
        lock.unlock();
        settleNotice(peer, notice, false, err);
        return agent_.fail(token, "TANDEM_REMOTE_DISCONNECTED", reason);
      }
    }
    if (!settleNotice(peer, notice, true, err)) return agent_.fail(token, "TANDEM_REMOTE_DISCONNECTED", err);
    agent_.succeed(token);
  };
}

CudaIpcBackend::Notice CudaIpcBackend::reserveNotice(Peer& peer, std::vector<unsigned char> notif) {
  Notice notice;
  notice.bytes = std::move(notif);
  if (notice.bytes.empty() || !peer.numbered) return notice;
  std::lock_guard<std::mutex> lock(peer.ringMutex);
  notice.seq = peer.nextNotifySeq++;
  if (peer.ring && !peer.ring->tryWrite(notice.seq, notice.bytes.data(), notice.bytes.size(), &notice.commitWord)) {
    notice.commitWord = nullptr;  // the ring is full (or the message too big): the socket, when the copy is done
  }
  return notice;
}

bool CudaIpcBackend::streamCommit(Peer& peer, Notice& notice, CUstream stream, CUdeviceptr ringDevice) {
  if (!notice.commitWord) return true;
  const auto at = reinterpret_cast<unsigned char*>(notice.commitWord) - static_cast<unsigned char*>(peer.ring->mapping());
  // The default flags put a fence before the write: the copies' stores are visible before the commit.
  CUresult r = cuda_->cuStreamWriteValue32(stream, ringDevice + static_cast<CUdeviceptr>(at), NotifyRing::kCommitted,
                                           CU_STREAM_WRITE_VALUE_DEFAULT);
  if (r != CUDA_SUCCESS) return false;  // still pending: the host commits it when the copy is done
  notice.streamCommits = true;
  agent_.streamCommitCount().fetch_add(1, std::memory_order_relaxed);
  return true;
}

CUdeviceptr CudaIpcBackend::ringOnDevice(Peer& peer) {
  CudaIpcPeer& cs = peer.state<CudaIpcPeer>(Backend::CudaIpc);
  if (!cs.ringRegisterTried && peer.ring && streamCommitOn_) {
    cs.ringRegisterTried = true;  // once: a failure leaves the host committing the notifications
    void* mapping = peer.ring->mapping();
    if (cuda_->cuMemHostRegister(mapping, peer.ring->mappedBytes(),
                                 CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP) == CUDA_SUCCESS) {
      CUdeviceptr address = 0;
      CUresult r = cuda_->cuMemHostGetDevicePointer(&address, mapping, 0);
      std::lock_guard<std::mutex> lock(peer.mutex);
      cs.ringRegisteredOn = agent_.cuda().currentDevice();  // unregistered in releasePeer
      cs.ringOnDevice = r == CUDA_SUCCESS ? address : 0;
    }
  }
  // The address is the mapping's in the context it was registered in (the same everywhere with unified
  // addressing, but only that one is relied on).
  std::lock_guard<std::mutex> lock(peer.mutex);
  return cs.ringRegisteredOn == agent_.cuda().currentDevice() ? cs.ringOnDevice : 0;
}

bool CudaIpcBackend::settleNotice(const std::shared_ptr<Peer>& peer, Notice& notice, bool ok, std::string& error) {
  if (notice.bytes.empty()) return true;
  if (notice.seq == 0) return !ok || agent_.sendNotify(peer, notice.bytes, error);  // the peer does not number them
  if (notice.commitWord) {
    if (notice.streamCommits) {
      if (ok) return true;  // the stream committed it
      // The stream may still write that commit word, so it cannot be reused: the ring's order is lost.
      // Ending the connection lets the target give up the record (and see later notifications on a new one).
      agent_.markDead(peer, "a cuda-ipc copy to peer '" + peer->d.name + "' failed after its notification was queued; " +
                         "load its metadata again to reconnect");
      error = peer->deadReason;
      return false;
    }
    std::lock_guard<std::mutex> lock(peer->ringMutex);
    NotifyRing::commit(notice.commitWord, notice.seq, ok);
    return true;
  }
  // Over the socket, under the number it was given: the notification, or that number given up.
  auto conn = agent_.waitConnected(peer, error);
  bool sent = conn && sendMessage(*conn, Msg::Notify, ok ? 0 : kNotifySkip, notice.seq, notice.bytes.data(),
                                  ok ? notice.bytes.size() : 0, error);
  if (!sent && conn) error = "peer '" + peer->d.name + "': " + error;
  return sent;
}

bool CudaIpcBackend::postOnCaller(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif,
                                  bool alone, bool& settled) {
  Peer& peer = *plan->peer;
  CudaIpcPeer& cs = peer.state<CudaIpcPeer>(Backend::CudaIpc);
  CudaIpcPlan& cp = plan->stateAs<CudaIpcPlan>();
  // Only when the progress thread is idle: in a burst of posts it issues them faster than this thread would
  // (each direct post also hands it the completion), while this thread goes on posting. A plan has
  // `direct` only once its strategy is settled on the copy engines (see post()).
  if (!directPostsOn_ || agent_.closing() || cs.queuedIssues.load(std::memory_order_acquire) != 0 || !agent_.progress().idle()) {
    return false;
  }
  for (uint32_t id : plan->localRegionIds) {
    if (!agent_.region(id)) return false;  // the queued path reports it
  }
  std::unique_lock<std::mutex> lock(peer.mutex);  // releasePeer cannot take the stream meanwhile
  const CudaIpcPlan::Direct* direct = cp.direct.get();
  if (peer.dead || !direct || direct->epoch != cs.epoch) return false;
  CUevent event = agent_.cuda().takeEvent(plan->localDevice);
  CUresult r = cuda_->cuCtxPushCurrent(direct->context);
  if (r != CUDA_SUCCESS) {
    lock.unlock();
    agent_.cuda().giveEvent(plan->localDevice, event);
    return false;
  }
  if (!event) r = cuda_->cuEventCreate(&event, CU_EVENT_DISABLE_TIMING);
  if (direct->kernel) {
    CUdeviceptr table = direct->table;
    unsigned count = direct->count;
    void* args[] = {&table, &count};
    if (r == CUDA_SUCCESS) {
      r = cuda_->cuLaunchKernel(direct->kernel, direct->blocks, 1, 1, 512, 1, 1, 0, direct->stream, args, nullptr);
    }
  }
  for (const auto& c : direct->copies) {
    if (r == CUDA_SUCCESS) r = cuda_->cuMemcpyAsync(c.dst, c.src, c.bytes, direct->stream);
  }
  Notice notice;
  if (r == CUDA_SUCCESS) {
    // The ring's address is known once a post of this peer has gone through the progress thread.
    const CUdeviceptr ringDevice = cs.ringRegisteredOn == plan->localDevice ? cs.ringOnDevice : 0;
    notice = reserveNotice(peer, std::move(notif));
    if (ringDevice && !streamCommit(peer, notice, direct->stream, ringDevice)) cs.ringOnDevice = 0;
    r = cuda_->cuEventRecord(event, direct->stream);
  }
  CUcontext popped = nullptr;
  cuda_->cuCtxPopCurrent(&popped);
  lock.unlock();
  if (r != CUDA_SUCCESS) {
    agent_.cuda().giveEvent(plan->localDevice, event);
    std::string ignored;
    settleNotice(plan->peer, notice, false, ignored);
    agent_.fail(token, "TANDEM_CUDA_ERROR", "cuda-ipc copy failed: " + cuda_->describe(r));
    return true;
  }
  agent_.directPostCount().fetch_add(1, std::memory_order_relaxed);
  // The progress thread watches the event from here on (waking it overlaps the copy).
  const int use = direct->kernel ? kKernel : kCopyEngine;
  CudaState::Inflight inflight{event, plan->localDevice, nullptr, done(plan, token, use, std::move(notice))};
  if (!agent_.progress().post([this, inflight = std::move(inflight)]() mutable { agent_.cuda().watch(std::move(inflight)); })) {
    agent_.fail(token, "TANDEM_DISPOSED", "the transfer agent was disposed (the copy was issued)");
  }
  return true;
}

void CudaIpcBackend::warmup(const std::shared_ptr<Peer>& peer, uint64_t token) {
  bool queued = agent_.progress().post([this, peer, token] {
    if (agent_.closing()) return agent_.fail(token, "TANDEM_DISPOSED", "the transfer agent was disposed");
    const int device = agent_.firstDeviceRegion();
    std::vector<std::shared_ptr<RemoteRegion>> regions;
    {
      std::lock_guard<std::mutex> lock(peer->mutex);
      regions = peer->regions;
    }
    bool remoteDevice = false;
    for (const auto& r : regions) remoteDevice = remoteDevice || r->d.kind == MemKind::Device;
    if (!agent_.cuda().available() || !peer->sameHost || device < 0 || !remoteDevice) {
      return agent_.completed(token, true, "", "0");
    }
    try {
      std::string error;
      if (!agent_.waitConnected(peer, error)) return agent_.fail(token, agent_.unreachableCode(*peer), error);
      agent_.cuda().setDevice(device);
      size_t opened = 0;
      for (const auto& r : regions) {
        if (r->d.kind != MemKind::Device) continue;
        openRemote(*peer, *r, device);
        ++opened;
      }
      agent_.cuda().kernelsFor(device);
      if (peer->numbered) ringOnDevice(*peer);
      CudaIpcPeer& cs = peer->state<CudaIpcPeer>(Backend::CudaIpc);
      if (!cs.stream) {
        agent_.cuda().check(cuda_->cuStreamCreate(&cs.stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
        cs.streamDevice = device;
      }
      agent_.completed(token, true, "", std::to_string(opened));
    } catch (const AgentError& e) {
      agent_.fail(token, e.code, e.message);
    }
  });
  if (!queued) agent_.fail(token, "TANDEM_DISPOSED", "the transfer agent was disposed");
}

}  // namespace tandem::transfer
