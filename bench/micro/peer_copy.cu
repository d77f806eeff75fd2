// Peer-copy microbenchmark: what moves scattered KV pieces GPU0 -> GPU1 fastest over NVLink?
// One process, both GPUs, peer access enabled. Compares the copy engine (one contiguous copy; many
// async copies; cudaMemcpyBatchAsync) with SM-driven chunk-copy kernels of several shapes, pushing
// (GPU0 stores into GPU1) and pulling (GPU1 loads from GPU0).
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o peer_copy peer_copy.cu && ./peer_copy
#include <cuda_runtime.h>

#include "micro.h"

#include <algorithm>
#include <cstdio>
#include <vector>

template <int UNROLL>
__global__ void copyChunks(const Chunk* __restrict__ chunks, unsigned count) {
  for (unsigned c = blockIdx.x; c < count; c += gridDim.x) {
    const Chunk k = chunks[c];
    const uint4* __restrict__ s = reinterpret_cast<const uint4*>(k.src);
    uint4* __restrict__ d = reinterpret_cast<uint4*>(k.dst);
    const unsigned long long n = k.bytes >> 4;
    unsigned long long i = threadIdx.x;
    const unsigned long long step = blockDim.x;
    for (; i + (UNROLL - 1) * step < n; i += UNROLL * step) {
      uint4 v[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) v[u] = s[i + u * step];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) d[i + u * step] = v[u];
    }
    for (; i < n; i += step) d[i] = s[i];
  }
}

__global__ void copyChunksCs(const Chunk* __restrict__ chunks, unsigned count) {
  for (unsigned c = blockIdx.x; c < count; c += gridDim.x) {
    const Chunk k = chunks[c];
    const uint4* s = reinterpret_cast<const uint4*>(k.src);
    uint4* d = reinterpret_cast<uint4*>(k.dst);
    const unsigned long long n = k.bytes >> 4;
    for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) __stcs(d + i, __ldcs(s + i));
  }
}

// Warp-per-chunk variant: each warp walks its own chunk (better for many small pieces).
__global__ void copyChunksWarp(const Chunk* __restrict__ chunks, unsigned count) {
  unsigned warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  unsigned warps = (gridDim.x * blockDim.x) >> 5;
  for (unsigned c = warp; c < count; c += warps) {
    const Chunk k = chunks[c];
    const uint4* s = reinterpret_cast<const uint4*>(k.src);
    uint4* d = reinterpret_cast<uint4*>(k.dst);
    unsigned long long n = k.bytes >> 4, i = lane;
    for (; i + 96 < n; i += 128) {
      uint4 a = s[i], b = s[i + 32], e = s[i + 64], f = s[i + 96];
      d[i] = a; d[i + 32] = b; d[i + 64] = e; d[i + 96] = f;
    }
    for (; i < n; i += 32) d[i] = s[i];
  }
}

