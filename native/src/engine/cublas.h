// cuBLAS and cuBLASLt, loaded at first use with dlopen (nothing links against them): the GPU engine's GEMMs.
// Only the entry points Tandem calls are declared, with the ABI of cublas_api.h and cublasLt.h (12.x and 13.x
// agree on them).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "../cuda_api.h"

namespace tandem::engine {

using cublasStatus = int;
using cublasHandle = struct cublasContext*;

constexpr int kCublasOpN = 0, kCublasOpT = 1;          // cublasOperation_t
constexpr int kCudaR32F = 0, kCudaR16BF = 14;           // cudaDataType_t
constexpr int kCublasCompute32F = 68;                   // cublasComputeType_t
constexpr int kCublasGemmDefault = -1;                  // cublasGemmAlgo_t

struct CublasApi {
  bool available = false;
  std::string path;    // the library that loaded
  std::string reason;  // why not, when unavailable

  cublasStatus (*create)(cublasHandle*) = nullptr;
  cublasStatus (*destroy)(cublasHandle) = nullptr;
  cublasStatus (*setStream)(cublasHandle, CUstream) = nullptr;
  cublasStatus (*gemmEx)(cublasHandle, int transa, int transb, int m, int n, int k, const void* alpha,
                         const void* A, int Atype, int lda, const void* B, int Btype, int ldb, const void* beta,
                         void* C, int Ctype, int ldc, int computeType, int algo) = nullptr;
  const char* (*statusString)(cublasStatus) = nullptr;

  // "CUBLAS_STATUS_NOT_SUPPORTED (13)"
  std::string describe(cublasStatus status) const;
};

// Loads cuBLAS once per process (thread-safe) from the first candidate that opens and has every entry point;
// later calls return the same object. Never freed (function pointers and strings only).
const CublasApi& loadCublas(const std::vector<std::string>& candidates);

// ---- cuBLASLt (cublasLt.h) ----
using cublasLtHandle = struct cublasLtContext*;
using cublasLtMatmulDesc = struct cublasLtMatmulDescOpaque*;
using cublasLtMatrixLayout = struct cublasLtMatrixLayoutOpaque*;
using cublasLtMatmulPreference = struct cublasLtMatmulPreferenceOpaque*;
struct cublasLtMatmulAlgo {
  uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult {
  cublasLtMatmulAlgo algo;
  size_t workspaceSize;
  cublasStatus state;
  float wavesCount;
  int reserved[4];
};
constexpr int kCublasLtMatmulDescTransA = 3, kCublasLtMatmulDescTransB = 4;  // cublasLtMatmulDescAttributes_t
constexpr int kCublasLtPrefMaxWorkspaceBytes = 1;                            // cublasLtMatmulPreferenceAttributes_t

struct CublasLtApi {
  bool available = false;
  std::string path;
  std::string reason;

  cublasStatus (*create)(cublasLtHandle*) = nullptr;
  cublasStatus (*destroy)(cublasLtHandle) = nullptr;
  cublasStatus (*matmulDescCreate)(cublasLtMatmulDesc*, int computeType, int scaleType) = nullptr;
  cublasStatus (*matmulDescDestroy)(cublasLtMatmulDesc) = nullptr;
  cublasStatus (*matmulDescSetAttribute)(cublasLtMatmulDesc, int attr, const void* buf, size_t bytes) = nullptr;
  cublasStatus (*matrixLayoutCreate)(cublasLtMatrixLayout*, int type, uint64_t rows, uint64_t cols, int64_t ld) = nullptr;
  cublasStatus (*matrixLayoutDestroy)(cublasLtMatrixLayout) = nullptr;
  cublasStatus (*preferenceCreate)(cublasLtMatmulPreference*) = nullptr;
  cublasStatus (*preferenceDestroy)(cublasLtMatmulPreference) = nullptr;
  cublasStatus (*preferenceSetAttribute)(cublasLtMatmulPreference, int attr, const void* buf, size_t bytes) = nullptr;
  cublasStatus (*algoGetHeuristic)(cublasLtHandle, cublasLtMatmulDesc, cublasLtMatrixLayout A, cublasLtMatrixLayout B,
                                   cublasLtMatrixLayout C, cublasLtMatrixLayout D, cublasLtMatmulPreference,
                                   int requested, cublasLtMatmulHeuristicResult* results, int* returned) = nullptr;
  cublasStatus (*matmul)(cublasLtHandle, cublasLtMatmulDesc, const void* alpha, const void* A, cublasLtMatrixLayout,
                         const void* B, cublasLtMatrixLayout, const void* beta, const void* C, cublasLtMatrixLayout,
                         void* D, cublasLtMatrixLayout, const cublasLtMatmulAlgo* algo, void* workspace,
                         size_t workspaceBytes, CUstream stream) = nullptr;
  const char* (*statusString)(cublasStatus) = nullptr;  // optional

