#include "nccl_library.h"

#include <atomic>
#include <mutex>

#include "../dynlib.h"

namespace tandem::nccl {
namespace {

std::once_flag g_once;
NcclLibrary* g_library = nullptr;  // deliberately never deleted (see header)
std::atomic<bool> g_loaded{false};

void loadInto(NcclLibrary& n, const std::vector<std::string>& candidates) {
  LoadedLibrary lib = loadFirst("libnccl.so.2", candidates);
  if (!lib.ok()) {
    n.reason = lib.reason;
    return;
  }
  n.libraryPath = lib.path;
  std::string missing;
#define TANDEM_NCCL_RESOLVE(name)                                          \
  n.name = reinterpret_cast<PFN_##name>(lib.symbol(#name));                \
  if (!n.name) missing += (missing.empty() ? "" : ", ") + std::string(#name);
  TANDEM_NCCL_FUNCTIONS(TANDEM_NCCL_RESOLVE)
#undef TANDEM_NCCL_RESOLVE
  if (!missing.empty()) {
    n.reason = lib.path + " lacks NCCL entry points Tandem needs: " + missing +
               " (not NCCL, or an NCCL older than 2.18; point TANDEM_LIBNCCL at libnccl.so.2 2.18 or newer)";
    return;
  }
  ncclResult_t r = n.ncclGetVersion(&n.versionCode);
  if (r != ncclSuccess) {
    n.reason = "ncclGetVersion failed: " + n.describe(r);
    return;
  }
  if (n.versionCode < kMinimumVersion) {
    n.reason = lib.path + " is NCCL " + n.version() + "; Tandem needs 2.18 or newer (TANDEM_LIBNCCL selects another)";
    return;
  }
  n.available = true;
}

}  // namespace

const char* resultName(ncclResult_t result) {
  switch (result) {
    case ncclSuccess: return "ncclSuccess";
    case ncclUnhandledCudaError: return "ncclUnhandledCudaError";
    case ncclSystemError: return "ncclSystemError";
    case ncclInternalError: return "ncclInternalError";
    case ncclInvalidArgument: return "ncclInvalidArgument";
    case ncclInvalidUsage: return "ncclInvalidUsage";
    case ncclRemoteError: return "ncclRemoteError";
    case ncclInProgress: return "ncclInProgress";
    default: return nullptr;
  }
}

std::string NcclLibrary::version() const {
  // Codes below 10000 use the pre-2.9 scheme major*1000 + minor*100 + patch.
  int major = versionCode >= 10000 ? versionCode / 10000 : versionCode / 1000;
  int minor = versionCode >= 10000 ? (versionCode % 10000) / 100 : (versionCode % 1000) / 100;
  int patch = versionCode % 100;
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

std::string NcclLibrary::describe(ncclResult_t result) const {
  const char* name = resultName(result);
  std::string out = name ? name : "ncclResult " + std::to_string(result);
  if (ncclGetErrorString) {
    const char* text = ncclGetErrorString(result);
    if (text && *text) out += std::string(" (") + text + ")";
  }
  if (ncclGetLastError) {
    // The last error is kept per thread; the comm argument is unused by NCCL 2.x.
    const char* last = ncclGetLastError(nullptr);
    if (last && *last) out += std::string(": ") + last;
  }
  return out;
}

const NcclLibrary& loadNcclLibrary(const std::vector<std::string>& candidates) {
  std::call_once(g_once, [&] {
    g_library = new NcclLibrary();
    loadInto(*g_library, candidates);
    g_loaded.store(true, std::memory_order_release);
  });
  return *g_library;
}

const NcclLibrary* ncclLibraryIfLoaded() {
  return g_loaded.load(std::memory_order_acquire) ? g_library : nullptr;
}

}  // namespace tandem::nccl
