// The transfer agent core (no N-API here): registered regions, peers loaded from metadata, prepared
// transfer plans, the connections between agents, notification order, and the threads that run them.
// What moves the bytes is a TransferBackend (backends/backend.h): shm, tcp, cuda-ipc, nccl, ucx, each
// in its own file with its own peer, plan and connection state; the core chooses one per plan from
// their capabilities (chooseBackend) and hands it the post.
//
// Threads the agent owns (all joined by close()):
//   progress  - runs posted transfers (through their backend) and notifications
//   accept    - accepts inbound connections on the agent's unix and tcp sockets
//   readers   - one per connection: inbound ones hand requests to the backend that serves them and
//               deliver notifications, outbound ones hand the target's answers to the post's backend
// Results reach JavaScript through the callbacks in AgentCallbacks, called from any of these threads.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
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
#include "backends/backend.h"
#include "cuda_state.h"
#include "metadata.h"
#include "notify_ring.h"
#include "wire.h"

namespace tandem::transfer {

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

// A region of a peer, as its metadata described it. Shared by the peer's region table and the plans
// that use it, so that a region the peer has removed stays known (as gone) to those plans.
struct RemoteRegion {
  explicit RemoteRegion(const RegionDescriptor& desc) : d(desc) {}
  RegionDescriptor d;
  // The peer no longer has it (a reloaded metadata lacks it, the peer said so, or its memfd now names
  // another file): posts of plans that name it fail with TANDEM_REMOTE_REGION_GONE. Set under the peer's
  // mutex, never cleared.
  std::atomic<bool> gone{false};
  // Our mapping of the peer's shared memory (shm, and cuda-ipc to the peer's host memory): made on the
  // progress thread, checked against the metadata (mapRemote), closed by releasePeer/releaseRegion.
  unsigned char* mapped = nullptr;
  size_t mappedSize = 0;
};

struct Peer {
  AgentDescriptor d;
  bool sameHost = false;
  // Exactly the regions of the metadata loaded last (or of a later generation), in its order; guarded
  // by `mutex`, as are the others below.
  std::vector<std::shared_ptr<RemoteRegion>> regions;
  std::unordered_map<uint32_t, std::shared_ptr<RemoteRegion>> regionById;
  std::unordered_map<uint32_t, bool> goneIds;  // ids of regions it had and has no more
  uint64_t generation = 0;                     // of the metadata that set `regions`
  std::shared_ptr<Connection> conn;  // outbound connection
  std::mutex mutex;                   // guards conn state, dead, reason, regions
  bool dead = false;
  bool removed = false;
  std::string deadReason;
  std::string deadCode = "TANDEM_REMOTE_DISCONNECTED";  // TANDEM_PEER_REJECTED: it refused us, or we it
  std::condition_variable connected;
  bool connecting = true;
  // The peer polls its notifications (notify_ring.h): its ring for ours, mapped at the handshake (before
  // `connecting` clears; unchanged after), and the sequence numbers of what we send it. ringMutex keeps
  // the numbers in the order they are written (ring or socket).
  std::unique_ptr<NotifyRing> ring;
  bool numbered = false;  // the peer offered a ring: number every notification, even if it could not be mapped
  std::mutex ringMutex;
  uint64_t nextNotifySeq = 1;
  // Each backend's own state for this peer (made at loadRemote by TransferBackend::openPeer).
  std::array<std::unique_ptr<BackendPeerState>, kBackendCount> backendState;
  template <typename T>
  T& state(Backend b) {
    return static_cast<T&>(*backendState[static_cast<size_t>(b)]);
  }
};

struct Piece {
  uint64_t local;         // absolute local address (host pointer or device pointer)
  uint64_t remoteOff;     // offset within the remote region
  uint64_t length;
  uint32_t remoteRegion;  // index into Plan::remotes
  uint32_t localRegion;   // region id (for validation at post time)
};

struct Plan {
  uint64_t id = 0;
  Op op = Op::Write;
  Backend backend = Backend::Shm;
  std::shared_ptr<Peer> peer;
  std::vector<Piece> pieces;
  std::vector<uint32_t> localRegionIds;
  std::vector<std::shared_ptr<RemoteRegion>> remotes;  // the remote regions the pieces name
  int localDevice = -1;   // the device whose memory is local (cuda-ipc host copies: 0)
  int remoteDevice = -1;  // the peer's GPU (its ordinal in the peer's process), where remote memory is device
  bool deviceToDevice = false;  // device memory on both sides
  bool sameDevice = false;      // device memory on both sides, on the same GPU ordinal of one host
  uint64_t bytes = 0;
  uint64_t piecesBeforeCoalescing = 0;
  std::unique_ptr<BackendPlanState> state;  // the backend's (TransferBackend::preparePlan)
  template <typename T>
  T& stateAs() {
    return static_cast<T&>(*state);
  }
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
  // Who may connect. Local peers (the unix socket) are accepted when their credentials (SO_PEERCRED) show
  // this process's uid or one of these. With a secret, every peer must prove it holds the same one
  // (auth.h), and this agent refuses peers that do not.
  std::vector<uint32_t> allowedUids;
  std::vector<unsigned char> secret;
};

class Agent {
 public:
  Agent(AgentOptions options, AgentCallbacks callbacks, const CudaDriver* cuda);
  ~Agent();
  void close();  // rejects pending work, closes sockets, joins threads; idempotent

