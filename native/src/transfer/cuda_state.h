// The agent's CUDA state, shared by the core (device and pinned registration) and the GPU backends
// (cuda-ipc, nccl): primary contexts, the copy kernel per device, GPU work whose completion the
// progress thread polls for, and a pool of completion events. Progress thread only, except the event
// pool (the JS thread takes events from it for the posts it issues itself).
#pragma once

#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "../cuda_driver.h"

namespace tandem::transfer {

class CudaState {
 public:
  CudaState(const CudaDriver* cuda, const std::vector<unsigned char>& kernels) : cuda_(cuda), fatbin_(kernels) {}

  const CudaDriver* driver() const { return cuda_; }
  bool available() const { return cuda_ && cuda_->available; }
  std::string reason() const { return cuda_ ? cuda_->reason : "not probed"; }
  bool hasContexts() const { return !contexts_.empty(); }
  int currentDevice() const { return currentDevice_; }
  CUcontext context(int device) const { return contexts_.at(device); }

  // Makes `device`'s primary context current (retained once). Throws AgentError.
  void setDevice(int device);
  // Throws AgentError (TANDEM_OUT_OF_MEMORY or TANDEM_CUDA_ERROR) unless r is CUDA_SUCCESS.
  void check(CUresult r, const char* what) const;

  struct DeviceKernels {
    CUmodule module = nullptr;
    CUfunction copyChunks = nullptr;
    int multiprocessors = 0;
    std::string error;
  };
  // The copy kernel loaded in `device`'s context (copyChunks null, with `error`, when it cannot be).
  DeviceKernels& kernelsFor(int device);

  struct Inflight {
    CUevent event = nullptr;
    int device = -1;
    CUevent start = nullptr;                    // set when the work is being timed (strategy trials)
    std::function<void(CUresult, float)> done;  // CUDA_SUCCESS or the error; elapsed ms when timed
  };
  void watch(Inflight inflight) { inflight_.push_back(std::move(inflight)); }
  // Completes every finished entry (any order: entries on different streams finish independently).
  // True while some are still in flight.
  bool poll();

  CUevent takeEvent(int device);              // from the pool, or nullptr
  void giveEvent(int device, CUevent event);  // back to the pool (nullptr: nothing)

  // Dispose, in this order: waits for the work in flight, destroys the pooled events; later unloads the
  // kernels and releases the contexts.
  void drain();
  void releaseModulesAndContexts();

 private:
  const CudaDriver* cuda_;
  const std::vector<unsigned char>& fatbin_;
  std::map<int, CUcontext> contexts_;
  int currentDevice_ = -1;
  std::map<int, DeviceKernels> kernels_;
  std::deque<Inflight> inflight_;
  std::mutex eventMutex_;
  std::vector<std::pair<int, CUevent>> eventPool_;
};

}  // namespace tandem::transfer
