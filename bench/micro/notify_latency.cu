// How soon can a host thread know that a 64 KiB GPU0 -> GPU1 copy has landed? The floor under bench:transfer's
// "post to notification" for a cuda-ipc WRITE to a polling target. One process, peer access on; the "target"
// is this thread spinning on a word in pinned host memory (or on an event). Per variant, 2000 back-to-back
// rounds after 200 of warm-up: p50/p10/p90 of the host time to issue the work, and of issue start to seen.
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o notify_latency notify_latency.cu && ./notify_latency
#include <cuda.h>
#include <cuda_runtime.h>

#include "micro.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace {

constexpr size_t kBytes = 64 << 10;
constexpr int kWarmup = 200;
constexpr int kRounds = 2000;

using Clock = std::chrono::steady_clock;
double us(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::micro>(b - a).count(); }

// Copies `bytes` with every block's threads, then the last block to finish stores `value` into `flag`
// (after a system-scope fence, so that the copy is visible before the flag is).
__global__ void copyThenFlag(const uint4* __restrict__ src, uint4* __restrict__ dst, size_t n16, unsigned* done,
                             volatile unsigned* flag, unsigned value) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += gridDim.x * blockDim.x) dst[i] = src[i];
  if (!flag) return;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    if (gridDim.x == 1 || atomicAdd(done, 1) == gridDim.x - 1) {
      if (gridDim.x > 1) *done = 0;
      *flag = value;
    }
  }
}

// The same, with the flag value read from device memory and bumped (for graph launches, which replay
// fixed arguments).
__global__ void copyThenBump(const uint4* __restrict__ src, uint4* __restrict__ dst, size_t n16, unsigned* done,
                             volatile unsigned* flag, unsigned* counter) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += gridDim.x * blockDim.x) dst[i] = src[i];
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    if (gridDim.x == 1 || atomicAdd(done, 1) == gridDim.x - 1) {
      if (gridDim.x > 1) *done = 0;
      *flag = ++*counter;
    }
  }
}

struct Stats {
  double p10, p50, p90;
};
Stats stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  auto at = [&](double q) { return v[std::min(v.size() - 1, static_cast<size_t>(q * v.size()))]; };
  return {at(0.1), at(0.5), at(0.9)};
}

}  // namespace

