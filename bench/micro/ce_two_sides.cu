// Does each GPU's copy-engine front end pay the fixed cost of a copy (about 2.5 us besides its bytes)
// on its own? Moves N pieces GPU0 -> GPU1, one cudaMemcpyAsync each, issued on GPU 0's streams (push),
// GPU 1's streams (pull), or alternating between the two GPUs, all queued behind a gate kernel so
// that the wall time from the gate's release to the last copy's end times the GPUs, not the host.
// One process, peer access both ways. Same-run baseline: one contiguous copy of the same bytes.
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/ce_two_sides bench/micro/ce_two_sides.cu && /tmp/ce_two_sides
#include <cuda_runtime.h>

#include "micro.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

__global__ void gate(volatile int* flag) {
  while (*flag == 0) {
  }
}

struct Stream {
  int device;
  cudaStream_t stream;
};

static double nowUs() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Queues piece i on streams[i % streams.size()] behind a gate on every stream, releases the gates,
// waits for all; returns us from release to the end.
static double run(const std::vector<Stream>& streams, char* a, char* b, size_t piece, int pieces, int* flag) {
  *reinterpret_cast<volatile int*>(flag) = 0;
  for (const Stream& s : streams) {
    CHECK(cudaSetDevice(s.device));
    gate<<<1, 1, 0, s.stream>>>(flag);
  }
  for (int i = 0; i < pieces; ++i) {
    const Stream& s = streams[i % streams.size()];
    CHECK(cudaSetDevice(s.device));
    // Destination pieces in a scrambled order, as a KV block table gives them.
    size_t dst = static_cast<size_t>((i * 7) % pieces) * piece;
    CHECK(cudaMemcpyAsync(b + dst, a + static_cast<size_t>(i) * piece, piece, cudaMemcpyDefault, s.stream));
  }
  double t0 = nowUs();
  *reinterpret_cast<volatile int*>(flag) = 1;
  for (const Stream& s : streams) {
    CHECK(cudaSetDevice(s.device));
    CHECK(cudaStreamSynchronize(s.stream));
  }
  return nowUs() - t0;
}

int main(int argc, char** argv) {
  size_t piece = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : (1u << 20);
  int pieces = argc > 2 ? std::atoi(argv[2]) : 256;
  int reps = argc > 3 ? std::atoi(argv[3]) : 15;
  if (pieces < 1 || pieces > 256) {
    // More copies than a stream queues behind the gate block the host before it opens the gate.
    std::printf("pieces must be 1 to 256 (more block cudaMemcpyAsync behind the closed gate)\n");
    return 2;
  }
  size_t bytes = piece * pieces;
  char *a, *b;
  peerPair(bytes, &a, &b);
  int* flag;
  CHECK(cudaHostAlloc(&flag, sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable));

  auto makeStreams = [](int device, int n) {
    std::vector<Stream> out;
    CHECK(cudaSetDevice(device));
    for (int i = 0; i < n; ++i) {
      cudaStream_t s;
      CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      out.push_back({device, s});
    }
    return out;
  };
  std::vector<Stream> g0 = makeStreams(0, 2), g1 = makeStreams(1, 2);
  struct Case {
    const char* name;
    std::vector<Stream> streams;
  };
  std::vector<Case> cases = {
      {"GPU0 pushes, 1 stream", {g0[0]}},
      {"GPU0 pushes, 2 streams", {g0[0], g0[1]}},
      {"GPU1 pulls, 1 stream", {g1[0]}},
      {"alternate GPU0 push / GPU1 pull", {g0[0], g1[0]}},
      {"alternate, 2 streams each", {g0[0], g1[0], g0[1], g1[1]}},
  };

  auto p50 = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  // Baseline: one contiguous copy of the same bytes, GPU 0's stream.
  std::vector<double> base;
  for (int r = 0; r < reps + 2; ++r) {
    CHECK(cudaSetDevice(0));
    double t0 = nowUs();
    CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDefault, g0[0].stream));
    CHECK(cudaStreamSynchronize(g0[0].stream));
    if (r >= 2) base.push_back(nowUs() - t0);
  }
  double baseUs = p50(base);
  std::printf("%zu x %zu B GPU0 -> GPU1, p50 of %d\n", static_cast<size_t>(pieces), piece, reps);
  std::printf("%-36s %10.1f us %8.1f GB/s\n", "one contiguous copy", baseUs, bytes / baseUs / 1e3);
  for (const Case& c : cases) {
    std::vector<double> t;
    for (int r = 0; r < reps + 2; ++r) {
      double us = run(c.streams, a, b, piece, pieces, flag);
      if (r >= 2) t.push_back(us);
    }
    double us = p50(t);
    std::printf("%-36s %10.1f us %8.1f GB/s  %6.2f us per piece  %5.1f%%\n", c.name, us, bytes / us / 1e3,
                us / pieces, 100.0 * baseUs / us);
  }
  return 0;
}
