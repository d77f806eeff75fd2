// Can the copy engines move scattered pieces GPU0 -> GPU1 at the contiguous rate when the host's
// submission cost is taken off the timed path? Each case's copies are queued behind a gate (a kernel
// spinning on a host flag), so the events time the GPU alone; then the same work as a CUDA graph,
// timed with its launch. Copies are spread over S streams (several copy engines may run at once).
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o ce_scatter ce_scatter.cu && ./ce_scatter
#include <cuda_runtime.h>

#include "micro.h"

#include <algorithm>
#include <atomic>
#include <string>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

__global__ void gate(volatile int* flag) {
  while (*flag == 0) {
  }
}

__global__ void hog(unsigned long long cycles) {
  unsigned long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

struct Piece {
  size_t src, dst, bytes;
};

// `./ce_scatter sched [ipc]`: only the sub-batch schedules, end to end; with `ipc` the destination is GPU 1
// memory of a child process, opened through CUDA IPC (as Tandem's cuda-ipc backend sees it).
int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const bool schedOnly = argc > 1 && std::string(argv[1]) == "sched";
  const bool ipc = argc > 2 && std::string(argv[2]) == "ipc";
  const size_t pool = 1ull << 30;
  char *a, *b;
  int toParent[2], toChild[2];
  if (ipc) {
    if (pipe(toParent) != 0 || pipe(toChild) != 0) return 1;
    if (fork() == 0) {  // the child: GPU 1 memory, exported; lives until the parent is done
      char* mem;
      CHECK(cudaSetDevice(1));
      CHECK(cudaMalloc(&mem, pool));
      cudaIpcMemHandle_t h;
      CHECK(cudaIpcGetMemHandle(&h, mem));
      if (write(toParent[1], &h, sizeof h) != sizeof h) return 1;
      char done;
      if (read(toChild[0], &done, 1) < 0) return 1;
      return 0;
    }
    cudaIpcMemHandle_t h;
    if (read(toParent[0], &h, sizeof h) != sizeof h) return 1;
    CHECK(cudaSetDevice(0));
    CHECK(cudaIpcOpenMemHandle(reinterpret_cast<void**>(&b), h, cudaIpcMemLazyEnablePeerAccess));
    CHECK(cudaMalloc(&a, pool));
    CHECK(cudaMemset(a, 1, pool));
  } else {
    peerPair(pool, &a, &b);
  }
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, asyncEngineCount %d\n", prop.name, prop.asyncEngineCount);
  int* flag;
  CHECK(cudaHostAlloc(&flag, sizeof(int), cudaHostAllocMapped));
  const int maxStreams = 32;
  std::vector<cudaStream_t> st(maxStreams);
  for (auto& s : st) CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  std::vector<cudaEvent_t> joins(maxStreams);
  for (auto& ev : joins) CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  cudaEvent_t fork, e0, e1;
  CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  cudaStream_t s0 = st[0];

  // One cudaMemcpyBatchAsync of pieces [lo, hi) on stream s.
  auto batchCall = [&](const std::vector<Piece>& pieces, unsigned flags, cudaStream_t s, cudaMemcpySrcAccessOrder order = cudaMemcpySrcAccessOrderStream, size_t lo = 0, size_t hi = SIZE_MAX) {
    hi = std::min(hi, pieces.size());
    std::vector<void*> ds, ss;
    std::vector<size_t> sz;
    for (size_t i = lo; i < hi; ++i) {
      ds.push_back(b + pieces[i].dst);
      ss.push_back(a + pieces[i].src);
      sz.push_back(pieces[i].bytes);
    }
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = order;
    attr.flags = flags;
    size_t idx = 0;
    CHECK(cudaMemcpyBatchAsync(ds.data(), ss.data(), sz.data(), ds.size(), &attr, &idx, 1, s));
  };
  // Queues `pieces` over `streams` streams after `fork` (recorded on s0), joined back into s0.
  auto enqueue = [&](const std::vector<Piece>& pieces, int streams, bool batch) {
    CHECK(cudaEventRecord(fork, s0));
    for (int k = 1; k < streams; ++k) CHECK(cudaStreamWaitEvent(st[k], fork, 0));
    size_t per = (pieces.size() + streams - 1) / streams;
    for (int k = 0; k < streams; ++k) {
      size_t lo = k * per, hi = std::min(pieces.size(), lo + per);
      if (lo >= hi) continue;
      if (batch) {
        batchCall(pieces, 0, st[k], cudaMemcpySrcAccessOrderStream, lo, hi);
      } else {
        for (size_t i = lo; i < hi; ++i)
          CHECK(cudaMemcpyAsync(b + pieces[i].dst, a + pieces[i].src, pieces[i].bytes, cudaMemcpyDefault, st[k]));
      }
    }
    for (int k = 1; k < streams; ++k) {
      CHECK(cudaEventRecord(joins[k], st[k]));
      CHECK(cudaStreamWaitEvent(s0, joins[k], 0));
    }
  };
  auto report = [&](const char* name, std::vector<float>& ms, size_t bytes, double hostUs) {
    std::sort(ms.begin(), ms.end());
    float p50 = ms[ms.size() / 2];
    std::printf("%-64s %7.1f GB/s  p50 %.3f ms  host %.1f us\n", name, bytes / (p50 * 1e6), p50, hostUs);
  };
  // Gated: host queues everything first, then opens the gate; e0..e1 is GPU time only. A stream's queue
  // holds only so many operations: when the host blocks on a full queue, a watchdog opens the gate after
  // 50 ms, and the row is marked (its time then includes submission).
  auto gated = [&](const char* name, const std::vector<Piece>& pieces, int streams, bool batch) {
    size_t bytes = 0;
    for (auto& p : pieces) bytes += p.bytes;
    std::vector<float> ms;
    double hostUs = 0;
    bool blocked = false;
    for (int r = 0; r < 12; ++r) {
      *(volatile int*)flag = 0;
      gate<<<1, 1, 0, s0>>>(flag);
      CHECK(cudaEventRecord(e0, s0));
      std::atomic<bool> queued{false};
      std::thread watchdog([&] {
        auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(50);
        while (!queued.load() && std::chrono::steady_clock::now() < until) std::this_thread::yield();
        if (!queued.load()) blocked = true;
        *(volatile int*)flag = 1;
      });
      auto h0 = std::chrono::steady_clock::now();
      enqueue(pieces, streams, batch);
      hostUs = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - h0).count();
      CHECK(cudaEventRecord(e1, s0));
      queued.store(true);
      watchdog.join();
      CHECK(cudaEventSynchronize(e1));
      float t;
      CHECK(cudaEventElapsedTime(&t, e0, e1));
      if (r >= 2) ms.push_back(t);
    }
    char full[160];
    std::snprintf(full, sizeof full, "%s%s", name, blocked ? " [queue full: includes submission]" : "");
    report(full, ms, bytes, hostUs);
  };
  // As a CUDA graph (captured once), launched with the stream idle: launch included.
  auto graphed = [&](const char* name, const std::vector<Piece>& pieces, int streams) {
    size_t bytes = 0;
    for (auto& p : pieces) bytes += p.bytes;
    cudaGraph_t g;
    cudaGraphExec_t ge;
    auto c0 = std::chrono::steady_clock::now();
    CHECK(cudaStreamBeginCapture(s0, cudaStreamCaptureModeThreadLocal));
    enqueue(pieces, streams, false);
    CHECK(cudaStreamEndCapture(s0, &g));
    CHECK(cudaGraphInstantiate(&ge, g, 0));
    double buildMs = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - c0).count();
    CHECK(cudaGraphUpload(ge, s0));
    CHECK(cudaStreamSynchronize(s0));
    std::vector<float> ms;
    double hostUs = 0;
    for (int r = 0; r < 12; ++r) {
      CHECK(cudaEventRecord(e0, s0));
      auto h0 = std::chrono::steady_clock::now();
      CHECK(cudaGraphLaunch(ge, s0));
      hostUs = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - h0).count();
      CHECK(cudaEventRecord(e1, s0));
      CHECK(cudaEventSynchronize(e1));
      float t;
      CHECK(cudaEventElapsedTime(&t, e0, e1));
      if (r >= 2) ms.push_back(t);
    }
    char full[160];
    std::snprintf(full, sizeof full, "%s (build %.1f ms)", name, buildMs);
    report(full, ms, bytes, hostUs);
    CHECK(cudaGraphExecDestroy(ge));
    CHECK(cudaGraphDestroy(g));
  };

  // GPU time (gated), host time of the call, and end to end (ungated).
  auto batchCase = [&](const char* label, const std::vector<Piece>& pieces, unsigned flags) {
    size_t bytes = 0;
    for (auto& p : pieces) bytes += p.bytes;
    std::vector<float> gpu, wall;
    double hostUs = 0;
    for (int r = 0; r < 12; ++r) {
      *(volatile int*)flag = 0;
      gate<<<1, 1, 0, s0>>>(flag);
      CHECK(cudaEventRecord(e0, s0));
      auto h0 = std::chrono::steady_clock::now();
      batchCall(pieces, flags, s0);
      hostUs = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - h0).count();
      CHECK(cudaEventRecord(e1, s0));
      *(volatile int*)flag = 1;
      CHECK(cudaEventSynchronize(e1));
      float t;
      CHECK(cudaEventElapsedTime(&t, e0, e1));
      if (r >= 2) gpu.push_back(t);
      auto w0 = std::chrono::steady_clock::now();
      batchCall(pieces, flags, s0);
      CHECK(cudaStreamSynchronize(s0));
      if (r >= 2) wall.push_back(std::chrono::duration<float, std::milli>(std::chrono::steady_clock::now() - w0).count());
    }
    char name[160];
    std::snprintf(name, sizeof name, "batch %s%s, GPU only", label, flags ? " (overlap flag)" : "");
    report(name, gpu, bytes, hostUs);
    std::snprintf(name, sizeof name, "batch %s%s, end to end", label, flags ? " (overlap flag)" : "");
    report(name, wall, bytes, hostUs);
  };
  auto scattered = [&](size_t n, size_t piece) {
    std::vector<Piece> v;
    size_t slots = pool / piece;
    for (size_t i = 0; i < n; ++i) v.push_back({((i * 7919) % slots) * piece, ((i * 104729 + 13) % slots) * piece, piece});
    return v;
  };
  std::vector<Piece> contiguous{{0, 0, 256ull << 20}};
  std::vector<Piece> contiguous512{{0, 0, 512ull << 20}};
  // Sub-batch schedules, end to end: GPU time from before the first call to after the last (events), and
  // wall time to the host seeing the end, for 256 x 2 MiB (the Llama-3.1-8B block-major KV of 4096 tokens).
  {
    auto v = scattered(256, 2 << 20);
    struct Schedule {
      const char* name;
      size_t first, growth, cap;
    };
    const Schedule schedules[] = {{"one call", 256, 1, 256},      {"2, 8, 32, rest (x4)", 2, 4, 0},
                                  {"2, 4, 8, 16, 32 x n", 2, 2, 32}, {"1, 4, 16, 64, rest", 1, 4, 0},
                                  {"2, 16, rest (x8)", 2, 8, 0},      {"4, 32, rest", 4, 8, 0},
                                  {"8 x 32", 32, 1, 32},            {"16 x 16", 16, 1, 16}};
    for (int rep = 0; rep < 2; ++rep) {
      std::vector<float> cg, cw;
      for (int r = 0; r < 12; ++r) {
        auto w0 = std::chrono::steady_clock::now();
        CHECK(cudaEventRecord(e0, s0));
        CHECK(cudaMemcpyAsync(b, a, 512ull << 20, cudaMemcpyDefault, s0));
        CHECK(cudaEventRecord(e1, s0));
        CHECK(cudaEventSynchronize(e1));
        float t;
        CHECK(cudaEventElapsedTime(&t, e0, e1));
        if (r >= 2) {
          cg.push_back(t);
          cw.push_back(std::chrono::duration<float, std::milli>(std::chrono::steady_clock::now() - w0).count());
        }
      }
      report("contiguous 512 MiB, events", cg, 512ull << 20, 0);
      report("contiguous 512 MiB, wall", cw, 512ull << 20, 0);
      for (const auto& sc : schedules) {
        std::vector<float> g, w;
        int calls = 0;
        for (int r = 0; r < 12; ++r) {
          calls = 0;
          auto w0 = std::chrono::steady_clock::now();
          CHECK(cudaEventRecord(e0, s0));
          size_t step = sc.first;
          for (size_t i = 0; i < v.size(); i += step, step = sc.cap ? std::min(step * sc.growth, sc.cap) : step * sc.growth) {
            if (!sc.cap && v.size() - i <= step * sc.growth) step = v.size() - i;
            batchCall(v, 0, s0, cudaMemcpySrcAccessOrderStream, i, i + step);
            ++calls;
          }
          CHECK(cudaEventRecord(e1, s0));
          CHECK(cudaEventSynchronize(e1));
          float t;
          CHECK(cudaEventElapsedTime(&t, e0, e1));
          if (r >= 2) {
            g.push_back(t);
            w.push_back(std::chrono::duration<float, std::milli>(std::chrono::steady_clock::now() - w0).count());
          }
        }
        char name[160];
        std::snprintf(name, sizeof name, "%s, 256 x 2 MiB: %d calls, events", sc.name, calls);
        report(name, g, 512ull << 20, 0);
        std::snprintf(name, sizeof name, "%s, 256 x 2 MiB: wall", sc.name);
        report(name, w, 512ull << 20, 0);
      }
    }
    // Host time per copy with these pointers.
    std::vector<double> us;
    for (int r = 0; r < 10; ++r) {
      auto h0 = std::chrono::steady_clock::now();
      batchCall(v, 0, s0);
      us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - h0).count());
      CHECK(cudaStreamSynchronize(s0));
    }
    std::sort(us.begin(), us.end());
    std::printf("batch call host time, 256 x 2 MiB%s: %.1f us (%.3f us per copy)\n", ipc ? " (IPC destination)" : "",
                us[5], us[5] / 256);
  }
  // Layer-major KV (Llama-3.1-8B shape: 64 tiles of layer x K/V, 32 KiB per block in a tile, 256 blocks
  // per tile: 8 MiB between a block's tiles): each block's 64 pieces as one 2D copy (width 32 KiB, 64 rows,
  // pitch 8 MiB on both sides) in cudaMemcpy3DBatchAsync; 256 such copies move 512 MiB.
  {
    const size_t tile = 32 << 10, tiles = 64, blocksPerTile = 256, pitch = tile * blocksPerTile;
    std::vector<cudaMemcpy3DBatchOp> ops(blocksPerTile);
    for (size_t i = 0; i < blocksPerTile; ++i) {
      size_t sId = (i * 7) % blocksPerTile, dId = blocksPerTile - 1 - ((i * 11) % blocksPerTile);
      cudaMemcpy3DBatchOp& o = ops[i];
      o = cudaMemcpy3DBatchOp{};
      o.src.type = cudaMemcpyOperandTypePointer;
      o.src.op.ptr.ptr = a + sId * tile;
      o.src.op.ptr.rowLength = pitch;
      o.dst.type = cudaMemcpyOperandTypePointer;
      o.dst.op.ptr.ptr = b + dId * tile;
      o.dst.op.ptr.rowLength = pitch;
      o.extent = make_cudaExtent(tile, tiles, 1);
      o.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    }
    auto call3d = [&](size_t lo, size_t hi) { CHECK(cudaMemcpy3DBatchAsync(hi - lo, ops.data() + lo, 0, s0)); };
    const size_t bytes = tile * tiles * blocksPerTile;
    for (int rep = 0; rep < 2; ++rep) {
      std::vector<float> g, e, w;
      double hostUs = 0;
      for (int r = 0; r < 12; ++r) {
        *(volatile int*)flag = 0;
        gate<<<1, 1, 0, s0>>>(flag);
        CHECK(cudaEventRecord(e0, s0));
        auto h0 = std::chrono::steady_clock::now();
        call3d(0, ops.size());
        hostUs = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - h0).count();
        CHECK(cudaEventRecord(e1, s0));
        *(volatile int*)flag = 1;
        CHECK(cudaEventSynchronize(e1));
        float t;
        CHECK(cudaEventElapsedTime(&t, e0, e1));
        if (r >= 2) g.push_back(t);
        // End to end, calls of 2, 8, 32, rest.
        auto w0 = std::chrono::steady_clock::now();
        CHECK(cudaEventRecord(e0, s0));
        size_t step = 2;
        for (size_t i = 0; i < ops.size(); i += step, step *= 4) {
          if (ops.size() - i <= step * 4) step = ops.size() - i;
          call3d(i, i + step);
        }
        CHECK(cudaEventRecord(e1, s0));
        CHECK(cudaEventSynchronize(e1));
        CHECK(cudaEventElapsedTime(&t, e0, e1));
        if (r >= 2) {
          e.push_back(t);
          w.push_back(std::chrono::duration<float, std::milli>(std::chrono::steady_clock::now() - w0).count());
        }
      }
      report("layer-major 256 blocks as 2D copies (32 KiB x 64 rows), one 3D batch, GPU only", g, bytes, hostUs);
      report("  the same in calls of 2, 8, 32, rest: events", e, bytes, 0);
      report("  the same: wall", w, bytes, 0);
    }
  }
  if (schedOnly) {
    if (ipc) {
      CHECK(cudaIpcCloseMemHandle(b));
      char done = 1;
      if (write(toChild[1], &done, 1) != 1) return 1;
    }
    std::printf("done\n");
    return 0;
  }
  gated("contiguous 256 MiB, gated", contiguous, 1, false);
  gated("contiguous 512 MiB, gated", contiguous512, 1, false);
  // Host cost of the call by batch size and source order (the host's time is all the call costs: timed alone).
  for (auto order : {cudaMemcpySrcAccessOrderStream, cudaMemcpySrcAccessOrderAny}) {
    for (size_t n : {32, 256, 4096}) {
      auto v = scattered(n, 64 << 10);
      std::vector<double> us;
      for (int r = 0; r < 10; ++r) {
        auto h0 = std::chrono::steady_clock::now();
        batchCall(v, 0, s0, order);
        us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - h0).count());
        CHECK(cudaStreamSynchronize(s0));
      }
      std::sort(us.begin(), us.end());
      std::printf("batch call host time, %zu x 64 KiB, order %s: %.1f us (%.3f us per copy)\n", n,
                  order == cudaMemcpySrcAccessOrderStream ? "stream" : "any", us[5], us[5] / n);
    }
  }
  // Does the batch use the SMs? Run it gated while a kernel holds every SM for a few ms.
  {
    auto v = scattered(4096, 64 << 10);
    cudaStream_t hs = st[1];
    std::vector<float> gpu;
    for (int r = 0; r < 6; ++r) {
      *(volatile int*)flag = 0;
      gate<<<1, 1, 0, s0>>>(flag);
      CHECK(cudaEventRecord(e0, s0));
      batchCall(v, 0, s0);
      CHECK(cudaEventRecord(e1, s0));
      hog<<<132 * 8, 256, 0, hs>>>(3000000);  // ~1.5-3 ms of every SM
      *(volatile int*)flag = 1;
      CHECK(cudaDeviceSynchronize());
      float t;
      CHECK(cudaEventElapsedTime(&t, e0, e1));
      gpu.push_back(t);
    }
    report("batch 4096 x 64 KiB beside a kernel holding every SM, GPU time", gpu, 256ull << 20, 0);
  }
  // Sub-batches: the host submits the next while the GPU copies the last (end to end, wall clock).
  auto subBatched = [&](const char* label, const std::vector<Piece>& v, size_t per) {
    size_t bytes = 0;
    for (auto& p : v) bytes += p.bytes;
    std::vector<float> wall;
    for (int r = 0; r < 12; ++r) {
      auto w0 = std::chrono::steady_clock::now();
      for (size_t lo = 0; lo < v.size(); lo += per) batchCall(v, 0, s0, cudaMemcpySrcAccessOrderStream, lo, lo + per);
      CHECK(cudaStreamSynchronize(s0));
      if (r >= 2) wall.push_back(std::chrono::duration<float, std::milli>(std::chrono::steady_clock::now() - w0).count());
    }
    char name[160];
    std::snprintf(name, sizeof name, "sub-batches of %zu, %s, end to end", per, label);
    report(name, wall, bytes, 0);
  };
  auto v64 = scattered(4096, 64 << 10), v2m = scattered(128, 2 << 20), v1m = scattered(256, 1 << 20);
  for (size_t per : {16, 64, 256}) subBatched("4096 x 64 KiB", v64, per);
  for (size_t per : {1, 4, 8, 16, 128}) subBatched("128 x 2 MiB", v2m, per);
  for (size_t per : {4, 16, 256}) subBatched("256 x 1 MiB", v1m, per);
  // Several host threads, each a batch on its own stream.
  for (int threads : {2, 4, 8}) {
    std::vector<float> wall;
    for (int r = 0; r < 8; ++r) {
      auto w0 = std::chrono::steady_clock::now();
      std::vector<std::thread> ts;
      size_t per = v64.size() / threads;
      for (int k = 0; k < threads; ++k)
        ts.emplace_back([&, k] {
          CHECK(cudaSetDevice(0));
          batchCall(v64, 0, st[k], cudaMemcpySrcAccessOrderStream, k * per, (k + 1) * per);
        });
      for (auto& t : ts) t.join();
      CHECK(cudaDeviceSynchronize());
      if (r >= 2) wall.push_back(std::chrono::duration<float, std::milli>(std::chrono::steady_clock::now() - w0).count());
    }
    char name[160];
    std::snprintf(name, sizeof name, "%d threads, each a batch of %zu x 64 KiB on its own stream, end to end", threads,
                  v64.size() / threads);
    report(name, wall, 256ull << 20, 0);
  }
  batchCase("128 x 2 MiB", v2m, 0);
  batchCase("16384 x 32 KiB", scattered(16384, 32 << 10), 0);
  batchCase("4096 x 64 KiB", v64, cudaMemcpyFlagPreferOverlapWithCompute);
  batchCase("1 x 1 MiB", scattered(1, 1 << 20), 0);
  // Per-piece copies: the GPU's cost per call, on 1 - 32 streams and as a CUDA graph (1, 8, 16 branches).
  for (int streams : {1, 8, 32}) {
    char name[128];
    std::snprintf(name, sizeof name, "4096 x 64 KiB, per-piece copies, %d streams, gated", streams);
    gated(name, v64, streams, false);
  }
  for (int branches : {1, 8, 16}) {
    char name[128];
    std::snprintf(name, sizeof name, "graph: 4096 x 64 KiB, %d branches", branches);
    graphed(name, v64, branches);
  }
  std::printf("done\n");
  return 0;
}
