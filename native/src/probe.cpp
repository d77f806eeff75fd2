#include "probe.h"

#include <dirent.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

#include "cuda_driver.h"
#include "dynlib.h"
#include "foreign_api.h"

namespace tandem {
namespace {

// Each optional library is dlopened at most once per process; later probes see the same outcome.
const LoadedLibrary& cachedLibrary(const std::string& what, const std::vector<std::string>& candidates) {
  static std::mutex* mutex = new std::mutex();
  static auto* cache = new std::map<std::string, LoadedLibrary>();
  std::lock_guard<std::mutex> lock(*mutex);
  auto it = cache->find(what);
  if (it == cache->end()) it = cache->emplace(what, loadFirst(what, candidates)).first;
  return it->second;
}

std::string formatUuid(const CUuuid& uuid) {
  static const char* hex = "0123456789abcdef";
  std::string out = "GPU-";
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out += '-';
    out += hex[uuid.bytes[i] >> 4];
    out += hex[uuid.bytes[i] & 0xf];
  }
  return out;
}

// "00000000:19:00.0" and "0000:19:00.0" name the same device; compare on (domain, bus, device).
bool parseBusId(const std::string& text, unsigned& domain, unsigned& bus, unsigned& device) {
  unsigned fn = 0;
  return std::sscanf(text.c_str(), "%x:%x:%x.%x", &domain, &bus, &device, &fn) >= 3;
}

void probeCuda(const ProbeOptions& options, ProbeResult& out) {
  const CudaDriver& d = loadCudaDriver(options.libraries.cuda);
  out.cudaPath = d.libraryPath;
  out.driverVersion = d.driverVersion;
  if (!d.available) {
    out.cudaReason = d.reason;
    return;
  }
  out.cudaAvailable = true;
  for (int i = 0; i < d.deviceCount; ++i) {
    DeviceInfo info;
    info.ordinal = i;
    CUdevice dev = 0;
    if (d.cuDeviceGet(&dev, i) != CUDA_SUCCESS) continue;
    char name[256] = {0};
    d.cuDeviceGetName(name, sizeof(name) - 1, dev);
    info.name = name;
    d.cuDeviceTotalMem(&info.totalMemoryBytes, dev);
    d.cuDeviceGetAttribute(&info.major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
    d.cuDeviceGetAttribute(&info.minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
    d.cuDeviceGetAttribute(&info.multiprocessors, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
    d.cuDeviceGetAttribute(&info.l2CacheBytes, CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, dev);
    d.cuDeviceGetAttribute(&info.memoryBusWidthBits, CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH, dev);
    d.cuDeviceGetAttribute(&info.memoryClockKHz, CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE, dev);
    int flag = 0;
    d.cuDeviceGetAttribute(&flag, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev);
    info.vmm = flag != 0;
    flag = 0;
    d.cuDeviceGetAttribute(&flag, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, dev);
    info.posixFdHandles = flag != 0;
    CUuuid uuid{};
    if (d.cuDeviceGetUuid(&uuid, dev) == CUDA_SUCCESS) info.uuid = formatUuid(uuid);
    char bus[64] = {0};
    if (d.cuDeviceGetPCIBusId(bus, sizeof(bus) - 1, dev) == CUDA_SUCCESS) info.pciBusId = bus;
    std::transform(info.pciBusId.begin(), info.pciBusId.end(), info.pciBusId.begin(), ::tolower);
    out.devices.push_back(info);
  }
  size_t n = out.devices.size();
  out.peerAccess.assign(n, std::vector<int>(n, 0));
  out.peerRank.assign(n, std::vector<int>(n, 0));
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < n; ++j) {
      if (i == j) {
        out.peerAccess[i][j] = 1;
        continue;
      }
      int can = 0, rank = 0;
      d.cuDeviceCanAccessPeer(&can, static_cast<CUdevice>(i), static_cast<CUdevice>(j));
      d.cuDeviceGetP2PAttribute(&rank, CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK, static_cast<CUdevice>(i),
                                static_cast<CUdevice>(j));
      out.peerAccess[i][j] = can;
      out.peerRank[i][j] = rank;
    }
  }
}

void probeNvlink(const ProbeOptions& options, ProbeResult& out) {
  NvlinkInfo& nv = out.nvlink;
  size_t n = out.devices.size();
  if (n == 0) {
    nv.reason = "no CUDA devices";
    return;
  }
  const LoadedLibrary& lib = cachedLibrary("libnvidia-ml.so.1", options.libraries.nvml);
  if (!lib.ok()) {
    nv.reason = lib.reason;
    return;
  }
  auto init = reinterpret_cast<PFN_nvmlInit_v2>(lib.symbol("nvmlInit_v2"));
  auto shutdown = reinterpret_cast<PFN_nvmlShutdown>(lib.symbol("nvmlShutdown"));
  auto errorString = reinterpret_cast<PFN_nvmlErrorString>(lib.symbol("nvmlErrorString"));
  auto byBus = reinterpret_cast<PFN_nvmlDeviceGetHandleByPciBusId_v2>(lib.symbol("nvmlDeviceGetHandleByPciBusId_v2"));
  auto state = reinterpret_cast<PFN_nvmlDeviceGetNvLinkState>(lib.symbol("nvmlDeviceGetNvLinkState"));
  auto version = reinterpret_cast<PFN_nvmlDeviceGetNvLinkVersion>(lib.symbol("nvmlDeviceGetNvLinkVersion"));
  auto remote = reinterpret_cast<PFN_nvmlDeviceGetNvLinkRemotePciInfo_v2>(
      lib.symbol("nvmlDeviceGetNvLinkRemotePciInfo_v2"));
  auto remoteType = reinterpret_cast<PFN_nvmlDeviceGetNvLinkRemoteDeviceType>(
      lib.symbol("nvmlDeviceGetNvLinkRemoteDeviceType"));
  if (!init || !shutdown || !byBus || !state || !version || !remote) {
    nv.reason = lib.path + " lacks the NVLink queries (NVML too old)";
    return;
  }
  nvmlReturn_t r = init();
  if (r != NVML_SUCCESS) {
    nv.reason = std::string("nvmlInit failed: ") + (errorString ? errorString(r) : std::to_string(r));
    return;
  }
  nv.links.assign(n, std::vector<int>(n, 0));
  nv.activeLinks.assign(n, 0);
  nv.linkVersion.assign(n, 0);
  nv.switchLinks.assign(n, 0);
  nv.unmatchedLinks.assign(n, 0);
  for (size_t i = 0; i < n; ++i) {
    nvmlDevice_t handle = nullptr;
    if (byBus(out.devices[i].pciBusId.c_str(), &handle) != NVML_SUCCESS) continue;
    for (unsigned link = 0; link < kNvmlMaxLinks; ++link) {
      int active = 0;
      nvmlReturn_t s = state(handle, link, &active);
      if (s == NVML_ERROR_INVALID_ARGUMENT) break;  // past the device's last link
      if (s != NVML_SUCCESS || !active) continue;
      nv.activeLinks[i]++;
      unsigned v = 0;
      if (nv.linkVersion[i] == 0 && version(handle, link, &v) == NVML_SUCCESS) nv.linkVersion[i] = static_cast<int>(v);
      int type = NVML_NVLINK_DEVICE_TYPE_GPU;
      if (remoteType && remoteType(handle, link, &type) == NVML_SUCCESS && type == NVML_NVLINK_DEVICE_TYPE_SWITCH) {
        nv.switchLinks[i]++;
        continue;
      }
      nvmlPciInfo_t pci{};
      if (remote(handle, link, &pci) != NVML_SUCCESS) continue;
      unsigned rd = 0, rb = 0, rdev = 0;
      bool matched = false;
      if (parseBusId(pci.busId, rd, rb, rdev)) {
        for (size_t j = 0; j < n; ++j) {
          unsigned d = 0, b = 0, dv = 0;
          if (parseBusId(out.devices[j].pciBusId, d, b, dv) && d == rd && b == rb && dv == rdev) {
            nv.links[i][j]++;
            matched = true;
          }
        }
      }
      if (!matched) nv.unmatchedLinks[i]++;
    }
  }
  shutdown();
  // Inside a VM, NVML may report the host-side PCI id of the GPU at the far end of a link, which
  // matches no visible device. With two GPUs the far end can only be the other one.
  if (n == 2) {
    for (size_t i = 0; i < 2; ++i) {
      nv.links[i][1 - i] += nv.unmatchedLinks[i];
    }
  }
  // GPUs on NVSwitches (HGX boards) reach each other over all of their switch links at once: a pair
  // that can map each other's memory gets the smaller of their switch-link counts.
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j < n; ++j) {
      if (i != j && out.peerAccess[i][j] && nv.switchLinks[i] > 0 && nv.switchLinks[j] > 0) {
        nv.links[i][j] += std::min(nv.switchLinks[i], nv.switchLinks[j]);
      }
    }
  }
  nv.available = true;
}

