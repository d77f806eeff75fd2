#include "dynlib.h"

#include <dlfcn.h>
#include <link.h>

namespace tandem {

void* LoadedLibrary::symbol(const char* name) const {
  return handle ? dlsym(handle, name) : nullptr;
}

LoadedLibrary loadFirst(const std::string& what, const std::vector<std::string>& candidates) {
  LoadedLibrary lib;
  std::string searched;
  std::string firstError;
  for (const auto& candidate : candidates) {
    if (candidate.empty()) continue;
    dlerror();
    void* handle = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle) {
      lib.handle = handle;
      // Report the file that really loaded, not the soname that was asked for.
      struct link_map* map = nullptr;
      if (dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map && map->l_name && map->l_name[0]) {
        lib.path = map->l_name;
      } else {
        lib.path = candidate;
      }
      return lib;
    }
    const char* err = dlerror();
    std::string message = err ? err : "unknown dlopen error";
    if (!searched.empty()) searched += ", ";
    searched += candidate;
    // A library that exists but fails to load (wrong architecture, missing dependency) is the more
    // useful message; "cannot open shared object file" for every miss is not.
    if (firstError.empty() || (firstError.find("No such file") != std::string::npos &&
                                message.find("No such file") == std::string::npos)) {
      firstError = message;
    }
  }
  lib.reason = what + " not found (searched: " + searched + ")";
  if (!firstError.empty() && firstError.find("No such file") == std::string::npos) {
    lib.reason += "; " + firstError;
  }
  return lib;
}

std::string directoryOfSymbol(void* symbol) {
  Dl_info info{};
  if (!symbol || !dladdr(symbol, &info) || !info.dli_fname) return "";
  std::string file = info.dli_fname;
  auto slash = file.rfind('/');
  return slash == std::string::npos ? "" : file.substr(0, slash);
}

}  // namespace tandem
