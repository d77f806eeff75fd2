// The transfer agent core (no N-API here): registered regions, peers loaded from metadata, prepared
// transfer plans, the connections between agents and the threads that move bytes.
//
// Threads the agent owns (all joined by close()):
//   progress  - runs posted transfers (shm copies, tcp sends, CUDA copy submission) and notifications
//   accept    - accepts inbound connections on the agent's unix and tcp sockets
//   readers   - one per connection: inbound ones serve WRITE/READ requests and deliver notifications,
//               outbound ones complete pending transfers from the target's answers
// Results reach JavaScript through the callbacks in AgentCallbacks, called from any of these threads.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <cstdint>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "../cuda_driver.h"
#include "../work_queue.h"
#include "../nccl/communicator.h"
#include "metadata.h"
#include "notify_ring.h"
#include "ucx_backend.h"
#include "wire.h"

namespace tandem::transfer {

enum class Op : uint8_t { Read = 0, Write = 1 };
enum class Backend : uint8_t { Shm = 0, Tcp = 1, CudaIpc = 2, Nccl = 3, Ucx = 4 };
const char* backendName(Backend b);
bool parseBackend(const std::string& name, Backend& out);

struct AgentError {
  std::string code;
  std::string message;
};

// A host mapping that may outlive its registration while JS still holds ArrayBuffers over it.
struct HostMapping {
  void* base = nullptr;
  size_t size = 0;
  int memfd = -1;
  bool cudaRegistered = false;
  ~HostMapping();
};

struct Region {
  uint32_t id = 0;
  MemKind kind = MemKind::Host;
  int device = -1;
  uint64_t size = 0;
  unsigned char* host = nullptr;  // host-visible kinds
  CUdeviceptr dev = 0;            // device kind
  bool ownsDevice = false;        // allocated by the agent: freed on deregister
  std::shared_ptr<HostMapping> mapping;  // shared/pinned
  RegionDescriptor desc;                 // what metadata() publishes (IPC handle, memfd, ...)
  std::function<void()> onRelease;       // plain host memory: lets go of the JS buffer that owns it
  ~Region() {
    if (onRelease) onRelease();
  }
};

struct Connection;
struct NcclStaging;     // nccl_backend.cpp
struct NcclStagedPlan;  // nccl_backend.cpp

struct RemoteRegion {
  RegionDescriptor d;
  // Resolved lazily on the progress thread, then cached for the peer's lifetime.
  unsigned char* mapped = nullptr;  // shm: our mapping of the peer's shared region
  size_t mappedSize = 0;
  CUdeviceptr opened = 0;  // cuda-ipc: the peer's device memory opened in our process
  int openedOn = -1;       // device whose context opened it
};

struct Peer {
  AgentDescriptor d;
  bool sameHost = false;
  std::vector<RemoteRegion> regions;  // index = position in metadata
  std::unordered_map<uint32_t, size_t> regionIndex;
  std::shared_ptr<Connection> conn;  // outbound connection
  std::mutex mutex;                   // guards conn state, dead, reason
  bool dead = false;
  bool removed = false;
  std::string deadReason;
  std::condition_variable connected;
  bool connecting = true;
  CUstream stream = nullptr;  // cuda-ipc: per-peer stream (set on the progress thread, under `mutex`)
  int streamDevice = -1;
  // cuda-ipc: changes (under `mutex`) whenever the stream or the opened regions go, so that a plan's
  // resolved copies (Plan::direct) stop being used on the caller's thread.
  uint64_t cudaEpoch = 0;
  // cuda-ipc posts queued for the progress thread and not yet issued to the stream: while there are any,
  // posts cannot be issued on the caller's thread without overtaking them.
  std::atomic<int> queuedIssues{0};
  // The peer polls its notifications (notify_ring.h): its ring for ours, mapped at the handshake (before
  // `connecting` clears; unchanged after), and the sequence numbers of what we send it. ringMutex keeps
  // the numbers in the order they are written (ring or socket).
  std::unique_ptr<NotifyRing> ring;
  bool numbered = false;  // the peer offered a ring: number every notification, even if it could not be mapped
  std::mutex ringMutex;
  uint64_t nextNotifySeq = 1;
  // cuda-ipc: the ring registered with CUDA (progress thread, once), so that the stream itself commits a
  // WRITE's notification after the copy. ringOnDevice is its mapping's device address (0: not usable);
  // set under `mutex`, read there by the caller's thread.
  bool ringRegisterTried = false;
  int ringRegisteredOn = -1;
  CUdeviceptr ringOnDevice = 0;
  // nccl: one two-rank communicator per (local GPU, remote GPU) for transfers this agent initiates
  // (rank 0 here, rank 1 at the peer). Guarded by `mutex`; made on the progress thread.
  struct NcclLink {
    uint32_t index = 0;  // names the link on the wire; never reused for this peer
    std::shared_ptr<nccl::Communicator> comm;
    std::shared_ptr<NcclStaging> staging;  // for plans of many pieces
  };
  std::map<std::pair<int, int>, NcclLink> ncclLinks;
  uint32_t nextNcclLink = 1;
};

struct Piece {
  uint64_t local;       // absolute local address (host pointer or device pointer)
  uint64_t remoteOff;   // offset within the remote region
  uint64_t length;
  uint32_t remoteRegion;  // index into Peer::regions
  uint32_t localRegion;   // region id (for validation at post time)
};

struct Plan {
  uint64_t id = 0;
  Op op = Op::Write;
  Backend backend = Backend::Shm;
  std::shared_ptr<Peer> peer;
  std::vector<Piece> pieces;
  std::vector<uint32_t> localRegionIds;
  int localDevice = -1;  // cuda-ipc: the device whose memory is local
  uint64_t bytes = 0;
  uint64_t piecesBeforeCoalescing = 0;
  // cuda-ipc: how the copies are issued. The first posts try each applicable strategy, timed with CUDA
  // events; later posts use the fastest (written by the progress thread; read by JS as copyStrategy).
  //   kernel: the chunk-copy kernel over a table uploaded once per plan (SMs);
  //   copy engine: one cuMemcpyAsync per piece;
  //   batch: cuMemcpyBatchAsync in growing sub-batches (copy engines, no per-copy stream bookkeeping).
  enum Strategy : int { kUndecided = -1, kKernel = 0, kCopyEngine = 1, kBatch = 2 };
  static constexpr int kStrategies = 3;
  std::atomic<int> strategy{kUndecided};
  unsigned candidates = 0;  // bit per strategy, fixed at the first post
  static constexpr int kTrials = 2;  // per strategy; the first touch of a peer mapping inflates one
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
  int remoteDevice = -1;       // the peer's GPU (its ordinal in the peer's process), where remote memory is device
  bool deviceToDevice = false;  // device memory on both sides
  bool sameDevice = false;     // cuda-ipc: device memory on both sides, on the same GPU ordinal
  uint32_t ncclPlanSentOn = 0;  // nccl: the link whose target has this plan's pieces (0: none yet)
  std::shared_ptr<NcclStagedPlan> ncclStaged;  // nccl: set when the plan goes through staging buffers
  bool ncclDecided = false;
  // cuda-ipc plans whose strategy is settled on the copy engines (few pieces) or on the kernel: the copies
  // or the launch as the progress thread last issued them, for the caller's thread to issue again itself
  // (Agent::tryDirectCuda). Guarded by the peer's mutex.
  struct Direct {
    uint64_t epoch = 0;  // Peer::cudaEpoch when resolved
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
};

struct AgentCallbacks {
  // A post finished: ok, or failed with code/message. Called from agent threads.
  std::function<void(uint64_t token, bool ok, std::string code, std::string message)> completed;
  // A notification arrived from `from`. Called from a reader thread, after the data it follows is visible.
  std::function<void(std::string from, std::vector<unsigned char> message)> notified;
};

struct AgentOptions {
  std::string name;
  std::string tcpHost = "127.0.0.1";
  uint16_t tcpPort = 0;
  uint32_t timeoutMs = 30000;  // bound on waiting for a peer's answer
  std::vector<unsigned char> kernels;  // the kernel fatbin (copy engine for many-piece cuda-ipc transfers)
  std::vector<std::string> ucp;        // where to look for libucp (empty: no UCX backend)
  std::vector<std::string> nccl;       // where to look for libnccl (empty: no nccl backend)
  // Notifications wait for takeNotifications() instead of going to AgentCallbacks::notified, and
  // same-host initiators write them into shared memory (notify_ring.h).
  bool pollNotifications = false;
};

class Agent {
 public:
  Agent(AgentOptions options, AgentCallbacks callbacks, const CudaDriver* cuda);
  ~Agent();
  void close();  // rejects pending work, closes sockets, joins threads; idempotent

