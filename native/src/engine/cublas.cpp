#include "cublas.h"

#include <mutex>

#include "../dynlib.h"

namespace tandem::engine {

std::string CublasApi::describe(cublasStatus status) const {
  std::string name = statusString ? statusString(status) : "cuBLAS error";
  return name + " (" + std::to_string(status) + ")";
}

const CublasApi& loadCublas(const std::vector<std::string>& candidates) {
  static std::once_flag once;
  static CublasApi* api = new CublasApi();  // never freed: no static destructor touches GPU state
  std::call_once(once, [&] {
    LoadedLibrary lib = loadFirst("libcublas", candidates);
    if (!lib.ok()) {
      api->reason = lib.reason;
      return;
    }
    api->path = lib.path;
    auto resolve = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(lib.symbol(name));
      if (!fn && api->reason.empty()) api->reason = lib.path + " has no " + name;
    };
    resolve(api->create, "cublasCreate_v2");
    resolve(api->destroy, "cublasDestroy_v2");
    resolve(api->setStream, "cublasSetStream_v2");
    resolve(api->gemmEx, "cublasGemmEx");
    resolve(api->statusString, "cublasGetStatusString");
    api->available = api->reason.empty();
  });
  return *api;
}

}  // namespace tandem::engine
