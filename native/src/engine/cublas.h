// cuBLAS, loaded at first use with dlopen (nothing links against it): the GPU engine's GEMMs. Only the entry
// points Tandem calls are declared, with the ABI of cublas_api.h (12.x and 13.x agree on them).
#pragma once

#include <string>
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

}  // namespace tandem::engine