  const std::string& name() const { return options_.name; }
  uint64_t incarnation() const { return incarnation_; }
  uint16_t tcpPort() const { return tcpPort_; }
  const std::string& ucxReason() const { return ucxReason_; }
  const std::string& ncclReason() const { return ncclReason_; }
  uint32_t backends() const;

  // Registration (JS thread). Throw AgentError.
  std::shared_ptr<Region> registerHost(unsigned char* data, uint64_t size);
  std::shared_ptr<Region> allocShared(uint64_t size, bool pinned);
  std::shared_ptr<Region> registerDevice(int device, CUdeviceptr ptr, uint64_t size, bool owns);
  std::shared_ptr<Region> allocDevice(int device, uint64_t size);
  void deregister(uint32_t id);
  std::shared_ptr<Region> region(uint32_t id);

  std::vector<unsigned char> metadata();
  // Returns the peer name. Replaces a peer of the same name with another incarnation.
  std::shared_ptr<Peer> loadRemote(const unsigned char* data, size_t size);
  bool removeRemote(const std::string& name);
  std::shared_ptr<Peer> peer(const std::string& name);

  // Validates every piece and builds the plan; throws AgentError before anything moves.
  std::shared_ptr<Plan> prepare(Op op, const std::string& peerName, const std::vector<uint32_t>& localRegions,
                                const std::vector<uint32_t>& remoteRegions, const double* localOffsets,
                                const double* remoteOffsets, const double* lengths, double uniformLength,
                                const uint32_t* localIdx, const uint32_t* remoteIdx, size_t count,
                                const std::string& backend);

