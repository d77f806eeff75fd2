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

std::string CublasLtApi::describe(cublasStatus status) const {
  if (status == kCublasLtNoAlgorithm) return "no cuBLASLt algorithm for this shape";
  std::string name = statusString ? statusString(status) : "cuBLASLt error";
  return name + " (" + std::to_string(status) + ")";
}

const CublasLtApi& loadCublasLt(const std::vector<std::string>& candidates) {
  static std::once_flag once;
  static CublasLtApi* api = new CublasLtApi();  // never freed, as loadCublas's
  std::call_once(once, [&] {
    LoadedLibrary lib = loadFirst("libcublasLt", candidates);
    if (!lib.ok()) {
      api->reason = lib.reason;
      return;
    }
    api->path = lib.path;
    auto resolve = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(lib.symbol(name));
      if (!fn && api->reason.empty()) api->reason = lib.path + " has no " + name;
    };
    resolve(api->create, "cublasLtCreate");
    resolve(api->destroy, "cublasLtDestroy");
    resolve(api->matmulDescCreate, "cublasLtMatmulDescCreate");
    resolve(api->matmulDescDestroy, "cublasLtMatmulDescDestroy");
    resolve(api->matmulDescSetAttribute, "cublasLtMatmulDescSetAttribute");
    resolve(api->matrixLayoutCreate, "cublasLtMatrixLayoutCreate");
    resolve(api->matrixLayoutDestroy, "cublasLtMatrixLayoutDestroy");
    resolve(api->preferenceCreate, "cublasLtMatmulPreferenceCreate");
    resolve(api->preferenceDestroy, "cublasLtMatmulPreferenceDestroy");
    resolve(api->preferenceSetAttribute, "cublasLtMatmulPreferenceSetAttribute");
    resolve(api->algoGetHeuristic, "cublasLtMatmulAlgoGetHeuristic");
    resolve(api->matmul, "cublasLtMatmul");
    api->statusString = reinterpret_cast<const char* (*)(cublasStatus)>(lib.symbol("cublasLtGetStatusString"));
    api->available = api->reason.empty();
  });
  return *api;
}

// The registry behind tunedAlgo (no anonymous namespace: bench/micro/gemm.cu compiles this file into its own).
using TunedKey = std::tuple<int, int, int, int, int>;  // device, m, n, k, y type
struct TunedRegistry {
  static constexpr size_t kMax = 1 << 16;
  std::mutex mutex;
  std::map<TunedKey, cublasLtMatmulAlgo> algos;
};
static TunedRegistry& tunedRegistry() {
  static auto* registry = new TunedRegistry();  // never freed, as the loaded APIs
  return *registry;
}

bool tunedAlgo(int device, int m, int n, int k, int yType, cublasLtMatmulAlgo* algo) {
  TunedRegistry& r = tunedRegistry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.algos.find(TunedKey{device, m, n, k, yType});
  if (it == r.algos.end()) return false;
  *algo = it->second;
  return true;
}

cublasLtMatmulAlgo registerTunedAlgo(int device, int m, int n, int k, int yType, const cublasLtMatmulAlgo& algo) {
  TunedRegistry& r = tunedRegistry();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (r.algos.size() >= TunedRegistry::kMax) r.algos.clear();
  return r.algos.emplace(TunedKey{device, m, n, k, yType}, algo).first->second;
}

cublasStatus LtGemm::init(CUdeviceptr workspace, size_t bytes) {
  release();
  workspace_ = workspace;
  workspaceBytes_ = bytes;
  cublasStatus s = api_.create(&handle_);
  if (s != 0) handle_ = nullptr;
  return s;
}

void LtGemm::destroy(Plan& p) const {
  if (p.a) api_.matrixLayoutDestroy(p.a);
  if (p.b) api_.matrixLayoutDestroy(p.b);
  if (p.d) api_.matrixLayoutDestroy(p.d);
  if (p.desc) api_.matmulDescDestroy(p.desc);
  p = Plan{};
}

void LtGemm::release() {
  for (auto& [key, p] : plans_) destroy(p);
  plans_.clear();
  if (handle_) api_.destroy(handle_);
  handle_ = nullptr;
}

