// Two-process self-test of the UCX RMA backend (native/src/transfer/backends/ucx_worker.cpp), without Node.
// Build and run: native/tests/run_ucx_selftest.sh
//
// The parent forks a child before either touches UCX. Each creates a UcxWorker, registers a 64 MiB
// anonymous mapping filled with its own byte pattern, and sends the other its worker address, packed
// rkey and buffer address over a socketpair. Both keep shadow copies of both buffers and apply every
// case's pieces to them, so each side checks its whole buffer byte for byte after every case (the child
// when the parent tells it the post completed). The parent runs the cases and prints one PASS/FAIL line
// each; the exit status is non-zero when any failed.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../src/transfer/agent.h"
#include "../src/transfer/backends/ucx_worker.h"

using tandem::transfer::AgentError;
using tandem::transfer::UcxWorker;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kBufferSize = 64u << 20;
constexpr uint8_t kParentSeed = 0x11;
constexpr uint8_t kChildSeed = 0xA7;
constexpr int kMessageTimeoutMs = 20000;
constexpr auto kPostTimeout = std::chrono::seconds(20);
constexpr auto kDeadPeerBound = std::chrono::seconds(10);

// Differs between the two processes and from page to page, so a misplaced piece is caught.
uint8_t patternByte(uint8_t seed, size_t i) {
  return static_cast<uint8_t>(seed + i * 7 + (i >> 12) * 13 + (i >> 20) * 101);
}

void fillPattern(uint8_t* p, uint8_t seed) {
  for (size_t i = 0; i < kBufferSize; ++i) p[i] = patternByte(seed, i);
}

double msSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// ---- messages over the socketpair: u32 length + bytes ----