  // Queues the plan; `token` identifies the completion. Notification bytes go after the data. With `alone`
  // (the caller has nothing else in flight with this agent, so settling this one at once reorders nothing
  // it could see), returns true when the transfer was done on the calling thread instead (a small shm
  // post, see tryInlineShm): it succeeded, and no completion callback follows.
  bool post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char> notif, bool alone = false);
  // Posts the caller's thread issued to the GPU itself (cuda-ipc; see tryDirectCuda). For tests and stats.
  uint64_t directPosts() const { return directPosts_.load(std::memory_order_relaxed); }
  // cuda-ipc notifications committed by the stream after the copy (no host thread in between).
  uint64_t streamCommits() const { return streamCommits_.load(std::memory_order_relaxed); }
  void cancel(uint64_t token);
  // With `alone` (as for post), returns true when the notification was written into the peer's ring on
  // the calling thread: it succeeded, and no completion callback follows.
  bool notify(const std::string& peerName, uint64_t token, std::vector<unsigned char> message, bool alone = false);
  bool pollsNotifications() const { return options_.pollNotifications; }
  // pollNotifications only (JS thread): up to `max` notifications that have arrived, as (from, bytes), in
  // each sender's order.
  std::vector<std::pair<std::string, std::vector<unsigned char>>> takeNotifications(size_t max);
  // Does now what the first cuda-ipc transfer with this peer would otherwise pay for: connects, opens
  // the peer's device regions (CUDA IPC), loads the copy kernel and makes the peer's stream, on the
  // device of this agent's first device region. Nothing to do (no CUDA, another host, no device
  // regions on either side) succeeds at once. Succeeds with the number of the peer's device regions
  // open (as the completion's message).
  void warmup(const std::string& peerName, uint64_t token);

 private:
  friend struct Connection;
  void startListening();
  void acceptLoop();
  void serveInbound(std::shared_ptr<Connection> conn);
  // Connects to the peer, then completes transfers from its answers until the connection ends.
  void readOutbound(std::shared_ptr<Peer> peer);
  std::shared_ptr<Connection> waitConnected(const std::shared_ptr<Peer>& peer, std::string& error);
  void markDead(const std::shared_ptr<Peer>& peer, const std::string& reason);
  void fail(uint64_t token, const std::string& code, const std::string& message);
  void succeed(uint64_t token);

