// shm: host memory between processes of one host. The target's shared regions (memfds) are mapped
// into this process through /proc/<pid>/fd and copied with memcpy; its plain host memory is reached
// with process_vm_readv/writev (cross-memory attach). One-sided: the target's threads take no part,
// except that a notification goes over the connection after the data.
#pragma once

#include "backend.h"

namespace tandem::transfer {

class ShmBackend final : public TransferBackend {
 public:
  using TransferBackend::TransferBackend;
  Backend id() const override { return Backend::Shm; }
  uint32_t localMems() const override { return kHostMems; }
  uint32_t remoteMems() const override { return kHostMems; }
  bool supportsLocal() const override { return true; }
  bool supportsRemote() const override { return false; }

  void checkPlan(const PlanShape& shape) const override;
  // A post of at most 1 MiB without a notification runs on the caller's thread when nothing is queued
  // or running on the progress thread (see kInlineShmMinBytes).
  bool postOnCaller(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif, bool alone,
                    bool& settled) override;
  void post(const std::shared_ptr<Plan>& plan, uint64_t token, std::vector<unsigned char>& notif) override;

 private:
  bool copyInline(const Plan& plan);
};

}  // namespace tandem::transfer