// In cuBLAS's column-major terms, as cublasGemmEx in CudaLlama::gemm: y^T (n x m) = op(A) . B with
// A = w (k x n, ld k, transposed) and B = x^T (k x m, ld k); D = y (n x m, ld n). C is D (beta is 0).
cublasStatus LtGemm::describeShape(int m, int n, int k, int yType, Plan& p) const {
  const int opT = kCublasOpT, opN = kCublasOpN;
  cublasStatus s = api_.matmulDescCreate(&p.desc, kCublasCompute32F, kCudaR32F);
  if (s != 0) p.desc = nullptr;
  if (s == 0) s = api_.matmulDescSetAttribute(p.desc, kCublasLtMatmulDescTransA, &opT, sizeof(opT));
  if (s == 0) s = api_.matmulDescSetAttribute(p.desc, kCublasLtMatmulDescTransB, &opN, sizeof(opN));
  if (s == 0 && (s = api_.matrixLayoutCreate(&p.a, kCudaR16BF, k, n, k)) != 0) p.a = nullptr;
  if (s == 0 && (s = api_.matrixLayoutCreate(&p.b, kCudaR16BF, k, m, k)) != 0) p.b = nullptr;
  if (s == 0 && (s = api_.matrixLayoutCreate(&p.d, yType, n, m, n)) != 0) p.d = nullptr;
  return s;
}

cublasStatus LtGemm::heuristic(const Plan& p, int count, std::vector<cublasLtMatmulAlgo>& out) const {
  cublasLtMatmulPreference pref = nullptr;
  const uint64_t workspace = workspaceBytes_;
  cublasStatus s = api_.preferenceCreate(&pref);
  if (s != 0) return s;
  s = api_.preferenceSetAttribute(pref, kCublasLtPrefMaxWorkspaceBytes, &workspace, sizeof(workspace));
  if (s == 0) {
    std::vector<cublasLtMatmulHeuristicResult> results(static_cast<size_t>(count));
    int returned = 0;
    s = api_.algoGetHeuristic(handle_, p.desc, p.a, p.b, p.d, p.d, pref, count, results.data(), &returned);
    if (s == 0)
      for (int i = 0; i < returned; ++i)
        if (results[i].state == 0 && results[i].workspaceSize <= workspaceBytes_) out.push_back(results[i].algo);
  }
  api_.preferenceDestroy(pref);
  return s;
}

std::vector<cublasLtMatmulAlgo> LtGemm::candidates(int m, int n, int k, int yType, int count, cublasStatus* status) {
  std::vector<cublasLtMatmulAlgo> out;
  Plan p;
  cublasStatus s = describeShape(m, n, k, yType, p);
  if (s == 0) s = heuristic(p, count, out);
  destroy(p);
  *status = s;
  return out;
}

cublasStatus LtGemm::planFor(const Key& key, const Plan** plan, const char** what) {
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    // Prefill batches bring a new m each; descriptors are small, but the cache stays bounded.
    if (plans_.size() >= kMaxPlans) {
      for (auto& [old, p] : plans_) destroy(p);
      plans_.clear();
    }
    const auto [m, n, k, yType] = key;
    Plan p;
    std::vector<cublasLtMatmulAlgo> best;
    *what = "cublasLt descriptors";
    cublasStatus s = describeShape(m, n, k, yType, p);
    if (s == 0) {
      *what = "cublasLtMatmulAlgoGetHeuristic";
      s = heuristic(p, 1, best);
      if (s == 0 && best.empty()) s = kCublasLtNoAlgorithm;
    }
    if (s != 0) {
      destroy(p);
      return s;
    }
    p.algo = best[0];
    it = plans_.emplace(key, p).first;
  }
  *plan = &it->second;
  return 0;
}

cublasStatus LtGemm::prepare(int m, int n, int k, int yType, const char** what) {
  const Plan* p = nullptr;
  return planFor(Key{m, n, k, yType}, &p, what);
}

cublasStatus LtGemm::choose(int m, int n, int k, int yType, const cublasLtMatmulAlgo& algo, const char** what) {
  const Plan* p = nullptr;
  if (cublasStatus s = planFor(Key{m, n, k, yType}, &p, what)) return s;
  plans_[Key{m, n, k, yType}].algo = algo;
  return 0;
}

cublasStatus LtGemm::run(CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y, int yType, CUstream stream,
                         const char** what, const cublasLtMatmulAlgo* algo, float beta) {
  const Plan* p = nullptr;
  if (cublasStatus s = planFor(Key{m, n, k, yType}, &p, what)) return s;
  const float one = 1.0f;
  *what = "cublasLtMatmul";
  return api_.matmul(handle_, p->desc, &one, reinterpret_cast<const void*>(w), p->a, reinterpret_cast<const void*>(x),
                     p->b, &beta, reinterpret_cast<const void*>(y), p->d, reinterpret_cast<void*>(y), p->d, algo ? algo : &p->algo,
                     reinterpret_cast<void*>(workspace_), workspaceBytes_, stream);
}

}  // namespace tandem::engine