  void runShm(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif);
  void runTcp(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif);
  void runCudaIpc(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif);
  void runUcx(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif);
  // nccl (nccl_backend.cpp). The initiator sends the target its half (NcclInit once per link, NcclPlan
  // once per plan, NcclPost per post) over the peer connection, then queues its own half; a post
  // completes when both halves have completed on their GPUs.
  void runNccl(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif);
  void answerNccl(uint64_t token);  // one half of an nccl post finished
  void settleNccl(uint64_t token, const nccl::Failure* failure);
  static void closeNcclLinks(Peer& peer);
  static void abortNcclLink(Peer& peer, const std::shared_ptr<Plan>& plan, const std::string& reason);
  // The target's side, per inbound connection (its reader thread only, but for `shared`).
  struct InboundNccl {
    struct Plan {
      std::vector<std::pair<uint64_t, uint64_t>> pieces;  // (device address, length) here
      std::vector<uint32_t> regions;                      // checked again at every post
      std::shared_ptr<NcclStagedPlan> staged;             // set when the initiator stages this plan
    };
    struct Link {
      int device = -1;
      std::shared_ptr<nccl::Communicator> comm;
      std::shared_ptr<NcclStaging> staging;
      std::map<uint64_t, Plan> plans;  // by the initiator's plan id; or why the plan is refused:
      std::map<uint64_t, std::string> refused;
    };
    std::map<uint32_t, Link> links;
    struct Shared {  // reached from the communicators' threads
      std::mutex mutex;
      std::map<uint64_t, std::vector<unsigned char>> notifications;  // token -> bytes to deliver after the data
    };
    std::shared_ptr<Shared> shared = std::make_shared<Shared>();
  };
  bool serveNccl(Connection& conn, std::shared_ptr<Connection> connPtr, const Header& h, InboundNccl& state,
                 std::string& error);
  void closeInboundNccl(InboundNccl& state);
  static std::string ucxPeerKey(const Peer& peer);
  bool sendNotify(const std::shared_ptr<Peer>& peer, const std::vector<unsigned char>& message, std::string& error);
  // Sends a notification on `conn` (the peer's ring when it has one, see notify_ring.h).
  bool notifyOn(Peer& peer, Connection& conn, const std::vector<unsigned char>& message, std::string& error);
  // A notification arrived on an inbound connection (`seq`: its order against the ring, 0: none).
  void delivered(Connection& conn, uint64_t seq, std::vector<unsigned char> message);
  // Writes `message` into the peer's ring under the next number, if it has one and the message fits.
  bool tryRing(Peer& peer, const std::vector<unsigned char>& message);
  // The number of a notification carried inside a WRITE (tcp, nccl), sent in front of it; 0: the peer
  // does not number them (or there is no notification).
  uint64_t carriedNumber(Peer& peer, const std::vector<unsigned char>& notif);
  // The target's side of those: delivered (ok) or, for a WRITE that failed, its number skipped.
  void deliveredCarried(Connection& conn, std::vector<unsigned char> notif, bool ok);
  unsigned char* mapRemote(Peer& peer, RemoteRegion& r);
  CUdeviceptr openRemote(Peer& peer, RemoteRegion& r, int device);
  void setDevice(int device);
  void releaseCuda();
  // Progress thread: lets go of what this process holds of a dead peer's memory (CUDA IPC handles,
  // shm mappings, its stream), once the work already issued to it has finished.
  void releasePeer(Peer& peer);
  void releaseRetired();
  // JS thread: runs an shm post at once when it safely can (see kInlineShmMinBytes); false: queue it.
  bool tryInlineShm(const Plan& plan);
  // JS thread: issues a cuda-ipc post of few pieces on the peer's stream at once, when the plan's copies
  // are resolved and nothing for this peer waits on the progress thread; the progress thread only
  // watches for its completion. False: queue it.
  bool tryDirectCuda(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif);
  // A cuda-ipc post's notification to a peer that numbers them: numbered when the post is issued, so that
  // it keeps its place among the peer's notifications, and, when it fits, written into the ring at once
  // as a pending record that the stream commits after the copy.
  struct CudaNotice {
    std::vector<unsigned char> bytes;  // empty: no notification
    uint64_t seq = 0;                  // 0: not numbered, sent when the copy has finished (peer does not poll)
    uint32_t* commitWord = nullptr;    // its pending ring record (null: goes over the socket when done)
    bool streamCommits = false;        // the stream writes the commit word after the copy
  };
  // Issue time (caller's or progress thread): numbers the notification and, when it fits, puts it in the
  // ring as a pending record.
  CudaNotice reserveNotice(Peer& peer, std::vector<unsigned char> notif);
  // After the copies are issued on `stream`: asks the stream to commit the notice's ring record (a no-op
  // without one). False: the stream could not take the write; the host commits it when the copy is done.
  bool streamCommit(Peer& peer, CudaNotice& notice, CUstream stream, CUdeviceptr ringDevice);
  // Progress thread: the ring's device address in the current context, registering the ring the first time
  // (0: the peer has no ring, or it cannot be registered or written by a stream).
  CUdeviceptr ringOnDevice(Peer& peer);
  // When the copies have finished (ok) or failed: the notice delivered, or its number given up.
  bool settleNotice(const std::shared_ptr<Peer>& peer, CudaNotice& notice, bool ok, std::string& error);
  // What runs when a cuda-ipc post's copies have finished (or failed): strategy timing, notification, result.
  std::function<void(CUresult, float)> cudaDone(const std::shared_ptr<Plan>& plan, uint64_t token, int use,
                                                CudaNotice notice);
  CUevent takeEvent(int device);  // from eventPool_, or nullptr
  void giveEvent(int device, CUevent event);  // back to eventPool_ (nullptr: nothing)
  void checkCuda(CUresult r, const char* what);
  template <typename F>
  auto onProgress(F&& fn) -> decltype(fn());

