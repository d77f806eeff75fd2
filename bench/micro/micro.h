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
