#include "gemm_bench.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../addon_state.h"
#include "../cuda_device.h"
#include "cublas.h"
#include "engine_wrap.h"

namespace tandem::engine {
namespace {

struct GemmShape {
  int m = 0, n = 0, k = 0;
  uint32_t iterations = 0, warmup = 0;
};

// Device thread only. Everything the measurement created, released on every path (success or throw).
struct GemmScratch {
  GemmScratch(CudaDevice& device, const CublasApi& cublas) : device(device), cublas(cublas) {}
  GemmScratch(const GemmScratch&) = delete;
  GemmScratch& operator=(const GemmScratch&) = delete;

  CudaDevice& device;
  const CublasApi& cublas;
  cublasHandle handle = nullptr;
  std::vector<std::shared_ptr<DeviceAllocation>> buffers;
  std::vector<CUevent> events;

  ~GemmScratch() {
    const CudaDriver& d = device.driver();
    d.cuStreamSynchronize(device.stream());  // nothing may still read the buffers freed below
    for (CUevent e : events)
      if (e) d.cuEventDestroy(e);
    if (handle) cublas.destroy(handle);
    for (auto& b : buffers) {
      try {
        device.freeAllocation(*b);
      } catch (...) {  // a failed free leaves the allocation to the device's own cleanup
      }
    }
  }
};

// bf16 of pseudo-random values in [-1, 1): the top 16 bits of a float (truncation is fine for test data).
void fillRandomBf16(CudaDevice& device, CUdeviceptr ptr, size_t elements, uint32_t seed) {
  const CudaDriver& d = device.driver();
  constexpr size_t kChunk = size_t{1} << 20;  // elements generated on the host; the rest repeats them
  size_t first = elements < kChunk ? elements : kChunk;
  std::vector<uint16_t> host(first);
  uint32_t state = seed * 2654435761u + 1;
  for (auto& h : host) {
    state = state * 1664525u + 1013904223u;
    float f = static_cast<float>(state >> 8) / static_cast<float>(1u << 23) - 1.0f;
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    h = static_cast<uint16_t>(bits >> 16);
  }
  device.check(d.cuMemcpyHtoDAsync(ptr, host.data(), first * 2, device.stream()), "cuMemcpyHtoDAsync");
  // Doubling copies: [0, done) -> [done, 2 done).
  for (size_t done = first; done < elements;) {
    size_t n = elements - done < done ? elements - done : done;
    device.check(d.cuMemcpyDtoDAsync(ptr + done * 2, ptr, n * 2, device.stream()), "cuMemcpyDtoDAsync");
    done += n;
  }
  device.check(d.cuStreamSynchronize(device.stream()), "cuStreamSynchronize");  // `host` goes out of scope
}

std::vector<double> timeGemmOnDevice(CudaDevice& device, const CublasApi& cublas, const GemmShape& s) {
  device.checkOpen();
  if (!cublas.available) throw NativeError("TANDEM_BACKEND_UNAVAILABLE", "cuBLAS unavailable: " + cublas.reason);
  const CudaDriver& d = device.driver();
  GemmScratch scratch(device, cublas);
  const size_t m = s.m, n = s.n, k = s.k;
  scratch.buffers.push_back(device.allocate(m * k * 2, "cuMemAlloc (GEMM x)"));
  scratch.buffers.push_back(device.allocate(n * k * 2, "cuMemAlloc (GEMM w)"));
  scratch.buffers.push_back(device.allocate(m * n * 2, "cuMemAlloc (GEMM y)"));
  CUdeviceptr x = scratch.buffers[0]->ptr, w = scratch.buffers[1]->ptr, y = scratch.buffers[2]->ptr;
  fillRandomBf16(device, x, m * k, 1);
  fillRandomBf16(device, w, n * k, 2);

  cublasStatus st = cublas.create(&scratch.handle);
  if (st != 0) {
    scratch.handle = nullptr;
    throw NativeError("TANDEM_CUDA_ERROR", "cublasCreate: " + cublas.describe(st));
  }
  st = cublas.setStream(scratch.handle, device.stream());
  if (st != 0) throw NativeError("TANDEM_CUDA_ERROR", "cublasSetStream: " + cublas.describe(st));

  const float one = 1.0f, zero = 0.0f;
  // y^T (n x m) = w (k x n, transposed) . x^T (k x m) in cuBLAS's column-major terms, as CudaLlama::gemm.
  auto gemm = [&] {
    cublasStatus r = cublas.gemmEx(scratch.handle, kCublasOpT, kCublasOpN, s.n, s.m, s.k, &one,
                                   reinterpret_cast<const void*>(w), kCudaR16BF, s.k, reinterpret_cast<const void*>(x),
                                   kCudaR16BF, s.k, &zero, reinterpret_cast<void*>(y), kCudaR16BF, s.n,
                                   kCublasCompute32F, kCublasGemmDefault);
    if (r != 0)
      throw NativeError("TANDEM_CUDA_ERROR", "cublasGemmEx (" + std::to_string(s.m) + " x " + std::to_string(s.n) +
                                                 " x " + std::to_string(s.k) + "): " + cublas.describe(r));
  };
  for (uint32_t i = 0; i < s.warmup; ++i) gemm();

  scratch.events.assign(s.iterations + 1, nullptr);
  for (auto& e : scratch.events) device.check(d.cuEventCreate(&e, 0), "cuEventCreate");
  device.check(d.cuEventRecord(scratch.events[0], device.stream()), "cuEventRecord");
  for (uint32_t i = 0; i < s.iterations; ++i) {
    gemm();
    device.check(d.cuEventRecord(scratch.events[i + 1], device.stream()), "cuEventRecord");
  }
  device.check(d.cuEventSynchronize(scratch.events[s.iterations]), "timed GEMMs");
  std::vector<double> ms;
  for (uint32_t i = 0; i < s.iterations; ++i) {
    float t = 0;
    device.check(d.cuEventElapsedTime(&t, scratch.events[i], scratch.events[i + 1]), "cuEventElapsedTime");
    ms.push_back(t);
  }
  return ms;
}

}  // namespace

Napi::Value TimeGemm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonState& state = AddonState::of(env);
  if (!info[0].IsObject() || !info[0].As<Napi::Object>().InstanceOf(state.cudaDeviceConstructor.Value()))
    throw Napi::TypeError::New(env, "timeGemm expects a CudaDevice as its first argument");
  if (!info[1].IsObject()) throw Napi::TypeError::New(env, "timeGemm expects an options object");
  Napi::Object deviceObject = info[0].As<Napi::Object>();
  Napi::Object o = info[1].As<Napi::Object>();
  CudaDevice* device = CudaDevice::Unwrap(deviceObject);
  WorkQueue* queue = device->queue();
  if (!queue) throw makeError(env, "TANDEM_DISPOSED", "the CUDA device was disposed");
  GemmShape shape;
  shape.m = positiveInt(o, "m");
  shape.n = positiveInt(o, "n");
  shape.k = positiveInt(o, "k");
  shape.iterations = static_cast<uint32_t>(positiveInt(o, "iterations"));
  Napi::Value warmup = field(o, "warmup");
  shape.warmup = warmup.IsUndefined() ? 0u : static_cast<uint32_t>(positiveInt(o, "warmup"));

  std::vector<std::string> candidates;
  Napi::Value libs = field(o, "cublas");
  if (libs.IsArray()) {
    Napi::Array a = libs.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i)
      if (a.Get(i).IsString()) candidates.push_back(a.Get(i).As<Napi::String>().Utf8Value());
  }
  if (candidates.empty()) candidates = {"libcublas.so.13", "libcublas.so.12"};
  const CublasApi* cublas = &loadCublas(candidates);  // process-wide, never freed

  // The device object stays referenced until the promise settles, so its thread outlives the work.
  auto keep = std::make_shared<JsKeepAlive>(env, deviceObject);
  return runAsync<std::vector<double>>(
      env, *queue, [device, cublas, shape]() { return timeGemmOnDevice(*device, *cublas, shape); },
      [](Napi::Env env, std::vector<double>& ms) -> Napi::Value {
        Napi::Array a = Napi::Array::New(env, ms.size());
        for (size_t i = 0; i < ms.size(); ++i) a.Set(static_cast<uint32_t>(i), ms[i]);
        return a;
      },
      [keep](Napi::Env) { keep->release(); });
}

}  // namespace tandem::engine
