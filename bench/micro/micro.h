// Shared by the standalone CUDA microbenchmarks in this folder (each builds with one nvcc line).
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                    \
  do {                                                                              \
    cudaError_t e = (x);                                                            \
    if (e != cudaSuccess) {                                                         \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

// One piece (or part of one) to copy: source, destination, length in bytes.
struct Chunk {
  unsigned long long src, dst, bytes;
};

// GPU 0 and GPU 1 with peer access both ways, `bytes` on each: *a on GPU 0 (set to 1s), *b on GPU 1.
// Leaves GPU 0 current.
inline void peerPair(size_t bytes, char** a, char** b) {
  CHECK(cudaSetDevice(1));
  CHECK(cudaDeviceEnablePeerAccess(0, 0));
  CHECK(cudaMalloc(b, bytes));
  CHECK(cudaSetDevice(0));
  CHECK(cudaDeviceEnablePeerAccess(1, 0));
  CHECK(cudaMalloc(a, bytes));
  CHECK(cudaMemset(*a, 1, bytes));
}
