#include "cuda_driver.h"

#include <atomic>
#include <mutex>

#include "dynlib.h"

namespace tandem {
namespace {

constexpr int kRequestedApiVersion = 12000;

std::once_flag g_once;
CudaDriver* g_driver = nullptr;  // deliberately never deleted (see header)
std::atomic<bool> g_loaded{false};

void loadInto(CudaDriver& d, const std::vector<std::string>& candidates) {
  LoadedLibrary lib = loadFirst("libcuda.so.1", candidates);
  if (!lib.ok()) {
    d.reason = lib.reason;
    return;
  }
  d.libraryPath = lib.path;
  d.loaded = true;

  auto getProcV2 = reinterpret_cast<PFN_cuGetProcAddress_v2>(lib.symbol("cuGetProcAddress_v2"));
  auto getProcV1 = reinterpret_cast<PFN_cuGetProcAddress_v1>(lib.symbol("cuGetProcAddress"));
  if (!getProcV2 && !getProcV1) {
    d.reason = lib.path + " has no cuGetProcAddress: the driver is older than CUDA 11.3; update it";
    return;
  }
  auto resolve = [&](const char* name, int version = kRequestedApiVersion) -> void* {
    void* fn = nullptr;
    CUresult r;
    if (getProcV2) {
      int status = 0;
      r = getProcV2(name, &fn, version, 0, &status);
    } else {
      r = getProcV1(name, &fn, version, 0);
    }
    return r == CUDA_SUCCESS ? fn : nullptr;
  };

  std::string missing;
#define TANDEM_CUDA_FN(name)                                          \
  d.name = reinterpret_cast<PFN_##name>(resolve(#name));              \
  if (!d.name) missing += (missing.empty() ? "" : ", ") + std::string(#name);
#include "cuda_functions.inc"
#undef TANDEM_CUDA_FN
  d.cuMemcpyBatchAsync = reinterpret_cast<PFN_cuMemcpyBatchAsync>(resolve("cuMemcpyBatchAsync", 12080));
  d.cuProfilerStart = reinterpret_cast<PFN_cuProfilerStart>(resolve("cuProfilerStart"));
  d.cuProfilerStop = reinterpret_cast<PFN_cuProfilerStop>(resolve("cuProfilerStop"));
  if (!missing.empty()) {
    d.reason = lib.path + " lacks driver entry points needed by Tandem: " + missing +
               " (driver too old for CUDA 12 API?)";
    return;
  }

  d.cuDriverGetVersion(&d.driverVersion);
  CUresult r = d.cuInit(0);
  if (r != CUDA_SUCCESS) {
    d.reason = "cuInit failed: " + d.describe(r);
    if (r == CUDA_ERROR_NO_DEVICE) d.reason = "no CUDA device visible (cuInit: CUDA_ERROR_NO_DEVICE)";
    return;
  }
  r = d.cuDeviceGetCount(&d.deviceCount);
  if (r != CUDA_SUCCESS) {
    d.reason = "cuDeviceGetCount failed: " + d.describe(r);
    return;
  }
  if (d.deviceCount == 0) {
    d.reason = "the CUDA driver loaded but reports no devices";
    return;
  }
  d.available = true;
}

}  // namespace

std::string CudaDriver::describe(CUresult result) const {
  const char* name = nullptr;
  const char* text = nullptr;
  if (cuGetErrorName) cuGetErrorName(result, &name);
  if (cuGetErrorString) cuGetErrorString(result, &text);
  std::string out = name ? name : ("CUresult " + std::to_string(result));
  if (text) out += std::string(" (") + text + ")";
  return out;
}

const CudaDriver& loadCudaDriver(const std::vector<std::string>& candidates) {
  std::call_once(g_once, [&] {
    g_driver = new CudaDriver();
    loadInto(*g_driver, candidates);
    g_loaded.store(true, std::memory_order_release);
  });
  return *g_driver;
}

const CudaDriver* cudaDriverIfLoaded() {
  return g_loaded.load(std::memory_order_acquire) ? g_driver : nullptr;
}

}  // namespace tandem
