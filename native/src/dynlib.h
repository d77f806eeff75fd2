// Optional run-time loading of shared libraries (libcuda, libnccl, libucp, libcublas, libnvidia-ml).
// Nothing is linked at build time: a library that is absent only makes its feature unavailable, and
// the reason names every place that was searched.
#pragma once

#include <string>
#include <vector>

namespace tandem {

struct LoadedLibrary {
  void* handle = nullptr;     // dlopen handle; never dlclosed (libraries stay mapped for the process)
  std::string path;           // the candidate that loaded
  std::string reason;         // why nothing loaded, when handle is null

  bool ok() const { return handle != nullptr; }
  void* symbol(const char* name) const;
};

// Tries each candidate in order (a bare soname goes through the dynamic loader's own search; a path is
// opened as is). `what` names the library in the reason, e.g. "libcuda.so.1".
LoadedLibrary loadFirst(const std::string& what, const std::vector<std::string>& candidates);

// The directory that holds the shared object a symbol lives in ("" when unknown).
std::string directoryOfSymbol(void* symbol);

}  // namespace tandem