bool writeAll(int fd, const void* data, size_t n) {
  auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool readAll(int fd, void* data, size_t n, int timeoutMs) {
  auto* p = static_cast<uint8_t*>(data);
  auto deadline = Clock::now() + std::chrono::milliseconds(timeoutMs);
  while (n > 0) {
    int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    if (left <= 0) return false;
    pollfd pfd{fd, POLLIN, 0};
    int r = ::poll(&pfd, 1, left);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    ssize_t got = ::read(fd, p, n);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    p += got;
    n -= static_cast<size_t>(got);
  }
  return true;
}

bool sendMessage(int fd, const std::vector<uint8_t>& bytes) {
  uint32_t n = static_cast<uint32_t>(bytes.size());
  return writeAll(fd, &n, sizeof n) && writeAll(fd, bytes.data(), bytes.size());
}

bool sendText(int fd, const std::string& text) { return sendMessage(fd, std::vector<uint8_t>(text.begin(), text.end())); }

bool receiveMessage(int fd, std::vector<uint8_t>& bytes, int timeoutMs = kMessageTimeoutMs) {
  uint32_t n = 0;
  if (!readAll(fd, &n, sizeof n, timeoutMs) || n > (64u << 20)) return false;
  bytes.resize(n);
  return readAll(fd, bytes.data(), n, timeoutMs);
}

bool receiveText(int fd, std::string& text, int timeoutMs = kMessageTimeoutMs) {
  std::vector<uint8_t> bytes;
  if (!receiveMessage(fd, bytes, timeoutMs)) return false;
  text.assign(bytes.begin(), bytes.end());
  return true;
}

struct Endpoint {
  uint64_t buffer = 0;
  std::vector<uint8_t> address;
  std::vector<uint8_t> rkey;
};

void putBlob(std::vector<uint8_t>& out, const std::vector<uint8_t>& blob) {
  uint32_t n = static_cast<uint32_t>(blob.size());
  out.insert(out.end(), reinterpret_cast<uint8_t*>(&n), reinterpret_cast<uint8_t*>(&n) + sizeof n);
  out.insert(out.end(), blob.begin(), blob.end());
}

std::vector<uint8_t> encode(const Endpoint& e) {
  std::vector<uint8_t> out(reinterpret_cast<const uint8_t*>(&e.buffer),
                           reinterpret_cast<const uint8_t*>(&e.buffer) + sizeof e.buffer);
  putBlob(out, e.address);
  putBlob(out, e.rkey);
  return out;
}

bool decode(const std::vector<uint8_t>& in, Endpoint& e) {
  size_t at = 0;
  auto take = [&](void* dst, size_t n) {
    if (in.size() - at < n) return false;
    std::memcpy(dst, in.data() + at, n);
    at += n;
    return true;
  };
  auto blob = [&](std::vector<uint8_t>& b) {
    uint32_t n = 0;
    if (!take(&n, sizeof n) || in.size() - at < n) return false;
    b.assign(in.begin() + static_cast<long>(at), in.begin() + static_cast<long>(at + n));
    at += n;
    return true;
  };
  return take(&e.buffer, sizeof e.buffer) && blob(e.address) && blob(e.rkey) && at == in.size();
}

// ---- cases: the same deterministic pieces in both processes ----

struct Span {
  size_t parentOff;
  size_t childOff;
  size_t length;
};

struct Case {
  std::string name;
  bool write;  // parent -> child; otherwise the parent reads from the child
  std::vector<Span> spans;
};

// `count` pieces of `length` bytes at distinct slots of `slot` bytes on each side.
std::vector<Span> scattered(uint64_t seed, size_t count, size_t slot, size_t length) {
  std::mt19937_64 rng(seed);
  size_t slots = kBufferSize / slot;
  std::vector<size_t> a(slots), b(slots);
  std::iota(a.begin(), a.end(), 0);
  std::iota(b.begin(), b.end(), 0);
  std::shuffle(a.begin(), a.end(), rng);
  std::shuffle(b.begin(), b.end(), rng);
  std::vector<Span> spans;
  for (size_t i = 0; i < count; ++i) spans.push_back({a[i] * slot, b[i] * slot, length});
  return spans;
}

std::vector<Case> dataCases() {
  return {
      {"WRITE 1,000 scattered 4 KiB pieces", true, scattered(1, 1000, 4096, 4096)},
      {"WRITE one 32 MiB piece (unaligned)", true, {{(8u << 20) + 64, (30u << 20) + 12345, 32u << 20}}},
      {"WRITE 16,384 pieces of 1000 B in one post", true, scattered(2, 16384, 1024, 1000)},
      {"READ 500 scattered 8 KiB pieces", false, scattered(3, 500, 8192, 8192)},
  };
}

void applyToShadows(const Case& c, std::vector<uint8_t>& parent, std::vector<uint8_t>& child) {
  for (const auto& s : c.spans) {
    if (c.write) {
      std::memcpy(child.data() + s.childOff, parent.data() + s.parentOff, s.length);
    } else {
      std::memcpy(parent.data() + s.parentOff, child.data() + s.childOff, s.length);
    }
  }
}

// "" when equal, else where they first differ.
std::string compare(const uint8_t* actual, const std::vector<uint8_t>& expected, const char* who) {
  if (std::memcmp(actual, expected.data(), kBufferSize) == 0) return "";
  size_t i = 0;
  while (actual[i] == expected[i]) ++i;
  size_t differing = 0;
  for (size_t j = i; j < kBufferSize; ++j) differing += actual[j] != expected[j];
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s buffer differs from expected at offset %zu (%zu bytes differ; got 0x%02x, want 0x%02x)",
                who, i, differing, actual[i], expected[i]);
  return buf;
}

struct Outcome {
  std::mutex mutex;
  std::condition_variable cv;
  int calls = 0;
  bool ok = false;
  std::string error;
};

std::shared_ptr<Outcome> postAsync(UcxWorker& backend, const std::string& peer, bool write,
                                   std::vector<UcxWorker::Piece> pieces, const std::vector<std::vector<uint8_t>>& rkeys) {
  auto o = std::make_shared<Outcome>();
  backend.post(peer, write, std::move(pieces), rkeys, [o](bool ok, std::string error) {
    std::lock_guard<std::mutex> lock(o->mutex);
    ++o->calls;
    o->ok = ok;
    o->error = std::move(error);
    o->cv.notify_all();
  });
  return o;
}

