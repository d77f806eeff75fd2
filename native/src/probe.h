// The capability probe: which of CUDA, NCCL, UCX, cuBLAS and the kernel fatbin are live here, and
// for each that is not, why. Runs on the probe thread; the result is converted to JS on the JS thread.
#pragma once

#include <napi.h>

#include <string>
#include <vector>

namespace tandem {

struct LibraryCandidates {
  std::vector<std::string> cuda, nccl, ucp, cublas, cublasLt, nvml;
};

struct ProbeOptions {
  LibraryCandidates libraries;
  std::vector<unsigned char> fatbin;  // empty: no fatbin to try
};

struct DeviceInfo {
  int ordinal = 0;
  std::string name, uuid, pciBusId;
  size_t totalMemoryBytes = 0;
  int major = 0, minor = 0, multiprocessors = 0, l2CacheBytes = 0, memoryBusWidthBits = 0;
  int memoryClockKHz = 0;
  bool vmm = false, posixFdHandles = false;
};

struct NvlinkInfo {
  bool available = false;
  std::string reason;
  std::vector<std::vector<int>> links;  // links[i][j]: active NVLink links from device i to device j
  std::vector<int> activeLinks;         // per device, all active links (including to switches)
  std::vector<int> linkVersion;         // per device, NVML's version code of its first active link
  std::vector<int> switchLinks;         // per device, active links that end at an NVSwitch
  std::vector<int> unmatchedLinks;      // per device, links to a GPU whose PCI id matches no visible device
};

struct ProbeResult {
  // CUDA
  bool cudaAvailable = false;
  std::string cudaReason, cudaPath;
  int driverVersion = 0;
  std::vector<DeviceInfo> devices;
  std::vector<std::vector<int>> peerAccess, peerRank;
  NvlinkInfo nvlink;
  // NCCL
  bool ncclAvailable = false;
  std::string ncclReason, ncclPath;
  int ncclVersion = 0;
  // UCX
  bool ucxAvailable = false;
  std::string ucxReason, ucxPath, ucxModuleDir;
  unsigned ucxMajor = 0, ucxMinor = 0, ucxRelease = 0;
  std::vector<std::string> ucxTransports, ucxDevices, ucxModules;
  std::string ucxTransportReason;
  // cuBLAS
  bool cublasAvailable = false;
  std::string cublasReason, cublasPath;
  int cublasMajor = 0, cublasMinor = 0, cublasPatch = 0;
  bool cublasLtAvailable = false;
  std::string cublasLtReason, cublasLtPath;
  size_t cublasLtVersion = 0;
  // Kernel fatbin
  bool fatbinTried = false, fatbinLoaded = false;
  std::string fatbinReason;
};

ProbeOptions parseProbeOptions(const Napi::Object& options);
ProbeResult runProbe(const ProbeOptions& options);
Napi::Value probeResultToJs(Napi::Env env, const ProbeResult& result);

}  // namespace tandem