  std::string describe(cublasStatus status) const;
};

constexpr cublasStatus kCublasLtNoAlgorithm = -1000;  // Tandem's: no heuristic result for a shape

// As loadCublas, for libcublasLt (its own once-per-process load).
const CublasLtApi& loadCublasLt(const std::vector<std::string>& candidates);

// The algorithms autotuning chose, shared by every runner of the process on a device (`device`: its ordinal):
// tensor-parallel ranks, and runners that tests compare bit for bit, then run a shape with the same algorithm
// whichever tuned it first (timings differ from one tuning to the next). Thread-safe; nothing is held while tuning.
// tunedAlgo: whether one is registered for the shape (and it, in *algo). registerTunedAlgo: registers `algo` unless
// one is already (bounded: the registry empties when it fills); returns the registered one.
bool tunedAlgo(int device, int m, int n, int k, int yType, cublasLtMatmulAlgo* algo);
cublasLtMatmulAlgo registerTunedAlgo(int device, int m, int n, int k, int yType, const cublasLtMatmulAlgo& algo);

// y[m, n] = x[m, k] . w[n, k]^T (x, w bf16 row-major; y fp32 or bf16) through cublasLtMatmul, with the algorithm
// cuBLASLt's heuristic ranks first for the shape, or the one the caller chose (choose(): the engine times the
// heuristic's top candidates), kept once per (m, n, k, y type) with its descriptors. prepare() does the choosing
// ahead of a CUDA-graph capture (the engine's prepareGemms), so that a captured run() only enqueues; the
// workspace is caller-owned device memory, allocated once. One thread.
class LtGemm {
 public:
  explicit LtGemm(const CublasLtApi& api) : api_(api) {}
  ~LtGemm() { release(); }
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // Creates the handle; `workspace` (bytes long, 256-byte aligned) stays the caller's. Returns a status.
  cublasStatus init(CUdeviceptr workspace, size_t bytes);
  // Destroys the cached descriptors and the handle. Idempotent.
  void release();
  // Chooses and keeps the shape's algorithm and descriptors without running anything (before a graph capture).
  // Returns 0, or the status of the step that failed (`what` names it); kCublasLtNoAlgorithm when the heuristic
  // offers nothing for the shape.
  cublasStatus prepare(int m, int n, int k, int yType, const char** what);
  // Enqueues the product on `stream` (prepare() first where the shape is new) with the chosen algorithm, or with
  // `algo` when given (one of candidates()). beta 1 adds it to y (y += x . w^T: cuBLASLt's C = D = y, in place);
  // the kept algorithm serves either. Returns as prepare().
  cublasStatus run(CUdeviceptr x, int m, int k, CUdeviceptr w, int n, CUdeviceptr y, int yType, CUstream stream,
                   const char** what, const cublasLtMatmulAlgo* algo = nullptr, float beta = 0.0f);
  // The heuristic's top `count` algorithms for the shape, best ranked first (the engine's autotuning and the micro
  // benchmark time them).
  std::vector<cublasLtMatmulAlgo> candidates(int m, int n, int k, int yType, int count, cublasStatus* status);
  // Whether the shape has a kept algorithm (prepare(), run() or choose() saw it).
  bool has(int m, int n, int k, int yType) const { return plans_.count(Key{m, n, k, yType}) != 0; }
  // Keeps `algo` (one of candidates()) for the shape from now on. Returns as prepare().
  cublasStatus choose(int m, int n, int k, int yType, const cublasLtMatmulAlgo& algo, const char** what);
  size_t shapesCached() const { return plans_.size(); }

 private:
  struct Plan {
    cublasLtMatmulDesc desc = nullptr;
    cublasLtMatrixLayout a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo algo{};
  };
  using Key = std::tuple<int, int, int, int>;  // m, n, k, y type
  static constexpr size_t kMaxPlans = 4096;
  cublasStatus planFor(const Key& key, const Plan** plan, const char** what);
  cublasStatus describeShape(int m, int n, int k, int yType, Plan& p) const;
  cublasStatus heuristic(const Plan& p, int count, std::vector<cublasLtMatmulAlgo>& out) const;
  void destroy(Plan& p) const;

  const CublasLtApi& api_;
  cublasLtHandle handle_ = nullptr;
  CUdeviceptr workspace_ = 0;
  size_t workspaceBytes_ = 0;
  std::map<Key, Plan> plans_;
};

}  // namespace tandem::engine