// False when `done` was not called within `timeout`.
bool waitFor(Outcome& o, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(o.mutex);
  return o.cv.wait_for(lock, timeout, [&] { return o.calls > 0; });
}

bool postAndWait(UcxWorker& backend, const std::string& peer, bool write, std::vector<UcxWorker::Piece> pieces,
                 const std::vector<std::vector<uint8_t>>& rkeys, std::chrono::milliseconds timeout,
                 std::shared_ptr<Outcome>& outcome) {
  outcome = postAsync(backend, peer, write, std::move(pieces), rkeys);
  return waitFor(*outcome, timeout);
}

int failures = 0;

void report(bool pass, const std::string& name, const std::string& detail) {
  if (!pass) ++failures;
  std::printf("%s  %s%s%s\n", pass ? "PASS" : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  std::fflush(stdout);
}

struct Process {
  std::unique_ptr<UcxWorker> backend;
  uint8_t* buffer = nullptr;
  std::vector<uint8_t> rkey;
  Endpoint peer;
  std::vector<uint8_t> parentShadow, childShadow;
};

// Both sides: backend, registered buffer, exchange over `sock`, connect. Returns "" or why not.
std::string setUp(Process& p, int sock, bool isParent) {
  std::string reason;
  p.backend = UcxWorker::create({"libucp.so.0"}, reason);
  if (!p.backend) return "UcxWorker::create failed: " + reason;
  void* mem = mmap(nullptr, kBufferSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return std::string("mmap: ") + std::strerror(errno);
  p.buffer = static_cast<uint8_t*>(mem);
  fillPattern(p.buffer, isParent ? kParentSeed : kChildSeed);
  p.parentShadow.resize(kBufferSize);
  p.childShadow.resize(kBufferSize);
  fillPattern(p.parentShadow.data(), kParentSeed);
  fillPattern(p.childShadow.data(), kChildSeed);
  try {
    p.rkey = p.backend->registerMemory(1, p.buffer, kBufferSize);
  } catch (const AgentError& e) {
    return "registerMemory: " + e.code + ": " + e.message;
  }
  Endpoint self{reinterpret_cast<uint64_t>(p.buffer), p.backend->workerAddress(), p.rkey};
  std::vector<uint8_t> theirs;
  if (!sendMessage(sock, encode(self)) || !receiveMessage(sock, theirs) || !decode(theirs, p.peer)) {
    return "exchanging worker addresses failed";
  }
  p.backend->connect(isParent ? "child" : "parent", p.peer.address);
  return "";
}

std::vector<UcxWorker::Piece> piecesFor(const Case& c, const Process& p) {
  std::vector<UcxWorker::Piece> pieces;
  pieces.reserve(c.spans.size());
  for (const auto& s : c.spans) {
    pieces.push_back({p.buffer + s.parentOff, p.peer.buffer + s.childOff, s.length, 0});
  }
  return pieces;
}

// The child: sets up, then verifies its buffer after each case the parent announces, until killed.
int runChild(int sock) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  Process p;
  std::string error = setUp(p, sock, false);
  sendText(sock, error.empty() ? "ready" : error);
  if (!error.empty()) return 1;
  std::vector<Case> cases = dataCases();
  for (;;) {
    std::string command;
    if (!receiveText(sock, command, 60000)) return 0;  // the parent is gone
    if (command.rfind("verify ", 0) == 0) {
      size_t index = std::stoul(command.substr(7));
      applyToShadows(cases.at(index), p.parentShadow, p.childShadow);
      std::string diff = compare(p.buffer, p.childShadow, "child");
      sendText(sock, diff.empty() ? "ok" : diff);
    } else if (command == "exit") {
      return 0;
    }
  }
}

int runParent(int sock, pid_t child) {
  Process p;
  auto start = Clock::now();
  std::string error = setUp(p, sock, true);
  std::string childReady;
  if (error.empty() && !receiveText(sock, childReady)) error = "the child did not answer";
  if (error.empty() && childReady != "ready") error = "child: " + childReady;
  report(error.empty(), "setup (create, register 64 MiB, exchange, connect)",
         error.empty() ? "transports " + p.backend->transports() + ", worker address " +
                             std::to_string(p.backend->workerAddress().size()) + " B, rkey " +
                             std::to_string(p.rkey.size()) + " B, " + std::to_string(static_cast<int>(msSince(start))) + " ms"
                       : error);
  if (!error.empty()) return 1;
  const std::vector<std::vector<uint8_t>> rkeys{p.peer.rkey};

  std::vector<Case> cases = dataCases();
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    applyToShadows(c, p.parentShadow, p.childShadow);
    size_t bytes = 0;
    for (const auto& s : c.spans) bytes += s.length;
    std::shared_ptr<Outcome> o;
    auto t0 = Clock::now();
    bool called = postAndWait(*p.backend, "child", c.write, piecesFor(c, p), rkeys, kPostTimeout, o);
    double ms = msSince(t0);
    if (!called) {
      report(false, c.name, "done was not called within 20 s");
      continue;
    }
    if (!o->ok) {
      report(false, c.name, o->error);
      continue;
    }
    std::string diff = compare(p.buffer, p.parentShadow, "parent");
    std::string childAnswer;
    if (!sendText(sock, "verify " + std::to_string(i)) || !receiveText(sock, childAnswer)) {
      childAnswer = "the child did not answer";
    }
    if (childAnswer != "ok") diff += (diff.empty() ? "" : "; ") + childAnswer;
    char detail[128];
    std::snprintf(detail, sizeof detail, "%.1f ms, %.2f GB/s, both buffers verified", ms, bytes / ms / 1e6);
    report(diff.empty(), c.name, diff.empty() ? std::string(detail) : diff);
  }

  {
    std::shared_ptr<Outcome> o;
    bool called = postAndWait(*p.backend, "nobody", true, {{p.buffer, p.peer.buffer, 64, 0}}, rkeys,
                              std::chrono::seconds(5), o);
    report(called && !o->ok && o->error.find("not connected") != std::string::npos, "post to an unknown peer fails",
           called ? o->error : "done was not called");
  }
  {
    std::shared_ptr<Outcome> o;
    bool called = postAndWait(*p.backend, "child", true, {{p.buffer, p.peer.buffer, 64, 7}}, rkeys,
                              std::chrono::seconds(5), o);
    report(called && !o->ok, "post naming a missing rkey index fails", called ? o->error : "done was not called");
  }
  {
    // Disconnect, post (must fail), reconnect, post again (must work).
    p.backend->disconnect("child");
    std::shared_ptr<Outcome> o1, o2;
    bool called1 = postAndWait(*p.backend, "child", false, {{p.buffer, p.peer.buffer, 4096, 0}}, rkeys,
                               std::chrono::seconds(5), o1);
    p.backend->connect("child", p.peer.address);
    bool called2 = postAndWait(*p.backend, "child", false, {{p.buffer, p.peer.buffer, 4096, 0}}, rkeys,
                               std::chrono::seconds(10), o2);
    std::memcpy(p.parentShadow.data(), p.childShadow.data(), 4096);
    std::string diff = compare(p.buffer, p.parentShadow, "parent");
    bool pass = called1 && !o1->ok && called2 && o2->ok && diff.empty();
    report(pass, "disconnect fails posts, reconnect works",
           !called1 ? "post after disconnect: done not called"
           : o1->ok ? "post after disconnect succeeded"
           : !called2 ? "post after reconnect: done not called"
           : !o2->ok ? "post after reconnect: " + o2->error
           : !diff.empty() ? diff : "after disconnect: " + o1->error);
  }
  {
    auto t0 = Clock::now();
    const size_t kCycles = 10000, kSize = 64u << 10;
    void* mem = mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    std::string problem;
    for (size_t i = 0; i < kCycles && problem.empty() && mem != MAP_FAILED; ++i) {
      try {
        std::vector<uint8_t> key = p.backend->registerMemory(static_cast<uint32_t>(100 + i % 7), mem, kSize);
        if (key.empty()) problem = "empty packed rkey at cycle " + std::to_string(i);
        p.backend->deregisterMemory(static_cast<uint32_t>(100 + i % 7));
      } catch (const AgentError& e) {
        problem = "cycle " + std::to_string(i) + ": " + e.code + ": " + e.message;
      }
    }
    if (mem == MAP_FAILED) problem = "mmap failed";
    p.backend->deregisterMemory(4242);  // unknown id: no-op
    char detail[64];
    std::snprintf(detail, sizeof detail, "%.0f ms, %.1f us per cycle", msSince(t0), msSince(t0) * 1000 / kCycles);
    report(problem.empty(), "10,000 register/deregister cycles of 64 KiB", problem.empty() ? detail : problem);
  }
  {
    // A post in flight while the peer stops (SIGSTOP), then dies (SIGKILL): must fail within the bound.
    // Transports that need no target progress may complete it before the kill; that is a pass too.
    kill(child, SIGSTOP);
    std::shared_ptr<Outcome> inFlight = postAsync(*p.backend, "child", true, piecesFor(cases[1], p), rkeys);
    bool finishedEarly = waitFor(*inFlight, std::chrono::milliseconds(300));
    kill(child, SIGKILL);
    waitpid(child, nullptr, 0);
    auto t0 = Clock::now();
    bool called = finishedEarly || waitFor(*inFlight, std::chrono::duration_cast<std::chrono::milliseconds>(kDeadPeerBound));
    double ms = msSince(t0);
    if (finishedEarly) {
      report(inFlight->ok, "WRITE in flight when the peer is SIGKILLed",
             inFlight->ok ? "completed before the kill (the transport needed no target progress)" : inFlight->error);
    } else {
      report(called && !inFlight->ok, "WRITE in flight when the peer is SIGKILLed fails within 10 s",
             !called ? "done was not called within 10 s of the kill"
             : inFlight->ok ? "the post succeeded"
                            : std::to_string(static_cast<int>(ms)) + " ms after the kill: " + inFlight->error);
    }

    // SIGKILLed already: a new post must fail within the bound as well.
    t0 = Clock::now();
    std::shared_ptr<Outcome> o;
    called = postAndWait(*p.backend, "child", true, piecesFor(cases[0], p), rkeys,
                         std::chrono::duration_cast<std::chrono::milliseconds>(kDeadPeerBound), o);
    ms = msSince(t0);
    report(called && !o->ok, "WRITE to a SIGKILLed peer fails within 10 s",
           !called ? "done was not called within 10 s"
           : o->ok ? "the post succeeded"
                   : std::to_string(static_cast<int>(ms)) + " ms: " + o->error);
    std::shared_ptr<Outcome> o2;
    t0 = Clock::now();
    called = postAndWait(*p.backend, "child", false, piecesFor(cases[3], p), rkeys,
                         std::chrono::duration_cast<std::chrono::milliseconds>(kDeadPeerBound), o2);
    ms = msSince(t0);
    report(called && !o2->ok, "READ from the dead peer fails too",
           !called ? "done was not called within 10 s"
           : o2->ok ? "the post succeeded"
                    : std::to_string(static_cast<int>(ms)) + " ms: " + o2->error);
  }
  {
    auto t0 = Clock::now();
    p.backend.reset();
    report(true, "backend destroyed", std::to_string(static_cast<int>(msSince(t0))) + " ms");
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main() {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  alarm(50);  // a hang must not outlive the script's 60 s budget
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    std::perror("socketpair");
    return 2;
  }
  // Fork before either process touches UCX.
  pid_t child = fork();
  if (child < 0) {
    std::perror("fork");
    return 2;
  }
  if (child == 0) {
    close(fds[0]);
    _exit(runChild(fds[1]));
  }
  close(fds[1]);
  int rc = runParent(fds[0], child);
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  std::printf("%s: %d failure(s)\n", rc == 0 ? "ALL PASSED" : "FAILED", failures);
  return rc;
}
