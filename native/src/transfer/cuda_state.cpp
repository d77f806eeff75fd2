#include "cuda_state.h"

#include <thread>

#include "agent.h"

namespace tandem::transfer {

void CudaState::check(CUresult r, const char* what) const {
  if (r == CUDA_SUCCESS) return;
  throw AgentError{r == CUDA_ERROR_OUT_OF_MEMORY ? "TANDEM_OUT_OF_MEMORY" : "TANDEM_CUDA_ERROR",
                   std::string(what) + ": " + cuda_->describe(r)};
}

void CudaState::setDevice(int device) {
  if (!available()) throw AgentError{"TANDEM_BACKEND_UNAVAILABLE", "CUDA unavailable"};
  if (device == currentDevice_) return;
  auto it = contexts_.find(device);
  if (it == contexts_.end()) {
    CUdevice dev;
    CUcontext ctx;
    check(cuda_->cuDeviceGet(&dev, device), "cuDeviceGet");
    check(cuda_->cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    it = contexts_.emplace(device, ctx).first;
  }
  check(cuda_->cuCtxSetCurrent(it->second), "cuCtxSetCurrent");
  currentDevice_ = device;
}

bool CudaState::poll() {
  try {
    for (auto it = inflight_.begin(); it != inflight_.end();) {
      setDevice(it->device);
      CUresult r = cuda_->cuEventQuery(it->event);
      if (r == CUDA_ERROR_NOT_READY) {
        ++it;
        continue;
      }
      auto done = std::move(it->done);
      float ms = -1;
      if (it->start) {
        if (r == CUDA_SUCCESS) cuda_->cuEventElapsedTime(&ms, it->start, it->event);
        cuda_->cuEventDestroy(it->start);
        cuda_->cuEventDestroy(it->event);  // timing events are not pooled
      } else {
        giveEvent(it->device, it->event);
      }
      it = inflight_.erase(it);
      done(r, ms);
    }
  } catch (const AgentError&) {
    // setDevice failed: the context is gone; nothing more can complete.
    return false;
  }
  return !inflight_.empty();
}

CudaState::DeviceKernels& CudaState::kernelsFor(int device) {
  auto it = kernels_.find(device);
  if (it != kernels_.end()) return it->second;
  DeviceKernels& k = kernels_[device];
  if (fatbin_.empty()) {
    k.error = "no kernel fatbin was given to the agent";
    return k;
  }
  setDevice(device);
  CUresult r = cuda_->cuModuleLoadData(&k.module, fatbin_.data());
  if (r == CUDA_SUCCESS) r = cuda_->cuModuleGetFunction(&k.copyChunks, k.module, "tandem_copy_chunks");
  if (r != CUDA_SUCCESS) {
    k.error = cuda_->describe(r);
    k.copyChunks = nullptr;
    return k;
  }
  CUdevice dev;
  cuda_->cuDeviceGet(&dev, device);
  cuda_->cuDeviceGetAttribute(&k.multiprocessors, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
  // One empty launch now: with lazy module loading the first launch pays for loading the function,
  // which would otherwise land in the first timed trial and steer the plan to the copy engines.
  CUdeviceptr none = 0;
  unsigned zero = 0;
  void* args[] = {&none, &zero};
  if (cuda_->cuLaunchKernel(k.copyChunks, 1, 1, 1, 32, 1, 1, 0, nullptr, args, nullptr) == CUDA_SUCCESS) {
    cuda_->cuCtxSynchronize();
  }
  return k;
}

void CudaState::giveEvent(int device, CUevent event) {
  if (!event) return;
  std::lock_guard<std::mutex> lock(eventMutex_);
  eventPool_.push_back({device, event});
}

CUevent CudaState::takeEvent(int device) {
  std::lock_guard<std::mutex> lock(eventMutex_);
  for (auto it = eventPool_.begin(); it != eventPool_.end(); ++it) {
    if (it->first == device) {
      CUevent event = it->second;
      eventPool_.erase(it);
      return event;
    }
  }
  return nullptr;
}

void CudaState::drain() {
  while (available() && poll()) std::this_thread::yield();
  std::vector<std::pair<int, CUevent>> pool;
  {
    std::lock_guard<std::mutex> lock(eventMutex_);
    pool.swap(eventPool_);
  }
  for (auto& [device, event] : pool) {
    setDevice(device);
    cuda_->cuEventDestroy(event);
  }
}

void CudaState::releaseModulesAndContexts() {
  for (auto& [device, k] : kernels_) {
    if (k.module) {
      setDevice(device);
      cuda_->cuModuleUnload(k.module);
    }
  }
  kernels_.clear();
  cuda_->cuCtxSetCurrent(nullptr);
  for (auto& [device, ctx] : contexts_) {
    CUdevice dev;
    if (cuda_->cuDeviceGet(&dev, device) == CUDA_SUCCESS) cuda_->cuDevicePrimaryCtxRelease(dev);
  }
  contexts_.clear();
  currentDevice_ = -1;
}

}  // namespace tandem::transfer
