#include "cuda_device.h"

#include <array>
#include <cstring>
#include <vector>

#include "device_buffer.h"

namespace tandem {
namespace {

struct Empty {};
Napi::Value undefinedOf(Napi::Env env, Empty&) { return env.Undefined(); }

uint32_t requireUint32(const Napi::Value& value, const char* what) {
  if (!value.IsNumber()) throw Napi::TypeError::New(value.Env(), std::string(what) + " must be a number");
  double d = value.As<Napi::Number>().DoubleValue();
  if (d < 0 || d > 4294967295.0 || d != static_cast<double>(static_cast<uint32_t>(d))) {
    throw Napi::RangeError::New(value.Env(), std::string(what) + " must be an integer in [0, 2^32)");
  }
  return static_cast<uint32_t>(d);
}

}  // namespace

void CudaDevice::Init(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(
      env, "CudaDevice",
      {
          InstanceMethod<&CudaDevice::Ready>("ready"),
          InstanceMethod<&CudaDevice::Alloc>("alloc"),
          InstanceMethod<&CudaDevice::LoadKernels>("loadKernels"),
          InstanceMethod<&CudaDevice::Launch>("launch"),
          InstanceMethod<&CudaDevice::Synchronize>("synchronize"),
          InstanceMethod<&CudaDevice::TimeCopy>("timeCopy"),
          InstanceMethod<&CudaDevice::MemoryInfo>("memoryInfo"),
          InstanceMethod<&CudaDevice::Dispose>("dispose"),
          InstanceAccessor<&CudaDevice::GetOrdinal>("ordinal"),
          InstanceAccessor<&CudaDevice::GetDisposed>("disposed"),
      });
  AddonState::of(env).cudaDeviceConstructor = Napi::Persistent(ctor);
  exports.Set("CudaDevice", ctor);
}

CudaDevice::CudaDevice(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CudaDevice>(info) {
  Napi::Env env = info.Env();
  ordinal_ = static_cast<int>(requireUint32(info[0], "ordinal"));
  driver_ = cudaDriverIfLoaded();
  if (!driver_ || !driver_->available) {
    std::string reason = driver_ ? driver_->reason : "the CUDA driver has not been probed yet";
    throw makeError(env, "TANDEM_CUDA_UNAVAILABLE", "CUDA unavailable: " + reason);
  }
  if (ordinal_ >= driver_->deviceCount) {
    throw makeError(env, "TANDEM_BAD_ARGUMENT",
                    "no CUDA device " + std::to_string(ordinal_) + " (this machine has " +
                        std::to_string(driver_->deviceCount) + ")");
  }
  queue_ = std::make_unique<WorkQueue>("tandem-gpu" + std::to_string(ordinal_));
  AddonState::of(env).track(this);
  // The context is made current once, on the device thread, before any other job runs.
  queue_->post([this] {
    const CudaDriver& d = *driver_;
    CUresult r = d.cuDeviceGet(&device_, ordinal_);
    if (r == CUDA_SUCCESS) r = d.cuDevicePrimaryCtxRetain(&context_, device_);
    if (r == CUDA_SUCCESS) r = d.cuCtxSetCurrent(context_);
    if (r == CUDA_SUCCESS) r = d.cuStreamCreate(&stream_, CU_STREAM_NON_BLOCKING);
    if (r != CUDA_SUCCESS) {
      initCode_ = r == CUDA_ERROR_OUT_OF_MEMORY ? "TANDEM_OUT_OF_MEMORY" : "TANDEM_CUDA_ERROR";
      initError_ = "could not open CUDA device " + std::to_string(ordinal_) + ": " + d.describe(r);
    }
  });
}

CudaDevice::~CudaDevice() { close(); }

void CudaDevice::close() {
  if (!queue_) return;
  if (!disposed_) {
    disposed_ = true;
    queue_->post([this] { releaseOnThread(); });
  }
  queue_->stop();
  queue_.reset();
  AddonState::of(Env()).untrack(this);
}

void CudaDevice::releaseOnThread() {
  const CudaDriver& d = *driver_;
  {
    std::lock_guard<std::mutex> lock(allocationsMutex_);
    for (const auto& allocation : allocations_) {
      if (!allocation->freed.exchange(true) && context_) d.cuMemFree(allocation->ptr);
    }
    allocations_.clear();
  }
  if (module_) d.cuModuleUnload(module_);
  module_ = nullptr;
  functions_.clear();
  if (stream_) d.cuStreamDestroy(stream_);
  stream_ = nullptr;
  if (context_) {
    d.cuCtxSetCurrent(nullptr);
    d.cuDevicePrimaryCtxRelease(device_);
  }
  context_ = nullptr;
}

void CudaDevice::check(CUresult result, const char* what) const {
  if (result == CUDA_SUCCESS) return;
  std::string code = result == CUDA_ERROR_OUT_OF_MEMORY ? "TANDEM_OUT_OF_MEMORY" : "TANDEM_CUDA_ERROR";
  throw NativeError(code, std::string(what) + " on CUDA device " + std::to_string(ordinal_) + ": " +
                              driver_->describe(result));
}

void CudaDevice::freeAllocation(DeviceAllocation& allocation) {
  if (allocation.freed.exchange(true)) return;
  check(driver_->cuMemFree(allocation.ptr), "cuMemFree");
  std::lock_guard<std::mutex> lock(allocationsMutex_);
  for (auto it = allocations_.begin(); it != allocations_.end(); ++it) {
    if (it->get() == &allocation) {
      allocations_.erase(it);
      break;
    }
  }
}

void CudaDevice::checkOpen() const {
  if (!initError_.empty()) throw NativeError(initCode_, initError_);
}

std::shared_ptr<DeviceAllocation> CudaDevice::allocate(size_t bytes, const char* what) {
  checkOpen();
  auto allocation = std::make_shared<DeviceAllocation>();
  allocation->bytes = bytes;
  check(driver_->cuMemAlloc(&allocation->ptr, bytes), what);
  std::lock_guard<std::mutex> lock(allocationsMutex_);
  allocations_.insert(allocation);
  return allocation;
}

CUfunction CudaDevice::function(const std::string& name) {
  checkOpen();
  if (!module_) throw NativeError("TANDEM_KERNELS_UNAVAILABLE", "no kernel module loaded on this device; call loadKernels first");
  auto it = functions_.find(name);
  if (it != functions_.end()) return it->second;
  CUfunction fn = nullptr;
  CUresult r = driver_->cuModuleGetFunction(&fn, module_, name.c_str());
  if (r == CUDA_ERROR_NOT_FOUND)
    throw NativeError("TANDEM_BAD_ARGUMENT", "no kernel named '" + name + "' in the loaded fatbin (rebuild with `npm run build:kernels`)");
  check(r, "cuModuleGetFunction");
  functions_[name] = fn;
  return fn;
}

WorkQueue& CudaDevice::liveQueue(Napi::Env env) {
  if (disposed_ || !queue_) {
    throw makeError(env, "TANDEM_DISPOSED", "CUDA device " + std::to_string(ordinal_) + " was disposed");
  }
  return *queue_;
}

Napi::Value CudaDevice::Ready(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct Opened {
    std::string name;
  };
  return runAsync<Opened>(
      env, liveQueue(env),
      [this]() {
        if (!initError_.empty()) throw NativeError(initCode_, initError_);
        char name[256] = {0};
        driver_->cuDeviceGetName(name, sizeof(name) - 1, device_);
        return Opened{name};
      },
      [](Napi::Env env, Opened& opened) -> Napi::Value {
        Napi::Object o = Napi::Object::New(env);
        o.Set("name", opened.name);
        return o;
      });
}

Napi::Value CudaDevice::Alloc(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "bytes must be a number");
  double requested = info[0].As<Napi::Number>().DoubleValue();
  if (!(requested > 0) || requested > 9007199254740991.0 || requested != static_cast<double>(static_cast<uint64_t>(requested))) {
    throw makeError(env, "TANDEM_BAD_ARGUMENT", "bytes must be a positive integer");
  }
  size_t bytes = static_cast<size_t>(requested);
  Napi::Object self = Value();
  auto selfRef = std::make_shared<Napi::ObjectReference>(Napi::Persistent(self));
  return runAsync<std::shared_ptr<DeviceAllocation>>(
      env, liveQueue(env),
      [this, bytes]() {
        return allocate(bytes, "cuMemAlloc");
      },
      [selfRef](Napi::Env env, std::shared_ptr<DeviceAllocation>& allocation) -> Napi::Value {
        return DeviceBuffer::Create(env, selfRef->Value(), allocation);
      },
      [selfRef](Napi::Env) { /* selfRef released with the last copy of this lambda */ });
}

Napi::Value CudaDevice::LoadKernels(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray()) throw Napi::TypeError::New(env, "loadKernels expects the fatbin bytes as a Uint8Array");
  Napi::Uint8Array bytes = info[0].As<Napi::Uint8Array>();
  auto image = std::make_shared<std::vector<unsigned char>>(bytes.Data(), bytes.Data() + bytes.ByteLength());
  return runAsync<Empty>(
      env, liveQueue(env),
      [this, image]() {
        if (!initError_.empty()) throw NativeError(initCode_, initError_);
        if (module_) {
          driver_->cuModuleUnload(module_);
          module_ = nullptr;
          functions_.clear();
        }
        CUresult r = driver_->cuModuleLoadData(&module_, image->data());
        if (r != CUDA_SUCCESS) {
          module_ = nullptr;
          throw NativeError("TANDEM_KERNELS_UNAVAILABLE",
                            "the kernel fatbin does not load on CUDA device " + std::to_string(ordinal_) +
                                " (built for another architecture? rebuild with `npm run build:kernels`): " +
                                driver_->describe(r));
        }
        return Empty{};
      },
      undefinedOf);
}

