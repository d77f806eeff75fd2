#include "ucx.h"

#include <map>

#include "../agent.h"

namespace tandem::transfer {

UcxBackend::UcxBackend(Agent& agent) : TransferBackend(agent) {
  if (!agent.options().ucp.empty()) {
    worker_ = UcxWorker::create(agent.options().ucp, reason_);
  } else {
    reason_ = "no libucp search path was given";
  }
}

UcxBackend::~UcxBackend() = default;

std::string UcxBackend::peerKey(const Peer& peer) { return peer.d.name + "#" + std::to_string(peer.d.incarnation); }

void UcxBackend::regionRegistered(Region& r) {
  if (!worker_ || r.kind == MemKind::Device) return;
  try {
    r.desc.ucxRkey = worker_->registerMemory(r.id, r.host, r.size);
  } catch (const AgentError&) {
    r.desc.ucxRkey.clear();  // UCX cannot reach this region; the other backends still can
  }
}

void UcxBackend::regionDeregistered(Region& r) {
  if (worker_ && !r.desc.ucxRkey.empty()) worker_->deregisterMemory(r.id);
}

void UcxBackend::describe(AgentDescriptor& d) const {
  if (worker_) d.ucxAddress = worker_->workerAddress();
}

void UcxBackend::checkPlan(const PlanShape& shape) const {
  if (!worker_) Agent::unavailable(id(), reason_);
  if (!(shape.peer.d.backends & bit()) || shape.peer.d.ucxAddress.empty()) {
    Agent::unavailable(id(), "peer '" + shape.peerName + "' has no UCX");
  }
  if (shape.localDevice || shape.remoteDevice) Agent::unavailable(id(), "this UCX moves host memory only (no CUDA transports)");
  for (const auto& r : shape.locals) {
    if (r->kind == MemKind::Device) Agent::unavailable(id(), "local region " + std::to_string(r->id) + " is device memory");
  }
  for (const auto& r : shape.remotes) {
    if (r->d.ucxRkey.empty()) Agent::unavailable(id(), "remote region " + std::to_string(r->d.id) + " has no UCX key");
  }
}

std::unique_ptr<BackendPeerState> UcxBackend::openPeer(Peer& peer) {
  if (worker_ && !peer.d.ucxAddress.empty()) worker_->connect(peerKey(peer), peer.d.ucxAddress);
  return nullptr;
}

void UcxBackend::closePeer(Peer& peer, bool closing) {
  if (worker_ && !peer.d.ucxAddress.empty() && !closing) worker_->disconnect(peerKey(peer));
}

void UcxBackend::post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) {
  std::string error;
  // The control connection carries notifications and tells us when the peer dies.
  if (!agent_.waitConnected(plan->peer, error)) return agent_.fail(token, agent_.unreachableCode(*plan->peer), error);
  Peer& peer = *plan->peer;
  std::vector<std::vector<uint8_t>> rkeys;
  std::map<uint32_t, uint32_t> rkeyIndex;  // plan remote index -> index into rkeys
  std::vector<UcxWorker::Piece> pieces;
  pieces.reserve(plan->pieces.size());
  for (const auto& p : plan->pieces) {
    const RemoteRegion& rr = *plan->remotes[p.remoteRegion];
    auto it = rkeyIndex.find(p.remoteRegion);
    if (it == rkeyIndex.end()) {
      it = rkeyIndex.emplace(p.remoteRegion, static_cast<uint32_t>(rkeys.size())).first;
      rkeys.push_back(rr.d.ucxRkey);
    }
    pieces.push_back({reinterpret_cast<void*>(p.local), rr.d.address + p.remoteOff, p.length, it->second});
  }
  agent_.addPending(token, plan, {}, 1);
  auto peerPtr = plan->peer;
  Agent& agent = agent_;
  worker_->post(peerKey(peer), plan->op == Op::Write, std::move(pieces), rkeys,
                [&agent, token, peerPtr, notif](bool ok, std::string err) {
                  if (!agent.erasePending(token)) return;  // timed out, canceled or disposed meanwhile
                  if (!ok) {
                    return agent.fail(token, "TANDEM_REMOTE_DISCONNECTED",
                                      "ucx transfer to peer '" + peerPtr->d.name + "' failed: " + err);
                  }
                  if (notif.empty()) return agent.succeed(token);
                  // Notifications go over the control connection, from the progress thread.
                  bool queued = agent.progress().post([&agent, token, peerPtr, notif] {
                    std::string e;
                    if (!agent.sendNotify(peerPtr, notif, e)) return agent.fail(token, "TANDEM_REMOTE_DISCONNECTED", e);
                    agent.succeed(token);
                  });
                  if (!queued) agent.fail(token, "TANDEM_DISPOSED", "the transfer agent was disposed");
                });
}

}  // namespace tandem::transfer
