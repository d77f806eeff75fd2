#include "device_buffer.h"

namespace tandem {
namespace {

struct Empty {};
Napi::Value undefinedOf(Napi::Env env, Empty&) { return env.Undefined(); }

// Validates offset/length of a host view against the device allocation; returns the byte offset.
size_t checkedOffset(Napi::Env env, const Napi::Value& offsetValue, size_t length, size_t capacity) {
  double offset = 0;
  if (!offsetValue.IsUndefined()) {
    if (!offsetValue.IsNumber()) throw Napi::TypeError::New(env, "offset must be a number");
    offset = offsetValue.As<Napi::Number>().DoubleValue();
  }
  if (offset < 0 || offset != static_cast<double>(static_cast<uint64_t>(offset))) {
    throw makeError(env, "TANDEM_BAD_ARGUMENT", "offset must be a non-negative integer");
  }
  if (offset + static_cast<double>(length) > static_cast<double>(capacity)) {
    throw makeError(env, "TANDEM_OUT_OF_BOUNDS",
                    "copy of " + std::to_string(length) + " bytes at offset " + std::to_string(static_cast<uint64_t>(offset)) +
                        " runs past the end of a " + std::to_string(capacity) + "-byte device buffer");
  }
  return static_cast<size_t>(offset);
}

}  // namespace

void DeviceBuffer::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "DeviceBuffer",
                                    {
                                        InstanceMethod<&DeviceBuffer::CopyFromHost>("copyFromHost"),
                                        InstanceMethod<&DeviceBuffer::CopyToHost>("copyToHost"),
                                        InstanceMethod<&DeviceBuffer::Fill>("fill"),
                                        InstanceMethod<&DeviceBuffer::Dispose>("dispose"),
                                        InstanceAccessor<&DeviceBuffer::GetSize>("size"),
                                        InstanceAccessor<&DeviceBuffer::GetAddress>("address"),
                                        InstanceAccessor<&DeviceBuffer::GetDisposed>("disposed"),
                                    });
  AddonState::of(env).deviceBufferConstructor = Napi::Persistent(ctor);
  exports.Set("DeviceBuffer", ctor);
}

// Constructed only by CudaDevice.alloc(): new DeviceBuffer(device, external) with an External payload.
DeviceBuffer::DeviceBuffer(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DeviceBuffer>(info) {
  Napi::Env env = info.Env();
  if (info.Length() != 2 || !info[0].IsObject() || !info[1].IsExternal()) {
    throw Napi::TypeError::New(env, "DeviceBuffer cannot be constructed directly; use CudaDevice.alloc()");
  }
  deviceRef_ = Napi::Persistent(info[0].As<Napi::Object>());
  device_ = CudaDevice::Unwrap(info[0].As<Napi::Object>());
  allocation_ = *info[1].As<Napi::External<std::shared_ptr<DeviceAllocation>>>().Data();
}

Napi::Object DeviceBuffer::Create(Napi::Env env, Napi::Object device, std::shared_ptr<DeviceAllocation> allocation) {
  auto* payload = new std::shared_ptr<DeviceAllocation>(std::move(allocation));
  auto external = Napi::External<std::shared_ptr<DeviceAllocation>>::New(
      env, payload, [](Napi::Env, std::shared_ptr<DeviceAllocation>* p) { delete p; });
  return AddonState::of(env).deviceBufferConstructor.New({device, external});
}

std::shared_ptr<DeviceAllocation> DeviceBuffer::live(Napi::Env env) const {
  if (!allocation_ || allocation_->freed || !device_->queue()) {
    throw makeError(env, "TANDEM_DISPOSED", "the device buffer was disposed");
  }
  return allocation_;
}

Napi::Value DeviceBuffer::CopyFromHost(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray()) throw Napi::TypeError::New(env, "copyFromHost expects a typed array");
  Napi::TypedArray source = info[0].As<Napi::TypedArray>();
  auto allocation = live(env);
  size_t length = source.ByteLength();
  size_t offset = checkedOffset(env, info[1], length, allocation->bytes);
  const uint8_t* data = static_cast<const uint8_t*>(source.ArrayBuffer().Data()) + source.ByteOffset();
  auto keep = std::make_shared<JsKeepAlive>(env, source);
  CudaDevice* device = device_;
  return runAsync<Empty>(
      env, *device->queue(),
      [device, allocation, data, length, offset]() {
        if (allocation->freed) throw NativeError("TANDEM_DISPOSED", "the device buffer was disposed");
        device->check(device->driver().cuMemcpyHtoDAsync(allocation->ptr + offset, data, length, device->stream()),
                      "cuMemcpyHtoDAsync");
        device->check(device->driver().cuStreamSynchronize(device->stream()), "cuStreamSynchronize");
        return Empty{};
      },
      undefinedOf, [keep](Napi::Env) { keep->release(); });
}