void probeNccl(const ProbeOptions& options, ProbeResult& out) {
  const LoadedLibrary& lib = cachedLibrary("libnccl.so.2", options.libraries.nccl);
  if (!lib.ok()) {
    out.ncclReason = lib.reason;
    return;
  }
  out.ncclPath = lib.path;
  auto getVersion = reinterpret_cast<PFN_ncclGetVersion>(lib.symbol("ncclGetVersion"));
  if (!getVersion) {
    out.ncclReason = lib.path + " has no ncclGetVersion";
    return;
  }
  int v = 0;
  int r = getVersion(&v);
  if (r != 0) {
    out.ncclReason = "ncclGetVersion failed with ncclResult " + std::to_string(r);
    return;
  }
  out.ncclVersion = v;
  out.ncclAvailable = true;
}

void probeCublas(const ProbeOptions& options, ProbeResult& out) {
  const LoadedLibrary& lib = cachedLibrary("libcublas", options.libraries.cublas);
  if (!lib.ok()) {
    out.cublasReason = lib.reason;
  } else {
    out.cublasPath = lib.path;
    auto getProperty = reinterpret_cast<PFN_cublasGetProperty>(lib.symbol("cublasGetProperty"));
    if (!getProperty) {
      out.cublasReason = lib.path + " has no cublasGetProperty";
    } else if (getProperty(0, &out.cublasMajor) != 0 || getProperty(1, &out.cublasMinor) != 0 ||
               getProperty(2, &out.cublasPatch) != 0) {
      out.cublasReason = "cublasGetProperty failed";
    } else {
      out.cublasAvailable = true;
    }
  }
  const LoadedLibrary& lt = cachedLibrary("libcublasLt", options.libraries.cublasLt);
  if (!lt.ok()) {
    out.cublasLtReason = lt.reason;
    return;
  }
  out.cublasLtPath = lt.path;
  auto ltVersion = reinterpret_cast<PFN_cublasLtGetVersion>(lt.symbol("cublasLtGetVersion"));
  if (!ltVersion) {
    out.cublasLtReason = lt.path + " has no cublasLtGetVersion";
    return;
  }
  out.cublasLtVersion = ltVersion();
  out.cublasLtAvailable = true;
}

