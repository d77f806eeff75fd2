// One transfer backend (shm, tcp, cuda-ipc, nccl, ucx) behind the agent core: what it can move, how
// it checks and prepares a plan, how a post runs, and the state it keeps per peer, per plan and per
// inbound connection. The core (agent.cpp) owns registration, peers, metadata, the wire server,
// notification order and the pending-answer table; it picks a backend from the capabilities below
// (Agent::chooseBackend) and never looks inside a backend's state.
//
// Threads: check/preparePlan on the JS thread; post() on the progress thread; postOnCaller() on the JS
// thread (a backend that can finish or issue a post there without a hand-off); serve() on an inbound
// connection's reader; answer() on an outbound connection's reader; releasePeer()/releaseRegion() on the
// progress thread, after the work already queued there.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../metadata.h"
#include "../wire.h"

namespace tandem::transfer {

class Agent;
struct Connection;
struct Peer;
struct Plan;
struct Region;
struct RemoteRegion;

enum class Op : uint8_t { Read = 0, Write = 1 };
enum class Backend : uint8_t { Shm = 0, Tcp = 1, CudaIpc = 2, Nccl = 3, Ucx = 4 };
constexpr size_t kBackendCount = 5;
const char* backendName(Backend b);
bool parseBackend(const std::string& name, Backend& out);
const char* opName(Op op);

// What a backend keeps per peer, per plan and per inbound connection; the core only holds them.
struct BackendPeerState {
  virtual ~BackendPeerState() = default;
};
struct BackendPlanState {
  virtual ~BackendPlanState() = default;
  // How the backend issues the plan's copies (cuda-ipc: 'kernel', ...); null where it has no such choice.
  virtual const char* copyStrategy() const { return nullptr; }
};
struct BackendInboundState {
  virtual ~BackendInboundState() = default;
};

constexpr uint32_t memBit(MemKind k) { return 1u << static_cast<unsigned>(k); }
constexpr uint32_t kHostMems = memBit(MemKind::Host) | memBit(MemKind::Shared) | memBit(MemKind::Pinned);
constexpr uint32_t kAllMems = kHostMems | memBit(MemKind::Device);

// The pair a plan connects, as prepare() sees it.
struct PlanShape {
  const Peer& peer;
  const std::string& peerName;
  const std::vector<std::shared_ptr<Region>>& locals;
  const std::vector<std::shared_ptr<RemoteRegion>>& remotes;
  bool localDevice;
  bool remoteDevice;
};

class TransferBackend {
 public:
  explicit TransferBackend(Agent& agent) : agent_(agent) {}
  virtual ~TransferBackend() = default;
  TransferBackend(const TransferBackend&) = delete;
  TransferBackend& operator=(const TransferBackend&) = delete;

  virtual Backend id() const = 0;
  const char* name() const { return backendName(id()); }

  // ---- Capabilities (fixed for the agent's life)
  virtual uint32_t localMems() const = 0;   // memBit()s of the kinds it moves on this side
  virtual uint32_t remoteMems() const = 0;  // ... and on the peer's
  virtual bool needsDevice() const { return false; }  // one side at least must be device memory
  virtual bool supportsLocal() const = 0;   // peers on this host
  virtual bool supportsRemote() const = 0;  // peers on other hosts
  virtual bool supportsNotifications() const { return true; }
  // Empty when this agent can drive the backend; else why not (shown to users).
  virtual std::string unavailableReason() const { return {}; }
  // The metadata's backend bit.
  uint32_t bit() const { return 1u << static_cast<unsigned>(id()); }

  // ---- Registration of local memory (JS thread): a backend that must register memory itself (ucx).
  virtual void regionRegistered(Region&) {}
  virtual void regionDeregistered(Region&) {}
  // Adds what peers need to reach this backend to the agent's descriptor (ucx: its worker address).
  virtual void describe(AgentDescriptor&) const {}

  // ---- Plans
  // Throws AgentError (TANDEM_BACKEND_UNAVAILABLE through Agent::unavailable, or TANDEM_BAD_DESCRIPTOR)
  // when this backend cannot move the pair; the core has checked kinds and regions already.
  virtual void checkPlan(const PlanShape& shape) const = 0;
  virtual std::unique_ptr<BackendPlanState> preparePlan(Plan&) { return nullptr; }

  // ---- Posts
  // JS thread, before queueing: true when the post was done or issued here. `settled` then says it
  // already succeeded with no completion to follow (only when `alone` allowed it).
  virtual bool postOnCaller(const std::shared_ptr<Plan>& /*plan*/, uint64_t /*token*/,
                            std::vector<unsigned char>& /*notif*/, bool /*alone*/, bool& /*settled*/) {
    return false;
  }
  // Around the queueing of a post (JS thread) and its run (progress thread): cuda-ipc counts them.
  virtual void queued(Plan&) {}
  virtual void dequeued(Plan&) {}
  // Progress thread. Completes the token (now or later) through Agent::succeed/fail; may throw
  // AgentError, which fails it.
  virtual void post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) = 0;

  // ---- Peers
  virtual std::unique_ptr<BackendPeerState> openPeer(Peer&) { return nullptr; }  // at loadRemote
  virtual void closePeer(Peer&, bool /*closing*/) {}  // the peer is dead (any thread); `closing`: the agent is
  virtual void releasePeer(Peer&) {}              // progress thread, once dead: let go of its memory
  virtual void releaseRegion(Peer&, RemoteRegion&) {}  // progress thread: a remote region is gone

  // ---- Wire
  // Inbound connection (target side): the message types this backend serves; serve() reads the payload.
  // False ends the connection (protocol violation or socket error).
  virtual bool serves(Msg) const { return false; }
  virtual bool serve(const std::shared_ptr<Connection>& /*conn*/, const Header& /*h*/,
                     std::unique_ptr<BackendInboundState>& /*state*/, std::string& /*error*/) {
    return false;
  }
  // Outbound connection: the target's answer (Done/ReadData) to a pending post of this backend, or to
  // one no longer pending when `plan` is null. Reads the payload. False ends the connection.
  virtual bool answer(const std::shared_ptr<Peer>& /*peer*/, Connection& /*conn*/, const Header& /*h*/,
                      const std::shared_ptr<Plan>& /*plan*/, std::string& /*error*/) {
    return false;
  }

  // ---- Agent lifetime
  virtual void releaseOnProgress() {}  // progress thread, at dispose, before CUDA contexts go
  virtual void shutdown() {}           // after the progress thread stopped

 protected:
  Agent& agent_;
};

}  // namespace tandem::transfer