int main() {
  const size_t piece = 64 << 10, pieces = 4096, total = piece * pieces;  // 256 MiB scattered
  const size_t pool = 1ull << 30;
  char *a, *b;
  peerPair(pool, &a, &b);
  std::vector<size_t> src(pieces), dst(pieces);
  for (size_t i = 0; i < pieces; ++i) {
    src[i] = ((i * 7919) % (pool / piece)) * piece;
    dst[i] = ((i * 104729 + 13) % (pool / piece)) * piece;
  }
  cudaStream_t s0, s1 = nullptr;
  CHECK(cudaStreamCreateWithFlags(&s0, cudaStreamNonBlocking));
  auto time = [&](const char* name, cudaStream_t s, auto body, size_t bytes) {
    cudaEvent_t e0, e1;  // on the current device, which owns stream s
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    for (int w = 0; w < 3; ++w) body();
    CHECK(cudaStreamSynchronize(s));
    std::vector<float> ms;
    for (int r = 0; r < 20; ++r) {
      CHECK(cudaEventRecord(e0, s));
      body();
      CHECK(cudaEventRecord(e1, s));
      CHECK(cudaEventSynchronize(e1));
      float t;
      CHECK(cudaEventElapsedTime(&t, e0, e1));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    std::printf("%-58s %8.1f GB/s  (p50 %.3f ms)\n", name, bytes / (ms[10] * 1e6), ms[10]);
    CHECK(cudaEventDestroy(e0));
    CHECK(cudaEventDestroy(e1));
  };

  time("copy engine: one contiguous 256 MiB cudaMemcpyPeerAsync", s0, [&] { CHECK(cudaMemcpyPeerAsync(b, 1, a, 0, total, s0)); }, total);
  time("copy engine: one contiguous 1 GiB cudaMemcpyPeerAsync", s0, [&] { CHECK(cudaMemcpyPeerAsync(b, 1, a, 0, pool, s0)); }, pool);
  time("copy engine: 4096 x 64 KiB cudaMemcpyAsync", s0, [&] {
    for (size_t i = 0; i < pieces; ++i) CHECK(cudaMemcpyAsync(b + dst[i], a + src[i], piece, cudaMemcpyDefault, s0));
  }, total);
  for (size_t big : {2u << 20, 5u << 20}) {
    size_t n = (256u << 20) / big * 2;
    std::vector<size_t> so(n), dof(n);
    for (size_t i = 0; i < n; ++i) { so[i] = ((i * 7) % (pool / big)) * big; dof[i] = ((i * 11 + 3) % (pool / big)) * big; }
    char name[96];
    std::snprintf(name, sizeof name, "copy engine: %zu x %zu MiB cudaMemcpyAsync", n, big >> 20);
    time(name, s0, [&] { for (size_t i = 0; i < n; ++i) CHECK(cudaMemcpyAsync(b + dof[i], a + so[i], big, cudaMemcpyDefault, s0)); }, n * big);
  }
#if CUDART_VERSION >= 12080
  {
    std::vector<void*> ds(pieces), ss(pieces);
    std::vector<size_t> sz(pieces, piece);
    for (size_t i = 0; i < pieces; ++i) { ds[i] = b + dst[i]; ss[i] = a + src[i]; }
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t attrIdx = 0;
    time("copy engine: cudaMemcpyBatchAsync 4096 x 64 KiB", s0, [&] {
      CHECK(cudaMemcpyBatchAsync(ds.data(), ss.data(), sz.data(), pieces, &attr, &attrIdx, 1, s0));
    }, total);
  }
#endif
  for (size_t chunkKiB : {64, 128, 256}) {
    std::vector<Chunk> push, pull;
    for (size_t i = 0; i < pieces; ++i)
      for (size_t off = 0; off < piece; off += chunkKiB << 10) {
        size_t n = std::min(chunkKiB << 10, piece - off);
        push.push_back({(unsigned long long)(a + src[i] + off), (unsigned long long)(b + dst[i] + off), n});
      }
    pull = push;
    Chunk* dpush; Chunk* dpull;
    CHECK(cudaSetDevice(0));
    CHECK(cudaMalloc(&dpush, push.size() * sizeof(Chunk)));
    CHECK(cudaMemcpy(dpush, push.data(), push.size() * sizeof(Chunk), cudaMemcpyHostToDevice));
    CHECK(cudaSetDevice(1));
    if (!s1) CHECK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CHECK(cudaMalloc(&dpull, pull.size() * sizeof(Chunk)));
    CHECK(cudaMemcpy(dpull, pull.data(), pull.size() * sizeof(Chunk), cudaMemcpyHostToDevice));
    CHECK(cudaSetDevice(0));
    unsigned count = push.size();
    char name[128];
    for (int threads : {512, 1024}) {
      for (int blocksPerSm : {1, 2}) {
        if (threads * blocksPerSm > 2048) continue;
        unsigned grid = std::min<unsigned>(count, 132 * blocksPerSm);
        std::snprintf(name, sizeof name, "push kernel chunk %zuK, %d thr x %u blocks, unroll 4", chunkKiB, threads, grid);
        time(name, s0, [&] { copyChunks<4><<<grid, threads, 0, s0>>>(dpush, count); }, total);
      }
    }
    unsigned grid = std::min<unsigned>(count, 132 * 2);
    std::snprintf(name, sizeof name, "push kernel chunk %zuK, 1024 thr x %u, unroll 8", chunkKiB, grid);
    time(name, s0, [&] { copyChunks<8><<<grid, 1024, 0, s0>>>(dpush, count); }, total);
    std::snprintf(name, sizeof name, "push warp-per-chunk %zuK, 512 thr x 528", chunkKiB);
    time(name, s0, [&] { copyChunksWarp<<<528, 512, 0, s0>>>(dpush, count); }, total);
    CHECK(cudaSetDevice(1));
    std::snprintf(name, sizeof name, "pull kernel (on GPU1) chunk %zuK, 512 thr x 264, unroll 4", chunkKiB);
    time(name, s1, [&] { copyChunks<4><<<264, 512, 0, s1>>>(dpull, count); }, total);
    std::snprintf(name, sizeof name, "pull kernel (on GPU1) chunk %zuK, 1024 thr x 264, unroll 8", chunkKiB);
    time(name, s1, [&] { copyChunks<8><<<264, 1024, 0, s1>>>(dpull, count); }, total);
    CHECK(cudaSetDevice(0));
  }
  // Streaming-store variant: bypass L2 write-allocate on the remote side.
  {
    std::vector<Chunk> push;
    for (size_t i = 0; i < pieces; ++i) push.push_back({(unsigned long long)(a + src[i]), (unsigned long long)(b + dst[i]), piece});
    Chunk* d;
    CHECK(cudaMalloc(&d, push.size() * sizeof(Chunk)));
    CHECK(cudaMemcpy(d, push.data(), push.size() * sizeof(Chunk), cudaMemcpyHostToDevice));
    unsigned count = push.size();
    time("push kernel, streaming stores (__stcs), 512 thr x 264", s0, [&] { copyChunksCs<<<264, 512, 0, s0>>>(d, count); }, total);
    // Copy engine and SMs at once: half the pieces each, on two streams.
    cudaStream_t s2;
    CHECK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
    cudaEvent_t fork, join;
    CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    CHECK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
    time("hybrid: kernel 3/4 of pieces + copy engine 1/4, two streams", s0, [&] {
      CHECK(cudaEventRecord(fork, s0));
      CHECK(cudaStreamWaitEvent(s2, fork, 0));
      copyChunks<4><<<264, 512, 0, s0>>>(d, count * 3 / 4);
      for (size_t i = count * 3 / 4; i < count; ++i) CHECK(cudaMemcpyAsync(b + dst[i], a + src[i], piece, cudaMemcpyDefault, s2));
      CHECK(cudaEventRecord(join, s2));
      CHECK(cudaStreamWaitEvent(s0, join, 0));
    }, total);
  }
  std::printf("done\n");
  return 0;
}