void listUcxModules(ProbeResult& out) {
  if (out.ucxModuleDir.empty()) return;
  DIR* dir = opendir(out.ucxModuleDir.c_str());
  if (!dir) return;
  std::set<std::string> modules;
  while (dirent* entry = readdir(dir)) {
    std::string file = entry->d_name;
    // libuct_<module>.so.0, libucx_perftest_cuda..., libucm_cuda... : keep the transport modules.
    const std::string prefix = "libuct_";
    auto so = file.find(".so");
    if (file.compare(0, prefix.size(), prefix) == 0 && so != std::string::npos) {
      modules.insert(file.substr(prefix.size(), so - prefix.size()));
    }
  }
  closedir(dir);
  out.ucxModules.assign(modules.begin(), modules.end());
}

void probeUcx(const ProbeOptions& options, ProbeResult& out) {
  const LoadedLibrary& lib = cachedLibrary("libucp.so.0", options.libraries.ucp);
  if (!lib.ok()) {
    out.ucxReason = lib.reason;
    return;
  }
  out.ucxPath = lib.path;
  auto getVersion = reinterpret_cast<PFN_ucp_get_version>(lib.symbol("ucp_get_version"));
  if (!getVersion) {
    out.ucxReason = lib.path + " has no ucp_get_version";
    return;
  }
  getVersion(&out.ucxMajor, &out.ucxMinor, &out.ucxRelease);
  out.ucxAvailable = true;
  auto slash = lib.path.rfind('/');
  if (slash != std::string::npos) out.ucxModuleDir = lib.path.substr(0, slash) + "/ucx";
  listUcxModules(out);

  // The transports UCX would really use here: create a context and read its resource list.
  auto configRead = reinterpret_cast<PFN_ucp_config_read>(lib.symbol("ucp_config_read"));
  auto configRelease = reinterpret_cast<PFN_ucp_config_release>(lib.symbol("ucp_config_release"));
  auto initVersion = reinterpret_cast<PFN_ucp_init_version>(lib.symbol("ucp_init_version"));
  auto cleanup = reinterpret_cast<PFN_ucp_cleanup>(lib.symbol("ucp_cleanup"));
  auto printInfo = reinterpret_cast<PFN_ucp_context_print_info>(lib.symbol("ucp_context_print_info"));
  auto statusString = reinterpret_cast<PFN_ucs_status_string>(lib.symbol("ucs_status_string"));
  if (!configRead || !configRelease || !initVersion || !cleanup || !printInfo) {
    out.ucxTransportReason = lib.path + " lacks ucp_init_version/ucp_context_print_info";
    return;
  }
  ucp_config_t* config = nullptr;
  ucs_status_t s = configRead(nullptr, nullptr, &config);
  if (s != 0) {
    out.ucxTransportReason = std::string("ucp_config_read failed: ") + (statusString ? statusString(s) : "");
    return;
  }
  // ucp_params_t begins with field_mask and features; UCX reads only the fields the mask names.
  uint64_t params[64] = {0};
  params[0] = kUcpParamFieldFeatures;
  params[1] = kUcpFeatureTag | kUcpFeatureRma;
  ucp_context_h context = nullptr;
  s = initVersion(out.ucxMajor, out.ucxMinor, params, config, &context);
  configRelease(config);
  if (s != 0 || !context) {
    out.ucxTransportReason = std::string("ucp_init failed: ") + (statusString ? statusString(s) : "");
    return;
  }
  char* text = nullptr;
  size_t length = 0;
  FILE* stream = open_memstream(&text, &length);
  if (stream) {
    printInfo(context, stream);
    std::fclose(stream);
  }
  cleanup(context);
  if (!text) return;
  // Resource lines read "#      resource 2  :  md 1  dev 1  flags -- posix/memory".
  std::set<std::string> transports, devices;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.find("resource") == std::string::npos) continue;
    auto dashes = line.find("-- ");
    if (dashes == std::string::npos) continue;
    std::string resource = line.substr(dashes + 3);
    while (!resource.empty() && (resource.back() == ' ' || resource.back() == '\r')) resource.pop_back();
    auto split = resource.find('/');
    if (split == std::string::npos) continue;
    transports.insert(resource.substr(0, split));
    devices.insert(resource);
  }
  std::free(text);
  out.ucxTransports.assign(transports.begin(), transports.end());
  out.ucxDevices.assign(devices.begin(), devices.end());
}

