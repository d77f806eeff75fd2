// nccl: GPU memory to GPU memory where CUDA IPC cannot reach (another host), as grouped
// ncclSend/ncclRecv on a two-rank communicator per (initiator GPU, target GPU) pair. Two-sided: the
// target runs its half from the messages it serves (NcclInit, NcclPlan, NcclPost); see nccl.cpp.
#pragma once

#include "../../nccl/communicator.h"
#include "backend.h"

namespace tandem::transfer {

class NcclBackend final : public TransferBackend {
 public:
  explicit NcclBackend(Agent& agent);
  Backend id() const override { return Backend::Nccl; }
  uint32_t localMems() const override { return memBit(MemKind::Device); }
  uint32_t remoteMems() const override { return memBit(MemKind::Device); }
  bool supportsLocal() const override { return true; }
  bool supportsRemote() const override { return true; }
  std::string unavailableReason() const override { return nccl_ ? std::string() : reason_; }

  void checkPlan(const PlanShape& shape) const override;
  std::unique_ptr<BackendPlanState> preparePlan(Plan& plan) override;
  // The initiator sends the target its half (NcclInit once per link, NcclPlan once per plan, NcclPost
  // per post) over the peer connection, then queues its own half; a post completes when both halves
  // have completed on their GPUs.
  void post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) override;
  std::unique_ptr<BackendPeerState> openPeer(Peer& peer) override;
  void closePeer(Peer& peer, bool closing) override;

  bool serves(Msg type) const override {
    return type == Msg::NcclInit || type == Msg::NcclPlan || type == Msg::NcclPost;
  }
  bool serve(const std::shared_ptr<Connection>& conn, const Header& h, std::unique_ptr<BackendInboundState>& state,
             std::string& error) override;
  bool answer(const std::shared_ptr<Peer>& peer, Connection& conn, const Header& h, const std::shared_ptr<Plan>& plan,
              std::string& error) override;

 private:
  void answered(uint64_t token);  // one half of a post finished
  void settle(uint64_t token, const nccl::Failure* failure);
  void abortLink(Peer& peer, const Plan& plan, const std::string& reason);
  const nccl::NcclLibrary* nccl_ = nullptr;  // set when NCCL loaded and CUDA is usable
  std::string reason_;
};

}  // namespace tandem::transfer
