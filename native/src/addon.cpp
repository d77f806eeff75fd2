// Tandem's native addon: module entry point. The addon links no CUDA, NCCL, UCX or cuBLAS library;
// each is dlopened at first use (see probe.cpp and cuda_driver.cpp).
#include <napi.h>

#include <cstdlib>
#include <memory>
#include <string>

#include "addon_state.h"
#include "cuda_device.h"
#include "device_buffer.h"
#include "engine/cuda_llama_wrap.h"
#include "engine/engine_wrap.h"
#include "engine/gemm_bench.h"
#include "nccl/comm_wrap.h"
#include "probe.h"
#include "transfer/agent_wrap.h"

#ifndef TANDEM_ADDON_VERSION
#define TANDEM_ADDON_VERSION "0.0.0"
#endif

namespace tandem {
namespace {

// probe({ libraries: { cuda: [...], nccl: [...], ... }, fatbin?: Uint8Array }) -> Promise<RawProbe>
Napi::Value Probe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throw Napi::TypeError::New(env, "probe expects an options object");
  auto options = std::make_shared<ProbeOptions>(parseProbeOptions(info[0].As<Napi::Object>()));
  return runAsync<ProbeResult>(
      env, AddonState::of(env).probeQueue(), [options]() { return runProbe(*options); },
      [](Napi::Env env, ProbeResult& result) { return probeResultToJs(env, result); });
}

struct Empty {};

// cudaProfiler(device: CudaDevice, action: 'start' | 'stop') -> Promise<void>
// The range an attached profiler records (ncu --profile-from-start off, nsys --capture-range=cudaProfilerApi):
// cuProfilerStart / cuProfilerStop on the device's thread, where its context is current. 'stop' first waits for
// all of the context's work (cuCtxSynchronize), so the range holds every kernel enqueued before it. Without a
// profiler attached both do nothing and resolve.
Napi::Value CudaProfiler(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonState& state = AddonState::of(env);
  if (!info[0].IsObject() || !info[0].As<Napi::Object>().InstanceOf(state.cudaDeviceConstructor.Value()))
    throw Napi::TypeError::New(env, "cudaProfiler expects a CudaDevice as its first argument");
  std::string action = info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "";
  if (action != "start" && action != "stop")
    throw Napi::TypeError::New(env, "cudaProfiler expects 'start' or 'stop' as its second argument");
  Napi::Object deviceObject = info[0].As<Napi::Object>();
  CudaDevice* device = CudaDevice::Unwrap(deviceObject);
  WorkQueue* queue = device->queue();
  if (!queue) throw makeError(env, "TANDEM_DISPOSED", "the CUDA device was disposed");
  const bool start = action == "start";
  auto keep = std::make_shared<JsKeepAlive>(env, deviceObject);
  return runAsync<Empty>(
      env, *queue,
      [device, start]() {
        device->checkOpen();
        const CudaDriver& d = device->driver();
        auto fn = start ? d.cuProfilerStart : d.cuProfilerStop;
        const char* name = start ? "cuProfilerStart" : "cuProfilerStop";
        if (!fn) throw NativeError("TANDEM_BACKEND_UNAVAILABLE", std::string("the CUDA driver has no ") + name);
        if (!start) device->check(d.cuCtxSynchronize(), "cuCtxSynchronize (before cuProfilerStop)");
        device->check(fn(), name);
        return Empty{};
      },
      [](Napi::Env env, Empty&) -> Napi::Value { return env.Undefined(); }, [keep](Napi::Env) { keep->release(); });
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  // libucp, when it loads, patches mmap/munmap to track memory events and installs its own SIGSEGV
  // handler. Inside Node both corrupt the process now and then (crashes seen in 5 of 300 runs that only
  // probed). Tandem registers its regions explicitly and needs neither; a caller's own setting wins.
  setenv("UCX_MEM_EVENTS", "no", 0);
  setenv("UCX_ERROR_SIGNALS", "", 0);
  AddonState::init(env, exports);
  CudaDevice::Init(env, exports);
  DeviceBuffer::Init(env, exports);
  transfer::TransferAgentWrap::Init(env, exports);
  transfer::TransferPlanWrap::Init(env, exports);
  nccl::NcclCommWrap::Init(env, exports);
  engine::CpuLlamaWrap::Init(env, exports);
  engine::CudaLlamaWrap::Init(env, exports);
  exports.Set("probe", Napi::Function::New(env, Probe, "probe"));
  exports.Set("timeGemm", Napi::Function::New(env, engine::TimeGemm, "timeGemm"));
  exports.Set("cudaProfiler", Napi::Function::New(env, CudaProfiler, "cudaProfiler"));
  exports.Set("addonVersion", Napi::String::New(env, TANDEM_ADDON_VERSION));
  exports.Set("napiVersion", Napi::Number::New(env, NAPI_VERSION));
  return exports;
}

}  // namespace tandem

static Napi::Object InitTandem(Napi::Env env, Napi::Object exports) { return tandem::Init(env, exports); }

NODE_API_MODULE(tandem, InitTandem)
