// Peer-copy microbenchmark, second round: can anything move 4096 scattered 64 KiB pieces GPU0 -> GPU1
// at 95% of one contiguous copy-engine copy? bench/micro/peer_copy.cu found SM load/store kernels of every
// shape capped near 93%. Tried here, each against the contiguous copy measured in the same run:
//   - the product's chunk kernel (native/kernels/copy.cu shape: 512 threads, 4 blocks per SM, 128 KiB chunks);
//   - TMA bulk copies (cp.async.bulk): HBM -> shared memory -> peer memory, one issuing thread per block;
//   - the SMs of both GPUs at once: GPU0 pushes part of the pieces while GPU1 pulls the rest;
//   - the SMs plus the copy engines: the kernel takes most pieces, per-piece copy-engine copies the rest.
//   nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a -o peer_copy_mix peer_copy_mix.cu && ./peer_copy_mix
#include <cuda_runtime.h>

#include "micro.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// The product's kernel (native/kernels/copy.cu), aligned path only.
__global__ void __launch_bounds__(512) chunkKernel(const Chunk* __restrict__ chunks, unsigned count) {
  for (unsigned c = blockIdx.x; c < count; c += gridDim.x) {
    const Chunk k = chunks[c];
    const uint4* __restrict__ s = reinterpret_cast<const uint4*>(k.src);
    uint4* __restrict__ d = reinterpret_cast<uint4*>(k.dst);
    const unsigned long long n = k.bytes >> 4;
    unsigned long long i = threadIdx.x;
    const unsigned long long step = blockDim.x;
    for (; i + 3 * step < n; i += 4 * step) {
      uint4 a = s[i], b = s[i + step], e = s[i + 2 * step], f = s[i + 3 * step];
      d[i] = a;
      d[i + step] = b;
      d[i + 2 * step] = e;
      d[i + 3 * step] = f;
    }
    for (; i < n; i += step) d[i] = s[i];
  }
}

// ---- TMA bulk copies --------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smemAddr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

template <int N>
__device__ __forceinline__ void bulkWaitRead() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Walks this block's segments: chunks blockIdx.x, +gridDim.x, ..., each cut into `seg`-byte segments.
struct Cursor {
  const Chunk* chunks;
  unsigned count, c, stride;
  unsigned long long off, seg;
  Chunk k;
  __device__ bool valid() const { return c < count; }
  __device__ void load() {
    if (c < count) k = chunks[c];
  }
  __device__ unsigned long long bytes() const { return min(seg, k.bytes - off); }
  __device__ void advance() {
    off += seg;
    if (off >= k.bytes) {
      off = 0;
      c += stride;
      load();
    }
  }
};

template <int NBUF, int LA>
__global__ void __launch_bounds__(32) tmaKernel(const Chunk* __restrict__ chunks, unsigned count, unsigned seg) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) unsigned long long bars[NBUF];
  if (threadIdx.x != 0) return;
  for (int i = 0; i < NBUF; ++i) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smemAddr(&bars[i])) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  const uint32_t base = smemAddr(smem);
  Cursor L{chunks, count, blockIdx.x, gridDim.x, 0, seg, {}};
  Cursor S = L;
  L.load();
  S.load();
  unsigned long long li = 0, si = 0;
  while (S.valid()) {
    while (L.valid() && li - si < LA) {
      const unsigned buf = li % NBUF;
      if (li >= NBUF) bulkWaitRead<NBUF - LA>();  // the store that last used `buf` has read it
      const uint32_t bar = smemAddr(&bars[buf]);
      const uint32_t n = static_cast<uint32_t>(L.bytes());
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(n) : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                       base + buf * seg),
                   "l"(L.k.src + L.off), "r"(n), "r"(bar)
                   : "memory");
      L.advance();
      ++li;
    }
    const unsigned buf = si % NBUF;
    const uint32_t bar = smemAddr(&bars[buf]);
    const uint32_t parity = (si / NBUF) & 1;
    uint32_t done = 0;
    while (!done) {
      asm volatile(
          "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
          : "=r"(done)
          : "r"(bar), "r"(parity)
          : "memory");
    }
    const uint32_t n = static_cast<uint32_t>(S.bytes());
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(S.k.dst + S.off), "r"(base + buf * seg),
                 "r"(n)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    S.advance();
    ++si;
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// Fills with a position-dependent pattern so that misplaced bytes are caught.
__global__ void pattern(uint32_t* p, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = static_cast<uint32_t>(i * 2654435761u + 12345u);
}

