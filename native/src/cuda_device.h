// CudaDevice: one GPU as seen from JavaScript. It owns a thread on which its primary context is current
// and where all of its work runs, a stream, the loaded kernel module, and the allocations made through it.
#pragma once

#include <napi.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>

#include "addon_state.h"
#include "cuda_driver.h"
#include "work_queue.h"

namespace tandem {

struct DeviceAllocation {
  CUdeviceptr ptr = 0;
  size_t bytes = 0;
  std::atomic<bool> freed{false};
};

class CudaDevice : public Napi::ObjectWrap<CudaDevice>, public Closeable {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  explicit CudaDevice(const Napi::CallbackInfo& info);
  ~CudaDevice() override;

  void close() override;

  // For DeviceBuffer: queue work on this device's thread; false when disposed.
  WorkQueue* queue() { return disposed_ ? nullptr : queue_.get(); }
  const CudaDriver& driver() const { return *driver_; }
  CUstream stream() const { return stream_; }
  int ordinal() const { return ordinal_; }
  // Device thread only: throws NativeError on failure.
  void check(CUresult result, const char* what) const;
  void freeAllocation(DeviceAllocation& allocation);
  // Device thread only. Throws NativeError unless the device opened.
  void checkOpen() const;
  // Device thread only: device memory owned by this device (freed by freeAllocation, or when the device
  // closes, whichever comes first). Throws NativeError (TANDEM_OUT_OF_MEMORY when it does not fit).
  std::shared_ptr<DeviceAllocation> allocate(size_t bytes, const char* what);
  // Device thread only: a kernel of the loaded fatbin by name (cached). Throws NativeError when no module is
  // loaded (TANDEM_KERNELS_UNAVAILABLE) or it has no such kernel.
  CUfunction function(const std::string& name);

 private:
  Napi::Value Ready(const Napi::CallbackInfo& info);
  Napi::Value Alloc(const Napi::CallbackInfo& info);
  Napi::Value LoadKernels(const Napi::CallbackInfo& info);
  Napi::Value Launch(const Napi::CallbackInfo& info);
  Napi::Value Synchronize(const Napi::CallbackInfo& info);
  Napi::Value TimeCopy(const Napi::CallbackInfo& info);
  Napi::Value MemoryInfo(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value GetOrdinal(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);

  WorkQueue& liveQueue(Napi::Env env);
  void releaseOnThread();  // device thread: frees allocations, module, stream, context

  const CudaDriver* driver_ = nullptr;
  int ordinal_ = 0;
  bool disposed_ = false;
  std::unique_ptr<WorkQueue> queue_;
  // Touched only on the device thread:
  CUdevice device_ = 0;
  CUcontext context_ = nullptr;
  CUstream stream_ = nullptr;
  CUmodule module_ = nullptr;
  std::unordered_map<std::string, CUfunction> functions_;
  std::string initError_;
  std::string initCode_;
  std::mutex allocationsMutex_;
  std::set<std::shared_ptr<DeviceAllocation>> allocations_;
  friend class DeviceBuffer;
};

}  // namespace tandem
