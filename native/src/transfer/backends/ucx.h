// ucx: host memory to and from any host by one-sided RMA through UCX, over a UcxWorker (ucx_worker.h),
// which owns UCX itself. Notifications go over the agents' connection once the data is in place.
#pragma once

#include <memory>
#include <string>

#include "backend.h"
#include "ucx_worker.h"

namespace tandem::transfer {

class UcxBackend final : public TransferBackend {
 public:
  explicit UcxBackend(Agent& agent);
  ~UcxBackend() override;
  Backend id() const override { return Backend::Ucx; }
  uint32_t localMems() const override { return kHostMems; }
  uint32_t remoteMems() const override { return kHostMems; }
  bool supportsLocal() const override { return true; }
  bool supportsRemote() const override { return true; }
  std::string unavailableReason() const override { return worker_ ? std::string() : reason_; }

  void regionRegistered(Region& region) override;
  void regionDeregistered(Region& region) override;
  void describe(AgentDescriptor& d) const override;
  void checkPlan(const PlanShape& shape) const override;
  void post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) override;
  std::unique_ptr<BackendPeerState> openPeer(Peer& peer) override;
  void closePeer(Peer& peer, bool closing) override;
  void shutdown() override { worker_.reset(); }  // fails whatever UCX still had in flight, joins its thread

 private:
  static std::string peerKey(const Peer& peer);
  std::unique_ptr<UcxWorker> worker_;
  std::string reason_;
};

}  // namespace tandem::transfer