Napi::Value DeviceBuffer::CopyToHost(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray()) throw Napi::TypeError::New(env, "copyToHost expects a typed array");
  Napi::TypedArray target = info[0].As<Napi::TypedArray>();
  auto allocation = live(env);
  size_t length = target.ByteLength();
  size_t offset = checkedOffset(env, info[1], length, allocation->bytes);
  uint8_t* data = static_cast<uint8_t*>(target.ArrayBuffer().Data()) + target.ByteOffset();
  auto keep = std::make_shared<JsKeepAlive>(env, target);
  CudaDevice* device = device_;
  return runAsync<Empty>(
      env, *device->queue(),
      [device, allocation, data, length, offset]() {
        if (allocation->freed) throw NativeError("TANDEM_DISPOSED", "the device buffer was disposed");
        device->check(device->driver().cuMemcpyDtoHAsync(data, allocation->ptr + offset, length, device->stream()),
                      "cuMemcpyDtoHAsync");
        device->check(device->driver().cuStreamSynchronize(device->stream()), "cuStreamSynchronize");
        return Empty{};
      },
      undefinedOf, [keep](Napi::Env) { keep->release(); });
}

Napi::Value DeviceBuffer::Fill(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "fill expects a byte value");
  uint32_t value = info[0].As<Napi::Number>().Uint32Value();
  if (value > 255) throw makeError(env, "TANDEM_BAD_ARGUMENT", "fill value must be a byte (0..255)");
  auto allocation = live(env);
  CudaDevice* device = device_;
  return runAsync<Empty>(
      env, *device->queue(),
      [device, allocation, value]() {
        if (allocation->freed) throw NativeError("TANDEM_DISPOSED", "the device buffer was disposed");
        device->check(device->driver().cuMemsetD8Async(allocation->ptr, static_cast<unsigned char>(value),
                                                        allocation->bytes, device->stream()),
                      "cuMemsetD8Async");
        device->check(device->driver().cuStreamSynchronize(device->stream()), "cuStreamSynchronize");
        return Empty{};
      },
      undefinedOf);
}

Napi::Value DeviceBuffer::Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  WorkQueue* queue = device_->queue();
  if (!allocation_ || allocation_->freed || !queue) {
    // Already freed (or freed with its device): disposing twice is harmless.
    auto deferred = Napi::Promise::Deferred::New(env);
    deferred.Resolve(env.Undefined());
    return deferred.Promise();
  }
  auto allocation = allocation_;
  CudaDevice* device = device_;
  return runAsync<Empty>(
      env, *queue,
      [device, allocation]() {
        device->freeAllocation(*allocation);
        return Empty{};
      },
      undefinedOf);
}

Napi::Value DeviceBuffer::GetSize(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(allocation_ ? allocation_->bytes : 0));
}

Napi::Value DeviceBuffer::GetAddress(const Napi::CallbackInfo& info) {
  return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(allocation_ ? allocation_->ptr : 0));
}

Napi::Value DeviceBuffer::GetDisposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), !allocation_ || allocation_->freed || !device_->queue());
}

}  // namespace tandem