  const std::string& name() const { return options_.name; }
  uint64_t incarnation() const { return incarnation_; }
  uint16_t tcpPort() const { return tcpPort_; }
  std::string ucxReason() const { return backend(Backend::Ucx).unavailableReason(); }
  std::string ncclReason() const { return backend(Backend::Nccl).unavailableReason(); }
  uint32_t backends() const;

  // Registration (JS thread). Throw AgentError.
  std::shared_ptr<Region> registerHost(unsigned char* data, uint64_t size);
  std::shared_ptr<Region> allocShared(uint64_t size, bool pinned);
  std::shared_ptr<Region> registerDevice(int device, CUdeviceptr ptr, uint64_t size, bool owns);
  std::shared_ptr<Region> allocDevice(int device, uint64_t size);
  void deregister(uint32_t id);
  std::shared_ptr<Region> region(uint32_t id);
  // The lowest CUDA device among this agent's device regions (-1: none).
  int firstDeviceRegion();

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
  // post): it succeeded, and no completion callback follows.
  bool post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char> notif, bool alone = false);
  // Posts the caller's thread issued to the GPU itself (cuda-ipc). For tests and stats.
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
  // Does now what the first cuda-ipc transfer with this peer would otherwise pay for (see
  // CudaIpcBackend::warmup). Succeeds with the number of the peer's device regions open (as the
  // completion's message).
  void warmup(const std::string& peerName, uint64_t token);

  // ------------------------------------------------------------------------------------------------
  // Services for the backends (backends/*.cpp)
  const AgentOptions& options() const { return options_; }
  const std::string& hostKey() const { return hostKey_; }
  bool closing() const { return closing_.load(); }
  WorkQueue& progress() { return *progress_; }
  std::chrono::microseconds spin() const { return spin_; }
  CudaState& cuda() { return cuda_; }
  TransferBackend& backend(Backend b) const { return *backends_[static_cast<size_t>(b)]; }
  std::atomic<uint64_t>& directPostCount() { return directPosts_; }
  std::atomic<uint64_t>& streamCommitCount() { return streamCommits_; }
  [[noreturn]] static void unavailable(Backend b, const std::string& why);

  void fail(uint64_t token, const std::string& code, const std::string& message);
  void succeed(uint64_t token);
  void completed(uint64_t token, bool ok, const std::string& code, const std::string& message) {
    callbacks_.completed(token, ok, code, message);
  }
  // Waits (bounded by timeoutMs) for the outbound connection; null with `error` when there is none.
  std::shared_ptr<Connection> waitConnected(const std::shared_ptr<Peer>& peer, std::string& error);
  void markDead(const std::shared_ptr<Peer>& peer, const std::string& reason,
                const std::string& code = "TANDEM_REMOTE_DISCONNECTED");
  // The code of a failure to reach a dead peer (TANDEM_REMOTE_DISCONNECTED, or TANDEM_PEER_REJECTED).
  std::string unreachableCode(Peer& peer);

  // Posts that wait for the target's answers (tcp, ucx, nccl). A pending post fails when its deadline
  // passes, its peer dies or it is canceled; `answers` is how many answers complete it.
  void addPending(uint64_t token, const std::shared_ptr<Plan>& plan, std::vector<unsigned char> notif, size_t answers);
  bool erasePending(uint64_t token);
  std::shared_ptr<Plan> pendingPlan(uint64_t token);
  // Counts one answer: false when the token is no longer pending (or every answer is in); else `index`
  // is this answer's place, and on the last one (`last`) the post is no longer pending and `notif` is its
  // deferred notification.
  bool takeAnswer(uint64_t token, size_t& index, bool& last, std::vector<unsigned char>* notif,
                  std::shared_ptr<Plan>* plan = nullptr, std::shared_ptr<Peer>* peer = nullptr, bool eraseOnLast = true);