  AgentOptions options_;
  AgentCallbacks callbacks_;
  const CudaDriver* cuda_;
  uint64_t incarnation_ = 0;
  std::string hostKey_;
  std::string unixName_;
  int unixFd_ = -1, tcpFd_ = -1, wakeFd_[2] = {-1, -1};
  uint16_t tcpPort_ = 0;
  std::atomic<bool> closing_{false};
  // How long the progress thread and the connection readers keep polling for more before they sleep.
  std::chrono::microseconds spin_{50};

  std::mutex mutex_;  // regions_, peers_, connections_, pending_
  uint32_t nextRegionId_ = 1;
  std::map<uint32_t, std::shared_ptr<Region>> regions_;
  std::map<std::string, std::shared_ptr<Peer>> peers_;
  std::vector<std::shared_ptr<Connection>> connections_;
  struct Pending {
    std::shared_ptr<Plan> plan;
    std::shared_ptr<Peer> peer;
    std::vector<unsigned char> notif;
    std::chrono::steady_clock::time_point deadline;
    std::vector<std::pair<size_t, size_t>> groups;  // tcp: [first, last) piece ranges, one per message
    size_t answered = 0;                            // tcp: messages answered so far
  };
  std::map<uint64_t, Pending> pending_;  // token -> waiting for the target's answer
  std::map<uint64_t, bool> canceled_;

  std::unique_ptr<UcxBackend> ucx_;
  std::string ucxReason_;
  const nccl::NcclLibrary* nccl_ = nullptr;  // set when NCCL loaded and CUDA is usable
  std::string ncclReason_;
  std::unique_ptr<WorkQueue> progress_;
  std::thread acceptThread_;
  std::thread timeoutThread_;
  std::condition_variable timeoutWake_;
  std::vector<std::thread> readers_;
  std::mutex readersMutex_;
  uint64_t nextPlanId_ = 1;

  // CUDA state, progress thread only.
  std::map<int, CUcontext> contexts_;
  int currentDevice_ = -1;
  struct DeviceKernels {
    CUmodule module = nullptr;
    CUfunction copyChunks = nullptr;
    int multiprocessors = 0;
    std::string error;
  };
  std::map<int, DeviceKernels> kernels_;
  struct ChunkTable {
    std::weak_ptr<Plan> plan;
    int device = -1;
    CUdeviceptr table = 0;
    unsigned count = 0;
  };
  std::map<uint64_t, ChunkTable> chunkTables_;  // plan id -> uploaded chunk table
  struct Inflight {
    CUevent event = nullptr;
    int device = -1;
    CUevent start = nullptr;             // set when the work is being timed (strategy trials)
    std::function<void(CUresult, float)> done;  // CUDA_SUCCESS or the error; elapsed ms when timed
  };
  std::deque<Inflight> inflight_;   // GPU work whose completion the progress thread polls for
  std::mutex eventMutex_;            // eventPool_ (the JS thread takes events from it too)
  std::vector<std::pair<int, CUevent>> eventPool_;
  std::atomic<uint64_t> directPosts_{0};
  std::atomic<uint64_t> streamCommits_{0};
  bool copyBatchOn_ = true;
  int forcedCopy_ = -1;  // a Plan::Strategy named by TANDEM_CUDA_COPY, or -1
  bool directPostsOn_ = true;
  bool streamCommitOn_ = true;
  // Dead peers (removed, replaced, disconnected) whose mappings releaseRetired() has yet to close.
  std::vector<std::shared_ptr<Peer>> retired_;  // guarded by mutex_
  // pollNotifications: one per inbound connection, dropped once closed and drained.
  std::mutex inboxMutex_;
  std::vector<std::shared_ptr<Inbox>> inboxes_;
  bool pollInflight();
  DeviceKernels& kernelsFor(int device);
  void sweepChunkTables(bool all);
};

// Runs `fn` on the progress thread (at once when already there) and returns its result; rethrows.
template <typename F>
inline auto Agent::onProgress(F&& fn) -> decltype(fn()) {
  using R = decltype(fn());
  if (progress_->onQueueThread()) return fn();
  auto task = std::make_shared<std::packaged_task<R()>>(std::forward<F>(fn));
  auto future = task->get_future();
  if (!progress_->post([task] { (*task)(); })) throw AgentError{"TANDEM_DISPOSED", "the transfer agent was disposed"};
  return future.get();  // rethrows AgentError from the progress thread
}

}  // namespace tandem::transfer