void probeFatbin(const ProbeOptions& options, ProbeResult& out) {
  if (options.fatbin.empty()) return;
  out.fatbinTried = true;
  const CudaDriver* d = cudaDriverIfLoaded();
  if (!d || !d->available) {
    out.fatbinReason = "CUDA unavailable";
    return;
  }
  CUdevice dev = 0;
  CUcontext ctx = nullptr;
  CUresult r = d->cuDeviceGet(&dev, 0);
  if (r == CUDA_SUCCESS) r = d->cuDevicePrimaryCtxRetain(&ctx, dev);
  if (r != CUDA_SUCCESS) {
    out.fatbinReason = "could not create a context on device 0: " + d->describe(r);
    return;
  }
  d->cuCtxSetCurrent(ctx);
  CUmodule module = nullptr;
  r = d->cuModuleLoadData(&module, options.fatbin.data());
  if (r == CUDA_SUCCESS) {
    out.fatbinLoaded = true;
    d->cuModuleUnload(module);
  } else {
    out.fatbinReason = "cuModuleLoadData on device 0 failed: " + d->describe(r);
  }
  d->cuCtxSetCurrent(nullptr);
  d->cuDevicePrimaryCtxRelease(dev);
}

std::vector<std::string> stringList(const Napi::Object& object, const char* key) {
  std::vector<std::string> out;
  if (!object.Has(key)) return out;
  Napi::Value value = object.Get(key);
  if (!value.IsArray()) throw Napi::TypeError::New(object.Env(), std::string(key) + " must be an array of strings");
  Napi::Array array = value.As<Napi::Array>();
  for (uint32_t i = 0; i < array.Length(); ++i) {
    Napi::Value item = array.Get(i);
    if (!item.IsString()) throw Napi::TypeError::New(object.Env(), std::string(key) + " must be an array of strings");
    out.push_back(item.As<Napi::String>().Utf8Value());
  }
  return out;
}

