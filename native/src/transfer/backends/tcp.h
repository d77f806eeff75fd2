// tcp: host memory to and from any host over the agents' connection. Two-sided: a WRITE carries the
// data (and its notification) to the target's reader, which validates the pieces against its own
// registrations and answers Done; a READ asks and the target answers with the bytes (ReadData).
// One message per run of pieces that target the same remote region.
#pragma once

#include "backend.h"

namespace tandem::transfer {

class TcpBackend final : public TransferBackend {
 public:
  using TransferBackend::TransferBackend;
  Backend id() const override { return Backend::Tcp; }
  uint32_t localMems() const override { return kHostMems; }
  uint32_t remoteMems() const override { return kHostMems; }
  bool supportsLocal() const override { return true; }
  bool supportsRemote() const override { return true; }

  void checkPlan(const PlanShape& shape) const override;
  std::unique_ptr<BackendPlanState> preparePlan(Plan& plan) override;
  void post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) override;

  bool serves(Msg type) const override { return type == Msg::WriteData || type == Msg::ReadRequest; }
  bool serve(const std::shared_ptr<Connection>& conn, const Header& h, std::unique_ptr<BackendInboundState>& state,
             std::string& error) override;
  bool answer(const std::shared_ptr<Peer>& peer, Connection& conn, const Header& h, const std::shared_ptr<Plan>& plan,
              std::string& error) override;
};

}  // namespace tandem::transfer
