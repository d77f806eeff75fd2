// The CUDA driver, loaded at first use with dlopen and resolved through cuGetProcAddress.
#pragma once

#include <string>
#include <vector>

#include "cuda_api.h"

namespace tandem {

struct CudaDriver {
  // Load state. `available` is true once libcuda loaded, cuInit succeeded and at least one device exists.
  bool loaded = false;
  bool available = false;
  std::string libraryPath;
  std::string reason;
  int driverVersion = 0;
  int deviceCount = 0;

#define TANDEM_CUDA_FN(name) PFN_##name name = nullptr;
#include "cuda_functions.inc"
#undef TANDEM_CUDA_FN
  // Optional entry points: null where the driver is older than the version they need.
  PFN_cuMemcpyBatchAsync cuMemcpyBatchAsync = nullptr;  // driver 12.8+
  // The profiler range (cudaProfiler.h); null only where a driver does not resolve them.
  PFN_cuProfilerStart cuProfilerStart = nullptr;
  PFN_cuProfilerStop cuProfilerStop = nullptr;

  // "CUDA_ERROR_OUT_OF_MEMORY (out of memory)" for a CUresult.
  std::string describe(CUresult result) const;
};

// Loads the driver once per process (thread-safe); later calls return the same object with the same
// state, whatever candidates they pass. The object is never freed: it holds only function pointers
// and strings, so no GPU resource outlives the process through a static destructor.
const CudaDriver& loadCudaDriver(const std::vector<std::string>& candidates);

// The driver when loadCudaDriver() has run, else nullptr.
const CudaDriver* cudaDriverIfLoaded();

}  // namespace tandem
