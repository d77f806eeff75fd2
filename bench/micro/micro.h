// Shared by the standalone CUDA microbenchmarks in this folder (each builds with one nvcc line).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

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

// Median over `batches` of the mean time (ms) of `reps` calls of run(i), i counting through the calls (after
// three warm-up calls), timed with CUDA events on the default stream.
template <typename Run>
double timeMs(Run run, int reps, int batches = 5) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) run(i);  // warm-up
  CHECK(cudaGetLastError());
  std::vector<float> ms;
  int call = 0;
  for (int t = 0; t < batches; ++t) {
    CHECK(cudaEventRecord(a));
    for (int i = 0; i < reps; ++i) run(call++);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    CHECK(cudaGetLastError());
    float v;
    CHECK(cudaEventElapsedTime(&v, a, b));
    ms.push_back(v / reps);
  }
  std::sort(ms.begin(), ms.end());
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return ms[ms.size() / 2];
}
