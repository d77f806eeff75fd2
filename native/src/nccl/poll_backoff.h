// The wait between polls of a non-blocking NCCL call (init, split: ncclCommGetAsyncError until it leaves
// ncclInProgress), shared by the collectives' communicator and the GPU engine's NCCL tensor-parallel group.
#pragma once

#include <algorithm>
#include <chrono>
#include <thread>

namespace tandem::nccl {

// Sleeps between polls of a non-blocking NCCL call: 100 us at first, doubling up to 2 ms.
class PollBackoff {
 public:
  void sleep() {
    std::this_thread::sleep_for(delay_);
    delay_ = std::min<std::chrono::microseconds>(delay_ * 2, std::chrono::microseconds(2000));
  }

 private:
  std::chrono::microseconds delay_{100};
};

}  // namespace tandem::nccl