  // Notifications (order: notify_ring.h).
  bool sendNotify(const std::shared_ptr<Peer>& peer, const std::vector<unsigned char>& message, std::string& error);
  // Sends a notification on `conn` (the peer's ring when it has one).
  bool notifyOn(Peer& peer, Connection& conn, const std::vector<unsigned char>& message, std::string& error);
  // Writes `message` into the peer's ring under the next number, if it has one and the message fits.
  bool tryRing(Peer& peer, const std::vector<unsigned char>& message);
  // The number of a notification carried inside a WRITE (tcp, nccl), sent in front of it; 0: the peer
  // does not number them (or there is no notification).
  uint64_t carriedNumber(Peer& peer, const std::vector<unsigned char>& notif);
  // The target's side of those: delivered (ok) or, for a WRITE that failed, its number skipped.
  void deliveredCarried(Connection& conn, std::vector<unsigned char> notif, bool ok);

  // Progress thread: our mapping of a peer's shared region (shm, cuda-ipc host copies), checked against
  // the file the metadata describes. Throws AgentError TANDEM_REMOTE_REGION_GONE when it is not that file.
  unsigned char* mapRemote(Peer& peer, RemoteRegion& r);
  // The peer no longer has region `id` (it said so, or a check found out): marks it gone, so that posts
  // naming it fail, and lets go of our mappings of it on the progress thread. Returns the error message.
  std::string regionGone(const std::shared_ptr<Peer>& peer, uint32_t id, const std::string& why);
  static std::string goneMessage(const Peer& peer, uint32_t id);

  // Runs `fn` on the progress thread (at once when already there) and returns its result; rethrows.
  template <typename F>
  auto onProgress(F&& fn) -> decltype(fn());

 private:
  friend struct Connection;
  void startListening();
  void acceptLoop();
  void serveInbound(std::shared_ptr<Connection> conn);
  // Connects to the peer, then hands the target's answers to the posts' backends until the connection ends.
  void readOutbound(std::shared_ptr<Peer> peer);
  // Picks the backend for a pair when the caller names none: the first in preference order that moves
  // these memory kinds, reaches this peer and is available on both sides (see the table in agent.cpp).
  Backend chooseBackend(const PlanShape& shape) const;
  // A notification arrived on an inbound connection (`seq`: its order against the ring, 0: none).
  void delivered(Connection& conn, uint64_t seq, std::vector<unsigned char> message);
  // Progress thread: lets go of what this process holds of a dead peer's memory (through each backend),
  // once the work already issued to it has finished.
  void releasePeer(Peer& peer);
  void releaseRetired();
  // Progress thread: lets go of what this process holds of regions a peer has removed.
  void releaseRegions(const std::shared_ptr<Peer>& peer, std::vector<std::shared_ptr<RemoteRegion>> regions);
  // The first gone remote region of the plan, or null (also when the peer is dead: that is the error then).
  static const RemoteRegion* goneRegion(const Plan& plan);
  void releaseCuda();

  AgentOptions options_;
  AgentCallbacks callbacks_;
  CudaState cuda_;
  uint64_t incarnation_ = 0;
  std::string hostKey_;
  std::string unixName_;
  int unixFd_ = -1, tcpFd_ = -1, wakeFd_[2] = {-1, -1};
  uint16_t tcpPort_ = 0;
  std::atomic<bool> closing_{false};
  // How long the progress thread and the connection readers keep polling for more before they sleep.
  std::chrono::microseconds spin_{50};

  std::array<std::unique_ptr<TransferBackend>, kBackendCount> backends_;

  std::mutex mutex_;  // regions_, peers_, connections_, pending_
  uint32_t nextRegionId_ = 1;  // never reused: an id names one registration for the agent's life
  uint64_t generation_ = 0;    // bumped by every registration and deregistration
  std::map<uint32_t, std::shared_ptr<Region>> regions_;
  std::map<std::string, std::shared_ptr<Peer>> peers_;
  std::vector<std::shared_ptr<Connection>> connections_;
  struct Pending {
    std::shared_ptr<Plan> plan;
    std::shared_ptr<Peer> peer;
    std::vector<unsigned char> notif;  // sent once the post completes (a READ's; a UCX WRITE's goes itself)
    std::chrono::steady_clock::time_point deadline;
    size_t answers = 1;   // answers that complete it
    size_t answered = 0;  // answers in so far
  };
  std::map<uint64_t, Pending> pending_;  // token -> waiting for the target's answer
  std::map<uint64_t, bool> canceled_;

  std::unique_ptr<WorkQueue> progress_;
  std::thread acceptThread_;
  std::thread timeoutThread_;
  std::condition_variable timeoutWake_;
  std::vector<std::thread> readers_;
  std::mutex readersMutex_;
  uint64_t nextPlanId_ = 1;

  std::atomic<uint64_t> directPosts_{0};
  std::atomic<uint64_t> streamCommits_{0};
  // Dead peers (removed, replaced, disconnected) whose mappings releaseRetired() has yet to close.
  std::vector<std::shared_ptr<Peer>> retired_;  // guarded by mutex_
  // pollNotifications: one per inbound connection, dropped once closed and drained.
  std::mutex inboxMutex_;
  std::vector<std::shared_ptr<Inbox>> inboxes_;
};

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