// launch(name, [gx, gy, gz], [bx, by, bz], sharedBytes, signature, args)
// signature: one character per argument: p device buffer (or BigInt address), i int32, u uint32,
// q int64 (BigInt), Q uint64 (BigInt), f float32, d float64.
Napi::Value CudaDevice::Launch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "kernel name must be a string");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  auto dims = [&](const Napi::Value& v, const char* what) {
    if (!v.IsArray() || v.As<Napi::Array>().Length() != 3) {
      throw Napi::TypeError::New(env, std::string(what) + " must be [x, y, z]");
    }
    Napi::Array a = v.As<Napi::Array>();
    std::array<unsigned, 3> out{};
    for (uint32_t i = 0; i < 3; ++i) {
      out[i] = requireUint32(a.Get(i), what);
      if (out[i] == 0) throw Napi::RangeError::New(env, std::string(what) + " entries must be at least 1");
    }
    return out;
  };
  std::array<unsigned, 3> grid = dims(info[1], "grid");
  std::array<unsigned, 3> block = dims(info[2], "block");
  unsigned shared = requireUint32(info[3], "sharedBytes");
  if (!info[4].IsString() || !info[5].IsArray()) throw Napi::TypeError::New(env, "launch needs a signature string and an argument array");
  std::string signature = info[4].As<Napi::String>().Utf8Value();
  Napi::Array args = info[5].As<Napi::Array>();
  if (args.Length() != signature.size()) {
    throw makeError(env, "TANDEM_BAD_ARGUMENT", "signature '" + signature + "' names " + std::to_string(signature.size()) +
                                                    " arguments but " + std::to_string(args.Length()) + " were given");
  }
  auto slots = std::make_shared<std::vector<uint64_t>>(signature.size(), 0);
  std::vector<std::shared_ptr<DeviceAllocation>> pinned;  // keeps allocations from being freed meanwhile
  for (uint32_t i = 0; i < signature.size(); ++i) {
    Napi::Value v = args.Get(i);
    uint64_t& slot = (*slots)[i];
    std::string where = "argument " + std::to_string(i);
    switch (signature[i]) {
      case 'p': {
        if (v.IsBigInt()) {
          bool lossless = true;
          slot = v.As<Napi::BigInt>().Uint64Value(&lossless);
        } else if (v.IsObject() && v.As<Napi::Object>().InstanceOf(AddonState::of(env).deviceBufferConstructor.Value())) {
          DeviceBuffer* buffer = DeviceBuffer::Unwrap(v.As<Napi::Object>());
          if (buffer->owner() != this) throw makeError(env, "TANDEM_BAD_ARGUMENT", where + ": buffer belongs to another device");
          auto allocation = buffer->live(env);
          slot = allocation->ptr;
          pinned.push_back(allocation);
        } else {
          throw Napi::TypeError::New(env, where + " must be a DeviceBuffer or BigInt address");
        }
        break;
      }
      case 'i': {
        if (!v.IsNumber()) throw Napi::TypeError::New(env, where + " must be a number");
        int32_t x = v.As<Napi::Number>().Int32Value();
        std::memcpy(&slot, &x, sizeof(x));
        break;
      }
      case 'u': {
        uint32_t x = requireUint32(v, where.c_str());
        std::memcpy(&slot, &x, sizeof(x));
        break;
      }
      case 'q':
      case 'Q': {
        if (!v.IsBigInt()) throw Napi::TypeError::New(env, where + " must be a BigInt");
        bool lossless = true;
        if (signature[i] == 'q') {
          int64_t x = v.As<Napi::BigInt>().Int64Value(&lossless);
          std::memcpy(&slot, &x, sizeof(x));
        } else {
          slot = v.As<Napi::BigInt>().Uint64Value(&lossless);
        }
        break;
      }
      case 'f': {
        if (!v.IsNumber()) throw Napi::TypeError::New(env, where + " must be a number");
        float x = v.As<Napi::Number>().FloatValue();
        std::memcpy(&slot, &x, sizeof(x));
        break;
      }
      case 'd': {
        if (!v.IsNumber()) throw Napi::TypeError::New(env, where + " must be a number");
        double x = v.As<Napi::Number>().DoubleValue();
        std::memcpy(&slot, &x, sizeof(x));
        break;
      }
      default:
        throw makeError(env, "TANDEM_BAD_ARGUMENT", std::string("unknown signature character '") + signature[i] + "'");
    }
  }
  return runAsync<Empty>(
      env, liveQueue(env),
      [this, name, grid, block, shared, slots, pinned]() {
        if (!initError_.empty()) throw NativeError(initCode_, initError_);
        if (!module_) throw NativeError("TANDEM_KERNELS_UNAVAILABLE", "no kernel module loaded on this device; call loadKernels first");
        for (const auto& allocation : pinned) {
          if (allocation->freed) throw NativeError("TANDEM_DISPOSED", "a buffer passed to " + name + " was disposed");
        }
        CUfunction fn = function(name);
        std::vector<void*> params(slots->size());
        for (size_t i = 0; i < slots->size(); ++i) params[i] = &(*slots)[i];
        check(driver_->cuLaunchKernel(fn, grid[0], grid[1], grid[2], block[0], block[1], block[2], shared, stream_,
                                      params.empty() ? nullptr : params.data(), nullptr),
              ("launch of " + name).c_str());
        check(driver_->cuStreamSynchronize(stream_), ("completion of " + name).c_str());
        return Empty{};
      },
      undefinedOf);
}

