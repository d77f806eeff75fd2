// DeviceBuffer: an allocation of device memory made by a CudaDevice. Its address is opaque to JS (a
// BigInt for registration with the transfer runtime); its bytes move only through copies.
#pragma once

#include <napi.h>

#include <memory>

#include "cuda_device.h"

namespace tandem {

class DeviceBuffer : public Napi::ObjectWrap<DeviceBuffer> {
 public:
  static void Init(Napi::Env env, Napi::Object exports);
  static Napi::Object Create(Napi::Env env, Napi::Object device, std::shared_ptr<DeviceAllocation> allocation);
  explicit DeviceBuffer(const Napi::CallbackInfo& info);

  // For kernel launches: the allocation if this buffer is still live, else throws a JS error.
  std::shared_ptr<DeviceAllocation> live(Napi::Env env) const;
  CudaDevice* owner() const { return device_; }

 private:
  Napi::Value CopyFromHost(const Napi::CallbackInfo& info);
  Napi::Value CopyToHost(const Napi::CallbackInfo& info);
  Napi::Value Fill(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value GetSize(const Napi::CallbackInfo& info);
  Napi::Value GetAddress(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);

  Napi::ObjectReference deviceRef_;
  CudaDevice* device_ = nullptr;
  std::shared_ptr<DeviceAllocation> allocation_;
};

}  // namespace tandem