Napi::Array toJsMatrix(Napi::Env env, const std::vector<std::vector<int>>& m, bool asBool) {
  Napi::Array rows = Napi::Array::New(env, m.size());
  for (size_t i = 0; i < m.size(); ++i) {
    Napi::Array row = Napi::Array::New(env, m[i].size());
    for (size_t j = 0; j < m[i].size(); ++j) {
      row.Set(j, asBool ? Napi::Value(Napi::Boolean::New(env, m[i][j] != 0)) : Napi::Value(Napi::Number::New(env, m[i][j])));
    }
    rows.Set(i, row);
  }
  return rows;
}

Napi::Array toJsStrings(Napi::Env env, const std::vector<std::string>& list) {
  Napi::Array array = Napi::Array::New(env, list.size());
  for (size_t i = 0; i < list.size(); ++i) array.Set(i, list[i]);
  return array;
}

void setOptional(Napi::Object& o, const char* key, const std::string& value) {
  if (!value.empty()) o.Set(key, value);
}

}  // namespace

ProbeOptions parseProbeOptions(const Napi::Object& options) {
  ProbeOptions out;
  Napi::Object libs = options.Has("libraries") ? options.Get("libraries").As<Napi::Object>()
                                               : Napi::Object::New(options.Env());
  out.libraries.cuda = stringList(libs, "cuda");
  out.libraries.nccl = stringList(libs, "nccl");
  out.libraries.ucp = stringList(libs, "ucp");
  out.libraries.cublas = stringList(libs, "cublas");
  out.libraries.cublasLt = stringList(libs, "cublasLt");
  out.libraries.nvml = stringList(libs, "nvml");
  if (options.Has("fatbin") && options.Get("fatbin").IsTypedArray()) {
    Napi::Uint8Array bytes = options.Get("fatbin").As<Napi::Uint8Array>();
    out.fatbin.assign(bytes.Data(), bytes.Data() + bytes.ByteLength());
  }
  return out;
}

ProbeResult runProbe(const ProbeOptions& options) {
  ProbeResult out;
  probeCuda(options, out);
  if (out.cudaAvailable && out.devices.size() > 1) probeNvlink(options, out);
  probeNccl(options, out);
  probeUcx(options, out);
  probeCublas(options, out);
  probeFatbin(options, out);
  return out;
}