Napi::Value CudaDevice::Synchronize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return runAsync<Empty>(
      env, liveQueue(env),
      [this]() {
        if (!initError_.empty()) throw NativeError(initCode_, initError_);
        check(driver_->cuStreamSynchronize(stream_), "cuStreamSynchronize");
        return Empty{};
      },
      undefinedOf);
}

// timeCopy(dst: bigint, dstDevice, src: bigint, srcDevice, bytes, iterations) -> Promise<number[]> (ms each)
// Contiguous copies on this device's stream, timed with CUDA events: the baselines of bench:transfer.
// Across devices it is cuMemcpyPeerAsync; otherwise cuMemcpyAsync (device or pinned host memory).
Napi::Value CudaDevice::TimeCopy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsBigInt() || !info[2].IsBigInt()) throw Napi::TypeError::New(env, "timeCopy(dst: bigint, dstDevice, src: bigint, srcDevice, bytes, iterations)");
  bool lossless = true;
  CUdeviceptr dst = info[0].As<Napi::BigInt>().Uint64Value(&lossless);
  int dstDevice = info[1].As<Napi::Number>().Int32Value();
  CUdeviceptr src = info[2].As<Napi::BigInt>().Uint64Value(&lossless);
  int srcDevice = info[3].As<Napi::Number>().Int32Value();
  size_t bytes = static_cast<size_t>(info[4].As<Napi::Number>().DoubleValue());
  uint32_t iterations = requireUint32(info[5], "iterations");
  if (iterations == 0 || bytes == 0) throw makeError(env, "TANDEM_BAD_ARGUMENT", "timeCopy needs bytes and iterations > 0");
  return runAsync<std::vector<double>>(
      env, liveQueue(env),
      [this, dst, dstDevice, src, srcDevice, bytes, iterations]() {
        if (!initError_.empty()) throw NativeError(initCode_, initError_);
        const CudaDriver& d = *driver_;
        CUcontext dstCtx = nullptr, srcCtx = nullptr;
        bool peer = dstDevice >= 0 && srcDevice >= 0 && dstDevice != srcDevice;
        if (peer) {
          check(d.cuDevicePrimaryCtxRetain(&dstCtx, dstDevice), "cuDevicePrimaryCtxRetain");
          check(d.cuDevicePrimaryCtxRetain(&srcCtx, srcDevice), "cuDevicePrimaryCtxRetain");
          // Without peer access the driver stages peer copies through the host: enable it both ways
          // (CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED, 704, is fine).
          for (auto [from, to] : {std::pair{dstCtx, srcCtx}, std::pair{srcCtx, dstCtx}}) {
            d.cuCtxSetCurrent(from);
            CUresult e = d.cuCtxEnablePeerAccess(to, 0);
            if (e != CUDA_SUCCESS && e != 704) check(e, "cuCtxEnablePeerAccess");
          }
          d.cuCtxSetCurrent(context_);
        }
        std::vector<CUevent> events(iterations + 1, nullptr);
        std::vector<double> out;
        CUresult r = CUDA_SUCCESS;
        for (auto& e : events) {
          if (r == CUDA_SUCCESS) r = d.cuEventCreate(&e, 0);
        }
        for (uint32_t i = 0; i < iterations && r == CUDA_SUCCESS; ++i) {
          if (i == 0) r = d.cuEventRecord(events[0], stream_);
          if (r == CUDA_SUCCESS) {
            r = peer ? d.cuMemcpyPeerAsync(dst, dstCtx, src, srcCtx, bytes, stream_) : d.cuMemcpyAsync(dst, src, bytes, stream_);
          }
          if (r == CUDA_SUCCESS) r = d.cuEventRecord(events[i + 1], stream_);
        }
        if (r == CUDA_SUCCESS) r = d.cuEventSynchronize(events[iterations]);
        for (uint32_t i = 0; i < iterations && r == CUDA_SUCCESS; ++i) {
          float ms = 0;
          r = d.cuEventElapsedTime(&ms, events[i], events[i + 1]);
          out.push_back(ms);
        }
        for (auto& e : events) {
          if (e) d.cuEventDestroy(e);
        }
        if (peer) {
          d.cuDevicePrimaryCtxRelease(dstDevice);
          d.cuDevicePrimaryCtxRelease(srcDevice);
        }
        check(r, "timed copy");
        return out;
      },
      [](Napi::Env env, std::vector<double>& ms) -> Napi::Value {
        Napi::Array a = Napi::Array::New(env, ms.size());
        for (size_t i = 0; i < ms.size(); ++i) a.Set(i, ms[i]);
        return a;
      });
}

Napi::Value CudaDevice::MemoryInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct Memory {
    size_t free = 0, total = 0;
  };
  return runAsync<Memory>(
      env, liveQueue(env),
      [this]() {
        if (!initError_.empty()) throw NativeError(initCode_, initError_);
        Memory m;
        check(driver_->cuMemGetInfo(&m.free, &m.total), "cuMemGetInfo");
        return m;
      },
      [](Napi::Env env, Memory& m) -> Napi::Value {
        Napi::Object o = Napi::Object::New(env);
        o.Set("freeBytes", static_cast<double>(m.free));
        o.Set("totalBytes", static_cast<double>(m.total));
        return o;
      });
}

Napi::Value CudaDevice::Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto deferred = Napi::Promise::Deferred::New(env);
  // Joining the device thread waits only for work already queued, which never waits on JS.
  close();
  deferred.Resolve(env.Undefined());
  return deferred.Promise();
}

Napi::Value CudaDevice::GetOrdinal(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), ordinal_); }
Napi::Value CudaDevice::GetDisposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), disposed_); }

}  // namespace tandem
