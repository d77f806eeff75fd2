// libnccl.so.2, loaded at first use with dlopen (through the loader in dynlib.h) and resolved with
// dlsym. Nothing is linked at build time: where NCCL is absent the collectives report why.
#pragma once

#include <string>
#include <vector>

#include "nccl_api.h"

namespace tandem::nccl {

// The entry points Tandem resolves; a library that lacks any of them is not usable.
#define TANDEM_NCCL_FUNCTIONS(X) \
  X(ncclGetVersion)              \
  X(ncclGetUniqueId)             \
  X(ncclCommInitRankConfig)      \
  X(ncclCommSplit)               \
  X(ncclCommAbort)               \
  X(ncclCommDestroy)             \
  X(ncclCommGetAsyncError)       \
  X(ncclCommCount)               \
  X(ncclCommUserRank)            \
  X(ncclGroupStart)              \
  X(ncclGroupEnd)                \
  X(ncclAllReduce)               \
  X(ncclAllGather)               \
  X(ncclReduceScatter)           \
  X(ncclBroadcast)               \
  X(ncclReduce)                  \
  X(ncclSend)                    \
  X(ncclRecv)                    \
  X(ncclGetErrorString)          \
  X(ncclGetLastError)

// Oldest NCCL Tandem accepts: ncclCommSplit with a config (non-blocking split) arrived in 2.18.
constexpr int kMinimumVersion = 21800;
// fp8 (ncclFloat8e4m3, ncclFloat8e5m2) arrived in 2.24.
constexpr int kFp8Version = 22400;

struct NcclLibrary {
  bool available = false;
  std::string libraryPath;
  std::string reason;  // why not available
  int versionCode = 0;  // major*10000 + minor*100 + patch

#define TANDEM_NCCL_MEMBER(name) PFN_##name name = nullptr;
  TANDEM_NCCL_FUNCTIONS(TANDEM_NCCL_MEMBER)
#undef TANDEM_NCCL_MEMBER

  bool hasFp8() const { return versionCode >= kFp8Version; }
  std::string version() const;
  // "ncclRemoteError (remote process exited or there was a network error)", plus NCCL's last error
  // text for this thread when it has one.
  std::string describe(ncclResult_t result) const;
};

// "ncclInvalidArgument" for a result code; nullptr for a code this header does not know.
const char* resultName(ncclResult_t result);

// Loads NCCL once per process (thread-safe); later calls return the same object whatever candidates
// they pass. Never freed: it holds only function pointers and strings.
const NcclLibrary& loadNcclLibrary(const std::vector<std::string>& candidates);

// The library when loadNcclLibrary() has run, else nullptr.
const NcclLibrary* ncclLibraryIfLoaded();

}  // namespace tandem::nccl
