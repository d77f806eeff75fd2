// NCCL on its own, two processes, one GPU each: what `npm run bench:collectives` compares against.
// Finds where Tandem's collectives lose time against PyTorch's (reduce 16 MiB, and 17-27 us per call
// from 4 MiB up): the library alone, with each way of making the communicator, and with each way of
// waiting for completion.
//   - comm "plain": ncclCommInitRank (blocking), as PyTorch makes it;
//   - comm "split": a non-blocking ncclCommInitRankConfig, then a blocking ncclCommSplit child, as
//     native/src/nccl/communicator.cpp makes the communicator that runs the operations;
//   - bandwidth: `iters` operations back to back, then cudaStreamSynchronize, median of 5;
//   - latency "sync": one operation, cudaStreamSynchronize (PyTorch's torch.cuda.synchronize());
//   - latency "poll": one operation and an event, then the event polled the way the communicator's
//     progress thread polls it (yield for 50 us, then sleep 1/16 of the time waited, timer slack 1 us);
//   - latency "spin": the same with yields only;
//   - bandwidth again with what Tandem adds around each operation: an event recorded after it, a
//     thread polling those events, submission from another thread than the one waiting.
// Also: how long a requested 1-16 us sleep takes on this host.
// With the argument `sendrecv`, only this instead: NCCL send/recv GPU0 -> GPU1 as bench:transfer's NCCL
// baseline issues it, but from C++ (no JavaScript around each operation): runs of `depth` operations
// back to back, then both streams synchronised; the receiver's time per operation, median of 20 runs.
//   nvcc -O3 -std=c++17 -o nccl_ops bench/micro/nccl_ops.cu -lnccl && NCCL_NVLS_ENABLE=0 ./nccl_ops [sendrecv]
#include <cuda_runtime.h>
#include <nccl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "micro.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#define NCHECK(x)                                                                      \
  do {                                                                                 \
    ncclResult_t r = (x);                                                              \
    if (r != ncclSuccess && r != ncclInProgress) {                                     \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, ncclGetErrorString(r));    \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

using Clock = std::chrono::steady_clock;
static double us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }
static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

static void waitComm(ncclComm_t comm) {
  ncclResult_t state;
  do {
    NCHECK(ncclCommGetAsyncError(comm, &state));
  } while (state == ncclInProgress);
  NCHECK(state);
}

static ncclComm_t makeComm(const std::string& how, const ncclUniqueId& id, int rank, ncclComm_t* parent) {
  ncclComm_t comm = nullptr;
  *parent = nullptr;
  if (how == "plain") {
    NCHECK(ncclCommInitRank(&comm, 2, id, rank));
    return comm;
  }
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  cfg.blocking = 0;
  NCHECK(ncclCommInitRankConfig(parent, 2, id, rank, &cfg));
  waitComm(*parent);
  ncclConfig_t child = NCCL_CONFIG_INITIALIZER;
  child.blocking = 1;
  NCHECK(ncclCommSplit(*parent, 0, rank, &comm, &child));
  waitComm(*parent);
  return comm;
}

enum class Wait { Sync, Poll, Spin };

static void waitEvent(cudaEvent_t ev, cudaStream_t s, Wait how) {
  if (how == Wait::Sync) {
    CHECK(cudaStreamSynchronize(s));
    return;
  }
  auto start = Clock::now();
  while (cudaEventQuery(ev) == cudaErrorNotReady) {
    auto waited = Clock::now() - start;
    if (how == Wait::Spin || waited < std::chrono::microseconds(50)) std::this_thread::yield();
    else std::this_thread::sleep_for(std::min<Clock::duration>(waited / 16, std::chrono::microseconds(50)));
  }
}

static void sendRecv(int r, ncclComm_t comm, cudaStream_t s, void* send, void* recv, size_t maxBytes) {
  if (r == 1) std::printf("%-10s %6s %12s %10s\n", "bytes", "depth", "us per op", "GB/s");
  for (size_t bytes : {size_t(64) << 10, size_t(1) << 20, size_t(16) << 20, std::min(maxBytes, size_t(64) << 20)}) {
    for (int depth : {1, 8, 32, 128}) {
      auto run = [&] {
        for (int i = 0; i < depth; ++i) {
          if (r == 0) NCHECK(ncclSend(send, bytes, ncclUint8, 1, comm, s));
          else NCHECK(ncclRecv(recv, bytes, ncclUint8, 0, comm, s));
        }
      };
      run();
      CHECK(cudaStreamSynchronize(s));
      std::vector<double> per;
      for (int rep = 0; rep < 20; ++rep) {
        NCHECK(ncclAllReduce(send, send, 1, ncclFloat, ncclSum, comm, s));  // barrier
        CHECK(cudaStreamSynchronize(s));
        auto t0 = Clock::now();
        run();
        CHECK(cudaStreamSynchronize(s));
        per.push_back(us(Clock::now() - t0) / depth);
      }
      if (r == 1) {
        double t = median(per);
        std::printf("%-10zu %6d %12.2f %10.1f\n", bytes, depth, t, bytes / t / 1e3);
        std::fflush(stdout);
      }
    }
  }
}