int main() {
  int count = 0;
  CHECK(cudaGetDeviceCount(&count));
  const int dstDevice = count > 1 ? 1 : 0;
  CHECK(cudaSetDevice(dstDevice));
  void* dst = nullptr;
  CHECK(cudaMalloc(&dst, kBytes));
  CHECK(cudaSetDevice(0));
  if (dstDevice != 0) CHECK(cudaDeviceEnablePeerAccess(dstDevice, 0));
  void* src = nullptr;
  unsigned* done = nullptr;
  unsigned* counter = nullptr;
  CHECK(cudaMalloc(&src, kBytes));
  CHECK(cudaMalloc(&done, sizeof(unsigned)));
  CHECK(cudaMalloc(&counter, sizeof(unsigned)));
  CHECK(cudaMemset(done, 0, sizeof(unsigned)));
  CHECK(cudaMemset(counter, 0, sizeof(unsigned)));
  unsigned* flag = nullptr;
  CHECK(cudaHostAlloc(&flag, 64, cudaHostAllocMapped | cudaHostAllocPortable));
  *flag = 0;
  unsigned* flagDev = nullptr;
  CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&flagDev), flag, 0));
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t ev;
  CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));

  decltype(&cuStreamWriteValue32) writeValue = nullptr;
  cudaDriverEntryPointQueryResult q;
  CHECK(cudaGetDriverEntryPointByVersion("cuStreamWriteValue32", reinterpret_cast<void**>(&writeValue), 12000,
                                         cudaEnableDefault, &q));
  if (!writeValue) {
    std::printf("no cuStreamWriteValue32\n");
    return 1;
  }
  const CUdeviceptr flagAddr = reinterpret_cast<CUdeviceptr>(flagDev);
  const size_t n16 = kBytes / 16;
  volatile unsigned* seen = flag;
  unsigned value = 0;

  // Graphs replaying the kernel that bumps the flag.
  auto captured = [&](int blocks, int threads) {
    cudaGraph_t g;
    cudaGraphExec_t exec;
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    copyThenBump<<<blocks, threads, 0, s>>>(static_cast<const uint4*>(src), static_cast<uint4*>(dst), n16, done,
                                             flagDev, counter);
    CHECK(cudaStreamEndCapture(s, &g));
    CHECK(cudaGraphInstantiate(&exec, g, 0ull));
    return exec;
  };
  cudaGraphExec_t graph1 = captured(1, 1024);
  cudaGraphExec_t graph16 = captured(16, 512);

  struct Variant {
    std::string name;
    std::function<void(unsigned)> issue;  // issues the work that ends with the flag == v (or the event)
    bool event = false;
    bool bump = false;  // the flag counts launches of a bumping kernel
  };
  auto ce = [&] { CHECK(cudaMemcpyAsync(dst, src, kBytes, cudaMemcpyDeviceToDevice, s)); };
  auto wv = [&](unsigned v) {
    if (writeValue(reinterpret_cast<CUstream>(s), flagAddr, v, CU_STREAM_WRITE_VALUE_DEFAULT) != CUDA_SUCCESS) std::exit(2);
  };
  auto kern = [&](int blocks, int threads, unsigned v, bool flagToo) {
    copyThenFlag<<<blocks, threads, 0, s>>>(static_cast<const uint4*>(src), static_cast<uint4*>(dst), n16, done,
                                            flagToo ? flagDev : nullptr, v);
  };
  std::vector<Variant> variants = {
      {"copy engine, event polled (the agent thread's old path)", [&](unsigned) { ce(); CHECK(cudaEventRecord(ev, s)); }, true},
      {"copy engine + stream write (Tandem now)", [&](unsigned v) { ce(); wv(v); }},
      {"copy engine + stream write + event (Tandem now, exactly)", [&](unsigned v) { ce(); wv(v); CHECK(cudaEventRecord(ev, s)); }},
      {"stream write alone (floor of a stream op)", [&](unsigned v) { wv(v); }},
      {"empty kernel writing the flag (floor of a launch)", [&](unsigned v) {
         copyThenFlag<<<1, 32, 0, s>>>(nullptr, nullptr, 0, done, flagDev, v);
       }},
      {"kernel copy 1x1024, flag in kernel", [&](unsigned v) { kern(1, 1024, v, true); }},
      {"kernel copy 4x1024, flag in kernel", [&](unsigned v) { kern(4, 1024, v, true); }},
      {"kernel copy 16x512, flag in kernel", [&](unsigned v) { kern(16, 512, v, true); }},
      {"kernel copy 64x256, flag in kernel", [&](unsigned v) { kern(64, 256, v, true); }},
      {"kernel copy 16x512 + stream write", [&](unsigned v) { kern(16, 512, v, false); wv(v); }},
      {"graph: kernel copy 1x1024, flag in kernel", [&](unsigned) { CHECK(cudaGraphLaunch(graph1, s)); }, false, true},
      {"graph: kernel copy 16x512, flag in kernel", [&](unsigned) { CHECK(cudaGraphLaunch(graph16, s)); }, false, true},
  };

  std::printf("64 KiB GPU0 -> GPU%d, %d rounds each; microseconds\n", dstDevice, kRounds);
  std::printf("%-58s %24s %24s\n", "", "issue p10/p50/p90", "seen p10/p50/p90");
  for (auto& variant : variants) {
    std::vector<double> issue, seenAt;
    CHECK(cudaStreamSynchronize(s));
    if (variant.bump) {
      unsigned c = 0;
      CHECK(cudaMemcpy(&c, counter, sizeof(c), cudaMemcpyDeviceToHost));
      value = c;
    }
    for (int round = 0; round < kWarmup + kRounds; ++round) {
      const unsigned v = ++value;
      auto t0 = Clock::now();
      variant.issue(v);
      auto t1 = Clock::now();
      if (variant.event) {
        while (cudaEventQuery(ev) == cudaErrorNotReady) {
        }
      } else {
        while (*seen != v) {
        }
      }
      auto t2 = Clock::now();
      if (round >= kWarmup) {
        issue.push_back(us(t0, t1));
        seenAt.push_back(us(t0, t2));
      }
    }
    Stats a = stats(issue), b = stats(seenAt);
    std::printf("%-58s %7.2f %7.2f %7.2f  %7.2f %7.2f %7.2f\n", variant.name.c_str(), a.p10, a.p50, a.p90, b.p10, b.p50,
                b.p90);
  }
  return 0;
}