int main(int argc, char** argv) {
  const size_t piece = 64 << 10, pieces = 4096, total = piece * pieces;  // 256 MiB scattered
  const size_t pool = 1ull << 30;
  const int reps = argc > 1 ? std::atoi(argv[1]) : 20;
  const std::string mode = argc > 2 ? argv[2] : "all";  // all | first | pipe | same
  const bool first = mode == "all" || mode == "first";
  char *a, *b;
  CHECK(cudaSetDevice(1));
  CHECK(cudaDeviceEnablePeerAccess(0, 0));
  CHECK(cudaMalloc(&b, pool));
  cudaStream_t s1;
  CHECK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
  CHECK(cudaSetDevice(0));
  CHECK(cudaDeviceEnablePeerAccess(1, 0));
  CHECK(cudaMalloc(&a, pool));
  pattern<<<1024, 256>>>(reinterpret_cast<uint32_t*>(a), pool / 4);
  CHECK(cudaDeviceSynchronize());
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::vector<size_t> src(pieces), dst(pieces);
  for (size_t i = 0; i < pieces; ++i) {
    src[i] = ((i * 7919) % (pool / piece)) * piece;
    dst[i] = ((i * 104729 + 13) % (pool / piece)) * piece;
  }
  cudaStream_t s0, s2;
  CHECK(cudaStreamCreateWithFlags(&s0, cudaStreamNonBlocking));
  CHECK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
  cudaEvent_t fork, join, join1;
  CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  CHECK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
  CHECK(cudaSetDevice(1));
  CHECK(cudaEventCreateWithFlags(&join1, cudaEventDisableTiming));
  CHECK(cudaSetDevice(0));

  // Chunk tables: pieces [from, to) cut into `chunk`-byte chunks, pushed (on GPU0) or pulled (on GPU1).
  auto table = [&](size_t from, size_t to, size_t chunk, int device) {
    std::vector<Chunk> v;
    for (size_t i = from; i < to; ++i)
      for (size_t off = 0; off < piece; off += chunk)
        v.push_back({(unsigned long long)(a + src[i] + off), (unsigned long long)(b + dst[i] + off), std::min(chunk, piece - off)});
    Chunk* d;
    CHECK(cudaSetDevice(device));
    CHECK(cudaMalloc(&d, v.size() * sizeof(Chunk)));
    CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(Chunk), cudaMemcpyHostToDevice));
    CHECK(cudaSetDevice(0));
    return std::pair<Chunk*, unsigned>{d, static_cast<unsigned>(v.size())};
  };

  double contiguous = 0;
  auto time = [&](const char* name, auto body, size_t bytes, bool check) {
    cudaEvent_t e0, e1;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    if (check) {
      CHECK(cudaSetDevice(1));
      CHECK(cudaMemset(b, 0, pool));
      CHECK(cudaDeviceSynchronize());
      CHECK(cudaSetDevice(0));
    }
    for (int w = 0; w < 3; ++w) body();
    CHECK(cudaDeviceSynchronize());
    if (check) {
      std::vector<char> x(piece), y(piece);
      for (size_t i : {size_t(0), pieces / 3, pieces / 2, pieces - 200, pieces - 1}) {
        CHECK(cudaMemcpy(x.data(), a + src[i], piece, cudaMemcpyDefault));
        CHECK(cudaMemcpy(y.data(), b + dst[i], piece, cudaMemcpyDefault));
        if (std::memcmp(x.data(), y.data(), piece) != 0) {
          std::printf("%-64s WRONG BYTES in piece %zu\n", name, i);
          return;
        }
      }
    }
    std::vector<float> ms;
    for (int r = 0; r < reps; ++r) {
      CHECK(cudaEventRecord(e0, s0));
      body();
      CHECK(cudaEventRecord(e1, s0));
      CHECK(cudaEventSynchronize(e1));
      float t;
      CHECK(cudaEventElapsedTime(&t, e0, e1));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    double gbps = bytes / (ms[ms.size() / 2] * 1e6);
    if (contiguous == 0) contiguous = gbps;
    std::printf("%-64s %7.1f GB/s %6.1f%%  (p50 %.3f ms, best %.3f)%s\n", name, gbps, 100 * gbps / contiguous,
                ms[ms.size() / 2], ms[0], check ? "  bytes checked" : "");
    CHECK(cudaEventDestroy(e0));
    CHECK(cudaEventDestroy(e1));
  };
  char name[160];

  time("copy engine: one contiguous 256 MiB cudaMemcpyPeerAsync", [&] { CHECK(cudaMemcpyPeerAsync(b, 1, a, 0, total, s0)); }, total,
       false);

  for (size_t chunk : {128u << 10, 64u << 10}) {
    if (!first) break;
    auto [t, n] = table(0, pieces, chunk, 0);
    for (int perSm : {4, 2}) {
      unsigned grid = std::min<unsigned>(n, sms * perSm);
      std::snprintf(name, sizeof name, "product kernel: %zuK chunks, 512 thr x %u blocks", chunk >> 10, grid);
      time(name, [&] { chunkKernel<<<grid, 512, 0, s0>>>(t, n); }, total, chunk == (128u << 10) && perSm == 4);
    }
  }

  // TMA bulk copies.
  if (first) {
    auto [t, n] = table(0, pieces, piece, 0);
    auto runTma = [&](auto kernel, int nbuf, unsigned seg, unsigned grid, const char* shape) {
      size_t smem = size_t(nbuf) * seg;
      CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
      std::snprintf(name, sizeof name, "TMA bulk: %s, %uK segments, %u blocks", shape, seg >> 10, grid);
      time(name, [&] { kernel<<<grid, 32, smem, s0>>>(t, n, seg); }, total, true);
    };
    runTma(tmaKernel<8, 4>, 8, 16u << 10, sms, "8 buffers, 4 loads ahead");
    runTma(tmaKernel<8, 4>, 8, 8u << 10, sms * 2, "8 buffers, 4 loads ahead");
    runTma(tmaKernel<4, 2>, 4, 16u << 10, sms * 2, "4 buffers, 2 loads ahead");
    runTma(tmaKernel<12, 6>, 12, 16u << 10, sms, "12 buffers, 6 loads ahead");
    runTma(tmaKernel<6, 3>, 6, 32u << 10, sms, "6 buffers, 3 loads ahead");
    runTma(tmaKernel<8, 4>, 8, 8u << 10, sms * 3, "8 buffers, 4 loads ahead");
  }

  // Both GPUs' SMs: GPU0 pushes the first part, GPU1 pulls the rest.
  for (double f : {0.5, 0.6, 0.75}) {
    if (!first) break;
    size_t cut = static_cast<size_t>(pieces * f);
    auto [tp, np] = table(0, cut, 128u << 10, 0);
    auto [tq, nq] = table(cut, pieces, 128u << 10, 1);
    std::snprintf(name, sizeof name, "push %.0f%% on GPU0 + pull %.0f%% on GPU1", 100 * f, 100 * (1 - f));
    time(name, [&] {
      CHECK(cudaEventRecord(fork, s0));
      CHECK(cudaSetDevice(1));
      CHECK(cudaStreamWaitEvent(s1, fork, 0));
      chunkKernel<<<std::min<unsigned>(nq, sms * 4), 512, 0, s1>>>(tq, nq);
      CHECK(cudaEventRecord(join1, s1));
      CHECK(cudaSetDevice(0));
      chunkKernel<<<std::min<unsigned>(np, sms * 4), 512, 0, s0>>>(tp, np);
      CHECK(cudaStreamWaitEvent(s0, join1, 0));
    }, total, f == 0.5);
  }

  // SMs plus copy engines: the last k pieces go as one copy-engine copy each, on a second stream.
  for (size_t k : {32, 64, 128, 192, 256}) {
    if (!first) break;
    auto [t, n] = table(0, pieces - k, 128u << 10, 0);
    for (int perSm : {4}) {
      std::snprintf(name, sizeof name, "kernel %zu pieces + copy engine %zu pieces", pieces - k, k);
      time(name, [&] {
        CHECK(cudaEventRecord(fork, s0));
        CHECK(cudaStreamWaitEvent(s2, fork, 0));
        chunkKernel<<<std::min<unsigned>(n, sms * perSm), 512, 0, s0>>>(t, n);
        for (size_t i = pieces - k; i < pieces; ++i) CHECK(cudaMemcpyAsync(b + dst[i], a + src[i], piece, cudaMemcpyDefault, s2));
        CHECK(cudaEventRecord(join, s2));
        CHECK(cudaStreamWaitEvent(s0, join, 0));
      }, total, k == 128);
    }
  }
  // Copy engine pieces submitted first (they queue while the kernel launches).
  for (size_t k : {64, 128}) {
    if (!first) break;
    auto [t, n] = table(0, pieces - k, 128u << 10, 0);
    std::snprintf(name, sizeof name, "copy engine %zu pieces first, then kernel %zu", k, pieces - k);
    time(name, [&] {
      CHECK(cudaEventRecord(fork, s0));
      CHECK(cudaStreamWaitEvent(s2, fork, 0));
      for (size_t i = pieces - k; i < pieces; ++i) CHECK(cudaMemcpyAsync(b + dst[i], a + src[i], piece, cudaMemcpyDefault, s2));
      chunkKernel<<<std::min<unsigned>(n, sms * 4), 512, 0, s0>>>(t, n);
      CHECK(cudaEventRecord(join, s2));
      CHECK(cudaStreamWaitEvent(s0, join, 0));
    }, total, false);
  }
  // Staged: gather on GPU0 (local SM copies) -> one copy-engine copy per staging chunk -> scatter on GPU1
  // (local SM copies). Only the copy engines cross NVLink. `nb` staging slots of `chunkBytes` on each side.
  if (mode == "all" || mode == "pipe") {
    cudaStream_t gs, xs, ss;
    CHECK(cudaStreamCreateWithFlags(&gs, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&xs, cudaStreamNonBlocking));
    CHECK(cudaSetDevice(1));
    CHECK(cudaStreamCreateWithFlags(&ss, cudaStreamNonBlocking));
    CHECK(cudaSetDevice(0));
    const size_t maxSlots = 4, maxChunk = 32u << 20;
    char *st0, *st1;
    CHECK(cudaMalloc(&st0, maxSlots * maxChunk));
    CHECK(cudaSetDevice(1));
    CHECK(cudaMalloc(&st1, maxSlots * maxChunk));
    CHECK(cudaSetDevice(0));
    std::vector<cudaEvent_t> gathered(maxSlots), copied(maxSlots), scattered(maxSlots);
    for (size_t i = 0; i < maxSlots; ++i) {
      CHECK(cudaEventCreateWithFlags(&gathered[i], cudaEventDisableTiming));
      CHECK(cudaEventCreateWithFlags(&copied[i], cudaEventDisableTiming));
      CHECK(cudaSetDevice(1));
      CHECK(cudaEventCreateWithFlags(&scattered[i], cudaEventDisableTiming));
      CHECK(cudaSetDevice(0));
    }
    for (size_t chunkBytes : {4u << 20, 8u << 20, 16u << 20, 32u << 20}) {
      for (size_t nb : {2, 3, 4}) {
        for (int gridPerSm : {1, 2}) {
          const size_t per = chunkBytes / piece, chunks = pieces / per;
          // Gather table: chunk c's pieces -> slot (c % nb); scatter table: slot -> the pieces' destinations.
          std::vector<Chunk> gv, sv;
          for (size_t c = 0; c < chunks; ++c)
            for (size_t j = 0; j < per; ++j) {
              size_t i = c * per + j, off = (c % nb) * chunkBytes + j * piece;
              gv.push_back({(unsigned long long)(a + src[i]), (unsigned long long)(st0 + off), piece});
              sv.push_back({(unsigned long long)(st1 + off), (unsigned long long)(b + dst[i]), piece});
            }
          Chunk *gt, *stt;
          CHECK(cudaMalloc(&gt, gv.size() * sizeof(Chunk)));
          CHECK(cudaMemcpy(gt, gv.data(), gv.size() * sizeof(Chunk), cudaMemcpyHostToDevice));
          CHECK(cudaSetDevice(1));
          CHECK(cudaMalloc(&stt, sv.size() * sizeof(Chunk)));
          CHECK(cudaMemcpy(stt, sv.data(), sv.size() * sizeof(Chunk), cudaMemcpyHostToDevice));
          CHECK(cudaSetDevice(0));
          const unsigned grid = std::min<unsigned>(per, sms * gridPerSm);
          std::snprintf(name, sizeof name, "staged: %zu MiB chunks x %zu slots, gather/scatter %u blocks", chunkBytes >> 20, nb, grid);
          time(name, [&] {
            CHECK(cudaEventRecord(fork, s0));
            CHECK(cudaStreamWaitEvent(gs, fork, 0));
            CHECK(cudaStreamWaitEvent(xs, fork, 0));
            CHECK(cudaSetDevice(1));
            CHECK(cudaStreamWaitEvent(ss, fork, 0));
            CHECK(cudaSetDevice(0));
            for (size_t c = 0; c < chunks; ++c) {
              const size_t slot = c % nb;
              if (c >= nb) CHECK(cudaStreamWaitEvent(gs, copied[slot], 0));
              chunkKernel<<<grid, 512, 0, gs>>>(gt + c * per, per);
              CHECK(cudaEventRecord(gathered[slot], gs));
              CHECK(cudaStreamWaitEvent(xs, gathered[slot], 0));
              if (c >= nb) CHECK(cudaStreamWaitEvent(xs, scattered[slot], 0));
              CHECK(cudaMemcpyAsync(st1 + slot * chunkBytes, st0 + slot * chunkBytes, chunkBytes, cudaMemcpyDefault, xs));
              CHECK(cudaEventRecord(copied[slot], xs));
              CHECK(cudaSetDevice(1));
              CHECK(cudaStreamWaitEvent(ss, copied[slot], 0));
              chunkKernel<<<grid, 512, 0, ss>>>(stt + c * per, per);
              CHECK(cudaEventRecord(scattered[slot], ss));
              CHECK(cudaSetDevice(0));
            }
            CHECK(cudaSetDevice(1));
            CHECK(cudaEventRecord(join1, ss));
            CHECK(cudaSetDevice(0));
            CHECK(cudaStreamWaitEvent(s0, join1, 0));
          }, total, nb == 2 && gridPerSm == 1);
          CHECK(cudaDeviceSynchronize());
          CHECK(cudaFree(gt));
          CHECK(cudaFree(stt));
        }
      }
    }
  }

  // Same GPU: 16384 x 64 KiB within GPU0 against one contiguous device-to-device copy of 1 GiB.
  if (mode == "all" || mode == "same") {
    const size_t spieces = 16384, stotal = spieces * piece;
    char* c0;
    CHECK(cudaMalloc(&c0, stotal));
    std::vector<Chunk> v;
    for (size_t i = 0; i < spieces; ++i) {
      size_t so = ((i * 7919) % (pool / piece)) * piece, d = ((i * 104729 + 13) % spieces) * piece;
      v.push_back({(unsigned long long)(a + so), (unsigned long long)(c0 + d), piece});
    }
    Chunk* t;
    CHECK(cudaMalloc(&t, v.size() * sizeof(Chunk)));
    CHECK(cudaMemcpy(t, v.data(), v.size() * sizeof(Chunk), cudaMemcpyHostToDevice));
    unsigned n = v.size();
    double saved = contiguous;
    contiguous = 0;
    time("same GPU: one contiguous 1 GiB device-to-device cudaMemcpyAsync", [&] { CHECK(cudaMemcpyAsync(c0, a, stotal, cudaMemcpyDeviceToDevice, s0)); }, stotal, false);
    for (int perSm : {4, 2, 1}) {
      std::snprintf(name, sizeof name, "same GPU: product kernel 512 thr x %d per SM", perSm);
      time(name, [&] { chunkKernel<<<sms * perSm, 512, 0, s0>>>(t, n); }, stotal, false);
    }
    {
      auto k = tmaKernel<8, 4>;
      size_t smem = 8 * (16u << 10);
      CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
      time("same GPU: TMA bulk 8 x 16K, 132 blocks", [&] { k<<<sms, 32, smem, s0>>>(t, n, 16u << 10); }, stotal, false);
      time("same GPU: TMA bulk 8 x 16K, 264 blocks (if 2 fit)", [&] { k<<<sms * 2, 32, smem / 2 * 2, s0>>>(t, n, 16u << 10); }, stotal, false);
      auto k2 = tmaKernel<4, 2>;
      CHECK(cudaFuncSetAttribute(k2, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(4 * (16u << 10))));
      time("same GPU: TMA bulk 4 x 16K, 396 blocks", [&] { k2<<<sms * 3, 32, 4 * (16u << 10), s0>>>(t, n, 16u << 10); }, stotal, false);
    }
    contiguous = saved;
  }
  time("copy engine: one contiguous 256 MiB cudaMemcpyPeerAsync (again)", [&] { CHECK(cudaMemcpyPeerAsync(b, 1, a, 0, total, s0)); },
       total, false);
  std::printf("done\n");
  return 0;
}