static bool onlySendRecv = false;

static void rank(int r, int fdIn, int fdOut) {
  prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
  ncclUniqueId id;
  if (r == 0) {
    NCHECK(ncclGetUniqueId(&id));
    if (write(fdOut, &id, sizeof id) != sizeof id) std::exit(2);
  } else if (read(fdIn, &id, sizeof id) != sizeof id) {
    std::exit(2);
  }
  CHECK(cudaSetDevice(r));
  const size_t maxBytes = 64 << 20;
  void *send, *recv;
  CHECK(cudaMalloc(&send, maxBytes));
  CHECK(cudaMalloc(&recv, maxBytes));
  CHECK(cudaMemset(send, 0, maxBytes));
  CHECK(cudaMemset(recv, 0, maxBytes));
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t ev;
  CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  if (onlySendRecv) {
    ncclComm_t parent;
    ncclComm_t comm = makeComm("plain", id, r, &parent);
    sendRecv(r, comm, s, send, recv, maxBytes);
    NCHECK(ncclCommDestroy(comm));
    return;
  }
  if (r == 0) std::printf("%-6s %-10s %9s %10s %10s %9s %9s %9s\n", "comm", "op", "bytes", "busbw GB/s", "time us",
                          "lat sync", "lat poll", "lat spin");
  for (const char* how : {"plain", "split", "plain", "split"}) {
    ncclComm_t parent;
    ncclComm_t comm = makeComm(how, id, r, &parent);
    for (const char* op : {"reduce", "allGather", "allReduce"}) {
      for (size_t bytes : {size_t(1) << 20, size_t(4) << 20, size_t(16) << 20, size_t(64) << 20}) {
        size_t count = bytes / 4;
        auto run = [&] {
          if (!std::strcmp(op, "reduce")) NCHECK(ncclReduce(send, send, count, ncclFloat, ncclSum, 0, comm, s));
          else if (!std::strcmp(op, "allGather")) NCHECK(ncclAllGather(send, recv, count / 2, ncclFloat, comm, s));
          else NCHECK(ncclAllReduce(send, send, count, ncclFloat, ncclSum, comm, s));
        };
        const int iters = std::max(5, std::min(1000, int((size_t(4) << 30) / bytes)));
        for (int i = 0; i < 10; ++i) run();
        CHECK(cudaStreamSynchronize(s));
        std::vector<double> per;
        for (int rep = 0; rep < 5; ++rep) {
          NCHECK(ncclAllReduce(send, send, 1, ncclFloat, ncclSum, comm, s));  // barrier
          CHECK(cudaStreamSynchronize(s));
          auto t0 = Clock::now();
          for (int i = 0; i < iters; ++i) run();
          CHECK(cudaStreamSynchronize(s));
          per.push_back(us(Clock::now() - t0) / iters);
        }
        double t = median(per);
        double factor = !std::strcmp(op, "allReduce") ? 1.0 : !std::strcmp(op, "allGather") ? 0.5 : 1.0;
        double lat[3];
        for (Wait w : {Wait::Sync, Wait::Poll, Wait::Spin}) {
          std::vector<double> l;
          NCHECK(ncclAllReduce(send, send, 1, ncclFloat, ncclSum, comm, s));
          CHECK(cudaStreamSynchronize(s));
          for (int i = 0; i < 50; ++i) {
            auto t0 = Clock::now();
            run();
            CHECK(cudaEventRecord(ev, s));
            waitEvent(ev, s, w);
            l.push_back(us(Clock::now() - t0));
          }
          lat[static_cast<int>(w)] = median(l);
        }
        if (r == 0) {
          std::printf("%-6s %-10s %9zu %10.1f %10.1f %9.1f %9.1f %9.1f\n", how, op, bytes, bytes / t / 1e3 * factor, t,
                      lat[0], lat[1], lat[2]);
          std::fflush(stdout);
        }
      }
    }
    NCHECK(ncclCommDestroy(comm));
    if (parent) NCHECK(ncclCommDestroy(parent));
    // A fresh id for the next communicator, from rank 0 as before.
    if (r == 0) {
      NCHECK(ncclGetUniqueId(&id));
      if (write(fdOut, &id, sizeof id) != sizeof id) std::exit(2);
    } else if (read(fdIn, &id, sizeof id) != sizeof id) {
      std::exit(2);
    }
  }
  // Tandem's shape around the same operations: an event recorded after each, a thread polling the
  // oldest event not yet seen complete (yield between queries), submission from another thread.
  {
    ncclComm_t parent;
    ncclComm_t comm = makeComm("plain", id, r, &parent);
    std::vector<cudaEvent_t> evs(1024);
    for (auto& ev : evs) CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    if (r == 0) std::printf("\n%-10s %9s %-22s %10s\n", "op", "bytes", "around each op", "busbw GB/s");
    for (const char* op : {"reduce", "allGather"}) {
      for (size_t bytes : {size_t(4) << 20, size_t(16) << 20}) {
        size_t count = bytes / 4;
        auto run = [&] {
          if (!std::strcmp(op, "reduce")) NCHECK(ncclReduce(send, send, count, ncclFloat, ncclSum, 0, comm, s));
          else NCHECK(ncclAllGather(send, recv, count / 2, ncclFloat, comm, s));
        };
        const int iters = int((size_t(4) << 30) / bytes);
        for (const char* variant : {"nothing", "event", "event+poller", "event+poller+thread"}) {
          const bool events = std::strcmp(variant, "nothing") != 0;
          const bool poller = std::strstr(variant, "poller") != nullptr;
          const bool thread = std::strstr(variant, "thread") != nullptr;
          std::vector<double> per;
          for (int rep = 0; rep < 5; ++rep) {
            NCHECK(ncclAllReduce(send, send, 1, ncclFloat, ncclSum, comm, s));
            CHECK(cudaStreamSynchronize(s));
            std::atomic<int> recorded{0};
            std::atomic<bool> done{false};
            std::thread poll;
            if (poller) {
              poll = std::thread([&] {
                int seen = 0;
                while (seen < iters) {
                  if (seen < recorded.load(std::memory_order_acquire) && cudaEventQuery(evs[seen % evs.size()]) == cudaSuccess) ++seen;
                  else std::this_thread::yield();
                }
                done = true;
              });
            }
            auto t0 = Clock::now();
            auto submitAll = [&] {
              for (int i = 0; i < iters; ++i) {
                run();
                if (events) CHECK(cudaEventRecord(evs[i % evs.size()], s));
                recorded.store(i + 1, std::memory_order_release);
              }
            };
            if (thread) std::thread(submitAll).join();
            else submitAll();
            CHECK(cudaStreamSynchronize(s));
            if (poll.joinable()) poll.join();
            per.push_back(us(Clock::now() - t0) / iters);
          }
          double t = median(per);
          double factor = !std::strcmp(op, "allGather") ? 0.5 : 1.0;
          if (r == 0) {
            std::printf("%-10s %9zu %-22s %10.1f\n", op, bytes, variant, bytes / t / 1e3 * factor);
            std::fflush(stdout);
          }
        }
      }
    }
    for (auto& ev : evs) CHECK(cudaEventDestroy(ev));
    NCHECK(ncclCommDestroy(comm));
  }
  if (r == 0) {
    std::printf("\nrequested sleep -> measured (median of 200, timer slack 1 us)\n");
    for (int want : {1, 2, 4, 8, 16, 32}) {
      std::vector<double> got;
      for (int i = 0; i < 200; ++i) {
        auto t0 = Clock::now();
        std::this_thread::sleep_for(std::chrono::microseconds(want));
        got.push_back(us(Clock::now() - t0));
      }
      std::printf("  %2d us -> %6.1f us\n", want, median(got));
    }
  }
}

int main(int argc, char** argv) {
  onlySendRecv = argc > 1 && std::strcmp(argv[1], "sendrecv") == 0;
  int fds[2];
  if (pipe(fds) != 0) return 1;
  pid_t kids[2];
  for (int r = 0; r < 2; ++r) {
    kids[r] = fork();
    if (kids[r] == 0) {
      rank(r, fds[0], fds[1]);
      std::exit(0);
    }
  }
  int rc = 0;
  for (pid_t k : kids) {
    int status = 0;
    waitpid(k, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) rc = 1;
  }
  return rc;
}