Napi::Value probeResultToJs(Napi::Env env, const ProbeResult& r) {
  Napi::Object o = Napi::Object::New(env);

  Napi::Object cuda = Napi::Object::New(env);
  cuda.Set("available", r.cudaAvailable);
  setOptional(cuda, "reason", r.cudaReason);
  setOptional(cuda, "libraryPath", r.cudaPath);
  cuda.Set("driverVersion", r.driverVersion);
  Napi::Array devices = Napi::Array::New(env, r.devices.size());
  for (size_t i = 0; i < r.devices.size(); ++i) {
    const DeviceInfo& d = r.devices[i];
    Napi::Object dev = Napi::Object::New(env);
    dev.Set("ordinal", d.ordinal);
    dev.Set("name", d.name);
    dev.Set("uuid", d.uuid);
    dev.Set("pciBusId", d.pciBusId);
    dev.Set("totalMemoryBytes", static_cast<double>(d.totalMemoryBytes));
    dev.Set("computeCapabilityMajor", d.major);
    dev.Set("computeCapabilityMinor", d.minor);
    dev.Set("multiprocessors", d.multiprocessors);
    dev.Set("l2CacheBytes", d.l2CacheBytes);
    dev.Set("memoryBusWidthBits", d.memoryBusWidthBits);
    dev.Set("memoryClockKHz", d.memoryClockKHz);
    dev.Set("virtualMemoryManagement", d.vmm);
    dev.Set("posixFdHandles", d.posixFdHandles);
    devices.Set(i, dev);
  }
  cuda.Set("devices", devices);
  cuda.Set("peerAccess", toJsMatrix(env, r.peerAccess, true));
  cuda.Set("peerPerformanceRank", toJsMatrix(env, r.peerRank, false));
  Napi::Object nvlink = Napi::Object::New(env);
  nvlink.Set("available", r.nvlink.available);
  setOptional(nvlink, "reason", r.nvlink.reason);
  nvlink.Set("links", toJsMatrix(env, r.nvlink.links, false));
  Napi::Array active = Napi::Array::New(env, r.nvlink.activeLinks.size());
  Napi::Array versions = Napi::Array::New(env, r.nvlink.linkVersion.size());
  for (size_t i = 0; i < r.nvlink.activeLinks.size(); ++i) {
    active.Set(i, r.nvlink.activeLinks[i]);
    versions.Set(i, r.nvlink.linkVersion[i]);
  }
  nvlink.Set("activeLinks", active);
  Napi::Array switched = Napi::Array::New(env, r.nvlink.switchLinks.size());
  Napi::Array unmatched = Napi::Array::New(env, r.nvlink.unmatchedLinks.size());
  for (size_t i = 0; i < r.nvlink.switchLinks.size(); ++i) {
    switched.Set(i, r.nvlink.switchLinks[i]);
    unmatched.Set(i, r.nvlink.unmatchedLinks[i]);
  }
  nvlink.Set("switchLinks", switched);
  nvlink.Set("unmatchedLinks", unmatched);
  nvlink.Set("nvmlLinkVersion", versions);
  cuda.Set("nvlink", nvlink);
  o.Set("cuda", cuda);

  Napi::Object nccl = Napi::Object::New(env);
  nccl.Set("available", r.ncclAvailable);
  setOptional(nccl, "reason", r.ncclReason);
  setOptional(nccl, "libraryPath", r.ncclPath);
  nccl.Set("versionCode", r.ncclVersion);
  o.Set("nccl", nccl);

  Napi::Object ucx = Napi::Object::New(env);
  ucx.Set("available", r.ucxAvailable);
  setOptional(ucx, "reason", r.ucxReason);
  setOptional(ucx, "libraryPath", r.ucxPath);
  setOptional(ucx, "moduleDir", r.ucxModuleDir);
  Napi::Array ucxVersion = Napi::Array::New(env, 3);
  ucxVersion.Set(0u, r.ucxMajor);
  ucxVersion.Set(1u, r.ucxMinor);
  ucxVersion.Set(2u, r.ucxRelease);
  ucx.Set("versionParts", ucxVersion);
  ucx.Set("transports", toJsStrings(env, r.ucxTransports));
  ucx.Set("resources", toJsStrings(env, r.ucxDevices));
  ucx.Set("modules", toJsStrings(env, r.ucxModules));
  setOptional(ucx, "transportReason", r.ucxTransportReason);
  o.Set("ucx", ucx);

  Napi::Object cublas = Napi::Object::New(env);
  cublas.Set("available", r.cublasAvailable);
  setOptional(cublas, "reason", r.cublasReason);
  setOptional(cublas, "libraryPath", r.cublasPath);
  Napi::Array cublasVersion = Napi::Array::New(env, 3);
  cublasVersion.Set(0u, r.cublasMajor);
  cublasVersion.Set(1u, r.cublasMinor);
  cublasVersion.Set(2u, r.cublasPatch);
  cublas.Set("versionParts", cublasVersion);
  Napi::Object lt = Napi::Object::New(env);
  lt.Set("available", r.cublasLtAvailable);
  setOptional(lt, "reason", r.cublasLtReason);
  setOptional(lt, "libraryPath", r.cublasLtPath);
  lt.Set("versionCode", static_cast<double>(r.cublasLtVersion));
  cublas.Set("lt", lt);
  o.Set("cublas", cublas);

  Napi::Object fatbin = Napi::Object::New(env);
  fatbin.Set("tried", r.fatbinTried);
  fatbin.Set("loaded", r.fatbinLoaded);
  setOptional(fatbin, "reason", r.fatbinReason);
  o.Set("kernels", fatbin);
  return o;
}

}  // namespace tandem
